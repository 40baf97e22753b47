//! Links between gateways: the QUIC endpoint and the TCP listener, the peer
//! pool, and the control stream that carries announcements.
//!
//! A link runs over QUIC, or over HTTP/2 on mutual TLS on TCP where UDP is
//! blocked ([`super::tcp`], `--link-transport`); the rest of this module
//! treats both alike ([`Conn`]). In `auto` (the default) each link chooses
//! for itself: it dials QUIC, and TCP beside it if QUIC has not answered
//! within [`HAPPY_EYEBALLS_DELAY`]; a link that came up over TCP keeps
//! trying QUIC and, once QUIC answers, moves new streams there while the
//! TCP connection finishes its own ([`drain_superseded`]).
//!
//! Each gateway dials every gateway address of every other cluster in the
//! snapshot, eagerly, and keeps one long-lived connection per address (a
//! [`Link`]) with many streams on it. Requests this gateway sends to a
//! cluster go over the links it dialed; the links peers dialed to it carry
//! the requests it serves, and on each of those it announces what it can
//! serve. A link whose connection dies is redialed with exponential backoff
//! and jitter; with several addresses per cluster, [`Tunnel::pick`] skips
//! dead and draining ones.
//!
//! Dead-peer detection is QUIC's idle timeout, fed by keep-alives: see
//! [`LinkSettings`]. quinn stretches the idle timeout to at least three
//! probe timeouts, which keeps slow links (high RTT) from flapping.
//!
//! It does not own TLS material or its verification (the caller passes
//! rustls configs and an identification function, from
//! [`crate::identity`]), nor what streams carry ([`crate::proxy`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::BytesMut;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::loss::{LossView, LossWindow, Sample, Verdict};
use rustls_pki_types::CertificateDer;

use super::socket::{ClassifyingSocket, DatagramDrops};
use super::stream::{RecvHalf, SendHalf};
use super::tcp::{self, TcpConn};
use crate::wire::announce::Announcement;
use crate::wire::frame::{self, Frame};

/// Timing and sizing of links.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// No packet from the peer for this long (stretched by quinn to at least
    /// three probe timeouts) and the link is dead.
    pub idle_timeout: Duration,
    /// How often to ping an otherwise quiet link.
    pub keep_alive: Duration,
    /// A handshake that takes longer fails.
    pub handshake_timeout: Duration,
    /// Redial backoff bounds.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Announcements are re-sent this often even when nothing changed.
    pub announce_every: Duration,
    /// A link without an announcement for this long is unavailable.
    pub announce_stale: Duration,
    /// Concurrent streams a peer may open on one link, once its
    /// certificate has been checked (before that: none, see
    /// [`server_transport`]).
    pub max_streams: u32,
    /// Handshakes in flight above which a client whose address is not yet
    /// validated gets a stateless Retry (it must echo a token, so a spoofed
    /// source costs nothing).
    pub retry_above: usize,
    /// Handshakes in flight at most; more are refused at once.
    pub max_handshakes: usize,
    /// The links' congestion controller.
    pub congestion: Congestion,
    /// The sliding window of each link's loss ratio and random-loss
    /// verdict ([`super::loss`]).
    pub loss_window: Duration,
    /// What links this gateway dials run over (`--link-transport`). It
    /// serves both whatever this says.
    pub transport: LinkTransport,
}

/// What the links a gateway dials run over (`--link-transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LinkTransport {
    /// QUIC preferred, TCP where QUIC does not answer, per link: happy
    /// eyeballs ([`HAPPY_EYEBALLS_DELAY`]), and a link on TCP keeps trying
    /// QUIC and moves back to it ([`PROBE_EVERY`]; docs/tunnel.md,
    /// "Transports").
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// HTTP/2 over mutual TLS on TCP only ([`super::tcp`]).
    Tcp,
}

/// The transport of one connection, for `/peers` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    /// The `transport` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl LinkTransport {
    /// The transport a link of this setting dials (in `auto`, the one it
    /// prefers).
    pub fn dials(self) -> Transport {
        match self {
            LinkTransport::Auto | LinkTransport::Quic => Transport::Quic,
            LinkTransport::Tcp => Transport::Tcp,
        }
    }
}

/// A link's congestion controller (`--congestion-control`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: every loss is read as
    /// congestion, which suits links where loss means a full queue.
    #[default]
    Cubic,
    /// BBR (quinn's implementation, which quinn calls experimental): paced
    /// by the measured bandwidth and RTT, so random loss on a lossy radio
    /// or satellite link does not shrink the window.
    Bbr,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            // A dead peer is noticed at most keep_alive + idle_timeout after
            // its last packet (< 1 s). 8 keep-alives fit in the timeout: at
            // 5% loss, losing all of them happens about once in 2.6e10
            // windows, so the link does not flap.
            idle_timeout: Duration::from_millis(800),
            keep_alive: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            announce_every: Duration::from_secs(5),
            announce_stale: Duration::from_secs(16),
            max_streams: MAX_STREAMS_PER_PEER,
            retry_above: 16,
            max_handshakes: 128,
            congestion: Congestion::Cubic,
            loss_window: super::loss::DEFAULT_WINDOW,
            transport: LinkTransport::Auto,
        }
    }
}

/// Concurrent streams one verified peer may open on a link: its share of
/// the gateway's memory, which must fit the shipped limit (128 MiB, the
/// `deploy/` manifests) with room to spare.
///
/// - baseline: about 21 MB RSS idle (docs/benchmarks.md);
/// - a stream costs at most about 8.4 KB at the destination while it is
///   open (the measured cost of a half-open stream waiting for its OPEN;
///   an opaque TCP stream costs 6.4 KB): 10,000 × 8.4 KB = 84 MB;
/// - data quinn buffers for the peer is bounded by the connection's
///   receive window (16 MiB, 16.8 MB, see [`base_transport`]).
///
/// 21 + 84 + 16.8 ≈ 122 MB (116 MiB) of 134 MB (128 MiB). At the former
/// 16,384 the streams alone (138 MB) did not fit. 10,000 is also the
/// design's figure for one link (docs/benchmarks.md). A stream whose OPEN
/// does not arrive within [`crate::proxy::HEAD_TIMEOUT`] is reset, so a
/// peer cannot hold one longer than that doing nothing.
pub const MAX_STREAMS_PER_PEER: u32 = 10_000;

/// The transport settings shared by both ends of a link.
///
/// quinn's defaults suit about 100 Mbit/s × 100 ms. Links between sites can
/// be 1 Gbit/s × 100 ms (12.5 MB in flight), so the connection windows are
/// raised to 16 MiB; a single stream may use 8 MiB. Buffers are allocated as
/// data arrives, so idle streams cost no window memory. The connection's
/// window is also the bound on what one peer can make quinn buffer here,
/// however many streams it opens: it is part of the per-peer memory budget
/// ([`MAX_STREAMS_PER_PEER`]); do not raise it without redoing that sum.
/// It bounds memory only because the socket hands quinn one buffer per
/// datagram ([`super::socket`] splits coalesced batches): otherwise unread
/// data pins whole receive batches, many times the window.
///
/// Stream limits are not set here: quinn allocates the state of every stream
/// a peer may open when the connection is created, before any certificate is
/// seen (about 75 bytes per allowed stream: 750 KB per connection at 10,000),
/// so each side sets its own in [`server_transport`] and
/// [`client_transport`].
fn base_transport(s: &LinkSettings) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20)
        .keep_alive_interval(Some(s.keep_alive))
        .max_idle_timeout(s.idle_timeout.try_into().ok());
    if s.congestion == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    t
}

/// The dialed side's transport: a peer may open no stream at all until its
/// certificate has been checked and its cluster found in the snapshot
/// ([`Tunnel::serve`] then raises the limit to
/// [`LinkSettings::max_streams`]), so a handshake that never completes costs
/// kilobytes, not the state of 10,000 streams. Dialers never open
/// unidirectional streams.
pub fn server_transport(s: &LinkSettings) -> TransportConfig {
    let mut t = base_transport(s);
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// The dialer's transport: the dialed side opens only the control stream
/// (unidirectional), never a bidirectional one.
pub fn client_transport(s: &LinkSettings) -> TransportConfig {
    let mut t = base_transport(s);
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(2));
    t
}

/// Why the tunnel turned a peer away (beyond the TLS verifiers' own
/// refusals), counted for `meshfed_handshake_refusals_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Too many handshakes in flight ([`LinkSettings::max_handshakes`]):
    /// refused at once.
    HandshakeLimit,
    /// Many handshakes in flight and the client's address not validated: a
    /// stateless Retry was sent instead of any state kept.
    AddressValidation,
    /// A verified gateway of a cluster the snapshot does not declare.
    UndeclaredCluster,
    /// The certificate is valid but not a gateway's, or unreadable (the
    /// verifier refuses those first; this is the tunnel's own check).
    NotAGateway,
}

impl Admission {
    const ALL: [Admission; 4] = [
        Admission::HandshakeLimit,
        Admission::AddressValidation,
        Admission::UndeclaredCluster,
        Admission::NotAGateway,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Admission::HandshakeLimit => "handshake_limit",
            Admission::AddressValidation => "address_validation",
            Admission::UndeclaredCluster => "undeclared_cluster",
            Admission::NotAGateway => "not_a_gateway",
        }
    }
}

/// The tunnel's admission refusals by reason.
#[derive(Debug, Default)]
pub struct AdmissionRefusals {
    counts: [AtomicU64; Admission::ALL.len()],
}

impl AdmissionRefusals {
    fn record(&self, a: Admission) {
        self.counts[a as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one reason.
    pub fn count(&self, a: Admission) -> u64 {
        self.counts[a as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count, for metrics (`reason` label).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Admission::ALL
            .iter()
            .map(|a| (a.as_str(), self.count(*a)))
            .collect()
    }
}

/// Who is on the other end of a link, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub cluster: String,
    /// The SPIFFE ID of the peer's certificate.
    pub id: String,
    /// The trust domain of the peer's cluster intermediate.
    pub trust_domain: String,
}

/// Reads the peer's identity from the certificate chain it presented (the
/// verifiers checked it already; empty when it presented none); refuses
/// peers that may not use the tunnel.
pub type Identify =
    Arc<dyn Fn(&[CertificateDer<'static>]) -> Result<PeerInfo, String> + Send + Sync>;

/// The certificate chain of a QUIC connection's peer.
fn quic_chain(conn: &Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|chain| *chain)
        .unwrap_or_default()
}

/// Serves one stream a peer opened.
pub type StreamHandler = Arc<
    dyn Fn(Arc<PeerInfo>, SendHalf, RecvHalf) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// The server name that asks the verifier for a gateway of `cluster`.
pub fn server_name(cluster: &str) -> String {
    format!("{cluster}.cluster.meshfed.internal")
}

/// Why a link could not carry a stream.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "no link to cluster `{0}` is up; are its gateways reachable (UDP for QUIC, or TCP on the same port for TCP links)?"
    )]
    NoLink(String),
    #[error("link to {target} lost: {reason}")]
    Lost { target: String, reason: String },
}

/// The state of one link, for `/peers` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    pub cluster: String,
    pub target: String,
    pub remote: Option<SocketAddr>,
    /// What the link runs over: its connection's transport, or when down
    /// the one it dials.
    pub transport: Transport,
    pub up: bool,
    pub available: bool,
    pub draining: bool,
    pub rtt_ms: Option<f64>,
    pub lost_packets: u64,
    pub open_streams: i64,
    pub connects: u64,
    pub announced_config: Option<String>,
    pub announced_services: usize,
    pub last_error: Option<String>,
    /// The loss of what this gateway sent on the link, over the sliding
    /// window, and the random-loss verdict ([`super::loss`]).
    pub loss: LossView,
}

/// One dialed connection to one gateway address of a peer cluster.
#[derive(Debug)]
pub struct Link {
    pub cluster: String,
    /// The address as the snapshot lists it (`host:port`).
    pub target: String,
    conn: ArcSwapOption<Conn>,
    /// The transport this link dials.
    dials: Transport,
    announcement: ArcSwapOption<Announcement>,
    last_announce: Mutex<Option<Instant>>,
    /// Streams open on the link, over every connection it has had
    /// (shared with them: [`StreamGuard`] counts through the connection).
    open_streams: Arc<AtomicI64>,
    connects: AtomicU64,
    last_error: Mutex<Option<String>>,
    stop: watch::Sender<bool>,
    /// The current connection's loss window, fed by the dial loop.
    loss: Mutex<LossWindow>,
    /// Whether the random-loss warning was logged (once per link).
    warned: AtomicBool,
}

impl Link {
    /// The live connection, if any.
    pub fn connection(&self) -> Option<Arc<Conn>> {
        self.conn.load_full().filter(|c| !c.is_closed())
    }

    /// The peer's latest announcement, if it is fresh.
    pub fn announcement(&self, stale: Duration) -> Option<Arc<Announcement>> {
        let fresh = self
            .last_announce
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < stale);
        if fresh {
            self.announcement.load_full()
        } else {
            None
        }
    }

    /// Up, announcing, and not draining.
    pub fn available(&self, stale: Duration) -> bool {
        self.connection().is_some() && self.announcement(stale).is_some_and(|a| !a.draining)
    }

    /// Opens a stream to the peer. The returned guard counts it as open
    /// until dropped, on the link and on the connection it went on.
    ///
    /// The stream is counted before it opens, so a superseded connection
    /// is not closed under it ([`drain_superseded`]); if the link moved to
    /// another connection while this one was opening and the open failed
    /// (an upgrade to QUIC won that race), it opens on the new one: a
    /// switch of transport fails no stream.
    pub async fn open(self: &Arc<Self>) -> Result<(SendHalf, RecvHalf, StreamGuard), LinkError> {
        let mut guard = StreamGuard::new(
            self.connection()
                .ok_or_else(|| LinkError::NoLink(self.cluster.clone()))?,
        );
        loop {
            match guard.0.open().await {
                Ok((send, recv)) => return Ok((send, recv, guard)),
                Err(reason) => match self.connection() {
                    Some(now) if !Arc::ptr_eq(&now, &guard.0) => guard = StreamGuard::new(now),
                    _ => {
                        return Err(LinkError::Lost {
                            target: self.target.clone(),
                            reason,
                        });
                    }
                },
            }
        }
    }

    pub fn open_streams(&self) -> i64 {
        self.open_streams.load(Ordering::Relaxed)
    }

    fn status(&self, stale: Duration) -> LinkStatus {
        let conn = self.connection();
        let ann = self.announcement.load_full();
        LinkStatus {
            cluster: self.cluster.clone(),
            target: self.target.clone(),
            remote: conn.as_ref().map(|c| c.remote_address()),
            transport: conn.as_ref().map_or(self.dials, |c| c.transport()),
            up: conn.is_some(),
            available: self.available(stale),
            draining: ann.as_ref().is_some_and(|a| a.draining),
            rtt_ms: conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1e3),
            lost_packets: conn.as_ref().map_or(0, |c| c.lost_packets()),
            open_streams: self.open_streams(),
            connects: self.connects.load(Ordering::Relaxed),
            announced_config: ann.as_ref().map(|a| a.config_version.clone()),
            announced_services: ann.as_ref().map_or(0, |a| a.services.len()),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            loss: self.loss.lock().map(|w| w.view()).unwrap_or_default(),
        }
    }

    /// Feeds the loss window from the connection's counters, and says so
    /// when the random-loss verdict changes: once per link at `warn` when
    /// it first turns on under CUBIC (the controller that suffers from
    /// it), at `info` otherwise.
    fn observe_loss(&self, conn: &Connection, congestion: Congestion) {
        let stats = conn.stats().path;
        let sample = Sample {
            at: Instant::now(),
            sent: stats.sent_packets,
            lost: stats.lost_packets,
            congestion_events: stats.congestion_events,
            rtt: stats.rtt,
            min_rtt: stats.min_rtt,
        };
        let Ok(mut w) = self.loss.lock() else {
            return;
        };
        let change = w.record(sample);
        let v = w.view();
        drop(w);
        let percent = v.ratio.unwrap_or(0.0) * 100.0;
        match change {
            Some(Verdict::TurnedOn)
                if congestion == Congestion::Cubic
                    && !self.warned.swap(true, Ordering::Relaxed) =>
            {
                tracing::warn!(
                    cluster = %self.cluster, target = %self.target,
                    loss_percent = percent, lost = v.lost, sent = v.sent, window_s = v.span_s,
                    queue_ms = v.queue_ms, congestion_events = v.congestion_events,
                    "sustained random loss on the link: {percent:.2}% of packets lost over {:.0} s with a flat RTT; \
                     CUBIC reads each loss as congestion and slows every call on the link; \
                     try `--congestion-control bbr` on this gateway and its peers (docs/operations.md, \"Lossy links\")",
                    v.span_s,
                );
            }
            Some(Verdict::TurnedOn) => {
                tracing::info!(cluster = %self.cluster, target = %self.target, loss_percent = percent, lost = v.lost, sent = v.sent, window_s = v.span_s, "sustained random loss on the link");
            }
            Some(Verdict::TurnedOff) => {
                tracing::info!(cluster = %self.cluster, target = %self.target, loss_percent = percent, queue_ms = v.queue_ms, "random loss on the link has ended");
            }
            None => {}
        }
    }
}

/// Counts an open stream on a connection and its link until dropped, and
/// keeps that connection alive meanwhile. One pointer: it is in every
/// request's state (proxy::outbound::future_sizes).
#[derive(Debug)]
pub struct StreamGuard(Arc<Conn>);

impl StreamGuard {
    fn new(conn: Arc<Conn>) -> Self {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        conn.link_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(conn)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.link_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A link's connection, over either transport, with the streams open on
/// it.
#[derive(Debug)]
pub struct Conn {
    wire: Wire,
    /// Streams opened (or being opened) on this connection and not yet
    /// done ([`StreamGuard`]): a connection a QUIC one superseded is
    /// closed once this is 0 ([`drain_superseded`]).
    streams: AtomicI64,
    /// The link's count ([`Link::open_streams`]).
    link_streams: Arc<AtomicI64>,
}

/// What a [`Conn`] runs over.
#[derive(Debug)]
enum Wire {
    Quic(Connection),
    Tcp(TcpConn),
}

impl Conn {
    /// A QUIC connection of `link`.
    fn quic(c: Connection, link: &Link) -> Self {
        Conn::new(Wire::Quic(c), link)
    }

    /// A TCP connection of `link`.
    fn tcp(c: TcpConn, link: &Link) -> Self {
        Conn::new(Wire::Tcp(c), link)
    }

    fn new(wire: Wire, link: &Link) -> Self {
        Conn {
            wire,
            streams: AtomicI64::new(0),
            link_streams: link.open_streams.clone(),
        }
    }

    /// The QUIC connection, if it is one.
    fn as_quic(&self) -> Option<&Connection> {
        match &self.wire {
            Wire::Quic(c) => Some(c),
            Wire::Tcp(_) => None,
        }
    }

    pub fn transport(&self) -> Transport {
        match &self.wire {
            Wire::Quic(_) => Transport::Quic,
            Wire::Tcp(_) => Transport::Tcp,
        }
    }

    /// Streams open on this connection.
    pub fn open_streams(&self) -> i64 {
        self.streams.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        match &self.wire {
            Wire::Quic(c) => c.close_reason().is_some(),
            Wire::Tcp(c) => c.close_reason().is_some(),
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match &self.wire {
            Wire::Quic(c) => c.remote_address(),
            Wire::Tcp(c) => c.remote_address(),
        }
    }

    pub fn rtt(&self) -> Duration {
        match &self.wire {
            Wire::Quic(c) => c.rtt(),
            Wire::Tcp(c) => c.rtt(),
        }
    }

    /// Packets lost (QUIC; TCP's retransmissions are the kernel's and not
    /// counted here).
    pub fn lost_packets(&self) -> u64 {
        match &self.wire {
            Wire::Quic(c) => c.stats().path.lost_packets,
            Wire::Tcp(_) => 0,
        }
    }

    /// Opens a tunnel stream.
    async fn open(&self) -> Result<(SendHalf, RecvHalf), String> {
        match &self.wire {
            Wire::Quic(c) => match c.open_bi().await {
                Ok((send, recv)) => Ok((send.into(), recv.into())),
                Err(e) => Err(e.to_string()),
            },
            Wire::Tcp(c) => Box::pin(c.open()).await.map_err(|e| e.to_string()),
        }
    }

    /// Waits until the connection ends; returns why.
    async fn closed(&self) -> String {
        match &self.wire {
            Wire::Quic(c) => c.closed().await.to_string(),
            Wire::Tcp(c) => c.closed().await,
        }
    }

    /// Ends the connection with a QUIC application code and reason.
    fn close(&self, code: u32, reason: &'static str) {
        match &self.wire {
            Wire::Quic(c) => c.close(VarInt::from_u32(code), reason.as_bytes()),
            Wire::Tcp(c) => c.close(reason),
        }
    }

    /// The stream the peer's announcements arrive on: the unidirectional
    /// stream it opens (QUIC), or the control request's response (TCP).
    async fn control_stream(&self) -> Option<RecvHalf> {
        match &self.wire {
            Wire::Quic(c) => c.accept_uni().await.ok().map(RecvHalf::from),
            Wire::Tcp(c) => c.control().await.ok(),
        }
    }
}

/// The QUIC endpoint and every link of this gateway.
pub struct Tunnel {
    endpoint: Endpoint,
    settings: LinkSettings,
    local_cluster: String,
    client: ArcSwap<quinn::ClientConfig>,
    identify: Identify,
    links: Mutex<BTreeMap<(String, String), Arc<Link>>>,
    /// Streams being served for peers, for draining.
    serving: Arc<AtomicI64>,
    /// When the last peer stream arrived, for draining.
    last_stream: Mutex<Option<Instant>>,
    draining: AtomicBool,
    /// Datagrams on the tunnel port that no connection gets.
    datagram_drops: Arc<DatagramDrops>,
    /// The clusters of the applied snapshot: only their gateways are served.
    declared: watch::Sender<Arc<BTreeSet<String>>>,
    /// Peers' handshakes in flight.
    handshakes: Arc<AtomicUsize>,
    admission: Arc<AdmissionRefusals>,
    /// The TCP listener on the tunnel's port number, until [`Tunnel::serve`]
    /// takes it.
    tcp_listener: Mutex<Option<tokio::net::TcpListener>>,
    tcp_addr: SocketAddr,
    /// The TLS configs of TCP links (the QUIC links', with the TCP ALPN).
    tcp_server: ArcSwap<rustls::ServerConfig>,
    tcp_client: ArcSwap<rustls::ClientConfig>,
    /// Set once the tunnel shuts down: served TCP connections close.
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local_cluster", &self.local_cluster)
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Builds quinn configs from rustls ones.
fn quinn_configs(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    settings: &LinkSettings,
) -> std::io::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let server = QuicServerConfig::try_from(server)
        .map_err(|e| std::io::Error::other(format!("server TLS config unusable for QUIC: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server
        .transport_config(Arc::new(server_transport(settings)))
        // Connection attempts waiting for `Tunnel::serve` to decide; it
        // decides at once, so these only bound a burst. A client's first
        // flight is a few datagrams (no 0-RTT: resumption is off).
        .max_incoming(1024)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(2 << 20);
    let client = QuicClientConfig::try_from(client)
        .map_err(|e| std::io::Error::other(format!("client TLS config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(Arc::new(client_transport(settings)));
    Ok((server, client))
}

impl Tunnel {
    /// Binds the UDP endpoint. The rustls configs must require client
    /// certificates, offer [`frame::ALPN`], and use the verifiers of
    /// [`crate::identity`].
    pub fn bind(
        addr: SocketAddr,
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        local_cluster: &str,
        settings: LinkSettings,
        identify: Identify,
    ) -> std::io::Result<Arc<Self>> {
        let (tcp_server, tcp_client) = (tcp::server_config(&server), tcp::client_config(&client));
        let (server, client) = quinn_configs(server, client, &settings)?;
        let (udp, tcp_listener) = bind_both(addr)?;
        let tcp_addr = tcp_listener.local_addr()?;
        // Connection IDs are keyed so that the socket can tell ours from
        // garbage (tunnel::socket). The key is fresh per process, as quinn's
        // stateless-reset key is: a restarted gateway knows neither its old
        // IDs nor their reset tokens, so nothing is lost.
        let cid_key: u64 = rand::random();
        let datagram_drops = Arc::new(DatagramDrops::default());
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = quinn::Runtime::wrap_udp_socket(&*runtime, udp)?;
        let socket = ClassifyingSocket::new(socket, cid_key, datagram_drops.clone());
        let endpoint = Endpoint::new_with_abstract_socket(
            super::socket::endpoint_config(cid_key),
            Some(server),
            Arc::new(socket),
            runtime,
        )?;
        Ok(Arc::new(Tunnel {
            endpoint,
            settings,
            local_cluster: local_cluster.to_string(),
            client: ArcSwap::from_pointee(client),
            identify,
            links: Mutex::new(BTreeMap::new()),
            serving: Arc::new(AtomicI64::new(0)),
            last_stream: Mutex::new(None),
            draining: AtomicBool::new(false),
            datagram_drops,
            declared: watch::channel(Arc::new(BTreeSet::new())).0,
            handshakes: Arc::new(AtomicUsize::new(0)),
            admission: Arc::new(AdmissionRefusals::default()),
            tcp_listener: Mutex::new(Some(tokio::net::TcpListener::from_std(tcp_listener)?)),
            tcp_addr,
            tcp_server: ArcSwap::new(tcp_server),
            tcp_client: ArcSwap::new(tcp_client),
            closing: watch::channel(false).0,
        }))
    }

    /// Peers turned away by the tunnel (not by the TLS verifiers), by reason.
    pub fn admission_refusals(&self) -> Arc<AdmissionRefusals> {
        self.admission.clone()
    }

    /// Peers' handshakes in flight now.
    pub fn handshakes_in_flight(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// The counts of datagrams on the tunnel port that no connection gets.
    pub fn datagram_drops(&self) -> Arc<DatagramDrops> {
        self.datagram_drops.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The TCP listener's address (TCP links): the UDP port's number.
    pub fn tcp_local_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    pub fn settings(&self) -> &LinkSettings {
        &self.settings
    }

    /// Uses new TLS material for every handshake from now on. Established
    /// connections keep theirs.
    pub fn set_tls(
        &self,
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<()> {
        self.tcp_server.store(tcp::server_config(&server));
        self.tcp_client.store(tcp::client_config(&client));
        let (server, client) = quinn_configs(server, client, &self.settings)?;
        self.endpoint.set_server_config(Some(server));
        self.client.store(Arc::new(client));
        Ok(())
    }

    /// Makes the set of links match `targets`: cluster → gateway addresses,
    /// every cluster of the snapshot. The local cluster is skipped. New
    /// targets are dialed at once; removed ones are closed. Only gateways of
    /// these clusters are served from now on: the connections of gateways of
    /// a cluster that left are closed.
    pub fn reconcile(self: &Arc<Self>, targets: &BTreeMap<String, Vec<String>>) {
        let declared: BTreeSet<String> = targets.keys().cloned().collect();
        self.declared.send_if_modified(|cur| {
            let changed = **cur != declared;
            if changed {
                *cur = Arc::new(declared);
            }
            changed
        });
        let want: BTreeMap<(String, String), ()> = targets
            .iter()
            .filter(|(c, _)| **c != self.local_cluster)
            .flat_map(|(c, addrs)| addrs.iter().map(move |a| ((c.clone(), a.clone()), ())))
            .collect();
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        links.retain(|key, link| {
            let keep = want.contains_key(key);
            if !keep {
                tracing::info!(cluster = %link.cluster, target = %link.target, "link removed from the snapshot; closing");
                let _ = link.stop.send(true);
            }
            keep
        });
        for (cluster, target) in want.into_keys() {
            let key = (cluster.clone(), target.clone());
            if links.contains_key(&key) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let link = Arc::new(Link {
                cluster,
                target,
                conn: ArcSwapOption::empty(),
                dials: self.settings.transport.dials(),
                announcement: ArcSwapOption::empty(),
                last_announce: Mutex::new(None),
                open_streams: Arc::new(AtomicI64::new(0)),
                connects: AtomicU64::new(0),
                last_error: Mutex::new(None),
                stop,
                loss: Mutex::new(LossWindow::new(self.settings.loss_window)),
                warned: AtomicBool::new(false),
            });
            tokio::spawn(self.clone().dial_loop(link.clone(), stop_rx));
            links.insert(key, link);
        }
    }

    /// Every link to `cluster`.
    pub fn links_to(&self, cluster: &str) -> Vec<Arc<Link>> {
        self.links
            .lock()
            .map(|l| {
                l.values()
                    .filter(|k| k.cluster == cluster)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An available link to `cluster`: up, announcing, not draining; the one
    /// with the fewest open streams.
    pub fn pick(&self, cluster: &str) -> Option<Arc<Link>> {
        let stale = self.settings.announce_stale;
        self.links_to(cluster)
            .into_iter()
            .filter(|l| l.available(stale))
            .min_by_key(|l| l.open_streams())
    }

    /// The freshest announcement of each available link, by cluster.
    pub fn announcements(&self) -> Vec<(String, Arc<Announcement>)> {
        let stale = self.settings.announce_stale;
        self.links
            .lock()
            .map(|l| {
                l.values()
                    .filter(|k| k.available(stale))
                    .filter_map(|k| Some((k.cluster.clone(), k.announcement(stale)?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state of every link.
    pub fn status(&self) -> Vec<LinkStatus> {
        let stale = self.settings.announce_stale;
        self.links
            .lock()
            .map(|l| l.values().map(|k| k.status(stale)).collect())
            .unwrap_or_default()
    }

    async fn dial_loop(self: Arc<Self>, link: Arc<Link>, mut stop: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        loop {
            if *stop.borrow() {
                break;
            }
            match self.dial(&link).await {
                Ok(conn) => {
                    let since = Instant::now();
                    let mut conn = Arc::new(conn);
                    while let Some(quic) = self.run_connection(&link, conn, &mut stop).await {
                        conn = quic;
                    }
                    link.conn.store(None);
                    link.announcement.store(None);
                    // Only a link that lasted resets the backoff: a peer
                    // that refuses our certificate after the handshake
                    // (TLS 1.3 lets the client finish first) must not be
                    // redialed in a tight loop.
                    if since.elapsed() >= Duration::from_secs(1) {
                        attempt = 0;
                    }
                }
                Err(DialError { message, answered }) => {
                    tracing::debug!(cluster = %link.cluster, target = %link.target, error = %message, answered, "dial failed");
                    set_error(&link, message);
                    // Silence costs the peer nothing (a few Initial
                    // packets), so only a peer that answered and refused
                    // pushes the backoff up; an unreachable one is probed
                    // continuously, and its return is noticed within
                    // `PROBE_EVERY` (an outage must not end in a 5 s sleep).
                    if !answered {
                        attempt = 0;
                    }
                }
            }
            if *stop.borrow() {
                break;
            }
            let delay = backoff(&self.settings, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
        }
        link.conn.store(None);
    }

    /// Runs one connection of `link` until it ends or the link stops
    /// (`None`), or, for a TCP connection in `auto`, until a QUIC one to
    /// the same address supersedes it (`Some`, already the link's): the
    /// TCP connection then drains in the background
    /// ([`drain_superseded`]).
    async fn run_connection(
        &self,
        link: &Arc<Link>,
        conn: Arc<Conn>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Arc<Conn>> {
        link.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster = %link.cluster, target = %link.target, remote = %conn.remote_address(), transport = conn.transport().as_str(), "link up");
        link.conn.store(Some(conn.clone()));
        let reader = tokio::spawn(read_control(link.clone(), conn.clone()));
        if let Ok(mut w) = link.loss.lock() {
            w.reset();
        }
        let mut sample =
            tokio::time::interval(LossWindow::new(self.settings.loss_window).sample_every());
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = conn.closed();
        tokio::pin!(closed);
        let quic = conn.as_quic();
        // In `auto`, a TCP link keeps trying QUIC (issue 18: TCP is the
        // fallback, not the choice).
        let upgrade = self.settings.transport == LinkTransport::Auto && quic.is_none();
        let probe = self.probe_quic(link);
        tokio::pin!(probe);
        let next = loop {
            tokio::select! {
                reason = &mut closed => {
                    tracing::warn!(cluster = %link.cluster, target = %link.target, %reason, "link down");
                    set_error(link, format!("link lost: {reason}"));
                    break None;
                }
                _ = stop.changed() => {
                    conn.close(0, "removed");
                    break None;
                }
                _ = sample.tick(), if quic.is_some() => {
                    if let Some(c) = quic {
                        link.observe_loss(c, self.settings.congestion);
                    }
                }
                up = &mut probe, if upgrade => {
                    let up = Arc::new(Conn::quic(up, link));
                    tracing::info!(
                        cluster = %link.cluster, target = %link.target, remote = %up.remote_address(),
                        draining_streams = conn.open_streams(),
                        "QUIC answers again: new streams go over QUIC; the TCP connection closes once its streams are done"
                    );
                    // The new connection first, then the drain: a stream
                    // opening on the old one when it closes retries on the
                    // new one (`Link::open`).
                    link.conn.store(Some(up.clone()));
                    tokio::spawn(drain_superseded(conn.clone(), stop.clone()));
                    break Some(up);
                }
            }
        };
        reader.abort();
        next
    }

    async fn dial(&self, link: &Link) -> Result<Conn, DialError> {
        let addrs: Vec<SocketAddr> = crate::discovery::dns::Resolver::shared()
            .resolve_host_port(&link.target)
            .await
            .map_err(|e| DialError::answered(format!("cannot resolve {}: {e}", link.target)))?;
        match self.settings.transport {
            LinkTransport::Quic => self
                .dial_quic(link, addrs)
                .await
                .map(|c| Conn::quic(c, link)),
            LinkTransport::Tcp => self.dial_tcp(link, addrs).await.map(|c| Conn::tcp(c, link)),
            LinkTransport::Auto => self.dial_either(link, addrs).await,
        }
    }

    /// `auto`'s dial, happy eyeballs (RFC 8305) between QUIC and TCP: QUIC
    /// first; TCP beside it once QUIC has gone [`HAPPY_EYEBALLS_DELAY`]
    /// without a connection (at once if QUIC failed sooner). The first
    /// connection up wins, QUIC if both are ready together; the other
    /// attempt is dropped. Both are bounded by the handshake timeout.
    /// Only a peer that answered on both transports counts as answered
    /// (for the backoff).
    async fn dial_either(&self, link: &Link, addrs: Vec<SocketAddr>) -> Result<Conn, DialError> {
        let quic = self.dial_quic(link, addrs.clone());
        tokio::pin!(quic);
        let mut quic_failed = tokio::select! {
            biased;
            r = &mut quic => match r {
                Ok(c) => return Ok(Conn::quic(c, link)),
                Err(e) => Some(e),
            },
            _ = tokio::time::sleep(HAPPY_EYEBALLS_DELAY) => None,
        };
        let tcp = self.dial_tcp(link, addrs);
        tokio::pin!(tcp);
        let mut tcp_failed = None;
        loop {
            tokio::select! {
                biased;
                r = &mut quic, if quic_failed.is_none() => match r {
                    Ok(c) => return Ok(Conn::quic(c, link)),
                    Err(e) => quic_failed = Some(e),
                },
                r = &mut tcp, if tcp_failed.is_none() => match r {
                    Ok(c) => return Ok(Conn::tcp(c, link)),
                    Err(e) => tcp_failed = Some(e),
                },
            }
            if let (Some(q), Some(t)) = (&quic_failed, &tcp_failed) {
                return Err(DialError {
                    message: format!("QUIC: {}; TCP: {}", q.message, t.message),
                    answered: q.answered && t.answered,
                });
            }
        }
    }

    /// While a link in `auto` runs over TCP: dials QUIC to the same
    /// address until a connection is up, and returns it. An unanswered
    /// dial is followed by the next at once (each puts a fresh Initial on
    /// the wire every [`PROBE_EVERY`], see [`Tunnel::handshake`]), so QUIC
    /// is back within about `PROBE_EVERY` plus a round trip of UDP
    /// returning; a peer that answers and refuses is retried with the
    /// links' backoff.
    async fn probe_quic(&self, link: &Link) -> Connection {
        let mut attempt: u32 = 0;
        loop {
            let dialed = match crate::discovery::dns::Resolver::shared()
                .resolve_host_port(&link.target)
                .await
            {
                Ok(addrs) => self.dial_quic(link, addrs).await,
                Err(e) => Err(DialError::answered(format!(
                    "cannot resolve {}: {e}",
                    link.target
                ))),
            };
            match dialed {
                Ok(c) => return c,
                Err(DialError { message, answered }) => {
                    tracing::debug!(cluster = %link.cluster, target = %link.target, error = %message, answered, "QUIC still fails; the link stays on TCP");
                    if answered {
                        tokio::time::sleep(backoff(&self.settings, attempt)).await;
                        attempt = attempt.saturating_add(1);
                    } else {
                        attempt = 0;
                    }
                }
            }
        }
    }

    /// Dials `addrs` in turn over TCP ([`super::tcp`]).
    async fn dial_tcp(&self, link: &Link, addrs: Vec<SocketAddr>) -> Result<TcpConn, DialError> {
        let mut last = format!("{} resolved to no address", link.target);
        let mut answered = true;
        let name = server_name(&link.cluster);
        for addr in addrs {
            let s = &self.settings;
            match TcpConn::dial(
                addr,
                &name,
                self.tcp_client.load_full(),
                s.handshake_timeout,
                s.keep_alive,
                s.idle_timeout,
            )
            .await
            {
                Ok((conn, chain)) => match (self.identify)(&chain) {
                    Ok(peer) if peer.cluster == link.cluster => return Ok(conn),
                    Ok(peer) => {
                        conn.close("wrong cluster");
                        last = format!(
                            "{addr} (TCP) is a gateway of `{}`, not `{}`",
                            peer.cluster, link.cluster
                        );
                    }
                    Err(e) => {
                        conn.close("identity");
                        last = format!("{addr} (TCP): {e}");
                    }
                },
                Err(f) => {
                    answered &= f.answered;
                    last = f.message;
                }
            }
        }
        Err(DialError {
            message: last,
            answered,
        })
    }

    /// Dials `addrs` in turn over QUIC.
    async fn dial_quic(
        &self,
        link: &Link,
        addrs: Vec<SocketAddr>,
    ) -> Result<Connection, DialError> {
        let mut last = format!("{} resolved to no address", link.target);
        let mut answered = true;
        let name = server_name(&link.cluster);
        for addr in addrs {
            let client = (**self.client.load()).clone();
            let connecting = match self.endpoint.connect_with(client.clone(), addr, &name) {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match self.handshake(client, addr, &name, connecting).await {
                Ok(Ok(conn)) => match (self.identify)(&quic_chain(&conn)) {
                    Ok(peer) if peer.cluster == link.cluster => return Ok(conn),
                    Ok(peer) => {
                        conn.close(VarInt::from_u32(1), b"wrong cluster");
                        last = format!(
                            "{addr} is a gateway of `{}`, not `{}`",
                            peer.cluster, link.cluster
                        );
                    }
                    Err(e) => {
                        conn.close(VarInt::from_u32(1), b"identity");
                        last = format!("{addr}: {e}");
                    }
                },
                Ok(Err(e)) => last = format!("{addr}: handshake failed: {e}"),
                Err(()) => {
                    answered = false;
                    last = format!(
                        "no gateway of cluster `{}` answered on {addr} (UDP) within {:?}; is UDP allowed?",
                        link.cluster, self.settings.handshake_timeout
                    )
                }
            }
        }
        Err(DialError {
            message: last,
            answered,
        })
    }

    /// The handshake of `first`, with a fresh attempt beside it every
    /// [`PROBE_EVERY`] while none has finished, for at most the handshake
    /// timeout. `Err(())`: nothing answered.
    ///
    /// Why: quinn retransmits a handshake's Initial on its probe timeout,
    /// about 1 s and then doubling, and an unanswered handshake dies at the
    /// idle timeout (800 ms) anyway. After an outage the link would come
    /// back only at the next retransmission or redial, often seconds after
    /// the path; overlapping attempts put an Initial on the wire at least
    /// every `PROBE_EVERY`. An attempt that gets an answer (a refusal, a
    /// handshake error) ends the race at once.
    async fn handshake(
        &self,
        client: quinn::ClientConfig,
        addr: SocketAddr,
        name: &str,
        first: quinn::Connecting,
    ) -> Result<Result<Connection, quinn::ConnectionError>, ()> {
        let deadline = tokio::time::Instant::now() + self.settings.handshake_timeout;
        let mut attempts = tokio::task::JoinSet::new();
        attempts.spawn(first);
        loop {
            let next = (tokio::time::Instant::now() + PROBE_EVERY).min(deadline);
            tokio::select! {
                done = attempts.join_next(), if !attempts.is_empty() => match done {
                    Some(Ok(Ok(conn))) => return Ok(Ok(conn)),
                    // Unanswered: the attempt idled out. Others go on.
                    Some(Ok(Err(quinn::ConnectionError::TimedOut))) | Some(Err(_)) | None => {}
                    Some(Ok(Err(e))) => return Ok(Err(e)),
                },
                _ = tokio::time::sleep_until(next) => {
                    if next >= deadline {
                        return Err(());
                    }
                    if let Ok(c) = self.endpoint.connect_with(client.clone(), addr, name) {
                        attempts.spawn(c);
                    }
                }
            }
        }
    }

    /// Accepts peers' connections and serves their streams until the
    /// endpoint closes. On each connection it announces what this gateway
    /// can serve, from `announcements`.
    ///
    /// Admission, cheapest refusal first, so that an unauthenticated flood of
    /// Initials costs kilobytes per handshake and a bounded total:
    /// - more than [`LinkSettings::max_handshakes`] handshakes in flight: the
    ///   attempt is refused (a small CONNECTION_REFUSED, no state);
    /// - more than [`LinkSettings::retry_above`]: a client whose address is
    ///   not validated gets a stateless Retry, so spoofed sources never
    ///   cost a connection;
    /// - the handshake (the TLS verifier checks the chain), bounded by the
    ///   handshake timeout, with no stream allowed ([`server_transport`]);
    /// - the peer must be a gateway of a cluster the snapshot declares;
    ///   only then may it open [`LinkSettings::max_streams`] streams. Its
    ///   connection is closed as soon as a snapshot drops its cluster.
    pub fn serve(
        self: &Arc<Self>,
        handler: StreamHandler,
        announcements: watch::Receiver<Arc<Announcement>>,
    ) -> JoinHandle<()> {
        let listener = self.tcp_listener.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            tokio::spawn(
                self.clone()
                    .serve_tcp(listener, handler.clone(), announcements.clone()),
            );
        }
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = this.endpoint.accept().await {
                let Some(handshake) = this.admit(incoming) else {
                    continue;
                };
                tokio::spawn(this.clone().serve_connection(
                    handshake,
                    handler.clone(),
                    announcements.clone(),
                ));
            }
        })
    }

    /// Decides, from the load alone, whether to start a handshake.
    fn admit(&self, incoming: quinn::Incoming) -> Option<(quinn::Connecting, HandshakeSlot)> {
        let in_flight = self.handshakes.load(Ordering::Relaxed);
        let remote = incoming.remote_address();
        if in_flight >= self.settings.retry_above && !incoming.remote_address_validated() {
            self.admission.record(Admission::AddressValidation);
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            return None;
        }
        if in_flight >= self.settings.max_handshakes {
            self.admission.record(Admission::HandshakeLimit);
            tracing::debug!(%remote, in_flight, "too many handshakes in flight; refused a peer");
            incoming.refuse();
            return None;
        }
        match incoming.accept() {
            Ok(connecting) => Some((connecting, HandshakeSlot::new(self.handshakes.clone()))),
            Err(e) => {
                tracing::info!(%remote, error = %e, "refused a peer at the handshake");
                None
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        (connecting, slot): (quinn::Connecting, HandshakeSlot),
        handler: StreamHandler,
        announcements: watch::Receiver<Arc<Announcement>>,
    ) {
        let remote = connecting.remote_address();
        let conn = match tokio::time::timeout(self.settings.handshake_timeout, connecting).await {
            Ok(Ok(c)) => c,
            // Debug only: anyone can start handshakes, so these lines are
            // an attacker's to multiply; certificate refusals are logged
            // (and counted) by the verifier.
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "refused a peer at the handshake");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "peer handshake timed out");
                return;
            }
        };
        drop(slot);
        let peer = match (self.identify)(&quic_chain(&conn)) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.admission.record(Admission::NotAGateway);
                tracing::warn!(%remote, error = %e, "refused a peer after the handshake");
                conn.close(VarInt::from_u32(1), b"identity");
                return;
            }
        };
        let mut declared = self.declared.subscribe();
        if !declared.borrow_and_update().contains(&peer.cluster) {
            self.admission.record(Admission::UndeclaredCluster);
            tracing::warn!(%remote, cluster = %peer.cluster, id = %peer.id, "refused a gateway of a cluster the snapshot does not declare");
            conn.close(VarInt::from_u32(3), b"undeclared cluster");
            return;
        }
        // Verified and declared: now it may open streams.
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.settings.max_streams));
        tracing::info!(%remote, cluster = %peer.cluster, id = %peer.id, "peer connected");
        let announcer = tokio::spawn(announce_quic(
            conn.clone(),
            announcements,
            self.settings.announce_every,
        ));
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let guard = Serving::new(self.serving.clone());
                        if let Ok(mut t) = self.last_stream.lock() {
                            *t = Some(Instant::now());
                        }
                        let fut = handler(peer.clone(), send.into(), recv.into());
                        tokio::spawn(async move {
                            fut.await;
                            drop(guard);
                        });
                    }
                    Err(e) => {
                        tracing::info!(%remote, cluster = %peer.cluster, reason = %e, "peer disconnected");
                        break;
                    }
                },
                changed = declared.changed() => {
                    // The tunnel holds the sender while this task runs.
                    if changed.is_err() {
                        break;
                    }
                    if !declared.borrow_and_update().contains(&peer.cluster) {
                        self.admission.record(Admission::UndeclaredCluster);
                        tracing::warn!(%remote, cluster = %peer.cluster, id = %peer.id, "the snapshot no longer declares the peer's cluster; closing its connection");
                        conn.close(VarInt::from_u32(3), b"undeclared cluster");
                        break;
                    }
                }
            }
        }
        announcer.abort();
    }

    /// Accepts peers' TCP links ([`super::tcp`]) until the tunnel shuts
    /// down. Admission as on QUIC: at most [`LinkSettings::max_handshakes`]
    /// handshakes in flight (more are closed at once), each bounded by the
    /// handshake timeout; the TLS verifiers check the chain; the peer must
    /// be a gateway of a declared cluster before HTTP/2 starts, so nothing
    /// of HTTP/2 (and no stream) exists for an unverified peer. (TCP's own
    /// handshake validates the address: there is no Retry to send.)
    async fn serve_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        handler: StreamHandler,
        announcements: watch::Receiver<Arc<Announcement>>,
    ) {
        let mut closing = self.closing.subscribe();
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait rather
                        // than spin.
                        tracing::warn!(error = %e, "accepting a TCP link failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = set(&mut closing) => return,
            };
            if self.handshakes.load(Ordering::Relaxed) >= self.settings.max_handshakes {
                self.admission.record(Admission::HandshakeLimit);
                tracing::debug!(%remote, "too many handshakes in flight; refused a TCP peer");
                continue;
            }
            let slot = HandshakeSlot::new(self.handshakes.clone());
            tokio::spawn(self.clone().serve_tcp_connection(
                tcp,
                remote,
                slot,
                handler.clone(),
                announcements.clone(),
            ));
        }
    }

    async fn serve_tcp_connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        slot: HandshakeSlot,
        handler: StreamHandler,
        announcements: watch::Receiver<Arc<Announcement>>,
    ) {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tcp_server.load_full());
        let tls = match tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(t)) => t,
            // Debug only, as on QUIC: the verifier logs and counts refusals.
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "refused a TCP peer at the handshake");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "TCP peer handshake timed out");
                return;
            }
        };
        let chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let peer = match (self.identify)(&chain) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.admission.record(Admission::NotAGateway);
                tracing::warn!(%remote, error = %e, "refused a TCP peer after the handshake");
                return;
            }
        };
        drop(chain);
        let mut declared = self.declared.subscribe();
        if !declared.borrow_and_update().contains(&peer.cluster) {
            self.admission.record(Admission::UndeclaredCluster);
            tracing::warn!(%remote, cluster = %peer.cluster, id = %peer.id, "refused a gateway of a cluster the snapshot does not declare");
            return;
        }
        // Verified and declared: HTTP/2 starts, with its stream limit.
        let mut conn = match tokio::time::timeout(
            self.settings.handshake_timeout,
            tcp::server_builder(self.settings.max_streams).handshake::<_, bytes::Bytes>(tls),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "TCP peer's HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "TCP peer's HTTP/2 handshake timed out");
                return;
            }
        };
        drop(slot);
        tracing::info!(%remote, cluster = %peer.cluster, id = %peer.id, transport = "tcp", "peer connected");
        let rtt = AtomicU64::new(0);
        let liveness = tcp::liveness_loop(
            conn.ping_pong(),
            &rtt,
            self.settings.keep_alive,
            self.settings.idle_timeout,
        );
        tokio::pin!(liveness);
        let mut closing = self.closing.subscribe();
        let mut announcer: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                accepted = conn.accept() => match accepted {
                    Some(Ok((req, mut respond))) => {
                        let path = req.uri().path();
                        if path == tcp::STREAM_PATH {
                            let Ok(send) = tcp::accept_stream(&mut respond) else {
                                continue;
                            };
                            let recv = RecvHalf::H2(Box::new(super::stream::H2Recv::open(
                                req.into_body(),
                            )));
                            let guard = Serving::new(self.serving.clone());
                            if let Ok(mut t) = self.last_stream.lock() {
                                *t = Some(Instant::now());
                            }
                            let fut = handler(peer.clone(), send, recv);
                            tokio::spawn(async move {
                                fut.await;
                                drop(guard);
                            });
                        } else if path == tcp::CONTROL_PATH && announcer.is_none() {
                            let Ok(send) = tcp::accept_stream(&mut respond) else {
                                continue;
                            };
                            announcer = Some(tokio::spawn(announce(
                                send,
                                announcements.clone(),
                                self.settings.announce_every,
                            )));
                        } else {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::info!(%remote, cluster = %peer.cluster, reason = %e, "peer disconnected");
                        break;
                    }
                    None => {
                        tracing::info!(%remote, cluster = %peer.cluster, "peer disconnected");
                        break;
                    }
                },
                reason = &mut liveness => {
                    tracing::warn!(%remote, cluster = %peer.cluster, %reason, "TCP peer down");
                    break;
                }
                changed = declared.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if !declared.borrow_and_update().contains(&peer.cluster) {
                        self.admission.record(Admission::UndeclaredCluster);
                        tracing::warn!(%remote, cluster = %peer.cluster, id = %peer.id, "the snapshot no longer declares the peer's cluster; closing its connection");
                        break;
                    }
                }
                _ = set(&mut closing) => break,
            }
        }
        if let Some(a) = announcer {
            a.abort();
        }
    }

    /// Streams being served for peers right now.
    pub fn serving(&self) -> i64 {
        self.serving.load(Ordering::Relaxed)
    }

    /// Drains: the caller has already announced `draining`; waits until no
    /// stream is being served (or `deadline`), then closes every connection.
    pub async fn shutdown(&self, deadline: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        let until = Instant::now() + deadline;
        // Done when nothing is being served and peers have stopped opening
        // streams (they stop once they read the draining announcement).
        let quiet = Duration::from_millis(250);
        loop {
            let recent = self
                .last_stream
                .lock()
                .ok()
                .and_then(|t| *t)
                .is_some_and(|t| t.elapsed() < quiet);
            if (self.serving() == 0 && !recent) || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(links) = self.links.lock() {
            for l in links.values() {
                let _ = l.stop.send(true);
            }
        }
        self.closing.send_replace(true);
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Resolves once the flag is set (or its sender is gone).
async fn set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|c| *c).await;
}

/// Binds UDP on `addr` and TCP on the same port number. With port 0, the
/// port UDP got may be taken on TCP: a few fresh ports are tried.
fn bind_both(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(addr)?;
        let mut tcp_addr = addr;
        tcp_addr.set_port(udp.local_addr()?.port());
        match std::net::TcpListener::bind(tcp_addr) {
            Ok(tcp) => {
                tcp.set_nonblocking(true)?;
                return Ok((udp, tcp));
            }
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("binding the tunnel's TCP listener on {tcp_addr} (TCP links): {e}"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free on both UDP and TCP")))
}

/// Counts a handshake in flight until dropped.
struct HandshakeSlot(Arc<AtomicUsize>);

impl HandshakeSlot {
    fn new(c: Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        HandshakeSlot(c)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Serving(Arc<AtomicI64>);

impl Serving {
    fn new(c: Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Serving(c)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn set_error(link: &Link, e: String) {
    if let Ok(mut g) = link.last_error.lock() {
        *g = Some(e);
    }
}

/// While a handshake goes unanswered, a new attempt starts this often (see
/// [`Tunnel::handshake`]): the bound on noticing that an unreachable peer is
/// back, less the handshake's round trip. It is also how often a TCP link
/// in `auto` tries QUIC again ([`Tunnel::probe_quic`]).
const PROBE_EVERY: Duration = Duration::from_millis(700);

/// In `auto`, how long a QUIC dial may go without a connection before TCP
/// is dialed beside it: RFC 8305's recommended "Connection Attempt Delay".
/// A QUIC handshake takes one round trip, so on paths up to about 200 ms
/// RTT QUIC wins before TCP starts; where UDP is blocked the link is up
/// over TCP this long plus TCP's three round trips (TCP, TLS 1.3, HTTP/2)
/// after the dial starts.
pub const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(250);

/// Waits until no stream is open on `old`, a connection a QUIC one
/// superseded (or until it ends on its own, or the link stops), then
/// closes it. New streams no longer go to it ([`Link::connection`] is the
/// new one), so it only gets quieter; a stream that was opening on it as
/// it closed opens on the new one ([`Link::open`]). There is no deadline:
/// a long TCP stream (a spliced connection) finishes where it started.
async fn drain_superseded(old: Arc<Conn>, mut stop: watch::Receiver<bool>) {
    let remote = old.remote_address();
    let closed = old.closed();
    tokio::pin!(closed);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut closed => return,
            _ = set(&mut stop) => break,
            _ = poll.tick() => if old.open_streams() <= 0 {
                break;
            },
        }
    }
    tracing::info!(%remote, transport = old.transport().as_str(), "superseded connection drained; closing it");
    old.close(0, "superseded");
}

/// Why a dial failed, and whether anything answered (a refusal backs off,
/// silence does not).
#[derive(Debug)]
struct DialError {
    message: String,
    answered: bool,
}

impl DialError {
    fn answered(message: String) -> Self {
        DialError {
            message,
            answered: true,
        }
    }
}

/// Exponential backoff with jitter between half and all of the step.
fn backoff(s: &LinkSettings, attempt: u32) -> Duration {
    crate::backoff::Backoff::new(s.backoff_min, s.backoff_max, crate::backoff::Jitter::Equal)
        .delay(attempt)
}

/// Opens the unidirectional stream our announcements go on (QUIC) and
/// [`announce`]s on it.
async fn announce_quic(conn: Connection, rx: watch::Receiver<Arc<Announcement>>, every: Duration) {
    let Ok(send) = conn.open_uni().await else {
        return;
    };
    announce(send.into(), rx, every).await
}

/// Sends our announcement on `send`: at once, on every change, and every
/// `every` as a heartbeat.
async fn announce(mut send: SendHalf, mut rx: watch::Receiver<Arc<Announcement>>, every: Duration) {
    let mut buf = BytesMut::new();
    loop {
        let a = rx.borrow_and_update().clone();
        buf.clear();
        if let Err(e) = frame::encode(&Frame::Announce(a.encode().into()), &mut buf) {
            tracing::error!(error = %e, services = a.services.len(), "announcement too large to send; peers will see this gateway as stale");
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Reads the peer's announcements from the uni stream it opens.
async fn read_control(link: Arc<Link>, conn: Arc<Conn>) {
    let Some(mut recv) = conn.control_stream().await else {
        return;
    };
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(Frame::Announce(bytes))) => match Announcement::decode(&bytes) {
                    Ok(a) => {
                        let newer = link
                            .announcement
                            .load()
                            .as_ref()
                            .is_none_or(|cur| a.seq >= cur.seq);
                        if newer {
                            link.announcement.store(Some(Arc::new(a)));
                        }
                        if let Ok(mut t) = link.last_announce.lock() {
                            *t = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(cluster = %link.cluster, error = %e, "refused a peer announcement");
                    }
                },
                Ok(Some(other)) => {
                    tracing::warn!(cluster = %link.cluster, frame = ?std::mem::discriminant(&other), "unexpected frame on the control stream; closing the link");
                    conn.close(2, "protocol");
                    return;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(cluster = %link.cluster, error = %e, "malformed control stream; closing the link");
                    conn.close(2, "protocol");
                    return;
                }
            }
        }
        match recv.read_chunk(64 * 1024).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
