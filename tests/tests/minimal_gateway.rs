//! The gateway built without its default features (`kube`, `dns`, `otel`):
//! the edge-site build (docs/operations.md, "Build features").
//!
//! The binary under test is `meshfed-gateway-minimal` beside the test
//! executable. Cargo builds one feature set per binary name, so `.ci/run`
//! builds it first and copies it aside ([`MINIMAL_BUILD`]); a missing one
//! fails these tests with that command, never skips them.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshfed_tests::federation::*;
use meshfed_tests::{Outcome, bin, locate, run};

const MINIMAL: &str = "meshfed-gateway-minimal";

/// How `.ci/run` makes the minimal binary, before the default build puts
/// the full one back under the usual name.
const MINIMAL_BUILD: &str = "cargo build -p meshfed-gateway --no-default-features --locked \
     && cp \"$CARGO_TARGET_DIR/debug/meshfed-gateway\" \"$CARGO_TARGET_DIR/debug/meshfed-gateway-minimal\" \
     && cargo build --workspace --bins --locked";

fn minimal() -> PathBuf {
    match locate(MINIMAL) {
        Ok(path) => path,
        Err(e) => panic!(
            "no {MINIMAL}: the gateway built without default features, which .ci/run builds \
             before the default one; build it with:\n  {MINIMAL_BUILD}\n(lookup: {e})"
        ),
    }
}

fn command(program: &Path, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd).unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

/// The build's features, from `--version`.
fn features(program: &Path) -> String {
    let out = command(program, &["--version"]);
    assert_eq!(out.code, Some(0), "{out}");
    out.stdout
        .split_once("features: ")
        .map(|(_, f)| f.trim().trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("{} --version names no features: {out}", program.display()))
}

/// Status and who served it, through `via`'s outbound listener.
async fn get(via: SocketAddr, host: &str) -> (u16, String) {
    let (status, served, _) = get_through(via, host, "/").await;
    (status, served)
}

/// An edge site runs the minimal binary with static discovery; west runs
/// the default one. Each serves an exported service, and each calls the
/// other's through its outbound listener: HTTP over the QUIC tunnel with
/// mutual TLS, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_default_features_serves_an_edge_site_both_ways() {
    let minimal = minimal();
    assert_eq!(
        features(&minimal),
        "none",
        "{} is not the minimal build",
        minimal.display()
    );
    assert_eq!(features(&bin("meshfed-gateway")), "kube, dns, otel");

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (edge_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: sensors, namespace: default}}\n",
            cluster_yaml("edge", &[edge_port]),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap();
    let (ratings, t1) = http_backend("ratings-west").await;
    let (sensors, t2) = http_backend("sensors-edge").await;
    let west_eps = dir.path().join("west.yaml");
    discovery_file(&west_eps, &[("ratings.default", vec![(ratings, vec![])])]);
    let edge_eps = dir.path().join("edge.yaml");
    discovery_file(&edge_eps, &[("sensors.default", vec![(sensors, vec![])])]);
    let spec = |cluster: &str, port: u16, discovery: PathBuf| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery: Some(discovery),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    };
    let west = GatewayProcess::start(&spec("west", west_port, west_eps));
    let edge = GatewayProcess::start_program(
        &minimal,
        &spec("edge", edge_port, edge_eps),
        &Launch::default(),
    );
    edge.wait_links("west", 1);
    west.wait_links("edge", 1);

    assert_eq!(
        get(edge.outbound, "ratings").await,
        (200, "ratings-west".to_string()),
        "edge → west; edge log:\n{}",
        edge.log_tail()
    );
    assert_eq!(
        get(west.outbound, "sensors.default").await,
        (200, "sensors-edge".to_string()),
        "west → edge; edge log:\n{}",
        edge.log_tail()
    );
    assert!(
        edge.metric(
            "meshfed_requests_total",
            &[
                "direction=\"outbound\"",
                "destination_cluster=\"west\"",
                "response_code=\"200\""
            ]
        ) >= 1.0,
        "the minimal gateway's metrics count its call"
    );
    drop((t1, t2));
}

/// What the minimal build cannot do is refused at start, naming the cargo
/// feature and the build that has it: Kubernetes and OTLP flags (usage
/// error, exit 2), and host names where only the `dns` feature resolves
/// them (exit 1): a discovery-file endpoint, a peer cluster's gateway.
#[test]
fn the_minimal_gateway_refuses_what_needs_a_missing_feature_naming_it() {
    let minimal = minimal();
    let base = [
        "--cluster",
        "edge",
        "--tls-dir",
        "/nonexistent",
        "--policy-dir",
        "/nonexistent",
    ];
    for (flags, feature) in [
        (&["--kubernetes"][..], "kube"),
        (
            &["--kubeconfig", "/k", "--mirror-services", "gw.meshfed"][..],
            "kube",
        ),
        (&["--otlp-endpoint", "http://127.0.0.1:4317"][..], "otel"),
    ] {
        let args: Vec<&str> = base.iter().chain(flags).copied().collect();
        let out = command(&minimal, &args);
        assert_eq!(out.code, Some(2), "{flags:?}: {out}");
        assert!(
            out.stderr.contains(&format!("the `{feature}` feature"))
                && out.stderr.contains(&format!(
                    "cargo build -p meshfed-gateway --features {feature}"
                ))
                && flags
                    .iter()
                    .filter(|f| f.starts_with("--"))
                    .all(|f| out.stderr.contains(f)),
            "{flags:?}: {out}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.gateway("edge", "gw-0");
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let clusters = cluster_yaml("edge", &[free_udp_port()]);
    let start = |discovery: &Path| {
        let args = [
            "--cluster",
            "edge",
            "--tls-dir",
            tls.to_str().unwrap(),
            "--policy-dir",
            policy.to_str().unwrap(),
            "--discovery-file",
            discovery.to_str().unwrap(),
            "--tunnel-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ];
        command(&minimal, &args)
    };
    let by_name = dir.path().join("by-name.yaml");
    std::fs::write(
        &by_name,
        "services:\n  sensors.default:\n    - address: localhost:9080\n",
    )
    .unwrap();
    let by_ip = dir.path().join("by-ip.yaml");
    std::fs::write(
        &by_ip,
        "services:\n  sensors.default:\n    - address: 127.0.0.1:9080\n",
    )
    .unwrap();

    // A discovery file that names an endpoint by host.
    std::fs::write(policy.join("p.yaml"), &clusters).unwrap();
    let out = start(&by_name);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("localhost:9080")
            && out.stderr.contains("the `dns` feature")
            && out
                .stderr
                .contains("cargo build -p meshfed-gateway --features dns"),
        "{out}"
    );

    // A peer cluster whose gateway is written as a host name.
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{clusters}apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: west}}\nspec: {{gateways: ['gw.west.example.com:15443']}}\n"
        ),
    )
    .unwrap();
    let out = start(&by_ip);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("cluster `west`")
            && out.stderr.contains("gw.west.example.com:15443")
            && out.stderr.contains("the `dns` feature")
            && out
                .stderr
                .contains("cargo build -p meshfed-gateway --features dns"),
        "{out}"
    );
}
