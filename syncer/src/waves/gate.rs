//! The gates: is a wave's bake going well? A pure function of the golden
//! metrics before the wave and during its bake ([`crate::golden::Window`])
//! and the plan's thresholds.
//!
//! The windows hold the services the commit changes in the wave's
//! clusters only (what its diff reaches, [`meshfed_policy::diff::Reach`];
//! the caller filters, [`crate::golden::Golden::window`]): a service the
//! commit does not change may fail for its own reasons without rolling
//! the commit back. Per such service seen during the bake with at least
//! `minRequests` requests:
//! - success rate: fails when it dropped by more than
//!   `maxSuccessRateDrop` points from before the wave (from 100% when the
//!   service had fewer than `minRequests` requests before: a new service,
//!   or a syncer restarted without the history);
//! - authorization denials: fails when their share of the service's
//!   requests grew by more than `maxDenialRateIncrease` points (from 0%
//!   without enough requests before);
//! - p99 latency of its outbound requests, with `minRequests` before and
//!   during: fails when it grew by more than `maxP99IncreasePercent`
//!   percent and is above `p99FloorMs` (p99 is a bucket's upper bound: at
//!   a few milliseconds, one bucket up is noise on a busy host, not a
//!   regression).
//!
//! A failure is reported as soon as it is seen, even mid-bake; a pass
//! only once the bake time is over.

use meshfed_policy::rollout::Gates;
use serde::{Deserialize, Serialize};

use crate::golden::Window;

/// A failed gate: which metric, where, its value and the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// `success_rate`, `denial_rate` or `p99_latency`.
    pub metric: String,
    /// The destination service.
    pub service: String,
    /// The value before the wave and during the bake (percent, or seconds).
    pub before: f64,
    pub value: f64,
    /// The threshold, as the policy says it.
    pub threshold: String,
    /// Requests judged during the bake.
    pub requests: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.metric.as_str() {
            "p99_latency" => write!(
                f,
                "gate p99_latency: p99 of {} is {} (was {}) over {} requests; threshold {}",
                self.service,
                secs(self.value),
                secs(self.before),
                self.requests,
                self.threshold
            ),
            m => write!(
                f,
                "gate {m}: {} of {} is {:.1}% (was {:.1}%) over {} requests; threshold {}",
                if m == "success_rate" {
                    "success rate"
                } else {
                    "share of requests denied by authorization"
                },
                self.service,
                self.value,
                self.before,
                self.requests,
                self.threshold
            ),
        }
    }
}

fn secs(s: f64) -> String {
    if s.is_infinite() {
        "over the largest bucket".into()
    } else {
        format!("≤ {}ms", (s * 1000.0).round())
    }
}

/// What the gates say now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing wrong yet, and the bake is not over.
    Wait,
    /// The bake is over and nothing failed; the note says what was judged
    /// ("no traffic to judge" when nothing had enough requests).
    Pass(String),
    Fail(Failure),
}

/// Judges the bake so far.
pub fn judge(before: &Window, during: &Window, gates: &Gates, bake_over: bool) -> Verdict {
    let min = gates.min_requests.max(1);
    let mut judged = Vec::new();
    for (service, now) in &during.services {
        let was = before.services.get(service).copied().unwrap_or_default();
        if now.requests >= min {
            let rate = pct(now.successes, now.requests);
            let base = if was.requests >= min {
                pct(was.successes, was.requests)
            } else {
                100.0
            };
            if base - rate > gates.max_success_rate_drop {
                return Verdict::Fail(Failure {
                    metric: "success_rate".into(),
                    service: service.clone(),
                    before: base,
                    value: rate,
                    threshold: format!("a drop of at most {} points", gates.max_success_rate_drop),
                    requests: now.requests,
                });
            }
            judged.push(service.as_str());
        }
        if now.all >= min {
            let share = pct(now.denials, now.all);
            let base = if was.all >= min {
                pct(was.denials, was.all)
            } else {
                0.0
            };
            if share - base > gates.max_denial_rate_increase {
                return Verdict::Fail(Failure {
                    metric: "denial_rate".into(),
                    service: service.clone(),
                    before: base,
                    value: share,
                    threshold: format!(
                        "an increase of at most {} points",
                        gates.max_denial_rate_increase
                    ),
                    requests: now.all,
                });
            }
        }
    }
    for (service, now) in &during.latency {
        let Some(was) = before.latency.get(service) else {
            continue;
        };
        let (n_before, n_now) = (was.total(), now.total());
        if n_before >= min
            && n_now >= min
            && let (Some(was), Some(now)) = (was.quantile(0.99), now.quantile(0.99))
            && now > was * (1.0 + gates.max_p99_increase_percent / 100.0)
            && now * 1000.0 > gates.p99_floor_ms
        {
            return Verdict::Fail(Failure {
                metric: "p99_latency".into(),
                service: service.clone(),
                before: was,
                value: now,
                threshold: format!("growth of at most {}%", gates.max_p99_increase_percent),
                requests: n_now,
            });
        }
    }
    if !bake_over {
        return Verdict::Wait;
    }
    Verdict::Pass(if judged.is_empty() {
        format!(
            "no traffic to judge (no service the commit changes had {min} requests during the bake)"
        )
    } else {
        format!("judged {}", judged.join(", "))
    })
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 100.0;
    }
    part as f64 * 100.0 / whole as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{Counts, Latency};

    fn window(service: &str, requests: u64, successes: u64, p99_bucket: usize) -> Window {
        let mut w = Window::default();
        w.services.insert(
            service.into(),
            Counts {
                requests,
                successes,
                denials: 0,
                all: requests,
            },
        );
        let mut counts = vec![0; 4];
        counts[p99_bucket] = requests;
        w.latency.insert(
            service.into(),
            Latency {
                bounds: vec![0.01, 0.1, 1.0],
                counts,
            },
        );
        w
    }

    #[test]
    fn a_success_rate_drop_over_the_threshold_fails_at_once_naming_the_gate() {
        let v = judge(
            &window("ratings", 500, 500, 0),
            &window("ratings", 120, 0, 0),
            &Gates::default(),
            false,
        );
        let Verdict::Fail(f) = v else { panic!("{v:?}") };
        assert_eq!(f.metric, "success_rate");
        assert_eq!((f.before, f.value), (100.0, 0.0));
        assert!(f.to_string().contains("ratings"), "{f}");
    }

    #[test]
    fn a_drop_within_the_threshold_passes_only_when_the_bake_is_over() {
        let before = window("ratings", 1000, 1000, 0);
        let during = window("ratings", 1000, 985, 0);
        assert_eq!(
            judge(&before, &during, &Gates::default(), false),
            Verdict::Wait
        );
        assert!(matches!(
            judge(&before, &during, &Gates::default(), true),
            Verdict::Pass(n) if n.contains("ratings")
        ));
    }

    #[test]
    fn too_little_traffic_passes_at_the_end_with_a_note() {
        let v = judge(
            &Window::default(),
            &window("ratings", 99, 0, 3),
            &Gates::default(),
            true,
        );
        assert!(matches!(v, Verdict::Pass(n) if n.contains("no traffic to judge")));
    }

    #[test]
    fn p99_growth_over_the_threshold_fails_above_the_floor_only() {
        let v = judge(
            &window("a", 200, 200, 0),
            &window("a", 200, 200, 2),
            &Gates::default(),
            false,
        );
        assert!(matches!(v, Verdict::Fail(f) if f.metric == "p99_latency" && f.service == "a"));
        // 10 ms → 100 ms is under a 200 ms floor.
        let floor = Gates {
            p99_floor_ms: 200.0,
            ..Gates::default()
        };
        let v = judge(
            &window("a", 200, 200, 0),
            &window("a", 200, 200, 1),
            &floor,
            false,
        );
        assert_eq!(v, Verdict::Wait);
    }

    #[test]
    fn without_a_baseline_success_is_compared_to_100_percent() {
        let v = judge(
            &Window::default(),
            &window("new", 200, 190, 0),
            &Gates::default(),
            false,
        );
        assert!(matches!(v, Verdict::Fail(f) if f.before == 100.0));
    }
}
