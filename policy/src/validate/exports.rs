//! How many services a cluster may export: no more than one gateway
//! announcement carries (`gateway/src/wire/announce.rs` uses
//! [`MAX_EXPORTED_SERVICES`] as its bound), so that a valid commit never has
//! services silently left out of what peers learn (issue 21, item 13).

use std::collections::{BTreeMap, BTreeSet};

use crate::diag::{Code, Diagnostic};
use crate::model::{Kind, Resource};

use super::{diag, targets};

/// Most services one cluster may export, and so the most one gateway
/// announcement carries. An announcement is one tunnel frame of at most
/// 1 MiB: 4,000 services leave about 260 bytes each, room for a 70-character
/// name and a label group of four labels (the gateway's
/// `as_many_services_as_validation_allows_fit_one_frame` pins it). Services
/// with many label groups can still outgrow the frame; the gateway then
/// announces what fits and logs and counts the rest.
pub const MAX_EXPORTED_SERVICES: usize = 4_000;

/// One error per cluster that exports more than [`MAX_EXPORTED_SERVICES`]
/// services, placed at the first export past the limit. An export without
/// `meshfed.io/clusters` counts for every declared cluster (for the
/// repository as a whole when none is declared).
pub fn check(resources: &[Resource], out: &mut Vec<Diagnostic>) {
    check_with_limit(resources, MAX_EXPORTED_SERVICES, out);
}

pub(crate) fn check_with_limit(resources: &[Resource], limit: usize, out: &mut Vec<Diagnostic>) {
    let declared: BTreeSet<&str> = resources
        .iter()
        .filter(|r| r.kind == Kind::Cluster)
        .map(|r| r.name.as_str())
        .collect();
    let exports: Vec<&Resource> = resources
        .iter()
        .filter(|r| r.kind == Kind::ServiceExport)
        .collect();
    let mut counts: BTreeMap<String, (usize, Option<&Resource>)> = BTreeMap::new();
    for r in &exports {
        let clusters: Vec<String> = match targets(r) {
            Some(t) => t.into_iter().collect(),
            None if declared.is_empty() => vec![String::new()],
            None => declared.iter().map(|c| c.to_string()).collect(),
        };
        for c in clusters {
            let e = counts.entry(c).or_insert((0, None));
            e.0 += 1;
            if e.0 == limit + 1 {
                e.1 = Some(r);
            }
        }
    }
    for (cluster, (n, first_over)) in counts {
        let Some(r) = first_over else { continue };
        let whose = if cluster.is_empty() {
            "the federation".to_string()
        } else {
            format!("cluster `{cluster}`")
        };
        out.push(
            diag(
                r,
                Code::OutOfRange,
                "metadata.name",
                format!(
                    "{whose} exports {n} services, more than the {limit} that one gateway \
                     announcement carries; peers would not learn of the rest"
                ),
            )
            .with_hint(
                "export only the services other clusters call, or split the exports across \
                 clusters with `meshfed.io/clusters`",
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Options, analyze};

    fn exports(n: usize) -> String {
        let mut s = String::from(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {name: east}\nspec: {gateways: ['127.0.0.1:15443']}\n",
        );
        for i in 0..n {
            s.push_str(&format!(
                "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: svc-{i}, namespace: default}}\n"
            ));
        }
        s
    }

    /// Issue 21, item 13: 30,000 exports were accepted and the announcement
    /// silently carried 10,000 (and 10,000 did not fit its frame). Now N+1 exports are refused, naming the
    /// count and the limit; N are accepted.
    #[test]
    fn a_cluster_exporting_more_services_than_an_announcement_carries_is_refused() {
        let opts = Options::default();
        let over = analyze(
            [("exports.yaml", exports(MAX_EXPORTED_SERVICES + 1))],
            &opts,
        );
        let errors: Vec<&Diagnostic> = over.diagnostics.iter().filter(|d| d.is_error()).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let m = &errors[0].message;
        let count = format!(
            "cluster `east` exports {} services",
            MAX_EXPORTED_SERVICES + 1
        );
        let limit = format!("more than the {MAX_EXPORTED_SERVICES}");
        assert!(m.contains(&count) && m.contains(&limit), "{m}");
        let ok = analyze([("exports.yaml", exports(MAX_EXPORTED_SERVICES))], &opts);
        assert!(
            ok.is_valid(),
            "{:?}",
            &ok.diagnostics[..ok.diagnostics.len().min(3)]
        );
    }
}
