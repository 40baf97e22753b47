//! Shared by the syncer's process tests: real Git repositories made with
//! the `git` CLI in a tempdir, the real `meshfed-syncer` binary, and a tiny
//! blocking HTTP/1.1 client.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshfed_tests::eventually;

/// Runs `git` in `dir`, panicking with its output on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
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
        .unwrap_or_else(|e| panic!("running git {args:?}: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A policy repository (with a working tree, so tests can commit).
pub struct Repo {
    pub dir: PathBuf,
}

impl Repo {
    pub fn init(dir: &Path) -> Repo {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q", "-b", "main"]);
        Repo {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `files` (path → contents; empty contents removes the file),
    /// commits them, returns the SHA.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        self.commit_with(message, files, &[])
    }

    pub fn commit_with(&self, message: &str, files: &[(&str, &str)], extra: &[&str]) -> String {
        for (path, text) in files {
            let p = self.dir.join(path);
            if text.is_empty() {
                let _ = std::fs::remove_file(&p);
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, text).unwrap();
            }
        }
        git(&self.dir, &["add", "-A"]);
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.dir, &args);
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.dir, &["rev-parse", "HEAD"])
    }
}

pub fn cluster(name: &str, port: u16) -> String {
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec: {{gateways: ['127.0.0.1:{port}']}}\n"
    )
}

/// Two clusters, east and west.
pub fn clusters() -> String {
    format!("{}---\n{}", cluster("east", 15443), cluster("west", 15444))
}

/// A VirtualService for `reviews`, limited to `targets` when given.
pub fn reviews_vs(targets: Option<&str>) -> String {
    let ann = targets
        .map(|t| format!(", annotations: {{meshfed.io/clusters: \"{t}\"}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews{ann}}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews}}\n"
    )
}

/// A VirtualService whose weights sum to 90: invalid at line 8.
pub const BAD_WEIGHTS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
      weight: 50
    - destination: {host: ratings}
      weight: 40
";

/// A running `meshfed-syncer`, stopped with SIGTERM on drop.
pub struct Syncer {
    pub child: Child,
    pub http: SocketAddr,
    pub ready: serde_json::Value,
    pub log: PathBuf,
    pub token: Option<String>,
}

pub fn syncer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshfed-syncer")
}

/// A `meshfed-syncer` command with no MESHFED_* from the caller's environment.
pub fn syncer_cmd() -> Command {
    let mut cmd = Command::new(syncer_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl Syncer {
    /// Starts the syncer with `args` (plus `--ready-file`, `--http-addr
    /// 127.0.0.1:0` and `--grpc-addr 127.0.0.1:0`) and waits for its ready file.
    pub fn start(work: &Path, args: &[&str]) -> Syncer {
        Self::start_env(work, args, &[])
    }

    pub fn start_env(work: &Path, args: &[&str], env: &[(&str, &str)]) -> Syncer {
        let ready = work.join(format!(
            "ready-{}.json",
            std::process::id() as u64 + rand_suffix()
        ));
        let log = ready.with_extension("log");
        let mut cmd = syncer_cmd();
        cmd.args(args)
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning meshfed-syncer");
        let ready_doc: serde_json::Value =
            eventually("the syncer's ready file", Duration::from_secs(20), || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "meshfed-syncer exited with {status} before it was ready:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let text = std::fs::read_to_string(&ready).map_err(|e| e.to_string())?;
                serde_json::from_str(&text).map_err(|e| e.to_string())
            });
        let http = ready_doc["http"].as_str().unwrap().parse().unwrap();
        Syncer {
            child,
            http,
            ready: ready_doc,
            log,
            token: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        http(
            self.http,
            &format!("GET {path} HTTP/1.1\r\nHost: s\r\n{auth}Connection: close\r\n\r\n"),
            b"",
        )
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn last_good(&self) -> Option<String> {
        self.status()["last_good"]["commit"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits until the last good commit is `sha`.
    pub fn wait_good(&self, sha: &str) {
        eventually(
            &format!("last good commit {sha}"),
            Duration::from_secs(20),
            || {
                let s = self.status();
                if s["last_good"]["commit"] == sha {
                    Ok(())
                } else {
                    Err(format!("status: {s}"))
                }
            },
        );
    }

    /// Waits until `sha` is among the rejected commits; returns its entry.
    pub fn wait_rejected(&self, sha: &str) -> serde_json::Value {
        eventually(
            &format!("commit {sha} rejected"),
            Duration::from_secs(20),
            || {
                let s = self.status();
                s["rejected"]
                    .as_array()
                    .and_then(|r| r.iter().find(|x| x["commit"] == sha).cloned())
                    .ok_or_else(|| format!("status: {s}"))
            },
        )
    }

    pub fn post_hook(&self, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut h = String::new();
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        http(
            self.http,
            &format!(
                "POST /hooks/git HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{h}Connection: close\r\n\r\n",
                body.len()
            ),
            body.as_bytes(),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = eventually("the syncer to exit", Duration::from_secs(15), || {
            self.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        });
        status.code()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1_000_000
}

/// One HTTP/1.1 exchange with `Connection: close`; returns (status, body).
pub fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
