//! VirtualService `sourceLabels` through a real gateway: the caller's
//! labels are those of its address in the gateway's discovery. Callers are
//! told apart by their loopback source address (127.0.0.2 is `productpage`
//! in the discovery file); the backends are real HTTP servers.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use meshfed_tests::federation::*;

/// A GET for `ratings` through the gateway at `via`, from source address
/// `from`: the body (the backend's name).
async fn get_from(via: SocketAddr, from: IpAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(via))
        .await
        .expect("no connection within 10 s")
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "ratings")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_route_a_caller_by_the_labels_of_its_address_in_discovery() {
    let (v1, _t1) = http_backend("v1").await;
    let (v2, _t2) = http_backend("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("ratings.yaml"),
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: ratings, subset: v2}}]
  - route: [{destination: {host: ratings, subset: v1}}]
",
    )
    .unwrap();
    let eps = dir.path().join("eps.yaml");
    // productpage runs at 127.0.0.2 (its port does not matter: callers
    // come from ephemeral ports).
    discovery_file(
        &eps,
        &[
            (
                "ratings.default",
                vec![(v1, vec![("version", "v1")]), (v2, vec![("version", "v2")])],
            ),
            (
                "productpage.default",
                vec![(
                    "127.0.0.2:9080".parse().unwrap(),
                    vec![("app", "productpage")],
                )],
            ),
        ],
    );
    let gw = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir,
        discovery: Some(eps),
        tunnel_port: free_udp_port(),
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    });
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    for _ in 0..5 {
        // productpage's address carries `app: productpage`.
        assert_eq!(get_from(gw.outbound, ip("127.0.0.2")).await, "v2");
        // 127.0.0.1 carries the ratings endpoints' labels, not productpage's.
        assert_eq!(get_from(gw.outbound, ip("127.0.0.1")).await, "v1");
        // An address discovery does not know has no labels.
        assert_eq!(get_from(gw.outbound, ip("127.0.0.3")).await, "v1");
    }
}
