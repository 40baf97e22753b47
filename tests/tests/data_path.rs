//! Hostile callers and peers against the data path (issue 21): what a
//! caller or a peer sends must be authorized as it is forwarded, must never
//! get a healthy endpoint blamed, and must not mint upstream state. Real
//! gateway processes (east, west) with an HTTP/1.1-only backend behind west
//! that records every request and connection it sees; peers are the test
//! double of `support/peer.rs`; callers are raw TCP or hyper.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/peer.rs"]
mod peer;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_gateway::wire::frame::{ALPN, Frame, Refusal};
use meshfed_tests::federation::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVICE: &str = "reviews.default.svc.cluster.local";

/// What the backend saw: request targets and accepted connections.
#[derive(Debug, Default)]
struct Seen {
    targets: Vec<String>,
    connections: usize,
}

/// An HTTP/1.1-only backend (it does not understand HTTP/2, as many
/// services do not). GET answers `reviews`; POST reads the whole body.
async fn h1_backend() -> (SocketAddr, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            record.lock().unwrap().connections += 1;
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let target = req
                            .uri()
                            .path_and_query()
                            .map_or("", |p| p.as_str())
                            .to_string();
                        record.lock().unwrap().targets.push(target);
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("x-served-by", "reviews")
                                .body(Full::new(Bytes::from_static(b"reviews")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen, task)
}

/// East and west, each one gateway; `reviews.default` (exported) runs in
/// west behind [`h1_backend`]. `policy` is added as it is.
struct Mesh {
    dir: TempDir,
    east: GatewayProcess,
    west: GatewayProcess,
    seen: Arc<Mutex<Seen>>,
    _backend: tokio::task::JoinHandle<()>,
}

impl Mesh {
    async fn start(policy: &str) -> Mesh {
        let (backend, seen, task) = h1_backend().await;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (east_port, west_port) = (free_udp_port(), free_udp_port());
        let repo = dir.path().join("policy");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(
            repo.join("mesh.yaml"),
            format!(
                "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: reviews, namespace: default}}\n---\n{policy}",
                cluster_yaml("east", &[east_port]),
                cluster_yaml("west", &[west_port]),
            ),
        )
        .unwrap();
        let eps = dir.path().join("west-endpoints.yaml");
        discovery_file(
            &eps,
            &[("reviews.default", vec![(backend, vec![("app", "reviews")])])],
        );
        let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>| GatewaySpec {
            cluster: cluster.into(),
            id: "gw-0".into(),
            tls_dir: pki.gateway(cluster, "gw-0"),
            policy_dir: repo.clone(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args: vec![],
        };
        let west = GatewayProcess::start(&spec("west", west_port, Some(eps)));
        let east = GatewayProcess::start(&spec("east", east_port, None));
        east.wait_links("west", 1);
        Mesh {
            dir,
            east,
            west,
            seen,
            _backend: task,
        }
    }

    fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().targets.clone()
    }

    fn connections(&self) -> usize {
        self.seen.lock().unwrap().connections
    }

    /// Endpoints west's outlier detection has ejected, ever.
    fn ejections(&self) -> f64 {
        self.west.metric("meshfed_outlier_ejections_total", &[])
    }
}

/// What a raw caller got back: status (0 if nothing) and the gateway's
/// reason header.
#[derive(Debug)]
struct Raw {
    status: u16,
    reason: String,
}

/// Writes `bytes` to `gw`'s outbound listener; with `half_close`, then
/// shuts down its sending side; reads whatever comes back.
async fn raw(gw: &GatewayProcess, bytes: &[u8], half_close: bool) -> Raw {
    let mut s = tokio::net::TcpStream::connect(gw.outbound).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no answer in 10 s");
    let text = String::from_utf8_lossy(&out);
    Raw {
        status: text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        reason: text
            .lines()
            .find_map(|l| l.strip_prefix("x-meshfed-error: "))
            .unwrap_or("")
            .to_string(),
    }
}

/// A GET for `/` with `Host: host`, on its own connection.
async fn get(gw: &GatewayProcess, host: &str) -> Raw {
    raw(
        gw,
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        false,
    )
    .await
}

/// An OPEN for `reviews` with `path`, from a peer double holding a real
/// certificate of east; the first frame west answers.
async fn peer_get(mesh: &Mesh, path: &str) -> Frame {
    let pki = Pki {
        dir: mesh.dir.path().to_path_buf(),
    };
    let endpoint = peer::client(
        peer::creds_from_dir(&pki.gateway("east", "probe")),
        ALPN,
        false,
    );
    let conn = peer::connect(&endpoint, mesh.west.tunnel, "west")
        .await
        .unwrap();
    let Frame::Open(mut open) = peer::get_open(SERVICE, "reviews") else {
        unreachable!()
    };
    if let Some(head) = open.http.as_mut() {
        head.path = path.into();
    }
    let answer = peer::exchange(&conn, &peer::encode(&Frame::Open(open))).await;
    conn.close(0u32.into(), b"done");
    answer
}

/// DENY on exactly `/admin`, everything else allowed.
const DENY_ADMIN_EXACT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin]}}]
";

/// A peer's PATH `/admin#x` was authorized as `/admin#x` (no DENY matches)
/// and forwarded as `/admin` (the URI parser drops the fragment); a
/// fragment is now refused, so what is authorized is what is forwarded. A
/// local caller's fragment is dropped by the parser before authorization
/// sees the path, so it meets the DENY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_in_a_peers_path_is_refused_and_never_reaches_a_denied_path() {
    let mesh = Mesh::start(DENY_ADMIN_EXACT).await;
    for path in ["/admin#x", "/admin#/../x", "/ok#/../admin"] {
        match peer_get(&mesh, path).await {
            Frame::Error(e) => {
                assert_eq!(e.refusal, Refusal::BadRequest, "{path}: {e:?}");
                assert!(e.message.contains("fragment"), "{path}: {}", e.message);
            }
            other => panic!("{path}: expected a refusal, got {other:?}"),
        }
    }
    match peer_get(&mesh, "/admin").await {
        Frame::Response(head) => assert_eq!(head.status, 403),
        other => panic!("expected the DENY, got {other:?}"),
    }
    match peer_get(&mesh, "/reviews?x=1").await {
        Frame::Response(head) => assert_eq!(head.status, 200),
        other => panic!("expected a response, got {other:?}"),
    }
    assert_eq!(
        mesh.targets(),
        vec!["/reviews?x=1".to_string()],
        "only the allowed call reached the backend"
    );
    assert!(
        mesh.west
            .metric("meshfed_refusals_total", &["stream", "bad-request"])
            >= 3.0
    );
    // Local callers, on both gateways (west serves reviews itself, east
    // sends it over the link).
    for gw in [&mesh.west, &mesh.east] {
        for target in ["/admin#x", "/admin#/../x"] {
            let r = raw(
                gw,
                format!("GET {target} HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
                false,
            )
            .await;
            assert!(
                matches!(r.status, 400 | 403),
                "{} {target}: {r:?}",
                gw.cluster
            );
        }
    }
    assert_eq!(mesh.targets().len(), 1, "{:?}", mesh.targets());
}

/// Callers that break their own request bodies (bad chunked framing) or
/// abandon them (an upload that stops early) got 502 `upstream-reset`, and
/// five of them ejected the endpoint from every cluster. They are the
/// caller's fault: 400 `bad-request` (499 `source-cancelled` for an
/// abandoned one, which its caller rarely reads), never counted against the
/// endpoint, whether the caller is local to the endpoint's gateway or
/// behind a peer gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_break_or_abandon_their_bodies_never_get_the_endpoint_ejected() {
    let mesh = Mesh::start("").await;
    assert_eq!(get(&mesh.west, "reviews").await.status, 200);
    let malformed = b"POST /upload HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\nworld\r\n0\r\n\r\n";
    let mut stops_early =
        b"POST /upload HTTP/1.1\r\nHost: reviews\r\nContent-Length: 100000\r\n\r\n".to_vec();
    stops_early.extend_from_slice(&[b'x'; 2000]);
    for gw in [&mesh.west, &mesh.east] {
        for _ in 0..6 {
            let r = raw(gw, malformed, false).await;
            assert_eq!(r.status, 400, "{}: {r:?}", gw.cluster);
            assert_eq!(r.reason, "bad-request", "{}: {r:?}", gw.cluster);
        }
        for _ in 0..6 {
            // The caller stops sending but still reads: it hears it was
            // the one to stop (or nothing), never that the endpoint failed.
            let r = raw(gw, &stops_early, true).await;
            assert!(matches!(r.status, 0 | 400 | 499), "{}: {r:?}", gw.cluster);
            // One that hangs up outright.
            let mut s = tokio::net::TcpStream::connect(gw.outbound).await.unwrap();
            s.write_all(&stops_early).await.unwrap();
            drop(s);
        }
    }
    // Every request above reached the backend as far as its body went.
    assert!(
        mesh.targets().len() >= 12,
        "the bodies did reach the endpoint: {:?}",
        mesh.targets().len()
    );
    assert_eq!(mesh.ejections(), 0.0, "west ejected its endpoint");
    assert!(
        !mesh.west.admin_get("/config_dump").contains("remaining_ms"),
        "an ejection is listed: {}",
        mesh.west.admin_get("/config_dump")
    );
    // Nothing was announced unhealthy: both clusters' callers are served.
    for gw in [&mesh.west, &mesh.east] {
        for _ in 0..3 {
            assert_eq!(get(gw, "reviews").await.status, 200, "{}", gw.cluster);
        }
    }
    assert!(
        mesh.west.metric(
            "meshfed_requests_total",
            &["direction=\"inbound\"", "response_code=\"502\""]
        ) == 0.0
            && mesh.west.metric(
                "meshfed_requests_total",
                &["direction=\"outbound\"", "response_code=\"502\""]
            ) == 0.0,
        "no caller's fault is recorded as a bad gateway"
    );
}

/// An HTTP/2 caller (prior knowledge, as gRPC clients and `curl
/// --http2-prior-knowledge` are) of a local HTTP/1.1-only service got 502
/// `http2 error` (the gateway spoke HTTP/2 to the endpoint), and the
/// failures ejected it. The gateway speaks the endpoint's protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_of_a_local_http1_service_is_served_and_ejects_nothing() {
    let mesh = Mesh::start("").await;
    for gw in [&mesh.west, &mesh.east] {
        let tcp = tokio::net::TcpStream::connect(gw.outbound).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        for i in 0..7 {
            let req = Request::builder()
                .uri(format!("http://reviews/x{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
                .await
                .expect("no answer in 10 s")
                .unwrap();
            let status = resp.status();
            let reason = resp.headers().get("x-meshfed-error").cloned();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "{}: {reason:?} {body:?}", gw.cluster);
            assert_eq!(&body[..], b"reviews");
        }
        // A body travels too.
        let req = Request::builder()
            .method("POST")
            .uri("http://reviews/post")
            .body(Full::new(Bytes::from_static(b"{\"stars\": 5}")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{}", gw.cluster);
    }
    assert_eq!(mesh.targets().len(), 16, "{:?}", mesh.targets());
    assert_eq!(mesh.ejections(), 0.0);
}

/// Each `Host:` port a caller chose made a new upstream cluster with its
/// own pool and a backend connection of its own, never retired. The port
/// is the caller's to choose; pools are keyed by the ports the snapshot
/// declares, so any number of ports share one pool (here: sequential
/// calls, one connection, give or take one being returned as the next call
/// starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_chosen_host_ports_share_one_upstream_pool() {
    let mesh = Mesh::start("").await;
    for i in 0..30u16 {
        for gw in [&mesh.west, &mesh.east] {
            let r = get(gw, &format!("reviews:{}", 20_000 + i)).await;
            assert_eq!(r.status, 200, "{}: {r:?}", gw.cluster);
        }
    }
    assert_eq!(mesh.targets().len(), 60);
    assert!(
        mesh.connections() <= 4,
        "60 calls on 30 ports opened {} backend connections",
        mesh.connections()
    );
}
