//! What the mirrors are made from besides this cluster's own objects: the
//! gateway's view of the federation. Which services other clusters export
//! (the applied snapshot), the ports their gateways announced, and the
//! outbound listener every mirror port leads to.
//!
//! The gateway builds it from its own state ([`GatewayView::of`]); for the
//! mirror controller, a process of its own ([`super::controller`]), the
//! gateway serves it on its admin API as `/mirror/view` (JSON), and the
//! controller reads it from there ([`GatewayView::parse`]). Everything in
//! it is input to the controller: it is bounded in size and checked before
//! any of it reaches the API server.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::state::Gateway;
use crate::state::provenance::Applied;
use crate::wire::announce::ServicePort;

/// The largest view the controller accepts (bytes of JSON). A federation
/// of 10,000 exported services with a few ports each fits in a few MiB.
pub const MAX_VIEW_BYTES: usize = 16 << 20;

/// The gateway's view, as the mirrors need it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayView {
    /// The gateway's cluster.
    pub cluster: String,
    /// The gateway that answered (its ID).
    pub gateway: String,
    /// The cluster's DNS domain (`cluster.local`).
    pub domain: String,
    /// The applied snapshot: version and where it came from.
    pub applied: Applied,
    /// The outbound listener's port: every mirror port targets it.
    pub outbound_port: u16,
    /// Exported services (canonical host) → the clusters exporting them.
    pub exports: BTreeMap<String, BTreeSet<String>>,
    /// The ports each cluster's gateways announce now.
    pub announced: Vec<Announced>,
}

/// The ports one cluster's gateways announce for one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announced {
    pub cluster: String,
    pub host: String,
    pub ports: Vec<ServicePort>,
}

/// Why a view was refused.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("the view is {0} bytes, more than the {MAX_VIEW_BYTES} accepted")]
    TooLarge(usize),
    #[error("the view is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error(
        "the view is of cluster `{got}`, but this controller mirrors for `{want}`: --gateway-admin points at another cluster's gateway"
    )]
    WrongCluster { got: String, want: String },
}

impl GatewayView {
    /// The view of a running gateway; `None` until a snapshot is applied
    /// (a gateway waiting for its syncer must not make anyone delete
    /// mirrors).
    pub fn of(state: &Gateway, outbound_port: u16) -> Option<Self> {
        let applied = state.provenance.current()?;
        let active = state.active.load_full();
        let policy = &active.snapshot.policy;
        Some(GatewayView {
            cluster: state.cluster.to_string(),
            gateway: state.id.to_string(),
            domain: policy.domain.clone(),
            applied: (*applied).clone(),
            outbound_port,
            exports: policy.exports.clone(),
            announced: announced_ports(state),
        })
    }

    /// A view read from a gateway's admin API, for the controller of
    /// `cluster` (any, while the controller does not know its cluster yet).
    pub fn parse(body: &[u8], cluster: Option<&str>) -> Result<Self, ViewError> {
        if body.len() > MAX_VIEW_BYTES {
            return Err(ViewError::TooLarge(body.len()));
        }
        let view: GatewayView =
            serde_json::from_slice(body).map_err(|e| ViewError::Malformed(e.to_string()))?;
        if let Some(want) = cluster
            && view.cluster != want
        {
            return Err(ViewError::WrongCluster {
                got: view.cluster,
                want: want.to_string(),
            });
        }
        Ok(view)
    }

    /// The announced ports by (cluster, host).
    pub fn announced_map(&self) -> BTreeMap<(String, String), Vec<ServicePort>> {
        self.announced
            .iter()
            .map(|a| ((a.cluster.clone(), a.host.clone()), a.ports.clone()))
            .collect()
    }
}

/// The ports each cluster's gateways announce now. If a cluster's gateways
/// disagree (a Service edited mid-rollout), the most common answer wins,
/// ties to the smallest.
fn announced_ports(state: &Gateway) -> Vec<Announced> {
    let mut votes: BTreeMap<(String, String), BTreeMap<Vec<ServicePort>, usize>> = BTreeMap::new();
    for (cluster, a) in state.tunnel.announcements() {
        for (host, ports) in &a.ports {
            *votes
                .entry((cluster.clone(), host.clone()))
                .or_default()
                .entry(ports.clone())
                .or_default() += 1;
        }
    }
    votes
        .into_iter()
        .filter_map(|((cluster, host), v)| {
            let best = v.values().copied().max()?;
            let ports = v.into_iter().find(|(_, n)| *n == best)?.0;
            Some(Announced {
                cluster,
                host,
                ports,
            })
        })
        .collect()
}
