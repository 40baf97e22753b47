//! Proxying: the outbound listener local callers use, the inbound side that
//! serves streams arriving from peer gateways, and the mapping of every
//! failure to a proper status with a header naming the gateway's reason.
//!
//! - [`outbound`]: TCP 15001; detects HTTP/1.1, HTTP/2 (and so gRPC), TLS
//!   (routed by SNI as opaque TCP) and HTTP CONNECT; routes each request;
//!   forwards it to a local endpoint or over the tunnel.
//! - [`inbound`]: serves a peer's stream: checks the service is exported,
//!   picks a local endpoint, proxies.
//! - [`plan`]: the outbound path's decisions as plain data (target,
//!   cluster, rule, retries, timeouts, fault, mirrors, edits); pure.
//! - [`rules`]: a VirtualService rule's edits: headers, rewrite.
//! - [`admission`]: PeerAuthentication and authorization of local callers.
//!
//! It does not own the choice of destination ([`crate::route`]), the
//! transport between clusters ([`crate::tunnel`]), local endpoints'
//! balancer and pooled clients ([`crate::upstream`]), bodies across the
//! tunnel ([`crate::body`]) or the responses the gateway writes itself
//! ([`crate::respond`]).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};

pub mod admission;
pub mod detect;
pub mod inbound;
pub mod outbound;
pub mod plan;
pub mod rules;
pub mod splice;

/// The TCP port of the outbound listener by default, Istio's outbound
/// capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Envoy's header for the caller's verified client certificate. Only a
/// destination gateway sets it, from the identity it verified; a value from
/// anyone else is dropped on arrival.
pub(crate) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The XFCC a destination gateway sets for a caller whose workload identity
/// it verified (or accepted from a source gateway under the trust-domain
/// rule): `By=<this gateway's SPIFFE ID>;URI=<the caller's>`, as Istio
/// tells workloads. Set before authorization, as Envoy's connection manager
/// does, so a `when` on the header sees it.
pub(crate) fn xfcc(
    state: &crate::state::Gateway,
    active: &crate::route::Active,
    caller: &str,
) -> Option<http::HeaderValue> {
    let policy = &active.snapshot.policy;
    let td = policy
        .clusters
        .get(&state.cluster)
        .map_or(policy.trust_domain.as_str(), |c| c.trust_domain.as_str());
    let by = format!(
        "spiffe://{td}/meshfed/cluster/{}/gateway/{}",
        state.cluster, state.id
    );
    http::HeaderValue::from_str(&format!("By={by};URI={caller}")).ok()
}

/// How long a peer has to send a stream's head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a header describes one hop and is never forwarded (RFC 9110
/// §7.6.1), or is `te` (kept only as `te: trailers`), or `host` (the
/// authority travels in the request head). Compares names, never parses
/// them: this runs for every header of every request and response.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    *n == header::CONNECTION
        || *n == header::TRANSFER_ENCODING
        || *n == header::UPGRADE
        || *n == header::HOST
        || *n == header::TE
        || *n == header::PROXY_AUTHENTICATE
        || *n == header::PROXY_AUTHORIZATION
        // Not standard names in `http`: compared as text.
        || matches!(n.as_str(), "keep-alive" | "proxy-connection")
}

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `te: trailers` survives: gRPC needs it.
///
/// One pass over the names finds what to remove (usually just `host`, or
/// nothing), so a request pays a comparison per header rather than a
/// parse and a lookup per hop-by-hop name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    let keep_te = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    while let Some(n) = headers.keys().find(|n| is_hop_by_hop(n)).cloned() {
        headers.remove(n);
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_but_te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn every_hop_by_hop_name_is_stripped_in_any_case_and_end_to_end_ones_are_kept() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Host", "ratings"),
            ("TE", "deflate"),
            ("Content-Type", "text/plain"),
            ("Authorization", "Bearer x"),
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        h.append(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type"]);
        // Nothing to strip: the map is left as it is.
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
