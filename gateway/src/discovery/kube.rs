//! Kubernetes discovery: this cluster's endpoints from the API server, with
//! kube-rs runtime watchers.
//!
//! It watches, in the namespaces the applied policy names (and those of
//! `--kube-namespace`), or in every namespace with `--kube-watch-scope all`
//! ([`scope`]):
//! - Services: one [`EndpointSet`] entry per Service, `name.ns.svc.<domain>`.
//!   ExternalName Services and the mirror Services this gateway writes
//!   ([`crate::mirror`], labelled [`MIRROR_OF_LABEL`]) are skipped: a mirror
//!   points back at the gateway and would loop.
//! - EndpointSlices (label `kubernetes.io/service-name`): the endpoints, IPv4
//!   and IPv6 (FQDN slices are skipped). A Service with more than one TCP
//!   port gets one endpoint per port, labelled
//!   [`service_entry::PORT_LABEL`](super::service_entry::PORT_LABEL) with the
//!   service port, so the balancer picks endpoints of the requested port.
//! - Pods, metadata only: the labels of each endpoint's `targetRef` pod
//!   (`version`, `app`...) become the endpoint's labels, so DestinationRule
//!   subsets select them. The zone of the slice endpoint becomes
//!   `topology.kubernetes.io/zone`. Every endpoint carries
//!   `topology.istio.io/cluster`.
//! - ServiceExports (`multicluster.x-k8s.io/v1alpha1`), only with
//!   `--kube-service-exports`: see [`KubeDiscovery::exports`].
//!
//! Endpoint conditions, per service port, as Envoy and Istio use them:
//! `ready` endpoints are healthy. An endpoint that is `terminating` but still
//! `serving` is healthy only while the port has no ready endpoint at all
//! (graceful shutdown of the last pods keeps traffic flowing); otherwise it
//! is listed unhealthy. Everything else is listed unhealthy (announced to
//! peers as such, never picked).
//!
//! Resilience. Each watcher resumes from its last resourceVersion after a
//! dropped connection or an API-server restart, relists on `410 Gone`, and
//! backs off exponentially on errors (kube-runtime's default backoff, up to
//! about 30 s). A relist never empties the set: relisted objects replace
//! the previous ones as they arrive, and those it did not list leave only
//! when it completes (`InitDone`), so endpoints never drop to zero in
//! between (the failure of istio#45992). While the API server is
//! unreachable, the last known set keeps serving.
//!
//! Scale. Lists are paged (kube-runtime asks for 500 objects a page, as
//! client-go). Every object is converted on arrival into what is read of it
//! ([`slim_service`], [`slim_slice`], [`PodMeta`]): annotations,
//! `managedFields`, node names, hints and the rest never reach the cache. A
//! relist buffers only the keys it listed, never a second copy of the
//! objects. 10,000 Pods and 2,000 Services fit the 128 MiB limit with room
//! (tests/tests/kube_scale.rs).
//!
//! Start and outages. The first list of every kind is awaited without a
//! deadline (the admin server already answers `/healthz`; `/readyz` waits):
//! an API outage leaves the gateway waiting and warning every
//! [`SYNC_TIMEOUT`], never exiting into a crash loop. With `--state-dir`
//! each synced set is persisted ([`persist`]), and a gateway whose first
//! list fails serves the persisted set until its watchers sync.
//!
//! It does not own routing, the mirror Services (see [`crate::mirror`],
//! which reads the same stores), or other clusters' endpoints (peers
//! announce those).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use super::service_entry::PORT_LABEL;
use crate::endpoints::{CLUSTER_LABEL, Endpoint, EndpointSet};
use crate::wire::announce::{ServicePort, ServicePorts};

/// The label every mirror Service carries: the service it mirrors.
pub const MIRROR_OF_LABEL: &str = "meshfed.io/mirror-of";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label selectors of the mirror objects, watched in every namespace
/// with a policy scope (the mirror controller's labels:
/// `crate::mirror::MANAGED_BY`, `SLICE_MANAGED_BY`).
const MIRROR_SERVICES_SELECTOR: &str = "app.kubernetes.io/managed-by=meshfed-gateway";
const MIRROR_SLICES_SELECTOR: &str = "endpointslice.kubernetes.io/managed-by=meshfed.io/mirror";
/// The zone label endpoints get from their slice.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// How long the first full list of every kind may take before a persisted
/// endpoint set is served instead (and a warning says what is missing).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Changes arriving within this window are published together.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Pod labels never copied to endpoints: unique per pod or per rollout,
/// they would split every announcement group.
const NOISY_POD_LABELS: &[&str] = &["pod-template-hash", "controller-revision-hash"];

/// How to reach the API server and what to watch, parsed once.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account (kube's `Config::infer`).
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces watched besides those the policy names
    /// (`--kube-namespace`).
    pub namespaces: Vec<String>,
    /// The policy's namespaces, or every one (`--kube-watch-scope`).
    pub scope: WatchScope,
    /// Also require in-cluster ServiceExport objects for local exports.
    pub service_exports: bool,
    /// Create mirror Services pointing at this gateway Service
    /// (`name.namespace`), see [`crate::mirror`].
    pub mirror_target: Option<(String, String)>,
    /// Ports of mirror Services when no same-named local Service gives them.
    pub mirror_ports: Vec<u16>,
    /// Where the last synced endpoint set is kept ([`persist`]), and read
    /// from when the API server cannot be listed at start.
    pub state_dir: Option<PathBuf>,
    /// How long the first list may take before a persisted set is served
    /// instead and a warning is logged (again each time this passes);
    /// `None`: [`SYNC_TIMEOUT`].
    pub sync_timeout: Option<Duration>,
}

/// Why Kubernetes discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot read kubeconfig {path}: {source}; check the path, or drop --kubeconfig to use the in-cluster service account"
    )]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: {0}; give --kubeconfig FILE, set KUBECONFIG, or run in a pod with a service account"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// One watcher's objects, slim ([`slim_service`], [`slim_slice`],
/// [`PodMeta`]).
#[derive(Debug)]
struct Map<T> {
    objs: BTreeMap<(String, String), T>,
    /// The keys a relist in progress has listed so far: at `InitDone`, the
    /// objects it did not list are removed. Only keys are buffered, never a
    /// second copy of the objects: a relist of a large cluster must not
    /// double the cache.
    relist: Option<BTreeSet<(String, String)>>,
    synced: bool,
}

impl<T> Default for Map<T> {
    fn default() -> Self {
        Map {
            objs: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Map<T> {
    /// Applies one watcher event; whether the visible objects changed.
    ///
    /// A relist's objects replace the old ones as they arrive (each is at
    /// least as new as the one it replaces), and the objects it did not
    /// list leave only when it completes, so the set never drops to empty
    /// in between.
    fn apply(&mut self, ev: Event<((String, String), T)>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeSet::new());
                false
            }
            Event::InitApply((k, v)) => {
                // An unchanged object (most of a relist) keeps its copy.
                let changed = self.objs.get(&k) != Some(&v);
                if changed {
                    self.objs.insert(k.clone(), v);
                }
                self.relist.get_or_insert_with(BTreeSet::new).insert(k);
                changed
            }
            Event::InitDone => {
                let before = self.objs.len();
                if let Some(listed) = self.relist.take() {
                    self.objs.retain(|k, _| listed.contains(k));
                }
                let changed = self.objs.len() != before || !self.synced;
                self.synced = true;
                changed
            }
            Event::Apply((k, v)) => {
                let changed = self.objs.get(&k) != Some(&v);
                self.objs.insert(k, v);
                changed
            }
            Event::Delete((k, _)) => self.objs.remove(&k).is_some(),
        }
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.objs.values()
    }
}

/// The objects of one watched namespace (or of every namespace), one
/// [`Map`] per kind. `generation` tells its watchers from those of an earlier
/// watch of the same namespace (stopped, then started again), whose last
/// events must not land here.
#[derive(Debug)]
struct Watched {
    generation: u64,
    services: Map<Service>,
    slices: Map<EndpointSlice>,
    pods: Map<PodMeta>,
    exports: Option<Map<()>>,
}

impl Watched {
    fn synced(&self) -> bool {
        self.services.synced
            && self.slices.synced
            && self.pods.synced
            && self.exports.as_ref().is_none_or(|m| m.synced)
    }
}

/// Everything the watchers hold: per watched namespace (`None`: all of
/// them), and, with mirrors on and a policy scope, the mirror objects of
/// every namespace (label-selected).
#[derive(Debug, Default)]
pub struct Stores {
    watched: BTreeMap<Option<String>, Watched>,
    mirror_services: Option<Map<Service>>,
    mirror_slices: Option<Map<EndpointSlice>>,
}

impl Stores {
    /// Every Service the watchers hold (a mirror Service may be listed
    /// twice: by its namespace's watcher and by the mirrors').
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.watched
            .values()
            .flat_map(|w| w.services.values())
            .chain(self.mirror_services.iter().flat_map(Map::values))
    }

    /// Every EndpointSlice the watchers hold (a mirror's may be listed
    /// twice).
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.watched
            .values()
            .flat_map(|w| w.slices.values())
            .chain(self.mirror_slices.iter().flat_map(Map::values))
    }

    /// The watched namespaces whose every kind is listed: only their
    /// objects are published (a namespace newly watched joins whole).
    fn served(&self) -> impl Iterator<Item = &Watched> {
        self.watched.values().filter(|w| w.synced())
    }

    fn watched_mut(&mut self, key: &Option<String>, generation: u64) -> Option<&mut Watched> {
        self.watched
            .get_mut(key)
            .filter(|w| w.generation == generation)
    }

    /// The watcher set that holds namespace `ns`'s objects.
    fn covering(&self, ns: &str) -> Option<&Watched> {
        self.watched
            .get(&Some(ns.to_string()))
            .or_else(|| self.watched.get(&None))
    }

    fn pod(&self, ns: &str, name: &str) -> Option<&PodMeta> {
        let key = (ns.to_string(), name.to_string());
        self.covering(ns)?.pods.objs.get(&key)
    }

    fn pod_labels(&self, ns: &str, name: &str) -> Option<&[(Box<str>, Box<str>)]> {
        self.pod(ns, name).map(|p| &*p.labels)
    }

    /// Whether pod `ns/name` is being deleted (it has a deletionTimestamp).
    pub fn pod_deleting(&self, ns: &str, name: &str) -> bool {
        self.pod(ns, name).is_some_and(|p| p.deleting)
    }

    /// Whether every watcher has listed its kind once: before that the
    /// stores are partial (a writer must not act on them).
    pub fn synced(&self) -> bool {
        self.unsynced().is_empty()
    }

    /// Whether namespace `ns` is watched and every kind of it listed.
    pub fn namespace_synced(&self, ns: &str) -> bool {
        self.covering(ns).is_some_and(Watched::synced)
    }

    /// Whether the mirror objects of every namespace are listed (by the
    /// mirrors' own watchers, or by watchers of every namespace).
    pub fn mirrors_synced(&self) -> bool {
        match (&self.mirror_services, &self.mirror_slices) {
            (Some(a), Some(b)) => a.synced && b.synced,
            _ => self.watched.get(&None).is_some_and(Watched::synced),
        }
    }

    fn unsynced(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, w) in &self.watched {
            let place = key.as_deref().unwrap_or("all namespaces");
            let kinds = [
                ("services", w.services.synced),
                ("endpointslices", w.slices.synced),
                ("pods", w.pods.synced),
                (
                    "serviceexports",
                    w.exports.as_ref().is_none_or(|m| m.synced),
                ),
            ];
            for (kind, synced) in kinds {
                if !synced {
                    out.push(format!("{kind} in {place}"));
                }
            }
        }
        if self.mirror_services.as_ref().is_some_and(|m| !m.synced) {
            out.push("mirror services".into());
        }
        if self.mirror_slices.as_ref().is_some_and(|m| !m.synced) {
            out.push("mirror endpointslices".into());
        }
        out
    }
}

/// What discovery keeps of a pod: its labels (without
/// [`NOISY_POD_LABELS`]), and whether it is being deleted (a terminating
/// gateway pod leaves the mirrors at once).
///
/// The labels are a boxed slice, not a map: a map's smallest node is
/// about 600 bytes, ten times a pod's few labels, and 10,000 pods would
/// spend megabytes on empty slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    labels: Box<[(Box<str>, Box<str>)]>,
    deleting: bool,
}

impl PodMeta {
    /// What is kept of a pod's metadata; the rest (annotations,
    /// managedFields, ownerReferences) is dropped on arrival.
    fn of(p: PartialObjectMeta<Pod>) -> Self {
        let labels = p
            .metadata
            .labels
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !NOISY_POD_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        PodMeta {
            deleting: p.metadata.deletion_timestamp.is_some(),
            labels,
        }
    }
}

/// Whether an object is one of the mirror controller's own (labelled
/// [`MIRROR_OF_LABEL`], or managed by it: `crate::mirror::MANAGED_BY`,
/// `SLICE_MANAGED_BY`): those are kept nearly whole, since the controller
/// compares and replaces them.
fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|l| {
        l.contains_key(MIRROR_OF_LABEL)
            || l.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("meshfed-gateway")
            || l.get("endpointslice.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some("meshfed.io/mirror")
    })
}

/// What is kept of a Service, converted on arrival so that the cache holds
/// only what discovery and the mirror controller read: its name, namespace,
/// type, IP families, whether it is headless, and ports (name, number, protocol, `appProtocol`). Annotations
/// (`kubectl.kubernetes.io/last-applied-configuration` alone is the size of
/// the object), `managedFields`, the rest of the spec and the status are
/// dropped. A mirror Service ([`is_ours`]) keeps its metadata (but
/// `managedFields`) and spec, which the controller compares and replaces.
pub fn slim_service(svc: Service) -> Service {
    let Service { metadata, spec, .. } = svc;
    if is_ours(&metadata) {
        return Service {
            metadata: ObjectMeta {
                managed_fields: None,
                ..metadata
            },
            spec,
            status: None,
        };
    }
    let spec = spec.map(|sp| ServiceSpec {
        type_: sp.type_,
        ip_families: sp.ip_families,
        // Only whether it is headless.
        cluster_ip: sp.cluster_ip.filter(|ip| ip == "None"),
        ports: sp.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| k8s_openapi::api::core::v1::ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    app_protocol: p.app_protocol,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    Service {
        metadata: ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// What is kept of an EndpointSlice, converted on arrival: its name,
/// namespace and `kubernetes.io/service-name` label, address type, ports
/// (name, number, protocol), and per endpoint the addresses, conditions,
/// zone and the target pod (kind, name, namespace). Hostnames, node names,
/// hints, the target's uid and resourceVersion, `managedFields` and other
/// labels and annotations are dropped. A mirror's slice ([`is_ours`])
/// keeps its metadata (but `managedFields`).
pub fn slim_slice(sl: EndpointSlice) -> EndpointSlice {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointPort};
    let EndpointSlice {
        metadata,
        address_type,
        endpoints,
        ports,
    } = sl;
    let ours = is_ours(&metadata);
    let metadata = if ours {
        ObjectMeta {
            managed_fields: None,
            ..metadata
        }
    } else {
        let labels = metadata.labels.and_then(|mut l| {
            let svc = l.remove(SERVICE_NAME_LABEL)?;
            Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), svc)]))
        });
        ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            labels,
            ..Default::default()
        }
    };
    let endpoints = endpoints
        .into_iter()
        .map(|e| SliceEndpoint {
            addresses: e.addresses,
            conditions: e.conditions,
            zone: e.zone,
            target_ref: e.target_ref.map(|r| ObjectReference {
                kind: r.kind,
                name: r.name,
                namespace: r.namespace,
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let ports = ports.map(|ports| {
        ports
            .into_iter()
            .map(|p| EndpointPort {
                name: p.name,
                port: p.port,
                protocol: p.protocol,
                app_protocol: if ours { p.app_protocol } else { None },
            })
            .collect()
    });
    EndpointSlice {
        metadata,
        address_type,
        endpoints,
        ports,
    }
}

/// The watchers' shared state: the stores, a change signal, and the last
/// error (for startup messages).
#[derive(Debug)]
pub struct Shared {
    stores: Mutex<Stores>,
    changed: Notify,
    /// Bumped after every change of the stores, for other readers
    /// ([`crate::mirror`]).
    version: watch::Sender<u64>,
    last_error: Mutex<String>,
    /// Watch errors so far, and a signal on each (the first list failing
    /// lets a persisted set serve at once).
    failures: AtomicU64,
    failed: Notify,
}

impl Shared {
    /// Runs `f` on the stores under their lock.
    pub fn with<R>(&self, f: impl FnOnce(&Stores) -> R) -> R {
        f(&self.stores.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Notified after every change of the stores.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// A running Kubernetes discovery.
pub struct KubeDiscovery {
    /// The endpoint set, published on every change once every kind is
    /// listed.
    pub endpoints: watch::Receiver<Arc<EndpointSet>>,
    /// With `--kube-service-exports`: the canonical hosts of the
    /// ServiceExport objects in this cluster. A service is exported from
    /// this cluster when Git exports it *and* it is in this set (Git wins:
    /// an in-cluster ServiceExport that Git lacks has no effect).
    pub exports: Option<watch::Receiver<Arc<BTreeSet<String>>>>,
    /// The ports of every discovered Service ([`service_ports`]), announced
    /// to peers for the exported ones.
    pub service_ports: watch::Receiver<Arc<ServicePorts>>,
    /// The client, for writers ([`crate::mirror`]).
    pub client: Client,
    /// The watchers' stores.
    pub shared: Arc<Shared>,
    /// The namespaces watched, to follow the applied policy.
    pub watchers: Arc<scope::Watchers>,
}

impl Debug for KubeDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDiscovery")
            .field("endpoints", &self.endpoints)
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

/// Builds a client from `settings`.
pub async fn client(settings: &KubeSettings) -> Result<Client, KubeError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

fn key_of<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// The ServiceExport kind, read without a generated type.
pub fn service_export_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
        "serviceexports",
    )
}

/// Starts the watchers and waits until every kind has been listed once, so
/// the gateway never starts with a partial set; or, with a set persisted in
/// `settings.state_dir` ([`persist`]), until the first list fails or takes
/// longer than the sync timeout, and then serves the persisted set until
/// the watchers sync. Without a persisted set it waits as long as it takes,
/// warning every sync timeout.
///
/// `named`: the namespaces the applied policy names ([`policy_namespaces`];
/// ignored with `--kube-watch-scope all`); later policies' are given to
/// [`KubeDiscovery::watchers`].
pub async fn watch(
    settings: &KubeSettings,
    cluster: String,
    domain: String,
    named: &BTreeSet<String>,
) -> Result<KubeDiscovery, KubeError> {
    let client = client(settings).await?;
    let shared = Arc::new(Shared {
        stores: Mutex::new(Stores::default()),
        changed: Notify::new(),
        version: watch::channel(0).0,
        last_error: Mutex::new("none yet".into()),
        failures: AtomicU64::new(0),
        failed: Notify::new(),
    });
    // Always watched: the namespaces of --kube-namespace, and the gateway's
    // own (its outbound Service gives the mirrors their endpoints).
    let mut fixed: BTreeSet<String> = settings.namespaces.iter().cloned().collect();
    if let Some((_, ns)) = &settings.mirror_target {
        fixed.insert(ns.clone());
    }
    let watchers = Arc::new(scope::Watchers::new(
        client.clone(),
        shared.clone(),
        settings.scope,
        settings.service_exports,
        fixed,
    ));
    watchers.set_named(named);
    if settings.mirror_target.is_some() && settings.scope == WatchScope::Policy {
        // The mirrors in every namespace, by their labels: one in a
        // namespace no longer named must still be seen to be deleted.
        shared.with_mut(|s| {
            s.mirror_services = Some(Map::default());
            s.mirror_slices = Some(Map::default());
        });
        let services: Api<Service> = Api::all(client.clone());
        let slices: Api<EndpointSlice> = Api::all(client.clone());
        spawn_follow(
            shared.clone(),
            "mirror services in all namespaces".into(),
            watcher::watcher(
                services,
                watcher::Config::default().labels(MIRROR_SERVICES_SELECTOR),
            ),
            |s: &mut Stores| s.mirror_services.as_mut(),
            |svc| Some(slim_service(svc)),
        );
        spawn_follow(
            shared.clone(),
            "mirror endpointslices in all namespaces".into(),
            watcher::watcher(
                slices,
                watcher::Config::default().labels(MIRROR_SLICES_SELECTOR),
            ),
            |s: &mut Stores| s.mirror_slices.as_mut(),
            |sl| Some(slim_slice(sl)),
        );
    }

    // The first full list of every kind. If it fails or is slow and a set
    // from before a restart is kept, that set serves until the watchers
    // sync; without one, the gateway waits (not ready, its health endpoint
    // answering) and says why every `sync_timeout`: an API outage must not
    // crash-loop it.
    let restored = match &settings.state_dir {
        Some(dir) => {
            let (dir, c, d) = (dir.clone(), cluster.clone(), domain.clone());
            match tokio::task::spawn_blocking(move || persist::load(&dir, &c, &d)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "persisted Kubernetes endpoint set unusable");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the persisted Kubernetes endpoint set failed");
                    None
                }
            }
        }
        None => None,
    };
    let sync_timeout = settings.sync_timeout.unwrap_or(SYNC_TIMEOUT);
    let mut version = shared.subscribe();
    let started = tokio::time::Instant::now();
    let mut next_warning = started + sync_timeout;
    let restored = loop {
        if shared.with(Stores::synced) {
            break None;
        }
        let failed = shared.failures.load(Ordering::Relaxed) > 0;
        let now = tokio::time::Instant::now();
        if let Some(r) = &restored
            && (failed || now >= started + sync_timeout)
        {
            tracing::warn!(
                services = r.endpoints.len(),
                endpoints = r.endpoints.values().map(Vec::len).sum::<usize>(),
                saved_at = %humantime_since(r.saved_at),
                waiting = %shared.with(|s| s.unsynced().join(", ")),
                last_error = %shared.last_error(),
                "the API server cannot be listed; serving the endpoint set persisted before the restart until the watchers sync"
            );
            break restored;
        }
        if now >= next_warning {
            tracing::warn!(
                server = %client_url(settings),
                waited = ?now - started,
                waiting = %shared.with(|s| s.unsynced().join(", ")),
                last_error = %shared.last_error(),
                "the first list from the API server has not completed; not ready until it does (no persisted endpoint set: --state-dir). Check that the server is reachable and that the service account may list and watch services, endpointslices and pods (kubectl auth can-i watch endpointslices --as=system:serviceaccount:NS:SA)"
            );
            next_warning = now + sync_timeout;
        }
        let wake = match &restored {
            Some(_) => next_warning.min(started + sync_timeout),
            None => next_warning,
        };
        tokio::select! {
            r = version.changed() => if r.is_err() { break None },
            () = shared.failed.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    };
    // The stores' version the published set is computed from (read before
    // it is): a wake-up with nothing new (the sync's own notifications)
    // computes nothing, as each computation holds a second set of tens of
    // MB in a large cluster.
    let mut published = *shared.version.borrow();
    let (first, first_ports, first_exports) = match restored {
        Some(r) => (r.endpoints, r.ports, r.exports.unwrap_or_default()),
        None => {
            let first = shared.with(|s| endpoint_set(s, &cluster, &domain));
            tracing::info!(
                services = first.len(),
                endpoints = first.values().map(Vec::len).sum::<usize>(),
                "Kubernetes discovery synced"
            );
            let ports = shared.with(|s| self::service_ports(s, &domain));
            let exports = shared.with(|s| export_hosts(s, &domain));
            (first, ports, exports)
        }
    };
    let (tx, endpoints) = watch::channel(Arc::new(first));
    let (ports_tx, service_ports) = watch::channel(Arc::new(first_ports));
    let (exports_tx, exports) = if settings.service_exports {
        let (tx, rx) = watch::channel(Arc::new(first_exports));
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    if let Some(dir) = &settings.state_dir {
        spawn_persister(
            dir.clone(),
            cluster.clone(),
            domain.clone(),
            endpoints.clone(),
            service_ports.clone(),
            exports.clone(),
            shared.with(Stores::synced),
        );
    }
    let publisher = shared.clone();
    tokio::spawn(async move {
        let mut was_synced = publisher.with(Stores::synced);
        loop {
            if was_synced {
                publisher.changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
                let now = *publisher.version.borrow();
                if now == published {
                    continue;
                }
                published = now;
            } else {
                // Serving a persisted set: nothing is published until
                // every kind is listed (a partial set would drop services).
                let mut v = publisher.subscribe();
                let _ = v.wait_for(|_| publisher.with(Stores::synced)).await;
                tracing::info!(
                    "Kubernetes discovery synced; the persisted endpoint set is replaced"
                );
                was_synced = true;
                published = *publisher.version.borrow();
            }
            if tx.is_closed() {
                return;
            }
            let set = publisher.with(|s| endpoint_set(s, &cluster, &domain));
            tx.send_if_modified(|cur| {
                if **cur == set {
                    false
                } else {
                    tracing::debug!(services = set.len(), "Kubernetes endpoints changed");
                    *cur = Arc::new(set);
                    true
                }
            });
            let ports = publisher.with(|s| self::service_ports(s, &domain));
            ports_tx.send_if_modified(|cur| {
                if **cur == ports {
                    false
                } else {
                    *cur = Arc::new(ports);
                    true
                }
            });
            if let Some(etx) = &exports_tx {
                let hosts = publisher.with(|s| export_hosts(s, &domain));
                etx.send_if_modified(|cur| {
                    if **cur == hosts {
                        false
                    } else {
                        *cur = Arc::new(hosts);
                        true
                    }
                });
            }
        }
    });
    Ok(KubeDiscovery {
        endpoints,
        exports,
        service_ports,
        client,
        shared,
        watchers,
    })
}

/// Waits until every namespace of `named` is watched and has every kind
/// listed, at most `timeout` (then warns which are not: a namespace over
/// [`scope::MAX_WATCHED_NAMESPACES`], or one the API server refuses).
pub async fn wait_listed(shared: &Shared, named: &BTreeSet<String>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut version = shared.subscribe();
    loop {
        let waiting: Vec<String> = shared.with(|s| {
            named
                .iter()
                .filter(|ns| !s.namespace_synced(ns))
                .cloned()
                .collect()
        });
        if waiting.is_empty() {
            return;
        }
        tokio::select! {
            r = version.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    namespaces = %waiting.join(", "),
                    last_error = %shared.last_error(),
                    "namespaces the policy names are not listed yet; ready without their endpoints, which join once listed"
                );
                return;
            }
        }
    }
}

fn client_url(settings: &KubeSettings) -> String {
    match &settings.kubeconfig {
        Some(p) => format!("of kubeconfig {}", p.display()),
        None => "inferred (KUBECONFIG or in-cluster)".into(),
    }
}

impl Shared {
    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn with_mut<R>(&self, f: impl FnOnce(&mut Stores) -> R) -> R {
        f(&mut self.stores.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Follows one watcher into its [`Map`], with backoff, logging the first
/// error of a streak (with what was being watched) and the recovery.
/// `select` finds the map (`None`: it is gone, the namespace no longer
/// watched, and the event is dropped). Aborting the task ends the watch.
fn spawn_follow<K, T, S, Sel, Conv>(
    shared: Arc<Shared>,
    what: String,
    stream: S,
    select: Sel,
    convert: Conv,
) -> tokio::task::AbortHandle
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: PartialEq + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    Sel: Fn(&mut Stores) -> Option<&mut Map<T>> + Send + 'static,
    Conv: Fn(K) -> Option<T> + Send + 'static,
{
    let task = tokio::spawn(async move {
        let mut stream = Box::pin(stream.default_backoff());
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    let msg = format!("watching {what}: {e}");
                    if !failing {
                        tracing::warn!(error = %msg, "Kubernetes watch failed; keeping the last known endpoints and retrying with backoff");
                        failing = true;
                    } else {
                        tracing::debug!(error = %msg, "Kubernetes watch still failing");
                    }
                    *shared
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = msg;
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    shared.failed.notify_one();
                    continue;
                }
            };
            if failing && matches!(ev, Event::InitDone | Event::Apply(_) | Event::Delete(_)) {
                tracing::info!(watch = %what, "Kubernetes watch recovered");
                failing = false;
            }
            let ev = match ev {
                Event::Init => Event::Init,
                Event::InitDone => Event::InitDone,
                Event::InitApply(o) => match convert_keyed(o, &convert) {
                    Some(kv) => Event::InitApply(kv),
                    None => continue,
                },
                Event::Apply(o) => match convert_keyed(o, &convert) {
                    Some(kv) => Event::Apply(kv),
                    None => continue,
                },
                Event::Delete(o) => match convert_keyed(o, &convert) {
                    Some(kv) => Event::Delete(kv),
                    None => continue,
                },
            };
            let changed = shared.with_mut(|s| select(s).is_some_and(|m| m.apply(ev)));
            if changed {
                shared.version.send_modify(|v| *v += 1);
                shared.changed.notify_one();
            }
        }
    });
    task.abort_handle()
}

fn convert_keyed<K: Resource, T>(
    o: K,
    convert: &impl Fn(K) -> Option<T>,
) -> Option<((String, String), T)> {
    let k = key_of(&o);
    convert(o).map(|v| (k, v))
}

/// The canonical hosts of the ServiceExports in the stores.
pub fn export_hosts(s: &Stores, domain: &str) -> BTreeSet<String> {
    s.served()
        .filter_map(|w| w.exports.as_ref())
        .flat_map(|m| m.objs.keys())
        .map(|(ns, name)| format!("{name}.{ns}.svc.{domain}"))
        .collect()
}

/// The ports of every Service the stores hold (not mirrors, not
/// ExternalName), by canonical host, as its spec declares them.
pub fn service_ports(s: &Stores, domain: &str) -> ServicePorts {
    let mut out = ServicePorts::new();
    for Discovered { host, spec, .. } in discovered(s, domain) {
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                    name: p.name.clone().unwrap_or_default(),
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect();
        out.insert(host, ports);
    }
    out
}

/// A Service discovery serves: its namespace and name, its canonical host
/// and its spec.
struct Discovered<'s> {
    ns: String,
    name: String,
    host: String,
    spec: &'s ServiceSpec,
}

/// The Services discovery serves: those of namespaces fully listed, neither
/// mirrors nor ExternalName.
fn discovered<'s>(s: &'s Stores, domain: &'s str) -> impl Iterator<Item = Discovered<'s>> + 's {
    s.served()
        .flat_map(|w| w.services.values())
        .filter(|svc| !is_mirror(svc))
        .filter_map(move |svc| {
            let spec = svc.spec.as_ref()?;
            if spec.type_.as_deref() == Some("ExternalName") {
                return None;
            }
            let (ns, name) = key_of(svc);
            let host = format!("{name}.{ns}.svc.{domain}");
            Some(Discovered {
                ns,
                name,
                host,
                spec,
            })
        })
}

/// Whether a Service is one of ours (a mirror), never discovered.
pub fn is_mirror(svc: &Service) -> bool {
    svc.labels().contains_key(MIRROR_OF_LABEL)
}

/// The endpoint set of the stores: see the module docs for the rules.
pub fn endpoint_set(s: &Stores, cluster: &str, domain: &str) -> EndpointSet {
    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for sl in s.slices() {
        if let Some(svc) = sl.labels().get(SERVICE_NAME_LABEL) {
            slices
                .entry((sl.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(sl);
        }
    }
    let mut set = EndpointSet::new();
    for Discovered {
        ns,
        name,
        host,
        spec,
    } in discovered(s, domain)
    {
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .collect();
        let multi = ports.len() > 1;
        // A headless Service without ports (`clusterIP: None`): its pods
        // are reached on whatever port the caller asks for, as by their
        // DNS names in a real cluster (Istio does the same). Its endpoints
        // carry port 0, the requested port (crate::upstream).
        let any_port = spec.cluster_ip.as_deref() == Some("None")
            && spec.ports.as_ref().is_none_or(Vec::is_empty);
        let per_port: Vec<Option<&k8s_openapi::api::core::v1::ServicePort>> = if any_port {
            vec![None]
        } else {
            ports.iter().map(|p| Some(*p)).collect()
        };
        let mut eps = Vec::new();
        let service_slices = slices.get(&(ns.clone(), name.clone()));
        for sp in per_port {
            let mut candidates: BTreeMap<SocketAddr, (State, BTreeMap<String, String>)> =
                BTreeMap::new();
            // The families each pod has addresses of (v4, v6).
            let mut pods: BTreeMap<(&str, &str), (bool, bool)> = BTreeMap::new();
            let mut pod_of: BTreeMap<SocketAddr, (&str, &str)> = BTreeMap::new();
            for sl in service_slices.into_iter().flatten() {
                if !matches!(sl.address_type.as_str(), "IPv4" | "IPv6") {
                    continue;
                }
                // The slice port of this service port: by name (a
                // single-port Service's port may be unnamed).
                let port = match sp {
                    None => Some(0),
                    Some(sp) => sl
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| {
                            p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or("")
                                && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                        })
                        .and_then(|p| p.port)
                        .and_then(|p| u16::try_from(p).ok()),
                };
                let Some(port) = port else {
                    continue;
                };
                for e in &sl.endpoints {
                    let state = State::of(e.conditions.as_ref());
                    let mut labels = BTreeMap::new();
                    if let Some(tr) = &e.target_ref
                        && tr.kind.as_deref() == Some("Pod")
                        && let Some(pod) = tr.name.as_deref()
                        && let Some(pl) = s.pod_labels(tr.namespace.as_deref().unwrap_or(&ns), pod)
                    {
                        // Noisy labels were dropped on arrival.
                        labels.extend(pl.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                    }
                    if let Some(zone) = &e.zone {
                        labels.insert(ZONE_LABEL.into(), zone.clone());
                    }
                    labels.insert(CLUSTER_LABEL.into(), cluster.into());
                    if let Some(sp) = sp
                        && multi
                    {
                        labels.insert(PORT_LABEL.into(), sp.port.to_string());
                    }
                    let pod = e.target_ref.as_ref().and_then(|tr| {
                        (tr.kind.as_deref() == Some("Pod"))
                            .then_some(tr.namespace.as_deref().unwrap_or(&ns))
                            .zip(tr.name.as_deref())
                    });
                    for a in &e.addresses {
                        let Ok(ip) = a.parse::<IpAddr>() else {
                            continue;
                        };
                        let addr = SocketAddr::new(ip, port);
                        if let Some(pod) = pod {
                            let f = pods.entry(pod).or_default();
                            if ip.is_ipv6() {
                                f.1 = true;
                            } else {
                                f.0 = true;
                            }
                            pod_of.insert(addr, pod);
                        }
                        // The same address in two slices (during a slice
                        // split): the better state wins.
                        let entry = candidates.entry(addr).or_insert((state, labels.clone()));
                        if state > entry.0 {
                            *entry = (state, labels.clone());
                        }
                    }
                }
            }
            // A dual-stack pod is in an IPv4 and an IPv6 slice: it is one
            // endpoint (one pod's weight in counts and balancing), at its
            // address of the Service's primary family (`ipFamilies[0]`,
            // IPv4 when unset), as Istio keeps one endpoint per pod.
            let primary_v6 = spec
                .ip_families
                .as_ref()
                .and_then(|f| f.first())
                .is_some_and(|f| f == "IPv6");
            candidates.retain(|addr, _| {
                pod_of
                    .get(addr)
                    .and_then(|p| pods.get(p))
                    .is_none_or(|&(v4, v6)| !(v4 && v6) || addr.is_ipv6() == primary_v6)
            });
            let any_ready = candidates.values().any(|(st, _)| *st == State::Ready);
            for (addr, (state, labels)) in candidates {
                let healthy = match state {
                    State::Ready => true,
                    State::TerminatingServing => !any_ready,
                    State::NotReady => false,
                };
                eps.push(Endpoint {
                    addr,
                    labels,
                    healthy,
                });
            }
        }
        set.insert(host, eps);
    }
    set
}

/// An endpoint's conditions, ordered worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    NotReady,
    TerminatingServing,
    Ready,
}

impl State {
    /// The API's defaults: a missing `ready` is true; a missing `serving`
    /// is `ready`; a missing `terminating` is false.
    fn of(c: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>) -> Self {
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        if ready && !terminating {
            State::Ready
        } else if serving && terminating {
            State::TerminatingServing
        } else {
            State::NotReady
        }
    }
}

/// Writes each synced set to the state directory, at most once per
/// [`persist::MIN_INTERVAL`] (the last change of a burst is always
/// written). `synced`: whether the sets in the channels now are from the
/// watchers (not the persisted one read at start, not rewritten).
fn spawn_persister(
    dir: PathBuf,
    cluster: String,
    domain: String,
    mut endpoints: watch::Receiver<Arc<EndpointSet>>,
    mut ports: watch::Receiver<Arc<ServicePorts>>,
    mut exports: Option<watch::Receiver<Arc<BTreeSet<String>>>>,
    synced: bool,
) {
    tokio::spawn(async move {
        if !synced {
            // The first publication is the first synced set.
            if endpoints.changed().await.is_err() {
                return;
            }
        }
        let mut reported = false;
        loop {
            let set = endpoints.borrow_and_update().clone();
            let p = ports.borrow_and_update().clone();
            let e = exports.as_mut().map(|e| e.borrow_and_update().clone());
            let (d, c, dn) = (dir.clone(), cluster.clone(), domain.clone());
            let written = tokio::task::spawn_blocking(move || {
                persist::save(&d, &c, &dn, &set, &p, e.as_deref())
            })
            .await;
            match written {
                Ok(Ok(())) => reported = false,
                Ok(Err(e)) if !reported => {
                    tracing::warn!(error = %e, "cannot persist the Kubernetes endpoint set");
                    reported = true;
                }
                _ => {}
            }
            tokio::time::sleep(persist::MIN_INTERVAL).await;
            let exports_changed = async {
                match exports.as_mut() {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = endpoints.changed() => if r.is_err() { return },
                r = ports.changed() => if r.is_err() { return },
                r = exports_changed => if r.is_err() { return },
            }
        }
    });
}

/// How long ago `t` was, for a log line.
fn humantime_since(t: std::time::SystemTime) -> String {
    match t.elapsed() {
        Ok(d) => format!("{}s ago", d.as_secs()),
        Err(_) => "in the future (clock skew)".into(),
    }
}

pub mod persist;
pub mod scope;
pub use scope::{WatchScope, policy_namespaces};

#[cfg(test)]
mod tests;
