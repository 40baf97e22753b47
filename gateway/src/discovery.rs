//! Discovery of local endpoints. Lands with the discovery issue.
//!
//! It will own the sources of this cluster's endpoints for exported
//! services: a static file (edge sites without Kubernetes), DNS through
//! hickory-resolver, and the Kubernetes API through kube. It produces
//! endpoint sets with their labels (`version`, `topology.istio.io/cluster`)
//! and health, for routing and for announcements to peers.
//!
//! It does not own remote endpoints: those arrive from peer gateways over
//! [`crate::tunnel`]. It never needs another cluster's API-server
//! credentials.
