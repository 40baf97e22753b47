//! PeerAuthentication at the outbound listener: whether a local caller may
//! reach a destination in plaintext, with mutual TLS, or both.
//!
//! In Istio a PeerAuthentication is the *receiving* workload's policy: it
//! says what that workload accepts. A local caller of the outbound listener
//! is on its way to a destination service, so the policy that decides is the
//! destination's, resolved as Istio resolves it: the workload-level policy
//! (a `selector` in the destination service's namespace matching the labels
//! of the destination's endpoints) wins over the namespace's, which wins over
//! the mesh's (root namespace); UNSET inherits (resolved by the compiler),
//! and with no policy at all the mode is PERMISSIVE. A `portLevelMtls`
//! entry applies when it names the port the caller dialed (the service port:
//! the source gateway does not know the endpoint's port).
//!
//! - STRICT: only callers that presented a workload certificate (mutual TLS
//!   on the outbound listener, `--outbound-tls mutual`) get through;
//!   plaintext callers are answered `403` with `x-meshfed-error:
//!   mtls-required` (TCP: the connection is closed) and counted.
//! - PERMISSIVE: both.
//! - DISABLE: plaintext only; an mTLS caller gets `403` /
//!   `mtls-disabled`.
//!
//! The destination's labels are those of its endpoints that fit the chosen
//! subset: local ones from discovery and remote ones from peers'
//! announcements. When they carry different modes (a workload policy selects
//! some endpoints only), the strictest wins, so that a caller is never let
//! through to an endpoint that would refuse it. Two workload policies that
//! select the same endpoints also resolve to the stricter (Istio picks the
//! oldest; meshfed fails closed).
//!
//! The decision only ([`decide`]): the data path counts a refusal and
//! answers it (`crate::proxy::admission`, [`Refused::response`] in
//! [`crate::respond`]).
//!
//! This module does not own TLS itself (the listener in
//! [`crate::proxy::outbound`] terminates it and verifies the workload
//! certificate), nor links between gateways, which are always mutual TLS
//! whatever the policy says, nor authorization ([`crate::authz`]).

use std::collections::BTreeMap;

use std::sync::Arc;

use meshfed_policy::snapshot::{ClusterPolicy, MtlsMode, MtlsPolicy};

use crate::endpoints::EndpointSet;
use crate::wire::announce::Announcement;

/// The mode that applies to a destination, and which policy level said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub mode: MtlsMode,
    /// `mesh`, `namespace <ns>` or `PeerAuthentication <ns>/<name>`.
    pub from: String,
}

/// Resolves the mode for a destination in `namespace` whose endpoints carry
/// `label_sets`, dialed on `port`.
pub fn effective<'a>(
    policy: &MtlsPolicy,
    namespace: Option<&str>,
    label_sets: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
    port: u16,
) -> Effective {
    let inherited = match namespace.and_then(|ns| policy.namespaces.get(ns)) {
        Some(m) => Effective {
            mode: *m,
            from: format!("namespace {}", namespace.unwrap_or_default()),
        },
        None => Effective {
            mode: policy.mesh,
            from: "mesh".into(),
        },
    };
    let Some(ns) = namespace else {
        return inherited;
    };
    let workloads: Vec<_> = policy
        .workloads
        .iter()
        .filter(|w| w.namespace == ns)
        .collect();
    if workloads.is_empty() {
        return inherited;
    }
    let mut strictest: Option<Effective> = None;
    for labels in label_sets {
        let this = workloads
            .iter()
            .filter(|w| w.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|w| Effective {
                mode: w.ports.get(&port).copied().unwrap_or(w.mode),
                from: format!(
                    "PeerAuthentication {}/{}",
                    w.source.namespace, w.source.name
                ),
            })
            .max_by_key(|e| e.mode)
            .unwrap_or_else(|| inherited.clone());
        if strictest.as_ref().is_none_or(|s| this.mode > s.mode) {
            strictest = Some(this);
        }
    }
    strictest.unwrap_or(inherited)
}

/// A caller refused by PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `mtls-required` or `mtls-disabled`: the metric and header reason.
    pub reason: &'static str,
    pub message: String,
}

/// The endpoints whose labels may decide a destination's mode: this
/// cluster's (discovery) and the peers' (their announcements). Read only
/// when a workload-level policy makes labels matter.
pub type Endpoints = (Arc<EndpointSet>, Vec<(String, Arc<Announcement>)>);

/// Decides whether a local caller (`mtls`: it presented a workload
/// certificate) may reach `service` (canonical host) on `port`, through the
/// endpoints that `selector` picks. Logs a refusal; the caller counts it
/// and answers it ([`Refused::response`]).
pub fn decide(
    policy: &ClusterPolicy,
    endpoints: impl FnOnce() -> Endpoints,
    mtls: bool,
    service: &str,
    selector: &BTreeMap<String, String>,
    port: u16,
) -> Result<(), Refused> {
    let namespace = crate::authz::service_namespace(policy, service);
    let needs_labels =
        namespace.is_some_and(|ns| policy.mtls.workloads.iter().any(|w| w.namespace == ns));
    let eff = if needs_labels {
        let (local, remote) = endpoints();
        let fits =
            |l: &&BTreeMap<String, String>| selector.iter().all(|(k, v)| l.get(k) == Some(v));
        let sets = local
            .get(service)
            .into_iter()
            .flatten()
            .map(|e| &e.labels)
            .chain(
                remote
                    .iter()
                    .filter_map(|(_, a)| a.services.get(service))
                    .flatten()
                    .map(|g| &g.labels),
            )
            .filter(fits);
        effective(&policy.mtls, namespace, sets, port)
    } else {
        effective(&policy.mtls, namespace, std::iter::empty(), port)
    };
    let refused = match (eff.mode, mtls) {
        (MtlsMode::Strict, false) => Some(Refused {
            reason: "mtls-required",
            message: format!(
                "{service} requires mutual TLS (STRICT, from {}); connect to the outbound \
                 listener with TLS and a workload certificate (the gateway runs with \
                 --outbound-tls mutual)",
                eff.from
            ),
        }),
        (MtlsMode::Disable, true) => Some(Refused {
            reason: "mtls-disabled",
            message: format!(
                "{service} accepts plaintext callers only (DISABLE, from {}); call it without TLS",
                eff.from
            ),
        }),
        _ => None,
    };
    match refused {
        None => Ok(()),
        Some(r) => {
            tracing::info!(%service, port, reason = r.reason, policy = %eff.from, "local caller refused by PeerAuthentication");
            Err(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use meshfed_policy::snapshot::{SourceRef, WorkloadMtls};

    use super::*;
    use crate::respond::ERROR_HEADER;

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn workload(ns: &str, name: &str, sel: &[(&str, &str)], mode: MtlsMode) -> WorkloadMtls {
        WorkloadMtls {
            source: SourceRef {
                kind: "PeerAuthentication".into(),
                namespace: ns.into(),
                name: name.into(),
            },
            namespace: ns.into(),
            selector: labels(sel),
            mode,
            ports: BTreeMap::new(),
        }
    }

    #[test]
    fn the_most_specific_level_wins() {
        let mut p = MtlsPolicy {
            mesh: MtlsMode::Strict,
            ..Default::default()
        };
        let v1 = labels(&[("app", "reviews"), ("version", "v1")]);
        let v2 = labels(&[("app", "reviews"), ("version", "v2")]);
        assert_eq!(
            effective(&p, Some("default"), [&v1], 80).mode,
            MtlsMode::Strict
        );
        assert_eq!(effective(&p, None, [&v1], 80).mode, MtlsMode::Strict);
        p.namespaces.insert("default".into(), MtlsMode::Permissive);
        let e = effective(&p, Some("default"), [&v1], 80);
        assert_eq!(e.mode, MtlsMode::Permissive);
        assert_eq!(e.from, "namespace default");
        assert_eq!(
            effective(&p, Some("other"), [&v1], 80).mode,
            MtlsMode::Strict
        );
        let mut w = workload("default", "v1-off", &[("version", "v1")], MtlsMode::Disable);
        w.ports.insert(9443, MtlsMode::Strict);
        p.workloads.push(w);
        let e = effective(&p, Some("default"), [&v1], 80);
        assert_eq!(e.mode, MtlsMode::Disable);
        assert_eq!(e.from, "PeerAuthentication default/v1-off");
        assert_eq!(
            effective(&p, Some("default"), [&v1], 9443).mode,
            MtlsMode::Strict
        );
        // v2 is not selected: the namespace's mode.
        assert_eq!(
            effective(&p, Some("default"), [&v2], 80).mode,
            MtlsMode::Permissive
        );
        // Both kinds of endpoint: the strictest.
        assert_eq!(
            effective(&p, Some("default"), [&v1, &v2], 80).mode,
            MtlsMode::Permissive
        );
        // No endpoint known: the namespace's.
        assert_eq!(
            effective(&p, Some("default"), std::iter::empty(), 80).mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn nothing_configured_is_permissive() {
        let p = MtlsPolicy::default();
        assert_eq!(
            effective(&p, Some("default"), [], 80).mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn refusals_are_403_with_a_reason_or_grpc_unauthenticated() {
        let r = Refused {
            reason: "mtls-required",
            message: "x requires mutual TLS".into(),
        };
        let resp = r.response(false);
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()[ERROR_HEADER], "mtls-required");
        let resp = r.response(true);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "16");
    }
}
