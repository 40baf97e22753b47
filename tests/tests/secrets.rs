//! Secrets hygiene, against the real binaries: canary secrets (a password
//! in the Git URL, a Git token, the webhook secret, a private key) never
//! appear in logs (at debug level), status, metrics or the config dump;
//! private keys are written 0600 and a world-readable one is refused.
//!
//! The Git remote is a small HTTP server that records what it is sent,
//! asks for credentials and then fails: it proves the syncer really used the credentials (the
//! test cannot pass by never fetching), and a failing fetch is where a URL
//! is most likely to be logged.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshfed_tests::federation::*;
use meshfed_tests::syncer::{SyncerProcess, SyncerSpec, syncer_creds};

const URL_PASSWORD: &str = "CANARYurlPASSWORD7f3a";
const TOKEN: &str = "CANARYgitTOKEN91bc";
const WEBHOOK_SECRET: &str = "CANARYwebhookSECRET2d8e";

/// An HTTP server that keeps the requests, answers 401 (Basic) to those
/// without credentials and 500 to the others.
fn recording_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 8192];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            // Ask for credentials until they come, then fail.
            let answer: &[u8] = if req.to_ascii_lowercase().contains("authorization:") {
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"git\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            };
            out.lock().unwrap().push(req);
            let _ = s.write_all(answer);
        }
    });
    (addr, seen)
}

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !text.contains(s),
            "{what} contains the secret {s:?}:\n{text}"
        );
    }
}

#[test]
fn canary_secrets_never_reach_logs_status_metrics_or_the_config_dump() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (remote, seen) = recording_server();
    let token_file = dir.path().join("git-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let url = format!("http://meshfed:{URL_PASSWORD}@{remote}/policy.git");
    let mut spec = SyncerSpec::new(
        std::path::Path::new(&url),
        &syncer_creds(&pki, "east", "syncer"),
        &dir.path().join("syncer"),
    );
    spec.webhook_secret = WEBHOOK_SECRET.into();
    spec.rust_log = "debug".into();
    spec.extra_args = vec![
        "--git-token-file".into(),
        token_file.to_string_lossy().into(),
    ];
    let syncer = SyncerProcess::start(&spec);
    // A signed webhook asks for a sync; a forged one is refused.
    let (code, body) = syncer.webhook();
    assert_eq!(code, 202, "{body}");
    let (forged, _) = meshfed_tests::syncer::http_exchange(
        syncer.http,
        "POST /hooks/git HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256=00\r\nX-GitHub-Event: push\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert!(forged >= 400, "a forged webhook is refused ({forged})");
    meshfed_tests::assert_eventually(
        "the syncer tries the remote with its credentials",
        Duration::from_secs(20),
        || {
            let seen = seen.lock().unwrap();
            seen.iter()
                .any(|r| r.to_ascii_lowercase().contains("authorization:"))
        },
    );
    // The failure is recorded before we look.
    meshfed_tests::assert_eventually(
        "the failed fetch is logged",
        Duration::from_secs(10),
        || {
            let log = syncer.log_text();
            log.contains("127.0.0.1") && (log.contains("fail") || log.contains("error"))
        },
    );
    let secrets = [URL_PASSWORD, TOKEN, WEBHOOK_SECRET];
    assert_clean("the syncer's log", &syncer.log_text(), &secrets);
    for path in ["/status", "/metrics", "/healthz", "/readyz"] {
        let (_, body) = syncer.get(path);
        assert_clean(path, &body, &secrets);
    }
    let out = meshfed_tests::run(
        std::process::Command::new(meshfed_tests::bin("meshfed-syncer")).args([
            "status",
            "--server",
            &syncer.url(),
        ]),
    )
    .unwrap();
    assert_clean("`meshfed-syncer status`", &format!("{out}"), &secrets);

    // A gateway's private key: not in its debug log, metrics or dump.
    let (backend, _b) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { http_backend("ratings-west").await });
    let (gdir, east, west) = two_clusters("ratings", backend, vec![]);
    for gw in [&east, &west] {
        let key = std::fs::read_to_string(
            gdir.path()
                .join("creds")
                .join(format!("{}-gw-0", gw.cluster))
                .join("key.pem"),
        )
        .unwrap();
        let body: Vec<&str> = key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
            .collect();
        assert!(!body.is_empty());
        let log = std::fs::read_to_string(&gw.log).unwrap();
        assert_clean("the gateway's log", &log, &body);
        for path in ["/metrics", "/config_dump", "/peers"] {
            assert_clean(path, &gw.admin_get(path), &body);
        }
    }
}

#[test]
fn private_keys_are_written_0600_and_a_world_readable_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let creds = pki.gateway("east", "gw-0");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&creds.join("key.pem")), 0o600);
    assert_eq!(mode(&dir.path().join("ca/root/ca.key")), 0o600);
    assert_eq!(mode(&dir.path().join("ca/east/ca.key")), 0o600);

    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("c.yaml"),
        cluster_yaml("east", &[free_udp_port()]),
    )
    .unwrap();
    std::fs::set_permissions(
        creds.join("key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = meshfed_tests::run_within(
        std::process::Command::new(meshfed_tests::bin("meshfed-gateway"))
            .args(["--cluster", "east", "--policy-dir"])
            .arg(&policy)
            .arg("--tls-dir")
            .arg(&creds)
            .args([
                "--tunnel-addr",
                "127.0.0.1:0",
                "--outbound-addr",
                "127.0.0.1:0",
            ])
            .args(["--admin-addr", "127.0.0.1:0"]),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("key.pem") && out.stderr.contains("readable by every user"),
        "{out}"
    );
    // chmod 600 and it starts.
    std::fs::set_permissions(
        creds.join("key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let gw = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: creds,
        policy_dir: policy,
        discovery: None,
        tunnel_port: free_udp_port(),
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    });
    drop(gw);
}
