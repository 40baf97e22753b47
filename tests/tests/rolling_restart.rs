//! A rolling restart of the caller's *own* gateways, behind a load balancer
//! that follows readiness late, as a Kubernetes Service does (issue 22,
//! item 1).
//!
//! Callers in `east` reach east's two gateways through one address, a
//! user-space balancer (`support/balancer.rs`) that sends each new
//! connection to a gateway it has seen ready, polling `/readyz` every
//! second: like kube-proxy, it keeps sending new connections to a gateway
//! for up to a poll after its SIGTERM. The calls go on through QUIC to
//! `west`. The gateways are replaced one at a time as a Deployment's
//! rollout does: SIGTERM one, start its replacement, wait, then the other.
//!
//! Two kinds of callers run at once: keep-alive HTTP/1.1 connections (which
//! the drain asks to close) and one new connection per request (what the
//! balancer's lag hits hardest).
//!
//! These run in nextest's `serial` group (their names start with
//! `serial_`): they generate load, and two cores are easily oversubscribed.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/balancer.rs"]
mod balancer;

use std::time::Duration;

use balancer::Balancer;
use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadReport, LoadSpec, Protocol};
use meshfed_tests::wait_for;

/// Each of the two callers' rate (requests per second).
const RATE: u32 = 100;

/// How often the balancer polls readiness: a kubelet's probe period.
const POLL: Duration = Duration::from_secs(1);

/// Polls `check` off the runtime's threads until it holds, or panics.
async fn until(what: &str, within: Duration, check: impl FnMut() -> bool + Send + 'static) {
    let what = what.to_string();
    let mut check = check;
    tokio::task::spawn_blocking(move || {
        meshfed_tests::assert_eventually(&what, within, &mut check);
    })
    .await
    .unwrap();
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// What one rolling restart measured.
struct Rollout {
    keep_alive: LoadReport,
    new_connections: LoadReport,
    balancer: Vec<balancer::BackendView>,
    /// Connections the balancer closed because no gateway was in rotation.
    no_backend: u64,
    exit_codes: Vec<Option<i32>>,
    logs: String,
}

/// Two east gateways behind the balancer, west serving `ratings`; under
/// load, gw-1 and gw-2 are replaced by gw-3 and gw-4, one at a time.
/// `grace`: the east gateways' `--drain-grace` (`None`: the harness's 0s,
/// the drain as it was before the grace existed).
async fn rolling_restart(grace: Option<&str>) -> Rollout {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let west_port = free_udp_port();
    let east_ports: Vec<u16> = (0..4).map(|_| free_udp_port()).collect();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("east", &east_ports),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap();
    let (backend, _backend_task) = http_backend("ratings-west").await;
    let west_eps = dir.path().join("west.yaml");
    discovery_file(&west_eps, &[("ratings.default", vec![(backend, vec![])])]);
    let mut east_args = vec!["--drain-timeout".to_string(), "5s".to_string()];
    if let Some(g) = grace {
        east_args.extend(["--drain-grace".to_string(), g.to_string()]);
    }
    let spec =
        |cluster: &str, id: &str, port: u16, discovery: Option<std::path::PathBuf>| GatewaySpec {
            cluster: cluster.into(),
            id: id.into(),
            tls_dir: pki.gateway(cluster, id),
            policy_dir: policy.clone(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args: if cluster == "east" {
                east_args.clone()
            } else {
                vec![]
            },
        };
    let west_spec = spec("west", "gw-0", west_port, Some(west_eps.clone()));
    let _west = blocking(move || GatewayProcess::start(&west_spec)).await;
    let east_specs: Vec<GatewaySpec> = (0..4)
        .map(|i| spec("east", &format!("gw-{}", i + 1), east_ports[i], None))
        .collect();
    let start = |s: &GatewaySpec| {
        let s = s.clone();
        blocking(move || {
            let g = GatewayProcess::start(&s);
            g.wait_links("west", 1);
            g
        })
    };

    let lb = std::sync::Arc::new(Balancer::start(POLL).await);
    let mut old = vec![start(&east_specs[0]).await, start(&east_specs[1]).await];
    for g in &old {
        lb.add(&g.id, g.outbound, g.admin);
    }
    let l = lb.clone();
    until(
        "the balancer has both gateways in rotation",
        Duration::from_secs(10),
        move || l.in_rotation("gw-1") && l.in_rotation("gw-2"),
    )
    .await;

    let mut keep_alive = LoadSpec::new(lb.addr, "ratings", Protocol::Http1);
    keep_alive.rate = RATE;
    keep_alive.duration = Duration::MAX;
    keep_alive.connections = 16;
    keep_alive.timeout = Duration::from_secs(5);
    let mut new_connections = keep_alive.clone();
    new_connections.headers = vec![("connection".into(), "close".into())];
    new_connections.connections = 64;
    let (stop_a, stop_a_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stop_b_rx) = tokio::sync::oneshot::channel::<()>();
    let load_a = tokio::spawn(load::run_until(keep_alive, stop_a_rx));
    let load_b = tokio::spawn(load::run_until(new_connections, stop_b_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut replacements = Vec::new();
    let mut exit_codes = Vec::new();
    let mut logs = String::new();
    for (i, mut going) in old.drain(..).enumerate() {
        // SIGTERM, as the kubelet sends it when the rollout deletes the
        // pod; the balancer learns of it only from its next poll.
        lb.terminating(&going.id);
        going.signal_term();
        let next = start(&east_specs[i + 2]).await;
        lb.add(&next.id, next.outbound, next.admin);
        let (l, name) = (lb.clone(), next.id.clone());
        until(
            "the replacement is in rotation",
            Duration::from_secs(10),
            move || l.in_rotation(&name),
        )
        .await;
        let code = blocking(move || {
            let code = wait_for("the old gateway exits", Duration::from_secs(40), || {
                going.exited().ok_or("still running")
            })
            .map(|s| s.code())
            .unwrap_or(None);
            (code, going)
        })
        .await;
        exit_codes.push(code.0);
        logs.push_str(&format!("--- {} ---\n{}\n", code.1.id, code.1.log_tail()));
        replacements.push(next);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    let keep_alive = load_a.await.unwrap();
    let new_connections = load_b.await.unwrap();
    Rollout {
        keep_alive,
        new_connections,
        balancer: lb.view(),
        no_backend: lb.no_backend(),
        exit_codes,
        logs,
    }
}

/// With the drain grace, a gateway whose SIGTERM the balancer has not yet
/// seen still accepts and serves every new connection sent to it, and the
/// rollout fails no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_rolling_restart_of_the_callers_own_gateways_behind_a_lagging_balancer_fails_no_request()
 {
    let r = rolling_restart(Some("3s")).await;
    eprintln!(
        "keep-alive callers: {}\nnew connection per request: {}\nbalancer: {:#?}",
        r.keep_alive, r.new_connections, r.balancer
    );
    assert_eq!(r.exit_codes, vec![Some(0), Some(0)], "{}", r.logs);
    assert_eq!(r.keep_alive.failed, 0, "{}", r.keep_alive);
    assert_eq!(r.new_connections.failed, 0, "{}", r.new_connections);
    // The scenario did what it claims: the balancer went on sending new
    // connections to each terminating gateway after its SIGTERM, the
    // replacements took over, and no connection was refused or left
    // without a gateway.
    assert_eq!(r.no_backend, 0);
    for b in &r.balancer {
        assert_eq!(b.refused, 0, "{b:?}");
        assert!(b.connections > 0, "{b:?}");
        if b.name == "gw-1" || b.name == "gw-2" {
            assert!(
                b.after_terminating > 0,
                "the balancer sent {} nothing after SIGTERM: {b:?}",
                b.name
            );
        }
    }
    assert!(r.keep_alive.ok > 0 && r.new_connections.ok > 0);
}

/// The same rollout without the grace (the drain as before: the listeners
/// close about 300 ms after SIGTERM) fails the connections the balancer
/// still sends before its next poll: the behaviour the grace removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_without_the_drain_grace_the_same_rolling_restart_fails_the_connections_the_balancer_still_sends()
 {
    let r = rolling_restart(None).await;
    eprintln!(
        "keep-alive callers: {}\nnew connection per request: {}\nbalancer: {:#?}",
        r.keep_alive, r.new_connections, r.balancer
    );
    assert_eq!(r.exit_codes, vec![Some(0), Some(0)], "{}", r.logs);
    let refused: u64 = r.balancer.iter().map(|b| b.refused).sum();
    assert!(
        refused > 0 && r.new_connections.failed > 0,
        "expected refused connections and failed requests: {}",
        r.new_connections
    );
}
