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
//! Ports: those of a same-named Service in this cluster (namespace sameness,
//! as in Istio multi-cluster), else `--mirror-ports` (default 80). HTTP,
//! gRPC and TLS with SNI work through the shared outbound port; opaque TCP
//! needs `--tcp-port-map`.
//!
//! Ownership and garbage collection: the gateway owns exactly the Services
//! labelled [`MANAGED_BY`]=`meshfed-gateway` with [`MIRROR_OF_LABEL`], and the
//! EndpointSlices labelled `endpointslice.kubernetes.io/managed-by:
//! meshfed.io/mirror`. Every reconcile (on a change of the stores, the
//! snapshot or the gateway's endpoints, and every second) creates what is
//! missing, replaces what differs and deletes what is no longer desired: a
//! mirror disappears when the export does. Slices also carry an
//! ownerReference to their Service so that Kubernetes' garbage collector
//! removes them if the gateway does not. All replicas compute the same
//! desired state; a conflict (409) is retried on the next pass.
//!
//! It is a side task beside the data path: nothing below the wiring
//! imports it. It does not own discovery ([`crate::discovery::kube`]
//! supplies the client and the watched objects) or what a mirror name
//! means to routing ([`crate::route::mirror_names`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use meshfed_policy::snapshot::ClusterPolicy;
use serde_json::json;

pub use crate::discovery::kube::MIRROR_OF_LABEL;
use crate::discovery::kube::{KubeDiscovery, SERVICE_NAME_LABEL, Shared};
use crate::route::mirror_names::CLUSTERSET;
use crate::state::Gateway;

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
    /// Only these namespaces (empty: all).
    pub namespaces: Vec<String>,
}

/// One mirror: its Service and its EndpointSlice, as desired.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub namespace: String,
    pub name: String,
    pub service: Service,
    pub slice: EndpointSlice,
}

/// The (name, port) pairs of a service port list.
type Ports = Vec<(String, u16)>;

/// The mirrors `policy` asks for. `local_ports`: the TCP ports of the
/// same-named local Services; `gateway_ips`: the ready addresses of the
/// gateway's outbound Service.
pub fn desired(
    policy: &ClusterPolicy,
    local_ports: &BTreeMap<(String, String), Ports>,
    gateway_ips: &[IpAddr],
    settings: &MirrorSettings,
) -> (Vec<Desired>, Vec<String>) {
    let suffix = format!(".svc.{}", policy.domain);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (host, clusters) in &policy.exports {
        let Some((name, ns)) = host.strip_suffix(&suffix).and_then(|s| s.split_once('.')) else {
            continue;
        };
        if !settings.namespaces.is_empty() && !settings.namespaces.iter().any(|n| n == ns) {
            continue;
        }
        let remote: Vec<&String> = clusters.iter().filter(|c| **c != policy.cluster).collect();
        if remote.is_empty() {
            continue;
        }
        let ports = local_ports
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_else(|| {
                settings
                    .default_ports
                    .iter()
                    .map(|p| (format!("port-{p}"), *p))
                    .collect()
            });
        let mut names: Vec<(String, &str)> = remote
            .iter()
            .map(|c| (format!("{name}-{c}"), c.as_str()))
            .collect();
        names.push((format!("{name}-{CLUSTERSET}"), CLUSTERSET));
        for (mirror, cluster) in names {
            if mirror.len() > 63 {
                problems.push(format!(
                    "no mirror for {host} from {cluster}: `{mirror}` is longer than 63 characters (a Service name is a DNS label)"
                ));
                continue;
            }
            out.push(Desired {
                namespace: ns.to_string(),
                name: mirror.clone(),
                service: service(ns, &mirror, name, cluster, host, &ports, settings),
                slice: slice(ns, &mirror, name, &ports, gateway_ips, settings),
            });
        }
    }
    (out, problems)
}

fn labels(of: &str, cluster: &str) -> serde_json::Value {
    json!({MIRROR_OF_LABEL: of, MIRROR_CLUSTER_LABEL: cluster, MANAGED_BY: MANAGER})
}

fn service(
    ns: &str,
    mirror: &str,
    of: &str,
    cluster: &str,
    host: &str,
    ports: &Ports,
    settings: &MirrorSettings,
) -> Service {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": settings.outbound_port}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": mirror,
            "namespace": ns,
            "labels": labels(of, cluster),
            "annotations": {"meshfed.io/mirror-host": host},
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
        .map(|(n, _)| json!({"name": n, "port": settings.outbound_port, "protocol": "TCP"}))
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
        let ports: Vec<(Option<String>, i32, String)> = s
            .spec
            .iter()
            .flat_map(|sp| sp.ports.iter().flatten())
            .map(|p| {
                (
                    p.name.clone(),
                    p.port,
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
            .map(|p| (p.name.clone(), p.port))
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

/// Connects Kubernetes discovery to the running gateway: the in-cluster
/// ServiceExports gate this cluster's exports (with
/// `--kube-service-exports`), and the mirror controller runs (with
/// `--mirror-services`).
pub fn attach(
    state: &Arc<Gateway>,
    kube: &KubeDiscovery,
    settings: &crate::discovery::kube::KubeSettings,
    outbound_port: u16,
) {
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
    if let Some(target) = &settings.mirror_target {
        spawn(
            state.clone(),
            kube,
            MirrorSettings {
                target: target.clone(),
                outbound_port,
                default_ports: settings.mirror_ports.clone(),
                namespaces: settings.namespaces.clone(),
            },
        );
    }
}

/// Starts the mirror controller. It writes nothing until a snapshot is
/// applied: a gateway waiting for its syncer must not garbage-collect every
/// mirror.
pub fn spawn(state: Arc<Gateway>, kube: &KubeDiscovery, settings: MirrorSettings) {
    let (client, shared) = (kube.client.clone(), kube.shared.clone());
    tokio::spawn(async move {
        let mut stores = shared.subscribe();
        let mut endpoints = state.endpoints.clone();
        let mut reported: BTreeSet<String> = BTreeSet::new();
        loop {
            if state.provenance.current().is_some() {
                reconcile(&state, &client, &shared, &settings, &mut reported).await;
            }
            tokio::select! {
                r = stores.changed() => if r.is_err() { return },
                r = endpoints.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    });
}

/// One pass: create, replace, delete. Problems are logged once each until
/// they go away.
async fn reconcile(
    state: &Gateway,
    client: &Client,
    shared: &Shared,
    settings: &MirrorSettings,
    reported: &mut BTreeSet<String>,
) {
    let active = state.active.load_full();
    let policy = &active.snapshot.policy;
    let (target_name, target_ns) = &settings.target;
    let target_host = format!("{target_name}.{target_ns}.svc.{}", policy.domain);
    let gateway_ips: Vec<IpAddr> = {
        let set = state.endpoints.borrow();
        let mut ips: Vec<IpAddr> = crate::endpoints::healthy(&set, &target_host, &BTreeMap::new())
            .into_iter()
            .map(|e| e.addr.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    };
    // The current state, from the watchers' stores.
    let (local_ports, current_services, current_slices, foreign) = shared.with(|s| {
        let mut local_ports: BTreeMap<(String, String), Ports> = BTreeMap::new();
        let mut current_services: BTreeMap<(String, String), Service> = BTreeMap::new();
        let mut foreign: BTreeSet<(String, String)> = BTreeSet::new();
        for svc in s.services() {
            let key = (svc.namespace().unwrap_or_default(), svc.name_any());
            if svc.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGER)
                && svc.labels().contains_key(MIRROR_OF_LABEL)
            {
                current_services.insert(key, svc.clone());
                continue;
            }
            foreign.insert(key.clone());
            let ports: Ports = svc
                .spec
                .iter()
                .flat_map(|sp| sp.ports.iter().flatten())
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok()?;
                    Some((
                        p.name.clone().unwrap_or_else(|| format!("port-{port}")),
                        port,
                    ))
                })
                .collect();
            if !ports.is_empty() {
                local_ports.insert(key, ports);
            }
        }
        let current_slices: BTreeMap<(String, String), EndpointSlice> = s
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
        (local_ports, current_services, current_slices, foreign)
    });
    let (want, problems) = desired(policy, &local_ports, &gateway_ips, settings);
    let mut now_reported = BTreeSet::new();
    for p in problems {
        if !reported.contains(&p) {
            tracing::warn!(problem = %p, "mirror Service skipped");
        }
        now_reported.insert(p);
    }
    let mut keep_services = BTreeSet::new();
    let mut keep_slices = BTreeSet::new();
    for d in &want {
        let key = (d.namespace.clone(), d.name.clone());
        if foreign.contains(&key) {
            let p = format!(
                "a Service {}/{} not managed by meshfed exists; no mirror is made under that name (the real Service wins)",
                d.namespace, d.name
            );
            if !reported.contains(&p) {
                tracing::warn!(problem = %p, "mirror Service skipped");
            }
            now_reported.insert(p);
            continue;
        }
        keep_services.insert(key.clone());
        let services: Api<Service> = Api::namespaced(client.clone(), &d.namespace);
        let uid = match current_services.get(&key) {
            None => match services.create(&PostParams::default(), &d.service).await {
                Ok(created) => {
                    tracing::info!(namespace = %d.namespace, name = %d.name, "mirror Service created");
                    created.uid()
                }
                Err(e) => {
                    log_write_error("create", "service", d, &e);
                    continue;
                }
            },
            Some(cur) if !service_matches(cur, &d.service) => {
                let mut next = d.service.clone();
                next.metadata.resource_version = cur.resource_version();
                // Keep what the API server assigned.
                if let (Some(spec), Some(cur_spec)) = (next.spec.as_mut(), cur.spec.as_ref()) {
                    spec.cluster_ip = cur_spec.cluster_ip.clone();
                    spec.cluster_ips = cur_spec.cluster_ips.clone();
                }
                match services
                    .replace(&d.name, &PostParams::default(), &next)
                    .await
                {
                    Ok(replaced) => {
                        tracing::info!(namespace = %d.namespace, name = %d.name, "mirror Service updated");
                        replaced.uid()
                    }
                    Err(e) => {
                        log_write_error("update", "service", d, &e);
                        continue;
                    }
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
        let slice_key = (d.namespace.clone(), slice.name_any());
        keep_slices.insert(slice_key.clone());
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &d.namespace);
        match current_slices.get(&slice_key) {
            None => {
                if let Err(e) = slices.create(&PostParams::default(), &slice).await {
                    log_write_error("create", "endpointslice", d, &e);
                }
            }
            Some(cur) if !slice_matches(cur, &slice) => {
                slice.metadata.resource_version = cur.resource_version();
                match slices
                    .replace(&slice.name_any(), &PostParams::default(), &slice)
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(namespace = %d.namespace, name = %d.name, "mirror EndpointSlice updated")
                    }
                    Err(e) => log_write_error("update", "endpointslice", d, &e),
                }
            }
            Some(_) => {}
        }
    }
    // Garbage: ours, no longer desired.
    for ((ns, name), _) in current_slices
        .iter()
        .filter(|(k, _)| !keep_slices.contains(*k))
    {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        match slices.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot delete a stale mirror EndpointSlice; retrying")
            }
        }
    }
    for ((ns, name), _) in current_services
        .iter()
        .filter(|(k, _)| !keep_services.contains(*k))
    {
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        match services.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, name = %name, "mirror Service deleted (its export is gone)")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot delete a stale mirror Service; retrying")
            }
        }
    }
    *reported = now_reported;
}

fn log_write_error(op: &str, kind: &str, d: &Desired, e: &kube::Error) {
    match e {
        kube::Error::Api(s) if s.code == 409 => {
            tracing::debug!(namespace = %d.namespace, name = %d.name, "mirror {kind} changed meanwhile (another replica?); retrying")
        }
        kube::Error::Api(s) if s.code == 403 => tracing::warn!(
            namespace = %d.namespace, name = %d.name, error = %e,
            "cannot {op} the mirror {kind}: forbidden; the gateway's ServiceAccount needs create/update/delete on services and endpointslices (deploy/base/rbac.yaml)"
        ),
        _ => {
            tracing::warn!(namespace = %d.namespace, name = %d.name, error = %e, "cannot {op} the mirror {kind}; retrying")
        }
    }
}

#[cfg(test)]
mod tests;
