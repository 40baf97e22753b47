//! `--link-transport auto`, the default: QUIC preferred, TCP where QUIC
//! does not answer (happy eyeballs), and back to QUIC once it does, with
//! the streams open on TCP finishing there. On loopback with real TLS;
//! "UDP blocked" is a relay that drops every datagram both ways, beside a
//! TCP relay on the same port number (a firewall that drops UDP only).

use super::tcp::TcpRelay;
use super::*;

/// One address that reaches `west` over both transports, with a switch
/// that black-holes its UDP.
struct Path {
    addr: String,
    udp: Relay,
    _tcp: TcpRelay,
}

impl Path {
    async fn to(west: &Gw) -> Path {
        let udp_to = west.tunnel.local_addr().unwrap();
        let tcp_to = west.tunnel.tcp_local_addr();
        for _ in 0..32 {
            let outer = StdUdpSocket::bind("127.0.0.1:0").unwrap();
            let port = outer.local_addr().unwrap().port();
            let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await else {
                continue;
            };
            let udp = Relay::on(outer, udp_to);
            let tcp = TcpRelay::on(l, tcp_to);
            return Path {
                addr: udp.addr.clone(),
                udp,
                _tcp: tcp,
            };
        }
        panic!("no port free on both UDP and TCP in 32 tries");
    }

    fn block_udp(&self, blocked: bool) {
        self.udp.silent.store(blocked, Ordering::Relaxed);
    }
}

/// west serving, east dialing west through a [`Path`] whose UDP is
/// `blocked` from the start. Returns when east's link is available, and
/// how long that took from east's reconcile.
async fn through_path(blocked: bool) -> (Gw, Gw, Path, mpsc::UnboundedReceiver<Served>, Duration) {
    let pki = Pki::new("anchor");
    let west = Gw::new(&pki.gateway("west", &[]), "west", LinkSettings::default());
    let east = Gw::new(&pki.gateway("east", &[]), "east", LinkSettings::default());
    assert_eq!(
        east.tunnel.settings().transport,
        LinkTransport::Auto,
        "auto is the default"
    );
    let served = west.serve();
    let path = Path::to(&west).await;
    path.block_udp(blocked);
    west.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    let start = Instant::now();
    east.tunnel.reconcile(&targets([
        ("east", vec![]),
        ("west", vec![path.addr.clone()]),
    ]));
    until(
        "east's link to west is available",
        Duration::from_secs(5),
        || east.tunnel.pick("west").is_some(),
    )
    .await;
    let took = start.elapsed();
    (east, west, path, served, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_in_auto_a_peer_that_answers_quic_is_linked_over_quic() {
    let (east, _west, _path, _served, took) = through_path(false).await;
    eprintln!("QUIC link available after {took:?}");
    // A loaded machine may let TCP win the race; the link then moves to
    // QUIC on its own (the upgrade test pins how fast).
    until("the link runs over QUIC", Duration::from_secs(5), || {
        east.link("west")
            .connection()
            .is_some_and(|c| c.transport() == Transport::Quic)
    })
    .await;
    assert_eq!(east.tunnel.status()[0].transport, Transport::Quic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_in_auto_a_peer_whose_udp_is_blocked_is_linked_over_tcp_after_quic_had_its_head_start()
 {
    let (east, _west, path, mut served, took) = through_path(true).await;
    eprintln!("TCP link available after {took:?} with UDP blocked");
    let link = east.link("west");
    let conn = link.connection().unwrap();
    assert_eq!(conn.transport(), Transport::Tcp);
    assert_eq!(east.tunnel.status()[0].transport, Transport::Tcp);
    assert!(
        took >= HAPPY_EYEBALLS_DELAY,
        "TCP was up after {took:?}: it must wait {HAPPY_EYEBALLS_DELAY:?} for QUIC first"
    );
    assert!(
        took <= meshfed_tests::patient(Duration::from_secs(2)),
        "with UDP blocked the link took {took:?} to come up over TCP"
    );
    // Streams work over it.
    let (mut send, _recv, _guard) = link.open().await.unwrap();
    send.write_all(b"over tcp").await.unwrap();
    send.finish().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .expect("west serves the stream")
        .unwrap();
    assert!(
        matches!(s.recv, RecvHalf::H2(_)),
        "the stream came over TCP"
    );
    assert_eq!(s.recv.read_to_end(64).await.unwrap(), b"over tcp");
    // While UDP stays blocked the link stays on TCP: QUIC probes fail
    // quietly, with no flap.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(Arc::ptr_eq(&link.connection().unwrap(), &conn), "no flap");
    assert_eq!(link.connects.load(Ordering::Relaxed), 1);
    drop(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_in_auto_a_tcp_link_moves_new_streams_to_quic_once_udp_returns_and_its_open_streams_finish_on_tcp()
 {
    let (east, _west, path, mut served, _) = through_path(true).await;
    let link = east.link("west");
    let tcp = link.connection().unwrap();
    assert_eq!(tcp.transport(), Transport::Tcp);

    // A stream open on TCP across the switch.
    let (mut old_send, mut old_recv, old_guard) = link.open().await.unwrap();
    old_send.write_all(b"before").await.unwrap();
    let mut old_served = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .expect("west serves the stream")
        .unwrap();
    assert!(matches!(old_served.recv, RecvHalf::H2(_)));
    assert_eq!(tcp.open_streams(), 1);

    path.block_udp(false);
    let returned = Instant::now();
    until("the link moves to QUIC", Duration::from_secs(5), || {
        link.connection()
            .is_some_and(|c| c.transport() == Transport::Quic)
    })
    .await;
    let took = returned.elapsed();
    eprintln!("UDP returned; the link was on QUIC {took:?} later");
    assert!(
        took <= meshfed_tests::patient(Duration::from_secs(5)),
        "the link moved to QUIC {took:?} after UDP returned"
    );
    assert_eq!(east.tunnel.status()[0].transport, Transport::Quic);
    assert!(
        link.available(Duration::from_secs(16)),
        "no gap in availability"
    );

    // A new stream goes over QUIC.
    let (mut send, _recv, _guard) = link.open().await.unwrap();
    send.write_all(b"after").await.unwrap();
    send.finish().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .expect("west serves the new stream")
        .unwrap();
    assert!(
        matches!(s.recv, RecvHalf::Quic(_)),
        "the new stream came over QUIC"
    );
    assert_eq!(s.recv.read_to_end(64).await.unwrap(), b"after");

    // The old stream still works, both ways, on the TCP connection, which
    // stays open for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !tcp.is_closed(),
        "TCP closes only once its streams are done"
    );
    old_send.write_all(b" and after").await.unwrap();
    old_send.finish().unwrap();
    assert_eq!(
        old_served.recv.read_to_end(64).await.unwrap(),
        b"before and after"
    );
    old_served.send.write_all(b"reply").await.unwrap();
    old_served.send.finish().unwrap();
    assert_eq!(old_recv.read_to_end(64).await.unwrap(), b"reply");

    // Done: the TCP connection drains and closes; the link stays on QUIC.
    drop((old_send, old_recv, old_guard, old_served));
    until(
        "the drained TCP connection closes",
        Duration::from_secs(5),
        || tcp.is_closed(),
    )
    .await;
    assert_eq!(tcp.open_streams(), 0);
    assert_eq!(
        link.connection().unwrap().transport(),
        Transport::Quic,
        "closing the old connection does not take the link down"
    );
    assert_eq!(link.connects.load(Ordering::Relaxed), 2, "TCP, then QUIC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_in_auto_a_link_that_loses_udp_falls_back_to_tcp() {
    let (east, _west, path, _served, _) = through_path(false).await;
    let link = east.link("west");
    until("the link runs over QUIC", Duration::from_secs(5), || {
        link.connection()
            .is_some_and(|c| c.transport() == Transport::Quic)
    })
    .await;
    path.block_udp(true);
    let blocked = Instant::now();
    until("the link runs over TCP", Duration::from_secs(5), || {
        link.connection()
            .is_some_and(|c| c.transport() == Transport::Tcp)
            && east.tunnel.pick("west").is_some()
    })
    .await;
    let took = blocked.elapsed();
    eprintln!("UDP blocked; the link was available over TCP {took:?} later");
    // Dead-peer detection (< 1 s), then the happy-eyeballs delay.
    assert!(
        took <= meshfed_tests::patient(Duration::from_secs(3)),
        "{took:?}"
    );
}
