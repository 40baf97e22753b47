//! Mirror names and the desired mirror objects.

use super::*;
use crate::route::mirror_names::{Alias, alias};
use meshfed_policy::snapshot::{ClusterInfo, ClusterPolicy};

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

/// What a gateway following `p` would serve on `/mirror/view`.
fn view(p: &ClusterPolicy) -> GatewayView {
    GatewayView {
        cluster: p.cluster.clone(),
        gateway: "gw-0".into(),
        domain: p.domain.clone(),
        applied: applied(
            "c1",
            crate::state::provenance::Source::File { dir: "p".into() },
        ),
        outbound_port: 15001,
        exports: p.exports.clone(),
        announced: Vec::new(),
    }
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

fn tcp(port: u16, name: &str, app: Option<&str>) -> ServicePort {
    ServicePort {
        port,
        name: name.into(),
        protocol: "TCP".into(),
        app_protocol: app.map(str::to_string),
    }
}

fn service_ports(d: &Desired) -> Vec<(String, i32, Option<String>)> {
    d.service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.port, p.app_protocol))
        .collect()
}

fn settings() -> MirrorSettings {
    MirrorSettings {
        target: ("meshfed-gateway".into(), "meshfed-system".into()),
        outbound_port: 15001,
        default_ports: vec![80],
    }
}

#[test]
fn every_remote_export_gets_a_mirror_per_cluster_and_a_clusterset_one() {
    let p = policy();
    let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()];
    let mut local = PortSources::default();
    local.local.insert(
        ("bookinfo".to_string(), "ratings".to_string()),
        vec![tcp(9080, "http", None)],
    );
    let (want, problems) = desired(&view(&p), &local, &ips, &settings());
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
    let (want, _) = desired(&view(&p), &PortSources::default(), &ips, &settings());
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
    let (a, _) = desired(&view(&p), &PortSources::default(), &ips, &settings());
    assert!(service_matches(&a[0].service, &a[0].service));
    assert!(slice_matches(&a[0].slice, &a[0].slice));
    let mut s = settings();
    s.default_ports = vec![8080];
    let (b, _) = desired(&view(&p), &PortSources::default(), &ips, &s);
    assert!(!service_matches(&a[0].service, &b[0].service));
    let (c, _) = desired(&view(&p), &PortSources::default(), &[], &settings());
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
    let (want, problems) = desired(&view(&p), &PortSources::default(), &[], &settings());
    assert!(want.iter().all(|d| d.name.len() <= 63));
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("longer than 63"));
}

/// A mirror declares the ports its cluster announced (names, numbers and
/// appProtocol), not a same-named local Service's or the default; the
/// clusterset mirror has every cluster's; the slice names the same ports,
/// each on the outbound listener.
#[test]
fn mirrors_declare_the_ports_their_cluster_announced() {
    let p = policy();
    let mut sources = PortSources::default();
    sources.announced.insert(
        ("west".into(), RATINGS.into()),
        vec![
            tcp(9080, "http", Some("http")),
            tcp(9090, "grpc", Some("kubernetes.io/h2c")),
        ],
    );
    sources.announced.insert(
        ("us-west".into(), RATINGS.into()),
        vec![tcp(9080, "", None)],
    );
    sources.local.insert(
        ("bookinfo".into(), "ratings".into()),
        vec![tcp(8080, "web", None)],
    );
    let (want, problems) = desired(&view(&p), &sources, &[], &settings());
    assert!(problems.is_empty(), "{problems:?}");
    let by_name = |n: &str| want.iter().find(|d| d.name == n).unwrap();
    let west = by_name("ratings-west");
    assert_eq!(
        service_ports(west),
        [
            ("http".into(), 9080, Some("http".into())),
            ("grpc".into(), 9090, Some("kubernetes.io/h2c".into()))
        ]
    );
    assert_eq!(
        west.service.annotations()[PORTS_FROM_ANNOTATION],
        "announcement"
    );
    let slice_ports: Vec<_> = west
        .slice
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.port.unwrap(), p.app_protocol))
        .collect();
    assert_eq!(
        slice_ports,
        [
            ("http".into(), 15001, Some("http".into())),
            ("grpc".into(), 15001, Some("kubernetes.io/h2c".into()))
        ]
    );
    assert_eq!(
        service_ports(by_name("ratings-us-west")),
        [("port-9080".into(), 9080, None)]
    );
    // The federated one: the local Service's first, then each port number
    // once.
    assert_eq!(
        service_ports(by_name("ratings-clusterset")),
        [
            ("web".into(), 8080, None),
            ("http".into(), 9080, Some("http".into())),
            ("grpc".into(), 9090, Some("kubernetes.io/h2c".into()))
        ]
    );
    // A mirror whose cluster announced nothing falls back (local Service).
    sources
        .announced
        .remove(&("us-west".to_string(), RATINGS.to_string()));
    let (want, _) = desired(&view(&p), &sources, &[], &settings());
    let us = want.iter().find(|d| d.name == "ratings-us-west").unwrap();
    assert_eq!(service_ports(us), [("web".into(), 8080, None)]);
    assert_eq!(
        us.service.annotations()[PORTS_FROM_ANNOTATION],
        "local-service"
    );
    // A changed appProtocol is a change to write.
    let mut other = sources.clone();
    other.announced.insert(
        ("west".into(), RATINGS.into()),
        vec![
            tcp(9080, "http", None),
            tcp(9090, "grpc", Some("kubernetes.io/h2c")),
        ],
    );
    let (changed, _) = desired(&view(&p), &other, &[], &settings());
    let w2 = changed.iter().find(|d| d.name == "ratings-west").unwrap();
    assert!(!service_matches(&west.service, &w2.service));
    assert!(!slice_matches(&west.slice, &w2.slice));
}

/// A peer's port strings are input, and the API server refuses a Service
/// with an invalid or repeated name, a repeated port or a bad appProtocol:
/// every one is made valid (or dropped) before it is written.
#[test]
fn hostile_announced_ports_are_made_valid_before_they_are_written() {
    let got = mirror_ports(&[
        tcp(80, "http", None),
        tcp(80, "again", None),                 // repeated number
        tcp(81, "http", None),                  // repeated name
        tcp(82, "Not_A-Name", Some("../../x")), // invalid both
        tcp(83, &"a".repeat(16), Some("http")), // name too long
        tcp(0, "zero", None),                   // no port
        ServicePort {
            protocol: "UDP".into(),
            ..tcp(53, "dns", None)
        }, // not proxied
        tcp(84, "port-81", Some("example.com/my-proto")),
        tcp(85, "x--y", Some(&"p".repeat(64))),
        tcp(86, "port-87", None),
        tcp(87, "", None), // its `port-87` is taken
    ]);
    let got: Vec<_> = got
        .into_iter()
        .map(|p| (p.port, p.name, p.app_protocol))
        .collect();
    assert_eq!(
        got,
        [
            (80, "http".into(), None),
            (81, "port-81".into(), None),
            (82, "port-82".into(), None),
            (83, "port-83".into(), Some("http".into())),
            (84, "port-84".into(), Some("example.com/my-proto".into())),
            (85, "port-85".into(), None),
            (86, "port-87".into(), None),
            (87, "port-87-7".into(), None),
        ]
    );
}

/// Ports only a non-TCP protocol serves give no mirror, and say why.
#[test]
fn a_service_without_a_tcp_port_gets_no_mirror_and_a_reason() {
    let p = policy();
    let mut sources = PortSources::default();
    for c in ["west", "us-west"] {
        sources.announced.insert(
            (c.into(), RATINGS.into()),
            vec![ServicePort {
                protocol: "UDP".into(),
                ..tcp(53, "dns", None)
            }],
        );
    }
    let (want, problems) = desired(&view(&p), &sources, &[], &settings());
    assert!(want.is_empty(), "{want:?}");
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains("no TCP port"), "{problems:?}");
}

fn applied(
    version: &str,
    source: crate::state::provenance::Source,
) -> crate::state::provenance::Applied {
    crate::state::provenance::Applied {
        version: version.into(),
        content_hash: String::new(),
        source,
        applied_at_unix_ms: 0,
    }
}

/// Never delete a mirror based on an older snapshot than the one that
/// wrote it: a snapshot read from the state directory at start may be
/// older than another replica's, so it deletes only what a version it
/// applied wrote; one from the syncer or the policy directory is the
/// newest there is.
#[test]
fn a_snapshot_from_the_state_directory_deletes_only_what_a_version_it_knows_wrote() {
    use crate::state::provenance::Source;
    let seen: BTreeSet<String> = ["c1".to_string(), "c2".to_string()].into();
    let from_disk = applied(
        "c2",
        Source::StateDir {
            path: "/var/lib/meshfed".into(),
        },
    );
    assert!(
        may_delete(None, &from_disk, &seen),
        "unrecorded (older releases)"
    );
    assert!(may_delete(Some("c2"), &from_disk, &seen));
    assert!(may_delete(Some("c1"), &from_disk, &seen));
    assert!(
        !may_delete(Some("c3"), &from_disk, &seen),
        "c3 may be newer"
    );
    let live = applied(
        "c4",
        Source::Syncer {
            addr: "syncer:15012".into(),
            id: "spiffe://td/meshfed/syncer".into(),
        },
    );
    assert!(may_delete(Some("c3"), &live, &seen));
    let file = applied(
        "c4",
        Source::File {
            dir: "/policy".into(),
        },
    );
    assert!(may_delete(Some("c3"), &file, &seen));
}

/// A view read from a gateway is input: names that are not valid
/// Kubernetes names never reach the API server, each is reported.
#[test]
fn a_view_with_hostile_names_makes_no_mirror_of_them() {
    let mut p = policy();
    p.exports.clear();
    for host in [
        "ratings.Kube_System.svc.cluster.local",
        "ratings.-bad.svc.cluster.local",
        "Ratings.bookinfo.svc.cluster.local",
        "rat/ings.bookinfo.svc.cluster.local",
        "ratings.bookinfo.svc.cluster.local",
    ] {
        p.exports.insert(host.into(), ["west".to_string()].into());
    }
    let (want, problems) = desired(&view(&p), &PortSources::default(), &[], &settings());
    let names: Vec<String> = want
        .iter()
        .map(|d| format!("{}/{}", d.namespace, d.name))
        .collect();
    assert_eq!(
        names,
        ["bookinfo/ratings-west", "bookinfo/ratings-clusterset"]
    );
    assert_eq!(problems.len(), 6, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`Kube_System` is not a valid namespace name")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`Ratings-west` is not a valid Service name")),
        "{problems:#?}"
    );
}

#[test]
fn a_view_is_refused_when_it_is_too_large_malformed_or_of_another_cluster() {
    use super::view::{MAX_VIEW_BYTES, ViewError};
    let good = serde_json::to_vec(&view(&policy())).unwrap();
    let parsed = GatewayView::parse(&good, Some("east")).unwrap();
    assert_eq!(parsed.exports, policy().exports);
    assert!(matches!(
        GatewayView::parse(&good, Some("west")),
        Err(ViewError::WrongCluster { .. })
    ));
    assert!(matches!(
        GatewayView::parse(b"{\"cluster\": 1}", None),
        Err(ViewError::Malformed(_))
    ));
    let huge = vec![b' '; MAX_VIEW_BYTES + 1];
    assert!(matches!(
        GatewayView::parse(&huge, None),
        Err(ViewError::TooLarge(_))
    ));
}

/// Gateways may disagree for a while: the controller follows a snapshot
/// from the syncer over one read from a state directory, then the most
/// recently applied, so a replica left behind does not make mirrors flap.
#[test]
fn the_controller_follows_the_syncers_newest_snapshot_among_the_gateways_views() {
    use crate::state::provenance::Source;
    let at = |gateway: &str, version: &str, source: Source, ms: u64| {
        let mut v = view(&policy());
        v.gateway = gateway.into();
        v.applied = applied(version, source);
        v.applied.applied_at_unix_ms = ms;
        v
    };
    let syncer = || Source::Syncer {
        addr: "s:15012".into(),
        id: "spiffe://x/syncer".into(),
    };
    let disk = || Source::StateDir {
        path: "/var/lib/meshfed".into(),
    };
    let chosen = controller::choose(vec![
        at("gw-0", "old", syncer(), 1_000),
        at("gw-1", "new", syncer(), 2_000),
        at("gw-2", "restarted", disk(), 3_000),
    ])
    .unwrap();
    assert_eq!(chosen.applied.version, "new");
    // The same in any order.
    let chosen = controller::choose(vec![
        at("gw-2", "restarted", disk(), 3_000),
        at("gw-1", "new", syncer(), 2_000),
        at("gw-0", "old", syncer(), 1_000),
    ])
    .unwrap();
    assert_eq!(chosen.applied.version, "new");
    // Only state-directory views: the newest of them.
    let chosen = controller::choose(vec![
        at("gw-2", "a", disk(), 3_000),
        at("gw-3", "b", disk(), 4_000),
    ])
    .unwrap();
    assert_eq!(chosen.applied.version, "b");
    assert!(controller::choose(Vec::new()).is_none());
}

/// A PUT replaces the whole object: an update keeps what others set.
#[test]
fn an_update_keeps_what_other_controllers_set_on_a_mirror() {
    let p = policy();
    let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap()];
    let (want, _) = desired(&view(&p), &PortSources::default(), &ips, &settings());
    let d = &want[0];
    let mut cur: Service = d.service.clone();
    cur.labels_mut().insert("team".into(), "payments".into());
    cur.annotations_mut()
        .insert("example.com/owner".into(), "ops".into());
    cur.metadata.finalizers = Some(vec!["example.com/keep".into()]);
    cur.metadata.resource_version = Some("42".into());
    let spec = cur.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.cluster_ip = Some("10.96.0.9".into());
    spec.ports.as_mut().unwrap()[0].port = 8080;
    let next = onto_service(&cur, &d.service);
    assert_eq!(next.labels()["team"], "payments");
    assert_eq!(next.labels()[MANAGED_BY], MANAGER);
    assert_eq!(next.annotations()["example.com/owner"], "ops");
    assert_eq!(next.metadata.finalizers, cur.metadata.finalizers);
    assert_eq!(next.metadata.resource_version.as_deref(), Some("42"));
    let spec = next.spec.as_ref().unwrap();
    assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.9"));
    assert_eq!(spec.ports, d.service.spec.as_ref().unwrap().ports);
    assert!(service_matches(&next, &d.service));

    let mut cur_slice = d.slice.clone();
    cur_slice
        .labels_mut()
        .insert("example.com/audited".into(), "yes".into());
    cur_slice.endpoints.clear();
    let next = onto_slice(&cur_slice, &d.slice);
    assert_eq!(next.labels()["example.com/audited"], "yes");
    assert!(slice_matches(&next, &d.slice));
}
