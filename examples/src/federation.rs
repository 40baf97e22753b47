//! The demo's federation on loopback: certificates from a fresh trust
//! anchor, the sample services, the policy repository, the syncer and the
//! gateways, all real processes started from the workspace binaries.
//!
//! Topology:
//!
//! | cluster | gateways | services (static discovery files) |
//! |---|---|---|
//! | east | e1 | productpage v1, reviews v1, reviews v2, ratings v1, ratings v2 (broken: answers 503) |
//! | west | w1, w2 (HA) | reviews v2, reviews v3, ratings v1 |
//! | edge | x1 | details v1 |
//!
//! Every gateway listens on fixed loopback ports picked at start (tunnel,
//! outbound, admin), so a gateway restarted by the tour comes back where it
//! was and the printed commands stay right. This module starts things and
//! answers questions about them; what is shown and checked is the view's
//! and the tour's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procs::{Bins, Supervisor, first_line};
use crate::repo::Repo;

/// The clusters, their gateways and their localities.
pub const CLUSTERS: &[(&str, &[&str], &str, &str)] = &[
    ("east", &["e1"], "us-east1", "us-east1-b"),
    ("west", &["w1", "w2"], "us-west1", "us-west1-a"),
    ("edge", &["x1"], "us-central1", "us-central1-f"),
];

/// The sample services: (cluster, service, version, the status every
/// answer has).
///
/// ratings v2 is broken: every answer is a 503. No route of the seed
/// reaches it (ratings' subsets select `version: v1`); the tour's bad
/// commit sends all of ratings to it.
pub const SERVICES: &[(&str, &str, &str, u16)] = &[
    ("east", "productpage", "v1", 200),
    ("east", "reviews", "v1", 200),
    ("east", "reviews", "v2", 200),
    ("east", "ratings", "v1", 200),
    ("east", "ratings", "v2", 503),
    ("west", "reviews", "v2", 200),
    ("west", "reviews", "v3", 200),
    ("west", "ratings", "v1", 200),
    ("edge", "details", "v1", 200),
];

/// The cluster whose intermediate issues the syncer's certificate; every
/// gateway accepts only a syncer issued there (`--syncer-issuer`).
pub const SYNCER_ISSUER: &str = "east";

/// Workload identities the traffic clients present: (cluster, service
/// account). Certificates are issued by that cluster's CA, as the outbound
/// listener requires.
pub const WORKLOADS: &[(&str, &str)] = &[
    ("east", "productpage"),
    ("west", "productpage"),
    ("edge", "reviews"),
];

/// One gateway's fixed addresses.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub cluster: String,
    pub id: String,
    pub tunnel: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Gateway {
    /// `east/e1`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.cluster, self.id)
    }

    /// The process name in the supervisor.
    fn proc_name(&self) -> String {
        format!("gateway-{}-{}", self.cluster, self.id)
    }

    /// The server name its outbound listener answers to in mutual mode.
    pub fn server_name(&self) -> String {
        format!("{}.cluster.meshfed.internal", self.cluster)
    }
}

/// The running federation.
#[derive(Debug)]
pub struct Federation {
    pub work: PathBuf,
    pub bins: Bins,
    pub sup: Arc<Supervisor>,
    pub repo: Repo,
    pub syncer_http: SocketAddr,
    pub syncer_grpc: SocketAddr,
    pub gateways: Vec<Gateway>,
}

impl Federation {
    /// Starts everything and returns once every gateway has applied the
    /// seed commit and every link is up. `say` reports progress.
    pub fn start(
        work: &Path,
        bins: Bins,
        sup: Arc<Supervisor>,
        say: &dyn Fn(&str),
    ) -> anyhow::Result<Federation> {
        for d in ["logs", "ready", "discovery", "state", "creds", "ca"] {
            std::fs::create_dir_all(work.join(d))
                .with_context(|| format!("creating {}", work.join(d).display()))?;
        }
        say("certificates: a fresh trust anchor, one intermediate per cluster");
        pki(&bins, work)?;

        say(
            "sample services: productpage, reviews v1/v2/v3, ratings v1 (and a broken v2), details",
        );
        let mut endpoints: BTreeMap<&str, Vec<(String, SocketAddr, &str, &str)>> = BTreeMap::new();
        for (cluster, svc, version, status) in SERVICES {
            let name = format!("{svc}-{version}.{cluster}");
            let mut cmd = bins.command("meshfed-backend");
            cmd.args(["--listen", "127.0.0.1:0", "--name", &name])
                .args(["--status", &status.to_string()]);
            let out = sup
                .spawn(
                    &format!("backend-{name}"),
                    cmd,
                    &work.join("logs/backends.log"),
                    true,
                )?
                .context("backend stdout")?;
            let addr: SocketAddr = first_line(out, Duration::from_secs(10), &name)?
                .parse()
                .with_context(|| format!("{name} printed no address"))?;
            endpoints
                .entry(cluster)
                .or_default()
                .push((svc.to_string(), addr, svc, version));
        }
        for (cluster, ..) in CLUSTERS {
            let mut by_svc: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (_, addr, svc, version) in endpoints.get(cluster).into_iter().flatten() {
                by_svc.entry(svc).or_default().push(format!(
                    "    - address: {addr}\n      labels: {{app: {svc}, version: {version}}}\n"
                ));
            }
            let mut text = format!(
                "# Static discovery for cluster {cluster}: the endpoints of its services.\n\
                 # The gateway follows this file; edit it to add or remove endpoints.\nservices:\n"
            );
            if by_svc.is_empty() {
                text = text.replace("services:\n", "services: {}\n");
            }
            for (svc, eps) in by_svc {
                text.push_str(&format!("  {svc}.default:\n"));
                for e in eps {
                    text.push_str(&e);
                }
            }
            write(&work.join(format!("discovery/{cluster}.yaml")), &text)?;
        }

        let mut gateways = Vec::new();
        for (cluster, ids, ..) in CLUSTERS {
            for id in *ids {
                gateways.push(Gateway {
                    cluster: cluster.to_string(),
                    id: id.to_string(),
                    tunnel: SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
                    outbound: free_tcp_addr()?,
                    admin: free_tcp_addr()?,
                });
            }
        }

        say("policy repository: seeded from examples/ (bookinfo-canary, multicluster-failover)");
        let repo = Repo::create(&work.join("repo"), &gateways)?;

        say("syncer: following the repository, gRPC over mTLS to the gateways");
        let secret = work.join("webhook-secret");
        write(&secret, &hex::encode(rand_bytes()?))?;
        let ready = work.join("ready/syncer.json");
        let mut cmd = bins.command("meshfed-syncer");
        cmd.arg("--repo")
            .arg(&repo.dir)
            .arg("--state-dir")
            .arg(work.join("state/syncer"))
            .arg("--tls-dir")
            .arg(work.join("creds/syncer"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            // The post-commit hook's webhook is the trigger; polling is the
            // fallback should a hook fail.
            .args(["--poll-interval", "10s"])
            .arg("--webhook-secret-file")
            .arg(&secret)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info");
        scrub_env(&mut cmd);
        sup.spawn("syncer", cmd, &work.join("logs/syncer.log"), false)?;
        let doc = wait_ready(&sup, "syncer", &ready, &work.join("logs/syncer.log"))?;
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            doc.get(k)
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("the syncer's ready file lacks `{k}`: {doc}"))
        };
        let (syncer_http, syncer_grpc) = (addr("http")?, addr("grpc")?);
        repo.install_hook(syncer_http, &secret)?;

        let fed = Federation {
            work: work.to_path_buf(),
            bins,
            sup,
            repo,
            syncer_http,
            syncer_grpc,
            gateways,
        };
        say("gateways: east e1, west w1 + w2, edge x1 (syncer mode, --outbound-tls mutual)");
        for g in &fed.gateways {
            fed.start_gateway(g)?;
        }
        for g in &fed.gateways {
            fed.wait_gateway_ready(g)?;
        }
        let seed = fed.repo.head()?;
        fed.wait_live(&seed, Duration::from_secs(20))?;
        fed.wait_links(Duration::from_secs(20))?;
        Ok(fed)
    }

    /// Starts one gateway process (it becomes ready once it has a snapshot).
    pub fn start_gateway(&self, g: &Gateway) -> anyhow::Result<()> {
        let ready = self.work.join(format!("ready/{}-{}.json", g.cluster, g.id));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.bins.command("meshfed-gateway");
        cmd.args(["--cluster", &g.cluster, "--gateway-id", &g.id])
            .arg("--tls-dir")
            .arg(self.work.join(format!("creds/{}-{}", g.cluster, g.id)))
            .args(["--syncer", &self.syncer_grpc.to_string()])
            .args(["--syncer-issuer", SYNCER_ISSUER])
            .arg("--state-dir")
            .arg(self.work.join(format!("state/{}-{}", g.cluster, g.id)))
            .arg("--discovery-file")
            .arg(self.work.join(format!("discovery/{}.yaml", g.cluster)))
            .args(["--tunnel-addr", &g.tunnel.to_string()])
            .args(["--outbound-addr", &g.outbound.to_string()])
            .args(["--admin-addr", &g.admin.to_string()])
            .args(["--outbound-tls", "mutual"])
            .args(["--drain-timeout", "1s"])
            // Nothing balances across the demo's gateways by readiness.
            .args(["--drain-grace", "0s"])
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info");
        scrub_env(&mut cmd);
        self.sup
            .spawn(&g.proc_name(), cmd, &self.gateway_log(g), false)?;
        Ok(())
    }

    pub fn gateway_log(&self, g: &Gateway) -> PathBuf {
        self.work
            .join(format!("logs/gateway-{}-{}.log", g.cluster, g.id))
    }

    /// Waits for a gateway's ready file and `/readyz`.
    pub fn wait_gateway_ready(&self, g: &Gateway) -> anyhow::Result<()> {
        let ready = self.work.join(format!("ready/{}-{}.json", g.cluster, g.id));
        wait_ready(&self.sup, &g.proc_name(), &ready, &self.gateway_log(g))?;
        wait_until(
            &format!("gateway {} to be ready (/readyz)", g.name()),
            Duration::from_secs(20),
            || {
                if let Some(status) = self.sup.exited(&g.proc_name()) {
                    bail!(
                        "gateway {} exited ({status}); see {}",
                        g.name(),
                        self.gateway_log(g).display()
                    );
                }
                match get(g.admin, "/readyz") {
                    Ok((200, _)) => Ok(Some(())),
                    _ => Ok(None),
                }
            },
        )
    }

    /// SIGKILLs a gateway (a crash: no drain).
    pub fn kill_gateway(&self, g: &Gateway) {
        self.sup.kill(&g.proc_name());
    }

    /// The commit a gateway has applied, from its `/config_dump`.
    pub fn applied(&self, g: &Gateway) -> Option<String> {
        let (code, body) = get(g.admin, "/config_dump").ok()?;
        if code != 200 {
            return None;
        }
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        doc.pointer("/config_source/applied/version")?
            .as_str()
            .map(str::to_string)
    }

    /// Whether a gateway applied `version` at any time since it started:
    /// its `meshfed_config_info` keeps a series for every version it
    /// enforced (1 while it does, 0 after). An unreachable gateway is an
    /// error, not a "no".
    pub fn ever_applied(&self, g: &Gateway, version: &str) -> anyhow::Result<bool> {
        let (code, body) = get(g.admin, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics on {} answered {code}", g.name());
        }
        Ok(body
            .lines()
            .any(|l| l.starts_with("meshfed_config_info") && l.contains(version)))
    }

    /// How many of a gateway's links to other clusters' gateways are
    /// available, and how many there should be.
    pub fn links(&self, g: &Gateway) -> (usize, usize) {
        (self.link_transports(g).len(), self.want_links(g))
    }

    /// How many links a gateway should have: one per gateway of every
    /// other cluster.
    pub fn want_links(&self, g: &Gateway) -> usize {
        self.gateways
            .iter()
            .filter(|o| o.cluster != g.cluster)
            .count()
    }

    /// The transport (`quic`, `tcp`) of each of a gateway's available links
    /// to other clusters' gateways.
    pub fn link_transports(&self, g: &Gateway) -> Vec<String> {
        get(g.admin, "/peers")
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter(|p| p["available"] == true && p["cluster"] != g.cluster.as_str())
                        .map(|p| p["transport"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Waits until every gateway has every link up.
    pub fn wait_links(&self, within: Duration) -> anyhow::Result<()> {
        wait_until(
            "every gateway to link to every other cluster's gateways",
            within,
            || {
                Ok(self
                    .gateways
                    .iter()
                    .all(|g| {
                        let (up, want) = self.links(g);
                        up >= want
                    })
                    .then_some(()))
            },
        )
    }

    /// The syncer's view of a commit's rollout (`GET /rollout/<sha>`).
    pub fn rollout(&self, sha: &str) -> anyhow::Result<serde_json::Value> {
        let (code, body) = get(self.syncer_http, &format!("/rollout/{sha}"))?;
        if code != 200 {
            bail!("GET /rollout/{sha} on the syncer answered {code}: {body}");
        }
        serde_json::from_str(&body).context("the syncer's /rollout is not JSON")
    }

    /// Waits until `sha` is live on every known gateway; fails at once if
    /// it was rejected or NACKed.
    pub fn wait_live(&self, sha: &str, within: Duration) -> anyhow::Result<()> {
        wait_until(&format!("commit {} to be live", short(sha)), within, || {
            let r = self.rollout(sha)?;
            match r["state"].as_str() {
                Some("live") => Ok(Some(())),
                Some("rejected") | Some("nacked") => {
                    bail!("commit {} was {}: {}", short(sha), r["state"], r["detail"])
                }
                _ => Ok(None),
            }
        })
    }

    /// Waits until the syncer has decided about `sha` (live, rejected,
    /// NACKed, or, with rollout waves, rolled back or halted); returns the
    /// rollout document.
    pub fn wait_decided(&self, sha: &str, within: Duration) -> anyhow::Result<serde_json::Value> {
        wait_until(
            &format!("the syncer to decide about {}", short(sha)),
            within,
            || {
                let r = self.rollout(sha)?;
                Ok(matches!(
                    r["state"].as_str(),
                    Some("live" | "rejected" | "nacked" | "rolled-back" | "halted")
                )
                .then_some(r))
            },
        )
    }

    pub fn gateway(&self, cluster: &str) -> Vec<&Gateway> {
        self.gateways
            .iter()
            .filter(|g| g.cluster == cluster)
            .collect()
    }

    /// A workload's credentials directory.
    pub fn workload_creds(&self, cluster: &str, sa: &str) -> PathBuf {
        self.work.join(format!("creds/{sa}-{cluster}"))
    }
}

/// Makes the trust anchor, the cluster intermediates, and the gateway,
/// syncer and workload credentials, with `meshfed-gateway certs`.
fn pki(bins: &Bins, work: &Path) -> anyhow::Result<()> {
    let p = |rel: &str| work.join(rel).to_string_lossy().into_owned();
    certs(
        bins,
        &[
            "anchor",
            "--name",
            "meshfed demo root",
            "--out",
            &p("ca/root"),
        ],
    )?;
    for (cluster, ids, ..) in CLUSTERS {
        let ca = p(&format!("ca/{cluster}"));
        certs(
            bins,
            &[
                "intermediate",
                "--ca",
                &p("ca/root"),
                "--cluster",
                cluster,
                "--out",
                &ca,
            ],
        )?;
        for id in *ids {
            certs(
                bins,
                &[
                    "gateway",
                    "--ca",
                    &ca,
                    "--cluster",
                    cluster,
                    "--id",
                    id,
                    "--out",
                    &p(&format!("creds/{cluster}-{id}")),
                ],
            )?;
        }
    }
    certs(
        bins,
        &[
            "syncer",
            "--ca",
            &p(&format!("ca/{SYNCER_ISSUER}")),
            "--id",
            "syncer",
            "--out",
            &p("creds/syncer"),
        ],
    )?;
    for (cluster, sa) in WORKLOADS {
        certs(
            bins,
            &[
                "workload",
                "--ca",
                &p(&format!("ca/{cluster}")),
                "--namespace",
                "default",
                "--service-account",
                sa,
                "--out",
                &p(&format!("creds/{sa}-{cluster}")),
            ],
        )?;
    }
    Ok(())
}

fn certs(bins: &Bins, args: &[&str]) -> anyhow::Result<()> {
    let out = bins
        .command("meshfed-gateway")
        .arg("certs")
        .args(args)
        .output()
        .context("running meshfed-gateway certs")?;
    if !out.status.success() {
        bail!(
            "meshfed-gateway certs {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits for a child's ready file; fails early if the child exits, with the
/// tail of its log.
fn wait_ready(
    sup: &Supervisor,
    name: &str,
    ready: &Path,
    log: &Path,
) -> anyhow::Result<serde_json::Value> {
    wait_until(
        &format!("{name} to write {}", ready.display()),
        Duration::from_secs(30),
        || {
            if let Some(status) = sup.exited(name) {
                bail!(
                    "{name} exited ({status}); the end of {}:\n{}",
                    log.display(),
                    tail(log, 15)
                );
            }
            Ok(std::fs::read_to_string(ready)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok()))
        },
    )
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `check` every 20 ms until it returns `Some`, an error, or `within`
/// passes.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The first 12 hex digits of a commit.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Drops `MESHFED_*` settings inherited from the user's shell, which would
/// override the demo's flags.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("finding a free UDP port on 127.0.0.1")?
        .port())
}

fn free_tcp_addr() -> anyhow::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("finding a free TCP port on 127.0.0.1")
}

/// 32 random bytes for the webhook secret.
fn rand_bytes() -> anyhow::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the webhook secret")?;
    Ok(b)
}
