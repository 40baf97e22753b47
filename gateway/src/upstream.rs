//! Local endpoints: a DestinationRule's endpoint-level policy, applied where
//! the endpoints are (the destination gateway, or the source gateway for a
//! subset in its own cluster).
//!
//! A request names a destination ([`Dest`]: service, subset, port, the
//! subset's labels). That picks an upstream cluster, as Istio builds one
//! Envoy cluster per service, subset and port, with its own
//! - **effective policy** ([`Effective`]): the subset's traffic policy
//!   (already merged over the top-level one by the policy compiler: a
//!   subset's `loadBalancer`, `connectionPool`, `outlierDetection` and `tls`
//!   each replace the top-level one as a whole), then a matching
//!   `portLevelSettings` entry, which replaces all four, with defaults for
//!   the parts it leaves out (Istio: port-level settings do not inherit);
//! - **balancer** state: `ROUND_ROBIN` (a cursor), `RANDOM`, and
//!   `LEAST_REQUEST` (the default: power of two choices on requests in
//!   flight per endpoint). `consistentHash` is accepted by validation with a
//!   not-enforced warning and balanced as `LEAST_REQUEST`;
//! - **outlier detector** ([`outlier`]): ejected endpoints leave the
//!   balancer (unless fewer than `minHealthPercent` would remain) and are
//!   announced to peers as unhealthy ([`Upstream::mask_ejected`]), so that
//!   source gateways stop choosing a cluster whose endpoints are all ejected;
//! - **connection pool** ([`pool`]) with the `connectionPool` limits;
//!   overflow is a fast 503 ([`overflow_response`]);
//! - **TLS** to endpoints ([`tls`]).
//!
//! It does not own the choice of cluster ([`crate::route`]) nor the tunnel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::BodyExt;
use meshfed_policy::snapshot::{
    ConnectionPool, EndpointTls, LbAlgorithm, OutlierDetection, TrafficPolicy,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::body::{CallerFault, ProxyBody, Watched};
use crate::endpoints::{Endpoint, EndpointSet};
use crate::identity::store::Credentials;
use crate::respond::error_response;
use crate::route::Active;
use crate::wire::frame::Refusal;

pub mod outlier;
pub mod pool;
pub mod tls;

#[cfg(test)]
mod tests;

use outlier::{Detector, Outcome, OutlierConfig, Recorded};
use pool::{ClusterPool, EndpointKey, Lease, Limit, Limits, PoolError};

/// Connection timeout to a local endpoint when no DestinationRule sets
/// `connectTimeout`.
pub const CONNECT_TIMEOUT: Duration = pool::DEFAULT_CONNECT_TIMEOUT;

/// The response header that names the limit a request overflowed.
pub const OVERFLOW_HEADER: &str = "x-meshfed-overflow";

/// How often [`Upstream`]'s maps are swept for entries nobody uses.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// An upstream cluster unused this long, with nothing in flight and nothing
/// ejected, is dropped with its pool (idle connections close) and its
/// detector; the next request starts it afresh.
const CLUSTER_IDLE: Duration = Duration::from_secs(600);

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// Canonical host.
    pub service: &'a str,
    pub subset: Option<&'a str>,
    /// The service port the caller asked for (`portLevelSettings` key).
    pub port: u16,
    /// The subset's labels; empty for every endpoint.
    pub selector: &'a BTreeMap<String, String>,
}

/// The policy that applies to one request, resolved from the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Effective<'a> {
    pub lb: LbAlgorithm,
    pub limits: Limits,
    pub outlier: Option<OutlierConfig>,
    pub tls: Option<&'a EndpointTls>,
}

impl<'a> Effective<'a> {
    /// The policy for `dest` in `active`: the subset's (merged) policy, or
    /// the top-level one, then the port's settings if it has any.
    pub fn resolve(active: &'a Active, dest: &Dest<'_>) -> Self {
        let Some(d) = active.snapshot.policy.destinations.get(dest.service) else {
            return Effective::from_parts(LbAlgorithm::default(), None, None, None);
        };
        let tp: &TrafficPolicy = dest
            .subset
            .and_then(|s| d.subsets.get(s))
            .map_or(&d.traffic_policy, |s| &s.traffic_policy);
        match tp.ports.get(&dest.port) {
            Some(p) => Effective::from_parts(
                p.load_balancer
                    .as_ref()
                    .map(|l| l.algorithm)
                    .unwrap_or_default(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
                p.tls.as_ref(),
            ),
            None => Effective::from_parts(
                tp.load_balancer.algorithm,
                Some(&tp.connection_pool),
                tp.outlier_detection.as_ref(),
                tp.tls.as_ref(),
            ),
        }
    }

    fn from_parts(
        lb: LbAlgorithm,
        pool: Option<&ConnectionPool>,
        outlier: Option<&OutlierDetection>,
        tls: Option<&'a EndpointTls>,
    ) -> Self {
        Effective {
            lb,
            limits: pool.map(Limits::from).unwrap_or_default(),
            outlier: Some(outlier.map_or(OutlierConfig::FAILURE_ACCRUAL, OutlierConfig::from)),
            tls,
        }
    }
}

/// Whether a request to an endpoint of `service` on service port `port`
/// goes as HTTP/2: for gRPC; for a port a ServiceEntry declares as HTTP/2
/// or gRPC (its `protocol`, or Istio's `<protocol>-` port name prefix); and
/// for a port this cluster's Kubernetes Service declares so (`local`, from
/// discovery: `appProtocol` `kubernetes.io/h2c`, `http2`, `grpc`,
/// `grpc-web`, or the same name prefix, as Istio reads Services).
/// Otherwise HTTP/1.1, which every HTTP server speaks. Never the caller's
/// own protocol: an HTTP/2 caller of an HTTP/1.1-only service is
/// translated, as Envoy does, on both the local and the peer path.
pub fn speaks_h2(
    active: &Active,
    local: &crate::wire::announce::ServicePorts,
    service: &str,
    port: u16,
    grpc: bool,
) -> bool {
    if grpc {
        return true;
    }
    let h2 = |proto: &str| {
        ["HTTP2", "GRPC", "GRPC-WEB", "kubernetes.io/h2c"]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(proto))
    };
    let prefix = |name: &str| h2(name.split('-').next().unwrap_or(""));
    if let Some(entry) = active.snapshot.policy.service_entries.get(service) {
        return entry
            .ports
            .iter()
            .any(|p| p.number == port && (h2(&p.protocol) || prefix(&p.name)));
    }
    local.get(service).is_some_and(|ports| {
        ports.iter().any(|p| {
            p.port == port && (p.app_protocol.as_deref().is_some_and(h2) || prefix(&p.name))
        })
    })
}

/// The port an upstream cluster is keyed by: `dest.port` when the snapshot
/// gives it a policy or endpoints of its own (`portLevelSettings`, a
/// ServiceEntry port), else 0. The port is the caller's to choose (`Host:
/// ratings:1234`), so keying by it as given would let callers mint a
/// cluster, a pool and an endpoint connection per port.
fn cluster_port(active: &Active, dest: &Dest<'_>) -> u16 {
    let policy = &active.snapshot.policy;
    let by_rule = policy.destinations.get(dest.service).is_some_and(|d| {
        d.traffic_policy.ports.contains_key(&dest.port)
            || d.subsets
                .values()
                .any(|s| s.traffic_policy.ports.contains_key(&dest.port))
    });
    let by_entry = policy
        .service_entries
        .get(dest.service)
        .is_some_and(|e| e.ports.iter().any(|p| p.number == dest.port));
    if by_rule || by_entry { dest.port } else { 0 }
}

/// One upstream cluster: a service, subset and port.
#[derive(Debug)]
struct Cluster {
    subset: Option<String>,
    port: u16,
    /// When a request last chose it, in ms since [`Upstream::epoch`].
    last_used: AtomicU64,
    rr: AtomicUsize,
    /// Endpoints ejected, as of the last sweep; 0 skips the detector.
    ejected: AtomicUsize,
    /// Whether the detector counts errors for any endpoint.
    has_state: AtomicBool,
    detector: Mutex<Detector>,
    pool: Arc<ClusterPool>,
}

/// Labels of `meshfed_upstream_overflow_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub service: String,
    pub limit: &'static str,
}

/// Labels of `meshfed_outlier_ejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: String,
    pub reason: &'static str,
}

/// Labels of `meshfed_outlier_ejected`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// This module's metrics, registered through [`crate::metrics::Register`].
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    pub overflow: Family<OverflowLabels, Counter>,
    pub ejections: Family<EjectionLabels, Counter>,
    pub ejected: Family<ServiceLabels, Gauge>,
}

impl crate::metrics::Register for UpstreamMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_overflow",
            "Requests refused because a DestinationRule connectionPool limit was reached, by limit",
            self.overflow.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by reason",
            self.ejections.clone(),
        );
        registry.register(
            "outlier_ejected",
            "Endpoints ejected by outlier detection now",
            self.ejected.clone(),
        );
    }
}

/// Why a request to a local endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{service}: DestinationRule connectionPool limit {} reached", .limit.as_str())]
    Overflow { service: String, limit: Limit },
    #[error("endpoint {addr} of {service}: {reason}")]
    Connect {
        service: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("endpoint {addr} of {service}: {reason}")]
    Reset {
        service: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The caller failed its own request body (malformed, or it went
    /// away): not the endpoint's fault, and never counted against it.
    #[error("request to {service}: the caller's body failed: {reason}")]
    Caller {
        service: String,
        fault: CallerFault,
        reason: String,
    },
}

impl UpstreamError {
    /// The refusal that reports it to the caller or the source gateway.
    pub fn refusal(&self) -> Refusal {
        match self {
            UpstreamError::Overflow { .. } => Refusal::Overloaded,
            UpstreamError::Connect { .. } => Refusal::ConnectFailed,
            UpstreamError::Reset { .. } => Refusal::UpstreamReset,
            UpstreamError::Tls(_) => Refusal::ConnectFailed,
            UpstreamError::Caller { .. } => Refusal::BadRequest,
        }
    }

    /// The status and reason this error is recorded under: the refusal's,
    /// except a caller that went away (`499 source-cancelled`).
    pub fn recorded(&self) -> (u16, &'static str) {
        match self {
            UpstreamError::Caller { fault, .. } => (fault.status().as_u16(), fault.reason()),
            other => {
                let r = other.refusal();
                (r.http_status().as_u16(), r.reason())
            }
        }
    }

    /// The response for the caller: for an overflow, a fast 503 that names
    /// the limit (`x-meshfed-overflow`, and Envoy's `x-envoy-overloaded`).
    pub fn response(&self, grpc: bool) -> Response<ProxyBody> {
        match self {
            UpstreamError::Overflow { limit, .. } => {
                overflow_response(*limit, &self.to_string(), grpc)
            }
            UpstreamError::Caller { fault, .. } => {
                crate::respond::caller_fault_response(*fault, &self.to_string(), grpc)
            }
            other => error_response(other.refusal(), &other.to_string(), grpc),
        }
    }
}

/// A 503 for a connection-pool overflow.
pub fn overflow_response(limit: Limit, message: &str, grpc: bool) -> Response<ProxyBody> {
    let mut r = error_response(Refusal::Overloaded, message, grpc);
    let h = r.headers_mut();
    h.insert(OVERFLOW_HEADER, HeaderValue::from_static(limit.as_str()));
    h.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

/// The endpoint chosen for a request, with what sending to it needs.
#[derive(Debug)]
pub struct Picked<'a> {
    pub addr: SocketAddr,
    pub policy: Effective<'a>,
    service: &'a str,
    cluster: Arc<Cluster>,
    pool_size: usize,
    inflight: InFlight,
}

/// Balancers, pools, detectors and TLS for this cluster's endpoints.
///
/// Both maps are keyed by what callers and peers ask for (endpoint
/// addresses that come and go with discovery; a peer's port), so they are
/// swept every [`PRUNE_EVERY`] from the request path: an endpoint counter
/// nobody holds is zero and goes, and so does a cluster unused for
/// [`CLUSTER_IDLE`]. A subset name the snapshot does not define shares the
/// service's cluster, so peers cannot mint clusters by naming subsets.
#[derive(Debug)]
pub struct Upstream {
    inflight: Mutex<FxHashMap<SocketAddr, Arc<AtomicUsize>>>,
    clusters: Mutex<FxHashMap<String, Vec<Arc<Cluster>>>>,
    tls: tls::TlsCache,
    metrics: UpstreamMetrics,
    health: watch::Sender<u64>,
    epoch: Instant,
    /// When the next sweep is due, in ms since `epoch`.
    next_prune: AtomicU64,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        Self::with_metrics(UpstreamMetrics::default())
    }

    pub fn with_metrics(metrics: UpstreamMetrics) -> Self {
        Upstream {
            inflight: Mutex::new(FxHashMap::default()),
            clusters: Mutex::new(FxHashMap::default()),
            tls: tls::TlsCache::default(),
            metrics,
            health: watch::channel(0).0,
            epoch: Instant::now(),
            next_prune: AtomicU64::new(PRUNE_EVERY.as_millis() as u64),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sweeps the maps when a sweep is due; one caller does it.
    fn maybe_prune(&self, now: u64) {
        let due = self.next_prune.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + PRUNE_EVERY.as_millis() as u64;
        if self
            .next_prune
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.prune(now);
        }
    }

    /// Drops the endpoint counters nobody holds (so zero) and the clusters
    /// unused for [`CLUSTER_IDLE`] with nothing in flight or ejected.
    /// Returns how many of each are left.
    fn prune(&self, now: u64) -> (usize, usize) {
        let counters = match self.inflight.lock() {
            Ok(mut m) => {
                m.retain(|_, c| Arc::strong_count(c) > 1);
                m.len()
            }
            Err(_) => 0,
        };
        let idle = CLUSTER_IDLE.as_millis() as u64;
        let mut map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        for list in map.values_mut() {
            list.retain(|c| {
                Arc::strong_count(c) > 1
                    || c.ejected.load(Ordering::Relaxed) > 0
                    || now.saturating_sub(c.last_used.load(Ordering::Relaxed)) < idle
            });
        }
        map.retain(|_, list| !list.is_empty());
        (counters, map.values().map(Vec::len).sum())
    }

    /// The gateway's own credentials, presented to endpoints under
    /// `ISTIO_MUTUAL` (call again when they reload).
    pub fn set_identity(&self, creds: Arc<Credentials>) {
        self.tls.set_identity(creds);
    }

    /// Builds the endpoint TLS configurations `snapshot` needs, on a
    /// blocking thread, before it is applied (`tls::TlsCache::prepare`).
    pub async fn prepare_tls(&self, snapshot: Arc<meshfed_policy::Snapshot>) {
        self.tls.prepare(snapshot).await;
    }

    /// Records the endpoint TLS settings of the first snapshot, built once
    /// credentials are set (`tls::TlsCache::want`).
    pub fn want_tls(&self, snapshot: &meshfed_policy::Snapshot) {
        self.tls.want(snapshot);
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        match self.inflight.lock() {
            Ok(mut m) => m.entry(addr).or_default().clone(),
            Err(_) => Arc::new(AtomicUsize::new(0)),
        }
    }

    fn least_request(&self, candidates: &[&Endpoint]) -> Option<SocketAddr> {
        Some(match candidates.len() {
            0 => return None,
            1 => candidates[0].addr,
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (candidates[a].addr, candidates[b].addr);
                if self.counter(ea).load(Ordering::Relaxed)
                    <= self.counter(eb).load(Ordering::Relaxed)
                {
                    ea
                } else {
                    eb
                }
            }
        })
    }

    /// The cluster of `dest`, made on first use. `subset` is the subset
    /// name if the snapshot defines it for the service, else `None`; `port`
    /// is [`cluster_port`].
    fn cluster(&self, dest: &Dest<'_>, subset: Option<&str>, port: u16, now: u64) -> Arc<Cluster> {
        let mut map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let list = match map.get_mut(dest.service) {
            Some(l) => l,
            None => map.entry(dest.service.to_string()).or_default(),
        };
        if let Some(c) = list
            .iter()
            .find(|c| c.port == port && c.subset.as_deref() == subset)
        {
            c.last_used.store(now, Ordering::Relaxed);
            return c.clone();
        }
        let c = Arc::new(Cluster {
            subset: subset.map(str::to_string),
            port,
            last_used: AtomicU64::new(now),
            rr: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            has_state: AtomicBool::new(false),
            detector: Mutex::new(Detector::new(Instant::now())),
            pool: Arc::default(),
        });
        list.push(c.clone());
        c
    }

    /// Chooses an endpoint of `dest` in `endpoints` under `active`'s
    /// policy: healthy, carrying the subset's labels, not ejected, then by
    /// the load balancer. `None` when there is none.
    pub fn choose<'a>(
        &self,
        active: &'a Active,
        endpoints: &EndpointSet,
        dest: &Dest<'a>,
    ) -> Option<Picked<'a>> {
        self.choose_avoiding(active, endpoints, dest, &[])
    }

    /// [`Upstream::choose`] for a retry: endpoints in `avoid` (where earlier
    /// tries of the request failed to connect or were reset) are passed
    /// over while any other is left, as Istio's default `previous_hosts`
    /// retry predicate does.
    pub fn choose_avoiding<'a>(
        &self,
        active: &'a Active,
        endpoints: &EndpointSet,
        dest: &Dest<'a>,
        avoid: &[SocketAddr],
    ) -> Option<Picked<'a>> {
        let mut candidates = crate::endpoints::healthy(endpoints, dest.service, dest.selector);
        // A multi-port ServiceEntry's endpoints each serve one port.
        candidates.retain(|e| crate::discovery::service_entry::for_port(e, dest.port));
        if !avoid.is_empty() && candidates.iter().any(|e| !avoid.contains(&e.addr)) {
            candidates.retain(|e| !avoid.contains(&e.addr));
        }
        self.choose_from(active, candidates, dest)
    }

    /// [`Upstream::choose`] among `candidates` that the caller already
    /// narrowed (healthy, matching the subset, allowed by authorization).
    pub fn choose_from<'a>(
        &self,
        active: &'a Active,
        mut candidates: Vec<&Endpoint>,
        dest: &Dest<'a>,
    ) -> Option<Picked<'a>> {
        let policy = Effective::resolve(active, dest);
        let subset = dest.subset.filter(|s| {
            active
                .snapshot
                .policy
                .destinations
                .get(dest.service)
                .is_some_and(|d| d.subsets.contains_key(*s))
        });
        let now = self.now_ms();
        self.maybe_prune(now);
        let cluster = self.cluster(dest, subset, cluster_port(active, dest), now);
        let pool_size = candidates.len();
        if policy.outlier.is_some() && cluster.ejected.load(Ordering::Relaxed) > 0 {
            let mut det = cluster.detector.lock().unwrap_or_else(|p| p.into_inner());
            if det.sweep(Instant::now()) {
                self.after_health_change(&cluster, &det, dest.service);
            }
            let before = candidates.len();
            let kept: Vec<&Endpoint> = candidates
                .iter()
                .copied()
                .filter(|e| !det.is_ejected(&e.addr))
                .collect();
            // Below minHealthPercent, Envoy's panic mode balances over all.
            let min = policy.outlier.map_or(0, |o| o.min_health_percent) as usize;
            if kept.len() * 100 >= min * before {
                candidates = kept;
            }
        }
        let addr = match policy.lb {
            LbAlgorithm::RoundRobin => {
                let n = candidates.len();
                (n > 0).then(|| candidates[cluster.rr.fetch_add(1, Ordering::Relaxed) % n].addr)
            }
            LbAlgorithm::Random => {
                let n = candidates.len();
                (n > 0).then(|| candidates[rand::random_range(0..n)].addr)
            }
            LbAlgorithm::LeastRequest => self.least_request(&candidates),
        }?;
        // Port 0: an endpoint of a headless Service without ports, reached
        // on the requested port.
        let addr = if addr.port() == 0 {
            SocketAddr::new(addr.ip(), dest.port)
        } else {
            addr
        };
        let c = self.counter(addr);
        c.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            addr,
            policy,
            service: dest.service,
            cluster,
            pool_size,
            inflight: InFlight(c),
        })
    }

    /// Sends `req` to the picked endpoint: HTTP/2 when `h2` (gRPC), else
    /// HTTP/1.1; TLS per the policy. The URI is rewritten for the endpoint
    /// from the request's path and `Host`. The connection (and the count
    /// of requests in flight) is held until the response body is done.
    pub async fn send(
        &self,
        picked: Picked<'_>,
        req: Request<ProxyBody>,
        h2: bool,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let Picked {
            addr,
            policy,
            service,
            cluster,
            pool_size,
            inflight,
        } = picked;
        let setup = match policy.tls {
            // Boxed: only TLS origination pays for its future.
            Some(t) => Box::pin(self.tls.setup(t, service)).await?,
            None => None,
        };
        let key = EndpointKey {
            addr,
            h2,
            tls: setup.as_ref().map_or(0, |s| s.id),
        };
        let (mut parts, body) = req.into_parts();
        // Whether the caller fails its own body decides whose fault a
        // failed request is.
        let (body, caller_fault) = Watched::wrap(body);
        // An HTTP/1.1 request in origin form (a path, as the destination
        // gateway forms it) is sent as it is; anything else is formed again.
        let origin_form = !h2
            && parts.uri.scheme().is_none()
            && parts.uri.authority().is_none()
            && parts.uri.path_and_query().is_some();
        let path = if origin_form {
            String::new()
        } else {
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string()
        };
        parts.uri = if origin_form {
            parts.version = http::Version::HTTP_11;
            Ok(std::mem::take(&mut parts.uri))
        } else if h2 {
            let authority = parts
                .headers
                .remove(header::HOST)
                .and_then(|h| h.to_str().ok().map(str::to_string))
                .unwrap_or_else(|| addr.to_string());
            let scheme = if setup.is_some() { "https" } else { "http" };
            Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query(path)
                .build()
        } else {
            parts.version = http::Version::HTTP_11;
            Uri::builder().path_and_query(path).build()
        }
        .map_err(|e| UpstreamError::Reset {
            service: service.to_string(),
            addr,
            reason: format!("cannot form the request URI: {e}"),
        })?;
        if h2 {
            parts.version = http::Version::HTTP_2;
        }
        let req = Request::from_parts(parts, body);
        let mut lease: Lease = match cluster
            .pool
            .acquire(key, &policy.limits, setup.as_ref())
            .await
        {
            Ok(l) => l,
            Err(PoolError::Overflow(limit)) => {
                self.metrics
                    .overflow
                    .get_or_create(&OverflowLabels {
                        service: service.to_string(),
                        limit: limit.as_str(),
                    })
                    .inc();
                return Err(UpstreamError::Overflow {
                    service: service.to_string(),
                    limit,
                });
            }
            Err(PoolError::Connect { addr, reason }) => {
                self.record(
                    &cluster,
                    &policy,
                    service,
                    addr,
                    Outcome::LocalFailure,
                    pool_size,
                );
                return Err(UpstreamError::Connect {
                    service: service.to_string(),
                    addr,
                    reason,
                });
            }
        };
        match lease.send(req).await {
            Ok(resp) => {
                if caller_fault.get().is_none() {
                    self.record(
                        &cluster,
                        &policy,
                        service,
                        addr,
                        Outcome::Status(resp.status().as_u16()),
                        pool_size,
                    );
                }
                let (mut parts, body) = resp.into_parts();
                // Only a gateway may name a gateway's reason: a backend's
                // copy of the header would steer retries and metric labels.
                parts.headers.remove(crate::respond::ERROR_HEADER);
                let held = (lease, inflight);
                let body = body
                    .map_frame(move |f| {
                        let _held = &held;
                        f
                    })
                    .map_err(Into::into)
                    .boxed_unsync();
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                // A request whose caller broke or abandoned its body fails
                // at the endpoint too; that says nothing of the endpoint
                // (Envoy: a downstream error is never an upstream failure).
                if let Some(fault) = caller_fault.get() {
                    return Err(UpstreamError::Caller {
                        service: service.to_string(),
                        fault: *fault,
                        reason: crate::respond::error_chain(&e),
                    });
                }
                self.record(
                    &cluster,
                    &policy,
                    service,
                    addr,
                    Outcome::LocalFailure,
                    pool_size,
                );
                Err(UpstreamError::Reset {
                    service: service.to_string(),
                    addr,
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Connects a TCP stream to the picked endpoint, within
    /// `tcp.maxConnections` (the slot is held as long as the returned guard).
    pub async fn connect_tcp(
        &self,
        picked: Picked<'_>,
    ) -> Result<(tokio::net::TcpStream, TcpGuard), UpstreamError> {
        let Picked {
            addr,
            policy,
            service,
            cluster,
            pool_size,
            inflight,
        } = picked;
        let slot = match cluster.pool.tcp_slot(addr, &policy.limits) {
            Ok(s) => s,
            Err(limit) => {
                self.metrics
                    .overflow
                    .get_or_create(&OverflowLabels {
                        service: service.to_string(),
                        limit: limit.as_str(),
                    })
                    .inc();
                return Err(UpstreamError::Overflow {
                    service: service.to_string(),
                    limit,
                });
            }
        };
        let connected = tokio::time::timeout(
            policy.limits.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match connected {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok((
                    s,
                    TcpGuard {
                        _slot: slot,
                        _inflight: inflight,
                    },
                ))
            }
            Ok(Err(e)) => {
                self.record(
                    &cluster,
                    &policy,
                    service,
                    addr,
                    Outcome::LocalFailure,
                    pool_size,
                );
                Err(UpstreamError::Connect {
                    service: service.to_string(),
                    addr,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                self.record(
                    &cluster,
                    &policy,
                    service,
                    addr,
                    Outcome::LocalFailure,
                    pool_size,
                );
                Err(UpstreamError::Connect {
                    service: service.to_string(),
                    addr,
                    reason: format!(
                        "no connection within the connect timeout of {:?}",
                        policy.limits.connect_timeout
                    ),
                })
            }
        }
    }

    fn record(
        &self,
        cluster: &Cluster,
        policy: &Effective<'_>,
        service: &str,
        addr: SocketAddr,
        outcome: Outcome,
        pool_size: usize,
    ) {
        let Some(cfg) = &policy.outlier else { return };
        // Successes on a cluster with nothing to reset need no lock.
        if matches!(outcome, Outcome::Status(s) if s < 500)
            && cluster.ejected.load(Ordering::Relaxed) == 0
            && !cluster.has_state.load(Ordering::Relaxed)
        {
            return;
        }
        let mut det = cluster.detector.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = det.record(cfg, addr, outcome, pool_size, Instant::now());
        match recorded {
            Recorded::Ejected(reason, until) => {
                tracing::info!(
                    service,
                    subset = cluster.subset.as_deref().unwrap_or(""),
                    endpoint = %addr,
                    reason = reason.as_str(),
                    for_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "endpoint ejected by outlier detection"
                );
                self.metrics
                    .ejections
                    .get_or_create(&EjectionLabels {
                        service: service.to_string(),
                        reason: reason.as_str(),
                    })
                    .inc();
                self.after_health_change(cluster, &det, service);
            }
            Recorded::Capped(reason) => tracing::debug!(
                service,
                endpoint = %addr,
                reason = reason.as_str(),
                "not ejected: maxEjectionPercent reached"
            ),
            Recorded::Nothing => {}
        }
        cluster.has_state.store(det.has_state(), Ordering::Relaxed);
    }

    fn after_health_change(&self, cluster: &Cluster, det: &Detector, service: &str) {
        let n = det.ejected_count();
        cluster.ejected.store(n, Ordering::Relaxed);
        self.metrics
            .ejected
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .set(self.ejected_in(service) as i64);
        self.health.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn ejected_in(&self, service: &str) -> usize {
        let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(service).map_or(0, |l| {
            l.iter().map(|c| c.ejected.load(Ordering::Relaxed)).sum()
        })
    }

    /// Ends ejections that are over; true if any ended.
    fn sweep(&self) -> bool {
        let now = Instant::now();
        let clusters: Vec<(String, Arc<Cluster>)> = {
            let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .flat_map(|(s, l)| l.iter().map(move |c| (s.clone(), c.clone())))
                .filter(|(_, c)| c.ejected.load(Ordering::Relaxed) > 0)
                .collect()
        };
        let mut changed = false;
        for (service, c) in clusters {
            let mut det = c.detector.lock().unwrap_or_else(|p| p.into_inner());
            if det.sweep(now) {
                det.forget_idle();
                self.after_health_change(&c, &det, &service);
                changed = true;
            }
        }
        changed
    }

    fn next_uneject(&self) -> Option<Instant> {
        let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .flatten()
            .filter(|c| c.ejected.load(Ordering::Relaxed) > 0)
            .filter_map(|c| {
                c.detector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .next_uneject()
            })
            .min()
    }

    /// A receiver for [`Upstream::health_changed`].
    pub fn health_watch(&self) -> watch::Receiver<u64> {
        self.health.subscribe()
    }

    /// Waits until the set of ejected endpoints changes: an ejection, or
    /// the end of one (which this also carries out on time, so peers hear
    /// of a returning endpoint without waiting for a request).
    pub async fn health_changed(&self, rx: &mut watch::Receiver<u64>) {
        loop {
            let wake = self.next_uneject();
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        std::future::pending::<()>().await;
                    }
                    return;
                }
                () = sleep => {
                    if self.sweep() {
                        // Our own bump; mark it seen.
                        rx.borrow_and_update();
                        return;
                    }
                }
            }
        }
    }

    /// Whether `addr` of `service` is ejected in any of its clusters.
    pub fn is_ejected(&self, service: &str, addr: &SocketAddr) -> bool {
        let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(service).is_some_and(|l| {
            l.iter().any(|c| {
                c.ejected.load(Ordering::Relaxed) > 0
                    && c.detector
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_ejected(addr)
            })
        })
    }

    /// Healthy endpoints of `service` with every label of `selector` that
    /// outlier detection has not ejected: what this cluster can serve.
    pub fn healthy_count(
        &self,
        endpoints: &EndpointSet,
        service: &str,
        selector: &BTreeMap<String, String>,
    ) -> usize {
        crate::endpoints::healthy(endpoints, service, selector)
            .into_iter()
            .filter(|e| !self.is_ejected(service, &e.addr))
            .count()
    }

    /// `set` with every ejected endpoint marked unhealthy: what the
    /// announcement tells peers. The same `Arc` when nothing is ejected.
    pub fn mask_ejected(&self, set: Arc<EndpointSet>) -> Arc<EndpointSet> {
        let ejected: Vec<(String, SocketAddr)> = {
            let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .flat_map(|(s, l)| l.iter().map(move |c| (s, c)))
                .filter(|(_, c)| c.ejected.load(Ordering::Relaxed) > 0)
                .flat_map(|(s, c)| {
                    let det = c.detector.lock().unwrap_or_else(|p| p.into_inner());
                    det.ejected()
                        .map(|(a, _)| (s.clone(), a))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        if ejected.is_empty() {
            return set;
        }
        let mut out = (*set).clone();
        for (service, addr) in ejected {
            if let Some(eps) = out.get_mut(&service) {
                for e in eps.iter_mut().filter(|e| e.addr == addr) {
                    e.healthy = false;
                }
            }
        }
        Arc::new(out)
    }

    /// Requests in flight, connections open and requests waiting for one,
    /// over every cluster of `service`.
    pub fn pool_stats(&self, service: &str) -> (usize, usize, usize) {
        let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(service).map_or((0, 0, 0), |l| {
            l.iter().fold((0, 0, 0), |acc, c| {
                let (r, n, p) = c.pool.stats();
                (acc.0 + r, acc.1 + n, acc.2 + p)
            })
        })
    }

    /// Current ejections, for /config_dump: service, subset, port, endpoint
    /// and milliseconds left.
    pub fn ejections(&self) -> Vec<Ejection> {
        let now = Instant::now();
        let map = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (service, list) in map.iter() {
            for c in list {
                if c.ejected.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let det = c.detector.lock().unwrap_or_else(|p| p.into_inner());
                for (addr, until) in det.ejected() {
                    out.push(Ejection {
                        service: service.clone(),
                        subset: c.subset.clone(),
                        port: c.port,
                        endpoint: addr,
                        remaining_ms: until.saturating_duration_since(now).as_millis() as u64,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.service, a.endpoint).cmp(&(&b.service, b.endpoint)));
        out
    }
}

/// An endpoint ejected now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ejection {
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub port: u16,
    pub endpoint: SocketAddr,
    pub remaining_ms: u64,
}

/// Holds a proxied TCP connection's place in its pool.
#[derive(Debug)]
pub struct TcpGuard {
    _slot: pool::ConnSlot,
    _inflight: InFlight,
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
