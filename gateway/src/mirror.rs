//! Mirror Services: remote services reachable in this cluster under
//! ordinary names, as Linkerd's service mirror does.
//!
//! For every service that another cluster exports (the snapshot's
//! `exports`), the gateway keeps, in the service's namespace:
//! - `<name>-<cluster>` for each remote cluster exporting it: calls go to
//!   that cluster (the service with `topology.istio.io/cluster: <cluster>`;
//!   like a subset pinning a cluster, a call fails over to another cluster
//!   only when that one has no healthy endpoint);
//! - `<name>-clusterset`: the federated service, routed exactly as a call
//!   to `<name>` (VirtualService splits, locality, failover; local endpoints
//!   included).
//!
//! Each is a selector-less ClusterIP Service plus one EndpointSlice holding
//! the ready addresses of this gateway's outbound Service (`--mirror-services
//! NAME.NAMESPACE`), every port targeting the outbound listener. A selector
//! cannot be used: a Service selects pods of its own namespace only, and the
//! gateway runs in its own. The outbound listener maps the mirror's name back
//! ([`crate::route::mirror_names`], tried after real names), so a caller's
//! `ratings-west.bookinfo:9080` goes to `ratings.bookinfo` in `west`. A
//! real Service of the same name always wins, and is never touched.
//!
//! Ports: those the exporting cluster's gateways announce for the service
//! (its Kubernetes Service's number, name and `appProtocol`; see
//! [`crate::wire::announce`]), kept across a dropped link or a restart;
//! where none were announced, those of a same-named Service in this cluster
//! (namespace sameness, as in Istio multi-cluster), else `--mirror-ports`
//! (default 80). A peer's strings are checked before they are written
//! ([`mirror_ports`]). HTTP, gRPC and TLS with SNI work through the shared
//! outbound port; opaque TCP needs `--tcp-port-map`.
//!
//! Ownership and garbage collection: the gateway owns exactly the Services
//! labelled [`MANAGED_BY`]=`meshfed-gateway` with [`MIRROR_OF_LABEL`], and the
//! EndpointSlices labelled `endpointslice.kubernetes.io/managed-by:
//! meshfed.io/mirror`. Every reconcile (on a change of the stores, the
//! snapshot or the gateway's endpoints, and every second) creates what is
//! missing, replaces what differs and deletes what is no longer desired: a
//! mirror disappears when the export does. Slices also carry an
//! ownerReference to their Service so that Kubernetes' garbage collector
//! removes them if the gateway does not.
//!
//! One writer: only the replica holding the cluster's Lease ([`lease`])
//! writes; the others watch. Each Service records the snapshot that wrote
//! it ([`SNAPSHOT_ANNOTATION`]), and a gateway running a snapshot read from
//! its state directory does not delete what a version it never applied
//! wrote ([`may_delete`]). Writes run concurrently (at most
//! [`WRITE_CONCURRENCY`]); a namespace that is missing or terminating is
//! skipped with backoff ([`namespaces`]); a namespace discovery has not
//! listed yet (just named by the policy) has its mirrors neither written
//! nor deleted until it is, and the mirrors of every namespace are watched
//! by their labels, so one in a namespace no longer named is still
//! collected ([`crate::discovery::kube::scope`]); the gateway pods' addresses drop
//! a terminating pod at once (`gateway_addresses`). A conflict (409) is
//! retried on the next pass.
//!
//! It is a side task beside the data path: nothing below the wiring
//! imports it. It does not own discovery ([`crate::discovery::kube`]
//! supplies the client and the watched objects) or what a mirror name
//! means to routing ([`crate::route::mirror_names`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

pub use crate::discovery::kube::MIRROR_OF_LABEL;
use crate::discovery::kube::{KubeDiscovery, SERVICE_NAME_LABEL, Shared, Stores};
use crate::route::mirror_names::CLUSTERSET;
use crate::state::Gateway;
use crate::wire::announce::ServicePort;

pub mod controller;
pub mod lease;
pub mod namespaces;
pub mod view;
pub use namespaces::MirrorMetrics;
pub use view::GatewayView;

/// Which remote cluster a mirror leads to (`clusterset` for the federated
/// one).
pub const MIRROR_CLUSTER_LABEL: &str = "meshfed.io/mirror-cluster";
/// The Kubernetes label naming the manager of an object.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value on mirror Services.
pub const MANAGER: &str = "meshfed-gateway";
/// The EndpointSlice manager label and our value for it.
pub const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGER: &str = "meshfed.io/mirror";
/// The canonical host a mirror leads to.
pub const MIRROR_HOST_ANNOTATION: &str = "meshfed.io/mirror-host";
/// Where a mirror's ports came from: `announcement` (the exporting
/// cluster's gateways announced its Service's ports), `local-service` (a
/// same-named Service here) or `default` (`--mirror-ports`).
pub const PORTS_FROM_ANNOTATION: &str = "meshfed.io/ports-from";
/// The snapshot version that last wrote a mirror Service.
pub const SNAPSHOT_ANNOTATION: &str = "meshfed.io/snapshot-version";
/// Most mirror writes (or deletes) in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;
/// How often the mirrors are reconciled without any change signal.
pub const RESYNC: Duration = Duration::from_secs(1);

/// How the mirrors are made.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// The gateway's outbound Service: (name, namespace).
    pub target: (String, String),
    /// The outbound listener's port, every mirror port's target.
    pub outbound_port: u16,
    /// Mirror ports when no same-named local Service gives them.
    pub default_ports: Vec<u16>,
}

/// One mirror: its Service and its EndpointSlice, as desired.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub namespace: String,
    pub name: String,
    pub service: Service,
    pub slice: EndpointSlice,
}

/// A service's ports, as announced or declared.
type Ports = Vec<ServicePort>;

/// What the mirrors' ports are made from.
#[derive(Debug, Clone, Default)]
pub struct PortSources {
    /// (cluster, canonical host) → the ports that cluster's gateways
    /// announced for the service (or, after a restart, that a mirror made
    /// from an announcement still declares).
    pub announced: BTreeMap<(String, String), Ports>,
    /// (namespace, name) → the ports of a same-named Service in this
    /// cluster (namespace sameness).
    pub local: BTreeMap<(String, String), Ports>,
}

/// The mirrors `policy` asks for. `gateway_ips`: the ready addresses of
/// the gateway's outbound Service.
///
/// Ports, per mirror: `<name>-<cluster>` declares what `<cluster>`
/// announced for the service; `<name>-clusterset` the union of the local
/// Service's ports and every remote cluster's (by port number, the local
/// one first). Where nothing was announced (a peer of an older release, or
/// one with static discovery): the local Service's, else
/// `--mirror-ports`.
pub fn desired(
    view: &GatewayView,
    sources: &PortSources,
    gateway_ips: &[IpAddr],
    settings: &MirrorSettings,
) -> (Vec<Desired>, Vec<String>) {
    let suffix = format!(".svc.{}", view.domain);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (host, clusters) in &view.exports {
        let Some((name, ns)) = host.strip_suffix(&suffix).and_then(|s| s.split_once('.')) else {
            continue;
        };
        if !is_dns_label(ns) {
            problems.push(format!(
                "no mirror for {host}: `{ns}` is not a valid namespace name"
            ));
            continue;
        }
        let remote: Vec<&String> = clusters.iter().filter(|c| **c != view.cluster).collect();
        if remote.is_empty() {
            continue;
        }
        let local = sources.local.get(&(ns.to_string(), name.to_string()));
        let announced = |c: &str| sources.announced.get(&(c.to_string(), host.clone()));
        let fallback = || match local {
            Some(l) => (l.clone(), "local-service"),
            None => (
                settings
                    .default_ports
                    .iter()
                    .map(|p| ServicePort {
                        port: *p,
                        protocol: "TCP".into(),
                        ..Default::default()
                    })
                    .collect(),
                "default",
            ),
        };
        let mut names: Vec<(String, &str, (Ports, &str))> = remote
            .iter()
            .map(|c| {
                let ports = match announced(c) {
                    Some(a) => (a.clone(), "announcement"),
                    None => fallback(),
                };
                (format!("{name}-{c}"), c.as_str(), ports)
            })
            .collect();
        let mut union: Ports = local.cloned().unwrap_or_default();
        let mut any_announced = false;
        for c in &remote {
            if let Some(a) = announced(c) {
                any_announced = true;
                for p in a {
                    match union.iter_mut().find(|u| u.port == p.port) {
                        // One port number once; a name or appProtocol
                        // another cluster gives fills in what is missing.
                        Some(u) => {
                            if u.name.is_empty() {
                                u.name.clone_from(&p.name);
                            }
                            if u.app_protocol.is_none() {
                                u.app_protocol.clone_from(&p.app_protocol);
                            }
                        }
                        None => union.push(p.clone()),
                    }
                }
            }
        }
        let clusterset = if any_announced {
            (union, "announcement")
        } else {
            fallback()
        };
        names.push((format!("{name}-{CLUSTERSET}"), CLUSTERSET, clusterset));
        for (mirror, cluster, (ports, from)) in names {
            if mirror.len() > 63 {
                problems.push(format!(
                    "no mirror for {host} from {cluster}: `{mirror}` is longer than 63 characters (a Service name is a DNS label)"
                ));
                continue;
            }
            if !is_dns_label(&mirror) || !mirror.starts_with(|c: char| c.is_ascii_lowercase()) {
                problems.push(format!(
                    "no mirror for {host} from {cluster}: `{mirror}` is not a valid Service name (lowercase letters, digits and inner '-', starting with a letter)"
                ));
                continue;
            }
            let ports = mirror_ports(&ports);
            if ports.is_empty() {
                problems.push(format!(
                    "no mirror for {host} from {cluster}: the service has no TCP port (the gateway proxies TCP only)"
                ));
                continue;
            }
            out.push(Desired {
                namespace: ns.to_string(),
                name: mirror.clone(),
                service: service(ns, &mirror, name, cluster, host, &ports, from, settings),
                slice: slice(ns, &mirror, name, &ports, gateway_ips, settings),
            });
        }
    }
    (out, problems)
}

/// The ports a mirror declares, from ports a peer announced or a Service
/// declares, made valid for the API server: TCP only (the gateway proxies
/// TCP), one per port number (the first wins), a missing, invalid or
/// repeated name replaced by `port-N`, an invalid `appProtocol` dropped.
/// A peer's strings are input: none reaches the API server unchecked.
pub fn mirror_ports(ports: &[ServicePort]) -> Ports {
    let mut out: Ports = Vec::new();
    for p in ports {
        if p.port == 0 || p.protocol != "TCP" || out.iter().any(|o| o.port == p.port) {
            continue;
        }
        let mut name = p.name.clone();
        if !is_port_name(&name) || out.iter().any(|o| o.name == name) {
            name = format!("port-{}", p.port);
        }
        if out.iter().any(|o| o.name == name) {
            // `port-N` taken by another port's own name: the number is unique.
            name = format!("port-{}-{}", p.port, out.len());
        }
        out.push(ServicePort {
            port: p.port,
            name,
            protocol: "TCP".into(),
            app_protocol: p.app_protocol.clone().filter(|a| is_app_protocol(a)),
        });
    }
    out
}

/// A DNS label (RFC 1123), as Kubernetes requires of a namespace name: at
/// most 63 lowercase letters, digits and inner dashes. The names come from
/// the snapshot (or, for the controller, from a gateway's admin API): they
/// are checked here, not left for the API server to refuse.
fn is_dns_label(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// An IANA service name, as Kubernetes requires of a port name: at most 15
/// lowercase letters, digits and single inner dashes, with a letter.
fn is_port_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

/// A Kubernetes qualified name (`[prefix/]name`), as `appProtocol` must be.
fn is_app_protocol(a: &str) -> bool {
    let (prefix, name) = match a.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, a),
    };
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        && name.bytes().next().is_some_and(alnum)
        && name.bytes().last().is_some_and(alnum);
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

fn labels(of: &str, cluster: &str) -> serde_json::Value {
    json!({MIRROR_OF_LABEL: of, MIRROR_CLUSTER_LABEL: cluster, MANAGED_BY: MANAGER})
}

#[allow(clippy::too_many_arguments)]
fn service(
    ns: &str,
    mirror: &str,
    of: &str,
    cluster: &str,
    host: &str,
    ports: &Ports,
    ports_from: &str,
    settings: &MirrorSettings,
) -> Service {
    let ports: Vec<_> = ports
        .iter()
        .map(|p| {
            let mut j = json!({"name": p.name, "port": p.port, "protocol": "TCP", "targetPort": settings.outbound_port});
            if let Some(a) = &p.app_protocol {
                j["appProtocol"] = json!(a);
            }
            j
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": mirror,
            "namespace": ns,
            "labels": labels(of, cluster),
            "annotations": {MIRROR_HOST_ANNOTATION: host, PORTS_FROM_ANNOTATION: ports_from},
        },
        "spec": {"type": "ClusterIP", "ports": ports},
    }))
    .unwrap_or_default()
}

fn slice(
    ns: &str,
    mirror: &str,
    of: &str,
    ports: &Ports,
    ips: &[IpAddr],
    settings: &MirrorSettings,
) -> EndpointSlice {
    let v6 = ips.first().is_some_and(IpAddr::is_ipv6);
    let endpoints: Vec<_> = ips
        .iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let ports: Vec<_> = ports
        .iter()
        .map(|p| {
            let mut j = json!({"name": p.name, "port": settings.outbound_port, "protocol": "TCP"});
            if let Some(a) = &p.app_protocol {
                j["appProtocol"] = json!(a);
            }
            j
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{mirror}-meshfed"),
            "namespace": ns,
            "labels": {SERVICE_NAME_LABEL: mirror, SLICE_MANAGED_BY: SLICE_MANAGER, MIRROR_OF_LABEL: of},
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap_or_else(|_| EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        metadata: Default::default(),
        ports: None,
    })
}

/// Whether `current` already is what `want` asks for (the fields we set).
fn service_matches(current: &Service, want: &Service) -> bool {
    let norm = |s: &Service| {
        let ports: Vec<(Option<String>, i32, Option<String>, String)> = s
            .spec
            .iter()
            .flat_map(|sp| sp.ports.iter().flatten())
            .map(|p| {
                (
                    p.name.clone(),
                    p.port,
                    p.app_protocol.clone(),
                    p.target_port
                        .as_ref()
                        .map(|t| match t {
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => {
                                i.to_string()
                            }
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                s,
                            ) => s.clone(),
                        })
                        .unwrap_or_default(),
                )
            })
            .collect();
        let selector = s.spec.as_ref().and_then(|sp| sp.selector.clone());
        (ports, selector)
    };
    norm(current) == norm(want)
        && want
            .labels()
            .iter()
            .all(|(k, v)| current.labels().get(k) == Some(v))
        && want
            .annotations()
            .iter()
            .all(|(k, v)| current.annotations().get(k) == Some(v))
}

fn slice_matches(current: &EndpointSlice, want: &EndpointSlice) -> bool {
    let addrs = |s: &EndpointSlice| {
        let mut a: Vec<String> = s
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.clone())
            .collect();
        a.sort();
        a
    };
    let ports = |s: &EndpointSlice| {
        s.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port, p.app_protocol.clone()))
            .collect::<Vec<_>>()
    };
    current.address_type == want.address_type
        && addrs(current) == addrs(want)
        && ports(current) == ports(want)
        && want
            .labels()
            .iter()
            .all(|(k, v)| current.labels().get(k) == Some(v))
}

/// Connects Kubernetes discovery to the running gateway: the watched
/// namespaces follow each applied snapshot's, the in-cluster
/// ServiceExports gate this cluster's exports (with
/// `--kube-service-exports`), the Services' ports are announced with the
/// exports, and the mirror controller runs (with `--mirror-services`).
pub fn attach(
    state: &Arc<Gateway>,
    kube: &KubeDiscovery,
    settings: &crate::discovery::kube::KubeSettings,
    outbound_port: u16,
) {
    {
        let (state, watchers) = (state.clone(), kube.watchers.clone());
        let mut applied = state.applied_watch();
        let follow = move || {
            let active = state.active.load();
            watchers.set_named(&crate::discovery::kube::policy_namespaces(
                &active.snapshot.policy,
            ));
            state
                .watched_namespaces
                .store(watchers.watched().map(Arc::new));
        };
        follow();
        tokio::spawn(async move {
            while applied.changed().await.is_ok() {
                follow();
            }
        });
    }
    if let Some(mut exports) = kube.exports.clone() {
        let state = state.clone();
        state.export_gate.store(Some(exports.borrow().clone()));
        state.reannounce();
        tokio::spawn(async move {
            while exports.changed().await.is_ok() {
                let set = exports.borrow_and_update().clone();
                tracing::info!(services = set.len(), "in-cluster ServiceExports changed");
                state.export_gate.store(Some(set));
                state.reannounce();
            }
        });
    }
    // This cluster's Services' ports, announced with its exports.
    let mut ports = kube.service_ports.clone();
    state.service_ports.store(ports.borrow_and_update().clone());
    state.reannounce();
    let announcer = state.clone();
    tokio::spawn(async move {
        while ports.changed().await.is_ok() {
            let p = ports.borrow_and_update().clone();
            announcer.service_ports.store(p);
            announcer.reannounce();
        }
    });
    if let Some(target) = &settings.mirror_target {
        spawn(
            state.clone(),
            kube,
            MirrorSettings {
                target: target.clone(),
                outbound_port,
                default_ports: settings.mirror_ports.clone(),
            },
        );
    }
}

/// Starts the in-process mirror controller (`--mirror-services`): the
/// mirrors are made from this gateway's own view. It takes part in the
/// election of the cluster's one writer ([`lease`]) and writes only while
/// it holds the Lease, and nothing until a snapshot is applied: a gateway
/// waiting for its syncer must not garbage-collect every mirror. The
/// mirror controller process ([`controller`]) runs the same passes with a
/// view read from a gateway's admin API.
pub fn spawn(state: Arc<Gateway>, kube: &KubeDiscovery, settings: MirrorSettings) {
    let (client, shared) = (kube.client.clone(), kube.shared.clone());
    let (leader_tx, mut leader) = tokio::sync::watch::channel(false);
    tokio::spawn(lease::run(
        client.clone(),
        settings.target.1.clone(),
        lease::lease_name(&state.cluster),
        state.id.to_string(),
        leader_tx,
    ));
    tokio::spawn(async move {
        let mut stores = shared.subscribe();
        let mut endpoints = state.endpoints.clone();
        let mut memory = Memory::default();
        loop {
            if let Some(view) = GatewayView::of(&state, settings.outbound_port) {
                memory.saw(&view);
                // Not on partial stores (a gateway serving a persisted
                // endpoint set while the watchers have not listed yet).
                if *leader.borrow_and_update() && shared.with(Stores::mirrors_synced) {
                    reconcile(&view, &client, &shared, &settings, &mut memory).await;
                }
            }
            tokio::select! {
                r = stores.changed() => if r.is_err() { return },
                r = endpoints.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    });
}

/// What the controller keeps from one pass to the next.
#[derive(Debug, Default)]
pub struct Memory {
    /// Problems logged, so that each is logged once until it goes away.
    reported: BTreeSet<String>,
    /// (cluster, host) → the ports last announced: a link that drops, or a
    /// restart before the peers announce, must not turn a mirror's real
    /// ports back into the fallback (callers on the real port would hang).
    announced: BTreeMap<(String, String), Ports>,
    /// Every snapshot version this process has seen applied.
    applied_versions: BTreeSet<String>,
    /// Namespaces that are missing or terminating.
    skipped: namespaces::Skipped,
}

impl Memory {
    /// Records a view's snapshot as seen applied.
    pub fn saw(&mut self, view: &GatewayView) {
        if !self.applied_versions.contains(&view.applied.version) {
            self.applied_versions.insert(view.applied.version.clone());
        }
    }
}

/// The ports a Service declares.
fn ports_of(svc: &Service) -> Ports {
    svc.spec
        .iter()
        .flat_map(|sp| sp.ports.iter().flatten())
        .filter_map(|p| {
            Some(ServicePort {
                port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect()
}

/// Whether a mirror recorded as written by snapshot `recorded` may be
/// deleted by a gateway running `applied`, having applied `seen` since
/// start. A snapshot from the syncer or the policy directory is the newest
/// there is; one read from the state directory at start may be older than
/// the one another replica wrote the mirror with, so it deletes only what
/// a version it knows wrote.
pub fn may_delete(
    recorded: Option<&str>,
    applied: &crate::state::provenance::Applied,
    seen: &BTreeSet<String>,
) -> bool {
    use crate::state::provenance::Source;
    match recorded {
        None => true,
        Some(v) if v == applied.version || seen.contains(v) => true,
        Some(_) => !matches!(applied.source, Source::StateDir { .. }),
    }
}

/// The ready addresses of the gateway's outbound Service, from the
/// watchers' own objects: an endpoint whose pod is terminating (the slice
/// says `terminating`, or not `ready`, or the pod has a deletionTimestamp)
/// leaves the mirrors at the next pass, before the published endpoint set
/// would drop it. Only when no gateway pod is ready are those still
/// `serving` kept, so a last pod's drain keeps its callers.
pub(crate) fn gateway_addresses(
    s: &crate::discovery::kube::Stores,
    ns: &str,
    name: &str,
) -> Vec<IpAddr> {
    let mut ready = BTreeSet::new();
    let mut serving = BTreeSet::new();
    for sl in s.slices() {
        if sl.namespace().as_deref() != Some(ns)
            || sl.labels().get(SERVICE_NAME_LABEL).map(String::as_str) != Some(name)
        {
            continue;
        }
        for e in &sl.endpoints {
            let c = e.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let is_serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let deleting = e.target_ref.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("Pod")
                    && r.name
                        .as_deref()
                        .is_some_and(|p| s.pod_deleting(r.namespace.as_deref().unwrap_or(ns), p))
            });
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if is_ready && !terminating && !deleting {
                    ready.insert(ip);
                } else if is_serving {
                    serving.insert(ip);
                }
            }
        }
    }
    let chosen = if ready.is_empty() { serving } else { ready };
    chosen.into_iter().collect()
}

/// What one pass read from the watchers' stores.
struct Current {
    local_ports: BTreeMap<(String, String), Ports>,
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
    foreign: BTreeSet<(String, String)>,
    gateway_ips: Vec<IpAddr>,
}

fn read_current(shared: &Shared, settings: &MirrorSettings) -> Current {
    shared.with(|s| {
        let mut local_ports: BTreeMap<(String, String), Ports> = BTreeMap::new();
        let mut services: BTreeMap<(String, String), Service> = BTreeMap::new();
        let mut foreign: BTreeSet<(String, String)> = BTreeSet::new();
        for svc in s.services() {
            let key = (svc.namespace().unwrap_or_default(), svc.name_any());
            if svc.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGER)
                && svc.labels().contains_key(MIRROR_OF_LABEL)
            {
                services.insert(key, svc.clone());
                continue;
            }
            foreign.insert(key.clone());
            let ports = ports_of(svc);
            if ports.iter().any(|p| p.protocol == "TCP") {
                local_ports.insert(key, ports);
            }
        }
        let slices: BTreeMap<(String, String), EndpointSlice> = s
            .slices()
            .filter(|sl| {
                sl.labels().get(SLICE_MANAGED_BY).map(String::as_str) == Some(SLICE_MANAGER)
            })
            .map(|sl| {
                (
                    (sl.namespace().unwrap_or_default(), sl.name_any()),
                    sl.clone(),
                )
            })
            .collect();
        let (target_name, target_ns) = &settings.target;
        let gateway_ips = gateway_addresses(s, target_ns, target_name);
        Current {
            local_ports,
            services,
            slices,
            foreign,
            gateway_ips,
        }
    })
}

/// How one mirror's write went.
enum Written {
    /// Both objects are as desired (or were made so).
    Done,
    /// Its namespace is missing or terminating.
    Skipped(namespaces::Skip),
    /// Another failure, logged; retried on the next pass.
    Failed,
}

/// One pass: create, replace, delete, each mirror written concurrently
/// (at most [`WRITE_CONCURRENCY`] at once). Problems are logged once each
/// until they go away.
pub async fn reconcile(
    view: &GatewayView,
    client: &Client,
    shared: &Shared,
    settings: &MirrorSettings,
    memory: &mut Memory,
) {
    let applied = &view.applied;
    let cur = read_current(shared, settings);
    // Ports: what peers announce now, else what they announced before,
    // else (after a restart) what a mirror made from an announcement says.
    let exported: BTreeSet<&String> = view.exports.keys().collect();
    memory
        .announced
        .retain(|(_, host), _| exported.contains(host));
    memory.announced.extend(view.announced_map());
    for svc in cur.services.values() {
        let (Some(host), Some(cluster)) = (
            svc.annotations().get(MIRROR_HOST_ANNOTATION),
            svc.labels().get(MIRROR_CLUSTER_LABEL),
        ) else {
            continue;
        };
        if cluster != CLUSTERSET
            && exported.contains(host)
            && svc
                .annotations()
                .get(PORTS_FROM_ANNOTATION)
                .map(String::as_str)
                == Some("announcement")
        {
            memory
                .announced
                .entry((cluster.clone(), host.clone()))
                .or_insert_with(|| ports_of(svc));
        }
    }
    let sources = PortSources {
        announced: memory.announced.clone(),
        local: cur.local_ports.clone(),
    };
    let (want, problems) = desired(view, &sources, &cur.gateway_ips, settings);
    let mut now_reported = BTreeSet::new();
    let mut report = |p: String, reported: &BTreeSet<String>| {
        if !reported.contains(&p) {
            tracing::warn!(problem = %p, "mirror Service skipped");
        }
        now_reported.insert(p);
    };
    for p in problems {
        report(p, &memory.reported);
    }
    let wanted_ns: BTreeSet<String> = want.iter().map(|d| d.namespace.clone()).collect();
    memory.skipped.retain(|ns| wanted_ns.contains(ns));
    // A namespace whose objects are not all listed yet (just named by the
    // policy, or its watch failing): its mirrors are neither written (a
    // real Service of the same name may not be listed yet) nor deleted.
    let unlisted: BTreeSet<String> = shared.with(|s| {
        wanted_ns
            .iter()
            .filter(|ns| !s.namespace_synced(ns))
            .cloned()
            .collect()
    });
    let now = tokio::time::Instant::now();
    let mut keep_services = BTreeSet::new();
    let mut keep_slices = BTreeSet::new();
    let mut writes = Vec::new();
    for d in &want {
        let key = (d.namespace.clone(), d.name.clone());
        if unlisted.contains(&d.namespace) {
            keep_services.insert(key);
            keep_slices.insert((d.namespace.clone(), d.slice.name_any()));
            continue;
        }
        if cur.foreign.contains(&key) {
            report(
                format!(
                    "a Service {}/{} not managed by meshfed exists; no mirror is made under that name (the real Service wins)",
                    d.namespace, d.name
                ),
                &memory.reported,
            );
            continue;
        }
        keep_services.insert(key.clone());
        let slice_key = (d.namespace.clone(), d.slice.name_any());
        keep_slices.insert(slice_key.clone());
        let service_cur = cur.services.get(&key);
        let slice_cur = cur.slices.get(&slice_key);
        let in_sync = service_cur.is_some_and(|c| service_matches(c, &d.service))
            && slice_cur.is_some_and(|c| slice_matches(c, &d.slice));
        if in_sync || memory.skipped.waiting(&d.namespace, now) {
            continue;
        }
        writes.push(write_mirror(
            client,
            d,
            service_cur,
            slice_cur,
            &applied.version,
        ));
    }
    let results: Vec<(String, Written)> = futures_util::stream::iter(writes)
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect()
        .await;
    for (ns, written) in results {
        match written {
            Written::Done => memory.skipped.succeeded(&ns),
            Written::Skipped(why) => memory.skipped.failed(&ns, why, now),
            Written::Failed => {}
        }
    }

    // Garbage: ours, no longer desired, and not written by a snapshot this
    // gateway cannot tell to be older than its own.
    let mut deferred: BTreeSet<(String, String)> = BTreeSet::new();
    let mut deletes = Vec::new();
    for (key, svc) in cur
        .services
        .iter()
        .filter(|(k, _)| !keep_services.contains(*k))
    {
        let recorded = svc
            .annotations()
            .get(SNAPSHOT_ANNOTATION)
            .map(String::as_str);
        if !may_delete(recorded, applied, &memory.applied_versions) {
            report(
                format!(
                    "mirror Service {}/{} is kept: snapshot {} wrote it, and this gateway's snapshot {} was read from its state directory and may be older; it is deleted once a snapshot from the syncer says so",
                    key.0,
                    key.1,
                    recorded.unwrap_or(""),
                    applied.version
                ),
                &memory.reported,
            );
            deferred.insert(key.clone());
            continue;
        }
        deletes.push(delete(client, &key.0, &key.1, Stale::Service));
    }
    for ((ns, name), sl) in cur.slices.iter().filter(|(k, _)| !keep_slices.contains(*k)) {
        let of = sl
            .labels()
            .get(SERVICE_NAME_LABEL)
            .cloned()
            .unwrap_or_default();
        if deferred.contains(&(ns.clone(), of)) {
            continue;
        }
        deletes.push(delete(client, ns, name, Stale::Slice));
    }
    futures_util::stream::iter(deletes)
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    memory.reported = now_reported;
}

/// Which kind of stale mirror object.
#[derive(Debug, Clone, Copy)]
enum Stale {
    Service,
    Slice,
}

/// Deletes one stale mirror object (a 404 is success).
async fn delete(client: &Client, ns: &str, name: &str, kind: Stale) {
    let dp = DeleteParams::default();
    let r = match kind {
        Stale::Service => Api::<Service>::namespaced(client.clone(), ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
        Stale::Slice => Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
    };
    match r {
        Ok(()) => {
            if matches!(kind, Stale::Service) {
                tracing::info!(namespace = %ns, name = %name, "mirror Service deleted (its export is gone)");
            }
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => {
            tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot delete a stale mirror {kind:?}; retrying")
        }
    }
}

/// Creates or replaces one mirror's Service, then its EndpointSlice.
async fn write_mirror(
    client: &Client,
    d: &Desired,
    service_cur: Option<&Service>,
    slice_cur: Option<&EndpointSlice>,
    version: &str,
) -> (String, Written) {
    let ns = d.namespace.clone();
    let fail = |op: &str, kind: &str, e: &kube::Error| match namespaces::Skip::of(e) {
        Some(why) => Written::Skipped(why),
        None => {
            log_write_error(op, kind, d, e);
            Written::Failed
        }
    };
    let services: Api<Service> = Api::namespaced(client.clone(), &d.namespace);
    let mut want = d.service.clone();
    want.annotations_mut()
        .insert(SNAPSHOT_ANNOTATION.into(), version.into());
    let uid = match service_cur {
        None => match services.create(&PostParams::default(), &want).await {
            Ok(created) => {
                tracing::info!(namespace = %d.namespace, name = %d.name, "mirror Service created");
                created.uid()
            }
            Err(e) => return (ns, fail("create", "Service", &e)),
        },
        Some(cur) if !service_matches(cur, &d.service) => {
            let want = onto_service(cur, &want);
            match services
                .replace(&d.name, &PostParams::default(), &want)
                .await
            {
                Ok(replaced) => {
                    tracing::info!(namespace = %d.namespace, name = %d.name, "mirror Service updated");
                    replaced.uid()
                }
                Err(e) => return (ns, fail("update", "Service", &e)),
            }
        }
        Some(cur) => cur.uid(),
    };
    let mut slice = d.slice.clone();
    if let Some(uid) = uid {
        slice.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: d.name.clone(),
                uid,
                controller: Some(true),
                block_owner_deletion: None,
            },
        ]);
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &d.namespace);
    let written = match slice_cur {
        None => slices.create(&PostParams::default(), &slice).await.err(),
        Some(cur) if !slice_matches(cur, &slice) => {
            let slice = onto_slice(cur, &slice);
            let r = slices
                .replace(&slice.name_any(), &PostParams::default(), &slice)
                .await;
            if r.is_ok() {
                tracing::debug!(namespace = %d.namespace, name = %d.name, "mirror EndpointSlice updated");
            }
            r.err()
        }
        Some(_) => None,
    };
    match written {
        None => (ns, Written::Done),
        Some(e) => (ns, fail("write", "EndpointSlice", &e)),
    }
}

/// A PUT replaces the whole object, so an update starts from the current
/// one and sets only what the mirror owns: its labels and annotations
/// (others' stay), the type, ports and selector. What other controllers
/// or people added (a label, an annotation, a finalizer, `sessionAffinity`)
/// and what the API server assigned (`clusterIP`, `ipFamilies`) survive.
fn onto_service(cur: &Service, want: &Service) -> Service {
    let mut next = cur.clone();
    next.metadata.managed_fields = None;
    next.labels_mut().extend(want.labels().clone());
    next.annotations_mut().extend(want.annotations().clone());
    let spec = next.spec.get_or_insert_with(Default::default);
    if let Some(w) = &want.spec {
        spec.type_.clone_from(&w.type_);
        spec.ports.clone_from(&w.ports);
        spec.selector.clone_from(&w.selector);
    }
    next.status = None;
    next
}

/// The EndpointSlice's counterpart of [`onto_service`]: endpoints, ports,
/// our labels and our ownerReference are the mirror's; the rest is kept.
fn onto_slice(cur: &EndpointSlice, want: &EndpointSlice) -> EndpointSlice {
    let mut next = cur.clone();
    next.metadata.managed_fields = None;
    next.labels_mut().extend(want.labels().clone());
    next.endpoints.clone_from(&want.endpoints);
    next.ports.clone_from(&want.ports);
    if let Some(ours) = &want.metadata.owner_references {
        let mut refs: Vec<_> = cur
            .metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|r| !ours.iter().any(|o| o.kind == r.kind && o.name == r.name))
            .cloned()
            .collect();
        refs.extend(ours.iter().cloned());
        next.metadata.owner_references = Some(refs);
    }
    next
}

fn log_write_error(op: &str, kind: &str, d: &Desired, e: &kube::Error) {
    match e {
        kube::Error::Api(s) if s.code == 409 => {
            tracing::debug!(namespace = %d.namespace, name = %d.name, "mirror {kind} changed meanwhile; retrying")
        }
        kube::Error::Api(s) if s.code == 403 => tracing::warn!(
            namespace = %d.namespace, name = %d.name, error = %e,
            "cannot {op} the mirror {kind}: forbidden; the mirror controller's ServiceAccount (meshfed-mirror in deploy/base/rbac.yaml; the gateway's own, with --mirror-services) needs create/update/delete on services and endpointslices, and the ValidatingAdmissionPolicy lets it write only objects labelled as mirrors"
        ),
        _ => {
            tracing::warn!(namespace = %d.namespace, name = %d.name, error = %e, "cannot {op} the mirror {kind}; retrying")
        }
    }
}

#[cfg(test)]
mod tests;
