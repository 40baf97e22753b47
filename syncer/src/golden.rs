//! The gateways' golden metrics, as they report them on their config
//! streams (`GoldenMetrics`, every second or so): per destination service
//! the outbound requests, their successes, the authorization denials, and
//! the outbound latency histogram.
//!
//! Reports are deltas; this store keeps each gateway's recent reports with
//! the time they arrived, and sums them over a window of time, a set of
//! clusters and the services the gates judge ([`crate::waves`]).
//!
//! What a gateway sends is checked before it is kept, and what is kept is
//! bounded whatever a gateway sends: at most [`MAX_SERVICES`] services per
//! report (names of at most 253 bytes), histograms of fewer than
//! [`MAX_BUCKETS`] finite, non-negative, strictly increasing bounds with
//! exactly one more count (anything else is dropped), successes and
//! denials no more
//! than their requests; and per gateway at most [`KEEP`] of history,
//! [`MAX_REPORTS`] reports and [`MAX_BYTES`] (the oldest go first).
//! Reports live in memory only: after a syncer restart the window before a
//! wave is empty, and the gates judge without a baseline
//! (docs/delivery.md).
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
pub const MAX_SERVICES: usize = 256;
/// The most latency buckets read from one report.
pub const MAX_BUCKETS: usize = 64;
/// The most memory one gateway's reports may hold (estimated); past it
/// the oldest reports go. 200 busy services a second fill it in about
/// 25 minutes; 20 services in more than the hour kept.
pub const MAX_BYTES: usize = 32 << 20;
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
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// The `q` quantile as the upper bound of its bucket (infinite in the
    /// overflow); `None` without requests.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// Adds a report's non-empty buckets (index, count) over `bounds`.
    fn add(&mut self, bounds: &[f64], buckets: &[(u8, u64)]) {
        if self.bounds.is_empty() && self.counts.is_empty() {
            self.bounds = bounds.to_vec();
            self.counts = vec![0; bounds.len() + 1];
        }
        // Histograms with other bounds (a gateway of another version) are
        // not mixed in.
        if self.bounds != bounds {
            return;
        }
        for (i, c) in buckets {
            if let Some(slot) = self.counts.get_mut(usize::from(*i)) {
                *slot = slot.saturating_add(*c);
            }
        }
    }
}

/// Sums over a window, per destination service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub services: BTreeMap<String, Counts>,
    /// Outbound latency, from the gateways that report it per service.
    pub latency: BTreeMap<String, Latency>,
}

#[derive(Debug)]
struct Service {
    name: String,
    counts: Counts,
    /// The non-empty buckets of its outbound latency: (index, count).
    latency: Box<[(u8, u64)]>,
}

#[derive(Debug)]
struct Report {
    at: SystemTime,
    services: Vec<Service>,
    bounds: Arc<[f64]>,
    /// What it holds, estimated.
    bytes: usize,
}

/// One gateway's recent reports, oldest first, and their bytes.
#[derive(Debug, Default)]
struct Reports {
    reports: VecDeque<Report>,
    bytes: usize,
}

/// Each gateway's (cluster, id) reports.
type All = BTreeMap<(String, String), Reports>;

/// The store. Cheap to clone; shared by the config server (writer) and
/// the wave controller (reader).
#[derive(Debug, Clone, Default)]
pub struct Golden {
    inner: Arc<Mutex<All>>,
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
        let ok_bounds = m.latency_bounds.len() < MAX_BUCKETS
            && m.latency_bounds.iter().all(|b| b.is_finite() && *b >= 0.0)
            && m.latency_bounds.windows(2).all(|w| w[0] < w[1]);
        let services: Vec<Service> = m
            .services
            .iter()
            .take(MAX_SERVICES)
            .filter(|s| !s.service.is_empty() && s.service.len() <= MAX_SERVICE_NAME)
            .map(|s| Service {
                name: s.service.clone(),
                counts: Counts {
                    requests: s.requests,
                    successes: s.successes.min(s.requests),
                    denials: s.denials.min(s.all_requests),
                    all: s.all_requests,
                },
                latency: if ok_bounds && s.latency_counts.len() == m.latency_bounds.len() + 1 {
                    s.latency_counts
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .filter_map(|(i, c)| Some((u8::try_from(i).ok()?, *c)))
                        .collect()
                } else {
                    Box::default()
                },
            })
            .collect();
        let with_latency = services.iter().any(|s| !s.latency.is_empty());
        let mut all = self.lock();
        let mine = all
            .entry((cluster.to_string(), gateway_id.to_string()))
            .or_default();
        // The bounds are the same report after report: shared, not copied.
        let bounds: Arc<[f64]> = match mine.reports.back() {
            _ if !with_latency => Arc::from([]),
            Some(last) if *last.bounds == *m.latency_bounds => last.bounds.clone(),
            _ => m.latency_bounds.clone().into(),
        };
        let bytes = std::mem::size_of::<Report>()
            + services
                .iter()
                .map(|s| {
                    std::mem::size_of::<Service>()
                        + s.name.len()
                        + s.latency.len() * std::mem::size_of::<(u8, u64)>()
                })
                .sum::<usize>();
        mine.bytes += bytes;
        mine.reports.push_back(Report {
            at,
            services,
            bounds,
            bytes,
        });
        while mine.reports.len() > MAX_REPORTS
            || mine.bytes > MAX_BYTES
            || mine
                .reports
                .front()
                .is_some_and(|r| at.duration_since(r.at).is_ok_and(|age| age > KEEP))
        {
            let Some(gone) = mine.reports.pop_front() else {
                break;
            };
            mine.bytes -= gone.bytes;
        }
        // Gateways gone for longer than KEEP leave nothing behind.
        all.retain(|_, r| {
            r.reports
                .back()
                .is_some_and(|last| at.duration_since(last.at).map_or(true, |age| age <= KEEP))
        });
    }

    /// Sums the reports of `clusters`' gateways that arrived in
    /// `(from, to]`, for the services `judged(cluster, service)` accepts.
    pub fn window(
        &self,
        clusters: &[String],
        from: SystemTime,
        to: SystemTime,
        judged: impl Fn(&str, &str) -> bool,
    ) -> Window {
        let mut w = Window::default();
        let all = self.lock();
        for ((cluster, _), mine) in all.iter() {
            if !clusters.iter().any(|c| c == cluster) {
                continue;
            }
            for r in mine.reports.iter().filter(|r| r.at > from && r.at <= to) {
                for s in &r.services {
                    if !judged(cluster, &s.name) {
                        continue;
                    }
                    w.services.entry(s.name.clone()).or_default().add(&s.counts);
                    if !s.latency.is_empty() {
                        w.latency
                            .entry(s.name.clone())
                            .or_default()
                            .add(&r.bounds, &s.latency);
                    }
                }
            }
        }
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, All> {
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
                latency_counts: vec![requests, 0, 0],
            }],
            latency_bounds: vec![0.01, 0.1],
            latency_counts: vec![requests, 0, 0],
        }
    }

    fn every(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn windows_sum_the_reports_of_their_clusters_times_and_judged_services_only() {
        let g = Golden::default();
        let t0 = SystemTime::now();
        let s = Duration::from_secs(1);
        g.record_at("east", "e1", &report("a", 10, 10), t0 + s);
        g.record_at("east", "e2", &report("a", 5, 0), t0 + 2 * s);
        g.record_at("east", "e2", &report("b", 5, 0), t0 + 2 * s);
        g.record_at("west", "w1", &report("a", 100, 100), t0 + 2 * s);
        g.record_at("east", "e1", &report("a", 7, 7), t0 + 5 * s);
        let w = g.window(&["east".into()], t0, t0 + 3 * s, every);
        assert_eq!(w.services["a"].requests, 15);
        assert_eq!(w.services["a"].successes, 10);
        assert_eq!(w.latency["a"].total(), 15);
        assert_eq!(w.latency["a"].quantile(0.99), Some(0.01));
        assert_eq!(w.services["b"].requests, 5);
        let only_a = g.window(&["east".into()], t0, t0 + 3 * s, |c, svc| {
            c == "east" && svc == "a"
        });
        assert!(!only_a.services.contains_key("b"));
        assert!(!only_a.latency.contains_key("b"));
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
                latency_counts: vec![1; 3],
            })
            .collect();
        m.latency_bounds = vec![1.0, 0.5];
        let t = SystemTime::now();
        g.record_at("east", "e1", &m, t);
        let w = g.window(&["east".into()], t - Duration::from_secs(1), t, every);
        assert_eq!(w.services.len(), MAX_SERVICES);
        assert_eq!(w.services["s0"].successes, 1, "capped at the requests");
        assert_eq!(w.services["s0"].denials, 1, "capped at the requests");
        assert!(w.latency.is_empty(), "unordered bounds are dropped");
        // Counts that do not match the bounds are dropped too, and so are
        // bounds that are not numbers.
        let mut m = report("a", 10, 10);
        m.services[0].latency_counts = vec![1, 2, 3, 4, 5];
        g.record_at("west", "w1", &m, t);
        let w = g.window(&["west".into()], t - Duration::from_secs(1), t, every);
        assert_eq!(w.services["a"].requests, 10);
        assert!(w.latency.is_empty());
        let mut m = report("a", 10, 10);
        m.latency_bounds = vec![0.1, f64::NAN];
        g.record_at("west", "w2", &m, t);
        let w = g.window(&["west".into()], t - Duration::from_secs(1), t, every);
        assert!(w.latency.is_empty());
        // Reports past MAX_REPORTS push the oldest out.
        for i in 0..(MAX_REPORTS + 10) {
            g.record_at(
                "north",
                "n1",
                &report("a", 1, 1),
                t + Duration::from_millis(i as u64),
            );
        }
        let w = g.window(
            &["north".into()],
            t - Duration::from_secs(1),
            t + KEEP,
            every,
        );
        assert_eq!(w.services["a"].requests, MAX_REPORTS as u64);
    }

    #[test]
    fn a_gateway_holds_at_most_max_bytes_the_oldest_go_first() {
        let g = Golden::default();
        // Long names, every bucket full: about 300 KiB a report.
        let m = pb::GoldenMetrics {
            interval_ms: 1000,
            services: (0..MAX_SERVICES)
                .map(|i| pb::ServiceMetrics {
                    service: format!("{}{i}", "x".repeat(240)),
                    requests: 1,
                    successes: 1,
                    denials: 0,
                    all_requests: 1,
                    latency_counts: vec![1; MAX_BUCKETS],
                })
                .collect(),
            latency_bounds: (1..MAX_BUCKETS).map(|b| b as f64).collect(),
            latency_counts: Vec::new(),
        };
        let t = SystemTime::now();
        for i in 0..400 {
            g.record_at("east", "e1", &m, t + Duration::from_millis(i));
        }
        let all = g.lock();
        let mine = &all[&("east".to_string(), "e1".to_string())];
        assert!(mine.bytes <= MAX_BYTES, "{}", mine.bytes);
        assert!(mine.reports.len() < 400, "{}", mine.reports.len());
        assert_eq!(
            mine.reports.back().unwrap().at,
            t + Duration::from_millis(399),
            "the newest stays"
        );
        let held: usize = mine.reports.iter().map(|r| r.bytes).sum();
        assert_eq!(held, mine.bytes);
    }
}
