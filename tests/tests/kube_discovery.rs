//! Kubernetes discovery, end to end: a real `meshfed-gateway` binary with
//! `--kubeconfig` pointing at the **fake Kubernetes API server** of
//! `meshfed_tests::fake_kube` (an HTTP-level fake: no real API server can
//! run on this machine), real HTTP backends, real requests through the
//! outbound listener.
//!
//! Pinned: an endpoint added or removed through the watch changes routing;
//! an API-server restart mid-watch loses no change; a stale resourceVersion
//! (410 Gone) relists without dropping endpoints, with requests flowing the
//! whole time; pod labels select DestinationRule subsets. Mirror Services
//! and in-cluster ServiceExports, which need two clusters, are in
//! `kube_mirror.rs`.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshfed_tests::fake_kube::{FakeKube, Kind};
use meshfed_tests::federation::*;
use meshfed_tests::kube::*;
use serde_json::json;
use tempfile::TempDir;

/// One cluster, `west`, whose gateway discovers through the fake API
/// server; `ratings.default` is exported. `extra_policy` is appended.
async fn west_with_kube(
    kube: &FakeKube,
    extra_policy: &str,
    extra_args: Vec<String>,
) -> (TempDir, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let pki = Pki::new(dir.path());
    let port = free_udp_port();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n---\n{extra_policy}",
            cluster_yaml("west", &[port])
        ),
    )
    .unwrap();
    let mut args = vec!["--kubeconfig".to_string(), kubeconfig.display().to_string()];
    args.extend(extra_args);
    let spec = GatewaySpec {
        cluster: "west".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("west", "gw-0"),
        policy_dir: policy,
        discovery: None,
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: args,
    };
    let gw = tokio::task::spawn_blocking(move || GatewayProcess::start(&spec))
        .await
        .unwrap();
    (dir, gw)
}

const RATINGS: &str = "ratings.default.svc.cluster.local:9080";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_through_the_watch_change_routing() {
    let (r1, _t1) = http_backend("r1").await;
    let (r2, _t2) = http_backend("r2").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    let (_dir, gw) = west_with_kube(&kube, "", vec![]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;

    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        r2,
        true,
        "ratings-2",
    ));
    wait_served(gw.outbound, RATINGS, &["r1", "r2"], &gw).await;

    // Not ready any more: out of rotation; then the slice goes away.
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        false,
        "ratings-1",
    ));
    wait_served(gw.outbound, RATINGS, &["r2"], &gw).await;
    kube.delete(Kind::EndpointSlice, "default", "ratings-a");
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    wait_served(gw.outbound, RATINGS, &["r1", "r2"], &gw).await;
    kube.delete(Kind::EndpointSlice, "default", "ratings-b");
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_mid_watch_loses_no_change() {
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
    let (_dir, gw) = west_with_kube(&kube, "", vec![]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let watches_before = kube.watches(Kind::EndpointSlice);

    // The API server goes away mid-watch; the last known endpoints serve.
    kube.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    // Changes made while the gateway cannot see them...
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        r2,
        true,
        "ratings-2",
    ));
    kube.delete(Kind::EndpointSlice, "default", "ratings-a");
    // ...arrive once it is back on the same port.
    kube.start_again().await;
    wait_served(gw.outbound, RATINGS, &["r2"], &gw).await;
    assert!(
        kube.watches(Kind::EndpointSlice) > watches_before,
        "the gateway re-watched"
    );
    // And the watch goes on after the restart.
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    wait_served(gw.outbound, RATINGS, &["r1", "r2"], &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_stale_resource_version_relists_without_dropping_endpoints() {
    let (r1, _t1) = http_backend("r1").await;
    let (r2, _t2) = http_backend("r2").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    let (_dir, gw) = west_with_kube(&kube, "", vec![]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;

    // Requests flow the whole time, one every 10 ms; none may fail.
    let load = SteadyCalls::start(gw.outbound, RATINGS);
    let lists_before = kube.lists(Kind::EndpointSlice);
    // Lists take a second: the relist window is wide. Every watch gets
    // 410 Gone and history is compacted, so resuming is refused too.
    kube.set_list_delay(Duration::from_secs(1));
    kube.expire_watches();
    // A change that only a relist can deliver (no watch is open for it).
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        r2,
        true,
        "ratings-2",
    ));
    wait_served(gw.outbound, RATINGS, &["r1", "r2"], &gw).await;
    assert!(
        kube.lists(Kind::EndpointSlice) > lists_before,
        "the gateway relisted after 410 Gone"
    );
    // Once more, removing an endpoint this time.
    kube.expire_watches();
    kube.delete(Kind::EndpointSlice, "default", "ratings-a");
    wait_served(gw.outbound, RATINGS, &["r2"], &gw).await;
    let (ok, failed, errors) = load.finish().await;
    assert!(ok > 50, "only {ok} requests ran");
    assert_eq!(
        failed,
        0,
        "requests failed during relists: {errors:?}\n{}",
        gw.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_labels_select_destination_rule_subsets() {
    let (v1, _t1) = http_backend("v1").await;
    let (v2, _t2) = http_backend("v2").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(pod(
        "default",
        "ratings-1",
        json!({"app": "ratings", "version": "v1"}),
    ));
    kube.apply(pod(
        "default",
        "ratings-2",
        json!({"app": "ratings", "version": "v2"}),
    ));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        v1,
        true,
        "ratings-1",
    ));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-b",
        v2,
        true,
        "ratings-2",
    ));
    let policy = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings, namespace: default}\nspec:\n  host: ratings\n  subsets:\n  - {name: v2, labels: {version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: default}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings, subset: v2}\n";
    let (_dir, gw) = west_with_kube(&kube, policy, vec![]).await;
    wait_served(gw.outbound, RATINGS, &["v2"], &gw).await;
    // Relabel: the v2 pod becomes v1 and the v1 pod v2.
    kube.apply(pod(
        "default",
        "ratings-1",
        json!({"app": "ratings", "version": "v2"}),
    ));
    kube.apply(pod(
        "default",
        "ratings-2",
        json!({"app": "ratings", "version": "v1"}),
    ));
    wait_served(gw.outbound, RATINGS, &["v1"], &gw).await;
}

/// A backend that speaks only HTTP/2 with prior knowledge (h2c), as a gRPC
/// or h2c-only server does: an HTTP/1.1 request is a protocol error.
async fn h2c_backend(name: &'static str) -> std::net::SocketAddr {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(
                    move |_req: hyper::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("x-served-by", name)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A Service port whose `appProtocol` is `kubernetes.io/h2c` (or `grpc`,
/// `http2`) is called over HTTP/2, as Istio reads it, whatever the caller
/// speaks: an h2c-only backend behind it answers an HTTP/1.1 caller. Before,
/// `appProtocol` was never read and the gateway spoke HTTP/1.1 to it (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_port_with_app_protocol_h2c_is_called_over_http2() {
    let backend = h2c_backend("h2c-ratings").await;
    let kube = FakeKube::start().await;
    let mut svc = service("default", "ratings", 9080);
    svc["spec"]["ports"][0]["appProtocol"] = json!("kubernetes.io/h2c");
    kube.apply(svc);
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        backend,
        true,
        "ratings-1",
    ));
    let (_dir, gw) = west_with_kube(&kube, "", vec![]).await;
    wait_served(gw.outbound, RATINGS, &["h2c-ratings"], &gw).await;
}

/// The policy file of `west_with_kube`, rewritten with `from` replaced by
/// `to` (a commit; the gateway follows its policy directory).
fn commit(dir: &TempDir, from: &str, to: &str) {
    let path = dir.path().join("policy").join("p.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text.replace(from, to)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// Waits for `what` to hold, with a deadline.
async fn until(what: &str, gw: &GatewayProcess, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(15));
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within the deadline\n{}",
            gw.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the default `--kube-watch-scope policy`, as Istio's
/// `discoverySelectors`: only the namespaces the policy names are listed
/// and watched (the fake counts requests per namespace path), never every
/// namespace; a Service elsewhere is unknown. A commit that names a new
/// namespace starts its watches and its endpoints appear; one that no
/// longer names a namespace ends its watches and removes its endpoints,
/// while another namespace's service is served the whole time without a
/// single failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_namespaces_the_policy_names_are_watched_and_commits_add_and_drop_them() {
    let (r1, _t1) = http_backend("r1").await;
    let (c1, _t2) = http_backend("c1").await;
    let (s1, _t3) = http_backend("s1").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    kube.apply(service("shop", "cart", 9080));
    kube.apply(slice("shop", "cart", "cart-a", c1, true, "cart-1"));
    kube.apply(service("unnamed", "secret", 9080));
    kube.apply(slice("unnamed", "secret", "secret-a", s1, true, "secret-1"));
    // `stage` is named by a DestinationRule's host; `shop` not yet.
    let route = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: staged, namespace: default}\nspec:\n  host: ratings.stage.svc.cluster.local\n";
    let (dir, gw) = west_with_kube(&kube, route, vec![]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;

    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod] {
        assert!(
            kube.lists_in(kind, Some("default")) >= 1,
            "{kind:?} in default not listed"
        );
        assert!(
            kube.lists_in(kind, Some("stage")) >= 1,
            "{kind:?} in stage (a route's destination) not listed"
        );
        assert_eq!(
            kube.lists_in(kind, Some("unnamed")),
            0,
            "{kind:?} listed in a namespace the policy does not name"
        );
        assert_eq!(
            kube.lists_in(kind, Some("shop")),
            0,
            "{kind:?} listed in shop before it is named"
        );
        assert_eq!(
            kube.lists_in(kind, None),
            0,
            "{kind:?} listed in every namespace"
        );
    }
    let cart = "cart.shop.svc.cluster.local:9080";
    assert!(
        served_by(gw.outbound, cart).await.is_err(),
        "cart served before its namespace is named"
    );
    assert!(
        served_by(gw.outbound, "secret.unnamed.svc.cluster.local:9080")
            .await
            .is_err(),
        "a Service of an unnamed namespace is served"
    );

    // A commit exports cart.shop: shop's watches start, its endpoints appear.
    commit(
        &dir,
        "kind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n",
        "kind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: cart, namespace: shop}\n",
    );
    wait_served(gw.outbound, cart, &["c1"], &gw).await;
    assert!(kube.open_watches_in(Kind::EndpointSlice, Some("shop")) >= 1);
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;

    // Calls to cart flow, one every 10 ms, while default is dropped.
    let load = SteadyCalls::start(gw.outbound, cart);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A commit that names neither default nor stage any more.
    let text = std::fs::read_to_string(dir.path().join("policy").join("p.yaml")).unwrap();
    let kept: Vec<&str> = text
        .split("---\n")
        .filter(|doc| !doc.contains("namespace: default"))
        .collect();
    let tmp = dir.path().join("policy").join("p.tmp");
    std::fs::write(&tmp, kept.join("---\n")).unwrap();
    std::fs::rename(&tmp, dir.path().join("policy").join("p.yaml")).unwrap();
    until("default's and stage's watches end", &gw, || {
        [Kind::Service, Kind::EndpointSlice, Kind::Pod]
            .iter()
            .all(|k| {
                kube.open_watches_in(*k, Some("default")) == 0
                    && kube.open_watches_in(*k, Some("stage")) == 0
            })
    })
    .await;
    let deadline = tokio::time::Instant::now() + meshfed_tests::patient(Duration::from_secs(15));
    while served_by(gw.outbound, RATINGS).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ratings.default still served after its namespace was dropped\n{}",
            gw.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, errors) = load.finish().await;
    assert!(ok > 20, "only {ok} calls to cart ran");
    assert_eq!(
        failed,
        0,
        "calls to shop's service failed while default was dropped: {errors:?}\n{}",
        gw.log_tail()
    );
    assert!(kube.open_watches_in(Kind::Service, Some("shop")) >= 1);
}

/// `--kube-watch-scope all` watches every namespace, one watch per kind:
/// a Service in a namespace the policy never names is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_scope_all_watches_every_namespace() {
    let (r1, _t1) = http_backend("r1").await;
    let (s1, _t2) = http_backend("s1").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    kube.apply(service("unnamed", "secret", 9080));
    kube.apply(slice("unnamed", "secret", "secret-a", s1, true, "secret-1"));
    let (_dir, gw) =
        west_with_kube(&kube, "", vec!["--kube-watch-scope".into(), "all".into()]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    wait_served(
        gw.outbound,
        "secret.unnamed.svc.cluster.local:9080",
        &["s1"],
        &gw,
    )
    .await;
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod] {
        assert!(
            kube.lists_in(kind, None) >= 1,
            "{kind:?} not listed in every namespace"
        );
        assert_eq!(
            kube.lists_in(kind, Some("default")),
            0,
            "{kind:?} listed per namespace too"
        );
    }
}

/// A headless Service without ports (`clusterIP: None`, no `ports`, as a
/// StatefulSet's governing Service often is; its EndpointSlices list no
/// ports either): a caller reaches its pods on the port it asks for, as
/// through their DNS names in a real cluster. Before, such a Service had
/// no endpoints and every call failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_service_without_ports_is_reached_on_the_requested_port() {
    let (r1, _t1) = http_backend("r1").await;
    let (db, _t2) = http_backend("db-0").await;
    let kube = FakeKube::start().await;
    kube.apply(service("default", "ratings", 9080));
    kube.apply(slice(
        "default",
        "ratings",
        "ratings-a",
        r1,
        true,
        "ratings-1",
    ));
    kube.apply(json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"clusterIP": "None", "selector": {"app": "db"}}}));
    kube.apply(
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "db-x1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [db.ip().to_string()],
                       "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "db-0", "namespace": "default"}}]}),
    );
    let (_dir, gw) = west_with_kube(&kube, "", vec![]).await;
    wait_served(gw.outbound, RATINGS, &["r1"], &gw).await;
    let host = format!("db.default.svc.cluster.local:{}", db.port());
    wait_served(gw.outbound, &host, &["db-0"], &gw).await;
}

/// Calls to `host` through `via`, one every 10 ms, until [`Self::finish`].
struct SteadyCalls {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl SteadyCalls {
    fn start(via: std::net::SocketAddr, host: &str) -> Self {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (ok, failed, stop, host) =
                (ok.clone(), failed.clone(), stop.clone(), host.to_string());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match served_by(via, &host).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                errors
            })
        };
        SteadyCalls {
            ok,
            failed,
            stop,
            task,
        }
    }

    /// Stops the calls: (answered, failed, the failures' errors).
    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
