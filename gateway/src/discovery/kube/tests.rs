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

/// Stores of every namespace, listed, holding these objects.
fn listed(svcs: Vec<Service>, slices: Vec<EndpointSlice>, pods: Map<PodMeta>) -> Stores {
    let mut services = Map {
        synced: true,
        ..Map::default()
    };
    for svc in svcs {
        services.objs.insert(key_of(&svc), svc);
    }
    let mut sls = Map {
        synced: true,
        ..Map::default()
    };
    for sl in slices {
        sls.objs.insert(key_of(&sl), sl);
    }
    let mut s = Stores::default();
    s.watched.insert(
        None,
        Watched {
            generation: 0,
            services,
            slices: sls,
            pods: Map {
                synced: true,
                ..pods
            },
            exports: None,
        },
    );
    s
}

fn stores(
    svcs: Vec<Service>,
    slices: Vec<EndpointSlice>,
    pods: &[(&str, &[(&str, &str)])],
) -> Stores {
    let mut m = Map::default();
    for (name, labels) in pods {
        let l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let meta: PartialObjectMeta<Pod> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": "default", "labels": l}
        }))
        .unwrap();
        m.objs
            .insert(("default".to_string(), name.to_string()), PodMeta::of(meta));
    }
    // Through the conversions the watchers apply on arrival.
    listed(
        svcs.into_iter().map(slim_service).collect(),
        slices.into_iter().map(slim_slice).collect(),
        m,
    )
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
fn a_relist_removes_objects_it_did_not_list_only_when_it_completes() {
    let mut m: Map<u32> = Map::default();
    let k = |n: &str| ("default".to_string(), n.to_string());
    assert!(!m.apply(Event::Init));
    assert!(m.apply(Event::InitApply((k("a"), 1))));
    assert!(m.apply(Event::InitDone));
    assert!(m.apply(Event::Apply((k("b"), 2))));
    assert!(
        !m.apply(Event::Apply((k("b"), 2))),
        "an unchanged object is no change"
    );
    // A relist (after 410 Gone) in progress: what it lists is applied as it
    // comes, what it has not listed (yet) stays visible.
    assert!(!m.apply(Event::Init));
    assert!(m.apply(Event::InitApply((k("b"), 3))));
    assert!(!m.apply(Event::InitApply((k("b"), 3))), "no change");
    assert_eq!(m.objs.len(), 2);
    // The relist is abandoned (the list failed) and restarted.
    assert!(!m.apply(Event::Init));
    assert_eq!(m.objs.len(), 2);
    assert!(!m.apply(Event::InitApply((k("b"), 3))));
    // Only now does `a`, which the relist did not list, go.
    assert!(m.apply(Event::InitDone));
    assert_eq!(m.objs.into_iter().collect::<Vec<_>>(), [(k("b"), 3)]);
}

/// The conversions on arrival keep what discovery and the mirror
/// controller read and drop the rest: a Service as `kubectl apply` and a
/// controller leave it (last-applied annotation, managedFields, status).
#[test]
fn slim_objects_keep_only_what_is_read() {
    let fat_meta = |labels: serde_json::Value| {
        json!({"name": "ratings", "namespace": "default", "labels": labels,
               "uid": "u-1", "resourceVersion": "7",
               "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(2000)},
               "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                  "fieldsV1": {"f:spec": {"f:ports": "y".repeat(2000)}}}]})
    };
    let svc: Service = serde_json::from_value(json!({
        "metadata": fat_meta(json!({"app": "ratings"})),
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "selector": {"app": "ratings"},
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 9080, "targetPort": 8080,
                            "protocol": "TCP", "appProtocol": "http"}]},
        "status": {"loadBalancer": {}}
    }))
    .unwrap();
    let full = serde_json::to_vec(&svc).unwrap().len();
    let slim = slim_service(svc.clone());
    let kept = serde_json::to_vec(&slim).unwrap().len();
    assert!(kept * 20 < full, "{kept} bytes kept of {full}");
    assert_eq!(key_of(&slim), key_of(&svc));
    let p = &slim.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        (p.name.as_deref(), p.port, p.protocol.as_deref()),
        (Some("http"), 9080, Some("TCP"))
    );
    assert_eq!(p.app_protocol.as_deref(), Some("http"));
    assert_eq!(
        slim.spec.as_ref().unwrap().type_.as_deref(),
        Some("ClusterIP")
    );

    // A mirror keeps what the controller compares and replaces.
    let mut mirror = svc.clone();
    mirror
        .metadata
        .labels
        .get_or_insert_default()
        .insert(MIRROR_OF_LABEL.into(), "ratings".into());
    let m = slim_service(mirror);
    assert!(m.metadata.managed_fields.is_none());
    assert_eq!(m.metadata.resource_version.as_deref(), Some("7"));
    assert_eq!(m.metadata.uid.as_deref(), Some("u-1"));
    assert!(m.metadata.annotations.is_some());
    assert_eq!(
        m.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.0.1")
    );

    let sl: EndpointSlice = serde_json::from_value(json!({
        "metadata": fat_meta(json!({"kubernetes.io/service-name": "ratings",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})),
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.1"], "zone": "z1", "nodeName": "node-1",
                       "hostname": "r-1", "hints": {"forZones": [{"name": "z1"}]},
                       "conditions": {"ready": true, "serving": true, "terminating": false},
                       "targetRef": {"kind": "Pod", "name": "r-1", "namespace": "default",
                                     "uid": "0c4f2a8e-6a37-4b7e-9d55-0d1c9b7b1f1a",
                                     "resourceVersion": "123456"}}]
    }))
    .unwrap();
    let full = serde_json::to_vec(&sl).unwrap().len();
    let slim = slim_slice(sl.clone());
    let kept = serde_json::to_vec(&slim).unwrap().len();
    assert!(kept * 10 < full, "{kept} bytes kept of {full}");
    assert_eq!(
        slim.metadata.labels,
        Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_string(),
            "ratings".to_string()
        )]))
    );
    let e = &slim.endpoints[0];
    assert_eq!(e.addresses, ["10.0.0.1"]);
    assert_eq!(e.zone.as_deref(), Some("z1"));
    assert_eq!(e.conditions, sl.endpoints[0].conditions);
    let r = e.target_ref.as_ref().unwrap();
    assert_eq!(
        (r.kind.as_deref(), r.name.as_deref(), r.namespace.as_deref()),
        (Some("Pod"), Some("r-1"), Some("default"))
    );
    assert!(r.uid.is_none() && e.node_name.is_none() && e.hints.is_none());

    // The endpoint set is the same from the slim objects as from whole ones.
    let whole = listed(vec![svc.clone()], vec![sl.clone()], Map::default());
    let slimmed = stores(vec![svc], vec![sl], &[]);
    assert_eq!(
        endpoint_set(&whole, "east", "cluster.local"),
        endpoint_set(&slimmed, "east", "cluster.local")
    );
    assert_eq!(
        service_ports(&whole, "cluster.local"),
        service_ports(&slimmed, "cluster.local")
    );
}

/// The mirror controller's objects are recognised by the labels it writes
/// (the strings here are the controller's constants).
#[test]
fn the_mirror_controllers_objects_are_kept_whole() {
    use crate::mirror::{MANAGED_BY, MANAGER, SLICE_MANAGED_BY, SLICE_MANAGER};
    for (k, v) in [(MANAGED_BY, MANAGER), (SLICE_MANAGED_BY, SLICE_MANAGER)] {
        let meta = ObjectMeta {
            labels: Some(BTreeMap::from([(k.to_string(), v.to_string())])),
            ..Default::default()
        };
        assert!(is_ours(&meta), "{k}={v}");
    }
    assert!(!is_ours(&ObjectMeta::default()));
}

/// A dual-stack pod is in an IPv4 and an IPv6 slice of its Service: one
/// endpoint, at its address of the Service's primary family (before, two,
/// so it weighed double in endpoint counts, locality weights and the
/// balancer). A pod with one family, and an endpoint without a pod, stay.
#[test]
fn a_dual_stack_pod_is_one_endpoint_of_the_services_primary_family() {
    let mut v6 = slice(
        "default",
        "ratings",
        json!([{"port": 9080}]),
        json!([
            ep("fd00::1", "a", true, true, false),
            ep("fd00::2", "b", true, true, false)
        ]),
    );
    v6.metadata.name = Some("ratings-v6".into());
    v6.address_type = "IPv6".into();
    let v4 = slice(
        "default",
        "ratings",
        json!([{"port": 9080}]),
        json!([
            ep("10.0.0.1", "a", true, true, false),
            {"addresses": ["10.0.0.9"], "conditions": {"ready": true}}
        ]),
    );
    let addrs = |families: serde_json::Value| {
        let mut svc = service("default", "ratings", json!([{"port": 9080}]), json!({}));
        if !families.is_null() {
            svc.spec.as_mut().unwrap().ip_families = serde_json::from_value(families).unwrap();
        }
        let s = stores(vec![svc], vec![v4.clone(), v6.clone()], &[]);
        let set = endpoint_set(&s, "east", "cluster.local");
        set[HOST]
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>()
    };
    // Pod a once (IPv4, the default primary); b has only IPv6; the
    // pod-less 10.0.0.9 stays.
    assert_eq!(
        addrs(serde_json::Value::Null),
        ["10.0.0.1:9080", "10.0.0.9:9080", "[fd00::2]:9080"]
    );
    assert_eq!(
        addrs(json!(["IPv6", "IPv4"])),
        ["10.0.0.9:9080", "[fd00::1]:9080", "[fd00::2]:9080"]
    );
}

/// A headless Service without ports (`clusterIP: None`, as a StatefulSet's
/// governing Service often is) has its pods as endpoints on any port: port
/// 0, which the balancer replaces with the requested one. Before, no
/// endpoints at all. A headless Service with ports is as any other.
#[test]
fn a_headless_service_without_ports_has_its_pods_on_any_port() {
    let mut svc = service("default", "ratings", json!(null), json!({}));
    svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    let sl = slice(
        "default",
        "ratings",
        json!(null),
        json!([ep("10.0.0.1", "a", true, true, false)]),
    );
    let s = stores(vec![svc.clone()], vec![sl], &[]);
    let set = endpoint_set(&s, "east", "cluster.local");
    let addrs: Vec<String> = set[HOST].iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["10.0.0.1:0"]);
    assert!(set[HOST][0].healthy);
    // Not headless, no ports: nothing to reach.
    svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.7".into());
    let sl = slice(
        "default",
        "ratings",
        json!(null),
        json!([ep("10.0.0.1", "a", true, true, false)]),
    );
    let s = stores(vec![svc], vec![sl], &[]);
    assert!(endpoint_set(&s, "east", "cluster.local")[HOST].is_empty());
}

/// A namespace newly watched joins the endpoint set once every kind of it
/// is listed, never half; removing it removes its entries and no other's.
#[test]
fn a_namespace_joins_whole_and_leaves_alone() {
    let mut s = stores(
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
            json!([ep("10.0.0.1", "a", true, true, false)]),
        )],
        &[],
    );
    let cart = service("shop", "cart", json!([{"port": 80}]), json!({}));
    let mut w = Watched {
        generation: 7,
        services: Map::default(),
        slices: Map::default(),
        pods: Map::default(),
        exports: None,
    };
    w.services.apply(Event::Init);
    w.services
        .apply(Event::InitApply((key_of(&cart), slim_service(cart))));
    w.services.apply(Event::InitDone);
    s.watched.insert(Some("shop".into()), w);
    let set = endpoint_set(&s, "east", "cluster.local");
    assert!(
        !set.contains_key("cart.shop.svc.cluster.local"),
        "half a namespace joined"
    );
    assert!(!s.namespace_synced("shop"));
    assert!(
        s.namespace_synced("default"),
        "default is covered by the all-namespace stores"
    );
    let w = s.watched_mut(&Some("shop".into()), 7).unwrap();
    w.slices.apply(Event::Init);
    w.slices.apply(Event::InitDone);
    w.pods.apply(Event::Init);
    w.pods.apply(Event::InitDone);
    assert!(
        s.watched_mut(&Some("shop".into()), 6).is_none(),
        "an older watch's events land"
    );
    let set = endpoint_set(&s, "east", "cluster.local");
    assert!(set.contains_key("cart.shop.svc.cluster.local"));
    assert_eq!(set[HOST].len(), 1);
    s.watched.remove(&Some("shop".to_string()));
    let set = endpoint_set(&s, "east", "cluster.local");
    assert!(!set.contains_key("cart.shop.svc.cluster.local"));
    assert_eq!(set[HOST].len(), 1, "another namespace's endpoints changed");
}
