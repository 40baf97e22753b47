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
//! The file is re-read, through its path, when inotify reports a change of
//! it or of its directory (so an editor's write-then-rename and a
//! Kubernetes ConfigMap's `..data` symlink swap are seen), and every 30 s
//! regardless against missed events; where inotify is unavailable, every
//! second ([`crate::changes`]). Reading happens on a thread of its
//! own. A file that does not parse is refused with a logged error and the
//! previous set stays; so is an empty one, which is what a reader sees
//! between an in-place write's truncate and its bytes (`services: {}` says
//! "no endpoints"). Host names resolve through [`super::dns`], asked again
//! when their TTL runs out (between 1 s and 5 min).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::changes::{Changes, Source, Targets};
use crate::endpoints::{CLUSTER_LABEL, Endpoint, EndpointSet};

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
    /// Empty, or only comments: most likely caught between an editor's
    /// truncate and its write, so it never removes every endpoint.
    #[error(
        "{path}: the file is empty (or only comments); to remove every endpoint, \
         write `services: {{}}`"
    )]
    Empty { path: PathBuf },
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
    let file: Option<File> = serde_yaml::from_str(text).map_err(|source| StaticError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let Some(file) = file else {
        return Err(StaticError::Empty {
            path: path.to_path_buf(),
        });
    };
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
///
/// A thread of its own (`endpoints-watch`) waits for a change of the file
/// or its directory ([`Changes`]) and reads the file there, so the runtime
/// never waits on the disk; a task parses what changed and publishes it.
/// A file that names hosts is also parsed again every [`RESOLVE`] (from the
/// resolver's table, so a query goes out only when an answer's TTL has
/// run out), to follow DNS.
pub async fn watch(
    path: PathBuf,
    cluster: String,
    domain: String,
) -> Result<watch::Receiver<Arc<EndpointSet>>, StaticError> {
    let text = {
        let p = path.clone();
        tokio::task::spawn_blocking(move || read(&p))
            .await
            .map_err(|e| StaticError::Read {
                path: path.clone(),
                source: std::io::Error::other(e),
            })??
    };
    let first = parse(&path, &text, &cluster, &domain).await?;
    let (tx, rx) = watch::channel(Arc::new(first));
    let (changed_tx, changed) = tokio::sync::mpsc::channel(1);
    let (watched, seen) = (path.clone(), text.clone());
    let spawned = std::thread::Builder::new()
        .name("endpoints-watch".into())
        .spawn(move || follow_file(&watched, seen, &changed_tx));
    if let Err(e) = spawned {
        tracing::error!(error = %e, path = %path.display(), "cannot start the discovery file watcher; edits will not be followed");
    }
    tokio::spawn(publish(path, cluster, domain, text, changed, tx));
    Ok(rx)
}

/// How often a file that names hosts is parsed again, to follow DNS.
pub const RESOLVE: Duration = Duration::from_secs(1);

fn read(p: &Path) -> Result<String, StaticError> {
    std::fs::read_to_string(p).map_err(|source| StaticError::Read {
        path: p.to_path_buf(),
        source,
    })
}

/// Whether `text` names an endpoint by host (not IP), so that parsing it
/// again may give other addresses.
fn names_hosts(text: &str) -> bool {
    serde_yaml::from_str::<File>(text).is_ok_and(|f| {
        f.services
            .values()
            .flatten()
            .any(|e| e.address.parse::<std::net::SocketAddr>().is_err())
    })
}

/// The watcher thread: sends the file's text each time it differs from the
/// last sent (or an unreadable file's error, once), until the receiver is
/// gone.
fn follow_file(
    path: &Path,
    mut last: String,
    out: &tokio::sync::mpsc::Sender<Result<String, StaticError>>,
) {
    let watched = path.to_path_buf();
    let targets: Targets = Box::new(move || {
        // The directory, for a rename onto the file (an editor's save, a
        // ConfigMap's `..data` swap), and the file through its symlinks,
        // for an in-place write to a target elsewhere.
        let dir = match watched.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        vec![dir, watched.clone()]
    });
    let mut changes = Changes::new(Source::EndpointsFile, targets);
    let mut unreadable = false;
    loop {
        changes.wait();
        if out.is_closed() {
            return;
        }
        let sent = match read(path) {
            Ok(text) if text == last => {
                unreadable = false;
                continue;
            }
            Ok(text) => {
                unreadable = false;
                last.clone_from(&text);
                Ok(text)
            }
            Err(_) if unreadable => continue,
            Err(e) => {
                unreadable = true;
                Err(e)
            }
        };
        if out.blocking_send(sent).is_err() {
            return;
        }
    }
}

/// Parses each new text and publishes its endpoints, or logs why not and
/// keeps the previous ones; re-parses host-naming files every [`RESOLVE`].
async fn publish(
    path: PathBuf,
    cluster: String,
    domain: String,
    mut text: String,
    mut changed: tokio::sync::mpsc::Receiver<Result<String, StaticError>>,
    tx: watch::Sender<Arc<EndpointSet>>,
) {
    let mut resolve = tokio::time::interval(RESOLVE);
    resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hosts = names_hosts(&text);
    loop {
        let edited = tokio::select! {
            () = tx.closed() => return,
            next = changed.recv() => match next {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "discovery file unreadable; keeping the previous endpoints");
                    continue;
                }
                Some(Ok(new)) => {
                    text = new;
                    hosts = names_hosts(&text);
                    true
                }
            },
            _ = resolve.tick(), if hosts => false,
        };
        match parse(&path, &text, &cluster, &domain).await {
            Ok(set) => {
                if edited {
                    tracing::info!(path = %path.display(), services = set.len(), "discovery file reloaded");
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
            Err(e) if edited => {
                tracing::error!(error = %e, "discovery file refused; keeping the previous endpoints");
            }
            Err(_) => {}
        }
    }
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
    async fn an_empty_file_is_refused_and_an_empty_map_is_no_endpoints() {
        for text in ["", "\n", "# only a comment\n"] {
            let e = parse(Path::new("d/eps.yaml"), text, "c", "cluster.local").await;
            match e {
                Err(e @ StaticError::Empty { .. }) => {
                    assert!(e.to_string().contains("services: {}"), "{e}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let none = parse(Path::new("d"), "services: {}\n", "c", "cluster.local")
            .await
            .unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_previous_endpoints_and_a_good_one_applies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.yaml");
        std::fs::write(&path, "services:\n  a.b:\n    - address: 127.0.0.1:1\n").unwrap();
        let mut rx = watch(path.clone(), "c".into(), "cluster.local".into())
            .await
            .unwrap();
        let checks = crate::changes::checks(Source::EndpointsFile);
        std::fs::write(&path, "services: [broken").unwrap();
        // Checked (at least) once after the bad edit, and it changed nothing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while crate::changes::checks(Source::EndpointsFile) == checks {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bad edit was never checked"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rx.borrow()["a.b.svc.cluster.local"][0].addr.port(), 1);
        std::fs::write(&path, "services:\n  a.b:\n    - address: 127.0.0.1:2\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow()["a.b.svc.cluster.local"][0].addr.port(), 2);
    }
}
