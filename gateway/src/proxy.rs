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
//! - [`upstream`]: local endpoints: balancer and pooled clients.
//! - [`body`]: bodies and trailers across the tunnel.
//!
//! It does not own the choice of destination ([`crate::route`]) or the
//! transport between clusters ([`crate::tunnel`]).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

use crate::tunnel::frame::Refusal;

pub mod body;
pub mod budget;
pub mod detect;
pub mod inbound;
pub mod outbound;
pub mod plan;
pub mod rules;
pub mod splice;
pub mod upstream;

use body::ProxyBody;

/// The TCP port of the outbound listener by default, Istio's outbound
/// capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// The response header that names the gateway's reason when the gateway
/// itself answered (like linkerd's `l5d-proxy-error`).
pub const ERROR_HEADER: &str = "x-meshfed-error";

/// Envoy's header for the caller's verified client certificate. Only a
/// destination gateway sets it, from the identity it verified; a value from
/// anyone else is dropped on arrival.
pub(crate) const XFCC: &str = "x-forwarded-client-cert";

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

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `te: trailers` survives: gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
    let keep_te = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a request is gRPC (its errors then travel as `grpc-status`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The gRPC status for an HTTP status, as Envoy maps them.
pub fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// A response the gateway makes itself. For gRPC callers it is a
/// trailers-only response (HTTP 200 with `grpc-status`), which is what gRPC
/// clients understand.
pub fn error_response(refusal: Refusal, message: &str, grpc: bool) -> Response<ProxyBody> {
    let status = refusal.http_status();
    let mut b = Response::builder().header(ERROR_HEADER, refusal.reason());
    let body = if grpc {
        b = b
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", grpc_status_for(status).to_string())
            .header(
                "grpc-message",
                HeaderValue::from_str(&percent_encode(message))
                    .unwrap_or(HeaderValue::from_static("")),
            );
        body::empty()
    } else {
        b = b
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        body::full(format!("{}: {message}\n", refusal.reason()))
    };
    b.body(body)
        .unwrap_or_else(|_| Response::new(body::empty()))
}

/// The answer for a caller that failed its own request body
/// ([`body::CallerFault`]): `400 bad-request` for a malformed body, `499
/// source-cancelled` for one it abandoned (recorded as such; the caller is
/// usually gone). gRPC callers get INTERNAL or CANCELLED.
pub fn caller_fault_response(
    fault: body::CallerFault,
    message: &str,
    grpc: bool,
) -> Response<ProxyBody> {
    let mut r = error_response(Refusal::BadRequest, message, grpc);
    if fault == body::CallerFault::Aborted {
        r.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(fault.reason()));
        if grpc {
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static("1"));
        } else {
            *r.status_mut() = fault.status();
        }
    }
    r
}

/// An error and its causes, `: `-joined (hyper's own message for a failed
/// request names only the outermost).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let more = c.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        next = c.source();
    }
    s
}

/// gRPC's percent-encoding of `grpc-message`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
    fn grpc_callers_get_a_trailers_only_status() {
        let r = error_response(Refusal::NoHealthyEndpoint, "no endpoint for ratings", true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[ERROR_HEADER], "no-healthy-endpoint");
        let r = error_response(Refusal::NotExported, "x", false);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
