//! Rollout waves, end to end (issue 19): the real `meshfed-syncer`
//! following a real Git repository with a `RolloutPolicy` (edge, then
//! west, then east), three real `meshfed-gateway` processes in syncer mode
//! (one per cluster), each serving `ratings` from local endpoints: subset
//! v1 answers 200, subset v2 answers 503. Callers send steady traffic
//! through every gateway; the gateways report their golden metrics to the
//! syncer, whose gates judge each wave.
//!
//! - a good commit goes through every wave, and `status --wait` exits 0;
//! - a bad-but-valid commit (100% of ratings to v2) is rolled back after
//!   wave 1 by the success-rate gate: only edge's callers see failures,
//!   west and east never apply it, and `status --wait` exits 1 naming the
//!   gate; the commit is not rolled forward;
//! - a syncer restarted in the middle of a rollout resumes at its wave;
//! - a valid commit whose new DENY matches real traffic is rolled back
//!   after wave 1 by the denial gate (the gates judge the services the
//!   commit changes: a DENY of namespace `default` reaches ratings).
//!
//! Bake times are a few seconds; every wait is a behavioural deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::body::Incoming;
use meshfed_tests::eventually;
use meshfed_tests::federation::{
    GatewayProcess, GatewaySpec, Pki, cluster_yaml, discovery_file, free_udp_port, serve_fn,
};
use meshfed_tests::syncer::{PolicyRepo, SyncerProcess, SyncerSpec, syncer_creds};

const CLUSTERS: [&str; 3] = ["edge", "west", "east"];

/// Short bakes; a p99 floor of a second, so that a loaded test machine's
/// latency never fails a good commit (the p99 gate is unit-tested in
/// syncer/src/waves/gate.rs; here the success-rate gate is the one judged).
const ROLLOUT: &str = "\
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: waves}
spec:
  waves:
  - clusters: [edge]
    bakeTime: 5s
  - clusters: [west]
    bakeTime: 3s
  gates: {minRequests: 50, p99FloorMs: 1000}
";

const DR: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn route_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - route: [{{destination: {{host: ratings, subset: {subset}}}}}]\n"
    )
}

/// A valid DENY of every GET to namespace `default`: all of the callers'
/// requests to ratings.
const DENY_GETS: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-gets, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n";

/// A harmless change: a route for a host nobody calls.
const DETAILS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: details}\nspec:\n  hosts: [details]\n  http:\n  - route: [{destination: {host: details}}]\n";

/// Per cluster: when each answer came, and its status code.
type Answers = Arc<Mutex<BTreeMap<String, Vec<(Instant, u16)>>>>;

/// Steady callers through every gateway, one thread each, counting
/// answers by status code.
struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Answers,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(gateways: &[GatewayProcess]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Answers = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = gateways
            .iter()
            .map(|g| {
                let (stop, seen, cluster, via) =
                    (stop.clone(), seen.clone(), g.cluster.clone(), g.outbound);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let code = call(via);
                        seen.lock()
                            .unwrap()
                            .entry(cluster.clone())
                            .or_insert_with(Vec::new)
                            .push((Instant::now(), code));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            seen,
            threads,
        }
    }

    /// Answers other than 200 through `cluster`'s gateway since `from`.
    fn failures(&self, cluster: &str, from: Instant) -> usize {
        self.seen.lock().unwrap().get(cluster).map_or(0, |v| {
            v.iter().filter(|(t, c)| *t >= from && *c != 200).count()
        })
    }

    fn answers(&self, cluster: &str, from: Instant) -> usize {
        self.seen
            .lock()
            .unwrap()
            .get(cluster)
            .map_or(0, |v| v.iter().filter(|(t, _)| *t >= from).count())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One GET of ratings through a gateway's outbound listener; 0 when the
/// exchange itself failed.
fn call(via: SocketAddr) -> u16 {
    let Ok(mut s) = TcpStream::connect_timeout(&via, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return 0;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The version a gateway enforces, from its `/config_dump`.
fn applied(g: &GatewayProcess) -> String {
    let dump: serde_json::Value =
        serde_json::from_str(&g.admin_get("/config_dump")).unwrap_or_default();
    dump["config_source"]["applied"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Whether a gateway ever applied `version` (its `meshfed_config_info`
/// keeps a series for every version it enforced).
fn ever_applied(g: &GatewayProcess, version: &str) -> bool {
    g.admin_get("/metrics")
        .lines()
        .any(|l| l.starts_with("meshfed_config_info") && l.contains(version))
}

struct Federation {
    _tmp: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    repo: PolicyRepo,
    spec: SyncerSpec,
    syncer: SyncerProcess,
    gateways: Vec<GatewayProcess>,
}

fn federation(first_files: &[(&str, &str)]) -> (Federation, String) {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (good, _) = rt.block_on(serve_fn(|_req: Request<Incoming>| async {
        hyper::Response::new(Full::new(Bytes::from_static(b"v1")))
    }));
    let (bad, _) = rt.block_on(serve_fn(|_req: Request<Incoming>| async {
        hyper::Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"v2 is broken")))
            .unwrap()
    }));
    let eps = tmp.path().join("eps.yaml");
    discovery_file(
        &eps,
        &[(
            "ratings.default",
            vec![
                (good, vec![("version", "v1")]),
                (bad, vec![("version", "v2")]),
            ],
        )],
    );
    let pki = Pki::new(tmp.path());
    let creds = syncer_creds(&pki, "edge", "syncer");
    let ports: Vec<u16> = CLUSTERS.iter().map(|_| free_udp_port()).collect();
    let mut clusters = String::new();
    for (c, p) in CLUSTERS.iter().zip(&ports) {
        clusters.push_str(&cluster_yaml(c, &[*p]));
    }
    let repo = PolicyRepo::init(&tmp.path().join("repo"));
    let mut files = vec![
        ("clusters.yaml", clusters.as_str()),
        ("rollout.yaml", ROLLOUT),
        ("ratings-dr.yaml", DR),
    ];
    files.extend_from_slice(first_files);
    let c1 = repo.commit("first", &files);
    // A fixed gRPC port: the gateways find a restarted syncer where they
    // left it.
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut spec = SyncerSpec::new(&repo.dir, &creds, &tmp.path().join("syncer"));
    spec.grpc_addr = format!("127.0.0.1:{grpc_port}");
    let syncer = SyncerProcess::start(&spec);
    let gateways = CLUSTERS
        .iter()
        .zip(&ports)
        .map(|(c, p)| {
            GatewayProcess::start(&GatewaySpec {
                cluster: c.to_string(),
                id: "gw-0".into(),
                tls_dir: pki.gateway(c, "gw-0"),
                policy_dir: Default::default(),
                discovery: Some(eps.clone()),
                tunnel_port: *p,
                work_dir: tmp.path().to_path_buf(),
                extra_args: vec![
                    "--syncer".into(),
                    syncer.grpc.to_string(),
                    "--syncer-issuer".into(),
                    "edge".into(),
                ],
            })
        })
        .collect();
    (
        Federation {
            _tmp: tmp,
            _rt: rt,
            repo,
            spec,
            syncer,
            gateways,
        },
        c1,
    )
}

impl Federation {
    fn gateway(&self, cluster: &str) -> &GatewayProcess {
        self.gateways.iter().find(|g| g.cluster == cluster).unwrap()
    }

    fn push(&self, message: &str, files: &[(&str, &str)]) -> String {
        let sha = self.repo.commit(message, files);
        let (code, body) = self.syncer.webhook();
        assert_eq!(code, 202, "{body}");
        sha
    }

    fn wave(&self, sha: &str) -> (String, u64) {
        let v = self.syncer.rollout(sha);
        (
            v["state"].as_str().unwrap_or_default().to_string(),
            v["waves"]["wave"].as_u64().unwrap_or(0),
        )
    }
}

#[test]
fn a_bad_commit_is_rolled_back_after_wave_1_and_a_good_one_goes_through_every_wave() {
    let (f, c1) = federation(&[("ratings-vs.yaml", &route_to("v1"))]);
    // The first commit goes through the waves too: edge, west, then east.
    let out = f.syncer.status_wait(&c1, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    let run = f.syncer.rollout(&c1);
    assert_eq!(run["waves"]["state"], "complete", "{run}");
    assert_eq!(run["waves"]["notes"].as_array().unwrap().len(), 3, "{run}");
    for g in &f.gateways {
        assert_eq!(applied(g), c1, "{}", g.cluster);
    }

    // Steady traffic everywhere, long enough for a baseline before the wave.
    let traffic = Traffic::start(&f.gateways);
    let healthy_since = Instant::now();
    eventually(
        "200 answers through every gateway",
        Duration::from_secs(20),
        || match CLUSTERS
            .iter()
            .find(|c| traffic.answers(c, healthy_since) < 200)
        {
            Some(c) => Err(format!(
                "{c}: {} answers",
                traffic.answers(c, healthy_since)
            )),
            None => Ok(()),
        },
    );
    for c in CLUSTERS {
        assert_eq!(
            traffic.failures(c, healthy_since),
            0,
            "{c} before the bad commit"
        );
    }

    // The bad commit: valid, and every request of ratings to the 503 subset.
    let pushed = Instant::now();
    let c2 = f.push(
        "ratings: all to v2",
        &[("ratings-vs.yaml", &route_to("v2"))],
    );
    let out = f.syncer.status_wait(&c2, Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{out}\n{}", f.syncer.log_text());
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("ROLLED BACK"), "{text}");
    assert!(text.contains("success_rate"), "names the gate: {text}");
    assert!(text.contains("ratings"), "names the service: {text}");
    assert!(
        text.contains("wave 1 of 3 (edge)"),
        "names the wave: {text}"
    );
    let run = f.syncer.rollout(&c2);
    assert_eq!(run["state"], "rolled-back", "{run}");
    assert_eq!(run["waves"]["failure"]["metric"], "success_rate", "{run}");
    let metrics = f.syncer.metrics();
    assert!(
        metrics.contains("meshfed_syncer_rollout_waves_total{result=\"rolled_back\"} 1"),
        "{metrics}"
    );

    // Edge goes back to c1 by itself, and answers 200 again.
    eventually("edge back on c1", Duration::from_secs(20), || {
        let a = applied(f.gateway("edge"));
        if a == c1 { Ok(()) } else { Err(a) }
    });
    let recovered = Instant::now();
    eventually("edge answers 200 again", Duration::from_secs(20), || {
        let n = traffic.answers("edge", recovered);
        if n >= 50 {
            Ok(())
        } else {
            Err(format!("{n} answers"))
        }
    });
    assert!(
        ever_applied(f.gateway("edge"), &c2),
        "edge ran the bad commit"
    );
    eprintln!(
        "the bad commit: {} failed answers at edge out of {} in {:?} from the push to edge's recovery; west {}, east {}",
        traffic.failures("edge", pushed),
        traffic.answers("edge", pushed),
        recovered - pushed,
        traffic.failures("west", pushed),
        traffic.failures("east", pushed),
    );
    assert!(
        traffic.failures("edge", pushed) > 0,
        "edge's callers saw the bad commit"
    );
    // Failures confined to wave 1: west and east never saw the commit.
    for c in ["west", "east"] {
        assert_eq!(traffic.failures(c, healthy_since), 0, "{c} saw failures");
        assert!(
            !ever_applied(f.gateway(c), &c2),
            "{c} applied the bad commit"
        );
        assert_eq!(applied(f.gateway(c)), c1);
    }
    // Not rolled forward by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(applied(f.gateway("edge")), c1);
    assert_eq!(f.wave(&c2).0, "rolled-back");
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(traffic.failures("edge", since), 0, "edge is healthy on c1");

    // A good commit after it starts over and goes through every wave. It
    // changes ratings (a timeout), so that its gates judge ratings' real
    // traffic: against c1, which edge is back on, routing ratings to v1
    // again would be no change at all.
    let c3 = f.push(
        "ratings: a timeout, and details",
        &[
            (
                "ratings-vs.yaml",
                &format!("{}    timeout: 5s\n", route_to("v1")),
            ),
            ("details.yaml", DETAILS),
        ],
    );
    let out = f.syncer.status_wait(&c3, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    for g in &f.gateways {
        assert_eq!(applied(g), c3, "{}", g.cluster);
    }
    let run = f.syncer.rollout(&c3);
    let notes = run["waves"]["notes"].to_string();
    assert!(
        notes.contains("judged ratings"),
        "the gates judged real traffic: {notes}"
    );
    // The rolled-back commit stays rolled back in the status.
    assert_eq!(f.wave(&c2).0, "rolled-back");
}

#[test]
fn a_syncer_restarted_mid_rollout_resumes_at_its_wave() {
    let (mut f, c1) = federation(&[("ratings-vs.yaml", &route_to("v1"))]);
    let out = f.syncer.status_wait(&c1, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    let _traffic = Traffic::start(&f.gateways);

    let c2 = f.push("details", &[("details.yaml", DETAILS)]);
    eventually("wave 2 open", Duration::from_secs(30), || {
        match f.wave(&c2) {
            (s, 2) if s == "progressing" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(applied(f.gateway("edge")), c2);
    assert_ne!(applied(f.gateway("east")), c2, "east is wave 3");

    assert_eq!(f.syncer.terminate(), Some(0));
    f.syncer = SyncerProcess::start(&f.spec);
    // Right after the restart: the same wave, and nothing went backwards
    // or forwards.
    let (state, wave) = f.wave(&c2);
    assert_eq!(
        (state.as_str(), wave),
        ("progressing", 2),
        "{}",
        f.syncer.rollout(&c2)
    );
    assert_eq!(applied(f.gateway("edge")), c2);
    assert_ne!(applied(f.gateway("east")), c2);
    assert!(!ever_applied(f.gateway("east"), &c2));

    let out = f.syncer.status_wait(&c2, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    for g in &f.gateways {
        assert_eq!(applied(g), c2, "{}", g.cluster);
    }
    let log = f.syncer.log_text();
    assert!(
        log.contains("rollout restored from the state directory"),
        "{log}"
    );

    // An operator aborts the next commit in wave 1, then resumes it.
    let c3 = f.push(
        "reviews",
        &[("reviews.yaml", &DETAILS.replace("details", "reviews"))],
    );
    eventually("c3 on edge", Duration::from_secs(30), || {
        let a = applied(f.gateway("edge"));
        if a == c3 { Ok(()) } else { Err(a) }
    });
    let out = rollout_cli(&f.syncer, "abort", &c3);
    assert_eq!(out.code, Some(0), "{out}");
    eventually("edge back on c2", Duration::from_secs(20), || {
        let a = applied(f.gateway("edge"));
        if a == c2 { Ok(()) } else { Err(a) }
    });
    let out = f.syncer.status_wait(&c3, Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("aborted by an operator"), "{out}");
    let out = rollout_cli(&f.syncer, "abort", &c3);
    assert_eq!(out.code, Some(1), "a second abort is refused: {out}");
    let out = rollout_cli(&f.syncer, "resume", "0123abcd");
    assert_eq!(out.code, Some(1), "an unknown commit: {out}");
    let out = rollout_cli(&f.syncer, "resume", &c3);
    assert_eq!(out.code, Some(0), "{out}");
    let out = f.syncer.status_wait(&c3, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    for g in &f.gateways {
        assert_eq!(applied(g), c3, "{}", g.cluster);
    }
}

/// `meshfed-syncer rollout ACTION SHA` against `syncer`.
fn rollout_cli(syncer: &SyncerProcess, action: &str, sha: &str) -> meshfed_tests::Outcome {
    let mut cmd = std::process::Command::new(meshfed_tests::bin("meshfed-syncer"));
    cmd.args(["rollout", action, sha, "--server", &syncer.url()]);
    meshfed_tests::run_within(&mut cmd, Duration::from_secs(30)).unwrap()
}

#[test]
fn a_commit_whose_new_deny_matches_real_traffic_is_rolled_back_after_wave_1() {
    let (f, c1) = federation(&[("ratings-vs.yaml", &route_to("v1"))]);
    let out = f.syncer.status_wait(&c1, Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{out}\n{}", f.syncer.log_text());
    let traffic = Traffic::start(&f.gateways);
    let healthy_since = Instant::now();
    eventually(
        "200 answers through every gateway",
        Duration::from_secs(20),
        || match CLUSTERS
            .iter()
            .find(|c| traffic.answers(c, healthy_since) < 200)
        {
            Some(c) => Err(format!(
                "{c}: {} answers",
                traffic.answers(c, healthy_since)
            )),
            None => Ok(()),
        },
    );

    let pushed = Instant::now();
    let c2 = f.push("deny GETs in default", &[("deny.yaml", DENY_GETS)]);
    let out = f.syncer.status_wait(&c2, Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{out}\n{}", f.syncer.log_text());
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("ROLLED BACK"), "{text}");
    assert!(text.contains("denial_rate"), "names the gate: {text}");
    assert!(
        text.contains("wave 1 of 3 (edge)"),
        "names the wave: {text}"
    );
    let run = f.syncer.rollout(&c2);
    assert_eq!(run["state"], "rolled-back", "{run}");
    let failure = &run["waves"]["failure"];
    assert_eq!(failure["metric"], "denial_rate", "{run}");
    assert_eq!(
        failure["service"], "ratings.default.svc.cluster.local",
        "{run}"
    );
    eventually("edge back on c1", Duration::from_secs(20), || {
        let a = applied(f.gateway("edge"));
        if a == c1 { Ok(()) } else { Err(a) }
    });
    let recovered = Instant::now();
    eventually("edge answers 200 again", Duration::from_secs(20), || {
        let n = traffic.answers("edge", recovered);
        if n >= 50 {
            Ok(())
        } else {
            Err(format!("{n} answers"))
        }
    });
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(traffic.failures("edge", since), 0, "edge is healthy on c1");
    eprintln!(
        "the DENY: {} denied or failed answers at edge out of {} in {:?} from the push to edge's recovery; west {}, east {}",
        traffic.failures("edge", pushed),
        traffic.answers("edge", pushed),
        recovered - pushed,
        traffic.failures("west", pushed),
        traffic.failures("east", pushed),
    );
    assert!(
        traffic.failures("edge", pushed) > 0,
        "edge's callers were denied"
    );
    for c in ["west", "east"] {
        assert_eq!(traffic.failures(c, healthy_since), 0, "{c} saw failures");
        assert!(!ever_applied(f.gateway(c), &c2), "{c} applied the commit");
        assert_eq!(applied(f.gateway(c)), c1);
    }
}
