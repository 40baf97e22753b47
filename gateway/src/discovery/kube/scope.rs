//! Which namespaces Kubernetes discovery watches, and the watchers of each.
//!
//! With `--kube-watch-scope policy` (the default), as Istio's
//! `discoverySelectors` narrow istiod's view, the gateway watches Services,
//! EndpointSlices and Pods (and ServiceExports) only in the namespaces the
//! applied snapshot names ([`policy_namespaces`]: exported services, route
//! and mirror destinations, DestinationRule hosts, `sourceNamespace`
//! matches, AuthorizationPolicies and PeerAuthentications), plus those of
//! `--kube-namespace` and the namespace of the gateway's own outbound
//! Service (`--mirror-services`). With `--kube-watch-scope all` it watches
//! every namespace, one watch per kind.
//!
//! [`Watchers::set_named`] follows each applied snapshot: a namespace it
//! names for the first time gets its watchers, and its entries join the
//! endpoint set once every kind of it is listed (never half of it); a
//! namespace no longer named has its watchers stopped and its entries
//! removed, and no other namespace's entries change. With mirrors on, the
//! mirror objects are watched in every namespace by their labels (a few
//! objects), so that a mirror left in a namespace no longer named is still
//! seen and deleted.
//!
//! It does not own what is made of the objects ([`super::endpoint_set`]) or
//! the watchers' resilience ([`super::spawn_follow`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::watcher;
use kube::{Api, Client};
use meshfed_policy::snapshot::ClusterPolicy;
use tokio::task::AbortHandle;

use super::{
    Map, PodMeta, Shared, Stores, api, service_export_resource, slim_service, slim_slice,
    spawn_follow,
};

/// The most namespaces watched one by one. Each costs three or four watches
/// (long-lived requests to the API server); beyond this, the namespaces
/// past the first this many (in name order) are not watched, and a
/// warning says to use `--kube-watch-scope all`.
pub const MAX_WATCHED_NAMESPACES: usize = 256;

/// Which namespaces discovery watches (`--kube-watch-scope`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WatchScope {
    /// Those the applied policy names, plus `--kube-namespace`.
    #[default]
    Policy,
    /// Every namespace.
    All,
}

impl std::str::FromStr for WatchScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "policy" => Ok(WatchScope::Policy),
            "all" => Ok(WatchScope::All),
            _ => Err(format!(
                "`{s}` is not a watch scope: `policy` (the namespaces the policy names, plus --kube-namespace) or `all` (every namespace)"
            )),
        }
    }
}

impl std::fmt::Display for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WatchScope::Policy => "policy",
            WatchScope::All => "all",
        })
    }
}

/// The namespace of a canonical service host (`name.ns.svc.<domain>`, or
/// a wildcard `*.ns.svc.<domain>`); `None` for any other host.
fn namespace_of(host: &str, domain: &str) -> Option<String> {
    let base = host.strip_suffix(domain)?.strip_suffix(".svc.")?;
    let (_, ns) = base.rsplit_once('.')?;
    is_dns_label(ns).then(|| ns.to_string())
}

/// A DNS label (RFC 1123), as a namespace name must be.
pub(crate) fn is_dns_label(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// The namespaces of these canonical hosts.
pub fn host_namespaces<'a>(
    hosts: impl IntoIterator<Item = &'a String>,
    domain: &str,
) -> BTreeSet<String> {
    hosts
        .into_iter()
        .filter_map(|h| namespace_of(h, domain))
        .collect()
}

/// The namespaces a cluster's policy names: those of its exported services
/// (every cluster's: a remote export is mirrored in its namespace here),
/// of every host routes, mirrors and DestinationRules name, of
/// `sourceNamespace` matches, and of AuthorizationPolicies (their own and
/// the exact `source.namespaces`) and PeerAuthentications. Wildcards and
/// invalid names are left out.
pub fn policy_namespaces(policy: &ClusterPolicy) -> BTreeSet<String> {
    let domain = policy.domain.as_str();
    let mut hosts: BTreeSet<&String> = policy.exports.keys().collect();
    hosts.extend(policy.destinations.keys());
    let mut named: BTreeSet<String> = BTreeSet::new();
    for (host, routes) in &policy.routes {
        hosts.insert(host);
        for rule in &routes.http {
            hosts.extend(rule.destinations.iter().map(|d| &d.host));
            hosts.extend(rule.mirrors.iter().map(|m| &m.host));
            named.extend(
                rule.matches
                    .iter()
                    .filter_map(|m| m.source_namespace.clone()),
            );
        }
        for rule in &routes.tcp {
            hosts.extend(rule.destinations.iter().map(|d| &d.host));
        }
    }
    named.extend(host_namespaces(hosts, domain));
    for a in &policy.authz {
        named.insert(a.namespace.clone());
        for rule in &a.rules {
            for from in &rule.from {
                named.extend(from.namespaces.iter().cloned());
            }
        }
    }
    named.extend(policy.mtls.namespaces.keys().cloned());
    named.extend(policy.mtls.workloads.iter().map(|w| w.namespace.clone()));
    named.retain(|n| is_dns_label(n));
    named
}

/// The watchers of each watched namespace, started and stopped as the
/// policy's namespaces change.
pub struct Watchers {
    client: Client,
    shared: Arc<Shared>,
    scope: WatchScope,
    service_exports: bool,
    /// Always watched: `--kube-namespace` and the gateway's own namespace.
    fixed: BTreeSet<String>,
    running: Mutex<Running>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers")
            .field("scope", &self.scope)
            .field("fixed", &self.fixed)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Running {
    tasks: BTreeMap<Option<String>, Vec<AbortHandle>>,
    next_gen: u64,
    /// Namespaces named but not watched (over [`MAX_WATCHED_NAMESPACES`]),
    /// as last reported.
    over_cap: usize,
}

impl Watchers {
    pub(super) fn new(
        client: Client,
        shared: Arc<Shared>,
        scope: WatchScope,
        service_exports: bool,
        fixed: BTreeSet<String>,
    ) -> Self {
        Watchers {
            client,
            shared,
            scope,
            service_exports,
            fixed,
            running: Mutex::new(Running::default()),
        }
    }

    /// The scope.
    pub fn scope(&self) -> WatchScope {
        self.scope
    }

    /// The namespaces watched one by one; `None` when every namespace is.
    pub fn watched(&self) -> Option<Vec<String>> {
        if self.scope == WatchScope::All {
            return None;
        }
        let r = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        Some(r.tasks.keys().flatten().cloned().collect())
    }

    /// Watches the namespaces `named` (those of the applied policy) and the
    /// fixed ones, and stops watching any other; with `--kube-watch-scope
    /// all`, watches every namespace (once). A stopped namespace's objects
    /// leave the stores at once, so its entries leave the endpoint set;
    /// the other namespaces' are untouched.
    pub fn set_named(&self, named: &BTreeSet<String>) {
        let mut r = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted: BTreeSet<Option<String>> = match self.scope {
            WatchScope::All => BTreeSet::from([None]),
            WatchScope::Policy => {
                let mut want: BTreeSet<String> = self.fixed.clone();
                let mut over = 0;
                for ns in named.iter().filter(|n| is_dns_label(n)) {
                    if want.len() < MAX_WATCHED_NAMESPACES || want.contains(ns) {
                        want.insert(ns.clone());
                    } else {
                        over += 1;
                    }
                }
                if over != r.over_cap {
                    if over > 0 {
                        tracing::warn!(
                            named = named.len(),
                            watched = want.len(),
                            "the policy names more namespaces than are watched one by one ({MAX_WATCHED_NAMESPACES}); {over} are not watched and their services have no local endpoints: use --kube-watch-scope all"
                        );
                    }
                    r.over_cap = over;
                }
                want.into_iter().map(Some).collect()
            }
        };
        let stop: Vec<Option<String>> = r
            .tasks
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        let start: Vec<Option<String>> = wanted
            .iter()
            .filter(|k| !r.tasks.contains_key(*k))
            .cloned()
            .collect();
        for key in &stop {
            for task in r.tasks.remove(key).into_iter().flatten() {
                task.abort();
            }
        }
        if !stop.is_empty() {
            self.shared.with_mut(|s| {
                for key in &stop {
                    s.watched.remove(key);
                }
            });
            self.shared.version.send_modify(|v| *v += 1);
            self.shared.changed.notify_one();
            tracing::info!(
                namespaces = %label_list(&stop),
                "Kubernetes discovery stopped watching namespaces the policy no longer names; their endpoints are removed"
            );
        }
        for key in start {
            let generation = r.next_gen;
            r.next_gen += 1;
            let tasks = self.start(key.clone(), generation);
            r.tasks.insert(key, tasks);
        }
    }

    /// Starts the watchers of one namespace (or of all, `None`).
    fn start(&self, key: Option<String>, generation: u64) -> Vec<AbortHandle> {
        let label = match &key {
            Some(ns) => ns.clone(),
            None => "all namespaces".to_string(),
        };
        tracing::debug!(namespace = %label, "Kubernetes discovery starts watching");
        self.shared.with_mut(|s| {
            s.watched.insert(
                key.clone(),
                super::Watched {
                    generation,
                    services: Map::default(),
                    slices: Map::default(),
                    pods: Map::default(),
                    exports: self.service_exports.then(Map::default),
                },
            )
        });
        let client = &self.client;
        let services: Api<Service> = api(client, &key);
        let slices: Api<EndpointSlice> = api(client, &key);
        // Metadata only: the labels are all discovery needs from a pod.
        let pods: Api<PartialObjectMeta<Pod>> = api(client, &key);
        let (k1, k2, k3) = (key.clone(), key.clone(), key.clone());
        let mut tasks = vec![
            spawn_follow(
                self.shared.clone(),
                format!("services in {label}"),
                watcher::watcher(services, watcher::Config::default()),
                move |s: &mut Stores| s.watched_mut(&k1, generation).map(|w| &mut w.services),
                |svc| Some(slim_service(svc)),
            ),
            spawn_follow(
                self.shared.clone(),
                format!("endpointslices in {label}"),
                watcher::watcher(slices, watcher::Config::default()),
                move |s: &mut Stores| s.watched_mut(&k2, generation).map(|w| &mut w.slices),
                |sl| Some(slim_slice(sl)),
            ),
            spawn_follow(
                self.shared.clone(),
                format!("pods in {label}"),
                watcher::watcher(pods, watcher::Config::default()),
                move |s: &mut Stores| s.watched_mut(&k3, generation).map(|w| &mut w.pods),
                |p: PartialObjectMeta<Pod>| Some(PodMeta::of(p)),
            ),
        ];
        if self.service_exports {
            let ar = service_export_resource();
            let exports: Api<DynamicObject> = match &key {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            let k4 = key.clone();
            tasks.push(spawn_follow(
                self.shared.clone(),
                format!("serviceexports in {label} (is the MCS ServiceExport CRD installed?)"),
                watcher::watcher(exports, watcher::Config::default()),
                move |s: &mut Stores| {
                    s.watched_mut(&k4, generation)
                        .and_then(|w| w.exports.as_mut())
                },
                |_| Some(()),
            ));
        }
        tasks
    }
}

/// `a, b, c` (`all namespaces` for `None`).
fn label_list(keys: &[Option<String>]) -> String {
    keys.iter()
        .map(|k| k.as_deref().unwrap_or("all namespaces"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_namespaces_of_its_hosts_sources_and_policies() {
        use meshfed_policy::snapshot::*;
        let h = |s: &str| format!("{s}.svc.cluster.local");
        let dest = |host: String| WeightedDestination {
            host,
            weight: 100,
            ..Default::default()
        };
        let mut p = ClusterPolicy {
            domain: "cluster.local".into(),
            ..Default::default()
        };
        p.exports
            .insert(h("ratings.bookinfo"), BTreeSet::from(["east".into()]));
        p.exports
            .insert("api.example.com".into(), BTreeSet::from(["west".into()]));
        p.routes.insert(
            h("reviews.shop"),
            HostRoutes {
                http: vec![HttpRoute {
                    matches: vec![HttpMatch {
                        source_namespace: Some("callers".into()),
                        ..Default::default()
                    }],
                    destinations: vec![dest(h("reviews.stage"))],
                    mirrors: vec![Mirror {
                        host: h("shadow.mirrorns"),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                tcp: vec![TcpRoute {
                    destinations: vec![dest(h("db.data"))],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        p.destinations
            .insert(h("*.wild"), DestinationPolicy::default());
        p.mtls
            .namespaces
            .insert("strict-ns".into(), MtlsMode::Strict);
        p.authz.push(AuthzPolicy {
            namespace: "guarded".into(),
            rules: vec![AuthzRule {
                from: vec![AuthzSource {
                    namespaces: vec!["frontend".into(), "team-*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let got: Vec<String> = policy_namespaces(&p).into_iter().collect();
        assert_eq!(
            got,
            [
                "bookinfo",
                "callers",
                "data",
                "frontend",
                "guarded",
                "mirrorns",
                "shop",
                "stage",
                "strict-ns",
                "wild"
            ]
        );
    }

    #[test]
    fn only_canonical_service_hosts_name_a_namespace() {
        let d = "corp.local";
        assert_eq!(namespace_of("a.b.svc.corp.local", d).as_deref(), Some("b"));
        assert_eq!(namespace_of("*.b.svc.corp.local", d).as_deref(), Some("b"));
        assert_eq!(namespace_of("a.b.svc.cluster.local", d), None);
        assert_eq!(namespace_of("*.svc.corp.local", d), None);
        assert_eq!(namespace_of("api.example.com", d), None);
        assert_eq!(namespace_of("a.B_x.svc.corp.local", d), None);
    }

    #[test]
    fn watch_scopes_parse_and_a_wrong_one_says_what_is_accepted() {
        assert_eq!("policy".parse(), Ok(WatchScope::Policy));
        assert_eq!("all".parse(), Ok(WatchScope::All));
        let e = "everything".parse::<WatchScope>().unwrap_err();
        assert!(e.contains("`policy`") && e.contains("`all`"), "{e}");
    }
}
