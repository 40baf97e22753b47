//! Scenario `lossy` (issue 8, scenario 5): 100 concurrent small requests
//! over an impaired link between the two proxies of a pair, through the
//! same user-space [`crate::relay`] with a fixed seed:
//!
//! - meshfed: gateway A → UDP relay → gateway B (QUIC; the relay drops and
//!   delays datagrams);
//! - HAProxy: A → TCP relay → B (HTTP/2 over one TLS/TCP connection; the
//!   relay delays segments and *models* loss as TCP's recovery delay with
//!   head-of-line blocking, since it terminates TCP; see the relay's docs).
//!
//! Two links: 1% loss with 20 ms RTT, and 5% loss with 200 ms RTT. Each
//! round sends 100 requests at once (HTTP/1.1, 100 connections to A); p99
//! and failures (5 s timeout) over all rounds.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;

use super::rig::{self, AUTHORITY, Backend, HAPROXY_MISSING, HaproxyPair, MeshfedPair};
use super::{Context, Section, Table};
use crate::federation::Pki;
use crate::load::{self, LoadSpec, Protocol};
use crate::relay::Impairment;

/// A system under test: its name, the address callers use, and a reader of
/// its CPU time.
type System<'a> = (String, std::net::SocketAddr, Box<dyn Fn() -> u64 + 'a>);

const SEED: u64 = 0x6d65_7368;

/// Runs the scenario.
pub fn run(ctx: &Context) -> anyhow::Result<Section> {
    let dir = ctx.scratch.join("lossy");
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::new(&dir);
    let backend = Backend::start()?;
    let rt = rig::runtime(2)?;
    let rounds = ctx
        .iterations
        .unwrap_or(if ctx.quick { 1 } else { 10 })
        .max(1);
    let links: &[(f64, u64)] = if ctx.quick {
        &[(0.01, 20)]
    } else {
        &[(0.01, 20), (0.05, 200)]
    };
    let have_haproxy = rig::haproxy_available();
    let mut t = Table::new(&[
        "link",
        "path",
        "p50 ms",
        "p99 ms",
        "max ms",
        "failed",
        "relay lost",
    ]);
    let mut rows = Vec::new();
    for (k, &(loss, rtt_ms)) in links.iter().enumerate() {
        let imp = Impairment::lossy(loss, Duration::from_millis(rtt_ms), SEED);
        let link = format!("{:.0}% loss, {rtt_ms} ms RTT", loss * 100.0);
        let meshfed = MeshfedPair::start(
            &dir.join(format!("meshfed-{k}")),
            &pki,
            &backend,
            Some(imp),
            &ctx.gateway_args,
        )?;
        let haproxy = if have_haproxy {
            Some(HaproxyPair::start(
                &dir.join(format!("haproxy-{k}")),
                &pki,
                &backend,
                Some(imp),
            )?)
        } else {
            None
        };
        let mut systems: Vec<System<'_>> = Vec::new();
        let label = if ctx.gateway_args.is_empty() {
            "meshfed (QUIC)".to_string()
        } else {
            format!("meshfed (QUIC, {})", ctx.gateway_args.join(" "))
        };
        systems.push((
            label,
            meshfed.a.outbound,
            Box::new(|| meshfed.relay.as_ref().map_or(0, |r| r.stats().lost)),
        ));
        if let Some(h) = &haproxy {
            systems.push((
                "haproxy (h2 over TLS/TCP)".to_string(),
                h.http,
                Box::new(|| h.relay.as_ref().map_or(0, |r| r.stats().lost)),
            ));
        }
        for (name, addr, lost) in &systems {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
            let (mut sent, mut failed) = (0u64, 0u64);
            // One warm-up round: connections A→B and to A exist afterwards.
            let _ = rt.block_on(load::run(burst(*addr)));
            let lost_before = lost();
            for _ in 0..rounds {
                let r = rt.block_on(load::run(burst(*addr)));
                hist.add(&r.latency)?;
                sent += r.sent;
                failed += r.failed;
            }
            let ms = |v: u64| v as f64 / 1e3;
            let (p50, p99, max) = if hist.is_empty() {
                (f64::NAN, f64::NAN, f64::NAN)
            } else {
                (
                    ms(hist.value_at_quantile(0.5)),
                    ms(hist.value_at_quantile(0.99)),
                    ms(hist.max()),
                )
            };
            let relay_lost = lost() - lost_before;
            t.row(vec![
                link.clone(),
                name.to_string(),
                format!("{p50:.1}"),
                format!("{p99:.1}"),
                format!("{max:.1}"),
                format!("{failed}/{sent}"),
                relay_lost.to_string(),
            ]);
            rows.push(
                json!({"loss": loss, "rtt_ms": rtt_ms, "path": name, "p50_ms": p50,
                "p99_ms": p99, "max_ms": max, "failed": failed, "sent": sent,
                "relay_lost": relay_lost, "rounds": rounds}),
            );
        }
    }
    let mut md = format!(
        "{rounds} round(s) of 100 concurrent HTTP/1.1 requests (100 connections to A) per cell, \
         after one warm-up round; 5 s timeout; relay seed {SEED:#x}. \"relay lost\" counts \
         dropped datagrams (UDP) or segments that paid a modelled retransmission (TCP), both \
         directions. The TCP relay cannot make the kernel lose a segment (it terminates TCP), \
         so TCP loss is modelled: a lost segment and everything behind it wait one extra RTT \
         (fast retransmit) or max(200 ms, RTT) (RTO) — an approximation, stated as such.\n\n{}",
        t.markdown()
    );
    if !have_haproxy {
        let _ = writeln!(md, "\n{HAPROXY_MISSING}.");
    }
    Ok(Section {
        scenario: "lossy".into(),
        title: "Lossy link (scenario 5)".into(),
        markdown: md,
        json: json!({"scenario": "lossy", "rows": rows}),
    })
}

/// 100 requests sent at once: the pacer at 100,000 req/s for 1 ms.
fn burst(target: std::net::SocketAddr) -> LoadSpec {
    LoadSpec {
        rate: 100_000,
        duration: Duration::from_millis(1),
        timeout: Duration::from_secs(5),
        connections: 100,
        ..LoadSpec::new(target, AUTHORITY, Protocol::Http1)
    }
}
