//! Issue 22, item 9: a Kubernetes rollout gives every new gateway pod a new
//! name, so the old pods' gateway ids never come back. The real
//! `meshfed-syncer` and real `meshfed-gateway` processes in syncer mode,
//! judged by `meshfed-syncer status --wait`, `/status` and the records file:
//!
//! - a gateway stopped with SIGTERM drains and says goodbye: `status --wait`
//!   stops waiting for it at once (it is listed as left), while one killed
//!   with SIGKILL says nothing and stays pending for the known window; a
//!   gateway that comes back with the same id is known again;
//! - records of gateways gone longer than `--forget-gateways-after` are
//!   removed from memory and from `gateways.json`, across a restart of the
//!   syncer, while a connected gateway's record stays.
//!
//! (A goodbye forged for another gateway's id is refused: syncer/tests/delivery.rs,
//! `a_goodbye_retires_only_the_streams_own_record`, where a raw client can
//! send one.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshfed_tests::federation::{GatewayProcess, GatewaySpec, Pki, cluster_yaml, free_udp_port};
use meshfed_tests::syncer::{PolicyRepo, SyncerProcess, SyncerSpec, syncer_creds};
use meshfed_tests::{assert_eventually, eventually};

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n";

struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    repo: PolicyRepo,
    syncer_creds: PathBuf,
    /// One tunnel port per gateway (they share the loopback address), all
    /// listed in the Cluster.
    ports: Vec<u16>,
    first: String,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new(&dir);
        let syncer_creds = syncer_creds(&pki, "east", "syncer");
        let ports: Vec<u16> = (0..4).map(|_| free_udp_port()).collect();
        let repo = PolicyRepo::init(&dir.join("repo"));
        let first = repo.commit(
            "clusters",
            &[("clusters.yaml", &cluster_yaml("east", &ports))],
        );
        World {
            _tmp: tmp,
            dir,
            pki,
            repo,
            syncer_creds,
            ports,
            first,
        }
    }

    fn syncer(&self, grpc_addr: &str, extra: &[&str]) -> SyncerProcess {
        let mut spec =
            SyncerSpec::new(&self.repo.dir, &self.syncer_creds, &self.dir.join("syncer"));
        spec.grpc_addr = grpc_addr.to_string();
        spec.extra_args = extra.iter().map(|s| s.to_string()).collect();
        SyncerProcess::start(&spec)
    }

    fn records_file(&self) -> PathBuf {
        self.dir.join("syncer/syncer-state/gateways.json")
    }

    /// A gateway of `east` in syncer mode on the `n`th tunnel port; each id
    /// has its own certificate.
    fn gateway(&self, n: usize, id: &str, syncer: &SyncerProcess) -> GatewayProcess {
        let creds = self.dir.join("creds").join(format!("east-{id}"));
        if !creds.exists() {
            self.pki.gateway("east", id);
        }
        let work = self.dir.join(format!("gw-{id}"));
        std::fs::create_dir_all(&work).unwrap();
        GatewayProcess::start(&GatewaySpec {
            cluster: "east".into(),
            id: id.into(),
            tls_dir: creds,
            policy_dir: PathBuf::new(),
            discovery: None,
            tunnel_port: self.ports[n],
            work_dir: work,
            extra_args: vec![
                "--syncer".into(),
                syncer.grpc.to_string(),
                "--syncer-issuer".into(),
                "east".into(),
            ],
        })
    }
}

/// `(exit code, output)` of `status --wait SHA --timeout T`.
fn wait(s: &SyncerProcess, sha: &str, timeout: Duration) -> (Option<i32>, String) {
    let out = s.status_wait(sha, timeout);
    (out.code, format!("{}{}", out.stdout, out.stderr))
}

fn record_ids(file: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    doc["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["gateway_id"].as_str().unwrap_or("").to_string())
        .collect()
}

fn left_ids(s: &SyncerProcess) -> Vec<String> {
    s.status()["clusters"]["east"]["left"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["gateway_id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_drained_gateway_says_goodbye_and_is_not_pending_while_a_killed_one_stays_pending() {
    let w = World::new();
    let syncer = w.syncer("127.0.0.1:0", &[]);
    let mut old = w.gateway(0, "gw-old-pod", &syncer);
    let mut killed = w.gateway(1, "gw-killed-pod", &syncer);
    let _new = w.gateway(2, "gw-new-pod", &syncer);
    let (code, out) = wait(&syncer, &w.first, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    let second = w.repo.commit("a route", &[("vs.yaml", VS)]);
    assert_eq!(syncer.webhook().0, 202);
    let (code, out) = wait(&syncer, &second, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");

    // The rollout's old pod: SIGTERM, drain, goodbye, exit.
    assert_eq!(old.terminate(), Some(0), "{}", old.log_tail());
    // Right after: the drained gateway is not waited for.
    let (code, out) = wait(&syncer, &second, Duration::from_secs(3));
    assert_eq!(
        code,
        Some(0),
        "status --wait still waits for the gateway that drained:\n{out}"
    );
    assert!(
        old.log_tail().contains("said goodbye to the syncer"),
        "{}",
        old.log_tail()
    );
    assert!(
        out.contains("east/gw-old-pod left at"),
        "the table should say the drained gateway left:\n{out}"
    );
    assert_eq!(left_ids(&syncer), ["gw-old-pod"]);
    assert!(
        syncer.gateway("east", "gw-old-pod").is_none(),
        "listed among the known gateways: {}",
        syncer.status()
    );

    // A gateway killed without a drain says nothing: pending until the
    // known window (10 min) passes.
    killed.kill();
    assert_eventually(
        "the syncer sees the killed gateway disconnect",
        Duration::from_secs(20),
        || {
            syncer
                .gateway("east", "gw-killed-pod")
                .is_some_and(|g| g["connected"] == false)
        },
    );
    let (code, out) = wait(&syncer, &second, Duration::from_secs(1));
    assert_eq!(
        code,
        Some(3),
        "the killed gateway must stay pending:\n{out}"
    );
    assert!(
        out.contains("pending: east/gw-killed-pod"),
        "the pending gateway is named:\n{out}"
    );
    assert!(!out.contains("gw-old-pod,"), "{out}");

    // The same id back (a StatefulSet pod, a restarted edge gateway): known
    // again, no longer listed as left.
    let _back = w.gateway(0, "gw-old-pod", &syncer);
    assert_eventually(
        "the returning gateway is known and connected again",
        Duration::from_secs(20),
        || {
            syncer
                .gateway("east", "gw-old-pod")
                .is_some_and(|g| g["connected"] == true)
                && left_ids(&syncer).is_empty()
        },
    );
    assert_eq!(
        syncer
            .metrics()
            .lines()
            .find(|l| l.starts_with("meshfed_syncer_goodbyes_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()),
        Some(1.0)
    );
}

#[test]
fn records_of_gateways_gone_longer_than_forget_gateways_after_are_pruned_across_a_restart() {
    let w = World::new();
    // A fixed gRPC port: the connected gateway finds the restarted syncer.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let grpc = format!("127.0.0.1:{port}");
    let mut syncer = w.syncer(
        &grpc,
        &["--known-window", "1s", "--forget-gateways-after", "1h"],
    );
    let mut gone = w.gateway(0, "gw-gone", &syncer);
    let _live = w.gateway(1, "gw-live", &syncer);
    let (code, out) = wait(&syncer, &w.first, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    gone.kill();
    let file = w.records_file();
    assert_eventually(
        "both records are in gateways.json, gw-gone disconnected",
        Duration::from_secs(20),
        || {
            syncer
                .gateway("east", "gw-gone")
                .is_none_or(|g| g["connected"] == false)
                && record_ids(&file) == ["gw-gone", "gw-live"]
        },
    );
    // Well past the known window, far from the 1 h limit: kept.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(record_ids(&file), ["gw-gone", "gw-live"]);
    assert_eq!(syncer.terminate(), Some(0), "{}", syncer.log_text());
    assert_eq!(
        record_ids(&file),
        ["gw-gone", "gw-live"],
        "a syncer stopped before the limit keeps the record"
    );

    // Restarted with a 2 s limit: the record gone for > 3 s is removed,
    // from memory and from the file; the connected gateway's stays.
    let syncer = w.syncer(
        &grpc,
        &["--known-window", "1s", "--forget-gateways-after", "2s"],
    );
    assert_eventually(
        "gw-gone's record is pruned from gateways.json",
        Duration::from_secs(20),
        || record_ids(&file) == ["gw-live"],
    );
    let logged = eventually("the prune is logged", Duration::from_secs(10), || {
        let log = syncer.log_text();
        if log.contains("forgot the records of gateways gone longer than") {
            Ok(log)
        } else {
            Err("not yet")
        }
    });
    assert!(logged.contains("east/gw-gone"), "{logged}");
    assert_eventually(
        "gw-live reconnects to the restarted syncer",
        Duration::from_secs(30),
        || {
            syncer
                .gateway("east", "gw-live")
                .is_some_and(|g| g["connected"] == true)
        },
    );
    // Connected for longer than the limit: never pruned.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(record_ids(&file), ["gw-live"]);
}
