//! Cross-resource rules, for the whole federation and for each cluster's
//! targeted view (the resources whose `meshfed.io/clusters` annotation
//! includes that cluster, or that have none).
//!
//! A reference that holds in some clusters' views and not in others is
//! reported once, naming the clusters where it breaks.

use std::collections::{BTreeMap, BTreeSet};

use crate::Options;
use crate::diag::{Code, Diagnostic};
use crate::model::*;
use crate::snapshot::CLUSTER_LABEL;

use super::{applies_to, canonical_host, diag, targets};

/// Runs every federation rule.
pub fn check(
    resources: &[Resource],
    opts: &Options,
    check_references: bool,
    out: &mut Vec<Diagnostic>,
) {
    duplicates(resources, out);
    let clusters = declared_clusters(resources, out);
    if check_references {
        cluster_references(resources, &clusters, out);
    }
    ambiguous_hosts(resources, out);

    // The views: one per declared cluster, or a single federation-wide one
    // when the repository declares no cluster.
    let views: Vec<Option<&str>> = if clusters.is_empty() {
        vec![None]
    } else {
        clusters.keys().map(|c| Some(c.as_str())).collect()
    };
    let in_view = |r: &Resource, view: Option<&str>| view.is_none_or(|c| applies_to(r, c));

    // Per host: which DestinationRule defines it in each view.
    let mut subset_failures: BTreeMap<(usize, String), BTreeSet<String>> = BTreeMap::new();
    // (first, second) → (what they both claim, views where they clash).
    let mut conflicts: BTreeMap<(usize, usize), (String, BTreeSet<String>)> = BTreeMap::new();
    let mut conflict = |first: usize, second: usize, what: String, view: &str| {
        conflicts
            .entry((first, second))
            .or_insert_with(|| (what, BTreeSet::new()))
            .1
            .insert(view.to_string());
    };
    for view in &views {
        let view_name = view.unwrap_or("").to_string();
        let mut drs: BTreeMap<String, usize> = BTreeMap::new();
        let mut vss: BTreeMap<String, usize> = BTreeMap::new();
        let mut wide_pa: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            if !in_view(r, *view) {
                continue;
            }
            match &r.spec {
                Spec::DestinationRule(dr) if !dr.host.is_empty() => {
                    let host = canonical_host(&dr.host, &r.namespace, &opts.domain);
                    if let Some(&first) = drs.get(&host) {
                        conflict(
                            first,
                            i,
                            format!("DestinationRule for host `{host}`"),
                            &view_name,
                        );
                    } else {
                        drs.insert(host, i);
                    }
                }
                Spec::VirtualService(vs) if vs_applies_to_mesh(vs) => {
                    for h in &vs.hosts {
                        let host = canonical_host(h, &r.namespace, &opts.domain);
                        match vss.get(&host) {
                            Some(&first) if first != i => {
                                conflict(
                                    first,
                                    i,
                                    format!("VirtualService for host `{host}`"),
                                    &view_name,
                                );
                            }
                            Some(_) => {}
                            None => {
                                vss.insert(host, i);
                            }
                        }
                    }
                }
                Spec::PeerAuthentication(pa)
                    if pa
                        .selector
                        .as_ref()
                        .is_none_or(|s| s.match_labels.is_empty()) =>
                {
                    if let Some(&first) = wide_pa.get(r.namespace.as_str()) {
                        let what = if r.namespace == opts.root_namespace {
                            "mesh-wide PeerAuthentication".to_string()
                        } else {
                            format!("namespace-wide PeerAuthentication of `{}`", r.namespace)
                        };
                        conflict(first, i, what, &view_name);
                    } else {
                        wide_pa.insert(r.namespace.as_str(), i);
                    }
                }
                _ => {}
            }
        }
        // Subset references from VirtualServices in this view.
        for (i, r) in resources.iter().enumerate() {
            let Spec::VirtualService(vs) = &r.spec else {
                continue;
            };
            if !in_view(r, *view) || !vs_applies_to_mesh(vs) {
                continue;
            }
            for (path, d) in vs_destinations(vs) {
                let Some(subset) = &d.subset else { continue };
                if d.host.is_empty() {
                    continue;
                }
                let host = canonical_host(&d.host, &r.namespace, &opts.domain);
                let defined = drs.get(&host).is_some_and(|&j| match &resources[j].spec {
                    Spec::DestinationRule(dr) => dr.subsets.iter().any(|s| &s.name == subset),
                    _ => false,
                });
                if !defined {
                    subset_failures
                        .entry((i, path))
                        .or_default()
                        .insert(view_name.clone());
                }
            }
        }
    }

    if !check_references {
        subset_failures.clear();
    }
    for ((i, path), failing) in subset_failures {
        let r = &resources[i];
        let Spec::VirtualService(vs) = &r.spec else {
            continue;
        };
        let Some(d) = vs_destinations(vs)
            .into_iter()
            .find(|(p, _)| *p == path)
            .map(|(_, d)| d)
        else {
            continue;
        };
        let subset = d.subset.clone().unwrap_or_default();
        let host = canonical_host(&d.host, &r.namespace, &opts.domain);
        let applies: BTreeSet<String> = views
            .iter()
            .flatten()
            .filter(|c| applies_to(r, c))
            .map(|c| c.to_string())
            .collect();
        let everywhere = failing.contains("") || failing == applies;
        let msg = if everywhere {
            format!("subset `{subset}` of `{host}` is not defined by any DestinationRule")
        } else {
            format!(
                "subset `{subset}` of `{host}` is not defined for cluster(s) {} (a DestinationRule that defines it does not target them)",
                join(&failing)
            )
        };
        out.push(
            diag(r, Code::UnknownSubset, &format!("{path}.subset"), msg).with_hint(format!(
                "add a DestinationRule for host `{host}` with subset `{subset}`, or fix the name"
            )),
        );
    }

    for ((first, second), (what, views)) in conflicts {
        let (a, b) = (&resources[first], &resources[second]);
        let pos = a.origin.positions.lookup("metadata.name");
        let where_ = if views.contains("") {
            String::new()
        } else {
            format!(" in cluster(s) {}", join(&views))
        };
        out.push(
            diag(
                b,
                Code::Conflict,
                "metadata.name",
                format!(
                    "{} and {} both define the {what}{where_}",
                    b.display_name(),
                    a.display_name(),
                ),
            )
            .with_hint(format!(
                "merge them, or target them at different clusters; the other is at {}:{}",
                a.origin.file, pos.line
            )),
        );
    }
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a VirtualService applies to mesh (east-west) traffic.
pub fn vs_applies_to_mesh(vs: &VirtualServiceSpec) -> bool {
    vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")
}

/// Every destination of a VirtualService, with its field path.
fn vs_destinations(vs: &VirtualServiceSpec) -> Vec<(String, &Destination)> {
    let mut v = Vec::new();
    for (i, h) in vs.http.iter().enumerate() {
        for (k, d) in h.route.iter().enumerate() {
            v.push((
                format!("spec.http[{i}].route[{k}].destination"),
                &d.destination,
            ));
        }
        if let Some(m) = &h.mirror {
            v.push((format!("spec.http[{i}].mirror"), m));
        }
        for (k, m) in h.mirrors.iter().enumerate() {
            v.push((
                format!("spec.http[{i}].mirrors[{k}].destination"),
                &m.destination,
            ));
        }
    }
    for (i, t) in vs.tcp.iter().enumerate() {
        for (k, d) in t.route.iter().enumerate() {
            v.push((
                format!("spec.tcp[{i}].route[{k}].destination"),
                &d.destination,
            ));
        }
    }
    v
}

fn duplicates(resources: &[Resource], out: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<(Kind, &str, &str), &Resource> = BTreeMap::new();
    for r in resources {
        if r.name.is_empty() {
            continue;
        }
        let key = (r.kind, r.namespace.as_str(), r.name.as_str());
        if let Some(first) = seen.get(&key) {
            let pos = first.origin.positions.lookup("metadata.name");
            let code = Code::DuplicateResource;
            out.push(
                diag(
                    r,
                    code,
                    "metadata.name",
                    format!("{} is defined twice", r.display_name()),
                )
                .with_hint(format!(
                    "the first is at {}:{}:{}",
                    first.origin.file, pos.line, pos.column
                )),
            );
        } else {
            seen.insert(key, r);
        }
    }
}

/// Declared clusters by name; reports gateway addresses shared by clusters.
fn declared_clusters<'r>(
    resources: &'r [Resource],
    out: &mut Vec<Diagnostic>,
) -> BTreeMap<String, &'r Resource> {
    let mut clusters = BTreeMap::new();
    let mut addresses: BTreeMap<&str, &Resource> = BTreeMap::new();
    for r in resources {
        let Spec::Cluster(c) = &r.spec else { continue };
        if r.name.is_empty() {
            continue;
        }
        if clusters.contains_key(&r.name) {
            continue; // reported as a duplicate resource
        }
        clusters.insert(r.name.clone(), r);
        for (i, g) in c.gateways.iter().enumerate() {
            if let Some(other) = addresses.insert(g, r)
                && other.name != r.name
            {
                out.push(diag(
                        r,
                        Code::DuplicateAddress,
                        &format!("spec.gateways[{i}]"),
                        format!("gateway address `{g}` is also listed by Cluster `{}`; a gateway belongs to exactly one cluster", other.name),
                    ));
            }
        }
    }
    clusters
}

fn cluster_references(
    resources: &[Resource],
    clusters: &BTreeMap<String, &Resource>,
    out: &mut Vec<Diagnostic>,
) {
    let known = |name: &str| clusters.contains_key(name);
    let mut rollout_policies = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::RolloutPolicy(_)));
    if let Some(first) = rollout_policies.next() {
        for other in rollout_policies {
            out.push(
                diag(
                    other,
                    Code::Conflict,
                    "metadata.name",
                    format!(
                        "a second RolloutPolicy; `{}` ({}) already orders the rollout",
                        first.name, first.origin.file
                    ),
                )
                .with_hint("keep one RolloutPolicy per repository"),
            );
        }
    }
    let hint = if clusters.is_empty() {
        "no `Cluster` (meshfed.io/v1alpha1) is declared; add one per cluster".to_string()
    } else {
        format!(
            "declared clusters: {}",
            clusters
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut unknown = |r: &Resource, path: &str, name: &str, what: &str| {
        let closest = crate::load::closest(
            name,
            &clusters.keys().map(String::as_str).collect::<Vec<_>>(),
        )
        .map(|s| format!("did you mean `{s}`? "))
        .unwrap_or_default();
        out.push(
            diag(
                r,
                Code::UnknownCluster,
                path,
                format!("{what} names cluster `{name}`, which no Cluster declares"),
            )
            .with_hint(format!("{closest}{hint}")),
        );
    };
    for r in resources {
        if let Spec::RolloutPolicy(rp) = &r.spec {
            for (i, w) in rp.waves.iter().enumerate() {
                for (j, name) in w.clusters.iter().enumerate() {
                    if !known(name) {
                        unknown(
                            r,
                            &format!("spec.waves[{i}].clusters[{j}]"),
                            name,
                            "the rollout wave",
                        );
                    }
                }
            }
        }
        if let Some(t) = targets(r) {
            for name in t.iter().filter(|n| !known(n)) {
                unknown(
                    r,
                    "metadata.annotations[\"meshfed.io/clusters\"]",
                    name,
                    "annotation `meshfed.io/clusters`",
                );
            }
        }
        match &r.spec {
            Spec::DestinationRule(dr) => {
                for (i, s) in dr.subsets.iter().enumerate() {
                    if let Some(c) = s.labels.get(CLUSTER_LABEL)
                        && !known(c)
                    {
                        let path = format!("spec.subsets[{i}].labels[\"{CLUSTER_LABEL}\"]");
                        unknown(r, &path, c, &format!("subset `{}`", s.name));
                    }
                }
            }
            Spec::AuthorizationPolicy(ap) => {
                for (i, rule) in ap.rules.iter().enumerate() {
                    for (j, w) in rule.conditions().iter().enumerate() {
                        if w.key == "source.cluster" {
                            for v in w.values.iter().chain(&w.not_values) {
                                if v != "*" && !known(v) {
                                    unknown(
                                        r,
                                        &format!("spec.rules[{i}].when[{j}]"),
                                        v,
                                        "condition `source.cluster`",
                                    );
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Warns about hosts like `reviews.default`, which Istio takes as fully
/// qualified names rather than `reviews` in namespace `default`.
fn ambiguous_hosts(resources: &[Resource], out: &mut Vec<Diagnostic>) {
    let namespaces: BTreeSet<&str> = resources.iter().map(|r| r.namespace.as_str()).collect();
    let check = |r: &Resource, path: &str, host: &str, out: &mut Vec<Diagnostic>| {
        let mut parts = host.split('.');
        if let (Some(name), Some(ns), None) = (parts.next(), parts.next(), parts.next())
            && namespaces.contains(ns)
            && !name.starts_with('*')
        {
            out.push(
                    diag(r, Code::Ambiguous, path, format!(
                        "host `{host}` is taken as a fully qualified name, as Istio does, not as `{name}` in namespace `{ns}`"
                    ))
                    .with_hint(format!("write `{name}.{ns}.svc.cluster.local` to mean the service")),
                );
        }
    };
    for r in resources {
        match &r.spec {
            Spec::VirtualService(vs) => {
                for (i, h) in vs.hosts.iter().enumerate() {
                    check(r, &format!("spec.hosts[{i}]"), h, out);
                }
                for (path, d) in vs_destinations(vs) {
                    check(r, &format!("{path}.host"), &d.host, out);
                }
            }
            Spec::DestinationRule(dr) => check(r, "spec.host", &dr.host, out),
            _ => {}
        }
    }
}
