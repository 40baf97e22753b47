//! The real syncer, for cross-process tests and the benchmark harness: a
//! policy repository made with the `git` CLI, the `meshfed-syncer` process
//! (ready file, signed webhook, status API, metrics), `meshfed-syncer
//! status --wait`, and lightweight in-process config subscribers that speak
//! the real protocol over mTLS with their own gateway certificates.
//!
//! It owns no assertions: tests and the benchmark decide what they expect.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use meshfed_identity::store::{self, Credentials};
use meshfed_identity::verify::{ExpectedPeer, HandshakeRefusals};
use meshfed_proto::config::v1 as pb;
use meshfed_proto::config::v1::config_delivery_client::ConfigDeliveryClient;
use tokio::sync::mpsc;

use crate::federation::{Pki, certs};
use crate::{Outcome, bin, run_within, wait_for};

/// Runs `git` in `dir` with a clean configuration; returns its stdout.
///
/// # Panics
///
/// If git fails; the message has its output.
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
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A policy repository with a working tree, on branch `main`.
#[derive(Debug, Clone)]
pub struct PolicyRepo {
    pub dir: PathBuf,
}

impl PolicyRepo {
    pub fn init(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        git(dir, &["init", "-q", "-b", "main"]);
        PolicyRepo {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `files` (repository path → text; empty text removes the
    /// file), commits everything, and returns the new commit's SHA.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        for (path, text) in files {
            let p = self.dir.join(path);
            if text.is_empty() {
                let _ = std::fs::remove_file(&p);
            } else {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
                }
                std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
        git(&self.dir, &["add", "-A"]);
        git(
            &self.dir,
            &[
                "commit",
                "-q",
                "--allow-empty",
                "--no-verify",
                "-m",
                message,
            ],
        );
        git(&self.dir, &["rev-parse", "HEAD"])
    }
}

/// Syncer credentials `spiffe://cluster.local/meshfed/syncer/<id>`, issued
/// by `cluster`'s intermediate.
pub fn syncer_creds(pki: &Pki, cluster: &str, id: &str) -> PathBuf {
    let out = pki.dir.join("creds").join(format!("syncer-{id}"));
    certs(&[
        "syncer",
        "--ca",
        &pki.cluster_ca(cluster).to_string_lossy(),
        "--id",
        id,
        "--out",
        &out.to_string_lossy(),
    ]);
    out
}

/// `sha256=<hex HMAC-SHA256>` of `body`, as GitHub signs webhooks.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How to start a syncer.
#[derive(Debug, Clone)]
pub struct SyncerSpec {
    /// The remote: a local repository path.
    pub repo: PathBuf,
    /// Credentials for the config server (`syncer_creds`).
    pub tls_dir: PathBuf,
    /// State directory, ready file and log go here.
    pub work_dir: PathBuf,
    /// The webhook secret (written to a file for `--webhook-secret-file`).
    pub webhook_secret: String,
    /// More flags, e.g. `--keepalive-interval 1s`.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the syncer.
    pub rust_log: String,
    /// The gRPC listener's address (default `127.0.0.1:0`): a fixed port
    /// lets a restarted syncer come back where its gateways look for it,
    /// a bridge address lets gateways in network namespaces reach it.
    pub grpc_addr: String,
    /// A command prefix the binary runs under, e.g.
    /// [`crate::cgroup::MemoryCgroup::prefix`] for the shipped memory limit.
    pub prefix: Vec<String>,
}

impl SyncerSpec {
    pub fn new(repo: &Path, tls_dir: &Path, work_dir: &Path) -> Self {
        SyncerSpec {
            repo: repo.to_path_buf(),
            tls_dir: tls_dir.to_path_buf(),
            work_dir: work_dir.to_path_buf(),
            webhook_secret: "webhook-s3cret".into(),
            extra_args: Vec::new(),
            rust_log: "info".into(),
            grpc_addr: "127.0.0.1:0".into(),
            prefix: Vec::new(),
        }
    }
}

/// A running `meshfed-syncer` on loopback (ports picked by the OS), killed
/// on drop.
#[derive(Debug)]
pub struct SyncerProcess {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub log: PathBuf,
    secret: String,
    child: Option<Child>,
}

impl SyncerProcess {
    /// Starts the syncer (poll interval 1 h, so only webhooks trigger
    /// syncs) and waits for its ready file.
    ///
    /// # Panics
    ///
    /// If it does not become ready within 20 s (scaled by patience); the
    /// message has its log.
    pub fn start(spec: &SyncerSpec) -> Self {
        let w = &spec.work_dir;
        std::fs::create_dir_all(w).unwrap_or_else(|e| panic!("{}: {e}", w.display()));
        let secret_file = w.join("webhook-secret");
        std::fs::write(&secret_file, &spec.webhook_secret)
            .unwrap_or_else(|e| panic!("{}: {e}", secret_file.display()));
        let ready = w.join("syncer.ready");
        let log = w.join("syncer.log");
        let _ = std::fs::remove_file(&ready);
        let log_file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut cmd = match spec.prefix.split_first() {
            None => Command::new(bin("meshfed-syncer")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("meshfed-syncer"));
                c
            }
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHFED_") && key != "MESHFED_BIN_DIR" {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--repo")
            .arg(&spec.repo)
            .arg("--state-dir")
            .arg(w.join("syncer-state"))
            .arg("--tls-dir")
            .arg(&spec.tls_dir)
            .args(["--grpc-addr", &spec.grpc_addr])
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--poll-interval", "1h"])
            .arg("--webhook-secret-file")
            .arg(&secret_file)
            .arg("--ready-file")
            .arg(&ready)
            .args(&spec.extra_args)
            .env("RUST_LOG", &spec.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting meshfed-syncer: {e}"));
        let doc = wait_for("the syncer's ready file", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            let text = std::fs::read_to_string(&ready).map_err(|e| e.to_string())?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
        });
        let doc = match doc {
            Ok(d) => d,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}");
            }
        };
        let addr = |k: &str| -> SocketAddr {
            doc[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("the ready file has no `{k}` address: {doc}"))
        };
        SyncerProcess {
            http: addr("http"),
            grpc: addr("grpc"),
            log,
            secret: spec.webhook_secret.clone(),
            child: Some(child),
        }
    }

    /// `http://<addr>` of the status API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// A GitHub-signed push event for `refs/heads/main`; returns the status
    /// code and body of the answer (202 when a sync was requested).
    pub fn webhook(&self) -> (u16, String) {
        let body = r#"{"ref":"refs/heads/main"}"#;
        let sig = github_signature(self.secret.as_bytes(), body.as_bytes());
        http_exchange(
            self.http,
            &format!(
                "POST /hooks/git HTTP/1.1\r\nHost: syncer\r\nContent-Type: application/json\r\n\
                 X-GitHub-Event: push\r\nX-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    /// A GET on the status API: (status code, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_exchange(
            self.http,
            &format!("GET {path} HTTP/1.1\r\nHost: syncer\r\nConnection: close\r\n\r\n"),
        )
    }

    /// `/status` as JSON (`Null` if it cannot be read).
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status").1).unwrap_or_default()
    }

    /// `/rollout/<sha>` as JSON (`Null` if it cannot be read).
    pub fn rollout(&self, sha: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(&format!("/rollout/{sha}")).1).unwrap_or_default()
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        self.get("/metrics").1
    }

    /// The known gateway `cluster/id` in `/status`, if listed.
    pub fn gateway(&self, cluster: &str, id: &str) -> Option<serde_json::Value> {
        let status = self.status();
        status["clusters"][cluster]["gateways"]
            .as_array()?
            .iter()
            .find(|g| g["gateway_id"] == id)
            .cloned()
    }

    /// Runs `meshfed-syncer status --wait SHA --timeout TIMEOUT` against
    /// this syncer.
    ///
    /// # Panics
    ///
    /// If the command cannot run, or runs far past its own timeout.
    pub fn status_wait(&self, sha: &str, timeout: Duration) -> Outcome {
        let mut cmd = Command::new(bin("meshfed-syncer"));
        cmd.args(["status", "--server", &self.url(), "--wait", sha])
            .arg("--timeout")
            .arg(format!("{}ms", timeout.as_millis()));
        run_within(&mut cmd, timeout + Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("meshfed-syncer status --wait: {e}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM; returns the exit code once it exited (`None` if it had to
    /// be killed after 15 s).
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let status = wait_for("the syncer to exit", Duration::from_secs(15), || {
            c.try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        });
        match status {
            Ok(s) => s.code(),
            Err(_) => {
                let _ = c.kill();
                let _ = c.wait();
                None
            }
        }
    }
}

impl Drop for SyncerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal (`STOP`, `CONT`, `KILL`...) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// One HTTP/1.1 exchange (`Connection: close`); (status, body). Status 0
/// when the server could not be reached or answered garbage.
pub fn http_exchange(addr: SocketAddr, request: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    if s.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Parses the syncer's timestamps (`2025-01-02T03:04:05.678Z`, UTC): one
/// copy of the calendar, beside the syncer's printer.
pub use meshfed_cli::time::parse_rfc3339;

/// A lightweight config subscriber: one TLS connection with a gateway's
/// own certificate, `Hello{cluster, id}`, and an ACK for every snapshot as
/// soon as it has arrived whole (it checks the version but does not decode
/// or apply the policy; a real gateway does). It reconnects after 100 ms
/// when the stream ends, and reports each ACKed version on `acks`.
///
/// Runs until the returned task is aborted.
pub fn spawn_light_subscriber(
    syncer: SocketAddr,
    tls_dir: PathBuf,
    cluster: String,
    id: String,
    acks: mpsc::UnboundedSender<(String, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match light_session(syncer, &tls_dir, &cluster, &id, &acks).await {
                Ok(()) => {}
                Err(e) => verbose(&format!("light subscriber {cluster}/{id}: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn verbose(msg: &str) {
    if std::env::var_os("MESHFED_BENCH_VERBOSE").is_some() {
        eprintln!("{msg}");
    }
}

async fn light_session(
    syncer: SocketAddr,
    tls_dir: &Path,
    cluster: &str,
    id: &str,
    acks: &mpsc::UnboundedSender<(String, String)>,
) -> Result<(), String> {
    let mut client = dial(syncer, tls_dir).await?;
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Hello(pb::Hello {
            cluster: cluster.into(),
            gateway_id: id.into(),
            applied_version: String::new(),
            snapshot_schema: meshfed_policy::snapshot::SCHEMA,
        })),
    };
    tx.send(hello).await.map_err(|e| e.to_string())?;
    let mut inbound = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    loop {
        let Some(msg) = inbound.message().await.map_err(|s| s.to_string())? else {
            return Ok(());
        };
        if let Some(pb::syncer_message::Message::Snapshot(snap)) = msg.message {
            if snap.canonical.is_empty() {
                return Err(format!("empty snapshot for {}", snap.version));
            }
            let ack = pb::GatewayMessage {
                message: Some(pb::gateway_message::Message::Ack(pb::Ack {
                    version: snap.version.clone(),
                })),
            };
            tx.send(ack).await.map_err(|e| e.to_string())?;
            let _ = acks.send((format!("{cluster}/{id}"), snap.version));
        }
    }
}

/// A config client over our own TLS connector with the credentials in
/// `tls_dir`, dialing the syncer's server name.
async fn dial(
    addr: SocketAddr,
    tls_dir: &Path,
) -> Result<ConfigDeliveryClient<tonic::transport::Channel>, String> {
    let creds = Credentials::load(tls_dir).map_err(|e| e.to_string())?;
    let tls = store::client_config(
        &creds,
        &[b"h2".to_vec()],
        Arc::new(HandshakeRefusals::new()),
    )
    .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let channel = tonic::transport::Endpoint::from_static("http://syncer.meshfed.internal")
        .tcp_nodelay(true)
        .connect_with_connector(Connector(move || {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let name = ExpectedPeer::Syncer
                    .server_name()
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(ConfigDeliveryClient::new(channel).max_decoding_message_size(256 << 20))
}

/// A connector (`tower::Service<Uri>`) from a closure.
#[derive(Clone)]
struct Connector<F>(F);

impl<F, Fut, T> tonic::codegen::Service<tonic::codegen::http::Uri> for Connector<F>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, std::io::Error>> + Send + 'static,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Fut {
        (self.0)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_signatures_are_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            github_signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
