//! The effective change between two compiled policies, per cluster, in the
//! words a reviewer needs ("reviews.default: 45% of requests move from
//! subset v1 to v2").
//!
//! It compares [`Snapshot`]s, not YAML: files, their order, comments,
//! whitespace and the order of resources never show, and a cluster whose
//! content hash is unchanged has no change. Every other difference shows:
//! the areas a reviewer reads (routes and their weights, matches, timeouts,
//! retries, faults and mirrors; destination rules; failover order;
//! authorization; exports; mTLS; service entries; the federation's
//! clusters) get their own sentences, and anything else a snapshot carries
//! is listed field by field, so no change goes unseen.
//!
//! Pure: the `meshfed-policy diff` CLI reads the two sides (directories or
//! Git commits) and compiles them; this module only compares. It does not
//! validate (an invalid side has no snapshot to compare).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::locality::{self, Preference};
use crate::snapshot::*;

/// The version of the JSON report's shape (`meshfed-policy diff --format
/// json`); bumped when a field changes meaning or goes away.
pub const REPORT_SCHEMA: u32 = 1;

/// Values longer than this are cut in sentences (the JSON snapshot has
/// them whole).
const MAX_VALUE_CHARS: usize = 200;

/// The part of the policy a change is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Area {
    /// The federation's clusters (`Cluster` resources).
    Cluster,
    /// Where services are exported from (`ServiceExport`).
    Export,
    /// VirtualService routes.
    Route,
    /// DestinationRules.
    Destination,
    /// The order in which this cluster's gateways try the clusters that
    /// serve a service.
    Failover,
    /// AuthorizationPolicies.
    Authz,
    /// PeerAuthentication.
    Mtls,
    /// ServiceEntries.
    ServiceEntry,
    /// Mesh-wide settings (domain, trust domain).
    Mesh,
}

/// One effective change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub area: Area,
    /// What it is about: a short host (`reviews.default`), a policy
    /// (`default/deny-admin`), a cluster or namespace name.
    pub subject: String,
    /// A stable name for the kind of change (`added`, `removed`,
    /// `traffic-moved`, `timeout`...; see docs/diff.md).
    pub kind: String,
    /// The sentence for a reviewer.
    pub summary: String,
    /// For `traffic-moved`: the share of requests (or connections) that
    /// go somewhere else, in percent: the sum of the weight increases.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub moved_percent: Option<u32>,
    /// The destination services whose requests the change can serve
    /// differently (the syncer's rollout gates judge these). Empty reads
    /// as [`Reach::Everything`]: a change that does not say what it
    /// reaches may reach anything.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub reaches: Vec<Reach>,
}

impl Change {
    fn new(area: Area, subject: &str, kind: &'static str, summary: String) -> Self {
        Change {
            area,
            subject: printable(subject),
            kind: kind.to_string(),
            summary: printable(&summary),
            moved_percent: None,
            reaches: vec![Reach::Everything],
        }
    }
}

/// What a change can reach: requests to which destination services.
///
/// From the snapshot alone, a change to a host's routes reaches that host
/// and every host its rules (old and new) send or mirror to; a
/// DestinationRule, an export, a failover order or a ServiceEntry reaches
/// its host; an AuthorizationPolicy or a PeerAuthentication reaches every
/// service of its namespace (which workloads a selector picks, and so
/// which services, only discovery knows), or every service when it is
/// mesh-wide; a change of the federation's clusters or of mesh settings
/// reaches everything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    /// Requests to one service, by canonical host (as the gateways'
    /// `destination_service` label says it); a `*.` host reaches every
    /// host under it.
    Service(String),
    /// Requests to any service of a namespace (`NAME.NS.svc.<domain>`).
    Namespace(String),
    /// Requests to any service.
    Everything,
}

/// The union of what some changes reach ([`Reach`]), to ask whether a
/// destination service is among it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    pub everything: bool,
    pub namespaces: BTreeSet<String>,
    pub services: BTreeSet<String>,
    /// The DNS suffix of in-cluster names, to find a service's namespace.
    pub domain: String,
}

impl Reached {
    /// What `changes` reach, in a cluster whose in-cluster suffix is
    /// `domain`.
    pub fn of(changes: &[Change], domain: &str) -> Self {
        let mut r = Reached {
            domain: domain.to_string(),
            ..Reached::default()
        };
        for c in changes {
            if c.reaches.is_empty() {
                r.everything = true;
            }
            for reach in &c.reaches {
                match reach {
                    Reach::Everything => r.everything = true,
                    Reach::Namespace(ns) => {
                        r.namespaces.insert(ns.clone());
                    }
                    Reach::Service(host) => {
                        r.services.insert(host.clone());
                    }
                }
            }
        }
        r
    }

    /// Whether nothing is reached (no change).
    pub fn is_empty(&self) -> bool {
        !self.everything && self.namespaces.is_empty() && self.services.is_empty()
    }

    /// Whether requests to `service` (a canonical host) are reached.
    pub fn contains(&self, service: &str) -> bool {
        if self.everything || self.services.contains(service) {
            return true;
        }
        let wildcard = self.services.iter().any(|h| {
            h.strip_prefix('*').is_some_and(|suffix| {
                suffix.starts_with('.') && service.len() > suffix.len() && service.ends_with(suffix)
            })
        });
        wildcard
            || namespace_of(service, &self.domain).is_some_and(|ns| self.namespaces.contains(ns))
    }
}

/// `NAME.NS.svc.<domain>` → `NS`.
fn namespace_of<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let rest = host.strip_suffix(domain)?.strip_suffix(".svc.")?;
    let (_, ns) = rest.rsplit_once('.')?;
    (!ns.is_empty()).then_some(ns)
}

/// What the changes between one cluster's two policies reach: [`diff`]'s
/// changes, folded ([`Reached::of`]).
pub fn reach(old: &ClusterPolicy, new: &ClusterPolicy) -> Reached {
    Reached::of(&diff(old, new), &new.domain)
}

/// Sets what the changes pushed since `from` reach.
fn reaching(out: &mut [Change], from: usize, reaches: &[Reach]) {
    for c in out.iter_mut().skip(from) {
        c.reaches = reaches.to_vec();
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`): header values,
/// paths and names come from the repository under review, and a sentence
/// must not move a reviewer's cursor, colour the terminal or forge a line
/// of its own.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// What happens to one cluster's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Same content hash: the gateways keep what they enforce.
    Unchanged,
    Changed,
    /// Declared in NEW only.
    Added,
    /// Declared in OLD only.
    Removed,
}

/// One cluster's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDiff {
    pub cluster: String,
    pub status: Status,
    /// Content hashes of the cluster's snapshot on each side.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub old_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub new_hash: Option<String>,
    pub changes: Vec<Change>,
}

/// The change of every cluster, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub clusters: Vec<ClusterDiff>,
}

impl Report {
    /// Whether any cluster's snapshot changes.
    pub fn changed(&self) -> bool {
        self.clusters.iter().any(|c| c.status != Status::Unchanged)
    }

    /// Plain text, one line per change, `cluster: sentence`, then a
    /// summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.clusters {
            match c.status {
                Status::Unchanged => {
                    out.push_str(&format!("no change for cluster {}\n", c.cluster))
                }
                Status::Removed => out.push_str(&format!(
                    "{}: no longer declared; its gateways get no new snapshot\n",
                    c.cluster
                )),
                Status::Added | Status::Changed => {
                    if c.status == Status::Added {
                        out.push_str(&format!(
                            "{}: new cluster; its gateways get their first snapshot\n",
                            c.cluster
                        ));
                    }
                    for ch in &c.changes {
                        out.push_str(&format!("{}: {}\n", c.cluster, ch.summary));
                    }
                }
            }
        }
        out.push_str(&self.summary_line());
        out.push('\n');
        out
    }

    /// "effective change in 2 of 3 clusters (east, west)" or "no
    /// effective change".
    pub fn summary_line(&self) -> String {
        let changed: Vec<&str> = self
            .clusters
            .iter()
            .filter(|c| c.status != Status::Unchanged)
            .map(|c| c.cluster.as_str())
            .collect();
        if changed.is_empty() {
            format!(
                "no effective change ({} cluster(s) compared)",
                self.clusters.len()
            )
        } else {
            format!(
                "effective change in {} of {} cluster(s): {}",
                changed.len(),
                self.clusters.len(),
                changed.join(", ")
            )
        }
    }

    /// Markdown for a pull request comment: a heading naming the two
    /// sides, a section per changed cluster, and the unchanged ones on one
    /// line. Starts with an HTML comment a CI job can find to update its
    /// previous comment.
    pub fn markdown(&self, old: &str, new: &str) -> String {
        let mut out = String::from("<!-- meshfed-policy-diff -->\n");
        out.push_str(&format!(
            "### Mesh policy: effective change `{}` → `{}`\n\n",
            md_code(old),
            md_code(new)
        ));
        out.push_str(&format!("**{}**\n", md_escape(&self.summary_line())));
        for c in &self.clusters {
            let heading = match c.status {
                Status::Unchanged => continue,
                Status::Changed => String::new(),
                Status::Added => " (new cluster)".to_string(),
                Status::Removed => " (no longer declared)".to_string(),
            };
            out.push_str(&format!("\n#### `{}`{heading}\n\n", md_code(&c.cluster)));
            if c.status == Status::Removed {
                out.push_str("- its gateways get no new snapshot\n");
            }
            for ch in &c.changes {
                out.push_str(&format!("- {}\n", md_escape(&ch.summary)));
            }
        }
        let same: Vec<String> = self
            .clusters
            .iter()
            .filter(|c| c.status == Status::Unchanged)
            .map(|c| format!("`{}`", md_code(&c.cluster)))
            .collect();
        if !same.is_empty() {
            out.push_str(&format!("\nNo change for {}.\n", same.join(", ")));
        }
        out
    }
}

/// Backticks cannot be escaped inside a code span: they become `'`.
fn md_code(s: &str) -> String {
    s.replace('`', "'").replace('\n', " ")
}

/// Escapes what Markdown would read as markup in a sentence (`*` in
/// paths, `_`, `<`...), so `GET /admin/*` shows as written.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(
            ch,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '~'
        ) {
            out.push('\\');
        }
        if ch == '\n' {
            out.push(' ');
        } else {
            out.push(ch);
        }
    }
    out
}

/// The change of every cluster between two sets of snapshots (cluster →
/// snapshot), as a commit's compile gives them.
pub fn diff_clusters(old: &BTreeMap<String, Snapshot>, new: &BTreeMap<String, Snapshot>) -> Report {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let clusters = names
        .into_iter()
        .map(|name| {
            let (o, n) = (old.get(name), new.get(name));
            let changes = match (o, n) {
                (Some(o), Some(n)) => diff(&o.policy, &n.policy),
                // A new cluster's gateways get everything: compare with an
                // empty policy of the same cluster.
                (None, Some(n)) => diff(&empty_like(&n.policy), &n.policy),
                _ => Vec::new(),
            };
            let status = match (o, n) {
                (Some(o), Some(n)) if o.content_hash == n.content_hash => Status::Unchanged,
                // Another snapshot, but only lists whose order means
                // nothing were reordered (`canonical`).
                (Some(_), Some(_)) if changes.is_empty() => Status::Unchanged,
                (Some(_), Some(_)) => Status::Changed,
                (None, _) => Status::Added,
                (_, None) => Status::Removed,
            };
            ClusterDiff {
                cluster: name.clone(),
                status,
                old_hash: o.map(|s| s.content_hash.clone()),
                new_hash: n.map(|s| s.content_hash.clone()),
                changes,
            }
        })
        .collect();
    Report { clusters }
}

fn empty_like(p: &ClusterPolicy) -> ClusterPolicy {
    ClusterPolicy {
        cluster: p.cluster.clone(),
        domain: p.domain.clone(),
        trust_domain: p.trust_domain.clone(),
        ..Default::default()
    }
}

/// The effective changes from `old` to `new`, one cluster's policy; empty
/// exactly when they are equal.
pub fn diff(old: &ClusterPolicy, new: &ClusterPolicy) -> Vec<Change> {
    if old == new {
        return Vec::new();
    }
    // Lists whose order means nothing are compared as sets.
    let (old, new) = (&canonical(old), &canonical(new));
    let mut out = Vec::new();
    let d = Differ { old, new };
    d.clusters(&mut out);
    d.exports(&mut out);
    d.routes(&mut out);
    d.destinations(&mut out);
    d.failover(&mut out);
    d.authz(&mut out);
    d.mtls(&mut out);
    d.service_entries(&mut out);
    d.mesh(&mut out);
    if out.is_empty() {
        // A difference no area above describes (a field added to the
        // snapshot later): say so field by field rather than "no change".
        for leaf in leaves_of(old, new) {
            out.push(Change::new(Area::Mesh, "", "other", leaf.to_string()));
        }
    }
    out
}

/// `p` with every list whose order has no effect put in one order, so that
/// reordering them is no effective change: the match conditions of a rule
/// (any one matches), its weighted destinations (the split is by weight)
/// and mirrors, TCP ports, and everything in an
/// AuthorizationPolicy (rules, sources, operations and conditions are
/// each "any of" or "all of"). Route rules keep their order (the first
/// match wins), and so do failover and locality preferences.
fn canonical(p: &ClusterPolicy) -> ClusterPolicy {
    fn set<T: Serialize>(v: &mut [T]) {
        v.sort_by_cached_key(|x| serde_json::to_string(x).unwrap_or_default());
    }
    let mut p = p.clone();
    for r in p.routes.values_mut() {
        for h in &mut r.http {
            set(&mut h.matches);
            set(&mut h.destinations);
            set(&mut h.mirrors);
        }
        for t in &mut r.tcp {
            set(&mut t.ports);
            set(&mut t.destinations);
        }
    }
    for a in &mut p.authz {
        for r in &mut a.rules {
            for f in &mut r.from {
                for l in [
                    &mut f.principals,
                    &mut f.not_principals,
                    &mut f.namespaces,
                    &mut f.not_namespaces,
                    &mut f.service_accounts,
                    &mut f.not_service_accounts,
                ] {
                    set(l);
                }
            }
            for o in &mut r.to {
                for l in [
                    &mut o.hosts,
                    &mut o.not_hosts,
                    &mut o.methods,
                    &mut o.not_methods,
                    &mut o.paths,
                    &mut o.not_paths,
                ] {
                    set(l);
                }
                set(&mut o.ports);
                set(&mut o.not_ports);
            }
            for c in &mut r.when {
                set(&mut c.values);
                set(&mut c.not_values);
            }
            set(&mut r.from);
            set(&mut r.to);
            set(&mut r.when);
        }
        set(&mut a.rules);
    }
    p
}

struct Differ<'a> {
    old: &'a ClusterPolicy,
    new: &'a ClusterPolicy,
}

/// `reviews.default.svc.cluster.local` → `reviews.default`; other hosts as
/// they are.
fn short<'a>(host: &'a str, domain: &str) -> &'a str {
    host.strip_suffix(domain)
        .and_then(|h| h.strip_suffix(".svc."))
        .unwrap_or(host)
}

fn keys<'a, V>(a: &'a BTreeMap<String, V>, b: &'a BTreeMap<String, V>) -> BTreeSet<&'a String> {
    a.keys().chain(b.keys()).collect()
}

fn list<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn ms(v: u64) -> String {
    if v > 0 && v.is_multiple_of(1000) {
        format!("{}s", v / 1000)
    } else {
        format!("{v}ms")
    }
}

fn pct(ppm: u32) -> String {
    let whole = ppm / 10_000;
    let frac = ppm % 10_000;
    if frac == 0 {
        format!("{whole}%")
    } else {
        let f = format!("{frac:04}");
        format!("{whole}.{}%", f.trim_end_matches('0'))
    }
}

impl Differ<'_> {
    fn s<'h>(&self, host: &'h str) -> &'h str {
        short(host, &self.new.domain)
    }

    fn clusters(&self, out: &mut Vec<Change>) {
        let (o, n) = (&self.old.clusters, &self.new.clusters);
        for name in keys(o, n) {
            match (o.get(name), n.get(name)) {
                (None, Some(c)) => out.push(Change::new(
                    Area::Cluster,
                    name,
                    "added",
                    format!(
                        "cluster {name} joins the federation (gateways {})",
                        list(&c.gateways)
                    ),
                )),
                (Some(_), None) => out.push(Change::new(
                    Area::Cluster,
                    name,
                    "removed",
                    format!("cluster {name} leaves the federation"),
                )),
                (Some(a), Some(b)) if a != b => {
                    for leaf in leaves_of(a, b) {
                        out.push(Change::new(
                            Area::Cluster,
                            name,
                            "changed",
                            format!("cluster {name}: {leaf}"),
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    fn exports(&self, out: &mut Vec<Change>) {
        let (o, n) = (&self.old.exports, &self.new.exports);
        for host in keys(o, n) {
            let s = self.s(host);
            let (a, b) = (o.get(host), n.get(host));
            let (kind, summary) = match (a, b) {
                (None, Some(b)) => ("added", format!("{s}: now exported from {}", list(b))),
                (Some(a), None) => (
                    "removed",
                    format!(
                        "{s}: no longer exported (was from {}); other clusters cannot reach it",
                        list(a)
                    ),
                ),
                (Some(a), Some(b)) if a != b => (
                    "changed",
                    format!("{s}: exported from {} (was {})", list(b), list(a)),
                ),
                _ => continue,
            };
            let mut c = Change::new(Area::Export, s, kind, summary);
            c.reaches = vec![Reach::Service(host.clone())];
            out.push(c);
        }
    }

    fn routes(&self, out: &mut Vec<Change>) {
        let (o, n) = (&self.old.routes, &self.new.routes);
        for host in keys(o, n) {
            let s = self.s(host);
            let from = out.len();
            match (o.get(host), n.get(host)) {
                (None, Some(r)) => out.push(Change::new(
                    Area::Route,
                    s,
                    "added",
                    format!(
                        "{s}: new routes ({}): {}",
                        r.source.key(),
                        self.describe_routes(host, r)
                    ),
                )),
                (Some(r), None) => out.push(Change::new(
                    Area::Route,
                    s,
                    "removed",
                    format!(
                        "{s}: routes removed (were {}); requests go to the service itself, any endpoint",
                        self.describe_routes(host, r)
                    ),
                )),
                (Some(a), Some(b)) if a != b => self.host_routes(host, a, b, out),
                _ => {}
            }
            reaching(out, from, &route_reach(host, o.get(host), n.get(host)));
        }
    }

    fn describe_routes(&self, host: &str, r: &HostRoutes) -> String {
        let mut parts: Vec<String> = r
            .http
            .iter()
            .map(|h| {
                format!(
                    "{} → {}",
                    describe_matches(&h.matches),
                    self.describe_dests(host, &h.destinations)
                )
            })
            .collect();
        parts.extend(r.tcp.iter().map(|t| {
            format!(
                "TCP {} → {}",
                describe_ports(&t.ports),
                self.describe_dests(host, &t.destinations)
            )
        }));
        if parts.is_empty() {
            "no rule".into()
        } else {
            parts.join("; ")
        }
    }

    fn dest_name(
        &self,
        route_host: &str,
        host: &str,
        subset: Option<&str>,
        port: Option<u16>,
    ) -> String {
        let mut s = match subset {
            Some(sub) if host == route_host => format!("subset {sub}"),
            Some(sub) => format!("{}/{sub}", self.s(host)),
            None => self.s(host).to_string(),
        };
        if let Some(p) = port {
            s.push_str(&format!(":{p}"));
        }
        s
    }

    fn describe_dests(&self, route_host: &str, d: &[WeightedDestination]) -> String {
        if d.is_empty() {
            return "no destination (answered with an error)".into();
        }
        d.iter()
            .map(|d| {
                format!(
                    "{} {}%",
                    self.dest_name(route_host, &d.host, d.subset.as_deref(), d.port),
                    d.weight
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn host_routes(&self, host: &str, a: &HostRoutes, b: &HostRoutes, out: &mut Vec<Change>) {
        let s = self.s(host);
        if a.source != b.source {
            out.push(Change::new(
                Area::Route,
                s,
                "source",
                format!(
                    "{s}: routes now come from {} (was {})",
                    b.source.key(),
                    a.source.key()
                ),
            ));
        }
        // Rules are identified by what they match: the first match wins,
        // so a rule's place among the others matters too.
        let key = |h: &HttpRoute| serde_json::to_string(&h.matches).unwrap_or_default();
        let nth = |rules: &[HttpRoute]| -> Vec<(String, usize)> {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            rules
                .iter()
                .map(|h| {
                    let k = key(h);
                    let i = seen.entry(k.clone()).or_default();
                    *i += 1;
                    (k, *i)
                })
                .collect()
        };
        let (ka, kb) = (nth(&a.http), nth(&b.http));
        let many = a.http.len() > 1 || b.http.len() > 1;
        let label = |h: &HttpRoute| {
            if many || !h.matches.is_empty() {
                format!("{s} ({})", describe_matches(&h.matches))
            } else {
                s.to_string()
            }
        };
        for (i, k) in kb.iter().enumerate() {
            match ka.iter().position(|x| x == k) {
                Some(j) => self.http_rule(host, &label(&b.http[i]), &a.http[j], &b.http[i], out),
                None => out.push(Change::new(
                    Area::Route,
                    s,
                    "rule-added",
                    format!(
                        "{s}: new rule {} of {}: {} → {}",
                        i + 1,
                        b.http.len(),
                        describe_matches(&b.http[i].matches),
                        self.describe_dests(host, &b.http[i].destinations)
                    ),
                )),
            }
        }
        for (j, k) in ka.iter().enumerate() {
            if !kb.contains(k) {
                out.push(Change::new(
                    Area::Route,
                    s,
                    "rule-removed",
                    format!(
                        "{s}: rule removed: {} → {} (those requests now fall to the next rule that matches)",
                        describe_matches(&a.http[j].matches),
                        self.describe_dests(host, &a.http[j].destinations)
                    ),
                ));
            }
        }
        let common_a: Vec<&(String, usize)> = ka.iter().filter(|k| kb.contains(k)).collect();
        let common_b: Vec<&(String, usize)> = kb.iter().filter(|k| ka.contains(k)).collect();
        if common_a != common_b {
            let order =
                |rules: &[HttpRoute], ks: &[(String, usize)], common: &[&(String, usize)]| {
                    common
                        .iter()
                        .filter_map(|k| ks.iter().position(|x| x == *k))
                        .map(|i| describe_matches(&rules[i].matches))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
            out.push(Change::new(
                Area::Route,
                s,
                "rule-order",
                format!(
                    "{s}: rules are tried in a new order (the first match wins): [{}] → [{}]",
                    order(&a.http, &ka, &common_a),
                    order(&b.http, &kb, &common_b)
                ),
            ));
        }
        if a.tcp != b.tcp {
            if a.tcp.len() == b.tcp.len()
                && a.tcp.iter().zip(&b.tcp).all(|(x, y)| x.ports == y.ports)
            {
                for (x, y) in a.tcp.iter().zip(&b.tcp) {
                    let label = format!("{s} TCP {}", describe_ports(&y.ports));
                    self.weights(
                        host,
                        &label,
                        "connections",
                        &x.destinations,
                        &y.destinations,
                        out,
                    );
                    let strip = |t: &TcpRoute| TcpRoute {
                        destinations: Vec::new(),
                        ..t.clone()
                    };
                    if strip(x) != strip(y) {
                        for leaf in leaves_of(&strip(x), &strip(y)) {
                            out.push(Change::new(
                                Area::Route,
                                s,
                                "tcp",
                                format!("{label}: {leaf}"),
                            ));
                        }
                    }
                }
            } else {
                let d = |r: &HostRoutes| {
                    let t = HostRoutes {
                        http: Vec::new(),
                        ..r.clone()
                    };
                    self.describe_routes(host, &t)
                };
                out.push(Change::new(
                    Area::Route,
                    s,
                    "tcp",
                    format!("{s}: TCP rules change: {} → {}", d(a), d(b)),
                ));
            }
        }
    }

    fn http_rule(
        &self,
        host: &str,
        label: &str,
        a: &HttpRoute,
        b: &HttpRoute,
        out: &mut Vec<Change>,
    ) {
        if a == b {
            return;
        }
        let s = self.s(host);
        let push = |out: &mut Vec<Change>, kind, summary: String| {
            out.push(Change::new(Area::Route, s, kind, summary));
        };
        if a.name != b.name {
            push(
                out,
                "rule-name",
                format!("{label}: rule name `{}` → `{}`", a.name, b.name),
            );
        }
        self.weights(
            host,
            label,
            "requests",
            &a.destinations,
            &b.destinations,
            out,
        );
        if a.timeout_ms != b.timeout_ms {
            let t = |v: Option<u64>| v.map_or("none".to_string(), ms);
            push(
                out,
                "timeout",
                format!("{label}: timeout {} → {}", t(a.timeout_ms), t(b.timeout_ms)),
            );
        }
        if a.retries != b.retries {
            push(
                out,
                "retries",
                format!(
                    "{label}: retries {} → {}",
                    describe_retries(&a.retries),
                    describe_retries(&b.retries)
                ),
            );
        }
        match (&a.fault, &b.fault) {
            (None, Some(f)) => push(
                out,
                "fault",
                format!("{label}: new fault injection: {}", describe_fault(f)),
            ),
            (Some(f), None) => push(
                out,
                "fault",
                format!(
                    "{label}: fault injection removed (was {})",
                    describe_fault(f)
                ),
            ),
            (Some(x), Some(y)) if x != y => push(
                out,
                "fault",
                format!(
                    "{label}: fault injection {} → {}",
                    describe_fault(x),
                    describe_fault(y)
                ),
            ),
            _ => {}
        }
        if a.mirrors != b.mirrors {
            let m = |v: &[Mirror]| -> BTreeMap<String, u32> {
                v.iter()
                    .map(|m| {
                        (
                            self.dest_name("", &m.host, m.subset.as_deref(), m.port),
                            m.percent_ppm,
                        )
                    })
                    .collect()
            };
            let (ma, mb) = (m(&a.mirrors), m(&b.mirrors));
            for k in keys(&ma, &mb) {
                let summary = match (ma.get(k), mb.get(k)) {
                    (None, Some(p)) => {
                        format!("{label}: now mirrors {} of requests to {k}", pct(*p))
                    }
                    (Some(p), None) => {
                        format!(
                            "{label}: no longer mirrors requests to {k} (was {})",
                            pct(*p)
                        )
                    }
                    (Some(x), Some(y)) if x != y => {
                        format!(
                            "{label}: mirror to {k}: {} → {} of requests",
                            pct(*x),
                            pct(*y)
                        )
                    }
                    _ => continue,
                };
                push(out, "mirror", summary);
            }
            if ma == mb {
                push(
                    out,
                    "mirror",
                    format!(
                        "{label}: mirrors {} → {}",
                        compact(&a.mirrors),
                        compact(&b.mirrors)
                    ),
                );
            }
        }
        // The rest, field by field: header edits, rewrites.
        let rest = |h: &HttpRoute| HttpRoute {
            name: String::new(),
            matches: Vec::new(),
            destinations: Vec::new(),
            timeout_ms: None,
            retries: RetryPolicy::default(),
            fault: None,
            mirrors: Vec::new(),
            ..h.clone()
        };
        for leaf in leaves_of(&rest(a), &rest(b)) {
            push(out, "headers", format!("{label}: {leaf}"));
        }
    }

    /// Weight changes of one rule's destinations, as traffic moved.
    fn weights(
        &self,
        host: &str,
        label: &str,
        what: &str,
        a: &[WeightedDestination],
        b: &[WeightedDestination],
        out: &mut Vec<Change>,
    ) {
        let s = self.s(host);
        let w = |v: &[WeightedDestination]| -> BTreeMap<String, u32> {
            let mut m = BTreeMap::new();
            for d in v {
                *m.entry(self.dest_name(host, &d.host, d.subset.as_deref(), d.port))
                    .or_insert(0) += d.weight;
            }
            m
        };
        let (wa, wb) = (w(a), w(b));
        if wa != wb {
            if wb.is_empty() || wb.values().all(|v| *v == 0) {
                out.push(Change::new(
                    Area::Route,
                    s,
                    "traffic-moved",
                    format!(
                        "{label}: {what} no longer go to any destination (was {}); the gateway answers them with an error",
                        self.describe_dests(host, a)
                    ),
                ));
            } else {
                let mut lose: Vec<(String, u32)> = Vec::new();
                let mut gain: Vec<(String, u32)> = Vec::new();
                let mut detail = Vec::new();
                for k in keys(&wa, &wb) {
                    let (x, y) = (
                        wa.get(k).copied().unwrap_or(0),
                        wb.get(k).copied().unwrap_or(0),
                    );
                    if x > y {
                        lose.push((k.clone(), x - y));
                    } else if y > x {
                        gain.push((k.clone(), y - x));
                    }
                    if x != y {
                        detail.push(format!("{k} {x}% → {y}%"));
                    }
                }
                let moved: u32 = gain.iter().map(|(_, d)| d).sum();
                let names = |v: &mut Vec<(String, u32)>| {
                    v.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
                    list(v.iter().map(|(k, _)| k.as_str()))
                };
                let from = if lose.is_empty() {
                    String::new()
                } else {
                    format!(" from {}", names(&mut lose))
                };
                let mut c = Change::new(
                    Area::Route,
                    s,
                    "traffic-moved",
                    format!(
                        "{label}: {moved}% of {what} move{from} to {} ({})",
                        names(&mut gain),
                        detail.join(", ")
                    ),
                );
                c.moved_percent = Some(moved);
                out.push(c);
            }
        }
        // Edits of headers per destination, or a new order of the same
        // weights: field by field.
        let weightless = |v: &[WeightedDestination]| {
            let mut v: Vec<WeightedDestination> = v
                .iter()
                .map(|d| WeightedDestination {
                    weight: 0,
                    ..d.clone()
                })
                .collect();
            v.sort_by_key(compact);
            v
        };
        let (xa, xb) = (weightless(a), weightless(b));
        if xa != xb && wa.keys().eq(wb.keys()) {
            out.push(Change::new(
                Area::Route,
                s,
                "headers",
                format!(
                    "{label}: destinations' header edits {} → {}",
                    compact(&xa),
                    compact(&xb)
                ),
            ));
        }
    }

    fn destinations(&self, out: &mut Vec<Change>) {
        let (o, n) = (&self.old.destinations, &self.new.destinations);
        for host in keys(o, n) {
            let s = self.s(host);
            let from = out.len();
            match (o.get(host), n.get(host)) {
                (None, Some(d)) => {
                    let mut settings: Vec<String> =
                        leaves_of(&TrafficPolicy::default(), &d.traffic_policy)
                            .iter()
                            .map(|l| l.after_only())
                            .collect();
                    settings.retain(|x| !x.is_empty());
                    out.push(Change::new(
                        Area::Destination,
                        s,
                        "added",
                        format!(
                            "{s}: new {}: subsets {}{}",
                            d.source.key(),
                            describe_subsets(d),
                            if settings.is_empty() {
                                String::new()
                            } else {
                                format!("; {}", settings.join(", "))
                            }
                        ),
                    ))
                }
                (Some(d), None) => out.push(Change::new(
                    Area::Destination,
                    s,
                    "removed",
                    format!(
                        "{s}: DestinationRule removed (was {}, subsets {}); Istio's defaults apply",
                        d.source.key(),
                        describe_subsets(d)
                    ),
                )),
                (Some(a), Some(b)) if a != b => self.destination(s, a, b, out),
                _ => {}
            }
            reaching(out, from, &[Reach::Service(host.clone())]);
        }
    }

    fn destination(
        &self,
        s: &str,
        a: &DestinationPolicy,
        b: &DestinationPolicy,
        out: &mut Vec<Change>,
    ) {
        let push = |out: &mut Vec<Change>, kind, summary: String| {
            out.push(Change::new(Area::Destination, s, kind, summary));
        };
        if a.source != b.source {
            push(
                out,
                "source",
                format!(
                    "{s}: DestinationRule now {} (was {})",
                    b.source.key(),
                    a.source.key()
                ),
            );
        }
        traffic_policy(s, &a.traffic_policy, &b.traffic_policy, out);
        for name in keys(&a.subsets, &b.subsets) {
            match (a.subsets.get(name), b.subsets.get(name)) {
                (None, Some(x)) => push(
                    out,
                    "subset-added",
                    format!("{s}: new subset {name} ({})", labels(&x.labels)),
                ),
                (Some(x), None) => push(
                    out,
                    "subset-removed",
                    format!(
                        "{s}: subset {name} removed (was {}); routes to it find no endpoint",
                        labels(&x.labels)
                    ),
                ),
                (Some(x), Some(y)) => {
                    if x.labels != y.labels {
                        push(
                            out,
                            "subset-labels",
                            format!(
                                "{s}: subset {name} selects {} (was {})",
                                labels(&y.labels),
                                labels(&x.labels)
                            ),
                        );
                    }
                    // A subset that inherits the rule's policy on both
                    // sides changed with it: said once above.
                    let inherits = x.traffic_policy == a.traffic_policy
                        && y.traffic_policy == b.traffic_policy;
                    if !inherits {
                        traffic_policy(
                            &format!("{s} subset {name}"),
                            &x.traffic_policy,
                            &y.traffic_policy,
                            out,
                        );
                    }
                }
                (None, None) => {}
            }
        }
    }

    fn failover(&self, out: &mut Vec<Change>) {
        let hosts: BTreeSet<&String> = self
            .old
            .exports
            .keys()
            .chain(self.new.exports.keys())
            .collect();
        for host in hosts {
            let order = |p: &ClusterPolicy| {
                let candidates = p.exports.get(host)?;
                let setting = locality::setting(p, host, None, None);
                Some(locality::failover_order(p, setting, candidates))
            };
            let (a, b) = (order(self.old), order(self.new));
            // A service newly exported or no longer exported: said by the
            // export change.
            if let (Some(a), Some(b)) = (a, b)
                && a != b
            {
                let s = self.s(host);
                let mut c = Change::new(
                    Area::Failover,
                    s,
                    "failover-order",
                    format!(
                        "failover order for {s} changes from {} to {}",
                        describe_preference(&a),
                        describe_preference(&b)
                    ),
                );
                c.reaches = vec![Reach::Service(host.clone())];
                out.push(c);
            }
        }
    }

    fn authz(&self, out: &mut Vec<Change>) {
        let from = out.len();
        self.authz_changes(out);
        // What a policy reaches, by its key (a change's subject), on
        // either side.
        let mut reaches: BTreeMap<String, BTreeSet<Reach>> = BTreeMap::new();
        for p in self.old.authz.iter().chain(&self.new.authz) {
            let r = match p.scope {
                AuthzScope::Mesh => Reach::Everything,
                AuthzScope::Namespace | AuthzScope::Workload => {
                    Reach::Namespace(p.namespace.clone())
                }
            };
            reaches
                .entry(printable(&format!("{}/{}", p.namespace, p.source.name)))
                .or_default()
                .insert(r);
        }
        for c in out.iter_mut().skip(from) {
            c.reaches = reaches
                .get(&c.subject)
                .map_or_else(|| vec![Reach::Everything], |r| r.iter().cloned().collect());
        }
    }

    fn authz_changes(&self, out: &mut Vec<Change>) {
        let by_key = |v: &[AuthzPolicy]| -> BTreeMap<String, AuthzPolicy> {
            v.iter()
                .map(|p| (format!("{}/{}", p.namespace, p.source.name), p.clone()))
                .collect()
        };
        let (o, n) = (by_key(&self.old.authz), by_key(&self.new.authz));
        let anon = |p: &AuthzPolicy| AuthzPolicy {
            source: SourceRef::default(),
            ..p.clone()
        };
        let mut added: Vec<&String> = n.keys().filter(|k| !o.contains_key(*k)).collect();
        let mut removed: Vec<&String> = o.keys().filter(|k| !n.contains_key(*k)).collect();
        // A policy renamed without another change: one sentence, not a
        // removal and an addition.
        removed.retain(|r| {
            let Some(i) = added.iter().position(|a| anon(&n[*a]) == anon(&o[*r])) else {
                return true;
            };
            let a = added.remove(i);
            out.push(Change::new(
                Area::Authz,
                a,
                "renamed",
                format!("AuthorizationPolicy {r} is now named {a}; it enforces the same rules"),
            ));
            false
        });
        for k in added {
            let p = &n[k];
            out.push(Change::new(
                Area::Authz,
                k,
                "added",
                format!(
                    "new {} ({})",
                    describe_authz(p, &self.new.domain),
                    p.source.key()
                ),
            ));
        }
        for k in removed {
            let p = &o[k];
            out.push(Change::new(
                Area::Authz,
                k,
                "removed",
                format!(
                    "{} removed: {}",
                    p.source.key(),
                    describe_authz(p, &self.old.domain)
                ),
            ));
        }
        for (k, a) in &o {
            let Some(b) = n.get(k) else { continue };
            if a == b {
                continue;
            }
            let push = |out: &mut Vec<Change>, kind, summary: String| {
                out.push(Change::new(Area::Authz, k, kind, summary));
            };
            let what = b.source.key();
            if a.action != b.action
                || a.scope != b.scope
                || a.selector != b.selector
                || a.namespace != b.namespace
            {
                push(
                    out,
                    "changed",
                    format!(
                        "{what}: now {} (was {})",
                        describe_authz(b, &self.new.domain),
                        describe_authz(a, &self.old.domain)
                    ),
                );
                continue;
            }
            if a.dry_run != b.dry_run {
                push(
                    out,
                    "dry-run",
                    if b.dry_run {
                        format!(
                            "{what}: now dry-run (counted, not enforced): {}",
                            describe_authz(b, &self.new.domain)
                        )
                    } else {
                        format!(
                            "{what}: now enforced (was dry-run): {}",
                            describe_authz(b, &self.new.domain)
                        )
                    },
                );
            }
            let verb = action(b.action);
            let target = authz_target(b, &self.new.domain);
            for r in &b.rules {
                if !a.rules.contains(r) {
                    push(
                        out,
                        "rule-added",
                        format!("{what}: new {verb} on {target} for {}", describe_rule(r)),
                    );
                }
            }
            for r in &a.rules {
                if !b.rules.contains(r) {
                    push(
                        out,
                        "rule-removed",
                        format!(
                            "{what}: no more {verb} on {target} for {}",
                            describe_rule(r)
                        ),
                    );
                }
            }
            if b.rules.is_empty() != a.rules.is_empty() && b.action == AuthzAction::Allow {
                push(
                    out,
                    "rules",
                    match (b.rules.is_empty(), b.dry_run) {
                        (true, false) => format!(
                            "{what}: an ALLOW with no rule matches nothing: every request to {target} is denied"
                        ),
                        (true, true) => format!(
                            "{what}: an ALLOW with no rule matches nothing: every request to {target} would be denied (dry-run: counted, not enforced)"
                        ),
                        (false, false) => format!(
                            "{what}: now has rules (was none, which denied every request to {target})"
                        ),
                        (false, true) => format!(
                            "{what}: now has rules (was none, which counted every request to {target} as denied; dry-run, not enforced)"
                        ),
                    },
                );
            }
            if a.source != b.source {
                push(out, "source", format!("{what}: was {}", a.source.key()));
            }
        }
    }

    fn mtls(&self, out: &mut Vec<Change>) {
        let (a, b) = (&self.old.mtls, &self.new.mtls);
        if a == b {
            return;
        }
        if a.mesh != b.mesh {
            out.push(Change::new(
                Area::Mtls,
                "",
                "mesh",
                format!("mTLS mesh-wide: {} → {}", mode(a.mesh), mode(b.mesh)),
            ));
        }
        for ns in keys(&a.namespaces, &b.namespaces) {
            let m = |v: Option<&MtlsMode>| v.map_or("inherited from the mesh", |m| mode(*m));
            let (x, y) = (a.namespaces.get(ns), b.namespaces.get(ns));
            if x != y {
                let mut c = Change::new(
                    Area::Mtls,
                    ns,
                    "namespace",
                    format!("mTLS in namespace {ns}: {} → {}", m(x), m(y)),
                );
                c.reaches = vec![Reach::Namespace(ns.clone())];
                out.push(c);
            }
        }
        let w = |v: &[WorkloadMtls]| -> BTreeMap<String, WorkloadMtls> {
            v.iter().map(|w| (w.source.key(), w.clone())).collect()
        };
        let (wa, wb) = (w(&a.workloads), w(&b.workloads));
        for k in keys(&wa, &wb) {
            let d = |w: &WorkloadMtls| {
                let mut s = format!(
                    "{} for {} in {}",
                    mode(w.mode),
                    labels(&w.selector),
                    w.namespace
                );
                for (p, m) in &w.ports {
                    s.push_str(&format!(", port {p} {}", mode(*m)));
                }
                s
            };
            let summary = match (wa.get(k), wb.get(k)) {
                (None, Some(x)) => format!("new mTLS {k}: {}", d(x)),
                (Some(x), None) => format!("mTLS {k} removed (was {})", d(x)),
                (Some(x), Some(y)) if x != y => format!("mTLS {k}: {} → {}", d(x), d(y)),
                _ => continue,
            };
            let mut c = Change::new(Area::Mtls, k, "workload", summary);
            let namespaces: BTreeSet<&String> = wa
                .get(k)
                .into_iter()
                .chain(wb.get(k))
                .map(|w| &w.namespace)
                .collect();
            c.reaches = namespaces
                .into_iter()
                .map(|ns| Reach::Namespace(ns.clone()))
                .collect();
            out.push(c);
        }
    }

    fn service_entries(&self, out: &mut Vec<Change>) {
        let (o, n) = (&self.old.service_entries, &self.new.service_entries);
        for host in keys(o, n) {
            let s = self.s(host);
            let from = out.len();
            let d = |e: &ServiceEntry| {
                format!(
                    "{}, ports {}, resolution {:?}{}",
                    e.source.key(),
                    list(
                        e.ports
                            .iter()
                            .map(|p| format!("{}/{}", p.number, p.protocol))
                    ),
                    e.resolution,
                    if e.endpoints.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", endpoints {}",
                            list(e.endpoints.iter().map(|e| e.address.as_str()))
                        )
                    }
                )
            };
            match (o.get(host), n.get(host)) {
                (None, Some(e)) => out.push(Change::new(
                    Area::ServiceEntry,
                    s,
                    "added",
                    format!("{s}: new ServiceEntry ({})", d(e)),
                )),
                (Some(e), None) => out.push(Change::new(
                    Area::ServiceEntry,
                    s,
                    "removed",
                    format!("{s}: ServiceEntry removed (was {})", d(e)),
                )),
                (Some(a), Some(b)) if a != b => {
                    for leaf in leaves_of(a, b) {
                        out.push(Change::new(
                            Area::ServiceEntry,
                            s,
                            "changed",
                            format!("{s}: ServiceEntry {leaf}"),
                        ));
                    }
                }
                _ => {}
            }
            reaching(out, from, &[Reach::Service(host.clone())]);
        }
    }

    fn mesh(&self, out: &mut Vec<Change>) {
        let (a, b) = (self.old, self.new);
        for (name, x, y) in [
            ("cluster", &a.cluster, &b.cluster),
            ("domain", &a.domain, &b.domain),
            ("trust domain", &a.trust_domain, &b.trust_domain),
        ] {
            if x != y {
                out.push(Change::new(
                    Area::Mesh,
                    "",
                    "mesh",
                    format!("{name}: {x} → {y}"),
                ));
            }
        }
    }
}

/// What a change of `host`'s routes reaches: requests to `host`, and to
/// every host its rules send or mirror to, before and after.
fn route_reach(host: &str, a: Option<&HostRoutes>, b: Option<&HostRoutes>) -> Vec<Reach> {
    let mut hosts: BTreeSet<&str> = BTreeSet::from([host]);
    for r in a.into_iter().chain(b) {
        for h in &r.http {
            hosts.extend(h.destinations.iter().map(|d| d.host.as_str()));
            hosts.extend(h.mirrors.iter().map(|m| m.host.as_str()));
        }
        for t in &r.tcp {
            hosts.extend(t.destinations.iter().map(|d| d.host.as_str()));
        }
    }
    hosts
        .into_iter()
        .map(|h| Reach::Service(h.to_string()))
        .collect()
}

fn describe_ports(p: &[u16]) -> String {
    if p.is_empty() {
        "any port".into()
    } else {
        format!("port {}", list(p.iter().map(u16::to_string)))
    }
}

fn string_match(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(v) => v.clone(),
        StringMatch::Prefix(v) => format!("{v}*"),
        StringMatch::Regex(v) => format!("~/{v}/"),
    }
}

/// `GET /admin*` or `header x-user=alice`, matches joined with "or".
fn describe_matches(m: &[HttpMatch]) -> String {
    if m.is_empty() {
        return "any request".into();
    }
    m.iter()
        .map(|m| {
            let mut parts = Vec::new();
            if let Some(v) = &m.method {
                parts.push(string_match(v));
            }
            if let Some(v) = &m.uri {
                parts.push(format!(
                    "{}{}",
                    string_match(v),
                    if m.ignore_uri_case { " (any case)" } else { "" }
                ));
            }
            if let Some(v) = &m.authority {
                parts.push(format!("authority {}", string_match(v)));
            }
            if let Some(v) = &m.scheme {
                parts.push(format!("scheme {}", string_match(v)));
            }
            for (k, v) in &m.headers {
                parts.push(format!("header {k}={}", string_match(v)));
            }
            for (k, v) in &m.without_headers {
                parts.push(format!("header {k}≠{}", string_match(v)));
            }
            for (k, v) in &m.query_params {
                parts.push(format!("query {k}={}", string_match(v)));
            }
            if let Some(p) = m.port {
                parts.push(format!("port {p}"));
            }
            if !m.source_labels.is_empty() {
                parts.push(format!("from {}", labels(&m.source_labels)));
            }
            if let Some(ns) = &m.source_namespace {
                parts.push(format!("from namespace {ns}"));
            }
            if parts.is_empty() {
                "any request".to_string()
            } else {
                parts.join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe_retries(r: &RetryPolicy) -> String {
    if r.attempts == 0 {
        return "none".into();
    }
    format!(
        "{} attempt(s){} on {}",
        r.attempts,
        r.per_try_timeout_ms
            .map(|t| format!(" of {} each", ms(t)))
            .unwrap_or_default(),
        r.retry_on.join(",")
    )
}

fn describe_fault(f: &Fault) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &f.delay {
        parts.push(format!(
            "delay {} for {} of requests",
            ms(d.delay_ms),
            pct(d.percent_ppm)
        ));
    }
    if let Some(a) = &f.abort {
        let status = match a.status {
            AbortStatus::Http(s) => format!("HTTP {s}"),
            AbortStatus::Grpc(g) => format!("gRPC status {g}"),
        };
        parts.push(format!(
            "abort with {status} for {} of requests",
            pct(a.percent_ppm)
        ));
    }
    list(parts)
}

fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "every endpoint".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn describe_subsets(d: &DestinationPolicy) -> String {
    list(
        d.subsets
            .iter()
            .map(|(n, s)| format!("{n} ({})", labels(&s.labels))),
    )
}

/// `[east, west]`; clusters of one tier (tried together, by endpoint
/// count) in braces: `[east, {north, west}]`.
fn describe_preference(p: &Preference) -> String {
    let tiers = |t: &[Vec<String>]| {
        format!(
            "[{}]",
            t.iter()
                .map(|t| if t.len() == 1 {
                    t[0].clone()
                } else {
                    format!("{{{}}}", t.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match p {
        Preference::Tiers(t) => tiers(t),
        Preference::Spread(c) => format!(
            "no preference (spread over {{{}}} by endpoint count)",
            c.join(", ")
        ),
        Preference::Distribute { weights, tiers: t } => format!(
            "weights by locality ({}), then {}",
            weights
                .iter()
                .map(|(k, v)| format!("{k} {v}%"))
                .collect::<Vec<_>>()
                .join(", "),
            tiers(t)
        ),
    }
}

fn mode(m: MtlsMode) -> &'static str {
    match m {
        MtlsMode::Disable => "DISABLE",
        MtlsMode::Permissive => "PERMISSIVE",
        MtlsMode::Strict => "STRICT",
    }
}

fn action(a: AuthzAction) -> &'static str {
    match a {
        AuthzAction::Allow => "ALLOW",
        AuthzAction::Deny => "DENY",
        AuthzAction::Audit => "AUDIT",
    }
}

/// Where a policy applies: `ratings.default` for `app: ratings`, else the
/// labels, the namespace or the mesh.
fn authz_target(p: &AuthzPolicy, _domain: &str) -> String {
    let sel = match (p.selector.len(), p.selector.get("app")) {
        (0, _) => None,
        (1, Some(app)) => Some(app.clone()),
        _ => Some(labels(&p.selector)),
    };
    match (p.scope, sel) {
        (AuthzScope::Mesh, None) => "every workload of the mesh".into(),
        (AuthzScope::Mesh, Some(s)) => format!("workloads {s} of every namespace"),
        (AuthzScope::Namespace, _) => format!("every workload of namespace {}", p.namespace),
        (AuthzScope::Workload, Some(s))
            if p.selector.len() == 1 && p.selector.contains_key("app") =>
        {
            format!("{s}.{}", p.namespace)
        }
        (AuthzScope::Workload, Some(s)) => format!("workloads {s} of namespace {}", p.namespace),
        (AuthzScope::Workload, None) => format!("every workload of namespace {}", p.namespace),
    }
}

/// `new DENY on ratings.default for GET /admin/* from any source`.
fn describe_authz(p: &AuthzPolicy, domain: &str) -> String {
    let target = authz_target(p, domain);
    let mode = if p.dry_run { "dry-run " } else { "" };
    let verb = action(p.action);
    if p.rules.is_empty() {
        return match p.action {
            AuthzAction::Allow if p.dry_run => format!(
                "{mode}ALLOW on {target} with no rule: it matches nothing, so every request to {target} would be denied (counted, not enforced)"
            ),
            AuthzAction::Allow => format!(
                "{mode}ALLOW on {target} with no rule: it matches nothing, so every request to {target} is denied"
            ),
            _ => format!("{mode}{verb} on {target} with no rule (matches nothing)"),
        };
    }
    format!(
        "{mode}{verb} on {target} for {}",
        p.rules
            .iter()
            .map(describe_rule)
            .collect::<Vec<_>>()
            .join("; or ")
    )
}

fn describe_rule(r: &AuthzRule) -> String {
    let ops = if r.to.is_empty() {
        "any request".to_string()
    } else {
        r.to.iter()
            .map(|o| {
                let mut parts = Vec::new();
                let field = |parts: &mut Vec<String>, v: &[String], not: &[String], what: &str| {
                    if !v.is_empty() {
                        parts.push(format!("{what}{}", v.join("|")));
                    }
                    if !not.is_empty() {
                        parts.push(format!("not {what}{}", not.join("|")));
                    }
                };
                field(&mut parts, &o.methods, &o.not_methods, "");
                field(&mut parts, &o.paths, &o.not_paths, "");
                field(&mut parts, &o.hosts, &o.not_hosts, "host ");
                let p = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>();
                field(&mut parts, &p(&o.ports), &p(&o.not_ports), "port ");
                if parts.is_empty() {
                    "any request".into()
                } else {
                    parts.join(" ")
                }
            })
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let from = if r.from.is_empty() {
        "any source".to_string()
    } else {
        r.from
            .iter()
            .map(|f| {
                let mut parts = Vec::new();
                let field = |parts: &mut Vec<String>, v: &[String], not: &[String], what: &str| {
                    if !v.is_empty() {
                        parts.push(format!("{what} {}", v.join("|")));
                    }
                    if !not.is_empty() {
                        parts.push(format!("not {what} {}", not.join("|")));
                    }
                };
                field(&mut parts, &f.principals, &f.not_principals, "principal");
                field(&mut parts, &f.namespaces, &f.not_namespaces, "namespace");
                field(
                    &mut parts,
                    &f.service_accounts,
                    &f.not_service_accounts,
                    "service account",
                );
                if parts.is_empty() {
                    "any source".into()
                } else {
                    parts.join(" ")
                }
            })
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let mut s = format!("{ops} from {from}");
    for c in &r.when {
        if !c.values.is_empty() {
            s.push_str(&format!(" when {} is {}", c.key, c.values.join("|")));
        }
        if !c.not_values.is_empty() {
            s.push_str(&format!(
                " when {} is not {}",
                c.key,
                c.not_values.join("|")
            ));
        }
    }
    s
}

fn traffic_policy(label: &str, a: &TrafficPolicy, b: &TrafficPolicy, out: &mut Vec<Change>) {
    if a == b {
        return;
    }
    let push = |out: &mut Vec<Change>, kind, summary: String| {
        out.push(Change::new(
            Area::Destination,
            label.split(' ').next().unwrap_or(label),
            kind,
            summary,
        ));
    };
    if a.load_balancer.algorithm != b.load_balancer.algorithm {
        let n = |x: LbAlgorithm| match x {
            LbAlgorithm::LeastRequest => "LEAST_REQUEST",
            LbAlgorithm::RoundRobin => "ROUND_ROBIN",
            LbAlgorithm::Random => "RANDOM",
        };
        push(
            out,
            "load-balancer",
            format!(
                "{label}: load balancing {} → {}",
                n(a.load_balancer.algorithm),
                n(b.load_balancer.algorithm)
            ),
        );
    }
    for leaf in leaves_of(&a.load_balancer.locality, &b.load_balancer.locality) {
        push(
            out,
            "locality",
            format!("{label}: locality load balancing {leaf}"),
        );
    }
    for leaf in leaves_of(&a.connection_pool, &b.connection_pool) {
        let leaf = Leaf {
            before: leaf.before.or(Some("unlimited".into())),
            after: leaf.after.or(Some("unlimited".into())),
            ..leaf
        };
        push(
            out,
            "circuit-breaking",
            format!("{label}: connection limits: {leaf}"),
        );
    }
    match (&a.outlier_detection, &b.outlier_detection) {
        (None, Some(o)) => push(
            out,
            "outlier-detection",
            format!("{label}: outlier detection on: {}", describe_outlier(o)),
        ),
        (Some(o), None) => push(
            out,
            "outlier-detection",
            format!(
                "{label}: outlier detection off (was {})",
                describe_outlier(o)
            ),
        ),
        (Some(x), Some(y)) => {
            for leaf in leaves_of(x, y) {
                push(
                    out,
                    "outlier-detection",
                    format!("{label}: outlier detection: {leaf}"),
                );
            }
        }
        (None, None) => {}
    }
    for leaf in leaves_of(&a.tls, &b.tls) {
        push(out, "tls", format!("{label}: TLS to endpoints: {leaf}"));
    }
    for leaf in leaves_of(&a.ports, &b.ports) {
        push(
            out,
            "port-policy",
            format!("{label}: per-port policy: port {leaf}"),
        );
    }
}

fn describe_outlier(o: &OutlierDetection) -> String {
    let mut parts = Vec::new();
    if let Some(n) = o.consecutive_5xx_errors {
        parts.push(format!("eject after {n} consecutive 5xx"));
    }
    if let Some(n) = o.consecutive_gateway_errors {
        parts.push(format!("after {n} consecutive gateway errors"));
    }
    parts.push(format!(
        "every {}, for {} at least, at most {}% ejected, panic under {}% healthy",
        ms(o.interval_ms),
        ms(o.base_ejection_time_ms),
        o.max_ejection_percent,
        o.min_health_percent
    ));
    parts.join(", ")
}

/// A compact rendering of any snapshot value, cut to a readable length.
fn compact<T: Serialize>(v: &T) -> String {
    let s = serde_json::to_string(v).unwrap_or_default();
    cut(s)
}

fn cut(s: String) -> String {
    if s.chars().count() > MAX_VALUE_CHARS {
        let mut t: String = s.chars().take(MAX_VALUE_CHARS).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// One field that differs, by its dotted path in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leaf {
    path: String,
    before: Option<String>,
    after: Option<String>,
}

impl Leaf {
    /// `path value`, for listing the settings of something new.
    fn after_only(&self) -> String {
        match &self.after {
            Some(a) => format!("{} {a}", self.path),
            None => String::new(),
        }
    }
}

impl std::fmt::Display for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "unset".into());
        if self.path.is_empty() {
            write!(f, "{} → {}", v(&self.before), v(&self.after))
        } else {
            write!(f, "{}: {} → {}", self.path, v(&self.before), v(&self.after))
        }
    }
}

/// Every field that differs between `a` and `b`, as the snapshot names it
/// (`max_connections`), with durations and percentages in units.
fn leaves_of<T: Serialize>(a: &T, b: &T) -> Vec<Leaf> {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or(Value::Null),
        serde_json::to_value(b).unwrap_or(Value::Null),
    );
    let mut out = Vec::new();
    walk("", "", some(&a), some(&b), &mut out);
    out
}

fn some(v: &Value) -> Option<&Value> {
    (!v.is_null()).then_some(v)
}

fn walk(path: &str, key: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Leaf>) {
    if a == b {
        return;
    }
    let is_obj = |v: Option<&Value>| v.is_none_or(Value::is_object);
    if is_obj(a) && is_obj(b) {
        let empty = serde_json::Map::new();
        let (ma, mb) = (
            a.and_then(Value::as_object).unwrap_or(&empty),
            b.and_then(Value::as_object).unwrap_or(&empty),
        );
        let ks: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
        for k in ks {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            walk(
                &p,
                k,
                ma.get(k).and_then(some),
                mb.get(k).and_then(some),
                out,
            );
        }
        return;
    }
    out.push(Leaf {
        path: path.to_string(),
        before: a.map(|v| render(key, v)),
        after: b.map(|v| render(key, v)),
    });
}

fn render(key: &str, v: &Value) -> String {
    let s = match v {
        Value::Number(n) if key.ends_with("_ms") => n.as_u64().map_or(n.to_string(), ms),
        Value::Number(n) if key.ends_with("_ppm") => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map_or(n.to_string(), pct),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => format!(
            "[{}]",
            items
                .iter()
                .map(|i| render(key, i))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    };
    cut(s)
}

#[cfg(test)]
mod tests;
