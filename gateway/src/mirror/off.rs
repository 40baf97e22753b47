//! Mirror Services in a gateway built without the `kube` feature: there are
//! none, so no name is a mirror name.
//!
//! The same routing interface as `mirror.rs` (compiled with the feature),
//! so that [`crate::route`] needs no gates: a call to `ratings-west` is
//! routed as any unknown name. The reconciler and `attach` are absent; the
//! flags that start them are refused at start (`main.rs`).

use crate::discovery::EndpointSet;
use crate::route::{Active, RequestInfo, Target};

/// Routes an HTTP request addressed to a mirror name: never, in this build.
pub fn http_target(
    _active: &Active,
    _req: &RequestInfo<'_>,
    _local: &EndpointSet,
    _default_port: u16,
) -> Option<Target> {
    None
}

/// Routes a TCP connection addressed to a mirror name: never, in this build.
pub fn tcp_target(
    _active: &Active,
    _host: &str,
    _port: u16,
    _caller_namespace: &str,
    _local: &EndpointSet,
) -> Option<Target> {
    None
}
