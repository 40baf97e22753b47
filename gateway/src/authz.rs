//! Authorization: the snapshot's AuthorizationPolicies, compiled once per
//! snapshot and evaluated for every request a destination gateway serves.
//!
//! Semantics are Istio's:
//! - **Order.** A request is denied if any DENY policy that applies to the
//!   workload has a matching rule; otherwise, if any ALLOW policy applies,
//!   it is allowed only when one of them has a matching rule; with no ALLOW
//!   policy it is allowed. AUDIT policies never block. CUSTOM is refused by
//!   validation (`unsupported-field`) and never compiled.
//! - **Dry run.** A policy with `istio.io/dry-run: "true"` takes no part in
//!   the decision; [`Authz::dry_run`] evaluates it on its own and
//!   [`count_dry_run`] counts what it would have decided
//!   (`meshfed_authz_dry_run_total{policy, action, decision}`).
//! - **Scope.** A policy in the root namespace without a selector applies to
//!   every workload (`mesh`); a namespace's policy without a selector to
//!   every workload of its namespace; a policy with `selector.matchLabels`
//!   to the workloads of its namespace whose labels include the selector (in
//!   the root namespace: of every namespace).
//! - **The workload** at a destination gateway is the local endpoint that
//!   would receive the request: its namespace is the destination service's
//!   (`<name>.<ns>.svc.<domain>`, or a ServiceEntry's namespace), its labels
//!   are the endpoint's labels from discovery, its port is the endpoint's
//!   port (Istio's `ports` and `destination.port` are the workload's port,
//!   not the service port). [`Authz::depends_on_endpoint`] says when every
//!   endpoint gets the same answer, so that the caller decides once.
//! - **Rules.** A rule matches when one of its sources matches (or it has
//!   none), one of its operations matches (or it has none) and every `when`
//!   condition holds. Inside a source or an operation every non-empty field
//!   must hold; a field's values are ORed; `notX` holds when no value
//!   matches (so an absent attribute satisfies `notX` and never `X`, as in
//!   Envoy's RBAC). Values are Istio patterns: exact, `prefix*`, `*suffix`
//!   or `*` (which needs the attribute to be present).
//! - **Principals** are Istio's form, `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID
//!   without `spiffe://`). The source namespace and service account come
//!   from a workload principal; a gateway principal has neither.
//! - **TCP.** Fields that only HTTP has (`hosts`, `methods`, `paths`,
//!   `request.headers`) make an ALLOW rule not match and are ignored in a
//!   DENY rule (which then matches on its other fields), as Istio does: both
//!   fail closed.
//! - **Hosts** match the authority as written (case-insensitively, with or
//!   without its port) and the service it names, resolved as the router
//!   resolves it ([`Authz::canonical_authority`]); an exact `hosts` value is
//!   resolved the same way from the policy's namespace. So `ratings.`,
//!   `ratings.default`, `ratings.default.svc` and a trailing dot on the full
//!   name cannot slip past a DENY on `ratings.default.svc.cluster.local`.
//! - **Paths** are matched without the query string, after RFC 3986
//!   normalization ([`normalize_path`]); the request is forwarded with the
//!   normalized path, as Envoy does in Istio's default `BASE` mode, so the
//!   path the policy saw is the path the workload gets. A value with `{*}`
//!   (one segment) or `{**}` (any number of segments) is Istio's path
//!   template, matched as Envoy's URI template matches it
//!   ([`meshfed_policy::path_template`], shared with validation).
//!
//! `when` keys: `source.principal`, `source.namespace`, `source.cluster`
//! (meshfed's: the calling gateway's verified cluster), `request.headers[..]`
//! (several values of one header are joined with `,`, as Envoy does; of the
//! pseudo-headers, `:authority` is the authority as the request carries it
//! to the workload, exactly as written, and `:method` the method),
//! `destination.port`, and `connection.sni`: the server name of a TCP
//! stream the source gateway routed by its TLS ClientHello (TLS
//! passthrough), carried in the stream head; for HTTP, CONNECT and mapped
//! ports it is absent (its `values` never match, its `notValues` always
//! hold). Any other key (`:path`, `:scheme` among them), a malformed
//! pattern, path template, port or header name is refused when the
//! snapshot is compiled ([`CompileError`]), so the gateway NACKs it and
//! keeps the previous snapshot: a policy it cannot enforce exactly never
//! half-applies.
//!
//! This module does not own where the decision is enforced (the inbound
//! proxy answers `403 RBAC: access denied`, or refuses a TCP stream), who
//! the caller is (the tunnel's verified peer and the trust-domain rule), or
//! PeerAuthentication ([`crate::peer_auth`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use http::{HeaderMap, HeaderName};
use meshfed_policy::path_template::{self, PathTemplate};
use meshfed_policy::snapshot::{
    AuthzAction, AuthzCondition, AuthzOperation, AuthzPolicy, AuthzRule, AuthzScope, AuthzSource,
    ClusterPolicy,
};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::endpoints::Endpoint;

#[cfg(test)]
mod tests;

/// Why a snapshot's authorization policies cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{policy}: `when` key `{key}` is not enforced by this gateway; use source.principal, \
         source.namespace, source.cluster, request.headers[<name>] (of the pseudo-headers: \
         :authority, :method), destination.port or connection.sni (a newer syncer may know keys \
         this gateway does not: upgrade it)"
    )]
    UnknownKey { policy: String, key: String },
    #[error("{policy}: {field} value `{value}` is not valid: {why}")]
    BadValue {
        policy: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// An Istio string pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `*`: any present value.
    Any,
    Exact(Box<str>),
    /// `foo*`.
    Prefix(Box<str>),
    /// `*foo`.
    Suffix(Box<str>),
    /// A `paths`/`notPaths` value with `{*}`/`{**}`: Envoy's URI template,
    /// parsed and matched by [`meshfed_policy::path_template`], the same
    /// code that validated it.
    Template(Box<PathTemplate>),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, &'static str> {
        if s.is_empty() {
            return Err("an empty value matches nothing");
        }
        let p = if s == "*" {
            Pattern::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            Pattern::Suffix(rest.into())
        } else if let Some(rest) = s.strip_suffix('*') {
            Pattern::Prefix(rest.into())
        } else {
            Pattern::Exact(s.into())
        };
        match &p {
            Pattern::Exact(x) | Pattern::Prefix(x) | Pattern::Suffix(x) if x.contains('*') => Err(
                "a wildcard is only allowed as the whole value, a prefix (`*x`) or a suffix (`x*`)",
            ),
            _ => Ok(p),
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(x) => v == &**x,
            Pattern::Prefix(x) => v.starts_with(&**x),
            Pattern::Suffix(x) => v.ends_with(&**x),
            Pattern::Template(t) => t.matches(v),
        }
    }
}

/// Patterns of one field: any may match.
#[derive(Debug, Clone, Default)]
struct Patterns(Vec<Pattern>);

impl Patterns {
    fn compile(
        values: &[String],
        policy: &str,
        field: &'static str,
        lowercase: bool,
    ) -> Result<Self, CompileError> {
        values
            .iter()
            .map(|v| {
                let v: Cow<'_, str> = if lowercase {
                    Cow::Owned(v.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(v)
                };
                Pattern::parse(&v).map_err(|why| CompileError::BadValue {
                    policy: policy.to_string(),
                    field,
                    value: v.to_string(),
                    why,
                })
            })
            .collect::<Result<_, _>>()
            .map(Patterns)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a present value matches one pattern.
    fn any(&self, v: Option<&str>) -> bool {
        v.is_some_and(|v| self.0.iter().any(|p| p.matches(v)))
    }

    /// `X` and `notX` of one attribute: each holds when empty.
    fn holds(&self, not: &Patterns, v: Option<&str>) -> bool {
        (self.is_empty() || self.any(v)) && (not.is_empty() || !not.any(v))
    }
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Patterns,
    not_principals: Patterns,
    namespaces: Patterns,
    not_namespaces: Patterns,
    /// `(namespace, service account)`.
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    hosts: Patterns,
    not_hosts: Patterns,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Patterns,
    not_methods: Patterns,
    paths: Patterns,
    not_paths: Patterns,
}

impl Operation {
    fn http_only(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

#[derive(Debug, Clone)]
enum Attribute {
    Principal,
    Namespace,
    Cluster,
    Header(HeaderName),
    /// `request.headers[:authority]`: the authority as the request carries
    /// it ([`Http::host`]), matched as written, as Envoy's header matcher
    /// does (case-sensitively, port included; never resolved to a service
    /// as `hosts` is).
    Authority,
    /// `request.headers[:method]`.
    Method,
    DestinationPort,
    Sni,
}

#[derive(Debug, Clone)]
struct Condition {
    attribute: Attribute,
    values: Patterns,
    not_values: Patterns,
    /// For `destination.port`.
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug, Clone)]
struct Policy {
    /// `namespace/name`, for metrics and logs.
    name: String,
    namespace: String,
    scope: AuthzScope,
    selector: Vec<(String, String)>,
    action: AuthzAction,
    rules: Vec<Rule>,
    /// Whether the answer can differ between endpoints of one service: a
    /// selector, or a port in a rule.
    per_endpoint: bool,
    /// `istio.io/dry-run`: evaluated by [`Authz::dry_run`], never enforced.
    dry_run: bool,
}

/// The compiled AuthorizationPolicies of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    policies: Vec<Policy>,
    /// Indices of mesh-scoped policies.
    mesh: Vec<usize>,
    /// Namespace → indices of its namespace- and workload-scoped policies.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Whether some policy is in dry-run mode.
    has_dry_run: bool,
    /// Whether some rule matches `hosts`/`notHosts` (then the request's
    /// authority is resolved to its service, [`Authz::canonical_authority`]).
    has_hosts: bool,
    /// The in-cluster DNS suffix.
    domain: String,
    /// The services the snapshot names (routes, exports, destination rules,
    /// service entries): what an authority may resolve to.
    known: std::collections::HashSet<String>,
}

/// What a dry-run policy would have decided for a request, had it been
/// enforced ([`Authz::dry_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DryRun<'a> {
    /// `namespace/name`.
    pub policy: &'a str,
    pub action: AuthzAction,
    /// For DENY: a rule matched. For ALLOW: no rule matched (on its own,
    /// this policy would have refused the request).
    pub would_deny: bool,
}

impl DryRun<'_> {
    /// The metric labels: `ALLOW`/`DENY`, and `allow`/`deny`.
    pub fn labels(&self) -> (&'static str, &'static str) {
        let action = match self.action {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        };
        (action, if self.would_deny { "deny" } else { "allow" })
    }
}

/// The caller and the request, as authorization sees them.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `<td>/ns/<ns>/sa/<sa>` or a gateway's ID, without `spiffe://`.
    pub principal: Option<&'a str>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    /// The verified cluster of the calling gateway.
    pub source_cluster: &'a str,
    /// `None` for a TCP stream.
    pub http: Option<Http<'a>>,
    /// The server name of a TLS stream routed by SNI (`connection.sni`).
    pub sni: Option<&'a str>,
    /// The destination service (canonical host), when the caller knows it:
    /// an authority may resolve to it even if the snapshot does not name it.
    pub service: Option<&'a str>,
    /// The authority resolved to its service (set by [`Authz`] itself).
    canonical_host: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// `principal` may carry `spiffe://`; it is stripped.
    pub fn new(
        principal: Option<&'a str>,
        source_cluster: &'a str,
        http: Option<Http<'a>>,
    ) -> Self {
        let principal = principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let (namespace, service_account) = match principal.map(|p| {
            let mut it = p.split('/');
            (
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
            )
        }) {
            Some((Some(_td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)) => {
                (Some(ns), Some(sa))
            }
            _ => (None, None),
        };
        Request {
            principal,
            namespace,
            service_account,
            source_cluster,
            http,
            sni: None,
            service: None,
            canonical_host: None,
        }
    }

    /// The request with its destination service known.
    pub fn with_service(mut self, service: &'a str) -> Self {
        self.service = Some(service);
        self
    }

    /// The request with `connection.sni` known.
    pub fn with_sni(mut self, sni: Option<&'a str>) -> Self {
        self.sni = sni;
        self
    }
}

/// The HTTP attributes of a request.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    /// Normalized ([`normalize_path`]), without the query.
    pub path: &'a str,
    /// The authority (`:authority` / `Host`).
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The workload a request would reach.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    /// The endpoint's labels; `None` when no endpoint is known (then only
    /// mesh- and namespace-wide policies apply).
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The endpoint's port.
    pub port: Option<u16>,
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// `namespace/name` of the DENY policy that matched; empty for
    /// [`DenyReason::NoAllowMatch`].
    pub policy: String,
    pub reason: DenyReason,
    /// For logs: which rule matched, or which ALLOW policies were tried.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy's rule matched.
    DenyPolicy,
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatch,
}

impl DenyReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DenyReason::DenyPolicy => "deny-policy",
            DenyReason::NoAllowMatch => "no-allow-match",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            DenyReason::DenyPolicy => {
                write!(f, "denied by DENY policy {} ({})", self.policy, self.detail)
            }
            DenyReason::NoAllowMatch => write!(
                f,
                "no rule of the ALLOW policies that select the workload matched ({})",
                self.detail
            ),
        }
    }
}

impl Authz {
    /// Compiles every AuthorizationPolicy of `policy`.
    pub fn compile(policy: &ClusterPolicy) -> Result<Self, CompileError> {
        let mut out = Authz {
            domain: policy.domain.clone(),
            ..Authz::default()
        };
        out.known = policy
            .routes
            .keys()
            .filter(|h| !h.starts_with('*'))
            .chain(policy.exports.keys())
            .chain(policy.destinations.keys())
            .chain(policy.service_entries.keys())
            .cloned()
            .collect();
        for p in &policy.authz {
            let compiled = compile_policy(p, &policy.domain)?;
            out.has_dry_run |= compiled.dry_run;
            out.has_hosts |= compiled.rules.iter().any(|r| {
                r.to.iter()
                    .any(|o| !o.hosts.is_empty() || !o.not_hosts.is_empty())
            });
            let i = out.policies.len();
            if compiled.scope == AuthzScope::Mesh {
                out.mesh.push(i);
            } else {
                out.by_namespace
                    .entry(compiled.namespace.clone())
                    .or_default()
                    .push(i);
            }
            out.policies.push(compiled);
        }
        Ok(out)
    }

    /// The service a request's authority names, resolved as the router
    /// resolves it ([`meshfed_policy::snapshot::host_candidates`]): the
    /// first candidate that is a service the snapshot knows, or the
    /// request's destination service. Short names resolve in the caller's
    /// namespace (from its principal), else in the workload's. `None` for
    /// a TCP stream, or an authority that names no known service (then
    /// `hosts` match the authority as written only).
    pub fn canonical_authority(&self, req: &Request<'_>, namespace: &str) -> Option<String> {
        let http = req.http.as_ref()?;
        let ns = req.namespace.unwrap_or(namespace);
        meshfed_policy::snapshot::host_candidates(&self.domain, http.host, ns)
            .into_iter()
            .find(|h| self.known.contains(h) || req.service == Some(h.as_str()))
    }

    /// Whether there are no policies at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The enforced policies that may apply to a workload of `namespace`.
    fn in_scope(&self, namespace: &str) -> impl Iterator<Item = &Policy> {
        self.scoped(namespace).filter(|p| !p.dry_run)
    }

    /// Every policy, enforced or dry-run, that may apply in `namespace`.
    fn scoped(&self, namespace: &str) -> impl Iterator<Item = &Policy> {
        self.mesh
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .filter_map(|i| self.policies.get(*i))
    }

    /// Evaluates the dry-run policies (`istio.io/dry-run: "true"`) that
    /// apply to a request to a service in `namespace`, as Istio's shadow
    /// rules do: they never change the decision, they are only reported to
    /// `f`, once per policy. A policy that tells endpoints apart (selector,
    /// port) is evaluated on each candidate it selects, and would deny when
    /// it would deny any of them (the enforced decision is as strict,
    /// [`Authz::filter`]); AUDIT policies are not reported.
    pub fn dry_run(
        &self,
        req: &Request<'_>,
        namespace: &str,
        candidates: &[&Endpoint],
        mut f: impl FnMut(DryRun<'_>),
    ) {
        if !self.has_dry_run {
            return;
        }
        let canonical = self
            .has_hosts
            .then(|| self.canonical_authority(req, namespace))
            .flatten();
        let req = &Request {
            canonical_host: canonical.as_deref(),
            ..*req
        };
        for p in self
            .scoped(namespace)
            .filter(|p| p.dry_run && p.action != AuthzAction::Audit)
        {
            let one = |wl: &Workload<'_>| -> Option<bool> {
                if !applies(p, wl) {
                    return None;
                }
                let deny = p.action == AuthzAction::Deny;
                let matched = p.rules.iter().any(|r| rule_matches(r, deny, req, wl));
                Some(matched == deny)
            };
            let verdict = if p.per_endpoint && !candidates.is_empty() {
                candidates
                    .iter()
                    .filter_map(|e| {
                        one(&Workload {
                            namespace,
                            labels: Some(&e.labels),
                            port: Some(e.addr.port()),
                        })
                    })
                    .reduce(|a, b| a || b)
            } else {
                one(&Workload {
                    namespace,
                    labels: None,
                    port: None,
                })
            };
            if let Some(would_deny) = verdict {
                f(DryRun {
                    policy: &p.name,
                    action: p.action,
                    would_deny,
                });
            }
        }
    }

    /// Whether the decision for a request to `namespace` can differ between
    /// its endpoints (an enforced policy with a selector, or with a port).
    pub fn depends_on_endpoint(&self, namespace: &str) -> bool {
        self.in_scope(namespace).any(|p| p.per_endpoint)
    }

    /// Decides a request for a workload, in Istio's order.
    pub fn decide(&self, req: &Request<'_>, wl: &Workload<'_>) -> Result<(), Denial> {
        if self.has_hosts && req.canonical_host.is_none() && req.http.is_some() {
            let canonical = self.canonical_authority(req, wl.namespace);
            let req = Request {
                canonical_host: canonical.as_deref(),
                ..*req
            };
            return self.decide_resolved(&req, wl);
        }
        self.decide_resolved(req, wl)
    }

    fn decide_resolved(&self, req: &Request<'_>, wl: &Workload<'_>) -> Result<(), Denial> {
        let applies = |p: &&Policy| applies(p, wl);
        for p in self
            .in_scope(wl.namespace)
            .filter(|p| p.action == AuthzAction::Deny)
            .filter(applies)
        {
            if let Some(i) = p.rules.iter().position(|r| rule_matches(r, true, req, wl)) {
                return Err(Denial {
                    policy: p.name.clone(),
                    reason: DenyReason::DenyPolicy,
                    detail: format!("rule {i}"),
                });
            }
        }
        let mut tried: Vec<&str> = Vec::new();
        for p in self
            .in_scope(wl.namespace)
            .filter(|p| p.action == AuthzAction::Allow)
            .filter(applies)
        {
            if p.rules.iter().any(|r| rule_matches(r, false, req, wl)) {
                return Ok(());
            }
            tried.push(&p.name);
        }
        if tried.is_empty() {
            Ok(())
        } else {
            Err(Denial {
                policy: String::new(),
                reason: DenyReason::NoAllowMatch,
                detail: format!("tried {}", tried.join(", ")),
            })
        }
    }
}

/// Whether a policy selects a workload.
fn applies(p: &Policy, wl: &Workload<'_>) -> bool {
    let selected = p.selector.is_empty()
        || wl.labels.is_some_and(|l| {
            p.selector
                .iter()
                .all(|(k, v)| l.get(k).is_some_and(|x| x == v))
        });
    selected && (p.scope == AuthzScope::Mesh || p.namespace == wl.namespace)
}

/// Requests and TCP streams denied by an AuthorizationPolicy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `namespace/name` of the DENY policy that matched; empty when ALLOW
    /// policies applied and none matched.
    pub policy: String,
    /// `deny-policy` or `no-allow-match`.
    pub reason: &'static str,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

/// What dry-run AuthorizationPolicies (`istio.io/dry-run: "true"`) would
/// have decided ([`count_dry_run`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// `namespace/name` of the dry-run policy.
    pub policy: String,
    /// `ALLOW` or `DENY`.
    pub action: &'static str,
    /// `allow` or `deny`: what the policy alone would have decided.
    pub decision: &'static str,
}

/// Authorization's metric set: denials and dry-run decisions.
#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    pub denied: Family<AuthzLabels, Counter>,
    pub dry_run: Family<DryRunLabels, Counter>,
}

impl crate::metrics::Register for AuthzMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "authz_denied",
            "Requests and TCP streams denied by authorization, by policy and reason",
            self.denied.clone(),
        );
        registry.register(
            "authz_dry_run",
            "Requests and TCP streams evaluated by dry-run AuthorizationPolicies (never enforced), by policy, action and the decision it would have made",
            self.dry_run.clone(),
        );
    }
}

/// Counts (and logs at debug level) what the dry-run policies would have
/// decided for a request ([`Authz::dry_run`]), in
/// `meshfed_authz_dry_run_total{policy, action, decision}`.
pub fn count_dry_run(
    metrics: &AuthzMetrics,
    authz: &Authz,
    req: &Request<'_>,
    namespace: &str,
    candidates: &[&Endpoint],
) {
    authz.dry_run(req, namespace, candidates, |d| {
        let (action, decision) = d.labels();
        tracing::debug!(
            policy = d.policy,
            action,
            decision,
            "dry-run authorization policy"
        );
        metrics
            .dry_run
            .get_or_create(&DryRunLabels {
                policy: d.policy.to_string(),
                action,
                decision,
            })
            .inc();
    });
}

impl Authz {
    /// Decides a request to a service in `namespace` for each of its
    /// candidate endpoints, and keeps those that allow it, so that a request
    /// never reaches an endpoint whose policies deny it. When the policies
    /// in scope cannot tell endpoints apart (no selector, no port), one
    /// decision serves all. With no candidate, only mesh- and
    /// namespace-wide policies can apply: a denial is still a denial (403
    /// rather than 503). Returns the first denial when no endpoint is left.
    pub fn filter<'e>(
        &self,
        req: &Request<'_>,
        namespace: &str,
        candidates: Vec<&'e Endpoint>,
    ) -> Result<Vec<&'e Endpoint>, Denial> {
        let nowhere = Workload {
            namespace,
            labels: None,
            port: None,
        };
        // Resolve the authority once for every candidate.
        let canonical = self
            .has_hosts
            .then(|| self.canonical_authority(req, namespace))
            .flatten();
        let resolved = Request {
            canonical_host: canonical.as_deref(),
            ..*req
        };
        let req = &resolved;
        if candidates.is_empty() || !self.depends_on_endpoint(namespace) {
            return self.decide_resolved(req, &nowhere).map(|()| candidates);
        }
        let mut first = None;
        let allowed: Vec<&'e Endpoint> = candidates
            .into_iter()
            .filter(|e| {
                let wl = Workload {
                    namespace,
                    labels: Some(&e.labels),
                    port: Some(e.addr.port()),
                };
                match self.decide_resolved(req, &wl) {
                    Ok(()) => true,
                    Err(d) => {
                        first.get_or_insert(d);
                        false
                    }
                }
            })
            .collect();
        match first {
            Some(d) if allowed.is_empty() => Err(d),
            _ => Ok(allowed),
        }
    }
}

/// Envoy's RBAC filter's body for a denied request, byte for byte.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// How many of a call's candidate endpoints must allow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Those that allow it are kept (a peer's stream: the balancer then
    /// picks among them).
    Some,
    /// Every one (a call this gateway forwards to its own endpoints: the
    /// balancer picks later, so the call is denied if any candidate's
    /// policies deny it; stricter than Istio only when workload policies
    /// differ between the endpoints of one subset).
    Every,
}

/// The authorization decision, one for HTTP and TCP, inbound and outbound:
/// counts what dry-run policies would have decided ([`count_dry_run`]),
/// then returns the candidates that allow `req` to `service` (all of them
/// for [`Need::Every`]) or the [`Denial`]. No policy at all allows
/// everything. The caller counts a denial ([`AuthzMetrics::denied_by`])
/// and answers it.
pub fn authorize<'e>(
    authz: &Authz,
    policy: &ClusterPolicy,
    metrics: &AuthzMetrics,
    req: &Request<'_>,
    service: &str,
    candidates: Vec<&'e Endpoint>,
    need: Need,
) -> Result<Vec<&'e Endpoint>, Denial> {
    if authz.is_empty() {
        return Ok(candidates);
    }
    let namespace = service_namespace(policy, service).unwrap_or("");
    count_dry_run(metrics, authz, req, namespace, &candidates);
    let n = candidates.len();
    let allowed = authz.filter(req, namespace, candidates)?;
    if need == Need::Every && allowed.len() != n {
        return Err(Denial {
            policy: String::new(),
            reason: DenyReason::NoAllowMatch,
            detail: "denied by the policies of some of the endpoints it could reach".into(),
        });
    }
    Ok(allowed)
}

impl AuthzMetrics {
    /// Counts a denial in `meshfed_authz_denied_total`.
    pub fn denied_by(
        &self,
        denial: &Denial,
        source_cluster: &str,
        destination_cluster: &str,
        service: &str,
    ) {
        self.denied
            .get_or_create(&AuthzLabels {
                policy: denial.policy.clone(),
                reason: denial.reason.label(),
                source_cluster: source_cluster.to_string(),
                destination_cluster: destination_cluster.to_string(),
                destination_service: service.to_string(),
            })
            .inc();
    }
}

fn compile_policy(p: &AuthzPolicy, domain: &str) -> Result<Policy, CompileError> {
    let name = format!("{}/{}", p.source.namespace, p.source.name);
    let rules = p
        .rules
        .iter()
        .map(|r| compile_rule(r, &name, &p.namespace, domain))
        .collect::<Result<Vec<_>, _>>()?;
    let has_port = rules.iter().any(|r| {
        r.to.iter()
            .any(|o| !o.ports.is_empty() || !o.not_ports.is_empty())
            || r.when
                .iter()
                .any(|c| matches!(c.attribute, Attribute::DestinationPort))
    });
    Ok(Policy {
        per_endpoint: !p.selector.is_empty() || has_port,
        name,
        namespace: p.namespace.clone(),
        scope: p.scope,
        selector: p
            .selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        action: p.action,
        rules,
        dry_run: p.dry_run,
    })
}

fn compile_rule(
    r: &AuthzRule,
    policy: &str,
    namespace: &str,
    domain: &str,
) -> Result<Rule, CompileError> {
    Ok(Rule {
        from: r
            .from
            .iter()
            .map(|s| compile_source(s, policy))
            .collect::<Result<_, _>>()?,
        to: r
            .to
            .iter()
            .map(|o| compile_operation(o, policy, namespace, domain))
            .collect::<Result<_, _>>()?,
        when: r
            .when
            .iter()
            .map(|c| compile_condition(c, policy))
            .collect::<Result<_, _>>()?,
    })
}

fn compile_source(s: &AuthzSource, policy: &str) -> Result<Source, CompileError> {
    let sa = |v: &[String], field: &'static str| -> Result<Vec<(String, String)>, CompileError> {
        v.iter()
            .map(|x| match x.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_string(), sa.to_string()))
                }
                _ => Err(CompileError::BadValue {
                    policy: policy.to_string(),
                    field,
                    value: x.clone(),
                    why: "a service account is `namespace/name`",
                }),
            })
            .collect()
    };
    Ok(Source {
        principals: Patterns::compile(&s.principals, policy, "principals", false)?,
        not_principals: Patterns::compile(&s.not_principals, policy, "notPrincipals", false)?,
        namespaces: Patterns::compile(&s.namespaces, policy, "namespaces", false)?,
        not_namespaces: Patterns::compile(&s.not_namespaces, policy, "notNamespaces", false)?,
        service_accounts: sa(&s.service_accounts, "serviceAccounts")?,
        not_service_accounts: sa(&s.not_service_accounts, "notServiceAccounts")?,
    })
}

/// Host patterns, plus the canonical service name of each exact one
/// (`ratings`, `ratings.default`, `ratings.default.svc`, a trailing dot →
/// `ratings.default.svc.<domain>`, a port kept), read as the router reads
/// a name from the policy's namespace, so that a `hosts` value and a request
/// authority meet in one spelling.
fn host_patterns(
    values: &[String],
    policy: &str,
    field: &'static str,
    namespace: &str,
    domain: &str,
) -> Result<Patterns, CompileError> {
    let mut pats = Patterns::compile(values, policy, field, true)?;
    let mut extra = Vec::new();
    for p in &pats.0 {
        let Pattern::Exact(x) = p else { continue };
        let (host, port) = match x.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
            _ => (&**x, None),
        };
        let Some(canonical) = meshfed_policy::snapshot::host_candidates(domain, host, namespace)
            .into_iter()
            .next()
        else {
            continue;
        };
        let canonical = match port {
            Some(port) => format!("{canonical}:{port}"),
            None => canonical,
        };
        let p = Pattern::Exact(canonical.into());
        if !pats.0.contains(&p) && !extra.contains(&p) {
            extra.push(p);
        }
    }
    pats.0.extend(extra);
    Ok(pats)
}

fn compile_operation(
    o: &AuthzOperation,
    policy: &str,
    namespace: &str,
    domain: &str,
) -> Result<Operation, CompileError> {
    // A value with braces is a path template, or refused: read as an
    // exact path it would never match (narrowing an ALLOW, and silently
    // dropping a DENY).
    let paths = |v: &[String], field: &'static str| -> Result<Patterns, CompileError> {
        v.iter()
            .map(|x| {
                let p = match path_template::parse(x) {
                    Ok(Some(t)) => Ok(Pattern::Template(Box::new(t))),
                    Ok(None) => Pattern::parse(x),
                    Err(e) => Err(e.reason()),
                };
                p.map_err(|why| CompileError::BadValue {
                    policy: policy.to_string(),
                    field,
                    value: x.clone(),
                    why,
                })
            })
            .collect::<Result<_, _>>()
            .map(Patterns)
    };
    Ok(Operation {
        hosts: host_patterns(&o.hosts, policy, "hosts", namespace, domain)?,
        not_hosts: host_patterns(&o.not_hosts, policy, "notHosts", namespace, domain)?,
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        methods: Patterns::compile(&o.methods, policy, "methods", false)?,
        not_methods: Patterns::compile(&o.not_methods, policy, "notMethods", false)?,
        paths: paths(&o.paths, "paths")?,
        not_paths: paths(&o.not_paths, "notPaths")?,
    })
}

fn compile_condition(c: &AuthzCondition, policy: &str) -> Result<Condition, CompileError> {
    let bad = |value: &str, why: &'static str| CompileError::BadValue {
        policy: policy.to_string(),
        field: "when",
        value: value.to_string(),
        why,
    };
    let attribute = match c.key.as_str() {
        "source.principal" => Attribute::Principal,
        "source.namespace" => Attribute::Namespace,
        "source.cluster" => Attribute::Cluster,
        "destination.port" => Attribute::DestinationPort,
        "connection.sni" => Attribute::Sni,
        key => match key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            Some(h) => match h.to_ascii_lowercase().as_str() {
                // Envoy's pseudo-headers; `:path` (it would carry the query)
                // and `:scheme` are refused by validation, and here.
                ":authority" => Attribute::Authority,
                ":method" => Attribute::Method,
                n if n.starts_with(':') => {
                    return Err(CompileError::UnknownKey {
                        policy: policy.to_string(),
                        key: key.to_string(),
                    });
                }
                n => Attribute::Header(
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| bad(key, "not a valid header name"))?,
                ),
            },
            None => {
                return Err(CompileError::UnknownKey {
                    policy: policy.to_string(),
                    key: key.to_string(),
                });
            }
        },
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(bad(&c.key, "a condition needs values or notValues"));
    }
    let (mut ports, mut not_ports) = (Vec::new(), Vec::new());
    if matches!(attribute, Attribute::DestinationPort) {
        for (src, dst) in [(&c.values, &mut ports), (&c.not_values, &mut not_ports)] {
            for v in src {
                dst.push(
                    v.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad(v, "destination.port takes ports 1..65535"))?,
                );
            }
        }
    }
    let lower = matches!(attribute, Attribute::Sni);
    Ok(Condition {
        values: Patterns::compile(&c.values, policy, "when.values", lower)?,
        not_values: Patterns::compile(&c.not_values, policy, "when.notValues", lower)?,
        attribute,
        ports,
        not_ports,
    })
}

/// Whether a rule matches. `deny` says how HTTP-only fields read for a TCP
/// stream: ignored in a DENY rule, never matching in an ALLOW rule.
fn rule_matches(r: &Rule, deny: bool, req: &Request<'_>, wl: &Workload<'_>) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, req)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, deny, req, wl)))
        && r.when.iter().all(|c| condition_holds(c, deny, req, wl))
}

fn source_matches(s: &Source, req: &Request<'_>) -> bool {
    let sa = |list: &[(String, String)]| {
        req.namespace
            .zip(req.service_account)
            .is_some_and(|(n, a)| {
                list.iter()
                    .any(|(ln, la)| ln.as_str() == n && la.as_str() == a)
            })
    };
    s.principals.holds(&s.not_principals, req.principal)
        && s.namespaces.holds(&s.not_namespaces, req.namespace)
        && (s.service_accounts.is_empty() || sa(&s.service_accounts))
        && (s.not_service_accounts.is_empty() || !sa(&s.not_service_accounts))
}

fn ports_hold(ports: &[u16], not_ports: &[u16], port: Option<u16>) -> bool {
    (ports.is_empty() || port.is_some_and(|p| ports.contains(&p)))
        && (not_ports.is_empty() || !port.is_some_and(|p| not_ports.contains(&p)))
}

fn operation_matches(o: &Operation, deny: bool, req: &Request<'_>, wl: &Workload<'_>) -> bool {
    if !ports_hold(&o.ports, &o.not_ports, wl.port) {
        return false;
    }
    match &req.http {
        None => !o.http_only() || deny,
        Some(h) => {
            let host_ok = |pats: &Patterns| {
                host_matches(pats, h.host)
                    || req
                        .canonical_host
                        .is_some_and(|c| canonical_matches(pats, c, h.host))
            };
            (o.hosts.is_empty() || host_ok(&o.hosts))
                && (o.not_hosts.is_empty() || !host_ok(&o.not_hosts))
                && o.methods.holds(&o.not_methods, Some(h.method))
                && o.paths.holds(&o.not_paths, Some(h.path))
        }
    }
}

/// Hosts match case-insensitively; a pattern without a port also matches
/// the authority with its port stripped (Istio: "matches any port").
fn host_matches(pats: &Patterns, authority: &str) -> bool {
    let lower: Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(authority.to_ascii_lowercase())
    } else {
        Cow::Borrowed(authority)
    };
    let bare = match lower.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(h),
        _ => None,
    };
    pats.any(Some(&lower)) || bare.is_some_and(|b| pats.any(Some(b)))
}

/// Whether a pattern matches the service an authority resolved to, with
/// the authority's port (`ratings.default.svc.cluster.local:9080`) or
/// without it.
fn canonical_matches(pats: &Patterns, canonical: &str, authority: &str) -> bool {
    if pats.any(Some(canonical)) {
        return true;
    }
    match authority.rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            pats.any(Some(&format!("{canonical}:{p}")))
        }
        _ => false,
    }
}

fn condition_holds(c: &Condition, deny: bool, req: &Request<'_>, wl: &Workload<'_>) -> bool {
    let holds = |v: Option<&str>| c.values.holds(&c.not_values, v);
    match &c.attribute {
        Attribute::Principal => holds(req.principal),
        Attribute::Namespace => holds(req.namespace),
        Attribute::Cluster => holds(Some(req.source_cluster)),
        Attribute::Sni => holds(req.sni),
        Attribute::DestinationPort => ports_hold(&c.ports, &c.not_ports, wl.port),
        // HTTP-only, like every header: for a TCP stream ignored in a DENY
        // rule, never matching in an ALLOW rule.
        Attribute::Authority => match &req.http {
            None => deny,
            Some(h) => holds(Some(h.host).filter(|a| !a.is_empty())),
        },
        Attribute::Method => match &req.http {
            None => deny,
            Some(h) => holds(Some(h.method)),
        },
        Attribute::Header(name) => match &req.http {
            None => deny,
            Some(h) => {
                let mut values = h.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => holds(None),
                    (Some(one), None) => holds(one.to_str().ok()),
                    (Some(first), Some(_)) => {
                        // Envoy joins repeated headers with `,`.
                        let joined: Vec<&str> = std::iter::once(first)
                            .chain(h.headers.get_all(name).iter().skip(1))
                            .map(|v| v.to_str().unwrap_or(""))
                            .collect();
                        holds(Some(&joined.join(",")))
                    }
                }
            }
        },
    }
}

/// Why a request path cannot be authorized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the request path `{0}` is not an absolute path")]
    NotAbsolute(String),
    #[error("the request path has an invalid percent-encoding")]
    BadEscape,
    #[error("the request path has an encoded NUL (%00)")]
    Nul,
}

/// Normalizes a request target's path as Envoy's `normalize_path` does
/// (Istio's default `BASE`): percent-encoded unreserved characters are
/// decoded (`%41` → `A`, `%2E` → `.`), then `.` and `..` segments are
/// removed (RFC 3986 §5.2.4); `..` never climbs above the root. A
/// backslash is a slash (`/a\..\admin` is `/admin`), as Envoy's
/// normalization treats it. Escaped slashes and backslashes (`%2F`, `%5C`)
/// stay escaped, and `%00` is refused, as in Istio's default (`BASE`).
/// Returns the path without the query, and the query (with its `?`).
/// `*` (an `OPTIONS *` request) is kept as it is.
pub fn normalize_path(target: &str) -> Result<(Cow<'_, str>, &str), PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, ""),
    };
    if path == "*" {
        return Ok((Cow::Borrowed(path), query));
    }
    if !path.starts_with(['/', '\\']) {
        return Err(PathError::NotAbsolute(target.to_string()));
    }
    let needs_decode = path.contains('%');
    let backslashes = path.contains('\\');
    let has_dots = path.split('/').any(|s| s == "." || s == "..");
    if !needs_decode && !has_dots && !backslashes {
        return Ok((Cow::Borrowed(path), query));
    }
    let mut decoded: Cow<'_, str> = if needs_decode {
        Cow::Owned(decode_unreserved(path)?)
    } else {
        Cow::Borrowed(path)
    };
    if backslashes {
        decoded = Cow::Owned(decoded.replace('\\', "/"));
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    Ok((Cow::Owned(s), query))
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let c = (h * 16 + l) as u8;
            if c == 0 {
                return Err(PathError::Nul);
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                // Reserved or non-ASCII: keep the escape, normalized to
                // upper case.
                out.push('%');
                out.push_str(&format!("{c:02X}"));
            }
            i += 3;
        } else {
            // `path` is a &str, so a multi-byte character stays whole: push
            // it through its char boundary.
            let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&path[i..i + ch_len]);
            i += ch_len;
        }
    }
    Ok(out)
}

/// The namespace of a destination service: `<name>.<ns>.svc.<domain>`, or
/// the namespace of the ServiceEntry that declares the host. `None` when
/// neither (then only mesh-wide policies apply).
pub fn service_namespace<'a>(policy: &'a ClusterPolicy, service: &'a str) -> Option<&'a str> {
    let suffix = policy.domain.as_str();
    if let Some(rest) = service
        .strip_suffix(suffix)
        .and_then(|r| r.strip_suffix(".svc."))
    {
        let mut parts = rest.split('.');
        if let (Some(_name), Some(ns), None) = (parts.next(), parts.next(), parts.next()) {
            return Some(ns);
        }
    }
    policy
        .service_entries
        .get(service)
        .map(|se| se.namespace.as_str())
}
