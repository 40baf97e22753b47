//! The syncer under load and under failure, end to end: the real
//! `meshfed-syncer` following a real Git repository (commits made with the
//! `git` CLI, each triggered by a GitHub-signed webhook), three real
//! `meshfed-gateway` processes in syncer mode (clusters east, west and
//! edge), real backends, and open-loop load through east's outbound
//! listener. `meshfed-syncer status --wait` is the judge of every rollout.
//!
//! These run in nextest's `serial` group (names start with `serial_`): they
//! generate load or measure detection deadlines, and two cores are easily
//! oversubscribed.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshfed_tests::federation::{
    GatewayProcess, GatewaySpec, Pki, cluster_yaml, discovery_file, free_udp_port, http_backend,
};
use meshfed_tests::load::{self, LoadReport, LoadSpec, Protocol};
use meshfed_tests::syncer::{
    PolicyRepo, SyncerProcess, SyncerSpec, http_exchange, signal, syncer_creds,
};
use meshfed_tests::{Outcome, eventually, patient};

const RATE: u32 = 300;

/// ratings routed to one cluster's subset (east or west).
fn routing(to: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  subsets:
  - {{name: east, labels: {{topology.istio.io/cluster: east}}}}
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: {to}}}}}
"
    )
}

/// ratings split 45/45: the weights sum to 90, an error at line 18 (the
/// route list; the syncer must reject the whole commit).
fn bad_routing() -> String {
    routing("west").replace(
        "    - {destination: {host: ratings, subset: west}}\n",
        "    - {destination: {host: ratings, subset: west}, weight: 45}\n    - {destination: {host: ratings, subset: east}, weight: 45}\n",
    )
}

struct World {
    _dir: tempfile::TempDir,
    repo: PolicyRepo,
    syncer: SyncerProcess,
    /// east, west, edge.
    gateways: Vec<GatewayProcess>,
    rt: tokio::runtime::Runtime,
    _backends: Vec<tokio::task::JoinHandle<()>>,
    /// The commit every gateway applied at start.
    initial: String,
}

impl World {
    /// Three clusters with one gateway each; ratings runs in east and west
    /// (exported from both) and is routed to `route_to`. Returns once the
    /// first commit is live everywhere and east's link to west is up.
    fn start(route_to: &str, syncer_args: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let syncer_tls = syncer_creds(&pki, "east", "syncer");
        let clusters = ["east", "west", "edge"];
        let ports: Vec<u16> = clusters.iter().map(|_| free_udp_port()).collect();
        let repo = PolicyRepo::init(&dir.path().join("repo"));
        let mut declared = String::new();
        for (c, p) in clusters.iter().zip(&ports) {
            declared.push_str(&cluster_yaml(c, &[*p]));
        }
        declared.push_str(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n",
        );
        let initial = repo.commit(
            "federation",
            &[
                ("clusters.yaml", &declared),
                ("ratings.yaml", &routing(route_to)),
            ],
        );

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (east_backend, t1) = rt.block_on(http_backend("ratings-east"));
        let (west_backend, t2) = rt.block_on(http_backend("ratings-west"));

        let mut spec = SyncerSpec::new(&repo.dir, &syncer_tls, &dir.path().join("syncer"));
        spec.extra_args = syncer_args.iter().map(|s| s.to_string()).collect();
        let syncer = SyncerProcess::start(&spec);

        let gateways: Vec<GatewayProcess> = clusters
            .iter()
            .zip(&ports)
            .map(|(c, p)| {
                let discovery = match *c {
                    "east" => Some(east_backend),
                    "west" => Some(west_backend),
                    _ => None,
                }
                .map(|backend| {
                    let f = dir.path().join(format!("{c}-endpoints.yaml"));
                    discovery_file(&f, &[("ratings.default", vec![(backend, vec![])])]);
                    f
                });
                GatewayProcess::start(&GatewaySpec {
                    cluster: c.to_string(),
                    id: "gw-0".into(),
                    tls_dir: pki.gateway(c, "gw-0"),
                    policy_dir: PathBuf::new(),
                    discovery,
                    tunnel_port: *p,
                    work_dir: dir.path().to_path_buf(),
                    extra_args: vec![
                        "--syncer".into(),
                        syncer.grpc.to_string(),
                        "--syncer-issuer".into(),
                        "east".into(),
                        "--state-dir".into(),
                        dir.path()
                            .join(format!("state-{c}"))
                            .to_string_lossy()
                            .into(),
                    ],
                })
            })
            .collect();
        let out = syncer.status_wait(&initial, Duration::from_secs(30));
        assert_eq!(out.code, Some(0), "{out}");
        gateways[0].wait_links("west", 1);
        World {
            _dir: dir,
            repo,
            syncer,
            gateways,
            rt,
            _backends: vec![t1, t2],
            initial,
        }
    }

    fn east(&self) -> &GatewayProcess {
        &self.gateways[0]
    }

    fn gateway(&self, cluster: &str) -> &GatewayProcess {
        self.gateways.iter().find(|g| g.cluster == cluster).unwrap()
    }

    /// Commits `files` and sends the signed webhook; returns the SHA.
    fn push(&self, message: &str, files: &[(&str, &str)]) -> String {
        let sha = self.repo.commit(message, files);
        let (code, body) = self.syncer.webhook();
        assert_eq!(code, 202, "the signed webhook requests a sync: {body}");
        sha
    }

    fn wait(&self, sha: &str) -> Outcome {
        self.syncer.status_wait(sha, Duration::from_secs(30))
    }

    /// Starts open-loop load through east's outbound listener until the
    /// returned sender is dropped or fired.
    fn load(
        &self,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<LoadReport>,
    ) {
        let mut spec = LoadSpec::new(self.east().outbound, "ratings", Protocol::Http1);
        spec.rate = RATE;
        spec.duration = Duration::MAX;
        spec.connections = 32;
        spec.timeout = Duration::from_secs(5);
        spec.tally_header = Some("x-served-by".into());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = self.rt.spawn(load::run_until(spec, async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    fn applied_version(&self, gw: &GatewayProcess) -> String {
        let dump: serde_json::Value =
            serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default();
        dump["applied_version"].as_str().unwrap_or("").to_string()
    }
}

/// `x-served-by` of `n` fresh requests through east's outbound listener.
fn served_by(east: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let (code, body) = http_exchange(
                east,
                "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n",
            );
            assert_eq!(code, 200, "{body}");
            body
        })
        .collect()
}

/// Gateways in the rollout table with `state` (`applied`, `pending`,
/// `nacked`): `cluster/gateway` for each row.
fn rows_in(out: &Outcome, state: &str) -> Vec<String> {
    out.stdout
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some(state))
        .map(|l| {
            let mut w = l.split_whitespace();
            format!("{}/{}", w.next().unwrap(), w.next().unwrap())
        })
        .collect()
}

fn finish(
    w: &World,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<LoadReport>,
) -> LoadReport {
    let _ = stop.send(());
    let report = w.rt.block_on(task).unwrap();
    eprintln!("{report}");
    report
}

#[test]
fn serial_under_load_a_commit_reroutes_everywhere_a_bad_one_changes_nothing_and_the_next_applies_with_zero_failures()
 {
    let w = World::start("east", &[]);
    let (stop, task) = w.load();
    // Traffic flows to east's local subset first.
    eventually("load reaches ratings-east", Duration::from_secs(10), || {
        let who = served_by(w.east().outbound, 1);
        if who == ["ratings-east"] {
            Ok(())
        } else {
            Err(format!("{who:?}"))
        }
    });

    // (a) A good commit moves ratings to west: live on all three gateways,
    // and east's requests go to west from then on.
    let to_west = w.push("ratings to west", &[("ratings.yaml", &routing("west"))]);
    let t = Instant::now();
    let out = w.wait(&to_west);
    eprintln!("webhook → status --wait for 3 gateways: {:?}", t.elapsed());
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(rows_in(&out, "applied").len(), 3, "{out}");
    assert!(
        served_by(w.east().outbound, 20)
            .iter()
            .all(|b| b == "ratings-west"),
        "after the rollout east routes ratings to west"
    );

    // (b) A bad commit: rejected with FILE:LINE in /status and in `status
    // --wait` (exit 1); every gateway keeps the last good commit.
    let bad = w.push("weights sum to 90", &[("ratings.yaml", &bad_routing())]);
    let out = w.wait(&bad);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("REJECTED"), "{out}");
    assert!(out.stdout.contains("ratings.yaml:"), "{out}");
    let status = w.syncer.status();
    let rejected = &status["rejected"][0];
    assert_eq!(rejected["commit"], bad.as_str(), "{status}");
    let diag = rejected["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["severity"] == "error")
        .unwrap_or_else(|| panic!("an error diagnostic: {rejected}"));
    assert_eq!(diag["file"], "ratings.yaml", "{diag}");
    assert!(diag["line"].as_u64().unwrap() > 1, "{diag}");
    assert_eq!(status["last_good"]["commit"], to_west.as_str());
    for g in &w.gateways {
        assert_eq!(
            w.applied_version(g),
            to_west,
            "{} keeps the last good",
            g.cluster
        );
    }
    assert!(
        served_by(w.east().outbound, 20)
            .iter()
            .all(|b| b == "ratings-west")
    );

    // (c) The next good commit (back to east) applies everywhere.
    let to_east = w.push(
        "ratings back to east",
        &[("ratings.yaml", &routing("east"))],
    );
    let out = w.wait(&to_east);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(rows_in(&out, "applied").len(), 3, "{out}");
    assert!(
        served_by(w.east().outbound, 20)
            .iter()
            .all(|b| b == "ratings-east")
    );
    // The three rollouts take well under a second here; keep the load on
    // the final config for a second too (load duration, not a wait).
    std::thread::sleep(Duration::from_secs(1));

    let report = finish(&w, stop, task);
    assert_eq!(
        report.failed, 0,
        "zero failed requests across it all: {report}"
    );
    let by = |name: &str| report.responses_by_header.get(name).copied().unwrap_or(0);
    assert!(by("ratings-east") > 0 && by("ratings-west") > 0, "{report}");
    assert!(
        report.sent >= u64::from(RATE),
        "load ran throughout (at least a second's worth): {report}"
    );
}

/// Why a gateway built from this very tree NACKs what the syncer accepted:
/// the policy validator compiles a regex under the gateway's 1 MiB program
/// limit only when it has a counted repetition (`{`) or is over 256 bytes,
/// so 40 `\w` (80 bytes; ~1.3 MiB as a Unicode program) passes validation
/// and fails to activate at the gateway. That gap is a validator bug; once
/// it is closed, this commit is rejected instead and the assertion on the
/// NACK below fails with the rejection: pick another cause (or craft the
/// snapshot in process, as syncer/tests/delivery.rs does with schema 2).
fn oversized_regex_for_west() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, annotations: {{meshfed.io/clusters: west}}}}
spec:
  hosts: [reviews]
  http:
  - match: [{{uri: {{regex: '{}'}}}}]
    route:
    - destination: {{host: reviews}}
",
        r"\w".repeat(40)
    )
}

#[test]
fn serial_a_gateway_that_cannot_activate_a_commit_nacks_it_in_status_while_the_others_apply_it_under_load()
 {
    let w = World::start("west", &[]);
    let (stop, task) = w.load();

    // Only west's snapshot carries the regex: west NACKs, east and edge apply.
    let c = w.push(
        "an oversized regex for west",
        &[("reviews.yaml", &oversized_regex_for_west())],
    );
    let out = w.wait(&c);
    assert_eq!(
        out.code,
        Some(1),
        "status --wait fails on the NACK (if REJECTED: the validator now catches the regex; \
         see oversized_regex_for_west): {out}"
    );
    assert!(out.stdout.contains("NACKED"), "{out}");
    assert_eq!(rows_in(&out, "nacked"), ["west/gw-0"], "{out}");
    let mut applied = rows_in(&out, "applied");
    applied.sort();
    assert_eq!(applied, ["east/gw-0", "edge/gw-0"], "{out}");
    let west = w.syncer.gateway("west", "gw-0").unwrap();
    assert_eq!(west["nack_version"], c.as_str(), "{west}");
    assert!(
        west["nack_reason"].as_str().unwrap().contains("size limit"),
        "the reason is the gateway's: {west}"
    );
    assert_eq!(
        west["applied"],
        w.initial.as_str(),
        "west keeps its previous snapshot: {west}"
    );
    assert_eq!(w.applied_version(w.gateway("west")), w.initial);
    assert_eq!(w.applied_version(w.gateway("east")), c);
    assert_eq!(w.applied_version(w.gateway("edge")), c);
    assert!(
        served_by(w.east().outbound, 20)
            .iter()
            .all(|b| b == "ratings-west")
    );

    // A fix applies everywhere and clears the NACK.
    let fixed = w.push("drop the regex", &[("reviews.yaml", "")]);
    let out = w.wait(&fixed);
    assert_eq!(out.code, Some(0), "{out}");
    let west = w.syncer.gateway("west", "gw-0").unwrap();
    assert!(west["nack_reason"].is_null(), "{west}");
    // Load on the final config for a second too (load duration, not a wait).
    std::thread::sleep(Duration::from_secs(1));

    let report = finish(&w, stop, task);
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(
        report.responses_by_header.get("ratings-west").copied(),
        Some(report.ok),
        "{report}"
    );
}

#[test]
fn serial_a_killed_and_a_frozen_gateway_are_marked_disconnected_within_the_keepalive_bound_and_status_wait_names_them()
 {
    // Keep-alive 1 s + 1 s: a gateway that stops answering is disconnected
    // within 2 s (the default 5 s + 5 s would miss the deadline below).
    let bound = Duration::from_secs(2);
    let w = World::start(
        "east",
        &["--keepalive-interval", "1s", "--keepalive-timeout", "1s"],
    );
    let edge_pid = w.gateway("edge").pid().unwrap();
    let west_pid = w.gateway("west").pid().unwrap();

    // SIGKILL edge (its kernel closes the socket) and SIGSTOP west (its
    // connection stays open and silent: only the keep-alive can tell).
    let t = Instant::now();
    signal(edge_pid, "KILL");
    signal(west_pid, "STOP");
    let mut detected = Vec::new();
    for cluster in ["edge", "west"] {
        eventually(
            &format!("{cluster} marked disconnected"),
            bound + Duration::from_secs(4),
            || match w.syncer.gateway(cluster, "gw-0") {
                Some(g) if g["connected"] == false => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        detected.push((cluster, t.elapsed()));
    }
    eprintln!("disconnect detected after: {detected:?} (bound {bound:?})");
    assert_eq!(
        w.syncer.gateway("east", "gw-0").unwrap()["connected"],
        true,
        "east is unaffected"
    );

    // A new commit: east applies it; the two others are known, so pending,
    // and `status --wait` times out with exit 3 naming them.
    let c = w.push("a new commit", &[("ratings.yaml", &routing("west"))]);
    let out = w.syncer.status_wait(&c, patient(Duration::from_secs(3)));
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(rows_in(&out, "applied"), ["east/gw-0"], "{out}");
    let mut pending = rows_in(&out, "pending");
    pending.sort();
    assert_eq!(pending, ["edge/gw-0", "west/gw-0"], "{out}");
    assert!(out.stdout.contains("disconnected"), "{out}");
    assert!(
        out.stderr.contains("edge/gw-0") && out.stderr.contains("west/gw-0"),
        "the timeout message names them: {out}"
    );

    // West thaws: it reconnects and applies the commit; edge stays pending.
    signal(west_pid, "CONT");
    eventually(
        "west applies the commit after SIGCONT",
        Duration::from_secs(30),
        || match w.syncer.gateway("west", "gw-0") {
            Some(g) if g["connected"] == true && g["applied"] == c.as_str() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let out = w.syncer.status_wait(&c, Duration::from_secs(1));
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(rows_in(&out, "pending"), ["edge/gw-0"], "{out}");
}
