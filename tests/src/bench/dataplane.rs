//! Data-path scenarios (issue 8, scenarios 1–4), each comparing three paths
//! over loopback: direct to the backend, meshfed (client → gateway A → QUIC
//! → gateway B → backend) and an HAProxy pair (HTTP/2 over mutual TLS 1.3
//! between two `nbthread 1` processes; see [`super::rig`]).
//!
//! - `hop`: open-loop latency at 200, 1,000 and 2,000 req/s, HTTP/1.1 (1 KB
//!   answers) and unary gRPC; latency *added* over direct, p50 to max, the
//!   median of 3 runs (the paths take turns inside each run);
//! - `cost`: CPU seconds per 1,000 requests per proxy process at 1,000
//!   req/s (from `/proc/<pid>/stat`), RSS idle, and RSS with 10,000 open
//!   streams on one link (opaque TCP streams held open) with a per-stream
//!   breakdown;
//! - `capacity`: closed-loop maximum req/s through each pair;
//! - `bulk`: one TCP stream's throughput through each pair.
//!
//! The machine is small and shared: absolute numbers move between runs;
//! ratios within a run are the figures to read.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;

use super::rig::{
    self, AUTHORITY, Backend, HAPROXY_MISSING, HaproxyPair, MeshfedPair, cpu_seconds, median,
    rss_bytes,
};
use super::{Context, Section, Table};
use crate::federation::Pki;
use crate::load::{self, LoadSpec, Protocol};

const RATES: [u32; 3] = [200, 1000, 2000];
const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

/// The three systems under test, started once per scenario.
struct Paths {
    backend: Backend,
    meshfed: MeshfedPair,
    haproxy: Option<HaproxyPair>,
    _pki: Pki,
}

impl Paths {
    fn start(ctx: &Context, name: &str) -> anyhow::Result<Paths> {
        let dir = ctx.scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::new(&dir);
        let backend = Backend::start()?;
        let meshfed = MeshfedPair::start(
            &dir.join("meshfed"),
            &pki,
            &backend,
            None,
            &ctx.gateway_args,
        )?;
        let haproxy = if rig::haproxy_available() {
            Some(HaproxyPair::start(
                &dir.join("haproxy"),
                &pki,
                &backend,
                None,
            )?)
        } else {
            eprintln!("{name}: {HAPROXY_MISSING}");
            None
        };
        Ok(Paths {
            backend,
            meshfed,
            haproxy,
            _pki: pki,
        })
    }

    /// (name, address, proxy pids) for each available path.
    fn list(&self) -> Vec<(&'static str, std::net::SocketAddr, Vec<u32>)> {
        let mut v = vec![
            ("direct", self.backend.http, vec![]),
            (
                "meshfed",
                self.meshfed.a.outbound,
                self.meshfed.pids().to_vec(),
            ),
        ];
        if let Some(h) = &self.haproxy {
            v.push(("haproxy", h.http, h.pids().to_vec()));
        }
        v
    }
}

fn spec(target: std::net::SocketAddr, protocol: Protocol, rate: u32, secs: f64) -> LoadSpec {
    let path = match protocol {
        Protocol::Grpc => "/bench.v1.Bench/Get",
        _ => "/",
    };
    LoadSpec {
        path: path.into(),
        rate,
        duration: Duration::from_secs_f64(secs),
        timeout: Duration::from_secs(2),
        connections: if protocol == Protocol::Http1 { 32 } else { 2 },
        ..LoadSpec::new(target, AUTHORITY, protocol)
    }
}

/// One measured run: latency quantiles and max (ms), failures, and CPU
/// seconds per 1,000 requests of each proxy process.
#[derive(Debug, Clone, Default)]
struct Run {
    q: Vec<f64>,
    max: f64,
    sent: u64,
    failed: u64,
    cpu_per_k: Vec<f64>,
}

fn measure(rt: &tokio::runtime::Runtime, spec: LoadSpec, pids: &[u32]) -> Run {
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let report = rt.block_on(load::run(spec));
    let after: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let k = (report.sent.max(1)) as f64 / 1000.0;
    Run {
        q: QUANTILES.iter().map(|(_, q)| ms(report.p(*q))).collect(),
        max: ms(report.max()),
        sent: report.sent,
        failed: report.failed,
        cpu_per_k: before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) / k)
            .collect(),
    }
}

fn runs(ctx: &Context) -> usize {
    ctx.iterations
        .unwrap_or(if ctx.quick { 1 } else { 3 })
        .max(1)
}

/// Scenario 1: hop latency.
pub fn hop(ctx: &Context) -> anyhow::Result<Section> {
    let paths = Paths::start(ctx, "hop")?;
    let rt = rig::runtime(2)?;
    let secs = if ctx.quick { 0.5 } else { 3.0 };
    let rates: &[u32] = if ctx.quick { &[200] } else { &RATES };
    let n = runs(ctx);
    let list = paths.list();
    let mut md = String::new();
    let mut cells = Vec::new();
    let mut table = Table::new(&[
        "protocol",
        "rate",
        "path",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "failed",
        "CPU s/1k req (A, B)",
    ]);
    for protocol in [Protocol::Http1, Protocol::Grpc] {
        for &rate in rates {
            // results[path][run]
            let mut results: Vec<Vec<Run>> = vec![Vec::new(); list.len()];
            for _ in 0..n {
                for (i, (_, addr, pids)) in list.iter().enumerate() {
                    results[i].push(measure(&rt, spec(*addr, protocol, rate, secs), pids));
                }
            }
            let med = |runs: &[Run]| -> (Vec<f64>, f64) {
                let q = (0..QUANTILES.len())
                    .map(|j| median(&runs.iter().map(|r| r.q[j]).collect::<Vec<_>>()))
                    .collect();
                (q, median(&runs.iter().map(|r| r.max).collect::<Vec<_>>()))
            };
            let (direct_q, direct_max) = med(&results[0]);
            for (i, (name, _, pids)) in list.iter().enumerate() {
                let (q, max) = med(&results[i]);
                let failed: u64 = results[i].iter().map(|r| r.failed).sum();
                let sent: u64 = results[i].iter().map(|r| r.sent).sum();
                let cpu: Vec<f64> = (0..pids.len())
                    .map(|p| {
                        median(
                            &results[i]
                                .iter()
                                .map(|r| r.cpu_per_k[p])
                                .collect::<Vec<_>>(),
                        )
                    })
                    .collect();
                let (shown, shown_max, label) = if i == 0 {
                    (q.clone(), max, "direct (absolute)".to_string())
                } else {
                    (
                        q.iter().zip(&direct_q).map(|(a, d)| a - d).collect(),
                        max - direct_max,
                        format!("{name} (added)"),
                    )
                };
                let mut row = vec![protocol.name().to_string(), rate.to_string(), label];
                row.extend(shown.iter().map(|v| format!("{v:.3}")));
                row.push(format!("{shown_max:.2}"));
                row.push(format!("{failed}/{sent}"));
                row.push(if cpu.is_empty() {
                    "–".into()
                } else {
                    cpu.iter()
                        .map(|c| format!("{c:.3}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                table.row(row);
                cells.push(json!({
                    "protocol": protocol.name(), "rate": rate, "path": name,
                    "latency_ms": QUANTILES.iter().map(|(k, _)| *k).zip(q.iter().copied()).collect::<std::collections::BTreeMap<_, _>>(),
                    "max_ms": max,
                    "added_ms": if i == 0 { serde_json::Value::Null } else {
                        json!(QUANTILES.iter().map(|(k, _)| *k).zip(shown.iter().copied()).collect::<std::collections::BTreeMap<_, _>>())
                    },
                    "failed": failed, "sent": sent, "cpu_s_per_1k_req": cpu, "runs": n,
                }));
            }
        }
    }
    let _ = writeln!(
        md,
        "Latency in ms, median of {n} run(s) of {secs} s each, open loop (corrected for \
         coordinated omission). `direct` rows are absolute; the others are latency *added* over \
         direct at the same quantile. Budget: meshfed's added latency ≤ 0.8× HAProxy's.\n"
    );
    md.push_str(&table.markdown());
    if paths.haproxy.is_none() {
        let _ = writeln!(md, "\n{HAPROXY_MISSING}.");
    }
    Ok(Section {
        scenario: "hop".into(),
        title: "Hop latency (scenario 1)".into(),
        markdown: md,
        json: json!({"scenario": "hop", "cells": cells}),
    })
}

/// Scenario 2: CPU per request, RSS idle and with 10,000 open streams.
pub fn cost(ctx: &Context) -> anyhow::Result<Section> {
    let paths = Paths::start(ctx, "cost")?;
    let rt = rig::runtime(2)?;
    let n = runs(ctx);
    let secs = if ctx.quick { 0.5 } else { 4.0 };
    let mut md = String::new();
    let mut json_rows = Vec::new();
    // Idle: after start and one warm-up request burst is *not* idle; read
    // RSS before any traffic, after a short settle.
    std::thread::sleep(Duration::from_millis(500));
    let mut systems: Vec<(&str, [u32; 2], std::net::SocketAddr)> =
        vec![("meshfed", paths.meshfed.pids(), paths.meshfed.a_sink)];
    if let Some(h) = &paths.haproxy {
        systems.push(("haproxy", h.pids(), h.tcp));
    }
    let idle: Vec<[u64; 2]> = systems
        .iter()
        .map(|(_, p, _)| [rss_bytes(p[0]), rss_bytes(p[1])])
        .collect();
    let mut cpu_table = Table::new(&[
        "system",
        "CPU s/1k req A",
        "CPU s/1k req B",
        "vCPU per 1k RPS (A+B)",
        "RSS idle A",
        "RSS idle B",
        "RSS after load A",
        "RSS after load B",
    ]);
    let list = paths.list();
    for (k, (name, pids, _)) in systems.iter().enumerate() {
        let Some((_, addr, _)) = list.iter().find(|(n, _, _)| n == name) else {
            continue;
        };
        let rs: Vec<Run> = (0..n)
            .map(|_| measure(&rt, spec(*addr, Protocol::Http1, 1000, secs), pids))
            .collect();
        let cpu: Vec<f64> = (0..2)
            .map(|p| median(&rs.iter().map(|r| r.cpu_per_k[p]).collect::<Vec<_>>()))
            .collect();
        let loaded = [rss_bytes(pids[0]), rss_bytes(pids[1])];
        cpu_table.row(vec![
            name.to_string(),
            format!("{:.3}", cpu[0]),
            format!("{:.3}", cpu[1]),
            format!("{:.3}", cpu[0] + cpu[1]),
            mib(idle[k][0]),
            mib(idle[k][1]),
            mib(loaded[0]),
            mib(loaded[1]),
        ]);
        json_rows.push(json!({
            "system": name, "cpu_s_per_1k_req": cpu, "rss_idle_bytes": idle[k],
            "rss_after_load_bytes": loaded, "runs": n, "seconds": secs,
        }));
    }
    let _ = writeln!(
        md,
        "At 1,000 req/s HTTP/1.1 for {secs} s, median of {n}. CPU seconds per 1,000 requests \
         per process (user + system from /proc/<pid>/stat, 10 ms ticks); since the rate is \
         1,000 req/s, the same number is vCPU used at 1,000 RPS. Budget: meshfed ≤ 0.8× \
         HAProxy; RSS idle ≤ 10 MB.\n"
    );
    md.push_str(&cpu_table.markdown());

    // 10,000 open streams on one link.
    let want: usize = if ctx.quick { 200 } else { 10_000 };
    // Raise the soft limit as far as needed (processes started later
    // inherit it); where the hard limit is lower, run as many as it allows.
    let limit = crate::soak::raise_nofile(2 * want as u64 + 300).unwrap_or_else(|e| {
        eprintln!("cost: {e}; opening fewer streams");
        rig::nofile_limit()
    });
    // This process holds two sockets per stream (the caller's end and the
    // in-process sink's accepted end), plus slack: past the limit the sink
    // cannot accept, /proc cannot be read, and the row would be garbage.
    let streams = want.min((limit.saturating_sub(300) / 2) as usize);
    let mut st = Table::new(&[
        "system",
        "streams",
        "RSS A",
        "RSS B",
        "A per stream",
        "B per stream",
        "fds A",
        "fds B",
    ]);
    for (name, pids, target) in &systems {
        let before = [rss_bytes(pids[0]), rss_bytes(pids[1])];
        let conns = rt.block_on(open_streams(*target, streams));
        let held = conns.len();
        // Let the far side finish connecting.
        let _ = crate::wait_for("streams reach the backend", Duration::from_secs(30), || {
            if rig::fds(pids[1]) + 50 >= held {
                Ok(())
            } else {
                Err(format!("{} fds at B", rig::fds(pids[1])))
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let at = [rss_bytes(pids[0]), rss_bytes(pids[1])];
        let fds = [rig::fds(pids[0]), rig::fds(pids[1])];
        let per = |i: usize| at[i].saturating_sub(before[i]) as f64 / held.max(1) as f64;
        st.row(vec![
            name.to_string(),
            held.to_string(),
            mib(at[0]),
            mib(at[1]),
            format!("{:.1} KB", per(0) / 1024.0),
            format!("{:.1} KB", per(1) / 1024.0),
            fds[0].to_string(),
            fds[1].to_string(),
        ]);
        json_rows.push(json!({
            "system": name, "open_streams": held, "rss_before_bytes": before, "rss_at_bytes": at,
            "per_stream_bytes": [per(0), per(1)], "fds": fds,
        }));
        rt.block_on(async move { drop(conns) });
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = writeln!(
        md,
        "\n{streams} concurrent open TCP streams through each pair (opaque TCP: meshfed's mapped \
         port, one QUIC stream each on the one A→B link; HAProxy in TCP mode, one TLS \
         connection each, since HAProxy does not multiplex TCP). Per-stream cost is the RSS \
         growth over the state before the streams, divided by their number. Soft fd limit \
         here: {limit}. Budget: meshfed ≤ 64 MB at 10k streams (≤ 6.5 KB/stream).\n"
    );
    md.push_str(&st.markdown());
    Ok(Section {
        scenario: "cost".into(),
        title: "Cost: CPU, memory, open streams (scenario 2)".into(),
        markdown: md,
        json: json!({"scenario": "cost", "rows": json_rows}),
    })
}

fn mib(b: u64) -> String {
    format!("{:.1} MB", b as f64 / (1024.0 * 1024.0))
}

/// Opens `n` TCP connections to `target`, each announcing a transfer it
/// never sends (so the sink holds it open); returns the open ones.
async fn open_streams(target: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::net::TcpStream::connect(target).await {
            Ok(mut s) => {
                let _ = s.write_all(&u64::MAX.to_be_bytes()).await;
                held.push(s);
            }
            Err(e) => {
                eprintln!("cost: stopped at {} streams: {e}", held.len());
                break;
            }
        }
    }
    held
}

/// Scenario 3: closed-loop capacity.
pub fn capacity(ctx: &Context) -> anyhow::Result<Section> {
    let paths = Paths::start(ctx, "capacity")?;
    let rt = rig::runtime(2)?;
    let n = runs(ctx);
    let secs = if ctx.quick { 0.5 } else { 4.0 };
    let workers = 64;
    let mut t = Table::new(&["path", "max req/s (median)", "runs", "failures"]);
    let mut rows = Vec::new();
    let mut medians = std::collections::BTreeMap::new();
    for (name, addr, _) in paths.list() {
        let rs: Vec<(f64, u64)> = (0..n)
            .map(|_| {
                rt.block_on(rig::closed_loop(
                    addr,
                    workers,
                    Duration::from_secs_f64(secs),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let m = median(&rs.iter().map(|r| r.0).collect::<Vec<_>>());
        medians.insert(name, m);
        t.row(vec![
            name.into(),
            format!("{m:.0}"),
            rs.iter()
                .map(|r| format!("{:.0}", r.0))
                .collect::<Vec<_>>()
                .join(", "),
            rs.iter().map(|r| r.1).sum::<u64>().to_string(),
        ]);
        rows.push(json!({"path": name, "rps": rs.iter().map(|r| r.0).collect::<Vec<_>>(), "median_rps": m}));
    }
    let mut md = format!(
        "Closed loop: {workers} HTTP/1.1 keep-alive connections, each sending the next request \
         when the previous answer arrived, {secs} s per run; the load generator shares the 2 \
         cores with the proxies.\n\n{}",
        t.markdown()
    );
    let ratio = match (medians.get("meshfed"), medians.get("haproxy")) {
        (Some(m), Some(h)) if *h > 0.0 => Some(m / h),
        _ => None,
    };
    if let Some(r) = ratio {
        let _ = writeln!(md, "\nmeshfed / HAProxy: **{r:.2}×**.");
    }
    Ok(Section {
        scenario: "capacity".into(),
        title: "Capacity (scenario 3)".into(),
        markdown: md,
        json: json!({"scenario": "capacity", "rows": rows, "ratio_meshfed_over_haproxy": ratio}),
    })
}

/// Scenario 4: single-stream bulk throughput.
pub fn bulk(ctx: &Context) -> anyhow::Result<Section> {
    let paths = Paths::start(ctx, "bulk")?;
    let rt = rig::runtime(2)?;
    let n = runs(ctx);
    let bytes: u64 = if ctx.quick { 8 << 20 } else { 256 << 20 };
    let mut targets = vec![
        ("direct", paths.backend.sink),
        ("meshfed", paths.meshfed.a_sink),
    ];
    if let Some(h) = &paths.haproxy {
        targets.push(("haproxy", h.tcp));
    }
    let mut t = Table::new(&["path", "MB/s (median)", "runs"]);
    let mut rows = Vec::new();
    let mut med = std::collections::BTreeMap::new();
    for (name, addr) in targets {
        let rs: Vec<f64> = (0..n)
            .map(|_| rt.block_on(rig::bulk_transfer(addr, bytes)))
            .collect::<anyhow::Result<_>>()?;
        let m = median(&rs);
        med.insert(name, m);
        t.row(vec![
            name.into(),
            format!("{m:.0}"),
            rs.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        rows.push(json!({"path": name, "mb_per_s": rs, "median": m}));
    }
    let ratio = match (med.get("meshfed"), med.get("haproxy")) {
        (Some(m), Some(h)) if *h > 0.0 => Some(m / h),
        _ => None,
    };
    let mut md = format!(
        "One TCP stream of {} MiB: direct to the sink; through meshfed (A's mapped TCP port → \
         one QUIC stream → B); through the HAProxy pair in TCP mode with TLS 1.3 (mutual) \
         between them. 1 MB = 10^6 bytes.\n\n{}",
        bytes >> 20,
        t.markdown()
    );
    if let Some(r) = ratio {
        let _ = writeln!(md, "\nmeshfed / HAProxy: **{r:.2}×**.");
    }
    Ok(Section {
        scenario: "bulk".into(),
        title: "Bulk throughput (scenario 4)".into(),
        markdown: md,
        json: json!({"scenario": "bulk", "rows": rows, "ratio_meshfed_over_haproxy": ratio}),
    })
}
