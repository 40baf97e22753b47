//! The destination side of the tunnel, specified end to end on real things:
//! a west gateway (its `Gateway` state from a compiled policy, its tunnel
//! serving streams with [`serve_stream`]) in front of real HTTP and TCP
//! servers on loopback, and an east tunnel, linked over QUIC with
//! certificates of one anchor, whose streams the tests write frame by frame,
//! as a source gateway (or a hostile one) would.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use meshfed_policy::{Options, analyze};
use tokio::sync::watch;

use super::*;
use crate::endpoints::{Endpoint, EndpointSet};
use crate::identity::certs::{self, IssuedCert, Issuer, Validity};
use crate::identity::spiffe::SpiffeId;
use crate::identity::store::{self, Credentials};
use crate::identity::verify::HandshakeRefusals;
use crate::metrics::Metrics;
use crate::tunnel::link::{LinkSettings, StreamHandler, Tunnel};
use crate::wire::frame::{self, RequestHead, StreamError};

const TD: &str = "cluster.local";
const RATINGS: &str = "ratings.default.svc.cluster.local";
const ECHO: &str = "echo.default.svc.cluster.local";
/// Exported, with one endpoint where nothing listens.
const DOWN: &str = "down.default.svc.cluster.local";

/// west's policy: both clusters, `ratings` (HTTP) and `echo` (TCP)
/// exported, `reviews` not; `/admin` on ratings denied to everyone.
fn policy(west_tunnel: SocketAddr) -> String {
    format!(
        "apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {{name: east}}
spec: {{gateways: ['127.0.0.1:9']}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {{name: west}}
spec: {{gateways: ['{west_tunnel}']}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: ratings, namespace: default}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: echo, namespace: default}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: down, namespace: default}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/admin*]}}}}]
"
    )
}

fn credentials(anchor: &IssuedCert, root: &Issuer, cluster: &str) -> Credentials {
    let ca = certs::new_intermediate(root, cluster, TD, Validity::days(2)).unwrap();
    let ca = Issuer::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
    let id = SpiffeId::gateway(TD, cluster, "gw-0").unwrap();
    let leaf = certs::issue_leaf(&ca, &id, &[], Validity::days(1)).unwrap();
    Credentials::from_pem(
        anchor.cert_pem.as_bytes(),
        leaf.chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
    )
    .unwrap()
}

fn tunnel(creds: &Credentials, cluster: &str) -> Arc<Tunnel> {
    let refusals = Arc::new(HandshakeRefusals::new());
    let alpn: Vec<Vec<u8>> = frame::ALPN.iter().map(|a| a.to_vec()).collect();
    Tunnel::bind(
        "127.0.0.1:0".parse().unwrap(),
        store::server_config(creds, &alpn, refusals.clone()).unwrap(),
        store::client_config(creds, &alpn, refusals).unwrap(),
        cluster,
        LinkSettings::default(),
        crate::run::identify(),
    )
    .unwrap()
}

/// What the endpoints behind west saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
}

/// The two gateways, linked, and west's endpoints.
struct Fixture {
    west: Arc<Gateway>,
    east: Arc<Tunnel>,
    seen: Arc<Seen>,
    _backends: Vec<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    async fn start() -> Fixture {
        crate::identity::install_crypto_provider();
        let anchor = certs::new_anchor("anchor", Validity::days(2)).unwrap();
        let root = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem).unwrap();
        let west_tunnel = tunnel(&credentials(&anchor, &root, "west"), "west");
        let east = tunnel(&credentials(&anchor, &root, "east"), "east");

        // ratings: answers with what it received.
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let (ratings, ratings_task) = meshfed_tests::federation::serve_fn(
            move |req: http::Request<hyper::body::Incoming>| {
                let s = s.clone();
                async move {
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let xfcc = parts
                        .headers
                        .get(&XFCC)
                        .cloned()
                        .unwrap_or(HeaderValue::from_static(""));
                    http::Response::builder()
                        .header("x-seen-xfcc", xfcc)
                        .header("x-seen", format!("{} {}", parts.method, parts.uri))
                        .body(Full::new(Bytes::from(format!("ratings:{}", body.len()))))
                        .unwrap()
                }
            },
        )
        .await;
        let (echo, echo_task) = tcp_echo().await;

        let yaml = policy(west_tunnel.local_addr().unwrap());
        let a = analyze([("p.yaml", yaml.as_str())], &Options::default());
        assert!(a.is_valid(), "{:#?}", a.diagnostics);
        let snapshot = Arc::new(a.compile("west", "v1", &Options::default()).unwrap());
        let endpoint = |addr, labels: &[(&str, &str)]| Endpoint {
            addr,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            healthy: true,
        };
        let endpoints: EndpointSet = BTreeMap::from([
            (
                RATINGS.to_string(),
                vec![endpoint(ratings, &[("app", "ratings"), ("version", "v1")])],
            ),
            (ECHO.to_string(), vec![endpoint(echo, &[("app", "echo")])]),
            (
                DOWN.to_string(),
                vec![endpoint(closed_port(), &[("app", "down")])],
            ),
        ]);
        let (_tx, endpoints) = watch::channel(Arc::new(endpoints));
        let module_metrics = crate::state::ModuleMetrics::default();
        let metrics = Arc::new(Metrics::new(&module_metrics.sets()));
        let west = Gateway::new(
            "west".into(),
            "gw-0".into(),
            snapshot,
            endpoints,
            west_tunnel.clone(),
            metrics,
            module_metrics,
        )
        .unwrap();
        let state = west.clone();
        let handler: StreamHandler = Arc::new(move |peer, send, recv| {
            Box::pin(serve_stream(state.clone(), peer, send, recv))
        });
        west_tunnel.serve(handler, west.announcements());

        let west_addr = west_tunnel.local_addr().unwrap().to_string();
        east.reconcile(&BTreeMap::from([
            ("east".to_string(), vec![]),
            ("west".to_string(), vec![west_addr]),
        ]));
        let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(5));
        while east.pick("west").is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "east's link to west did not come up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Fixture {
            west,
            east,
            seen,
            _backends: vec![ratings_task, echo_task],
        }
    }

    /// A new stream to west, as east's gateway opens them.
    async fn stream(&self) -> (SendHalf, RecvHalf) {
        let link = self.east.pick("west").expect("east's link to west is up");
        let (send, recv, guard) = link.open().await.unwrap();
        drop(guard);
        (send, recv)
    }

    /// Sends `frames` as one write, finishes, and reads every frame of the
    /// answer to its end.
    async fn exchange(&self, frames: &[Frame]) -> Vec<Frame> {
        let (mut send, recv) = self.stream().await;
        let mut buf = BytesMut::new();
        for f in frames {
            frame::encode(f, &mut buf).unwrap();
        }
        send.write_all(&buf).await.unwrap();
        send.finish().unwrap();
        answer(recv).await
    }

    /// The `meshfed_refusals_total` sample of a stage and reason.
    fn refused(&self, reason: &str) -> f64 {
        let needle = format!("meshfed_refusals_total{{stage=\"stream\",reason=\"{reason}\"}} ");
        self.west
            .metrics
            .encode(&[])
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str())?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A loopback port nothing listens on (bound, then closed).
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Every frame west sent on the stream, until it finished it.
async fn answer(mut recv: RecvHalf) -> Vec<Frame> {
    let bytes = tokio::time::timeout(
        meshfed_tests::patient(Duration::from_secs(10)),
        recv.read_to_end(1 << 20),
    )
    .await
    .expect("west answers and finishes the stream")
    .expect("a readable answer");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(f) = frame::decode(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "a truncated frame at the end: {buf:?}");
    frames
}

fn http_open(service: &str, method: Method, path: &str) -> Open {
    Open {
        kind: StreamKind::Http,
        service: service.into(),
        port: 9080,
        subset: None,
        subset_labels: vec![],
        caller: None,
        source_version: Some("v1".into()),
        sni: None,
        http: Some(RequestHead {
            method,
            scheme: "http".into(),
            authority: format!("{service}:9080"),
            path: path.into(),
            headers: HeaderMap::new(),
        }),
    }
}

fn open(o: Open) -> Frame {
    Frame::Open(Box::new(o))
}

/// The response head and the body's bytes of an answer.
fn response(frames: &[Frame]) -> (ResponseHead, Vec<u8>) {
    let Some(Frame::Response(head)) = frames.first() else {
        panic!("expected a response, got {frames:?}");
    };
    let mut body = Vec::new();
    for f in &frames[1..] {
        match f {
            Frame::Data(d) => body.extend_from_slice(d),
            Frame::Trailers(_) => {}
            other => panic!("unexpected frame after the response head: {other:?}"),
        }
    }
    ((**head).clone(), body)
}

/// The refusal of an answer that is a single ERROR frame.
fn refusal(frames: &[Frame]) -> &StreamError {
    match frames {
        [Frame::Error(e)] => e,
        other => panic!("expected one ERROR frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_http_service_is_forwarded_to_its_local_endpoint_and_answers_back() {
    let fx = Fixture::start().await;
    let mut o = http_open(RATINGS, Method::POST, "/ratings/1?x=y");
    let head = o.http.as_mut().unwrap();
    // A caller of east's trust domain, and an XFCC east has no right to set.
    head.headers
        .insert(&XFCC, HeaderValue::from_static("By=forged;URI=forged"));
    o.caller = Some("spiffe://cluster.local/ns/default/sa/productpage".into());
    let frames = fx
        .exchange(&[open(o), Frame::Data(Bytes::from(vec![7u8; 100_000]))])
        .await;
    let (head, body) = response(&frames);
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(body, b"ratings:100000", "the whole request body arrived");
    assert_eq!(head.headers["x-seen"], "POST /ratings/1?x=y");
    // XFCC is west's to set, from the caller east may assert.
    assert_eq!(
        head.headers["x-seen-xfcc"],
        "By=spiffe://cluster.local/meshfed/cluster/west/gateway/gw-0;\
         URI=spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_tcp_service_is_accepted_and_spliced_both_ways() {
    let fx = Fixture::start().await;
    let (mut send, mut recv) = fx.stream().await;
    let mut buf = BytesMut::new();
    frame::encode(
        &open(Open {
            kind: StreamKind::Tcp,
            http: None,
            ..http_open(ECHO, Method::GET, "/")
        }),
        &mut buf,
    )
    .unwrap();
    // Bytes right behind the OPEN are the connection's first bytes.
    buf.extend_from_slice(b"\x00\x01hello");
    send.write_all(&buf).await.unwrap();
    let (head, rest) = tokio::time::timeout(Duration::from_secs(10), read_head(&mut recv))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head, Frame::Accept);
    let mut got = rest.to_vec();
    send.write_all(b" world").await.unwrap();
    send.finish().unwrap();
    let tail = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16))
        .await
        .unwrap()
        .unwrap();
    got.extend_from_slice(&tail);
    assert_eq!(got, b"\x00\x01hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_exported_here_is_refused_typed_and_never_reaches_an_endpoint() {
    let fx = Fixture::start().await;
    let reviews = "reviews.default.svc.cluster.local";
    let frames = fx
        .exchange(&[open(http_open(reviews, Method::GET, "/"))])
        .await;
    let e = refusal(&frames);
    assert_eq!(e.refusal, Refusal::NotExported);
    assert!(
        e.message.contains(reviews) && e.message.contains("add a ServiceExport"),
        "{}",
        e.message
    );
    // Routed with another commit than west's: retriable, and says so.
    let mut o = http_open(reviews, Method::GET, "/");
    o.source_version = Some("v2".into());
    let e = refusal(&fx.exchange(&[open(o)]).await).clone();
    assert_eq!(e.refusal, Refusal::StaleConfig);
    assert!(e.message.contains("config v2"), "{}", e.message);
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 0);
    assert_eq!(fx.refused("not-exported"), 1.0);
    assert_eq!(fx.refused("stale-config"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_outside_the_peers_trust_domain_is_refused_unauthorized() {
    let fx = Fixture::start().await;
    for caller in [
        "spiffe://evil.example.org/ns/default/sa/productpage",
        "not a spiffe id",
    ] {
        let mut o = http_open(RATINGS, Method::GET, "/");
        o.caller = Some(caller.into());
        let frames = fx.exchange(&[open(o)]).await;
        let e = refusal(&frames);
        assert_eq!(e.refusal, Refusal::Unauthorized, "{caller}: {}", e.message);
    }
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_deny_answers_rbac_403_before_the_endpoint_sees_the_request() {
    let fx = Fixture::start().await;
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/admin/users"))])
        .await;
    let (head, body) = response(&frames);
    assert_eq!(head.status, StatusCode::FORBIDDEN);
    assert_eq!(head.headers[crate::respond::ERROR_HEADER], "unauthorized");
    assert_eq!(body, crate::authz::RBAC_DENIED.as_bytes());
    // A path that only normalizes to /admin is denied the same.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/x/../admin"))])
        .await;
    assert_eq!(response(&frames).0.status, StatusCode::FORBIDDEN);
    // A fragment cannot be authorized as sent: a bad request.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/ok#/admin"))])
        .await;
    assert_eq!(refusal(&frames).refusal, Refusal::BadRequest);
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 0);
    // Anything else passes.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/public"))])
        .await;
    assert_eq!(response(&frames).0.status, StatusCode::OK);
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 1);
}

// One thread: the FIN of a bodiless request leaves in the packet of its
// OPEN (written with no await between them, as the source gateway does),
// so west sees it with the head and never counts it in the budget.
#[tokio::test]
async fn a_request_body_past_the_peer_budget_is_refused_overloaded_and_counted() {
    let fx = Fixture::start().await;
    fx.west.bodies.set_limits(0, 0);
    let frames = fx
        .exchange(&[
            open(http_open(RATINGS, Method::POST, "/")),
            Frame::Data(Bytes::from_static(b"a body")),
        ])
        .await;
    let e = refusal(&frames);
    assert_eq!(e.refusal, Refusal::Overloaded);
    assert!(
        e.message.contains("--max-peer-request-bodies")
            || e.message.contains("--max-request-bodies"),
        "{}",
        e.message
    );
    assert_eq!(fx.refused("body-limit"), 1.0);
    // A bodiless request takes no place in the budget.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/"))])
        .await;
    assert_eq!(response(&frames).0.status, StatusCode::OK);
}

/// A body whose first byte has not arrived (held up behind the peer's other
/// streams in flow control, or never sent) still holds an endpoint
/// connection: it takes its place in the budget with its head, so that the
/// next body past the budget is refused. (It used to take one only at its
/// first byte, and a peer's stalled streams went past the budget.)
// One thread: the FIN of a bodiless request leaves in the packet of its
// OPEN (written with no await between them, as the source gateway does),
// so west sees it with the head and never counts it in the budget.
#[tokio::test]
async fn a_body_that_has_not_started_takes_its_place_in_the_budget_with_its_head() {
    let fx = Fixture::start().await;
    fx.west.bodies.set_limits(1, 1);
    // A POST whose body has not started: the head only, and no FIN.
    let (mut held, _held_recv) = fx.stream().await;
    let mut buf = BytesMut::new();
    frame::encode(&open(http_open(RATINGS, Method::POST, "/")), &mut buf).unwrap();
    held.write_all(&buf).await.unwrap();
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(5));
    while fx.seen.requests.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held POST never reached the endpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frames = fx
        .exchange(&[
            open(http_open(RATINGS, Method::POST, "/")),
            Frame::Data(Bytes::from_static(b"a body")),
        ])
        .await;
    assert_eq!(refusal(&frames).refusal, Refusal::Overloaded);
    assert_eq!(fx.refused("body-limit"), 1.0);
    // A bodiless request (its stream ends with its head) takes no place.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/"))])
        .await;
    assert_eq!(response(&frames).0.status, StatusCode::OK);
    // Once the held body ends, its place is free again.
    held.finish().unwrap();
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(5));
    loop {
        let frames = fx
            .exchange(&[
                open(http_open(RATINGS, Method::POST, "/")),
                Frame::Data(Bytes::from_static(b"a body")),
            ])
            .await;
        if matches!(frames.first(), Some(Frame::Response(_))) {
            assert_eq!(response(&frames).0.status, StatusCode::OK);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ended body's place was not given back: {frames:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_heads_are_answered_bad_request_and_the_link_keeps_serving() {
    let fx = Fixture::start().await;
    // A body frame where the OPEN must be.
    let frames = fx.exchange(&[Frame::Data(Bytes::from_static(b"x"))]).await;
    let e = refusal(&frames);
    assert_eq!(e.refusal, Refusal::BadRequest);
    assert!(e.message.contains("must start with OPEN"), "{}", e.message);

    // Bytes that are no frame at all: an unknown type, a huge length.
    for garbage in [&b"\xee\x00\x00\x00\x01z"[..], b"\x01\xff\xff\xff\xff"] {
        let (mut send, recv) = fx.stream().await;
        send.write_all(garbage).await.unwrap();
        send.finish().unwrap();
        let frames = answer(recv).await;
        let e = refusal(&frames);
        assert_eq!(e.refusal, Refusal::BadRequest, "{garbage:?}");
        assert!(!e.message.is_empty());
    }
    // A stream that ends before its head.
    let (mut send, recv) = fx.stream().await;
    send.write_all(b"\x01\x00").await.unwrap();
    send.finish().unwrap();
    assert_eq!(refusal(&answer(recv).await).refusal, Refusal::BadRequest);
    assert_eq!(fx.refused("bad-request"), 4.0);

    // West is still up, and the same link still serves.
    let frames = fx
        .exchange(&[open(http_open(RATINGS, Method::GET, "/"))])
        .await;
    assert_eq!(response(&frames).0.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_with_no_local_endpoint_is_refused_no_healthy_endpoint() {
    let fx = Fixture::start().await;
    let mut o = http_open(RATINGS, Method::GET, "/");
    o.subset = Some("v9".into());
    o.subset_labels = vec![("version".into(), "v9".into())];
    let frames = fx.exchange(&[open(o)]).await;
    let e = refusal(&frames);
    assert_eq!(e.refusal, Refusal::NoHealthyEndpoint);
    assert!(
        e.message
            .contains(&format!("no healthy endpoint for {RATINGS} in subset v9")),
        "{}",
        e.message
    );
    assert_eq!(fx.seen.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xfcc_header_from_the_source_gateway_never_reaches_the_endpoint() {
    let fx = Fixture::start().await;
    // No caller identity: west has nothing to vouch for, so the endpoint
    // sees no XFCC at all, not the one east sent.
    let mut o = http_open(RATINGS, Method::GET, "/");
    o.http.as_mut().unwrap().headers.insert(
        &XFCC,
        HeaderValue::from_static("By=x;URI=spiffe://cluster.local/ns/default/sa/admin"),
    );
    let frames = fx.exchange(&[open(o)]).await;
    let (head, _) = response(&frames);
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["x-seen-xfcc"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_connections_is_answered_connect_failed() {
    let fx = Fixture::start().await;
    for kind in [StreamKind::Http, StreamKind::Tcp] {
        let mut o = http_open(DOWN, Method::GET, "/");
        if kind == StreamKind::Tcp {
            o.kind = kind;
            o.http = None;
        }
        let frames = fx.exchange(&[open(o)]).await;
        let e = refusal(&frames);
        assert_eq!(e.refusal, Refusal::ConnectFailed, "{kind:?}: {}", e.message);
        assert_eq!(e.refusal.http_status(), StatusCode::BAD_GATEWAY);
    }
}

/// Upper bounds, in bytes, of the destination's request-path futures: what
/// they measured (dev profile) plus a little. Each is boxed once per
/// stream, and boxing copies the whole future. `serve_http` was 10,856
/// bytes until the endpoint pool's connect and TLS setup were boxed (the
/// rare paths of `upstream::send`); it is 3,696 now.
const SERVE_STREAM_MAX: usize = 2560;
const SERVE_HTTP_MAX: usize = 4_096;
const SERVE_TCP_MAX: usize = 1536;

/// The destination's per-stream futures stay small (issue 17), so that
/// one cannot silently grow back: the tunnel boxes [`serve_stream`]'s
/// future for every stream it accepts, and `serve` boxes the exchange of
/// the stream's kind, each a copy of the whole future; a TCP stream holds
/// its futures for as long as it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_futures_stay_small() {
    let fx = Fixture::start().await;
    let state = fx.west.clone();
    let peer = Arc::new(PeerInfo {
        cluster: "east".into(),
        id: "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0".into(),
        trust_domain: TD.into(),
    });
    let mut sizes = Vec::new();
    let (send, recv) = fx.stream().await;
    let f = serve_stream(state.clone(), peer.clone(), send, recv);
    sizes.push(("serve_stream", std::mem::size_of_val(&f), SERVE_STREAM_MAX));
    drop(f);

    let active = state.active.load_full();
    let endpoints = state.endpoints.borrow().clone();
    let selector = BTreeMap::new();
    let o = http_open(RATINGS, Method::GET, "/");
    let dest = crate::upstream::Dest {
        service: RATINGS,
        subset: None,
        port: 9080,
        selector: &selector,
    };
    let pick = || {
        let candidates = crate::endpoints::healthy(&endpoints, RATINGS, &selector);
        state
            .upstream
            .choose_from(&active, candidates, &dest)
            .expect("ratings has an endpoint")
    };
    let (send, recv) = fx.stream().await;
    let f = serve_http(
        &state,
        &peer,
        &o,
        o.http.clone(),
        pick(),
        "/".into(),
        false,
        send,
        recv,
        BytesMut::new(),
        Instant::now(),
    );
    sizes.push(("serve_http", std::mem::size_of_val(&f), SERVE_HTTP_MAX));
    drop(f);
    let (send, recv) = fx.stream().await;
    let f = serve_tcp(&state, &o, pick(), send, recv, BytesMut::new());
    sizes.push(("serve_tcp", std::mem::size_of_val(&f), SERVE_TCP_MAX));
    drop(f);

    eprintln!("destination futures (bytes): {sizes:?}");
    let over: Vec<_> = sizes.iter().filter(|(_, size, max)| size > max).collect();
    assert!(
        over.is_empty(),
        "destination futures over their bound (name, bytes, bound): {over:?}. A future on the \
         request path grew: find the new local that lives across an `.await`, or the sub-future \
         awaited inline, and box it where it is made (a rarely taken branch first), or keep it \
         behind a pointer. Raise a bound only with before/after instructions per request \
         (`meshfed-bench instructions`) in docs/benchmarks.md."
    );
}
