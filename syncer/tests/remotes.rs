//! The syncer against real remotes on loopback: `git daemon` (git://), `git
//! http-backend` behind a small CGI host (smart HTTP with a token), and
//! commit signatures made by `ssh-keygen` through `git commit -S`.
//!
//! The CGI host here is test scaffolding standing in for a web server
//! (nginx/Apache run `git http-backend` the same way); the Git side is the
//! real `git http-backend`.

// Test helpers panic with context on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::*;
use meshfed_tests::eventually;

/// A bare repository under `base`, fed by pushes from a working repo.
fn bare_remote(base: &Path, work: &Repo) -> PathBuf {
    let bare = base.join("policy.git");
    std::fs::create_dir_all(base).unwrap();
    git(
        base,
        &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    git(
        &work.dir,
        &["remote", "add", "origin", bare.to_str().unwrap()],
    );
    bare
}

fn push(work: &Repo) {
    git(
        &work.dir,
        &["push", "-q", "-f", "origin", "HEAD:refs/heads/main"],
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_git_daemon_remote_is_fetched_over_git_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let work = Repo::init(&tmp.path().join("work"));
    let base = tmp.path().join("srv");
    bare_remote(&base, &work);
    let c1 = work.commit("one", &[("clusters.yaml", &clusters())]);
    push(&work);
    let port = free_port();
    let _daemon = Daemon(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--listen=127.0.0.1",
                "--export-all",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon"),
    );
    eventually("git daemon listening", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).map(|_| ())
    });
    let url = format!("git://127.0.0.1:{port}/policy.git");
    let state = tmp.path().join("state");
    let syncer = Syncer::start(
        tmp.path(),
        &[
            "--repo",
            &url,
            "--state-dir",
            state.to_str().unwrap(),
            "--no-grpc",
            "--poll-interval",
            "200ms",
        ],
    );
    syncer.wait_good(&c1);
    let c2 = work.commit("two", &[("reviews.yaml", &reviews_vs(None))]);
    push(&work);
    syncer.wait_good(&c2);
    assert_eq!(syncer.status()["repo"], url.as_str());
}

/// Serves `git http-backend` over HTTP/1.1, one connection per thread,
/// requiring basic auth `user:token`.
fn cgi_host(root: PathBuf, user: &'static str, token: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let expected = format!("Basic {}", base64(format!("{user}:{token}").as_bytes()));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (root, expected) = (root.clone(), expected.clone());
            std::thread::spawn(move || {
                let _ = serve_cgi(conn, &root, &expected);
            });
        }
    });
    port
}

fn serve_cgi(conn: TcpStream, root: &Path, expected_auth: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        if get("authorization").as_deref() != Some(expected_auth) {
            out.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut child = Command::new("git")
            .arg("http-backend")
            .env("GIT_PROJECT_ROOT", root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("PATH_INFO", path)
            .env("QUERY_STRING", query)
            .env("REQUEST_METHOD", &method)
            .env("CONTENT_TYPE", get("content-type").unwrap_or_default())
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("GIT_PROTOCOL", get("git-protocol").unwrap_or_default())
            .env("REMOTE_USER", "x")
            .env("REMOTE_ADDR", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        child.stdin.take().unwrap().write_all(&body)?;
        let output = child.wait_with_output()?;
        let raw = output.stdout;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| (i, 4))
            .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
            .unwrap_or((raw.len(), 0));
        let head = String::from_utf8_lossy(&raw[..split.0]).to_string();
        let payload = &raw[(split.0 + split.1).min(raw.len())..];
        let mut status = "200 OK".to_string();
        let mut resp_headers = String::new();
        for l in head.lines() {
            if let Some(s) = l.strip_prefix("Status:") {
                status = s.trim().to_string();
            } else if !l.trim().is_empty() {
                resp_headers.push_str(l.trim());
                resp_headers.push_str("\r\n");
            }
        }
        out.write_all(
            format!(
                "HTTP/1.1 {status}\r\n{resp_headers}Content-Length: {}\r\n\r\n",
                payload.len()
            )
            .as_bytes(),
        )?;
        out.write_all(payload)?;
    }
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in input.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn a_smart_http_remote_is_fetched_with_a_token_and_a_wrong_token_is_reported_without_leaking() {
    let tmp = tempfile::tempdir().unwrap();
    let work = Repo::init(&tmp.path().join("work"));
    let base = tmp.path().join("srv");
    bare_remote(&base, &work);
    let c1 = work.commit("one", &[("clusters.yaml", &clusters())]);
    push(&work);
    let port = cgi_host(base, "x-access-token", "tok-GOOD-123");
    let url = format!("http://127.0.0.1:{port}/policy.git");
    std::fs::write(tmp.path().join("good"), "tok-GOOD-123\n").unwrap();
    std::fs::write(tmp.path().join("bad"), "tok-BAD-456\n").unwrap();

    let syncer = Syncer::start(
        tmp.path(),
        &[
            "--repo",
            &url,
            "--state-dir",
            tmp.path().join("s1").to_str().unwrap(),
            "--no-grpc",
            "--poll-interval",
            "200ms",
            "--git-token-file",
            tmp.path().join("good").to_str().unwrap(),
        ],
    );
    syncer.wait_good(&c1);
    let c2 = work.commit("two", &[("reviews.yaml", &reviews_vs(None))]);
    push(&work);
    syncer.wait_good(&c2);

    let wrong = Syncer::start(
        tmp.path(),
        &[
            "--repo",
            &url,
            "--state-dir",
            tmp.path().join("s2").to_str().unwrap(),
            "--no-grpc",
            "--poll-interval",
            "1h",
            "--git-token-file",
            tmp.path().join("bad").to_str().unwrap(),
        ],
    );
    let st = eventually("the fetch to fail", Duration::from_secs(20), || {
        let st = wrong.status();
        if st["last_fetch"]["ok"] == false {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    });
    let err = st["last_fetch"]["error"].as_str().unwrap();
    assert!(err.contains("credentials"), "{err}");
    let all = st.to_string() + &wrong.log_text();
    assert!(!all.contains("tok-BAD-456"), "the token leaked:\n{all}");
    assert!(st["last_good"].is_null());
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    key
}

#[test]
fn with_require_signed_only_commits_signed_by_a_trusted_ssh_key_are_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::init(&tmp.path().join("remote"));
    let trusted = keygen(tmp.path(), "trusted");
    let other = keygen(tmp.path(), "other");
    let pubkey = std::fs::read_to_string(trusted.with_extension("pub")).unwrap();
    let keys = tmp.path().join("allowed_signers");
    std::fs::write(&keys, format!("# platform team\nops@example.com {pubkey}")).unwrap();
    let signed_by = |key: &Path| -> Vec<String> {
        vec![
            "-c".into(),
            "gpg.format=ssh".into(),
            "-c".into(),
            format!("user.signingkey={}", key.display()),
        ]
    };
    let sign = |key: &Path, msg: &str, files: &[(&str, &str)]| {
        let mut extra = signed_by(key);
        extra.push("-c".into());
        extra.push("commit.gpgsign=true".into());
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        repo.commit_with(msg, files, &refs)
    };
    let c1 = sign(&trusted, "one", &[("clusters.yaml", &clusters())]);
    let syncer = Syncer::start(
        tmp.path(),
        &[
            "--repo",
            repo.dir.to_str().unwrap(),
            "--state-dir",
            tmp.path().join("state").to_str().unwrap(),
            "--no-grpc",
            "--poll-interval",
            "200ms",
            "--require-signed",
            "--trusted-keys",
            keys.to_str().unwrap(),
        ],
    );
    syncer.wait_good(&c1);

    let unsigned = repo.commit("unsigned", &[("reviews.yaml", &reviews_vs(None))]);
    let r = syncer.wait_rejected(&unsigned);
    assert!(r["reason"].as_str().unwrap().contains("not signed"), "{r}");

    let untrusted = sign(
        &other,
        "untrusted",
        &[("reviews.yaml", &reviews_vs(Some("east")))],
    );
    let r = syncer.wait_rejected(&untrusted);
    assert!(
        r["reason"].as_str().unwrap().contains("not a trusted key"),
        "{r}"
    );
    assert_eq!(syncer.last_good().as_deref(), Some(c1.as_str()));

    let c4 = sign(
        &trusted,
        "signed again",
        &[("reviews.yaml", &reviews_vs(Some("west")))],
    );
    syncer.wait_good(&c4);
}

#[test]
fn openpgp_trusted_keys_are_refused_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys.asc");
    std::fs::write(
        &keys,
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF...\n-----END PGP PUBLIC KEY BLOCK-----\n",
    )
    .unwrap();
    let out = syncer_cmd()
        .args([
            "--repo",
            "/x",
            "--no-grpc",
            "--require-signed",
            "--trusted-keys",
        ])
        .arg(&keys)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("OpenPGP"), "{err}");
}
