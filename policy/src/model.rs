//! Typed resources, as users write them in Git.
//!
//! These structs mirror the Istio, MCS and meshfed APIs field for field
//! (camelCase, as in the YAML), and refuse unknown fields, so that a typo is an
//! error rather than a silently ignored setting. They hold what the user wrote:
//! durations and regexes stay strings here and are checked by
//! [`crate::validate`], which can then report every problem, not only the
//! first one serde meets.
//!
//! What the gateways enforce is not this model but the compiled
//! [`crate::snapshot::Snapshot`].

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::yaml::Positions;

pub mod networking;
pub mod security;

pub use networking::*;
pub use security::*;

/// Kubernetes object metadata. Fields that Kubernetes adds on the server side
/// are accepted and ignored, so that `kubectl get -o yaml` output loads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    // Server-side fields, ignored.
    #[serde(default)]
    pub uid: serde::de::IgnoredAny,
    #[serde(default)]
    pub resource_version: serde::de::IgnoredAny,
    #[serde(default)]
    pub generation: serde::de::IgnoredAny,
    #[serde(default)]
    pub creation_timestamp: serde::de::IgnoredAny,
    #[serde(default)]
    pub deletion_timestamp: serde::de::IgnoredAny,
    #[serde(default)]
    pub deletion_grace_period_seconds: serde::de::IgnoredAny,
    #[serde(default)]
    pub finalizers: serde::de::IgnoredAny,
    #[serde(default)]
    pub owner_references: serde::de::IgnoredAny,
    #[serde(default)]
    pub managed_fields: serde::de::IgnoredAny,
    #[serde(default)]
    pub generate_name: serde::de::IgnoredAny,
    #[serde(default)]
    pub self_link: serde::de::IgnoredAny,
}

/// A whole manifest of one kind: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest<S> {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<S>,
    /// Status written by a controller; ignored.
    #[serde(default)]
    pub status: serde::de::IgnoredAny,
}

/// `multicluster.x-k8s.io/v1alpha1` ServiceExport: the service of the same
/// name and namespace is reachable from other clusters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceExportSpec {}

/// `meshfed.io/v1alpha1` Cluster: one member of the federation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// `host:port` of each gateway; hosts are resolved with DNS.
    #[serde(default)]
    pub gateways: Vec<String>,
    pub locality: Option<Locality>,
    /// Defaults to the mesh's shared trust domain.
    pub trust_domain: Option<String>,
    /// Istio network name, informational.
    pub network: Option<String>,
}

/// `meshfed.io/v1alpha1` RolloutPolicy: the order in which the syncer
/// delivers a commit to the clusters (waves), how long each wave bakes,
/// and the gates on the gateways' golden metrics that a wave must pass
/// before the next one opens. At most one per repository; without one,
/// every cluster gets a commit at once. See docs/delivery.md, "Rollout
/// waves".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicySpec {
    #[serde(default)]
    pub waves: Vec<WaveSpec>,
    #[serde(default)]
    pub gates: GateSpec,
}

/// One wave of a [`RolloutPolicySpec`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    /// Declared cluster names.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// How long the wave's clusters run the commit, watched by the gates,
    /// before the next wave opens (default `5m`).
    pub bake_time: Option<String>,
}

/// The gate thresholds of a [`RolloutPolicySpec`]; each has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateSpec {
    /// Requests a service needs, before the wave and during its bake, to
    /// be judged (default 100).
    pub min_requests: Option<u64>,
    /// Fail when the success rate drops by more than this many percentage
    /// points (default 2).
    pub max_success_rate_drop: Option<f64>,
    /// Fail when p99 latency grows by more than this many percent
    /// (default 50).
    pub max_p99_increase_percent: Option<f64>,
    /// p99 growth counts only when the new p99 is above this many
    /// milliseconds (default 25): at a few milliseconds, one histogram
    /// bucket is noise on a busy host.
    pub p99_floor_ms: Option<f64>,
    /// Fail when the share of requests denied by authorization grows by
    /// more than this many percentage points (default 2).
    pub max_denial_rate_increase: Option<f64>,
}

/// Where a cluster or an endpoint runs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

/// The kinds meshfed understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Cluster,
    ServiceExport,
    ServiceEntry,
    DestinationRule,
    VirtualService,
    PeerAuthentication,
    AuthorizationPolicy,
    RolloutPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cluster => "Cluster",
            Kind::ServiceExport => "ServiceExport",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RolloutPolicy => "RolloutPolicy",
        }
    }

    /// Whether the kind lives in a namespace (a `Cluster` and a
    /// `RolloutPolicy` do not).
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Cluster | Kind::RolloutPolicy)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The API groups that hold mesh policy, and the versions of each that meshfed
/// reads. A kind in one of these groups that is not listed is an error; any
/// other group is a foreign manifest and is skipped.
pub const MESH_GROUPS: &[(&str, &[&str], &[Kind])] = &[
    (
        "networking.istio.io",
        &["v1", "v1beta1", "v1alpha3"],
        &[
            Kind::VirtualService,
            Kind::DestinationRule,
            Kind::ServiceEntry,
        ],
    ),
    (
        "security.istio.io",
        &["v1", "v1beta1"],
        &[Kind::PeerAuthentication, Kind::AuthorizationPolicy],
    ),
    (
        "multicluster.x-k8s.io",
        &["v1alpha1"],
        &[Kind::ServiceExport],
    ),
    (
        "meshfed.io",
        &["v1alpha1"],
        &[Kind::Cluster, Kind::RolloutPolicy],
    ),
];

/// Istio kinds that Istio's own proxies (sidecars, ingress and egress
/// gateways) enforce and meshfed does not: by API group. A repository shared
/// with Istio holds them; they are skipped with an `istio-proxy-kind`
/// warning, never an error, in any version.
pub const PROXY_KINDS: &[(&str, &[&str])] = &[
    (
        "networking.istio.io",
        &[
            "Gateway",
            "Sidecar",
            "EnvoyFilter",
            "WorkloadEntry",
            "WorkloadGroup",
            "ProxyConfig",
        ],
    ),
    ("security.istio.io", &["RequestAuthentication"]),
    ("telemetry.istio.io", &["Telemetry"]),
    ("extensions.istio.io", &["WasmPlugin"]),
];

/// The typed content of a resource.
// Resources are loaded once and read many times; boxing the large variants
// would add an indirection to every read for a one-off memory saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Spec {
    Cluster(ClusterSpec),
    ServiceExport(ServiceExportSpec),
    ServiceEntry(ServiceEntrySpec),
    DestinationRule(DestinationRuleSpec),
    VirtualService(VirtualServiceSpec),
    PeerAuthentication(PeerAuthenticationSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    RolloutPolicy(RolloutPolicySpec),
}

/// Where a resource came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The file, as the caller named it (relative to the repo root in the CLI
    /// and the syncer).
    pub file: Arc<str>,
    /// 0-based index of the document in the file.
    pub document: usize,
    /// Field path → line and column.
    pub positions: Arc<Positions>,
}

/// One loaded resource.
#[derive(Debug, Clone)]
pub struct Resource {
    pub kind: Kind,
    /// `group/version`, as written.
    pub api_version: String,
    pub name: String,
    /// The namespace, defaulted to `default`; empty for cluster-scoped kinds.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: Spec,
    pub origin: Origin,
}

impl Resource {
    /// `Kind namespace/name`, or `Kind name` for cluster-scoped kinds.
    pub fn display_name(&self) -> String {
        if self.kind.namespaced() {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        } else {
            format!("{} {}", self.kind, self.name)
        }
    }
}
