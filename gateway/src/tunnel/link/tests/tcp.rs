//! TCP links (HTTP/2 over mutual TLS, `--link-transport tcp`): the QUIC
//! links' specifications that the transport must meet too, on loopback
//! with real TLS.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn tcp() -> LinkSettings {
    LinkSettings {
        transport: LinkTransport::Tcp,
        ..LinkSettings::default()
    }
}

#[tokio::test]
async fn over_tcp_a_peer_links_up_streams_both_ways_and_is_known_by_its_certificate_cluster() {
    let (east, _west, mut served) = linked(tcp()).await;
    let link = east.tunnel.pick("west").unwrap();
    assert_eq!(
        link.connection().unwrap().transport(),
        Transport::Tcp,
        "a TCP link, as configured"
    );
    let status = east.tunnel.status();
    assert_eq!(status[0].transport, Transport::Tcp, "/peers says tcp");
    let (mut send, mut recv, guard) = link.open().await.unwrap();
    assert_eq!(link.open_streams(), 1);
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .expect("west serves the stream east opened")
        .unwrap();
    assert_eq!(s.peer.cluster, "east");
    assert_eq!(
        s.peer.id,
        "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0"
    );
    assert_eq!(s.recv.read_to_end(64).await.unwrap(), b"ping");
    // More than a window's worth one way, so flow control must move.
    let big = vec![7u8; 20 << 20];
    let writer = tokio::spawn(async move {
        s.send.write_all(&big).await.unwrap();
        s.send.finish().unwrap();
        s
    });
    let got = recv.read_to_end(32 << 20).await.unwrap();
    assert_eq!(got.len(), 20 << 20);
    assert!(got.iter().all(|b| *b == 7));
    drop(writer.await.unwrap());
    drop(guard);
    assert_eq!(link.open_streams(), 0);
    // Announcements arrive over the control stream.
    assert!(link.announcement(Duration::from_secs(16)).is_some());
}

#[tokio::test]
async fn over_tcp_a_gateway_of_another_trust_anchor_is_refused_at_the_handshake_and_counted() {
    let pki = Pki::new("anchor");
    let other = Pki::new("other-anchor");
    let west = Gw::new(&pki.gateway("west", &[]), "west", tcp());
    let rogue = Gw::new(&other.gateway("east", &[&pki]), "east", tcp());
    let mut served = west.serve();
    west.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    rogue
        .tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    until(
        "west counts an unknown-CA refusal",
        Duration::from_secs(5),
        || west.refusals.count(RefusalReason::UnknownCa) >= 1,
    )
    .await;
    until(
        "the rogue's dial records why",
        Duration::from_secs(5),
        || !rogue.last_error("west").is_empty(),
    )
    .await;
    assert!(rogue.tunnel.pick("west").is_none());
    assert!(rogue.link("west").open().await.is_err());
    assert!(served.try_recv().is_err(), "west served nothing");
    assert_eq!(
        west.tunnel.handshakes_in_flight(),
        0,
        "no handshake is left behind"
    );
}

#[tokio::test]
async fn over_tcp_a_gateway_of_a_cluster_the_snapshot_does_not_declare_is_refused() {
    let pki = Pki::new("anchor");
    let west = Gw::new(&pki.gateway("west", &[]), "west", tcp());
    let east = Gw::new(&pki.gateway("east", &[]), "east", tcp());
    let mut served = west.serve();
    // west does not declare east.
    west.tunnel
        .reconcile(&targets([("west", vec![west.addr()])]));
    east.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    let admission = west.tunnel.admission_refusals();
    until(
        "west refuses the undeclared cluster",
        Duration::from_secs(5),
        || admission.count(Admission::UndeclaredCluster) >= 1,
    )
    .await;
    assert!(east.tunnel.pick("west").is_none());
    assert!(served.try_recv().is_err(), "west served nothing");
}

/// A TCP relay whose path can go silent: while silent, bytes each way are
/// read and dropped, as a black-holing network would (the connection
/// stays open, nothing arrives).
pub(super) struct TcpRelay {
    pub(super) addr: String,
    pub(super) silent: Arc<AtomicBool>,
}

impl TcpRelay {
    async fn start(to: SocketAddr) -> TcpRelay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(l, to)
    }

    /// Relays the connections `l` accepts to `to`.
    pub(super) fn on(l: tokio::net::TcpListener, to: SocketAddr) -> TcpRelay {
        let addr = l.local_addr().unwrap().to_string();
        let silent = Arc::new(AtomicBool::new(false));
        let s = silent.clone();
        tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let Ok(b) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                tokio::spawn(pipe(ar, bw, s.clone()));
                tokio::spawn(pipe(br, aw, s.clone()));
            }
        });
        TcpRelay { addr, silent }
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            return;
        }
        if !silent.load(Ordering::Relaxed) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_over_tcp_a_quiet_link_stays_up_and_a_silent_peer_is_declared_dead_within_the_idle_deadline()
 {
    let pki = Pki::new("anchor");
    let settings = tcp();
    let west = Gw::new(&pki.gateway("west", &[]), "west", settings.clone());
    let east = Gw::new(&pki.gateway("east", &[]), "east", settings.clone());
    let _served = west.serve();
    let relay = TcpRelay::start(west.tunnel.tcp_local_addr()).await;
    west.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    east.tunnel.reconcile(&targets([
        ("east", vec![]),
        ("west", vec![relay.addr.clone()]),
    ]));
    until(
        "east's link to west is available",
        Duration::from_secs(5),
        || east.tunnel.pick("west").is_some(),
    )
    .await;
    // Quiet for three idle timeouts: PINGs hold the link.
    tokio::time::sleep(settings.idle_timeout * 3).await;
    let link = east.link("west");
    assert!(
        link.connection().is_some(),
        "a quiet link must not idle out"
    );
    assert_eq!(link.connects.load(Ordering::Relaxed), 1, "no flap");
    let rtt = east.tunnel.status()[0].rtt_ms;
    assert!(
        rtt.is_some_and(|r| r > 0.0),
        "PINGs measure the RTT: {rtt:?}"
    );

    relay.silent.store(true, Ordering::Relaxed);
    let silent_at = Instant::now();
    until(
        "east declares the silent peer dead",
        Duration::from_secs(5),
        || link.connection().is_none(),
    )
    .await;
    let took = silent_at.elapsed();
    eprintln!("dead-peer detection over TCP took {took:?}");
    assert!(
        took >= settings.idle_timeout / 2,
        "declared dead after {took:?}, before the idle timeout could have passed"
    );
    let bound = meshfed_tests::patient(
        settings.idle_timeout + settings.keep_alive + Duration::from_millis(700),
    );
    assert!(
        took <= bound,
        "a silent TCP peer was declared dead after {took:?}; the bound is {bound:?}"
    );
    assert!(east.tunnel.pick("west").is_none());

    relay.silent.store(false, Ordering::Relaxed);
    until("east relinks to west", Duration::from_secs(5), || {
        east.tunnel.pick("west").is_some()
    })
    .await;
    assert_eq!(link.connects.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_shutdown_waits_for_streams_being_served_then_closes_the_links() {
    let (east, west, mut served) = linked(tcp()).await;
    let link = east.tunnel.pick("west").unwrap();
    let (mut send, _recv, _guard) = link.open().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(west.tunnel.serving(), 1);
    let west_tunnel = west.tunnel.clone();
    let mut shutdown =
        tokio::spawn(async move { west_tunnel.shutdown(Duration::from_secs(30)).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut shutdown)
            .await
            .is_err(),
        "shutdown must wait for the stream being served"
    );
    assert!(link.connection().is_some(), "links stay up while draining");
    drop(held);
    tokio::time::timeout(meshfed_tests::patient(Duration::from_secs(3)), shutdown)
        .await
        .expect("shutdown ends once the stream is served")
        .unwrap();
    until("east's link goes down", Duration::from_secs(5), || {
        link.connection().is_none()
    })
    .await;
}

#[tokio::test]
async fn over_tcp_silent_connections_hold_at_most_max_handshakes_and_are_let_go_at_the_timeout() {
    let pki = Pki::new("anchor");
    let settings = LinkSettings {
        max_handshakes: 4,
        handshake_timeout: Duration::from_millis(500),
        ..tcp()
    };
    let west = Gw::new(&pki.gateway("west", &[]), "west", settings);
    let _served = west.serve();
    west.tunnel
        .reconcile(&targets([("west", vec![west.addr()])]));
    // Ten TCP connections that never send a ClientHello.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(west.tunnel.tcp_local_addr())
                .await
                .unwrap(),
        );
    }
    let admission = west.tunnel.admission_refusals();
    until(
        "west refuses the connections past the handshake limit",
        Duration::from_secs(5),
        || admission.count(Admission::HandshakeLimit) >= 6,
    )
    .await;
    assert!(
        west.tunnel.handshakes_in_flight() <= 4,
        "at most max_handshakes in flight: {}",
        west.tunnel.handshakes_in_flight()
    );
    until(
        "the silent handshakes time out and give their slots back",
        Duration::from_secs(5),
        || west.tunnel.handshakes_in_flight() == 0,
    )
    .await;
    // The ones refused or timed out are closed by west.
    for mut s in silent {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("west closes a silent connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing is sent to a peer that said nothing");
    }
}
