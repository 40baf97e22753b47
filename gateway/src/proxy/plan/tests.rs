//! The plan's decisions on snapshots compiled from YAML, without a socket.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use meshfed_policy::snapshot::{AbortStatus, CLUSTER_LABEL};
use meshfed_policy::{Options, analyze};

use super::*;
use crate::endpoints::Endpoint;
use crate::retry_budget::{RetryBudget, Slot};

const POLICY: &str = "
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['e:1']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['w:1']}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /slow}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 100}}
      abort: {httpStatus: 503, percentage: {value: 50}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-mirror: {exact: '1'}}}]
    mirror: {host: ratings}
    mirrorPercentage: {value: 25}
    retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
    timeout: 3s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: '5xx,reset'}
";

fn active() -> Active {
    let a = analyze([("p.yaml", POLICY)], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap()
}

fn ep(port: u16, version: &str) -> Endpoint {
    Endpoint {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        labels: BTreeMap::from([
            ("version".into(), version.into()),
            (CLUSTER_LABEL.into(), "east".into()),
        ]),
        healthy: true,
    }
}

/// reviews v1 and v2, and ratings, all in this cluster (`east`).
fn endpoints() -> EndpointSet {
    EndpointSet::from([
        (
            "reviews.default.svc.cluster.local".to_string(),
            vec![ep(1, "v1"), ep(2, "v2")],
        ),
        (
            "ratings.default.svc.cluster.local".to_string(),
            vec![ep(3, "v1")],
        ),
    ])
}

/// Plans `GET path` to `authority` with `headers`, every percentage drawn
/// as `dice` says.
fn plan_for<'a>(
    active: &'a Active,
    endpoints: &EndpointSet,
    authority: &str,
    path: &str,
    headers: &[(&'static str, &'static str)],
    dice: bool,
) -> Result<Plan<'a>, NoPlan> {
    let uri: Uri = path.parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, http::HeaderValue::from_static(v));
    }
    let ask = Ask {
        method: &Method::GET,
        uri: &uri,
        authority,
        headers: &h,
        namespace: "default",
        verified: false,
        addr: None,
    };
    let view = View {
        active,
        local_cluster: "east",
        endpoints,
        remote: &[],
    };
    plan(&ask, &view, &mut |_| dice)
}

fn rule_index(p: &Plan<'_>) -> Option<usize> {
    p.target.rule.as_ref().map(|(_, i)| *i)
}

#[test]
fn the_first_matching_rule_decides_fault_retries_and_timeouts() {
    let active = active();
    let eps = endpoints();
    let p = plan_for(&active, &eps, "reviews", "/slow/x", &[], true).unwrap();
    assert_eq!(rule_index(&p), Some(0));
    assert_eq!(p.target.subset.as_deref(), Some("v1"));
    assert_eq!(p.cluster, "east");
    assert_eq!(p.fault.delay, Some(Duration::from_secs(2)));
    assert_eq!(p.fault.abort, Some(&AbortStatus::Http(503)));
    // No retries in the rule: Istio's default policy, no timeouts.
    assert_eq!(p.retry, Some(&RetryPolicy::istio_default()));
    assert_eq!((p.timeout, p.per_try), (None, None));
    assert!(p.mirrors.is_empty());

    // The same rule, with every percentage drawn out: no fault.
    let p = plan_for(&active, &eps, "reviews", "/slow/x", &[], false).unwrap();
    assert_eq!(p.fault, Fault::default());

    // The catch-all rule: its timeout and retry policy.
    let p = plan_for(&active, &eps, "reviews:9080", "/", &[], true).unwrap();
    assert_eq!(rule_index(&p), Some(2));
    assert_eq!(p.timeout, Some(Duration::from_secs(3)));
    assert_eq!(p.per_try, Some(Duration::from_millis(500)));
    let retry = p.retry.unwrap();
    assert_eq!(retry.attempts, 4);
    assert_eq!(retry.retry_on, ["5xx", "reset"]);
    assert_eq!(p.target.port, 9080);
}

#[test]
fn mirrors_are_drawn_by_their_percentage_and_attempts_0_means_no_retries() {
    let active = active();
    let eps = endpoints();
    let p = plan_for(&active, &eps, "reviews", "/", &[("x-mirror", "1")], true).unwrap();
    assert_eq!(rule_index(&p), Some(1));
    assert_eq!(p.mirrors.len(), 1);
    assert_eq!(p.mirrors[0].host, "ratings.default.svc.cluster.local");
    assert_eq!(p.mirrors[0].percent_ppm, 250_000);
    assert_eq!(p.retry, None);
    assert!(p.keeps_request(), "a mirror needs the request again");
    let p = plan_for(&active, &eps, "reviews", "/", &[("x-mirror", "1")], false).unwrap();
    assert!(p.mirrors.is_empty());
    assert!(!p.keeps_request());
}

#[test]
fn weighted_split_follows_the_weights_within_2_percent() {
    let active = active();
    let eps = endpoints();
    let n = 20_000;
    let v2 = (0..n)
        .filter(|_| {
            let p = plan_for(&active, &eps, "reviews", "/", &[], false).unwrap();
            assert_eq!(rule_index(&p), Some(2));
            // The destination the split picked is the plan's target.
            let d = p.destination.unwrap();
            assert_eq!(d.subset, p.target.subset);
            p.target.subset.as_deref() == Some("v2")
        })
        .count();
    let share = v2 as f64 / f64::from(n);
    assert!((share - 0.2).abs() < 0.02, "v2 got {share:.3} of calls");
}

#[test]
fn no_route_and_no_healthy_cluster_are_typed_refusals() {
    let active = active();
    let eps = endpoints();
    let no = plan_for(&active, &eps, "nothing.example", "/", &[], true).unwrap_err();
    assert_eq!(no.refusal().0, Refusal::NoRoute);
    assert!(no.routed().is_none());
    // Routed, but nothing anywhere serves reviews.
    let no = plan_for(&active, &EndpointSet::new(), "reviews", "/", &[], true).unwrap_err();
    let (refusal, message) = no.refusal();
    assert_eq!(refusal, Refusal::NoHealthyEndpoint);
    assert!(message.contains("reviews"), "{message}");
    assert!(
        no.routed()
            .is_some_and(|t| t.service.starts_with("reviews"))
    );
}

#[test]
fn header_edits_apply_rule_then_destination() {
    let yaml = POLICY.replace(
        "  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 80}",
        "  - headers: {request: {set: {x-rule: r}}, response: {add: {x-seen: rule}}}\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 80, headers: {request: {set: {x-rule: d}}, response: {add: {x-seen: dest}}}}",
    );
    let a = analyze([("p.yaml", yaml.as_str())], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let active = Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap();
    let eps = endpoints();
    let p = (0..200)
        .map(|_| plan_for(&active, &eps, "reviews", "/", &[], false).unwrap())
        .find(|p| p.target.subset.as_deref() == Some("v1"))
        .unwrap();
    let (mut parts, ()) = http::Request::new(()).into_parts();
    let mut authority = "reviews".to_string();
    p.edit_request(&mut parts, &mut authority);
    assert_eq!(parts.headers["x-rule"], "r");
    p.edit_request_for_destination(&mut parts.headers);
    assert_eq!(parts.headers["x-rule"], "d");
    let mut resp = HeaderMap::new();
    p.edit_response(&mut resp);
    let seen: Vec<_> = resp.get_all("x-seen").iter().collect();
    assert_eq!(seen, ["rule", "dest"]);
}

#[test]
fn a_plan_stays_small() {
    // It lives across every await of the request's execution.
    let size = std::mem::size_of::<Plan<'static>>();
    assert!(size <= 320, "Plan is {size} bytes");
}

#[test]
fn the_retry_budget_allows_20_percent_of_requests_and_at_least_3() {
    let budget = RetryBudget::default();
    let requests: Vec<Slot> = (0..10).map(|_| budget.request()).collect();
    let retries: Vec<Slot> = std::iter::from_fn(|| budget.retry()).take(100).collect();
    assert_eq!(retries.len(), 3, "at least 3, with 10 requests in flight");
    drop(retries);
    let more: Vec<Slot> = (0..40).map(|_| budget.request()).collect();
    let retries: Vec<Slot> = std::iter::from_fn(|| budget.retry()).take(100).collect();
    assert_eq!(retries.len(), 10, "20% of 50 requests in flight");
    // A slot returns when its retry is answered.
    drop(retries.into_iter().next());
    assert!(budget.retry().is_some());
    drop((requests, more));
}

#[test]
fn a_grpc_caller_sees_a_refusal_as_200_with_its_grpc_status() {
    let s = Seen::refused(Refusal::NoHealthyEndpoint, true);
    assert_eq!((s.status, s.grpc_status), (200, Some(14)));
    assert!(s.retriable(&["unavailable".into()]));
    assert!(!s.retriable(&["503".into()]));
    let s = Seen::refused(Refusal::NoHealthyEndpoint, false);
    assert_eq!((s.status, s.grpc_status), (503, None));
    assert!(s.retriable(&["503".into()]) && s.path_failed());
    let overloaded = Seen {
        overloaded: true,
        ..Seen::refused(Refusal::Overloaded, false)
    };
    assert!(!overloaded.retriable(&["5xx".into()]));
}

#[test]
fn backoff_doubles_from_25_ms_to_at_most_200_ms() {
    let full: Vec<u128> = (1..=6).map(|a| backoff(a, 1.0).as_millis()).collect();
    assert_eq!(full, [25, 50, 100, 200, 200, 200]);
    assert_eq!(backoff(3, 0.0), Duration::ZERO);
}
