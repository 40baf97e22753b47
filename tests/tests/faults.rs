//! Faults under open-loop load through real gateways in syncer mode: a peer
//! gateway killed, the syncer down (and a gateway restarted meanwhile),
//! a series of pushes with invalid ones among them, and a rolling restart
//! with SIGTERM drain. The figure each test measures is printed.
//!
//! The rate is [`RATE`], 1,000 requests a second as the issue asks: this
//! 2-core box sustains it with every process (load generator, 3 gateways,
//! syncer, backends) sharing it in a dev build (p99 ≈ 4 ms at 500/s).
//! `MESHFED_FAULTS_RATE` overrides it. These run in nextest's `serial`
//! group.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadReport, LoadSpec, Protocol};
use meshfed_tests::syncer::{PolicyRepo, SyncerProcess, SyncerSpec, syncer_creds};

const RATE: u32 = 1000;

fn rate() -> u32 {
    std::env::var("MESHFED_FAULTS_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(RATE)
}

/// ratings with retries for idempotent failures, and a route timeout that
/// each valid push changes (so each is a real change).
fn routing(timeout_s: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings}}}}
    timeout: {timeout_s}s
    retries: {{attempts: 3, perTryTimeout: 2s, retryOn: 'connect-failure,reset,unavailable,gateway-error'}}
"
    )
}

struct World {
    dir: tempfile::TempDir,
    pki: Pki,
    repo: PolicyRepo,
    syncer: SyncerProcess,
    syncer_spec: SyncerSpec,
    east: GatewayProcess,
    west: Vec<GatewayProcess>,
    west_specs: Vec<GatewaySpec>,
    _backend: tokio::task::JoinHandle<()>,
    head: String,
}

impl World {
    /// east (callers) and west (two gateways, ratings), in syncer mode with
    /// state directories. Returns once the first commit is applied
    /// everywhere and east has both links to west.
    async fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (east_port, west_ports) = (free_udp_port(), [free_udp_port(), free_udp_port()]);
        let repo = PolicyRepo::init(&dir.path().join("repo"));
        let head = repo.commit(
            "federation",
            &[
                (
                    "clusters.yaml",
                    &format!(
                        "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
                        cluster_yaml("east", &[east_port]),
                        cluster_yaml("west", &west_ports)
                    ),
                ),
                ("ratings.yaml", &routing(10)),
            ],
        );
        let mut syncer_spec = SyncerSpec::new(
            &repo.dir,
            &syncer_creds(&pki, "east", "syncer"),
            &dir.path().join("syncer"),
        );
        // A fixed port, so a restarted syncer is where gateways look.
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        syncer_spec.grpc_addr = grpc.local_addr().unwrap().to_string();
        drop(grpc);
        let syncer = SyncerProcess::start(&syncer_spec);
        let (backend, task) = http_backend("ratings-west").await;
        let eps = dir.path().join("west-endpoints.yaml");
        discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
        let spec = |cluster: &str, id: &str, port: u16, discovery: Option<PathBuf>| GatewaySpec {
            cluster: cluster.into(),
            id: id.into(),
            tls_dir: pki.gateway(cluster, id),
            policy_dir: PathBuf::new(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args: vec![
                "--syncer".into(),
                syncer.grpc.to_string(),
                "--syncer-issuer".into(),
                "east".into(),
                "--state-dir".into(),
                dir.path()
                    .join(format!("state-{cluster}-{id}"))
                    .to_string_lossy()
                    .into(),
                "--drain-timeout".into(),
                "10s".into(),
            ],
        };
        let west_specs = vec![
            spec("west", "gw-0", west_ports[0], Some(eps.clone())),
            spec("west", "gw-1", west_ports[1], Some(eps.clone())),
        ];
        let west: Vec<_> = west_specs.iter().map(GatewayProcess::start).collect();
        let east = GatewayProcess::start(&spec("east", "gw-0", east_port, None));
        let out = syncer.status_wait(&head, Duration::from_secs(30));
        assert_eq!(out.code, Some(0), "{out}");
        east.wait_links("west", 2);
        World {
            dir,
            pki,
            repo,
            syncer,
            syncer_spec,
            east,
            west,
            west_specs,
            _backend: task,
            head,
        }
    }

    fn load(
        &self,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<LoadReport>,
    ) {
        let mut spec = LoadSpec::new(self.east.outbound, "ratings", Protocol::Http1);
        spec.rate = rate();
        spec.duration = Duration::MAX;
        spec.connections = 64;
        spec.timeout = Duration::from_secs(10);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(load::run_until(spec, async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    fn push(&mut self, message: &str, files: &[(&str, &str)]) -> String {
        let sha = self.repo.commit(message, files);
        let (code, body) = self.syncer.webhook();
        assert_eq!(code, 202, "{body}");
        sha
    }
}

fn applied_version(gw: &GatewayProcess) -> String {
    let dump: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default();
    dump["applied_version"].as_str().unwrap_or("").to_string()
}

async fn finish(
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<LoadReport>,
) -> LoadReport {
    let _ = stop.send(());
    let report = task.await.unwrap();
    eprintln!("{report}");
    report
}

/// Waits for `condition` without blocking a runtime worker (the load
/// generator shares them).
async fn until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + meshfed_tests::patient(within);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking work (process starts, status waits) off the runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_peer_gateway_killed_under_load_fails_no_idempotent_request_and_is_dropped_within_1s()
 {
    let mut w = World::start().await;
    let (stop, task) = w.load();
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.west[0].kill();
    let killed = Instant::now();
    // When east stops choosing the dead gateway: its link is gone.
    let mut dropped = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if w.east.links_up("west") == 1 {
            dropped = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = finish(stop, task).await;
    let dropped = dropped.expect("east still counts the dead gateway's link after 5 s");
    eprintln!(
        "dead gateway's link dropped after {dropped:?}; {} failed",
        report.failed
    );
    assert_eq!(report.failed, 0, "{report}");
    assert!(
        dropped <= Duration::from_secs(1),
        "link dropped after {dropped:?}"
    );
    assert!(report.ok >= u64::from(rate()) * 4, "{report}");
}

/// The syncer is down for the whole middle of the run; meanwhile a west
/// gateway restarts (SIGTERM drain) and must come back from its persisted
/// snapshot; then the syncer returns, and a new commit reaches everyone.
/// Zero failed requests throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_syncer_down_and_a_gateway_restarted_meanwhile_serves_its_persisted_snapshot_with_zero_failures()
 {
    let mut w = World::start().await;
    let (stop, task) = w.load();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.syncer.terminate(), Some(0));
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(w.west[1].terminate(), Some(0), "{}", w.west[1].log_tail());
    let spec = w.west_specs[1].clone();
    let restarted = blocking(move || GatewayProcess::start(&spec)).await;
    w.west[1] = restarted;
    assert_eq!(
        applied_version(&w.west[1]),
        w.head,
        "served from its state dir"
    );
    let east = w.east.admin_get("/peers");
    until(
        "east relinks the restarted gateway",
        Duration::from_secs(10),
        || w.east.links_up("west") == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let spec = w.syncer_spec.clone();
    w.syncer = blocking(move || SyncerProcess::start(&spec)).await;
    let sha = w.push("after the outage", &[("ratings.yaml", &routing(11))]);
    let syncer_http = w.syncer.url();
    let out = blocking(move || {
        let mut cmd = std::process::Command::new(meshfed_tests::bin("meshfed-syncer"));
        cmd.args([
            "status",
            "--server",
            &syncer_http,
            "--wait",
            &sha,
            "--timeout",
            "30s",
        ]);
        meshfed_tests::run(&mut cmd).unwrap()
    })
    .await;
    let report = finish(stop, task).await;
    assert_eq!(out.code, Some(0), "{out}\n{east}");
    assert_eq!(report.failed, 0, "{report}");
    let _ = (&w.dir, &w.pki);
}

/// 20 pushes under load, 5 of them invalid in different ways: every valid
/// one is applied everywhere, every invalid one is rejected with FILE:LINE
/// and changes nothing, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_twenty_pushes_five_invalid_fail_no_request_and_each_invalid_is_rejected_with_file_line()
 {
    let mut w = World::start().await;
    let invalid = [
        // weights that sum to 90
        routing(10).replace(
            "    - {destination: {host: ratings}}\n",
            "    - {destination: {host: ratings}, weight: 45}\n    - {destination: {host: reviews}, weight: 45}\n",
        ),
        // an unknown field
        routing(10).replace("    timeout:", "    timeout_typo: 1s\n    timeout:"),
        // a malformed duration
        routing(10).replace("timeout: 10s", "timeout: ten seconds"),
        // a subset no DestinationRule defines
        routing(10).replace("{host: ratings}}", "{host: ratings, subset: v9}}"),
        // retries of the wrong type
        routing(10).replace("attempts: 3", "attempts: many"),
    ];
    let (stop, task) = w.load();
    let mut last_good = w.head.clone();
    let mut rejected = 0;
    for i in 0..20u32 {
        let bad = (i % 4 == 3).then(|| invalid[(i / 4) as usize].clone());
        let text = bad.clone().unwrap_or_else(|| routing(12 + i));
        let sha = w.push(&format!("push {i}"), &[("ratings.yaml", &text)]);
        let http = w.syncer.url();
        let wait_sha = sha.clone();
        let out = blocking(move || {
            let mut cmd = std::process::Command::new(meshfed_tests::bin("meshfed-syncer"));
            cmd.args([
                "status",
                "--server",
                &http,
                "--wait",
                &wait_sha,
                "--timeout",
                "30s",
            ]);
            meshfed_tests::run(&mut cmd).unwrap()
        })
        .await;
        if bad.is_some() {
            rejected += 1;
            assert_eq!(out.code, Some(1), "push {i} is rejected: {out}");
            let located = out.stdout.lines().any(|l| {
                l.contains("ratings.yaml:")
                    && l.split(':')
                        .nth(1)
                        .is_some_and(|n| n.trim().parse::<u32>().is_ok())
            });
            assert!(located, "push {i}'s rejection names FILE:LINE: {out}");
            for g in w.west.iter().chain([&w.east]) {
                assert_eq!(applied_version(g), last_good, "push {i} changed nothing");
            }
        } else {
            assert_eq!(out.code, Some(0), "push {i} applies: {out}");
            last_good = sha;
        }
    }
    let report = finish(stop, task).await;
    assert_eq!(rejected, 5);
    assert_eq!(report.failed, 0, "{report}");
}

/// Every gateway of the destination cluster restarts in turn, each with
/// SIGTERM (drain: it announces `draining`, finishes its streams, exits 0)
/// and comes back before the next goes. The caller's own gateway is not
/// rolled here: its callers reach it through one address, and moving them
/// off a draining instance is the job of the Service in front of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_rolling_restart_of_every_destination_gateway_with_sigterm_drain_fails_no_request()
{
    let mut w = World::start().await;
    let (stop, task) = w.load();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..w.west.len() {
        assert_eq!(w.west[i].terminate(), Some(0), "{}", w.west[i].log_tail());
        let spec = w.west_specs[i].clone();
        w.west[i] = blocking(move || GatewayProcess::start(&spec)).await;
        until("east relinks it", Duration::from_secs(15), || {
            w.east.links_up("west") == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let report = finish(stop, task).await;
    assert_eq!(report.failed, 0, "{report}");
}
