//! A user-space link impairment relay for loopback tests and benchmarks:
//! `tc netem` is not available here (see shared/deps.md), so loss, delay,
//! jitter, reordering and outages are applied by a small proxy that sits
//! between two endpoints.
//!
//! - [`Relay::udp`] relays datagrams (QUIC). Each client address gets its own
//!   upstream socket, as a NAT would, so replies find their way back. Every
//!   datagram is dropped with probability `loss` or queued for `delay`
//!   (± `jitter`); with probability `reorder` a datagram skips the delay
//!   line and overtakes the ones queued before it (`netem reorder`'s
//!   semantics). An outage drops everything, both ways.
//! - [`Relay::tcp`] relays TCP connections segment by segment (reads of at
//!   most one MSS, 1,448 bytes), each delayed by `delay` (± `jitter`, never
//!   reordered: TCP delivers in order). The relay terminates TCP on both
//!   sides, so it cannot make the kernel see a lost segment; instead it
//!   *models* TCP loss recovery: a "lost" segment (probability `loss`) and
//!   everything behind it (head-of-line blocking) are held for one extra
//!   round trip when at least three segments queue behind it (fast
//!   retransmit after three duplicate ACKs), and otherwise for Linux's
//!   retransmission timeout, `max(200 ms, RTT + 4 × jitter)`. An outage
//!   stalls both directions (a partition TCP would retransmit through).
//!
//! Impairments apply independently in each direction, so `delay` is one way
//! and the round trip is `2 × delay`. Randomness comes from a seeded
//! generator per direction: a run with the same seed and the same traffic
//! makes the same choices.
//!
//! Each relay runs on its own thread with a current-thread tokio runtime, so
//! it works from synchronous code and from inside another runtime alike,
//! and its timing does not depend on how busy the caller's runtime is.
//! Dropping the [`Relay`] stops it and closes its sockets.
//!
//! ```no_run
//! use meshfed_tests::relay::{Impairment, Relay};
//! use std::time::Duration;
//! # let upstream: std::net::SocketAddr = "127.0.0.1:15443".parse().unwrap();
//! let relay = Relay::udp(
//!     "127.0.0.1:0".parse().unwrap(),
//!     upstream,
//!     Impairment { loss: 0.01, delay: Duration::from_millis(10), ..Impairment::seeded(7) },
//! )
//! .unwrap();
//! // point the client at relay.local_addr() ...
//! relay.set_outage(true); // a partition: every datagram dropped
//! relay.set_outage(false);
//! ```

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the relay does to traffic, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram (or TCP segment, see the module docs) is
    /// lost, 0.0..=1.0.
    pub loss: f64,
    /// One-way delay; the round trip is twice this.
    pub delay: Duration,
    /// Uniform random extra delay in `0..=jitter`, per datagram or segment.
    pub jitter: Duration,
    /// Probability that a datagram skips the delay line (UDP only).
    pub reorder: f64,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Impairment {
    /// A clean link with the given seed (no loss, no delay).
    pub fn seeded(seed: u64) -> Self {
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            seed,
        }
    }

    /// `loss` and a round-trip time `rtt` (half of it each way).
    pub fn lossy(loss: f64, rtt: Duration, seed: u64) -> Self {
        Impairment {
            loss,
            delay: rtt / 2,
            ..Impairment::seeded(seed)
        }
    }

    /// The modelled TCP retransmission timeout for this link.
    fn rto(&self) -> Duration {
        (self.delay * 2 + self.jitter * 4).max(Duration::from_millis(200))
    }
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment::seeded(0)
    }
}

/// Counters, summed over both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams or segments delivered.
    pub forwarded: u64,
    /// Datagrams dropped (UDP) or segments that paid a modelled
    /// retransmission (TCP).
    pub lost: u64,
    /// Datagrams dropped because of an outage (UDP only).
    pub outage_dropped: u64,
    /// UDP flows opened: one per client address, plus one per client after
    /// each [`Relay::rebind`].
    pub flows: u64,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    local: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("local", &self.local)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Shared {
    impairment: Mutex<Impairment>,
    outage: AtomicBool,
    /// Notified when the outage ends, so stalled TCP segments move on.
    outage_over: tokio::sync::Notify,
    forwarded: AtomicU64,
    lost: AtomicU64,
    outage_dropped: AtomicU64,
    flows: AtomicU64,
    /// Bumped by [`Relay::rebind`]; the UDP loop drops its flows when it
    /// sees a new value.
    generation: AtomicU64,
}

impl Shared {
    fn impairment(&self) -> Impairment {
        *self
            .impairment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Relay {
    /// Relays UDP datagrams arriving at `listen` to `upstream` and replies
    /// back, impaired. `listen` may have port 0; see [`Relay::local_addr`].
    pub fn udp(
        listen: SocketAddr,
        upstream: SocketAddr,
        impairment: Impairment,
    ) -> io::Result<Relay> {
        let socket = std::net::UdpSocket::bind(listen)?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        Relay::spawn(local, impairment, move |shared, stop| async move {
            let socket = Arc::new(UdpSocket::from_std(socket)?);
            udp_main(socket, upstream, shared, stop).await;
            Ok(())
        })
    }

    /// Relays TCP connections accepted at `listen` to `upstream`, each
    /// segment delayed (and "lost" as the module docs describe).
    pub fn tcp(
        listen: SocketAddr,
        upstream: SocketAddr,
        impairment: Impairment,
    ) -> io::Result<Relay> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        Relay::spawn(local, impairment, move |shared, stop| async move {
            let listener = TcpListener::from_std(listener)?;
            tcp_main(listener, upstream, shared, stop).await;
            Ok(())
        })
    }

    fn spawn<F, Fut>(local: SocketAddr, impairment: Impairment, main: F) -> io::Result<Relay>
    where
        F: FnOnce(Arc<Shared>, watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let shared = Arc::new(Shared {
            impairment: Mutex::new(impairment),
            outage: AtomicBool::new(false),
            outage_over: tokio::sync::Notify::new(),
            forwarded: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            outage_dropped: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("relay-{local}"))
            .spawn(move || {
                if let Err(e) = rt.block_on(main(for_thread, stop_rx)) {
                    eprintln!("relay {local}: {e}");
                }
            })?;
        Ok(Relay {
            local,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address clients should use.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts (`true`) or ends (`false`) an outage: UDP drops everything,
    /// TCP stalls.
    pub fn set_outage(&self, outage: bool) {
        self.shared.outage.store(outage, Ordering::SeqCst);
        if !outage {
            self.shared.outage_over.notify_waiters();
        }
    }

    /// Replaces the impairment for traffic from now on (the seed is
    /// ignored: each direction keeps its generator).
    pub fn set_impairment(&self, impairment: Impairment) {
        *self
            .shared
            .impairment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = impairment;
    }

    /// A NAT rebinding (UDP): every flow's upstream socket is closed, and
    /// the next datagram from each client opens a new one, so the upstream
    /// sees the same peer arrive from a new source port. Replies to the old
    /// port are lost, as behind a NAT whose mapping changed.
    pub fn rebind(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            forwarded: self.shared.forwarded.load(Ordering::Relaxed),
            lost: self.shared.lost.load(Ordering::Relaxed),
            outage_dropped: self.shared.outage_dropped.load(Ordering::Relaxed),
            flows: self.shared.flows.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// splitmix64: small, seeded, good enough for drop decisions.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    fn upto(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            Duration::ZERO
        } else {
            max.mul_f64(self.unit())
        }
    }
}

// ---------------------------------------------------------------- UDP ----

/// A datagram waiting in a delay line, ordered by (due, seq).
struct Queued {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest first.
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One direction of a UDP flow: decides each datagram's fate, then sends
/// the survivors when they are due.
struct UdpDirection {
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    rng: Rng,
}

impl UdpDirection {
    /// Spawns the sender half: `send` puts one datagram on the wire.
    fn spawn<S>(seed: u64, stream: u64, send: S) -> Self
    where
        S: Fn(Vec<u8>) -> tokio::task::JoinHandle<()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::task::spawn_local(async move {
            let mut heap = BinaryHeap::new();
            let mut seq = 0u64;
            loop {
                let next_due = heap.peek().map(|q: &Queued| q.due);
                tokio::select! {
                    got = rx.recv() => match got {
                        Some((due, bytes)) => {
                            seq += 1;
                            heap.push(Queued { due, seq, bytes });
                        }
                        None => return,
                    },
                    () = async {
                        match next_due {
                            Some(due) => tokio::time::sleep_until(due).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let now = Instant::now();
                        while heap.peek().is_some_and(|q| q.due <= now) {
                            if let Some(q) = heap.pop() {
                                drop(send(q.bytes));
                            }
                        }
                    }
                }
            }
        });
        UdpDirection {
            tx,
            rng: Rng::new(seed, stream),
        }
    }

    fn offer(&mut self, shared: &Shared, bytes: Vec<u8>) {
        if shared.outage.load(Ordering::Relaxed) {
            shared.outage_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let imp = shared.impairment();
        if self.rng.chance(imp.loss) {
            shared.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let due = if self.rng.chance(imp.reorder) {
            now
        } else {
            now + imp.delay + self.rng.upto(imp.jitter)
        };
        shared.forwarded.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send((due, bytes));
    }
}

async fn udp_main(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let seed = shared.impairment().seed;
            let mut flows: HashMap<SocketAddr, UdpFlow> = HashMap::new();
            let mut generation = shared.generation.load(Ordering::SeqCst);
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, client) = tokio::select! {
                    _ = stop.changed() => return,
                    got = socket.recv_from(&mut buf) => match got {
                        Ok(got) => got,
                        // ICMP errors from earlier sends surface here; ignore.
                        Err(_) => continue,
                    },
                };
                let now = shared.generation.load(Ordering::SeqCst);
                if now != generation {
                    generation = now;
                    // Dropping a flow aborts its reply reader, which closes
                    // the old upstream socket.
                    flows.clear();
                }
                let flow = match flows.entry(client) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let id = shared.flows.load(Ordering::Relaxed);
                        match udp_flow(&socket, client, upstream, &shared, seed, id).await {
                            Ok(flow) => e.insert(flow),
                            Err(e) => {
                                eprintln!(
                                    "relay: cannot open an upstream socket for {client}: {e}"
                                );
                                continue;
                            }
                        }
                    }
                };
                flow.forward.offer(&shared, buf[..n].to_vec());
            }
        })
        .await;
}

/// One client's flow: its direction toward the upstream, and the task that
/// reads the upstream's replies (which owns the upstream socket).
struct UdpFlow {
    forward: UdpDirection,
    replies: tokio::task::JoinHandle<()>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Opens the upstream socket of a new client and starts both directions.
async fn udp_flow(
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    shared: &Arc<Shared>,
    seed: u64,
    flow: u64,
) -> io::Result<UdpFlow> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let up = Arc::new(UdpSocket::bind(bind).await?);
    up.connect(upstream).await?;
    let forward = {
        let up = Arc::clone(&up);
        UdpDirection::spawn(seed, flow * 2, move |bytes| {
            let up = Arc::clone(&up);
            tokio::task::spawn_local(async move {
                let _ = up.send(&bytes).await;
            })
        })
    };
    let mut back = {
        let socket = Arc::clone(socket);
        UdpDirection::spawn(seed, flow * 2 + 1, move |bytes| {
            let socket = Arc::clone(&socket);
            tokio::task::spawn_local(async move {
                let _ = socket.send_to(&bytes, client).await;
            })
        })
    };
    shared.flows.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(shared);
    let replies = tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match up.recv(&mut buf).await {
                Ok(n) => back.offer(&shared, buf[..n].to_vec()),
                Err(_) => continue,
            }
        }
    });
    Ok(UdpFlow { forward, replies })
}

// ---------------------------------------------------------------- TCP ----

/// Bytes per relayed segment: one Ethernet MSS with timestamps.
const MSS: usize = 1448;

async fn tcp_main(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn = 0u64;
    loop {
        let (down, _) = tokio::select! {
            _ = stop.changed() => return,
            got = listener.accept() => match got {
                Ok(got) => got,
                Err(_) => continue,
            },
        };
        conn += 1;
        let shared = Arc::clone(&shared);
        let seed = shared.impairment().seed;
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            let a = tcp_direction(dr, uw, Arc::clone(&shared), Rng::new(seed, conn * 2));
            let b = tcp_direction(ur, dw, shared, Rng::new(seed, conn * 2 + 1));
            tokio::join!(a, b);
        });
    }
}

/// One direction of a TCP connection: a reader that stamps segments with
/// their due time and a writer that delivers them in order.
async fn tcp_direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    mut rng: Rng,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, bool, Vec<u8>)>();
    let reader = {
        let shared = Arc::clone(&shared);
        async move {
            let mut buf = vec![0u8; MSS];
            let mut last_due = Instant::now();
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let imp = shared.impairment();
                let lost = rng.chance(imp.loss);
                // In order: never due before the segment ahead of it.
                let due = (Instant::now() + imp.delay + rng.upto(imp.jitter)).max(last_due);
                last_due = due;
                if tx.send((due, lost, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    };
    let writer = async move {
        let mut queue: VecDeque<(Instant, bool, Vec<u8>)> = VecDeque::new();
        // Everything behind a retransmission waits for it.
        let mut hold_until: Option<Instant> = None;
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(seg) => queue.push_back(seg),
                    None => break,
                }
            }
            while let Ok(seg) = rx.try_recv() {
                queue.push_back(seg);
            }
            let Some((due, lost, _)) = queue.front() else {
                continue;
            };
            let (due, lost) = (*due, *lost);
            tokio::time::sleep_until(due.max(hold_until.unwrap_or(due))).await;
            while shared.outage.load(Ordering::SeqCst) {
                let over = shared.outage_over.notified();
                if !shared.outage.load(Ordering::SeqCst) {
                    break;
                }
                over.await;
            }
            if lost && hold_until.is_none() {
                // Decide how the sender recovers, from what queued behind.
                while let Ok(seg) = rx.try_recv() {
                    queue.push_back(seg);
                }
                let imp = shared.impairment();
                let penalty = if queue.len() > 3 {
                    imp.delay * 2
                } else {
                    imp.rto()
                };
                shared.lost.fetch_add(1, Ordering::Relaxed);
                hold_until = Some(Instant::now() + penalty);
                continue;
            }
            hold_until = None;
            if let Some((_, _, bytes)) = queue.pop_front() {
                if to.write_all(&bytes).await.is_err() {
                    break;
                }
                shared.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn udp_relay_delays_each_way_and_drops_at_the_seeded_rate() {
        rt().block_on(async {
            let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let echo_addr = echo.local_addr().unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                    let _ = echo.send_to(&buf[..n], from).await;
                }
            });
            let relay = Relay::udp(
                "127.0.0.1:0".parse().unwrap(),
                echo_addr,
                Impairment {
                    delay: Duration::from_millis(20),
                    ..Impairment::seeded(1)
                },
            )
            .unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.connect(relay.local_addr()).await.unwrap();
            let start = std::time::Instant::now();
            client.send(b"ping").await.unwrap();
            let mut buf = [0u8; 16];
            let n = client.recv(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"ping");
            assert!(
                start.elapsed() >= Duration::from_millis(40),
                "{:?}",
                start.elapsed()
            );

            relay.set_impairment(Impairment {
                loss: 0.5,
                ..Impairment::seeded(1)
            });
            for _ in 0..400 {
                client.send(b"x").await.unwrap();
            }
            // Give stragglers a moment; only the counters matter here.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let s = relay.stats();
            // 400 forward attempts plus the echoes of the survivors: about
            // half of the forward ones die, then half of the echoes.
            assert!((150..=350).contains(&s.lost), "{s:?}");

            relay.set_outage(true);
            relay.set_impairment(Impairment::seeded(1));
            client.send(b"gone").await.unwrap();
            let got = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    let n = client.recv(&mut buf).await.unwrap();
                    if &buf[..n] == b"gone" {
                        break;
                    }
                }
            })
            .await;
            assert!(got.is_err(), "a datagram crossed an outage");
            assert!(relay.stats().outage_dropped >= 1);
        });
    }

    #[test]
    fn tcp_relay_delays_in_order_and_stalls_through_an_outage() {
        rt().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            let relay = Relay::tcp(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                Impairment {
                    delay: Duration::from_millis(15),
                    loss: 0.2,
                    ..Impairment::seeded(3)
                },
            )
            .unwrap();
            let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
            let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
            let start = std::time::Instant::now();
            let (mut r, mut w) = s.split();
            let send = async {
                w.write_all(&data).await.unwrap();
            };
            let mut back = vec![0u8; data.len()];
            let recv = async { r.read_exact(&mut back).await.unwrap() };
            tokio::join!(send, recv);
            assert_eq!(back, data, "bytes arrive intact and in order");
            assert!(start.elapsed() >= Duration::from_millis(30));
            assert!(relay.stats().lost > 0, "{:?}", relay.stats());

            relay.set_impairment(Impairment::seeded(3));
            relay.set_outage(true);
            s.write_all(b"held").await.unwrap();
            let mut four = [0u8; 4];
            let early =
                tokio::time::timeout(Duration::from_millis(150), s.read_exact(&mut four)).await;
            assert!(early.is_err(), "bytes crossed an outage");
            relay.set_outage(false);
            s.read_exact(&mut four).await.unwrap();
            assert_eq!(&four, b"held");
        });
    }

    #[test]
    fn the_generator_is_deterministic_per_seed() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, {
            let mut r = Rng::new(43, 0);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        });
    }
}
