//! The mirror controller as a process of its own (`meshfed-gateway
//! mirror`), with a ServiceAccount of its own, beside a gateway that may
//! only read the cluster: real `meshfed-gateway` processes linked over QUIC
//! on loopback, and the **fake Kubernetes API server** of
//! `meshfed_tests::fake_kube` (an HTTP-level fake: no real API server can
//! run on this machine), which checks each client's bearer token as RBAC
//! would.
//!
//! Pinned (issue 22, item 10): the gateway's user cannot write anything,
//! and never tries; the controller makes, updates and deletes the mirrors
//! from the gateway's `/mirror/view` (read with the admin token); an update
//! keeps what other controllers set; while no gateway answers, the mirrors
//! stay as they are.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshfed_tests::fake_kube::{FakeKube, Kind};
use meshfed_tests::federation::*;
use meshfed_tests::{bin, patient};
use serde_json::{Value, json};

const GATEWAY_USER: &str = "system:serviceaccount:meshfed-system:meshfed-gateway";
const MIRROR_USER: &str = "system:serviceaccount:meshfed-system:meshfed-mirror";
const ADMIN_TOKEN: &str = "admin-token-for-the-test";

/// A `meshfed-gateway mirror` process, killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
}

impl Controller {
    fn start(dir: &Path, kubeconfig: &Path, gateway_admin_port: u16) -> Self {
        let log = dir.join("mirror.log");
        let token = dir.join("mirror.admin-token");
        std::fs::write(&token, ADMIN_TOKEN).unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut cmd = Command::new(bin("meshfed-gateway"));
        cmd.args(["mirror", "--id", "mirror-0"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--mirror-services",
                "meshfed-gateway.meshfed-system",
                "--gateway-admin-port",
                &gateway_admin_port.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .arg("--gateway-admin-token-file")
            .arg(&token)
            .env("RUST_LOG", "info,meshfed_gateway=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHFED_") && key != "MESHFED_BIN_DIR" {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().expect("starting meshfed-gateway mirror");
        Controller { child, log, admin }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A metric's value from the controller's /metrics (0 if absent).
    fn metric(&self, line_start: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))
        else {
            return 0.0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: m\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The gateways' outbound Service, its one ready pod at 127.0.0.1 (where
/// the test's gateway serves its admin API).
fn gateway_service(kube: &FakeKube) {
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "meshfed-gateway", "namespace": "meshfed-system"},
        "spec": {"selector": {"app": "meshfed-gateway"},
                 "ports": [{"name": "outbound", "port": 15001}]}}));
    kube.apply(
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "meshfed-gateway-x", "namespace": "meshfed-system",
                     "labels": {"kubernetes.io/service-name": "meshfed-gateway"}},
        "addressType": "IPv4",
        "ports": [{"name": "outbound", "port": 15001, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}),
    );
}

fn mirror(kube: &FakeKube, name: &str) -> Option<Value> {
    kube.get(Kind::Service, "default", name)
}

fn eventually(what: &str, logs: &dyn Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + patient(Duration::from_secs(20));
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within the deadline\nlogs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// East (reading the fake API server with the read-only gateway user, its
/// admin API behind the admin token) and west (serving and exporting
/// `ratings.default` from a static file), linked; the mirror user's
/// kubeconfig for the controller.
struct Federation {
    dir: tempfile::TempDir,
    policy: PathBuf,
    ports: (u16, u16),
    mirror_kubeconfig: PathBuf,
    east: GatewayProcess,
    _west: GatewayProcess,
    _backend: tokio::task::JoinHandle<()>,
}

impl Federation {
    async fn start(kube: &FakeKube) -> Self {
        let (backend, backend_task) = http_backend("west-ratings").await;
        kube.grant("gateway-token", GATEWAY_USER, false);
        kube.grant("mirror-token", MIRROR_USER, true);
        gateway_service(kube);
        let dir = tempfile::tempdir().unwrap();
        let gw_kubeconfig = dir.path().join("gateway.kubeconfig");
        kube.write_kubeconfig_as(&gw_kubeconfig, "gateway-token");
        let mirror_kubeconfig = dir.path().join("mirror.kubeconfig");
        kube.write_kubeconfig_as(&mirror_kubeconfig, "mirror-token");
        let pki = Pki::new(dir.path());
        let ports = (free_udp_port(), free_udp_port());
        let policy = dir.path().join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        write_policy(&policy, ports, true);
        let eps = dir.path().join("west.yaml");
        discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
        let spec =
            |cluster: &str, port: u16, discovery: Option<PathBuf>, extra_args: Vec<String>| {
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
        let west_spec = spec("west", ports.1, Some(eps), vec![]);
        let east_spec = spec(
            "east",
            ports.0,
            None,
            vec!["--kubeconfig".into(), gw_kubeconfig.display().to_string()],
        );
        let launch = Launch {
            admin_token: Some(ADMIN_TOKEN.into()),
            ..Default::default()
        };
        let (east, west) = tokio::task::spawn_blocking(move || {
            let west = GatewayProcess::start(&west_spec);
            let east = GatewayProcess::start_with(&east_spec, &launch);
            east.wait_links("west", 1);
            (east, west)
        })
        .await
        .unwrap();
        Federation {
            dir,
            policy,
            ports,
            mirror_kubeconfig,
            east,
            _west: west,
            _backend: backend_task,
        }
    }

    fn write_policy(&self, exported: bool) {
        write_policy(&self.policy, self.ports, exported);
    }
}

/// East and west, exporting `ratings.default` from west or not.
fn write_policy(policy: &Path, ports: (u16, u16), exported: bool) {
    let export = if exported {
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n"
    } else {
        ""
    };
    write_atomic(
        &policy.join("p.yaml"),
        &format!(
            "{}{}{export}",
            cluster_yaml("east", &[ports.0]),
            cluster_yaml("west", &[ports.1])
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_controller_writes_the_mirrors_and_the_gateway_cannot_write_at_all() {
    let kube = FakeKube::start().await;
    let f = Federation::start(&kube).await;
    let (dir, east) = (f.dir.path(), &f.east);
    let east_outbound = u64::from(east.outbound.port());

    let controller = Controller::start(dir, &f.mirror_kubeconfig, east.admin.port());
    let logs = || format!("{}\n--- gateway ---\n{}", controller.log(), east.log_tail());

    // Made by the controller, from the gateway's view: the mirror's port
    // targets the gateway's outbound listener, which only the view tells.
    eventually("the controller makes the mirrors", &logs, || {
        mirror(&kube, "ratings-west").is_some() && mirror(&kube, "ratings-clusterset").is_some()
    });
    let west = mirror(&kube, "ratings-west").unwrap();
    assert_eq!(west["spec"]["ports"][0]["port"], json!(80));
    assert_eq!(west["spec"]["ports"][0]["targetPort"], json!(east_outbound));
    let slice = kube
        .get(Kind::EndpointSlice, "default", "ratings-west-meshfed")
        .expect("the mirror's EndpointSlice");
    assert_eq!(slice["endpoints"][0]["addresses"][0], json!("127.0.0.1"));
    assert!(
        controller.metric("meshfed_mirror_leader ") == 1.0,
        "the controller holds the Lease"
    );

    // Another controller (or a person) adds to the mirror; then a local
    // Service named ratings gives the mirrors new ports, an update. What
    // was added survives the PUT.
    let mut edited = mirror(&kube, "ratings-west").unwrap();
    edited["metadata"]["labels"]["team"] = json!("payments");
    edited["metadata"]["annotations"]["example.com/owner"] = json!("ops");
    edited["metadata"]["finalizers"] = json!(["example.com/keep"]);
    edited["spec"]["sessionAffinity"] = json!("ClientIP");
    kube.apply(edited);
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 9080}]}}));
    eventually("the mirror takes the local Service's port", &logs, || {
        mirror(&kube, "ratings-west").is_some_and(|s| s["spec"]["ports"][0]["port"] == json!(9080))
    });
    let west = mirror(&kube, "ratings-west").unwrap();
    assert_eq!(
        west["metadata"]["labels"]["team"],
        json!("payments"),
        "{west:#}"
    );
    assert_eq!(
        west["metadata"]["annotations"]["example.com/owner"],
        json!("ops")
    );
    assert_eq!(west["metadata"]["finalizers"], json!(["example.com/keep"]));
    assert_eq!(west["spec"]["sessionAffinity"], json!("ClientIP"));

    // The export goes: the controller deletes the mirrors.
    f.write_policy(false);
    eventually("the controller deletes the mirrors", &logs, || {
        mirror(&kube, "ratings-west").is_none() && mirror(&kube, "ratings-clusterset").is_none()
    });

    // The gateway's user wrote nothing and was refused nothing: it never
    // tried (no in-process mirror, no Lease).
    assert_eq!(kube.forbidden_writes(GATEWAY_USER), 0, "{}", logs());
    assert!(
        !east.log_tail().contains("forbidden"),
        "{}",
        east.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_read_only_rights_that_mirrors_in_process_is_refused_with_a_clear_error() {
    // The shape the shipped RBAC forbids: --mirror-services on a gateway
    // whose ServiceAccount may only read. Nothing is written, and the log
    // names the rights and where they come from.
    let kube = FakeKube::start().await;
    kube.grant("gateway-token", GATEWAY_USER, false);
    gateway_service(&kube);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("gateway.kubeconfig");
    kube.write_kubeconfig_as(&kubeconfig, "gateway-token");
    let pki = Pki::new(dir.path());
    let port = free_udp_port();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    write_policy(&policy, (port, free_udp_port()), true);
    let spec = GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy,
        discovery: None,
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--mirror-services".into(),
            "meshfed-gateway.meshfed-system".into(),
        ],
    };
    let east = tokio::task::spawn_blocking(move || GatewayProcess::start(&spec))
        .await
        .unwrap();
    eventually("the Lease write is refused", &|| east.log_tail(), || {
        kube.forbidden_writes(GATEWAY_USER) > 0
    });
    eventually(
        "the refusal is logged with what to do",
        &|| east.log_tail(),
        || east.log_tail().contains("cannot reach the mirror Lease"),
    );
    assert!(kube.get(Kind::Service, "default", "ratings-west").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_no_gateway_answers_the_controller_leaves_the_mirrors_as_they_are() {
    let kube = FakeKube::start().await;
    let mut f = Federation::start(&kube).await;
    let controller = Controller::start(f.dir.path(), &f.mirror_kubeconfig, f.east.admin.port());
    eventually(
        "the controller makes the mirrors",
        &|| controller.log(),
        || mirror(&kube, "ratings-west").is_some(),
    );
    let writes = kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]);

    // The gateway dies; the controller keeps trying and writes nothing.
    f.east.kill();
    let failed = controller.metric("meshfed_mirror_view_reads_total{outcome=\"error\"}");
    eventually(
        "three failed reads of the view",
        &|| controller.log(),
        || controller.metric("meshfed_mirror_view_reads_total{outcome=\"error\"}") >= failed + 3.0,
    );
    assert!(
        mirror(&kube, "ratings-west").is_some(),
        "{}",
        controller.log()
    );
    assert!(mirror(&kube, "ratings-clusterset").is_some());
    assert_eq!(
        kube.client_writes_of(&[Kind::Service, Kind::EndpointSlice]),
        writes,
        "no write while no view is readable"
    );
    assert!(
        controller.log().contains("no gateway's view is readable"),
        "{}",
        controller.log()
    );
}
