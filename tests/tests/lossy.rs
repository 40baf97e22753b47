//! Lossy and intermittent links: east reaches west's gateway only through
//! the user-space impairment relay (`meshfed_tests::relay`, fixed seed),
//! since `tc netem` is unavailable here. Real gateways, real QUIC. And a
//! NAT rebinding: the relay moving east's link to a new source port under
//! an open stream, and a peer (the test double of `support/peer.rs`) whose
//! own socket moves.
//!
//! Runs in nextest's `serial` group: it measures deadlines.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/peer.rs"]
mod peer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshfed_tests::federation::*;
use meshfed_tests::probe::Prober;
use meshfed_tests::relay::{Impairment, Relay};

struct Linked {
    _dir: tempfile::TempDir,
    east: GatewayProcess,
    _west: GatewayProcess,
    relay: Relay,
    _backend: tokio::task::JoinHandle<()>,
}

/// east and west, where west's `Cluster` lists the relay's address, so
/// east's link to west crosses it.
async fn linked(impairment: Impairment) -> Linked {
    linked_with(impairment, vec![]).await
}

/// [`linked`], with `args` for both gateways.
async fn linked_with(impairment: Impairment, args: Vec<String>) -> Linked {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let west_addr: SocketAddr = format!("127.0.0.1:{west_port}").parse().unwrap();
    let relay = Relay::udp("127.0.0.1:0".parse().unwrap(), west_addr, impairment).unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[relay.local_addr().port()])
        ),
    )
    .unwrap();
    let (backend, task) = http_backend("ratings-west").await;
    let eps = dir.path().join("west.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery,
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: args.clone(),
    };
    let west = GatewayProcess::start(&spec("west", west_port, Some(eps)));
    let east = GatewayProcess::start(&spec("east", east_port, None));
    east.wait_links("west", 1);
    Linked {
        _dir: dir,
        east,
        _west: west,
        relay,
        _backend: task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_calls_succeed_over_a_link_with_5_percent_loss_and_200ms_rtt() {
    calls_succeed_over_5_percent_loss_and_200ms_rtt(vec![]).await;
}

/// The same with BBR on the links (`--congestion-control bbr`), the
/// setting for lossy edge links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_calls_succeed_over_a_lossy_link_with_bbr() {
    calls_succeed_over_5_percent_loss_and_200ms_rtt(vec![
        "--congestion-control".into(),
        "bbr".into(),
    ])
    .await;
}

/// 10 s of calls, one every 50 ms, through a relay that loses 5% of the
/// datagrams and delays them to a 200 ms round trip: none fails and the
/// link never goes down.
async fn calls_succeed_over_5_percent_loss_and_200ms_rtt(args: Vec<String>) {
    let l = linked_with(Impairment::lossy(0.05, Duration::from_millis(200), 9), args).await;
    let p = Prober::start(
        l.east.outbound,
        "ratings",
        Duration::from_millis(50),
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let samples = p.stop().await;
    let stats = l.relay.stats();
    let failed: Vec<_> = samples.iter().filter(|s| !s.ok()).collect();
    let mut lat: Vec<_> = samples.iter().map(|s| s.end - s.start).collect();
    lat.sort();
    eprintln!(
        "{} calls, {} failed, p50 {:?}, max {:?}; relay {stats:?}",
        samples.len(),
        failed.len(),
        lat[lat.len() / 2],
        lat.last().unwrap()
    );
    assert!(stats.lost > 0, "the relay lost datagrams: {stats:?}");
    assert!(samples.len() >= 150);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(l.east.links_up("west"), 1, "the link never flapped down");
}

/// After a 10 s outage the link is back within 1 s of the path returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_after_a_10s_outage_the_link_is_back_within_1s_of_reachability() {
    let l = linked(Impairment::seeded(3)).await;
    l.relay.set_outage(true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(l.east.links_up("west"), 0, "the outage was noticed");
    l.relay.set_outage(false);
    let healed = Instant::now();
    let mut back = None;
    while healed.elapsed() < Duration::from_secs(10) {
        if l.east.links_up("west") == 1 {
            back = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back = back.expect("the link did not come back within 10 s");
    eprintln!("link back {back:?} after the path returned");
    assert!(back <= Duration::from_secs(1), "link back after {back:?}");
}

/// A NAT rebinding between two real gateways: the relay on east's path to
/// west closes its upstream socket in the middle of a request, so west
/// sees east's link arrive from a new source port (replies to the old one
/// are lost, as behind a NAT whose mapping changed). West validates the
/// new path and the open stream finishes: the backend gets the whole body,
/// and the link never goes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_an_open_stream_between_real_gateways_survives_a_nat_rebinding() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = linked(Impairment::seeded(5)).await;
    assert_eq!(l.relay.stats().flows, 1);
    let mut caller = tokio::net::TcpStream::connect(l.east.outbound)
        .await
        .unwrap();
    caller
        .write_all(b"POST / HTTP/1.1\r\nhost: ratings\r\ncontent-length: 2000\r\n\r\n")
        .await
        .unwrap();
    caller.write_all(&[b'a'; 1000]).await.unwrap();
    // The first half is on its way (or across); the request is open
    // either way, since west's backend answers only after the whole body.
    let forwarded = l.relay.stats().forwarded;
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.relay.stats().forwarded < forwarded + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    l.relay.rebind();
    caller.write_all(&[b'b'; 1000]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = caller.read(&mut chunk).await.unwrap();
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 || text.contains("ratings-west:") && text.ends_with(char::is_numeric) {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(read.is_ok(), "no whole answer within 10 s: {text:?}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ratings-west:2000"), "{text}");
    assert_eq!(
        l.relay.stats().flows,
        2,
        "the second half crossed from a new source port"
    );
    assert_eq!(l.east.links_up("west"), 1, "the link stayed up");
    // And new calls keep going over the moved link.
    let p = Prober::start(
        l.east.outbound,
        "ratings",
        Duration::from_millis(20),
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = p.stop().await;
    assert!(
        !samples.is_empty() && samples.iter().all(|s| s.ok()),
        "{samples:?}"
    );
}

/// A NAT rebinding, as the destination sees it: the source's address
/// (here its UDP port) changes in the middle of a request. The peer double
/// rebinds its socket (`quinn::Endpoint::rebind`, what a NAT that assigns a
/// new port does to the peer's view) between two halves of a request
/// body. The destination's gateway must accept the migration: the open
/// stream goes on and the backend gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_survives_the_peers_source_address_changing() {
    use bytes::Bytes;
    use meshfed_gateway::wire::frame::{self, ALPN, Frame};
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, _east, west) = two_clusters("ratings", backend, vec![]);
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let endpoint = peer::client(
        peer::creds_from_dir(&pki.gateway("east", "nat")),
        ALPN,
        false,
    );
    let conn = peer::connect(&endpoint, west.tunnel, "west").await.unwrap();
    let before = endpoint.local_addr().unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("content-length", "2000".parse().unwrap());
    let open = Frame::Open(Box::new(frame::Open {
        kind: frame::StreamKind::Http,
        service: "ratings.default.svc.cluster.local".into(),
        port: 80,
        subset: None,
        subset_labels: vec![],
        caller: None,
        source_version: None,
        sni: None,
        http: Some(frame::RequestHead {
            method: http::Method::POST,
            scheme: "http".into(),
            authority: "ratings".into(),
            path: "/".into(),
            headers,
        }),
    }));
    send.write_all(&peer::encode(&open)).await.unwrap();
    send.write_all(&peer::encode(&Frame::Data(Bytes::from(vec![b'a'; 1000]))))
        .await
        .unwrap();
    // Let the first half cross, then move.
    tokio::time::sleep(Duration::from_millis(200)).await;
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let after = endpoint.local_addr().unwrap();
    assert_ne!(before.port(), after.port());
    send.write_all(&peer::encode(&Frame::Data(Bytes::from(vec![b'b'; 1000]))))
        .await
        .unwrap();
    send.finish().unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            while let Some(f) = frame::decode(&mut buf).unwrap() {
                frames.push(f);
            }
            let mut chunk = [0u8; 4096];
            match recv.read(&mut chunk).await.unwrap() {
                Some(n) => buf.extend_from_slice(&chunk[..n]),
                None => break,
            }
        }
    })
    .await
    .expect("the stream stalled after the rebinding");
    let status = frames.iter().find_map(|f| match f {
        Frame::Response(h) => Some(h.status),
        _ => None,
    });
    let body: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data(d) => Some(d.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(status, Some(http::StatusCode::OK), "{frames:?}");
    assert_eq!(String::from_utf8_lossy(&body), "ratings-west:2000");
    assert!(
        conn.close_reason().is_none(),
        "the connection is still open"
    );
    eprintln!("stream survived a source move {before} → {after}");
}
