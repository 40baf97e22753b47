//! TCP links (`--link-transport tcp`: HTTP/2 over mutual TLS 1.3 on the
//! tunnel's port number) between real gateway processes on loopback: the
//! calls QUIC links carry cross over TCP, a killed peer is dropped as fast,
//! and a certificate outside the mesh is refused (issue 18).
//!
//! The whole cross-cluster suite also runs over TCP with
//! `MESHFED_TEST_LINK_TRANSPORT=tcp` (tests/README.md; .ci/run does it for
//! `federation`).
//!
//! The `serial_udp_blocked_*` tests run `auto`, the default, where UDP is
//! really blocked: east and west each in a network namespace
//! (`meshfed_tests::netns`), with a firewall (nftables) dropping every UDP
//! datagram between them and TCP open. The link comes up over TCP within
//! 2 s, carries every kind of call, drops a killed peer within 1 s, and
//! once UDP is allowed again moves to QUIC within 5 s with no failed
//! request under 200 req/s. They need root, `ip netns` and `nft` (CI runs
//! as root and installs nftables); elsewhere they fail naming the fix, and
//! `MESHFED_SKIP_NETNS=1` skips them knowingly. They run alone (`serial_`):
//! fixed namespace names, deadlines. They assume the default transport, so
//! they do not run under `MESHFED_TEST_LINK_TRANSPORT` (which would force
//! one).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadSpec, Protocol};
use meshfed_tests::netns::Net;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

fn tcp_args() -> Vec<String> {
    vec!["--link-transport".into(), "tcp".into()]
}

/// east (one gateway) and `wests` gateways of west, every one with
/// `--link-transport tcp`, west serving `service` at `backend`. Returns
/// once east has a link to every west gateway.
fn tcp_clusters(
    service: &str,
    backend: SocketAddr,
    wests: usize,
) -> (TempDir, Pki, GatewayProcess, Vec<GatewayProcess>) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let east_port = free_udp_port();
    let west_ports: Vec<u16> = (0..wests).map(|_| free_udp_port()).collect();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {service}, namespace: default}}\n",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &west_ports)
        ),
    )
    .unwrap();
    let eps = dir.path().join("west.yaml");
    discovery_file(
        &eps,
        &[(&format!("{service}.default"), vec![(backend, vec![])])],
    );
    let spec =
        |cluster: &str, id: &str, port: u16, discovery: Option<std::path::PathBuf>| GatewaySpec {
            cluster: cluster.into(),
            id: id.into(),
            tls_dir: pki.gateway(cluster, id),
            policy_dir: policy.clone(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args: tcp_args(),
        };
    let west: Vec<GatewayProcess> = west_ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            GatewayProcess::start(&spec("west", &format!("gw-{i}"), *p, Some(eps.clone())))
        })
        .collect();
    let east = GatewayProcess::start(&spec("east", "gw-0", east_port, None));
    east.wait_links("west", wests);
    (dir, pki, east, west)
}

/// The transports of `gw`'s links to `cluster`, from `/peers`.
fn transports(gw: &GatewayProcess, cluster: &str) -> Vec<String> {
    let peers: serde_json::Value = serde_json::from_str(&gw.admin_get("/peers")).unwrap();
    peers
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["cluster"] == cluster)
        .map(|p| p["transport"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_tcp_pair_links_over_tcp_and_serves_http_1_1() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (_dir, _pki, east, west) = tcp_clusters("ratings", backend, 1);
    assert_eq!(transports(&east, "west"), vec!["tcp".to_string()]);
    assert_eq!(
        east.metric(
            "meshfed_peer_link_up",
            &["cluster=\"west\"", "transport=\"tcp\""]
        ),
        1.0,
        "the link's metrics carry its transport"
    );
    for _ in 0..20 {
        let (status, served, reason) = get_through(east.outbound, "ratings", "/").await;
        assert_eq!(
            (status, served.as_str()),
            (200, "ratings-west"),
            "{reason:?}"
        );
    }
    meshfed_tests::assert_eventually(
        "west counts the requests it served for east",
        Duration::from_secs(5),
        || west[0].metric("meshfed_requests_total", &["source_cluster=\"east\""]) >= 20.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_tcp_pair_carries_raw_tcp_through_http_connect() {
    let (_dir, _pki, east, _west) = tcp_clusters("echo", tcp_echo().await, 1);
    connect_echo(east.outbound, "echo.default:7").await;
}

/// Through `outbound`, CONNECTs to `target` (an echo server) and sends
/// more than a stream's window (8 MiB) each way, so flow control moves;
/// the bytes must come back intact.
async fn connect_echo(outbound: SocketAddr, target: &str) {
    let mut s = tokio::net::TcpStream::connect(outbound).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "closed in the CONNECT response"
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let payload: Vec<u8> = (0..12 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
        payload
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(
        meshfed_tests::patient(Duration::from_secs(30)),
        r.read_to_end(&mut echoed),
    )
    .await
    .expect("the echo ends")
    .unwrap();
    assert!(
        echoed == writer.await.unwrap(),
        "the bytes come back intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_tcp_pair_carries_grpc_with_its_status_and_metadata() {
    let (_dir, _pki, east, _west) = tcp_clusters("grpc-echo", grpc_backend().await, 1);
    grpc_calls(east.outbound).await;
}

/// Through `outbound`, a unary gRPC call to `grpc-echo` that succeeds, and
/// one that fails: its status, message and metadata must cross intact.
async fn grpc_calls(outbound: SocketAddr) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin("http://grpc-echo.default:50051".parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let ok = grpc
        .unary::<Bytes, Bytes, Raw>(
            tonic::Request::new(Bytes::from_static(b"hello")),
            "/test.Echo/Unary".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(ok.into_inner().as_ref(), b"west:hello");
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Bytes, Bytes, Raw>(
            tonic::Request::new(Bytes::from_static(b"fail")),
            "/test.Echo/Unary".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "quota spent in west");
    assert_eq!(err.metadata().get("x-detail").unwrap(), "from-west");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_west_gateway_killed_under_load_is_dropped_within_a_second_and_calls_move_on() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (_dir, _pki, east, mut west) = tcp_clusters("ratings", backend, 2);
    // Load: calls back to back from two tasks, counting failures after
    // the first second past the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let (late_failures, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, killed_at, late, calls) = (
            stop.clone(),
            killed_at.clone(),
            late_failures.clone(),
            calls.clone(),
        );
        let via = east.outbound;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, _, reason) = get_through(via, "ratings", "/").await;
                calls.fetch_add(1, Ordering::Relaxed);
                let late_call = killed_at
                    .lock()
                    .unwrap()
                    .is_some_and(|k| k.elapsed() > Duration::from_secs(1));
                if status != 200 && late_call {
                    eprintln!("a call failed more than 1 s after the kill: {status} {reason:?}");
                    late.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    west[0].kill();
    let killed = Instant::now();
    *killed_at.lock().unwrap() = Some(killed);
    meshfed_tests::assert_eventually(
        "east drops the killed gateway's link",
        Duration::from_millis(1500),
        || east.links_up("west") == 1,
    );
    eprintln!(
        "the killed peer's link was dropped after {:?}",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(calls.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(
        late_failures.load(Ordering::Relaxed),
        0,
        "calls from 1 s after the kill all succeed on the other gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_gateway_under_a_foreign_ca_is_refused_at_the_handshake_and_counted() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, _pki, _east, west) = tcp_clusters("ratings", backend, 1);
    let foreign_dir = dir.path().join("foreign");
    let foreign = Pki::named(&foreign_dir, "someone else's root");
    let policy = dir.path().join("foreign-policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("c.yaml"),
        format!(
            "{}{}",
            cluster_yaml("east", &[free_udp_port()]),
            cluster_yaml("west", &[west[0].tunnel.port()])
        ),
    )
    .unwrap();
    // It trusts the real anchor (so it goes on to present its own chain),
    // which ends at the foreign anchor: west must refuse it.
    let tls_dir = foreign.gateway("east", "intruder");
    certs(&[
        "bundle",
        &foreign_dir.join("ca/root/ca.pem").to_string_lossy(),
        &dir.path().join("ca/root/ca.pem").to_string_lossy(),
        "--out",
        &tls_dir.join("bundle.pem").to_string_lossy(),
        "--force",
    ]);
    let before = west[0].metric("meshfed_handshake_refusals_total", &["unknown_ca"]);
    let intruder = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "intruder".into(),
        tls_dir,
        policy_dir: policy,
        discovery: None,
        tunnel_port: free_udp_port(),
        work_dir: dir.path().to_path_buf(),
        extra_args: tcp_args(),
    });
    meshfed_tests::assert_eventually(
        "west counts an unknown-CA refusal",
        Duration::from_secs(10),
        || west[0].metric("meshfed_handshake_refusals_total", &["unknown_ca"]) > before,
    );
    assert_eq!(intruder.links_up("west"), 0);
    assert_eq!(transports(&intruder, "west"), vec!["tcp".to_string()]);
}

/// The admin token of the gateways in namespaces (their admin API is off
/// loopback, so it needs one).
const NETNS_TOKEN: &str = "link-transport-test-token";

/// east (one gateway, callers only) and west (`wests` gateways), each
/// cluster in its own network namespace, with UDP between them blocked
/// from before the gateways start, every gateway on the default
/// `--link-transport` (`auto`). west serves `ratings` (HTTP), `grpc-echo`
/// (gRPC) and `echo` (TCP) from backends on its LAN.
struct UdpBlocked {
    net: Net,
    dir: TempDir,
    east: GatewayProcess,
    west: Vec<GatewayProcess>,
    /// From east's start (its process spawned) to every link to west
    /// being available over TCP.
    linked_after: Duration,
    _backends: Vec<tokio::task::JoinHandle<()>>,
}

impl UdpBlocked {
    async fn start(wests: usize) -> Option<UdpBlocked> {
        assert!(
            std::env::var("MESHFED_TEST_LINK_TRANSPORT").is_err(),
            "these tests pin the default transport (auto); unset MESHFED_TEST_LINK_TRANSPORT"
        );
        let net = Net::require(&["east", "west"])?;
        net.block_udp("east");
        net.block_udp("west");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let west_site = net.site("west").clone();
        let east_site = net.site("east").clone();
        let lan = west_site.lan_host;
        let (http, b1) = http_backend_on(&format!("{lan}:0"), "ratings-west").await;
        let grpc = grpc_backend_on(&format!("{lan}:0")).await;
        let echo = tcp_echo_on(&format!("{lan}:0")).await;
        let west_ports: Vec<u16> = (0..wests).map(|_| free_udp_port()).collect();
        let east_port = free_udp_port();
        let gateways = |site: &meshfed_tests::netns::Site, ports: &[u16]| {
            ports
                .iter()
                .map(|p| format!("'{}:{p}'", site.wan))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut policy_yaml = format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: east}}\nspec: {{gateways: [{}]}}\n---\n\
             apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: west}}\nspec: {{gateways: [{}]}}\n",
            gateways(&east_site, &[east_port]),
            gateways(&west_site, &west_ports),
        );
        for service in ["ratings", "grpc-echo", "echo"] {
            policy_yaml.push_str(&format!(
                "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {service}, namespace: default}}\n"
            ));
        }
        let policy = dir.path().join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        std::fs::write(policy.join("p.yaml"), policy_yaml).unwrap();
        let eps = dir.path().join("west.yaml");
        discovery_file(
            &eps,
            &[
                ("ratings.default", vec![(http, vec![])]),
                ("grpc-echo.default", vec![(grpc, vec![])]),
                ("echo.default", vec![(echo, vec![])]),
            ],
        );
        let start = |site: &meshfed_tests::netns::Site,
                     id: &str,
                     port: u16,
                     discovery: Option<std::path::PathBuf>| {
            GatewayProcess::start_with(
                &GatewaySpec {
                    cluster: site.cluster.clone(),
                    id: id.into(),
                    tls_dir: pki.gateway(&site.cluster, id),
                    policy_dir: policy.clone(),
                    discovery,
                    tunnel_port: port,
                    work_dir: dir.path().to_path_buf(),
                    extra_args: vec![],
                },
                &Launch {
                    prefix: site.prefix(),
                    tunnel_host: Some(site.wan.to_string()),
                    local_host: Some(site.lan.to_string()),
                    admin_token: Some(NETNS_TOKEN.into()),
                },
            )
        };
        let west: Vec<GatewayProcess> = west_ports
            .iter()
            .enumerate()
            .map(|(i, p)| start(&west_site, &format!("gw-{i}"), *p, Some(eps.clone())))
            .collect();
        let began = Instant::now();
        let east = start(&east_site, "gw-0", east_port, None);
        let ready_after = began.elapsed();
        tokio::task::block_in_place(|| {
            meshfed_tests::eventually(
                "east's links to west are available over TCP",
                Duration::from_secs(15),
                || {
                    let t = available_transports(&east, "west");
                    if t.len() == wests && t.iter().all(|t| t == "tcp") {
                        Ok(())
                    } else {
                        Err(format!("available: {t:?}; log:\n{}", east.log_tail()))
                    }
                },
            )
        });
        let linked_after = began.elapsed();
        eprintln!(
            "with UDP blocked: east ready {ready_after:?} after its start, linked to west over TCP {linked_after:?} after"
        );
        Some(UdpBlocked {
            net,
            dir,
            east,
            west,
            linked_after,
            _backends: vec![b1],
        })
    }

    /// Established TCP connections from east to west's first gateway's
    /// tunnel (east's TCP link to it).
    fn east_tcp_links(&self) -> usize {
        self.net.tcp_connections_to("east", self.west[0].tunnel)
    }
}

/// The transports of `gw`'s available links to `cluster`, from `/peers`.
fn available_transports(gw: &GatewayProcess, cluster: &str) -> Vec<String> {
    let peers: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/peers")).unwrap_or_default();
    peers
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["cluster"] == cluster && p["available"] == true)
                .map(|p| p["transport"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_udp_blocked_auto_links_over_tcp_within_2s_and_carries_http_grpc_and_connect() {
    let Some(fed) = UdpBlocked::start(1).await else {
        return;
    };
    assert!(
        fed.linked_after <= meshfed_tests::patient(Duration::from_secs(2)),
        "with UDP blocked, east's link to west came up over TCP {:?} after east started; the bound is 2 s",
        fed.linked_after
    );
    let east = &fed.east;
    assert!(
        fed.net.udp_dropped("west") > 0,
        "the firewall dropped east's QUIC attempts (else this test did not block UDP)"
    );
    assert_eq!(fed.east_tcp_links(), 1, "one TCP link from east to west");
    assert_eq!(
        east.metric(
            "meshfed_peer_link_up",
            &["cluster=\"west\"", "transport=\"tcp\""]
        ),
        1.0,
        "the link's metrics say tcp"
    );
    // HTTP/1.1.
    for _ in 0..20 {
        let (status, served, reason) = get_through(east.outbound, "ratings", "/").await;
        assert_eq!(
            (status, served.as_str()),
            (200, "ratings-west"),
            "{reason:?}"
        );
    }
    // gRPC, with its status and metadata.
    grpc_calls(east.outbound).await;
    // Raw TCP through HTTP CONNECT.
    connect_echo(east.outbound, "echo.default:7").await;
    // All of it went over the TCP link: UDP stayed blocked, so it is
    // still the link's transport.
    assert_eq!(available_transports(east, "west"), vec!["tcp".to_string()]);
    assert!(
        fed.west[0].metric("meshfed_requests_total", &["source_cluster=\"east\""]) >= 20.0,
        "west served east's calls"
    );
    drop(fed.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_udp_blocked_a_west_gateway_killed_under_load_is_dropped_within_1s_and_calls_move_on()
 {
    let Some(mut fed) = UdpBlocked::start(2).await else {
        return;
    };
    let via = fed.east.outbound;
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let (late_failures, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut callers = Vec::new();
    for _ in 0..2 {
        let (stop, killed_at, late, calls) = (
            stop.clone(),
            killed_at.clone(),
            late_failures.clone(),
            calls.clone(),
        );
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, _, reason) = get_through(via, "ratings", "/").await;
                calls.fetch_add(1, Ordering::Relaxed);
                let late_call = killed_at
                    .lock()
                    .unwrap()
                    .is_some_and(|k| k.elapsed() > Duration::from_secs(1));
                if status != 200 && late_call {
                    eprintln!("a call failed more than 1 s after the kill: {status} {reason:?}");
                    late.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = calls.load(Ordering::Relaxed);
    fed.west[0].kill();
    let killed = Instant::now();
    *killed_at.lock().unwrap() = Some(killed);
    tokio::task::block_in_place(|| {
        meshfed_tests::assert_eventually(
            "east drops the killed gateway's link",
            Duration::from_secs(5),
            || fed.east.links_up("west") == 1,
        )
    });
    let dropped = killed.elapsed();
    eprintln!("the killed peer's TCP link was dropped after {dropped:?}");
    assert!(
        dropped <= meshfed_tests::patient(Duration::from_secs(1)),
        "the killed peer's link was dropped after {dropped:?}; the bound is 1 s"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in callers {
        t.await.unwrap();
    }
    assert!(before_kill > 10, "the load ran before the kill");
    assert!(
        calls.load(Ordering::Relaxed) > before_kill + 20,
        "the load ran after the kill"
    );
    assert_eq!(
        late_failures.load(Ordering::Relaxed),
        0,
        "calls from 1 s after the kill all succeed on the other gateway"
    );
    assert_eq!(
        available_transports(&fed.east, "west"),
        vec!["tcp".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_udp_blocked_then_allowed_new_streams_move_to_quic_within_5s_with_no_failed_request_at_200_rps()
 {
    let Some(fed) = UdpBlocked::start(1).await else {
        return;
    };
    assert_eq!(
        fed.east_tcp_links(),
        1,
        "east's link to west is a TCP connection"
    );
    let mut spec = LoadSpec::new(fed.east.outbound, "ratings", Protocol::Http1);
    spec.rate = 200;
    spec.duration = Duration::MAX;
    spec.connections = 16;
    spec.timeout = Duration::from_secs(5);
    spec.tally_header = Some("x-served-by".into());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(load::run_until(spec, stop_rx));
    // Calls on the TCP link first.
    tokio::time::sleep(Duration::from_secs(1)).await;

    fed.net.allow_udp("east");
    fed.net.allow_udp("west");
    let allowed = Instant::now();
    tokio::task::block_in_place(|| {
        meshfed_tests::eventually(
            "east's link to west moves to QUIC",
            Duration::from_secs(10),
            || {
                let t = available_transports(&fed.east, "west");
                if t == ["quic"] {
                    Ok(())
                } else {
                    Err(format!("{t:?}"))
                }
            },
        )
    });
    let on_quic = allowed.elapsed();
    // New streams can no longer go over TCP once east's TCP connection to
    // west is closed: it closes as soon as the calls on it are done.
    tokio::task::block_in_place(|| {
        meshfed_tests::eventually(
            "east's TCP link to west drains and closes",
            Duration::from_secs(10),
            || match fed.east_tcp_links() {
                0 => Ok(()),
                n => Err(format!("{n} established")),
            },
        )
    });
    let tcp_closed = allowed.elapsed();
    eprintln!(
        "UDP allowed: the link was on QUIC after {on_quic:?}; its TCP connection was closed after {tcp_closed:?}"
    );
    // More calls on QUIC, then the count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(()).unwrap();
    let report = running.await.unwrap();
    eprintln!(
        "load: {} sent, {} ok, failures {:?}, p99 {:?}",
        report.sent,
        report.ok,
        report.failures,
        report.p(0.99)
    );
    assert!(
        on_quic <= meshfed_tests::patient(Duration::from_secs(5)),
        "new streams went to QUIC {on_quic:?} after UDP was allowed; the bound is 5 s"
    );
    assert!(
        tcp_closed <= meshfed_tests::patient(Duration::from_secs(5)),
        "east's TCP link to west was still open {tcp_closed:?} after UDP was allowed; the bound is 5 s"
    );
    assert_eq!(
        fed.east.metric(
            "meshfed_peer_link_up",
            &["cluster=\"west\"", "transport=\"quic\""]
        ),
        1.0,
        "the link's metrics say quic"
    );
    // 1 s before the switch and 2 s after it at 200 req/s.
    assert!(
        report.sent >= 500,
        "the load ran across the switch: {} sent",
        report.sent
    );
    assert_eq!(
        (report.failed, report.ok),
        (0, report.sent),
        "no request failed across the switch: {:?}",
        report.failures
    );
    assert_eq!(
        report.responses_by_header.get("ratings-west").copied(),
        Some(report.sent),
        "west served every call"
    );
}

/// A TCP echo server on loopback; returns its address.
async fn tcp_echo() -> SocketAddr {
    tcp_echo_on("127.0.0.1:0").await
}

/// A TCP echo server listening on `bind`; returns its address.
async fn tcp_echo_on(bind: &str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Raw bytes as gRPC messages: all the gateways see anyway.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Clone)]
struct Unary;

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            if msg.as_ref() == b"fail" {
                let mut s = Status::new(Code::ResourceExhausted, "quota spent in west");
                s.metadata_mut()
                    .insert("x-detail", "from-west".parse().unwrap());
                return Err(s);
            }
            let mut out = b"west:".to_vec();
            out.extend_from_slice(&msg);
            Ok(tonic::Response::new(Bytes::from(out)))
        })
    }
}

/// A gRPC server (tonic's server machinery on hyper) in "west", on
/// loopback.
async fn grpc_backend() -> SocketAddr {
    grpc_backend_on("127.0.0.1:0").await
}

/// [`grpc_backend`] listening on `bind`.
async fn grpc_backend_on(bind: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let resp = match req.uri().path() {
                            "/test.Echo/Unary" => {
                                tonic::server::Grpc::new(Raw).unary(Unary, req).await
                            }
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
