//! Locality tiers: the order in which a cluster's gateways try the clusters
//! that serve a service, from the DestinationRule's `localityLbSetting` and
//! each `Cluster.spec.locality` in the snapshot.
//!
//! A pure decision over snapshot data. The gateway's cluster choice
//! (`gateway/src/route/locality.rs`) takes each call's tier from [`tier`]
//! and picks among the healthy clusters of the best tier; `meshfed-policy
//! diff` shows [`failover_order`] when a commit changes it. Health and the
//! random pick stay in the gateway.

use std::collections::BTreeMap;

use crate::snapshot::{CLUSTER_LABEL, ClusterInfo, ClusterPolicy, Locality, LocalityLb};

/// The locality setting for calls to `service` (canonical host): its
/// `subset`'s (compiled with the DestinationRule's as fallback), then the
/// `port`'s, then the rule's.
pub fn setting<'a>(
    policy: &'a ClusterPolicy,
    service: &str,
    subset: Option<&str>,
    port: Option<u16>,
) -> Option<&'a LocalityLb> {
    let dest = policy.destinations.get(service)?;
    let tp = subset
        .and_then(|s| dest.subsets.get(s))
        .map_or(&dest.traffic_policy, |s| &s.traffic_policy);
    port.and_then(|p| tp.ports.get(&p))
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.locality.as_ref())
        .or(tp.load_balancer.locality.as_ref())
}

/// The tier of `cluster` for calls from `local` (lower is nearer; the local
/// cluster is 0), with Istio's meanings:
/// - with `failoverPriority`: 1 + the number of listed labels, in order,
///   that `cluster` does *not* share with `local` (the labels a cluster
///   stands for: [`cluster_labels`]);
/// - otherwise by locality: 1 same region and zone, 2 same region, 3 the
///   region `failover` names for ours, 4 anything else (or unknown).
pub fn tier(
    clusters: &BTreeMap<String, ClusterInfo>,
    setting: Option<&LocalityLb>,
    local: &str,
    cluster: &str,
) -> u32 {
    if cluster == local {
        return 0;
    }
    match setting {
        Some(s) if !s.failover_priority.is_empty() => {
            let ours = cluster_labels(local, clusters.get(local));
            let theirs = cluster_labels(cluster, clusters.get(cluster));
            let shared = s
                .failover_priority
                .iter()
                .take_while(|l| {
                    ours.get(l.as_str())
                        .is_some_and(|v| theirs.get(l.as_str()) == Some(v))
                })
                .count();
            // More shared labels: a nearer tier.
            1 + u32::try_from(s.failover_priority.len() - shared).unwrap_or(u32::MAX - 1)
        }
        _ => nearness(
            clusters.get(local).and_then(|i| i.locality.as_ref()),
            clusters.get(cluster).and_then(|i| i.locality.as_ref()),
            setting,
        ),
    }
}

/// Tier of a remote cluster by locality: 1 same zone, 2 same region, 3 the
/// configured failover region, 4 anything else (or unknown).
fn nearness(
    ours: Option<&Locality>,
    theirs: Option<&Locality>,
    setting: Option<&LocalityLb>,
) -> u32 {
    let (Some(ours), Some(theirs)) = (ours, theirs) else {
        return 4;
    };
    if ours.region == theirs.region {
        if !ours.zone.is_empty() && ours.zone == theirs.zone {
            1
        } else {
            2
        }
    } else if setting.and_then(|s| s.failover.get(&ours.region)) == Some(&theirs.region) {
        3
    } else {
        4
    }
}

/// The labels a cluster stands for, for `failoverPriority`: its
/// `topology.istio.io/cluster`, `topology.istio.io/network`,
/// `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and
/// `topology.istio.io/subzone`.
pub fn cluster_labels<'a>(
    name: &'a str,
    info: Option<&'a ClusterInfo>,
) -> BTreeMap<&'static str, &'a str> {
    let mut m = BTreeMap::from([(CLUSTER_LABEL, name)]);
    if let Some(i) = info {
        if let Some(n) = &i.network {
            m.insert("topology.istio.io/network", n.as_str());
        }
        if let Some(l) = &i.locality {
            m.insert("topology.kubernetes.io/region", l.region.as_str());
            if !l.zone.is_empty() {
                m.insert("topology.kubernetes.io/zone", l.zone.as_str());
            }
            if !l.subzone.is_empty() {
                m.insert("topology.istio.io/subzone", l.subzone.as_str());
            }
        }
    }
    m
}

/// `region/zone/subzone` of a cluster, empty parts left empty.
pub fn locality_path(info: Option<&ClusterInfo>) -> Option<String> {
    let l = info?.locality.as_ref()?;
    Some(format!("{}/{}/{}", l.region, l.zone, l.subzone))
}

/// Istio's locality pattern: `region`, `region/zone`, `region/zone/subzone`,
/// where any part may be `*`, and a trailing `*` matches the rest.
pub fn pattern_matches(pattern: &str, locality: &str) -> bool {
    let mut parts = locality.split('/');
    for p in pattern.split('/') {
        let Some(have) = parts.next() else {
            return false;
        };
        if p == "*" {
            continue;
        }
        if p != have {
            return false;
        }
    }
    true
}

/// How a cluster's gateways spread a service's calls over the clusters
/// that serve it, when every one of them is healthy and then as they fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preference {
    /// `enabled: false`: every healthy cluster, by endpoint count.
    Spread(Vec<String>),
    /// `distribute` for our locality: `to` pattern → weight; the tiers
    /// apply when none of them has a healthy endpoint.
    Distribute {
        weights: BTreeMap<String, u32>,
        tiers: Vec<Vec<String>>,
    },
    /// Tiers, nearest first: the first with a healthy endpoint serves,
    /// its clusters by endpoint count.
    Tiers(Vec<Vec<String>>),
}

/// The failover order of `candidates` (the clusters that serve a service)
/// for calls from `policy.cluster`, under `setting`.
pub fn failover_order<'a>(
    policy: &ClusterPolicy,
    setting: Option<&LocalityLb>,
    candidates: impl IntoIterator<Item = &'a String>,
) -> Preference {
    let local = policy.cluster.as_str();
    let candidates: Vec<&String> = candidates.into_iter().collect();
    if setting.is_some_and(|s| !s.enabled) {
        return Preference::Spread(candidates.into_iter().cloned().collect());
    }
    let mut by_tier: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for c in candidates {
        by_tier
            .entry(tier(&policy.clusters, setting, local, c))
            .or_default()
            .push(c.clone());
    }
    let tiers: Vec<Vec<String>> = by_tier.into_values().collect();
    let ours = locality_path(policy.clusters.get(local));
    let distribute = setting.zip(ours).and_then(|(s, ours)| {
        s.distribute
            .iter()
            .find(|(from, _)| pattern_matches(from, &ours))
            .map(|(_, to)| to.clone())
    });
    match distribute {
        Some(weights) => Preference::Distribute { weights, tiers },
        None => Preference::Tiers(tiers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_patterns_match_as_istio_documents() {
        assert!(pattern_matches("us-west1/*", "us-west1/a/"));
        assert!(pattern_matches("us-west1", "us-west1/a/x"));
        assert!(pattern_matches("*/a/*", "eu/a/x"));
        assert!(!pattern_matches("us-west1/b/*", "us-west1/a/"));
        assert!(!pattern_matches("us-east1/*", "us-west1/a/"));
    }

    fn cluster(region: &str, zone: &str) -> ClusterInfo {
        ClusterInfo {
            locality: Some(Locality {
                region: region.into(),
                zone: zone.into(),
                subzone: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn failover_order_is_local_then_zone_then_region_then_failover_region_then_rest() {
        let mut p = ClusterPolicy {
            cluster: "a".into(),
            ..Default::default()
        };
        p.clusters.insert("a".into(), cluster("r1", "z1"));
        p.clusters.insert("b".into(), cluster("r1", "z1"));
        p.clusters.insert("c".into(), cluster("r1", "z2"));
        p.clusters.insert("d".into(), cluster("r3", "z1"));
        p.clusters.insert("e".into(), cluster("r2", "z1"));
        let s = LocalityLb {
            enabled: true,
            failover: BTreeMap::from([("r1".into(), "r2".into())]),
            ..Default::default()
        };
        let names: Vec<String> = p.clusters.keys().cloned().collect();
        let tiers = |v: &[&[&str]]| -> Vec<Vec<String>> {
            v.iter()
                .map(|t| t.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        assert_eq!(
            failover_order(&p, Some(&s), &names),
            Preference::Tiers(tiers(&[&["a"], &["b"], &["c"], &["e"], &["d"]]))
        );
        // Without the failover region, r2 and r3 are equally far.
        assert_eq!(
            failover_order(&p, None, &names),
            Preference::Tiers(tiers(&[&["a"], &["b"], &["c"], &["d", "e"]]))
        );
        let off = LocalityLb {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(
            failover_order(&p, Some(&off), &names),
            Preference::Spread(names.clone())
        );
        let prio = LocalityLb {
            enabled: true,
            failover_priority: vec![
                "topology.kubernetes.io/region".into(),
                "topology.kubernetes.io/zone".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            failover_order(&p, Some(&prio), &names),
            Preference::Tiers(tiers(&[&["a"], &["b"], &["c"], &["d", "e"]]))
        );
    }
}
