//! The real `meshfed-syncer` against hostile repositories, under its
//! shipped memory limit (512 MiB, `deploy/base/syncer.yaml`, enforced by a
//! memory cgroup): issue 21, items 8 (a repository too large to fetch) and
//! 14 (a commit that deletes most of the policy). Repositories are real,
//! made with the `git` CLI; gateways are the harness's light subscribers,
//! which speak the real protocol over mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshfed_tests::cgroup::{MemoryCgroup, SYNCER_LIMIT};
use meshfed_tests::eventually;
use meshfed_tests::federation::{Pki, cluster_yaml, free_udp_port};
use meshfed_tests::syncer::{
    PolicyRepo, SyncerProcess, SyncerSpec, git, spawn_light_subscriber, syncer_creds,
};
use tokio::sync::mpsc;

/// Waits until the subscriber `who` reports an ACK of `commit`.
fn wait_ack(
    rt: &tokio::runtime::Runtime,
    acks: &mut mpsc::UnboundedReceiver<(String, String)>,
    who: &str,
    commit: &str,
) {
    rt.block_on(async {
        tokio::time::timeout(meshfed_tests::patient(Duration::from_secs(30)), async {
            while let Some((w, v)) = acks.recv().await {
                if w == who && v == commit {
                    return;
                }
            }
            panic!("the subscriber stopped");
        })
        .await
        .unwrap_or_else(|_| panic!("{who} never ACKed {commit}"));
    });
}

/// A commit the syncer recorded as rejected, with its reason.
fn rejection(s: &SyncerProcess, commit: &str) -> Result<String, String> {
    let st = s.status();
    st["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["commit"] == commit)
        .and_then(|r| r["reason"].as_str().map(str::to_string))
        .ok_or_else(|| format!("not rejected yet: {st}"))
}

/// `git daemon` serving `base` read-only on a free loopback port, so that
/// a syncer fetches over the network protocol (`git://`), as it would
/// from a Git host; killed on drop.
struct GitDaemon {
    child: Child,
    port: u16,
}

impl GitDaemon {
    fn start(base: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon (the git CLI) is needed for this test");
        let d = GitDaemon { child, port };
        eventually("git daemon listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", d.port)).map(|_| ())
        });
        d
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 21, item 8: a 360 MB incompressible blob pushed after a good
/// commit OOM-killed the syncer at its 512 MiB limit, and it crash-looped
/// since it fetches again at start. Now, from a local remote (where libgit2
/// packs in-process) and over `git://`, under the shipped limit: the fetch
/// is refused, the syncer stays alive, a subscriber still gets the previous
/// commit, `status` says which commit and why, and a restart does the same
/// without an OOM kill.
#[test]
fn serial_a_360_mb_blob_after_a_good_commit_is_refused_under_the_syncer_limit_and_survives_restart()
{
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let creds = syncer_creds(&pki, "east", "syncer");
    let repo = PolicyRepo::init(&tmp.path().join("repos/policy"));
    let good = repo.commit(
        "clusters",
        &[("clusters.yaml", &cluster_yaml("east", &[free_udp_port()]))],
    );
    let daemon = GitDaemon::start(&tmp.path().join("repos"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    meshfed_gateway::identity::install_crypto_provider();
    let gw = pki.gateway("east", "gw-1");

    let remotes = [
        ("local", repo.dir.to_string_lossy().to_string()),
        ("git", format!("git://127.0.0.1:{}/policy", daemon.port)),
    ];
    let mut running = Vec::new();
    for (name, url) in &remotes {
        let cg = MemoryCgroup::require(&format!("syncer-{name}"), SYNCER_LIMIT);
        let mut spec = SyncerSpec::new(Path::new(url), &creds, &tmp.path().join(name));
        spec.prefix = cg.prefix();
        let s = SyncerProcess::start(&spec);
        let (tx, mut acks) = mpsc::unbounded_channel();
        let sub = rt.block_on(async {
            spawn_light_subscriber(s.grpc, gw.clone(), "east".into(), "gw-1".into(), tx)
        });
        wait_ack(&rt, &mut acks, "east/gw-1", &good);
        sub.abort();
        running.push((name, cg, spec, s));
    }

    // 360 MB of random bytes (no compression can shrink them), stored
    // uncompressed so that making the commit is quick.
    let blob = repo.dir.join("assets/blob.bin");
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    let out = Command::new("head")
        .args(["-c", "360M", "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&blob, &out.stdout).unwrap();
    drop(out);
    git(
        &repo.dir,
        &[
            "-c",
            "core.compression=0",
            "-c",
            "core.looseCompression=0",
            "add",
            "-A",
        ],
    );
    git(&repo.dir, &["commit", "-q", "-m", "a large binary"]);
    let big = git(&repo.dir, &["rev-parse", "HEAD"]);

    for (name, cg, spec, s) in &mut running {
        for round in ["running", "restarted"] {
            if round == "restarted" {
                assert_eq!(s.terminate(), Some(0), "{name}: {}", s.log_text());
                *s = SyncerProcess::start(spec);
            } else {
                s.webhook();
            }
            let reason = eventually(
                &format!("{name} syncer ({round}) refuses {big}"),
                Duration::from_secs(120),
                || rejection(s, &big),
            );
            assert!(
                reason.contains("--max-fetch-bytes") && reason.contains(&big),
                "{name}: {reason}"
            );
            let st = s.status();
            assert_eq!(st["last_good"]["commit"], good, "{name} ({round}): {st}");
            assert_eq!(st["last_fetch"]["ok"], false, "{name} ({round}): {st}");
            assert_eq!(cg.oom_kills(), 0, "{name} ({round}): OOM-killed");
            // A gateway subscribing now still gets the last good commit.
            let (tx, mut acks) = mpsc::unbounded_channel();
            let who = format!("gw-{round}");
            let sub = rt.block_on(async {
                spawn_light_subscriber(s.grpc, gw.clone(), "east".into(), who.clone(), tx)
            });
            wait_ack(&rt, &mut acks, &format!("east/{who}"), &good);
            sub.abort();
        }
        let peak = cg.peak();
        eprintln!(
            "{name} remote: peak memory {} MiB of {} MiB (page cache included)",
            peak >> 20,
            SYNCER_LIMIT >> 20
        );
        assert_eq!(cg.oom_kills(), 0, "{name}: OOM-killed");
        assert!(s.pid().is_some(), "{name}: the syncer exited");
        assert_eq!(
            s.get("/healthz").0,
            200,
            "{name}: the syncer stopped answering"
        );
    }
}
