//! An open-loop, fixed-rate HTTP/1.1, HTTP/2 (h2c) and unary gRPC load
//! generator, for acceptance tests (failover, zero failed requests while the
//! config changes) and for the benchmark harness. The `meshfed-load` binary
//! is a thin command line over [`run`].
//!
//! # Open loop and coordinated omission
//!
//! A closed-loop generator (send, wait for the answer, send the next) slows
//! down with the server: when the server stalls for a second it simply sends
//! nothing for a second, and the requests it never sent never show up in the
//! latency histogram. That is *coordinated omission*: the generator
//! coordinates with the server to omit exactly the bad samples.
//!
//! [`run`] does not wait. Request `i` has an *intended send time*
//! `start + i / rate`, fixed before the run starts. The scheduler sends each
//! request at its intended time whatever happened to the earlier ones; if the
//! scheduler itself falls behind (a busy machine), it catches up by sending
//! the overdue requests at once, and they keep their intended times. Latency
//! and the per-request timeout are both measured from the intended time, so
//! any delay (in the server, in the network, in a queue inside this client,
//! in the scheduler) shows up as latency or as a timeout, never as a lower
//! rate. This is the correction wrk2 makes.
//!
//! The generator's own lateness is therefore part of every sample, so it is
//! kept small: the intended times come from a dedicated thread (see
//! `pacer`), not from tokio's 1 ms timer wheel, and a request is usually on
//! its way within tens of microseconds of its intended time on an idle
//! machine.
//!
//! Concurrency is bounded by [`LoadSpec::max_in_flight`]: a request that
//! would exceed it is not delayed (that would be closed loop again) but
//! counted at once as failed with reason `overload`.
//!
//! # Connections
//!
//! The client keeps at most [`LoadSpec::connections`] TCP connections,
//! dialled lazily and redialled after a failure.
//!
//! - **HTTP/2 and gRPC** multiplex: request `i` goes to connection
//!   `i % connections` (round robin), however many requests that connection
//!   already carries.
//! - **HTTP/1.1** carries one request at a time per keep-alive connection, so
//!   a request takes any idle connection, dials a new one while fewer than
//!   `connections` exist, and otherwise *queues* (first come, first served)
//!   until one is free. We chose the queue over unbounded dialling so that a
//!   benchmark opens a known number of connections, as wrk and h2load do;
//!   time spent queued counts as latency (it runs from the intended time),
//!   so the report stays honest. To keep the wire open loop too, give
//!   HTTP/1.1 at least `rate × worst latency` connections (Little's law),
//!   e.g. 1000 req/s with a 2 s timeout needs 2000 to never queue behind a
//!   stalled server; with fewer, queued requests time out instead.
//!
//! A request the server never saw (a kept-alive connection that closed just
//! before use) is retried once on a fresh connection, as HTTP clients do; a
//! request that reached the wire is never retried.
//!
//! # Outcomes
//!
//! Every scheduled request is counted in [`LoadReport::sent`] and ends either
//! `ok` or failed with one reason, so `ok + failed == sent`:
//!
//! | reason | meaning |
//! |---|---|
//! | `status N` | an HTTP status outside 2xx/3xx (for gRPC: anything but 200) |
//! | `grpc-status N` | a gRPC call that ended with a non-zero `grpc-status` |
//! | `grpc-status missing` | a 200 gRPC response with no `grpc-status` |
//! | `timeout` | no complete response within [`LoadSpec::timeout`] of the intended time |
//! | `connect` | dialling the target failed (refused, unreachable, handshake) |
//! | `reset` | the connection failed after the request was sent |
//! | `protocol` | the server's answer could not be parsed |
//! | `overload` | [`LoadSpec::max_in_flight`] requests were already in flight |
//! | `invalid spec: …` | the spec cannot make a request (see [`LoadSpec::validate`]) |
//!
//! The latency histogram holds every request that got a complete response,
//! failed or not (a 503 is fast, and that is worth seeing); timeouts and
//! transport failures are only counted.
//!
//! This module owns the generator only. Starting servers and gateways, and
//! deciding what a test expects of the report, belong to the tests.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

mod client;
mod pacer;
mod report;
#[cfg(test)]
mod tests;

use client::{Client, Completed, Failure};
use pacer::Pacer;
pub use report::LoadReport;
use report::Recorder;

/// The wire protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive, one request at a time per connection.
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (h2c, no upgrade).
    Http2,
    /// Unary gRPC over h2c: `POST`, `content-type: application/grpc`,
    /// `te: trailers` and one length-prefixed message. Success is HTTP 200
    /// with `grpc-status: 0`.
    Grpc,
}

impl Protocol {
    /// The name the command line uses: `http1`, `http2` or `grpc`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

/// What to send, where, and how fast.
///
/// Requests carry no body and use `GET` when `body_bytes` is 0, and `POST`
/// with `body_bytes` zero bytes otherwise. gRPC always uses `POST`; its
/// message is an empty protobuf message when `body_bytes` is 0, and otherwise
/// `body_bytes` bytes of a single unknown field (number 2^29-1), which every
/// protobuf decoder skips, so any unary method accepts it (the smallest such
/// message is 6 bytes; smaller sizes are rounded up to it).
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to connect.
    pub target: SocketAddr,
    /// The `Host` header (HTTP/1.1) or `:authority` (HTTP/2, gRPC), e.g.
    /// `ratings.default`.
    pub authority: String,
    /// The request path, e.g. `/` or `/ratings.v1.Ratings/Get`.
    pub path: String,
    pub protocol: Protocol,
    /// Requests per second. 0 sends nothing.
    pub rate: u32,
    /// How long to send for; [`Duration::MAX`] sends until [`run_until`]'s
    /// stop future resolves.
    pub duration: Duration,
    /// Size of the request body (for gRPC, of the message).
    pub body_bytes: usize,
    /// Extra request headers; one named like a default (`host`,
    /// `content-type`, `te`) replaces it.
    pub headers: Vec<(String, String)>,
    /// Per request, counted from its intended send time.
    pub timeout: Duration,
    /// Most requests in flight at once; more are failed as `overload`.
    pub max_in_flight: usize,
    /// Most TCP connections (see the module docs for HTTP/1.1). At least 1.
    pub connections: usize,
    /// Count responses by the value of this response header (e.g.
    /// `x-served-by`) in [`LoadReport::responses_by_header`].
    pub tally_header: Option<String>,
}

impl Default for LoadSpec {
    /// 100 req/s of `GET /` over HTTP/1.1 for 10 s to the gateway's default
    /// outbound port on loopback, with a 2 s timeout, 8 connections and at
    /// most 10 000 requests in flight.
    fn default() -> Self {
        LoadSpec {
            target: SocketAddr::from(([127, 0, 0, 1], 15001)),
            authority: "localhost".to_string(),
            path: "/".to_string(),
            protocol: Protocol::Http1,
            rate: 100,
            duration: Duration::from_secs(10),
            body_bytes: 0,
            headers: Vec::new(),
            timeout: Duration::from_secs(2),
            max_in_flight: 10_000,
            connections: 8,
            tally_header: None,
        }
    }
}

impl LoadSpec {
    /// The [`Default`] spec aimed at `target` with `authority`, over
    /// `protocol`; set the rest with struct update syntax or field by field.
    pub fn new(target: SocketAddr, authority: impl Into<String>, protocol: Protocol) -> Self {
        LoadSpec {
            target,
            authority: authority.into(),
            protocol,
            ..LoadSpec::default()
        }
    }

    /// Checks that the spec makes a valid request: authority, path, header
    /// names and values. [`run`] does not refuse an invalid spec (it has no
    /// error to return); it fails every request with `invalid spec: …`.
    pub fn validate(&self) -> Result<(), SpecError> {
        client::Template::new(self).map(|_| ())
    }
}

/// Why a [`LoadSpec`] cannot make a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

/// Sends `spec.rate` requests per second for `spec.duration`, then waits for
/// the requests still in flight (each ends within `spec.timeout`) and
/// reports.
pub async fn run(spec: LoadSpec) -> LoadReport {
    run_until(spec, std::future::pending::<()>()).await
}

/// Like [`run`], but stops sending as soon as `stop` resolves (or the
/// duration ends, whichever is first); a test can run load while it kills
/// and restarts processes, e.g. with a `tokio::sync::oneshot::Receiver` as
/// `stop`. Requests already sent are still awaited, within `spec.timeout`.
///
/// Dropping the returned future aborts the requests in flight.
pub async fn run_until<F: Future>(spec: LoadSpec, stop: F) -> LoadReport {
    let recorder = Arc::new(Recorder::new(spec.tally_header.clone()));
    let client = Client::new(&spec).map(Arc::new);
    let in_flight = Arc::new(Semaphore::new(
        spec.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut tasks = JoinSet::new();
    let mut stop = pin!(stop);
    let mut stopped = false;
    let mut sent: u64 = 0;

    let start = Instant::now();
    let end = start.checked_add(spec.duration);
    let mut pacer = Pacer::start(start, end, spec.rate);
    loop {
        let intended = tokio::select! {
            biased;
            _ = &mut stop => { stopped = true; break; }
            tick = pacer.next() => match tick {
                Some(intended) => intended,
                None => break,
            },
        };
        sent += 1;
        match &client {
            Err(e) => recorder.record(None, Completed::failed(Failure::InvalidSpec(e.clone()))),
            Ok(client) => match Arc::clone(&in_flight).try_acquire_owned() {
                Err(_) => recorder.record(None, Completed::failed(Failure::Overload)),
                Ok(permit) => {
                    let client = Arc::clone(client);
                    let recorder = Arc::clone(&recorder);
                    let deadline = intended.checked_add(spec.timeout);
                    tasks.spawn(async move {
                        let _permit = permit;
                        let call = client.call(sent);
                        let completed = match deadline {
                            Some(deadline) => tokio::time::timeout_at(deadline, call)
                                .await
                                .unwrap_or_else(|_| Completed::failed(Failure::Timeout)),
                            None => call.await,
                        };
                        recorder.record(Some(intended.elapsed()), completed);
                    });
                }
            },
        }
        // Reap finished tasks so a long run does not hold them all.
        while tasks.try_join_next().is_some() {}
    }
    if !stopped {
        // Out of requests to send: the sending window still lasts until the
        // end of the duration, or until stop.
        match end {
            Some(end) => {
                tokio::select! {
                    _ = &mut stop => {}
                    () = tokio::time::sleep_until(end) => {}
                }
            }
            None => {
                stop.await;
            }
        }
    }
    let elapsed = start.elapsed();
    drop(pacer);
    while tasks.join_next().await.is_some() {}
    recorder.finish(sent, elapsed)
}

/// The intended send time of request `i`, from the start: `i / rate`
/// seconds, computed exactly so it does not drift over a long run. `None`
/// at rate 0.
fn offset(i: u64, rate: u32) -> Option<Duration> {
    let nanos = (u128::from(i) * 1_000_000_000).checked_div(u128::from(rate))?;
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}
