//! The responses the gateway writes itself, and the header naming its
//! reason (`x-meshfed-error`, like linkerd's `l5d-proxy-error`): one place
//! maps a typed [`Refusal`] or a caller's fault to an HTTP or gRPC status.
//!
//! Decisions (routing, authorization, PeerAuthentication) return typed
//! refusals and never build responses; the data path ([`crate::proxy`]) and the upstream clients
//! ([`crate::upstream`]) call these writers.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};
use crate::wire::frame::Refusal;

/// The response header that names the gateway's reason when the gateway
/// itself answered (like linkerd's `l5d-proxy-error`).
pub const ERROR_HEADER: &str = "x-meshfed-error";

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

impl crate::peer_auth::Refused {
    /// `403` with the reason header; for gRPC callers a trailers-only
    /// `UNAUTHENTICATED`.
    pub fn response(&self, grpc: bool) -> Response<ProxyBody> {
        let mut b = Response::builder().header(ERROR_HEADER, self.reason);
        if grpc {
            let msg = HeaderValue::from_str(&self.message.replace(['%', '\n'], " "))
                .unwrap_or(HeaderValue::from_static("mutual TLS policy"));
            b = b
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", "16")
                .header("grpc-message", msg);
            return b
                .body(body::empty())
                .unwrap_or_else(|_| Response::new(body::empty()));
        }
        b.status(StatusCode::FORBIDDEN)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body::full(format!("{}: {}\n", self.reason, self.message)))
            .unwrap_or_else(|_| Response::new(body::empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
