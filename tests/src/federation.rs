//! A federation on loopback for tests: real certificates (made with
//! `meshfed-gateway certs`), real policy repositories, real gateway
//! processes, and real HTTP backends.
//!
//! Gateways' tunnel ports must be known before they start (a `Cluster`
//! lists its gateways' addresses), so they come from [`free_udp_port`];
//! every other listener uses port 0 and is read from the ready file.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{bin, wait_for};

/// `--link-transport` from `MESHFED_TEST_LINK_TRANSPORT` (`quic`, `tcp`),
/// unless the test chose one: runs a cross-cluster suite over either
/// transport (tests/README.md).
fn link_transport(extra_args: &[String]) -> Vec<String> {
    match std::env::var("MESHFED_TEST_LINK_TRANSPORT") {
        Ok(t) if !t.is_empty() && !extra_args.iter().any(|a| a.starts_with("--link-transport")) => {
            vec!["--link-transport".to_string(), t]
        }
        _ => vec![],
    }
}

/// A port that was free a moment ago on UDP and on TCP: a gateway's
/// tunnel binds both (QUIC links on UDP, TCP links on the same number).
pub fn free_udp_port() -> u16 {
    for _ in 0..64 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr().map(|a| (s, a.port())))
            .unwrap_or_else(|e| panic!("no free UDP port: {e}"));
        if std::net::TcpListener::bind(("127.0.0.1", udp.1)).is_ok() {
            return udp.1;
        }
    }
    panic!("no port free on both UDP and TCP in 64 tries")
}

/// Runs `meshfed-gateway certs ...`, panicking with its output on failure.
pub fn certs(args: &[&str]) {
    let out = Command::new(bin("meshfed-gateway"))
        .arg("certs")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running meshfed-gateway certs: {e}"));
    assert!(
        out.status.success(),
        "certs {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A trust anchor with one intermediate per cluster, under `dir`.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        Self::named(dir, "meshfed test root")
    }

    /// A PKI whose anchor has this common name.
    pub fn named(dir: &Path, name: &str) -> Self {
        let root = dir.join("ca/root");
        certs(&["anchor", "--name", name, "--out", &root.to_string_lossy()]);
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// The CA directory of `cluster`, created on first use.
    pub fn cluster_ca(&self, cluster: &str) -> PathBuf {
        let ca = self.dir.join("ca").join(cluster);
        if !ca.join("ca.pem").exists() {
            let root = self.dir.join("ca/root");
            certs(&[
                "intermediate",
                "--ca",
                &root.to_string_lossy(),
                "--cluster",
                cluster,
                "--out",
                &ca.to_string_lossy(),
            ]);
        }
        ca
    }

    /// Credentials for a gateway, issued on the first call for this
    /// (cluster, id) and reused afterwards, like [`Pki::cluster_ca`].
    pub fn gateway(&self, cluster: &str, id: &str) -> PathBuf {
        let ca = self.cluster_ca(cluster);
        let out = self.dir.join("creds").join(format!("{cluster}-{id}"));
        if out.join("key.pem").exists() {
            return out;
        }
        certs(&[
            "gateway",
            "--ca",
            &ca.to_string_lossy(),
            "--cluster",
            cluster,
            "--id",
            id,
            "--out",
            &out.to_string_lossy(),
        ]);
        out
    }
}

/// One gateway process.
#[derive(Debug)]
pub struct GatewayProcess {
    pub cluster: String,
    pub id: String,
    pub tunnel: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// Everything the ready file listed (port mappings are `tcp:<host>:<port>`).
    pub ready: ReadyAddrs,
    child: Option<Child>,
    /// Sent as `Authorization: Bearer` on admin requests (an admin
    /// address off loopback requires one).
    admin_token: Option<String>,
}

/// Where and how a gateway process runs, beyond its [`GatewaySpec`]: the
/// default is loopback in the test's own network namespace.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// A command the gateway runs under, e.g. `["ip", "netns", "exec",
    /// "ns1"]`; it must `exec` the gateway so that the child's pid is the
    /// gateway's (signals go to it).
    pub prefix: Vec<String>,
    /// The tunnel's bind address (default `127.0.0.1`).
    pub tunnel_host: Option<String>,
    /// The outbound and admin listeners' bind address (default
    /// `127.0.0.1`). Off loopback the admin API needs `admin_token`.
    pub local_host: Option<String>,
    /// Written to a file for `--admin-token-file` and sent by
    /// [`GatewayProcess::admin_get`].
    pub admin_token: Option<String>,
}

/// How to start a gateway.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub cluster: String,
    pub id: String,
    pub tls_dir: PathBuf,
    /// Empty: no `--policy-dir` (syncer mode; pass `--syncer` in `extra_args`).
    pub policy_dir: PathBuf,
    pub discovery: Option<PathBuf>,
    pub tunnel_port: u16,
    pub work_dir: PathBuf,
    pub extra_args: Vec<String>,
}

/// The ready file's addresses.
type ReadyAddrs = BTreeMap<String, SocketAddr>;

impl GatewayProcess {
    /// Starts a gateway and waits until it is ready.
    pub fn start(spec: &GatewaySpec) -> Self {
        Self::start_with(spec, &Launch::default())
    }

    /// Starts a gateway as `launch` says (e.g. inside a network namespace)
    /// and waits until it is ready.
    pub fn start_with(spec: &GatewaySpec, launch: &Launch) -> Self {
        Self::start_program(&bin("meshfed-gateway"), spec, launch)
    }

    /// [`GatewayProcess::start_with`] for another build of the gateway
    /// binary, e.g. one without default features (tests/tests/minimal_gateway.rs).
    pub fn start_program(program: &Path, spec: &GatewaySpec, launch: &Launch) -> Self {
        let ready = spec
            .work_dir
            .join(format!("{}-{}.ready", spec.cluster, spec.id));
        let log = spec
            .work_dir
            .join(format!("{}-{}.log", spec.cluster, spec.id));
        let _ = std::fs::remove_file(&ready);
        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut cmd = match launch.prefix.split_first() {
            Some((wrapper, args)) => {
                let mut c = Command::new(wrapper);
                c.args(args).arg(program);
                c
            }
            None => Command::new(program),
        };
        let tunnel_host = launch.tunnel_host.as_deref().unwrap_or("127.0.0.1");
        let local_host = launch.local_host.as_deref().unwrap_or("127.0.0.1");
        cmd.args(["--cluster", &spec.cluster, "--gateway-id", &spec.id])
            .arg("--tls-dir")
            .arg(&spec.tls_dir)
            .args([
                "--tunnel-addr",
                &format!("{tunnel_host}:{}", spec.tunnel_port),
            ])
            .args([
                "--outbound-addr",
                &format!("{local_host}:0"),
                "--admin-addr",
                &format!("{local_host}:0"),
            ])
            .arg("--ready-file")
            .arg(&ready)
            .args(&spec.extra_args)
            .args(link_transport(&spec.extra_args))
            .env("RUST_LOG", "info,meshfed_gateway=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if !spec.policy_dir.as_os_str().is_empty() {
            cmd.arg("--policy-dir").arg(&spec.policy_dir);
        }
        if let Some(d) = &spec.discovery {
            cmd.arg("--discovery-file").arg(d);
        }
        if let Some(token) = &launch.admin_token {
            let file = spec
                .work_dir
                .join(format!("{}-{}.admin-token", spec.cluster, spec.id));
            std::fs::write(&file, token)
                .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
            cmd.arg("--admin-token-file").arg(file);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHFED_") && key != "MESHFED_BIN_DIR" {
                cmd.env_remove(key);
            }
        }
        // No load balancer follows these gateways' readiness, so SIGTERM
        // drains at once (as before the drain grace existed); a test of the
        // grace passes `--drain-grace`, which overrides this.
        cmd.env("MESHFED_DRAIN_GRACE", "0s");
        // The tests' plaintext callers on loopback call short names and
        // are in `default`, as an edge site's operator declares its
        // callers' namespace; a test of the inference passes
        // `--caller-namespace=` (empty: unset).
        cmd.env("MESHFED_CALLER_NAMESPACE", "default");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting meshfed-gateway: {e}"));
        let addrs: ReadyAddrs = match wait_for(
            &format!("gateway {} {} ready", spec.cluster, spec.id),
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                }
                let text = std::fs::read_to_string(&ready).map_err(|e| e.to_string())?;
                serde_json::from_str(&text).map_err(|e| e.to_string())
            },
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                panic!("{e}");
            }
        };
        let addr = |k: &str| {
            *addrs
                .get(k)
                .unwrap_or_else(|| panic!("ready file lacks {k}"))
        };
        GatewayProcess {
            cluster: spec.cluster.clone(),
            id: spec.id.clone(),
            tunnel: addr("tunnel"),
            outbound: addr("outbound"),
            admin: addr("admin"),
            log,
            ready: addrs.clone(),
            child: Some(child),
            admin_token: launch.admin_token.clone(),
        }
    }

    /// A GET on the admin API; the body.
    pub fn admin_get(&self, path: &str) -> String {
        let Ok(mut s) = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let auth = self
            .admin_token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n{auth}\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// The value of a metric sample whose line contains every `needle`.
    pub fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        self.admin_get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// How many links to `cluster` are available.
    pub fn links_up(&self, cluster: &str) -> usize {
        let peers: serde_json::Value =
            serde_json::from_str(&self.admin_get("/peers")).unwrap_or_default();
        peers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["cluster"] == cluster && p["available"] == true)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits until `n` links to `cluster` are available.
    pub fn wait_links(&self, cluster: &str, n: usize) {
        if let Err(e) = wait_for(
            &format!("{} has {n} link(s) to {cluster}", self.cluster),
            Duration::from_secs(15),
            || {
                let up = self.links_up(cluster);
                if up >= n {
                    Ok(())
                } else {
                    Err(format!("{up} up; log:\n{}", self.log_tail()))
                }
            },
        ) {
            panic!("{e}");
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no drain.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns at once, while the gateway drains; see
    /// [`Self::exited`], or [`Self::terminate`] to wait for the exit.
    pub fn signal_term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// The exit status, if the process has exited (it is not waited for).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits for a clean exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let status = wait_for(
            "gateway exits after SIGTERM",
            Duration::from_secs(30),
            || {
                c.try_wait()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "still running".to_string())
            },
        );
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

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `Cluster` document.
pub fn cluster_yaml(name: &str, tunnel_ports: &[u16]) -> String {
    let gws: Vec<String> = tunnel_ports
        .iter()
        .map(|p| format!("'127.0.0.1:{p}'"))
        .collect();
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec: {{gateways: [{}]}}\n---\n",
        gws.join(", ")
    )
}

/// An endpoint address and its labels.
pub type LabeledEndpoint<'a> = (SocketAddr, Vec<(&'a str, &'a str)>);

/// Writes a static discovery file: service → endpoint addresses (with
/// labels).
pub fn discovery_file(path: &Path, services: &[(&str, Vec<LabeledEndpoint<'_>>)]) {
    let mut s = String::from("services:\n");
    for (svc, eps) in services {
        s.push_str(&format!("  {svc}:\n"));
        for (addr, labels) in eps {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            s.push_str(&format!(
                "    - address: {addr}\n      labels: {{{}}}\n",
                l.join(", ")
            ));
        }
    }
    std::fs::write(path, s).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Writes `text` to `path` atomically (write, then rename), as `git
/// checkout` or a ConfigMap swap would present it to a watcher.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// A GET of `path` through a gateway's outbound listener at `via`, with
/// `Host: host`, as a plaintext local caller. Returns the status, who
/// served it (the backend's `x-served-by`, else the body: a refusal's
/// text) and the gateway's `x-meshfed-error` reason, if any. Panics after
/// 10 s: a call that hangs is a failure.
pub async fn get_through(via: SocketAddr, host: &str, path: &str) -> (u16, String, Option<String>) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{via}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|e| panic!("building GET {path} for {host}: {e}"));
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("GET {host}{path} via {via} timed out"))
        .unwrap_or_else(|e| panic!("GET {host}{path} via {via} failed: {e}"));
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (reason, served) = (header("x-meshfed-error"), header("x-served-by"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let served = served.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    (status, served, reason)
}

/// An HTTP backend (HTTP/1.1 and HTTP/2) that names itself: every response
/// carries `x-served-by: <name>` and `x-seen-xfcc` (the
/// `x-forwarded-client-cert` it received); GET answers `<name>`; POST answers
/// `<name>:<bytes received>` after reading the whole body. Runs until the
/// returned handle is dropped.
pub async fn http_backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    http_backend_on("127.0.0.1:0", name).await
}

/// [`http_backend`] listening on `bind` (e.g. a network namespace's LAN).
pub async fn http_backend_on(
    bind: &str,
    name: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve_fn_on(bind, move |req: Request<Incoming>| async move {
        let method = req.method().clone();
        let xfcc = req
            .headers()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.map(|f| f.into_data()) {
                n += d.map(|d| d.len()).unwrap_or(0);
            }
        }
        let text = if method == hyper::Method::POST {
            format!("{name}:{n}")
        } else {
            name.to_string()
        };
        Response::builder()
            .header("x-served-by", name)
            .header("x-seen-xfcc", xfcc)
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_default()
    })
    .await
}

/// Serves `handler` over HTTP/1.1 and HTTP/2 on a loopback port until the
/// returned handle is dropped or aborted.
pub async fn serve_fn<F, Fut>(handler: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_fn_on("127.0.0.1:0", handler).await
}

/// [`serve_fn`] listening on `bind`.
pub async fn serve_fn_on<F, Fut>(
    bind: &str,
    handler: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("binding a backend: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Two clusters for a single-service test: `east` (one gateway, with
/// `east_args`) and `west` (one gateway) serving `service` (a short name in
/// `default`, exported) at `backend`. Returns once east's link to west is up.
pub fn two_clusters(
    service: &str,
    backend: SocketAddr,
    east_args: Vec<String>,
) -> (tempfile::TempDir, GatewayProcess, GatewayProcess) {
    two_clusters_with_policy(service, backend, east_args, "")
}

/// [`two_clusters`] with more policy for both gateways: `policy` is YAML
/// documents, added after the clusters and the export.
pub fn two_clusters_with_policy(
    service: &str,
    backend: SocketAddr,
    east_args: Vec<String>,
    policy_yaml: &str,
) -> (tempfile::TempDir, GatewayProcess, GatewayProcess) {
    let default = Launch::default();
    two_clusters_launched(service, backend, east_args, policy_yaml, &default, &default)
}

/// [`two_clusters_with_policy`] with each gateway started as its [`Launch`]
/// says, e.g. under a memory cgroup's prefix. The PKI is
/// `Pki { dir: <the returned dir> }`.
pub fn two_clusters_launched(
    service: &str,
    backend: SocketAddr,
    east_args: Vec<String>,
    policy_yaml: &str,
    east_launch: &Launch,
    west_launch: &Launch,
) -> (tempfile::TempDir, GatewayProcess, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {service}, namespace: default}}\n---\n{policy_yaml}",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let eps = dir.path().join("west.yaml");
    discovery_file(
        &eps,
        &[(&format!("{service}.default"), vec![(backend, vec![])])],
    );
    let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>, extra_args: Vec<String>| {
        GatewaySpec {
            cluster: cluster.into(),
            id: "gw-0".into(),
            tls_dir: pki.gateway(cluster, "gw-0"),
            policy_dir: policy.clone(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args,
        }
    };
    let west = GatewayProcess::start_with(
        &spec("west", west_port, Some(eps.clone()), vec![]),
        west_launch,
    );
    let east = GatewayProcess::start_with(&spec("east", east_port, None, east_args), east_launch);
    east.wait_links("west", 1);
    (dir, east, west)
}
