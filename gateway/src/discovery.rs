//! Discovery of this cluster's endpoints.
//!
//! Every source produces the same value, an [`crate::endpoints::EndpointSet`]: canonical
//! service host → endpoints with their labels and health, published through a
//! `tokio::sync::watch` channel so that routing reads one consistent set per
//! request. Every endpoint carries `topology.istio.io/cluster: <cluster>`, as
//! in Istio, so that subsets can select a cluster.
//!
//! Sources:
//! - [`static_file`]: a YAML file of services and endpoints, hot reloaded
//!   (edge sites without Kubernetes); endpoint hosts may be DNS names.
//! - [`dns`]: the shared resolver behind those names and peer gateway
//!   addresses: `host:port` and SRV, TTL-paced refresh, and a grace period
//!   that keeps a failing name's last addresses.
//! - [`service_entry`]: the endpoints ServiceEntries declare in policy
//!   (STATIC addresses, or names resolved through [`dns`]), merged into the
//!   set so that their hosts are served like local services.
//! - [`kube`]: Services, EndpointSlices and Pods from the API server
//!   (kube-rs watchers), and optionally in-cluster ServiceExports.
//!
//! Cargo features (on by default): `dns` brings hickory-resolver; without
//! it every address (discovery file, ServiceEntry endpoints, peer gateways)
//! must be an IP literal, and a host name is refused with an error naming
//! the feature. `kube` brings the Kubernetes source; without it the module
//! is absent and its flags are refused at start (`main.rs`).
//!
//! It does not own remote endpoints: those are summarized by peer gateways
//! in announcements ([`crate::wire::announce`]). It never needs another
//! cluster's API-server credentials.

#[cfg(feature = "dns")]
pub mod dns;
/// Without the `dns` feature: the same interface, IP addresses only.
#[cfg(not(feature = "dns"))]
#[path = "discovery/dns_off.rs"]
pub mod dns;
#[cfg(feature = "kube")]
pub mod kube;
pub mod service_entry;
pub mod static_file;
