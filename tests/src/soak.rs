//! The soak's moving parts (`tests/soak.rs`): an echo TCP backend (in
//! process, or the `meshfed-echo` binary), a fleet
//! of long-lived TCP streams that each echo a small message on a schedule
//! and check what comes back, the open-files limit, and `/proc` readings of
//! a process.
//!
//! It asserts nothing: the test decides what the figures must be. It starts
//! no gateway either (see [`crate::federation`]).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Raises this process's soft open-files limit to at least `want`, and the
/// hard limit too when it is lower (which takes `CAP_SYS_RESOURCE`, e.g.
/// root). Processes started afterwards inherit the new limits. Returns the
/// soft limit now in force.
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= want {
        return Ok(soft);
    }
    let maximum = match now.maximum {
        Some(hard) if hard < want => Some(want),
        hard => hard,
    };
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum,
        },
    )
    .map_err(|e| {
        format!(
            "cannot raise the open-files limit from {soft} (hard {}) to {want}: {e}; run as \
             root, or raise the hard limit first (`ulimit -Hn {want}` in the shell that \
             starts the tests)",
            now.maximum
                .map_or_else(|| "unlimited".to_string(), |h| h.to_string())
        )
    })?;
    Ok(want)
}

/// The soft open-files limit of process `pid`, from `/proc/<pid>/limits`
/// (`u64::MAX` for unlimited).
pub fn nofile_soft(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/limits");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let field = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .ok_or_else(|| format!("{path} has no `Max open files` line"))?;
    if field == "unlimited" {
        return Ok(u64::MAX);
    }
    field
        .parse()
        .map_err(|e| format!("{path}: `{field}` is not a number: {e}"))
}

/// What `/proc` says about a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), in bytes.
    pub rss: u64,
    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub fds: usize,
}

impl ProcSample {
    /// Reads process `pid`; an error if it is gone, so a dead process never
    /// passes for a small one.
    pub fn read(pid: u32) -> Result<ProcSample, String> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path} has no VmRSS (a zombie?)"))?;
        let dir = format!("/proc/{pid}/fd");
        let fds = std::fs::read_dir(&dir)
            .map_err(|e| format!("reading {dir}: {e}"))?
            .count();
        Ok(ProcSample {
            rss: kb * 1024,
            fds,
        })
    }
}

/// Serves echo on `listener` forever: each connection gets every byte it
/// sends back, and our FIN after its own. `live` counts the connections
/// held.
pub async fn serve_echo(listener: TcpListener, live: Arc<AtomicUsize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: the stream that wanted this
            // connection fails and reports it.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let live = live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            echo_connection(stream).await;
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// An echo TCP server on loopback in this process ([`serve_echo`]).
/// Accepting stops when it is dropped.
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
    live: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl EchoServer {
    /// Binds a loopback port and serves on `rt`.
    pub fn start(rt: &Handle) -> std::io::Result<EchoServer> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let live = Arc::new(AtomicUsize::new(0));
        let counted = live.clone();
        let accept = rt.spawn(async move {
            if let Ok(listener) = TcpListener::from_std(std_listener) {
                serve_echo(listener, counted).await;
            }
        });
        Ok(EchoServer { addr, live, accept })
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The `meshfed-echo` binary ([`serve_echo`] in a process of its own, so
/// that its descriptors count against its own open-files limit, not the
/// caller's). Killed when dropped.
#[derive(Debug)]
pub struct EchoProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl EchoProcess {
    /// Starts `program` (the `meshfed-echo` binary) on a loopback port and
    /// reads the address it prints.
    pub fn start(program: &Path) -> Result<EchoProcess, String> {
        let mut child = Command::new(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        // Read the first line on a thread, so that a child that prints
        // nothing cannot hang the caller.
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let read = std::io::BufReader::new(out).read_line(&mut line);
                let _ = tx.send(read.map(|_| line));
            });
        }
        let within = crate::patient(Duration::from_secs(10));
        let line = rx.recv_timeout(within);
        match line
            .as_ref()
            .map(|l| l.as_ref().map(|l| l.trim().parse::<SocketAddr>()))
        {
            Ok(Ok(Ok(addr))) => Ok(EchoProcess { addr, child }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "{} printed no address within {within:?}: {line:?}",
                    program.display()
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoes until the client's FIN, then sends ours. A small buffer: the
/// messages are small and there are thousands of connections.
async fn echo_connection(mut stream: TcpStream) {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown().await;
}

/// How a [`Fleet`] behaves.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Where every stream connects (a gateway's mapped TCP port).
    pub target: SocketAddr,
    pub streams: usize,
    /// Each stream echoes once per period, at its own phase: the fleet's
    /// echoes are spread evenly over the period.
    pub every: Duration,
    /// A connect, an echo or a close that takes longer fails.
    pub timeout: Duration,
    /// Streams connecting and making their first echo at once, during the
    /// ramp.
    pub ramp_concurrency: usize,
}

/// What a [`Fleet`] has done so far.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Streams whose first echo came back: open end to end.
    pub established: AtomicUsize,
    /// Echoes that came back intact, the first ones included.
    pub echoes: AtomicU64,
    /// The slowest echo round trip, in microseconds.
    pub max_echo_us: AtomicU64,
    /// Streams that failed: a connect, write or read error (a reset among
    /// them), an echo that came back wrong or late, or a close other than a
    /// clean FIN both ways. A failed stream ends.
    pub failures: AtomicUsize,
    /// Streams closed cleanly when the fleet was closed.
    pub closed: AtomicUsize,
    first_failures: Mutex<Vec<String>>,
}

impl FleetStats {
    /// The first few failures, in words.
    pub fn first_failures(&self) -> Vec<String> {
        self.first_failures
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = self.first_failures.lock()
            && v.len() < 10
        {
            v.push(what);
        }
    }
}

/// Long-lived TCP streams, each echoing a small numbered message on a
/// schedule and checking the answer byte for byte, until closed.
#[derive(Debug)]
pub struct Fleet {
    pub stats: Arc<FleetStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts every stream on `rt`; they connect at most
    /// `spec.ramp_concurrency` at a time, and each counts as established once
    /// its first echo is back. Returns at once: watch [`Fleet::stats`].
    pub fn start(rt: &Handle, spec: FleetSpec) -> Fleet {
        let stats = Arc::new(FleetStats::default());
        let (stop, stopped) = watch::channel(false);
        let ramp = Arc::new(Semaphore::new(spec.ramp_concurrency.max(1)));
        let epoch = Instant::now();
        let spec = Arc::new(spec);
        let tasks = (0..spec.streams)
            .map(|id| {
                rt.spawn(run_stream(
                    id,
                    spec.clone(),
                    epoch,
                    ramp.clone(),
                    stats.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        Fleet { stats, stop, tasks }
    }

    /// Streams still running (not failed, not closed).
    pub fn running(&self) -> usize {
        self.tasks.iter().filter(|t| !t.is_finished()).count()
    }

    /// Asks every stream to close after its current echo (FIN, then the
    /// echo server's FIN back with nothing after the last echo) and waits
    /// for all of them, for at most `within`.
    pub async fn close(self, within: Duration) -> Result<(), String> {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + within;
        let mut left = 0;
        for mut task in self.tasks {
            // A finished task is ready even past the deadline: `timeout_at`
            // polls it first.
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                left += 1;
            }
        }
        if left > 0 {
            Err(format!(
                "{left} stream(s) still open {within:?} after the close"
            ))
        } else {
            Ok(())
        }
    }
}

async fn run_stream(
    id: usize,
    spec: Arc<FleetSpec>,
    epoch: Instant,
    ramp: Arc<Semaphore>,
    stats: Arc<FleetStats>,
    mut stop: watch::Receiver<bool>,
) {
    let permit = ramp.acquire_owned().await;
    let mut stream = match tokio::time::timeout(spec.timeout, TcpStream::connect(spec.target)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return stats.fail(format!("stream {id}: connect: {e}")),
        Err(_) => return stats.fail(format!("stream {id}: connect: no answer in time")),
    };
    let _ = stream.set_nodelay(true);
    let mut seq = 0u64;
    if let Err(e) = echo(&mut stream, id, seq, &spec, &stats).await {
        return stats.fail(format!("stream {id}: first echo: {e}"));
    }
    drop(permit);
    stats.established.fetch_add(1, Ordering::Relaxed);
    // This stream's phase within the period, so that the fleet's echoes
    // are spread evenly over it.
    let phase = spec.every.mul_f64(id as f64 / spec.streams.max(1) as f64);
    let now = Instant::now();
    let mut first = epoch + phase;
    while first <= now {
        first += spec.every;
    }
    let mut tick = tokio::time::interval_at(first, spec.every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // A dropped sender stops the stream too.
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        seq += 1;
        if let Err(e) = echo(&mut stream, id, seq, &spec, &stats).await {
            return stats.fail(format!("stream {id}: echo {seq}: {e}"));
        }
    }
    match close(&mut stream, spec.timeout).await {
        Ok(()) => {
            stats.closed.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => stats.fail(format!("stream {id}: close after {seq} echoes: {e}")),
    }
}

/// Writes `<id>:<seq>:meshfed-soak\n` and reads exactly that back.
async fn echo(
    stream: &mut TcpStream,
    id: usize,
    seq: u64,
    spec: &FleetSpec,
    stats: &FleetStats,
) -> Result<(), String> {
    let msg = format!("{id:06}:{seq:012}:meshfed-soak\n");
    let mut back = [0u8; 64];
    let back = &mut back[..msg.len()];
    let start = Instant::now();
    let round = async {
        stream
            .write_all(msg.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        stream
            .read_exact(back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(spec.timeout, round).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(format!("no echo within {:?}", spec.timeout)),
    }
    if back != msg.as_bytes() {
        return Err(format!(
            "sent {msg:?}, got {:?}",
            String::from_utf8_lossy(back)
        ));
    }
    let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.max_echo_us.fetch_max(us, Ordering::Relaxed);
    stats.echoes.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends FIN and expects FIN back with no byte before it.
async fn close(stream: &mut TcpStream, within: Duration) -> Result<(), String> {
    stream
        .shutdown()
        .await
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut rest)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => Err(format!("{n} unexpected byte(s) after the last echo")),
        Ok(Err(e)) => Err(format!("read after FIN: {e}")),
        Err(_) => Err(format!("no FIN back within {within:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_through_a_plain_echo_server_echoes_and_closes_cleanly() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let echo = EchoServer::start(rt.handle()).unwrap();
        let fleet = Fleet::start(
            rt.handle(),
            FleetSpec {
                target: echo.addr,
                streams: 50,
                every: Duration::from_millis(20),
                timeout: Duration::from_secs(5),
                ramp_concurrency: 8,
            },
        );
        let stats = fleet.stats.clone();
        crate::eventually(
            "50 streams echo 5 times each",
            Duration::from_secs(10),
            || {
                let n = stats.echoes.load(Ordering::Relaxed);
                if n >= 250 {
                    Ok(())
                } else {
                    Err(format!("{n} echoes"))
                }
            },
        );
        assert_eq!(echo.live(), 50);
        rt.block_on(fleet.close(Duration::from_secs(5))).unwrap();
        assert_eq!(
            stats.failures.load(Ordering::Relaxed),
            0,
            "{:?}",
            stats.first_failures()
        );
        assert_eq!(stats.closed.load(Ordering::Relaxed), 50);
        crate::assert_eventually(
            "the echo server closes its side",
            Duration::from_secs(5),
            || echo.live() == 0,
        );
    }

    #[test]
    fn the_process_sample_of_a_gone_process_is_an_error() {
        assert!(ProcSample::read(std::process::id()).is_ok_and(|s| s.rss > 0 && s.fds > 0));
        assert!(ProcSample::read(u32::MAX).is_err());
        assert!(nofile_soft(std::process::id()).is_ok_and(|n| n > 0));
    }
}
