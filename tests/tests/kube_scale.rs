//! Kubernetes discovery in a large cluster and through API outages: a real
//! `meshfed-gateway` binary against the **fake Kubernetes API server** of
//! `meshfed_tests::fake_kube` (an HTTP-level fake, paging lists as
//! kube-apiserver does: no real API server can run on this machine).
//!
//! Pinned: the health endpoint answers while the first list cannot
//! complete, and the gateway neither exits nor becomes ready until it does;
//! a gateway restarted while the API server is down serves the endpoint set
//! it persisted; 10,000 Pods and 2,000 Services (with their EndpointSlices,
//! as a real cluster's objects: annotations, managedFields) fit the shipped
//! 128 MiB limit, through a relist after `410 Gone`.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshfed_tests::cgroup::{GATEWAY_LIMIT, MemoryCgroup};
use meshfed_tests::fake_kube::{FakeKube, Kind};
use meshfed_tests::federation::*;
use meshfed_tests::kube::*;
use meshfed_tests::{bin, eventually};
use serde_json::{Value, json};
use tempfile::TempDir;

const RATINGS: &str = "ratings.default.svc.cluster.local:9080";

/// A policy directory for cluster `west` exporting `ratings.default`, and
/// the gateway's certificates, in `dir`.
fn west_files(dir: &Path) -> GatewaySpec {
    let pki = Pki::new(dir);
    let port = free_udp_port();
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("west", &[port])
        ),
    )
    .unwrap();
    GatewaySpec {
        cluster: "west".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("west", "gw-0"),
        policy_dir: policy,
        discovery: None,
        tunnel_port: port,
        work_dir: dir.to_path_buf(),
        extra_args: Vec::new(),
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// `GET path` on `addr`: the status code and body, or why not.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// Starts the gateway binary without waiting for it to be ready (the
/// harness's [`GatewayProcess`] waits for the ready file, which a gateway
/// waiting for its API server does not write).
fn spawn_unready(spec: &GatewaySpec, kubeconfig: &Path, admin: SocketAddr, log: &Path) -> Child {
    Command::new(bin("meshfed-gateway"))
        .args(["--cluster", &spec.cluster, "--gateway-id", &spec.id])
        .arg("--tls-dir")
        .arg(&spec.tls_dir)
        .args(["--tunnel-addr", &format!("127.0.0.1:{}", spec.tunnel_port)])
        .args(["--outbound-addr", "127.0.0.1:0"])
        .args(["--admin-addr", &admin.to_string()])
        .arg("--policy-dir")
        .arg(&spec.policy_dir)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--ready-file")
        .arg(spec.work_dir.join("unready.ready"))
        // An environment variable, not the (hidden) flag: a build without
        // it ignores the variable rather than refusing to start.
        .env("MESHFED_KUBE_SYNC_TIMEOUT", "1s")
        .env("RUST_LOG", "info,meshfed_gateway=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A real cluster's API server cannot be listed (down, or a network
/// policy in the way) while the gateway starts: its health endpoint
/// answers from the first moment, readiness says `starting`, and past the
/// first-list timeout (1 s here, 30 s by default) it keeps waiting rather
/// than exiting into a crash loop. Once the API server answers, it lists,
/// becomes ready and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_the_api_server_is_down_and_the_gateway_waits_for_it() {
    let (r1, _t1) = http_backend("r1").await;
    let mut kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    kube.stop();
    let spec = west_files(dir.path());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let log = dir.path().join("gw.log");
    let mut child = spawn_unready(&spec, &kubeconfig, admin, &log);
    let log_path = log.clone();

    let mut child = tokio::task::spawn_blocking(move || {
        eventually(
            "/healthz answers 200",
            Duration::from_secs(10),
            || match http_get(admin, "/healthz") {
                Ok((200, _)) => Ok(()),
                r => Err(format!("{r:?}")),
            },
        );
        // Past the first-list timeout: still running, healthy, not ready.
        eventually(
            "the gateway to warn that the first list has not completed",
            Duration::from_secs(15),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the gateway exited ({status}) while the API server was down:\n{text}");
                }
                if text.contains("first list from the API server has not completed") {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        );
        assert_eq!(http_get(admin, "/healthz").unwrap().0, 200);
        let (code, body) = http_get(admin, "/readyz").unwrap();
        assert_eq!((code, body.trim()), (503, "starting"));
        assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
        child
    })
    .await
    .unwrap();

    kube.start_again().await;
    let ready = tokio::task::spawn_blocking(move || {
        eventually(
            "/readyz answers 200",
            Duration::from_secs(20),
            || match http_get(admin, "/readyz") {
                Ok((200, _)) => Ok(()),
                r => Err(format!("{r:?}")),
            },
        );
        let ready: std::collections::BTreeMap<String, SocketAddr> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("unready.ready")).unwrap(),
        )
        .unwrap();
        (ready, dir)
    })
    .await
    .unwrap();
    let outbound = ready.0["outbound"];
    let mut ok = 0;
    for _ in 0..10 {
        if served_by(outbound, RATINGS).await.as_deref() == Ok("r1") {
            ok += 1;
        }
    }
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        ok, 10,
        "ratings not served once the API server answered:\n{text}"
    );
}

/// A gateway restarted (a new container: an OOM kill, a node drain onto a
/// node with the state volume, an upgrade) while the API server is
/// unreachable serves the endpoint set it persisted in its state
/// directory, and replaces it once the API server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_during_an_api_outage_serves_the_persisted_endpoints() {
    let (r1, _t1) = http_backend("r1").await;
    let (r2, _t2) = http_backend("r2").await;
    let mut kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut spec = west_files(dir.path());
    spec.extra_args = vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let start =
        |spec: GatewaySpec| tokio::task::spawn_blocking(move || GatewayProcess::start(&spec));
    let gw = start(spec.clone()).await.unwrap();
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let file = state.join("kube-endpoints.json");
    let f2 = file.clone();
    tokio::task::spawn_blocking(move || {
        eventually(
            "the endpoint set persisted",
            Duration::from_secs(10),
            || match std::fs::read_to_string(&f2) {
                Ok(t) if t.contains(&r1.to_string()) => Ok(()),
                r => Err(format!("{r:?}")),
            },
        )
    })
    .await
    .unwrap();

    // The API server goes down, then the gateway restarts.
    kube.stop();
    drop(gw);
    let gw = start(spec.clone()).await.unwrap();
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    assert!(
        gw.log_tail().contains("serving the endpoint set persisted"),
        "{}",
        gw.log_tail()
    );

    // A change made during the outage arrives once the API server is back.
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        r2,
        true,
        "ratings-2",
    ));
    kube.delete(Kind::EndpointSlice, "default", "ratings-a");
    kube.start_again().await;
    wait_served(gw.outbound, RATINGS, &["r2"], &gw).await;
}

/// A filler of `n` bytes, as managedFields and kubectl's last-applied
/// annotation weigh on a real object.
fn weight(n: usize) -> Value {
    json!([{"manager": "kube-controller-manager", "operation": "Update",
            "apiVersion": "v1", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": "x".repeat(n)}}}])
}

fn big_service(ns: &str, name: &str) -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"app": name, "team": "payments"},
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "y".repeat(900)},
                        "managedFields": weight(900)},
           "spec": {"selector": {"app": name}, "type": "ClusterIP", "sessionAffinity": "None",
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "internalTrafficPolicy": "Cluster",
                    "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
                              {"name": "grpc", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]},
           "status": {"loadBalancer": {}}})
}

fn big_pod(ns: &str, name: &str, app: &str, version: &str) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": ns, "generateName": format!("{app}-7d9f8b6c5-"),
                        "uid": format!("6f1c2a7e-0000-4000-8000-{:012}", name.len()),
                        "labels": {"app": app, "version": version, "pod-template-hash": "7d9f8b6c5",
                                   "security.istio.io/tlsMode": "istio"},
                        "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                                        "prometheus.io/scrape": "true", "prometheus.io/port": "15020"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                             "name": format!("{app}-7d9f8b6c5"), "uid": "5c0e2f9a-1111-4222-8333-444455556666",
                                             "controller": true, "blockOwnerDeletion": true}],
                        "managedFields": weight(1500)},
           "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1.2.3"}]}})
}

fn big_slice(ns: &str, svc: &str, pods: &[(String, String)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "nodeName": "node-17.compute.internal", "zone": "us-west1-a",
                   "hostname": pod,
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "hints": {"forZones": [{"name": "us-west1-a"}]},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": ns,
                                 "uid": "0c4f2a8e-6a37-4b7e-9d55-0d1c9b7b1f1a", "resourceVersion": "1234567"}})
        })
        .collect();
    json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
           "metadata": {"name": format!("{svc}-x7k2p"), "namespace": ns, "generateName": format!("{svc}-"),
                        "labels": {"kubernetes.io/service-name": svc,
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                   "app": svc},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc,
                                             "uid": "1b2c3d4e-5555-4666-8777-888899990000",
                                             "controller": true, "blockOwnerDeletion": true}],
                        "managedFields": weight(900)},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                     {"name": "grpc", "port": 9090, "protocol": "TCP"}],
           "endpoints": endpoints})
}

const NAMESPACES: usize = 20;
const SERVICES_PER_NS: usize = 100;
const PODS_PER_SERVICE: usize = 5;

/// A large cluster in the fake: `ratings.default` (backend `r1`) and
/// [`NAMESPACES`] namespaces `team-N` of [`SERVICES_PER_NS`] Services of
/// [`PODS_PER_SERVICE`] Pods each, with their EndpointSlices, every object
/// as heavy as a real cluster's. The numbers of Pods and Services.
fn populate(kube: &FakeKube, r1: SocketAddr) -> (usize, usize) {
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    for n in 0..NAMESPACES {
        let ns = format!("team-{n}");
        for s in 0..SERVICES_PER_NS {
            let svc = format!("svc-{s}");
            kube.apply(big_service(&ns, &svc));
            let mut pods = Vec::new();
            for p in 0..PODS_PER_SERVICE {
                let pod = format!("{svc}-7d9f8b6c5-{p:05}");
                let ip = format!("10.{}.{}.{}", 100 + n, s, p + 1);
                kube.apply(big_pod(
                    &ns,
                    &pod,
                    &svc,
                    if p % 2 == 0 { "v1" } else { "v2" },
                ));
                pods.push((pod, ip));
            }
            kube.apply(big_slice(&ns, &svc, &pods));
        }
    }
    let pods = kube.list(Kind::Pod).len();
    let services = kube.list(Kind::Service).len();
    assert!(
        pods >= 10_000 && services >= 2_000,
        "{pods} pods, {services} services"
    );
    (pods, services)
}

/// 10,000 Pods and 2,000 Services with their EndpointSlices, objects as
/// heavy as a real cluster's (labels, annotations, ownerReferences,
/// managedFields), all watched (`--kube-watch-scope all`, the most a
/// gateway holds): the gateway lists them (in pages of 500, as
/// kube-runtime asks and kube-apiserver answers), serves, relists all of
/// them after `410 Gone`, and stays well under the shipped 128 MiB limit,
/// never OOM-killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_ten_thousand_pods_and_two_thousand_services_fit_the_memory_limit_through_a_relist()
{
    let (r1, _t1) = http_backend("r1").await;
    let (r2, _t2) = http_backend("r2").await;
    let kube = FakeKube::start().await;
    let (pods, services) = populate(&kube, r1);

    let dir: TempDir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let mut spec = west_files(dir.path());
    spec.extra_args = vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--kube-watch-scope".into(),
        "all".into(),
    ];
    let cg = MemoryCgroup::require("kube-scale", GATEWAY_LIMIT);
    let launch = Launch {
        prefix: cg.prefix(),
        ..Default::default()
    };
    let gw = tokio::task::spawn_blocking(move || GatewayProcess::start_with(&spec, &launch))
        .await
        .unwrap();
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let synced_peak = cg.peak();
    eprintln!(
        "kube scale: peak {:.1} MiB after the first list",
        synced_peak as f64 / f64::from(1 << 20)
    );
    assert!(
        kube.largest_page(Kind::Pod) <= 500 && kube.pages(Kind::Pod) >= 20,
        "the gateway did not page its lists ({} pages, the largest {} pods)",
        kube.pages(Kind::Pod),
        kube.largest_page(Kind::Pod)
    );

    // Every watch gets 410 Gone: a relist of every kind, all pages again.
    let pages_before: Vec<u64> = [Kind::Service, Kind::EndpointSlice, Kind::Pod]
        .iter()
        .map(|k| kube.pages(*k))
        .collect();
    kube.expire_watches();
    // Only the relist can deliver this.
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        r2,
        true,
        "ratings-2",
    ));
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(30));
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert_eq!(
            cg.oom_kills(),
            0,
            "OOM-killed during the relist (peak {} MiB)",
            cg.peak() >> 20
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relist's change was not served: {seen:?}\n{}",
            gw.log_tail()
        );
        match served_by(gw.outbound, RATINGS).await {
            Ok(b) => {
                seen.insert(b);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let kube = std::sync::Arc::new(kube);
    let k2 = kube.clone();
    tokio::task::spawn_blocking(move || {
        eventually(
            "every kind relisted, every page",
            Duration::from_secs(60),
            || {
                let now: Vec<u64> = [Kind::Service, Kind::EndpointSlice, Kind::Pod]
                    .iter()
                    .map(|k| k2.pages(*k))
                    .collect();
                let wanted = [
                    (services / 500 + 1) as u64,
                    (services / 500 + 1) as u64,
                    (pods / 500) as u64,
                ];
                if now
                    .iter()
                    .zip(&pages_before)
                    .zip(wanted)
                    .all(|((n, b), w)| n - b >= w)
                {
                    Ok(())
                } else {
                    Err(format!("pages {now:?}, before {pages_before:?}"))
                }
            },
        )
    })
    .await
    .unwrap();
    // Served still, after the relist's last page.
    wait_served(gw.outbound, RATINGS, &["r1", "r2"], &gw).await;
    let peak = cg.peak();
    eprintln!(
        "kube scale: {pods} pods, {services} services: peak {:.1} MiB after the first list, {:.1} MiB through a relist (limit {} MiB)",
        synced_peak as f64 / f64::from(1 << 20),
        peak as f64 / f64::from(1 << 20),
        GATEWAY_LIMIT >> 20
    );
    assert_eq!(cg.oom_kills(), 0, "OOM-killed:\n{}", gw.log_tail());
    // A quarter of the limit to spare; before the slim caches the gateway
    // was OOM-killed here.
    assert!(
        peak < GATEWAY_LIMIT / 4 * 3,
        "peak {} MiB is not well under the {} MiB limit",
        peak >> 20,
        GATEWAY_LIMIT >> 20
    );
}

/// The same cluster with the default `--kube-watch-scope policy`, the
/// policy naming 2 of the 20 team namespaces (and `default`): the other 18
/// are never listed or watched, and the gateway holds a tenth of the
/// objects. The peaks are printed for docs/kubernetes.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_with_most_namespaces_unnamed_only_the_named_ones_are_listed() {
    let (r1, _t1) = http_backend("r1").await;
    let kube = FakeKube::start().await;
    let (pods, services) = populate(&kube, r1);
    let dir: TempDir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let mut spec = west_files(dir.path());
    let policy = spec.policy_dir.join("p.yaml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    for ns in ["team-0", "team-1"] {
        text.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: svc-0, namespace: {ns}}}\n"
        ));
    }
    std::fs::write(&policy, text).unwrap();
    spec.extra_args = vec!["--kubeconfig".into(), kubeconfig.display().to_string()];
    let cg = MemoryCgroup::require("kube-scale-scoped", GATEWAY_LIMIT);
    let launch = Launch {
        prefix: cg.prefix(),
        ..Default::default()
    };
    let gw = tokio::task::spawn_blocking(move || GatewayProcess::start_with(&spec, &launch))
        .await
        .unwrap();
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let synced_peak = cg.peak();
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod] {
        assert_eq!(
            kube.lists_in(kind, None),
            0,
            "{kind:?} listed in every namespace"
        );
        for ns in ["default", "team-0", "team-1"] {
            assert!(
                kube.lists_in(kind, Some(ns)) >= 1,
                "{kind:?} in {ns} not listed"
            );
        }
        for n in 2..NAMESPACES {
            let ns = format!("team-{n}");
            assert_eq!(kube.lists_in(kind, Some(&ns)), 0, "{kind:?} listed in {ns}");
        }
    }
    // Through a relist of the watched namespaces.
    kube.expire_watches();
    let k = std::sync::Arc::new(kube);
    let k2 = k.clone();
    tokio::task::spawn_blocking(move || {
        eventually(
            "the named namespaces relisted",
            Duration::from_secs(30),
            || {
                if k2.lists_in(Kind::Pod, Some("team-1")) >= 2 {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        )
    })
    .await
    .unwrap();
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let peak = cg.peak();
    eprintln!(
        "kube scale, policy scope (2 of {NAMESPACES} team namespaces named): {pods} pods, {services} services in the cluster: peak {:.1} MiB after the first list, {:.1} MiB through a relist",
        synced_peak as f64 / f64::from(1 << 20),
        peak as f64 / f64::from(1 << 20),
    );
    assert_eq!(cg.oom_kills(), 0, "OOM-killed:\n{}", gw.log_tail());
}
