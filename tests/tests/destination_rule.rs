//! DestinationRule behaviour at the endpoints, with a real gateway process
//! and real backends (plain HTTP, and rustls servers for endpoint TLS):
//! load balancing, outlier detection, connection-pool overflow, TLS to
//! endpoints and subset-level overrides.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_tests::federation::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;

const SERVICE: &str = "ratings.default.svc.cluster.local";

/// One gateway of cluster `east` with `policy` and `ratings` endpoints
/// (address, labels); the PKI is returned for backends that need
/// certificates.
fn gateway(
    dir: &Path,
    pki: &Pki,
    policy: &str,
    endpoints: Vec<LabeledEndpoint<'_>>,
) -> GatewayProcess {
    gateway_with(dir, pki, policy, endpoints, vec![])
}

/// [`gateway`] with more command-line arguments.
fn gateway_with(
    dir: &Path,
    pki: &Pki,
    policy: &str,
    endpoints: Vec<LabeledEndpoint<'_>>,
    extra_args: Vec<String>,
) -> GatewayProcess {
    let policy_dir = dir.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("ratings.yaml"), policy).unwrap();
    let eps = dir.join("eps.yaml");
    discovery_file(&eps, &[("ratings.default", endpoints)]);
    GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir,
        discovery: Some(eps),
        tunnel_port: free_udp_port(),
        work_dir: dir.to_path_buf(),
        extra_args,
    })
}

fn dr(traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: ratings}}\nspec:\n  host: ratings\n  trafficPolicy:\n{traffic_policy}"
    )
}

/// A GET through the gateway: status, body, and the named response header.
async fn get(via: SocketAddr, headers: &[(&str, &str)]) -> (u16, String, BTreeMap<String, String>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::get(format!("http://{via}/")).header("host", "ratings");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("no answer within 20 s")
    .unwrap();
    let status = resp.status().as_u16();
    let h = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_evenly_over_three_endpoints() {
    let (a, _ta) = http_backend("a").await;
    let (b, _tb) = http_backend("b").await;
    let (c, _tc) = http_backend("c").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let gw = gateway(
        dir.path(),
        &pki,
        &dr("    loadBalancer: {simple: ROUND_ROBIN}\n"),
        vec![(a, vec![]), (b, vec![]), (c, vec![])],
    );
    let mut counts = BTreeMap::<String, usize>::new();
    for _ in 0..300 {
        let (status, body, _) = get(gw.outbound, &[]).await;
        assert_eq!(status, 200);
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("a".into(), 100), ("b".into(), 100), ("c".into(), 100)])
    );
}

/// A backend that answers 500 and counts its requests.
async fn failing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let (addr, _task) = serve_fn(move |_req: Request<Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        async move {
            hyper::Response::builder()
                .status(500)
                .body(Full::new(Bytes::from_static(b"bad")))
                .unwrap()
        }
    })
    .await;
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_5xx_is_ejected_after_n_errors_and_returns_after_base_ejection_time() {
    let (good, _t) = http_backend("good").await;
    let (bad, bad_hits) = failing_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let gw = gateway(
        dir.path(),
        &pki,
        &dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 2s, maxEjectionPercent: 100}\n",
        ),
        vec![(good, vec![]), (bad, vec![])],
    );
    // Round robin alternates until the third 500 ejects the bad endpoint.
    let mut ejected_at = None;
    for _ in 0..30 {
        let (status, _, _) = get(gw.outbound, &[]).await;
        if status == 500 && bad_hits.load(Ordering::SeqCst) == 3 && ejected_at.is_none() {
            ejected_at = Some(Instant::now());
        }
        if ejected_at.is_some() {
            break;
        }
    }
    let ejected_at = ejected_at.expect("the bad endpoint never reached 3 errors");
    // Ejected: only the good endpoint answers now.
    for _ in 0..10 {
        let (status, body, _) = get(gw.outbound, &[]).await;
        assert_eq!((status, body.as_str()), (200, "good"));
    }
    assert_eq!(bad_hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        gw.metric(
            "meshfed_outlier_ejections_total",
            &[SERVICE, "consecutive_5xx"]
        ),
        1.0
    );
    let dump = gw.admin_get("/config_dump");
    assert!(
        dump.contains(&bad.to_string()),
        "ejection not in /config_dump"
    );
    // Back after baseEjectionTime (plus up to one interval).
    let deadline = ejected_at + Duration::from_secs(8);
    while bad_hits.load(Ordering::SeqCst) == 3 {
        assert!(
            Instant::now() < deadline,
            "the ejected endpoint never came back"
        );
        let _ = get(gw.outbound, &[]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_after = ejected_at.elapsed();
    assert!(back_after >= Duration::from_millis(1800), "{back_after:?}");
    assert!(back_after < Duration::from_secs(5), "{back_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_overflow_answers_a_fast_503_naming_the_limit_while_the_backend_holds_requests() {
    let release = Arc::new(Semaphore::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let (r, s) = (release.clone(), seen.clone());
    let (backend, _task) = serve_fn(move |_req: Request<Incoming>| {
        let (r, s) = (r.clone(), s.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            r.acquire().await.unwrap().forget();
            hyper::Response::new(Full::new(Bytes::from_static(b"held")))
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let gw = gateway(
        dir.path(),
        &pki,
        &dr("    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n"),
        vec![(backend, vec![])],
    );
    let outbound = gw.outbound;
    let first = tokio::spawn(async move { get(outbound, &[]).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The connection is held: of two more, one waits and one overflows.
    let started = Instant::now();
    let second = tokio::spawn(async move { get(outbound, &[]).await });
    let third = tokio::spawn(async move { get(outbound, &[]).await });
    let overflowed = loop {
        if second.is_finished() {
            break (second.await.unwrap(), third);
        }
        if third.is_finished() {
            break (third.await.unwrap(), second);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no request overflowed within 2 s: the pool made it wait"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let ((status, _, headers), waiting) = overflowed;
    assert_eq!(status, 503);
    assert_eq!(headers["x-meshfed-overflow"], "http1MaxPendingRequests");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert_eq!(headers["x-meshfed-error"], "overloaded");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "nothing else reached the backend"
    );
    // At least once: the source's default retry policy (503) may try again,
    // and each try overflows too.
    let overflows = gw.metric(
        "meshfed_upstream_overflow_total",
        &[SERVICE, "http1MaxPendingRequests"],
    );
    assert!(overflows >= 1.0, "{overflows}");
    // Released, the held and the waiting request both complete.
    release.add_permits(2);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(waiting.await.unwrap().0, 200);
}

/// A GET of `path` for ratings through `via`: the status.
async fn status_of(via: SocketAddr, path: &str) -> u16 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{via}{path}"))
        .header("host", "ratings")
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("no answer within 20 s")
        .unwrap()
        .status()
        .as_u16()
}

/// A call the source gives up on (its route timeout) while the endpoint
/// hangs must not keep the destination's only pooled connection: the
/// destination gateway stops waiting when the source stops reading, so the
/// next call gets the connection instead of waiting behind a dead one.
/// Across clusters (east → west) and locally (west → its own endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_to_a_hung_endpoint_frees_its_pool_slot() {
    let (backend, _task) = serve_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/hang" {
            std::future::pending::<()>().await;
        }
        hyper::Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    let policy = format!(
        "{}---\n{}",
        dr("    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - timeout: 500ms\n    retries: {attempts: 0}\n    route: [{destination: {host: ratings}}]\n",
    );
    let (_dir, east, west) = two_clusters_with_policy("ratings", backend, vec![], &policy);

    for (via, name) in [
        (east.outbound, "east → west"),
        (west.outbound, "west → west"),
    ] {
        for round in 0..3 {
            assert_eq!(status_of(via, "/hang").await, 504, "{name}, round {round}");
            let t = Instant::now();
            assert_eq!(
                status_of(via, "/ok").await,
                200,
                "{name}, round {round}: the hung call still holds the only connection"
            );
            assert!(
                t.elapsed() < Duration::from_millis(450),
                "{name}: {:?}",
                t.elapsed()
            );
        }
    }
    let cancelled = west.metric(
        "meshfed_requests_total",
        &["response_code=\"499\"", "reason=\"source-cancelled\""],
    );
    assert_eq!(cancelled, 3.0, "west counts each call east gave up on");
}

/// Workload credentials for a backend: `ratings` in `default`, with the
/// service's DNS name, issued by east's CA.
fn backend_creds(dir: &Path, pki: &Pki) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let out = dir.join("creds/ratings");
    certs(&[
        "workload",
        "--ca",
        &pki.cluster_ca("east").to_string_lossy(),
        "--namespace",
        "default",
        "--service-account",
        "ratings",
        "--dns",
        SERVICE,
        "--out",
        &out.to_string_lossy(),
    ]);
    let chain = CertificateDer::pem_file_iter(out.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(out.join("key.pem")).unwrap();
    (chain, key)
}

/// An HTTPS backend with the workload certificate; with `require_client`,
/// it refuses clients without a certificate chained to the anchor. Every
/// response says `tls-ok`.
async fn tls_backend(dir: &Path, pki: &Pki, require_client: bool) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = backend_creds(dir, pki);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.dir.join("ca/root/ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"tls-ok",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_reaches_a_backend_requiring_a_mesh_client_certificate_and_a_subset_can_turn_tls_off()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let backend = tls_backend(dir.path(), &pki, true).await;
    // The top level says ISTIO_MUTUAL; the `plain` subset overrides it with
    // DISABLE, for that subset only.
    let policy = format!(
        "{}  subsets:\n  - name: mesh\n    labels: {{app: ratings}}\n  - name: plain\n    labels: {{app: ratings}}\n    trafficPolicy: {{tls: {{mode: DISABLE}}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{{headers: {{x-subset: {{exact: plain}}}}}}]\n    route: [{{destination: {{host: ratings, subset: plain}}}}]\n  - route: [{{destination: {{host: ratings, subset: mesh}}}}]\n",
        dr("    tls: {mode: ISTIO_MUTUAL}\n")
    );
    let gw = gateway(
        dir.path(),
        &pki,
        &policy,
        vec![(backend, vec![("app", "ratings")])],
    );
    for _ in 0..3 {
        let (status, body, _) = get(gw.outbound, &[]).await;
        assert_eq!((status, body.as_str()), (200, "tls-ok"));
    }
    // Plaintext to a TLS server fails: the override took effect, and only
    // for its subset.
    let (status, _, _) = get(gw.outbound, &[("x-subset", "plain")]).await;
    assert!(
        status >= 500,
        "plaintext to a TLS endpoint answered {status}"
    );
    let (status, body, _) = get(gw.outbound, &[]).await;
    assert_eq!((status, body.as_str()), (200, "tls-ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_tls_verifies_the_endpoint_against_ca_certificates_and_the_sni() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let backend = tls_backend(dir.path(), &pki, false).await;
    let ca = pki.dir.join("ca/root/ca.pem");
    let policy = format!(
        "{}  subsets:\n  - name: good\n    labels: {{app: ratings}}\n  - name: wrong-name\n    labels: {{app: ratings}}\n    trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {}, sni: other.example.com}}}}\n  - name: needs-mtls\n    labels: {{app: ratings}}\n    trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{{headers: {{x-subset: {{exact: wrong-name}}}}}}]\n    route: [{{destination: {{host: ratings, subset: wrong-name}}}}]\n  - match: [{{headers: {{x-subset: {{exact: needs-mtls}}}}}}]\n    route: [{{destination: {{host: ratings, subset: needs-mtls}}}}]\n  - route: [{{destination: {{host: ratings, subset: good}}}}]\n",
        dr(&format!(
            "    tls: {{mode: SIMPLE, caCertificates: {}}}\n",
            ca.display()
        )),
        ca.display()
    );
    let gw = gateway(
        dir.path(),
        &pki,
        &policy,
        vec![(backend, vec![("app", "ratings")])],
    );
    let (status, body, _) = get(gw.outbound, &[]).await;
    assert_eq!((status, body.as_str()), (200, "tls-ok"));
    // A server name the certificate does not carry is refused.
    let (status, _, _) = get(gw.outbound, &[("x-subset", "wrong-name")]).await;
    assert!(status >= 500, "a wrong SNI answered {status}");
    // ISTIO_MUTUAL to a server that does not ask for a certificate works
    // too: the server's workload certificate passes the mesh rules.
    let (status, body, _) = get(gw.outbound, &[("x-subset", "needs-mtls")]).await;
    assert_eq!((status, body.as_str()), (200, "tls-ok"));
}

// TCP from this gateway's own listener to a local endpoint goes the way HTTP
// and streams from peers go: the DestinationRule's balancer and ejections,
// then `tcp.maxConnections` and `connectTimeout`.

/// The mapped port for opaque TCP to `ratings` port 7.
const TCP_MAP: &str = "0=ratings.default:7";

/// [`gateway`] with `ratings:7` mapped to a port of its own (opaque TCP, no
/// detection); returns the gateway and that port's address.
fn tcp_gateway(
    dir: &Path,
    policy: &str,
    endpoints: Vec<LabeledEndpoint<'_>>,
) -> (GatewayProcess, SocketAddr) {
    let pki = Pki::new(dir);
    let gw = gateway_with(
        dir,
        &pki,
        policy,
        endpoints,
        vec!["--tcp-port-map".into(), TCP_MAP.into()],
    );
    let mapped = gw.ready["tcp:ratings.default:7"];
    (gw, mapped)
}

/// A TCP echo server that counts the connections it accepted.
async fn tcp_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

/// What a TCP connection through `via` gets back for `msg`: `Some` with the
/// echo, or `None` when the gateway closed it without one.
async fn tcp_exchange(via: SocketAddr, msg: &[u8]) -> (Option<Vec<u8>>, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(via).await.unwrap();
    // The gateway may close before or after the write lands.
    let _ = s.write_all(msg).await;
    let mut back = vec![0u8; msg.len()];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("neither an echo nor a close within 10 s");
    (read.ok().map(|_| back), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_tcp_to_a_local_endpoint_is_refused_beyond_max_connections() {
    let (echo, accepted) = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, mapped) = tcp_gateway(
        dir.path(),
        &dr("    connectionPool: {tcp: {maxConnections: 1}}\n"),
        vec![(echo, vec![])],
    );
    let (first, held) = tcp_exchange(mapped, b"first").await;
    assert_eq!(first.as_deref(), Some(&b"first"[..]));
    // The one connection the pool allows is held: the next is refused.
    let (second, _) = tcp_exchange(mapped, b"second").await;
    assert_eq!(second, None, "a second connection reached the endpoint");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        gw.metric(
            "meshfed_upstream_overflow_total",
            &[SERVICE, "maxConnections"]
        ),
        1.0
    );
    // Closed, the first frees its slot.
    drop(held);
    let deadline = Instant::now() + meshfed_tests::patient(Duration::from_secs(10));
    while tcp_exchange(mapped, b"third").await.0.is_none() {
        assert!(
            Instant::now() < deadline,
            "no connection admitted after the first closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_tcp_passes_over_an_ejected_local_endpoint() {
    let (good, accepted) = tcp_echo().await;
    // An address nothing listens on: every connection to it is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (gw, mapped) = tcp_gateway(
        dir.path(),
        &dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}\n",
        ),
        vec![(good, vec![]), (dead, vec![])],
    );
    // Round robin tries the dead endpoint within two connections; its
    // refused connect ejects it, and no later connection goes there.
    let mut failed = 0;
    for i in 0..20u8 {
        let (echo, _) = tcp_exchange(mapped, &[b'a' + i]).await;
        if echo.is_none() {
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "connections sent to the ejected endpoint");
    assert_eq!(accepted.load(Ordering::SeqCst), 19);
    assert_eq!(
        gw.metric(
            "meshfed_outlier_ejections_total",
            &[SERVICE, "consecutive_5xx"]
        ),
        1.0
    );
    assert!(gw.admin_get("/config_dump").contains(&dead.to_string()));
}

/// A listener on loopback whose accept queue is full, and stays full: the
/// kernel drops further SYNs, so a connect to it neither completes nor is
/// refused (a blackhole, without leaving the machine). Returns the address
/// and what must stay alive.
async fn blackhole() -> (
    SocketAddr,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("cannot fill the accept queue of {addr}: {e}"),
            // A connect that hangs: the queue is full.
            Err(_) => return (addr, fillers, listener),
        }
    }
    panic!(
        "the accept queue of {addr} never filled after 8 connections (backlog 0): \
         cannot build a blackhole on loopback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_outbound_tcp_to_a_blackholed_local_endpoint_fails_at_the_connect_timeout() {
    let (hole, _fillers, _listener) = blackhole().await;
    let dir = tempfile::tempdir().unwrap();
    // 300 ms, well under the 2 s default a connection would wait without
    // the DestinationRule.
    let (gw, mapped) = tcp_gateway(
        dir.path(),
        &dr("    connectionPool: {tcp: {connectTimeout: 300ms}}\n"),
        vec![(hole, vec![])],
    );
    let start = Instant::now();
    let (echo, _) = tcp_exchange(mapped, b"hello").await;
    let took = start.elapsed();
    assert_eq!(echo, None);
    assert!(
        took >= Duration::from_millis(280),
        "closed after {took:?}, before the connect timeout"
    );
    assert!(
        took < Duration::from_millis(1500),
        "closed after {took:?}: the 300 ms connectTimeout was not applied"
    );
    assert_eq!(
        gw.metric("meshfed_refusals_total", &["listener", "connect-failed"]),
        1.0
    );
}
