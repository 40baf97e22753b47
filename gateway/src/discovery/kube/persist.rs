//! The last endpoint set Kubernetes discovery published, kept in the state
//! directory (`--state-dir`, file [`FILE`]) so that a gateway restarted
//! while the API server is unreachable serves it rather than nothing.
//!
//! Written atomically ([`meshfed_cli::fs::write_atomic`]) after each change
//! of a synced set, at most once per [`MIN_INTERVAL`]; refused above
//! [`MAX_BYTES`] (written or read). Read once at start and checked: the
//! format, the cluster and the domain must be this gateway's, every host a
//! Service host of the domain, every endpoint labelled with this cluster.
//! A file that fails a check is ignored (the gateway then waits for the API
//! server, as without one), never trusted in part.
//!
//! It owns neither the watchers nor the decision to use the set (see
//! [`super::watch`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::endpoints::{CLUSTER_LABEL, Endpoint, EndpointSet};
use crate::wire::announce::ServicePorts;

/// The file's name in the state directory.
pub const FILE: &str = "kube-endpoints.json";
/// The largest file written or read: about 50,000 endpoints. A bigger set
/// is not persisted (logged), and a bigger file is not read, so that a
/// restart cannot spend the gateway's memory limit on it.
pub const MAX_BYTES: u64 = 8 << 20;
/// The least time between two writes: a churning cluster does not rewrite
/// (and fsync) the file on every change.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
const FORMAT: u32 = 1;

/// Why the persisted set could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot write the endpoint set to {0}")]
    Write(#[from] meshfed_cli::fs::WriteError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the endpoint set ({size} bytes) is larger than the {MAX_BYTES} bytes kept in {path}; it is not persisted, so a restart during an API outage would wait for the API server"
    )]
    TooLargeToWrite { path: PathBuf, size: usize },
    #[error("{path} is larger than {MAX_BYTES} bytes; ignored")]
    TooLargeToRead { path: PathBuf },
    #[error(
        "{path} is not a persisted endpoint set: {reason}; ignored (delete it, or let the gateway overwrite it once the API server answers)"
    )]
    Invalid { path: PathBuf, reason: String },
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    format: u32,
    cluster: String,
    domain: String,
    /// Seconds since the Unix epoch.
    saved_at: u64,
    services: BTreeMap<String, Vec<SavedEndpoint>>,
    ports: ServicePorts,
    /// The in-cluster ServiceExports' hosts, with `--kube-service-exports`.
    exports: Option<BTreeSet<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedEndpoint {
    addr: SocketAddr,
    labels: BTreeMap<String, String>,
    healthy: bool,
}

/// What discovery last published, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub endpoints: EndpointSet,
    pub ports: ServicePorts,
    pub exports: Option<BTreeSet<String>>,
    pub saved_at: SystemTime,
}

/// The file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes the set atomically (blocking: call from `spawn_blocking`).
pub fn save(
    dir: &Path,
    cluster: &str,
    domain: &str,
    endpoints: &EndpointSet,
    ports: &ServicePorts,
    exports: Option<&BTreeSet<String>>,
) -> Result<(), PersistError> {
    let saved = Saved {
        format: FORMAT,
        cluster: cluster.into(),
        domain: domain.into(),
        saved_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        services: endpoints
            .iter()
            .map(|(host, eps)| {
                let eps = eps
                    .iter()
                    .map(|e| SavedEndpoint {
                        addr: e.addr,
                        labels: e.labels.clone(),
                        healthy: e.healthy,
                    })
                    .collect();
                (host.clone(), eps)
            })
            .collect(),
        ports: ports.clone(),
        exports: exports.cloned(),
    };
    let bytes = serde_json::to_vec(&saved).map_err(|e| PersistError::Invalid {
        path: path(dir),
        reason: e.to_string(),
    })?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(PersistError::TooLargeToWrite {
            path: path(dir),
            size: bytes.len(),
        });
    }
    meshfed_cli::fs::write_atomic(&path(dir), &bytes)?;
    Ok(())
}

/// Reads the set kept in `dir` for this cluster and domain; `None` when
/// there is none (blocking: call from `spawn_blocking`).
pub fn load(dir: &Path, cluster: &str, domain: &str) -> Result<Option<Restored>, PersistError> {
    let file = path(dir);
    let read_err = |source| PersistError::Read {
        path: file.clone(),
        source,
    };
    let f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(PersistError::TooLargeToRead { path: file });
    }
    let invalid = |reason: String| PersistError::Invalid {
        path: file.clone(),
        reason,
    };
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if saved.format != FORMAT {
        return Err(invalid(format!(
            "format {} (this gateway reads {FORMAT})",
            saved.format
        )));
    }
    if saved.cluster != cluster || saved.domain != domain {
        return Err(invalid(format!(
            "it is cluster `{}`'s (domain `{}`), this gateway is cluster `{cluster}`'s (domain `{domain}`)",
            saved.cluster, saved.domain
        )));
    }
    let suffix = format!(".svc.{domain}");
    let service_host = |h: &str| {
        h.strip_suffix(&suffix)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(name, ns)| !name.is_empty() && !ns.is_empty() && !ns.contains('.'))
    };
    if let Some(h) = saved
        .services
        .keys()
        .chain(saved.ports.keys())
        .chain(saved.exports.iter().flatten())
        .find(|h| !service_host(h))
    {
        return Err(invalid(format!(
            "`{h}` is not a Service host `NAME.NS{suffix}`"
        )));
    }
    let mut endpoints = EndpointSet::new();
    for (host, eps) in saved.services {
        let mut list = Vec::with_capacity(eps.len());
        for e in eps {
            if e.labels.get(CLUSTER_LABEL).map(String::as_str) != Some(cluster) {
                return Err(invalid(format!(
                    "an endpoint of {host} ({}) is not labelled {CLUSTER_LABEL}: {cluster}",
                    e.addr
                )));
            }
            list.push(Endpoint {
                addr: e.addr,
                labels: e.labels,
                healthy: e.healthy,
            });
        }
        endpoints.insert(host, list);
    }
    Ok(Some(Restored {
        endpoints,
        ports: saved.ports,
        exports: saved.exports,
        saved_at: UNIX_EPOCH + Duration::from_secs(saved.saved_at),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> EndpointSet {
        let labels = BTreeMap::from([
            (CLUSTER_LABEL.to_string(), "west".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]);
        EndpointSet::from([(
            "ratings.default.svc.cluster.local".to_string(),
            vec![Endpoint {
                addr: "10.0.0.1:9080".parse().unwrap(),
                labels,
                healthy: true,
            }],
        )])
    }

    #[test]
    fn a_saved_set_reads_back_for_its_own_cluster_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "west", "cluster.local").unwrap(), None);
        let exports = BTreeSet::from(["ratings.default.svc.cluster.local".to_string()]);
        save(
            dir.path(),
            "west",
            "cluster.local",
            &set(),
            &ServicePorts::new(),
            Some(&exports),
        )
        .unwrap();
        let r = load(dir.path(), "west", "cluster.local").unwrap().unwrap();
        assert_eq!(r.endpoints, set());
        assert_eq!(r.exports, Some(exports));
        assert!(matches!(
            load(dir.path(), "east", "cluster.local"),
            Err(PersistError::Invalid { .. })
        ));
        assert!(matches!(
            load(dir.path(), "west", "example.org"),
            Err(PersistError::Invalid { .. })
        ));
    }

    #[test]
    fn a_damaged_foreign_or_huge_file_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let bad = |text: &str| {
            std::fs::write(path(dir.path()), text).unwrap();
            load(dir.path(), "west", "cluster.local")
        };
        save(
            dir.path(),
            "west",
            "cluster.local",
            &set(),
            &ServicePorts::new(),
            None,
        )
        .unwrap();
        let good = std::fs::read_to_string(path(dir.path())).unwrap();
        // Truncated (a torn write cannot happen, a damaged disk can).
        assert!(matches!(
            bad(&good[..good.len() / 2]),
            Err(PersistError::Invalid { .. })
        ));
        // An endpoint of another cluster; a host outside the domain.
        assert!(matches!(
            bad(&good.replace(
                "\"topology.istio.io/cluster\":\"west\"",
                "\"topology.istio.io/cluster\":\"east\"",
            )),
            Err(PersistError::Invalid { .. })
        ));
        assert!(matches!(
            bad(&good.replace("ratings.default.svc.cluster.local", "evil.example.com")),
            Err(PersistError::Invalid { .. })
        ));
        assert!(matches!(
            bad(&good.replace("10.0.0.1:9080", "not an address")),
            Err(PersistError::Invalid { .. })
        ));
        // Past the size bound, unread.
        let huge = " ".repeat(MAX_BYTES as usize + 1);
        assert!(matches!(
            bad(&huge),
            Err(PersistError::TooLargeToRead { .. })
        ));
        // Too large to write: refused, the last good file kept.
        save(
            dir.path(),
            "west",
            "cluster.local",
            &set(),
            &ServicePorts::new(),
            None,
        )
        .unwrap();
        let mut big = EndpointSet::new();
        for i in 0..200_000u32 {
            big.insert(
                format!("s{i}.default.svc.cluster.local"),
                set().into_values().next().unwrap(),
            );
        }
        assert!(matches!(
            save(
                dir.path(),
                "west",
                "cluster.local",
                &big,
                &ServicePorts::new(),
                None
            ),
            Err(PersistError::TooLargeToWrite { .. })
        ));
        assert_eq!(
            load(dir.path(), "west", "cluster.local")
                .unwrap()
                .unwrap()
                .endpoints,
            set()
        );
    }
}
