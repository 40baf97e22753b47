//! The wave controller on in-memory gateway records and golden metrics:
//! what each cluster is served as a run moves on, rolls back, is resumed,
//! aborted, and restored after a restart.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use meshfed_proto::config::v1 as pb;

use super::*;
use crate::rollout::Admission;

const POLICY: &str = "\
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: edge}
spec: {gateways: ['gw.edge:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['gw.west:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['gw.east:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: waves}
spec:
  waves:
  - clusters: [edge]
    bakeTime: 300ms
  - clusters: [west]
    bakeTime: 300ms
";

fn compile(commit: &str) -> (BTreeMap<String, ClusterSnapshot>, RolloutPlan) {
    let a = meshfed_policy::analyze([("p.yaml", POLICY)], &Default::default());
    assert!(a.is_valid(), "{:?}", a.diagnostics);
    let clusters = a
        .clusters()
        .into_iter()
        .map(|c| {
            let s = a.compile(&c, commit, &Default::default()).unwrap();
            (c, ClusterSnapshot::new(s))
        })
        .collect();
    (clusters, a.rollout().unwrap())
}

struct Fixture {
    waves: Waves,
    rollout: Rollout,
    golden: Golden,
    rx: watch::Receiver<Option<Arc<Published>>>,
}

fn fixture(dir: Option<&std::path::Path>) -> Fixture {
    let (tx, rx) = watch::channel(None);
    let rollout = Rollout::new();
    let golden = Golden::default();
    for c in ["edge", "west", "east"] {
        rollout
            .admit(
                c,
                "gw",
                &format!("spiffe://td/{c}"),
                None,
                &Admission::default(),
            )
            .unwrap();
    }
    Fixture {
        waves: Waves::new(
            tx,
            rollout.clone(),
            golden.clone(),
            Duration::from_secs(600),
            dir.map(|d| d.to_path_buf()),
        ),
        rollout,
        golden,
        rx,
    }
}

impl Fixture {
    fn served(&self) -> BTreeMap<String, String> {
        self.rx
            .borrow()
            .as_ref()
            .unwrap()
            .clusters
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot.version.clone()))
            .collect()
    }

    fn served_of(&self, c: &str) -> String {
        self.served()[c].clone()
    }

    /// Every gateway ACKs what it is served.
    fn ack_all(&self) {
        for (c, v) in self.served() {
            self.rollout.acked(&c, "gw", &v);
        }
    }

    fn traffic(&self, cluster: &str, requests: u64, successes: u64, at: SystemTime) {
        let m = pb::GoldenMetrics {
            interval_ms: 1000,
            services: vec![pb::ServiceMetrics {
                service: "ratings.default.svc.cluster.local".into(),
                requests,
                successes,
                denials: 0,
                all_requests: requests,
            }],
            latency_bounds: vec![0.01, 0.1],
            latency_counts: vec![requests, 0, 0],
        };
        self.golden.record_at(cluster, "gw", &m, at);
    }

    fn tick_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.waves.tick();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn first_commit(f: &Fixture) {
    let (c1, _) = compile("c1");
    f.waves.start("c1", c1, None, Instant::now());
    f.ack_all();
}

#[test]
fn without_a_plan_every_cluster_is_served_at_once() {
    let f = fixture(None);
    first_commit(&f);
    assert!(f.served().values().all(|v| v == "c1"));
    assert!(f.waves.current_run().is_none());
}

#[test]
fn a_good_commit_goes_wave_by_wave_and_completes() {
    let f = fixture(None);
    first_commit(&f);
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    assert_eq!(f.served_of("edge"), "c2");
    assert_eq!(f.served_of("west"), "c1", "wave 2 waits for wave 1");
    assert_eq!(f.served_of("east"), "c1");
    // Not before wave 1's gateway applied it and baked.
    for _ in 0..5 {
        f.waves.tick();
    }
    assert_eq!(f.served_of("west"), "c1");
    f.ack_all();
    f.tick_until("wave 2", |f| f.served_of("west") == "c2");
    assert_eq!(f.served_of("east"), "c1");
    f.ack_all();
    f.tick_until("wave 3", |f| f.served_of("east") == "c2");
    f.ack_all();
    f.tick_until("complete", |f| {
        f.waves.current_run().unwrap().state == RunState::Complete
    });
    let run = f.waves.run_view("c2").unwrap();
    assert_eq!(run.notes.len(), 3, "{:?}", run.notes);
    assert!(
        run.notes[0].contains("no traffic to judge"),
        "{:?}",
        run.notes
    );
}

#[test]
fn a_failed_gate_rolls_the_wave_back_and_leaves_later_waves_alone() {
    let f = fixture(None);
    first_commit(&f);
    let now = SystemTime::now();
    f.traffic("edge", 500, 500, now - Duration::from_secs(5));
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    f.ack_all();
    f.waves.tick(); // baking
    std::thread::sleep(Duration::from_millis(10));
    f.traffic("edge", 150, 3, SystemTime::now());
    f.tick_until("rollback", |f| {
        f.waves.current_run().unwrap().state == RunState::RolledBack
    });
    assert_eq!(f.served_of("edge"), "c1", "back to the last good snapshot");
    assert_eq!(f.served_of("west"), "c1");
    let run = f.waves.run_view("c2").unwrap();
    let fail = run.failure.unwrap();
    assert_eq!(fail.metric, "success_rate");
    assert_eq!(fail.value, 2.0);
    let reason = run.reason.unwrap();
    assert!(reason.contains("wave 1 of 3 (edge)"), "{reason}");
    assert!(reason.contains("threshold"), "{reason}");
    // Never rolled forward by itself.
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..5 {
        f.waves.tick();
    }
    assert_eq!(f.served_of("edge"), "c1");
    assert_eq!(f.served_of("west"), "c1");

    // An operator overrides: wave 1 opens again, then the rest follow.
    assert!(f.waves.abort("c2").is_err(), "already rolled back");
    f.waves.resume("c2").unwrap();
    assert_eq!(f.served_of("edge"), "c2");
    f.ack_all();
    f.tick_until("wave 2 after resume", |f| f.served_of("west") == "c2");
}

#[test]
fn a_nack_in_the_open_wave_halts_the_run() {
    let f = fixture(None);
    first_commit(&f);
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    f.rollout.nacked("edge", "gw", "c2", "bad regex");
    f.waves.tick();
    let run = f.waves.current_run().unwrap();
    assert_eq!(run.state, RunState::Halted);
    assert!(run.reason.unwrap().contains("bad regex"));
    assert_eq!(f.served_of("west"), "c1");
    // Abort sends edge back too.
    f.waves.abort("c2").unwrap();
    assert_eq!(f.served_of("edge"), "c1");
}

#[test]
fn a_new_commit_starts_over_and_supersedes_the_run() {
    let f = fixture(None);
    first_commit(&f);
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan.clone()), Instant::now());
    let (c3, _) = compile("c3");
    f.waves.start("c3", c3, Some(plan), Instant::now());
    assert_eq!(f.served_of("edge"), "c3");
    assert_eq!(f.served_of("west"), "c1");
    assert_eq!(f.waves.run_view("c2").unwrap().state, RunState::Superseded);
}

#[test]
fn a_restarted_controller_serves_the_same_and_resumes_at_its_wave() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(Some(dir.path()));
    first_commit(&f);
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    f.ack_all();
    f.tick_until("wave 2", |f| f.served_of("west") == "c2");
    drop(f);

    let g = fixture(Some(dir.path()));
    assert!(g.waves.restore("c2").unwrap());
    assert_eq!(g.served_of("edge"), "c2");
    assert_eq!(g.served_of("west"), "c2");
    assert_eq!(g.served_of("east"), "c1", "wave 3 not opened yet");
    assert_eq!(g.waves.current_run().unwrap().wave, 2);
    g.ack_all();
    g.tick_until("wave 3", |f| f.served_of("east") == "c2");

    // A state file of another commit is not used.
    let h = fixture(Some(dir.path()));
    assert!(!h.waves.restore("c9").unwrap());
}
