//! Local endpoints as a value: [`Endpoint`], [`EndpointSet`] and
//! [`healthy`], the selection every consumer makes.
//!
//! Plain data with no I/O, so that routing, authorization, announcements and
//! the upstream pool can use it without depending on the discovery sources
//! ([`crate::discovery`]) that produce it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

pub use meshfed_policy::snapshot::CLUSTER_LABEL;

/// One endpoint of a service in this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
}

impl Endpoint {
    /// Whether the endpoint has every label of `selector`.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Canonical service host → its endpoints in this cluster.
pub type EndpointSet = BTreeMap<String, Vec<Endpoint>>;

/// The healthy endpoints of `service` that carry every label of `selector`.
pub fn healthy<'a>(
    set: &'a EndpointSet,
    service: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<&'a Endpoint> {
    set.get(service)
        .map(|eps| {
            eps.iter()
                .filter(|e| e.healthy && e.matches(selector))
                .collect()
        })
        .unwrap_or_default()
}
