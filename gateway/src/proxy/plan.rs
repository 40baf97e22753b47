//! The outbound path's decisions, as plain data: from a request head, the
//! active snapshot and the endpoint view to a [`Plan`], and the retry
//! policy's reading of a try's outcome ([`Seen`]).
//!
//! Pure: no sockets, no tokio, no [`crate::state::Gateway`]. Randomness (a
//! fault's or a mirror's percentage) comes in as a die, so tests can load
//! it. The plan is printed, compared and unit-tested without a socket
//! (`plan/tests.rs`, on snapshots compiled from YAML).
//!
//! It does not execute anything: [`super::outbound`] applies the fault,
//! buffers the body for replay, spawns mirrors and forwards with retries
//! under the route timeout, consuming the plan. Routing itself (rule
//! matching, weighted splits, the cluster choice) is [`crate::route`]'s;
//! this module asks it once per request and collects the answers.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, Uri};
use meshfed_policy::snapshot::{
    AbortStatus, HttpRoute, Mirror, PPM, RetryPolicy, WeightedDestination,
};

use super::rules;
use crate::endpoints::EndpointSet;
use crate::route::{self, Active, RequestInfo, Target};
use crate::wire::announce::Announcement;
use crate::wire::frame::Refusal;

/// The request head as the plan sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    /// The URI's authority, else the `Host` header ("" when neither).
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The namespace short names resolve in (the caller's, if known).
    pub namespace: &'a str,
    /// Whether the caller proved a workload identity; only then is
    /// `namespace` its `sourceNamespace`.
    pub verified: bool,
    /// The caller's address, for `sourceLabels` (looked up in discovery).
    pub addr: Option<IpAddr>,
}

/// What the plan reads besides the request: one snapshot and one view of
/// the endpoints, local and announced.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, 'v> {
    /// The snapshot, which the plan borrows from.
    pub active: &'a Active,
    pub local_cluster: &'v str,
    pub endpoints: &'v EndpointSet,
    pub remote: &'v [(String, Arc<Announcement>)],
}

impl View<'_, '_> {
    /// Chooses a cluster for `target` (which a failover may edit), avoiding
    /// `exclude`: [`route::choose_cluster`] on this view.
    pub fn choose(&self, target: &mut Target, exclude: &[String]) -> Option<String> {
        route::choose_cluster(
            target,
            self.active,
            self.local_cluster,
            self.endpoints,
            self.remote,
            exclude,
        )
    }
}

/// Where an HTTP request goes and under what policy. Borrowed from the
/// snapshot it was made from (the request holds that snapshot to its end).
/// Small: the rarely used parts are boxed or borrowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'a> {
    /// Where routing sent the call, before a cluster was chosen: what
    /// PeerAuthentication checks and what a retry chooses again from.
    pub routed: Box<Target>,
    /// The first try's target (a pinned subset that failed over has lost
    /// its cluster label) and cluster.
    pub target: Target,
    pub cluster: String,
    /// The matched VirtualService rule, if one routed the call.
    pub rule: Option<&'a HttpRoute>,
    /// The weighted destination the rule's split picked.
    pub destination: Option<&'a WeightedDestination>,
    /// The retry policy: the rule's (if it allows any), Istio's default when
    /// no rule routed the call.
    pub retry: Option<&'a RetryPolicy>,
    /// How long each try may take (`perTryTimeout`).
    pub per_try: Option<Duration>,
    /// The route timeout: bounds the wait for the response head, retries
    /// and backoffs included.
    pub timeout: Option<Duration>,
    /// The injected fault this request drew.
    pub fault: Fault<'a>,
    /// The mirrors this request drew (each by its percentage).
    pub mirrors: Box<[&'a Mirror]>,
}

/// An injected fault, as drawn for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fault<'a> {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer this instead of forwarding.
    pub abort: Option<&'a AbortStatus>,
}

/// Why a request has no plan.
#[derive(Debug, Clone, PartialEq)]
pub enum NoPlan {
    /// No service or route for the authority.
    NoRoute { authority: String },
    /// Routed, but no cluster has a healthy endpoint for the target.
    NoCluster { routed: Box<Target> },
}

impl NoPlan {
    /// The refusal it is answered with, and its message.
    pub fn refusal(&self) -> (Refusal, String) {
        match self {
            NoPlan::NoRoute { authority } => (
                Refusal::NoRoute,
                format!("no service or route for `{authority}`"),
            ),
            NoPlan::NoCluster { routed } => (
                Refusal::NoHealthyEndpoint,
                format!(
                    "no cluster has a healthy endpoint for {}{}",
                    routed.service,
                    routed
                        .subset
                        .as_ref()
                        .map(|s| format!(" (subset {s})"))
                        .unwrap_or_default()
                ),
            ),
        }
    }

    /// The routed target, when routing found one.
    pub fn routed(&self) -> Option<&Target> {
        match self {
            NoPlan::NoRoute { .. } => None,
            NoPlan::NoCluster { routed } => Some(routed),
        }
    }
}

/// Retries for calls no VirtualService rule routed.
static DEFAULT_RETRIES: std::sync::LazyLock<RetryPolicy> =
    std::sync::LazyLock::new(RetryPolicy::istio_default);

/// Plans an HTTP request: the route (rule, weighted destination), the
/// cluster, the fault, mirrors, retries and timeouts. `hit` draws a
/// percentage (in parts per million; [`hit`] in production).
pub fn plan<'a>(
    ask: &Ask<'_>,
    view: &View<'a, '_>,
    hit: &mut dyn FnMut(u32) -> bool,
) -> Result<Plan<'a>, NoPlan> {
    let active = view.active;
    let info = RequestInfo {
        method: ask.method,
        uri: ask.uri,
        authority: ask.authority,
        headers: ask.headers,
        scheme: "http",
        caller_namespace: ask.namespace,
    };
    // The caller, for sourceNamespace and sourceLabels matches.
    let source_namespace = ask.verified.then_some(ask.namespace);
    let labels = ask
        .addr
        .filter(|_| active.uses_source_labels())
        .and_then(|ip| route::source_labels(view.endpoints, ip, source_namespace));
    let source = route::Source {
        namespace: source_namespace,
        labels: labels.as_ref(),
    };
    let Some(routed) = route::http_target_from(active, &info, &source, view.endpoints, 80) else {
        return Err(NoPlan::NoRoute {
            authority: ask.authority.to_string(),
        });
    };
    let mut target = routed.clone();
    let Some(cluster) = view.choose(&mut target, &[]) else {
        return Err(NoPlan::NoCluster {
            routed: Box::new(routed),
        });
    };
    let rule = target.http_rule(active);
    let destination = target.weighted_destination(active);
    // A VirtualService rule's retries; without one, Istio's defaults.
    let retry = match rule {
        Some(r) => Some(&r.retries).filter(|r| r.attempts > 0),
        None => Some(&*DEFAULT_RETRIES),
    };
    // Fault injection, as Istio's: a delay, then maybe an abort, each for
    // its percentage of requests.
    let fault = rule
        .and_then(|r| r.fault.as_ref())
        .map(|f| Fault {
            delay: f
                .delay
                .as_ref()
                .filter(|d| hit(d.percent_ppm))
                .map(|d| Duration::from_millis(d.delay_ms)),
            abort: f
                .abort
                .as_ref()
                .filter(|a| hit(a.percent_ppm))
                .map(|a| &a.status),
        })
        .unwrap_or_default();
    let mirrors = rule
        .map(|r| r.mirrors.iter().filter(|m| hit(m.percent_ppm)).collect())
        .unwrap_or_default();
    Ok(Plan {
        routed: Box::new(routed),
        target,
        cluster,
        rule,
        destination,
        retry,
        per_try: retry
            .and_then(|r| r.per_try_timeout_ms)
            .map(Duration::from_millis),
        timeout: rule.and_then(|r| r.timeout_ms).map(Duration::from_millis),
        fault,
        mirrors,
    })
}

impl Plan<'_> {
    /// The rule's request edits: its headers, then its `rewrite` (URI and
    /// authority; a new authority becomes `Host` and `:authority`). Mirrors
    /// copy the request after these.
    pub fn edit_request(&self, parts: &mut http::request::Parts, authority: &mut String) {
        let Some(r) = self.rule else {
            return;
        };
        rules::apply_headers(&mut parts.headers, &r.request_headers);
        let before = authority.clone();
        rules::rewrite(r, &mut parts.uri, authority);
        if *authority != before {
            rules::set_authority(&mut parts.uri, &mut parts.headers, authority);
        }
    }

    /// The chosen destination's request edits (not seen by mirrors).
    pub fn edit_request_for_destination(&self, headers: &mut HeaderMap) {
        if let Some(d) = self.destination {
            rules::apply_headers(headers, &d.request_headers);
        }
    }

    /// The response edits: the rule's, then the destination's.
    pub fn edit_response(&self, headers: &mut HeaderMap) {
        if let Some(r) = self.rule {
            rules::apply_headers(headers, &r.response_headers);
        }
        if let Some(d) = self.destination {
            rules::apply_headers(headers, &d.response_headers);
        }
    }

    /// Whether the request must be kept to be sent again (retries or
    /// mirrors need its body).
    pub fn keeps_request(&self) -> bool {
        self.retry.is_some() || !self.mirrors.is_empty()
    }
}

/// Whether this request falls in a `percent_ppm` share.
pub fn hit(percent_ppm: u32) -> bool {
    percent_ppm >= PPM || rand::random_range(0..PPM) < percent_ppm
}

/// The wait before retry number `attempt` (1-based), given a draw in
/// `0.0..=1.0`: Envoy's backoff, 25 ms base doubling up to 200 ms, with
/// full jitter.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    Duration::from_millis(25u64 << attempt.saturating_sub(1).min(3)).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Methods that are safe to send twice (RFC 9110 §9.2.2) and that a
/// bodiless request uses: such a request whose link died before its answer
/// is replayed (on another link, then in another cluster).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What the retry policy looks at in a try's outcome: what the caller would
/// see (a gRPC caller gets a gateway's refusal as HTTP 200 with a
/// `grpc-status`) and the gateway's reason, typed. Built by the executor
/// from its typed error ([`super::outbound`]); a backend's answer is read
/// from its status and `grpc-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    pub status: u16,
    /// The gateway's reason, when a gateway made the answer.
    pub refusal: Option<Refusal>,
    /// The gateway's reason token when it is not a [`Refusal`]'s (a caller
    /// fault's `source-cancelled`, another gateway's unknown reason).
    pub token: Option<&'a str>,
    pub grpc_status: Option<u8>,
    /// A gateway's (or a backend's) own overflow: never retried.
    pub overloaded: bool,
    /// The try died with its link, before any answer.
    pub link_died: bool,
}

impl<'a> Seen<'a> {
    /// An answer a gateway made with HTTP status `http` (`grpc_code`: the
    /// gRPC status it carries when not the one [`crate::respond::grpc_status_for`]
    /// maps `http` to), as a caller sees it: gRPC callers get HTTP 200 and
    /// a `grpc-status`. The one mapping of a gateway's answer for retries.
    pub fn made(
        http: StatusCode,
        grpc_code: Option<u8>,
        grpc: bool,
        refusal: Option<Refusal>,
    ) -> Self {
        Seen {
            status: if grpc { 200 } else { http.as_u16() },
            refusal,
            token: None,
            grpc_status: grpc
                .then(|| grpc_code.unwrap_or_else(|| crate::respond::grpc_status_for(http))),
            overloaded: false,
            link_died: false,
        }
    }

    /// A refusal of this gateway (or of a destination gateway's ERROR
    /// frame), as a caller sees it.
    pub fn refused(refusal: Refusal, grpc: bool) -> Self {
        Seen::made(refusal.http_status(), None, grpc, Some(refusal))
    }

    /// The gateway's reason token, "" for a backend's answer.
    pub fn reason(&self) -> &'a str {
        self.refusal
            .map(Refusal::reason)
            .or(self.token)
            .unwrap_or("")
    }

    /// The label a retry is counted under: the gateway's reason, else the
    /// status.
    pub fn label(&self) -> String {
        match self.reason() {
            "" => self.status.to_string(),
            r => r.to_string(),
        }
    }

    /// Whether the failed try says the path to its cluster is broken
    /// (rather than the service answering badly), so that a retry should go
    /// elsewhere.
    pub fn path_failed(&self) -> bool {
        matches!(
            self.refusal,
            Some(
                Refusal::ConnectFailed
                    | Refusal::NoHealthyEndpoint
                    | Refusal::UpstreamReset
                    | Refusal::Timeout
                    | Refusal::StaleConfig
            )
        )
    }

    /// Whether a retry that moves to another cluster may skip the retry
    /// budget: only when the failed try cannot have reached a backend (no
    /// connection, no endpoint, a refusal for stale config), or when it died
    /// with its link and repeating it is harmless (an idempotent method). A
    /// per-try timeout never qualifies: the slow try may still be running.
    pub fn exempt_move(&self, method: &Method) -> bool {
        match self.refusal {
            Some(Refusal::ConnectFailed | Refusal::NoHealthyEndpoint | Refusal::StaleConfig) => {
                true
            }
            Some(Refusal::UpstreamReset) => matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
            ),
            _ => false,
        }
    }

    /// Whether the try is worth another under Istio's `retryOn`.
    pub fn retriable(&self, retry_on: &[String]) -> bool {
        // A 503 a gateway gave for its own overflow is not retried (as
        // Envoy): retrying would only add to the overload.
        if self.overloaded {
            return false;
        }
        let (status, refusal, grpc) = (self.status, self.refusal, self.grpc_status);
        retry_on.iter().any(|cond| match cond.as_str() {
            "5xx" => status >= 500,
            "gateway-error" => matches!(status, 502..=504),
            "reset" => refusal == Some(Refusal::UpstreamReset),
            "connect-failure" => refusal == Some(Refusal::ConnectFailed),
            "refused-stream" => refusal == Some(Refusal::StaleConfig),
            "retriable-4xx" => status == 409,
            "retriable-status-codes" => false,
            "cancelled" => grpc == Some(1),
            "deadline-exceeded" => grpc == Some(4),
            "resource-exhausted" => grpc == Some(8),
            "internal" => grpc == Some(13),
            "unavailable" => grpc == Some(14),
            code => code.parse::<u16>().is_ok_and(|c| c == status),
        })
    }
}

/// The refusal whose reason token is `token` (a destination gateway's
/// `x-meshfed-error`, decoded once where its response arrives).
pub fn refusal_named(token: &str) -> Option<Refusal> {
    (1..=11)
        .map(Refusal::from_code)
        .find(|r| r.reason() == token)
}

#[cfg(test)]
mod tests;
