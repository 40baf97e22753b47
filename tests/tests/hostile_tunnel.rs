//! Hostile peers at the tunnel port, against real gateway processes under
//! the memory limit `deploy/` ships (issue 21): floods of handshakes that
//! never complete, gateways of clusters the policy does not declare.
//!
//! The flooder is a quinn client whose socket drops every datagram the
//! gateway sends except Retry packets: its handshakes send a real
//! ClientHello Initial (the tunnel's ALPN and server name) and never
//! complete, yet it passes address validation when asked, the worst an
//! attacker with a real address can do. (A spoofed source could not even
//! answer the Retry.)

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/peer.rs"]
mod peer;

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use meshfed_gateway::wire::frame::{ALPN, Frame};
use meshfed_tests::cgroup::{GATEWAY_LIMIT, MemoryCgroup};
use meshfed_tests::federation::*;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A UDP socket that hides every received datagram but Retry packets (long
/// header, v1 type Retry: first byte `0b1111_xxxx`).
#[derive(Debug)]
struct RetryOnly(Arc<dyn AsyncUdpSocket>);

fn is_retry(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xf0 == 0xf0)
}

impl AsyncUdpSocket for RetryOnly {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = ready!(self.0.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..n {
                if !is_retry(&bufs[i][..meta[i].len]) {
                    continue;
                }
                if kept != i {
                    let len = meta[i].len;
                    let (head, tail) = bufs.split_at_mut(i);
                    head[kept][..len].copy_from_slice(&tail[0][..len]);
                    meta[kept] = meta[i];
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_receive_segments(&self) -> usize {
        // One datagram per buffer, so that filtering is per datagram.
        1
    }
}

/// A client endpoint that starts handshakes and never finishes them.
fn flooder(bundle: &PathBuf) -> quinn::Endpoint {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bundle).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = ALPN.iter().map(|a| a.to_vec()).collect();
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket).unwrap();
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(RetryOnly(socket)),
        runtime,
    )
    .unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in bytes: the gateway's own
/// memory, without the page cache of its log that the cgroup also counts.
fn rss(gw: &GatewayProcess) -> (u64, u64) {
    let status = gw
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb << 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The process runs (exists and is no zombie).
fn alive(gw: &GatewayProcess) -> bool {
    gw.pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

/// Starts `initials` handshakes with `to` from `endpoints` source ports, at
/// about the rate (3,000 in 9 s on a loaded machine), and waits
/// until each has given up.
async fn flood(bundle: &PathBuf, to: SocketAddr, endpoints: usize, initials: usize) {
    let clients: Vec<quinn::Endpoint> = (0..endpoints).map(|_| flooder(bundle)).collect();
    let mut pending = Vec::with_capacity(initials);
    for i in 0..initials {
        let connecting = clients[i % endpoints]
            .connect(to, "east.cluster.meshfed.internal")
            .unwrap();
        pending.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), connecting).await;
        }));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for p in pending {
        let _ = p.await;
    }
}

struct Mib(u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / (1 << 20) as f64)
    }
}

/// Issue 21, item 1: 3,000 never-completed handshakes from 30 source ports
/// cost a gateway under the shipped 128 MiB limit kilobytes each (before
/// the fix, 1.2 MB each: about 100 of them OOM-killed it), its link to
/// the other cluster stays up, and the peer's link to it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_an_initial_flood_costs_kilobytes_and_the_links_survive() {
    let cg = MemoryCgroup::require("initial-flood", GATEWAY_LIMIT);
    let (backend, _b) = http_backend("ratings-west").await;
    let in_cgroup = Launch {
        prefix: cg.prefix(),
        ..Launch::default()
    };
    let (dir, east, west) = two_clusters_launched(
        "ratings",
        backend,
        vec![],
        "",
        &in_cgroup,
        &Launch::default(),
    );
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    east.wait_links("west", 1);
    west.wait_links("east", 1);
    let baseline = rss(&east).0;

    const ENDPOINTS: usize = 30;
    const INITIALS: usize = 3_000;
    let bundle = pki.gateway("east", "gw-0").join("bundle.pem");
    let mut peaks = Vec::new();
    // Three times: what a flood leaves allocated (the allocator keeps freed
    // memory) is reused by the next, not added to. The first flood's peak
    // depends on how many of its handshakes happened to overlap (37–47 MiB
    // seen), so the second may still rise above it; from the second on, a
    // flood finds the memory of the busiest one before it, and a leak would
    // add a flood's worth (16–25 MiB) each time.
    for round in 1..=3 {
        flood(&bundle, east.tunnel, ENDPOINTS, INITIALS).await;
        let (now, peak) = rss(&east);
        let per_initial = peak.saturating_sub(baseline) / INITIALS as u64;
        let refusals = |r: &str| east.metric("meshfed_handshake_refusals_total", &[r]);
        eprintln!(
            "initial flood {round}: {INITIALS} handshakes from {ENDPOINTS} ports; RSS baseline \
             {}, peak {}, after it {}; cgroup peak {} (limit {}); {} B per Initial; refused so \
             far: handshake_limit {}, address_validation {}",
            Mib(baseline),
            Mib(peak),
            Mib(now),
            Mib(cg.peak()),
            Mib(GATEWAY_LIMIT),
            per_initial,
            refusals("handshake_limit"),
            refusals("address_validation"),
        );
        assert_eq!(
            cg.oom_kills(),
            0,
            "the gateway was OOM-killed by the flood (cgroup peak {}); log:\n{}",
            Mib(cg.peak()),
            east.log_tail()
        );
        assert!(alive(&east), "the gateway died: {}", east.log_tail());
        // Kilobytes per Initial: 3,000 at 16 KiB would be 47 MiB.
        assert!(
            per_initial < 16 << 10,
            "each never-completed handshake cost {per_initial} B (baseline {}, peak {})",
            Mib(baseline),
            Mib(peak)
        );
        peaks.push(peak);
    }
    assert!(
        peaks[2] <= peaks[1] + (8 << 20),
        "a third flood grew the peak from {} to {} (first flood: {}): memory of the \
         floods before is not reused",
        Mib(peaks[1]),
        Mib(peaks[2]),
        Mib(peaks[0])
    );
    east.wait_links("west", 1);
    west.wait_links("east", 1);
    meshfed_tests::assert_eventually(
        "a call from east reaches west after the flood",
        meshfed_tests::patient(Duration::from_secs(10)),
        || {
            let mut s = std::net::TcpStream::connect(east.outbound).unwrap();
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = write!(
                s,
                "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200")
        },
    );
}

/// Streams the attacker tries to hold: the former per-peer limit.
const ATTEMPTED_STREAMS: usize = 16_384;

/// Issue 21, item 9: an authenticated peer (a gateway certificate of a
/// declared cluster) opens as many streams as west lets it and sends on each
/// only part of an OPEN frame, against west under the shipped 128 MiB
/// limit. West caps the peer at `MAX_STREAMS_PER_PEER` (10,000; before the
/// fix it allowed 16,384 at about 8.4 KB each, which does not fit), is not
/// OOM-killed, stays ready, serves east's caller meanwhile, and resets
/// every half-open stream once the OPEN timeout has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_half_open_streams_of_a_peer_fit_the_memory_limit_and_are_reset() {
    use meshfed_gateway::proxy::HEAD_TIMEOUT;
    use meshfed_gateway::proxy::inbound::HEAD_TIMEOUT_RESET;
    use meshfed_gateway::tunnel::link::MAX_STREAMS_PER_PEER;

    let cg = MemoryCgroup::require("half-open-streams", GATEWAY_LIMIT);
    let (backend, _b) = http_backend("ratings-west").await;
    let in_cgroup = Launch {
        prefix: cg.prefix(),
        ..Launch::default()
    };
    let (dir, east, west) = two_clusters_launched(
        "ratings",
        backend,
        vec![],
        "",
        &Launch::default(),
        &in_cgroup,
    );
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    east.wait_links("west", 1);
    west.wait_links("east", 1);
    assert_eq!(call(&east), 200, "east reaches west before the attack");
    let baseline = rss(&west).0;
    let tasks = || west.metric("meshfed_runtime_alive_tasks", &[]);
    let tasks_before = tasks();

    // The attacker: another gateway of the declared cluster east.
    let creds = peer::creds_from_dir(&pki.gateway("east", "gw-9"));
    let endpoint = peer::client(creds, ALPN, false);
    let conn = peer::connect(&endpoint, west.tunnel, "west")
        .await
        .expect("the attacker's certificate is valid: west must accept it");
    let open = peer::encode(&peer::get_open(SERVICE, "ratings"));
    let partial = &open[..open.len() - 1];
    let started = tokio::time::Instant::now();
    let mut held = Vec::with_capacity(ATTEMPTED_STREAMS);
    for _ in 0..ATTEMPTED_STREAMS {
        // Beyond the limit, quinn waits for a slot; none frees while every
        // stream is held, so a short wait means "no more allowed".
        let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
        else {
            break;
        };
        if send.write_all(partial).await.is_err() {
            break;
        }
        held.push((send, recv));
    }
    let opened = held.len();
    let open_for = started.elapsed();
    // Until west serves them all (a task each), or dies trying.
    meshfed_tests::assert_eventually(
        "west serves every stream the peer opened",
        meshfed_tests::patient(Duration::from_secs(10)),
        || tasks() >= tasks_before + opened as f64 || cg.oom_kills() > 0 || !alive(&west),
    );
    // While they are held (the OPEN timeout has not passed for the last
    // ones): west lives, is ready, and serves another caller.
    assert_eq!(
        cg.oom_kills(),
        0,
        "west was OOM-killed by {opened} half-open streams (cgroup peak {}); log:\n{}",
        Mib(cg.peak()),
        west.log_tail()
    );
    assert!(alive(&west), "west died: {}", west.log_tail());
    assert_eq!(
        west.admin_get("/readyz"),
        "ready\n",
        "west is not ready while a peer holds {opened} half-open streams"
    );
    assert_eq!(
        call(&east),
        200,
        "east's caller is not served while a peer holds {opened} half-open streams"
    );
    assert_eq!(
        opened, MAX_STREAMS_PER_PEER as usize,
        "the peer held {opened} streams at once (opened in {open_for:?}), not the per-peer limit"
    );

    // Every half-open stream is reset, both ways, after the OPEN timeout.
    let deadline = meshfed_tests::patient(HEAD_TIMEOUT + Duration::from_secs(20));
    let mut reset = 0;
    let mut other = None;
    let waits: Vec<_> = held
        .into_iter()
        .map(|(send, mut recv)| {
            tokio::spawn(async move {
                let mut b = [0u8; 256];
                let read = recv.read(&mut b).await;
                let stopped = send.stopped().await;
                (read, stopped)
            })
        })
        .collect();
    let outcomes = tokio::time::timeout(deadline, async {
        let mut all = Vec::with_capacity(waits.len());
        for w in waits {
            all.push(w.await.unwrap());
        }
        all
    })
    .await
    .expect("half-open streams were neither reset nor answered after the OPEN timeout");
    for (read, stopped) in outcomes {
        match (&read, &stopped) {
            (Err(quinn::ReadError::Reset(r)), Ok(Some(s)))
                if *r == HEAD_TIMEOUT_RESET && *s == HEAD_TIMEOUT_RESET =>
            {
                reset += 1
            }
            _ => other = other.or(Some(format!("{read:?} / {stopped:?}"))),
        }
    }
    let (now, peak) = rss(&west);
    eprintln!(
        "half-open streams: {opened} held (opened in {open_for:?}), {reset} reset; west RSS \
         baseline {}, peak {}, after {}; {} B per stream; cgroup peak {} (limit {})",
        Mib(baseline),
        Mib(peak),
        Mib(now),
        peak.saturating_sub(baseline) / opened.max(1) as u64,
        Mib(cg.peak()),
        Mib(GATEWAY_LIMIT),
    );
    assert_eq!(
        reset, opened,
        "not every half-open stream was reset with code {HEAD_TIMEOUT_RESET}; e.g. {other:?}"
    );
    assert_eq!(
        cg.oom_kills(),
        0,
        "west was OOM-killed: {}",
        west.log_tail()
    );
    let counted = west.metric("meshfed_refusals_total", &["\"stream\"", "head-timeout"]);
    assert!(
        counted >= opened as f64,
        "{counted} head timeouts counted for {opened} half-open streams"
    );
    assert_eq!(call(&east), 200, "east is not served after the attack");
}

const SERVICE: &str = "ratings.default.svc.cluster.local";

/// A plain GET for `ratings` through `gw`'s outbound listener; the status
/// (0: no answer).
fn call(gw: &GatewayProcess) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(gw.outbound) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        s,
        "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Issue 21, item 3: a gateway certificate of a cluster the policy does not
/// declare (`north`, issued under the shared anchor) links to west: it is
/// refused right after the handshake, before it may open a stream, so it
/// can neither call (claiming `productpage`) nor read west's announcements;
/// the refusal is counted. Then east is removed from the policy: west
/// closes east's link and refuses its redials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_an_undeclared_cluster_is_refused_and_a_cluster_removed_from_policy_is_cut_off()
 {
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, east, west) = two_clusters("ratings", backend, vec![]);
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    assert_eq!(call(&east), 200, "east reaches west before anything");

    let refused = |gw: &GatewayProcess| {
        gw.metric("meshfed_handshake_refusals_total", &["undeclared_cluster"])
    };
    let before = refused(&west);
    let north = peer::creds_from_dir(&pki.gateway("north", "gw-0"));
    let endpoint = peer::client(north, ALPN, false);
    let mut open = peer::get_open(SERVICE, "ratings");
    if let Frame::Open(o) = &mut open {
        o.caller = Some("spiffe://cluster.local/ns/default/sa/productpage".into());
    }
    if let Ok(conn) = peer::connect(&endpoint, west.tunnel, "west").await {
        let served = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&peer::encode(&open)).await?;
            send.finish()?;
            let mut b = [0u8; 64];
            let n = recv.read(&mut b).await?;
            Ok::<_, Box<dyn std::error::Error>>(n)
        };
        let r = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the undeclared peer's stream neither answered nor failed");
        assert!(
            r.is_err(),
            "a gateway of an undeclared cluster got a stream served: {r:?}"
        );
        let control = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("the connection of an undeclared peer stayed open");
        assert!(
            control.is_err(),
            "a gateway of an undeclared cluster was offered the announcement stream"
        );
        let reason = conn.close_reason();
        assert!(
            format!("{reason:?}").contains("undeclared cluster"),
            "closed for another reason: {reason:?}"
        );
    }
    meshfed_tests::assert_eventually(
        "west counts an undeclared_cluster refusal",
        Duration::from_secs(10),
        || refused(&west) > before,
    );
    assert_eq!(call(&east), 200, "east is still served");

    // East leaves the policy (both gateways follow the same directory).
    let before = refused(&west);
    let policy = dir.path().join("policy/p.yaml");
    let west_port = west.tunnel.port();
    write_atomic(
        &policy,
        &format!(
            "{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("west", &[west_port])
        ),
    );
    meshfed_tests::assert_eventually(
        "west closes east's link and refuses its redials",
        meshfed_tests::patient(Duration::from_secs(20)),
        || refused(&west) > before && east.links_up("west") == 0,
    );
    // Still cut off a while later: every redial is refused.
    let before = refused(&west);
    meshfed_tests::assert_eventually(
        "east's redials are refused too",
        meshfed_tests::patient(Duration::from_secs(20)),
        || refused(&west) > before,
    );
    assert_eq!(east.links_up("west"), 0, "east's link to west came back");
    assert_ne!(
        call(&east),
        200,
        "east still reaches west through a removed link"
    );
}

/// Issue 21, item 17: a gateway started with a workload's or the syncer's
/// certificate refuses to start and says why (before, it reported ready
/// while every peer refused its links).
#[test]
fn a_gateway_refuses_to_start_with_a_workload_or_syncer_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ca = pki.cluster_ca("east");
    let workload = dir.path().join("creds/workload");
    certs(&[
        "workload",
        "--ca",
        &ca.to_string_lossy(),
        "--namespace",
        "default",
        "--service-account",
        "productpage",
        "--out",
        &workload.to_string_lossy(),
    ]);
    let syncer = meshfed_tests::syncer::syncer_creds(&pki, "east", "syncer");
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        cluster_yaml("east", &[free_udp_port()]),
    )
    .unwrap();
    for (creds, kind) in [(workload, "workload"), (syncer, "syncer")] {
        let ready = dir.path().join(format!("{kind}.ready"));
        let out = meshfed_tests::run_within(
            std::process::Command::new(meshfed_tests::bin("meshfed-gateway"))
                .args(["--cluster", "east", "--gateway-id", "gw-0"])
                .arg("--tls-dir")
                .arg(&creds)
                .arg("--policy-dir")
                .arg(&policy)
                .args([
                    "--tunnel-addr",
                    "127.0.0.1:0",
                    "--outbound-addr",
                    "127.0.0.1:0",
                    "--admin-addr",
                    "127.0.0.1:0",
                ])
                .arg("--ready-file")
                .arg(&ready),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.code, Some(1), "{out}");
        assert!(
            out.stderr.contains(&format!("is a {kind} certificate"))
                && out.stderr.contains("certs gateway"),
            "{out}"
        );
        assert!(
            !ready.exists(),
            "it wrote its ready file with a {kind} certificate"
        );
    }
}

/// Streams the attacker opens, each with a request body that never ends.
const ENDLESS_BODIES: usize = 10_000;

/// The backend for the endless bodies: `POST /stuck` is accepted and its
/// body never read nor answered (a backend stuck on uploads); anything
/// else is read whole and answered `200 ok:<bytes>`.
async fn stuck_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::BodyExt;
    serve_fn(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/stuck" {
            // Holds the request (and its unread body) forever.
            std::future::pending::<()>().await;
        }
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            n += f.into_data().map(|d| d.len()).unwrap_or(0);
        }
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from(format!(
            "ok:{n}"
        ))))
    })
    .await
}

/// A small POST for `ratings` through `gw`'s outbound listener; the status
/// (0: no answer).
fn post(gw: &GatewayProcess) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(gw.outbound) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        s,
        "POST /ok HTTP/1.1\r\nHost: ratings\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    if !out.ends_with("ok:5") {
        return 0;
    }
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// What became of one endless body.
#[derive(Debug)]
enum BodyOutcome {
    /// West answered with an ERROR frame of this refusal.
    Refused(meshfed_gateway::wire::frame::Refusal),
    /// West reset the stream at the OPEN timeout: its OPEN never arrived,
    /// stuck behind the peer's own stalled bodies in the connection's
    /// flow-control window.
    HeadTimeout,
    /// No answer: the body is in flight to the backend.
    Pending,
    /// Anything else (a reset, a response, a closed connection), described.
    Other(String),
}

impl BodyOutcome {
    fn describe(&self) -> String {
        match self {
            BodyOutcome::Refused(r) => format!("refused: {}", r.reason()),
            BodyOutcome::HeadTimeout => "reset at the OPEN timeout".into(),
            BodyOutcome::Pending => "no answer".into(),
            BodyOutcome::Other(what) => what.clone(),
        }
    }
}

/// Issue 21, item 9 (second half): an authenticated peer (a declared
/// cluster's second gateway certificate) opens 10,000 streams to west, each
/// a `POST` whose body never ends (its first 16 KiB, then never a FIN) to a backend
/// that accepts it and never reads, against west under the shipped 128 MiB
/// limit. Before the fix west moved the bodies into its own buffers until
/// it was OOM-killed. Now west keeps at most `DEFAULT_PEER_BODIES` of one
/// peer's request bodies in flight and refuses the rest at once
/// (`Overloaded`, counted `reason="body-limit"`), or, if a stream's OPEN
/// cannot arrive (stuck behind the peer's own stalled data in its
/// flow-control window), resets it at the OPEN timeout: no stream beyond the
/// budget hangs unanswered. West
/// stays under the limit with margin, ready, and serves east's callers (a
/// GET and a POST) during the attack and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_endless_bodies_of_a_peer_fit_the_memory_limit_and_the_excess_is_refused() {
    endless_bodies("endless-bodies", None).await;
}

/// How long the peer of
/// [`serial_endless_bodies_that_keep_coming_fit_the_memory_limit`] keeps
/// writing to its streams.
const KEEP_WRITING: Duration = Duration::from_secs(10);

/// Issue 21, item 9 (last gap): as
/// [`serial_endless_bodies_of_a_peer_fit_the_memory_limit_and_the_excess_is_refused`],
/// but the peer keeps writing 16 KiB chunks to every one of its 10,000
/// streams for `KEEP_WRITING`, so that west's receive buffers hold as much
/// of it as flow control lets them, spread over as many streams as the peer
/// can. Before the fix quinn kept every packet's whole receive buffer
/// (up to 64 KiB of a GRO batch) alive for as long as any stalled stream
/// held a byte of it, and west was OOM-killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_endless_bodies_that_keep_coming_fit_the_memory_limit() {
    endless_bodies("endless-bodies-writing", Some(KEEP_WRITING)).await;
}

/// The attack of the endless-bodies tests: 10,000 streams, each a `POST`
/// with a first 16 KiB chunk and then, with `keep_writing`, a 16 KiB chunk
/// after another for that long; never a FIN.
async fn endless_bodies(cgroup: &str, keep_writing: Option<Duration>) {
    use meshfed_gateway::body_budget::DEFAULT_PEER_BODIES;
    use meshfed_gateway::proxy::HEAD_TIMEOUT;
    use meshfed_gateway::proxy::inbound::HEAD_TIMEOUT_RESET;
    use meshfed_gateway::wire::frame::{self, Refusal};

    let cg = MemoryCgroup::require(cgroup, GATEWAY_LIMIT);
    let (backend, _b) = stuck_backend().await;
    let in_cgroup = Launch {
        prefix: cg.prefix(),
        ..Launch::default()
    };
    let (dir, east, west) = two_clusters_launched(
        "ratings",
        backend,
        vec![],
        "",
        &Launch::default(),
        &in_cgroup,
    );
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    east.wait_links("west", 1);
    west.wait_links("east", 1);
    assert_eq!(call(&east), 200, "east reaches west before the attack");
    assert_eq!(post(&east), 200, "east POSTs to west before the attack");
    let baseline = rss(&west).0;

    let creds = peer::creds_from_dir(&pki.gateway("east", "gw-9"));
    let endpoint = peer::client(creds, ALPN, false);
    let conn = peer::connect(&endpoint, west.tunnel, "west")
        .await
        .expect("the attacker's certificate is valid: west must accept it");
    let mut open = peer::get_open(SERVICE, "ratings");
    if let Frame::Open(o) = &mut open
        && let Some(h) = o.http.as_mut()
    {
        h.method = http::Method::POST;
        h.path = "/stuck".into();
    }
    const CHUNK: usize = 16 << 10;
    let mut data = frame::data_header(CHUNK).to_vec();
    data.resize(data.len() + CHUNK, b'x');
    let mut first = peer::encode(&open);
    first.extend_from_slice(&data);
    let first = bytes::Bytes::from(first);
    let data = bytes::Bytes::from(data);

    // Every stream writes until west stops it, and waits for its answer,
    // until well past the OPEN timeout.
    let started = tokio::time::Instant::now();
    let answer_by = started + meshfed_tests::patient(HEAD_TIMEOUT + Duration::from_secs(15));
    let mut streams = Vec::with_capacity(ENDLESS_BODIES);
    for _ in 0..ENDLESS_BODIES {
        let Ok(Ok((mut send, mut recv))) =
            tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
        else {
            break;
        };
        let (first, data) = (first.clone(), data.clone());
        streams.push(tokio::spawn(async move {
            let writer = async {
                if send.write_all(&first).await.is_err() {
                    return;
                }
                if let Some(d) = keep_writing {
                    let until = started + d;
                    while tokio::time::Instant::now() < until {
                        match tokio::time::timeout_at(until, send.write_all(&data)).await {
                            Ok(Ok(())) => {}
                            // Stopped or reset by west, or the time is up.
                            Ok(Err(_)) | Err(_) => break,
                        }
                    }
                }
                // The body never ends: never a FIN.
                std::future::pending::<()>().await
            };
            let reader = async {
                let mut buf = bytes::BytesMut::new();
                loop {
                    match frame::decode(&mut buf) {
                        Ok(Some(Frame::Error(e))) => return BodyOutcome::Refused(e.refusal),
                        Ok(Some(f)) => return BodyOutcome::Other(format!("{f:?}")),
                        Ok(None) => {}
                        Err(e) => return BodyOutcome::Other(format!("undecodable answer: {e}")),
                    }
                    let mut chunk = [0u8; 4096];
                    match recv.read(&mut chunk).await {
                        Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                        Ok(None) => return BodyOutcome::Other("finished, no answer".into()),
                        Err(quinn::ReadError::Reset(code)) if code == HEAD_TIMEOUT_RESET => {
                            return BodyOutcome::HeadTimeout;
                        }
                        Err(e) => return BodyOutcome::Other(format!("{e}")),
                    }
                }
            };
            let (_, outcome) = tokio::join!(
                tokio::time::timeout_at(answer_by, writer),
                tokio::time::timeout_at(answer_by, reader)
            );
            // Held open until the test ends.
            (outcome.unwrap_or(BodyOutcome::Pending), send, recv)
        }));
    }
    let opened = streams.len();
    let open_for = started.elapsed();
    assert_eq!(
        opened, ENDLESS_BODIES,
        "the peer could not open its streams"
    );

    // Once west has refused or timed out every stream past the budget
    // (or died trying), while the bodies in it are held: west lives, is
    // ready and serves east's callers.
    let counted = |reason: &str| west.metric("meshfed_refusals_total", &["\"stream\"", reason]);
    // The margin is generous: on a loaded 2-core machine the last head
    // timeouts were seen to fire after 20 s (5 of 9,488 pending in CI,
    // with another build running); the counts, not the time, are the check.
    meshfed_tests::eventually(
        "west refuses or times out every stream past the budget",
        meshfed_tests::patient(HEAD_TIMEOUT + Duration::from_secs(30)),
        || {
            let (over, late) = (counted("body-limit"), counted("head-timeout"));
            if over + late >= opened.saturating_sub(DEFAULT_PEER_BODIES) as f64
                || cg.oom_kills() > 0
                || !alive(&west)
            {
                Ok(())
            } else {
                Err(format!(
                    "{over} refused over the budget and {late} timed out, of {opened} streams; \
                     west's metrics:\n{}",
                    west.admin_get("/metrics")
                        .lines()
                        .filter(|l| l.starts_with("meshfed_refusals_total")
                            || l.starts_with("meshfed_peer_open_streams")
                            || l.starts_with("meshfed_runtime_alive_tasks"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ))
            }
        },
    );
    assert!(
        alive(&west) && cg.oom_kills() == 0,
        "west was OOM-killed by {opened} endless bodies (cgroup peak {}); log:\n{}",
        Mib(cg.peak()),
        west.log_tail()
    );
    assert_eq!(
        west.admin_get("/readyz"),
        "ready\n",
        "west is not ready during the attack"
    );
    assert_eq!(
        call(&east),
        200,
        "east's GET is not served during the attack"
    );
    assert_eq!(
        post(&east),
        200,
        "east's POST is not served during the attack"
    );
    let in_flight_peak = rss(&west).1;

    let mut held = Vec::with_capacity(opened);
    let (mut refused, mut timed_out, mut pending, mut other) = (0usize, 0usize, 0usize, Vec::new());
    for s in streams {
        let (outcome, send, recv) = s.await.unwrap();
        match outcome {
            BodyOutcome::Refused(Refusal::Overloaded) => refused += 1,
            BodyOutcome::HeadTimeout => timed_out += 1,
            BodyOutcome::Pending => pending += 1,
            o => other.push(o),
        }
        held.push((send, recv));
    }
    let (now, peak) = rss(&west);
    eprintln!(
        "endless bodies: {opened} streams opened in {open_for:?}; {refused} refused \
         (Overloaded), {timed_out} reset at the OPEN timeout, {pending} in flight, {} other \
         (e.g. {:?}); west RSS baseline {}, peak {} (with the bodies held: {}), now {}; \
         cgroup peak {} (limit {}); OOM kills {}",
        other.len(),
        other.first().map(BodyOutcome::describe),
        Mib(baseline),
        Mib(peak),
        Mib(in_flight_peak),
        Mib(now),
        Mib(cg.peak()),
        Mib(GATEWAY_LIMIT),
        cg.oom_kills(),
    );
    assert_eq!(
        cg.oom_kills(),
        0,
        "west was OOM-killed by {opened} endless bodies (cgroup peak {}); log:\n{}",
        Mib(cg.peak()),
        west.log_tail()
    );
    assert!(alive(&west), "west died: {}", west.log_tail());
    assert!(
        cg.peak() < GATEWAY_LIMIT / 8 * 7,
        "west's cgroup peak {} is within 1/8 of its limit {}",
        Mib(cg.peak()),
        Mib(GATEWAY_LIMIT)
    );
    assert!(
        pending <= DEFAULT_PEER_BODIES,
        "{pending} bodies of one peer in flight at once, over the budget {DEFAULT_PEER_BODIES}"
    );
    assert!(
        other.is_empty(),
        "{} streams were neither refused, reset at the OPEN timeout nor in flight, e.g. {:?}",
        other.len(),
        other.first().map(BodyOutcome::describe)
    );
    // A peer that keeps writing may fill its connection's flow-control
    // window with the bodies in flight before any OPEN past the budget
    // arrives: then every stream past it is reset at the OPEN timeout
    // instead (seen: 356 in flight, 9,644 reset), and none is refused.
    assert!(
        refused > 0 || keep_writing.is_some(),
        "no body was refused for the budget"
    );
    assert_eq!(
        counted("body-limit"),
        refused as f64,
        "body-limit refusals counted for {refused} refused streams"
    );
    assert_eq!(
        call(&east),
        200,
        "east's GET is not served after the attack"
    );
    assert_eq!(
        post(&east),
        200,
        "east's POST is not served after the attack"
    );
    drop(held);
    conn.close(0u32.into(), b"done");
}
