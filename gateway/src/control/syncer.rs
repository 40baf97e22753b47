//! The config client: the gateway's end of `ConfigDelivery.Subscribe`
//! (protocol: `proto/meshfed/config/v1/config.proto`, docs/delivery.md).
//!
//! One task, for the gateway's lifetime, that:
//! - dials `--syncer` (TCP, then TLS 1.3 with the gateway's own certificate
//!   from `--tls-dir`, re-read at every attempt so rotated certificates are
//!   used), verifies the server's chain against the trust bundle, and
//!   accepts it only if its SPIFFE ID is exactly `--syncer-id` and its
//!   certificate was issued by the intermediate CA of `--syncer-issuer`
//!   (refusals counted as `wrong_peer` and `wrong_issuer`);
//! - says `Hello{cluster, gateway_id, applied_version, schema}`;
//! - for every snapshot: decodes it strictly (`Snapshot::decode`: schema,
//!   unknown fields, content hash), checks that its version is the
//!   message's and its cluster ours, applies it atomically
//!   ([`Gateway::apply`]), persists it (`--state-dir`), then ACKs; anything
//!   that fails is NACKed with the reason, and the previous snapshot stays;
//! - on any failure (refused, unreachable, stream broken, keep-alive
//!   timeout) reconnects with exponential backoff and equal jitter (100 ms
//!   doubling to 5 s; reset once a stream is established), and never drops
//!   the snapshot it enforces;
//! - when the gateway drains ([`SyncerClient::goodbye`]), sends `Goodbye`
//!   for itself on its stream, if the syncer said it accepts one
//!   (`meshfed-accepts: goodbye` in the Subscribe response; an older syncer
//!   would refuse the unknown message), half-closes, waits (bounded) for
//!   the syncer to end the call, and stops: the syncer retires this
//!   gateway's record at once instead of counting it as pending for its
//!   known window.
//!
//! It does not choose the first snapshot at start (`run` does, from the
//! state directory) nor decide readiness (readiness follows
//! [`crate::state::provenance::Provenance`]).

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use meshfed_policy::Snapshot;
use meshfed_proto::config::v1 as pb;
use meshfed_proto::config::v1::config_delivery_client::ConfigDeliveryClient;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::{golden, persist};
use crate::backoff::{Backoff, Jitter};
use crate::identity::spiffe::SpiffeId;
use crate::identity::store::{self, Credentials};
use crate::identity::verify::{self, ExpectedPeer, HandshakeRefusals, RefusalReason};
use crate::state::Gateway;
use crate::state::provenance::{Source, SyncerLink};

/// The largest snapshot accepted from the syncer.
pub const MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;

/// How the client reaches and trusts the syncer.
#[derive(Debug, Clone)]
pub struct SyncerSettings {
    /// `host:port` of the syncer's gRPC port, resolved at every attempt.
    pub addr: String,
    /// The only identity accepted as the syncer.
    pub syncer_id: SpiffeId,
    /// The cluster whose intermediate CA must have issued the syncer's
    /// certificate (`--syncer-issuer`). The syncer's SPIFFE ID names no
    /// cluster, so without this any cluster's CA could mint it.
    pub syncer_issuer: String,
    /// The gateway's credentials directory (`--tls-dir`).
    pub tls_dir: PathBuf,
    /// Where the last good snapshot is kept, if anywhere.
    pub state_dir: Option<PathBuf>,
    /// HTTP/2 PING interval; a syncer that does not answer within
    /// `keepalive_timeout` is considered gone.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long one attempt may take to connect (TCP + TLS).
    pub connect_timeout: Duration,
    /// The first and the largest pause between attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl SyncerSettings {
    /// Production defaults for the tunables.
    pub fn new(addr: String, syncer_id: SpiffeId, syncer_issuer: String, tls_dir: PathBuf) -> Self {
        SyncerSettings {
            addr,
            syncer_id,
            syncer_issuer,
            tls_dir,
            state_dir: None,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// The syncer ID accepted when `--syncer-id` is not given: the syncer
/// `syncer` of our own trust domain, as `meshfed-gateway certs syncer --id
/// syncer` issues it.
pub fn default_syncer_id(trust_domain: &str) -> Result<SpiffeId, crate::identity::SpiffeError> {
    SpiffeId::syncer(trust_domain, "syncer")
}

/// Why one attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot load this gateway's credentials: {0}")]
    Credentials(#[from] crate::identity::StoreError),
    #[error("cannot resolve the syncer address `{addr}`: {reason}; hint: --syncer takes host:port")]
    Resolve { addr: String, reason: String },
    #[error("cannot connect to the syncer at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the syncer at {addr} refused the subscription: {code:?}: {message}")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the config stream from {addr} broke: {code:?}: {message}")]
    Broken {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the syncer at {addr} ended the config stream")]
    Ended { addr: String },
    #[error("the syncer at {addr} broke the protocol: {problem}")]
    Protocol { addr: String, problem: String },
}

/// How the client ended when the gateway drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Farewell {
    /// Goodbye sent, and the syncer ended the call with OK: it retired
    /// this gateway's record.
    Said,
    /// The syncer does not accept goodbyes (an older one): the stream was
    /// closed, and the record counts as pending for its known window.
    NotAccepted,
    /// No stream was open (connecting or backing off).
    NotConnected,
    /// Goodbye sent, but the syncer ended the call with an error.
    Refused(String),
    /// No answer within the bound given to [`SyncerClient::goodbye`].
    TimedOut,
}

/// The running client.
#[derive(Debug)]
pub struct SyncerClient {
    leave: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Farewell>,
}

impl SyncerClient {
    /// Says goodbye to the syncer (see the module docs) and stops the
    /// client, waiting at most `within`; logs and returns the outcome. The
    /// gateway drains whatever it is: a goodbye only spares the syncer's
    /// rollouts from waiting for a gateway that is gone.
    pub async fn goodbye(self, within: Duration) -> Farewell {
        let _ = self.leave.send(true);
        let mut task = self.task;
        let farewell = match tokio::time::timeout(within, &mut task).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => Farewell::Refused(format!("the config client failed: {e}")),
            Err(_) => {
                task.abort();
                Farewell::TimedOut
            }
        };
        match &farewell {
            Farewell::Said => {
                tracing::info!("said goodbye to the syncer; it no longer waits for this gateway")
            }
            Farewell::NotAccepted => tracing::info!(
                "the syncer does not accept goodbyes (an older version); it counts this gateway \
                 as pending until its --known-window passes"
            ),
            Farewell::NotConnected => tracing::info!(
                "not connected to the syncer at drain; no goodbye (it counts this gateway as \
                 pending until its --known-window passes)"
            ),
            Farewell::Refused(e) => {
                tracing::warn!(error = %e, "the syncer refused this gateway's goodbye")
            }
            Farewell::TimedOut => tracing::warn!(
                ?within,
                "no answer from the syncer to this gateway's goodbye; leaving anyway"
            ),
        }
        farewell
    }
}

/// Starts the client; it runs until the runtime stops or
/// [`SyncerClient::goodbye`].
pub fn spawn(
    state: Arc<Gateway>,
    settings: SyncerSettings,
    refusals: Arc<HandshakeRefusals>,
) -> SyncerClient {
    let (leave, mut leaving) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max, Jitter::Equal);
        // Kept across sessions: a reconnect never reports a request twice.
        let mut reporter = golden::Reporter::default();
        loop {
            if *leaving.borrow() {
                return Farewell::NotConnected;
            }
            set_link(&state, &settings, "connecting", None);
            let mut established = false;
            let error = match session(
                &state,
                &settings,
                &refusals,
                &mut established,
                &mut leaving,
                &mut reporter,
            )
            .await
            {
                Ended::Left(f) => return f,
                Ended::Failed(e) => e,
            };
            if established {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, retry_in = ?delay, "syncer unavailable; keeping the current snapshot");
            set_link(&state, &settings, "backing_off", Some(error.to_string()));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = left(&mut leaving) => return Farewell::NotConnected,
            }
        }
    });
    SyncerClient { leave, task }
}

/// Completes once the gateway drains; never if the [`SyncerClient`] is
/// dropped without a goodbye (the client then runs on). (The guard
/// `wait_for` returns is not `Send`, so it must not live in a `select!`.)
async fn left(leaving: &mut watch::Receiver<bool>) {
    if leaving.wait_for(|l| *l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How one session ended.
enum Ended {
    Failed(ClientError),
    Left(Farewell),
}

fn set_link(state: &Gateway, s: &SyncerSettings, what: &'static str, error: Option<String>) {
    let last_error = error.or_else(|| state.provenance.syncer().and_then(|l| l.last_error));
    state.provenance.set_syncer(SyncerLink {
        addr: s.addr.clone(),
        accepted_id: s.syncer_id.to_string(),
        state: what,
        last_error,
    });
}

/// One connection and stream, until it fails; returns why.
async fn session(
    state: &Arc<Gateway>,
    s: &SyncerSettings,
    refusals: &Arc<HandshakeRefusals>,
    established: &mut bool,
    leaving: &mut watch::Receiver<bool>,
    reporter: &mut golden::Reporter,
) -> Ended {
    let addr = s.addr.clone();
    // A drain while connecting does not wait for the connection.
    let connected = tokio::select! {
        c = connect(s, refusals) => c,
        () = left(leaving) => return Ended::Left(Farewell::NotConnected),
    };
    let channel = match connected {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e),
    };
    let mut client =
        ConfigDeliveryClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let (tx, rx) = mpsc::channel::<pb::GatewayMessage>(4);
    let applied = state
        .provenance
        .current()
        .map(|a| a.version.clone())
        .unwrap_or_default();
    let hello = pb::Hello {
        cluster: state.cluster.clone(),
        gateway_id: state.id.clone(),
        applied_version: applied.clone(),
        snapshot_schema: meshfed_policy::snapshot::SCHEMA,
    };
    let _ = tx
        .send(pb::GatewayMessage {
            message: Some(pb::gateway_message::Message::Hello(hello)),
        })
        .await;
    let (accepts_goodbye, accepts_metrics, mut inbound) =
        match client.subscribe(ReceiverStream::new(rx)).await {
            Ok(r) => (
                pb::accepts_goodbye(r.metadata()),
                pb::accepts_metrics(r.metadata()),
                r.into_inner(),
            ),
            Err(status) => {
                return Ended::Failed(ClientError::Refused {
                    addr,
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
        };
    *established = true;
    set_link(state, s, "connected", None);
    tracing::info!(syncer = %s.addr, id = %s.syncer_id, applied = %applied, accepts_goodbye, accepts_metrics, "subscribed to the syncer");
    let mut report_every = tokio::time::interval(golden::INTERVAL);
    report_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = report_every.tick(), if accepts_metrics => {
                let reading = golden::read(&state.metrics.encode(&[]));
                let known = golden::known_services(
                    &state.active.load().snapshot.policy,
                    &state.endpoints.borrow().clone(),
                );
                if let Some(m) = reporter.report(reading, Instant::now(), &known) {
                    let msg = pb::GatewayMessage {
                        message: Some(pb::gateway_message::Message::Metrics(m)),
                    };
                    // Never wait for room: a report lost to a full channel
                    // only leaves a gap in the gates' window.
                    if tx.try_send(msg).is_err() {
                        tracing::debug!("golden metrics report dropped (config stream busy)");
                    }
                }
                continue;
            }
            () = left(leaving) => {
                if !accepts_goodbye {
                    return Ended::Left(Farewell::NotAccepted);
                }
                return Ended::Left(say_goodbye(state, tx, inbound).await);
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Ended::Failed(ClientError::Ended { addr }),
            Err(status) => {
                return Ended::Failed(ClientError::Broken {
                    addr,
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
        };
        match msg.message {
            Some(pb::syncer_message::Message::Snapshot(snap)) => {
                let version = snap.version.clone();
                let answer = match receive(state, s, snap).await {
                    Ok(()) => pb::gateway_message::Message::Ack(pb::Ack { version }),
                    Err(reason) => {
                        tracing::error!(%version, %reason, "snapshot refused (NACK); keeping the previous one");
                        pb::gateway_message::Message::Nack(pb::Nack { version, reason })
                    }
                };
                if tx
                    .send(pb::GatewayMessage {
                        message: Some(answer),
                    })
                    .await
                    .is_err()
                {
                    return Ended::Failed(ClientError::Ended { addr });
                }
            }
            Some(pb::syncer_message::Message::Pending(p)) => {
                tracing::warn!(reason = %p.reason, "the syncer has no snapshot for this cluster yet");
            }
            None => {
                return Ended::Failed(ClientError::Protocol {
                    addr,
                    problem: "an empty SyncerMessage".into(),
                });
            }
        }
    }
}

/// Sends `Goodbye` for this gateway, half-closes, and reads until the
/// syncer ends the call (the caller bounds the wait).
async fn say_goodbye(
    state: &Gateway,
    tx: mpsc::Sender<pb::GatewayMessage>,
    mut inbound: tonic::Streaming<pb::SyncerMessage>,
) -> Farewell {
    let bye = pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Goodbye(pb::Goodbye {
            gateway_id: state.id.clone(),
            reason: "drained (SIGTERM)".into(),
        })),
    };
    if tx.send(bye).await.is_err() {
        return Farewell::Refused("the config stream closed before the goodbye".into());
    }
    // Half-close: the goodbye is our last message.
    drop(tx);
    loop {
        match inbound.message().await {
            // A snapshot sent before the syncer read the goodbye: unanswered,
            // as the gateway is leaving.
            Ok(Some(_)) => continue,
            Ok(None) => return Farewell::Said,
            Err(status) => {
                return Farewell::Refused(format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

/// Decodes, checks, applies and persists one snapshot; the error is the
/// NACK reason.
async fn receive(
    state: &Arc<Gateway>,
    s: &SyncerSettings,
    msg: pb::Snapshot,
) -> Result<(), String> {
    let started = Instant::now();
    let bytes: Arc<[u8]> = msg.canonical.into();
    let decoded = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || Snapshot::decode(&bytes))
            .await
            .map_err(|e| format!("decoding failed: {e}"))?
            .map_err(|e| e.to_string())?
    };
    if decoded.version != msg.version {
        return Err(format!(
            "the message says version {} but the snapshot inside is {}",
            msg.version, decoded.version
        ));
    }
    if decoded.policy.cluster != state.cluster {
        return Err(format!(
            "the snapshot is for cluster `{}`, this gateway is in `{}`",
            decoded.policy.cluster, state.cluster
        ));
    }
    let snap = Arc::new(decoded);
    state
        .apply(snap.clone())
        .await
        .map_err(|e| format!("cannot activate: {e}"))?;
    state.provenance.applied(
        &snap,
        Source::Syncer {
            addr: s.addr.clone(),
            id: s.syncer_id.to_string(),
        },
    );
    tracing::info!(version = %snap.version, hash = %snap.content_hash, took = ?started.elapsed(), "snapshot applied");
    if let Some(dir) = &s.state_dir {
        let dir = dir.clone();
        let saved = tokio::task::spawn_blocking(move || persist::save(&dir, &bytes)).await;
        match saved {
            Ok(Ok(())) => {}
            // Applied and enforced: an ACK is the truth. A restart without
            // the syncer would start from an older snapshot, so say so.
            Ok(Err(e)) => {
                tracing::error!(error = %e, "snapshot applied but not persisted; a restart without the syncer would serve an older one")
            }
            Err(e) => tracing::error!(error = %e, "persisting the snapshot failed"),
        }
    }
    Ok(())
}

/// A channel over one TLS connection to the syncer, whose identity has
/// been checked.
async fn connect(
    s: &SyncerSettings,
    refusals: &Arc<HandshakeRefusals>,
) -> Result<tonic::transport::Channel, ClientError> {
    let connect_err = |reason: String| ClientError::Connect {
        addr: s.addr.clone(),
        reason,
    };
    let tls_dir = s.tls_dir.clone();
    let creds = tokio::task::spawn_blocking(move || Credentials::load(&tls_dir))
        .await
        .map_err(|e| connect_err(format!("loading credentials failed: {e}")))??;
    let tls = store::client_config(&creds, &[b"h2".to_vec()], refusals.clone())?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(s.addr.as_str())
        .await
        .map_err(|e| ClientError::Resolve {
            addr: s.addr.clone(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ClientError::Resolve {
            addr: s.addr.clone(),
            reason: "no addresses".into(),
        });
    }
    let dialer = Dialer {
        addrs: Arc::new(addrs),
        tls: TlsConnector::from(tls),
        expected: s.syncer_id.clone(),
        issuer: s.syncer_issuer.clone(),
        refusals: refusals.clone(),
        timeout: s.connect_timeout,
    };
    let endpoint = Endpoint::from_static("http://syncer.meshfed.internal")
        .http2_keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_timeout(s.connect_timeout)
        .tcp_nodelay(true);
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let dialer = dialer.clone();
            async move { dialer.dial().await }
        }))
        .await
        .map_err(|e| connect_err(error_chain(&e)))
}

/// Dials the syncer's addresses in turn: TCP, TLS, identity check.
#[derive(Clone)]
struct Dialer {
    addrs: Arc<Vec<SocketAddr>>,
    tls: TlsConnector,
    expected: SpiffeId,
    issuer: String,
    refusals: Arc<HandshakeRefusals>,
    timeout: Duration,
}

impl Dialer {
    async fn dial(
        &self,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error> {
        let mut problems = Vec::new();
        for addr in self.addrs.iter() {
            match tokio::time::timeout(self.timeout, self.dial_one(*addr)).await {
                Ok(Ok(io)) => return Ok(TokioIo::new(io)),
                Ok(Err(e)) => problems.push(format!("{addr}: {e}")),
                Err(_) => problems.push(format!("{addr}: no answer within {:?}", self.timeout)),
            }
        }
        Err(std::io::Error::other(problems.join("; ")))
    }

    async fn dial_one(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = ExpectedPeer::Syncer
            .server_name()
            .map_err(std::io::Error::other)?;
        // The verifier checks the chain and that the peer is a syncer.
        let tls = self.tls.connect(name, tcp).await.map_err(|e| {
            std::io::Error::other(format!(
                "TLS handshake failed: {e}; hint: the syncer's certificate must chain to \
                 our bundle.pem and carry a syncer SPIFFE ID"
            ))
        })?;
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .ok_or_else(|| std::io::Error::other("the syncer presented no certificate"))?;
        let peer = verify::peer_identity(chain).map_err(std::io::Error::other)?;
        if peer.id != self.expected {
            self.refusals.record(RefusalReason::WrongPeer);
            tracing::warn!(%addr, presented = %peer.id, expected = %self.expected, "refused a config server with another identity");
            return Err(std::io::Error::other(format!(
                "the server is `{}`, but only `{}` is accepted as the syncer; hint: set \
                 --syncer-id to the syncer's SPIFFE ID, or check that --syncer points at it",
                peer.id, self.expected
            )));
        }
        if peer.cluster != self.issuer {
            self.refusals.record(RefusalReason::WrongIssuer);
            tracing::warn!(%addr, presented = %peer.id, issuer = %peer.cluster, designated = %self.issuer, "refused a syncer issued by another cluster's CA");
            return Err(std::io::Error::other(format!(
                "the server is `{}` but its certificate was issued by the CA of cluster `{}`, \
                 and only a syncer issued by the CA of `{}` (--syncer-issuer) is accepted; \
                 hint: reissue the syncer's certificate with `certs syncer --ca <{} CA dir>`, \
                 or fix --syncer-issuer",
                peer.id, peer.cluster, self.issuer, self.issuer
            )));
        }
        Ok(tls)
    }
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_syncer_id_is_the_one_certs_syncer_issues_with_id_syncer() {
        assert_eq!(
            default_syncer_id("example.org").unwrap().to_string(),
            "spiffe://example.org/meshfed/syncer/syncer"
        );
    }
}
