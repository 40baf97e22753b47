//! Workload, gateway and syncer identity: SPIFFE IDs, certificates, the trust
//! rules and the rustls configurations built from them.
//!
//! The CA hierarchy (see docs/identity.md):
//!
//! ```text
//! trust anchor (root CA, shared by the federation; a bundle may hold several during rotation)
//! ├── intermediate CA of cluster east   URI SAN spiffe://<td>/meshfed/cluster/east   pathlen 0
//! │   ├── gateway leaf   spiffe://<td>/meshfed/cluster/east/gateway/<id>
//! │   ├── syncer leaf    spiffe://<td>/meshfed/syncer/<id>
//! │   └── workload leaf  spiffe://<td>/ns/<ns>/sa/<sa>
//! └── intermediate CA of cluster west   ...
//! ```
//!
//! The rule that makes the hierarchy mean something is the cluster binding:
//! a peer's cluster is the cluster named by the intermediate that issued its
//! leaf, learnt from the verified chain and never from anything the peer
//! says, and a gateway leaf must name that same cluster.
//!
//! Submodules, each owning one thing:
//! - [`spiffe`]: the ID formats, parsing and printing;
//! - [`certs`]: issuing anchors, intermediates and leaves (rcgen), and
//!   writing them to disk with private keys at mode 0600;
//! - [`verify`]: the trust rules as rustls verifiers, the refusal counters,
//!   the peer identity read from a chain and the trust-domain rule for
//!   forwarded caller identities;
//! - [`store`]: credentials on disk (the layout of a Kubernetes Secret
//!   volume), the rustls client and server configurations, and hot reload;
//! - [`cli`]: the operator's `meshfed-gateway certs ...` commands (the
//!   gateway binary runs them);
//! - `testutil` (with the `testutil` feature, or in this crate's tests):
//!   an in-memory CA hierarchy, rogue peers and an in-memory handshake.
//!
//! This crate does not own connections (the gateway's `tunnel` builds QUIC
//! endpoints from the configurations here, the syncer's config server TLS
//! listeners) nor authorization decisions (the gateway applies the
//! snapshot's policies to the [`verify::PeerIdentity`] found here). It is
//! the lowest layer that the gateway, the syncer and the test harness share:
//! it depends on no meshfed crate that holds a socket, so the syncer and the
//! tests use identity without the gateway's data plane (quinn, kube,
//! hickory, OpenTelemetry). The gateway re-exports it as
//! `meshfed_gateway::identity`.

#![forbid(unsafe_code)]

pub mod certs;
pub mod cli;
pub mod spiffe;
pub mod store;
pub mod verify;

#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

pub use spiffe::{SpiffeError, SpiffeId};
pub use store::{Credentials, StoreError};
pub use verify::{HandshakeRefusals, IdentityError, PeerIdentity, may_assert, peer_identity};

/// Istio's default trust domain, which meshfed uses unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Gateways of cluster `<c>` carry the DNS name `<c>` + this suffix, and a
/// client that dials that name expects a gateway of cluster `<c>`.
pub const GATEWAY_DNS_SUFFIX: &str = ".cluster.meshfed.internal";

/// The DNS name the syncer's certificate carries and its clients dial.
pub const SYNCER_DNS_NAME: &str = "syncer.meshfed.internal";

/// The TLS server name that means "a gateway of `cluster`".
pub fn gateway_dns_name(cluster: &str) -> String {
    format!("{cluster}{GATEWAY_DNS_SUFFIX}")
}

/// Installs ring as the process's rustls crypto provider, once; later calls
/// (or another provider already installed) are fine. The configurations built
/// here name ring explicitly and do not depend on it, but quinn and other
/// users of rustls's default do.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider every configuration and verifier here uses.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
