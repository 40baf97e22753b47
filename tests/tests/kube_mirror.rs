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
    let writes = kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]),
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

/// The ports of a Service as `(name, port, targetPort, appProtocol)`.
fn ports_with_app(svc: &Value) -> Vec<(String, u64, u64, String)> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["port"].as_u64().unwrap_or(0),
                p["targetPort"].as_u64().unwrap_or(0),
                p["appProtocol"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Issue 22, item 3. A caller reaches a remote service through its mirror
/// the way an application does: it dials `ratings-west.default:9080`, i.e.
/// the mirror's ClusterIP on the port the mirror declares, and kube-proxy
/// forwards that to the slice port of the same name (the fake's
/// `service_endpoint` plays kube-proxy; no real one runs here). The ports
/// are those of west's own Service (names, numbers, `appProtocol`),
/// announced by west's gateway: east has no Service of that name to copy
/// them from. Before, the mirror declared port 80 only, and a caller on
/// 9080 had nowhere to go. The ports stay when the link to west drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_reaches_a_remote_service_on_the_port_its_mirror_declares() {
    let (backend, _b) = http_backend("west-ratings").await;
    // West's cluster: the Service with two ports, one of them served.
    let west_kube = FakeKube::start().await;
    west_kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {"selector": {"app": "ratings"}, "ports": [
            {"name": "http", "port": 9080, "protocol": "TCP", "appProtocol": "http", "targetPort": 8080},
            {"name": "metrics", "port": 9464, "protocol": "TCP", "targetPort": 9464}]}}));
    west_kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        backend,
        true,
        "ratings-1",
    ));
    // East's cluster: the gateway's own Service, its pod on loopback.
    let east_kube = FakeKube::start().await;
    gateway_service(&east_kube, &["127.0.0.1"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut east_args = kubeconfig_args(&east_kube, tmp.path(), "east.kubeconfig");
    east_args.extend([
        "--mirror-services".into(),
        "meshfed-gateway.meshfed-system".into(),
    ]);
    let west_args = kubeconfig_args(&west_kube, tmp.path(), "west.kubeconfig");
    let mut two = two_clusters(backend, east_args, west_args, false).await;
    let east_port = u64::from(two.east.outbound.port());
    let want = vec![
        ("http".to_string(), 9080, east_port, "http".to_string()),
        ("metrics".to_string(), 9464, east_port, String::new()),
    ];
    for mirror in ["ratings-west", "ratings-clusterset"] {
        wait(
            &format!("{mirror} declares west's ports"),
            &two.east,
            || {
                east_kube
                    .get(Kind::Service, "default", mirror)
                    .is_some_and(|s| ports_with_app(&s) == want)
            },
        );
        let svc = east_kube.get(Kind::Service, "default", mirror).unwrap();
        assert_eq!(
            svc["metadata"]["annotations"]["meshfed.io/ports-from"],
            "announcement"
        );
        let slice = format!("{mirror}-meshfed");
        wait(&format!("{slice} names the same ports"), &two.east, || {
            east_kube
                .get(Kind::EndpointSlice, "default", &slice)
                .is_some_and(|s| {
                    let names: Vec<_> = s["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            (
                                p["name"].clone(),
                                p["port"].clone(),
                                p["appProtocol"].clone(),
                            )
                        })
                        .collect();
                    names
                        == [
                            (json!("http"), json!(east_port), json!("http")),
                            (json!("metrics"), json!(east_port), Value::Null),
                        ]
                })
        });
    }

    // The call, as an application makes it: to the mirror's port 9080.
    for mirror in ["ratings-west", "ratings-clusterset"] {
        let addr = east_kube
            .service_endpoint("default", mirror, 9080)
            .unwrap_or_else(|e| panic!("kube-proxy would not forward {mirror}:9080: {e}"));
        assert_eq!(addr.port(), two.east.outbound.port());
        assert_eq!(
            served_by(addr, &format!("{mirror}.default:9080")).await,
            Ok("west-ratings".into()),
            "{mirror}.default:9080"
        );
    }
    // A port the remote Service does not declare is not one the mirror
    // declares either.
    assert!(
        east_kube
            .service_endpoint("default", "ratings-west", 80)
            .is_err()
    );

    // West's gateway goes away: east keeps the ports it was told, rather
    // than falling back to the default and cutting callers off.
    // The setup's last writes first: on a loaded machine one can still be
    // on its way when the ports above already read right. Writes that the
    // dropped link causes come after the kill and are still caught below.
    let mut writes = east_kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = east_kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]);
        if now == writes {
            break;
        }
        writes = now;
    }
    two.west.kill();
    wait("east sees west's link down", &two.east, || {
        two.east.links_up("west") == 0
    });
    std::thread::sleep(Duration::from_millis(2500));
    let svc = east_kube
        .get(Kind::Service, "default", "ratings-west")
        .unwrap();
    assert_eq!(ports_with_app(&svc), want);
    assert_eq!(
        east_kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]),
        writes,
        "a dropped link rewrote the mirrors"
    );
}

/// East's mirror-writing gateway arguments against `kube`.
fn mirror_args(kube: &FakeKube, dir: &std::path::Path, name: &str) -> Vec<String> {
    let mut args = kubeconfig_args(kube, dir, name);
    args.extend([
        "--mirror-services".into(),
        "meshfed-gateway.meshfed-system".into(),
    ]);
    args
}

/// Issue 22, item 5. Two replicas of east's gateway whose snapshots differ
/// (one exports `ratings` from west, the other was left on a commit
/// without it) share one API server. Only the holder of the Lease
/// `meshfed-mirror-east` writes, so the mirror does not flap: its uid and
/// ClusterIP stay and nobody deletes it. When the holder dies (SIGKILL,
/// no release), the standby takes the Lease within its duration (15 s)
/// and then writes by its own snapshot (here: deletes the mirror).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_different_snapshots_do_not_flap_a_mirror_and_the_standby_takes_over() {
    let (backend, _b) = http_backend("west-ratings").await;
    let kube = FakeKube::start().await;
    gateway_service(&kube, &["10.0.0.7"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut two = two_clusters(
        backend,
        mirror_args(&kube, tmp.path(), "east.kubeconfig"),
        vec![],
        true,
    )
    .await;
    wait("gw-0 creates the mirror", &two.east, || {
        mirrors(&kube) == ["default/ratings-clusterset", "default/ratings-west"]
    });
    let lease = kube
        .get(Kind::Lease, "meshfed-system", "meshfed-mirror-east")
        .expect("the writer holds a Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "gw-0");
    let before = kube.get(Kind::Service, "default", "ratings-west").unwrap();

    // A second replica on a snapshot without the export.
    let stale_policy = two.dir.path().join("stale-policy");
    std::fs::create_dir_all(&stale_policy).unwrap();
    write_policy(&stale_policy, two.ports, "");
    let pki = Pki {
        dir: two.dir.path().to_path_buf(),
    };
    let spec = GatewaySpec {
        cluster: "east".into(),
        id: "gw-1".into(),
        tls_dir: pki.gateway("east", "gw-1"),
        policy_dir: stale_policy,
        discovery: None,
        tunnel_port: free_udp_port(),
        work_dir: two.dir.path().to_path_buf(),
        extra_args: mirror_args(&kube, tmp.path(), "east-1.kubeconfig"),
    };
    let standby = tokio::task::spawn_blocking(move || GatewayProcess::start(&spec))
        .await
        .unwrap();
    // Several passes of both (each reconciles every second).
    std::thread::sleep(Duration::from_millis(4000));
    let after = kube
        .get(Kind::Service, "default", "ratings-west")
        .unwrap_or_else(|| panic!("the standby deleted the mirror\n{}", standby.log_tail()));
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(after["spec"]["clusterIP"], before["spec"]["clusterIP"]);
    let lease = kube
        .get(Kind::Lease, "meshfed-system", "meshfed-mirror-east")
        .unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        "gw-0",
        "{}",
        standby.log_tail()
    );

    // The holder dies without releasing: the standby takes over within the
    // Lease's duration, and its snapshot rules.
    two.east.kill();
    let died = std::time::Instant::now();
    // client-go's bound: the duration, counted from when the standby last
    // saw the holder renew (it polls every 2 s), plus one poll.
    let bound = Duration::from_secs(15 + 2 + 2);
    let deadline = died + patient(bound);
    while !kube
        .get(Kind::Lease, "meshfed-system", "meshfed-mirror-east")
        .is_some_and(|l| l["spec"]["holderIdentity"] == "gw-1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby did not take the Lease within {bound:?}\n{}",
            standby.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = died.elapsed();
    wait("the standby writes by its snapshot", &standby, || {
        mirrors(&kube).is_empty()
    });
    assert!(
        took >= Duration::from_secs(10),
        "took over after {took:?}, while the holder's Lease was still valid"
    );
    eprintln!("the standby took over {took:?} after the holder died");
    let lease = kube
        .get(Kind::Lease, "meshfed-system", "meshfed-mirror-east")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    drop(standby);
}

/// Issue 22, item 8. Mirrors for services in a namespace that is
/// terminating (`403`, cause `NamespaceTerminating`) or missing (`404`) are
/// skipped: one INFO line per namespace, not a WARN per mirror per second
/// and not an RBAC hint; the gauge `meshfed_mirror_skipped_namespaces`
/// says how many; writes there are retried with backoff; mirrors elsewhere
/// are unaffected; and once the namespace exists, its mirrors are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_terminating_namespaces_are_skipped_with_backoff_and_counted() {
    let (backend, _b) = http_backend("west-ratings").await;
    let kube = FakeKube::start().await;
    kube.set_namespace("default", Some("Active"));
    kube.set_namespace("meshfed-system", Some("Active"));
    kube.set_namespace("old", Some("Terminating"));
    gateway_service(&kube, &["10.0.0.7"]);
    let tmp = tempfile::tempdir().unwrap();
    let two = two_clusters(
        backend,
        mirror_args(&kube, tmp.path(), "east.kubeconfig"),
        vec![],
        true,
    )
    .await;
    let exports = format!(
        "{EXPORT}---\n{}---\n{}",
        EXPORT.replace("namespace: default", "namespace: old"),
        EXPORT.replace("namespace: default", "namespace: gone")
    );
    two.set_policy(&exports);
    wait("mirrors in `default` despite the others", &two.east, || {
        mirrors(&kube) == ["default/ratings-clusterset", "default/ratings-west"]
    });
    wait("both namespaces counted as skipped", &two.east, || {
        two.east.metric(
            "meshfed_mirror_skipped_namespaces",
            &["reason=\"terminating\""],
        ) == 1.0
            && two
                .east
                .metric("meshfed_mirror_skipped_namespaces", &["reason=\"missing\""])
                == 1.0
    });
    // Backoff: over 8 s, a retry every second would make 16 creates per
    // namespace (two mirrors each); 1 s doubling makes at most 3 tries.
    let (old0, gone0) = (kube.refused_creates("old"), kube.refused_creates("gone"));
    std::thread::sleep(Duration::from_millis(8000));
    let (old1, gone1) = (kube.refused_creates("old"), kube.refused_creates("gone"));
    assert!(old1 - old0 <= 6, "{} creates in `old` in 8 s", old1 - old0);
    assert!(
        gone1 - gone0 <= 6,
        "{} creates in `gone` in 8 s",
        gone1 - gone0
    );
    let log = std::fs::read_to_string(two.dir.path().join("east-gw-0.log")).unwrap();
    let about = |ns: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("namespace `{ns}`")) || l.contains(&format!("/{ns}/")))
            .count()
    };
    assert_eq!(about("old"), 1, "one line for `old`:\n{log}");
    assert_eq!(about("gone"), 1, "one line for `gone`:\n{log}");
    let names_it = |l: &str| {
        l.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "old" || w == "gone")
    };
    assert!(
        !log.lines().any(|l| l.contains("WARN") && names_it(l)),
        "a WARN about a skipped namespace:\n{log}"
    );
    assert!(
        !log.contains("rbac.yaml"),
        "described as missing RBAC:\n{log}"
    );

    // The namespace is created: its mirrors follow, and the gauge drops.
    kube.set_namespace("gone", Some("Active"));
    let deadline = std::time::Instant::now() + patient(Duration::from_secs(40));
    while !mirrors(&kube).contains(&"gone/ratings-west".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            two.east.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait("`gone` no longer skipped", &two.east, || {
        two.east
            .metric("meshfed_mirror_skipped_namespaces", &["reason=\"missing\""])
            == 0.0
    });
}

/// Issue 22, item 1 (the mirror half). A gateway pod that starts
/// terminating (its deletionTimestamp is set; the EndpointSlice
/// controller has not caught up yet and still says ready) leaves every
/// mirror's EndpointSlice within one reconcile, so callers stop being sent
/// to a pod about to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_gateway_pod_leaves_the_mirrors_at_once() {
    let (backend, _b) = http_backend("west-ratings").await;
    let kube = FakeKube::start().await;
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "meshfed-gateway", "namespace": "meshfed-system"},
        "spec": {"selector": {"app": "meshfed-gateway"},
                 "ports": [{"name": "outbound", "port": 15001}]}}));
    let pods = [("gw-a", "10.0.0.7"), ("gw-b", "10.0.0.8")];
    for (name, _) in pods {
        kube.apply(pod(
            "meshfed-system",
            name,
            json!({"app": "meshfed-gateway"}),
        ));
    }
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(name, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": name, "namespace": "meshfed-system"}})
        })
        .collect();
    kube.apply(
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "meshfed-gateway-x", "namespace": "meshfed-system",
                     "labels": {"kubernetes.io/service-name": "meshfed-gateway"}},
        "addressType": "IPv4",
        "ports": [{"name": "outbound", "port": 15001, "protocol": "TCP"}],
        "endpoints": endpoints}),
    );
    let tmp = tempfile::tempdir().unwrap();
    let two = two_clusters(
        backend,
        mirror_args(&kube, tmp.path(), "east.kubeconfig"),
        vec![],
        true,
    )
    .await;
    for slice in ["ratings-west-meshfed", "ratings-clusterset-meshfed"] {
        wait("both gateway pods in the mirror", &two.east, || {
            kube.get(Kind::EndpointSlice, "default", slice)
                .is_some_and(|s| addresses_of(&s) == ["10.0.0.7", "10.0.0.8"])
        });
    }
    // gw-b is being deleted; its slice entry still says ready.
    let mut deleting = pod("meshfed-system", "gw-b", json!({"app": "meshfed-gateway"}));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let marked = std::time::Instant::now();
    kube.apply(deleting);
    let one_pass = patient(Duration::from_secs(2));
    let deadline = marked + one_pass;
    loop {
        let gone = ["ratings-west-meshfed", "ratings-clusterset-meshfed"]
            .iter()
            .all(|s| {
                kube.get(Kind::EndpointSlice, "default", s)
                    .is_some_and(|s| addresses_of(&s) == ["10.0.0.7"])
            });
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the terminating pod is still in the mirrors after {one_pass:?}\n{}",
            two.east.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
