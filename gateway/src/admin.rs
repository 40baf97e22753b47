//! The admin server: health, readiness, metrics, config dump and peers.
//!
//! | path | what |
//! |---|---|
//! | `/healthz` | 200 while the process runs, from its first moments ([`serve_early`]) |
//! | `/readyz` | 200 once listening with a snapshot applied and discovery's first endpoint set (Kubernetes: listed, or persisted) (from the policy dir, the syncer or the state dir); 503 `draining` from SIGTERM on, through the drain grace while every listener still serves ([`Readiness`]) |
//! | `/metrics` | Prometheus text ([`crate::metrics`]) |
//! | `/config_dump` | the applied snapshot, as JSON, with where it came from, the local endpoints and current outlier ejections |
//! | `/peers` | every link: state, RTT, loss (ratio over 30 s, random-loss verdict: `tunnel::loss`), streams, announcements |
//! | `/mirror/view` | what the mirror controller (`meshfed-gateway mirror`) makes mirror Services from: exports, announced ports, the applied snapshot ([`crate::mirror::view`]); 503 until a snapshot is applied |
//!
//! It binds first, before certificates, the snapshot and discovery are
//! loaded: until the gateway's state exists, [`serve_early`] answers
//! `/healthz` (200) and `/readyz` (503 `starting`), so a liveness probe
//! never kills a gateway that is waiting for its API server.
//!
//! It keeps answering while the outbound listener is saturated: it holds
//! at most [`ADMIN_MAX_CONNECTIONS`] connections of its own (more are reset
//! and counted as `meshfed_refusals_total{stage="admin"}`), and the caller
//! connections' limit leaves descriptors for it ([`crate::limits`]).
//!
//! It binds to localhost by default. On any other address it requires a
//! bearer token (`--admin-token-file`) for everything but `/healthz` and
//! `/readyz`, which probes need without credentials.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::accept::{ADMIN_MAX_CONNECTIONS, Acceptor, ConnectionLimit};
use crate::body::{self, ProxyBody};
use crate::state::Gateway;

/// The TCP port of the admin server by default, as Istio's agent serves
/// health and merged metrics on 15020.
pub const DEFAULT_PORT: u16 = 15020;

/// What `/readyz` answers: `starting` (503) until a snapshot is applied,
/// `ready` (200), then `draining` (503) from SIGTERM on. Draining is final:
/// a snapshot applied after SIGTERM does not make the gateway ready again.
///
/// Readiness turns false at SIGTERM while the listeners keep serving for
/// the drain grace (`--drain-grace`, crate::run): a load balancer that
/// follows readiness (the kubelet's probe, an EndpointSlice, kube-proxy)
/// stops sending new connections here before the listeners stop accepting.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    /// Ready, unless draining already.
    pub fn set_ready(&self) {
        let _ = self
            .0
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Not ready, for good: the gateway is shutting down.
    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }

    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Acquire) == DRAINING
    }
}

/// Admin settings.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// When set, requests other than probes need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// A client's time to send an HTTP/1 request head, which also bounds a
    /// kept-alive connection's idle time (`--header-timeout`).
    pub header_timeout: std::time::Duration,
    /// The outbound listener's port, for `/mirror/view`.
    pub outbound_port: u16,
}

/// Serves the admin API until the task is dropped.
pub async fn serve(
    state: Arc<Gateway>,
    listener: TcpListener,
    ready: Arc<Readiness>,
    settings: AdminSettings,
) {
    let settings = Arc::new(settings);
    let limit = ConnectionLimit::new(
        ADMIN_MAX_CONNECTIONS,
        state.module_metrics.connections.admin_connections.clone(),
    );
    let mut acceptor = Acceptor::new(listener, limit, "admin", "admin server");
    loop {
        let (stream, _, admitted) = acceptor.accept(&state.metrics).await;
        let (state, ready, settings) = (state.clone(), ready.clone(), settings.clone());
        let header_timeout = settings.header_timeout;
        tokio::spawn(async move {
            let _admitted = admitted;
            let svc = service_fn(move |req| {
                let (state, ready, settings) = (state.clone(), ready.clone(), settings.clone());
                async move { Ok::<_, Infallible>(handle(&state, &ready, &settings, req)) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The admin listener while the gateway starts: probes only.
#[derive(Debug)]
pub struct Early {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<TcpListener>,
}

impl Early {
    /// Stops answering on behalf of the gateway and hands the listener back
    /// for [`serve`] (connections already accepted finish as they are).
    pub async fn into_listener(self) -> std::io::Result<TcpListener> {
        let _ = self.stop.send(());
        self.task.await.map_err(std::io::Error::other)
    }
}

/// Answers probes on `listener` until [`Early::into_listener`]: `/healthz`
/// 200 `ok`, `/readyz` 503 `starting`, anything else 503 (nothing else
/// exists yet; no credentials are needed since nothing is disclosed).
pub fn serve_early(listener: TcpListener, header_timeout: std::time::Duration) -> Early {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = &mut stopped => return listener,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            // Over the limit: the connection is dropped (as `serve` does).
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut resp = match req.uri().path() {
                        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
                        "/readyz" => {
                            text(StatusCode::SERVICE_UNAVAILABLE, "starting\n", "text/plain")
                        }
                        _ => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "starting; only /healthz and /readyz answer until the gateway has started\n",
                            "text/plain",
                        ),
                    };
                    // One answer per connection: a kept-alive one must not
                    // go on saying `starting` once the gateway serves.
                    resp.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Early { stop, task }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &str,
) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body::full(body))
        .unwrap_or_else(|_| Response::new(body::empty()))
}

fn handle(
    state: &Gateway,
    ready: &Readiness,
    settings: &AdminSettings,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let path = req.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    if let (Some(token), false) = (&settings.token, probe) {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            // Constant-time (subtle, as the syncer's token and webhook checks).
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())));
        if !ok {
            return text(
                StatusCode::UNAUTHORIZED,
                "bearer token required\n",
                "text/plain",
            );
        }
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => {
            if state.draining() || ready.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n", "text/plain")
            } else if ready.is_ready() {
                text(StatusCode::OK, "ready\n", "text/plain")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n", "text/plain")
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            state
                .metrics
                .encode(&[&crate::tunnel::LinkGauges(&state.tunnel.status())]),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/config_dump" => {
            let active = state.active.load();
            let endpoints: serde_json::Value = state
                .endpoints
                .borrow()
                .iter()
                .map(|(host, eps)| {
                    let list: Vec<serde_json::Value> = eps
                        .iter()
                        .map(|e| serde_json::json!({"address": e.addr.to_string(), "labels": e.labels, "healthy": e.healthy}))
                        .collect();
                    (host.clone(), serde_json::Value::Array(list))
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            let dump = serde_json::json!({
                "cluster": state.cluster,
                "gateway_id": state.id,
                "applied_version": active.version(),
                "content_hash": active.snapshot.content_hash,
                "config_source": state.provenance.dump(),
                "snapshot": &*active.snapshot,
                "local_endpoints": endpoints,
                "outlier_ejections": state.upstream.ejections(),
            });
            text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
                "application/json",
            )
        }
        "/peers" => text(
            StatusCode::OK,
            serde_json::to_vec_pretty(&state.tunnel.status()).unwrap_or_default(),
            "application/json",
        ),
        #[cfg(feature = "kube")]
        "/mirror/view" => match crate::mirror::GatewayView::of(state, settings.outbound_port) {
            Some(view) => text(
                StatusCode::OK,
                serde_json::to_vec(&view).unwrap_or_default(),
                "application/json",
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no snapshot applied yet\n",
                "text/plain",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics /config_dump /peers /mirror/view\n",
            "text/plain",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn readiness_turns_false_at_drain_and_a_later_snapshot_does_not_bring_it_back() {
        let r = Readiness::default();
        assert!(!r.is_ready() && !r.is_draining(), "starting");
        r.set_ready();
        assert!(r.is_ready());
        r.set_draining();
        assert!(!r.is_ready() && r.is_draining());
        // The first snapshot (or a reload) applied after SIGTERM.
        r.set_ready();
        assert!(!r.is_ready() && r.is_draining(), "draining is final");

        let never_ready = Readiness::default();
        never_ready.set_draining();
        never_ready.set_ready();
        assert!(never_ready.is_draining() && !never_ready.is_ready());
    }
}
