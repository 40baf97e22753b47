//! The demo's traffic: one client per cluster, each a workload calling a
//! service through its own cluster's gateway, the way a pod calls through
//! its node's proxy.
//!
//! Each client presents its workload certificate (mutual TLS to the
//! gateway's outbound listener, which is what a STRICT PeerAuthentication
//! asks for), speaks HTTP/2 over one connection per gateway, and sends at a
//! fixed rate whatever happened to earlier requests (open loop: a stalled
//! gateway shows up as latency and timeouts, not as a lower rate). Every
//! answer is recorded with who served it (`x-served-by`), so the view and
//! the tour compute rates, success, percentiles and the split per
//! destination over any time window.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::runtime::Handle;
use tokio_rustls::TlsConnector;

/// How long a request may take, from its intended send time.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long records are kept (the view looks at the last seconds).
const KEEP: Duration = Duration::from_secs(120);

/// What one client does.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The client's cluster.
    pub cluster: String,
    /// Its service account (and the name shown): `productpage`.
    pub caller: String,
    /// The service it calls: `reviews`.
    pub authority: String,
    /// Its cluster's gateways' outbound listeners, used in turn.
    pub targets: Vec<SocketAddr>,
    /// The outbound listener's TLS name: `<cluster>.cluster.meshfed.internal`.
    pub server_name: String,
    /// Requests per second.
    pub rate: u32,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx/3xx, and who served it.
    Ok(String),
    /// Why it failed: `status 503 (no-healthy-upstream)`, `timeout`, ...
    Failed(String),
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Record {
    pub sent: Instant,
    pub latency: Duration,
    pub outcome: Outcome,
}

/// Counts over a window of intended send times.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub secs: f64,
    pub sent: usize,
    pub ok: usize,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    /// Successful answers by `x-served-by`.
    pub split: BTreeMap<String, usize>,
    /// Failures by reason.
    pub failures: BTreeMap<String, usize>,
}

impl Summary {
    pub fn failed(&self) -> usize {
        self.sent - self.ok
    }

    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.sent as f64 / self.secs
        } else {
            0.0
        }
    }

    pub fn success_pct(&self) -> Option<f64> {
        (self.sent > 0).then(|| 100.0 * self.ok as f64 / self.sent as f64)
    }

    /// The share (percent of successful answers) of destinations whose
    /// name starts with `prefix`.
    pub fn share(&self, prefix: &str) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        let n: usize = self
            .split
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum();
        100.0 * n as f64 / self.ok as f64
    }

    /// `v1@east 95.2%  v2@east 4.8%`: destinations by share.
    pub fn split_text(&self) -> String {
        let mut parts: Vec<(&String, &usize)> = self.split.iter().collect();
        parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        parts
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} {:.1}%",
                    destination(k),
                    100.0 * **v as f64 / self.ok.max(1) as f64
                )
            })
            .collect::<Vec<_>>()
            .join("  ")
    }
}

/// `reviews-v2.west` → `v2@west`.
pub fn destination(served_by: &str) -> String {
    match served_by.split_once('.') {
        Some((svc, cluster)) => {
            let version = svc.rsplit('-').next().unwrap_or(svc);
            format!("{version}@{cluster}")
        }
        None => served_by.to_string(),
    }
}

/// One running client.
pub struct Client {
    pub spec: ClientSpec,
    records: Mutex<VecDeque<Record>>,
    paused: AtomicBool,
    next: AtomicUsize,
    conns: Vec<tokio::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>>,
    tls: TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Stops sending (requests in flight still finish).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Requests intended to be sent in `[from, to)` that have finished.
    pub fn records(&self, from: Instant, to: Instant) -> Vec<Record> {
        lock(&self.records)
            .iter()
            .filter(|r| r.sent >= from && r.sent < to)
            .cloned()
            .collect()
    }

    pub fn summary(&self, from: Instant, to: Instant) -> Summary {
        summarize(&self.records(from, to), to.saturating_duration_since(from))
    }

    fn record(&self, r: Record) {
        let mut records = lock(&self.records);
        while records
            .front()
            .is_some_and(|f| r.sent.saturating_duration_since(f.sent) > KEEP)
        {
            records.pop_front();
        }
        records.push_back(r);
    }

    async fn call(&self) -> Outcome {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.spec.targets.len();
        let mut sender = {
            let mut slot = self.conns[i].lock().await;
            match slot.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => match self.connect(self.spec.targets[i]).await {
                    Ok(s) => {
                        *slot = Some(s.clone());
                        s
                    }
                    Err(e) => {
                        *slot = None;
                        return Outcome::Failed(format!("connect: {}", first_words(&e)));
                    }
                },
            }
        };
        if sender.ready().await.is_err() {
            self.drop_conn(i).await;
            return Outcome::Failed("reset".into());
        }
        let req = match http::Request::get(format!("https://{}/", self.spec.authority))
            .header("user-agent", "meshfed-demo")
            .body(Empty::new())
        {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("request: {e}")),
        };
        match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let served = header(resp.headers(), "x-served-by");
                let why = header(resp.headers(), "x-meshfed-error");
                if resp.into_body().collect().await.is_err() {
                    return Outcome::Failed("reset (body)".into());
                }
                if status.is_success() || status.is_redirection() {
                    Outcome::Ok(served.unwrap_or_else(|| "?".into()))
                } else {
                    match why {
                        Some(w) => Outcome::Failed(format!("status {} ({w})", status.as_u16())),
                        None => Outcome::Failed(format!("status {}", status.as_u16())),
                    }
                }
            }
            Err(_) => {
                self.drop_conn(i).await;
                Outcome::Failed("reset".into())
            }
        }
    }

    async fn drop_conn(&self, i: usize) {
        let mut slot = self.conns[i].lock().await;
        if slot.as_ref().is_some_and(|s| s.is_closed()) {
            *slot = None;
        }
    }

    async fn connect(&self, target: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(target),
        )
        .await
        .context("timed out")??;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.spec.server_name.clone())?;
        let tls = self.tls.connect(name, tcp).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// All clients.
#[derive(Debug)]
pub struct Traffic {
    pub clients: Vec<Arc<Client>>,
}

impl Traffic {
    /// Starts one paced sender per client on `rt`. `creds(cluster, caller)`
    /// is the client's credentials directory.
    pub fn start(
        rt: &Handle,
        specs: Vec<ClientSpec>,
        creds: impl Fn(&str, &str) -> std::path::PathBuf,
    ) -> anyhow::Result<Traffic> {
        let mut clients = Vec::new();
        for spec in specs {
            let tls = tls_config(&creds(&spec.cluster, &spec.caller))?;
            let client = Arc::new(Client {
                conns: spec
                    .targets
                    .iter()
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                spec,
                records: Mutex::new(VecDeque::new()),
                paused: AtomicBool::new(false),
                next: AtomicUsize::new(0),
                tls: TlsConnector::from(Arc::new(tls)),
            });
            rt.spawn(pace(client.clone()));
            clients.push(client);
        }
        Ok(Traffic { clients })
    }

    pub fn client(&self, cluster: &str) -> Option<&Arc<Client>> {
        self.clients.iter().find(|c| c.spec.cluster == cluster)
    }
}

/// Sends at the client's rate: request `i` is due at `start + i/rate`, and
/// overdue requests go out at once (a busy scheduler catches up).
async fn pace(client: Arc<Client>) {
    let period = Duration::from_secs_f64(1.0 / f64::from(client.spec.rate.max(1)));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        let due = ticks.tick().await.into_std();
        if client.is_paused() {
            continue;
        }
        let c = client.clone();
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout_at(
                tokio::time::Instant::from_std(due + TIMEOUT),
                c.call(),
            )
            .await
            {
                Ok(o) => o,
                Err(_) => Outcome::Failed("timeout".into()),
            };
            c.record(Record {
                sent: due,
                latency: due.elapsed(),
                outcome,
            });
        });
    }
}

fn summarize(records: &[Record], window: Duration) -> Summary {
    let mut s = Summary {
        secs: window.as_secs_f64(),
        sent: records.len(),
        ..Summary::default()
    };
    let mut lat: Vec<Duration> = Vec::new();
    for r in records {
        match &r.outcome {
            Outcome::Ok(by) => {
                s.ok += 1;
                *s.split.entry(by.clone()).or_default() += 1;
                lat.push(r.latency);
            }
            Outcome::Failed(why) => *s.failures.entry(why.clone()).or_default() += 1,
        }
    }
    lat.sort();
    let pct = |p: f64| -> Option<Duration> {
        if lat.is_empty() {
            return None;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        Some(lat[i])
    };
    s.p50 = pct(0.50);
    s.p99 = pct(0.99);
    s
}

/// A client TLS config presenting the workload certificate in `dir`
/// (bundle.pem, cert.pem, key.pem, as `meshfed-gateway certs workload`
/// writes them).
fn tls_config(dir: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("bundle.pem"))
        .with_context(|| format!("reading {}/bundle.pem", dir.display()))?
    {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .with_context(|| format!("reading {}/cert.pem", dir.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))
        .with_context(|| format!("reading {}/key.pem", dir.display()))?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn header(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn first_words(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.chars().take(60).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_read_as_version_at_cluster() {
        assert_eq!(destination("reviews-v2.west"), "v2@west");
        assert_eq!(destination("ratings-v1.east"), "v1@east");
        assert_eq!(destination("?"), "?");
    }

    #[test]
    fn a_summary_counts_shares_failures_and_percentiles() {
        let t = Instant::now();
        let rec = |ms: u64, o: Outcome| Record {
            sent: t,
            latency: Duration::from_millis(ms),
            outcome: o,
        };
        let mut records: Vec<Record> = (1..=99)
            .map(|i| {
                rec(
                    i,
                    Outcome::Ok(if i <= 66 { "a-v1.east" } else { "a-v2.west" }.into()),
                )
            })
            .collect();
        records.push(rec(5, Outcome::Failed("timeout".into())));
        let s = summarize(&records, Duration::from_secs(2));
        assert_eq!((s.sent, s.ok, s.failed()), (100, 99, 1));
        assert_eq!(s.rate(), 50.0);
        assert!(
            (s.share("a-v1") - 66.67).abs() < 0.01,
            "{}",
            s.share("a-v1")
        );
        assert_eq!(s.p50, Some(Duration::from_millis(50)));
        assert_eq!(s.p99, Some(Duration::from_millis(99)));
        assert_eq!(s.split_text(), "v1@east 66.7%  v2@west 33.3%");
    }
}
