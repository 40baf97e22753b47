//! The traffic-policy acceptance scenarios, through real gateways and real
//! backends: the seed guide's mobile and canary routing, a 70/30 split
//! across clusters, cluster failover under load with zero failed requests,
//! mirroring, header manipulation and weighted TCP routes.
//!
//! Splits are measured over 10,000 requests each and must hold within ±2
//! points. The tests that generate load are in nextest's `serial` group
//! (their names start with `serial_`).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadReport, LoadSpec, Protocol};
use meshfed_tests::{assert_eventually, bin, patient};

const SAMPLE: u32 = 10_000;

/// Sends [`SAMPLE`] requests to `authority` through `via` (open loop, 2,000
/// per second), tallying `x-served-by`.
async fn sample(via: SocketAddr, authority: &str, headers: &[(&str, &str)]) -> LoadReport {
    let mut spec = LoadSpec::new(via, authority, Protocol::Http1);
    spec.rate = 2_000;
    spec.duration = Duration::from_millis(u64::from(SAMPLE) * 1000 / 2_000);
    spec.connections = 16;
    spec.timeout = Duration::from_secs(5);
    spec.headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spec.tally_header = Some("x-served-by".into());
    let report = load::run(spec).await;
    eprintln!("{report}");
    assert_eq!(report.failed, 0, "{report}");
    report
}

/// The share of `name` in a report, in percent.
fn share(report: &LoadReport, name: &str) -> f64 {
    let n = report.responses_by_header.get(name).copied().unwrap_or(0);
    100.0 * n as f64 / report.ok.max(1) as f64
}

fn assert_share(report: &LoadReport, name: &str, expected: f64) {
    let got = share(report, name);
    assert!(
        (got - expected).abs() <= 2.0,
        "{name}: {got:.2}% of {} requests, expected {expected}% ± 2: {:?}",
        report.ok,
        report.responses_by_header
    );
}

/// Waits until the gateway runs a snapshot other than `version`; returns
/// the new one.
fn wait_new_config(gw: &GatewayProcess, version: &str) -> String {
    let mut now = String::new();
    assert_eventually(
        "the gateway applies the edit",
        patient(Duration::from_secs(10)),
        || {
            now = config_version(gw);
            !now.is_empty() && now != version
        },
    );
    now
}

fn config_version(gw: &GatewayProcess) -> String {
    let dump: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default();
    dump["applied_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The one gateway of cluster `east` in a single-cluster test: policy from
/// `policy`, static discovery from `eps`.
fn east_gateway(
    dir: &tempfile::TempDir,
    pki: &Pki,
    policy: PathBuf,
    eps: PathBuf,
    extra_args: Vec<String>,
) -> GatewayProcess {
    GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy,
        discovery: Some(eps),
        tunnel_port: free_udp_port(),
        work_dir: dir.path().to_path_buf(),
        extra_args,
    })
}

/// One cluster, `east`, with reviews v1 and v2 and the seed's policy.
const SEED_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn seed_vs(canary: u32, internal: bool) -> String {
    let internal_rule = if internal {
        "  - match: [{headers: {user-type: {exact: internal}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n"
    } else {
        ""
    };
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{user-agent: {{regex: '.*(Android|iPhone|Mobile).*'}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
{internal_rule}  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {canary}}}
",
        100 - canary
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_the_seed_scenario_mobile_to_v2_then_80_20_then_95_5_with_internal_users_on_v2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(policy.join("dr.yaml"), SEED_DR).unwrap();
    std::fs::write(policy.join("vs.yaml"), seed_vs(20, false)).unwrap();
    let (v1, _t1) = http_backend("v1").await;
    let (v2, _t2) = http_backend("v2").await;
    let eps = dir.path().join("eps.yaml");
    discovery_file(
        &eps,
        &[(
            "reviews.default",
            vec![(v1, vec![("version", "v1")]), (v2, vec![("version", "v2")])],
        )],
    );
    let gw = east_gateway(&dir, &pki, policy.clone(), eps, vec![]);
    let mobile = [(
        "user-agent",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Mobile/15E148",
    )];
    let r = sample(gw.outbound, "reviews", &mobile).await;
    assert_share(&r, "v2", 100.0);
    let r = sample(gw.outbound, "reviews", &[]).await;
    assert_share(&r, "v1", 80.0);
    assert_share(&r, "v2", 20.0);

    let before = config_version(&gw);
    write_atomic(&policy.join("vs.yaml"), &seed_vs(5, true));
    wait_new_config(&gw, &before);
    let r = sample(gw.outbound, "reviews", &[]).await;
    assert_share(&r, "v1", 95.0);
    assert_share(&r, "v2", 5.0);
    let r = sample(gw.outbound, "reviews", &[("user-type", "internal")]).await;
    assert_share(&r, "v2", 100.0);
    let r = sample(gw.outbound, "reviews", &mobile).await;
    assert_share(&r, "v2", 100.0);
}

/// A `meshfed-backend` process on a fixed port, so that it can be killed and
/// brought back where it was.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    fn start(name: &str, listen: SocketAddr) -> Self {
        let mut child = Command::new(bin("meshfed-backend"))
            .args(["--listen", &listen.to_string(), "--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().parse().unwrap();
        Backend { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

struct TwoClusters {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    east: GatewayProcess,
    _west: GatewayProcess,
    east_backend: Backend,
    west_backends: Vec<Backend>,
}

const SPLIT_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  subsets:
  - {name: east, labels: {topology.istio.io/cluster: east}}
  - {name: west, labels: {topology.istio.io/cluster: west}}
";

fn split_vs(east: u32, retries: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: east}}, weight: {east}}}
    - {{destination: {{host: ratings, subset: west}}, weight: {}}}
{retries}",
        100 - east
    )
}

/// ratings in east (one backend) and in west (two backends), exported from
/// both, routed by `vs`.
async fn two_clusters_with(vs: &str) -> TwoClusters {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("clusters.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap();
    std::fs::write(policy.join("dr.yaml"), SPLIT_DR).unwrap();
    std::fs::write(policy.join("vs.yaml"), vs).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let east_backend = Backend::start("east", any);
    let west_backends = vec![Backend::start("west", any), Backend::start("west", any)];
    let east_eps = dir.path().join("east.yaml");
    let west_eps = dir.path().join("west.yaml");
    discovery_file(
        &east_eps,
        &[("ratings.default", vec![(east_backend.addr, vec![])])],
    );
    discovery_file(
        &west_eps,
        &[(
            "ratings.default",
            west_backends.iter().map(|b| (b.addr, vec![])).collect(),
        )],
    );
    let spec = |cluster: &str, port: u16, eps: &Path| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery: Some(eps.to_path_buf()),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    };
    let west = GatewayProcess::start(&spec("west", west_port, &west_eps));
    let east = GatewayProcess::start(&spec("east", east_port, &east_eps));
    east.wait_links("west", 1);
    TwoClusters {
        _dir: dir,
        policy,
        east,
        _west: west,
        east_backend,
        west_backends,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_a_70_30_split_across_clusters_holds_within_2_percent() {
    let s = two_clusters_with(&split_vs(70, "")).await;
    let r = sample(s.east.outbound, "ratings", &[]).await;
    assert_share(&r, "east", 70.0);
    assert_share(&r, "west", 30.0);
    // The split is counted by destination cluster in the source's metrics.
    assert!(
        s.east.metric(
            "meshfed_requests_total",
            &["destination_cluster=\"west\"", "response_code=\"200\""]
        ) > 2_000.0
    );
    let _ = &s.east_backend;
    let _ = &s.policy;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_killing_every_west_endpoint_fails_over_to_east_without_a_failed_request() {
    let retries = "    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'connect-failure,refused-stream,unavailable,reset,503'}\n";
    let mut s = two_clusters_with(&split_vs(50, retries)).await;
    let mut spec = LoadSpec::new(s.east.outbound, "ratings", Protocol::Http1);
    spec.rate = 400;
    spec.duration = Duration::from_secs(8);
    spec.connections = 16;
    spec.timeout = Duration::from_secs(5);
    spec.tally_header = Some("x-served-by".into());
    // Tally who served each request after the kill, in the load's own
    // clock, by sampling with a second, small probe.
    let load = tokio::spawn(load::run(spec));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let west_addrs: Vec<SocketAddr> = s.west_backends.iter().map(|b| b.addr).collect();
    for b in &mut s.west_backends {
        b.kill();
    }
    let killed = Instant::now();
    // Within a second, calls stop reaching west: a probe of 50 sequential
    // calls that starts 1 s after the kill is served by east only.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let probe = served_by(s.east.outbound, "ratings", 50).await;
    assert_eq!(
        probe.get("east").copied(),
        Some(50),
        "1 s after the kill, every call goes to east: {probe:?} ({:?} since the kill)",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // West comes back on the same ports.
    s.west_backends = west_addrs
        .iter()
        .map(|a| Backend::start("west", *a))
        .collect();
    let report = load.await.unwrap();
    eprintln!("{report}");
    let diagnostics: Vec<String> = s
        .east
        .admin_get("/metrics")
        .lines()
        .filter(|l| l.starts_with("meshfed_retries") || l.starts_with("meshfed_refusals"))
        .map(str::to_string)
        .chain(
            std::fs::read_to_string(&s.east.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("not retried") || l.contains("WARN"))
                .map(str::to_string),
        )
        .collect();
    assert_eq!(
        report.failed,
        0,
        "no call failed across the failover: {report}\n{}",
        diagnostics.join("\n")
    );
    // Once west is back, the split is restored.
    let mut restored = BTreeMap::new();
    assert_eventually(
        "the 50/50 split returns once west's endpoints are back",
        patient(Duration::from_secs(10)),
        || {
            restored = futures_block(served_by(s.east.outbound, "ratings", 200));
            let west = restored.get("west").copied().unwrap_or(0);
            (70..=130).contains(&west)
        },
    );
    let _ = &s.policy;
}

/// Runs a future to completion from a synchronous closure inside a
/// multi-thread runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// `n` sequential GETs; who served them.
async fn served_by(via: SocketAddr, authority: &str, n: usize) -> BTreeMap<String, usize> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let req = hyper::Request::get(format!("http://{via}/"))
            .header("host", authority)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .unwrap()
            .unwrap();
        let who = resp
            .headers()
            .get("x-served-by")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| format!("status {}", resp.status()));
        let _ = resp.into_body().collect().await;
        *out.entry(who).or_insert(0) += 1;
    }
    out
}

/// A backend that records the requests it sees: (host, path, headers).
type Seen = Arc<Mutex<Vec<(String, String, http::HeaderMap)>>>;

async fn recording_backend(name: &'static str) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let (addr, task) = serve_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let s = s.clone();
        async move {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            s.lock().unwrap().push((
                host,
                req.uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                req.headers().clone(),
            ));
            Response::builder()
                .header("x-served-by", name)
                .header("x-internal-detail", "secret")
                .body(Full::new(Bytes::from(name)))
                .unwrap()
        }
    })
    .await;
    std::mem::forget(task);
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_mirroring_copies_its_percentage_and_the_caller_sees_only_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("vs.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    mirror: {host: reviews-shadow}
    mirrorPercentage: {value: 25}
",
    )
    .unwrap();
    let (primary, primary_seen) = recording_backend("primary").await;
    let (mirror, mirror_seen) = recording_backend("mirror").await;
    let eps = dir.path().join("eps.yaml");
    discovery_file(
        &eps,
        &[
            ("reviews.default", vec![(primary, vec![])]),
            ("reviews-shadow.default", vec![(mirror, vec![])]),
        ],
    );
    let gw = east_gateway(&dir, &pki, policy, eps, vec![]);
    let r = sample(gw.outbound, "reviews", &[]).await;
    // The caller only ever sees the primary.
    assert_share(&r, "primary", 100.0);
    assert_eq!(primary_seen.lock().unwrap().len() as u64, r.ok);
    // The mirror receives its share of copies, marked as shadows.
    assert_eventually(
        "mirrored copies have all arrived",
        patient(Duration::from_secs(5)),
        || {
            gw.metric("meshfed_mirrored_requests_total", &["reason=\"sent\""])
                == mirror_seen.lock().unwrap().len() as f64
        },
    );
    let copies = mirror_seen.lock().unwrap();
    let pct = 100.0 * copies.len() as f64 / r.ok as f64;
    assert!((pct - 25.0).abs() <= 2.0, "mirrored {pct:.2}% of requests");
    assert!(
        copies.iter().all(|(host, _, _)| host == "reviews-shadow"),
        "copies carry the -shadow authority: {:?}",
        copies.first().map(|c| &c.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_manipulation_and_rewrite_apply_to_requests_and_responses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("vs.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/}
    headers:
      request:
        set: {x-route: v1-api}
        remove: [x-debug]
      response:
        remove: [x-internal-detail]
        add: {x-via: meshfed}
    route:
    - destination: {host: reviews}
      headers:
        request: {add: {x-destination: reviews}}
",
    )
    .unwrap();
    let (backend, seen) = recording_backend("reviews").await;
    let eps = dir.path().join("eps.yaml");
    discovery_file(&eps, &[("reviews.default", vec![(backend, vec![])])]);
    let gw = east_gateway(&dir, &pki, policy, eps, vec![]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = hyper::Request::get(format!("http://{}/v1/items?page=2", gw.outbound))
        .header("host", "reviews")
        .header("x-route", "from-client")
        .header("x-debug", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-via"], "meshfed");
    assert!(!resp.headers().contains_key("x-internal-detail"));
    let seen = seen.lock().unwrap();
    let (_, path, headers) = &seen[0];
    assert_eq!(path, "/api/items?page=2");
    assert_eq!(headers["x-route"], "v1-api");
    assert_eq!(headers["x-destination"], "reviews");
    assert!(!headers.contains_key("x-debug"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_split_connections_by_weight_on_their_port() {
    // Two TCP backends that name themselves on accept.
    async fn namer(name: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(name.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db
  subsets:
  - {name: a, labels: {pool: a}}
  - {name: b, labels: {pool: b}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: db, subset: a}, weight: 75}
    - {destination: {host: db, subset: b}, weight: 25}
",
    )
    .unwrap();
    let (a, b) = (namer("a").await, namer("b").await);
    let eps = dir.path().join("eps.yaml");
    discovery_file(
        &eps,
        &[(
            "db.default",
            vec![(a, vec![("pool", "a")]), (b, vec![("pool", "b")])],
        )],
    );
    let gw = east_gateway(
        &dir,
        &pki,
        policy,
        eps,
        vec!["--tcp-port-map".into(), "0=db.default:5432".into()],
    );
    let mapped = *gw
        .ready
        .iter()
        .find(|(k, _)| k.starts_with("tcp:db.default"))
        .unwrap_or_else(|| panic!("no db port mapping in {:?}", gw.ready))
        .1;
    let n = 1_000;
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..n {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(mapped).await.unwrap();
        let mut name = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut name))
            .await
            .unwrap()
            .unwrap();
        *counts.entry(name).or_insert(0) += 1;
    }
    let a_share = f64::from(counts.get("a").copied().unwrap_or(0)) / f64::from(n);
    // 1,000 connections: ±5 points is over 3.5 standard deviations.
    assert!((a_share - 0.75).abs() < 0.05, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_fault_injection_hits_its_percentages_within_2_percent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("vs.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    fault:
      abort: {httpStatus: 418, percentage: {value: 30}}
      delay: {fixedDelay: 50ms, percentage: {value: 50}}
",
    )
    .unwrap();
    let (backend, seen) = recording_backend("reviews").await;
    let eps = dir.path().join("eps.yaml");
    discovery_file(&eps, &[("reviews.default", vec![(backend, vec![])])]);
    let gw = east_gateway(&dir, &pki, policy, eps, vec![]);
    let mut spec = LoadSpec::new(gw.outbound, "reviews", Protocol::Http2);
    spec.rate = 2_000;
    spec.duration = Duration::from_millis(u64::from(SAMPLE) * 1000 / 2_000);
    spec.connections = 16;
    spec.timeout = Duration::from_secs(5);
    let r = load::run(spec).await;
    eprintln!("{r}");
    let total = r.sent as f64;
    let aborted = r.status.get(&418).copied().unwrap_or(0) as f64;
    let ok = r.status.get(&200).copied().unwrap_or(0);
    assert_eq!(r.sent, r.ok + r.failed, "{r}");
    assert_eq!(
        aborted as u64 + ok,
        r.sent,
        "only 200s and injected 418s: {r}"
    );
    assert!(
        (100.0 * aborted / total - 30.0).abs() <= 2.0,
        "aborted {:.2}% of {total} requests, expected 30% ± 2",
        100.0 * aborted / total
    );
    // An aborted request never reaches the backend.
    assert_eq!(seen.lock().unwrap().len() as u64, ok);
    // Delays by their effect: a delayed request takes at least its 50 ms
    // (open-loop over HTTP/2, so a delay holds no other request up).
    let delayed = r.latency.count_between(50_000, u64::MAX) as f64;
    let answered = r.latency.len() as f64;
    assert!(
        (100.0 * delayed / answered - 50.0).abs() <= 2.0,
        "{:.2}% of {answered} answers took 50 ms or more, expected 50% ± 2",
        100.0 * delayed / answered
    );
}
