//! The benchmark harness behind `meshfed-bench`: named scenarios, each of
//! which starts what it measures itself (real binaries on loopback) and
//! returns a [`Section`]: a markdown table for people and JSON for tools.
//! [`write_results`] puts them under the results directory (`bench-results/`
//! by default, ignored by Git), with an SVG plot drawn from the JSON where
//! the scenario has one ([`plot`]).
//!
//! Adding a scenario: write `fn run(&Context) -> anyhow::Result<Section>` in
//! a module of its own under `bench/`, and list it in [`scenarios`]. A
//! scenario honours [`Context::quick`] (a smoke run for CI: a few
//! iterations, numbers not meaningful) and never asserts on numbers; a
//! missing tool is a [`Section::skipped`], not a failure.
//!
//! Benchmarks measure; budgets are compared in the report, never asserted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub mod dataplane;
pub mod instructions;
pub mod lossy;
pub mod plot;
pub mod propagation;
pub mod rig;
pub mod validation;

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Context {
    /// A smoke run: few iterations, numbers not meaningful.
    pub quick: bool,
    /// Iterations per measured cell, when the scenario repeats something
    /// (`None`: the scenario's default).
    pub iterations: Option<usize>,
    /// Where scenarios may keep scratch files (a temporary directory).
    pub scratch: PathBuf,
    /// Extra flags for every meshfed gateway the scenarios start
    /// (`--gateway-arg`), to compare settings.
    pub gateway_args: Vec<String>,
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// The name on the command line.
    pub name: &'static str,
    /// One line for `--list`.
    pub about: &'static str,
    pub run: fn(&Context) -> anyhow::Result<Section>,
}

/// Every scenario, in the order a full run takes them.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "hop",
            about: "added latency over direct: meshfed vs an HAProxy mTLS pair, HTTP/1.1 1 KB \
                    and gRPC at 200/1,000/2,000 req/s (scenario 1)",
            run: dataplane::hop,
        },
        Scenario {
            name: "cost",
            about: "CPU s per 1,000 requests per process, RSS idle, RSS at 10,000 open streams \
                    (scenario 2)",
            run: dataplane::cost,
        },
        Scenario {
            name: "capacity",
            about: "closed-loop maximum req/s, meshfed vs HAProxy pair (scenario 3)",
            run: dataplane::capacity,
        },
        Scenario {
            name: "bulk",
            about: "single-stream TCP throughput, meshfed link vs TLS 1.3 HAProxy pair (scenario 4)",
            run: dataplane::bulk,
        },
        Scenario {
            name: "instructions",
            about: "user-space instructions (callgrind) and syscalls (strace) per request, \
                    meshfed vs HAProxy pair, N sequential requests minus an idle window, with \
                    meshfed's profile; --iterations sets N (issue 17)",
            run: instructions::run,
        },
        Scenario {
            name: "lossy",
            about: "100 concurrent requests over 1%/20 ms and 5%/200 ms links: QUIC vs h2 over \
                    TLS/TCP (scenario 5)",
            run: lossy::run,
        },
        Scenario {
            name: "propagation",
            about: "webhook-triggered commit → every gateway ACKed, at 1, 10 and 100 subscribers, \
                    with repos of 10 and 1,000 resources (issue 8, scenario 6)",
            run: propagation::run,
        },
        Scenario {
            name: "validation",
            about: "meshfed-policy validate on 10,000 resources (scenario 7)",
            run: validation::run,
        },
    ]
}

/// One scenario's results.
#[derive(Debug, Clone)]
pub struct Section {
    pub scenario: String,
    pub title: String,
    /// Markdown: tables and a short reading.
    pub markdown: String,
    pub json: serde_json::Value,
}

impl Section {
    /// A scenario that could not run here (a missing tool), and why.
    pub fn skipped(scenario: &str, why: &str) -> Self {
        Section {
            scenario: scenario.into(),
            title: format!("{scenario}: skipped"),
            markdown: format!("Skipped: {why}\n"),
            json: serde_json::json!({"scenario": scenario, "skipped": why}),
        }
    }
}

/// Summary statistics of a sample (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    /// `None` for an empty sample.
    pub fn of(sample: &[f64]) -> Option<Stats> {
        if sample.is_empty() {
            return None;
        }
        let mut v = sample.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = (q * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Some(Stats {
            n: v.len(),
            min: v[0],
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n, "min": self.min, "p50": self.p50, "p90": self.p90,
            "p99": self.p99, "max": self.max, "mean": self.mean,
        })
    }
}

/// A markdown table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

/// A short description of the machine, for the report's header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {} GiB RAM", kb / (1 << 20)));
    format!("{cpu}, {cores} cores{mem}, {}", std::env::consts::OS)
}

/// Writes every section to `dir`: `<scenario>.md`, `<scenario>.json` and,
/// where the scenario has a plot, `<scenario>.svg` (embedded in both
/// markdown files), and `report.md` with all of them; returns the report's
/// path. A plot that cannot be drawn is a warning, on stderr and in the
/// report, never an error: the numbers are written regardless.
pub fn write_results(dir: &Path, quick: bool, sections: &[Section]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut report = format!(
        "# meshfed benchmark report\n\nMachine: {}. Build: {}.{}\n\n",
        machine(),
        if cfg!(debug_assertions) {
            "debug (numbers are not representative)"
        } else {
            "release"
        },
        if quick {
            " **--quick: a smoke run, numbers not meaningful**"
        } else {
            ""
        }
    );
    for s in sections {
        let json = serde_json::to_vec_pretty(&s.json).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("{}.json", s.scenario)), json)?;
        let plot = match plot::write(dir, s) {
            Ok(Some(_)) => format!("\n![{}]({}.svg)\n", s.title, s.scenario),
            Ok(None) => String::new(),
            Err(e) => {
                eprintln!("meshfed-bench: warning: no plot for {}: {e:#}", s.scenario);
                format!("\n*No plot: {e:#}.*\n")
            }
        };
        let markdown = format!("{}{plot}", s.markdown);
        std::fs::write(dir.join(format!("{}.md", s.scenario)), &markdown)?;
        let _ = write!(report, "## {}\n\n{markdown}\n", s.title);
    }
    let path = dir.join("report.md");
    std::fs::write(&path, report)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!(
            (s.p50, s.p90, s.p99, s.max, s.min),
            (50.0, 90.0, 99.0, 100.0, 1.0)
        );
        let one = Stats::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.markdown(), "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}
