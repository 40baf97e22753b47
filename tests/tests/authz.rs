//! Authorization and PeerAuthentication through real gateway processes:
//! AuthorizationPolicy enforced by the destination gateway (west) on calls
//! from east, with the caller's workload identity from its certificate;
//! PeerAuthentication deciding which local callers east's outbound listener
//! admits. Every case counts what the backend behind west received, so a
//! denial that still reached it fails.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_gateway::wire::frame::{self, Frame};
use meshfed_tests::federation::*;
use tempfile::TempDir;

/// East (one gateway, `--outbound-tls mutual`) and west (one gateway)
/// serving `reviews.default` (exported; endpoint labels `app: reviews`) at
/// a backend that counts what reaches it.
struct Mesh {
    dir: TempDir,
    east: GatewayProcess,
    west: GatewayProcess,
    hits: Arc<AtomicUsize>,
    _backend: tokio::task::JoinHandle<()>,
}

impl Mesh {
    /// `policy` is added to the repository as it is (YAML documents).
    async fn start(policy: &str) -> Mesh {
        Self::start_with(policy, None).await
    }

    /// With `east_trust_domain`, east's CA and `Cluster` use that trust
    /// domain instead of the mesh's.
    async fn start_with(policy: &str, east_trust_domain: Option<&str>) -> Mesh {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let (backend, task) = serve_fn(move |req: Request<hyper::body::Incoming>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = req.into_body().collect().await;
                hyper::Response::builder()
                    .header("x-served-by", "reviews")
                    .body(Full::new(Bytes::from_static(b"reviews")))
                    .unwrap()
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        if let Some(td) = east_trust_domain {
            certs(&[
                "intermediate",
                "--ca",
                &dir.path().join("ca/root").to_string_lossy(),
                "--cluster",
                "east",
                "--trust-domain",
                td,
                "--out",
                &dir.path().join("ca/east").to_string_lossy(),
            ]);
        }
        let (east_port, west_port) = (free_udp_port(), free_udp_port());
        let repo = dir.path().join("policy");
        std::fs::create_dir_all(&repo).unwrap();
        let mut east_cluster = cluster_yaml("east", &[east_port]);
        if let Some(td) = east_trust_domain {
            east_cluster = east_cluster.replace("spec: {", &format!("spec: {{trustDomain: {td}, "));
        }
        std::fs::write(
            repo.join("mesh.yaml"),
            format!(
                "{east_cluster}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: reviews, namespace: default}}\n---\n{policy}",
                cluster_yaml("west", &[west_port]),
            ),
        )
        .unwrap();
        let eps = dir.path().join("west-endpoints.yaml");
        discovery_file(
            &eps,
            &[("reviews.default", vec![(backend, vec![("app", "reviews")])])],
        );
        let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>, extra: Vec<String>| {
            GatewaySpec {
                cluster: cluster.into(),
                id: "gw-0".into(),
                tls_dir: pki.gateway(cluster, "gw-0"),
                policy_dir: repo.clone(),
                discovery,
                tunnel_port: port,
                work_dir: dir.path().to_path_buf(),
                extra_args: extra,
            }
        };
        let west = GatewayProcess::start(&spec("west", west_port, Some(eps), vec![]));
        let mutual = vec!["--outbound-tls".to_string(), "mutual".to_string()];
        let east = GatewayProcess::start(&spec("east", east_port, None, mutual));
        east.wait_links("west", 1);
        Mesh {
            dir,
            east,
            west,
            hits,
            _backend: task,
        }
    }

    /// Credentials of a workload of east, `default/<sa>`.
    fn workload(&self, sa: &str) -> PathBuf {
        let out = self.dir.path().join("creds").join(sa);
        certs(&[
            "workload",
            "--ca",
            &self.dir.path().join("ca/east").to_string_lossy(),
            "--namespace",
            "default",
            "--service-account",
            sa,
            "--out",
            &out.to_string_lossy(),
        ]);
        out
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// What a caller saw.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    reason: Option<String>,
}

fn answer_of(status: u16, headers: &http::HeaderMap, body: Bytes) -> Answer {
    Answer {
        status,
        body: String::from_utf8_lossy(&body).into(),
        reason: headers
            .get("x-meshfed-error")
            .map(|v| v.to_str().unwrap().to_string()),
    }
}

/// A plaintext call to `reviews` through east's outbound listener.
async fn plaintext(east: &GatewayProcess, method: &str, path: &str) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", east.outbound))
        .header("host", "reviews")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    answer_of(parts.status.as_u16(), &parts.headers, body)
}

/// A call to `reviews` over mutual TLS with the workload certificate in
/// `creds` (bundle.pem, cert.pem, key.pem).
async fn mtls(east: &GatewayProcess, creds: &Path, method: &str, path: &str) -> Answer {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(creds.join("bundle.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(creds.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(creds.join("key.pem")).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("east.cluster.meshfed.internal").unwrap();
    let tcp = tokio::net::TcpStream::connect(east.outbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "reviews")
        .body(Full::new(if method == "POST" {
            Bytes::from_static(b"{\"stars\": 5}")
        } else {
            Bytes::new()
        }))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    answer_of(parts.status.as_u16(), &parts.headers, body)
}

fn assert_denied(a: &Answer) {
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body, "RBAC: access denied", "Envoy's exact body: {a:?}");
}

const PRODUCTPAGE_MAY_GET: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}]
    to: [{operation: {methods: [GET]}}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn productpage_may_get_reviews_but_a_post_is_denied_before_reaching_it() {
    let mesh = Mesh::start(PRODUCTPAGE_MAY_GET).await;
    let productpage = mesh.workload("productpage");

    let a = mtls(&mesh.east, &productpage, "GET", "/reviews/1").await;
    assert_eq!((a.status, a.body.as_str()), (200, "reviews"), "{a:?}");
    assert_eq!(mesh.hits(), 1);

    let a = mtls(&mesh.east, &productpage, "POST", "/reviews/1").await;
    assert_denied(&a);
    assert_eq!(mesh.hits(), 1, "a denied request never reaches the backend");
    assert!(
        mesh.west.metric(
            "meshfed_authz_denied_total",
            &[
                "reason=\"no-allow-match\"",
                "source_cluster=\"east\"",
                "destination_cluster=\"west\""
            ]
        ) >= 1.0,
        "{}",
        mesh.west.admin_get("/metrics")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_identity_is_denied() {
    let mesh = Mesh::start(PRODUCTPAGE_MAY_GET).await;
    let ratings = mesh.workload("ratings");
    assert_denied(&mtls(&mesh.east, &ratings, "GET", "/reviews/1").await);
    // A plaintext caller has no identity of its own: the principal is east's
    // gateway, which the policy does not name.
    assert_denied(&plaintext(&mesh.east, "GET", "/reviews/1").await);
    assert_eq!(mesh.hits(), 0);
    // The same gateway lets productpage through (the denials were about the
    // identity, not a broken path).
    let productpage = mesh.workload("productpage");
    assert_eq!(mtls(&mesh.east, &productpage, "GET", "/").await.status, 200);
    assert_eq!(mesh.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_beats_an_allow_even_through_dot_segments() {
    let policy = "apiVersion: security.istio.io/v1
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
  - to: [{operation: {paths: [/admin*]}}]
";
    let mesh = Mesh::start(policy).await;
    assert_eq!(plaintext(&mesh.east, "GET", "/reviews").await.status, 200);
    assert_eq!(mesh.hits(), 1);
    assert_denied(&plaintext(&mesh.east, "GET", "/admin/users").await);
    assert_denied(&plaintext(&mesh.east, "GET", "/public/../admin/users").await);
    assert_denied(&plaintext(&mesh.east, "GET", "/%61dmin?x=1").await);
    assert_eq!(mesh.hits(), 1);
    assert!(
        mesh.west.metric(
            "meshfed_authz_denied_total",
            &["policy=\"default/deny-admin\"", "reason=\"deny-policy\""]
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_cluster_conditions_match_the_calling_gateways_verified_cluster() {
    let policy = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-cluster, namespace: default}
spec:
  rules:
  - to: [{operation: {paths: [/east-only*]}}]
    when: [{key: source.cluster, values: [east]}]
  - to: [{operation: {paths: [/west-only*]}}]
    when: [{key: source.cluster, values: [west]}]
  - to: [{operation: {paths: [/anyone*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-from-east, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/anyone/but-east*]}}]
    when: [{key: source.cluster, notValues: [west]}]
";
    let mesh = Mesh::start(policy).await;
    assert_eq!(plaintext(&mesh.east, "GET", "/east-only").await.status, 200);
    assert_eq!(plaintext(&mesh.east, "GET", "/anyone").await.status, 200);
    assert_eq!(mesh.hits(), 2);
    assert_denied(&plaintext(&mesh.east, "GET", "/west-only").await);
    assert_denied(&plaintext(&mesh.east, "GET", "/anyone/but-east").await);
    assert_eq!(mesh.hits(), 2);
}

/// A peer gateway built from the library's own framing, with a real
/// certificate of east, asserting a caller identity of its choice.
async fn rogue_stream(west: &GatewayProcess, creds: &Path, caller: &str) -> Frame {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(creds.join("bundle.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(creds.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(creds.join("key.pem")).unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = frame::ALPN.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(west.tunnel, "west.cluster.meshfed.internal")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = frame::Open {
        kind: frame::StreamKind::Http,
        service: "reviews.default.svc.cluster.local".into(),
        port: 80,
        subset: None,
        subset_labels: vec![],
        caller: Some(caller.into()),
        source_version: None,
        sni: None,
        http: Some(frame::RequestHead {
            method: http::Method::GET,
            scheme: "http".into(),
            authority: "reviews".into(),
            path: "/".into(),
            headers: http::HeaderMap::new(),
        }),
    };
    let mut out = BytesMut::new();
    frame::encode(&Frame::Open(Box::new(open)), &mut out).unwrap();
    send.write_all(&out).await.unwrap();
    send.finish().unwrap();
    let mut buf = BytesMut::new();
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(f) = frame::decode(&mut buf).unwrap() {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = recv.read(&mut chunk).await.unwrap().expect("stream ended");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap();
    conn.close(0u32.into(), b"done");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_asserting_a_workload_outside_its_clusters_trust_domain_is_refused() {
    // East has a trust domain of its own; west is in the mesh's.
    let mesh = Mesh::start_with("", Some("east.example.org")).await;
    let rogue = mesh.dir.path().join("creds/east-rogue");
    certs(&[
        "gateway",
        "--ca",
        &mesh.dir.path().join("ca/east").to_string_lossy(),
        "--cluster",
        "east",
        "--id",
        "rogue",
        "--out",
        &rogue.to_string_lossy(),
    ]);
    // A workload of west's trust domain: east may not speak for it.
    match rogue_stream(
        &mesh.west,
        &rogue,
        "spiffe://cluster.local/ns/default/sa/productpage",
    )
    .await
    {
        Frame::Error(e) => {
            assert_eq!(e.refusal, frame::Refusal::Unauthorized, "{e:?}");
            assert!(e.message.contains("east.example.org"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(mesh.hits(), 0, "a refused stream never reaches the backend");
    // The same gateway asserting one of its own workloads is served.
    match rogue_stream(
        &mesh.west,
        &rogue,
        "spiffe://east.example.org/ns/default/sa/productpage",
    )
    .await
    {
        Frame::Response(head) => assert_eq!(head.status, 200),
        other => panic!("expected a response, got {other:?}"),
    }
    assert_eq!(mesh.hits(), 1);
    assert!(
        mesh.west
            .metric("meshfed_refusals_total", &["unauthorized"])
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_strict_refuses_plaintext_callers_of_the_namespace() {
    let policy = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
";
    let mesh = Mesh::start(policy).await;
    let a = plaintext(&mesh.east, "GET", "/").await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.reason.as_deref(), Some("mtls-required"), "{a:?}");
    assert!(
        a.body.contains("--outbound-tls mutual"),
        "says what to do: {a:?}"
    );
    assert_eq!(mesh.hits(), 0);
    let productpage = mesh.workload("productpage");
    assert_eq!(mtls(&mesh.east, &productpage, "GET", "/").await.status, 200);
    assert_eq!(mesh.hits(), 1);
    assert!(
        mesh.east
            .metric("meshfed_refusals_total", &["mtls-required"])
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_permissive_for_a_workload_overrides_a_strict_mesh() {
    // Mesh-wide STRICT; the workload (selected by the labels west announces
    // for its endpoints) is PERMISSIVE, and the most specific level wins.
    let policy = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: PERMISSIVE}
";
    let mesh = Mesh::start(policy).await;
    let productpage = mesh.workload("productpage");
    assert_eq!(plaintext(&mesh.east, "GET", "/").await.status, 200);
    assert_eq!(mtls(&mesh.east, &productpage, "GET", "/").await.status, 200);
    assert_eq!(mesh.hits(), 2);
}

/// Denies every path under `/admin`, for every workload.
const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin*]}}]
";

/// A call to a service of the gateway's own cluster: the gateway is both
/// the source and the destination gateway, and enforces the policy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_call_through_the_gateway_is_authorized_too() {
    let mesh = Mesh::start(DENY_ADMIN).await;
    // West's own gateway serves reviews from its local endpoint.
    assert_eq!(plaintext(&mesh.west, "GET", "/reviews").await.status, 200);
    assert_eq!(mesh.hits(), 1);
    assert_denied(&plaintext(&mesh.west, "GET", "/admin").await);
    assert_denied(&plaintext(&mesh.west, "GET", "/x/../admin").await);
    assert_eq!(mesh.hits(), 1);
    assert!(
        mesh.west.metric(
            "meshfed_authz_denied_total",
            &["source_cluster=\"west\"", "destination_cluster=\"west\""]
        ) >= 2.0
    );
}

/// One HTTP/1.1 request written by hand to `gateway`'s outbound listener
/// (the request line and headers exactly as given, which a client library
/// would refuse or rewrite); returns the status code.
async fn raw(gateway: &GatewayProcess, request_line: &str, headers: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gateway.outbound)
        .await
        .unwrap();
    s.write_all(
        format!("{request_line} HTTP/1.1\r\nHost: reviews\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no answer in 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
}

/// Backslashes are slashes to authorization (Istio's `BASE`
/// normalization), locally and across clusters, so `\..\` cannot walk
/// around a path rule; an encoded NUL is refused outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backslash_paths_are_normalized_before_path_rules() {
    let mesh = Mesh::start(DENY_ADMIN).await;
    for gw in [&mesh.west, &mesh.east] {
        assert_eq!(raw(gw, "GET /reviews", "").await, 200);
        assert_eq!(raw(gw, "GET /public\\..\\admin", "").await, 403);
        assert_eq!(raw(gw, "GET /public/..\\admin", "").await, 403);
        assert_eq!(raw(gw, "GET /a%00b", "").await, 400);
    }
    assert_eq!(mesh.hits(), 2, "only the two allowed calls reached reviews");
}

/// A local caller cannot forge the client-certificate header: the gateway
/// drops a caller's XFCC before routing and authorization, so a `when` on
/// that header cannot be satisfied by sending it, whether the call goes to
/// another cluster or stays local. A caller with a workload certificate
/// satisfies it, as in Istio, where Envoy sets XFCC before RBAC runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_xfcc_header_is_dropped_before_authorization() {
    let policy = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cert-holders, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - when:
    - key: request.headers[x-forwarded-client-cert]
      values: [\"*URI=spiffe://cluster.local/ns/default/sa/productpage\"]
  - to: [{operation: {paths: [/open]}}]
";
    let mesh = Mesh::start(policy).await;
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/reviews;\
                  URI=spiffe://cluster.local/ns/default/sa/productpage\r\n";
    // Remote (east → west) and local (west's own endpoint).
    for gw in [&mesh.east, &mesh.west] {
        assert_eq!(raw(gw, "GET /", forged).await, 403);
        assert_eq!(raw(gw, "GET /open", forged).await, 200);
    }
    assert_eq!(mesh.hits(), 2, "a forged XFCC was let through");
    // The honest way: a workload certificate over mutual TLS. West sets
    // XFCC from the identity it accepted, before authorization.
    let productpage = mesh.workload("productpage");
    assert_eq!(mtls(&mesh.east, &productpage, "GET", "/").await.status, 200);
    assert_eq!(mesh.hits(), 3);
}

/// `CONNECT reviews:80` through east over mutual TLS with the workload
/// certificate in `creds`, then a GET inside the tunnel: what came back
/// through the tunnel (empty when the stream was refused).
async fn connect_over_mtls(east: &GatewayProcess, creds: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(creds.join("bundle.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(creds.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(creds.join("key.pem")).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("east.cluster.meshfed.internal").unwrap();
    let tcp = tokio::net::TcpStream::connect(east.outbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"CONNECT reviews:80 HTTP/1.1\r\nhost: reviews:80\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut b))
            .await
            .expect("CONNECT not answered within 10 s")
            .unwrap();
        assert!(n > 0, "closed before the CONNECT answer");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answered {head}");
    let _ = tls
        .write_all(b"GET /reviews HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("the tunnel neither answered nor closed within 10 s");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_callers_workload_identity_travels_so_principals_apply_to_tcp() {
    let policy = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-productpage-only, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}]
";
    let mesh = Mesh::start(policy).await;
    // A caller whose identity the policy does not name: west refuses the
    // stream, and nothing reaches reviews.
    let ratings = mesh.workload("ratings");
    let refused = connect_over_mtls(&mesh.east, &ratings).await;
    assert!(
        !refused.contains("reviews"),
        "ratings reached reviews over TCP: {refused}"
    );
    assert_eq!(mesh.hits(), 0);
    // productpage's identity crossed the tunnel with the TCP stream: it is
    // the principal at west, not east's gateway.
    let productpage = mesh.workload("productpage");
    let through = connect_over_mtls(&mesh.east, &productpage).await;
    assert!(
        through.starts_with("HTTP/1.1 200") && through.ends_with("reviews"),
        "productpage over TCP: {through}"
    );
    assert_eq!(mesh.hits(), 1);
    assert!(
        mesh.west.metric(
            "meshfed_authz_denied_total",
            &["reason=\"no-allow-match\"", "source_cluster=\"east\""]
        ) >= 1.0
    );
}

/// A TLS ClientHello for `server_name`, as rustls writes it.
fn client_hello(server_name: &str) -> Vec<u8> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_sni_conditions_match_the_server_name_a_tls_caller_asked_for() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw TCP backend that counts the bytes it receives.
    let received = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let count = received.clone();
    let _task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    // East in plaintext mode routes TLS by SNI; both names below route to
    // `echo.default`, but only the full one is allowed.
    let (dir, east, west) = two_clusters("echo", backend, vec![]);
    std::fs::write(
        dir.path().join("policy/sni.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-by-full-name, namespace: default}
spec:
  action: ALLOW
  rules:
  - when: [{key: connection.sni, values: [echo.default.svc.cluster.local]}]
",
    )
    .unwrap();
    meshfed_tests::wait_for(
        "west applies the SNI policy",
        Duration::from_secs(20),
        || {
            let dump = west.admin_get("/config_dump");
            if dump.contains("echo-by-full-name") {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .unwrap();
    let send_hello = |name: &'static str| {
        let outbound = east.outbound;
        async move {
            let mut s = tokio::net::TcpStream::connect(outbound).await.unwrap();
            s.write_all(&client_hello(name)).await.unwrap();
            s
        }
    };
    // The short name is not the allowed SNI: the stream is refused at west
    // and east closes the caller's connection.
    let mut denied = send_hello("echo.default").await;
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), denied.read_to_end(&mut sink))
        .await
        .expect("a denied TLS stream was not closed within 10 s")
        .ok();
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "denied bytes reached the backend"
    );
    // The full name is allowed: the ClientHello reaches the backend.
    let _allowed = send_hello("echo.default.svc.cluster.local").await;
    meshfed_tests::wait_for(
        "the ClientHello reaches echo",
        Duration::from_secs(10),
        || {
            if received.load(Ordering::SeqCst) > 0 {
                Ok(())
            } else {
                Err("nothing received")
            }
        },
    )
    .unwrap();
    assert!(west.metric("meshfed_authz_denied_total", &["reason=\"no-allow-match\""]) >= 1.0);
}

/// One HTTP/1.1 GET with `Host: host` written to `gateway`'s outbound
/// listener; returns the status code.
async fn get_as(gateway: &GatewayProcess, host: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gateway.outbound)
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("no answer in 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
}

/// Issue 15's silent holes and issue 21's host aliases, through real
/// gateways: policies that arrive as `kubectl get -o yaml` prints them (a
/// `kind: List`) are enforced; a dry-run DENY is counted at west and never
/// denies; a DENY on `hosts` holds for every name east's router sends to
/// the service (`reviews.`, `reviews.default`, `reviews.default.svc`, the
/// full name with a trailing dot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_a_dry_run_deny_and_host_aliases_are_enforced_as_istio_means_them() {
    let policy = "apiVersion: v1
kind: List
metadata: {resourceVersion: \"\"}
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-admin, namespace: default}
  spec:
    action: DENY
    rules:
    - to: [{operation: {paths: [/admin*]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: try-deny-headers
    namespace: default
    annotations: {istio.io/dry-run: \"true\"}
  spec:
    action: DENY
    rules:
    - to: [{operation: {paths: [/headers]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-secret-by-host, namespace: default}
  spec:
    action: DENY
    rules:
    - to: [{operation: {hosts: [reviews.default.svc.cluster.local], paths: [/secret]}}]
";
    let mesh = Mesh::start(policy).await;
    assert_denied(&plaintext(&mesh.east, "GET", "/admin").await);
    assert_eq!(mesh.hits(), 0, "the List's DENY must be enforced");
    assert_eq!(plaintext(&mesh.east, "GET", "/headers").await.status, 200);
    assert_eq!(plaintext(&mesh.east, "GET", "/headers").await.status, 200);
    assert_eq!(plaintext(&mesh.east, "GET", "/ip").await.status, 200);
    assert_eq!(mesh.hits(), 3, "a dry-run DENY never denies");
    let counted = |decision: &str| {
        mesh.west.metric(
            "meshfed_authz_dry_run_total",
            &[
                "policy=\"default/try-deny-headers\"",
                "action=\"DENY\"",
                &format!("decision=\"{decision}\""),
            ],
        )
    };
    assert_eq!(counted("deny"), 2.0);
    assert!(counted("allow") >= 1.0);
    let aliases = [
        "reviews",
        "reviews.",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local.",
    ];
    for host in aliases {
        assert_eq!(
            get_as(&mesh.east, host, "/secret").await,
            403,
            "Host: {host}"
        );
    }
    assert_eq!(mesh.hits(), 3, "no alias reached reviews' /secret");
    for host in aliases {
        assert_eq!(get_as(&mesh.east, host, "/ok").await, 200, "Host: {host}");
    }
    assert_eq!(mesh.hits(), 3 + aliases.len());
}

/// Istio path templates and pseudo-header conditions (issue 15), through
/// real gateways, at west for a call from east and at west for a local
/// call: `{*}` is exactly one segment and `{**}` keeps the `/` around it,
/// so the ALLOW admits what Envoy would and nothing more; a `notPaths`
/// template carves out of it; `request.headers[:authority]` is the Host as
/// the caller sent it (an alias that the router resolves to the same
/// service is another value, unlike `hosts`), and `:method` the method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_templates_and_pseudo_header_conditions_allow_exactly_what_istio_allows() {
    let policy = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: templates, namespace: default}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ['/api/{*}/items', '/static/{**}']
        notPaths: ['/static/{*}/private']
    when:
    - {key: 'request.headers[:authority]', values: [reviews]}
    - {key: 'request.headers[:method]', values: [GET]}
";
    let mesh = Mesh::start(policy).await;
    let mut allowed = 0;
    for gw in [&mesh.east, &mesh.west] {
        for (host, path, status) in [
            ("reviews", "/api/v1/items", 200),
            ("reviews", "/static/css/site.css", 200),
            ("reviews", "/api/v1/x/items", 403),
            ("reviews", "/api/items", 403),
            ("reviews", "/api/v1/items/", 403),
            ("reviews", "/static", 403),
            ("reviews", "/static/a/private", 403),
            ("reviews", "/static/a/../b/private", 403),
            ("reviews.default", "/api/v1/items", 403),
            ("reviews.default.svc.cluster.local", "/static/x", 403),
        ] {
            assert_eq!(
                get_as(gw, host, path).await,
                status,
                "Host: {host}, {path} through {}",
                if std::ptr::eq(gw, &mesh.east) {
                    "east"
                } else {
                    "west"
                }
            );
            if status == 200 {
                allowed += 1;
            }
        }
        assert_eq!(
            raw(gw, "POST /api/v1/items", "Content-Length: 0\r\n").await,
            403,
            "`:method` is GET only"
        );
    }
    assert_eq!(
        mesh.hits(),
        allowed,
        "only the allowed calls reached reviews"
    );
    assert!(
        mesh.west
            .metric("meshfed_authz_denied_total", &["reason=\"no-allow-match\""])
            >= 18.0
    );
}
