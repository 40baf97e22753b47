//! The golden metrics this gateway reports to the syncer for its rollout
//! gates (`GoldenMetrics` on the config stream, docs/delivery.md "Gates"):
//! per destination service, outbound requests and their successes, and
//! requests of either direction with those denied by authorization; and
//! the outbound latency histogram, all services together (the gateway
//! keeps its histogram per destination cluster, not per service).
//!
//! It reads the gateway's own Prometheus registry, as a scrape would
//! ([`crate::metrics::Metrics::encode`]), about once a second, and sends
//! the difference from the previous reading: the data path gains no work
//! for it. Readings are kept across streams, so a reconnect never reports
//! a request twice, and the first reading after start is a baseline that
//! is not sent.
//!
//! It does not judge anything; the syncer's gates do.

use std::collections::BTreeMap;

use meshfed_proto::config::v1 as pb;

/// The most services in one report (the busiest first): it must fit the
/// syncer's 64 KiB message limit with long names.
pub const MAX_SERVICES: usize = 200;

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

/// One reading of the registry: cumulative counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    services: BTreeMap<String, Counts>,
    /// `le` bound → cumulative outbound count, all clusters together.
    buckets: BTreeMap<u64, (f64, u64)>,
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
            let c = r.services.entry(service.to_string()).or_default();
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
                    Ok(b) => b,
                    Err(_) => continue,
                }
            };
            // Ordered by the bound's bits: positive floats sort as their bits.
            let e = r.buckets.entry(bound.to_bits()).or_insert((bound, 0));
            e.1 += value;
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
    /// The report since the previous reading, taken at `at`; `None` for
    /// a baseline (the first reading, or after more than 5 s without one)
    /// and when nothing happened.
    pub fn report(&mut self, now: Reading, at: std::time::Instant) -> Option<pb::GoldenMetrics> {
        let (prev, prev_at) = self.previous.replace((now.clone(), at))?;
        let elapsed = at.saturating_duration_since(prev_at);
        if elapsed > STALE {
            return None;
        }
        let interval_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let mut services: Vec<pb::ServiceMetrics> = now
            .services
            .iter()
            .filter_map(|(name, c)| {
                let p = prev.services.get(name).copied().unwrap_or_default();
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
                })
            })
            .collect();
        services.sort_by_key(|s| std::cmp::Reverse(s.all_requests));
        services.truncate(MAX_SERVICES);
        let mut bounds = Vec::new();
        let mut counts = Vec::new();
        let mut below_now = 0;
        let mut below_prev = 0;
        for (bound, cum) in now.buckets.values() {
            let p = prev.buckets.get(&bound.to_bits()).map_or(0, |(_, c)| *c);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn text(ok: u64, failed: u64, denied: u64, fast: u64, slow: u64) -> String {
        format!(
            "# TYPE meshfed_requests counter\n\
meshfed_requests_total{{direction=\"outbound\",source_cluster=\"a\",destination_cluster=\"b\",destination_service=\"ratings.default.svc.cluster.local\",response_code=\"200\",grpc_response_status=\"\",reason=\"\"}} {ok}\n\
meshfed_requests_total{{direction=\"outbound\",source_cluster=\"a\",destination_cluster=\"b\",destination_service=\"ratings.default.svc.cluster.local\",response_code=\"503\",grpc_response_status=\"\",reason=\"no \\\"healthy\\\" upstream\"}} {failed}\n\
meshfed_requests_total{{direction=\"inbound\",source_cluster=\"b\",destination_cluster=\"a\",destination_service=\"reviews.default.svc.cluster.local\",response_code=\"403\",grpc_response_status=\"\",reason=\"unauthorized\"}} {denied}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",le=\"0.01\"}} {fast}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",le=\"0.1\"}} {}\n\
meshfed_request_duration_seconds_bucket{{direction=\"outbound\",destination_cluster=\"b\",le=\"+Inf\"}} {}\n\
meshfed_request_duration_seconds_bucket{{direction=\"inbound\",destination_cluster=\"a\",le=\"0.01\"}} 999\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn reports_are_the_difference_since_the_previous_reading() {
        let mut r = Reporter::default();
        let t = std::time::Instant::now();
        let s = std::time::Duration::from_secs(1);
        assert_eq!(r.report(read(&text(10, 0, 1, 10, 0)), t), None, "baseline");
        let m = r.report(read(&text(15, 5, 4, 12, 8)), t + s).unwrap();
        let ratings = m
            .services
            .iter()
            .find(|s| s.service == "ratings.default.svc.cluster.local")
            .unwrap();
        assert_eq!((ratings.requests, ratings.successes), (10, 5));
        let reviews = m
            .services
            .iter()
            .find(|s| s.service == "reviews.default.svc.cluster.local")
            .unwrap();
        assert_eq!(
            (reviews.denials, reviews.all_requests, reviews.requests),
            (3, 3, 0)
        );
        assert_eq!(m.latency_bounds, vec![0.01, 0.1]);
        assert_eq!(m.latency_counts, vec![2, 8, 0]);
        assert_eq!(
            r.report(read(&text(15, 5, 4, 12, 8)), t + 2 * s),
            None,
            "nothing new"
        );
        assert_eq!(
            r.report(read(&text(99, 5, 4, 12, 8)), t + 10 * s),
            None,
            "after a gap: a baseline"
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let r = read(
            "meshfed_requests_total{direction=\"outbound\nmeshfed_requests_total{x=\"1\"} nope\nmeshfed_requests_total{} 3\n",
        );
        assert!(r.services.is_empty());
    }
}
