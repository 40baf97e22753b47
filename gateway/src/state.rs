//! The running gateway's shared state: the active snapshot, the local
//! endpoints, the tunnel, the upstream clients and the announcement this
//! gateway makes to its peers.
//!
//! The snapshot is a value behind an [`ArcSwap`]: [`Gateway::apply`] swaps
//! it atomically, and a request loads it once at its start and keeps that
//! `Arc` to its end, so no request sees half a config.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use meshfed_policy::Snapshot;
use tokio::sync::watch;

pub mod provenance;

use crate::endpoints::EndpointSet;
use crate::metrics::Metrics;
use crate::route::{ActivateError, Active};
use crate::tunnel::link::Tunnel;
use crate::upstream::Upstream;
use crate::wire::announce::Announcement;

/// Why a snapshot was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Activate(#[from] ActivateError),
    #[error("compiling the snapshot failed: {0}")]
    Task(String),
}

/// The metric sets of the modules the data path shares. Each module
/// defines and registers its own ([`crate::metrics::Register`]); the
/// wiring ([`crate::run`]) lists them when it builds the registry.
#[derive(Debug, Clone, Default)]
pub struct ModuleMetrics {
    pub authz: crate::authz::AuthzMetrics,
    /// Connection-pool overflow and outlier ejections.
    pub upstream: crate::upstream::UpstreamMetrics,
    /// The span pipeline.
    pub trace: crate::trace::TraceMetrics,
    /// Open caller and admin connections and their limit.
    pub connections: crate::accept::ConnectionMetrics,
}

impl ModuleMetrics {
    /// Every set, in the order `/metrics` lists them.
    pub fn sets(&self) -> [&dyn crate::metrics::Register; 4] {
        [&self.authz, &self.upstream, &self.trace, &self.connections]
    }
}

/// Everything the data path shares.
#[derive(Debug)]
pub struct Gateway {
    pub cluster: String,
    pub id: String,
    pub active: ArcSwap<Active>,
    pub endpoints: watch::Receiver<Arc<EndpointSet>>,
    pub tunnel: Arc<Tunnel>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub module_metrics: ModuleMetrics,
    /// The outbound listener's TLS config when local callers must present
    /// workload certificates (`--outbound-tls mutual`); `None` for plaintext.
    pub local_tls: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// What snapshot is applied, from where, and the syncer link's state.
    pub provenance: provenance::Provenance,
    /// With `--kube-service-exports`: the services that have a ServiceExport
    /// object in this cluster. A service is exported from here only if Git
    /// exports it and it is in this set (Git wins; see docs/kubernetes.md).
    /// `None`: Git alone decides.
    pub export_gate: arc_swap::ArcSwapOption<std::collections::BTreeSet<String>>,
    /// The namespaces Kubernetes discovery watches one by one (those the
    /// policy names, and `--kube-namespace`); `None` when it watches every
    /// namespace, or is off. A caller in another namespace has no endpoint
    /// to be placed by, and the short-name refusal says so.
    pub watched_namespaces: arc_swap::ArcSwapOption<Vec<String>>,
    /// The ports of this cluster's services, where discovery knows them
    /// (Kubernetes Services): announced with the exported ones, so that
    /// peers' mirror Services declare them (crate::mirror).
    pub service_ports: ArcSwap<crate::wire::announce::ServicePorts>,
    /// Distributed tracing, set once at start when `--otlp-endpoint` is
    /// given; empty means off (crate::trace).
    pub trace: std::sync::OnceLock<Arc<crate::trace::Tracing>>,
    /// Peers' request bodies in flight to local endpoints, per peer and in
    /// all (crate::body_budget; the limits are flags).
    pub bodies: crate::body_budget::BodyBudget,
    draining: AtomicBool,
    /// Requests in flight and retries in flight, for the retry budget.
    retries: crate::retry_budget::RetryBudget,
    announce_seq: AtomicU64,
    announce_tx: watch::Sender<Arc<Announcement>>,
    announce_lock: Mutex<()>,
    /// Bumped after every applied snapshot.
    applied: watch::Sender<u64>,
}

impl Gateway {
    pub fn new(
        cluster: String,
        id: String,
        snapshot: Arc<Snapshot>,
        endpoints: watch::Receiver<Arc<EndpointSet>>,
        tunnel: Arc<Tunnel>,
        metrics: Arc<Metrics>,
        module_metrics: ModuleMetrics,
    ) -> Result<Arc<Self>, ActivateError> {
        let active = Active::new(snapshot)?;
        let upstream = Upstream::with_metrics(module_metrics.upstream.clone());
        upstream.want_tls(&active.snapshot);
        let (announce_tx, _) = watch::channel(Arc::new(Announcement::default()));
        let g = Arc::new(Gateway {
            cluster,
            id,
            active: ArcSwap::from_pointee(active),
            endpoints,
            tunnel,
            upstream,
            metrics,
            module_metrics,
            local_tls: arc_swap::ArcSwapOption::empty(),
            provenance: provenance::Provenance::default(),
            export_gate: arc_swap::ArcSwapOption::empty(),
            watched_namespaces: arc_swap::ArcSwapOption::empty(),
            service_ports: ArcSwap::from_pointee(Default::default()),
            trace: std::sync::OnceLock::new(),
            bodies: crate::body_budget::BodyBudget::default(),
            draining: AtomicBool::new(false),
            retries: Default::default(),
            announce_seq: AtomicU64::new(0),
            announce_tx,
            announce_lock: Mutex::new(()),
            applied: watch::channel(0).0,
        });
        g.after_apply();
        Ok(g)
    }

    /// Applies a snapshot atomically. A snapshot that cannot be activated
    /// (a regex the gateway cannot compile) is refused and the current one
    /// stays. The work runs on blocking threads, never the runtime's:
    /// compiling (regexes, authorization) and building the endpoint TLS
    /// configurations the snapshot names (files are read), both before the
    /// swap, so the first request on the new snapshot finds them ready.
    /// Callers apply one snapshot at a time.
    pub async fn apply(&self, snapshot: Arc<Snapshot>) -> Result<(), ApplyError> {
        let active = tokio::task::spawn_blocking(move || Active::new(snapshot))
            .await
            .map_err(|e| ApplyError::Task(e.to_string()))??;
        self.upstream.prepare_tls(active.snapshot.clone()).await;
        self.active.store(Arc::new(active));
        self.after_apply();
        Ok(())
    }

    fn after_apply(&self) {
        let active = self.active.load();
        let targets: BTreeMap<String, Vec<String>> = active
            .snapshot
            .policy
            .clusters
            .iter()
            .map(|(name, c)| (name.clone(), c.gateways.clone()))
            .collect();
        self.tunnel.reconcile(&targets);
        self.metrics.set_config(&active.snapshot.version);
        self.reannounce();
        self.applied.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes after every applied snapshot (for what derives from the
    /// snapshot, such as ServiceEntry endpoints).
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Whether `service` is exported from this cluster.
    pub fn exported_here(&self, active: &Active, service: &str) -> bool {
        active
            .snapshot
            .policy
            .exports
            .get(service)
            .is_some_and(|c| c.contains(&self.cluster))
            && self.export_gate_allows(service)
    }

    /// Whether the in-cluster ServiceExports (if they are consulted) allow
    /// exporting `service`.
    fn export_gate_allows(&self, service: &str) -> bool {
        self.export_gate
            .load()
            .as_ref()
            .is_none_or(|g| g.contains(service))
    }

    /// Recomputes and publishes the announcement (on a snapshot change, an
    /// endpoint change, or drain).
    pub fn reannounce(&self) {
        let _serialize = self.announce_lock.lock();
        let active = self.active.load();
        // Endpoints that outlier detection ejected are announced unhealthy.
        let endpoints = self.upstream.mask_ejected(self.endpoints.borrow().clone());
        let exported = active
            .snapshot
            .policy
            .exports
            .iter()
            .filter(|(_, clusters)| clusters.contains(&self.cluster))
            .filter(|(host, _)| self.export_gate_allows(host))
            .map(|(host, _)| host.as_str());
        let seq = self.announce_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let a = Announcement::build(
            seq,
            &self.cluster,
            active.version(),
            self.draining(),
            &endpoints,
            &self.service_ports.load(),
            exported,
        );
        self.announce_tx.send_replace(Arc::new(a));
    }

    /// What peers receive.
    pub fn announcements(&self) -> watch::Receiver<Arc<Announcement>> {
        self.announce_tx.subscribe()
    }

    /// Counts a request in flight until the guard drops.
    pub fn request_guard(&self) -> crate::retry_budget::Slot {
        self.retries.request()
    }

    /// A retry, if the budget allows one ([`crate::retry_budget::RetryBudget`]).
    pub fn retry_budget(&self) -> Option<crate::retry_budget::Slot> {
        self.retries.retry()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining: not ready, and peers are told to stop opening new
    /// streams here.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.reannounce();
    }

    /// Follows the endpoint set and outlier ejections, and re-announces on
    /// every change.
    pub fn spawn_endpoint_follower(self: &Arc<Self>) {
        let this = self.clone();
        let mut rx = self.endpoints.clone();
        let mut health = self.upstream.health_watch();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    () = this.upstream.health_changed(&mut health) => {}
                }
                this.reannounce();
            }
        });
    }
}
