//! The real `meshfed-syncer` and `meshfed-gateway` against hostile
//! repositories and policy directories, under their shipped memory limits
//! (512 MiB and 128 MiB, `deploy/base/`, enforced by memory cgroups): issue
//! 21, items 8 (a repository too large to fetch) and 12 (alias bombs spread
//! over several files); and issue 16's Git remote that never answers. Repositories are real, made with the `git` CLI;
//! the syncer's gateways are the harness's light subscribers, which speak
//! the real protocol over mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshfed_tests::cgroup::{GATEWAY_LIMIT, MemoryCgroup, SYNCER_LIMIT};
use meshfed_tests::eventually;
use meshfed_tests::federation::{
    GatewayProcess, GatewaySpec, Launch, Pki, cluster_yaml, free_udp_port,
};
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
    meshfed_identity::install_crypto_provider();
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
        let sub = {
            let _rt = rt.enter();
            spawn_light_subscriber(s.grpc, gw.clone(), "east".into(), "gw-1".into(), tx)
        };
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
            let sub = {
                let _rt = rt.enter();
                spawn_light_subscriber(s.grpc, gw.clone(), "east".into(), who.clone(), tx)
            };
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

/// A 1 KB file of a skipped kind (ConfigMap) whose aliases expand to about
/// 568,000 YAML nodes: alone, it fits the per-commit budget of 600,000
/// (and is skipped with a warning); two of them do not.
fn alias_bomb(name: &str) -> String {
    let mut s = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata:\n");
    s.push_str("  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..5 {
        let p = format!("*a{}", i - 1);
        s.push_str(&format!(
            "  a{i}: &a{i} [{}]\n",
            [p.as_str(); 10].join(", ")
        ));
    }
    s.push_str("  a5: [*a4, *a4, *a4, *a4]\n");
    s
}

/// Issue 21, item 12: the alias-bomb budget was 2,000,000 nodes per file,
/// so five 1 KB files took the syncer to 502 of its 512 MiB and one file
/// OOM-killed a gateway in file mode. The budget is now per commit (all
/// files together) and sized for the gateway's limit: a gateway loading
/// `--policy-dir` under 128 MiB and the syncer under 512 MiB both refuse
/// five bombs with a clear diagnostic, keep their last good config, and
/// survive.
#[test]
fn serial_five_alias_bombs_are_refused_by_a_file_mode_gateway_and_the_syncer_under_their_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let port = free_udp_port();
    let clusters = cluster_yaml("east", &[port]);
    let bombs: Vec<(String, String)> = (0..5)
        .map(|i| (format!("bomb-{i}.yaml"), alias_bomb(&format!("bomb-{i}"))))
        .collect();
    assert!(bombs[0].1.len() < 1024, "{}", bombs[0].1.len());

    // The gateway, from a policy directory.
    let dir = tmp.path().join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("clusters.yaml"), &clusters).unwrap();
    let gcg = MemoryCgroup::require("gateway-bombs", GATEWAY_LIMIT);
    let gw = GatewayProcess::start_with(
        &GatewaySpec {
            cluster: "east".into(),
            id: "gw-1".into(),
            tls_dir: pki.gateway("east", "gw-1"),
            policy_dir: dir.clone(),
            discovery: None,
            tunnel_port: port,
            work_dir: tmp.path().to_path_buf(),
            extra_args: Vec::new(),
        },
        &Launch {
            prefix: gcg.prefix(),
            ..Launch::default()
        },
    );
    let dump = |gw: &GatewayProcess| -> serde_json::Value {
        serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default()
    };
    let before = dump(&gw)["applied_version"].clone();
    assert!(before.is_string(), "{}", dump(&gw));
    for (name, text) in &bombs {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let log = tmp.path().join("east-gw-1.log");
    let refused = eventually(
        "the gateway refuses the bombs",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.contains("policy edit refused") && text.contains("600000 nodes"))
                .then_some(text)
                .ok_or_else(|| gw.log_tail())
        },
    );
    assert!(refused.contains("bomb-"), "{refused}");
    assert_eq!(gcg.oom_kills(), 0, "the gateway was OOM-killed");
    assert_eq!(gw.admin_get("/readyz").trim(), "ready");
    assert_eq!(
        dump(&gw)["applied_version"],
        before,
        "the last good policy stays"
    );
    eprintln!(
        "gateway --policy-dir, five alias bombs: peak memory {} MiB of {} MiB",
        gcg.peak() >> 20,
        GATEWAY_LIMIT >> 20
    );

    // The syncer, from a Git repository.
    let creds = syncer_creds(&pki, "east", "syncer");
    let repo = PolicyRepo::init(&tmp.path().join("repo"));
    let good = repo.commit("clusters", &[("clusters.yaml", &clusters)]);
    let scg = MemoryCgroup::require("syncer-bombs", SYNCER_LIMIT);
    let mut spec = SyncerSpec::new(&repo.dir, &creds, &tmp.path().join("syncer"));
    spec.prefix = scg.prefix();
    let s = SyncerProcess::start(&spec);
    eventually("the good commit accepted", Duration::from_secs(30), || {
        let st = s.status();
        (st["last_good"]["commit"] == good).then_some(()).ok_or(st)
    });
    let files: Vec<(&str, &str)> = bombs
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let bad = repo.commit("five bombs", &files);
    s.webhook();
    let diags = eventually(
        "the syncer rejects the bombs",
        Duration::from_secs(60),
        || {
            let st = s.status();
            st["rejected"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["commit"] == bad)
                .map(|r| r["diagnostics"].to_string())
                .ok_or(st)
        },
    );
    assert!(
        diags.contains("yaml-limit") && diags.contains("600000 nodes"),
        "{diags}"
    );
    assert_eq!(s.status()["last_good"]["commit"], good);
    assert_eq!(scg.oom_kills(), 0, "the syncer was OOM-killed");
    eprintln!(
        "syncer, a commit of five alias bombs: peak memory {} MiB of {} MiB",
        scg.peak() >> 20,
        SYNCER_LIMIT >> 20
    );
}

/// A TCP relay in front of a Git server that can be switched to silence:
/// once [`Silent::hang`] is called, it accepts connections and never says a
/// word (nor reads), as a Git host whose backend froze does. Threads and
/// sockets end with the test process.
struct Silent {
    port: u16,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Silent {
    fn start(upstream: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hang = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let (h, n) = (hang.clone(), held.clone());
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if h.load(Ordering::SeqCst) {
                    silent.push(conn);
                    n.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Silent { port, hang, held }
    }

    fn hang(&self) {
        self.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Issue 16: `git fetch` had no timeout, and SIGTERM waited for it. A Git
/// remote that accepts the connection and then says nothing (over `git://`,
/// from a real `git daemon` behind a relay that falls silent): the fetch
/// fails after `--fetch-timeout` with an error naming the remote and the
/// timeout, the last good commit is still served, and SIGTERM during a
/// hung fetch exits 0 within the shutdown bound, even with a fetch timeout
/// of 10 minutes.
#[test]
fn serial_a_silent_git_remote_times_out_keeps_the_last_good_commit_and_sigterm_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let creds = syncer_creds(&pki, "east", "syncer");
    let repo = PolicyRepo::init(&tmp.path().join("repos/policy"));
    let good = repo.commit(
        "clusters",
        &[("clusters.yaml", &cluster_yaml("east", &[free_udp_port()]))],
    );
    let daemon = GitDaemon::start(&tmp.path().join("repos"));
    let relay = Silent::start(daemon.port);
    let url = format!("git://127.0.0.1:{}/policy", relay.port);
    let work = tmp.path().join("syncer");
    let mut spec = SyncerSpec::new(Path::new(&url), &creds, &work);
    spec.extra_args = vec!["--fetch-timeout".into(), "2s".into()];
    let mut s = SyncerProcess::start(&spec);
    eventually("the good commit is live", Duration::from_secs(30), || {
        let st = s.status();
        (st["last_good"]["commit"] == good.as_str())
            .then_some(())
            .ok_or(format!("{st}"))
    });

    relay.hang();
    repo.commit(
        "a second cluster",
        &[("west.yaml", &cluster_yaml("west", &[free_udp_port()]))],
    );
    s.webhook();
    let error = eventually("the fetch times out", Duration::from_secs(30), || {
        let st = s.status();
        match st["last_fetch"]["error"].as_str() {
            Some(e) if st["last_fetch"]["ok"] == false => Ok(e.to_string()),
            _ => Err(format!("{st}")),
        }
    });
    assert!(
        error.contains("timed out after 2s") && error.contains("--fetch-timeout"),
        "{error}"
    );
    assert!(
        error.contains(&url),
        "the error does not name the remote: {error}"
    );
    assert_eq!(s.status()["last_good"]["commit"], good.as_str());
    // A gateway subscribing now gets the last good commit.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    meshfed_gateway::identity::install_crypto_provider();
    let (tx, mut acks) = mpsc::unbounded_channel();
    let sub = {
        let _rt = rt.enter();
        let gw = pki.gateway("east", "gw-1");
        spawn_light_subscriber(s.grpc, gw, "east".into(), "gw-1".into(), tx)
    };
    wait_ack(&rt, &mut acks, "east/gw-1", &good);
    sub.abort();
    assert_eq!(s.terminate(), Some(0), "{}", s.log_text());

    // With a 10-minute fetch timeout, SIGTERM while the fetch at start
    // hangs on the silent remote.
    spec.extra_args = vec!["--fetch-timeout".into(), "10m".into()];
    let held = relay.held();
    let mut s = SyncerProcess::start(&spec);
    eventually("the fetch at start hangs", Duration::from_secs(30), || {
        (relay.held() > held)
            .then_some(())
            .ok_or("no connection yet")
    });
    let started = std::time::Instant::now();
    let code = s.terminate();
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{}", s.log_text());
    assert!(
        took < Duration::from_secs(9),
        "SIGTERM took {took:?} with a fetch hanging (bound: 5 s for the sync, then exit)"
    );
    eprintln!("SIGTERM with a hung fetch: exited in {took:?}");
}
