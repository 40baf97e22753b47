//! The mirror controller as a process of its own: `meshfed-gateway mirror`.
//!
//! Least privilege, as Linkerd splits its service mirror from its gateway
//! and Istio's gateways hold no API rights: the internet-facing gateway
//! needs only to read Services, EndpointSlices and Pods, and this process,
//! with a ServiceAccount of its own, writes the mirror Services. Whoever
//! takes over a gateway cannot rewrite Services in the cluster.
//!
//! It makes the same mirrors as the in-process controller
//! (`--mirror-services` on the gateway, [`super::spawn`]) with the same
//! passes ([`super::reconcile`]): it watches this cluster's Services,
//! EndpointSlices and Pods, holds the cluster's mirror Lease
//! ([`super::lease`]; one writer, shared with gateways that still mirror
//! in process), and reads the federation's side, what other clusters
//! export and the ports their gateways announce, from the gateways:
//! `GET /mirror/view` on the admin port of each ready pod of the outbound
//! Service (the pods the mirrors lead to), with the admin bearer token.
//!
//! Gateways can disagree for a while (one cut off from the syncer, one
//! restarted from its state directory). The controller takes the view of a
//! snapshot delivered by the syncer (or a policy directory) over one read
//! from a state directory, then the most recently applied; so a replica
//! with an older snapshot does not make mirrors flap. While no gateway
//! answers, nothing is written or deleted: the mirrors stay as they are.
//!
//! Every view is input: bounded ([`super::view::MAX_VIEW_BYTES`], a
//! deadline per read), checked (its cluster must be this controller's), and
//! every name and port is checked again before it is written
//! ([`super::desired`]). It serves `/healthz`, `/readyz` (ready once the
//! watchers have listed everything) and `/metrics` on `--admin-addr`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::view::{GatewayView, MAX_VIEW_BYTES};
use super::{Memory, MirrorMetrics, MirrorSettings, RESYNC, gateway_addresses, lease, reconcile};
use crate::discovery::kube::KubeSettings;
use crate::discovery::kube::scope::host_namespaces;
use crate::metrics::Register;
use crate::state::provenance::Source;

/// How long one read of a gateway's view may take.
pub const VIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// What the controller runs with.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// The cluster it mirrors for; every view must be of this cluster.
    /// `None`: the cluster of the first view read (the gateways are found
    /// through this cluster's own outbound Service).
    pub cluster: Option<String>,
    /// Its ID in the mirror Lease (the pod name).
    pub id: String,
    /// The API server and what to watch; `mirror_target` (the gateway's
    /// outbound Service) is required.
    pub kube: KubeSettings,
    /// The gateways' admin port.
    pub admin_port: u16,
    /// The gateways' admin bearer token.
    pub admin_token: Option<String>,
    /// Where it serves `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The controller's own metrics.
#[derive(Debug, Default)]
struct ControllerMetrics {
    /// `meshfed_mirror_view_reads_total{outcome="ok|error"}`.
    reads: Family<OutcomeLabels, Counter>,
    /// `meshfed_mirror_leader`: 1 while this process holds the Lease.
    leader: Gauge,
}

impl Register for ControllerMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "mirror_view_reads",
            "Reads of a gateway's /mirror/view, by outcome",
            self.reads.clone(),
        );
        r.register(
            "mirror_leader",
            "1 while this mirror controller holds the cluster's mirror Lease",
            self.leader.clone(),
        );
    }
}

/// Runs the controller until the process is stopped.
pub async fn run(settings: ControllerSettings) -> anyhow::Result<()> {
    let Some(target) = settings.kube.mirror_target.clone() else {
        anyhow::bail!(
            "the mirror controller needs --mirror-services NAME.NAMESPACE: the gateway's outbound Service"
        );
    };
    let metrics = Arc::new(ControllerMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    // Health first: the probes answer while the watchers list.
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the controller's admin address {}", settings.listen))?;
    tokio::spawn(serve_admin(listener, ready.clone(), metrics.clone()));

    // Until a gateway's view names the exports' namespaces: the gateways'
    // own namespace and --kube-namespace.
    let kube = crate::discovery::kube::watch(
        &settings.kube,
        settings.cluster.clone().unwrap_or_default(),
        // The controller publishes no endpoints; the domain it mirrors
        // under comes with each view.
        "cluster.local".into(),
        &Default::default(),
    )
    .await?;
    ready.store(true, Ordering::Release);
    let shared = kube.shared.clone();
    let mut reader = ViewReader::new(&settings);
    let cluster = match settings.cluster.clone() {
        Some(c) => c,
        None => {
            // The Lease is per cluster: learn it before taking part.
            let mut reported = false;
            loop {
                let addrs = shared.with(|s| gateway_addresses(s, &target.1, &target.0));
                let (views, errors) = reader.read_all(&addrs).await;
                if let Some(v) = choose(views) {
                    break v.cluster;
                }
                if !reported {
                    tracing::warn!(gateways = addrs.len(), errors = %errors.join("; "), "waiting for a gateway's view to learn the cluster (or give --cluster)");
                    reported = true;
                }
                tokio::time::sleep(RESYNC).await;
            }
        }
    };
    reader.cluster = Some(cluster.clone());
    tracing::info!(%cluster, id = %settings.id, gateways = %format!("{}.{}", target.0, target.1), "mirror controller started");

    let client = kube.client.clone();
    let (leader_tx, mut leader) = tokio::sync::watch::channel(false);
    tokio::spawn(lease::run(
        client.clone(),
        target.1.clone(),
        lease::lease_name(&cluster),
        settings.id.clone(),
        leader_tx,
    ));
    let mut mirror = MirrorSettings {
        target: target.clone(),
        outbound_port: 0,
        default_ports: settings.kube.mirror_ports.clone(),
    };
    let mut stores = shared.subscribe();
    let mut memory = Memory::default();
    let mut last: Option<(Instant, GatewayView)> = None;
    let mut unreachable_reported = false;
    loop {
        let stale = last.as_ref().is_none_or(|(at, _)| at.elapsed() >= RESYNC);
        if stale {
            let addrs = shared.with(|s| gateway_addresses(s, &target.1, &target.0));
            let (views, errors) = reader.read_all(&addrs).await;
            metrics
                .reads
                .get_or_create(&OutcomeLabels { outcome: "ok" })
                .inc_by(views.len() as u64);
            metrics
                .reads
                .get_or_create(&OutcomeLabels { outcome: "error" })
                .inc_by(errors.len() as u64);
            match choose(views) {
                Some(view) => {
                    if unreachable_reported {
                        tracing::info!(gateway = %view.gateway, "a gateway's view is readable again");
                        unreachable_reported = false;
                    }
                    last = Some((Instant::now(), view));
                }
                None => {
                    if !unreachable_reported {
                        tracing::warn!(
                            gateways = addrs.len(),
                            errors = %errors.join("; "),
                            "no gateway's view is readable; mirrors are left as they are until one is (check the gateways' readiness, --gateway-admin-port and --gateway-admin-token-file)"
                        );
                        unreachable_reported = true;
                    }
                    last = None;
                }
            }
        }
        let is_leader = *leader.borrow_and_update();
        metrics.leader.set(i64::from(is_leader));
        if let Some((_, view)) = &last {
            // Watch the namespaces the view's exports are in.
            kube.watchers
                .set_named(&host_namespaces(view.exports.keys(), &view.domain));
            memory.saw(view);
            mirror.outbound_port = view.outbound_port;
            // Never on partial stores: a mirror not listed yet would look
            // missing (created again) and a real Service absent (shadowed).
            if is_leader && shared.with(crate::discovery::kube::Stores::mirrors_synced) {
                reconcile(view, &client, &shared, &mirror, &mut memory).await;
            }
        }
        tokio::select! {
            r = stores.changed() => if r.is_err() { return Ok(()) },
            r = leader.changed() => if r.is_err() { return Ok(()) },
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// The view to follow among those the gateways gave: one delivered by the
/// syncer (or a policy directory) before one read from a state directory,
/// then the most recently applied, then the first by gateway ID.
pub fn choose(mut views: Vec<GatewayView>) -> Option<GatewayView> {
    views.sort_by(|a, b| {
        let rank = |v: &GatewayView| {
            (
                !matches!(v.applied.source, Source::StateDir { .. }),
                v.applied.applied_at_unix_ms,
            )
        };
        rank(b)
            .cmp(&rank(a))
            .then_with(|| a.gateway.cmp(&b.gateway))
    });
    views.into_iter().next()
}

/// Reads `/mirror/view` from gateways.
struct ViewReader {
    cluster: Option<String>,
    port: u16,
    token: Option<String>,
}

impl ViewReader {
    fn new(s: &ControllerSettings) -> Self {
        Self {
            cluster: s.cluster.clone(),
            port: s.admin_port,
            token: s.admin_token.clone(),
        }
    }

    /// Reads every address at once; the views, and one line per failure.
    async fn read_all(&self, addrs: &[IpAddr]) -> (Vec<GatewayView>, Vec<String>) {
        let reads = addrs.iter().map(|ip| async move {
            let addr = SocketAddr::new(*ip, self.port);
            match tokio::time::timeout(VIEW_TIMEOUT, self.read(addr)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(format!("{addr}: {e:#}")),
                Err(_) => Err(format!("{addr}: no answer within {VIEW_TIMEOUT:?}")),
            }
        });
        let mut views = Vec::new();
        let mut errors = Vec::new();
        for r in futures_util::future::join_all(reads).await {
            match r {
                Ok(v) => views.push(v),
                Err(e) => errors.push(e),
            }
        }
        (views, errors)
    }

    async fn read(&self, addr: SocketAddr) -> anyhow::Result<GatewayView> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(conn);
        let mut req = Request::get("/mirror/view").header(header::HOST, addr.to_string());
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await
            .context("request")?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_VIEW_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the view: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            anyhow::bail!("answered {status}: {}", text.trim());
        }
        Ok(GatewayView::parse(&body, self.cluster.as_deref())?)
    }
}

/// `/healthz`, `/readyz` and `/metrics`; no secrets, so no token.
async fn serve_admin(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    metrics: Arc<ControllerMetrics>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (ready, metrics) = (ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = answer(req.uri().path(), &ready, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            // Probes and scrapes are quick; a client that stalls is cut.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn answer(path: &str, ready: &AtomicBool, metrics: &ControllerMetrics) -> Response<Full<Bytes>> {
    let (status, body, kind) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" if ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "ready\n".to_string(), "text/plain")
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting\n".to_string(),
            "text/plain",
        ),
        "/metrics" => {
            let mut r = Registry::with_prefix("meshfed");
            MirrorMetrics.register(&mut r);
            metrics.register(&mut r);
            let mut out = String::new();
            if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
                out.clear();
            }
            (
                StatusCode::OK,
                out,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics\n".to_string(),
            "text/plain",
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, kind)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
