//! What a local caller must pass before this gateway forwards its call:
//! PeerAuthentication ([`peer_auth`]) and, for calls to endpoints of this
//! cluster (the caller is local, so this gateway is also the destination
//! gateway), authorization ([`enforce_local`], [`admit_local_tcp`]).
//!
//! The decisions are [`crate::peer_auth`]'s and [`crate::authz`]'s (one
//! authorization decision, [`crate::authz::authorize`], here with
//! [`Need::Every`]); this module is the data path's side of them: it reads
//! the snapshot and the endpoints, counts a refusal and answers it.

use std::collections::BTreeMap;

use crate::authz::{Http, Need, RBAC_DENIED, Request, authorize, normalize_path};
use crate::body::{self, ProxyBody};
use crate::route::Active;
use crate::state::Gateway;

/// [`crate::peer_auth::decide`] for a local caller (`mtls`: it presented a
/// workload certificate) of `service` on `port`, through the endpoints
/// `selector` picks. Counts a refusal (`listener` stage).
pub fn peer_auth(
    state: &Gateway,
    active: &Active,
    mtls: bool,
    service: &str,
    selector: &BTreeMap<String, String>,
    port: u16,
) -> Result<(), crate::peer_auth::Refused> {
    let endpoints = || {
        (
            state.endpoints.borrow().clone(),
            state.tunnel.announcements(),
        )
    };
    crate::peer_auth::decide(
        &active.snapshot.policy,
        endpoints,
        mtls,
        service,
        selector,
        port,
    )
    .inspect_err(|r| state.metrics.refused("listener", r.reason))
}

/// Envoy's RBAC answer to a denied request: `403` with `RBAC: access
/// denied`; for gRPC a trailers-only `PERMISSION_DENIED` with that message.
pub fn denied_response(grpc: bool) -> http::Response<ProxyBody> {
    let b = http::Response::builder().header(crate::respond::ERROR_HEADER, "unauthorized");
    let r = if grpc {
        b.status(http::StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", "7")
            .header("grpc-message", RBAC_DENIED)
            .body(body::empty())
    } else {
        b.status(http::StatusCode::FORBIDDEN)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(body::full(RBAC_DENIED))
    };
    r.unwrap_or_else(|_| http::Response::new(body::empty()))
}

/// Authorizes a request that this gateway forwards to an endpoint of its
/// own cluster. The principal is the caller's workload identity when it
/// came over mutual TLS, else none; `source.cluster` is this cluster. The
/// endpoint is chosen later by the balancer, so the request is denied if
/// any candidate endpoint's policies deny it ([`Need::Every`]). The path is
/// normalized in the request, as on the inbound side. Counts and logs a
/// denial; returns the response to send instead.
// Both variants are a whole request or response, moved once per request:
// boxing the error would save nothing.
#[allow(clippy::result_large_err)]
pub fn enforce_local<B>(
    state: &Gateway,
    active: &Active,
    caller: Option<&str>,
    service: &str,
    selector: &BTreeMap<String, String>,
    mut req: http::Request<B>,
) -> Result<http::Request<B>, http::Response<ProxyBody>> {
    let grpc = crate::respond::is_grpc(req.headers());
    let normalized = req
        .uri()
        .path_and_query()
        .map(|pq| normalize_path(pq.as_str()).map(|(p, q)| format!("{p}{q}")));
    match normalized {
        Some(Err(e)) => {
            return Err(crate::respond::error_response(
                crate::wire::frame::Refusal::BadRequest,
                &e.to_string(),
                grpc,
            ));
        }
        Some(Ok(n))
            if req
                .uri()
                .path_and_query()
                .is_some_and(|pq| pq.as_str() != n) =>
        {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = n.parse().ok();
            if let Ok(u) = http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
        _ => {}
    }
    if active.authz.is_empty() {
        return Ok(req);
    }
    let endpoints = state.endpoints.borrow().clone();
    let candidates = crate::endpoints::healthy(&endpoints, service, selector);
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let path = req.uri().path();
    let r = Request::new(
        caller,
        &state.cluster,
        Some(Http {
            method: req.method().as_str(),
            path,
            host,
            headers: req.headers(),
        }),
    )
    .with_service(service);
    let metrics = &state.module_metrics.authz;
    let policy = &active.snapshot.policy;
    let Err(denial) = authorize(
        &active.authz,
        policy,
        metrics,
        &r,
        service,
        candidates,
        Need::Every,
    ) else {
        return Ok(req);
    };
    tracing::info!(%service, principal = caller.unwrap_or(""), policy = %denial.policy,
        reason = denial.reason.label(), "authorization denied (local): {denial}");
    metrics.denied_by(&denial, &state.cluster, &state.cluster, service);
    Err(denied_response(grpc))
}

/// [`enforce_local`] for a TCP connection forwarded to an endpoint of this
/// cluster: the principal is the caller's workload identity when it came in
/// over mutual TLS (else none), `connection.sni` the server name it asked
/// for when routed by SNI; HTTP-only fields read as for TCP. False when
/// denied, counted and logged.
pub fn admit_local_tcp(
    state: &Gateway,
    active: &Active,
    service: &str,
    selector: &BTreeMap<String, String>,
    caller: Option<&str>,
    sni: Option<&str>,
) -> bool {
    if active.authz.is_empty() {
        return true;
    }
    let endpoints = state.endpoints.borrow().clone();
    let candidates = crate::endpoints::healthy(&endpoints, service, selector);
    let r = Request::new(caller, &state.cluster, None)
        .with_sni(sni)
        .with_service(service);
    let metrics = &state.module_metrics.authz;
    let policy = &active.snapshot.policy;
    let Err(denial) = authorize(
        &active.authz,
        policy,
        metrics,
        &r,
        service,
        candidates,
        Need::Every,
    ) else {
        return true;
    };
    tracing::info!(%service, policy = %denial.policy, reason = denial.reason.label(), "authorization denied a local TCP connection");
    metrics.denied_by(&denial, &state.cluster, &state.cluster, service);
    false
}
