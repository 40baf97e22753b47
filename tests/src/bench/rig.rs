//! What the data-path scenarios share: a backend, a meshfed pair (client →
//! gateway A → QUIC → gateway B → backend), an HAProxy pair (HTTP/1.1 or
//! h2c in, HTTP/2 over mutual TLS 1.3 between them, one thread each, the
//! same CA as meshfed's), `/proc` readings, a closed-loop client, and the
//! median of repeated runs.
//!
//! Everything listens on loopback and is started here; the pieces stop when
//! dropped. This module measures nothing by itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::federation::{
    GatewayProcess, GatewaySpec, Launch, Pki, cluster_yaml, discovery_file, free_udp_port,
};
use crate::relay::{Impairment, Relay};

/// Size of the HTTP/1.1 response body (issue 8: 1 KB).
pub const BODY_BYTES: usize = 1024;

/// A runtime on its own threads, kept apart from the measured processes'
/// CPU accounting (they are other processes) but sharing the machine.
pub fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// An in-process backend on its own one-thread runtime: `GET` answers 1 KB,
/// a gRPC `POST` answers an empty message with `grpc-status: 0` trailers;
/// TCP port `sink` answers each stream's 8-byte length prefix with an
/// 8-byte count once that many bytes have arrived (for bulk transfers).
#[derive(Debug)]
pub struct Backend {
    pub http: SocketAddr,
    pub sink: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl Backend {
    pub fn start() -> anyhow::Result<Backend> {
        let rt = runtime(1)?;
        let (http, sink) = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let s = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((l, s))
        })?;
        let (http_addr, sink_addr) = (http.local_addr()?, sink.local_addr()?);
        rt.spawn(serve_http(http));
        rt.spawn(serve_sink(sink));
        Ok(Backend {
            http: http_addr,
            sink: sink_addr,
            _rt: rt,
        })
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve_http(listener: tokio::net::TcpListener) {
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    let grpc = req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    let _ = req.into_body().collect().await;
                    let resp: Response<BoxBody> = if grpc {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let mut r = Response::new(BoxBody::new(StreamBody::new(
                            tokio_stream::iter(frames),
                        )));
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        r
                    } else {
                        Response::new(BoxBody::new(Full::new(body)))
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn serve_sink(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let want = u64::from_be_bytes(len);
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            while got < want {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n as u64,
                }
            }
            let _ = s.write_all(&got.to_be_bytes()).await;
            // Idle until the client closes (holds a stream open).
            let _ = s.read(&mut buf).await;
        });
    }
}

/// Sends `bytes` through `to` to the backend's sink as one TCP stream;
/// returns the throughput in MB/s (10^6 bytes).
pub async fn bulk_transfer(to: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = tokio::net::TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    let chunk = vec![0u8; 256 * 1024];
    let start = Instant::now();
    s.write_all(&bytes.to_be_bytes()).await?;
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    let mut ack = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(120), s.read_exact(&mut ack))
        .await
        .context("no acknowledgement from the sink within 120 s")??;
    let secs = start.elapsed().as_secs_f64();
    if u64::from_be_bytes(ack) != bytes {
        bail!(
            "the sink counted {} bytes of {bytes}",
            u64::from_be_bytes(ack)
        );
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// A meshfed pair: `east` (A, the caller's side) and `west` (B, in front of
/// the backend), exporting `bench.default` (HTTP) and `sink.default` (TCP,
/// mapped at A as opaque TCP). With `impairment`, A reaches B through a
/// UDP [`Relay`]: the Cluster resource names the relay's port as west's.
#[derive(Debug)]
pub struct MeshfedPair {
    pub a: GatewayProcess,
    pub b: GatewayProcess,
    /// A's mapped TCP port for `sink.default`.
    pub a_sink: SocketAddr,
    pub relay: Option<Relay>,
    _dir: PathBuf,
}

pub const AUTHORITY: &str = "bench.default";

/// The command a pair's process runs under, by side (`east`/`west` for
/// meshfed, `a`/`b` for HAProxy), e.g. `valgrind --tool=callgrind`; empty
/// for none. It must `exec` the process (valgrind and `env` do), so that
/// the child's pid is the measured process's.
pub type Wrap<'a> = &'a dyn Fn(&str) -> Vec<String>;

/// No wrapper: the processes run as themselves.
pub fn unwrapped(_side: &str) -> Vec<String> {
    Vec::new()
}

/// The gateways log at `info`, a deployment's default, not at the test
/// harness's `debug`: per-request debug lines would be measured as the
/// data path's cost (HAProxy runs without request logs).
pub fn deployed_log_level(_side: &str) -> Vec<String> {
    vec!["env".to_string(), "RUST_LOG=info".to_string()]
}

impl MeshfedPair {
    pub fn start(
        dir: &Path,
        pki: &Pki,
        backend: &Backend,
        impairment: Option<Impairment>,
        gateway_args: &[String],
    ) -> anyhow::Result<MeshfedPair> {
        Self::start_wrapped(
            dir,
            pki,
            backend,
            impairment,
            gateway_args,
            &deployed_log_level,
        )
    }

    /// [`MeshfedPair::start`], each gateway run under `wrap(cluster)`.
    pub fn start_wrapped(
        dir: &Path,
        pki: &Pki,
        backend: &Backend,
        impairment: Option<Impairment>,
        gateway_args: &[String],
        wrap: Wrap<'_>,
    ) -> anyhow::Result<MeshfedPair> {
        std::fs::create_dir_all(dir)?;
        let (a_port, b_port) = (free_udp_port(), free_udp_port());
        let relay = match impairment {
            Some(imp) => Some(Relay::udp(
                "127.0.0.1:0".parse()?,
                SocketAddr::from(([127, 0, 0, 1], b_port)),
                imp,
            )?),
            None => None,
        };
        let b_advertised = relay.as_ref().map_or(b_port, |r| r.local_addr().port());
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy)?;
        std::fs::write(
            policy.join("p.yaml"),
            format!(
                "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: bench, namespace: default}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: sink, namespace: default}}\n",
                cluster_yaml("east", &[a_port]),
                cluster_yaml("west", &[b_advertised])
            ),
        )?;
        let eps = dir.join("west.yaml");
        discovery_file(
            &eps,
            &[
                ("bench.default", vec![(backend.http, vec![])]),
                ("sink.default", vec![(backend.sink, vec![])]),
            ],
        );
        let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>, extra: Vec<String>| {
            GatewaySpec {
                cluster: cluster.into(),
                id: "gw-0".into(),
                tls_dir: pki.gateway(cluster, "gw-0"),
                policy_dir: policy.clone(),
                discovery,
                tunnel_port: port,
                work_dir: dir.to_path_buf(),
                extra_args: extra,
            }
        };
        let launch = |cluster: &str| Launch {
            prefix: wrap(cluster),
            ..Launch::default()
        };
        let b = GatewayProcess::start_with(
            &spec("west", b_port, Some(eps), gateway_args.to_vec()),
            &launch("west"),
        );
        let mut a_args = vec![
            "--tcp-port-map".into(),
            format!("0=sink.default:{}", backend.sink.port()),
            // Scenario 2 holds 10,000 streams through this port: above the
            // default caller-connection limit (sized for stalled HTTP callers
            // under 128 MiB), as a gateway serving that many would be set.
            "--max-connections".into(),
            "16384".into(),
        ];
        a_args.extend_from_slice(gateway_args);
        let a = GatewayProcess::start_with(&spec("east", a_port, None, a_args), &launch("east"));
        a.wait_links("west", 1);
        let key = format!("tcp:sink.default:{}", backend.sink.port());
        let a_sink = *a
            .ready
            .get(&key)
            .with_context(|| format!("gateway A's ready file lacks {key}: {:?}", a.ready))?;
        Ok(MeshfedPair {
            a,
            b,
            a_sink,
            relay,
            _dir: dir.to_path_buf(),
        })
    }

    pub fn pids(&self) -> [u32; 2] {
        [self.a.pid().unwrap_or(0), self.b.pid().unwrap_or(0)]
    }
}

/// Whether Debian's haproxy is on the PATH.
pub fn haproxy_available() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `maxconn` haproxy can honour under this process's open-files limit
/// (it needs about two descriptors per connection and refuses to start when
/// it cannot raise the limit it computes), at most 30,000.
fn haproxy_maxconn() -> u64 {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1024);
    (soft.saturating_sub(200) / 2).clamp(100, 30_000)
}

pub const HAPROXY_MISSING: &str =
    "haproxy is not installed (`apt-get install -y haproxy`); the HAProxy baseline is skipped";

/// Two haproxy processes, `nbthread 1` each:
/// - `http`: A's HTTP frontend (HTTP/1.1, or h2c by prior knowledge) →
///   HTTP/2 over mutual TLS 1.3 → B → the backend (HTTP/1.1; h2 for gRPC);
/// - `tcp`: A's TCP frontend → TLS 1.3 (mutual) → B → the backend's sink.
///
/// With `link`, A reaches B through a TCP [`Relay`].
#[derive(Debug)]
pub struct HaproxyPair {
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    pub relay: Option<Relay>,
    /// The two configurations, for the docs.
    pub configs: [String; 2],
    children: Vec<Child>,
}

impl HaproxyPair {
    pub fn start(
        dir: &Path,
        pki: &Pki,
        backend: &Backend,
        link: Option<Impairment>,
    ) -> anyhow::Result<HaproxyPair> {
        Self::start_wrapped(dir, pki, backend, link, &unwrapped, Duration::from_secs(10))
    }

    /// [`HaproxyPair::start`], each process run under `wrap("a")` or
    /// `wrap("b")`, waiting up to `ready_within` (scaled by
    /// `MESHFED_TEST_PATIENCE`) for both to listen.
    pub fn start_wrapped(
        dir: &Path,
        pki: &Pki,
        backend: &Backend,
        link: Option<Impairment>,
        wrap: Wrap<'_>,
        ready_within: Duration,
    ) -> anyhow::Result<HaproxyPair> {
        std::fs::create_dir_all(dir)?;
        let pem = |cluster: &str| -> anyhow::Result<PathBuf> {
            let creds = pki.gateway(cluster, "haproxy");
            let mut text = std::fs::read_to_string(creds.join("cert.pem"))?;
            text.push_str(&std::fs::read_to_string(
                pki.cluster_ca(cluster).join("ca.pem"),
            )?);
            text.push_str(&std::fs::read_to_string(creds.join("key.pem"))?);
            let path = dir.join(format!("{cluster}.pem"));
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let (a_pem, b_pem) = (pem("east")?, pem("west")?);
        // The trust bundle that came with east's credentials, issued above.
        let ca = pki
            .dir
            .join("creds")
            .join("east-haproxy")
            .join("bundle.pem");
        let port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (a_http, a_tcp, b_http, b_tcp) = (port()?, port()?, port()?, port()?);
        let relay_http = match link {
            Some(imp) => Some(Relay::tcp(
                "127.0.0.1:0".parse()?,
                SocketAddr::from(([127, 0, 0, 1], b_http)),
                imp,
            )?),
            None => None,
        };
        let b_http_dial = relay_http
            .as_ref()
            .map_or(b_http, |r| r.local_addr().port());
        let common = format!(
            "global\n  nbthread 1\n  maxconn {}\n  tune.ssl.default-dh-param 2048\n\
                      defaults\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n",
            haproxy_maxconn()
        );
        let a_cfg = format!(
            "{common}\
frontend a_http\n  mode http\n  bind 127.0.0.1:{a_http}\n  default_backend to_b\n\
backend to_b\n  mode http\n  http-reuse always\n  server b 127.0.0.1:{b_http_dial} ssl verify required ca-file {ca} crt {a_pem} alpn h2 ssl-min-ver TLSv1.3\n\
frontend a_tcp\n  mode tcp\n  bind 127.0.0.1:{a_tcp}\n  default_backend to_b_tcp\n\
backend to_b_tcp\n  mode tcp\n  server b 127.0.0.1:{b_tcp} ssl verify required ca-file {ca} crt {a_pem} ssl-min-ver TLSv1.3\n",
            ca = ca.display(),
            a_pem = a_pem.display(),
        );
        let b_cfg = format!(
            "{common}\
frontend b_http\n  mode http\n  bind 127.0.0.1:{b_http} ssl crt {b_pem} ca-file {ca} verify required alpn h2 ssl-min-ver TLSv1.3\n  use_backend app_h2 if {{ req.hdr(content-type) -m beg application/grpc }}\n  default_backend app\n\
backend app\n  mode http\n  http-reuse always\n  server app {app}\n\
backend app_h2\n  mode http\n  server app {app} proto h2\n\
frontend b_tcp\n  mode tcp\n  bind 127.0.0.1:{b_tcp} ssl crt {b_pem} ca-file {ca} verify required ssl-min-ver TLSv1.3\n  default_backend sink\n\
backend sink\n  mode tcp\n  server sink {sink}\n",
            ca = ca.display(),
            b_pem = b_pem.display(),
            app = backend.http,
            sink = backend.sink,
        );
        let mut children = Vec::new();
        for (name, cfg) in [("b", &b_cfg), ("a", &a_cfg)] {
            let path = dir.join(format!("haproxy-{name}.cfg"));
            std::fs::write(&path, cfg)?;
            let check = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()?;
            if !check.status.success() {
                bail!(
                    "haproxy rejects {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&check.stderr)
                );
            }
            let log = std::fs::File::create(dir.join(format!("haproxy-{name}.log")))?;
            let mut cmd = match wrap(name).split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg("haproxy");
                    c
                }
                None => Command::new("haproxy"),
            };
            children.push(
                cmd.arg("-db")
                    .arg("-f")
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .context("starting haproxy")?,
            );
        }
        let pair = HaproxyPair {
            http: SocketAddr::from(([127, 0, 0, 1], a_http)),
            tcp: SocketAddr::from(([127, 0, 0, 1], a_tcp)),
            relay: relay_http,
            configs: [a_cfg, b_cfg],
            children,
        };
        for addr in [pair.http, pair.tcp] {
            crate::wait_for("haproxy listening", ready_within, || {
                std::net::TcpStream::connect(addr).map(|_| ())
            })?;
        }
        Ok(pair)
    }

    /// A's and B's process ids.
    pub fn pids(&self) -> [u32; 2] {
        [self.children[1].id(), self.children[0].id()]
    }
}

impl Drop for HaproxyPair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time (user + system) of a process so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may hold spaces: state is 3rd.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based); `rest` starts at 3.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// USER_HZ: 100 on every Linux this runs on (sysconf would need libc).
fn clock_ticks() -> f64 {
    100.0
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The soft open-files limit of this process (`/proc/self/limits`).
pub fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        })
        .unwrap_or(1024)
}

/// The median of `v` (the lower middle for an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// Closed loop: `workers` HTTP/1.1 keep-alive connections, each sending
/// `GET /` as soon as the previous answer arrived, for `duration`; returns
/// (completed requests per second, failures).
pub async fn closed_loop(
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let deadline = Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            'conn: while Instant::now() < deadline {
                let Ok(stream) = tokio::net::TcpStream::connect(target).await else {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                        .await
                else {
                    failed += 1;
                    continue;
                };
                let driver = tokio::spawn(conn);
                while Instant::now() < deadline {
                    let req = Request::get("/")
                        .header("host", AUTHORITY)
                        .body(Full::new(Bytes::new()));
                    let Ok(req) = req else { break 'conn };
                    match send.send_request(req).await {
                        Ok(resp) if resp.status().is_success() => {
                            if resp.into_body().collect().await.is_ok() {
                                ok += 1;
                            } else {
                                failed += 1;
                            }
                        }
                        _ => {
                            failed += 1;
                            driver.abort();
                            continue 'conn;
                        }
                    }
                }
                driver.abort();
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0u64, 0u64);
    while let Some(r) = set.join_next().await {
        let (o, f) = r?;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / duration.as_secs_f64(), failed))
}
