//! What a run measured ([`LoadReport`]), how requests are counted into it
//! while the run goes on, and its two renderings: a compact table
//! (`Display`) and JSON ([`LoadReport::to_json`]).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::client::Completed;

/// Largest latency the histogram tells apart: an hour, in microseconds.
/// Longer ones are recorded as an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// The outcome of a run. `ok + failed == sent`.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests scheduled, including those failed as `overload`.
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failure reason → count, e.g. `status 503`, `grpc-status 14`,
    /// `timeout`, `connect`, `reset`, `overload` (see the module docs).
    pub failures: BTreeMap<String, u64>,
    /// HTTP status → count, over every complete response.
    pub status: BTreeMap<u16, u64>,
    /// Latency in microseconds, from each request's intended send time to
    /// the end of its response, over every complete response.
    pub latency: Histogram<u64>,
    /// The sending window: from the start until the duration ended or the
    /// run was stopped (requests still in flight then are not included).
    pub elapsed: Duration,
    /// The header [`LoadSpec::tally_header`](super::LoadSpec::tally_header)
    /// named, if any.
    pub tally_header: Option<String>,
    /// Value of the tallied response header → count of complete responses
    /// carrying it; `(none)` counts those without it.
    pub responses_by_header: BTreeMap<String, u64>,
}

impl LoadReport {
    fn empty(tally_header: Option<String>) -> Self {
        LoadReport {
            sent: 0,
            ok: 0,
            failed: 0,
            failures: BTreeMap::new(),
            status: BTreeMap::new(),
            latency: empty_histogram(),
            elapsed: Duration::ZERO,
            tally_header,
            responses_by_header: BTreeMap::new(),
        }
    }

    /// The latency at `quantile` (0.5 for the median, 0.999 for p99.9);
    /// zero when no response completed.
    pub fn p(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(quantile))
    }

    /// The highest latency recorded.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    /// Requests sent per second over the sending window.
    pub fn achieved_rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }

    /// How many requests failed for `reason` (e.g. `"timeout"`), 0 if none.
    pub fn failures_of(&self, reason: &str) -> u64 {
        self.failures.get(reason).copied().unwrap_or(0)
    }

    /// The report as one JSON object, for scripts:
    /// `{"sent":…,"ok":…,"failed":…,"failures":{…},"status":{"200":…},
    /// "elapsed_s":…,"achieved_rate":…,"latency_us":{"p50":…,"p90":…,
    /// "p99":…,"p99_9":…,"max":…,"mean":…},"tally_header":…|null,
    /// "responses_by_header":{…}}`.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\"sent\":{},\"ok\":{},\"failed\":{},\"failures\":{},\"status\":{},",
            self.sent,
            self.ok,
            self.failed,
            json_counts(self.failures.iter().map(|(k, v)| (k.clone(), *v))),
            json_counts(self.status.iter().map(|(k, v)| (k.to_string(), *v))),
        );
        let _ = write!(
            out,
            "\"elapsed_s\":{:.6},\"achieved_rate\":{:.3},",
            self.elapsed.as_secs_f64(),
            self.achieved_rate()
        );
        let _ = write!(
            out,
            "\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p99_9\":{},\"max\":{},\"mean\":{:.1}}},",
            self.latency.value_at_quantile(0.5),
            self.latency.value_at_quantile(0.9),
            self.latency.value_at_quantile(0.99),
            self.latency.value_at_quantile(0.999),
            self.latency.max(),
            self.latency.mean(),
        );
        let tally = match &self.tally_header {
            Some(name) => json_string(name),
            None => "null".to_string(),
        };
        let _ = write!(
            out,
            "\"tally_header\":{tally},\"responses_by_header\":{}}}",
            json_counts(
                self.responses_by_header
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
            ),
        );
        out
    }
}

impl fmt::Display for LoadReport {
    /// One row per figure, e.g.:
    ///
    /// ```text
    /// sent          1000  (500.0/s over 2.000s)
    /// ok             994
    /// failed           6
    ///   status 503     6
    /// p50          412µs
    /// p90          1.1ms
    /// p99          3.2ms
    /// p99.9        5.1ms
    /// max          7.9ms
    /// ```
    ///
    /// followed, with a tally header, by one row per value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<(String, String)> = vec![
            ("sent".into(), self.sent.to_string()),
            ("ok".into(), self.ok.to_string()),
            ("failed".into(), self.failed.to_string()),
        ];
        for (reason, count) in &self.failures {
            rows.push((format!("  {reason}"), count.to_string()));
        }
        for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            rows.push((label.into(), human(self.p(q))));
        }
        rows.push(("max".into(), human(self.max())));
        if let Some(name) = &self.tally_header {
            rows.push((format!("by {name}"), String::new()));
            for (value, count) in &self.responses_by_header {
                rows.push((format!("  {value}"), count.to_string()));
            }
        }
        let label_width = rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        let value_width = rows
            .iter()
            .map(|(_, v)| v.chars().count())
            .max()
            .unwrap_or(0);
        for (i, (label, value)) in rows.iter().enumerate() {
            write!(f, "{label:<label_width$}  {value:>value_width$}")?;
            if i == 0 {
                write!(
                    f,
                    "  ({:.1}/s over {:.3}s)",
                    self.achieved_rate(),
                    self.elapsed.as_secs_f64()
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// A latency for people: µs below a millisecond, then ms, then s.
fn human(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.3}s", us as f64 / 1e6)
    }
}

fn json_counts(entries: impl Iterator<Item = (String, u64)>) -> String {
    let body: Vec<String> = entries
        .map(|(k, v)| format!("{}:{v}", json_string(&k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

pub(super) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[expect(
    clippy::expect_used,
    reason = "constant bounds that hdrhistogram accepts; no input reaches this"
)]
fn empty_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid constant histogram bounds")
}

/// Counts outcomes as requests finish, from any task. One short critical
/// section per request: cheap next to a request, even at tens of thousands
/// per second.
#[derive(Debug)]
pub(super) struct Recorder(Mutex<LoadReport>);

impl Recorder {
    pub fn new(tally_header: Option<String>) -> Self {
        Recorder(Mutex::new(LoadReport::empty(tally_header)))
    }

    /// Counts one request; `latency` is from its intended send time.
    pub fn record(&self, latency: Option<Duration>, completed: Completed) {
        let mut report = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(status) = completed.status {
            *report.status.entry(status).or_default() += 1;
            if let Some(latency) = latency {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                report.latency.saturating_record(us.min(MAX_LATENCY_US));
            }
        }
        if let Some(value) = completed.tally {
            *report.responses_by_header.entry(value).or_default() += 1;
        }
        match completed.result {
            Ok(()) => report.ok += 1,
            Err(failure) => {
                report.failed += 1;
                *report.failures.entry(failure.to_string()).or_default() += 1;
            }
        }
    }

    /// The finished report.
    pub fn finish(&self, sent: u64, elapsed: Duration) -> LoadReport {
        let mut report = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let tally_header = report.tally_header.clone();
        let mut report = std::mem::replace(&mut *report, LoadReport::empty(tally_header));
        report.sent = sent;
        report.elapsed = elapsed;
        report
    }
}
