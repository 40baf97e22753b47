use std::net::SocketAddr;

use meshfed_policy::{Options, analyze};

use super::*;
use crate::endpoints::Endpoint;

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
        failed_over_from: None,
        destination: None,
    }
}

fn announce(groups: &[(&str, u32)]) -> Arc<Announcement> {
    let mut a = Announcement::default();
    a.services.insert(
        "reviews.default.svc.cluster.local".into(),
        groups
            .iter()
            .map(|(v, n)| crate::wire::announce::EndpointGroup {
                labels: BTreeMap::from([("version".into(), v.to_string())]),
                total: *n,
                healthy: *n,
            })
            .collect(),
    );
    Arc::new(a)
}

/// How often each cluster is chosen over `n` tries.
fn shares(
    a: &Active,
    selector: &[(&str, &str)],
    local: &EndpointSet,
    remote: &[(String, Arc<Announcement>)],
    exclude: &[String],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let mut t = target(selector);
        let c = choose_cluster(&mut t, a, "east", local, remote, exclude)
            .unwrap_or_else(|| "none".into());
        *out.entry(c).or_insert(0) += 1;
    }
    out
}

#[test]
fn clusters_are_chosen_by_healthy_endpoints_for_the_subset() {
    let a = active();
    let mut local = EndpointSet::new();
    local.insert(
        "reviews.default.svc.cluster.local".into(),
        vec![ep("v1", true), ep("v2", false)],
    );
    let remote = vec![("west".to_string(), announce(&[("v2", 3)]))];
    // Only west has a healthy v2.
    assert_eq!(
        shares(&a, &[("version", "v2")], &local, &remote, &[], 50),
        BTreeMap::from([("west".into(), 50)])
    );
    // v3 nowhere.
    assert_eq!(
        shares(&a, &[("version", "v3")], &local, &remote, &[], 5),
        BTreeMap::from([("none".into(), 5)])
    );
    // Any version: the local cluster is preferred while it has a healthy
    // endpoint, even though west has more.
    assert_eq!(
        shares(&a, &[], &local, &remote, &[], 50),
        BTreeMap::from([("east".into(), 50)])
    );
    // A retry that failed locally goes to west.
    assert_eq!(
        shares(&a, &[], &local, &remote, &["east".into()], 20),
        BTreeMap::from([("west".into(), 20)])
    );
}

#[test]
fn a_pinned_cluster_without_healthy_endpoints_fails_over_with_the_rest_of_the_subset() {
    let a = active();
    let mut local = EndpointSet::new();
    local.insert(
        "reviews.default.svc.cluster.local".into(),
        vec![ep("v1", true), ep("v2", true)],
    );
    let west = vec![("west".to_string(), announce(&[("v2", 2)]))];
    let pinned = [(CLUSTER_LABEL, "west"), ("version", "v2")];
    // Healthy: the pin holds.
    assert_eq!(
        shares(&a, &pinned, &local, &west, &[], 30),
        BTreeMap::from([("west".into(), 30)])
    );
    // West's link down (no announcement): east's v2 serves, and the target
    // no longer carries west's cluster label.
    let mut t = target(&pinned);
    assert_eq!(
        choose_cluster(&mut t, &a, "east", &local, &[], &[]).as_deref(),
        Some("east")
    );
    assert_eq!(t.failed_over_from.as_deref(), Some("west"));
    assert_eq!(
        t.selector,
        BTreeMap::from([("version".into(), "v2".into())])
    );
    // Nowhere to go: the pinned cluster, so that its path reports the error.
    let mut t = target(&[(CLUSTER_LABEL, "west"), ("version", "v9")]);
    assert_eq!(
        choose_cluster(&mut t, &a, "east", &local, &[], &[]).as_deref(),
        Some("west")
    );
}

const LOCALITY: &str = "
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['e:1'], locality: {region: us-east1, zone: a}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east-b}
spec: {gateways: ['eb:1'], locality: {region: us-east1, zone: b}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['w:1'], locality: {region: us-west1, zone: a}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: europe}
spec: {gateways: ['eu:1'], locality: {region: europe-west1, zone: a}}
";

fn locality_active(dr: &str) -> Active {
    let text = format!("{LOCALITY}---\n{dr}");
    let a = analyze([("p.yaml", text.as_str())], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap()
}

#[test]
fn remote_clusters_are_tried_in_locality_order() {
    let everywhere = vec![
        ("east-b".to_string(), announce(&[("v1", 1)])),
        ("west".to_string(), announce(&[("v1", 1)])),
        ("europe".to_string(), announce(&[("v1", 1)])),
    ];
    let none = EndpointSet::new();
    let plain = locality_active(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: reviews}\n",
    );
    // Same region first.
    assert_eq!(
        shares(&plain, &[], &none, &everywhere, &[], 20),
        BTreeMap::from([("east-b".into(), 20)])
    );
    // Then any other region (without a failover rule, both are tier 4).
    let far = shares(&plain, &[], &none, &everywhere, &["east-b".into()], 400);
    assert_eq!(
        far.keys().collect::<Vec<_>>(),
        ["europe", "west"],
        "{far:?}"
    );
    // A failover rule makes us-west1 the next region.
    let failover = locality_active(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover: [{from: us-east1, to: us-west1}]
",
    );
    assert_eq!(
        shares(&failover, &[], &none, &everywhere, &["east-b".into()], 20),
        BTreeMap::from([("west".into(), 20)])
    );
    // Disabled: no preference, by healthy counts.
    let off = locality_active(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: false}}}
",
    );
    let spread = shares(&off, &[], &none, &everywhere, &[], 600);
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|n| *n > 120), "{spread:?}");
}

#[test]
fn distribute_weights_localities() {
    let everywhere = vec![
        ("east-b".to_string(), announce(&[("v1", 1)])),
        ("west".to_string(), announce(&[("v1", 5)])),
    ];
    let a = locality_active(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        distribute:
        - from: us-east1/*
          to: {'us-east1/*': 80, 'us-west1/*': 20}
",
    );
    let n = 4000;
    let got = shares(&a, &[], &EndpointSet::new(), &everywhere, &[], n);
    let east_b = got.get("east-b").copied().unwrap_or(0) as f64 / n as f64;
    assert!((east_b - 0.8).abs() < 0.04, "{got:?}");
}

#[test]
fn authorities_split_into_host_and_port() {
    assert_eq!(split_authority("ratings:9080", 80), ("ratings", 9080));
    assert_eq!(split_authority("ratings", 80), ("ratings", 80));
    assert_eq!(split_authority("[::1]:8080", 80), ("::1", 8080));
    assert_eq!(split_authority("::1", 80), ("::1", 80));
}

const SOURCE_POLICY: &str = "
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['e:1']}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceNamespace: frontend}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{sourceLabels: {app: productpage, version: v1}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v1}}]
";

fn source_active() -> Active {
    let a = analyze([("p.yaml", SOURCE_POLICY)], &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    Active::new(Arc::new(
        a.compile("east", "v1", &Options::default()).unwrap(),
    ))
    .unwrap()
}

fn subset_for(active: &Active, source: &Source<'_>) -> Option<String> {
    let (method, uri, h) = (Method::GET, Uri::from_static("/"), HeaderMap::new());
    let req = RequestInfo {
        method: &method,
        uri: &uri,
        authority: "reviews",
        headers: &h,
        scheme: "http",
        caller_namespace: "default",
    };
    http_target_from(active, &req, source, &EndpointSet::new(), 80)
        .unwrap()
        .subset
}

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn source_namespace_matches_only_a_caller_with_that_certificate_namespace() {
    let a = source_active();
    let from = |ns| Source {
        namespace: ns,
        labels: None,
    };
    assert_eq!(
        subset_for(&a, &from(Some("frontend"))).as_deref(),
        Some("v2")
    );
    assert_eq!(
        subset_for(&a, &from(Some("default"))).as_deref(),
        Some("v1")
    );
    // A caller without a workload certificate has no namespace.
    assert_eq!(subset_for(&a, &from(None)).as_deref(), Some("v1"));
    // `http_target` knows no caller: the rules on the source never match.
    assert!(a.uses_source_labels());
}

#[test]
fn source_labels_need_every_label_on_the_caller() {
    let a = source_active();
    let pp = labels(&[("app", "productpage"), ("version", "v1"), ("x", "y")]);
    let other = labels(&[("app", "productpage"), ("version", "v2")]);
    let with = |l| Source {
        namespace: None,
        labels: l,
    };
    assert_eq!(subset_for(&a, &with(Some(&pp))).as_deref(), Some("v3"));
    assert_eq!(subset_for(&a, &with(Some(&other))).as_deref(), Some("v1"));
    // A caller not in discovery has no labels.
    assert_eq!(subset_for(&a, &with(None)).as_deref(), Some("v1"));
}

#[test]
fn a_callers_labels_are_those_its_address_carries_in_discovery() {
    let ep = |addr: &str, l: &[(&str, &str)]| Endpoint {
        addr: addr.parse::<SocketAddr>().unwrap(),
        labels: labels(l),
        healthy: true,
    };
    let set = EndpointSet::from([
        (
            "productpage.default.svc.cluster.local".to_string(),
            vec![ep(
                "10.0.0.5:9080",
                &[("app", "productpage"), ("version", "v1")],
            )],
        ),
        (
            "metrics.default.svc.cluster.local".to_string(),
            vec![ep(
                "10.0.0.5:9090",
                &[("app", "productpage"), ("version", "v2")],
            )],
        ),
        (
            "other.shop.svc.cluster.local".to_string(),
            vec![ep("10.0.0.6:80", &[("app", "cart")])],
        ),
    ]);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Two endpoints share 10.0.0.5: only the labels both carry count.
    assert_eq!(
        source_labels(&set, ip("10.0.0.5"), None),
        Some(labels(&[("app", "productpage")]))
    );
    assert_eq!(
        source_labels(&set, ip("10.0.0.6"), Some("shop")),
        Some(labels(&[("app", "cart")]))
    );
    // With the caller's namespace known, other namespaces' endpoints are
    // not the caller.
    assert_eq!(source_labels(&set, ip("10.0.0.6"), Some("default")), None);
    assert_eq!(source_labels(&set, ip("10.9.9.9"), None), None);
}

#[test]
fn short_names_are_single_labels_with_or_without_a_port() {
    for short in ["ratings", "ratings-west:9080", "ratings.", "localhost:80"] {
        assert!(is_short_name(short), "{short}");
    }
    for long in [
        "ratings.bookinfo",
        "ratings.bookinfo:9080",
        "ratings.bookinfo.svc.cluster.local",
        "10.0.0.1:80",
        "[::1]:80",
        "",
        ":80",
    ] {
        assert!(!is_short_name(long), "{long}");
    }
}

#[test]
fn a_callers_namespace_is_told_by_its_address_among_local_endpoints_or_not_at_all() {
    let at = |ip: &str| Endpoint {
        addr: SocketAddr::new(ip.parse().unwrap(), 9080),
        labels: Default::default(),
        healthy: true,
    };
    let local: EndpointSet = [
        (
            "productpage.bookinfo.svc.cluster.local",
            vec![at("10.0.0.5")],
        ),
        // Two services of one pod: still one namespace.
        ("details.bookinfo.svc.cluster.local", vec![at("10.0.0.5")]),
        ("ratings.default.svc.cluster.local", vec![at("10.0.0.7")]),
        // A node's address, behind host-network pods of two namespaces.
        ("agent.monitoring.svc.cluster.local", vec![at("10.0.1.1")]),
        ("proxy.kube-system.svc.cluster.local", vec![at("10.0.1.1")]),
        // A ServiceEntry's host carries no namespace.
        ("api.example.com", vec![at("10.0.0.9")]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ns = |ip: &str| caller_namespace(&local, ip.parse().unwrap(), "cluster.local");
    assert_eq!(ns("10.0.0.5"), Some("bookinfo"));
    assert_eq!(ns("10.0.0.7"), Some("default"));
    assert_eq!(ns("10.0.1.1"), None, "ambiguous: never guessed");
    assert_eq!(ns("10.0.0.9"), None, "a ServiceEntry endpoint");
    assert_eq!(ns("10.9.9.9"), None, "unknown");
    // Another cluster domain: nothing matches.
    assert_eq!(
        caller_namespace(&local, "10.0.0.5".parse().unwrap(), "corp.local"),
        None
    );
}
