//! The gateways' golden metrics, as they report them on their config
//! streams (`GoldenMetrics`, every second or so): per destination service
//! the outbound requests, their successes, the authorization denials, and
//! an outbound latency histogram per gateway.
//!
//! Reports are deltas; this store keeps each gateway's recent reports with
//! the time they arrived, and sums them over a window of time and a set of
//! clusters for the rollout gates ([`crate::waves`]). Memory is bounded:
//! at most [`KEEP`] of history and [`MAX_REPORTS`] reports per gateway,
//! [`MAX_SERVICES`] services and [`MAX_BUCKETS`] buckets per report.
//! Reports live in memory only: after a syncer restart the window before a
//! wave is empty, and the gates judge without a baseline (docs/delivery.md).
//!
//! It does not judge anything ([`crate::waves::gate`] does).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshfed_proto::config::v1 as pb;

/// How long reports are kept.
pub const KEEP: Duration = Duration::from_secs(3600);
/// The most reports kept per gateway (an hour of one per second).
pub const MAX_REPORTS: usize = 3600;
/// The most services read from one report; the rest are ignored.
pub const MAX_SERVICES: usize = 512;
/// The most latency buckets read from one report.
pub const MAX_BUCKETS: usize = 64;
/// The most bytes of a service name kept.
const MAX_SERVICE_NAME: usize = 253;

/// One service's counts over some time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Outbound requests and their successes.
    pub requests: u64,
    pub successes: u64,
    /// Requests of either direction denied by authorization, of `all`.
    pub denials: u64,
    pub all: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.successes = self.successes.saturating_add(o.successes.min(o.requests));
        self.denials = self.denials.saturating_add(o.denials.min(o.all));
        self.all = self.all.saturating_add(o.all);
    }
}

/// A latency histogram: `counts[i]` requests took at most `bounds[i]`
/// seconds (and more than the bound before); the last count, beyond the
/// bounds, is the overflow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Latency {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile as the upper bound of its bucket (infinite in the
    /// overflow); `None` without requests.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    fn add(&mut self, bounds: &[f64], counts: &[u64]) {
        if self.bounds.is_empty() && self.counts.is_empty() {
            self.bounds = bounds.to_vec();
            self.counts = vec![0; bounds.len() + 1];
        }
        // Histograms with other bounds (a gateway of another version) are
        // not mixed in.
        if self.bounds != bounds {
            return;
        }
        for (slot, c) in self.counts.iter_mut().zip(counts) {
            *slot = slot.saturating_add(*c);
        }
    }
}

/// Sums over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub services: BTreeMap<String, Counts>,
    pub latency: Latency,
}

#[derive(Debug)]
struct Report {
    at: SystemTime,
    services: Vec<(String, Counts)>,
    bounds: Arc<[f64]>,
    counts: Vec<u64>,
}

/// Each gateway's (cluster, id) recent reports, oldest first.
type Reports = BTreeMap<(String, String), VecDeque<Report>>;

/// The store. Cheap to clone; shared by the config server (writer) and
/// the wave controller (reader).
#[derive(Debug, Clone, Default)]
pub struct Golden {
    inner: Arc<Mutex<Reports>>,
}

impl Golden {
    /// Records one gateway's report, arrived now.
    pub fn record(&self, cluster: &str, gateway_id: &str, m: &pb::GoldenMetrics) {
        self.record_at(cluster, gateway_id, m, SystemTime::now());
    }

    /// Records a report as arrived at `at` (tests).
    pub fn record_at(
        &self,
        cluster: &str,
        gateway_id: &str,
        m: &pb::GoldenMetrics,
        at: SystemTime,
    ) {
        let services = m
            .services
            .iter()
            .take(MAX_SERVICES)
            .filter(|s| !s.service.is_empty() && s.service.len() <= MAX_SERVICE_NAME)
            .map(|s| {
                (
                    s.service.clone(),
                    Counts {
                        requests: s.requests,
                        successes: s.successes.min(s.requests),
                        denials: s.denials.min(s.all_requests),
                        all: s.all_requests,
                    },
                )
            })
            .collect();
        let ok_bounds = m.latency_bounds.len() < MAX_BUCKETS
            && m.latency_counts.len() == m.latency_bounds.len() + 1
            && m.latency_bounds.iter().all(|b| b.is_finite())
            && m.latency_bounds.windows(2).all(|w| w[0] < w[1]);
        let (bounds, counts): (Arc<[f64]>, Vec<u64>) = if ok_bounds {
            (m.latency_bounds.clone().into(), m.latency_counts.clone())
        } else {
            (Arc::from([]), Vec::new())
        };
        let mut all = self.lock();
        let reports = all
            .entry((cluster.to_string(), gateway_id.to_string()))
            .or_default();
        reports.push_back(Report {
            at,
            services,
            bounds,
            counts,
        });
        while reports.len() > MAX_REPORTS
            || reports
                .front()
                .is_some_and(|r| at.duration_since(r.at).is_ok_and(|age| age > KEEP))
        {
            reports.pop_front();
        }
        // Gateways gone for longer than KEEP leave nothing behind.
        all.retain(|_, r| {
            r.back()
                .is_some_and(|last| at.duration_since(last.at).map_or(true, |age| age <= KEEP))
        });
    }

    /// Sums the reports of `clusters`' gateways that arrived in
    /// `(from, to]`.
    pub fn window(&self, clusters: &[String], from: SystemTime, to: SystemTime) -> Window {
        let mut w = Window::default();
        let all = self.lock();
        for ((cluster, _), reports) in all.iter() {
            if !clusters.iter().any(|c| c == cluster) {
                continue;
            }
            for r in reports.iter().filter(|r| r.at > from && r.at <= to) {
                for (name, c) in &r.services {
                    w.services.entry(name.clone()).or_default().add(c);
                }
                if !r.counts.is_empty() {
                    w.latency.add(&r.bounds, &r.counts);
                }
            }
        }
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn report(service: &str, requests: u64, successes: u64) -> pb::GoldenMetrics {
        pb::GoldenMetrics {
            interval_ms: 1000,
            services: vec![pb::ServiceMetrics {
                service: service.into(),
                requests,
                successes,
                denials: 0,
                all_requests: requests,
            }],
            latency_bounds: vec![0.01, 0.1],
            latency_counts: vec![requests, 0, 0],
        }
    }

    #[test]
    fn windows_sum_the_reports_of_their_clusters_and_times_only() {
        let g = Golden::default();
        let t0 = SystemTime::now();
        let s = Duration::from_secs(1);
        g.record_at("east", "e1", &report("a", 10, 10), t0 + s);
        g.record_at("east", "e2", &report("a", 5, 0), t0 + 2 * s);
        g.record_at("west", "w1", &report("a", 100, 100), t0 + 2 * s);
        g.record_at("east", "e1", &report("a", 7, 7), t0 + 5 * s);
        let w = g.window(&["east".into()], t0, t0 + 3 * s);
        assert_eq!(w.services["a"].requests, 15);
        assert_eq!(w.services["a"].successes, 10);
        assert_eq!(w.latency.total(), 15);
        assert_eq!(w.latency.quantile(0.99), Some(0.01));
    }

    #[test]
    fn hostile_reports_are_bounded() {
        let g = Golden::default();
        let mut m = report("a", 1, 5);
        m.services = (0..5000)
            .map(|i| pb::ServiceMetrics {
                service: format!("s{i}"),
                requests: 1,
                successes: 9,
                denials: 9,
                all_requests: 1,
            })
            .collect();
        m.latency_bounds = vec![1.0, 0.5];
        let t = SystemTime::now();
        for i in 0..(MAX_REPORTS + 10) {
            g.record_at("east", "e1", &m, t + Duration::from_millis(i as u64));
        }
        let w = g.window(&["east".into()], t - Duration::from_secs(1), t + KEEP);
        assert_eq!(w.services.len(), MAX_SERVICES);
        assert_eq!(w.services["s0"].requests, MAX_REPORTS as u64);
        assert_eq!(w.services["s0"].successes, MAX_REPORTS as u64, "capped");
        assert_eq!(w.latency.total(), 0, "unordered bounds are dropped");
    }
}
