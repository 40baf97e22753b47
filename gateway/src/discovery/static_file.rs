//! Static discovery: a YAML file of services and their endpoints, for edge
//! sites without Kubernetes.
//!
//! ```yaml
//! services:
//!   ratings.default:                 # name.namespace, or the full name
//!     - address: 127.0.0.1:9080      # IP:port, or host:port resolved with DNS
//!       labels: {version: v1}
//!     - address: ratings-v2.local:9080
//!       labels: {version: v2}
//!       healthy: false               # optional; default true
//! ```
//!
//! The file is re-read when its content changes (checked every second,
//! through the path, so a Kubernetes ConfigMap's `..data` symlink swap is
//! seen). A file that does not parse is refused with a logged error and the
//! previous set stays. Host names resolve through [`super::dns`], asked again
//! when their TTL runs out (between 1 s and 5 min).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::endpoints::{CLUSTER_LABEL, Endpoint, EndpointSet};

/// How often the file is checked.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    services: BTreeMap<String, Vec<FileEndpoint>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    healthy: bool,
}

fn yes() -> bool {
    true
}

/// Why a discovery file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: service `{service}`: endpoint `{address}` is not host:port")]
    Address {
        path: PathBuf,
        service: String,
        address: String,
    },
    #[error("{path}: service `{service}`: cannot resolve `{address}`: {source}")]
    Resolve {
        path: PathBuf,
        service: String,
        address: String,
        source: std::io::Error,
    },
}

/// The canonical name of a service key: `name.namespace` gets
/// `.svc.<domain>`, a full name is kept.
fn canonical(key: &str, domain: &str) -> String {
    let key = key.trim_end_matches('.').to_ascii_lowercase();
    match key.matches('.').count() {
        0 => format!("{key}.default.svc.{domain}"),
        1 => format!("{key}.svc.{domain}"),
        _ => key,
    }
}

/// Parses the file's text and resolves its addresses.
pub async fn parse(
    path: &Path,
    text: &str,
    cluster: &str,
    domain: &str,
) -> Result<EndpointSet, StaticError> {
    let file: File = serde_yaml::from_str(text).map_err(|source| StaticError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let mut set = EndpointSet::new();
    for (service, eps) in file.services {
        let host = canonical(&service, domain);
        let mut out = Vec::with_capacity(eps.len());
        for e in eps {
            let addrs: Vec<std::net::SocketAddr> = match e.address.parse() {
                Ok(a) => vec![a],
                Err(_) => {
                    if !e.address.contains(':') {
                        return Err(StaticError::Address {
                            path: path.to_path_buf(),
                            service,
                            address: e.address,
                        });
                    }
                    let resolved = super::dns::Resolver::shared()
                        .resolve_host_port(&e.address)
                        .await;
                    match resolved {
                        Ok(addrs) => addrs,
                        Err(dns) => {
                            return Err(StaticError::Resolve {
                                path: path.to_path_buf(),
                                service,
                                address: e.address,
                                source: std::io::Error::other(dns),
                            });
                        }
                    }
                }
            };
            for addr in addrs {
                let mut labels = e.labels.clone();
                labels.insert(CLUSTER_LABEL.to_string(), cluster.to_string());
                out.push(Endpoint {
                    addr,
                    labels,
                    healthy: e.healthy,
                });
            }
        }
        set.entry(host).or_default().extend(out);
    }
    Ok(set)
}

/// Loads the file once, then follows it. The first load must succeed;
/// later bad versions are logged and ignored.
pub async fn watch(
    path: PathBuf,
    cluster: String,
    domain: String,
) -> Result<watch::Receiver<Arc<EndpointSet>>, StaticError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| StaticError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut last_text = read(&path)?;
    let first = parse(&path, &last_text, &cluster, &domain).await?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let text = match read(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "discovery file unreadable; keeping the previous endpoints");
                    continue;
                }
            };
            // Re-parse on change, and periodically re-resolve host names.
            match parse(&path, &text, &cluster, &domain).await {
                Ok(set) => {
                    if text != last_text {
                        tracing::info!(path = %path.display(), services = set.len(), "discovery file reloaded");
                        last_text = text;
                    }
                    tx.send_if_modified(|cur| {
                        if **cur == set {
                            false
                        } else {
                            *cur = Arc::new(set);
                            true
                        }
                    });
                }
                Err(e) => {
                    if text != last_text {
                        tracing::error!(error = %e, "discovery file refused; keeping the previous endpoints");
                        last_text = text;
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_get_canonical_hosts_and_the_cluster_label() {
        let text = "services:\n  ratings.default:\n    - address: 127.0.0.1:9080\n      labels: {version: v1}\n    - address: 127.0.0.1:9081\n      healthy: false\n";
        let set = parse(Path::new("d.yaml"), text, "east", "cluster.local")
            .await
            .unwrap();
        let eps = &set["ratings.default.svc.cluster.local"];
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].labels["version"], "v1");
        assert_eq!(eps[0].labels[CLUSTER_LABEL], "east");
        assert!(eps[0].healthy && !eps[1].healthy);
    }

    // Host names need hickory (the `dns` feature).
    #[cfg(feature = "dns")]
    #[tokio::test]
    async fn host_names_resolve_and_bad_addresses_are_refused() {
        let ok = parse(
            Path::new("d"),
            "services:\n  a.b:\n    - address: localhost:80\n",
            "c",
            "cluster.local",
        )
        .await
        .unwrap();
        assert!(!ok["a.b.svc.cluster.local"].is_empty());
        let bad = parse(
            Path::new("d"),
            "services:\n  a.b:\n    - address: nope\n",
            "c",
            "cluster.local",
        )
        .await;
        assert!(matches!(bad, Err(StaticError::Address { .. })));
        let typo = parse(
            Path::new("d"),
            "service:\n  a.b: []\n",
            "c",
            "cluster.local",
        )
        .await;
        assert!(matches!(typo, Err(StaticError::Parse { .. })));
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_previous_endpoints_and_a_good_one_applies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.yaml");
        std::fs::write(&path, "services:\n  a.b:\n    - address: 127.0.0.1:1\n").unwrap();
        let mut rx = watch(path.clone(), "c".into(), "cluster.local".into())
            .await
            .unwrap();
        std::fs::write(&path, "services: [broken").unwrap();
        tokio::time::sleep(POLL * 2 + Duration::from_millis(200)).await;
        assert_eq!(rx.borrow()["a.b.svc.cluster.local"][0].addr.port(), 1);
        std::fs::write(&path, "services:\n  a.b:\n    - address: 127.0.0.1:2\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow()["a.b.svc.cluster.local"][0].addr.port(), 2);
    }
}
