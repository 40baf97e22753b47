use std::net::SocketAddr;

use meshfed_policy::{Options, analyze};

use super::*;
use crate::discovery::Endpoint;

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
  - {name: west, labels: {topology.istio.io/cluster: west}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {user-agent: {regex: '.*mobile.*'}}
    - uri: {prefix: /mobile}
    route: [{destination: {host: reviews, subset: v2}}]
  - match:
    - headers: {x-region: {exact: west}}
      method: {exact: GET}
    route: [{destination: {host: reviews, subset: west}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 70}
    - {destination: {host: reviews, subset: v2}, weight: 30}
";

fn active() -> Active {
    let a = analyze([("p.yaml", POLICY)], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap()
}

fn route(active: &Active, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<Target> {
    let method: Method = method.parse().unwrap();
    let uri: Uri = path.parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let req = RequestInfo {
        method: &method,
        uri: &uri,
        authority: "reviews:9080",
        headers: &h,
        scheme: "http",
        caller_namespace: "default",
    };
    http_target(active, &req, &EndpointSet::new(), 80)
}

fn rule_index(t: &Target) -> Option<usize> {
    t.rule.as_ref().map(|(_, i)| *i)
}

#[test]
fn the_first_matching_rule_wins_and_matches_are_ored() {
    let a = active();
    let mobile = route(&a, "GET", "/", &[("user-agent", "Mozilla mobile Safari")]).unwrap();
    assert_eq!(
        (mobile.subset.as_deref(), rule_index(&mobile)),
        (Some("v2"), Some(0))
    );
    assert_eq!(mobile.selector["version"], "v2");
    assert_eq!(mobile.port, 9080);
    let by_uri = route(&a, "GET", "/mobile/x", &[]).unwrap();
    assert_eq!(rule_index(&by_uri), Some(0));
}

#[test]
fn conditions_of_one_match_are_anded() {
    let a = active();
    let west = route(&a, "GET", "/", &[("x-region", "west")]).unwrap();
    assert_eq!(west.pinned_cluster(), Some("west"));
    let post = route(&a, "POST", "/", &[("x-region", "west")]).unwrap();
    assert_eq!(
        rule_index(&post),
        Some(2),
        "method differs, so the split rule applies"
    );
}

#[test]
fn regexes_match_the_whole_value() {
    let a = active();
    // `.*mobile.*` anchored still matches; a value without it does not.
    assert_eq!(
        rule_index(&route(&a, "GET", "/", &[("user-agent", "mobile")]).unwrap()),
        Some(0)
    );
    assert_eq!(
        rule_index(&route(&a, "GET", "/", &[("user-agent", "desktop")]).unwrap()),
        Some(2)
    );
}

#[test]
fn weighted_split_follows_weights_within_2_percent_over_10000_requests() {
    let a = active();
    let n = 10_000;
    let v2 = (0..n)
        .filter(|_| route(&a, "GET", "/", &[]).unwrap().subset.as_deref() == Some("v2"))
        .count();
    let share = v2 as f64 / n as f64;
    assert!((share - 0.30).abs() < 0.02, "v2 got {share}");
}

#[test]
fn unknown_hosts_have_no_target() {
    let a = active();
    let (m, u, h) = (Method::GET, Uri::from_static("/"), HeaderMap::new());
    let req = RequestInfo {
        method: &m,
        uri: &u,
        authority: "nothing",
        headers: &h,
        scheme: "http",
        caller_namespace: "default",
    };
    assert!(http_target(&a, &req, &EndpointSet::new(), 80).is_none());
}

fn ep(version: &str, healthy: bool) -> Endpoint {
    Endpoint {
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        labels: BTreeMap::from([
            ("version".into(), version.into()),
            (CLUSTER_LABEL.into(), "east".into()),
        ]),
        healthy,
    }
}

fn target(selector: &[(&str, &str)]) -> Target {
    Target {
        service: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: None,
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        rule: None,
    }
}

#[test]
fn clusters_are_chosen_by_healthy_endpoints_for_the_subset() {
    let mut local = EndpointSet::new();
    local.insert(
        "reviews.default.svc.cluster.local".into(),
        vec![ep("v1", true), ep("v2", false)],
    );
    let mut west = Announcement::default();
    west.services.insert(
        "reviews.default.svc.cluster.local".into(),
        vec![crate::tunnel::announce::EndpointGroup {
            labels: BTreeMap::from([("version".into(), "v2".into())]),
            total: 3,
            healthy: 3,
        }],
    );
    let remote = vec![("west".to_string(), Arc::new(west))];
    // Only west has a healthy v2.
    for _ in 0..50 {
        assert_eq!(
            choose_cluster(&target(&[("version", "v2")]), "east", &local, &remote).as_deref(),
            Some("west")
        );
    }
    // v3 nowhere.
    assert_eq!(
        choose_cluster(&target(&[("version", "v3")]), "east", &local, &remote),
        None
    );
    // Any version: east has 1 healthy, west 3: about a quarter stays local.
    let n = 4000;
    let east = (0..n)
        .filter(|_| {
            choose_cluster(&target(&[]), "east", &local, &remote).as_deref() == Some("east")
        })
        .count();
    assert!((east as f64 / n as f64 - 0.25).abs() < 0.04, "{east}");
    // A pinned cluster wins whatever the health.
    assert_eq!(
        choose_cluster(&target(&[(CLUSTER_LABEL, "west")]), "east", &local, &[]).as_deref(),
        Some("west")
    );
}

#[test]
fn authorities_split_into_host_and_port() {
    assert_eq!(split_authority("ratings:9080", 80), ("ratings", 9080));
    assert_eq!(split_authority("ratings", 80), ("ratings", 80));
    assert_eq!(split_authority("[::1]:8080", 80), ("::1", 8080));
    assert_eq!(split_authority("::1", 80), ("::1", 80));
}
