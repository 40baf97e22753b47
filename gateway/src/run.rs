//! Starting and stopping a gateway: bootstrap, listeners, reloads, drain.
//!
//! Order: the admin listener, answering `/healthz` (and `/readyz` 503
//! `starting`) from the first moment ([`admin::serve_early`]); credentials
//! (refuse to start on a bad or mismatched certificate,
//! or one that is not a gateway's),
//! the first snapshot (file mode: refuse to start on invalid policy; syncer
//! mode: the state directory's, if any, else none and not ready until the
//! syncer sends one), discovery (Kubernetes: its first list, or the endpoint
//! set persisted in the state directory when the API server cannot be
//! listed; without one it waits, not ready, as long as the outage lasts),
//! then the QUIC endpoint, the outbound listener and the admin server; then the
//! ready file, and readiness. On SIGTERM or SIGINT: not ready at once
//! (`/readyz` answers 503 `draining`), but every listener (the outbound
//! listener, each port mapping, the tunnel) keeps accepting and serving for
//! the drain grace (`--drain-grace`, 10 s by default, as Envoy's drain
//! time), while the load balancers in front (an EndpointSlice update, then
//! kube-proxy on every node) stop sending new connections here; a second
//! signal ends the grace early. Then: announce `draining` so peers stop
//! opening streams here, say goodbye to the syncer (syncer mode: it retires
//! this gateway's record at once instead of waiting for it as pending; a
//! SIGKILLed gateway says nothing and stays pending for the syncer's
//! `--known-window`), stop accepting on the outbound listener and every
//! port mapping, ask open connections to close (HTTP/1.1 `Connection:
//! close`, HTTP/2 GOAWAY), let in-flight work finish within the drain
//! deadline, close the links, exit. A gateway that was never ready skips the
//! grace: no load balancer was sending to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshfed_policy::Options;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminSettings};
use crate::changes;
use crate::discovery::static_file;
use crate::endpoints::EndpointSet;
use crate::identity::spiffe::SpiffeId;
use crate::identity::store::{self, Credentials};
use crate::identity::verify::{self, HandshakeRefusals};
use crate::metrics::{Metrics, RefusalReader};
use crate::state::Gateway;
use crate::tunnel::link::{Identify, LinkSettings, PeerInfo, StreamHandler, Tunnel};
use crate::wire::frame::ALPN;
use crate::{control, proxy};

/// Everything a gateway needs to start, parsed once.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub cluster: String,
    pub gateway_id: String,
    pub tls_dir: PathBuf,
    /// File mode: the policy repository to compile and follow.
    pub policy_dir: Option<PathBuf>,
    /// Syncer mode: the syncer's gRPC address (`host:port`).
    pub syncer: Option<String>,
    /// The only SPIFFE ID accepted as the syncer (default: see
    /// [`control::syncer::default_syncer_id`]).
    pub syncer_id: Option<SpiffeId>,
    /// The cluster whose intermediate CA must have issued the syncer's
    /// certificate; required in syncer mode.
    pub syncer_issuer: Option<String>,
    /// Where the last good snapshot from the syncer is kept.
    pub state_dir: Option<PathBuf>,
    pub discovery_file: Option<PathBuf>,
    pub tunnel_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_token: Option<String>,
    pub ready_file: Option<PathBuf>,
    pub drain_timeout: Duration,
    /// After SIGTERM, how long every listener keeps accepting while
    /// readiness is already false (`--drain-grace`), before the drain.
    pub drain_grace: Duration,
    /// How long a caller connection of the outbound listener may go without
    /// a request head (HTTP/1) or a request in flight (HTTP/2).
    pub header_timeout: Duration,
    pub policy: Options,
    /// Local callers must present workload certificates of this cluster.
    pub outbound_mutual_tls: bool,
    /// Port mappings: listen address → service host and port, as opaque TCP.
    pub tcp_maps: Vec<TcpMap>,
    /// `--caller-namespace`: where plaintext callers' short names resolve
    /// when their address does not tell (unset: such names are refused).
    pub caller_namespace: Option<String>,
    /// Kubernetes discovery (and mirror Services), when enabled.
    #[cfg(feature = "kube")]
    pub kube: Option<crate::discovery::kube::KubeSettings>,
    /// Distributed tracing: OTLP endpoint (off when unset) and sampling.
    pub tracing: crate::trace::Settings,
    /// The tunnel links' congestion controller.
    pub congestion: crate::tunnel::link::Congestion,
    /// What the links this gateway dials run over (`--link-transport`).
    pub link_transport: crate::tunnel::link::LinkTransport,
    /// The window of each link's loss ratio and random-loss verdict
    /// (crate::tunnel::loss; `--loss-window`, hidden, for tests).
    pub loss_window: Duration,
    /// The most caller connections held at once (`--max-connections`),
    /// lowered at start to fit the open-files limit.
    pub max_connections: usize,
    /// Request bodies in flight per peer and from all peers
    /// (`--max-peer-request-bodies`, `--max-request-bodies`; crate::body_budget).
    pub max_peer_request_bodies: usize,
    pub max_request_bodies: usize,
}

/// A listener of its own for one service port (`--tcp-port-map`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpMap {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for TcpMap {
    type Err = String;

    /// `LISTEN=HOST:PORT`, e.g. `127.0.0.1:15432=db.default:5432`; a bare
    /// port listens on 127.0.0.1.
    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: write LISTEN=HOST:PORT, e.g. 15432=db.default:5432"))?;
        let listen: SocketAddr = match listen.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => listen
                .parse()
                .map_err(|_| format!("`{listen}` is not a port or an address"))?,
        };
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| format!("`{target}`: the target needs a port, e.g. db.default:5432"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port"))?;
        if host.is_empty() {
            return Err(format!("`{target}`: the target needs a host"));
        }
        Ok(TcpMap {
            listen,
            host: host.to_string(),
            port,
        })
    }
}

fn local_tls(
    creds: &Credentials,
    refusals: &Arc<HandshakeRefusals>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let accept = verify::AcceptClients::Workloads {
        cluster: creds.cluster.clone(),
    };
    let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    store::server_config_accepting(creds, &alpn, refusals.clone(), accept, true)
        .context("building the outbound listener's TLS config")
}

fn alpn() -> Vec<Vec<u8>> {
    ALPN.iter().map(|a| a.to_vec()).collect()
}

/// Reads the peer's identity from its certificate chain: it must be a gateway
/// (the verifier already checked the chain and the cluster binding).
pub(crate) fn identify() -> Identify {
    Arc::new(|chain: &[CertificateDer<'static>]| {
        if chain.is_empty() {
            return Err("peer presented no certificate".to_string());
        }
        let id = verify::peer_identity(chain).map_err(|e| e.to_string())?;
        match &id.id {
            SpiffeId::Gateway { .. } => Ok(PeerInfo {
                cluster: id.cluster.clone(),
                id: id.id.to_string(),
                trust_domain: id.trust_domain.clone(),
            }),
            other => Err(format!(
                "{other} is not a gateway; only gateways may use the tunnel"
            )),
        }
    })
}

fn tls(
    creds: &Credentials,
    refusals: &Arc<HandshakeRefusals>,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
    let server = store::server_config(creds, &alpn(), refusals.clone())
        .context("building the tunnel's TLS server config")?;
    let client = store::client_config(creds, &alpn(), refusals.clone())
        .context("building the tunnel's TLS client config")?;
    Ok((server, client))
}

/// Runs a gateway until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    crate::identity::install_crypto_provider();
    // Health first: `/healthz` answers (and `/readyz` says `starting`)
    // while certificates, the snapshot and discovery load, which can take
    // as long as the API server's first list.
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin server on TCP {}", cfg.admin_addr))?;
    let early_admin = admin::serve_early(admin_listener, cfg.header_timeout);
    let creds = Credentials::load(&cfg.tls_dir)
        .with_context(|| format!("loading certificates from {}", cfg.tls_dir.display()))?;
    if creds.cluster != cfg.cluster {
        bail!(
            "the certificate in {} is for cluster `{}`, but --cluster is `{}`; issue one with `meshfed-gateway certs gateway --cluster {}`",
            cfg.tls_dir.display(),
            creds.cluster,
            cfg.cluster,
            cfg.cluster
        );
    }
    require_gateway_certificate(&creds, &cfg.tls_dir)?;
    let syncer_issuer = match (&cfg.syncer, &cfg.syncer_issuer) {
        (Some(_), None) => bail!(
            "syncer mode needs --syncer-issuer CLUSTER: the cluster whose intermediate CA issued \
             the syncer's certificate (`certs syncer --ca <that cluster's CA dir>`); a syncer \
             issued by any other cluster's CA is refused (docs/identity.md)"
        ),
        (_, issuer) => issuer.clone(),
    };
    let refusals = Arc::new(HandshakeRefusals::new());
    let (server_tls, client_tls) = tls(&creds, &refusals)?;

    let (snapshot, source) = first_snapshot(&cfg).await?;
    let snapshot = Arc::new(snapshot);
    // Without the `dns` feature a peer gateway named by host could never
    // be dialed: say so now, with the fix, rather than on every dial.
    #[cfg(not(feature = "dns"))]
    for (cluster, info) in &snapshot.policy.clusters {
        if *cluster == cfg.cluster {
            continue; // not dialed
        }
        for target in &info.gateways {
            crate::discovery::dns::Resolver::shared()
                .resolve_host_port(target)
                .await
                .with_context(|| format!("the gateways of cluster `{cluster}` in the policy"))?;
        }
    }

    #[cfg(feature = "kube")]
    let kube = match &cfg.kube {
        Some(k) => Some(
            crate::discovery::kube::watch(
                k,
                cfg.cluster.clone(),
                cfg.policy.domain.clone(),
                &crate::discovery::kube::policy_namespaces(&snapshot.policy),
            )
            .await
            .context("starting Kubernetes discovery")?,
        ),
        None => None,
    };
    let discovered = match &cfg.discovery_file {
        Some(path) => {
            static_file::watch(path.clone(), cfg.cluster.clone(), cfg.policy.domain.clone())
                .await
                .with_context(|| format!("loading discovery file {}", path.display()))?
        }
        #[cfg(feature = "kube")]
        None => match &kube {
            Some(k) => k.endpoints.clone(),
            None => watch::channel(Arc::new(EndpointSet::new())).1,
        },
        #[cfg(not(feature = "kube"))]
        None => watch::channel(Arc::new(EndpointSet::new())).1,
    };
    // ServiceEntry endpoints join discovery's before the first request, so
    // an edge gateway serves its external hosts from the start.
    let (declared, unresolved) = crate::discovery::service_entry::endpoints(
        &snapshot.policy,
        &cfg.cluster,
        crate::discovery::dns::Resolver::shared(),
    )
    .await;
    for e in &unresolved {
        tracing::warn!(error = %e, "ServiceEntry endpoint does not resolve at startup; retrying");
    }
    let merged = crate::discovery::service_entry::merge(&discovered.borrow(), declared);
    let (merged_tx, endpoints) = watch::channel(merged);

    let tunnel = Tunnel::bind(
        cfg.tunnel_addr,
        server_tls,
        client_tls,
        &cfg.cluster,
        LinkSettings {
            congestion: cfg.congestion,
            transport: cfg.link_transport,
            loss_window: cfg.loss_window,
            ..LinkSettings::default()
        },
        identify(),
    )
    .with_context(|| format!("binding the tunnel on UDP and TCP {}", cfg.tunnel_addr))?;
    // Every module's metric set, listed once for `/metrics`.
    let module_metrics = crate::state::ModuleMetrics::default();
    let mut sets: Vec<&dyn crate::metrics::Register> = module_metrics.sets().to_vec();
    sets.push(&crate::wire::announce::AnnounceMetrics);
    sets.push(&changes::ChangeMetrics);
    #[cfg(feature = "kube")]
    sets.push(&crate::mirror::MirrorMetrics);
    let metrics = Arc::new(Metrics::new(&sets));
    let (r, a) = (refusals.clone(), tunnel.admission_refusals());
    metrics.set_handshake_refusals(RefusalReader(Box::new(move || {
        let mut all = r.snapshot();
        all.extend(a.snapshot());
        all
    })));
    let d = tunnel.datagram_drops();
    metrics.set_datagram_drops(RefusalReader(Box::new(move || d.snapshot())));
    let state = Gateway::new(
        cfg.cluster.clone(),
        cfg.gateway_id.clone(),
        snapshot.clone(),
        endpoints,
        tunnel.clone(),
        metrics,
        module_metrics.clone(),
    )?;
    state
        .bodies
        .set_limits(cfg.max_peer_request_bodies, cfg.max_request_bodies);
    if let Some(source) = source {
        state.provenance.applied(&snapshot, source);
    }
    let current = state.clone();
    crate::discovery::service_entry::spawn(
        state.cluster.clone(),
        move || current.active.load().snapshot.clone(),
        state.applied_watch(),
        discovered,
        merged_tx,
    );
    state.spawn_endpoint_follower();
    let trace_metrics = state.module_metrics.trace.clone();
    if let Some(t) =
        crate::trace::Tracing::start(&cfg.tracing, &cfg.cluster, &cfg.gateway_id, trace_metrics)?
    {
        let _ = state.trace.set(t);
    }
    if cfg.outbound_mutual_tls {
        state.local_tls.store(Some(local_tls(&creds, &refusals)?));
    }

    let handler_state = state.clone();
    let handler: StreamHandler = Arc::new(move |peer, send, recv| {
        let state = handler_state.clone();
        Box::pin(proxy::inbound::serve_stream(state, peer, send, recv))
    });
    tunnel.serve(handler, state.announcements());

    let limit = caller_limit(cfg.max_connections, &state);
    let outbound = TcpListener::bind(cfg.outbound_addr)
        .await
        .with_context(|| format!("binding the outbound listener on TCP {}", cfg.outbound_addr))?;
    let admin_listener = early_admin
        .into_listener()
        .await
        .context("taking over the admin listener")?;
    let mut addrs = BTreeMap::from([
        ("tunnel".to_string(), tunnel.local_addr()?),
        ("outbound".to_string(), outbound.local_addr()?),
        ("admin".to_string(), admin_listener.local_addr()?),
    ]);
    let (stop_outbound, stop_rx) = watch::channel(false);
    let mut mapped = Vec::with_capacity(cfg.tcp_maps.len());
    for map in &cfg.tcp_maps {
        // A port mapping has no caller to take a namespace from: a short
        // host is qualified with --caller-namespace, or refused.
        let host = match (
            &cfg.caller_namespace,
            crate::route::is_short_name(&map.host),
        ) {
            (_, false) => map.host.clone(),
            (Some(ns), true) => format!("{}.{ns}", map.host.trim_end_matches('.')),
            (None, true) => bail!(
                "--tcp-port-map {}={}:{}: `{}` is a short name, which means a service only in \
                 a namespace; write `{}.<namespace>:{}`, or set --caller-namespace",
                map.listen,
                map.host,
                map.port,
                map.host,
                map.host,
                map.port
            ),
        };
        let l = TcpListener::bind(map.listen).await.with_context(|| {
            format!(
                "binding the port mapping {} → {}:{}",
                map.listen, map.host, map.port
            )
        })?;
        addrs.insert(format!("tcp:{}:{}", map.host, map.port), l.local_addr()?);
        mapped.push(tokio::spawn(proxy::outbound::serve_mapped(
            state.clone(),
            l,
            limit.clone(),
            host,
            map.port,
            stop_rx.clone(),
            cfg.drain_timeout,
        )));
    }
    let ready = Arc::new(admin::Readiness::default());
    let outbound_task = tokio::spawn(proxy::outbound::serve(
        state.clone(),
        outbound,
        limit,
        stop_rx,
        cfg.drain_timeout,
        cfg.header_timeout,
        cfg.caller_namespace.as_deref().map(Arc::from),
    ));
    tokio::spawn(admin::serve(
        state.clone(),
        admin_listener,
        ready.clone(),
        AdminSettings {
            token: cfg.admin_token.clone(),
            header_timeout: cfg.header_timeout,
            outbound_port: addrs["outbound"].port(),
        },
    ));
    if let Some(dir) = &cfg.policy_dir {
        control::watch_dir(state.clone(), dir.clone(), cfg.policy.clone());
    }
    let mut syncer_client = None;
    if let (Some(addr), Some(issuer)) = (&cfg.syncer, syncer_issuer) {
        let id = match &cfg.syncer_id {
            Some(id) => id.clone(),
            None => control::syncer::default_syncer_id(&creds.trust_domain)?,
        };
        let mut settings =
            control::syncer::SyncerSettings::new(addr.clone(), id, issuer, cfg.tls_dir.clone());
        settings.state_dir = cfg.state_dir.clone();
        syncer_client = Some(control::syncer::spawn(
            state.clone(),
            settings,
            refusals.clone(),
        ));
    }
    #[cfg(feature = "kube")]
    if let (Some(k), Some(settings)) = (&kube, &cfg.kube) {
        crate::mirror::attach(&state, k, settings, addrs["outbound"].port());
    }
    spawn_credential_reload(&cfg, state.clone(), refusals.clone());

    if let Some(path) = &cfg.ready_file {
        let json = serde_json::to_vec_pretty(&addrs)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    // Ready once a snapshot is applied: at once in file mode or from the
    // state directory, else when the syncer's first one is.
    let mut applied = state.provenance.subscribe();
    let ready_when_applied = ready.clone();
    let (cluster, id) = (cfg.cluster.clone(), cfg.gateway_id.clone());
    #[cfg(feature = "kube")]
    let listed = kube.as_ref().map(|k| {
        let timeout = cfg
            .kube
            .as_ref()
            .and_then(|k| k.sync_timeout)
            .unwrap_or(crate::discovery::kube::SYNC_TIMEOUT);
        (k.shared.clone(), state.clone(), timeout)
    });
    tokio::spawn(async move {
        if applied.wait_for(Option::is_some).await.is_ok() {
            // The first snapshot from the syncer may name namespaces not
            // watched until now: not ready before they are listed (at most
            // the sync timeout), or the first calls would find no local
            // endpoints.
            #[cfg(feature = "kube")]
            if let Some((shared, state, timeout)) = listed {
                let named =
                    crate::discovery::kube::policy_namespaces(&state.active.load().snapshot.policy);
                crate::discovery::kube::wait_listed(&shared, &named, timeout).await;
            }
            ready_when_applied.set_ready();
            tracing::info!(%cluster, %id, ?addrs, "gateway ready");
        }
    });
    if state.provenance.current().is_none() {
        tracing::info!("listening; not ready until the syncer sends a snapshot");
    }

    shutdown_signal().await;
    let was_ready = ready.is_ready();
    ready.set_draining();
    if was_ready && !cfg.drain_grace.is_zero() {
        // Load balancers learn of SIGTERM late: Kubernetes removes a
        // terminating pod from its EndpointSlices at once, but every
        // node's kube-proxy (and a cloud load balancer's health check)
        // follows seconds later, and until then sends new connections
        // here. So keep serving as if nothing happened: peers are not told
        // either (one that reaches this cluster through a load-balanced
        // address has only this link until the drain closes it).
        tracing::info!(grace = ?cfg.drain_grace, "SIGTERM: not ready; every listener keeps serving for the drain grace while load balancers stop sending here (a second signal ends it)");
        tokio::select! {
            () = tokio::time::sleep(cfg.drain_grace) => {}
            () = shutdown_signal() => tracing::info!("second signal: drain grace cut short"),
        }
    }
    tracing::info!(deadline = ?cfg.drain_timeout, "draining");
    state.start_drain();
    // This gateway is leaving for good: the syncer stops waiting for it
    // now, while the drain goes on (bounded: it never delays the exit).
    let goodbye = syncer_client.map(|c| tokio::spawn(c.goodbye(GOODBYE_WITHIN)));
    // Give peers a moment to read the draining announcement before
    // in-flight work is counted down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    let _ = stop_outbound.send(true);
    // The outbound listener and every port mapping stop accepting now and
    // wait for their connections, each within the drain deadline; the
    // tunnel keeps serving peers meanwhile. Only then, with what is left of
    // the deadline, does it finish serving and close the links: the
    // callers' connections in flight still use the links this gateway
    // dialed, and closing those first cut them.
    let _ = outbound_task.await;
    for m in mapped {
        let _ = m.await;
    }
    tunnel
        .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    // The spans of the drained requests, too.
    if let Some(t) = state.trace.get() {
        t.shutdown(cfg.drain_timeout).await;
    }
    if let Some(g) = goodbye {
        let _ = g.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long the goodbye to the syncer may take (it runs beside the drain).
const GOODBYE_WITHIN: Duration = Duration::from_secs(2);

/// The caller-connection limit: `wanted`, lowered to fit the open-files
/// limit (raised to its hard limit first) with descriptors to spare for the
/// admin server, peers, upstreams and file reloads ([`crate::limits`]).
fn caller_limit(wanted: usize, state: &Gateway) -> crate::accept::ConnectionLimit {
    let files = crate::limits::raise_open_files();
    let max = crate::limits::fit_connections(wanted, files.soft);
    if max < wanted {
        tracing::warn!(
            max_connections = wanted,
            open_files_limit = files.soft,
            serving = max,
            "--max-connections does not fit the open-files limit ({} descriptors per connection, {} kept for the admin server, peers and files); raise the limit (LimitNOFILE=, ulimit -n) to serve more",
            crate::limits::FDS_PER_CONNECTION,
            crate::limits::reserve(files.soft)
        );
    } else {
        tracing::debug!(
            max_connections = max,
            open_files_limit = files.soft,
            "caller-connection limit"
        );
    }
    let gauges = &state.module_metrics.connections;
    gauges
        .caller_connections_limit
        .set(i64::try_from(max).unwrap_or(i64::MAX));
    crate::accept::ConnectionLimit::new(max, gauges.caller_connections.clone())
}

/// The snapshot to start with, and where it came from (`None`: nothing
/// yet, a placeholder that routes nothing, not ready).
async fn first_snapshot(
    cfg: &RunConfig,
) -> anyhow::Result<(
    meshfed_policy::Snapshot,
    Option<crate::state::provenance::Source>,
)> {
    if let Some(dir) = &cfg.policy_dir {
        let (dir2, cluster, opts) = (dir.clone(), cfg.cluster.clone(), cfg.policy.clone());
        let snap = tokio::task::spawn_blocking(move || control::load_dir(&dir2, &cluster, &opts))
            .await??;
        tracing::info!(version = %snap.version, "policy loaded");
        let source = crate::state::provenance::Source::File {
            dir: dir.display().to_string(),
        };
        return Ok((snap, Some(source)));
    }
    if cfg.syncer.is_none() {
        bail!(
            "no policy source: give --policy-dir DIR (file mode) or --syncer HOST:PORT (syncer mode)"
        );
    }
    if let Some(state_dir) = &cfg.state_dir {
        let (dir, cluster) = (state_dir.clone(), cfg.cluster.clone());
        match tokio::task::spawn_blocking(move || control::persist::load(&dir, &cluster)).await? {
            Ok(Some(snap)) => {
                tracing::info!(version = %snap.version, dir = %state_dir.display(), "starting from the persisted snapshot; the syncer will send newer ones");
                let source = crate::state::provenance::Source::StateDir {
                    path: control::persist::path(state_dir).display().to_string(),
                };
                return Ok((snap, Some(source)));
            }
            Ok(None) => {
                tracing::info!(dir = %state_dir.display(), "no persisted snapshot yet; waiting for the syncer")
            }
            Err(e) => {
                tracing::warn!(error = %e, "persisted snapshot unusable; waiting for the syncer")
            }
        }
    }
    let placeholder = meshfed_policy::Snapshot::new(
        "",
        meshfed_policy::snapshot::ClusterPolicy {
            cluster: cfg.cluster.clone(),
            domain: cfg.policy.domain.clone(),
            trust_domain: cfg.policy.trust_domain.clone(),
            ..Default::default()
        },
    );
    Ok((placeholder, None))
}

/// Only a gateway certificate may run a gateway: peers refuse any other on
/// the tunnel, so with a workload's or the syncer's the gateway would report
/// ready while its links never come up.
fn require_gateway_certificate(creds: &Credentials, dir: &Path) -> anyhow::Result<()> {
    if matches!(creds.id, SpiffeId::Gateway { .. }) {
        return Ok(());
    }
    bail!(
        "the certificate in {} is a {} certificate ({}), not a gateway's; peers refuse it on the \
         tunnel, so no link would come up; issue one with `meshfed-gateway certs gateway --ca \
         <{} CA dir> --cluster {} --id <gateway id> --out {}`",
        dir.display(),
        creds.id.kind(),
        creds.id,
        creds.cluster,
        creds.cluster,
        dir.display()
    )
}

fn spawn_credential_reload(cfg: &RunConfig, state: Arc<Gateway>, refusals: Arc<HandshakeRefusals>) {
    let tunnel = state.tunnel.clone();
    let mutual = cfg.outbound_mutual_tls;
    let tls_dir = cfg.tls_dir.clone();
    // Read again when inotify reports a change of the directory or the
    // files (a Secret's `..data` swap included), every 30 s regardless,
    // and after 1 s to confirm an invalid set (changes).
    let wakes = match changes::spawn_wakes(changes::Source::TlsDir, tls_targets(&cfg.tls_dir)) {
        Ok(wakes) => wakes,
        Err(e) => {
            tracing::error!(error = %e, dir = %cfg.tls_dir.display(), "cannot start the certificate directory watcher; certificates will not reload");
            return;
        }
    };
    let wakes = store::Wakes::On {
        wakes,
        confirm: Duration::from_secs(1),
        confirmed: || changes::count_check(changes::Source::TlsDir),
    };
    let mut rx = match store::watch_on(cfg.tls_dir.clone(), wakes) {
        Ok((rx, _task)) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow the certificate directory; certificates will not reload");
            return;
        }
    };
    // Endpoints under ISTIO_MUTUAL get the gateway's own certificate.
    state.upstream.set_identity(rx.borrow().clone());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let creds = rx.borrow_and_update().clone();
            if let Err(e) = require_gateway_certificate(&creds, &tls_dir) {
                tracing::error!(error = %e, "reloaded certificates unusable; keeping the previous ones");
                continue;
            }
            state.upstream.set_identity(creds.clone());
            if mutual {
                match local_tls(&creds, &refusals) {
                    Ok(c) => state.local_tls.store(Some(c)),
                    Err(e) => {
                        tracing::error!(error = %e, "reloaded certificates unusable for the outbound listener")
                    }
                }
            }
            match tls(&creds, &refusals).map(|(s, c)| tunnel.set_tls(s, c)) {
                Ok(Ok(())) => {
                    tracing::info!(id = %creds.id, "certificates reloaded; new handshakes use them")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reloaded certificates unusable; keeping the previous ones")
                }
                Err(e) => {
                    tracing::error!(error = %e, "reloaded certificates unusable; keeping the previous ones")
                }
            }
        }
    });
}

/// What to watch for the certificate directory: the directory (a Secret's
/// `..data` swap, a rename onto a file) and the three files through their
/// symlinks (an in-place write to a target elsewhere).
fn tls_targets(dir: &Path) -> changes::Targets {
    let dir = dir.to_path_buf();
    Box::new(move || {
        let mut out = vec![dir.clone()];
        out.extend(
            [store::BUNDLE_FILE, store::CERT_FILE, store::KEY_FILE]
                .iter()
                .map(|f| dir.join(f)),
        );
        out
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
