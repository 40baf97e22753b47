//! Fixtures for the Kubernetes tests: object builders for
//! [`crate::fake_kube::FakeKube`] and a probe of who serves a host through
//! a gateway's outbound listener.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::federation::GatewayProcess;
use crate::patient;

/// `x-served-by` of a GET through `via` to `host`, or the error.
pub async fn served_by(via: SocketAddr, host: &str) -> Result<String, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{via}/"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok().map(str::to_string));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    match (status.is_success(), by) {
        (true, Some(by)) => Ok(by),
        _ => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
    }
}

/// Waits until requests to `host` are served by exactly the backends in
/// `want` (all of them seen, no other).
pub async fn wait_served(via: SocketAddr, host: &str, want: &[&str], gw: &GatewayProcess) {
    let deadline = tokio::time::Instant::now() + patient(Duration::from_secs(15));
    loop {
        let mut seen = BTreeSet::new();
        let mut other = Vec::new();
        for _ in 0..(want.len() * 8).max(8) {
            match served_by(via, host).await {
                Ok(b) if want.contains(&b.as_str()) => {
                    seen.insert(b);
                }
                r => other.push(format!("{r:?}")),
            }
        }
        if seen.len() == want.len() && other.is_empty() {
            return;
        }
        let mut last = other;
        last.push(format!("seen {seen:?}"));
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{host} not served by exactly {want:?}: {last:?}\nlog:\n{}",
                gw.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn service(ns: &str, name: &str, port: u16) -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}]}})
}

/// An EndpointSlice `name` of `svc` with one endpoint, `backend` (pod
/// `pod`). Backends listen on different ports and a slice has one port
/// list, so each backend gets its own slice.
pub fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    backend: SocketAddr,
    ready: bool,
    pod: &str,
) -> Value {
    json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": backend.port(), "protocol": "TCP"}],
           "endpoints": [{"addresses": [backend.ip().to_string()],
                          "conditions": {"ready": ready, "serving": ready, "terminating": false},
                          "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}}]})
}

pub fn pod(ns: &str, name: &str, labels: Value) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "x"}]}})
}
