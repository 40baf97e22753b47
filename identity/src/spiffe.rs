//! SPIFFE IDs: the four shapes meshfed issues and accepts, parsed strictly
//! and printed as URIs.
//!
//! - workloads: `spiffe://<td>/ns/<namespace>/sa/<service-account>`, as Istio
//!   does, so that Istio principals (`<td>/ns/<ns>/sa/<sa>`) keep their
//!   meaning;
//! - gateways: `spiffe://<td>/meshfed/cluster/<cluster>/gateway/<id>`;
//! - the syncer: `spiffe://<td>/meshfed/syncer/<id>`;
//! - a cluster's intermediate CA: `spiffe://<td>/meshfed/cluster/<cluster>`,
//!   carried as the intermediate's URI SAN. That is how an intermediate names
//!   its cluster (rcgen cannot write URI name constraints, and webpki would
//!   not check them).
//!
//! This module owns the syntax only. Which ID may appear in which
//! certificate, and what a peer may assert, is [`super::verify`]'s business.

use std::fmt;
use std::str::FromStr;

use meshfed_policy::syntax::{dns_label_problem, dns_subdomain_problem, trust_domain_problem};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The SPIFFE URI scheme, with the authority marker.
const SCHEME: &str = "spiffe://";
/// SPIFFE's limit on the whole URI.
const MAX_LEN: usize = 2048;

/// A SPIFFE ID of one of the shapes meshfed knows.
///
/// Build one with [`SpiffeId::parse`] or the checked constructors
/// ([`SpiffeId::workload`], ...); the fields are public for matching, and a
/// value built by hand is only as valid as its fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffeId {
    /// A meshfed gateway: `spiffe://<td>/meshfed/cluster/<cluster>/gateway/<id>`.
    Gateway {
        /// The trust domain.
        trust_domain: String,
        /// The cluster the gateway belongs to.
        cluster: String,
        /// The gateway's ID, unique within its cluster.
        id: String,
    },
    /// The meshfed syncer: `spiffe://<td>/meshfed/syncer/<id>`.
    Syncer {
        /// The trust domain.
        trust_domain: String,
        /// The syncer instance's ID.
        id: String,
    },
    /// A workload, as Istio names it: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    Workload {
        /// The trust domain.
        trust_domain: String,
        /// The Kubernetes namespace.
        namespace: String,
        /// The Kubernetes service account.
        service_account: String,
    },
    /// A cluster's intermediate CA: `spiffe://<td>/meshfed/cluster/<cluster>`.
    ClusterCa {
        /// The trust domain.
        trust_domain: String,
        /// The cluster whose CA this is.
        cluster: String,
    },
}

/// Why a string is not a meshfed SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The scheme is missing or wrong.
    #[error("`{0}` is not a SPIFFE ID: it must start with `spiffe://` (lowercase)")]
    NotSpiffe(String),
    /// The URI is longer than SPIFFE allows.
    #[error("SPIFFE ID is {0} bytes long; SPIFFE allows at most 2048")]
    TooLong(usize),
    /// The trust domain is empty or has characters SPIFFE forbids.
    #[error("`{uri}`: bad trust domain `{trust_domain}`: {why}")]
    TrustDomain {
        /// The whole ID.
        uri: String,
        /// The offending trust domain.
        trust_domain: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// One path component is malformed.
    #[error("`{uri}`: bad {what} `{value}`: {why}")]
    Component {
        /// The whole ID.
        uri: String,
        /// Which component: `namespace`, `cluster`, ...
        what: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The path is none of the shapes meshfed knows.
    #[error(
        "`{uri}`: unknown path `{path}`; expected `/ns/<namespace>/sa/<service-account>`, \
         `/meshfed/cluster/<cluster>/gateway/<id>`, `/meshfed/syncer/<id>` or \
         `/meshfed/cluster/<cluster>`"
    )]
    UnknownPath {
        /// The whole ID.
        uri: String,
        /// The path after the trust domain.
        path: String,
    },
}

impl SpiffeId {
    /// Parses `spiffe://...` into one of the known shapes, checking every
    /// component. Nothing is normalised: the ID must be written exactly.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        if uri.len() > MAX_LEN {
            return Err(SpiffeError::TooLong(uri.len()));
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeError::NotSpiffe(uri.to_owned()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        check_trust_domain(uri, trust_domain)?;
        for (bad, why) in [
            ('?', "a SPIFFE ID has no query"),
            ('#', "a SPIFFE ID has no fragment"),
            ('%', "percent-encoding is not allowed"),
        ] {
            if path.contains(bad) {
                return Err(SpiffeError::Component {
                    uri: uri.to_owned(),
                    what: "path",
                    value: path.to_owned(),
                    why,
                });
            }
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(SpiffeError::Component {
                uri: uri.to_owned(),
                what: "path",
                value: path.to_owned(),
                why: "empty segment (a doubled or trailing slash)",
            });
        }
        let td = trust_domain.to_owned();
        let id = match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => SpiffeId::Workload {
                trust_domain: td,
                namespace: (*namespace).to_owned(),
                service_account: (*service_account).to_owned(),
            },
            ["meshfed", "cluster", cluster] => SpiffeId::ClusterCa {
                trust_domain: td,
                cluster: (*cluster).to_owned(),
            },
            ["meshfed", "cluster", cluster, "gateway", id] => SpiffeId::Gateway {
                trust_domain: td,
                cluster: (*cluster).to_owned(),
                id: (*id).to_owned(),
            },
            ["meshfed", "syncer", id] => SpiffeId::Syncer {
                trust_domain: td,
                id: (*id).to_owned(),
            },
            _ => {
                return Err(SpiffeError::UnknownPath {
                    uri: uri.to_owned(),
                    path: path.to_owned(),
                });
            }
        };
        id.check_components(uri)?;
        Ok(id)
    }

    /// A workload ID, checked.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        SpiffeId::Workload {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
        .checked()
    }

    /// A gateway ID, checked.
    pub fn gateway(trust_domain: &str, cluster: &str, id: &str) -> Result<Self, SpiffeError> {
        SpiffeId::Gateway {
            trust_domain: trust_domain.to_owned(),
            cluster: cluster.to_owned(),
            id: id.to_owned(),
        }
        .checked()
    }

    /// A syncer ID, checked.
    pub fn syncer(trust_domain: &str, id: &str) -> Result<Self, SpiffeError> {
        SpiffeId::Syncer {
            trust_domain: trust_domain.to_owned(),
            id: id.to_owned(),
        }
        .checked()
    }

    /// A cluster CA's ID, checked.
    pub fn cluster_ca(trust_domain: &str, cluster: &str) -> Result<Self, SpiffeError> {
        SpiffeId::ClusterCa {
            trust_domain: trust_domain.to_owned(),
            cluster: cluster.to_owned(),
        }
        .checked()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        match self {
            SpiffeId::Gateway { trust_domain, .. }
            | SpiffeId::Syncer { trust_domain, .. }
            | SpiffeId::Workload { trust_domain, .. }
            | SpiffeId::ClusterCa { trust_domain, .. } => trust_domain,
        }
    }

    /// The cluster the ID itself names (gateways and cluster CAs only). A
    /// peer's actual cluster comes from its verified chain, see
    /// [`super::verify::PeerIdentity`].
    pub fn cluster(&self) -> Option<&str> {
        match self {
            SpiffeId::Gateway { cluster, .. } | SpiffeId::ClusterCa { cluster, .. } => {
                Some(cluster)
            }
            SpiffeId::Syncer { .. } | SpiffeId::Workload { .. } => None,
        }
    }

    /// A short name for the kind of ID, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            SpiffeId::Gateway { .. } => "gateway",
            SpiffeId::Syncer { .. } => "syncer",
            SpiffeId::Workload { .. } => "workload",
            SpiffeId::ClusterCa { .. } => "cluster CA",
        }
    }

    /// Istio's principal form, `<td>/ns/<ns>/sa/<sa>`, as AuthorizationPolicy
    /// `principals` match it. Only workloads have one.
    pub fn istio_principal(&self) -> Option<String> {
        match self {
            SpiffeId::Workload {
                trust_domain,
                namespace,
                service_account,
            } => Some(format!(
                "{trust_domain}/ns/{namespace}/sa/{service_account}"
            )),
            _ => None,
        }
    }

    /// The DNS name that the leaf certificate of a gateway or the syncer also
    /// carries, so that ordinary TLS tools can check it.
    pub fn dns_name(&self) -> Option<String> {
        match self {
            SpiffeId::Gateway { cluster, .. } => Some(super::gateway_dns_name(cluster)),
            SpiffeId::Syncer { .. } => Some(super::SYNCER_DNS_NAME.to_owned()),
            SpiffeId::Workload { .. } | SpiffeId::ClusterCa { .. } => None,
        }
    }

    fn checked(self) -> Result<Self, SpiffeError> {
        let uri = self.to_string();
        check_trust_domain(&uri, self.trust_domain())?;
        self.check_components(&uri)?;
        Ok(self)
    }

    fn check_components(&self, uri: &str) -> Result<(), SpiffeError> {
        let check =
            |what: &'static str, value: &str, rule: fn(&str) -> Result<(), &'static str>| {
                rule(value).map_err(|why| SpiffeError::Component {
                    uri: uri.to_owned(),
                    what,
                    value: value.to_owned(),
                    why,
                })
            };
        match self {
            SpiffeId::Gateway { cluster, id, .. } => {
                check("cluster", cluster, dns_label)?;
                check("gateway id", id, dns_subdomain)
            }
            SpiffeId::Syncer { id, .. } => check("syncer id", id, dns_subdomain),
            SpiffeId::Workload {
                namespace,
                service_account,
                ..
            } => {
                check("namespace", namespace, dns_label)?;
                check("service account", service_account, dns_subdomain)
            }
            SpiffeId::ClusterCa { cluster, .. } => check("cluster", cluster, dns_label),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Gateway {
                trust_domain,
                cluster,
                id,
            } => write!(
                f,
                "{SCHEME}{trust_domain}/meshfed/cluster/{cluster}/gateway/{id}"
            ),
            SpiffeId::Syncer { trust_domain, id } => {
                write!(f, "{SCHEME}{trust_domain}/meshfed/syncer/{id}")
            }
            SpiffeId::Workload {
                trust_domain,
                namespace,
                service_account,
            } => write!(
                f,
                "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
            ),
            SpiffeId::ClusterCa {
                trust_domain,
                cluster,
            } => write!(f, "{SCHEME}{trust_domain}/meshfed/cluster/{cluster}"),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// SPIFFE trust domains: lowercase letters, digits, `.`, `-` and `_`, the
/// rule of the policy's `spec.trustDomain` (one copy, in `meshfed-policy`).
fn check_trust_domain(uri: &str, trust_domain: &str) -> Result<(), SpiffeError> {
    match trust_domain_problem(trust_domain) {
        Some(why) => Err(SpiffeError::TrustDomain {
            uri: uri.to_owned(),
            trust_domain: trust_domain.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// An RFC 1123 label, as Kubernetes namespaces are: it also becomes one label
/// of a gateway's DNS name, so a cluster name follows the same rule (the
/// policy's, for `Cluster` names).
fn dns_label(s: &str) -> Result<(), &'static str> {
    dns_label_problem(s).map_or(Ok(()), Err)
}

/// An RFC 1123 subdomain, as Kubernetes service accounts and pod names are.
fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    dns_subdomain_problem(s).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_round_trips_through_parse_and_display() {
        for uri in [
            "spiffe://cluster.local/ns/default/sa/productpage",
            "spiffe://example.org/ns/a-b/sa/svc.acct-1",
            "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0",
            "spiffe://cluster.local/meshfed/cluster/west-2/gateway/gw.west.example",
            "spiffe://td_1.example/meshfed/syncer/syncer-0",
            "spiffe://cluster.local/meshfed/cluster/east",
        ] {
            let id = SpiffeId::parse(uri).unwrap();
            assert_eq!(id.to_string(), uri);
            assert_eq!(uri.parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn parse_gives_the_components_of_each_shape() {
        assert_eq!(
            SpiffeId::parse("spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0").unwrap(),
            SpiffeId::gateway("cluster.local", "east", "gw-0").unwrap()
        );
        let ca = SpiffeId::parse("spiffe://td/meshfed/cluster/west").unwrap();
        assert_eq!(ca.cluster(), Some("west"));
        assert_eq!(ca.kind(), "cluster CA");
        let syncer = SpiffeId::parse("spiffe://td/meshfed/syncer/s1").unwrap();
        assert_eq!(syncer, SpiffeId::syncer("td", "s1").unwrap());
        assert_eq!(syncer.cluster(), None);
        assert_eq!(
            syncer.dns_name().as_deref(),
            Some("syncer.meshfed.internal")
        );
        let gw = SpiffeId::gateway("td", "east", "a").unwrap();
        assert_eq!(
            gw.dns_name().as_deref(),
            Some("east.cluster.meshfed.internal")
        );
    }

    #[test]
    fn only_workloads_have_an_istio_principal() {
        let workload = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
        assert_eq!(
            workload.istio_principal().as_deref(),
            Some("cluster.local/ns/default/sa/productpage")
        );
        for other in [
            "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0",
            "spiffe://cluster.local/meshfed/syncer/s",
            "spiffe://cluster.local/meshfed/cluster/east",
        ] {
            assert_eq!(SpiffeId::parse(other).unwrap().istio_principal(), None);
        }
    }

    #[test]
    fn malformed_ids_are_rejected_naming_the_offending_part() {
        let cases: &[(&str, &str)] = &[
            (
                "https://cluster.local/ns/a/sa/b",
                "must start with `spiffe://`",
            ),
            (
                "SPIFFE://cluster.local/ns/a/sa/b",
                "must start with `spiffe://`",
            ),
            ("spiffe:///ns/a/sa/b", "bad trust domain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "bad trust domain"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "bad trust domain"),
            ("spiffe://user@td/ns/a/sa/b", "bad trust domain"),
            ("spiffe://cluster.local", "unknown path"),
            ("spiffe://cluster.local/", "empty segment"),
            ("spiffe://cluster.local/ns/a/sa/b/", "empty segment"),
            ("spiffe://cluster.local/ns//sa/b", "empty segment"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "unknown path"),
            ("spiffe://cluster.local/ns/a/sa", "unknown path"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "no query"),
            ("spiffe://cluster.local/ns/a/sa/b#f", "no fragment"),
            ("spiffe://cluster.local/ns/a%2Fb/sa/b", "percent-encoding"),
            (
                "spiffe://cluster.local/ns/Default/sa/b",
                "bad namespace `Default`",
            ),
            ("spiffe://cluster.local/ns/-a/sa/b", "bad namespace `-a`"),
            (
                "spiffe://cluster.local/ns/a/sa/..",
                "bad service account `..`",
            ),
            ("spiffe://td/meshfed/cluster/ea.st", "bad cluster `ea.st`"),
            (
                "spiffe://td/meshfed/cluster/east/gateway/GW",
                "bad gateway id `GW`",
            ),
            ("spiffe://td/meshfed/cluster/east/gateway", "unknown path"),
            ("spiffe://td/meshfed/cluster/east/syncer/s", "unknown path"),
            ("spiffe://td/meshfed/syncer/s_1", "bad syncer id `s_1`"),
            ("spiffe://td/meshfed/other/x", "unknown path"),
        ];
        for (uri, expected) in cases {
            let err = SpiffeId::parse(uri).expect_err(uri).to_string();
            assert!(err.contains(expected), "{uri}: `{err}` lacks `{expected}`");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "a".repeat(MAX_LEN));
        assert_eq!(
            SpiffeId::parse(&long),
            Err(SpiffeError::TooLong(long.len()))
        );
    }

    #[test]
    fn constructors_refuse_what_parse_refuses() {
        assert!(SpiffeId::workload("cluster.local", "default", "productpage").is_ok());
        assert!(SpiffeId::workload("cluster.local", "", "sa").is_err());
        assert!(SpiffeId::workload("Cluster", "ns", "sa").is_err());
        assert!(SpiffeId::gateway("td", "east/west", "gw").is_err());
        assert!(SpiffeId::syncer("td", "a/b").is_err());
        assert!(SpiffeId::cluster_ca("td", &"a".repeat(64)).is_err());
    }

    #[test]
    fn serde_uses_the_uri_form() {
        let id = SpiffeId::workload("cluster.local", "default", "productpage").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/default/sa/productpage\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/bogus\"").is_err());
    }

    /// The policy (a `Cluster`'s name and `spec.trustDomain`, namespaces)
    /// and the SPIFFE IDs must accept exactly the same names: a cluster the
    /// policy accepts but no certificate can name would be unreachable, and
    /// one a certificate names but the policy refuses cannot be declared.
    #[test]
    fn spiffe_ids_and_the_policy_accept_the_same_labels_subdomains_and_trust_domains() {
        use meshfed_policy::syntax::{check_dns_label, check_dns_subdomain, check_trust_domain};
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let long_subdomain = format!("{long_label}.{long_label}.{long_label}.{}", "b".repeat(61));
        let too_long_subdomain = format!("{long_subdomain}x");
        let long_td = "t".repeat(255);
        let too_long_td = "t".repeat(256);
        let table: &[&str] = &[
            "east",
            "east-1",
            "1east",
            "e",
            "",
            "-east",
            "east-",
            "East",
            "east_1",
            "east.1",
            "a..b",
            ".a",
            "a.",
            "a.b-c.d",
            "a.-b",
            "west.example.org",
            "cluster.local",
            "td_with_underscore",
            "td:8080",
            "user@td",
            "tÿ",
            "e\u{0}",
            " east",
            &long_label,
            &too_long_label,
            &long_subdomain,
            &too_long_subdomain,
            &long_td,
            &too_long_td,
        ];
        for name in table {
            // Namespaces and cluster names are labels.
            assert_eq!(
                SpiffeId::workload("cluster.local", name, "sa").is_ok(),
                check_dns_label(name).is_ok(),
                "namespace {name:?}"
            );
            assert_eq!(
                SpiffeId::gateway("cluster.local", name, "gw-1").is_ok(),
                check_dns_label(name).is_ok(),
                "cluster {name:?}"
            );
            assert_eq!(
                SpiffeId::cluster_ca("cluster.local", name).is_ok(),
                check_dns_label(name).is_ok(),
                "cluster CA {name:?}"
            );
            // Service accounts and gateway ids are subdomains.
            assert_eq!(
                SpiffeId::workload("cluster.local", "default", name).is_ok(),
                check_dns_subdomain(name).is_ok(),
                "service account {name:?}"
            );
            assert_eq!(
                SpiffeId::gateway("cluster.local", "east", name).is_ok(),
                check_dns_subdomain(name).is_ok(),
                "gateway id {name:?}"
            );
            // Trust domains.
            assert_eq!(
                SpiffeId::workload(name, "default", "sa").is_ok(),
                check_trust_domain(name).is_ok(),
                "trust domain {name:?}"
            );
        }
    }
}
