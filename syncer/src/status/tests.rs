//! The per-commit rollout rules, on a hand-made history:
//! `a` ← `b` ← `c` (c contains b contains a), and `x` on another line.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::*;
use crate::pipeline::{Accepted, Rejected};
use crate::rollout::Departure;

fn contains(a: &str, b: &str) -> bool {
    let order = ["a", "b", "c"];
    match (
        order.iter().position(|x| *x == a),
        order.iter().position(|x| *x == b),
    ) {
        (Some(i), Some(j)) => i <= j,
        _ => a == b,
    }
}

fn accepted(commit: &str, clusters: &[&str]) -> Accepted {
    Accepted {
        commit: commit.into(),
        at: SystemTime::now(),
        clusters: clusters
            .iter()
            .map(|c| c.to_string())
            .collect::<BTreeSet<_>>(),
        warnings: 0,
        restored: false,
        changes: None,
    }
}

fn gw(cluster: &str, id: &str, applied: Option<&str>) -> GatewayRecord {
    GatewayRecord {
        cluster: cluster.into(),
        gateway_id: id.into(),
        identity: format!("spiffe://cluster.local/meshfed/cluster/{cluster}/gateway/{id}"),
        peer_addr: None,
        connected: true,
        last_seen: SystemTime::now(),
        applied: applied.map(str::to_string),
        acked_at: applied.map(|_| SystemTime::now()),
        nack: None,
        left: None,
    }
}

fn state_with(good: Accepted) -> StateView {
    StateView {
        head: Some(good.commit.clone()),
        last_good: Some(good.clone()),
        accepted: [good].into_iter().collect(),
        ..Default::default()
    }
}

const WINDOW: Duration = Duration::from_secs(600);

fn view(commit: &str, st: &StateView, gws: &[GatewayRecord]) -> RolloutView {
    compute_rollout(commit, st, gws, WINDOW, SystemTime::now(), &contains)
}

#[test]
fn live_once_every_known_gateway_of_the_targeted_clusters_applied_it_or_a_descendant() {
    let st = state_with(accepted("c", &["east", "west"]));
    let gws = [
        gw("east", "e1", Some("c")),
        gw("west", "w1", Some("c")),
        // Not targeted: its state does not matter.
        gw("edge", "x1", None),
    ];
    let v = view("b", &st, &gws);
    assert_eq!(v.state, RolloutState::Live, "{v:?}");
    assert_eq!(v.covered_by.as_deref(), Some("c"));
    assert!(!v.clusters.contains_key("edge"));
}

#[test]
fn a_gateway_on_an_older_commit_or_disconnected_is_pending_and_named() {
    let st = state_with(accepted("c", &["east", "west"]));
    let mut off = gw("west", "w1", Some("c"));
    off.connected = false;
    let v = view("c", &st, &[gw("east", "e1", Some("a")), off]);
    assert_eq!(v.state, RolloutState::Pending);
    assert_eq!(v.gateways_in(GatewayState::Pending), ["east/e1", "west/w1"]);
    assert!(
        render_rollout(&v).contains("disconnected"),
        "{}",
        render_rollout(&v)
    );
}

#[test]
fn a_gateway_unseen_beyond_the_known_window_no_longer_counts() {
    let st = state_with(accepted("c", &["east"]));
    let mut gone = gw("east", "old", Some("a"));
    gone.connected = false;
    gone.last_seen = SystemTime::now() - Duration::from_secs(3600);
    let v = view("c", &st, &[gw("east", "e1", Some("c")), gone]);
    assert_eq!(v.state, RolloutState::Live, "{v:?}");
}

/// Issue 22, item 9: a gateway that said goodbye (drained) is listed as
/// left and not waited for, at once; a disconnected one without a goodbye
/// is still pending.
#[test]
fn a_gateway_that_said_goodbye_is_listed_as_left_and_not_pending() {
    let st = state_with(accepted("c", &["east"]));
    let mut drained = gw("east", "old-pod", Some("a"));
    drained.connected = false;
    drained.left = Some(Departure {
        at: SystemTime::now(),
        reason: "SIGTERM: drained".into(),
    });
    let v = view(
        "c",
        &st,
        &[gw("east", "new-pod", Some("c")), drained.clone()],
    );
    assert_eq!(v.state, RolloutState::Live, "{v:?}");
    assert_eq!(v.left.len(), 1);
    assert_eq!(v.left[0].gateway_id, "old-pod");
    let text = render_rollout(&v);
    assert!(text.contains("east/old-pod left at"), "{text}");

    let mut killed = drained;
    killed.left = None;
    let v = view("c", &st, &[gw("east", "new-pod", Some("c")), killed]);
    assert_eq!(v.gateways_in(GatewayState::Pending), ["east/old-pod"]);
    assert!(v.left.is_empty());
}

#[test]
fn a_nack_of_the_commit_fails_the_rollout_with_the_reason() {
    let st = state_with(accepted("c", &["east", "west"]));
    let mut bad = gw("west", "w1", Some("a"));
    bad.nack = Some(("c".into(), "schema 2 not supported".into()));
    let v = view("c", &st, &[gw("east", "e1", Some("c")), bad]);
    assert_eq!(v.state, RolloutState::Nacked);
    assert_eq!(v.gateways_in(GatewayState::Nacked), ["west/w1"]);
    assert!(render_rollout(&v).contains("schema 2 not supported"));
}

#[test]
fn rejected_and_unknown_commits_are_told_apart() {
    let mut st = state_with(accepted("b", &["east"]));
    st.rejected.push_front(Rejected {
        commit: "x".into(),
        at: SystemTime::now(),
        reason: "1 error(s) in the policy".into(),
        diagnostics: Vec::new(),
    });
    assert_eq!(view("x", &st, &[]).state, RolloutState::Rejected);
    assert_eq!(view("c", &st, &[]).state, RolloutState::Unknown);
}

#[test]
fn per_cluster_targeting_limits_the_gateways_that_must_apply() {
    let st = state_with(accepted("c", &["west"]));
    let v = view(
        "c",
        &st,
        &[gw("east", "e1", None), gw("west", "w1", Some("c"))],
    );
    assert_eq!(v.state, RolloutState::Live);
    assert_eq!(v.clusters.keys().collect::<Vec<_>>(), ["west"]);
}

fn run(state: crate::waves::RunState, reason: Option<&str>) -> crate::waves::RunView {
    crate::waves::RunView {
        commit: "b".into(),
        state,
        wave: 2,
        waves: 3,
        plan: vec![
            vec!["edge".into()],
            vec!["west".into()],
            vec!["east".into()],
        ],
        bake_ms: 300_000,
        baking_since: None,
        reason: reason.map(str::to_string),
        failure: None,
        notes: Vec::new(),
    }
}

/// Issue 19: a run through the waves says where the commit stands; a
/// complete one leaves it to the gateways' ACKs.
#[test]
fn a_wave_run_overrides_the_acks_until_it_is_complete() {
    use crate::waves::RunState;
    let st = state_with(accepted("b", &["edge", "west", "east"]));
    let gws = [gw("edge", "e1", Some("b")), gw("west", "w1", Some("a"))];
    let mut v = view("b", &st, &gws);
    apply_run(&mut v, Some(run(RunState::Progressing, None)));
    assert_eq!(v.state, RolloutState::Progressing);
    assert!(v.detail.starts_with("wave 2 of 3 (west)"), "{}", v.detail);

    let mut v = view("b", &st, &gws);
    apply_run(
        &mut v,
        Some(run(
            RunState::RolledBack,
            Some("rolled back at wave 2 of 3 (west): gate success_rate"),
        )),
    );
    assert_eq!(v.state, RolloutState::RolledBack);
    assert!(v.detail.contains("success_rate"));
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["state"], "rolled-back");

    let mut v = view("b", &st, &gws);
    apply_run(&mut v, Some(run(RunState::Complete, None)));
    assert_eq!(v.state, RolloutState::Pending, "west has not applied it");
    assert!(v.waves.is_some());
}

#[test]
fn states_print_as_the_api_names_them() {
    for s in [
        RolloutState::Live,
        RolloutState::Pending,
        RolloutState::Nacked,
        RolloutState::Rejected,
        RolloutState::Held,
        RolloutState::Unknown,
        RolloutState::Progressing,
        RolloutState::RolledBack,
        RolloutState::Halted,
    ] {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
    for s in [
        RunState::Progressing,
        RunState::Complete,
        RunState::RolledBack,
        RunState::Halted,
        RunState::Superseded,
    ] {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
}
