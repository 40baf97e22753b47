// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use meshfed_policy::{Options, analyze};
use tokio::sync::Semaphore;

use super::*;
use crate::body;

const HOST: &str = "ratings.default.svc.cluster.local";

fn active(dr: &str) -> Active {
    let yaml = format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: east}}\nspec: {{gateways: ['e:1']}}\n---\n{dr}"
    );
    let a = analyze([("p.yaml", yaml.as_str())], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap()
}

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 7}}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1s, maxEjectionPercent: 100}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
";

fn ep(port: u16, version: &str) -> Endpoint {
    Endpoint {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        labels: BTreeMap::from([("version".to_string(), version.to_string())]),
        healthy: true,
    }
}

fn set(eps: Vec<Endpoint>) -> EndpointSet {
    EndpointSet::from([(HOST.to_string(), eps)])
}

fn dest<'a>(subset: Option<&'a str>, port: u16, sel: &'a BTreeMap<String, String>) -> Dest<'a> {
    Dest {
        service: HOST,
        subset,
        port,
        selector: sel,
    }
}

#[test]
fn subset_policy_replaces_the_top_level_part_it_sets_and_inherits_the_rest() {
    let a = active(DR);
    let none = BTreeMap::new();
    let top = Effective::resolve(&a, &dest(None, 80, &none));
    assert_eq!(top.lb, LbAlgorithm::RoundRobin);
    assert_eq!(top.limits.max_connections, Some(7));
    assert!(top.outlier.is_some());
    // v1 has no policy of its own: the top level.
    assert_eq!(
        Effective::resolve(&a, &dest(Some("v1"), 80, &none)).lb,
        LbAlgorithm::RoundRobin
    );
    // v2 overrides the balancer only; the pool and detection are inherited.
    let v2 = Effective::resolve(&a, &dest(Some("v2"), 80, &none));
    assert_eq!(v2.lb, LbAlgorithm::LeastRequest);
    assert_eq!(v2.limits.max_connections, Some(7));
    assert!(v2.outlier.is_some());
}

#[test]
fn port_level_settings_replace_every_part_with_defaults_for_the_rest() {
    let a = active(DR);
    let none = BTreeMap::new();
    let p = Effective::resolve(&a, &dest(None, 9080, &none));
    assert_eq!(p.lb, LbAlgorithm::Random);
    // Not inherited from the destination level (Istio's documented rule).
    assert_eq!(p.limits, Limits::default());
    assert_eq!(p.outlier, Some(OutlierConfig::FAILURE_ACCRUAL));
    // No DestinationRule at all: Istio's defaults.
    let other = Effective::resolve(
        &a,
        &Dest {
            service: "other.default.svc.cluster.local",
            ..dest(None, 80, &none)
        },
    );
    assert_eq!(other.lb, LbAlgorithm::LeastRequest);
    assert_eq!(other.outlier, Some(OutlierConfig::FAILURE_ACCRUAL));
    assert!(other.tls.is_none());
}

#[test]
fn round_robin_visits_endpoints_in_turn_evenly() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v1")]);
    let none = BTreeMap::new();
    let mut counts = BTreeMap::<u16, usize>::new();
    for _ in 0..300 {
        let p = u.choose(&a, &eps, &dest(None, 80, &none)).unwrap();
        *counts.entry(p.addr.port()).or_default() += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![100; 3]);
}

#[test]
fn random_reaches_every_endpoint() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v1")]);
    let none = BTreeMap::new();
    let mut counts = BTreeMap::<u16, usize>::new();
    for _ in 0..3000 {
        let p = u.choose(&a, &eps, &dest(None, 9080, &none)).unwrap();
        *counts.entry(p.addr.port()).or_default() += 1;
    }
    // Each expects 1000; 800 is over 7 standard deviations away.
    assert!(counts.values().all(|n| *n > 800), "{counts:?}");
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v2"), ep(2, "v2")]);
    let sel = BTreeMap::from([("version".to_string(), "v2".to_string())]);
    let only1 = set(vec![ep(1, "v2")]);
    // Keep 10 requests in flight on endpoint 1.
    let busy: Vec<Picked<'_>> = (0..10)
        .map(|_| u.choose(&a, &only1, &dest(Some("v2"), 80, &sel)).unwrap())
        .collect();
    for _ in 0..100 {
        let p = u.choose(&a, &eps, &dest(Some("v2"), 80, &sel)).unwrap();
        assert_eq!(p.addr.port(), 2);
    }
    drop(busy);
    let ports: BTreeSet<u16> = (0..100)
        .map(|_| {
            u.choose(&a, &eps, &dest(Some("v2"), 80, &sel))
                .unwrap()
                .addr
                .port()
        })
        .collect();
    assert_eq!(ports.len(), 2, "idle endpoints share the load");
}

#[test]
fn subset_labels_select_endpoints() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v2")]);
    let sel = BTreeMap::from([("version".to_string(), "v2".to_string())]);
    for _ in 0..20 {
        let p = u.choose(&a, &eps, &dest(Some("v2"), 80, &sel)).unwrap();
        assert_eq!(p.addr.port(), 2);
    }
    let none = set(vec![ep(1, "v1")]);
    assert!(u.choose(&a, &none, &dest(Some("v2"), 80, &sel)).is_none());
}

#[test]
fn a_retry_passes_over_endpoints_that_failed_while_another_is_left() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v1")]);
    let all = BTreeMap::new();
    let bad = [
        SocketAddr::from(([127, 0, 0, 1], 1)),
        SocketAddr::from(([127, 0, 0, 1], 2)),
    ];
    for _ in 0..50 {
        let p = u
            .choose_avoiding(&a, &eps, &dest(None, 80, &all), &bad)
            .unwrap();
        assert_eq!(p.addr.port(), 3);
    }
    // With every endpoint failed, any may be tried again.
    let all_bad = [bad[0], bad[1], SocketAddr::from(([127, 0, 0, 1], 3))];
    assert!(
        u.choose_avoiding(&a, &eps, &dest(None, 80, &all), &all_bad)
            .is_some()
    );
}

#[test]
fn unused_clusters_and_counters_are_swept_and_unknown_subsets_share_the_services_cluster() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v2")]);
    let all = BTreeMap::new();
    // A peer naming subsets this snapshot does not define gets the
    // service's own cluster, not one per name.
    for i in 0..100 {
        let name = format!("made-up-{i}");
        drop(u.choose(&a, &eps, &dest(Some(&name), 9080, &all)).unwrap());
    }
    // A defined subset has its own; so has a port with settings of its own
    // (9080); every other port shares one.
    let v1 = BTreeMap::from([("version".to_string(), "v1".to_string())]);
    let held = u.choose(&a, &eps, &dest(Some("v1"), 9080, &v1)).unwrap();
    for port in 1..=50 {
        drop(u.choose(&a, &eps, &dest(None, port, &all)).unwrap());
    }
    let now = u.now_ms();
    // Counters nobody holds go at once (the held request keeps its own);
    // clusters stay while recently used.
    assert_eq!(u.prune(now), (1, 3));
    let later = now + CLUSTER_IDLE.as_millis() as u64;
    assert_eq!(u.prune(later), (1, 1), "only the cluster in use stays");
    drop(held);
    assert_eq!(u.prune(later), (0, 0));
    // A swept cluster comes back on demand.
    assert_eq!(
        u.choose(&a, &eps, &dest(Some("v1"), 9080, &v1))
            .unwrap()
            .addr
            .port(),
        1
    );
}

/// The port is the caller's to choose (`Host: ratings:1234`) or a peer's
/// (its OPEN frame): 1,000 ports make no more clusters, pools and
/// endpoint connections than the snapshot declares ports for.
#[test]
fn caller_chosen_ports_share_the_services_cluster_unless_declared() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = set(vec![ep(1, "v1"), ep(2, "v2")]);
    let all = BTreeMap::new();
    for port in (1..=1000u16).chain([9080]) {
        drop(u.choose(&a, &eps, &dest(None, port, &all)).unwrap());
    }
    let clusters = u.clusters.lock().unwrap();
    let ports: Vec<u16> = clusters[HOST].iter().map(|c| c.port).collect();
    // 9080 has portLevelSettings: its own cluster, with its policy.
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(ports.contains(&0) && ports.contains(&9080), "{ports:?}");
    drop(clusters);
    let p = u.choose(&a, &eps, &dest(None, 9080, &all)).unwrap();
    assert_eq!(p.policy.lb, LbAlgorithm::Random);
    let p = u.choose(&a, &eps, &dest(None, 1234, &all)).unwrap();
    assert_eq!(p.policy.lb, LbAlgorithm::RoundRobin);
}

#[test]
fn an_ejected_endpoint_leaves_the_balancer_and_the_announcement() {
    let a = active(DR);
    let u = Upstream::new();
    let eps = Arc::new(set(vec![ep(1, "v1"), ep(2, "v1")]));
    let none = BTreeMap::new();
    let d = dest(None, 80, &none);
    let bad = SocketAddr::from(([127, 0, 0, 1], 1));
    let p = u.choose(&a, &eps, &d).unwrap();
    let cluster = p.cluster.clone();
    let policy = p.policy;
    drop(p);
    for _ in 0..2 {
        u.record(&cluster, &policy, HOST, bad, Outcome::Status(500), 2);
    }
    assert!(u.is_ejected(HOST, &bad));
    for _ in 0..20 {
        assert_eq!(u.choose(&a, &eps, &d).unwrap().addr.port(), 2);
    }
    assert_eq!(u.healthy_count(&eps, HOST, &none), 1);
    let masked = u.mask_ejected(eps.clone());
    assert!(!masked[HOST][0].healthy && masked[HOST][1].healthy);
    assert_eq!(u.ejections().len(), 1);
    assert_eq!(
        u.metrics
            .ejections
            .get_or_create(&EjectionLabels {
                service: HOST.into(),
                reason: "consecutive_5xx"
            })
            .get(),
        1
    );
}

/// A backend that holds every request until `release` gives it a permit,
/// then answers with the port the connection came from.
async fn holding_backend(release: Arc<Semaphore>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                continue;
            };
            let release = release.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let release = release.clone();
                    async move {
                        release.acquire().await.unwrap().forget();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            peer.port().to_string(),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn get() -> Request<ProxyBody> {
    Request::get("/")
        .header("host", "ratings")
        .body(body::empty())
        .unwrap()
}

#[tokio::test]
async fn pool_overflow_fails_fast_and_pending_requests_wait_for_the_connection() {
    let release = Arc::new(Semaphore::new(0));
    let backend = holding_backend(release.clone()).await;
    let a = active(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
",
    );
    let u = Arc::new(Upstream::new());
    let eps = set(vec![Endpoint {
        addr: backend,
        labels: BTreeMap::new(),
        healthy: true,
    }]);
    let none = BTreeMap::new();
    let d = dest(None, 80, &none);
    // The first holds the only connection, the second waits for it.
    let send = |u: Arc<Upstream>| {
        let (a, eps) = (active_clone(&a), eps.clone());
        tokio::spawn(async move {
            let none = BTreeMap::new();
            let p = u.choose(&a, &eps, &dest(None, 80, &none)).unwrap();
            let r = u.send(p, get(), false).await.map_err(|e| e.to_string())?;
            Ok::<u16, String>(r.status().as_u16())
        })
    };
    let first = send(u.clone());
    wait_until(|| u.pool_stats(HOST).1 == 1).await;
    let second = send(u.clone());
    wait_until(|| u.pool_stats(HOST).2 == 1).await;
    // The third overflows at once.
    let p = u.choose(&a, &eps, &d).unwrap();
    let started = Instant::now();
    let err = u.send(p, get(), false).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(
            err,
            UpstreamError::Overflow {
                limit: Limit::Http1MaxPendingRequests,
                ..
            }
        ),
        "{err}"
    );
    let r = err.response(false);
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()[OVERFLOW_HEADER], "http1MaxPendingRequests");
    assert_eq!(r.headers()["x-envoy-overloaded"], "true");
    // Released, both held requests complete over the one connection.
    release.add_permits(2);
    assert_eq!(first.await.unwrap(), Ok(200));
    assert_eq!(second.await.unwrap(), Ok(200));
    assert_eq!(u.pool_stats(HOST).1, 1, "one connection served both");
}

#[tokio::test]
async fn max_requests_per_connection_opens_a_new_connection_after_n_requests() {
    let release = Arc::new(Semaphore::new(1000));
    let backend = holding_backend(release).await;
    let a = active(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 2}}
",
    );
    let u = Upstream::new();
    let eps = set(vec![Endpoint {
        addr: backend,
        labels: BTreeMap::new(),
        healthy: true,
    }]);
    let none = BTreeMap::new();
    let mut client_ports = Vec::new();
    for _ in 0..4 {
        let p = u.choose(&a, &eps, &dest(None, 80, &none)).unwrap();
        let r = u.send(p, get(), false).await.unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        client_ports.push(String::from_utf8(b.to_vec()).unwrap());
    }
    // Two requests per connection, then a new one.
    assert_eq!(client_ports[0], client_ports[1], "{client_ports:?}");
    assert_eq!(client_ports[2], client_ports[3], "{client_ports:?}");
    assert_ne!(client_ports[1], client_ports[2], "{client_ports:?}");
    // Retired connections close: at most the current one stays open.
    wait_until(|| u.pool_stats(HOST).1 <= 1).await;
}

fn active_clone(a: &Active) -> Active {
    Active::new(a.snapshot.clone()).unwrap()
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The endpoint's protocol from the local Service's port, as Istio reads
/// it: `appProtocol` first, then the port name's prefix; HTTP/1.1 when
/// neither says HTTP/2 (and always HTTP/2 for gRPC).
#[test]
fn a_local_service_port_says_http2_by_app_protocol_or_name() {
    use crate::wire::announce::{ServicePort, ServicePorts};
    let a = active("");
    let port = |port: u16, name: &str, app: Option<&str>| ServicePort {
        port,
        name: name.into(),
        protocol: "TCP".into(),
        app_protocol: app.map(str::to_string),
    };
    let mut local = ServicePorts::new();
    local.insert(
        HOST.into(),
        vec![
            port(1, "http", Some("kubernetes.io/h2c")),
            port(2, "web", Some("grpc")),
            port(3, "http2-api", None),
            port(4, "grpc-web", None),
            port(5, "http", None),
            port(6, "api", Some("http")),
            port(7, "", Some("HTTP2")),
        ],
    );
    let h2 = |p: u16| speaks_h2(&a, &local, HOST, p, false);
    assert_eq!(
        (1..=7).map(h2).collect::<Vec<_>>(),
        [true, true, true, true, false, false, true]
    );
    // A port the Service does not declare, another service: HTTP/1.1.
    assert!(!h2(9));
    assert!(!speaks_h2(
        &a,
        &local,
        "reviews.default.svc.cluster.local",
        1,
        false
    ));
    // gRPC callers always get HTTP/2.
    assert!(speaks_h2(&a, &local, HOST, 5, true));
}
