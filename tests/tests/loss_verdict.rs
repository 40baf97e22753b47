//! Sustained random loss is detected and shown per link: east reaches
//! west's gateway only through the user-space impairment relay
//! (`meshfed_tests::relay`, fixed seed), and its `/peers` and `/metrics`
//! show the loss ratio of the link and the random-loss verdict
//! (gateway/src/tunnel/loss.rs). Real gateways, real QUIC.
//!
//! The gateways run with the hidden `--loss-window 3s` (the default is
//! 30 s), so that a window fills within the test.
//!
//! Runs in nextest's `serial` group: it generates load and waits on a
//! window of wall-clock time.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use meshfed_tests::eventually;
use meshfed_tests::federation::*;
use meshfed_tests::probe::Prober;
use meshfed_tests::relay::{Impairment, Relay};

const WINDOW: &str = "3s";

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
    let spec = |cluster: &str, port: u16, discovery: Option<std::path::PathBuf>| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery,
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec!["--loss-window".into(), WINDOW.into()],
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

/// The `loss` object of east's link to west in `/peers`, once the window
/// is full (its samples span the whole window).
fn full_window(east: &GatewayProcess) -> Result<serde_json::Value, String> {
    let peers: serde_json::Value =
        serde_json::from_str(&east.admin_get("/peers")).map_err(|e| e.to_string())?;
    let link = peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["cluster"] == "west" && p["up"] == true))
        .ok_or_else(|| format!("no link to west up in {peers}"))?;
    let loss = link["loss"].clone();
    let (span, window) = (loss["span_s"].as_f64(), loss["window_s"].as_f64());
    match (span, window) {
        (Some(s), Some(w)) if s >= w * 0.9 => Ok(loss),
        _ => Err(format!("window not full yet: {loss}")),
    }
}

/// The value of a `meshfed_peer_*` gauge of the link to west.
fn gauge(east: &GatewayProcess, name: &str) -> Option<f64> {
    let text = east.admin_get("/metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{cluster=\"west\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// 3% loss each way, calls every 5 ms: within a few windows, east's
/// `/peers` shows the link's loss ratio near 3% and the random-loss
/// verdict on, and the metrics say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_three_percent_loss_shows_a_loss_ratio_and_the_random_loss_verdict() {
    let l = linked(Impairment::lossy(0.03, Duration::from_millis(20), 11)).await;
    let p = Prober::start(
        l.east.outbound,
        "ratings",
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    let loss = tokio::task::block_in_place(|| {
        eventually(
            "east's /peers shows random loss on the link to west",
            Duration::from_secs(20),
            || {
                let loss = full_window(&l.east)?;
                if loss["random_loss"] == true {
                    Ok(loss)
                } else {
                    Err(format!("verdict off: {loss}"))
                }
            },
        )
    });
    let ratio = loss["ratio"].as_f64().unwrap();
    eprintln!("loss {loss}; relay {:?}", l.relay.stats());
    assert!(
        (0.01..=0.08).contains(&ratio),
        "a 3% relay shows a loss ratio near 3%: {loss}"
    );
    assert!(loss["sent"].as_u64().unwrap() >= 200, "{loss}");
    assert!(l.relay.stats().lost > 0);
    tokio::task::block_in_place(|| {
        assert_eq!(gauge(&l.east, "meshfed_peer_random_loss"), Some(1.0));
        let g = gauge(&l.east, "meshfed_peer_loss_ratio").unwrap();
        assert!(g > 0.0, "meshfed_peer_loss_ratio {g}");
    });
    let samples = p.stop().await;
    assert!(samples.iter().any(|s| s.ok()));
}

/// The same traffic over a clean relay: the window fills, the ratio is 0
/// and the verdict stays off, in `/peers` and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_clean_link_shows_no_loss_and_no_random_loss_verdict() {
    let l = linked(Impairment {
        delay: Duration::from_millis(10),
        ..Impairment::seeded(11)
    })
    .await;
    let p = Prober::start(
        l.east.outbound,
        "ratings",
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    let loss = tokio::task::block_in_place(|| {
        eventually(
            "east's /peers shows a full loss window on the link to west",
            Duration::from_secs(20),
            || {
                let loss = full_window(&l.east)?;
                if loss["sent"].as_u64().unwrap_or(0) >= 200 {
                    Ok(loss)
                } else {
                    Err(format!("too few packets yet: {loss}"))
                }
            },
        )
    });
    eprintln!("loss {loss}; relay {:?}", l.relay.stats());
    assert_eq!(l.relay.stats().lost, 0);
    assert_eq!(loss["random_loss"], false, "{loss}");
    assert_eq!(loss["lost"], 0, "{loss}");
    assert_eq!(loss["ratio"].as_f64(), Some(0.0), "{loss}");
    tokio::task::block_in_place(|| {
        assert_eq!(gauge(&l.east, "meshfed_peer_random_loss"), Some(0.0));
        assert_eq!(gauge(&l.east, "meshfed_peer_loss_ratio"), Some(0.0));
    });
    let samples = p.stop().await;
    assert!(samples.iter().all(|s| s.ok()));
}
