//! Endpoint announcements: what a gateway can serve, told to its peers.
//!
//! A gateway announces, on each link a peer dialed to it, a summary of the
//! endpoints behind it for every service its cluster exports: endpoints
//! grouped by label set, with counts and health. The peer can then tell which
//! clusters can serve a subset (e.g. `version: v2`) without any remote
//! API-server credentials, and fail over when a cluster has no healthy
//! endpoint left.
//!
//! Announcements are versioned by a sequence number (a receiver ignores an
//! older one), bounded ([`MAX_SERVICES`], [`MAX_GROUPS`], and the frame limit
//! of [`super::frame::MAX_DATA_FRAME`]), and carry a `draining` flag that a
//! gateway sets on SIGTERM so that peers stop opening new streams to it. A
//! peer that stops announcing is treated as unavailable by
//! [`crate::tunnel::link`].
//!
//! Where the gateway's discovery knows them (Kubernetes Services), an
//! announcement also carries each exported service's ports (number, name,
//! protocol, `appProtocol`), so that the peer's mirror Services
//! ([`crate::mirror`]) declare the ports callers really use, as Linkerd's
//! service mirror copies them from the remote Service. The member is
//! optional both ways: an older peer ignores it, and an announcement
//! without it (an older peer, or static discovery) means "ports unknown".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::endpoints::{Endpoint, EndpointSet};

/// Most services in one announcement: the policy's limit on what a cluster
/// may export, so that a valid snapshot never has more.
pub const MAX_SERVICES: usize = meshfed_policy::validate::exports::MAX_EXPORTED_SERVICES;

/// Most services a received announcement may list: the wire limit of
/// earlier releases, above [`MAX_SERVICES`], so that a peer one release
/// older is still read (the 1 MiB frame bounds the work either way).
pub const MAX_DECODED_SERVICES: usize = 10_000;
/// Bytes of JSON the services of one announcement may take: the frame limit
/// less room for the other fields (a cluster name and a commit SHA) and the
/// frame header.
const MAX_SERVICES_BYTES: usize = super::frame::MAX_DATA_FRAME - 4096;
/// Services left out of announcements since start, because a snapshot
/// (from a syncer older than the export limit) exported more than fits
/// ([`MAX_SERVICES`], or one frame); each such build is also logged.
/// Exported as `meshfed_announcement_services_left_out_total`
/// ([`AnnounceMetrics`]).
pub static SERVICES_LEFT_OUT: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// Registers [`SERVICES_LEFT_OUT`].
#[derive(Debug)]
pub struct AnnounceMetrics;

impl crate::metrics::Register for AnnounceMetrics {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "announcement_services_left_out",
            "Exported services left out of this gateway's announcements since start, because \
             more were exported than one announcement carries",
            SERVICES_LEFT_OUT.clone(),
        );
    }
}
/// Most label groups per service.
pub const MAX_GROUPS: usize = 64;
/// Label keys never worth announcing: they are unique per pod and would
/// make every endpoint its own group.
const NOISY_LABELS: &[&str] = &["pod-template-hash", "controller-revision-hash"];

/// What one gateway can serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Increases with every change; a receiver ignores anything older.
    pub seq: u64,
    /// The announcing gateway's cluster (informational: the receiver uses
    /// the cluster from the verified certificate).
    pub cluster: String,
    /// The snapshot version the announcing gateway runs.
    pub config_version: String,
    /// True while the gateway drains: open no new streams to it.
    #[serde(default)]
    pub draining: bool,
    /// Canonical service host → endpoint groups.
    pub services: BTreeMap<String, Vec<EndpointGroup>>,
    /// Canonical service host → the service's ports, for the services of
    /// `services` whose ports this gateway knows. A host absent here: its
    /// ports are unknown (never "no ports").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: ServicePorts,
}

/// Canonical service host → its ports.
pub type ServicePorts = BTreeMap<String, Vec<ServicePort>>;

/// Most ports announced per service; a service declaring more has the
/// first [`MAX_PORTS`] announced (Kubernetes sets no limit, but a Service
/// with this many ports is not one a mirror can usefully copy).
pub const MAX_PORTS: usize = 64;
/// Longest port name, protocol or `appProtocol` string a receiver keeps:
/// Kubernetes' limits are 15 (an IANA service name), an enum and a
/// qualified name (253 + `/` + 63).
pub const MAX_PORT_STRING: usize = 317;

/// One port of an exported service, as its Service declares it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    /// The service port callers connect to (never 0 once built).
    pub port: u16,
    /// The port's name; empty for the unnamed port of a one-port Service.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`, as Kubernetes spells it.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// Kubernetes' `appProtocol` (`http`, `kubernetes.io/h2c`...), if set.
    #[serde(
        default,
        rename = "appProtocol",
        skip_serializing_if = "Option::is_none"
    )]
    pub app_protocol: Option<String>,
}

fn tcp() -> String {
    "TCP".into()
}

impl ServicePort {
    /// Whether a receiver keeps it: a real port number and strings within
    /// [`MAX_PORT_STRING`]. Whether the strings are valid Kubernetes values
    /// is for the one who writes them to an API server to check.
    fn within_bounds(&self) -> bool {
        self.port != 0
            && self.name.len() <= MAX_PORT_STRING
            && self.protocol.len() <= MAX_PORT_STRING
            && self
                .app_protocol
                .as_ref()
                .is_none_or(|a| a.len() <= MAX_PORT_STRING)
    }
}

/// Endpoints that share a label set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointGroup {
    pub labels: BTreeMap<String, String>,
    pub total: u32,
    pub healthy: u32,
}

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announcement is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("announcement has {0} services, over the limit of {MAX_DECODED_SERVICES}")]
    TooManyServices(usize),
    #[error("announcement for {service} has {groups} label groups, over the limit of {MAX_GROUPS}")]
    TooManyGroups { service: String, groups: usize },
}

impl Announcement {
    /// Summarizes `endpoints` for the services in `exported`, with their
    /// ports where `ports` knows them.
    pub fn build<'a>(
        seq: u64,
        cluster: &str,
        config_version: &str,
        draining: bool,
        endpoints: &EndpointSet,
        ports: &ServicePorts,
        exported: impl Iterator<Item = &'a str>,
    ) -> Self {
        let mut services = BTreeMap::new();
        let mut service_ports = BTreeMap::new();
        let mut left_out = 0u64;
        // The encoded size so far, so that what is built always fits one
        // frame: an announcement too large to send would leave peers with
        // none of our services, not some.
        let mut bytes = 0usize;
        for host in exported {
            if services.len() == MAX_SERVICES {
                left_out += 1;
                continue;
            }
            let eps = endpoints.get(host).map(Vec::as_slice).unwrap_or_default();
            let groups = group(eps);
            let known: Option<Vec<ServicePort>> = ports.get(host).map(|p| {
                p.iter()
                    .filter(|p| p.within_bounds())
                    .take(MAX_PORTS)
                    .cloned()
                    .collect()
            });
            // `"host":[...],` in the map's JSON, and again in `ports`.
            let entry = serde_json::to_vec(&(host, &groups)).map_or(usize::MAX, |v| v.len())
                + known.as_ref().map_or(0, |p| {
                    serde_json::to_vec(&(host, p)).map_or(usize::MAX, |v| v.len())
                });
            if bytes.saturating_add(entry) > MAX_SERVICES_BYTES {
                left_out += 1;
                continue;
            }
            bytes += entry;
            services.insert(host.to_string(), groups);
            if let Some(known) = known {
                service_ports.insert(host.to_string(), known);
            }
        }
        if left_out > 0 {
            SERVICES_LEFT_OUT.inc_by(left_out);
            tracing::warn!(
                announced = services.len(),
                left_out,
                "the snapshot exports more services, or more endpoint label groups, than one \
                 announcement carries (1 MiB); peers do not learn of the rest. Export fewer \
                 services from this cluster, or group endpoints by fewer labels"
            );
        }
        Announcement {
            seq,
            cluster: cluster.to_string(),
            config_version: config_version.to_string(),
            draining,
            services,
            ports: service_ports,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a peer's announcement. Ports are optional: those of a
    /// service not in `services`, over [`MAX_PORTS`] or out of bounds are
    /// dropped (that service's ports are then unknown), never the whole
    /// announcement, which routing needs.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnounceError> {
        let mut a: Announcement = serde_json::from_slice(bytes)?;
        let services = &a.services;
        a.ports.retain(|host, ports| {
            services.contains_key(host)
                && ports.len() <= MAX_PORTS
                && ports.iter().all(ServicePort::within_bounds)
        });
        if a.services.len() > MAX_DECODED_SERVICES {
            return Err(AnnounceError::TooManyServices(a.services.len()));
        }
        if let Some((service, groups)) = a.services.iter().find(|(_, g)| g.len() > MAX_GROUPS) {
            return Err(AnnounceError::TooManyGroups {
                service: service.clone(),
                groups: groups.len(),
            });
        }
        Ok(a)
    }

    /// Healthy endpoints this gateway has for `service` whose labels include
    /// every label of `selector`.
    pub fn healthy(&self, service: &str, selector: &BTreeMap<String, String>) -> u32 {
        self.services.get(service).map_or(0, |groups| {
            groups
                .iter()
                .filter(|g| selector.iter().all(|(k, v)| g.labels.get(k) == Some(v)))
                // A peer's counts are input: saturate, never overflow.
                .fold(0u32, |n, g| n.saturating_add(g.healthy))
        })
    }
}

fn group(endpoints: &[Endpoint]) -> Vec<EndpointGroup> {
    let mut groups: BTreeMap<BTreeMap<String, String>, EndpointGroup> = BTreeMap::new();
    for e in endpoints {
        let labels: BTreeMap<String, String> = e
            .labels
            .iter()
            .filter(|(k, _)| !NOISY_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let g = groups
            .entry(labels.clone())
            .or_insert_with(|| EndpointGroup {
                labels,
                ..Default::default()
            });
        g.total = g.total.saturating_add(1);
        if e.healthy {
            g.healthy = g.healthy.saturating_add(1);
        }
    }
    // Past the bound, merge the rest into one group of their common labels:
    // counts stay right, only label detail is lost.
    let mut out: Vec<EndpointGroup> = groups.into_values().collect();
    if out.len() > MAX_GROUPS {
        let rest = out.split_off(MAX_GROUPS - 1);
        let mut common = rest[0].labels.clone();
        for g in &rest[1..] {
            common.retain(|k, v| g.labels.get(k) == Some(v));
        }
        out.push(EndpointGroup {
            labels: common,
            total: rest.iter().map(|g| g.total).sum(),
            healthy: rest.iter().map(|g| g.healthy).sum(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::wire::frame::Frame;

    fn ep(port: u16, version: &str, healthy: bool) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            labels: BTreeMap::from([("version".to_string(), version.to_string())]),
            healthy,
        }
    }

    #[test]
    fn endpoints_are_grouped_by_labels_with_counts_and_health() {
        let mut set = EndpointSet::default();
        set.insert(
            "ratings.default.svc.cluster.local".into(),
            vec![ep(1, "v1", true), ep(2, "v1", false), ep(3, "v2", true)],
        );
        let a = Announcement::build(
            1,
            "west",
            "abc",
            false,
            &set,
            &ServicePorts::new(),
            [
                "ratings.default.svc.cluster.local",
                "missing.default.svc.cluster.local",
            ]
            .into_iter(),
        );
        let v1 = BTreeMap::from([("version".to_string(), "v1".to_string())]);
        assert_eq!(a.healthy("ratings.default.svc.cluster.local", &v1), 1);
        assert_eq!(
            a.healthy("ratings.default.svc.cluster.local", &BTreeMap::new()),
            2
        );
        assert_eq!(
            a.healthy("missing.default.svc.cluster.local", &BTreeMap::new()),
            0
        );
        assert_eq!(Announcement::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn label_groups_are_bounded_without_losing_counts() {
        let mut set = EndpointSet::default();
        let eps: Vec<Endpoint> = (0..200)
            .map(|i| ep(i, &format!("v{i}"), i % 2 == 0))
            .collect();
        set.insert("s".into(), eps);
        let a = Announcement::build(
            1,
            "c",
            "v",
            false,
            &set,
            &ServicePorts::new(),
            ["s"].into_iter(),
        );
        assert_eq!(a.services["s"].len(), MAX_GROUPS);
        assert_eq!(a.services["s"].iter().map(|g| g.total).sum::<u32>(), 200);
        assert_eq!(a.healthy("s", &BTreeMap::new()), 100);
    }

    /// A Kubernetes-like endpoint: four labels, as pods of a mesh carry.
    fn pod(i: u16, app: &str, version: &str) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 9080)),
            labels: BTreeMap::from([
                ("app".to_string(), app.to_string()),
                ("version".to_string(), version.to_string()),
                (
                    "topology.istio.io/cluster".to_string(),
                    "cluster-west".to_string(),
                ),
                ("security.istio.io/tlsMode".to_string(), "istio".to_string()),
            ]),
            healthy: true,
        }
    }

    fn encoded_frame_len(a: &Announcement) -> Result<usize, super::super::frame::FrameError> {
        let mut buf = bytes::BytesMut::new();
        super::super::frame::encode(&Frame::Announce(a.encode().into()), &mut buf)?;
        Ok(buf.len())
    }

    /// Every service a valid commit may export fits one frame, with long
    /// names and realistic labels: validation's limit is one the
    /// announcement keeps (issue 21, item 13).
    #[test]
    fn as_many_services_as_validation_allows_fit_one_frame() {
        let mut set = EndpointSet::default();
        let hosts: Vec<String> = (0..MAX_SERVICES)
            .map(|i| format!("service-{i:05}-with-a-longish-name.some-namespace.svc.cluster.local"))
            .collect();
        for (i, h) in hosts.iter().enumerate() {
            let app = format!("service-{i:05}-with-a-longish-name");
            set.insert(
                h.clone(),
                vec![pod(i as u16, &app, "v1"), pod(i as u16, &app, "v1")],
            );
        }
        let before = SERVICES_LEFT_OUT.get();
        let a = Announcement::build(
            1,
            "west",
            &"f".repeat(40),
            false,
            &set,
            &ServicePorts::new(),
            hosts.iter().map(String::as_str),
        );
        assert_eq!(a.services.len(), MAX_SERVICES, "services were left out");
        assert_eq!(SERVICES_LEFT_OUT.get(), before);
        let len = encoded_frame_len(&a).expect("the announcement fits one frame");
        assert!(len <= super::super::frame::MAX_DATA_FRAME);
    }

    /// Services whose endpoints fall into many label groups can outgrow a
    /// frame: the announcement still goes out, holding what fits, and the
    /// rest is counted and logged, never silently dropped and never the
    /// whole announcement.
    #[test]
    fn an_announcement_that_would_outgrow_a_frame_keeps_what_fits_and_counts_the_rest() {
        let mut set = EndpointSet::default();
        let hosts: Vec<String> = (0..2_000)
            .map(|i| format!("s{i:04}.ns.svc.cluster.local"))
            .collect();
        for h in &hosts {
            let eps: Vec<Endpoint> = (0..MAX_GROUPS as u16)
                .map(|v| pod(v, "app-with-a-name", &format!("version-{v}")))
                .collect();
            set.insert(h.clone(), eps);
        }
        let before = SERVICES_LEFT_OUT.get();
        let a = Announcement::build(
            1,
            "west",
            &"f".repeat(40),
            false,
            &set,
            &ServicePorts::new(),
            hosts.iter().map(String::as_str),
        );
        let left_out = SERVICES_LEFT_OUT.get() - before;
        assert!(!a.services.is_empty());
        assert_eq!(
            a.services.len() as u64 + left_out,
            2_000,
            "every service is announced or counted"
        );
        assert!(left_out > 0);
        encoded_frame_len(&a).expect("what was kept fits one frame");
        // The count is exported (other tests may add to it meanwhile).
        let scraped = crate::metrics::Metrics::new(&[&AnnounceMetrics]).encode(&[]);
        let exported: u64 = scraped
            .lines()
            .find_map(|l| l.strip_prefix("meshfed_announcement_services_left_out_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("the left-out count is not in /metrics:\n{scraped}"));
        assert!(
            exported >= before + left_out,
            "/metrics says {exported} left out, this build alone left out {left_out}"
        );
    }

    fn http_port(port: u16, name: &str) -> ServicePort {
        ServicePort {
            port,
            name: name.into(),
            protocol: "TCP".into(),
            app_protocol: Some("http".into()),
        }
    }

    /// An exported service's ports travel with it; services whose ports
    /// discovery does not know, or that are not exported, have none.
    #[test]
    fn exported_services_carry_their_ports_and_only_theirs() {
        let mut set = EndpointSet::default();
        set.insert("ratings".into(), vec![ep(1, "v1", true)]);
        let ports = ServicePorts::from([
            (
                "ratings".to_string(),
                vec![http_port(9080, "http"), http_port(9443, "admin")],
            ),
            ("private".to_string(), vec![http_port(8080, "")]),
        ]);
        let a = Announcement::build(
            1,
            "west",
            "v",
            false,
            &set,
            &ports,
            ["ratings", "static-only"].into_iter(),
        );
        assert_eq!(
            a.ports,
            ServicePorts::from([("ratings".to_string(), ports["ratings"].clone())])
        );
        assert_eq!(Announcement::decode(&a.encode()).unwrap(), a);
        let json = String::from_utf8(a.encode()).unwrap();
        assert!(
            json.contains(r#""ports":{"ratings":[{"port":9080,"name":"http","protocol":"TCP","appProtocol":"http"}"#),
            "{json}"
        );
    }

    /// Within the version, only what an older peer ignores may change
    /// (docs/tunnel.md): an older receiver, which knows no `ports`, reads
    /// today's announcement; today's receiver reads an older one, whose
    /// services then have unknown ports.
    #[test]
    fn ports_are_a_member_older_peers_ignore_and_older_announcements_lack() {
        /// The announcement as the release before `ports` declared it.
        #[derive(Debug, Deserialize, Serialize)]
        struct Older {
            seq: u64,
            cluster: String,
            config_version: String,
            #[serde(default)]
            draining: bool,
            services: BTreeMap<String, Vec<EndpointGroup>>,
        }
        let mut set = EndpointSet::default();
        set.insert("ratings".into(), vec![ep(1, "v1", true)]);
        let ports = ServicePorts::from([("ratings".to_string(), vec![http_port(9080, "http")])]);
        let today =
            Announcement::build(1, "west", "v", false, &set, &ports, ["ratings"].into_iter());
        let old: Older = serde_json::from_slice(&today.encode()).unwrap();
        assert_eq!(old.services, today.services);
        let from_old = Announcement::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(from_old.services, today.services);
        assert!(from_old.ports.is_empty());
        // And an announcement without ports encodes without the member.
        assert!(
            !String::from_utf8(from_old.encode())
                .unwrap()
                .contains("ports")
        );
    }

    /// A peer's ports are input: too many for a service, a port 0, huge
    /// strings, or ports of a service it does not announce are dropped, for
    /// that service only; the announcement, which routing needs, stays.
    #[test]
    fn out_of_bounds_ports_are_dropped_not_the_announcement() {
        let mut a = Announcement::default();
        for s in ["ok", "many", "zero", "huge", "app"] {
            a.services.insert(s.into(), vec![]);
        }
        a.ports.insert("ok".into(), vec![http_port(80, "http")]);
        a.ports
            .insert("many".into(), vec![http_port(80, ""); MAX_PORTS + 1]);
        a.ports.insert("zero".into(), vec![http_port(0, "")]);
        a.ports.insert(
            "huge".into(),
            vec![http_port(80, &"n".repeat(MAX_PORT_STRING + 1))],
        );
        let mut app = http_port(80, "http");
        app.app_protocol = Some("x".repeat(MAX_PORT_STRING + 1));
        a.ports.insert("app".into(), vec![app]);
        a.ports
            .insert("unannounced".into(), vec![http_port(80, "")]);
        let got = Announcement::decode(&a.encode()).unwrap();
        assert_eq!(got.services, a.services);
        assert_eq!(got.ports.keys().collect::<Vec<_>>(), ["ok"]);
        // The sender keeps within the bounds too.
        let mut set = EndpointSet::default();
        set.insert("many".into(), vec![]);
        let built = Announcement::build(1, "c", "v", false, &set, &a.ports, ["many"].into_iter());
        assert_eq!(built.ports["many"].len(), MAX_PORTS);
        assert_eq!(Announcement::decode(&built.encode()).unwrap(), built);
    }

    #[test]
    fn oversized_or_garbage_announcements_are_refused() {
        assert!(Announcement::decode(b"\x00garbage").is_err());
        let mut a = Announcement::default();
        a.services
            .insert("s".into(), vec![EndpointGroup::default(); MAX_GROUPS + 1]);
        assert!(matches!(
            Announcement::decode(&a.encode()),
            Err(AnnounceError::TooManyGroups { .. })
        ));
    }
}
