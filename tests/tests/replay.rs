//! A peer gateway SIGKILLed under load, with no retry policy: calls on its
//! link fail until the link is declared dead (under a second). A bodiless
//! idempotent call whose link died before its answer is replayed once in
//! the next cluster that can serve it, so no GET is lost. Real gateways of
//! three clusters on loopback; the figure is printed.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadSpec, Protocol};

/// ratings pinned to west's subset, with failover (a pinned cluster that
/// has no healthy endpoint is left for the rest), and no retries at all.
const POLICY: &str = "apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: ratings, namespace: default}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  subsets:
  - {name: west, labels: {topology.istio.io/cluster: west}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route:
    - {destination: {host: ratings, subset: west}}
    timeout: 5s
    retries: {attempts: 0}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_peer_killed_under_load_without_retries_loses_no_get() {
    let (west_backend, _tw) = http_backend("west").await;
    let (north_backend, _tn) = http_backend("north").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}{}{POLICY}",
            cluster_yaml("east", &[ports[0]]),
            cluster_yaml("west", &[ports[1]]),
            cluster_yaml("north", &[ports[2]]),
        ),
    )
    .unwrap();
    let eps = |name: &str, backend| {
        let f = dir.path().join(format!("{name}.yaml"));
        discovery_file(&f, &[("ratings.default", vec![(backend, vec![])])]);
        f
    };
    let (west_eps, north_eps) = (eps("west", west_backend), eps("north", north_backend));
    let spec = |cluster: &str, port: u16, discovery: Option<&Path>| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery: discovery.map(PathBuf::from),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    };
    let mut west = GatewayProcess::start(&spec("west", ports[1], Some(&west_eps)));
    let _north = GatewayProcess::start(&spec("north", ports[2], Some(&north_eps)));
    let east = GatewayProcess::start(&spec("east", ports[0], None));
    east.wait_links("west", 1);
    east.wait_links("north", 1);

    let mut load_spec = LoadSpec::new(east.outbound, "ratings", Protocol::Http1);
    load_spec.rate = 500;
    load_spec.duration = Duration::MAX;
    load_spec.connections = 32;
    load_spec.timeout = Duration::from_secs(10);
    load_spec.tally_header = Some("x-served-by".into());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(load::run_until(load_spec, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    west.kill();
    let killed = Instant::now();
    let deadline = meshfed_tests::patient(Duration::from_secs(5));
    while east.links_up("west") > 0 {
        assert!(killed.elapsed() < deadline, "east still counts west's link");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dropped = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(());
    let report = task.await.unwrap();
    eprintln!("{report}");
    eprintln!(
        "west's link dropped after {dropped:?}; {} of {} failed; served by {:?}",
        report.failed, report.sent, report.responses_by_header
    );
    assert!(
        report.responses_by_header.get("west").copied().unwrap_or(0) > 0
            && report
                .responses_by_header
                .get("north")
                .copied()
                .unwrap_or(0)
                > 0,
        "west served, then north: {report}"
    );
    assert_eq!(report.failed, 0, "{report}");
}
