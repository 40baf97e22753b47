//! Locality-aware cluster choice: which cluster serves a call, among those
//! with healthy endpoints for it.
//!
//! The service's DestinationRule `trafficPolicy.loadBalancer.localityLbSetting`
//! decides, with Istio's meanings, where a locality is `Cluster.spec.locality`
//! written `region/zone/subzone`:
//! - no setting, or `enabled: true` without `distribute`: priority tiers, as
//!   Envoy's locality failover. The local cluster first; then clusters in the
//!   same region and zone; then the same region; then the region that
//!   `failover` names for ours; then every other cluster. Each call goes to
//!   the first tier with a healthy endpoint, weighted by healthy endpoint
//!   counts within it. With `failoverPriority`, tiers instead count how many
//!   of the listed labels, in order, a cluster shares with ours (its
//!   `topology.istio.io/cluster`, `topology.istio.io/network`,
//!   `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and
//!   `topology.istio.io/subzone`).
//! - `distribute`: the first `from` pattern that matches our locality gives
//!   `to` patterns with weights; each weight is shared by the healthy
//!   clusters its pattern matches (first matching pattern wins). When none of
//!   them has a healthy endpoint, the tiers above apply.
//! - `enabled: false`: no preference; every healthy cluster, weighted by its
//!   healthy endpoint count.
//!
//! The tiers themselves are a policy rule ([`meshfed_policy::locality`]),
//! shared with `meshfed-policy diff`, which shows a commit's change of
//! failover order. It does not decide health (discovery, announcements and
//! outlier detection do) or which gateway of a cluster carries the call
//! (the tunnel).

use std::collections::BTreeMap;

use meshfed_policy::locality::{self, locality_path, pattern_matches};
use meshfed_policy::snapshot::{ClusterInfo, LocalityLb};

use super::{Active, Target};

/// Picks one cluster from `counts` (cluster → healthy endpoints, all > 0).
pub fn choose(
    active: &Active,
    target: &Target,
    local_cluster: &str,
    counts: BTreeMap<String, u32>,
) -> Option<String> {
    if counts.is_empty() {
        return None;
    }
    let setting = setting(active, target);
    let clusters = &active.snapshot.policy.clusters;
    let info = |c: &str| clusters.get(c);
    match setting {
        Some(s) if !s.enabled => {
            return weighted(counts.iter().map(|(c, n)| (c.as_str(), u64::from(*n))));
        }
        Some(s) if !s.distribute.is_empty() => {
            if let Some(c) = distribute(s, info(local_cluster), &counts, &info) {
                return Some(c);
            }
        }
        _ => {}
    }
    let tier = |c: &str| locality::tier(clusters, setting, local_cluster, c);
    let best = counts.keys().map(|c| tier(c)).min()?;
    weighted(
        counts
            .iter()
            .filter(|(c, _)| tier(c) == best)
            .map(|(c, n)| (c.as_str(), u64::from(*n))),
    )
}

/// The locality setting for `target`: its subset's (compiled with the
/// DestinationRule's as fallback), then the port's, then the rule's.
fn setting<'a>(active: &'a Active, target: &Target) -> Option<&'a LocalityLb> {
    locality::setting(
        &active.snapshot.policy,
        &target.service,
        target.subset.as_deref(),
        Some(target.port),
    )
}

fn distribute<'a>(
    s: &LocalityLb,
    local: Option<&ClusterInfo>,
    counts: &BTreeMap<String, u32>,
    info: &impl Fn(&str) -> Option<&'a ClusterInfo>,
) -> Option<String> {
    let ours = locality_path(local)?;
    let (_, to) = s
        .distribute
        .iter()
        .find(|(from, _)| pattern_matches(from, &ours))?;
    // Each healthy cluster joins the first `to` pattern that matches it.
    let mut members: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in counts.keys() {
        let Some(path) = locality_path(info(c)) else {
            continue;
        };
        if let Some((p, _)) = to.iter().find(|(p, _)| pattern_matches(p, &path)) {
            members.entry(p.as_str()).or_default().push(c.as_str());
        }
    }
    // A pattern's weight is shared by its clusters: scale every weight by a
    // common multiple of the member counts (bounded: a share need not be
    // exact beyond a millionth) so that integer shares stay fair.
    let scale: u64 = 1_000_000;
    weighted(members.iter().flat_map(|(p, cs)| {
        let w = u64::from(to.get(*p).copied().unwrap_or(0)) * scale / cs.len().max(1) as u64;
        cs.iter().map(move |c| (*c, w))
    }))
}

/// One key, at random, in proportion to its weight.
fn weighted<'a>(items: impl Iterator<Item = (&'a str, u64)> + Clone) -> Option<String> {
    let total: u64 = items.clone().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::random_range(0..total);
    for (k, w) in items {
        if r < w {
            return Some(k.to_string());
        }
        r -= w;
    }
    None
}
