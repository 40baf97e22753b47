//! Mirror names and the desired mirror objects.

use super::*;
use crate::route::mirror_names::{Alias, alias};
use meshfed_policy::snapshot::ClusterInfo;

fn policy() -> ClusterPolicy {
    let mut p = ClusterPolicy {
        cluster: "east".into(),
        domain: "cluster.local".into(),
        ..Default::default()
    };
    for c in ["east", "west", "us-west"] {
        p.clusters.insert(c.into(), ClusterInfo::default());
    }
    p.exports.insert(
        "ratings.bookinfo.svc.cluster.local".into(),
        ["west".to_string(), "us-west".to_string()].into(),
    );
    p.exports.insert(
        "local-only.bookinfo.svc.cluster.local".into(),
        ["east".to_string()].into(),
    );
    p
}

const RATINGS: &str = "ratings.bookinfo.svc.cluster.local";

#[test]
fn mirror_names_map_to_the_service_and_its_cluster() {
    let p = policy();
    assert_eq!(
        alias(
            &p,
            "ratings-west.bookinfo.svc.cluster.local:9080",
            "default"
        ),
        Some(Alias::Cluster(RATINGS.into(), "west".into()))
    );
    // A cluster name with a dash, from a short name in the caller's namespace.
    assert_eq!(
        alias(&p, "ratings-us-west", "bookinfo"),
        Some(Alias::Cluster(RATINGS.into(), "us-west".into()))
    );
    assert_eq!(
        alias(&p, "ratings-clusterset.bookinfo", "default"),
        Some(Alias::ClusterSet(RATINGS.into()))
    );
    // Not exported from that cluster, not exported at all, not a mirror.
    assert_eq!(alias(&p, "ratings-east.bookinfo", "default"), None);
    assert_eq!(alias(&p, "reviews-west.bookinfo", "default"), None);
    assert_eq!(alias(&p, "ratings.bookinfo", "default"), None);
}

fn settings() -> MirrorSettings {
    MirrorSettings {
        target: ("meshfed-gateway".into(), "meshfed-system".into()),
        outbound_port: 15001,
        default_ports: vec![80],
        namespaces: vec![],
    }
}

#[test]
fn every_remote_export_gets_a_mirror_per_cluster_and_a_clusterset_one() {
    let p = policy();
    let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()];
    let mut local = BTreeMap::new();
    local.insert(
        ("bookinfo".to_string(), "ratings".to_string()),
        vec![("http".to_string(), 9080u16)],
    );
    let (want, problems) = desired(&p, &local, &ips, &settings());
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<&str> = want.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        ["ratings-us-west", "ratings-west", "ratings-clusterset"]
    );
    let west = &want[1];
    assert_eq!(west.namespace, "bookinfo");
    assert_eq!(west.service.labels()[MIRROR_OF_LABEL], "ratings");
    assert_eq!(west.service.labels()[MIRROR_CLUSTER_LABEL], "west");
    let spec = west.service.spec.as_ref().unwrap();
    assert!(spec.selector.is_none(), "a mirror selects no pods");
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 9080));
    let addrs: Vec<_> = west
        .slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(addrs, ["10.1.0.5", "10.1.0.6"]);
    assert_eq!(west.slice.ports.as_ref().unwrap()[0].port, Some(15001));
    assert_eq!(west.slice.labels()[SERVICE_NAME_LABEL], "ratings-west");

    // Without a local Service, the default ports.
    let (want, _) = desired(&p, &BTreeMap::new(), &ips, &settings());
    let port = &want[0]
        .service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0];
    assert_eq!(port.port, 80);
}

#[test]
fn a_desired_mirror_matches_itself_and_not_after_a_port_or_endpoint_change() {
    let p = policy();
    let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap()];
    let (a, _) = desired(&p, &BTreeMap::new(), &ips, &settings());
    assert!(service_matches(&a[0].service, &a[0].service));
    assert!(slice_matches(&a[0].slice, &a[0].slice));
    let mut s = settings();
    s.default_ports = vec![8080];
    let (b, _) = desired(&p, &BTreeMap::new(), &ips, &s);
    assert!(!service_matches(&a[0].service, &b[0].service));
    let (c, _) = desired(&p, &BTreeMap::new(), &[], &settings());
    assert!(!slice_matches(&a[0].slice, &c[0].slice));
}

#[test]
fn names_longer_than_a_dns_label_are_reported_not_created() {
    let mut p = policy();
    let long = "a".repeat(60);
    p.exports.insert(
        format!("{long}.bookinfo.svc.cluster.local"),
        ["west".to_string()].into(),
    );
    let (want, problems) = desired(&p, &BTreeMap::new(), &[], &settings());
    assert!(want.iter().all(|d| d.name.len() <= 63));
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("longer than 63"));
}
