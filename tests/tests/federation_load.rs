//! Changes under load: a policy edit that moves a service between clusters,
//! and a gateway drained with SIGTERM, each with zero failed requests.
//!
//! These run in nextest's `serial` group (their names start with
//! `serial_`): they generate load, and two cores are easily oversubscribed.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadSpec, Protocol};

const RATE: u32 = 200;

fn routing(to: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  subsets:
  - {{name: east, labels: {{topology.istio.io/cluster: east}}}}
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: {to}}}}}
"
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    east: GatewayProcess,
    west: Vec<GatewayProcess>,
    _backends: Vec<tokio::task::JoinHandle<()>>,
}

/// ratings runs in east and in west (two gateways), exported from both.
async fn setup(route_to: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_ports) = (free_udp_port(), [free_udp_port(), free_udp_port()]);
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("clusters.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &west_ports)
        ),
    )
    .unwrap();
    std::fs::write(policy.join("ratings.yaml"), routing(route_to)).unwrap();
    let (east_backend, t1) = http_backend("ratings-east").await;
    let (west_backend, t2) = http_backend("ratings-west").await;
    let east_eps = dir.path().join("east.yaml");
    let west_eps = dir.path().join("west.yaml");
    discovery_file(
        &east_eps,
        &[("ratings.default", vec![(east_backend, vec![])])],
    );
    discovery_file(
        &west_eps,
        &[("ratings.default", vec![(west_backend, vec![])])],
    );
    let spec = |cluster: &str, id: &str, port: u16, eps: &PathBuf| GatewaySpec {
        cluster: cluster.into(),
        id: id.into(),
        tls_dir: pki.gateway(cluster, id),
        policy_dir: policy.clone(),
        discovery: Some(eps.clone()),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec!["--drain-timeout".into(), "10s".into()],
    };
    let west = vec![
        GatewayProcess::start(&spec("west", "gw-0", west_ports[0], &west_eps)),
        GatewayProcess::start(&spec("west", "gw-1", west_ports[1], &west_eps)),
    ];
    let east = GatewayProcess::start(&spec("east", "gw-0", east_port, &east_eps));
    east.wait_links("west", 2);
    Setup {
        _dir: dir,
        policy,
        east,
        west,
        _backends: vec![t1, t2],
    }
}

fn spec(s: &Setup, duration: Duration) -> LoadSpec {
    let mut spec = LoadSpec::new(s.east.outbound, "ratings", Protocol::Http1);
    spec.rate = RATE;
    spec.duration = duration;
    spec.connections = 16;
    spec.timeout = Duration::from_secs(5);
    spec.tally_header = Some("x-served-by".into());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_editing_the_policy_dir_mid_load_moves_calls_to_west_with_zero_failures() {
    let s = setup("east").await;
    let load = tokio::spawn(load::run(spec(&s, Duration::from_secs(6))));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_atomic(&s.policy.join("ratings.yaml"), &routing("west"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // A bad edit (weights sum to 90) is refused; west keeps serving.
    let bad = routing("west").replace(
        "    - {destination: {host: ratings, subset: west}}\n",
        "    - {destination: {host: ratings, subset: west}, weight: 45}\n    - {destination: {host: ratings, subset: east}, weight: 45}\n",
    );
    write_atomic(&s.policy.join("ratings.yaml"), &bad);
    let report = load.await.unwrap();
    eprintln!("{report}");
    assert_eq!(report.failed, 0, "{report}");
    let east = report
        .responses_by_header
        .get("ratings-east")
        .copied()
        .unwrap_or(0);
    let west = report
        .responses_by_header
        .get("ratings-west")
        .copied()
        .unwrap_or(0);
    assert!(east > 0 && west > 0, "both served: {report}");
    // Everything after the switch went to west, bad edit or not: the last
    // second of calls is all west.
    assert!(
        west as f64 >= RATE as f64 * 3.0,
        "west served from the edit on: {report}"
    );
    let log = std::fs::read_to_string(&s.east.log).unwrap();
    assert!(
        log.contains("policy edit refused"),
        "the bad edit is logged"
    );
    assert!(log.contains("weights-sum"), "with its diagnostic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_sigterm_of_a_west_gateway_under_load_fails_no_request() {
    let mut s = setup("west").await;
    let load = tokio::spawn(load::run(spec(&s, Duration::from_secs(5))));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let code = s.west[0].terminate();
    let report = load.await.unwrap();
    eprintln!("{report}");
    assert_eq!(code, Some(0), "{}", s.west[0].log_tail());
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(
        report.responses_by_header.get("ratings-west").copied(),
        Some(report.ok)
    );
    assert_eq!(s.east.links_up("west"), 1);
    let _ = &s.west[1];
}
