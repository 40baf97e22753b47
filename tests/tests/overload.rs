//! Overload at the outbound listener (issue 21, item 6): a flood of caller
//! connections against a real gateway under the shipped memory limit
//! (128 MiB, in a memory cgroup the kernel enforces).
//!
//! Each flooding connection sends the start of a request head and then
//! nothing, the costliest kind of idle caller: it is past protocol
//! detection, so hyper holds its buffers for it until the header timeout.
//! Before the fix, ~5,200 of them OOM-killed a gateway; with no memory
//! limit, 20,000 took every descriptor and `/readyz` stopped answering.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use meshfed_tests::cgroup::{GATEWAY_LIMIT, MemoryCgroup};
use meshfed_tests::federation::*;
use meshfed_tests::soak::{ProcSample, raise_nofile};
use meshfed_tests::{eventually, wait_for};

/// Connections the flood opens: more than twice the default limit.
const FLOOD: usize = 10_000;

/// One GET through the gateway to `ratings`; the status line and body, or
/// why there is none.
fn get(outbound: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&outbound, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    let status = out.lines().next().unwrap_or("").to_string();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if status.contains(" 200 ") && body == "ratings" {
        Ok(status)
    } else {
        Err(format!("answer: {out:?}"))
    }
}

/// A `/readyz` on the admin server within 2 s: its body, or the failure.
fn readyz(gw: &GatewayProcess) -> Result<(), String> {
    let started = Instant::now();
    let body = gw.admin_get("/readyz");
    if body == "ready\n" {
        Ok(())
    } else {
        Err(format!(
            "/readyz answered {body:?} after {:?}",
            started.elapsed()
        ))
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_flood_of_idle_callers_under_128_mib_is_refused_past_the_limit_while_admin_and_real_calls_answer_and_memory_returns()
 {
    // The flood's sockets are this process's; the gateway inherits the
    // raised limit, so descriptors are not what stops it.
    raise_nofile(FLOOD as u64 + 5_000).unwrap_or_else(|e| panic!("{e}"));
    let (backend, _task) = http_backend("ratings").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let port = free_udp_port();
    std::fs::write(policy.join("p.yaml"), cluster_yaml("east", &[port])).unwrap();
    let eps = dir.path().join("eps.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let cg = MemoryCgroup::require("overload", GATEWAY_LIMIT);
    let spec = GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy,
        discovery: Some(eps),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    };
    let launch = Launch {
        prefix: cg.prefix(),
        ..Default::default()
    };
    let gw = GatewayProcess::start_with(&spec, &launch);
    let pid = gw.pid().unwrap();
    let outbound = gw.outbound;

    let result = tokio::task::spawn_blocking(move || {
        // Warm: a few calls, so the baseline includes what serving costs.
        for _ in 0..20 {
            get(outbound).unwrap_or_else(|e| panic!("before the flood: {e}"));
        }
        let baseline = ProcSample::read(pid).unwrap().rss;
        // Checked after the flood: a gateway without a limit fails there
        // for what the flood did to it, not for a missing metric.
        let limit = gw.metric("meshfed_caller_connections_limit", &[]) as usize;
        let call_during_at = if limit > 0 { limit / 2 } else { 1_000 };

        let mut flood = Vec::with_capacity(FLOOD);
        let mut slow_probes = Vec::new();
        // Past the limit a caller may be refused at connect (a full
        // backlog, a reset): that is the limit at work, reported only.
        let mut refused_connects = Vec::new();
        let mut during = None;
        let started = Instant::now();
        for i in 0..FLOOD {
            match TcpStream::connect_timeout(&outbound, Duration::from_secs(2)) {
                Ok(mut s) => {
                    // The start of a head, never finished; a refused
                    // connection may already be reset: that is fine.
                    let _ = s.write_all(b"GET / HTTP/1.1\r\n");
                    flood.push(s);
                }
                Err(e) => refused_connects.push(format!("connect {i}: {e}")),
            }
            if i % 500 == 499 {
                if let Err(e) = readyz(&gw) {
                    slow_probes.push(format!("after {} connections: {e}", i + 1));
                }
                assert!(
                    ProcSample::read(pid).is_ok(),
                    "the gateway died after {} connections (OOM kills: {}); log:\n{}",
                    i + 1,
                    cg.oom_kills(),
                    gw.log_tail()
                );
            }
            // Below the limit, a real call is served beside the idle ones.
            if i == call_during_at {
                during = Some(get(outbound));
            }
        }
        let flood_time = started.elapsed();
        let during_peak = cg.usage();
        let rss_flooded = ProcSample::read(pid).map(|s| s.rss).unwrap_or(0);
        let open = gw.metric("meshfed_caller_connections ", &[]);
        let refused = gw.metric(
            "meshfed_refusals_total",
            &["stage=\"listener\"", "reason=\"connection-limit\""],
        );
        let ready_after = readyz(&gw);

        drop(flood);
        // Every flooding connection closed: the gateway lets go of them,
        // serves again, and gives the memory back.
        eventually(
            "the gateway drops the closed connections",
            Duration::from_secs(30),
            || {
                let n = gw.metric("meshfed_caller_connections ", &[]);
                if n == 0.0 {
                    Ok(())
                } else {
                    Err(format!("{n} still open"))
                }
            },
        );
        let after = get(outbound);
        let settled = wait_for(
            "RSS back near the baseline",
            Duration::from_secs(20),
            || {
                let rss = ProcSample::read(pid)?.rss;
                if rss <= baseline + (16 << 20) {
                    Ok(rss)
                } else {
                    Err(format!("RSS {:.1} MiB", mib(rss)))
                }
            },
        );
        let rss_after = ProcSample::read(pid).map(|s| s.rss).unwrap_or(0);
        eprintln!(
            "flood of {FLOOD} in {flood_time:?}: limit {limit}, open {open}, refused {refused} \
             ({} failed to connect, e.g. {:?}); \
             RSS baseline {:.1} MiB, flooded {:.1} MiB, after {:.1} MiB; cgroup usage flooded \
             {:.1} MiB, peak {:.1} MiB of {:.0}",
            refused_connects.len(),
            refused_connects.first(),
            mib(baseline),
            mib(rss_flooded),
            mib(rss_after),
            mib(during_peak),
            mib(cg.peak()),
            mib(GATEWAY_LIMIT)
        );
        assert_eq!(cg.oom_kills(), 0, "the gateway was OOM-killed");
        assert!(
            (1..FLOOD / 2).contains(&limit),
            "the default caller-connection limit is {limit}; the flood should exceed it twice"
        );
        assert!(
            ProcSample::read(pid).is_ok(),
            "the gateway died; log:\n{}",
            gw.log_tail()
        );
        assert!(
            slow_probes.is_empty(),
            "the admin server failed during the flood: {slow_probes:?}"
        );
        ready_after.unwrap_or_else(|e| panic!("with the listener saturated: {e}"));
        assert!(
            open <= limit as f64,
            "{open} caller connections open, over the limit of {limit}"
        );
        assert!(
            refused >= (FLOOD - limit) as f64 / 2.0,
            "only {refused} connections counted as refused at the limit"
        );
        during
            .expect("no call during the flood")
            .unwrap_or_else(|e| panic!("a call beside {call_during_at} idle connections: {e}"));
        after.unwrap_or_else(|e| panic!("a call after the flood: {e}"));
        settled.unwrap_or_else(|e| {
            panic!(
                "memory not returned after the flood (baseline {:.1} MiB): {e}",
                mib(baseline)
            )
        });
        gw
    })
    .await;
    match result {
        Ok(_gw) => {}
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
