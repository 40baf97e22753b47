//! The golden metrics this gateway reports to the syncer for its rollout
//! gates (`GoldenMetrics` on the config stream, docs/delivery.md "Gates"):
//! per destination service, outbound requests and their successes,
//! requests of either direction with those denied by authorization, and
//! the outbound latency histogram; and the outbound latency histogram of
//! all services together (for older syncers, which judge p99 per wave).
//!
//! It reads the gateway's own Prometheus registry, as a scrape would
//! ([`crate::metrics::Metrics::encode`]), about once a second, and sends
//! the difference from the previous reading: the data path gains no work
//! for it. Readings are kept across streams, so a reconnect never reports
//! a request twice, and the first reading after start is a baseline that
//! is not sent.
//!
//! What a report holds is bounded: only services the applied snapshot
//! names or discovery knows ([`known_services`]; not whatever authority a
//! caller sent), at most [`MAX_SERVICES`] of them, the busiest first, and
//! no more than fit [`MAX_REPORT_BYTES`].
//!
//! It does not judge anything; the syncer's gates do.

use std::collections::{BTreeMap, BTreeSet};

use meshfed_policy::snapshot::ClusterPolicy;
use meshfed_proto::config::v1 as pb;

use crate::endpoints::EndpointSet;

/// The most services in one report (the busiest first).
pub const MAX_SERVICES: usize = 200;

/// The most bytes the services of one report may take (an upper bound of
/// their encoding): a report must fit the syncer's 64 KiB message limit
/// with long names and full histograms.
pub const MAX_REPORT_BYTES: usize = 48 * 1024;

/// gRPC statuses that count as failures (as Istio's success rate does for
/// gRPC): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS.
const GRPC_FAILURES: &[&str] = &["2", "4", "12", "13", "14", "15"];

/// The gateway's reason label on a request its authorization denied.
const DENIED: &str = "unauthorized";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    successes: u64,
    denials: u64,
    all: u64,
}

/// A cumulative histogram: `le` bound's bits → (bound, cumulative count).
/// Positive floats sort as their bits, `+Inf` last.
type Buckets = BTreeMap<u64, (f64, u64)>;

#[derive(Debug, Clone, Default, PartialEq)]
struct Service {
    counts: Counts,
    /// Outbound durations, every destination cluster together.
    buckets: Buckets,
}

/// One reading of the registry: cumulative counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    services: BTreeMap<String, Service>,
    /// Outbound durations, all services and clusters together.
    buckets: Buckets,
}

/// The services a report may name: every host the applied snapshot names
/// (routes and where they send or mirror, destination rules, exports,
/// service entries) and every service discovery found here. A service
/// outside it (a name only a caller's authority made up) is never
/// reported: what the syncer keeps does not grow with what callers send.
pub fn known_services(policy: &ClusterPolicy, endpoints: &EndpointSet) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = BTreeSet::new();
    for (host, r) in &policy.routes {
        known.insert(host.clone());
        for h in &r.http {
            known.extend(h.destinations.iter().map(|d| d.host.clone()));
            known.extend(h.mirrors.iter().map(|m| m.host.clone()));
        }
        for t in &r.tcp {
            known.extend(t.destinations.iter().map(|d| d.host.clone()));
        }
    }
    known.extend(policy.destinations.keys().cloned());
    known.extend(policy.exports.keys().cloned());
    known.extend(policy.service_entries.keys().cloned());
    known.extend(endpoints.keys().cloned());
    known
}

/// Reads the text exposition of the gateway's registry.
pub fn read(text: &str) -> Reading {
    let mut r = Reading::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("meshfed_requests_total{") {
            let Some((labels, value)) = split(rest) else {
                continue;
            };
            let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            let (Some(service), Some(direction)) = (get("destination_service"), get("direction"))
            else {
                continue;
            };
            let c = &mut r.services.entry(service.to_string()).or_default().counts;
            c.all += value;
            if get("reason") == Some(DENIED) {
                c.denials += value;
            }
            if direction == "outbound" {
                c.requests += value;
                let code: u16 = get("response_code")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let grpc = get("grpc_response_status").unwrap_or("");
                if code != 0 && code < 500 && !GRPC_FAILURES.contains(&grpc) {
                    c.successes += value;
                }
            }
        } else if let Some(rest) = line.strip_prefix("meshfed_request_duration_seconds_bucket{") {
            let Some((labels, value)) = split(rest) else {
                continue;
            };
            let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            if get("direction") != Some("outbound") {
                continue;
            }
            let Some(le) = get("le") else { continue };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(b) if b >= 0.0 => b,
                    _ => continue,
                }
            };
            let add = |b: &mut Buckets| {
                let e = b.entry(bound.to_bits()).or_insert((bound, 0));
                e.1 = e.1.saturating_add(value);
            };
            add(&mut r.buckets);
            if let Some(service) = get("destination_service") {
                add(&mut r.services.entry(service.to_string()).or_default().buckets);
            }
        }
    }
    r
}

/// `k="v",k2="v2"} 12` → labels and the value (a counter's integer part).
fn split(rest: &str) -> Option<(Vec<(String, String)>, u64)> {
    let mut labels = Vec::new();
    let mut chars = rest.char_indices().peekable();
    loop {
        // name
        let start = chars.peek()?.0;
        let end = loop {
            let (i, c) = chars.next()?;
            if c == '=' {
                break i;
            }
            if c == '}' {
                // No (more) labels.
                let value = rest[i + 1..].split_whitespace().next()?;
                return Some((labels, parse_value(value)?));
            }
        };
        let name = rest[start..end].trim_start_matches(',').to_string();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((name, value));
        match chars.peek()?.1 {
            ',' => {
                chars.next();
                if chars.peek()?.1 == '}' {
                    let (i, _) = chars.next()?;
                    let v = rest[i + 1..].split_whitespace().next()?;
                    return Some((labels, parse_value(v)?));
                }
            }
            '}' => {
                let (i, _) = chars.next()?;
                let v = rest[i + 1..].split_whitespace().next()?;
                return Some((labels, parse_value(v)?));
            }
            _ => return None,
        }
    }
}

fn parse_value(v: &str) -> Option<u64> {
    v.parse::<u64>()
        .ok()
        .or_else(|| v.parse::<f64>().ok().map(|f| f.max(0.0) as u64))
}

/// How often a report is sent.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A reading older than this is a baseline, not the start of a report:
/// traffic of a long disconnection, sent at once, would look like a burst
/// in the second it arrives.
const STALE: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the previous reading and turns the next into a report.
#[derive(Debug, Default)]
pub struct Reporter {
    previous: Option<(Reading, std::time::Instant)>,
}

impl Reporter {
    /// The report since the previous reading, taken at `at`, of the
    /// services in `known`; `None` for a baseline (the first reading, or
    /// after more than 5 s without one) and when nothing happened.
    pub fn report(
        &mut self,
        now: Reading,
        at: std::time::Instant,
        known: &BTreeSet<String>,
    ) -> Option<pb::GoldenMetrics> {
        let (prev, prev_at) = self.previous.replace((now.clone(), at))?;
        let elapsed = at.saturating_duration_since(prev_at);
        if elapsed > STALE {
            return None;
        }
        let interval_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let (bounds, counts) = histogram_delta(&now.buckets, &prev.buckets);
        let empty = Service::default();
        let mut services: Vec<pb::ServiceMetrics> = now
            .services
            .iter()
            .filter(|(name, _)| known.contains(*name))
            .filter_map(|(name, c)| {
                let p = prev.services.get(name).unwrap_or(&empty);
                let (c, p) = (&c.counts, &p.counts);
                let d = Counts {
                    requests: c.requests.saturating_sub(p.requests),
                    successes: c.successes.saturating_sub(p.successes),
                    denials: c.denials.saturating_sub(p.denials),
                    all: c.all.saturating_sub(p.all),
                };
                (d.all > 0).then(|| pb::ServiceMetrics {
                    service: name.clone(),
                    requests: d.requests,
                    successes: d.successes,
                    denials: d.denials,
                    all_requests: d.all,
                    latency_counts: Vec::new(),
                })
            })
            .collect();
        for s in &mut services {
            let (Some(n), p) = (now.services.get(&s.service), prev.services.get(&s.service)) else {
                continue;
            };
            let (b, c) = histogram_delta(&n.buckets, p.map_or(&empty.buckets, |p| &p.buckets));
            // Every series of the family has the same bounds; a service
            // whose do not (a reading cut mid-way) sends none.
            if b == bounds && c.iter().any(|n| *n > 0) {
                s.latency_counts = c;
            }
        }
        services.sort_by_key(|s| std::cmp::Reverse(s.all_requests));
        let mut bytes = 0;
        let fits = services
            .iter()
            .take(MAX_SERVICES)
            .take_while(|s| {
                bytes += encoded_len_bound(s);
                bytes <= MAX_REPORT_BYTES
            })
            .count();
        services.truncate(fits);
        if services.is_empty() && counts.iter().all(|c| *c == 0) {
            return None;
        }
        Some(pb::GoldenMetrics {
            interval_ms,
            services,
            latency_bounds: bounds,
            latency_counts: counts,
        })
    }
}

/// The requests per bucket between two cumulative readings: the finite
/// bounds, and one count per bound plus the overflow (both empty when the
/// reading has no `+Inf` bucket).
fn histogram_delta(now: &Buckets, prev: &Buckets) -> (Vec<f64>, Vec<u64>) {
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    let mut below_now = 0;
    let mut below_prev = 0;
    for (bound, cum) in now.values() {
        let p = prev.get(&bound.to_bits()).map_or(0, |(_, c)| *c);
        let (in_now, in_prev) = (cum.saturating_sub(below_now), p.saturating_sub(below_prev));
        below_now = *cum;
        below_prev = p;
        if bound.is_finite() {
            bounds.push(*bound);
        }
        counts.push(in_now.saturating_sub(in_prev));
    }
    if counts.len() != bounds.len() + 1 {
        bounds.clear();
        counts.clear();
    }
    (bounds, counts)
}

/// At least the bytes `s` takes in a report: the message's own tag and
/// length, its name, four varints and the packed counts, each with its tag
/// (and length); a varint is at most 10 bytes.
fn encoded_len_bound(s: &pb::ServiceMetrics) -> usize {
    4 + (3 + s.service.len()) + 4 * 11 + (3 + 10 * s.latency_counts.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const RATINGS: &str = "ratings.default.svc.cluster.local";
    const REVIEWS: &str = "reviews.default.svc.cluster.local";

    /// A registry's text: ratings' outbound answers and durations (fast,
    /// slow), reviews' inbound denials, and durations of a service that
    /// only a caller's authority named.
    fn text(ok: u64, failed: u64, denied: u64, fast: u64, slow: u64) -> String {
        format!(
            "# TYPE meshfed_requests counter\n\
meshfed_requests_total{{direction=\"outbound\",source_cluster=\"a\",destination_cluster=\"b\",destination_service=\"{RATINGS}\",response_code=\"200\",grpc_response_status=\"\",reason=\"\"}} {ok}\n\
meshfed_requests_total{{direction=\"outbound\",source_cluster=\"a\",destination_cluster=\"b\",destination_service=\"{RATINGS}\",response_code=\"503\",grpc_response_status=\"\",reason=\"no \\\"healthy\\\" upstream\"}} {failed}\n\
meshfed_requests_total{{direction=\"inbound\",source_cluster=\"b\",destination_cluster=\"a\",destination_service=\"{REVIEWS}\",response_code=\"403\",grpc_response_status=\"\",reason=\"unauthorized\"}} {denied}\n\
meshfed_requests_total{{direction=\"outbound\",source_cluster=\"a\",destination_cluster=\"\",destination_service=\"made-up.example\",response_code=\"503\",grpc_response_status=\"\",reason=\"\"}} {failed}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",destination_service=\"{RATINGS}\",le=\"0.01\"}} {fast}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",destination_service=\"{RATINGS}\",le=\"0.1\"}} {}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",destination_service=\"{RATINGS}\",le=\"+Inf\"}} {}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"\",destination_service=\"made-up.example\",le=\"0.01\"}} {failed}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"\",destination_service=\"made-up.example\",le=\"0.1\"}} {failed}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"\",destination_service=\"made-up.example\",le=\"+Inf\"}} {failed}\n\
meshfed_request_duration_seconds_bucket{{direction=\"inbound\",destination_cluster=\"a\",destination_service=\"{REVIEWS}\",le=\"0.01\"}} 999\n",
            fast + slow,
            fast + slow
        )
    }

    fn known() -> BTreeSet<String> {
        [RATINGS, REVIEWS].into_iter().map(String::from).collect()
    }

    #[test]
    fn reports_are_the_difference_since_the_previous_reading() {
        let mut r = Reporter::default();
        let t = std::time::Instant::now();
        let s = std::time::Duration::from_secs(1);
        let k = known();
        assert_eq!(
            r.report(read(&text(10, 0, 1, 10, 0)), t, &k),
            None,
            "baseline"
        );
        let m = r.report(read(&text(15, 5, 4, 12, 8)), t + s, &k).unwrap();
        let ratings = m.services.iter().find(|s| s.service == RATINGS).unwrap();
        assert_eq!((ratings.requests, ratings.successes), (10, 5));
        // Per service: its own outbound durations.
        assert_eq!(ratings.latency_counts, vec![2, 8, 0]);
        let reviews = m.services.iter().find(|s| s.service == REVIEWS).unwrap();
        assert_eq!(
            (reviews.denials, reviews.all_requests, reviews.requests),
            (3, 3, 0)
        );
        assert!(reviews.latency_counts.is_empty(), "no outbound requests");
        assert_eq!(m.latency_bounds, vec![0.01, 0.1]);
        // All services together (older syncers): the made-up one's too.
        assert_eq!(m.latency_counts, vec![7, 8, 0]);
        assert_eq!(
            r.report(read(&text(15, 5, 4, 12, 8)), t + 2 * s, &k),
            None,
            "nothing new"
        );
        assert_eq!(
            r.report(read(&text(99, 5, 4, 12, 8)), t + 10 * s, &k),
            None,
            "after a gap: a baseline"
        );
    }

    #[test]
    fn only_services_the_snapshot_or_discovery_knows_are_reported() {
        let mut r = Reporter::default();
        let t = std::time::Instant::now();
        let k = known();
        r.report(read(&text(1, 1, 1, 1, 1)), t, &k);
        let m = r
            .report(
                read(&text(9, 9, 9, 9, 9)),
                t + std::time::Duration::from_secs(1),
                &k,
            )
            .unwrap();
        let names: Vec<&str> = m.services.iter().map(|s| s.service.as_str()).collect();
        assert!(!names.contains(&"made-up.example"), "{names:?}");
        assert_eq!(names.len(), 2, "{names:?}");

        let mut policy = ClusterPolicy::default();
        policy.exports.insert(REVIEWS.into(), BTreeSet::new());
        let mut endpoints = EndpointSet::new();
        endpoints.insert(RATINGS.into(), Vec::new());
        let known = known_services(&policy, &endpoints);
        assert!(known.contains(RATINGS), "discovered here");
        assert!(known.contains(REVIEWS), "exported");
        assert!(!known.contains("made-up.example"));
    }

    #[test]
    fn a_report_holds_at_most_200_services_and_48_kib() {
        let many = |n: u64| -> String {
            (0..300)
                .map(|i| {
                    format!(
                        "meshfed_requests_total{{direction=\"outbound\",destination_service=\"{}{i}\",response_code=\"200\"}} {}\n",
                        "s".repeat(200),
                        n * (i + 1)
                    )
                })
                .collect()
        };
        let k: BTreeSet<String> = (0..300)
            .map(|i| format!("{}{i}", "s".repeat(200)))
            .collect();
        let mut r = Reporter::default();
        let t = std::time::Instant::now();
        r.report(read(&many(1)), t, &k);
        let m = r
            .report(read(&many(2)), t + std::time::Duration::from_secs(1), &k)
            .unwrap();
        assert!(m.services.len() < MAX_SERVICES, "{}", m.services.len());
        let bytes: usize = m.services.iter().map(encoded_len_bound).sum();
        assert!(bytes <= MAX_REPORT_BYTES, "{bytes}");
        // The busiest first.
        assert!(
            m.services[0].service.ends_with("299"),
            "{}",
            m.services[0].service
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let r = read(
            "meshfed_requests_total{direction=\"outbound\nmeshfed_requests_total{x=\"1\"} nope\nmeshfed_requests_total{} 3\nmeshfed_request_duration_seconds_bucket{direction=\"outbound\",le=\"-1\"} 4\n",
        );
        assert!(r.services.is_empty());
        assert!(r.buckets.is_empty());
    }
}
