//! Validation: every rule that makes a policy repository invalid, with every
//! violation reported at its `FILE:LINE:COL`.
//!
//! Two passes:
//! - [`fields`]: each resource on its own (names, hosts, durations,
//!   percentages, regexes, one-of fields, enforceability);
//! - [`federation`]: across resources, for the whole federation and for each
//!   cluster's targeted view (duplicates, weights, subset and cluster
//!   references, conflicts).
//!
//! Rules never stop at the first problem. Each rule has a failing and a
//! passing case in `validate/tests.rs`.

use std::collections::BTreeSet;

use crate::Options;
use crate::diag::{Code, Diagnostic};
use crate::model::Resource;

pub mod exports;
pub mod federation;
pub mod fields;

/// The annotation that limits a resource to some clusters.
pub const CLUSTERS_ANNOTATION: &str = "meshfed.io/clusters";

/// Istio's annotation that puts an AuthorizationPolicy in dry-run mode:
/// evaluated and counted, never enforced. `"true"` or `"false"`.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Validates a set of loaded resources. Returns every diagnostic found.
///
/// `check_references` is false when some document failed to load: subset
/// and cluster references are then skipped, to avoid a cascade of errors
/// caused by the missing resource rather than by the references.
pub fn validate(resources: &[Resource], opts: &Options, check_references: bool) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in resources {
        fields::check(r, opts, &mut out);
    }
    federation::check(resources, opts, check_references, &mut out);
    exports::check(resources, &mut out);
    out
}

/// Builds a diagnostic about one field of a resource.
pub(crate) fn diag(r: &Resource, code: Code, path: &str, message: impl Into<String>) -> Diagnostic {
    let pos = r.origin.positions.lookup(path);
    let mut d = Diagnostic::new(code, &r.origin.file, pos, message);
    d.field_path = path.to_string();
    d.resource = Some(r.display_name());
    d
}

/// The clusters a resource is limited to by its annotation, or `None` when
/// it applies to every cluster.
pub fn targets(r: &Resource) -> Option<BTreeSet<String>> {
    r.annotations.get(CLUSTERS_ANNOTATION).map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Whether a resource applies to `cluster`.
pub fn applies_to(r: &Resource, cluster: &str) -> bool {
    targets(r).is_none_or(|t| t.contains(cluster))
}

/// Resolves a host written in a resource of `namespace` to its canonical
/// form, as Istio does: a short name (no dot) becomes
/// `name.namespace.svc.<domain>`, and the MCS `…svc.clusterset.local` name
/// maps to the same service as `…svc.<domain>` (namespace sameness). Any
/// other host is already fully qualified.
pub fn canonical_host(host: &str, namespace: &str, domain: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "*" || host.starts_with("*.") {
        return host;
    }
    if !host.contains('.') {
        return format!("{host}.{namespace}.svc.{domain}");
    }
    if let Some(base) = host.strip_suffix(".svc.clusterset.local") {
        return format!("{base}.svc.{domain}");
    }
    host
}

#[cfg(test)]
mod tests;
