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

/// ratings and reviews, each with subsets v1 and v2, and a route of
/// ratings to one subset.
fn services(ratings_subset: &str) -> String {
    let dr = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n  host: {name}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
        )
    };
    format!(
        "{}---\n{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - route: [{{destination: {{host: ratings, subset: {ratings_subset}}}}}]\n",
        dr("ratings"),
        dr("reviews")
    )
}

const RATINGS: &str = "ratings.default.svc.cluster.local";
const REVIEWS: &str = "reviews.default.svc.cluster.local";

/// Every cluster's snapshot of `commit` (ratings routed to v1) and the
/// plan.
fn compile(commit: &str) -> (BTreeMap<String, ClusterSnapshot>, RolloutPlan) {
    compile_with(commit, "v1")
}

/// Every cluster's snapshot of `commit`, with ratings routed to
/// `ratings_subset`, and the plan.
fn compile_with(
    commit: &str,
    ratings_subset: &str,
) -> (BTreeMap<String, ClusterSnapshot>, RolloutPlan) {
    let more = services(ratings_subset);
    let a = meshfed_policy::analyze(
        [("p.yaml", POLICY), ("s.yaml", more.as_str())],
        &Default::default(),
    );
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

    /// A report of ratings' traffic at `cluster`'s gateway, every request
    /// within 10 ms.
    fn traffic(&self, cluster: &str, requests: u64, successes: u64, at: SystemTime) {
        self.report(cluster, RATINGS, requests, successes, 0, at);
    }

    /// A report of `service`'s traffic at `cluster`'s gateway: `slow` of
    /// the requests took 10 to 100 ms, the others at most 10 ms.
    fn report(
        &self,
        cluster: &str,
        service: &str,
        requests: u64,
        successes: u64,
        slow: u64,
        at: SystemTime,
    ) {
        let m = pb::GoldenMetrics {
            interval_ms: 1000,
            services: vec![pb::ServiceMetrics {
                service: service.into(),
                requests,
                successes,
                denials: 0,
                all_requests: requests,
                latency_counts: vec![requests - slow, slow, 0],
            }],
            latency_bounds: vec![0.01, 0.1],
            latency_counts: vec![requests - slow, slow, 0],
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
    // The commit changes ratings (all of it to v2), whose success fails.
    let (c2, plan) = compile_with("c2", "v2");
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
    assert_eq!(fail.service, RATINGS);
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

/// Runs a commit that routes ratings to v2 (and changes nothing else) to
/// the end of wave 1 with `during` reported at edge during its bake, after
/// `before` (reported before the wave opened); returns the run.
fn wave_1_of_a_ratings_change(
    before: &[(&str, u64, u64, u64)],
    during: &[(&str, u64, u64, u64)],
) -> RunView {
    let f = fixture(None);
    first_commit(&f);
    let earlier = SystemTime::now() - Duration::from_secs(5);
    for (service, requests, successes, slow) in before {
        f.report("edge", service, *requests, *successes, *slow, earlier);
    }
    let (c2, plan) = compile_with("c2", "v2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    f.ack_all();
    f.waves.tick(); // baking
    std::thread::sleep(Duration::from_millis(10));
    for (service, requests, successes, slow) in during {
        f.report(
            "edge",
            service,
            *requests,
            *successes,
            *slow,
            SystemTime::now(),
        );
    }
    f.tick_until("wave 1 to end", |f| {
        let run = f.waves.current_run().unwrap();
        run.state != RunState::Progressing || run.wave > 1
    });
    f.waves.run_view("c2").unwrap()
}

#[test]
fn a_failing_service_the_commit_does_not_change_does_not_roll_it_back() {
    // reviews fails through edge during the bake; the commit changes
    // ratings only, which is fine.
    let run = wave_1_of_a_ratings_change(
        &[(REVIEWS, 500, 500, 0), (RATINGS, 500, 500, 0)],
        &[(REVIEWS, 300, 0, 300), (RATINGS, 300, 300, 0)],
    );
    assert_eq!(run.state, RunState::Progressing, "{run:?}");
    assert_eq!(run.wave, 2, "{run:?}");
    assert!(run.notes[0].contains("judged ratings"), "{:?}", run.notes);
    assert!(!run.notes[0].contains("reviews"), "{:?}", run.notes);
}

#[test]
fn a_failing_service_the_commit_changes_rolls_it_back() {
    let run = wave_1_of_a_ratings_change(
        &[(REVIEWS, 500, 500, 0), (RATINGS, 500, 500, 0)],
        &[(REVIEWS, 300, 300, 0), (RATINGS, 300, 30, 0)],
    );
    assert_eq!(run.state, RunState::RolledBack, "{run:?}");
    let fail = run.failure.unwrap();
    assert_eq!(
        (fail.metric.as_str(), fail.service.as_str()),
        ("success_rate", RATINGS)
    );
    assert_eq!(fail.value, 10.0);
}

#[test]
fn p99_is_judged_per_service_the_commit_changes() {
    // ratings: from ≤ 10 ms to ≤ 100 ms at p99 (over the 25 ms floor).
    let run = wave_1_of_a_ratings_change(&[(RATINGS, 500, 500, 0)], &[(RATINGS, 300, 300, 30)]);
    assert_eq!(run.state, RunState::RolledBack, "{run:?}");
    let fail = run.failure.unwrap();
    assert_eq!(
        (fail.metric.as_str(), fail.service.as_str()),
        ("p99_latency", RATINGS)
    );
    assert_eq!((fail.before, fail.value), (0.01, 0.1));
    assert!(
        run.reason
            .unwrap()
            .contains("p99 of ratings.default.svc.cluster.local"),
        "names the service"
    );
    // The same slowdown of a service the commit does not change: passes.
    let run = wave_1_of_a_ratings_change(
        &[(REVIEWS, 500, 500, 0), (RATINGS, 500, 500, 0)],
        &[(REVIEWS, 300, 300, 30), (RATINGS, 300, 300, 0)],
    );
    assert_eq!((run.state, run.wave), (RunState::Progressing, 2), "{run:?}");
}

#[test]
fn a_commit_that_changes_no_service_is_not_judged_on_anyone_s_traffic() {
    // c2 is c1 again (a commit that changes nothing the gateways enforce,
    // as a RolloutPolicy of its own does): reviews failing is not its doing.
    let f = fixture(None);
    first_commit(&f);
    f.report(
        "edge",
        REVIEWS,
        500,
        500,
        0,
        SystemTime::now() - Duration::from_secs(5),
    );
    let (c2, plan) = compile("c2");
    f.waves.start("c2", c2, Some(plan), Instant::now());
    f.ack_all();
    f.waves.tick();
    std::thread::sleep(Duration::from_millis(10));
    f.report("edge", REVIEWS, 300, 0, 0, SystemTime::now());
    f.tick_until("wave 2", |f| f.served_of("west") == "c2");
    let run = f.waves.run_view("c2").unwrap();
    assert!(
        run.notes[0]
            .contains("no traffic to judge (the commit changes no destination service there)"),
        "{:?}",
        run.notes
    );
}
