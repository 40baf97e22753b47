//! Mirror names: what `<name>-<cluster>` and `<name>-clusterset` mean to
//! routing. The outbound path tries them after real names (a real Service
//! of the same name always wins).
//!
//! Pure: the Kubernetes objects that make these names resolvable in a
//! cluster are the mirror reconciler's ([`crate::mirror`]), which imports
//! this, never the other way round.

use std::collections::BTreeMap;

use meshfed_policy::snapshot::{CLUSTER_LABEL, ClusterPolicy};

use super::{Active, RequestInfo, Target, split_authority};
use crate::endpoints::EndpointSet;

/// The suffix of federated mirrors.
pub const CLUSTERSET: &str = "clusterset";
/// What a mirror name means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alias {
    /// `<name>-clusterset`: the service itself (canonical host).
    ClusterSet(String),
    /// `<name>-<cluster>`: the service (canonical host) in that cluster.
    Cluster(String, String),
}

/// The mirror meaning of an authority, if it names a mirror of an exported
/// service. Callers try real names first.
pub fn alias(policy: &ClusterPolicy, authority: &str, caller_namespace: &str) -> Option<Alias> {
    let suffix = format!(".svc.{}", policy.domain);
    for candidate in policy.host_candidates(authority, caller_namespace) {
        let Some(stem) = candidate.strip_suffix(&suffix) else {
            continue;
        };
        let Some((name, ns)) = stem.split_once('.') else {
            continue;
        };
        let host = |base: &str| format!("{base}.{ns}{suffix}");
        if let Some(base) = name.strip_suffix(&format!("-{CLUSTERSET}"))
            && policy.exports.contains_key(&host(base))
        {
            return Some(Alias::ClusterSet(host(base)));
        }
        for cluster in policy.clusters.keys() {
            if let Some(base) = name.strip_suffix(&format!("-{cluster}"))
                && policy
                    .exports
                    .get(&host(base))
                    .is_some_and(|c| c.contains(cluster))
            {
                return Some(Alias::Cluster(host(base), cluster.clone()));
            }
        }
    }
    None
}

fn pinned(service: String, cluster: String, port: u16) -> Target {
    Target {
        service,
        port,
        subset: None,
        selector: BTreeMap::from([(CLUSTER_LABEL.to_string(), cluster)]),
        rule: None,
        failed_over_from: None,
        destination: None,
    }
}

/// Routes an HTTP request addressed to a mirror name.
pub fn http_target(
    active: &Active,
    req: &RequestInfo<'_>,
    local: &EndpointSet,
    default_port: u16,
) -> Option<Target> {
    let (host, port) = split_authority(req.authority, default_port);
    match alias(&active.snapshot.policy, host, req.caller_namespace)? {
        Alias::ClusterSet(service) => {
            let authority = format!("{service}:{port}");
            let info = RequestInfo {
                authority: &authority,
                ..*req
            };
            super::http_target(active, &info, local, default_port)
        }
        Alias::Cluster(service, cluster) => Some(pinned(service, cluster, port)),
    }
}

/// Routes a TCP connection addressed to a mirror name.
pub fn tcp_target(
    active: &Active,
    host: &str,
    port: u16,
    caller_namespace: &str,
    local: &EndpointSet,
) -> Option<Target> {
    match alias(&active.snapshot.policy, host, caller_namespace)? {
        Alias::ClusterSet(service) => {
            super::tcp_target(active, &service, port, caller_namespace, local)
        }
        Alias::Cluster(service, cluster) => Some(pinned(service, cluster, port)),
    }
}
