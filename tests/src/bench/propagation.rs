//! Scenario `propagation` (issue 8, scenario 6; issue 5's benchmark): a
//! webhook-triggered commit → every gateway ACKed, with the real
//! `meshfed-syncer` and a real Git repository, at 1, 10 and 100
//! subscribers, for repositories of 10 and 1,000 resources.
//!
//! - Subscribers: up to 3 real `meshfed-gateway` processes in syncer mode
//!   (one per cluster: east, west, edge; they decode, check, apply, persist
//!   and ACK), the rest lightweight in-process subscribers
//!   ([`crate::syncer::spawn_light_subscriber`]: their own gateway
//!   certificates, one TLS connection each, ACK on receipt). At 1
//!   subscriber it is east's real gateway alone.
//! - One iteration: commit (a weight change in a VirtualService every
//!   cluster gets, so every snapshot changes), then `t0`, then the signed
//!   webhook POST; the commit's rollout is then read from `/rollout/SHA`
//!   once it is live, and the sample is the latest `acked_at` among the
//!   subscribers minus `t0` (wall clock, millisecond resolution, all on one
//!   machine).
//! - Also read: the syncer's `meshfed_syncer_propagation_seconds` histogram
//!   (fetch start → each ACK) over the measured iterations, and the
//!   pipeline's breakdown from its JSON log (`new head`: fetch; `commit
//!   accepted and published`: read, analyze, compile, persist).
//!
//! The budget (design.md): ≤ 250 ms p99 for 100 gateways. It is reported,
//! not asserted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;

use super::{Context, Section, Stats, Table};
use crate::federation::{GatewayProcess, GatewaySpec, Pki, free_udp_port};
use crate::syncer::{
    PolicyRepo, SyncerProcess, SyncerSpec, parse_rfc3339, spawn_light_subscriber, syncer_creds,
};

const CLUSTERS: [&str; 3] = ["east", "west", "edge"];
const SUBSCRIBERS: [usize; 3] = [1, 10, 100];
const RESOURCES: [usize; 2] = [10, 1000];
const BUDGET_MS: f64 = 250.0;

/// Runs the scenario.
pub fn run(ctx: &Context) -> anyhow::Result<Section> {
    let iterations = ctx
        .iterations
        .unwrap_or(if ctx.quick { 3 } else { 40 })
        .max(1);
    let dir = ctx.scratch.join("propagation");
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::new(&dir);
    let syncer_tls = syncer_creds(&pki, "east", "syncer");
    let max_light = SUBSCRIBERS
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .saturating_sub(3);
    eprintln!("propagation: issuing certificates for {max_light} light subscribers");
    let lights: Vec<(String, String, PathBuf)> = (0..max_light)
        .map(|i| {
            let cluster = CLUSTERS[i % CLUSTERS.len()].to_string();
            let id = format!("light-{i:03}");
            let creds = pki.gateway(&cluster, &id);
            (cluster, id, creds)
        })
        .collect();
    let reals: Vec<PathBuf> = CLUSTERS.iter().map(|c| pki.gateway(c, "gw-0")).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cells = Vec::new();
    for &resources in &RESOURCES {
        let cell_dir = dir.join(format!("repo-{resources}"));
        cells.extend(run_repo(
            &rt,
            &reals,
            &syncer_tls,
            &lights,
            &cell_dir,
            resources,
            iterations,
        )?);
    }
    Ok(section(ctx, iterations, &cells))
}

/// One measured (repository size, subscriber count) cell.
#[derive(Debug, Clone)]
struct Cell {
    resources: usize,
    subscribers: usize,
    real: usize,
    /// Webhook POST → last ACK, ms, one per iteration.
    webhook_to_all: Vec<f64>,
    /// Webhook POST → last real gateway's ACK, ms.
    webhook_to_real: Vec<f64>,
    hist: Histogram,
    /// Per commit, from the syncer's log.
    breakdown: BTreeMap<&'static str, Vec<f64>>,
    snapshot_bytes: usize,
}

#[allow(clippy::too_many_arguments)]
fn run_repo(
    rt: &tokio::runtime::Runtime,
    reals: &[PathBuf],
    syncer_tls: &Path,
    lights: &[(String, String, PathBuf)],
    dir: &Path,
    resources: usize,
    iterations: usize,
) -> anyhow::Result<Vec<Cell>> {
    std::fs::create_dir_all(dir)?;
    let ports: Vec<u16> = CLUSTERS.iter().map(|_| free_udp_port()).collect();
    let repo = PolicyRepo::init(&dir.join("repo"));
    let files = repo_files(resources, &ports);
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let first = repo.commit("initial policy", &refs);
    let mut spec = SyncerSpec::new(&repo.dir, syncer_tls, &dir.join("syncer"));
    spec.extra_args = vec!["--log-format".into(), "json".into()];
    let syncer = SyncerProcess::start(&spec);
    wait_accepted(&syncer, &first)?;

    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(String, String)>();
    let mut gateways: Vec<GatewayProcess> = Vec::new();
    let mut light_tasks = Vec::new();
    let mut cells = Vec::new();
    let mut n = 0usize;
    for &target in &SUBSCRIBERS {
        let real_target = target.min(CLUSTERS.len());
        while gateways.len() < real_target {
            let i = gateways.len();
            let cluster = CLUSTERS[i];
            gateways.push(GatewayProcess::start(&GatewaySpec {
                cluster: cluster.into(),
                id: "gw-0".into(),
                tls_dir: reals[i].clone(),
                policy_dir: PathBuf::new(),
                discovery: None,
                tunnel_port: ports[i],
                work_dir: dir.to_path_buf(),
                extra_args: vec![
                    "--syncer".into(),
                    syncer.grpc.to_string(),
                    "--syncer-issuer".into(),
                    "east".into(),
                    "--state-dir".into(),
                    dir.join(format!("state-{cluster}"))
                        .to_string_lossy()
                        .into(),
                ],
            }));
        }
        let light_target = target - real_target;
        let _guard = rt.enter();
        while light_tasks.len() < light_target {
            let (cluster, id, creds) = &lights[light_tasks.len()];
            light_tasks.push(spawn_light_subscriber(
                syncer.grpc,
                creds.clone(),
                cluster.clone(),
                id.clone(),
                ack_tx.clone(),
            ));
        }
        drop(_guard);
        // Everyone connected and on the current head.
        let head = git_head(&repo);
        wait_live(&syncer, &head, target, Duration::from_secs(60))?;
        let mut cell = Cell {
            resources,
            subscribers: target,
            real: real_target,
            webhook_to_all: Vec::new(),
            webhook_to_real: Vec::new(),
            hist: Histogram::default(),
            breakdown: BTreeMap::new(),
            snapshot_bytes: 0,
        };
        eprintln!(
            "propagation: {resources} resources, {target} subscribers ({real_target} real): \
             {iterations} iterations"
        );
        let mut commits = BTreeSet::new();
        let mut before = None;
        // Iteration 0 warms up (first connection reuse, caches) and is
        // not counted.
        for i in 0..=iterations {
            if i == 1 {
                before = Some(Histogram::scrape(&syncer.metrics()));
            }
            n += 1;
            let sha = repo.commit(
                &format!("weights {n}"),
                &[("svc-0000.yaml", &service(0, n))],
            );
            while ack_rx.try_recv().is_ok() {}
            let t0 = SystemTime::now();
            let (code, body) = syncer.webhook();
            if code != 202 {
                bail!("the webhook answered {code}: {body}");
            }
            // The light subscribers report in-process; polling the rollout
            // (which costs the syncer Git ancestry checks) starts only
            // when they are done.
            let mut lights_acked = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while lights_acked.len() < light_target {
                let left = deadline.saturating_duration_since(Instant::now());
                match rt.block_on(async { tokio::time::timeout(left, ack_rx.recv()).await }) {
                    Ok(Some((who, v))) if v == sha => {
                        lights_acked.insert(who);
                    }
                    Ok(Some(_)) => {}
                    _ => bail!(
                        "only {} of {light_target} light subscribers ACKed {sha} within 60 s; \
                         syncer log: {}",
                        lights_acked.len(),
                        syncer.log.display()
                    ),
                }
            }
            let view = wait_live(&syncer, &sha, target, Duration::from_secs(60))?;
            if i == 0 {
                continue;
            }
            commits.insert(sha.clone());
            let (all, real) = last_acks(&view, t0)?;
            cell.webhook_to_all.push(all);
            cell.webhook_to_real.push(real);
        }
        let after = Histogram::scrape(&syncer.metrics());
        cell.hist = after.minus(&before.unwrap_or_default());
        cell.breakdown = breakdown(&syncer.log, &commits);
        cell.snapshot_bytes = snapshot_bytes(&gateways);
        let s = Stats::of(&cell.webhook_to_all);
        eprintln!(
            "  webhook → all ACKed: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.map_or(0.0, |s| s.p50),
            s.map_or(0.0, |s| s.p99),
            s.map_or(0.0, |s| s.max)
        );
        cells.push(cell);
    }
    for t in light_tasks {
        t.abort();
    }
    drop(gateways);
    drop(syncer);
    Ok(cells)
}

fn git_head(repo: &PolicyRepo) -> String {
    crate::syncer::git(&repo.dir, &["rev-parse", "HEAD"])
}

fn wait_accepted(syncer: &SyncerProcess, sha: &str) -> anyhow::Result<()> {
    crate::wait_for(
        "the syncer accepts the first commit",
        Duration::from_secs(60),
        || {
            let s = syncer.status();
            if s["last_good"]["commit"] == sha {
                Ok(())
            } else {
                Err(format!("status: {s}"))
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}; log: {}", syncer.log_text()))
}

/// Waits until `sha` is live on exactly `subscribers` known gateways.
fn wait_live(
    syncer: &SyncerProcess,
    sha: &str,
    subscribers: usize,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let view = syncer.rollout(sha);
        let known: usize = view["clusters"].as_object().map_or(0, |c| {
            c.values().filter_map(|g| g.as_array()).map(Vec::len).sum()
        });
        match view["state"].as_str() {
            Some("live") if known == subscribers => return Ok(view),
            Some("nacked" | "rejected") => bail!("commit {sha}: {view}"),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("commit {sha} not live on {subscribers} gateways within {within:?}: {view}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (webhook → last ACK, webhook → last real gateway's ACK), in ms.
fn last_acks(view: &serde_json::Value, t0: SystemTime) -> anyhow::Result<(f64, f64)> {
    let mut all = 0.0f64;
    let mut real = 0.0f64;
    for g in view["clusters"]
        .as_object()
        .into_iter()
        .flat_map(|c| c.values())
        .filter_map(|g| g.as_array())
        .flatten()
    {
        let at = g["acked_at"]
            .as_str()
            .and_then(parse_rfc3339)
            .with_context(|| format!("no acked_at in {g}"))?;
        // The syncer stamps ACKs to the millisecond (truncated): an ACK in
        // the same millisecond as t0 reads as up to 1 ms early.
        let ms = at.duration_since(t0).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        all = all.max(ms);
        if g["gateway_id"] == "gw-0" {
            real = real.max(ms);
        }
    }
    Ok((all, real))
}

/// The canonical snapshot size a real gateway holds (its state file).
fn snapshot_bytes(gateways: &[GatewayProcess]) -> usize {
    gateways
        .first()
        .and_then(|g| {
            g.log
                .parent()
                .map(|d| d.join(format!("state-{}", g.cluster)))
        })
        .and_then(|d| std::fs::metadata(d.join("snapshot.json")).ok())
        .map_or(0, |m| m.len() as usize)
}

/// Per-commit timings from the syncer's JSON log.
fn breakdown(log: &Path, commits: &BTreeSet<String>) -> BTreeMap<&'static str, Vec<f64>> {
    let mut out: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        let Some(commit) = f["commit"].as_str() else {
            continue;
        };
        if !commits.contains(commit) {
            continue;
        }
        let keys: &[(&'static str, &str)] = match f["message"].as_str() {
            Some("new head") => &[("fetch", "fetch_ms")],
            Some("commit accepted and published") => &[
                ("read", "read_ms"),
                ("analyze", "analyze_ms"),
                ("compile", "compile_ms"),
                ("persist", "persist_ms"),
                ("pipeline", "elapsed_ms"),
            ],
            _ => continue,
        };
        for (name, key) in keys {
            if let Some(x) = f[*key].as_f64() {
                out.entry(name).or_default().push(x);
            }
        }
    }
    out
}

/// A Prometheus histogram's cumulative buckets, sum and count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// (upper bound, cumulative count), ascending.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    const NAME: &'static str = "meshfed_syncer_propagation_seconds";

    fn scrape(metrics: &str) -> Self {
        let mut h = Histogram::default();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix(Self::NAME) else {
                continue;
            };
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
                let le = b.split('"').next().unwrap_or("");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                h.buckets.push((le, value));
            } else if rest.starts_with("_sum") {
                h.sum = value;
            } else if rest.starts_with("_count") {
                h.count = value;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    fn minus(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let b = before
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |x| x.1);
                (*le, c - b)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The upper bound (ms) of the bucket holding quantile `q`.
    fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want && *c > 0.0)
            .map(|(le, _)| le * 1e3)
    }

    fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1e3)
    }
}

fn fmt_ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_infinite() => "> 60 s".into(),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

fn section(ctx: &Context, iterations: usize, cells: &[Cell]) -> Section {
    let mut t = Table::new(&[
        "resources",
        "subscribers (real + light)",
        "snapshot bytes",
        "webhook → all ACKed p50 / p99 / max (ms)",
        "→ last real gateway p50 / p99 (ms)",
        "fetch → ACK histogram mean / p99 bucket (ms)",
        "fetch / read / analyze / compile / persist, mean (ms)",
    ]);
    let mut json_cells = Vec::new();
    for c in cells {
        let all = Stats::of(&c.webhook_to_all);
        let real = Stats::of(&c.webhook_to_real);
        let mean = |k: &str| {
            c.breakdown
                .get(k)
                .and_then(|v| Stats::of(v))
                .map(|s| s.mean)
        };
        t.row(vec![
            format!("{}", c.resources),
            format!(
                "{} ({} + {})",
                c.subscribers,
                c.real,
                c.subscribers - c.real
            ),
            format!("{}", c.snapshot_bytes),
            all.map_or("-".into(), |s| {
                format!("{:.1} / {:.1} / {:.1}", s.p50, s.p99, s.max)
            }),
            real.map_or("-".into(), |s| format!("{:.1} / {:.1}", s.p50, s.p99)),
            format!(
                "{} / ≤ {}",
                fmt_ms(c.hist.mean_ms()),
                fmt_ms(c.hist.quantile_bound_ms(0.99))
            ),
            ["fetch", "read", "analyze", "compile", "persist"]
                .iter()
                .map(|k| fmt_ms(mean(k)))
                .collect::<Vec<_>>()
                .join(" / "),
        ]);
        json_cells.push(serde_json::json!({
            "resources": c.resources,
            "subscribers": c.subscribers,
            "real_gateways": c.real,
            "light_subscribers": c.subscribers - c.real,
            "snapshot_bytes": c.snapshot_bytes,
            "webhook_to_all_acked_ms": all.map(|s| s.json()),
            "webhook_to_last_real_gateway_ms": real.map(|s| s.json()),
            "webhook_to_all_acked_samples_ms": c.webhook_to_all,
            "propagation_histogram": {
                "count": c.hist.count,
                "mean_ms": c.hist.mean_ms(),
                "p50_bucket_ms": c.hist.quantile_bound_ms(0.5),
                "p99_bucket_ms": c.hist.quantile_bound_ms(0.99),
                "buckets": c.hist.buckets.iter()
                    .map(|(le, n)| serde_json::json!([if le.is_finite() { serde_json::json!(le) } else { serde_json::json!("+Inf") }, n]))
                    .collect::<Vec<_>>(),
            },
            "pipeline_ms": c.breakdown.iter()
                .map(|(k, v)| (k.to_string(), Stats::of(v).map(|s| s.json()).unwrap_or_default()))
                .collect::<serde_json::Map<_, _>>(),
        }));
    }
    let mut md = format!(
        "Real `meshfed-syncer`, real Git repository, GitHub-signed webhook. {iterations} \
         iteration(s) per row after one warm-up. Up to 3 real gateways (one per cluster), the \
         rest in-process subscribers with their own certificates that ACK on receipt. Budget: \
         ≤ {BUDGET_MS} ms p99 for 100 gateways.\n\n"
    );
    md.push_str(&t.markdown());
    if let Some(c) = cells
        .iter()
        .filter(|c| c.subscribers == 100)
        .max_by_key(|c| c.resources)
        && let Some(s) = Stats::of(&c.webhook_to_all)
    {
        let _ = write!(
            md,
            "\n100 subscribers, {} resources: p99 {:.1} ms against the budget of {BUDGET_MS} ms: {}.\n",
            c.resources,
            s.p99,
            if ctx.quick {
                "not judged (--quick)"
            } else if s.p99 <= BUDGET_MS {
                "within budget"
            } else {
                "OVER budget"
            }
        );
    }
    md.push_str(
        "\nColumns: *webhook → all ACKed* runs from just before the webhook POST to the latest \
         `acked_at` the syncer recorded for the commit (ms resolution). The histogram is the \
         syncer's `meshfed_syncer_propagation_seconds` (fetch start → each gateway's ACK) over \
         the measured iterations. The breakdown comes from the syncer's log: fetch (`git \
         fetch` from the local remote), read (the commit's files from the mirror), analyze \
         (load + validate the federation), compile (every cluster's snapshot, encoded), \
         persist (`last-good.json`, fsynced).\n",
    );
    Section {
        scenario: "propagation".into(),
        title: "Propagation: commit → every gateway ACKed".into(),
        markdown: md,
        json: serde_json::json!({
            "scenario": "propagation",
            "quick": ctx.quick,
            "iterations": iterations,
            "budget_p99_ms_at_100": BUDGET_MS,
            "cells": json_cells,
        }),
    }
}

/// The repository: 3 `Cluster`s, then services of 3 resources each
/// (ServiceExport, DestinationRule with east/west subsets, VirtualService
/// splitting between them), one file per service, and ServiceExports to
/// make up the exact count.
fn repo_files(resources: usize, ports: &[u16]) -> Vec<(String, String)> {
    let mut clusters = String::new();
    for (c, p) in CLUSTERS.iter().zip(ports) {
        clusters.push_str(&crate::federation::cluster_yaml(c, &[*p]));
    }
    let mut files = vec![("clusters.yaml".to_string(), clusters)];
    let mut left = resources.saturating_sub(CLUSTERS.len());
    let mut i = 0;
    while left >= 3 {
        files.push((format!("svc-{i:04}.yaml"), service(i, 0)));
        left -= 3;
        i += 1;
    }
    let mut extra = String::new();
    for j in 0..left {
        let _ = write!(
            extra,
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: extra-{j}, namespace: default}}\n---\n"
        );
    }
    if !extra.is_empty() {
        files.push(("extra.yaml".into(), extra));
    }
    files
}

/// Service `i`'s three resources; `n` moves its weights (so every commit
/// changes every cluster's snapshot).
fn service(i: usize, n: usize) -> String {
    let east = n % 101;
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: svc-{i}, namespace: default}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{i}, namespace: default}}
spec:
  host: svc-{i}
  subsets:
  - {{name: east, labels: {{topology.istio.io/cluster: east}}}}
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: default}}
spec:
  hosts: [svc-{i}]
  http:
  - match: [{{uri: {{prefix: /v{i}/}}}}]
    route:
    - {{destination: {{host: svc-{i}, subset: east}}, weight: {east}}}
    - {{destination: {{host: svc-{i}, subset: west}}, weight: {}}}
",
        100 - east
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_repository_has_exactly_the_asked_number_of_valid_resources() {
        for n in [10, 1000] {
            let files = repo_files(n, &[15443, 15444, 15445]);
            let docs: usize = files
                .iter()
                .map(|(_, t)| t.split("---\n").filter(|d| !d.trim().is_empty()).count())
                .sum();
            assert_eq!(docs, n);
            let a = meshfed_policy::analyze(
                files
                    .into_iter()
                    .map(|(p, t)| (p, t.into_bytes()))
                    .collect::<Vec<(String, Vec<u8>)>>(),
                &meshfed_policy::Options::default(),
            );
            assert!(a.is_valid(), "{:?}", a.diagnostics);
        }
    }

    #[test]
    fn histogram_deltas_and_quantile_buckets() {
        let text = |n: [u32; 3], sum: f64| {
            format!(
                "meshfed_syncer_propagation_seconds_sum {sum}\n\
                 meshfed_syncer_propagation_seconds_count {}\n\
                 meshfed_syncer_propagation_seconds_bucket{{le=\"0.01\"}} {}\n\
                 meshfed_syncer_propagation_seconds_bucket{{le=\"0.1\"}} {}\n\
                 meshfed_syncer_propagation_seconds_bucket{{le=\"+Inf\"}} {}\n",
                n[2], n[0], n[1], n[2]
            )
        };
        let before = Histogram::scrape(&text([1, 1, 1], 0.005));
        let after = Histogram::scrape(&text([1, 100, 101], 2.005));
        let d = after.minus(&before);
        assert_eq!(d.count, 100.0);
        assert_eq!(d.quantile_bound_ms(0.5), Some(100.0));
        assert_eq!(d.quantile_bound_ms(0.99), Some(100.0));
        assert_eq!(d.quantile_bound_ms(1.0), Some(f64::INFINITY));
        assert_eq!(d.mean_ms(), Some(20.0));
    }
}
