//! The endpoint rules of Kubernetes discovery, on objects built in memory.

use super::*;
use serde_json::json;

fn service(ns: &str, name: &str, ports: serde_json::Value, labels: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"ports": ports, "selector": {"app": name}}
    }))
    .unwrap()
}

fn slice(ns: &str, svc: &str, ports: serde_json::Value, eps: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{svc}-abc"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": eps
    }))
    .unwrap()
}

fn ep(ip: &str, pod: &str, ready: bool, serving: bool, terminating: bool) -> serde_json::Value {
    json!({"addresses": [ip], "zone": "z1",
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}})
}

fn stores(
    svcs: Vec<Service>,
    slices: Vec<EndpointSlice>,
    pods: &[(&str, &[(&str, &str)])],
) -> Stores {
    let mut s = Stores::default();
    let mut m = Map::default();
    for svc in svcs {
        m.objs.insert(key_of(&svc), svc);
    }
    s.services.push(m);
    let mut m = Map::default();
    for sl in slices {
        m.objs.insert(key_of(&sl), sl);
    }
    s.slices.push(m);
    let mut m = Map::default();
    for (name, labels) in pods {
        let l = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.objs.insert(
            ("default".to_string(), name.to_string()),
            PodMeta {
                labels: l,
                deleting: false,
            },
        );
    }
    s.pods.push(m);
    s
}

const HOST: &str = "ratings.default.svc.cluster.local";

#[test]
fn ready_endpoints_get_pod_labels_zone_and_cluster_and_noisy_labels_are_dropped() {
    let s = stores(
        vec![service(
            "default",
            "ratings",
            json!([{"port": 9080}]),
            json!({}),
        )],
        vec![slice(
            "default",
            "ratings",
            json!([{"port": 9080}]),
            json!([ep("10.0.0.1", "r-1", true, true, false)]),
        )],
        &[("r-1", &[("version", "v1"), ("pod-template-hash", "abc")])],
    );
    let set = endpoint_set(&s, "east", "cluster.local");
    let eps = &set[HOST];
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].addr, "10.0.0.1:9080".parse().unwrap());
    assert!(eps[0].healthy);
    assert_eq!(eps[0].labels["version"], "v1");
    assert_eq!(eps[0].labels[CLUSTER_LABEL], "east");
    assert_eq!(eps[0].labels[ZONE_LABEL], "z1");
    assert!(!eps[0].labels.contains_key("pod-template-hash"));
    assert!(!eps[0].labels.contains_key(PORT_LABEL));
}

#[test]
fn terminating_but_serving_endpoints_serve_only_when_nothing_is_ready() {
    let svc = || service("default", "ratings", json!([{"port": 9080}]), json!({}));
    let both = stores(
        vec![svc()],
        vec![slice(
            "default",
            "ratings",
            json!([{"port": 9080}]),
            json!([
                ep("10.0.0.1", "a", true, true, false),
                ep("10.0.0.2", "b", false, true, true),
                ep("10.0.0.3", "c", false, false, false),
            ]),
        )],
        &[],
    );
    let set = endpoint_set(&both, "east", "cluster.local");
    let healthy: Vec<_> = set[HOST]
        .iter()
        .filter(|e| e.healthy)
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(healthy, ["10.0.0.1:9080"]);
    assert_eq!(
        set[HOST].len(),
        3,
        "not-ready endpoints are listed, unhealthy"
    );

    let draining = stores(
        vec![svc()],
        vec![slice(
            "default",
            "ratings",
            json!([{"port": 9080}]),
            json!([
                ep("10.0.0.2", "b", false, true, true),
                ep("10.0.0.4", "d", false, false, true),
            ]),
        )],
        &[],
    );
    let set = endpoint_set(&draining, "east", "cluster.local");
    let healthy: Vec<_> = set[HOST]
        .iter()
        .filter(|e| e.healthy)
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(
        healthy,
        ["10.0.0.2:9080"],
        "the last serving pod keeps traffic while it drains"
    );
}

#[test]
fn multi_port_services_label_endpoints_with_the_service_port_matched_by_name() {
    let s = stores(
        vec![service(
            "default",
            "ratings",
            json!([
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "grpc", "port": 9090},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]),
            json!({}),
        )],
        vec![slice(
            "default",
            "ratings",
            json!([
                {"name": "grpc", "port": 9091}, {"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}
            ]),
            json!([ep("10.0.0.1", "a", true, true, false)]),
        )],
        &[],
    );
    let set = endpoint_set(&s, "east", "cluster.local");
    let mut got: Vec<_> = set[HOST]
        .iter()
        .map(|e| (e.labels[PORT_LABEL].clone(), e.addr.port()))
        .collect();
    got.sort();
    assert_eq!(got, [("80".to_string(), 8080), ("9090".to_string(), 9091)]);
}

#[test]
fn mirror_and_external_name_services_are_not_discovered_and_a_service_without_slices_is_empty() {
    let mirror = service(
        "default",
        "ratings-west",
        json!([{"port": 9080}]),
        json!({MIRROR_OF_LABEL: "ratings"}),
    );
    let ext: Service = serde_json::from_value(json!({
        "metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}
    }))
    .unwrap();
    let lonely = service("default", "lonely", json!([{"port": 80}]), json!({}));
    let s = stores(vec![mirror, ext, lonely], vec![], &[]);
    let set = endpoint_set(&s, "east", "cluster.local");
    assert_eq!(
        set.keys().collect::<Vec<_>>(),
        ["lonely.default.svc.cluster.local"]
    );
    assert!(set["lonely.default.svc.cluster.local"].is_empty());
}

#[test]
fn a_relist_replaces_objects_only_when_it_completes() {
    let mut m: Map<u32> = Map::default();
    let k = |n: &str| ("default".to_string(), n.to_string());
    assert!(!m.apply(Event::Init));
    assert!(!m.apply(Event::InitApply((k("a"), 1))));
    assert!(m.apply(Event::InitDone));
    assert!(m.apply(Event::Apply((k("b"), 2))));
    assert!(
        !m.apply(Event::Apply((k("b"), 2))),
        "an unchanged object is no change"
    );
    // A relist (after 410 Gone) in progress: the old objects stay visible.
    assert!(!m.apply(Event::Init));
    assert!(!m.apply(Event::InitApply((k("b"), 3))));
    assert_eq!(m.objs.len(), 2);
    // The relist is abandoned (the list failed) and restarted.
    assert!(!m.apply(Event::Init));
    assert_eq!(m.objs.len(), 2);
    assert!(!m.apply(Event::InitApply((k("b"), 3))));
    assert!(m.apply(Event::InitDone));
    assert_eq!(m.objs.into_iter().collect::<Vec<_>>(), [(k("b"), 3)]);
}
