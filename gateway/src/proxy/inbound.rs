//! The destination side: serving a stream a peer gateway opened.
//!
//! The peer's cluster comes from its verified certificate (the tunnel gives
//! it as [`PeerInfo`]), never from the stream. A stream is refused with an
//! ERROR frame, which the source turns into a status and an
//! `x-meshfed-error` header, when the service is not exported from this
//! cluster, when no local endpoint fits the subset, or when the endpoint
//! cannot be reached, or (`Overloaded`) when its request body does not fit
//! the budget of peers' bodies in flight ([`crate::body_budget`]).

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Uri, header};
use http_body_util::BodyExt;

use super::{HEAD_TIMEOUT, XFCC, strip_hop_by_hop};
use crate::body::{self, TunnelBody, read_head, refuse, write_frame};
use crate::identity::spiffe::SpiffeId;
use crate::identity::verify::{PeerIdentity, may_assert};
use crate::metrics::{RequestKey, TcpLabels};
use crate::respond::is_grpc;
use crate::state::Gateway;
use crate::tunnel::link::PeerInfo;
use crate::tunnel::stream::{RecvHalf, SendHalf};
use crate::wire::frame::{Frame, Open, Refusal, RequestHead, ResponseHead, StreamKind};

/// The error code with which a stream whose OPEN did not arrive within
/// [`HEAD_TIMEOUT`] is reset (both directions): `0x4854`, "HT".
pub const HEAD_TIMEOUT_CODE: u32 = 0x4854;

/// [`HEAD_TIMEOUT_CODE`] as QUIC writes it.
pub const HEAD_TIMEOUT_RESET: quinn::VarInt = quinn::VarInt::from_u32(HEAD_TIMEOUT_CODE);

/// Serves one stream from a peer; with tracing on, an HTTP stream is one
/// gateway hop of its trace (crate::trace).
pub async fn serve_stream(
    state: Arc<Gateway>,
    peer: Arc<PeerInfo>,
    send: SendHalf,
    recv: RecvHalf,
) {
    let traced = state.trace.get().is_some();
    // One future, awaited in either branch, so that it is not laid out twice.
    let serve = serve(state, peer, send, recv);
    if traced {
        crate::trace::in_stream(serve).await
    } else {
        serve.await
    }
}

async fn serve(state: Arc<Gateway>, peer: Arc<PeerInfo>, mut send: SendHalf, mut recv: RecvHalf) {
    let start = Instant::now();
    let (mut open, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut recv)).await {
        Ok(Ok((Frame::Open(open), rest))) => (open, rest),
        Ok(Ok(_)) => {
            state.metrics.refused("stream", "bad-request");
            return refuse(
                &mut send,
                Refusal::BadRequest,
                "a stream must start with OPEN",
            )
            .await;
        }
        Ok(Err(e)) => {
            state.metrics.refused("stream", "bad-request");
            tracing::debug!(peer = %peer.cluster, error = %e, "unreadable stream head");
            return refuse(&mut send, Refusal::BadRequest, e.to_string()).await;
        }
        Err(_) => {
            // Half-open: reset both directions so that quinn frees the
            // stream (a refusal written to a peer that never sent its OPEN
            // would wait in the send buffer) and the peer learns at once.
            state.metrics.refused("stream", "head-timeout");
            recv.stop(HEAD_TIMEOUT_CODE);
            send.reset(HEAD_TIMEOUT_CODE);
            return;
        }
    };
    // XFCC is ours to set, from the verified caller (below); a source
    // gateway that passed one on (an older release did not drop it) must
    // not have authorization or the endpoint see it.
    if let Some(head) = open.http.as_mut() {
        head.headers.remove(&XFCC);
    }
    if let Some(t) = state.trace.get() {
        crate::trace::start_inbound(t, &peer.cluster, &open);
    }
    let active = state.active.load_full();
    let refusal = |r: Refusal, msg: String| (r, msg);
    let stale = open
        .source_version
        .as_deref()
        .filter(|v| *v != active.version());
    let checked =
        if let (false, Some(theirs)) = (state.exported_here(&active, &open.service), stale) {
            // The caller routed by another snapshot than ours: rather than guess
            // which is newer, answer with a retriable refusal (the caller's retry
            // may reach a gateway that has caught up, or this one later).
            Err(refusal(
                Refusal::StaleConfig,
                format!(
                    "{} is not exported by cluster `{}` at config {}, but the caller routed with \
                 config {theirs}; retry once both have the same commit",
                    open.service,
                    state.cluster,
                    active.version()
                ),
            ))
        } else if !state.exported_here(&active, &open.service) {
            Err(refusal(
                Refusal::NotExported,
                format!(
                    "{} is not exported from cluster `{}`; add a ServiceExport for it",
                    open.service, state.cluster
                ),
            ))
        } else {
            Ok(())
        };
    let checked = checked.and_then(|()| match &open.caller {
        None => Ok(()),
        Some(caller) => caller_may_be_asserted(&peer, caller, &active)
            .map_err(|msg| (Refusal::Unauthorized, msg)),
    });
    // The caller's verified identity, as Istio tells workloads (XFCC; what
    // the source sent under that name was dropped on arrival).
    if let (Ok(()), Some(caller), Some(head)) = (&checked, &open.caller, open.http.as_mut())
        && let Some(v) = super::xfcc(&state, &active, caller)
    {
        head.headers.insert(&XFCC, v);
    }
    if let Err((r, msg)) = checked {
        state.metrics.refused("stream", r.reason());
        record(
            &state,
            &peer,
            &open,
            r.http_status().as_u16(),
            r.reason(),
            start,
        );
        return refuse(&mut send, r, msg).await;
    }
    let endpoints = state.endpoints.borrow().clone();
    let selector: std::collections::BTreeMap<String, String> =
        open.subset_labels.iter().cloned().collect();
    let candidates = crate::endpoints::healthy(&endpoints, &open.service, &selector);
    // Authorization, before anything is sent upstream (crate::authz).
    let (candidates, target) = match authorize(&state, &active, &peer, &open, candidates) {
        Ok(ok) => ok,
        Err(denied) => return Box::pin(deny(&state, &peer, &open, denied, send, start)).await,
    };
    // Endpoint-level policy (DestinationRule) applies here (crate::upstream).
    let dest = crate::upstream::Dest {
        service: &open.service,
        subset: open.subset.as_deref(),
        port: open.port,
        selector: &selector,
    };
    let Some(picked) = state.upstream.choose_from(&active, candidates, &dest) else {
        let r = Refusal::NoHealthyEndpoint;
        state.metrics.refused("stream", r.reason());
        record(
            &state,
            &peer,
            &open,
            r.http_status().as_u16(),
            r.reason(),
            start,
        );
        let subset = open
            .subset
            .as_deref()
            .map(|s| format!(" in subset {s}"))
            .unwrap_or_default();
        return refuse(
            &mut send,
            r,
            format!(
                "cluster `{}` has no healthy endpoint for {}{subset}",
                state.cluster, open.service
            ),
        )
        .await;
    };
    crate::trace::upstream(picked.addr);
    // Each kind's exchange is its own future, boxed: `serve` holds only a
    // pointer to it, so the per-stream future that the tunnel boxes stays
    // small, and neither kind carries the other's state (a TCP stream
    // holds its future for as long as it is open). Boxing still copies the
    // HTTP exchange once, and it is large (upstream::send); the sizes are
    // guarded by tests::destination_futures_stay_small.
    match open.kind {
        StreamKind::Tcp => Box::pin(serve_tcp(&state, &open, picked, send, recv, rest)).await,
        StreamKind::Http => {
            // The endpoint's protocol (upstream::speaks_h2), from the
            // snapshot this stream was checked with.
            let h2 = open.http.as_ref().is_some_and(|h| {
                crate::upstream::speaks_h2(
                    &active,
                    &state.service_ports.load(),
                    &open.service,
                    open.port,
                    is_grpc(&h.headers),
                )
            });
            // The head moves into the request: `open` keeps the rest, for
            // the metrics.
            let head = open.http.take();
            Box::pin(serve_http(
                &state, &peer, &open, head, picked, target, h2, send, recv, rest, start,
            ))
            .await
        }
    }
}

/// The TCP half of [`serve`]: a connection to `picked`, spliced with the
/// stream until either side ends.
async fn serve_tcp(
    state: &Gateway,
    open: &Open,
    picked: crate::upstream::Picked<'_>,
    mut send: SendHalf,
    recv: RecvHalf,
    rest: bytes::BytesMut,
) {
    let (mut upstream, inflight) = match state.upstream.connect_tcp(picked).await {
        Ok(ok) => ok,
        Err(e) => {
            state.metrics.refused("stream", e.refusal().reason());
            return refuse(&mut send, e.refusal(), e.to_string()).await;
        }
    };
    if write_frame(&mut send, &Frame::Accept).await.is_err() {
        return;
    }
    use tokio::io::AsyncWriteExt;
    if !rest.is_empty() && upstream.write_all(&rest).await.is_err() {
        return;
    }
    // The head's read buffer must not live as long as the stream.
    let already = rest.len() as u64;
    drop(rest);
    let labels = TcpLabels {
        direction: "inbound",
        destination_service: open.service.clone(),
        destination_cluster: state.cluster.clone(),
    };
    state.metrics.tcp_connections.get_or_create(&labels).inc();
    let (to_peer, from_peer) = super::splice::splice(upstream, send, recv, already).await;
    state
        .metrics
        .tcp_received_bytes
        .get_or_create(&labels)
        .inc_by(to_peer);
    state
        .metrics
        .tcp_sent_bytes
        .get_or_create(&labels)
        .inc_by(from_peer);
    drop(inflight);
}

/// The HTTP half of [`serve`]: the request to `picked`, and its answer back
/// to the peer.
#[allow(clippy::too_many_arguments)]
async fn serve_http(
    state: &Gateway,
    peer: &PeerInfo,
    open: &Open,
    head: Option<RequestHead>,
    picked: crate::upstream::Picked<'_>,
    target: String,
    h2: bool,
    mut send: SendHalf,
    mut recv: RecvHalf,
    mut rest: bytes::BytesMut,
    start: Instant,
) {
    let Some(head) = head else {
        return refuse(
            &mut send,
            Refusal::BadRequest,
            "HTTP stream without a request head",
        )
        .await;
    };
    // The normalized path authorization matched (crate::authz), and
    // exactly that: a target the URI parser would alter (it drops a
    // fragment, for one) is refused rather than forwarded as something
    // authorization did not see.
    // In origin form: the endpoint's address is the connection's, and
    // `Host` carries the authority.
    let target = bytes::Bytes::from(target);
    let uri: Uri = match Uri::from_maybe_shared(target.clone()) {
        Ok(u)
            if u.scheme().is_none()
                && u.path_and_query().map(|p| p.as_str().as_bytes()) == Some(&target[..]) =>
        {
            u
        }
        _ => {
            state.metrics.refused("stream", "bad-request");
            record(state, peer, open, 400, "bad-request", start);
            return refuse(
                &mut send,
                Refusal::BadRequest,
                format!(
                    "request path `{}` cannot be forwarded as it was authorized",
                    String::from_utf8_lossy(&target)
                ),
            )
            .await;
        }
    };
    let grpc = is_grpc(&head.headers);
    let mut req = Request::builder().method(head.method).uri(uri);
    if let Some(h) = req.headers_mut() {
        *h = head.headers;
        strip_hop_by_hop(h);
        if let Ok(v) = head.authority.parse() {
            h.insert(header::HOST, v);
        }
        crate::trace::inject(h);
    }
    // The request body is held to the budget of peers' bodies in flight
    // (crate::body_budget). Any body that has not ended with the head takes
    // its place now, so that past the budget it is refused before the
    // endpoint sees it: one whose bytes are still on their way (stuck behind
    // the peer's other streams in flow control, say) would otherwise hold an
    // endpoint connection outside the budget for as long as the peer likes.
    let peer_id: Arc<str> = peer.id.as_str().into();
    let bodiless = rest.is_empty() && body::ended_after_head(&mut recv, &mut rest);
    let permit = if bodiless {
        None
    } else {
        match state.bodies.try_acquire(&peer_id) {
            Ok(p) => Some(p),
            Err(e) => return over_budget(state, peer, open, e, send, start).await,
        }
    };
    let (tunnel_body, over) = TunnelBody::gated(recv, rest, state.bodies.clone(), peer_id, permit);
    let tunnel_body = tunnel_body.map_err(Into::into).boxed_unsync();
    let Ok(req) = req.body(tunnel_body) else {
        return refuse(&mut send, Refusal::BadRequest, "invalid request head").await;
    };
    // gRPC needs HTTP/2 to the endpoint; everything else goes as
    // HTTP/1.1, which every HTTP server speaks, unless the service declares
    // the port HTTP/2 (upstream::speaks_h2). If the source gives up first
    // (its route timeout, its caller gone, the link down), it stops reading
    // the stream: stop waiting for the endpoint too, which closes that
    // request's connection and frees its pool slot rather than hold it for a
    // hung endpoint (counted as 499, nginx's "client closed request").
    let answer = tokio::select! {
        biased;
        answer = state.upstream.send(picked, req, h2) => answer,
        _ = send.stopped() => {
            record(state, peer, open, 499, "source-cancelled", start);
            return;
        }
    };
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            record(state, peer, open, parts.status.as_u16(), "", start);
            let head = Frame::Response(Box::new(ResponseHead {
                status: parts.status,
                headers: parts.headers,
            }));
            if write_frame(&mut send, &head).await.is_err() {
                return;
            }
            if let Err(e) = body::pump(body, &mut send).await {
                tracing::debug!(error = %e, "response body to peer failed");
            }
        }
        Err(_) if over.get().is_some() => {
            if let Some(e) = over.get() {
                over_budget(state, peer, open, *e, send, start).await;
            }
        }
        Err(e) => {
            let r = e.refusal();
            let (code, reason) = e.recorded();
            record(state, peer, open, code, reason, start);
            if let crate::upstream::UpstreamError::Caller { .. } = e {
                state.metrics.refused("stream", reason);
            }
            // An overflow is answered as the gateway's own 503 with the
            // limit's header, which an ERROR frame could not carry.
            if !matches!(e, crate::upstream::UpstreamError::Overflow { .. }) {
                return refuse(&mut send, r, e.to_string()).await;
            }
            let (parts, body) = e.response(grpc).into_parts();
            let head = Frame::Response(Box::new(ResponseHead {
                status: parts.status,
                headers: parts.headers,
            }));
            if write_frame(&mut send, &head).await.is_ok() {
                let _ = body::pump(body, &mut send).await;
            }
        }
    }
}

/// Refuses a stream whose request body does not fit the budget of peers'
/// bodies in flight: `Overloaded` (a `503` at the source, which may retry
/// elsewhere), counted `reason="body-limit"`.
async fn over_budget(
    state: &Gateway,
    peer: &PeerInfo,
    open: &Open,
    e: crate::body_budget::OverBudget,
    mut send: SendHalf,
    start: Instant,
) {
    let r = Refusal::Overloaded;
    state.metrics.refused("stream", "body-limit");
    record(
        state,
        peer,
        open,
        r.http_status().as_u16(),
        "body-limit",
        start,
    );
    tracing::debug!(peer = %peer.id, service = %open.service, "request body refused: {e}");
    refuse(&mut send, r, e.to_string()).await;
}

/// Why a stream is not served: denied by authorization, or a path that
/// cannot be authorized.
enum Denied {
    Authz(crate::authz::Denial),
    BadPath(String),
}

/// Evaluates the AuthorizationPolicies for a stream over its candidate
/// endpoints ([`crate::authz::Authz::filter`]). The principal is the
/// caller's forwarded workload identity (already checked against the
/// trust-domain rule), else the source gateway's own. Returns the endpoints
/// that allow the request and, for HTTP, the normalized request target to
/// forward.
fn authorize<'e>(
    state: &Gateway,
    active: &crate::route::Active,
    peer: &PeerInfo,
    open: &Open,
    candidates: Vec<&'e crate::endpoints::Endpoint>,
) -> Result<(Vec<&'e crate::endpoints::Endpoint>, String), Denied> {
    let (target, http) = match &open.http {
        Some(head) => {
            // A fragment never travels in a request (RFC 9110 §7.1): one
            // from a peer is refused, not authorized on `/admin#x` and then
            // forwarded as `/admin` (the URI parser drops it).
            if head.path.contains('#') {
                return Err(Denied::BadPath(format!(
                    "request path `{}` has a fragment (`#`), which is never sent to a server",
                    head.path.escape_debug()
                )));
            }
            let (path, query) = crate::authz::normalize_path(&head.path)
                .map_err(|e| Denied::BadPath(e.to_string()))?;
            // Not `format!`: its machinery costs ~400 instructions a
            // request here (docs/benchmarks.md).
            let mut target = String::with_capacity(path.len() + query.len());
            target.push_str(&path);
            target.push_str(query);
            (target, Some((head, path)))
        }
        None => (String::new(), None),
    };
    if active.authz.is_empty() {
        return Ok((candidates, target));
    }
    let principal = open.caller.as_deref().unwrap_or(&peer.id);
    let req = crate::authz::Request::new(
        Some(principal),
        &peer.cluster,
        http.as_ref().map(|(head, path)| crate::authz::Http {
            method: head.method.as_str(),
            path,
            host: &head.authority,
            headers: &head.headers,
        }),
    )
    .with_sni(open.sni.as_deref().filter(|_| open.kind == StreamKind::Tcp));
    let allowed = crate::authz::authorize(
        &active.authz,
        &active.snapshot.policy,
        &state.module_metrics.authz,
        &req,
        &open.service,
        candidates,
        crate::authz::Need::Some,
    )
    .map_err(Denied::Authz)?;
    Ok((allowed, target))
}

/// Answers a denied stream: HTTP gets Envoy's RBAC answer (`403`,
/// `RBAC: access denied`; gRPC: `PERMISSION_DENIED`), TCP an ERROR frame.
/// Counted and logged with the policy and the reason.
async fn deny(
    state: &Gateway,
    peer: &PeerInfo,
    open: &Open,
    denied: Denied,
    mut send: SendHalf,
    start: Instant,
) {
    use crate::authz::RBAC_DENIED;
    let denial = match denied {
        Denied::BadPath(e) => {
            state.metrics.refused("stream", "bad-request");
            record(state, peer, open, 400, "bad-request", start);
            return refuse(&mut send, Refusal::BadRequest, e).await;
        }
        Denied::Authz(d) => d,
    };
    let principal = open.caller.as_deref().unwrap_or(&peer.id);
    tracing::info!(
        service = %open.service,
        source_cluster = %peer.cluster,
        %principal,
        policy = %denial.policy,
        reason = denial.reason.label(),
        "authorization denied: {denial}"
    );
    state
        .module_metrics
        .authz
        .denied_by(&denial, &peer.cluster, &state.cluster, &open.service);
    let r = Refusal::Unauthorized;
    record(state, peer, open, 403, r.reason(), start);
    let Some(head) = &open.http else {
        return refuse(&mut send, r, format!("{RBAC_DENIED}: {denial}")).await;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(
        crate::respond::ERROR_HEADER,
        http::HeaderValue::from_static("unauthorized"),
    );
    let (status, body) = if is_grpc(&head.headers) {
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("7"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("RBAC: access denied"),
        );
        (http::StatusCode::OK, body::empty())
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        (http::StatusCode::FORBIDDEN, body::full(RBAC_DENIED))
    };
    let head = Frame::Response(Box::new(ResponseHead { status, headers }));
    if write_frame(&mut send, &head).await.is_ok() {
        let _ = body::pump(body, &mut send).await;
    }
}

/// The trust-domain rule: a peer gateway may assert only workload
/// identities in its own cluster's trust domain (design.md, "Identity").
fn caller_may_be_asserted(
    peer: &PeerInfo,
    caller: &str,
    active: &crate::route::Active,
) -> Result<(), String> {
    let claimed = SpiffeId::parse(caller)
        .map_err(|e| format!("caller identity `{caller}` is not a SPIFFE ID: {e}"))?;
    let peer_id = PeerIdentity {
        id: SpiffeId::parse(&peer.id).map_err(|e| format!("peer identity: {e}"))?,
        cluster: peer.cluster.clone(),
        trust_domain: peer.trust_domain.clone(),
    };
    may_assert(&peer_id, &claimed, |c| {
        active
            .snapshot
            .policy
            .clusters
            .get(c)
            .map(|i| i.trust_domain.clone())
    })
    .map_err(|e| e.to_string())
}

fn record(state: &Gateway, peer: &PeerInfo, open: &Open, code: u16, reason: &str, start: Instant) {
    crate::trace::response(code, reason, "", None);
    state.metrics.record_request(
        RequestKey {
            direction: "inbound",
            source_cluster: &peer.cluster,
            destination_cluster: &state.cluster,
            destination_service: &open.service,
            response_code: code,
            grpc_response_status: "",
            reason,
        },
        start.elapsed().as_secs_f64(),
    );
}

#[cfg(test)]
mod tests;
