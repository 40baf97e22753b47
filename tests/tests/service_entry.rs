//! ServiceEntry: an edge gateway (no discovery at all) reaching a host
//! outside the mesh, `api.example.com`, through its outbound listener. The
//! "external host" is a real HTTP (or rustls) server on loopback; the
//! ServiceEntry says where it is, by IP (STATIC) or by a name the gateway
//! resolves (DNS: `localhost`, from /etc/hosts through the gateway's real
//! resolver). Callers reach it by Host header, CONNECT, and TLS SNI, and
//! VirtualService and DestinationRule policy applies as for mesh services.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "api.example.com";

/// An edge gateway of cluster `edge` with `policy` and no discovery file.
fn edge_gateway(dir: &Path, policy: &str) -> GatewayProcess {
    let pki = Pki::new(dir);
    let policy_dir = dir.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("external.yaml"), policy).unwrap();
    GatewayProcess::start(&GatewaySpec {
        cluster: "edge".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("edge", "gw-0"),
        policy_dir,
        discovery: None,
        tunnel_port: free_udp_port(),
        work_dir: dir.to_path_buf(),
        extra_args: vec![],
    })
}

fn service_entry(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external-api, namespace: default}}\nspec:\n  hosts: [{HOST}]\n  location: MESH_EXTERNAL\n{spec}"
    )
}

/// A GET for `http://api.example.com{path}` through the gateway: status,
/// body, and how long it took.
async fn get(via: SocketAddr, path: &str) -> (u16, String, Duration) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{via}{path}"))
        .header("host", HOST)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("no answer within 20 s")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        start.elapsed(),
    )
}

/// `CONNECT api.example.com:80` through the gateway, then a plain HTTP/1.1
/// GET inside the tunnel: the raw response.
async fn get_through_connect(via: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(via).await.unwrap();
    s.write_all(format!("CONNECT {HOST}:80 HTTP/1.1\r\nhost: {HOST}:80\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("CONNECT not answered within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answered {head}");
    s.write_all(format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no response inside the CONNECT tunnel within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_resolution_reaches_the_listed_address_by_host_header_and_connect() {
    let (backend, _task) = http_backend("external").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = edge_gateway(
        dir.path(),
        &service_entry(&format!(
            "  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]\n",
            backend.port()
        )),
    );
    let (status, body, _) = get(gw.outbound, "/").await;
    assert_eq!((status, body.as_str()), (200, "external"));
    let raw = get_through_connect(gw.outbound).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("external"), "{raw}");
    // A host no ServiceEntry declares is not reachable.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{}/", gw.outbound))
        .header("host", "other.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 404, "an undeclared external host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_resolution_reaches_the_address_the_endpoint_name_resolves_to() {
    let (backend, _task) = http_backend("external-by-name").await;
    let dir = tempfile::tempdir().unwrap();
    // `localhost` resolves to 127.0.0.1 through the gateway's resolver
    // (/etc/hosts), as a real external name would through DNS; the
    // resolver also answers ::1 for it (RFC 6761), where nothing listens,
    // so a try that lands there is retried on the other address (the
    // default retry policy passes over endpoints that failed).
    let gw = edge_gateway(
        dir.path(),
        &service_entry(&format!(
            "  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n  endpoints: [{{address: localhost, ports: {{http: {}}}}}]\n",
            backend.port()
        )),
    );
    for _ in 0..5 {
        let (status, body, _) = get(gw.outbound, "/").await;
        assert_eq!((status, body.as_str()), (200, "external-by-name"));
    }
    let dump = gw.admin_get("/config_dump");
    assert!(dump.contains(HOST), "config dump lacks the entry: {dump}");
}

/// An external API that answers 503 to the first request on `/flaky`, and
/// never answers on `/hang`; counts the `/flaky` requests.
async fn flaky_backend() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let (addr, task) = serve_fn(move |req: Request<Incoming>| {
        let h = h.clone();
        async move {
            if req.uri().path() == "/hang" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let n = h.fetch_add(1, Ordering::SeqCst);
            let status = if n == 0 { 503 } else { 200 };
            hyper::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(format!("attempt {}", n + 1))))
                .unwrap()
        }
    })
    .await;
    (addr, hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_retry_and_timeout_apply_to_the_external_host() {
    let (backend, hits, _task) = flaky_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: external-api, namespace: default}}\nspec:\n  hosts: [{HOST}]\n  http:\n  - match: [{{uri: {{exact: /hang}}}}]\n    timeout: 400ms\n    route: [{{destination: {{host: {HOST}}}}}]\n  - retries: {{attempts: 2, retryOn: 5xx}}\n    route: [{{destination: {{host: {HOST}}}}}]\n",
        service_entry(&format!(
            "  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]\n",
            backend.port()
        ))
    );
    let gw = edge_gateway(dir.path(), &policy);
    // The first attempt gets 503; the retry rule sends a second.
    let (status, body, _) = get(gw.outbound, "/flaky").await;
    assert_eq!((status, body.as_str()), (200, "attempt 2"));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // The route timeout ends a hung call with 504, at the timeout.
    let (status, _, took) = get(gw.outbound, "/hang").await;
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1500),
        "a 400 ms route timeout answered after {took:?}"
    );
}

/// A self-signed CA (not the mesh's: this is someone else's API) and a
/// certificate for `api.example.com`; the CA is written to `dir/ca.pem`.
fn external_pki(dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "external test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    (chain, key)
}

/// An HTTPS server with the external certificate; answers `tls-ok`.
async fn https_backend(dir: &Path) -> SocketAddr {
    let (chain, key) = external_pki(dir);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"tls-ok"),
                    )))
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
async fn simple_tls_origination_and_sni_passthrough_reach_an_https_external_host() {
    let dir = tempfile::tempdir().unwrap();
    let backend = https_backend(dir.path()).await;
    let ca = dir.path().join("ca.pem");
    // Port 80 (plain HTTP from the caller) is originated as TLS by the
    // DestinationRule; port 443 is TLS from the caller, passed through by
    // SNI. Both reach the same HTTPS server.
    let policy = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: external-api, namespace: default}}\nspec:\n  host: {HOST}\n  trafficPolicy:\n    portLevelSettings:\n    - port: {{number: 80}}\n      tls: {{mode: SIMPLE, caCertificates: {}}}\n",
        service_entry(&format!(
            "  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 443, name: https, protocol: TLS}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {p}, https: {p}}}}}]\n",
            p = backend.port()
        )),
        ca.display()
    );
    let gw = edge_gateway(dir.path(), &policy);
    let (status, body, _) = get(gw.outbound, "/").await;
    assert_eq!((status, body.as_str()), (200, "tls-ok"));

    // TLS from the caller, end to end: the caller verifies the external
    // certificate itself; the gateway only read the SNI.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.outbound).await.unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(HOST).unwrap(), tcp),
    )
    .await
    .expect("no TLS handshake through the gateway within 10 s")
    .expect("TLS handshake with the external host through the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/")
                .header("host", HOST)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"tls-ok");
}
