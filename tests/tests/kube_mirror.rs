//! Mirror Services and in-cluster ServiceExports, across two clusters: real
//! `meshfed-gateway` processes linked over QUIC on loopback, one of them
//! reading the **fake Kubernetes API server** of `meshfed_tests::fake_kube`
//! (an HTTP-level fake: no real API server can run on this machine).
//!
//! Pinned: east's gateway creates `ratings-west` and `ratings-clusterset`
//! for the service west exports, keeps them up to date (ports from the local
//! Service, endpoints from the gateway's own Service), routes calls to those
//! names to west, and deletes them when the export is gone; with
//! `--kube-service-exports`, west serves its export only while a
//! ServiceExport object exists in its cluster.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshfed_tests::fake_kube::{FakeKube, Kind};
use meshfed_tests::federation::*;
use meshfed_tests::kube::*;
use meshfed_tests::patient;
use serde_json::{Value, json};
use tempfile::TempDir;

const EXPORT: &str = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n";

struct TwoClusters {
    dir: TempDir,
    policy: PathBuf,
    ports: (u16, u16),
    east: GatewayProcess,
    west: GatewayProcess,
}

impl TwoClusters {
    /// Rewrites the policy both gateways follow: the two clusters, then
    /// `rest`.
    fn set_policy(&self, rest: &str) {
        write_policy(&self.policy, self.ports, rest);
    }
}

fn write_policy(dir: &std::path::Path, ports: (u16, u16), rest: &str) {
    write_atomic(
        &dir.join("p.yaml"),
        &format!(
            "{}{}{rest}",
            cluster_yaml("east", &[ports.0]),
            cluster_yaml("west", &[ports.1])
        ),
    );
}

/// East and west, exporting `ratings.default`; west serves it at `backend`
/// (from a static file unless `west_args` says otherwise). Returns once
/// east's link to west is up.
async fn two_clusters(
    backend: SocketAddr,
    east_args: Vec<String>,
    west_args: Vec<String>,
    west_static: bool,
) -> TwoClusters {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ports = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let eps = dir.path().join("west.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let spec = |cluster: &str, port: u16, discovery: Option<PathBuf>, extra_args: Vec<String>| {
        GatewaySpec {
            cluster: cluster.into(),
            id: "gw-0".into(),
            tls_dir: pki.gateway(cluster, "gw-0"),
            policy_dir: policy.clone(),
            discovery,
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args,
        }
    };
    let west_spec = spec("west", ports.1, west_static.then_some(eps), west_args);
    let east_spec = spec("east", ports.0, None, east_args);
    write_policy(&policy, ports, EXPORT);
    let (east, west) = tokio::task::spawn_blocking(move || {
        let west = GatewayProcess::start(&west_spec);
        let east = GatewayProcess::start(&east_spec);
        east.wait_links("west", 1);
        (east, west)
    })
    .await
    .unwrap();
    TwoClusters {
        dir,
        policy,
        ports,
        east,
        west,
    }
}

fn kubeconfig_args(kube: &FakeKube, dir: &std::path::Path, name: &str) -> Vec<String> {
    let path = dir.join(name);
    kube.write_kubeconfig(&path);
    vec!["--kubeconfig".into(), path.display().to_string()]
}

/// The gateway's own Service and its ready pods, as the mirrors' target.
fn gateway_service(kube: &FakeKube, ips: &[&str]) {
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "meshfed-gateway", "namespace": "meshfed-system"},
        "spec": {"selector": {"app": "meshfed-gateway"},
                 "ports": [{"name": "outbound", "port": 15001}]}}));
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    kube.apply(
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "meshfed-gateway-x", "namespace": "meshfed-system",
                     "labels": {"kubernetes.io/service-name": "meshfed-gateway"}},
        "addressType": "IPv4",
        "ports": [{"name": "outbound", "port": 15001, "protocol": "TCP"}],
        "endpoints": endpoints}),
    );
}

fn ports_of(svc: &Value) -> Vec<(String, u64, u64)> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["port"].as_u64().unwrap_or(0),
                p["targetPort"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn addresses_of(slice: &Value) -> Vec<String> {
    let mut a: Vec<String> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    a.sort();
    a
}

fn mirrors(kube: &FakeKube) -> Vec<String> {
    let mut names: Vec<String> = kube
        .list(Kind::Service)
        .iter()
        .filter(|s| !s["metadata"]["labels"]["meshfed.io/mirror-of"].is_null())
        .map(|s| {
            format!(
                "{}/{}",
                s["metadata"]["namespace"].as_str().unwrap(),
                s["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

fn wait(what: &str, gw: &GatewayProcess, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + patient(Duration::from_secs(15));
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within the deadline\nlog:\n{}",
            gw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_services_are_created_updated_routed_and_garbage_collected() {
    let (backend, _b) = http_backend("west-ratings").await;
    let kube = FakeKube::start().await;
    gateway_service(&kube, &["10.0.0.7"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut east_args = kubeconfig_args(&kube, tmp.path(), "east.kubeconfig");
    east_args.extend([
        "--mirror-services".into(),
        "meshfed-gateway.meshfed-system".into(),
    ]);
    let two = two_clusters(backend, east_args, vec![], true).await;
    let east_port = u64::from(two.east.outbound.port());

    // Created: one per remote cluster and the federated one, default port.
    wait("mirrors created", &two.east, || {
        mirrors(&kube) == ["default/ratings-clusterset", "default/ratings-west"]
    });
    let west_svc = kube.get(Kind::Service, "default", "ratings-west").unwrap();
    assert_eq!(
        west_svc["metadata"]["labels"]["meshfed.io/mirror-of"],
        "ratings"
    );
    assert_eq!(
        west_svc["metadata"]["labels"]["meshfed.io/mirror-cluster"],
        "west"
    );
    assert_eq!(
        west_svc["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshfed-gateway"
    );
    assert!(
        west_svc["spec"]["selector"].is_null(),
        "a mirror selects no pods"
    );
    assert_eq!(
        ports_of(&west_svc),
        [("port-80".to_string(), 80, east_port)]
    );
    wait("mirror endpoints", &two.east, || {
        kube.get(Kind::EndpointSlice, "default", "ratings-west-meshfed")
            .is_some_and(|s| addresses_of(&s) == ["10.0.0.7"])
    });
    let slice = kube
        .get(Kind::EndpointSlice, "default", "ratings-west-meshfed")
        .unwrap();
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "ratings-west"
    );
    assert_eq!(slice["ports"][0]["port"].as_u64(), Some(east_port));
    assert_eq!(
        slice["metadata"]["ownerReferences"][0]["uid"],
        west_svc["metadata"]["uid"]
    );

    // Routed: the outbound listener maps the mirror names back.
    for host in [
        "ratings-west.default.svc.cluster.local:9080",
        "ratings-clusterset.default.svc.cluster.local:9080",
    ] {
        assert_eq!(
            served_by(two.east.outbound, host).await,
            Ok("west-ratings".into()),
            "{host}"
        );
    }

    // Updated: ports from a same-named local Service; a new gateway pod.
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {"selector": {"app": "ratings"}, "ports": [{"name": "http", "port": 9080}]}}));
    gateway_service(&kube, &["10.0.0.7", "10.0.0.8"]);
    wait("mirrors updated", &two.east, || {
        let svc = kube.get(Kind::Service, "default", "ratings-clusterset");
        let sl = kube.get(Kind::EndpointSlice, "default", "ratings-clusterset-meshfed");
        svc.is_some_and(|s| ports_of(&s) == [("http".to_string(), 9080, east_port)])
            && sl.is_some_and(|s| addresses_of(&s) == ["10.0.0.7", "10.0.0.8"])
    });
    // The update kept the Service (same uid, so its ClusterIP too).
    let after = kube.get(Kind::Service, "default", "ratings-west").unwrap();
    assert_eq!(after["metadata"]["uid"], west_svc["metadata"]["uid"]);
    assert_eq!(after["spec"]["clusterIP"], west_svc["spec"]["clusterIP"]);

    // Steady: nothing is rewritten while nothing changes.
    let writes = kube.client_writes();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        kube.client_writes(),
        writes,
        "reconciling an unchanged state wrote to the API"
    );

    // Garbage-collected: the export is gone from Git.
    two.set_policy("");
    wait("mirrors deleted", &two.east, || {
        mirrors(&kube).is_empty()
            && kube
                .get(Kind::EndpointSlice, "default", "ratings-west-meshfed")
                .is_none()
            && kube
                .get(Kind::EndpointSlice, "default", "ratings-clusterset-meshfed")
                .is_none()
    });
    // Objects the gateway does not own are left alone.
    assert!(kube.get(Kind::Service, "default", "ratings").is_some());
    assert!(
        kube.get(Kind::Service, "meshfed-system", "meshfed-gateway")
            .is_some()
    );
    drop(two.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kube_service_exports_a_service_is_served_only_while_its_service_export_exists() {
    let (backend, _b) = http_backend("west-ratings").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        backend,
        true,
        "ratings-1",
    ));
    let tmp = tempfile::tempdir().unwrap();
    let mut west_args = kubeconfig_args(&kube, tmp.path(), "west.kubeconfig");
    west_args.push("--kube-service-exports".into());
    let two = two_clusters(backend, vec![], west_args, false).await;
    let host = "ratings.default.svc.cluster.local:9080";

    // Git exports it, the cluster does not: west does not serve it.
    let refused = served_by(two.east.outbound, host).await;
    assert!(
        refused.is_err(),
        "served without a ServiceExport: {refused:?}"
    );

    kube.apply(
        json!({"kind": "ServiceExport", "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "metadata": {"name": "ratings", "namespace": "default"}}),
    );
    let east = &two.east;
    let deadline = tokio::time::Instant::now() + patient(Duration::from_secs(15));
    loop {
        if served_by(east.outbound, host).await == Ok("west-ratings".into()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served\n{}",
            two.west.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    kube.delete(Kind::ServiceExport, "default", "ratings");
    let deadline = tokio::time::Instant::now() + patient(Duration::from_secs(15));
    while served_by(east.outbound, host).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still served\n{}",
            two.west.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
