//! A user-space TCP load balancer that follows readiness the way a
//! Kubernetes Service does, lag included: it sends each NEW connection to
//! one of the backends currently in rotation (round robin), and it learns a
//! backend's readiness only by polling its `/readyz` every `poll` (as a
//! kubelet's readiness probe, then an EndpointSlice update and kube-proxy's
//! next sync, would). Until a poll has seen a backend answer anything but
//! 200, new connections still go to it. Connections already open stay
//! where they are (conntrack).
//!
//! A connection whose backend refuses it is closed at once, with nothing
//! retried: the caller sees its connection end, as when kube-proxy's DNAT
//! lands on a pod whose listener is closed.
//!
//! A test double: no real Service or kube-proxy can run here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One backend as the balancer sees it.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub name: String,
    pub target: SocketAddr,
    /// In rotation: the last poll saw `/readyz` answer 200.
    pub in_rotation: bool,
    /// New connections sent to it.
    pub connections: u64,
    /// New connections sent to it after [`Balancer::terminating`] was
    /// called for it: what a load balancer that has not yet seen the
    /// readiness change still sends.
    pub after_terminating: u64,
    /// Of those sent to it, how many it refused.
    pub refused: u64,
    terminating_since: Option<Instant>,
    readyz: SocketAddr,
}

#[derive(Debug, Default)]
struct Inner {
    backends: Mutex<Vec<BackendView>>,
    next: AtomicUsize,
    /// Connections closed because no backend was in rotation.
    no_backend: AtomicU64,
}

impl Inner {
    fn backends(&self) -> std::sync::MutexGuard<'_, Vec<BackendView>> {
        self.backends.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The balancer; its tasks stop when it is dropped.
#[derive(Debug)]
pub struct Balancer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Balancer {
    /// Listens on a loopback port and polls every backend's readiness
    /// every `poll`.
    pub async fn start(poll: Duration) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the balancer: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the balancer's address: {e}"));
        let inner = Arc::new(Inner::default());
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        let probe = tokio::spawn(probe_loop(inner.clone(), poll));
        Balancer {
            addr,
            inner,
            tasks: vec![accept, probe],
        }
    }

    /// Adds a backend: `target` receives connections once a poll of
    /// `readyz` (an admin address) has seen it ready.
    pub fn add(&self, name: &str, target: SocketAddr, readyz: SocketAddr) {
        self.inner.backends().push(BackendView {
            name: name.to_string(),
            target,
            in_rotation: false,
            connections: 0,
            after_terminating: 0,
            refused: 0,
            terminating_since: None,
            readyz,
        });
    }

    /// Notes that `name` was just sent SIGTERM (for
    /// [`BackendView::after_terminating`]); the balancer itself only learns
    /// it from the next poll.
    pub fn terminating(&self, name: &str) {
        for b in self.inner.backends().iter_mut() {
            if b.name == name {
                b.terminating_since = Some(Instant::now());
            }
        }
    }

    /// Every backend, as of now.
    pub fn view(&self) -> Vec<BackendView> {
        self.inner.backends().clone()
    }

    /// Whether `name` is in rotation.
    pub fn in_rotation(&self, name: &str) -> bool {
        self.inner
            .backends()
            .iter()
            .any(|b| b.name == name && b.in_rotation)
    }

    /// Connections closed because no backend was in rotation.
    pub fn no_backend(&self) -> u64 {
        self.inner.no_backend.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let pick = {
            let mut backends = inner.backends();
            let rotation: Vec<usize> = (0..backends.len())
                .filter(|&i| backends[i].in_rotation)
                .collect();
            if rotation.is_empty() {
                None
            } else {
                let i = rotation[inner.next.fetch_add(1, Ordering::Relaxed) % rotation.len()];
                let b = &mut backends[i];
                b.connections += 1;
                if b.terminating_since.is_some() {
                    b.after_terminating += 1;
                }
                Some((i, b.target))
            }
        };
        let Some((index, target)) = pick else {
            inner.no_backend.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut client = client;
            let upstream =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await;
            let mut upstream = match upstream {
                Ok(Ok(s)) => s,
                _ => {
                    if let Some(b) = inner.backends().get_mut(index) {
                        b.refused += 1;
                    }
                    return; // the client's connection closes unanswered
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

async fn probe_loop(inner: Arc<Inner>, poll: Duration) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(String, SocketAddr)> = inner
            .backends()
            .iter()
            .map(|b| (b.name.clone(), b.readyz))
            .collect();
        for (name, readyz) in targets {
            let ready = probe(readyz).await;
            for b in inner.backends().iter_mut() {
                if b.name == name {
                    b.in_rotation = ready;
                }
            }
        }
    }
}

/// `GET /readyz`: ready only on a 200 within a second.
async fn probe(admin: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: admin\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let head = String::from_utf8_lossy(&out);
        Some(head.split_whitespace().nth(1) == Some("200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}
