//! Commit → syncer → three real gateways in three clusters, end to end, and
//! through a restart of the syncer: the real `meshfed-syncer` (Git repo
//! made with the `git` CLI, webhook, gRPC over mTLS) and three real
//! `meshfed-gateway` processes in syncer mode; `meshfed-syncer status
//! --wait` is the judge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshfed_tests::federation::{
    GatewayProcess, GatewaySpec, Pki, certs, cluster_yaml, free_udp_port,
};
use meshfed_tests::{bin, eventually};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(repo: &Path, msg: &str, files: &[(&str, &str)]) -> String {
    for (p, t) in files {
        std::fs::write(repo.join(p), t).unwrap();
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", msg]);
    git(repo, &["rev-parse", "HEAD"])
}

fn http(addr: &str, req: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

fn status_wait(http_addr: &str, sha: &str) -> (Option<i32>, String) {
    status_wait_for(http_addr, sha, "30s")
}

fn status_wait_for(http_addr: &str, sha: &str, timeout: &str) -> (Option<i32>, String) {
    let out = Command::new(bin("meshfed-syncer"))
        .args([
            "status",
            "--server",
            &format!("http://{http_addr}"),
            "--wait",
            sha,
            "--timeout",
            timeout,
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const VS_WEST: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, annotations: {meshfed.io/clusters: west}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n";

#[test]
fn a_commit_reaches_three_gateways_in_three_clusters_and_status_wait_returns_0() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let syncer_creds = tmp.path().join("creds/syncer");
    certs(&[
        "syncer",
        "--ca",
        &pki.cluster_ca("east").to_string_lossy(),
        "--id",
        "syncer",
        "--out",
        &syncer_creds.to_string_lossy(),
    ]);
    let clusters = ["east", "west", "edge"];
    let ports: Vec<u16> = clusters.iter().map(|_| free_udp_port()).collect();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut cl = String::new();
    for (c, p) in clusters.iter().zip(&ports) {
        cl.push_str(&cluster_yaml(c, &[*p]));
    }
    let c1 = commit(&repo, "clusters", &[("clusters.yaml", &cl)]);

    std::fs::write(tmp.path().join("secret"), "s3cret").unwrap();
    // A fixed gRPC port: the gateways find a restarted syncer where they
    // left it.
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start_syncer = |run: u32| {
        let ready = tmp.path().join(format!("syncer-{run}.ready"));
        let log = std::fs::File::create(tmp.path().join(format!("syncer-{run}.log"))).unwrap();
        let child = Command::new(bin("meshfed-syncer"))
            .args([
                "--repo",
                &repo.to_string_lossy(),
                "--state-dir",
                &tmp.path().join("state").to_string_lossy(),
            ])
            .args(["--tls-dir", &syncer_creds.to_string_lossy()])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", "127.0.0.1:0", "--poll-interval", "1h"])
            .args([
                "--webhook-secret-file",
                &tmp.path().join("secret").to_string_lossy(),
            ])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let doc: serde_json::Value = eventually("syncer ready", Duration::from_secs(20), || {
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(&ready).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())
        });
        (
            child,
            doc["http"].as_str().unwrap().to_string(),
            doc["grpc"].as_str().unwrap().to_string(),
        )
    };
    let (mut syncer, http_addr, grpc) = start_syncer(1);

    let mut gateways: Vec<GatewayProcess> = clusters
        .iter()
        .zip(&ports)
        .map(|(c, p)| {
            let tls_dir = pki.gateway(c, "gw-0");
            GatewayProcess::start(&GatewaySpec {
                cluster: c.to_string(),
                id: "gw-0".into(),
                tls_dir,
                policy_dir: Default::default(),
                discovery: None,
                tunnel_port: *p,
                work_dir: tmp.path().to_path_buf(),
                extra_args: vec![
                    "--syncer".into(),
                    grpc.clone(),
                    "--syncer-issuer".into(),
                    "east".into(),
                    "--state-dir".into(),
                    tmp.path().join(format!("gw-{c}")).to_string_lossy().into(),
                ],
            })
        })
        .collect();
    let (code, out) = status_wait(&http_addr, &c1);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("applied"))
            .count(),
        3,
        "three gateways applied c1:\n{out}"
    );

    // A webhook-triggered commit, targeted at west only.
    let c2 = commit(&repo, "reviews for west", &[("reviews.yaml", VS_WEST)]);
    let body = r#"{"ref":"refs/heads/main"}"#;
    let t = Instant::now();
    let (code, text) = http(
        &http_addr,
        &format!(
            "POST /hooks/git HTTP/1.1\r\nHost: s\r\nX-Gitlab-Token: s3cret\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(code, 202, "{text}");
    let (code, out) = status_wait(&http_addr, &c2);
    eprintln!(
        "webhook → status --wait returned for 3 gateways in {:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(0), "{out}");
    for g in &gateways {
        let dump = g.admin_get("/config_dump");
        assert!(
            dump.contains(&c2),
            "{} does not run {c2}: {dump}",
            g.cluster
        );
        let has_route = dump.contains("reviews.default.svc.cluster.local");
        assert_eq!(has_route, g.cluster == "west", "{}: {dump}", g.cluster);
    }

    // A bad commit is rejected; the gateways stay on c2 and `--wait` says so.
    let bad = commit(
        &repo,
        "bad",
        &[(
            "reviews.yaml",
            &VS_WEST.replace("host: reviews}", "host: reviews, subset: nope}"),
        )],
    );
    let (code, _) = http(
        &http_addr,
        &format!(
            "POST /hooks/git HTTP/1.1\r\nHost: s\r\nX-Gitlab-Token: s3cret\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(code, 202);
    let (code, out) = status_wait(&http_addr, &bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("reviews.yaml:"), "{out}");
    for g in &gateways {
        assert!(g.admin_get("/config_dump").contains(&c2));
    }

    // The syncer restarts while edge's gateway is down. It still knows
    // edge's gateway (its records are kept in the state directory), so a
    // rollout is not "applied everywhere" until edge is back: `--wait`
    // times out (3) naming it, instead of answering 0 for want of anyone
    // to ask.
    let stop = |syncer: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-TERM", &syncer.id().to_string()])
            .status();
        assert_eq!(syncer.wait().unwrap().code(), Some(0));
    };
    stop(&mut syncer);
    let mut edge = gateways.pop().unwrap();
    assert_eq!(edge.cluster, "edge");
    edge.kill();
    let (mut syncer, http_addr, _) = start_syncer(2);
    let (code, out) = status_wait_for(&http_addr, &c2, "3s");
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("edge") && l.contains("gw-0") && l.contains("pending")),
        "edge's gateway is waited for:\n{out}"
    );
    // Edge comes back, on its persisted snapshot, and reconnects.
    drop(edge);
    let _edge = GatewayProcess::start(&GatewaySpec {
        cluster: "edge".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("edge", "gw-0"),
        policy_dir: Default::default(),
        discovery: None,
        tunnel_port: ports[2],
        work_dir: tmp.path().to_path_buf(),
        extra_args: vec![
            "--syncer".into(),
            format!("127.0.0.1:{grpc_port}"),
            "--syncer-issuer".into(),
            "east".into(),
            "--state-dir".into(),
            tmp.path().join("gw-edge").to_string_lossy().into(),
        ],
    });
    let (code, out) = status_wait(&http_addr, &c2);
    assert_eq!(code, Some(0), "{out}");
    stop(&mut syncer);
}
