//! The tunnel's links, specified on real QUIC over loopback with real
//! certificates (an anchor, cluster intermediates and gateway leaves made
//! in memory, checked by the production verifiers), and the gateway's own
//! peer identification ([`crate::run::identify`]). Nothing of quinn or
//! rustls is faked. Timing bounds are the product's defaults with margins
//! for a loaded 2-core machine, scaled by `MESHFED_TEST_PATIENCE`.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket as StdUdpSocket;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::identity::certs::{self, IssuedCert, Issuer, Validity};
use crate::identity::spiffe::SpiffeId;
use crate::identity::store::{self, Credentials};
use crate::identity::verify::{HandshakeRefusals, RefusalReason};

const TD: &str = "cluster.local";

/// A trust anchor that issues cluster intermediates and gateway leaves.
struct Pki {
    anchor: IssuedCert,
    root: Issuer,
}

impl Pki {
    fn new(name: &str) -> Self {
        crate::identity::install_crypto_provider();
        let anchor = certs::new_anchor(name, Validity::days(2)).unwrap();
        let root = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem).unwrap();
        Pki { anchor, root }
    }

    fn leaf(&self, cluster: &str, id: &str) -> IssuedCert {
        let ca = certs::new_intermediate(&self.root, cluster, TD, Validity::days(2)).unwrap();
        let ca = Issuer::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let id = SpiffeId::gateway(TD, cluster, id).unwrap();
        certs::issue_leaf(&ca, &id, &[], Validity::days(1)).unwrap()
    }

    /// A gateway's credentials, trusting this anchor and `also` anchors.
    fn gateway(&self, cluster: &str, also: &[&Pki]) -> Credentials {
        let leaf = self.leaf(cluster, "gw-0");
        let mut bundle = self.anchor.cert_pem.clone();
        for p in also {
            bundle.push_str(&p.anchor.cert_pem);
        }
        Credentials::from_pem(
            bundle.as_bytes(),
            leaf.chain_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap()
    }
}

/// A stream a peer opened, held by the test: its handler runs (and the
/// tunnel counts it as served) until this is dropped.
struct Served {
    peer: Arc<PeerInfo>,
    send: SendHalf,
    recv: RecvHalf,
    _done: oneshot::Sender<()>,
}

/// One gateway's tunnel on loopback.
struct Gw {
    tunnel: Arc<Tunnel>,
    refusals: Arc<HandshakeRefusals>,
    announce: watch::Sender<Arc<Announcement>>,
}

impl Gw {
    fn new(creds: &Credentials, cluster: &str, settings: LinkSettings) -> Self {
        let refusals = Arc::new(HandshakeRefusals::new());
        let alpn: Vec<Vec<u8>> = frame::ALPN.iter().map(|a| a.to_vec()).collect();
        let server = store::server_config(creds, &alpn, refusals.clone()).unwrap();
        let client = store::client_config(creds, &alpn, refusals.clone()).unwrap();
        let tunnel = Tunnel::bind(
            "127.0.0.1:0".parse().unwrap(),
            server,
            client,
            cluster,
            settings,
            crate::run::identify(),
        )
        .unwrap();
        let announce = watch::channel(Arc::new(Announcement {
            cluster: cluster.into(),
            config_version: "v1".into(),
            ..Announcement::default()
        }))
        .0;
        Gw {
            tunnel,
            refusals,
            announce,
        }
    }

    fn addr(&self) -> String {
        self.tunnel.local_addr().unwrap().to_string()
    }

    /// Serves peers; every stream they open comes out of the receiver.
    fn serve(&self) -> mpsc::UnboundedReceiver<Served> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler: StreamHandler = Arc::new(move |peer, send, recv| {
            let tx = tx.clone();
            Box::pin(async move {
                let (done, held) = oneshot::channel();
                let _ = tx.send(Served {
                    peer,
                    send,
                    recv,
                    _done: done,
                });
                let _ = held.await;
            })
        });
        self.tunnel.serve(handler, self.announce.subscribe());
        rx
    }

    fn link(&self, cluster: &str) -> Arc<Link> {
        let links = self.tunnel.links_to(cluster);
        assert_eq!(links.len(), 1, "one link to {cluster}");
        links[0].clone()
    }

    fn last_error(&self, cluster: &str) -> String {
        self.link(cluster)
            .last_error
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }
}

/// The snapshot's clusters and their gateway addresses.
fn targets<const N: usize>(list: [(&str, Vec<String>); N]) -> BTreeMap<String, Vec<String>> {
    list.into_iter()
        .map(|(c, addrs)| (c.to_string(), addrs))
        .collect()
}

/// Waits for `cond`, polling every 10 ms, for at most `within` (scaled by
/// `MESHFED_TEST_PATIENCE`); panics naming `what`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(within);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} (times patience) waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// east (dialing) and west (dialed, serving), same anchor, both declared,
/// east's link to west available.
async fn linked(settings: LinkSettings) -> (Gw, Gw, mpsc::UnboundedReceiver<Served>) {
    let pki = Pki::new("anchor");
    let west = Gw::new(&pki.gateway("west", &[]), "west", settings.clone());
    let east = Gw::new(&pki.gateway("east", &[]), "east", settings);
    let served = west.serve();
    west.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    east.tunnel
        .reconcile(&targets([("east", vec![]), ("west", vec![west.addr()])]));
    until(
        "east's link to west is available",
        Duration::from_secs(5),
        || east.tunnel.pick("west").is_some(),
    )
    .await;
    (east, west, served)
}

#[tokio::test]
async fn a_peer_of_the_same_anchor_links_up_and_is_known_by_its_certificate_cluster() {
    let (east, _west, mut served) = linked(LinkSettings::default()).await;
    let link = east.tunnel.pick("west").unwrap();
    let (mut send, mut recv, guard) = link.open().await.unwrap();
    assert_eq!(link.open_streams(), 1, "an open stream is counted");
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();

    let mut s = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .expect("west serves the stream east opened")
        .unwrap();
    // The identity comes from east's verified certificate.
    assert_eq!(
        *s.peer,
        PeerInfo {
            cluster: "east".into(),
            id: "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0".into(),
            trust_domain: TD.into(),
        }
    );
    assert_eq!(s.recv.read_to_end(64).await.unwrap(), b"ping");
    s.send.write_all(b"pong").await.unwrap();
    s.send.finish().unwrap();
    assert_eq!(recv.read_to_end(64).await.unwrap(), b"pong");
    drop(guard);
    assert_eq!(
        link.open_streams(),
        0,
        "a closed stream is no longer counted"
    );

    let status = east.tunnel.status();
    assert_eq!(status.len(), 1);
    let st = &status[0];
    assert!(st.up && st.available && !st.draining, "{st:?}");
    assert_eq!((st.cluster.as_str(), st.connects), ("west", 1));
    assert_eq!(st.announced_config.as_deref(), Some("v1"));
}

#[tokio::test]
async fn a_gateway_of_another_trust_anchor_is_refused_at_the_handshake_and_counted() {
    let pki = Pki::new("anchor");
    let other = Pki::new("other-anchor");
    let west = Gw::new(&pki.gateway("west", &[]), "west", LinkSettings::default());
    // A gateway certificate from another anchor, for a cluster west
    // declares; it trusts west's anchor too, so only west's verdict counts.
    let rogue = Gw::new(
        &other.gateway("east", &[&pki]),
        "east",
        LinkSettings::default(),
    );
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
    assert!(
        rogue.link("west").open().await.is_err(),
        "no stream over a refused link"
    );
    assert!(served.try_recv().is_err(), "west served nothing");
    // The refusal is the verifier's, not the tunnel's admission.
    let admission = west.tunnel.admission_refusals();
    assert_eq!(admission.count(Admission::UndeclaredCluster), 0);
    assert_eq!(admission.count(Admission::NotAGateway), 0);
}

#[tokio::test]
async fn an_address_that_answers_as_another_cluster_is_not_linked() {
    let pki = Pki::new("anchor");
    let east = Gw::new(&pki.gateway("east", &[]), "east", LinkSettings::default());
    // A genuine gateway, but of cluster south, listed as west's.
    let south = Gw::new(&pki.gateway("south", &[]), "south", LinkSettings::default());
    let mut served = south.serve();
    south.tunnel.reconcile(&targets([
        ("east", vec![]),
        ("south", vec![south.addr()]),
        ("west", vec![]),
    ]));
    east.tunnel.reconcile(&targets([
        ("east", vec![]),
        ("south", vec![]),
        ("west", vec![south.addr()]),
    ]));
    until(
        "east refuses south's certificate for west",
        Duration::from_secs(5),
        || east.refusals.count(RefusalReason::WrongPeer) >= 1,
    )
    .await;
    until("east's link records why", Duration::from_secs(5), || {
        !east.last_error("west").is_empty()
    })
    .await;
    assert!(east.tunnel.pick("west").is_none());
    assert!(east.link("west").connection().is_none());
    assert!(served.try_recv().is_err(), "south served nothing");
}

#[tokio::test]
async fn a_gateway_of_a_cluster_the_snapshot_drops_is_disconnected_refused_and_counted() {
    let (east, west, mut served) = linked(LinkSettings::default()).await;
    let admission = west.tunnel.admission_refusals();
    assert_eq!(admission.count(Admission::UndeclaredCluster), 0);

    // west's next snapshot no longer declares east.
    west.tunnel
        .reconcile(&targets([("west", vec![west.addr()])]));
    until(
        "east's link to west goes down",
        Duration::from_secs(5),
        || east.link("west").connection().is_none(),
    )
    .await;
    assert!(
        east.last_error("west").contains("undeclared cluster"),
        "{}",
        east.last_error("west")
    );
    // east redials, and is refused at once after its handshake.
    until(
        "west refuses east's redial too",
        Duration::from_secs(5),
        || admission.count(Admission::UndeclaredCluster) >= 2,
    )
    .await;
    assert!(east.tunnel.pick("west").is_none());
    assert!(served.try_recv().is_err(), "west served nothing");
}

/// Forwards datagrams between one client and `to`, until told to drop
/// everything (a path that goes silent both ways).
struct Relay {
    addr: String,
    silent: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        Self::on(StdUdpSocket::bind("127.0.0.1:0").unwrap(), to)
    }

    /// Relays the datagrams `outer` receives to `to`.
    fn on(outer: StdUdpSocket, to: SocketAddr) -> Relay {
        let inner = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        inner.connect(to).unwrap();
        let addr = outer.local_addr().unwrap().to_string();
        let (outer, inner) = (
            Arc::new(tokio::net::UdpSocket::from_std(nonblocking(outer)).unwrap()),
            Arc::new(tokio::net::UdpSocket::from_std(nonblocking(inner)).unwrap()),
        );
        let silent = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (o, i, s, c) = (outer.clone(), inner.clone(), silent.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = o.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                if !s.load(Ordering::Relaxed) {
                    let _ = i.send(&buf[..n]).await;
                }
            }
        });
        let s = silent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = inner.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (false, Some(to)) = (s.load(Ordering::Relaxed), to) {
                    let _ = outer.send_to(&buf[..n], to).await;
                }
            }
        });
        Relay { addr, silent }
    }
}

fn nonblocking(s: StdUdpSocket) -> StdUdpSocket {
    s.set_nonblocking(true).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_quiet_link_stays_up_and_a_silent_peer_is_declared_dead_within_the_idle_deadline()
{
    let pki = Pki::new("anchor");
    let settings = LinkSettings::default();
    let west = Gw::new(&pki.gateway("west", &[]), "west", settings.clone());
    let east = Gw::new(&pki.gateway("east", &[]), "east", settings.clone());
    let _served = west.serve();
    let relay = Relay::start(west.tunnel.local_addr().unwrap());
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

    // No stream for three idle timeouts: keep-alives hold the link, which
    // never drops (one connect).
    tokio::time::sleep(settings.idle_timeout * 3).await;
    let link = east.link("west");
    assert!(
        link.connection().is_some(),
        "a quiet link must not idle out"
    );
    assert_eq!(link.connects.load(Ordering::Relaxed), 1, "no flap");

    // The path goes silent: dead within keep-alive + idle timeout (< 1 s,
    // design.md "Tunnel") plus scheduling slack.
    relay.silent.store(true, Ordering::Relaxed);
    let silent_at = Instant::now();
    until(
        "east declares the silent peer dead",
        Duration::from_secs(5),
        || link.connection().is_none(),
    )
    .await;
    let took = silent_at.elapsed();
    eprintln!("dead-peer detection took {took:?}");
    assert!(
        took >= settings.idle_timeout / 2,
        "declared dead after {took:?}, before the idle timeout ({:?}) could have passed",
        settings.idle_timeout
    );
    let bound = meshfed_tests::patient(
        settings.idle_timeout + settings.keep_alive + Duration::from_millis(700),
    );
    assert!(
        took <= bound,
        "a silent peer was declared dead after {took:?}; the bound is {bound:?}"
    );
    assert!(east.tunnel.pick("west").is_none());

    // The path comes back: the link is redialed.
    relay.silent.store(false, Ordering::Relaxed);
    until("east relinks to west", Duration::from_secs(5), || {
        east.tunnel.pick("west").is_some()
    })
    .await;
    assert_eq!(link.connects.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn an_address_that_never_answers_is_reported_with_a_hint_and_refuses_streams() {
    let pki = Pki::new("anchor");
    let settings = LinkSettings {
        handshake_timeout: Duration::from_millis(300),
        ..LinkSettings::default()
    };
    let east = Gw::new(&pki.gateway("east", &[]), "east", settings);
    // Bound and silent: datagrams are taken and never answered.
    let hole = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    east.tunnel.reconcile(&targets([
        ("east", vec![]),
        ("west", vec![hole_addr.clone()]),
    ]));
    until(
        "the failed dial is recorded",
        Duration::from_secs(5),
        || !east.last_error("west").is_empty(),
    )
    .await;
    let error = east.last_error("west");
    assert!(
        error.contains(&format!(
            "no gateway of cluster `west` answered on {hole_addr} (UDP)"
        )) && error.contains("is UDP allowed?"),
        "{error}"
    );
    match east.link("west").open().await {
        Err(e @ LinkError::NoLink(_)) => {
            assert!(e.to_string().contains("no link to cluster `west`"), "{e}")
        }
        Err(e) => panic!("expected NoLink, got {e}"),
        Ok(_) => panic!("a stream over a link that never came up"),
    }
    assert!(east.tunnel.pick("west").is_none());
}

#[tokio::test]
async fn a_draining_peer_is_not_picked_while_its_link_stays_up() {
    let (east, west, _served) = linked(LinkSettings::default()).await;
    west.announce.send_modify(|a| {
        *a = Arc::new(Announcement {
            seq: a.seq + 1,
            draining: true,
            ..(**a).clone()
        })
    });
    until(
        "east stops picking the draining west",
        Duration::from_secs(5),
        || east.tunnel.pick("west").is_none(),
    )
    .await;
    let link = east.link("west");
    assert!(link.connection().is_some(), "draining is not down");
    let status = east.tunnel.status();
    assert!(status[0].up && status[0].draining && !status[0].available);
    assert!(
        east.tunnel.announcements().is_empty(),
        "a draining peer's services are not offered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_streams_being_served_then_closes_the_links() {
    let (east, west, mut served) = linked(LinkSettings::default()).await;
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
    // Longer than the drain's quiet period (250 ms): still waiting.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_a_stream_that_never_ends_at_the_deadline() {
    let (east, west, mut served) = linked(LinkSettings::default()).await;
    let link = east.tunnel.pick("west").unwrap();
    let (mut send, _recv, _guard) = link.open().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let _held = tokio::time::timeout(Duration::from_secs(5), served.recv())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let deadline = Duration::from_millis(500);
    tokio::time::timeout(
        meshfed_tests::patient(Duration::from_secs(3)),
        west.tunnel.shutdown(deadline),
    )
    .await
    .expect("shutdown is bounded by its deadline");
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());
    until("east's link goes down", Duration::from_secs(5), || {
        link.connection().is_none()
    })
    .await;
}

mod auto;
mod tcp;
