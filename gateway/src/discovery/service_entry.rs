//! ServiceEntry endpoints: hosts the mesh does not discover (an external
//! API, a database outside Kubernetes), declared in policy.
//!
//! The snapshot's `service_entries` become endpoints of this cluster,
//! merged into the [`EndpointSet`] that routing, the balancer, outlier
//! detection, endpoint TLS and authorization already read. A ServiceEntry
//! host is therefore served like a local service: VirtualService rules
//! (timeouts, retries, faults, splits) and DestinationRules (load balancer,
//! connection pool, outlier detection, `tls` origination) apply to it as
//! they do to a mesh service. An edge gateway with no discovery at all
//! reaches an external API this way.
//!
//! Resolution, per ServiceEntry:
//! - `STATIC`: the endpoints' IP addresses (validation requires IPs).
//! - `DNS`, `DNS_ROUND_ROBIN`: each endpoint address, or the hosts
//!   themselves when no endpoint is listed, resolved with the shared
//!   resolver ([`super::dns::Resolver::shared`]: `/etc/hosts` and
//!   `/etc/resolv.conf`, asked again when the TTL runs out, last addresses
//!   kept for the grace period when a name stops resolving). Every address
//!   is an endpoint; `DNS_ROUND_ROBIN` is balanced the same way.
//! - `NONE`: callers address this gateway as a proxy, so there is no
//!   original destination to pass through to; the gateway resolves the
//!   host the caller named (or the listed endpoints) as `DNS` does, which is
//!   what the caller itself would have connected to.
//!
//! Ports: each service port gets the endpoint's `ports[<port name>]`, else
//! the port's `targetPort`, else its number. When an entry has more than one
//! port, each endpoint carries [`PORT_LABEL`] with the service port it
//! serves, and the balancer only picks endpoints of the requested port
//! ([`for_port`]).
//!
//! Location: `MESH_EXTERNAL` and `MESH_INTERNAL` endpoints are both served
//! from this cluster; a `MESH_INTERNAL` host is a mesh service of this
//! cluster, so a ServiceExport of it is announced to peers like any other
//! (an external host is never exported: exports name Kubernetes services).
//!
//! Not supported: wildcard hosts (`*.example.com`) get no endpoints (a call
//! is answered `no-healthy-endpoint`), as do `unix://` endpoints (refused by
//! validation). `exportTo` is not enforced (validation warns); the
//! `meshfed.io/clusters` annotation targets clusters.
//!
//! It does not own the resolver ([`super::dns`]) or the discovery sources.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshfed_policy::Snapshot;
use meshfed_policy::snapshot::{ClusterPolicy, Resolution, ServiceEntry};
use tokio::sync::watch;

use super::dns::Resolver;
use crate::endpoints::{CLUSTER_LABEL, Endpoint, EndpointSet};

/// The label that names the service port an endpoint of a multi-port
/// ServiceEntry serves.
pub const PORT_LABEL: &str = "meshfed.io/service-port";

/// How often names are re-resolved (the resolver answers from its table
/// until their TTL runs out, so this queries no more than the TTLs ask).
pub const REFRESH: Duration = super::dns::MIN_REFRESH;

/// The endpoints of every ServiceEntry of `policy` in `cluster`, and one
/// message per name that did not resolve.
pub async fn endpoints(
    policy: &ClusterPolicy,
    cluster: &str,
    resolver: &Resolver,
) -> (EndpointSet, Vec<String>) {
    let mut set = EndpointSet::new();
    let mut errors = Vec::new();
    for (host, entry) in &policy.service_entries {
        if host.starts_with('*') {
            continue;
        }
        let eps = entry_endpoints(host, entry, cluster, resolver, &mut errors).await;
        set.entry(host.clone()).or_default().extend(eps);
    }
    (set, errors)
}

/// An address to resolve, with its port names and labels.
type Listed<'a> = (
    &'a str,
    &'a BTreeMap<String, u16>,
    &'a BTreeMap<String, String>,
);

async fn entry_endpoints(
    host: &str,
    entry: &ServiceEntry,
    cluster: &str,
    resolver: &Resolver,
    errors: &mut Vec<String>,
) -> Vec<Endpoint> {
    let listed: Vec<Listed<'_>> = if entry.endpoints.is_empty() {
        match entry.resolution {
            // Validation requires endpoints for STATIC.
            Resolution::Static => Vec::new(),
            _ => {
                static NONE: BTreeMap<String, u16> = BTreeMap::new();
                static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
                vec![(host, &NONE, &NO_LABELS)]
            }
        }
    } else {
        entry
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), &e.ports, &e.labels))
            .collect()
    };
    let multi = entry.ports.len() > 1;
    let mut out = Vec::new();
    for (address, ports, labels) in listed {
        for sp in &entry.ports {
            let port = ports
                .get(&sp.name)
                .copied()
                .or(sp.target_port)
                .unwrap_or(sp.number);
            let addrs = match address.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => match resolver
                    .resolve_host_port(&format!("{address}:{port}"))
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        errors.push(format!(
                            "ServiceEntry {} host `{host}`: endpoint `{address}`: {e}",
                            entry.source.key()
                        ));
                        continue;
                    }
                },
            };
            for addr in addrs {
                let mut l = labels.clone();
                l.insert(CLUSTER_LABEL.to_string(), cluster.to_string());
                if multi {
                    l.insert(PORT_LABEL.to_string(), sp.number.to_string());
                }
                out.push(Endpoint {
                    addr,
                    labels: l,
                    healthy: true,
                });
            }
        }
    }
    out
}

/// Whether `e` serves service port `port`: endpoints without
/// [`PORT_LABEL`] serve every port.
pub fn for_port(e: &Endpoint, port: u16) -> bool {
    e.labels
        .get(PORT_LABEL)
        .is_none_or(|p| p.parse::<u16>().ok() == Some(port))
}

/// `discovered` with `entries` added (a host both discovered and declared
/// gets both endpoint lists). Without entries it is `discovered` itself,
/// shared, not a copy: a large cluster's set is tens of MB.
pub fn merge(discovered: &Arc<EndpointSet>, entries: EndpointSet) -> Arc<EndpointSet> {
    if entries.is_empty() {
        return discovered.clone();
    }
    let mut merged = (**discovered).clone();
    for (host, eps) in entries {
        merged.entry(host).or_default().extend(eps);
    }
    Arc::new(merged)
}

/// Publishes discovery's endpoints merged with the active snapshot's
/// ServiceEntry endpoints on `tx`: again when discovery changes, when a
/// snapshot is applied, and every [`REFRESH`] while an entry needs DNS.
/// Resolution failures are logged when they start and when they end.
///
/// `snapshot` reads the active snapshot, and `applied` changes after each
/// snapshot is applied (the gateway's state hands both over; discovery
/// never depends on it).
pub fn spawn(
    cluster: String,
    snapshot: impl Fn() -> Arc<Snapshot> + Send + 'static,
    mut applied: watch::Receiver<u64>,
    mut discovered: watch::Receiver<Arc<EndpointSet>>,
    tx: watch::Sender<Arc<EndpointSet>>,
) {
    tokio::spawn(async move {
        let mut reported: BTreeSet<String> = BTreeSet::new();
        loop {
            let current = snapshot();
            let policy = &current.policy;
            let (entries, errors) = endpoints(policy, &cluster, Resolver::shared()).await;
            let errors: BTreeSet<String> = errors.into_iter().collect();
            for e in errors.difference(&reported) {
                tracing::warn!(error = %e, "ServiceEntry endpoint does not resolve; it has no endpoint until it does");
            }
            for e in reported.difference(&errors) {
                tracing::info!(was = %e, "ServiceEntry endpoint resolves again");
            }
            reported = errors;
            let merged = merge(&discovered.borrow_and_update(), entries);
            tx.send_if_modified(|cur| {
                if Arc::ptr_eq(cur, &merged) || **cur == *merged {
                    false
                } else {
                    *cur = merged;
                    true
                }
            });
            let needs_dns = policy.service_entries.values().any(|e| {
                e.resolution != Resolution::Static
                    || e.endpoints
                        .iter()
                        .any(|ep| ep.address.parse::<IpAddr>().is_err())
            });
            let refresh = async {
                if needs_dns {
                    tokio::time::sleep(REFRESH).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                r = discovered.changed() => if r.is_err() { return },
                r = applied.changed() => if r.is_err() { return },
                () = refresh => {}
                () = tx.closed() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use meshfed_policy::snapshot::{Endpoint as SeEndpoint, ServicePort};

    use super::*;

    fn entry(
        resolution: Resolution,
        ports: &[(u16, &str)],
        eps: &[(&str, &[(&str, u16)])],
    ) -> ServiceEntry {
        ServiceEntry {
            resolution,
            ports: ports
                .iter()
                .map(|(n, name)| ServicePort {
                    number: *n,
                    protocol: "HTTP".into(),
                    name: name.to_string(),
                    target_port: None,
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|(a, p)| SeEndpoint {
                    address: a.to_string(),
                    ports: p.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn policy(entries: &[(&str, ServiceEntry)]) -> ClusterPolicy {
        ClusterPolicy {
            service_entries: entries
                .iter()
                .map(|(h, e)| (h.to_string(), e.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn static_endpoints_take_the_named_port_else_the_service_port() {
        let p = policy(&[(
            "api.example.com",
            entry(
                Resolution::Static,
                &[(80, "http")],
                &[("10.0.0.1", &[("http", 8080)]), ("10.0.0.2", &[])],
            ),
        )]);
        let r = Resolver::shared();
        let (set, errors) = endpoints(&p, "edge", r).await;
        assert!(errors.is_empty(), "{errors:?}");
        let addrs: Vec<String> = set["api.example.com"]
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:80"]);
        let e = &set["api.example.com"][0];
        assert_eq!(e.labels[CLUSTER_LABEL], "edge");
        assert!(
            !e.labels.contains_key(PORT_LABEL),
            "one port: no port label"
        );
        assert!(e.healthy);
    }

    #[tokio::test]
    async fn a_multi_port_entry_labels_each_endpoint_with_its_service_port() {
        let p = policy(&[(
            "db.example.com",
            entry(
                Resolution::Static,
                &[(80, "http"), (443, "https")],
                &[("10.0.0.1", &[("https", 8443)])],
            ),
        )]);
        let (set, _) = endpoints(&p, "edge", Resolver::shared()).await;
        let eps = &set["db.example.com"];
        let on = |port| -> Vec<String> {
            eps.iter()
                .filter(|e| for_port(e, port))
                .map(|e| e.addr.to_string())
                .collect()
        };
        assert_eq!(on(80), ["10.0.0.1:80"]);
        assert_eq!(on(443), ["10.0.0.1:8443"]);
        assert!(on(8080).is_empty());
    }

    // Host names need hickory (the `dns` feature).
    #[cfg(feature = "dns")]
    #[tokio::test]
    async fn dns_resolves_endpoint_names_or_the_host_and_reports_what_fails() {
        let p = policy(&[
            (
                "api.example.com",
                entry(
                    Resolution::Dns,
                    &[(80, "http")],
                    &[("localhost", &[("http", 9)])],
                ),
            ),
            ("localhost", entry(Resolution::None, &[(81, "http")], &[])),
            (
                "*.wild.example.com",
                entry(Resolution::None, &[(80, "http")], &[]),
            ),
            (
                "gone.example.com",
                entry(
                    Resolution::Dns,
                    &[(80, "http")],
                    &[("no-such-name.invalid", &[])],
                ),
            ),
        ]);
        let (set, errors) = endpoints(&p, "edge", Resolver::shared()).await;
        assert!(
            set["api.example.com"]
                .iter()
                .any(|e| e.addr == "127.0.0.1:9".parse().unwrap()),
            "{set:?}"
        );
        assert!(
            set["localhost"]
                .iter()
                .any(|e| e.addr == "127.0.0.1:81".parse().unwrap())
        );
        assert!(!set.contains_key("*.wild.example.com"));
        assert!(set["gone.example.com"].is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("gone.example.com") && errors[0].contains("no-such-name.invalid"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn merge_keeps_discovered_endpoints_and_adds_declared_ones() {
        let ep = |a: &str| Endpoint {
            addr: a.parse().unwrap(),
            labels: BTreeMap::new(),
            healthy: true,
        };
        let discovered = Arc::new(EndpointSet::from([(
            "a".to_string(),
            vec![ep("10.0.0.1:1")],
        )]));
        let declared = EndpointSet::from([
            ("a".to_string(), vec![ep("10.0.0.2:1")]),
            ("b".to_string(), vec![ep("10.0.0.3:1")]),
        ]);
        let m = merge(&discovered, declared);
        assert_eq!(m["a"].len(), 2);
        assert_eq!(m["b"].len(), 1);
        assert!(Arc::ptr_eq(
            &merge(&discovered, EndpointSet::new()),
            &discovered
        ));
    }
}
