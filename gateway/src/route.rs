//! Routing: from a request to a destination service, subset and cluster.
//!
//! Reads one [`Active`] snapshot per request (the caller loads it once and
//! passes it down), so no request sees half a config. It evaluates the
//! snapshot's VirtualService rules with Istio's semantics (rules in order,
//! first match wins; the matches of a rule are ORed, the conditions of one
//! match ANDed; regexes match the whole value), picks a weighted
//! destination, and then a cluster: the one a subset pins with
//! `topology.istio.io/cluster`, or else one of the clusters that have healthy
//! endpoints for it, weighted by their healthy endpoint counts (local
//! endpoints from discovery, remote ones from peers' announcements).
//!
//! `sourceNamespace` and `sourceLabels` are matched against the caller
//! ([`Source`]): its namespace is the one of its workload certificate (a
//! caller that presented none has no namespace, so a rule that requires one
//! does not match it); its labels are those of the local endpoints at the
//! caller's IP address in discovery ([`source_labels`]). A caller that is
//! not in discovery (an edge process, a NATed client) has no labels, and a
//! rule with `sourceLabels` does not match it.
//!
//! It does not own the policy rules (the `meshfed-policy` crate compiles
//! them), retries, outlier detection and locality failover (the
//! traffic-policy issue), or moving bytes ([`crate::proxy`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};
use meshfed_policy::Snapshot;
use meshfed_policy::snapshot::{
    CLUSTER_LABEL, HttpMatch, HttpRoute, Mirror, StringMatch, WeightedDestination,
};
use regex::Regex;

use crate::endpoints::EndpointSet;
use crate::wire::announce::Announcement;

/// A snapshot with everything a request needs precomputed: compiled
/// regexes. Built once per applied snapshot.
#[derive(Debug)]
pub struct Active {
    pub snapshot: Arc<Snapshot>,
    regexes: HashMap<String, Regex>,
    /// The AuthorizationPolicies, compiled ([`crate::authz`]).
    pub authz: crate::authz::Authz,
    /// Whether any HTTP rule matches on `sourceLabels` (only then is the
    /// caller looked up in discovery).
    uses_source_labels: bool,
}

/// Why a snapshot cannot be activated (the gateway NACKs it).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("regex `{pattern}` does not compile: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("authorization policy cannot be enforced: {0}")]
    Authz(#[from] crate::authz::CompileError),
}

impl Active {
    pub fn new(snapshot: Arc<Snapshot>) -> Result<Self, ActivateError> {
        let mut regexes = HashMap::new();
        let mut add = |m: &StringMatch| -> Result<(), ActivateError> {
            if let StringMatch::Regex(p) = m
                && !regexes.contains_key(p)
            {
                let re = regex::RegexBuilder::new(&format!("^(?:{p})$"))
                    .size_limit(1 << 20)
                    .dfa_size_limit(1 << 20)
                    .build()
                    .map_err(|e| ActivateError::Regex {
                        pattern: p.clone(),
                        reason: e.to_string(),
                    })?;
                regexes.insert(p.clone(), re);
            }
            Ok(())
        };
        for routes in snapshot.policy.routes.values() {
            for r in &routes.http {
                for m in &r.matches {
                    for sm in [&m.uri, &m.scheme, &m.method, &m.authority]
                        .into_iter()
                        .flatten()
                    {
                        add(sm)?;
                    }
                    for sm in m
                        .headers
                        .values()
                        .chain(m.without_headers.values())
                        .chain(m.query_params.values())
                    {
                        add(sm)?;
                    }
                }
            }
        }
        let authz = crate::authz::Authz::compile(&snapshot.policy)?;
        let uses_source_labels = snapshot
            .policy
            .routes
            .values()
            .flat_map(|r| &r.http)
            .flat_map(|r| &r.matches)
            .any(|m| !m.source_labels.is_empty());
        Ok(Active {
            snapshot,
            regexes,
            authz,
            uses_source_labels,
        })
    }

    /// Whether any HTTP rule matches on `sourceLabels`.
    pub fn uses_source_labels(&self) -> bool {
        self.uses_source_labels
    }

    pub fn version(&self) -> &str {
        &self.snapshot.version
    }

    fn matches(&self, m: &StringMatch, value: &str) -> bool {
        match m {
            StringMatch::Exact(x) => value == x,
            StringMatch::Prefix(x) => value.starts_with(x.as_str()),
            StringMatch::Regex(p) => self.regexes.get(p).is_some_and(|re| re.is_match(value)),
        }
    }
}

/// The parts of a request that routing looks at.
#[derive(Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    pub scheme: &'a str,
    /// The namespace short names resolve in (the caller's, if known).
    pub caller_namespace: &'a str,
}

/// Who is calling, for `sourceNamespace` and `sourceLabels` matches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Source<'a> {
    /// The namespace of the caller's workload certificate; `None` for a
    /// caller that presented none.
    pub namespace: Option<&'a str>,
    /// The caller's workload labels ([`source_labels`]); `None` when the
    /// caller is not in discovery.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// The workload labels of the caller at `ip`: the labels of the local
/// endpoints at that IP address in discovery (of services in `namespace`,
/// when the caller's namespace is known). When several endpoints share the
/// address (host networking, one process serving several services), only
/// the labels they all carry count, so a `sourceLabels` rule never matches
/// on a label one of them lacks. `None` when no endpoint has that address.
pub fn source_labels(
    local: &EndpointSet,
    ip: IpAddr,
    namespace: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    let in_namespace = |service: &str| {
        namespace.is_none_or(|ns| {
            let mut parts = service.split('.');
            parts.next();
            parts.next() == Some(ns)
        })
    };
    let mut common: Option<BTreeMap<String, String>> = None;
    for (service, eps) in local {
        if !in_namespace(service) {
            continue;
        }
        for e in eps.iter().filter(|e| e.addr.ip() == ip) {
            common = Some(match common {
                None => e.labels.clone(),
                Some(mut c) => {
                    c.retain(|k, v| e.labels.get(k) == Some(v));
                    c
                }
            });
        }
    }
    common
}

/// Whether `authority` names its host by one label (`ratings`,
/// `ratings-west:9080`): a short name, which means a service only in the
/// caller's namespace.
pub fn is_short_name(authority: &str) -> bool {
    if authority.starts_with('[') {
        return false; // an IPv6 literal
    }
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_end_matches('.');
    !host.is_empty() && !host.contains('.')
}

/// The namespace of a local caller at `ip`, as the local endpoints tell it:
/// a pod's address belongs to one pod, so the services with an endpoint at
/// that address (canonical hosts `name.ns.svc.<domain>`) all share its
/// namespace. `None` when no such endpoint has that address, or endpoints
/// of several namespaces share it (host-network pods, a node's address):
/// the caller's namespace is then unknown, never guessed.
pub fn caller_namespace<'a>(local: &'a EndpointSet, ip: IpAddr, domain: &str) -> Option<&'a str> {
    let suffix = format!(".svc.{domain}");
    let mut found: Option<&str> = None;
    for (service, eps) in local {
        let Some((_, ns)) = service
            .strip_suffix(suffix.as_str())
            .and_then(|name_ns| name_ns.rsplit_once('.'))
        else {
            continue; // a ServiceEntry's host: no namespace
        };
        if !eps.iter().any(|e| e.addr.ip() == ip) {
            continue;
        }
        match found {
            None => found = Some(ns),
            Some(f) if f == ns => {}
            Some(_) => return None,
        }
    }
    found
}

/// Where a call goes: a service, optionally a subset, and the labels that
/// select its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Canonical host.
    pub service: String,
    pub port: u16,
    pub subset: Option<String>,
    /// The subset's labels (empty: every endpoint).
    pub selector: BTreeMap<String, String>,
    /// The routes' host key and the index of the matched HTTP rule, if a
    /// VirtualService routed it.
    pub rule: Option<(String, usize)>,
    /// The cluster a pinned subset named, when it had no healthy endpoint
    /// and the call failed over elsewhere.
    pub failed_over_from: Option<String>,
    /// Index of the chosen destination in the rule's `destinations`.
    pub destination: Option<usize>,
}

impl Target {
    /// The HTTP rule that routed this target, in `active`.
    pub fn http_rule<'a>(&self, active: &'a Active) -> Option<&'a HttpRoute> {
        let (key, index) = self.rule.as_ref()?;
        active.snapshot.policy.routes.get(key)?.http.get(*index)
    }

    /// The weighted destination that was picked, in `active`.
    pub fn weighted_destination<'a>(&self, active: &'a Active) -> Option<&'a WeightedDestination> {
        self.http_rule(active)?.destinations.get(self.destination?)
    }

    /// The cluster the subset pins, if it does.
    pub fn pinned_cluster(&self) -> Option<&str> {
        self.selector.get(CLUSTER_LABEL).map(String::as_str)
    }
}

/// Splits `host:port`; the port defaults to `default_port`.
pub fn split_authority(authority: &str, default_port: u16) -> (&str, u16) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        let port = p
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default_port);
        return (h, port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().unwrap_or(default_port)),
        _ => (authority, default_port),
    }
}

/// Routes an HTTP request from a caller nothing is known about (rules that
/// match on the source never match). `None` means no service of that name
/// is known.
pub fn http_target(
    active: &Active,
    req: &RequestInfo<'_>,
    local: &EndpointSet,
    default_port: u16,
) -> Option<Target> {
    http_target_from(active, req, &Source::default(), local, default_port)
}

/// Routes an HTTP request from `source`. `None` means no service of that
/// name is known.
pub fn http_target_from(
    active: &Active,
    req: &RequestInfo<'_>,
    source: &Source<'_>,
    local: &EndpointSet,
    default_port: u16,
) -> Option<Target> {
    let (host, port) = split_authority(req.authority, default_port);
    let policy = &active.snapshot.policy;
    // Once per request: the routes and the service fallback both need them.
    let candidates = policy.host_candidates(host, req.caller_namespace);
    if let Some((key, routes)) = active.snapshot.route_for_candidates(&candidates, host) {
        let (index, rule) = routes
            .http
            .iter()
            .enumerate()
            .find(|(_, r)| rule_matches(active, r, req, source, port))?;
        let dest = pick_weighted(&rule.destinations)?;
        let mut t = target_for(active, dest, port, Some((key.to_string(), index)));
        t.destination = rule.destinations.iter().position(|d| std::ptr::eq(d, dest));
        return Some(t);
    }
    // No VirtualService: the service itself, if anything knows it.
    candidates
        .into_iter()
        .find(|h| {
            policy.exports.contains_key(h)
                || policy.destinations.contains_key(h)
                || local.contains_key(h)
        })
        .map(|service| Target {
            service,
            port,
            subset: None,
            selector: BTreeMap::new(),
            rule: None,
            failed_over_from: None,
            destination: None,
        })
        // A mirror Service's name (`ratings-west`), after every real name.
        .or_else(|| mirror_names::http_target(active, req, local, default_port))
}

/// Routes a TCP connection to `host:port` (from SNI, CONNECT or a port
/// mapping).
pub fn tcp_target(
    active: &Active,
    host: &str,
    port: u16,
    caller_namespace: &str,
    local: &EndpointSet,
) -> Option<Target> {
    let policy = &active.snapshot.policy;
    let candidates = policy.host_candidates(host, caller_namespace);
    if let Some((_, routes)) = active.snapshot.route_for_candidates(&candidates, host)
        && let Some(rule) = routes
            .tcp
            .iter()
            // The caller of a TCP connection is not looked up: a rule that
            // needs its labels does not match, as for an unknown HTTP caller.
            .find(|r| (r.ports.is_empty() || r.ports.contains(&port)) && r.source_labels.is_empty())
    {
        let dest = pick_weighted(&rule.destinations)?;
        return Some(target_for(active, dest, port, None));
    }
    candidates
        .into_iter()
        .find(|h| policy.exports.contains_key(h) || local.contains_key(h))
        .map(|service| Target {
            service,
            port,
            subset: None,
            selector: BTreeMap::new(),
            rule: None,
            failed_over_from: None,
            destination: None,
        })
        .or_else(|| mirror_names::tcp_target(active, host, port, caller_namespace, local))
}

fn target_for(
    active: &Active,
    d: &WeightedDestination,
    port: u16,
    rule: Option<(String, usize)>,
) -> Target {
    let selector = d
        .subset
        .as_ref()
        .and_then(|s| {
            active
                .snapshot
                .policy
                .destinations
                .get(&d.host)?
                .subsets
                .get(s)
        })
        .map(|s| s.labels.clone())
        .unwrap_or_default();
    Target {
        service: d.host.clone(),
        port: d.port.unwrap_or(port),
        subset: d.subset.clone(),
        selector,
        rule,
        failed_over_from: None,
        destination: None,
    }
}

/// Where a mirrored copy goes: the mirror's service, subset and port.
pub fn mirror_target(active: &Active, m: &Mirror, port: u16) -> Target {
    let d = WeightedDestination {
        host: m.host.clone(),
        subset: m.subset.clone(),
        port: m.port,
        weight: 100,
        ..Default::default()
    };
    target_for(active, &d, port, None)
}

/// Picks a destination by weight. Weights sum to 100 (validated); a zero
/// total picks nothing.
pub fn pick_weighted(dests: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::random_range(0..total);
    dests.iter().find(|d| {
        if r < d.weight {
            true
        } else {
            r -= d.weight;
            false
        }
    })
}

fn rule_matches(
    active: &Active,
    rule: &HttpRoute,
    req: &RequestInfo<'_>,
    source: &Source<'_>,
    port: u16,
) -> bool {
    rule.matches.is_empty()
        || rule
            .matches
            .iter()
            .any(|m| match_one(active, m, req, source, port))
}

fn match_one(
    active: &Active,
    m: &HttpMatch,
    req: &RequestInfo<'_>,
    source: &Source<'_>,
    port: u16,
) -> bool {
    let path = req.uri.path();
    if let Some(u) = &m.uri {
        let ok = if m.ignore_uri_case {
            let lower = path.to_ascii_lowercase();
            match u {
                StringMatch::Exact(x) => lower == x.to_ascii_lowercase(),
                StringMatch::Prefix(x) => lower.starts_with(&x.to_ascii_lowercase()),
                StringMatch::Regex(_) => active.matches(u, &lower),
            }
        } else {
            active.matches(u, path)
        };
        if !ok {
            return false;
        }
    }
    if m.method
        .as_ref()
        .is_some_and(|x| !active.matches(x, req.method.as_str()))
        || m.scheme
            .as_ref()
            .is_some_and(|x| !active.matches(x, req.scheme))
        || m.authority
            .as_ref()
            .is_some_and(|x| !active.matches(x, req.authority))
        || m.port.is_some_and(|p| p != port)
    {
        return false;
    }
    for (name, sm) in &m.headers {
        let Some(v) = req.headers.get(name).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if !active.matches(sm, v) {
            return false;
        }
    }
    for (name, sm) in &m.without_headers {
        if let Some(v) = req.headers.get(name).and_then(|v| v.to_str().ok())
            && active.matches(sm, v)
        {
            return false;
        }
    }
    if !m.query_params.is_empty() {
        let query: Vec<(&str, &str)> = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .collect();
        for (name, sm) in &m.query_params {
            let found = query
                .iter()
                .any(|(k, v)| k == name && active.matches(sm, v));
            if !found {
                return false;
            }
        }
    }
    // The caller: its certificate's namespace, its endpoints' labels. A
    // caller without them does not match a rule that requires them.
    if let Some(ns) = &m.source_namespace
        && source.namespace != Some(ns.as_str())
    {
        return false;
    }
    m.source_labels.is_empty()
        || source
            .labels
            .is_some_and(|l| m.source_labels.iter().all(|(k, v)| l.get(k) == Some(v)))
}

/// Chooses the cluster that serves `target`, given each cluster's healthy
/// endpoint counts (local ones from discovery, remote ones from peers'
/// announcements; a peer whose link is down announces nothing), and never
/// one of `exclude` (clusters a retry of this request already failed on).
///
/// - A subset that pins a cluster (`topology.istio.io/cluster`) goes there
///   while that cluster has a healthy endpoint for it. When it has none (its
///   gateways unreachable, its endpoints gone or ejected), the call fails
///   over: the cluster label is dropped from `target`'s selector, and the
///   rest of the subset's labels choose among the other clusters, as below.
///   This is the answer to traffic that keeps going to a dead cluster.
/// - Otherwise the service's DestinationRule `localityLbSetting` decides
///   (see [`locality`]): by default the local cluster while it has healthy
///   endpoints, then the nearest clusters by `Cluster.spec.locality`, each
///   tier weighted by healthy endpoint counts.
///
/// Returns `None` when no cluster has a healthy endpoint (and nothing is
/// pinned).
pub fn choose_cluster(
    target: &mut Target,
    active: &Active,
    local_cluster: &str,
    local: &EndpointSet,
    remote: &[(String, Arc<Announcement>)],
    exclude: &[String],
) -> Option<String> {
    let healthy = |selector: &BTreeMap<String, String>| {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let local_healthy = local.get(&target.service).map_or(0, |eps| {
            eps.iter()
                .filter(|e| e.healthy && e.matches(selector))
                .count() as u32
        });
        if local_healthy > 0 {
            counts.insert(local_cluster.to_string(), local_healthy);
        }
        // A peer's cluster is the one its certificate names, whatever
        // cluster label it announces: match the label against that.
        let mut rest = selector.clone();
        let wanted = rest.remove(CLUSTER_LABEL);
        for (cluster, a) in remote {
            if wanted.as_ref().is_some_and(|w| w != cluster) {
                continue;
            }
            let n = a.healthy(&target.service, &rest);
            if n > 0 {
                let e = counts.entry(cluster.clone()).or_insert(0);
                *e = (*e).max(n);
            }
        }
        counts.retain(|c, _| !exclude.contains(c));
        counts
    };
    if let Some(pinned) = target.pinned_cluster().map(str::to_string) {
        if healthy(&target.selector).contains_key(&pinned) {
            return Some(pinned);
        }
        let mut rest = target.selector.clone();
        rest.remove(CLUSTER_LABEL);
        let counts = healthy(&rest);
        if counts.is_empty() {
            // Nowhere to fail over to: go where the policy says, and let
            // that path report why it fails.
            return (!exclude.contains(&pinned)).then_some(pinned);
        }
        target.selector = rest;
        target.failed_over_from = Some(pinned);
        return locality::choose(active, target, local_cluster, counts);
    }
    let counts = healthy(&target.selector);
    locality::choose(active, target, local_cluster, counts)
}

pub mod locality;
pub mod mirror_names;
#[cfg(test)]
mod tests;
