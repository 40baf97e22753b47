//! The rollout plan of a federation: its `RolloutPolicy` (if any) resolved
//! against the declared clusters, with every default filled in.
//!
//! Pure, like the rest of the crate: the syncer runs the plan
//! (`meshfed_syncer::waves`); this module only says what it is. Clusters
//! that no wave names form a last wave of their own, with no bake time,
//! so a new cluster is never left without policy.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{RolloutPolicySpec, Spec};
use crate::{Analysis, syntax};

/// A wave's bake time when its `bakeTime` is not given.
pub const DEFAULT_BAKE_TIME: Duration = Duration::from_secs(300);

/// One wave: its clusters get the commit together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub clusters: Vec<String>,
    /// How long the clusters run the commit, watched by the gates, before
    /// the next wave opens.
    #[serde(with = "millis")]
    pub bake: Duration,
}

/// The gates' thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gates {
    /// Requests a service needs before the wave and during its bake to be
    /// judged.
    pub min_requests: u64,
    /// Percentage points of success rate a service may lose.
    pub max_success_rate_drop: f64,
    /// Percent by which p99 latency may grow.
    pub max_p99_increase_percent: f64,
    /// A p99 at or below this many milliseconds never fails the gate.
    #[serde(default = "default_p99_floor_ms")]
    pub p99_floor_ms: f64,
    /// Percentage points by which the share of denied requests may grow.
    pub max_denial_rate_increase: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_requests: 100,
            max_success_rate_drop: 2.0,
            max_p99_increase_percent: 50.0,
            p99_floor_ms: default_p99_floor_ms(),
            max_denial_rate_increase: 2.0,
        }
    }
}

fn default_p99_floor_ms() -> f64 {
    25.0
}

/// The waves, in order, and the gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// The RolloutPolicy's name.
    pub name: String,
    pub waves: Vec<Wave>,
    pub gates: Gates,
}

impl RolloutPlan {
    /// Resolves `spec` against the declared `clusters`: undeclared names
    /// are dropped (validation reports them), clusters in no wave form a
    /// last wave with no bake time, and empty waves are dropped.
    pub fn resolve(name: &str, spec: &RolloutPolicySpec, clusters: &BTreeSet<String>) -> Self {
        let mut placed = BTreeSet::new();
        let mut waves = Vec::new();
        for w in &spec.waves {
            let members: Vec<String> = w
                .clusters
                .iter()
                .filter(|c| clusters.contains(*c) && placed.insert((*c).clone()))
                .cloned()
                .collect();
            if members.is_empty() {
                continue;
            }
            let bake = w
                .bake_time
                .as_deref()
                .and_then(|b| syntax::parse_duration(b).ok())
                .unwrap_or(DEFAULT_BAKE_TIME);
            waves.push(Wave {
                clusters: members,
                bake,
            });
        }
        let rest: Vec<String> = clusters.difference(&placed).cloned().collect();
        if !rest.is_empty() {
            waves.push(Wave {
                clusters: rest,
                bake: Duration::ZERO,
            });
        }
        let d = Gates::default();
        let g = &spec.gates;
        RolloutPlan {
            name: name.to_string(),
            waves,
            gates: Gates {
                min_requests: g.min_requests.unwrap_or(d.min_requests).max(1),
                max_success_rate_drop: g.max_success_rate_drop.unwrap_or(d.max_success_rate_drop),
                max_p99_increase_percent: g
                    .max_p99_increase_percent
                    .unwrap_or(d.max_p99_increase_percent),
                p99_floor_ms: g.p99_floor_ms.unwrap_or(d.p99_floor_ms),
                max_denial_rate_increase: g
                    .max_denial_rate_increase
                    .unwrap_or(d.max_denial_rate_increase),
            },
        }
    }

    /// The index of the wave holding `cluster`.
    pub fn wave_of(&self, cluster: &str) -> Option<usize> {
        self.waves
            .iter()
            .position(|w| w.clusters.iter().any(|c| c == cluster))
    }
}

impl Analysis {
    /// The rollout plan of a valid analysis: `None` without a
    /// RolloutPolicy (every cluster at once).
    pub fn rollout(&self) -> Option<RolloutPlan> {
        let clusters = self.clusters();
        self.resources.iter().find_map(|r| match &r.spec {
            Spec::RolloutPolicy(s) => Some(RolloutPlan::resolve(&r.name, s, &clusters)),
            _ => None,
        })
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Code, Options, analyze};

    const CLUSTERS: &str = "\
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: edge}
spec: {gateways: ['gw.edge:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['gw.west:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['gw.east:15443']}
";

    fn run(rollout: &str) -> Analysis {
        analyze(
            [("clusters.yaml", CLUSTERS), ("rollout.yaml", rollout)],
            &Options::default(),
        )
    }

    #[test]
    fn waves_resolve_in_order_with_defaults_and_the_rest_last() {
        let a = run("\
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: waves}
spec:
  waves:
  - clusters: [edge]
    bakeTime: 30s
  - clusters: [west]
  gates: {minRequests: 20}
");
        assert!(a.is_valid(), "{:?}", a.diagnostics);
        let p = a.rollout().unwrap();
        assert_eq!(p.waves.len(), 3);
        assert_eq!(p.waves[0].clusters, vec!["edge"]);
        assert_eq!(p.waves[0].bake, Duration::from_secs(30));
        assert_eq!(p.waves[1].bake, DEFAULT_BAKE_TIME);
        assert_eq!(p.waves[2].clusters, vec!["east"]);
        assert_eq!(p.waves[2].bake, Duration::ZERO);
        assert_eq!(p.gates.min_requests, 20);
        assert_eq!(p.gates.max_success_rate_drop, 2.0);
        assert_eq!(p.wave_of("west"), Some(1));
        let back: RolloutPlan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn no_rollout_policy_means_no_plan() {
        let a = analyze([("clusters.yaml", CLUSTERS)], &Options::default());
        assert!(a.rollout().is_none());
    }

    #[test]
    fn bad_waves_and_gates_are_reported_at_their_lines() {
        let a = run("\
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: waves}
spec:
  waves:
  - clusters: [edge, nowhere]
    bakeTime: soon
  - clusters: [edge]
  - clusters: []
  gates:
    maxSuccessRateDrop: 150
    maxP99IncreasePercent: -1
    minRequests: 0
");
        let found: Vec<(usize, Code)> = a
            .diagnostics
            .iter()
            .filter(|d| d.file == "rollout.yaml")
            .map(|d| (d.line, d.code))
            .collect();
        for want in [
            (6, Code::UnknownCluster),
            (7, Code::InvalidDuration),
            (8, Code::InvalidValue),
            (9, Code::MissingField),
            (11, Code::InvalidPercent),
            (12, Code::OutOfRange),
            (13, Code::OutOfRange),
        ] {
            assert!(found.contains(&want), "{want:?} not in {found:?}");
        }
    }

    #[test]
    fn a_second_rollout_policy_is_a_conflict() {
        let one = "\
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: a}
spec: {waves: [{clusters: [edge]}]}
---
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: b}
spec: {waves: [{clusters: [west]}]}
";
        let a = run(one);
        assert!(
            a.diagnostics
                .iter()
                .any(|d| d.code == Code::Conflict && d.line == 8),
            "{:?}",
            a.diagnostics
        );
    }
}
