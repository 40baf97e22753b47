//! The gRPC config server: every gateway's `ConfigDelivery.Subscribe`
//! stream (protocol: `proto/meshfed/config/v1/config.proto`,
//! docs/delivery.md).
//!
//! It owns:
//! - the listener: TLS 1.3 with a mandatory client certificate chained to
//!   the trust anchor, accepted here with tokio-rustls (one task per
//!   handshake, so a slow handshake delays nobody), then HTTP/2 and gRPC by
//!   tonic over the accepted streams, with HTTP/2 keep-alives so a dead
//!   gateway is noticed and marked disconnected;
//! - the subscription rules: the peer must be a gateway, and the cluster its
//!   `Hello` claims must be the cluster of its verified certificate chain;
//!   otherwise the call ends with `PERMISSION_DENIED` naming both, and the
//!   refusal is counted; the (cluster, id) record must belong to the
//!   certificate's SPIFFE ID, and a certificate holds a bounded number of
//!   ids ([`Rollout::admit`]);
//! - delivery: each stream task follows the pipeline's `watch` of
//!   [`Published`] on its own, sends the gateway's cluster snapshot (unless
//!   the gateway already applied that commit), then every newer one. A
//!   gateway that reads slowly only delays itself: its task waits for room
//!   in its own one-slot channel while the `watch` coalesces, so it gets the
//!   newest publication next, never a backlog;
//! - goodbyes: the Subscribe response says `meshfed-accepts: goodbye` in
//!   its initial metadata, so a gateway knows it may send `Goodbye` when it
//!   drains (an older syncer does not say it, and is never sent one). A
//!   goodbye is accepted only for the stream's own (cluster, id), on the
//!   certificate that holds the record, and only from the last open stream
//!   of that id: the record is then retired ([`Rollout::retire`]) and the
//!   call ends with OK. A goodbye naming another id ends the call with
//!   `PERMISSION_DENIED` (counted as `goodbye_not_own`) and retires
//!   nothing;
//! - recording every hello, ACK, NACK, goodbye and disconnect in the
//!   [`Rollout`], and
//!   the metrics `meshfed_syncer_propagation_seconds` (fetch start → ACK,
//!   for pushes to gateways connected when the commit was published),
//!   `meshfed_syncer_subscriptions_refused_total`,
//!   `meshfed_syncer_snapshots_sent_total`, `meshfed_syncer_acks_total`,
//!   `meshfed_syncer_nacks_total`, `meshfed_syncer_goodbyes_total` and
//!   `meshfed_syncer_tls_handshake_failures_total`. (Connected gateways
//!   are counted from the `Rollout` by [`crate::metrics`], so that gauge
//!   and `/status` cannot disagree.)
//!
//! A cluster absent from the current publication (a gateway certified for a
//! cluster the policy does not declare), or no publication yet: the stream
//! stays open and the gateway gets a `Pending{reason}` message; it keeps
//! what it enforces and gets a snapshot as soon as a commit declares its
//! cluster. Refusing the call instead would only make it reconnect in a loop.
//!
//! It does not compile snapshots ([`crate::pipeline`]), persist them, or
//! answer questions about rollouts ([`crate::status`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use meshfed_identity::spiffe::SpiffeId;
use meshfed_identity::store::{self, Credentials, StoreError};
use meshfed_identity::verify::{self, AcceptClients, HandshakeRefusals, PeerIdentity};
use meshfed_proto::config::v1 as pb;
use meshfed_proto::config::v1::config_delivery_server::{ConfigDelivery, ConfigDeliveryServer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::golden::Golden;
use crate::rollout::{Admission, AdmitError, Published, Rollout};

/// The TCP port of the gRPC config server by default, as istiod serves xDS
/// over mTLS on 15012.
pub const DEFAULT_GRPC_PORT: u16 = 15012;

/// A NACK reason is cut to this many bytes before it is recorded: it is for
/// people, and a status page must stay small.
pub const MAX_NACK_REASON: usize = 2048;

/// The largest message accepted from a gateway (ACKs and NACKs are small).
const MAX_GATEWAY_MESSAGE: usize = 64 * 1024;

/// Tunables of the server; [`Default`] is what production uses.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// HTTP/2 PING interval on every connection.
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this is closed, and
    /// its gateway marked disconnected.
    pub keepalive_timeout: Duration,
    /// How long a new call may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Which gateway ids a certificate may hold (`--max-gateways-per-identity`,
    /// `--known-window`).
    pub admission: Admission,
    /// Say `meshfed-accepts: goodbye` in every Subscribe response (always,
    /// in production). Off, the server looks like a syncer from before
    /// goodbyes to the gateways, for compatibility tests.
    pub advertise_goodbye: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            admission: Admission::default(),
            advertise_goodbye: true,
        }
    }
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the config server's listening address: {0}")]
    Listener(#[source] std::io::Error),
    #[error("the config server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The config server's TLS configuration: TLS 1.3, HTTP/2 by ALPN, client
/// certificates mandatory and held to every trust rule (chain to the
/// bundle, cluster binding). Any valid meshfed identity completes the
/// handshake; a non-gateway is then refused at the gRPC level, where the
/// refusal can say why (`PERMISSION_DENIED`).
///
/// `creds` are the syncer's (`meshfed-gateway certs syncer`); refusals are
/// counted by reason in `refusals`.
pub fn tls_config(
    creds: &Credentials,
    refusals: Arc<HandshakeRefusals>,
) -> Result<Arc<rustls::ServerConfig>, StoreError> {
    store::server_config_accepting(creds, &[b"h2".to_vec()], refusals, AcceptClients::Any, true)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `cluster_mismatch`, `not_a_gateway`, `no_hello`, `protocol`,
    /// `gateway_id_taken`, `too_many_gateway_ids`, `goodbye_not_own`.
    reason: &'static str,
}

/// The server's metrics; register them with [`ConfigServer::register`].
#[derive(Debug)]
struct ServerMetrics {
    propagation: Histogram,
    refused: Family<RefusedLabels, Counter>,
    sent: Counter,
    acks: Counter,
    nacks: Counter,
    goodbyes: Counter,
    handshake_failures: Counter,
}

impl ServerMetrics {
    fn new() -> Self {
        ServerMetrics {
            propagation: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            refused: Family::default(),
            sent: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            goodbyes: Counter::default(),
            handshake_failures: Counter::default(),
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }
}

/// The gRPC config server. Build it with [`ConfigServer::new`], register
/// its metrics, then [`ConfigServer::serve`].
#[derive(Debug, Clone)]
pub struct ConfigServer {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    rollout: Rollout,
    published: watch::Receiver<Option<Arc<Published>>>,
    settings: ServerSettings,
    metrics: ServerMetrics,
    /// Where the gateways' golden metrics go (the rollout gates read them).
    golden: Golden,
    /// The live stream of each (cluster, gateway id): a reconnecting gateway's
    /// old stream, ending late, must not mark the new one disconnected.
    live: Mutex<BTreeMap<(String, String), BTreeSet<u64>>>,
    next_stream: AtomicU64,
    stop: watch::Receiver<bool>,
    stop_tx: watch::Sender<bool>,
}

impl ConfigServer {
    /// A server streaming from `published` (the pipeline's watch: `None`
    /// until the first commit is accepted) and recording into `rollout`.
    pub fn new(rollout: Rollout, published: watch::Receiver<Option<Arc<Published>>>) -> Self {
        Self::with_settings(rollout, published, ServerSettings::default())
    }

    /// Like [`ConfigServer::new`], with explicit tunables.
    pub fn with_settings(
        rollout: Rollout,
        published: watch::Receiver<Option<Arc<Published>>>,
        settings: ServerSettings,
    ) -> Self {
        let (stop_tx, stop) = watch::channel(false);
        ConfigServer {
            inner: Arc::new(Shared {
                rollout,
                published,
                settings,
                metrics: ServerMetrics::new(),
                golden: Golden::default(),
                live: Mutex::new(BTreeMap::new()),
                next_stream: AtomicU64::new(1),
                stop,
                stop_tx,
            }),
        }
    }

    /// The golden metrics the gateways report on their streams.
    pub fn golden(&self) -> Golden {
        self.inner.golden.clone()
    }

    /// Records the gateways' golden metrics into `golden` (shared with the
    /// wave controller). Call before serving.
    pub fn with_golden(mut self, golden: Golden) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.golden = golden,
            None => {
                tracing::error!("with_golden on a server already shared; the gates get no metrics")
            }
        }
        self
    }

    /// Registers the server's metrics as `syncer_*` in `registry`, which
    /// should carry the `meshfed` prefix (as [`crate::metrics`] does), so
    /// names come out as `meshfed_syncer_*`.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        registry.register(
            "syncer_propagation_seconds",
            "Time from the start of a commit's fetch to a gateway's ACK of it, for gateways \
             connected when the commit was published",
            m.propagation.clone(),
        );
        registry.register(
            "syncer_subscriptions_refused",
            "Config streams refused, by reason (cluster_mismatch, not_a_gateway, no_hello, \
             protocol, gateway_id_taken, too_many_gateway_ids, goodbye_not_own)",
            m.refused.clone(),
        );
        registry.register(
            "syncer_snapshots_sent",
            "Snapshots sent to gateways",
            m.sent.clone(),
        );
        registry.register("syncer_acks", "ACKs received from gateways", m.acks.clone());
        registry.register(
            "syncer_nacks",
            "NACKs received from gateways",
            m.nacks.clone(),
        );
        registry.register(
            "syncer_goodbyes",
            "Goodbyes from draining gateways whose records were retired at once",
            m.goodbyes.clone(),
        );
        registry.register(
            "syncer_tls_handshake_failures",
            "Config server TLS handshakes that failed or timed out (the verifier logs why)",
            m.handshake_failures.clone(),
        );
    }

    /// Serves on `listener` until `shutdown` completes, then ends every
    /// stream with `UNAVAILABLE` and returns once connections are closed.
    ///
    /// `tls` must require client certificates and verify them against the
    /// trust anchor ([`tls_config`] builds one); the peer identity is read
    /// from the verified chain.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let local = listener.local_addr().map_err(ServerError::Listener)?;
        let settings = self.inner.settings.clone();
        let (conn_tx, conn_rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(128);
        let accept = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            conn_tx,
            self.inner.clone(),
        ));
        let stop_tx = self.inner.stop_tx.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("config server stopping: ending every stream");
            let _ = stop_tx.send(true);
        };
        tracing::info!(%local, "config server listening (gRPC over mTLS)");
        let service =
            ConfigDeliveryServer::new(self).max_decoding_message_size(MAX_GATEWAY_MESSAGE);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.keepalive_timeout))
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), signal)
            .await;
        accept.abort();
        result.map_err(ServerError::from)
    }
}

/// Accepts TCP connections and runs each TLS handshake in its own task.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: mpsc::Sender<Result<PeerStream, std::io::Error>>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: pause instead of spinning.
                    tracing::warn!(error = %e, "config server cannot accept a connection; is the open-files limit (ulimit -n) too low?");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, conns, shared) = (acceptor.clone(), conns.clone(), shared.clone());
        tokio::spawn(async move {
            let timeout = shared.settings.handshake_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    shared.metrics.handshake_failures.inc();
                    tracing::info!(peer = %addr, error = %e, "config server TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.metrics.handshake_failures.inc();
                    tracing::info!(peer = %addr, ?timeout, "config server TLS handshake timed out");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .ok_or_else(|| "no client certificate".to_string())
                .and_then(|chain| verify::peer_identity(chain).map_err(|e| e.to_string()));
            let info = PeerConn {
                addr: Some(addr),
                identity: Arc::new(identity),
            };
            let _ = conns.send(Ok(PeerStream { io: tls, info })).await;
        });
    }
}

/// Completes once the server is stopping (the guard `wait_for` returns is
/// not `Send`, so it must not live in a `select!`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What the connection says about the peer, in every request's extensions.
#[derive(Debug, Clone)]
struct PeerConn {
    addr: Option<SocketAddr>,
    /// From the verified chain; an error only if the verifier let through a
    /// chain that [`verify::peer_identity`] cannot read, which is a bug.
    identity: Arc<Result<PeerIdentity, String>>,
}

/// An accepted TLS stream with its peer's identity.
struct PeerStream {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConn,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerConn;

    fn connect_info(&self) -> PeerConn {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    meshfed_cli::delegate_async_write!(io);
}

#[tonic::async_trait]
impl ConfigDelivery for ConfigServer {
    type SubscribeStream = ReceiverStream<Result<pb::SyncerMessage, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::GatewayMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let shared = &self.inner;
        let conn = request.extensions().get::<PeerConn>().cloned();
        let mut inbound = request.into_inner();
        let Some(conn) = conn else {
            return Err(Status::internal(
                "config server: the connection carries no peer identity (a bug)",
            ));
        };
        let peer = match &*conn.identity {
            Ok(p) => p.clone(),
            Err(e) => {
                shared.metrics.refuse("not_a_gateway");
                return Err(Status::unauthenticated(format!(
                    "config server cannot read the client certificate's identity: {e}"
                )));
            }
        };
        if !matches!(peer.id, SpiffeId::Gateway { .. }) {
            shared.metrics.refuse("not_a_gateway");
            tracing::warn!(peer = ?conn.addr, identity = %peer.id, "refused a config stream: not a gateway");
            return Err(Status::permission_denied(format!(
                "{} is not a gateway identity; only gateways \
                 (spiffe://<td>/meshfed/cluster/<cluster>/gateway/<id>) subscribe to config",
                peer.id
            )));
        }
        let hello =
            match tokio::time::timeout(shared.settings.hello_timeout, inbound.message()).await {
                Err(_) => {
                    shared.metrics.refuse("no_hello");
                    return Err(Status::deadline_exceeded(format!(
                        "no Hello within {:?}; a gateway must send Hello first",
                        shared.settings.hello_timeout
                    )));
                }
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => {
                    shared.metrics.refuse("no_hello");
                    return Err(Status::invalid_argument(
                        "the stream ended before a Hello; a gateway must send Hello first",
                    ));
                }
                Ok(Ok(Some(pb::GatewayMessage {
                    message: Some(pb::gateway_message::Message::Hello(h)),
                }))) => h,
                Ok(Ok(Some(_))) => {
                    shared.metrics.refuse("no_hello");
                    return Err(Status::invalid_argument(
                        "the first message must be a Hello, not an Ack or Nack",
                    ));
                }
            };
        if hello.cluster != peer.cluster {
            shared.metrics.refuse("cluster_mismatch");
            tracing::warn!(
                peer = ?conn.addr, identity = %peer.id, claimed = %hello.cluster, certified = %peer.cluster,
                "refused a config stream: the Hello claims another cluster than the certificate's"
            );
            return Err(Status::permission_denied(format!(
                "gateway {} claims cluster `{}` but its certificate was issued for cluster `{}`; \
                 a gateway gets only its own cluster's config (check --cluster and the \
                 certificate in --tls-dir)",
                peer.id, hello.cluster, peer.cluster
            )));
        }
        if hello.gateway_id.is_empty()
            || hello.gateway_id.len() > 253
            || !hello
                .gateway_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            shared.metrics.refuse("protocol");
            return Err(Status::invalid_argument(
                "Hello.gateway_id must be 1 to 253 characters of letters, digits, `-`, `.` and `_`",
            ));
        }
        // Replicas may share one certificate (a Kubernetes Secret), so the
        // id in the Hello names the replica; but a record belongs to the
        // certificate that made it (no other may ACK in its name, connected
        // or not), and one certificate holds a bounded number of ids.
        let identity = peer.id.to_string();
        match shared.rollout.admit(
            &hello.cluster,
            &hello.gateway_id,
            &identity,
            conn.addr,
            &shared.settings.admission,
        ) {
            Ok(dropped) if !dropped.is_empty() => tracing::info!(
                %identity, dropped = %dropped.join(","),
                "forgot disconnected gateway records to make room for a new one"
            ),
            Ok(_) => {}
            Err(e) => {
                let reason = match e {
                    AdmitError::Taken { .. } => "gateway_id_taken",
                    AdmitError::TooMany { .. } => "too_many_gateway_ids",
                };
                shared.metrics.refuse(reason);
                tracing::warn!(peer = ?conn.addr, %identity, gateway_id = %hello.gateway_id, error = %e, "refused a config stream");
                return Err(match e {
                    AdmitError::Taken { .. } => Status::permission_denied(e.to_string()),
                    AdmitError::TooMany { .. } => Status::resource_exhausted(e.to_string()),
                });
            }
        }

        let stream_no = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        // What the gateway says it enforces is logged, never recorded:
        // "applied" comes only from an ACK of a snapshot sent on this stream,
        // so the current snapshot is sent even if the Hello claims it.
        let applied = Some(hello.applied_version.clone()).filter(|v| !v.is_empty());
        let key = (hello.cluster.clone(), hello.gateway_id.clone());
        {
            let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
            let streams = live.entry(key.clone()).or_default();
            if !streams.is_empty() {
                tracing::info!(
                    cluster = %key.0, gateway = %key.1, open_streams = streams.len(),
                    "a gateway subscribed again while a previous stream is still open (a reconnect, \
                     or two replicas sharing one --gateway-id); it stays connected until its last \
                     stream ends"
                );
            }
            streams.insert(stream_no);
        }
        tracing::info!(
            cluster = %hello.cluster, gateway = %hello.gateway_id, peer = ?conn.addr,
            applied = applied.as_deref().unwrap_or("none"), schema = hello.snapshot_schema,
            "gateway subscribed"
        );
        if hello.snapshot_schema != meshfed_policy::snapshot::SCHEMA {
            tracing::warn!(
                cluster = %hello.cluster, gateway = %hello.gateway_id,
                gateway_schema = hello.snapshot_schema, syncer_schema = meshfed_policy::snapshot::SCHEMA,
                "gateway reads another snapshot schema; it will NACK what it cannot decode (upgrade it)"
            );
        }

        let (tx, rx) = mpsc::channel(1);
        let initial = shared
            .published
            .borrow()
            .as_ref()
            .and_then(|p| p.clusters.get(&hello.cluster))
            .map(|c| c.snapshot.version.clone());
        let sub = Subscriber {
            shared: shared.clone(),
            cluster: hello.cluster.clone(),
            gateway_id: hello.gateway_id.clone(),
            identity,
            stream_no,
            applied: None,
            initial,
            last_sent: None,
            last_pending: None,
            sent: VecDeque::new(),
        };
        let span = tracing::info_span!("config_stream", cluster = %hello.cluster, gateway = %hello.gateway_id);
        tokio::spawn(sub.run(inbound, tx).instrument(span));
        let mut response = Response::new(ReceiverStream::new(rx));
        if shared.settings.advertise_goodbye {
            response.metadata_mut().insert(
                pb::ACCEPTS_METADATA,
                tonic::metadata::MetadataValue::from_static(ACCEPTS),
            );
        }
        Ok(response)
    }
}

/// What this syncer says it accepts (`meshfed-accepts`).
const ACCEPTS: &str = "goodbye,metrics";

/// A snapshot sent and not yet answered.
#[derive(Debug)]
struct InFlight {
    version: String,
    fetched_at: Instant,
    /// Published after the gateway subscribed: its ACK measures propagation.
    pushed: bool,
}

/// One gateway's stream.
struct Subscriber {
    shared: Arc<Shared>,
    cluster: String,
    gateway_id: String,
    /// The verified SPIFFE ID of the stream's certificate.
    identity: String,
    stream_no: u64,
    /// The version the gateway enforces, as far as we know.
    applied: Option<String>,
    /// The commit that was current when the gateway subscribed.
    initial: Option<String>,
    last_sent: Option<String>,
    last_pending: Option<String>,
    /// Sent and unanswered, oldest first (at most a few: sends coalesce).
    sent: VecDeque<InFlight>,
}

/// How a stream ended.
enum End {
    /// The gateway closed it or the connection died.
    Gone,
    /// We end it with this status.
    Status(Status),
    /// The gateway said goodbye (with this reason); we end it with OK.
    Goodbye(String),
}

impl Subscriber {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::GatewayMessage>,
        tx: mpsc::Sender<Result<pb::SyncerMessage, Status>>,
    ) {
        let mut published = self.shared.published.clone();
        let mut stop = self.shared.stop.clone();
        let end = loop {
            let current = published.borrow_and_update().clone();
            let next = self.next_message(current.as_deref());
            tokio::select! {
                () = stopped(&mut stop) => {
                    break End::Status(Status::unavailable("the syncer is shutting down; reconnect"));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => match self.handle(m) {
                        Ok(None) => {}
                        Ok(Some(reason)) => break End::Goodbye(reason),
                        Err(status) => break End::Status(status),
                    },
                    Ok(None) => break End::Gone,
                    Err(status) => {
                        tracing::debug!(%status, "config stream from the gateway ended");
                        break End::Gone;
                    }
                },
                permit = tx.reserve(), if next.is_some() => match (permit, next) {
                    (Ok(permit), Some((msg, sent))) => {
                        permit.send(Ok(msg));
                        self.record_sent(sent);
                    }
                    _ => break End::Gone,
                },
                changed = published.changed() => {
                    if changed.is_err() {
                        break End::Status(Status::unavailable("the syncer's pipeline stopped; reconnect"));
                    }
                }
                () = tx.closed() => break End::Gone,
            }
        };
        let goodbye = match end {
            End::Status(status) => {
                let _ = tx.try_send(Err(status));
                None
            }
            End::Gone => None,
            // Dropping `tx` ends the call with OK.
            End::Goodbye(reason) => Some(reason),
        };
        drop(tx);
        let key = (self.cluster.clone(), self.gateway_id.clone());
        let last = {
            let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
            match live.get_mut(&key) {
                Some(streams) => {
                    streams.remove(&self.stream_no);
                    let last = streams.is_empty();
                    if last {
                        live.remove(&key);
                    }
                    last
                }
                None => false,
            }
        };
        match (last, goodbye) {
            (true, Some(reason)) => {
                if self.shared.rollout.retire(
                    &self.cluster,
                    &self.gateway_id,
                    &self.identity,
                    &reason,
                ) {
                    self.shared.metrics.goodbyes.inc();
                    tracing::info!(%reason, "gateway said goodbye; its record is retired (no longer pending)");
                } else {
                    // `admit` bound the record to this certificate and a
                    // live stream keeps it bound; this is a bug if reached.
                    self.shared
                        .rollout
                        .disconnected(&self.cluster, &self.gateway_id);
                    tracing::warn!(identity = %self.identity, "goodbye from a certificate that does not hold the record; only marked disconnected");
                }
            }
            (true, None) => {
                self.shared
                    .rollout
                    .disconnected(&self.cluster, &self.gateway_id);
                tracing::info!("gateway disconnected");
            }
            (false, Some(_)) => tracing::info!(
                "goodbye on one of several open streams of this gateway id (two replicas \
                 sharing one --gateway-id?); the record stays with the other stream"
            ),
            (false, None) => {}
        }
    }

    /// What to send next, given the newest publication, if anything.
    fn next_message(&self, current: Option<&Published>) -> Option<(pb::SyncerMessage, Sent)> {
        let Some(p) = current else {
            return self.pending(
                "the syncer has not accepted any commit yet; the gateway keeps what it enforces"
                    .to_string(),
            );
        };
        let Some(cs) = p.clusters.get(&self.cluster) else {
            let short: String = p.commit.chars().take(12).collect();
            return self.pending(format!(
                "commit {short} has no snapshot for cluster `{}` yet: it does not declare it \
                 (add a meshfed.io/v1alpha1 Cluster named `{}`), or the cluster's rollout wave \
                 has not opened; the gateway keeps what it enforces",
                self.cluster, self.cluster
            ));
        };
        // Mid-rollout, clusters are served different commits
        // (crate::waves): the cluster's own snapshot says which.
        let version = &cs.snapshot.version;
        if self.applied.as_ref() == Some(version) || self.last_sent.as_ref() == Some(version) {
            return None;
        }
        let msg = pb::SyncerMessage {
            message: Some(pb::syncer_message::Message::Snapshot(pb::Snapshot {
                version: version.clone(),
                canonical: cs.encoded.to_vec(),
            })),
        };
        Some((
            msg,
            Sent::Snapshot(InFlight {
                version: version.clone(),
                fetched_at: p.fetched_at,
                pushed: self.initial.as_ref() != Some(version),
            }),
        ))
    }

    fn pending(&self, reason: String) -> Option<(pb::SyncerMessage, Sent)> {
        if self.last_pending.as_deref() == Some(reason.as_str()) {
            return None;
        }
        let msg = pb::SyncerMessage {
            message: Some(pb::syncer_message::Message::Pending(pb::Pending {
                reason: reason.clone(),
            })),
        };
        Some((msg, Sent::Pending(reason)))
    }

    fn record_sent(&mut self, sent: Sent) {
        match sent {
            Sent::Snapshot(f) => {
                tracing::debug!(version = %f.version, "snapshot sent");
                self.shared.metrics.sent.inc();
                self.last_sent = Some(f.version.clone());
                self.last_pending = None;
                self.sent.push_back(f);
                // Unanswered sends beyond a handful mean a gateway that does
                // not answer; their propagation would not be measured anyway.
                while self.sent.len() > 16 {
                    self.sent.pop_front();
                }
            }
            Sent::Pending(reason) => {
                tracing::info!(%reason, "told the gateway its config is pending");
                self.last_pending = Some(reason);
                // A later publication with this cluster must be sent even if
                // it is the commit sent before the cluster disappeared.
                self.last_sent = None;
            }
        }
    }

    /// Records one message; `Ok(Some(reason))` for a valid goodbye.
    fn handle(&mut self, m: pb::GatewayMessage) -> Result<Option<String>, Status> {
        use pb::gateway_message::Message;
        let shared = &self.shared;
        match m.message {
            Some(Message::Goodbye(bye)) => {
                if bye.gateway_id != self.gateway_id {
                    shared.metrics.refuse("goodbye_not_own");
                    tracing::warn!(
                        identity = %self.identity, named = %bye.gateway_id,
                        "refused a goodbye for another gateway id; nothing retired"
                    );
                    return Err(Status::permission_denied(format!(
                        "this stream is gateway `{}` of cluster `{}`; it cannot say goodbye for \
                         `{}` (a gateway says goodbye only for itself, on its own stream)",
                        self.gateway_id, self.cluster, bye.gateway_id
                    )));
                }
                Ok(Some(truncate(
                    &bye.reason,
                    crate::rollout::MAX_GOODBYE_REASON,
                )))
            }
            Some(Message::Ack(ack)) => {
                let Some(pos) = self.sent.iter().position(|f| f.version == ack.version) else {
                    tracing::warn!(version = %ack.version, "ACK for a version not sent on this stream; ignored");
                    shared.rollout.seen(&self.cluster, &self.gateway_id);
                    return Ok(None);
                };
                // Everything sent before it was superseded.
                let f = self.sent.drain(..=pos).next_back();
                shared.metrics.acks.inc();
                if let Some(f) = f.filter(|f| f.pushed) {
                    shared
                        .metrics
                        .propagation
                        .observe(f.fetched_at.elapsed().as_secs_f64());
                }
                shared
                    .rollout
                    .acked(&self.cluster, &self.gateway_id, &ack.version);
                self.applied = Some(ack.version.clone());
                tracing::info!(version = %ack.version, "gateway ACKed");
                Ok(None)
            }
            Some(Message::Nack(nack)) => {
                if let Some(pos) = self.sent.iter().position(|f| f.version == nack.version) {
                    self.sent.drain(..=pos);
                }
                let reason = truncate(&nack.reason, MAX_NACK_REASON);
                shared.metrics.nacks.inc();
                shared
                    .rollout
                    .nacked(&self.cluster, &self.gateway_id, &nack.version, &reason);
                tracing::warn!(version = %nack.version, %reason, "gateway NACKed; it keeps its previous snapshot");
                Ok(None)
            }
            Some(Message::Metrics(m)) => {
                shared.golden.record(&self.cluster, &self.gateway_id, &m);
                shared.rollout.seen(&self.cluster, &self.gateway_id);
                Ok(None)
            }
            Some(Message::Hello(_)) => {
                shared.metrics.refuse("protocol");
                Err(Status::invalid_argument(
                    "a second Hello on one stream; open a new stream to start over",
                ))
            }
            None => {
                shared.metrics.refuse("protocol");
                Err(Status::invalid_argument(
                    "an empty GatewayMessage (or one this syncer does not know); send Hello, Ack, \
                     Nack, Goodbye or GoldenMetrics",
                ))
            }
        }
    }
}

/// What a sent message was.
enum Sent {
    Snapshot(InFlight),
    Pending(String),
}

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &s[..end], s.len() - end)
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn nack_reasons_are_cut_on_a_character_boundary_and_say_so() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate("ééééé", 3);
        assert!(cut.starts_with('é'), "{cut}");
        assert!(cut.ends_with("(8 bytes cut)"), "{cut}");
    }
}
