//! The compiled, immutable per-cluster policy that gateways enforce.
//!
//! A [`Snapshot`] is what one cluster's gateways receive for one commit. It is
//! independent of both the YAML model (short names are resolved, defaults are
//! filled in, subset policies are merged) and the wire (the gRPC message
//! carries its canonical encoding as opaque bytes).
//!
//! # Canonical encoding
//!
//! [`Snapshot::encode`] writes compact JSON with:
//! - struct fields in declaration order, maps as `BTreeMap` (sorted keys),
//!   lists in a defined order (routes in the user's order, everything else
//!   sorted);
//! - no floating point: percentages are parts per million (`*_ppm`,
//!   100% = 1,000,000) and durations are whole milliseconds (`*_ms`);
//! - absent optional fields omitted.
//!
//! The same input therefore always gives the same bytes. The content hash is
//! the SHA-256 of the encoding of [`ClusterPolicy`], so it does not change when
//! only the version (the commit) changes: a gateway can tell "new commit, same
//! policy" apart from a real change. [`Snapshot::decode`] refuses an unknown
//! schema version, an unknown field, and a hash mismatch, so that an old
//! gateway NACKs what it cannot enforce instead of half-applying it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The schema version this crate writes and reads. Bump it on any change that
/// an older gateway could misread.
pub const SCHEMA: u32 = 1;

/// Per-million scale of `*_ppm` fields: 100% = 1,000,000.
pub const PPM: u32 = 1_000_000;

/// One cluster's policy at one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub schema: u32,
    /// The version, e.g. the commit SHA, as given by the caller.
    pub version: String,
    /// `sha256:<hex>` of the canonical encoding of `policy`.
    pub content_hash: String,
    pub policy: ClusterPolicy,
    /// `Kind namespace/name` → `file:line` of every compiled resource, for
    /// config dumps and error messages. Not hashed: moving a resource to
    /// another file or adding a comment does not change the policy.
    #[serde(default)]
    pub origins: BTreeMap<String, String>,
}

/// Why a snapshot could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("snapshot is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "snapshot schema {found} is not supported (this build reads schema {SCHEMA}); upgrade the gateway"
    )]
    Schema { found: u32 },
    #[error("snapshot content hash mismatch: header says {claimed}, content hashes to {actual}")]
    Hash { claimed: String, actual: String },
}

impl Snapshot {
    /// Wraps a compiled policy with its version and hash.
    pub fn new(version: impl Into<String>, policy: ClusterPolicy) -> Self {
        let content_hash = hash_policy(&policy);
        Snapshot {
            schema: SCHEMA,
            version: version.into(),
            content_hash,
            policy,
            origins: BTreeMap::new(),
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string or
        // an integer, and there are no floats.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The canonical encoding, indented for people (`compile --format json`).
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Decodes and checks a snapshot.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Header {
            schema: u32,
        }
        let header: Header = serde_json::from_slice(bytes)?;
        if header.schema != SCHEMA {
            return Err(DecodeError::Schema {
                found: header.schema,
            });
        }
        let snap: Snapshot = serde_json::from_slice(bytes)?;
        let actual = hash_policy(&snap.policy);
        if actual != snap.content_hash {
            return Err(DecodeError::Hash {
                claimed: snap.content_hash,
                actual,
            });
        }
        Ok(snap)
    }

    /// Finds the routes for a request's authority, as Istio resolves names
    /// for a caller in `caller_namespace`: `reviews`, `reviews.ns`,
    /// `reviews.ns.svc`, `reviews.ns.svc.cluster.local`,
    /// `reviews.ns.svc.clusterset.local`, with or without a port, then the
    /// longest matching `*.` wildcard host. Returns the canonical host too.
    pub fn route_for(
        &self,
        authority: &str,
        caller_namespace: &str,
    ) -> Option<(&str, &HostRoutes)> {
        let candidates = self.policy.host_candidates(authority, caller_namespace);
        self.route_for_candidates(&candidates, authority)
    }

    /// [`Snapshot::route_for`] with the authority's candidates already
    /// made ([`host_candidates`]), for a caller that needs them again.
    /// Wildcard hosts (`*.` sorts before every name) are found by a range
    /// of the map, not a scan of every route.
    pub fn route_for_candidates(
        &self,
        candidates: &[String],
        authority: &str,
    ) -> Option<(&str, &HostRoutes)> {
        let p = &self.policy;
        for candidate in candidates {
            if let Some((k, v)) = p.routes.get_key_value(candidate.as_str()) {
                return Some((k.as_str(), v));
            }
        }
        let host = strip_port(authority);
        // Keys starting with "*." lie in ["*.", "*/"): '/' follows '.'.
        p.routes
            .range::<str, _>((
                std::ops::Bound::Included("*."),
                std::ops::Bound::Excluded("*/"),
            ))
            .filter(|(k, _)| wildcard_matches(k, host))
            .max_by_key(|(k, _)| k.len())
            .map(|(k, v)| (k.as_str(), v))
    }
}

fn hash_policy(policy: &ClusterPolicy) -> String {
    let bytes = serde_json::to_vec(policy).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority;
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn wildcard_matches(pattern: &str, host: &str) -> bool {
    pattern
        .strip_prefix('*')
        .is_some_and(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
}

/// Everything a cluster's gateways enforce. Hashed for the content hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPolicy {
    /// The cluster these gateways belong to.
    pub cluster: String,
    /// The DNS suffix of in-cluster names, `cluster.local` unless configured.
    pub domain: String,
    /// The mesh's shared trust domain.
    pub trust_domain: String,
    /// Every cluster of the federation, by name.
    pub clusters: BTreeMap<String, ClusterInfo>,
    /// Exported services (canonical host) → the clusters that export them.
    pub exports: BTreeMap<String, BTreeSet<String>>,
    /// VirtualService routes, by canonical host (`name.ns.svc.cluster.local`,
    /// or an external or `*.` wildcard host).
    pub routes: BTreeMap<String, HostRoutes>,
    /// DestinationRule policies, by canonical host.
    pub destinations: BTreeMap<String, DestinationPolicy>,
    /// ServiceEntries, by host.
    pub service_entries: BTreeMap<String, ServiceEntry>,
    /// PeerAuthentication, resolved to modes by scope.
    pub mtls: MtlsPolicy,
    /// AuthorizationPolicies, sorted by namespace and name.
    pub authz: Vec<AuthzPolicy>,
}

impl ClusterPolicy {
    /// The canonical hosts a request authority may mean, most specific first.
    pub fn host_candidates(&self, authority: &str, caller_namespace: &str) -> Vec<String> {
        host_candidates(&self.domain, authority, caller_namespace)
    }
}

/// The canonical hosts a request authority may mean for a caller in
/// `caller_namespace`, most specific first, with `domain` the in-cluster DNS
/// suffix: the port and a trailing dot are dropped, `name` is
/// `name.<caller ns>.svc.<domain>`, `name.ns` and `name.ns.svc` are
/// `name.ns.svc.<domain>` (then the name as written), and
/// `…svc.clusterset.local` is `…svc.<domain>`. The gateway's router and its
/// authorization (`hosts`) both resolve names with it.
pub fn host_candidates(domain: &str, authority: &str, caller_namespace: &str) -> Vec<String> {
    // Every request resolves its authority here, on the gateway's request
    // path: concatenation, not `format!`, and no copy of a host that is
    // lowercase already.
    let host = strip_port(authority).trim_end_matches('.');
    let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    };
    if let Some(base) = host.strip_suffix(".svc.clusterset.local") {
        return vec![concat(&[base, ".svc.", domain])];
    }
    let in_domain = host
        .strip_suffix(domain)
        .is_some_and(|h| h.ends_with(".svc."));
    if in_domain {
        return vec![host.into_owned()];
    }
    let dots = host.bytes().filter(|&b| b == b'.').count();
    let mut out = Vec::with_capacity(2);
    match dots {
        0 => out.push(concat(&[&host, ".", caller_namespace, ".svc.", domain])),
        1 => out.push(concat(&[&host, ".svc.", domain])),
        2 if host.ends_with(".svc") => out.push(concat(&[&host, ".", domain])),
        _ => {}
    }
    out.push(host.into_owned());
    out
}

/// The parts, one after another, in one allocation.
fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    /// `host:port` of each gateway, in the order the Cluster lists them.
    pub gateways: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub locality: Option<Locality>,
    /// The trust domain of this cluster's workloads and gateways.
    pub trust_domain: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub network: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    pub region: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub zone: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub subzone: String,
}

/// The resource a piece of policy came from, so that a gateway's metrics,
/// config dump and errors can name it; [`Snapshot::origins`] maps it to its
/// `file:line`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl SourceRef {
    /// `Kind namespace/name`, the key of [`Snapshot::origins`].
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The routes of one host, from one VirtualService.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRoutes {
    pub source: SourceRef,
    /// HTTP rules in the user's order; the first match wins.
    pub http: Vec<HttpRoute>,
    /// TCP rules in the user's order.
    pub tcp: Vec<TcpRoute>,
}

/// A string matcher. Regexes are RE2 syntax, matched against the whole value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub name: String,
    /// Any one match selects the rule (OR); an empty list matches every
    /// request. Inside one match, every condition must hold (AND).
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations; weights sum to 100. Empty when the rule has no
    /// enforceable destination (e.g. only a redirect): the gateway answers
    /// such requests with an error.
    pub destinations: Vec<WeightedDestination>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeout_ms: Option<u64>,
    pub retries: RetryPolicy,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fault: Option<Fault>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub mirrors: Vec<Mirror>,
    #[serde(skip_serializing_if = "HeaderOps::is_empty", default)]
    pub request_headers: HeaderOps,
    #[serde(skip_serializing_if = "HeaderOps::is_empty", default)]
    pub response_headers: HeaderOps,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rewrite: Option<Rewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uri: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scheme: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub authority: Option<StringMatch>,
    /// Lowercase header name → matcher; each must be present and match.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Header name → matcher that must *not* match (absent also passes).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_namespace: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub ignore_uri_case: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedDestination {
    /// Canonical host.
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// 0..=100.
    pub weight: u32,
    #[serde(skip_serializing_if = "HeaderOps::is_empty", default)]
    pub request_headers: HeaderOps,
    #[serde(skip_serializing_if = "HeaderOps::is_empty", default)]
    pub response_headers: HeaderOps,
}

/// Retries, with Istio's defaults filled in when the VirtualService says
/// nothing (2 attempts on connect-failure, refused-stream, unavailable,
/// cancelled, retriable-status-codes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub per_try_timeout_ms: Option<u64>,
    /// Conditions, lowercase, as in Istio's retryOn; HTTP status codes as
    /// digits.
    pub retry_on: Vec<String>,
}

impl RetryPolicy {
    /// Istio's default retry policy, for routes that say nothing: 2 attempts
    /// on connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: [
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "503",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub delay_ms: u64,
    pub percent_ppm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code number (14 = UNAVAILABLE).
    Grpc(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub percent_ppm: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    pub percent_ppm: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub set: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub add: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// Destination ports this rule applies to; empty means every port.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub source_labels: BTreeMap<String, String>,
    pub destinations: Vec<WeightedDestination>,
}

/// A DestinationRule, with subset policies already merged over the
/// top-level one (Istio semantics: a subset's `loadBalancer`,
/// `connectionPool`, `outlierDetection` and `tls` each replace the top-level
/// setting as a whole).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationPolicy {
    pub source: SourceRef,
    pub traffic_policy: TrafficPolicy,
    /// Subset name → labels and effective policy.
    pub subsets: BTreeMap<String, Subset>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: TrafficPolicy,
}

impl Subset {
    /// The cluster this subset pins, from `topology.istio.io/cluster`.
    pub fn cluster(&self) -> Option<&str> {
        self.labels.get(CLUSTER_LABEL).map(String::as_str)
    }
}

/// The endpoint label that names an endpoint's cluster, as in Istio.
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls: Option<EndpointTls>,
    /// Port → overrides, as in `portLevelSettings`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub ports: BTreeMap<u16, PortPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPolicy {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls: Option<EndpointTls>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbAlgorithm {
    /// Istio's default.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    pub algorithm: LbAlgorithm,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub locality: Option<LocalityLb>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLb {
    pub enabled: bool,
    /// `from` locality → (`to` locality → weight); the weights sum to 100.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub distribute: BTreeMap<String, BTreeMap<String, u32>>,
    /// `from` region → `to` region.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub failover: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub failover_priority: Vec<String>,
}

/// Connection limits. `None` means unlimited, as in Istio (Envoy's 2^32-1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_connection_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tcp_idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http2_max_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http_idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub consecutive_gateway_errors: Option<u32>,
    pub interval_ms: u64,
    pub base_ejection_time_ms: u64,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EndpointTlsMode {
    #[default]
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointTls {
    pub mode: EndpointTlsMode,
    /// File paths on the gateway host.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub private_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ca_certificates: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub subject_alt_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub source: SourceRef,
    pub namespace: String,
    pub internal: bool,
    pub resolution: Resolution,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub number: u16,
    pub protocol: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub locality: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    Disable,
    /// Istio's default when nothing is configured.
    #[default]
    Permissive,
    Strict,
}

/// PeerAuthentication, resolved: the most specific scope wins (workload,
/// then namespace, then mesh), and `UNSET` inherits from the wider scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsPolicy {
    pub mesh: MtlsMode,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub namespaces: BTreeMap<String, MtlsMode>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub workloads: Vec<WorkloadMtls>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadMtls {
    pub source: SourceRef,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    /// The workload's mode, already resolved against its namespace and the
    /// mesh when the policy said UNSET.
    pub mode: MtlsMode,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub ports: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    /// Logged, never blocks.
    Audit,
}

/// Where an authorization policy applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthzScope {
    /// In the root namespace: every workload of every namespace (those
    /// whose labels match the selector, when there is one).
    Mesh,
    /// Every workload of the policy's namespace.
    #[default]
    Namespace,
    /// Workloads of the namespace whose labels match the selector.
    Workload,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzPolicy {
    pub source: SourceRef,
    pub namespace: String,
    pub scope: AuthzScope,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub selector: BTreeMap<String, String>,
    pub action: AuthzAction,
    /// Any rule matching applies the action. ALLOW with no rules matches
    /// nothing (so it denies all, as in Istio).
    pub rules: Vec<AuthzRule>,
    /// `istio.io/dry-run: "true"`: never enforced; gateways evaluate it and
    /// count what it would have decided. Omitted when false, so snapshots
    /// without dry-run policies encode as before (and a gateway that does
    /// not know the field refuses a snapshot that has one, rather than
    /// enforcing a dry-run DENY).
    #[serde(skip_serializing_if = "is_false", default)]
    pub dry_run: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Any source may match (OR); empty matches every source.
    pub from: Vec<AuthzSource>,
    /// Any operation may match (OR); empty matches every operation.
    pub to: Vec<AuthzOperation>,
    /// Every condition must hold (AND).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub when: Vec<AuthzCondition>,
}

/// Patterns: exact, `prefix*`, `*suffix` or `*`, as in Istio. Within one
/// source every non-empty field must match (AND); a field's values are OR.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzSource {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_namespaces: Vec<String>,
    /// `namespace/serviceaccount`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_service_accounts: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzOperation {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_methods: Vec<String>,
    /// Patterns, or Istio path templates (`{*}`, `{**}`:
    /// [`crate::path_template`]), as written. A gateway older than
    /// templates refuses a snapshot that has one.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub paths: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_paths: Vec<String>,
}

/// A `when` condition. Keys meshfed enforces: `source.principal`,
/// `source.namespace`, `source.cluster` (meshfed's: the verified cluster of
/// the calling gateway), `request.headers[<name>]` (`:authority` and
/// `:method` among the pseudo-headers), `destination.port`,
/// `connection.sni`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzCondition {
    pub key: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub values: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub not_values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_candidates_resolve_names_as_istio_does() {
        let c = |authority, ns| host_candidates("cluster.local", authority, ns);
        assert_eq!(
            c("ratings", "bookinfo"),
            ["ratings.bookinfo.svc.cluster.local", "ratings"]
        );
        assert_eq!(
            c("Ratings.Default:9080", "x"),
            ["ratings.default.svc.cluster.local", "ratings.default"]
        );
        assert_eq!(
            c("ratings.default.svc", "x"),
            ["ratings.default.svc.cluster.local", "ratings.default.svc"]
        );
        assert_eq!(
            c("ratings.default.svc.cluster.local.", "x"),
            ["ratings.default.svc.cluster.local"]
        );
        assert_eq!(
            c("ratings.default.svc.clusterset.local:80", "x"),
            ["ratings.default.svc.cluster.local"]
        );
        assert_eq!(c("api.example.com", "x"), ["api.example.com"]);
        // Only `.svc.<domain>` is in the domain: a host merely ending in it is not.
        assert_eq!(c("a.bsvc.cluster.local", "x"), ["a.bsvc.cluster.local"]);
    }

    fn sample() -> Snapshot {
        let mut p = ClusterPolicy {
            cluster: "east".into(),
            domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        p.routes.insert(
            "reviews.default.svc.cluster.local".into(),
            HostRoutes::default(),
        );
        p.routes
            .insert("*.example.com".into(), HostRoutes::default());
        p.routes
            .insert("*.api.example.com".into(), HostRoutes::default());
        Snapshot::new("abc123", p)
    }

    #[test]
    fn encoding_round_trips_and_checks_the_hash() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\"cluster\":\"east\"", "\"cluster\":\"west\"");
        assert!(matches!(
            Snapshot::decode(tampered.as_bytes()),
            Err(DecodeError::Hash { .. })
        ));
    }

    #[test]
    fn decode_refuses_other_schemas_and_unknown_fields() {
        let s = sample();
        let text = String::from_utf8(s.encode()).unwrap();
        let future = text.replacen("\"schema\":1", "\"schema\":2", 1);
        assert!(matches!(
            Snapshot::decode(future.as_bytes()),
            Err(DecodeError::Schema { found: 2 })
        ));
        let extra = text.replacen("\"schema\":1", "\"schema\":1,\"surprise\":true", 1);
        assert!(matches!(
            Snapshot::decode(extra.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn content_hash_ignores_version_but_not_content() {
        let a = sample();
        let b = Snapshot::new("def456", a.policy.clone());
        assert_eq!(a.content_hash, b.content_hash);
        let mut p = a.policy.clone();
        p.cluster = "west".into();
        assert_ne!(Snapshot::new("abc123", p).content_hash, a.content_hash);
    }

    #[test]
    fn authorities_resolve_like_istio_names() {
        let s = sample();
        let want = "reviews.default.svc.cluster.local";
        for authority in [
            "reviews",
            "reviews:9080",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local:9080",
            "reviews.default.svc.clusterset.local",
        ] {
            assert_eq!(
                s.route_for(authority, "default").map(|r| r.0),
                Some(want),
                "{authority}"
            );
        }
        assert!(s.route_for("reviews", "other").is_none());
        assert_eq!(
            s.route_for("v1.api.example.com", "default").map(|r| r.0),
            Some("*.api.example.com")
        );
        assert_eq!(
            s.route_for("www.example.com", "default").map(|r| r.0),
            Some("*.example.com")
        );
        assert!(s.route_for("example.com", "default").is_none());
    }
}
