//! A timeline prober: one HTTP GET every `interval`, each on its own task
//! (a slow call never delays the next: open loop), with its start time,
//! end time, status and `x-served-by`. The load generator ([`crate::load`])
//! counts outcomes; this keeps *when* each happened, which is what a
//! deadline such as "rerouted within 1 s of the cut" is measured on.
//!
//! Times are offsets from the prober's start, so a test records the
//! instant of its event (`prober.now()`) and compares.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// One probe's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the prober's start.
    pub start: Duration,
    /// When it completed (or failed), from the prober's start.
    pub end: Duration,
    /// The HTTP status; 0 for a transport failure or timeout.
    pub status: u16,
    /// `x-served-by`, or the failure (`x-meshfed-error`, transport error).
    pub served_by: String,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

/// A running prober; [`Prober::stop`] returns the samples.
#[derive(Debug)]
pub struct Prober {
    origin: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    /// Starts probing `GET http://<target>/` with `Host: <host>` every
    /// `interval`, each with a `timeout`.
    pub fn start(target: SocketAddr, host: &str, interval: Duration, timeout: Duration) -> Self {
        let origin = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http::<Full<Bytes>>();
        let (host, out) = (host.to_string(), samples.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                tick.tick().await;
                if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    while inflight.join_next().await.is_some() {}
                    return;
                }
                let (client, host, out) = (client.clone(), host.clone(), out.clone());
                inflight.spawn(async move {
                    let start = origin.elapsed();
                    let req = hyper::Request::get(format!("http://{target}/"))
                        .header("host", host)
                        .body(Full::new(Bytes::new()));
                    let (status, served_by) = match req {
                        Err(e) => (0, e.to_string()),
                        Ok(req) => match tokio::time::timeout(timeout, client.request(req)).await {
                            Err(_) => (0, "timeout".to_string()),
                            Ok(Err(e)) => (0, format!("transport: {e}")),
                            Ok(Ok(resp)) => {
                                let h = |n: &str| {
                                    resp.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_string)
                                };
                                let who = h("x-served-by")
                                    .or_else(|| h("x-meshfed-error"))
                                    .unwrap_or_default();
                                (resp.status().as_u16(), who)
                            }
                        },
                    };
                    let end = origin.elapsed();
                    if let Ok(mut v) = out.lock() {
                        v.push(Sample {
                            start,
                            end,
                            status,
                            served_by,
                        });
                    }
                });
                while inflight.try_join_next().is_some() {}
            }
        });
        Prober {
            origin,
            samples,
            stop,
            task,
        }
    }

    /// Now, on the prober's clock.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The samples completed so far, by start time.
    pub fn snapshot(&self) -> Vec<Sample> {
        let mut v = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by_key(|s| s.start);
        v
    }

    /// Stops sending, waits for the calls in flight (each ends by its
    /// timeout), and returns every sample by start time.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.samples.clone();
        let _ = self.task.await;
        let mut v = samples.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by_key(|s| s.start);
        v
    }
}

/// The failover time after an event at `at`: how long after it the last
/// bad sample (not 200, or served by one of `bad_servers`) *started*;
/// zero when none. Samples started before `at` are ignored.
pub fn last_bad_start(samples: &[Sample], at: Duration, bad_servers: &[&str]) -> Duration {
    samples
        .iter()
        .filter(|s| s.start >= at)
        .filter(|s| !s.ok() || bad_servers.contains(&s.served_by.as_str()))
        .map(|s| s.start - at)
        .max()
        .unwrap_or_default()
}

/// A short account of samples in `[from, to)`: counts per server/failure.
pub fn summary(samples: &[Sample], from: Duration, to: Duration) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for s in samples.iter().filter(|s| s.start >= from && s.start < to) {
        *counts
            .entry(format!("{} {}", s.status, s.served_by))
            .or_default() += 1;
    }
    format!("{counts:?}")
}
