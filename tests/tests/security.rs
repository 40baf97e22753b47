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

use meshfed_gateway::wire::frame::{ALPN, Frame, Refusal};
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

/// `meshfed_udp_datagrams_dropped_total` by reason, from one scrape, in
/// the order of [`REASONS`].
const REASONS: [&str; 4] = [
    "not_quic",
    "unsupported_version",
    "short_initial",
    "unknown_cid",
];

fn dropped(gw: &GatewayProcess) -> [u64; 4] {
    let text = gw.admin_get("/metrics");
    REASONS.map(|r| {
        let series = format!("meshfed_udp_datagrams_dropped_total{{reason=\"{r}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in /metrics"))
    })
}

/// Sends `payloads` to `to` in small batches, each time waiting until the
/// gateway has counted them (`expect` per reason, cumulative), so that no
/// datagram is lost to a full socket buffer on a busy machine.
fn send_counted(
    sock: &UdpSocket,
    gw: &GatewayProcess,
    payloads: &[(usize, Vec<u8>)],
    expect: &mut [u64; 4],
) {
    for batch in payloads.chunks(40) {
        for (reason, p) in batch {
            sock.send_to(p, gw.tunnel).unwrap();
            expect[*reason] += 1;
        }
        let want = *expect;
        meshfed_tests::assert_eventually(
            &format!("west counts {want:?} dropped datagrams"),
            Duration::from_secs(10),
            || dropped(gw) == want,
        );
    }
}

/// A long header: `ty` 0 is Initial; connection IDs of 8 bytes.
fn long_header(ty: u8, version: u32, len: usize, next: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut p = vec![0xc0 | (ty << 4) | (next() as u8 & 0x0f)];
    p.extend_from_slice(&version.to_be_bytes());
    for _ in 0..2 {
        p.push(8);
        p.extend((0..8).map(|_| next() as u8));
    }
    while p.len() < len {
        p.push(next() as u8);
    }
    p
}

/// quinn drops datagrams that are not QUIC for this gateway without a word;
/// the tunnel's socket looks at each before quinn does and counts it by
/// kind (gateway/src/tunnel/socket.rs). Asserted: each kind sent is counted
/// exactly, once (the real links' own packets, flowing all along, add
/// nothing); nothing answers them; a datagram quinn must answer (an unknown
/// version in a full-size datagram: Version Negotiation) still reaches
/// quinn and is answered; the gateway keeps its links and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_datagrams_on_the_tunnel_port_are_counted_get_no_answer_and_break_nothing()
 {
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
    let start = dropped(&west);
    let mut expect = start;

    // 100 of each kind, crafted.
    let mut kinds: Vec<(usize, Vec<u8>)> = Vec::new();
    for i in 0..100 {
        let len = (next() % 1400) as usize + 1;
        // The QUIC bit clear: TLS or DNS sent to the wrong port, zeros,
        // anything.
        let mut p: Vec<u8> = match i {
            0 => b"\x16\x03\x01\x00\x05hello".to_vec(),
            // A DNS query for example.com, ID 0x1234.
            1 => b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01".to_vec(),
            2 => vec![0u8; 1200],
            _ => (0..len).map(|_| next() as u8).collect(),
        };
        p[0] &= !0x40;
        kinds.push((0, p));
        // QUIC v2, a reserved (greasing) version, a draft quinn dropped;
        // under 1,200 bytes, which quinn must not answer.
        let version = [0x6b33_43cf, 0x1a2a_3a4a, 0xff00_001c][i % 3];
        let len = 30 + (next() % 1100) as usize;
        kinds.push((1, long_header((next() % 4) as u8, version, len, &mut next)));
        // A v1 Initial under 1,200 bytes for an ID the gateway never
        // issued.
        let len = 40 + (next() % 1150) as usize;
        kinds.push((2, long_header(0, 1, len, &mut next)));
        // A short header for an ID the gateway never issued.
        let len = 21 + (next() % 1380) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        p[0] = 0x40 | (p[0] & 0x3f);
        kinds.push((3, p));
    }
    send_counted(&sock, &west, &kinds, &mut expect);
    assert_eq!(
        expect
            .iter()
            .zip(start)
            .map(|(e, s)| e - s)
            .collect::<Vec<_>>(),
        vec![100; 4]
    );

    // The old random flood: 2,004 counted by whatever they look like...
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
    let before = dropped(&west).iter().sum::<u64>();
    for (i, batch) in payloads.chunks(40).enumerate() {
        for p in batch {
            sock.send_to(p, west.tunnel).unwrap();
        }
        let want = before + (i * 40 + batch.len()) as u64;
        meshfed_tests::assert_eventually(
            "west counts the random datagrams",
            Duration::from_secs(10),
            || dropped(&west).iter().sum::<u64>() >= want,
        );
    }
    let after = dropped(&west).iter().sum::<u64>();
    assert_eq!(after - before, payloads.len() as u64, "each counted once");

    // ...and v1 Initial lookalikes of full size with random contents, the
    // costliest kind (quinn derives keys and fails to decrypt), which go on
    // to quinn (only it can tell them from a client's first flight) and
    // are not counted.
    for batch in 0..10 {
        for _ in 0..50 {
            let p = long_header(0, 1, 1200, &mut next);
            sock.send_to(&p, west.tunnel).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20 + batch)).await;
    }
    assert_eq!(
        dropped(&west).iter().sum::<u64>(),
        after,
        "full-size Initials are quinn's to judge"
    );
    let mut buf = [0u8; 2048];
    let mut answers = 0;
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        // A version negotiation or stateless reset would be an answer.
        answers += usize::from(n > 0);
    }
    assert_eq!(answers, 0, "garbage got answers");

    // An unknown version in a full-size datagram is a client QUIC lets
    // downgrade: quinn answers with Version Negotiation, so the socket
    // counted it but did not drop it.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let unsupported = dropped(&west)[1];
    probe
        .send_to(&long_header(0, 0x6b33_43cf, 1200, &mut next), west.tunnel)
        .unwrap();
    let (n, _) = probe.recv_from(&mut buf).expect("no Version Negotiation");
    assert!(
        n >= 7 && buf[0] & 0x80 != 0 && buf[1..5] == [0; 4],
        "not a VN: {:?}",
        &buf[..n]
    );
    assert_eq!(dropped(&west)[1], unsupported + 1);

    assert_eq!(east.links_up("west"), 1, "the link stayed up");
    assert_eq!(call(&east), (200, "ratings-west".into()));
    let total = dropped(&west).iter().sum::<u64>() - start.iter().sum::<u64>();
    eprintln!(
        "west counted {total} dropped datagrams: {:?}",
        dropped(&west)
    );
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

/// HTTP/2's answer to slowloris: a caller that sends the connection
/// preface and an empty SETTINGS, then nothing, has no request in flight;
/// at the header timeout (`--header-timeout 1s` here) the gateway sends
/// GOAWAY, and since the caller does not answer the GOAWAY's PING, drops
/// the connection at most the timeout later (5 s with the default 30 s).
/// The listener counts it as `header-timeout`, as it does HTTP/1's. The
/// same for a caller that stalls inside a request's header block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_that_sends_the_preface_and_stalls_gets_goaway_and_is_cut_at_the_header_timeout()
 {
    let (backend, _b) = http_backend("ratings-west").await;
    let (_dir, east, _west) = two_clusters(
        "ratings",
        backend,
        vec!["--header-timeout".into(), "1s".into()],
    );
    // The preface and an empty SETTINGS; then, on a second connection, the
    // same and a request's HEADERS without END_HEADERS (its CONTINUATION
    // never comes): h2 has no request until the header block is complete.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let open_headers: &[u8] = b"\0\0\x01\x01\x01\0\0\0\x01\x82";
    for (n, extra) in [&[][..], open_headers].into_iter().enumerate() {
        let before = east.metric("meshfed_refusals_total", &["listener", "header-timeout"]);
        let mut s = TcpStream::connect(east.outbound).unwrap();
        s.write_all(&[PREFACE, extra].concat()).unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        // Read frames until the gateway closes: 9-byte headers, type at [3].
        let mut bytes = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("not closed after {:?}: {e}", started.elapsed()),
            }
        }
        let closed_after = started.elapsed();
        let mut types = Vec::new();
        let mut at = 0;
        while at + 9 <= bytes.len() {
            let len = usize::from(bytes[at]) << 16
                | usize::from(bytes[at + 1]) << 8
                | usize::from(bytes[at + 2]);
            types.push(bytes[at + 3]);
            at += 9 + len;
        }
        eprintln!(
            "stalled HTTP/2 caller #{n} closed after {closed_after:?}; frame types {types:?}"
        );
        assert!(
            types.contains(&0x7),
            "no GOAWAY before the close: {types:?}"
        );
        assert!(
            closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_secs(6),
            "closed after {closed_after:?}; timeout 1 s, then at most 1 s for the GOAWAY"
        );
        meshfed_tests::assert_eventually("the listener counts it", Duration::from_secs(5), || {
            east.metric("meshfed_refusals_total", &["listener", "header-timeout"]) >= before + 1.0
        });
    }
    assert_eq!(call(&east), (200, "ratings-west".into()));
}

/// The header timeout bounds only HTTP/2 connections with nothing in
/// flight: with `--header-timeout 1s`, a request that takes 3 s at the
/// backend completes on its live connection, and a second one follows on
/// it. Once idle, the connection is closed with GOAWAY (the client answers
/// its PING, so it ends cleanly) and counted as `idle-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_a_long_request_in_flight_is_not_cut_and_is_closed_once_idle() {
    let (backend, _b) = serve_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        hyper::Response::builder()
            .header("x-served-by", "ratings-west")
            .body(http_body_util::Full::new(bytes::Bytes::from("ok")))
            .unwrap()
    })
    .await;
    let (_dir, east, _west) = two_clusters(
        "ratings",
        backend,
        vec!["--header-timeout".into(), "1s".into()],
    );
    let idle_before = east.metric("meshfed_refusals_total", &["listener", "idle-timeout"]);
    let header_before = east.metric("meshfed_refusals_total", &["listener", "header-timeout"]);
    let tcp = tokio::net::TcpStream::connect(east.outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let mut conn = tokio::spawn(conn);
    for path in ["/slow", "/"] {
        let started = Instant::now();
        let req = hyper::Request::get(format!("http://ratings.default:9080{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-served-by"], "ratings-west");
        let took = started.elapsed();
        eprintln!("{path} answered after {took:?} on the same connection");
        assert!(path != "/slow" || took >= Duration::from_millis(2900));
    }
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut conn)
        .await
        .expect("the idle connection was never closed")
        .unwrap();
    let closed_after = idle_from.elapsed();
    eprintln!("idle HTTP/2 connection closed after {closed_after:?}: {ended:?}");
    assert!(ended.is_ok(), "not a clean GOAWAY close: {ended:?}");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_secs(6),
        "closed after {closed_after:?} idle; timeout 1 s"
    );
    meshfed_tests::assert_eventually("the listener counts it", Duration::from_secs(5), || {
        east.metric("meshfed_refusals_total", &["listener", "idle-timeout"]) >= idle_before + 1.0
    });
    assert_eq!(
        east.metric("meshfed_refusals_total", &["listener", "header-timeout"]),
        header_before,
        "an idle connection is not a header timeout"
    );
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
