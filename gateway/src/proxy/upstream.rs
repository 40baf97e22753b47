//! Local endpoints: choosing one, and pooled connections to it.
//!
//! The balancer is least-request with the power of two choices: pick two
//! endpoints at random and send to the one with fewer requests in flight
//! (Envoy's and Istio's default, `LEAST_REQUEST`). Connections to endpoints
//! are pooled by hyper's client, one pool for HTTP/1.1 and one for HTTP/2
//! (gRPC), keyed by endpoint address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::body::ProxyBody;
use crate::discovery::Endpoint;

/// Connection timeout to a local endpoint, unless a DestinationRule says
/// otherwise (the traffic-policy issue reads `connectTimeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP clients and the balancer for this cluster's endpoints.
#[derive(Debug)]
pub struct Upstream {
    pub h1: Client<HttpConnector, ProxyBody>,
    pub h2: Client<HttpConnector, ProxyBody>,
    inflight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Upstream {
            h1,
            h2,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        match self.inflight.lock() {
            Ok(mut m) => m.entry(addr).or_default().clone(),
            Err(_) => Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Picks an endpoint among `candidates` (power of two choices on
    /// requests in flight) and counts a request on it until the guard drops.
    pub fn pick(&self, candidates: &[&Endpoint]) -> Option<(SocketAddr, InFlight)> {
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0].addr,
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (candidates[a].addr, candidates[b].addr);
                if self.counter(ea).load(Ordering::Relaxed)
                    <= self.counter(eb).load(Ordering::Relaxed)
                {
                    ea
                } else {
                    eb
                }
            }
        };
        let c = self.counter(chosen);
        c.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight(c)))
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            labels: BTreeMap::new(),
            healthy: true,
        }
    }

    #[tokio::test]
    async fn least_request_avoids_the_busy_endpoint() {
        let u = Upstream::new();
        let (a, b) = (ep(1), ep(2));
        // Keep 10 requests in flight on endpoint 1.
        let busy: Vec<InFlight> = (0..10).map(|_| u.pick(&[&a]).unwrap().1).collect();
        for _ in 0..100 {
            let (addr, _g) = u.pick(&[&a, &b]).unwrap();
            assert_eq!(addr.port(), 2);
        }
        drop(busy);
        let ports: std::collections::BTreeSet<u16> = (0..100)
            .map(|_| u.pick(&[&a, &b]).unwrap().0.port())
            .collect();
        assert_eq!(ports.len(), 2, "idle endpoints share the load");
        assert!(u.pick(&[]).is_none());
    }
}
