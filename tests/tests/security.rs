//! Hostile peers and callers against real gateway processes: each is
//! refused, counted where the gateway counts it, and leaves the gateway
//! serving. Peers are test doubles built from quinn and the library's own
//! framing (`support/peer.rs`); callers are raw TCP.
//!
//! Covered elsewhere, not repeated here: a foreign CA and a leaf of one
//! cluster's CA claiming another cluster (tests/federation.rs), a gateway
//! asserting a workload outside its cluster's trust domain (tests/authz.rs),
//! decoder robustness (fuzz targets and their corpus replay).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/peer.rs"]
mod peer;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use meshfed_gateway::tunnel::frame::{ALPN, Frame, Refusal};
use meshfed_tests::federation::*;

const SERVICE: &str = "ratings.default.svc.cluster.local";

/// A plain GET through `gw`'s outbound listener; status and `x-served-by`.
fn call(gw: &GatewayProcess) -> (u16, String) {
    let mut s = TcpStream::connect(gw.outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let served = out
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .unwrap_or("")
        .to_string();
    (status, served)
}

async fn federation() -> (
    tempfile::TempDir,
    GatewayProcess,
    GatewayProcess,
    tokio::task::JoinHandle<()>,
) {
    let (backend, task) = http_backend("ratings-west").await;
    let (dir, east, west) = two_clusters("ratings", backend, vec![]);
    (dir, east, west, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_gateway_certificates_are_refused_and_counted() {
    let (dir, east, west, _b) = federation().await;
    let east_ca = dir.path().join("ca/east");
    for (creds, reason) in [
        (
            peer::forged(&east_ca, "east", (2020, 1, 1), (2021, 1, 1)),
            "expired",
        ),
        (
            peer::forged(&east_ca, "east", (2099, 1, 1), (2100, 1, 1)),
            "not_yet_valid",
        ),
    ] {
        let before = west.metric("meshfed_handshake_refusals_total", &[reason]);
        let endpoint = peer::client(creds, ALPN, false);
        // TLS 1.3: the client may finish before the server refuses its
        // certificate; the connection is then closed at once and no stream
        // is ever served.
        if let Ok(conn) = peer::connect(&endpoint, west.tunnel, "west").await {
            let opened = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&peer::encode(&peer::get_open(SERVICE, "ratings")))
                    .await?;
                let mut b = [0u8; 16];
                recv.read(&mut b).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            };
            let r = tokio::time::timeout(Duration::from_secs(5), opened)
                .await
                .unwrap();
            assert!(r.is_err(), "a {reason} certificate got a stream served");
        }
        meshfed_tests::assert_eventually(
            &format!("west counts a {reason} refusal"),
            Duration::from_secs(5),
            || west.metric("meshfed_handshake_refusals_total", &[reason]) > before,
        );
    }
    assert_eq!(call(&east), (200, "ratings-west".into()));
}

/// quinn drops datagrams that are not QUIC (or not for a connection it
/// knows) without a word; the gateway does not count them (no hook for it
/// in quinn 0.11). What is asserted: nothing answers them, and the
/// gateway keeps its links and serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_datagrams_on_the_tunnel_port_get_no_answer_and_break_nothing() {
    let (_dir, east, west, _b) = federation().await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut payloads: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: west\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x00\x05hello".to_vec(),
        vec![0u8; 1200],
        vec![0xffu8; 1500],
    ];
    for _ in 0..2000 {
        let len = (next() % 1400) as usize + 1;
        payloads.push((0..len).map(|_| next() as u8).collect());
    }
    // Long-header "Initial" lookalikes with random contents: the costliest
    // kind to parse.
    for _ in 0..500 {
        let mut p: Vec<u8> = (0..1200).map(|_| next() as u8).collect();
        p[0] = 0xc0 | (p[0] & 0x0f);
        p[1..5].copy_from_slice(&1u32.to_be_bytes());
        payloads.push(p);
    }
    for p in &payloads {
        sock.send_to(p, west.tunnel).unwrap();
    }
    let mut buf = [0u8; 2048];
    let mut answers = 0;
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        // A version negotiation or stateless reset would be an answer.
        answers += usize::from(n > 0);
    }
    assert_eq!(answers, 0, "garbage got answers");
    assert_eq!(east.links_up("west"), 1, "the link stayed up");
    assert_eq!(call(&east), (200, "ratings-west".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_tunnel_header_is_refused_at_its_length_and_counted() {
    let (dir, east, west, _b) = federation().await;
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let endpoint = peer::client(
        peer::creds_from_dir(&pki.gateway("east", "probe")),
        ALPN,
        false,
    );
    let conn = peer::connect(&endpoint, west.tunnel, "west").await.unwrap();
    let before = west.metric("meshfed_refusals_total", &["stream", "bad-request"]);
    // An OPEN that claims 65,537 bytes, one more than a header block may
    // hold; only a little of it is sent: the refusal must come from the
    // length alone, before any buffering.
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&(65_537u32).to_be_bytes());
    bytes.extend_from_slice(&[0u8; 1024]);
    match peer::exchange(&conn, &bytes).await {
        Frame::Error(e) => {
            assert_eq!(e.refusal, Refusal::BadRequest);
            assert!(e.message.contains("exceeds the limit"), "{}", e.message);
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    // A DATA frame as the first frame, 4 GiB long: the same.
    let mut bytes = vec![0x03];
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        peer::exchange(&conn, &bytes).await,
        Frame::Error(_)
    ));
    assert!(west.metric("meshfed_refusals_total", &["stream", "bad-request"]) >= before + 2.0);
    // The connection and the gateway are fine: a valid stream on the same
    // connection is served.
    match peer::exchange(&conn, &peer::encode(&peer::get_open(SERVICE, "ratings"))).await {
        Frame::Response(head) => assert_eq!(head.status, 200),
        other => panic!("expected RESPONSE, got {other:?}"),
    }
    assert_eq!(call(&east), (200, "ratings-west".into()));
}

/// A slowloris caller sends a request head one byte a second. hyper's
/// header-read timeout (`HEADER_READ_TIMEOUT`, 30 s) closes it and the
/// listener counts it; other callers are served meanwhile. Takes ~30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_caller_is_cut_at_the_header_read_timeout_and_counted() {
    let (_dir, east, _west, _b) = federation().await;
    let timeout = meshfed_gateway::proxy::outbound::HEADER_READ_TIMEOUT;
    let mut s = TcpStream::connect(east.outbound).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\n").unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut closed_after = None;
    while started.elapsed() < timeout + Duration::from_secs(10) {
        // One byte a second; the read waits that second. A read of 0
        // bytes (FIN), any answer (hyper may say 408), a reset or a failed
        // write: the gateway gave up on us.
        let mut b = [0u8; 256];
        let gone = s.write_all(b"X").is_err()
            || match s.read(&mut b) {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
        if gone {
            closed_after = Some(started.elapsed());
            break;
        }
        if started.elapsed().as_secs() % 10 == 5 {
            assert_eq!(call(&east).0, 200, "others are served meanwhile");
        }
    }
    let closed_after = closed_after.expect("the slowloris connection was never closed");
    eprintln!("slowloris closed after {closed_after:?}");
    assert!(
        closed_after >= timeout - Duration::from_secs(1)
            && closed_after <= timeout + Duration::from_secs(5),
        "closed after {closed_after:?}, timeout {timeout:?}"
    );
    meshfed_tests::assert_eventually("the listener counts it", Duration::from_secs(5), || {
        east.metric("meshfed_refusals_total", &["listener", "header-timeout"]) >= 1.0
    });
}

/// 0-RTT: the tunnel's TLS issues no session tickets (docs/tunnel.md), so
/// no peer can ever send a request as early data, idempotent or not. A
/// client that wants 0-RTT (resumption on, early data on) connects twice:
/// the second connection still has no 0-RTT to offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_can_travel_as_0rtt_because_the_tunnel_issues_no_session_tickets() {
    let (dir, _east, west, _b) = federation().await;
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let creds = pki.gateway("east", "early");
    let endpoint = peer::client(peer::creds_from_dir(&creds), ALPN, true);
    let first = peer::connect(&endpoint, west.tunnel, "west").await.unwrap();
    // Tickets would come right after the handshake; let a request cross
    // to be sure the connection is fully up.
    match peer::exchange(&first, &peer::encode(&peer::get_open(SERVICE, "ratings"))).await {
        Frame::Response(head) => assert_eq!(head.status, 200),
        other => panic!("{other:?}"),
    }
    first.close(0u32.into(), b"done");
    let connecting = endpoint
        .connect(west.tunnel, "west.cluster.meshfed.internal")
        .unwrap();
    match connecting.into_0rtt() {
        Ok(_) => panic!("the client could send 0-RTT data: a session ticket was issued"),
        Err(connecting) => {
            // A full handshake instead, which works.
            tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .unwrap()
                .unwrap();
        }
    }
}
