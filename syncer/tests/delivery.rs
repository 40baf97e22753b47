//! Config delivery end to end: the syncer's [`ConfigServer`] (run in
//! process, fed by a `watch` the test publishes to, since the syncer binary's
//! pipeline is built elsewhere) against real `meshfed-gateway` processes
//! started with `--syncer`, and against lightweight in-process tonic
//! subscribers for the load and protocol cases. Certificates are real, made
//! with `meshfed-gateway certs`; everything runs over TLS on loopback.
//!
//! Build the gateway binary first when running this file alone:
//! `cargo build -p meshfed-gateway --bins && cargo nextest run -p meshfed-syncer --test delivery`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshfed_identity::store::{self, Credentials};
use meshfed_identity::verify::{ExpectedPeer, HandshakeRefusals, RefusalReason};
use meshfed_policy::{Options, Snapshot, analyze};
use meshfed_proto::config::v1 as pb;
use meshfed_proto::config::v1::config_delivery_client::ConfigDeliveryClient;
use meshfed_syncer::rollout::{ClusterSnapshot, GatewayRecord, Published, Rollout};
use meshfed_syncer::server::{ConfigServer, ServerSettings, tls_config};
use meshfed_tests::federation::{
    GatewayProcess, GatewaySpec, Pki, certs, cluster_yaml, free_udp_port,
};
use meshfed_tests::{eventually, patient};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};

type PublishTx = watch::Sender<Option<Arc<Published>>>;

fn runtime() -> Runtime {
    meshfed_identity::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn sha(n: u32) -> String {
    format!(
        "{n:08x}{}",
        "c0ffee".repeat(6).chars().take(32).collect::<String>()
    )
}

/// A real compiled snapshot of a one-cluster federation `east` at `commit`,
/// plus `filler` origins entries to make it big.
fn snapshot(commit: &str, tunnel_port: u16, filler: usize) -> Snapshot {
    let files = vec![(
        "federation.yaml".to_string(),
        cluster_yaml("east", &[tunnel_port]).into_bytes(),
    )];
    let opts = Options::default();
    let a = analyze(files, &opts);
    assert!(a.is_valid(), "{:?}", a.diagnostics);
    let mut s = a.compile("east", commit, &opts).unwrap();
    for i in 0..filler {
        s.origins
            .insert(format!("Filler ns/item-{i:08}"), format!("filler.yaml:{i}"));
    }
    s
}

fn publication(commit: &str, snap: Snapshot) -> Arc<Published> {
    publication_raw(commit, ClusterSnapshot::new(snap))
}

fn publication_raw(commit: &str, cs: ClusterSnapshot) -> Arc<Published> {
    Arc::new(Published {
        commit: commit.to_string(),
        fetched_at: Instant::now(),
        clusters: [("east".to_string(), cs)].into(),
    })
}

/// A config server running in the test's runtime.
struct Server {
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    refusals: Arc<HandshakeRefusals>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    fn start(
        rt: &Runtime,
        creds: &Path,
        bind: SocketAddr,
        rollout: Rollout,
        rx: watch::Receiver<Option<Arc<Published>>>,
        max_ids_per_identity: usize,
    ) -> Self {
        Self::start_advertising(rt, creds, bind, rollout, rx, max_ids_per_identity, true)
    }

    fn start_advertising(
        rt: &Runtime,
        creds: &Path,
        bind: SocketAddr,
        rollout: Rollout,
        rx: watch::Receiver<Option<Arc<Published>>>,
        max_ids_per_identity: usize,
        advertise_goodbye: bool,
    ) -> Self {
        let creds = Credentials::load(creds).unwrap();
        let refusals = Arc::new(HandshakeRefusals::new());
        let tls = tls_config(&creds, refusals.clone()).unwrap();
        let settings = ServerSettings {
            keepalive_interval: Duration::from_millis(500),
            keepalive_timeout: Duration::from_secs(2),
            admission: meshfed_syncer::rollout::Admission {
                max_ids_per_identity,
                ..Default::default()
            },
            advertise_goodbye,
            ..ServerSettings::default()
        };
        let server = ConfigServer::with_settings(rollout, rx, settings);
        let mut registry = Registry::with_prefix("meshfed");
        server.register(&mut registry);
        let listener = rt.block_on(TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = rt.spawn(async move {
            server
                .serve(listener, tls, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Server {
            addr,
            registry: Arc::new(Mutex::new(registry)),
            refusals,
            stop: Some(stop),
            task,
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }

    /// The sum of the samples of `name` whose line contains every needle.
    fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn stop(mut self, rt: &Runtime) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        rt.block_on(async {
            tokio::time::timeout(patient(Duration::from_secs(10)), &mut self.task)
                .await
                .expect("the config server stops within 10 s of shutdown, ending its streams")
                .unwrap();
        });
    }
}

struct World {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    syncer_creds: PathBuf,
    rollout: Rollout,
    publish: PublishTx,
    tunnel_port: u16,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new(&dir);
        let syncer_creds = syncer_creds(&pki, "syncer");
        let (publish, _) = watch::channel(None);
        World {
            _dir: tmp,
            dir,
            pki,
            syncer_creds,
            rollout: Rollout::new(),
            publish,
            tunnel_port: free_udp_port(),
        }
    }

    fn server(&self, rt: &Runtime, bind: SocketAddr) -> Server {
        self.server_with(
            rt,
            bind,
            meshfed_syncer::rollout::DEFAULT_MAX_IDS_PER_IDENTITY,
        )
    }

    /// A server that lets one certificate hold `max_ids_per_identity`
    /// gateway ids (load tests share one certificate between subscribers).
    fn server_with(&self, rt: &Runtime, bind: SocketAddr, max_ids_per_identity: usize) -> Server {
        Server::start(
            rt,
            &self.syncer_creds,
            bind,
            self.rollout.clone(),
            self.publish.subscribe(),
            max_ids_per_identity,
        )
    }

    fn publish(&self, commit: &str) -> Arc<Published> {
        let p = publication(commit, snapshot(commit, self.tunnel_port, 0));
        self.publish.send_replace(Some(p.clone()));
        p
    }

    fn gateway(&self, id: &str, syncer: SocketAddr, extra: &[&str]) -> GatewayProcess {
        let creds = self.dir.join("creds").join(format!("east-{id}"));
        if !creds.exists() {
            self.pki.gateway("east", id);
        }
        let mut extra_args = vec![
            "--syncer".to_string(),
            syncer.to_string(),
            "--syncer-issuer".to_string(),
            "east".to_string(),
        ];
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        GatewayProcess::start(&GatewaySpec {
            cluster: "east".into(),
            id: id.into(),
            tls_dir: creds,
            policy_dir: PathBuf::new(),
            discovery: None,
            tunnel_port: self.tunnel_port,
            work_dir: self.dir.clone(),
            extra_args,
        })
    }

    fn record(&self, id: &str) -> Option<GatewayRecord> {
        self.rollout
            .gateways()
            .into_iter()
            .find(|g| g.cluster == "east" && g.gateway_id == id)
    }

    fn wait_acked(&self, id: &str, commit: &str) -> GatewayRecord {
        eventually(
            &format!("gateway {id} ACKs {commit}"),
            Duration::from_secs(20),
            || match self.record(id) {
                Some(r) if r.applied.as_deref() == Some(commit) && r.acked_at.is_some() => Ok(r),
                other => Err(format!("{other:?}")),
            },
        )
    }
}

fn syncer_creds(pki: &Pki, id: &str) -> PathBuf {
    let ca = pki.cluster_ca("east");
    let out = pki.dir.join("creds").join(format!("syncer-{id}"));
    certs(&[
        "syncer",
        "--ca",
        &ca.to_string_lossy(),
        "--id",
        id,
        "--out",
        &out.to_string_lossy(),
    ]);
    out
}

fn dump(gw: &GatewayProcess) -> serde_json::Value {
    serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default()
}

fn wait_dump_version(gw: &GatewayProcess, commit: &str, source: &str) -> serde_json::Value {
    eventually(
        &format!("{} serves {commit} from {source}", gw.id),
        Duration::from_secs(20),
        || {
            let d = dump(gw);
            if d["applied_version"] == commit
                && d["config_source"]["applied"]["source"]["kind"] == source
            {
                Ok(d)
            } else {
                Err(format!(
                    "applied {} from {}",
                    d["applied_version"], d["config_source"]
                ))
            }
        },
    )
}

/// A lightweight subscriber: a tonic client over our own TLS connector with
/// the credentials in `creds`.
async fn dial(
    addr: SocketAddr,
    creds: &Path,
) -> Result<ConfigDeliveryClient<tonic::transport::Channel>, String> {
    let creds = Credentials::load(creds).map_err(|e| e.to_string())?;
    let tls = store::client_config(
        &creds,
        &[b"h2".to_vec()],
        Arc::new(HandshakeRefusals::new()),
    )
    .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let channel = tonic::transport::Endpoint::from_static("http://syncer.meshfed.internal")
        .connect_with_connector(FnSvc(move || {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ExpectedPeer::Syncer
                    .server_name()
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(ConfigDeliveryClient::new(channel).max_decoding_message_size(256 << 20))
}

/// A connector (`tower::Service<Uri>`) from a closure.
#[derive(Clone)]
struct FnSvc<F>(F);

impl<F, Fut, T> tonic::codegen::Service<tonic::codegen::http::Uri> for FnSvc<F>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, std::io::Error>> + Send + 'static,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Fut {
        (self.0)()
    }
}

fn hello(cluster: &str, id: &str, applied: &str) -> pb::GatewayMessage {
    pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Hello(pb::Hello {
            cluster: cluster.into(),
            gateway_id: id.into(),
            applied_version: applied.into(),
            snapshot_schema: meshfed_policy::snapshot::SCHEMA,
        })),
    }
}

fn ack(version: &str) -> pb::GatewayMessage {
    pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Ack(pb::Ack {
            version: version.into(),
        })),
    }
}

/// Subscribes; returns the sender for ACKs and the inbound stream.
async fn subscribe(
    client: &mut ConfigDeliveryClient<tonic::transport::Channel>,
    first: pb::GatewayMessage,
) -> Result<
    (
        mpsc::Sender<pb::GatewayMessage>,
        tonic::Streaming<pb::SyncerMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let resp = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok((tx, resp.into_inner()))
}

/// The next snapshot's version on `stream`, skipping Pending messages.
async fn next_snapshot(stream: &mut tonic::Streaming<pb::SyncerMessage>) -> pb::Snapshot {
    loop {
        match stream.message().await.unwrap().unwrap().message {
            Some(pb::syncer_message::Message::Snapshot(s)) => return s,
            Some(pb::syncer_message::Message::Pending(_)) => continue,
            None => panic!("empty SyncerMessage"),
        }
    }
}

#[test]
fn a_gateway_applies_acks_and_follows_newer_commits_and_a_bad_one_is_nacked_while_the_previous_stays()
 {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let a = sha(1);
    w.publish(&a);
    let gw = w.gateway("gw-1", server.addr, &[]);

    let rec = w.wait_acked("gw-1", &a);
    assert!(
        rec.connected && rec.identity.ends_with("/meshfed/cluster/east/gateway/gw-1"),
        "{rec:?}"
    );
    let d = wait_dump_version(&gw, &a, "syncer");
    assert_eq!(
        d["config_source"]["syncer"]["state"], "connected",
        "{}",
        d["config_source"]
    );
    assert_eq!(gw.admin_get("/readyz").trim(), "ready");

    // A newer commit is pushed to the connected gateway; its ACK is measured.
    let b = sha(2);
    w.publish(&b);
    w.wait_acked("gw-1", &b);
    wait_dump_version(&gw, &b, "syncer");
    eventually(
        "propagation measured",
        Duration::from_secs(5),
        || match server.metric("meshfed_syncer_propagation_seconds_count", &[]) {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{n}\n{}", server.metrics())),
        },
    );

    // A snapshot this gateway cannot decode (a newer schema): NACKed with the
    // reason, recorded, and the gateway keeps serving the previous one.
    let c = sha(3);
    let good = snapshot(&c, w.tunnel_port, 0);
    let bytes =
        String::from_utf8(good.encode())
            .unwrap()
            .replacen("{\"schema\":1,", "{\"schema\":2,", 1);
    assert!(bytes.starts_with("{\"schema\":2,"), "{bytes}");
    w.publish.send_replace(Some(publication_raw(
        &c,
        ClusterSnapshot {
            snapshot: Arc::new(good),
            encoded: bytes.into_bytes().into(),
        },
    )));
    let rec = eventually(
        "gateway NACKs the schema-2 snapshot",
        Duration::from_secs(20),
        || match w.record("gw-1") {
            Some(r) if r.nack.as_ref().is_some_and(|(v, _)| *v == c) => Ok(r),
            other => Err(format!("{other:?}")),
        },
    );
    let (_, reason) = rec.nack.clone().unwrap();
    assert!(reason.contains("schema 2 is not supported"), "{reason}");
    assert_eq!(
        rec.applied.as_deref(),
        Some(b.as_str()),
        "the NACK leaves the applied version: {rec:?}"
    );
    let d = dump(&gw);
    assert_eq!(
        d["applied_version"], b,
        "the gateway keeps serving the previous snapshot"
    );
    assert_eq!(gw.admin_get("/readyz").trim(), "ready");
    assert_eq!(server.metric("meshfed_syncer_nacks_total", &[]), 1.0);

    // The next good commit is applied and clears the NACK.
    let d4 = sha(4);
    w.publish(&d4);
    let rec = w.wait_acked("gw-1", &d4);
    assert!(rec.nack.is_none(), "{rec:?}");
    server.stop(&rt);
    eventually(
        "the gateway is marked disconnected",
        Duration::from_secs(10),
        || match w.record("gw-1") {
            Some(r) if !r.connected => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

#[test]
fn hellos_claiming_another_cluster_and_non_gateway_identities_are_refused_and_counted() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    w.publish(&sha(1));
    let east = w.pki.gateway("east", "gw-liar");
    let workload = w.dir.join("creds/workload");
    certs(&[
        "workload",
        "--ca",
        &w.pki.cluster_ca("east").to_string_lossy(),
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--out",
        &workload.to_string_lossy(),
    ]);
    rt.block_on(async {
        let mut c = dial(server.addr, &east).await.unwrap();
        let Err(e) = subscribe(&mut c, hello("west", "gw-liar", "")).await else {
            panic!("the subscription must be refused");
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("claims cluster `west`")
                && e.message().contains("issued for cluster `east`"),
            "{}",
            e.message()
        );

        let mut c = dial(server.addr, &workload).await.unwrap();
        let Err(e) = subscribe(&mut c, hello("east", "gw-2", "")).await else {
            panic!("the subscription must be refused");
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("is not a gateway identity"),
            "{}",
            e.message()
        );

        // The same gateway telling the truth is served.
        let mut c = dial(server.addr, &east).await.unwrap();
        let (_tx, mut stream) = subscribe(&mut c, hello("east", "gw-liar", ""))
            .await
            .unwrap();
        assert_eq!(next_snapshot(&mut stream).await.version, sha(1));
    });
    assert_eq!(
        server.metric(
            "meshfed_syncer_subscriptions_refused_total",
            &["cluster_mismatch"]
        ),
        1.0
    );
    assert_eq!(
        server.metric(
            "meshfed_syncer_subscriptions_refused_total",
            &["not_a_gateway"]
        ),
        1.0
    );
    assert!(
        w.record("gw-2").is_none(),
        "a refused subscriber is not recorded as a gateway"
    );
}

#[test]
fn a_client_certificate_from_a_foreign_ca_fails_the_handshake() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    w.publish(&sha(1));
    let foreign_dir = w.dir.join("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let foreign = Pki::named(&foreign_dir, "someone else's root").gateway("east", "gw-1");
    // The client trusts our syncer (both anchors in its bundle), so the
    // handshake reaches the server's check of the client's chain.
    let ours = std::fs::read_to_string(w.dir.join("ca/root/bundle.pem")).unwrap();
    let theirs = std::fs::read_to_string(foreign.join("bundle.pem")).unwrap();
    std::fs::write(foreign.join("bundle.pem"), format!("{theirs}{ours}")).unwrap();
    let result = rt.block_on(async {
        let mut c = dial(server.addr, &foreign).await?;
        subscribe(&mut c, hello("east", "gw-1", ""))
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    });
    assert!(result.is_err(), "a foreign client must not subscribe");
    eventually(
        "the handshake refusal is counted",
        Duration::from_secs(5),
        || {
            let (ca, failed) = (
                server.refusals.count(RefusalReason::UnknownCa),
                server.metric("meshfed_syncer_tls_handshake_failures_total", &[]),
            );
            if ca >= 1 && failed >= 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "unknown_ca {ca}, handshake failures {failed}, refusals {:?}",
                    server.refusals.snapshot()
                ))
            }
        },
    );
    assert!(w.rollout.gateways().is_empty());
}

#[test]
fn a_gateway_restarted_with_the_syncer_down_serves_its_persisted_snapshot_and_converges_after() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let addr = server.addr;
    let state = w.dir.join("state-gw-1");
    let state_arg = state.to_string_lossy().to_string();
    let a = sha(1);
    w.publish(&a);
    let mut gw = w.gateway("gw-1", addr, &["--state-dir", &state_arg]);
    w.wait_acked("gw-1", &a);
    assert!(
        state.join("snapshot.json").is_file(),
        "persisted before the ACK"
    );

    server.stop(&rt);
    gw.kill();
    let gw = w.gateway("gw-1", addr, &["--state-dir", &state_arg]);
    let d = wait_dump_version(&gw, &a, "state_dir");
    assert_eq!(
        gw.admin_get("/readyz").trim(),
        "ready",
        "ready from the state dir: {}",
        d["config_source"]
    );

    // The syncer comes back on the same address with a newer commit.
    let b = sha(2);
    w.publish(&b);
    let _server = w.server(&rt, addr);
    w.wait_acked("gw-1", &b);
    wait_dump_version(&gw, &b, "syncer");
}

#[test]
fn a_gateway_accepts_config_only_from_the_configured_syncer_id_and_keeps_its_last_good() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let state = w.dir.join("state-gw-1");
    let state_arg = state.to_string_lossy().to_string();
    let a = sha(1);
    w.publish(&a);
    let mut gw = w.gateway("gw-1", server.addr, &["--state-dir", &state_arg]);
    w.wait_acked("gw-1", &a);
    gw.kill();

    // Restarted expecting another syncer: it serves its last good snapshot
    // and refuses this server.
    w.publish(&sha(2));
    let other = "spiffe://cluster.local/meshfed/syncer/other";
    let gw = w.gateway(
        "gw-1",
        server.addr,
        &["--state-dir", &state_arg, "--syncer-id", other],
    );
    wait_dump_version(&gw, &a, "state_dir");
    let d = eventually(
        "the gateway reports refusing the syncer",
        Duration::from_secs(20),
        || {
            let d = dump(&gw);
            let err = d["config_source"]["syncer"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if err.contains("only `spiffe://cluster.local/meshfed/syncer/other` is accepted") {
                Ok(d)
            } else {
                Err(d["config_source"].to_string())
            }
        },
    );
    assert!(
        d["config_source"]["syncer"]["last_error"]
            .as_str()
            .unwrap()
            .contains("spiffe://cluster.local/meshfed/syncer/syncer"),
        "{}",
        d["config_source"]
    );
    assert_eq!(
        d["applied_version"],
        a,
        "it never applied the untrusted syncer's {}",
        sha(2)
    );
    assert_eq!(
        w.record("gw-1").unwrap().applied.as_deref(),
        Some(a.as_str())
    );
    assert_eq!(gw.admin_get("/readyz").trim(), "ready");
}

/// Issue 21, item 7: a syncer certificate with the right SPIFFE ID, minted
/// by another cluster's CA (`certs syncer --ca ca/west`, which whoever holds
/// west's or an edge site's intermediate can do), is refused by a gateway
/// whose `--syncer-issuer` is east; the gateway keeps its last good
/// snapshot, says why, and counts the refusal.
#[test]
fn a_syncer_certificate_minted_by_another_clusters_ca_is_refused_and_the_last_good_kept() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let state = w.dir.join("state-gw-1");
    let state_arg = state.to_string_lossy().to_string();
    let a = sha(1);
    w.publish(&a);
    let mut gw = w.gateway("gw-1", server.addr, &["--state-dir", &state_arg]);
    w.wait_acked("gw-1", &a);
    gw.kill();
    drop(server);

    // The forger: same ID `syncer`, issued by west's intermediate.
    let forged = w.dir.join("creds/syncer-forged-by-west");
    certs(&[
        "syncer",
        "--ca",
        &w.pki.cluster_ca("west").to_string_lossy(),
        "--id",
        "syncer",
        "--out",
        &forged.to_string_lossy(),
    ]);
    let rogue = Server::start(
        &rt,
        &forged,
        "127.0.0.1:0".parse().unwrap(),
        w.rollout.clone(),
        w.publish.subscribe(),
        meshfed_syncer::rollout::DEFAULT_MAX_IDS_PER_IDENTITY,
    );
    w.publish(&sha(2));
    let gw = w.gateway("gw-1", rogue.addr, &["--state-dir", &state_arg]);
    wait_dump_version(&gw, &a, "state_dir");
    let d = eventually(
        "the gateway reports refusing the forged syncer",
        Duration::from_secs(20),
        || {
            let d = dump(&gw);
            let err = d["config_source"]["syncer"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if err.contains("issued by the CA of cluster `west`") {
                Ok(d)
            } else {
                Err(d["config_source"].to_string())
            }
        },
    );
    assert_eq!(
        d["applied_version"],
        a,
        "it never applied the forged syncer's {}",
        sha(2)
    );
    assert!(
        gw.metric("meshfed_handshake_refusals_total", &["wrong_issuer"]) >= 1.0,
        "the refusal is counted as wrong_issuer"
    );
    assert_eq!(
        w.record("gw-1").unwrap().applied.as_deref(),
        Some(a.as_str())
    );
    assert_eq!(gw.admin_get("/readyz").trim(), "ready");
}

#[test]
fn serial_a_hundred_subscribers_all_get_a_publication_and_a_reader_that_stalls_delays_nobody() {
    const N: usize = 100;
    let rt = runtime();
    let w = World::new();
    // The subscribers share one certificate, each with its own id.
    let server = w.server_with(&rt, "127.0.0.1:0".parse().unwrap(), N + 1);
    let creds = w.pki.gateway("east", "load");
    let a = sha(1);
    w.publish(&a);

    let (times, stalled) = rt.block_on(async {
        // One subscriber that reads nothing, ever, and big snapshots (~1 MB)
        // so its HTTP/2 windows fill up.
        let mut c = dial(server.addr, &creds).await.unwrap();
        let stalled = (
            subscribe(&mut c, hello("east", "stalled", ""))
                .await
                .unwrap(),
            c,
        );

        let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let (got_tx, mut got_rx) = mpsc::unbounded_channel::<Instant>();
        let mut tasks = Vec::new();
        for i in 0..N {
            let creds = creds.clone();
            let addr = server.addr;
            let go = go_tx.subscribe();
            let got_last = got_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut go = go;
                let mut c = dial(addr, &creds).await.unwrap();
                let (tx, mut stream) = subscribe(&mut c, hello("east", &format!("gw-{i:03}"), ""))
                    .await
                    .unwrap();
                let first = next_snapshot(&mut stream).await;
                tx.send(ack(&first.version)).await.unwrap();
                let _ = go.recv().await;
                // Every later snapshot, ACKed as it comes; the time of the last.
                let mut versions = Vec::new();
                loop {
                    let s = next_snapshot(&mut stream).await;
                    tx.send(ack(&s.version)).await.unwrap();
                    versions.push(s.version.clone());
                    if s.version == sha(9) {
                        let _ = got_last.send(Instant::now());
                    }
                    if s.version == sha(10) {
                        // The stream stays open until the ACKs are checked.
                        return (versions, (tx, stream, c));
                    }
                }
            }));
        }
        let ready = tokio::time::timeout(patient(Duration::from_secs(60)), async {
            while w
                .rollout
                .gateways()
                .iter()
                .filter(|g| g.applied.as_deref() == Some(a.as_str()))
                .count()
                < N
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "all {N} subscribers get the first snapshot");
        let _ = go_tx.send(());
        let start = Instant::now();
        for n in 2..=9 {
            let c = sha(n);
            w.publish
                .send_replace(Some(publication(&c, snapshot(&c, w.tunnel_port, 20_000))));
        }
        let mut times = Vec::new();
        while times.len() < N {
            let at = tokio::time::timeout(patient(Duration::from_secs(120)), got_rx.recv())
                .await
                .expect("every subscriber gets the newest publication despite the stalled one")
                .unwrap();
            times.push(at.duration_since(start));
        }
        let rollout = w.rollout.clone();
        let all_at = |commit: String| {
            let rollout = rollout.clone();
            async move {
                let within = patient(Duration::from_secs(30));
                tokio::time::timeout(within, async {
                    while rollout
                        .gateways()
                        .iter()
                        .filter(|g| g.applied.as_deref() == Some(commit.as_str()))
                        .count()
                        < N
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("all {N} subscribers ACK {commit} within {within:?}"));
            }
        };
        all_at(sha(9)).await;
        // One small commit to the settled subscribers: commit → all ACKed.
        let published_at = std::time::SystemTime::now();
        let small = Instant::now();
        w.publish.send_replace(Some(publication(
            &sha(10),
            snapshot(&sha(10), w.tunnel_port, 0),
        )));
        all_at(sha(10)).await;
        let all_acked = small.elapsed();
        let mut ack_times: Vec<Duration> = w
            .rollout
            .gateways()
            .iter()
            .filter_map(|g| g.acked_at?.duration_since(published_at).ok())
            .collect();
        ack_times.sort();
        let mut keep = Vec::new();
        for t in tasks {
            let (versions, open) = tokio::time::timeout(patient(Duration::from_secs(30)), t)
                .await
                .expect("every subscriber gets the small commit")
                .unwrap();
            assert_eq!(versions.last(), Some(&sha(10)));
            assert!(versions.contains(&sha(9)), "{versions:?}");
            keep.push(open);
        }
        (times, (stalled, keep, all_acked, ack_times))
    });
    let mut times = times;
    times.sort();
    let (stalled, _keep, all_acked, ack_times) = stalled;
    assert_eq!(
        ack_times.len(),
        N,
        "every subscriber's ACK time is recorded"
    );
    let stalled_rec = w.record("stalled").unwrap();
    assert!(
        stalled_rec.connected && stalled_rec.applied.is_none(),
        "the stalled subscriber is still connected and never ACKed: {stalled_rec:?}"
    );
    let size = snapshot(&sha(9), w.tunnel_port, 20_000).encode().len();
    // Figures for the record (the benchmark harness owns the budgets).
    eprintln!(
        "{N} subscribers + 1 that never reads: a burst of 8 publications of {:.1} MB: the last \
         received by all after p50 {:?}, p99 {:?}, max {:?}; then one small commit: every \
         ACK recorded after p50 {:?}, p99 {:?}, all {:?}; propagation histogram count {}",
        size as f64 / 1e6,
        times[N / 2],
        times[N * 99 / 100],
        times[N - 1],
        ack_times[N / 2],
        ack_times[N * 99 / 100],
        all_acked,
        server.metric("meshfed_syncer_propagation_seconds_count", &[]),
    );
    drop(stalled);
}

/// Issue 21, item 11: rollout records are bound to the certificate that
/// made them. Another gateway certificate of the cluster cannot take over a
/// known gateway's record (connected or dead) and report it applied; a
/// second stream with the same id does not mark the connected gateway
/// disconnected when it ends; and a Hello's `applied_version` is never
/// taken as applied: only an ACK of a snapshot sent on that stream is.
#[test]
fn rollout_records_cannot_be_falsified_by_another_certificate_a_second_stream_or_a_hello() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let a = sha(1);
    w.publish(&a);
    let real = w.pki.gateway("east", "gw-1");
    let evil = w.pki.gateway("east", "gw-evil");
    rt.block_on(async {
        let mut c = dial(server.addr, &real).await.unwrap();
        let (tx, mut stream) = subscribe(&mut c, hello("east", "gw-1", "")).await.unwrap();
        assert_eq!(next_snapshot(&mut stream).await.version, a);
        tx.send(ack(&a)).await.unwrap();
        let mut c2 = dial(server.addr, &real).await.unwrap();
        let (tx2, stream2) = subscribe(&mut c2, hello("east", "gw-1", "")).await.unwrap();
        drop((tx2, stream2, c2));
        // The second stream ended; the first one is still open.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            w.record("gw-1").is_some_and(|r| r.connected),
            "the end of a second stream with the same id disconnected the real gateway: {:?}",
            w.record("gw-1")
        );
        // The real gateway goes away for good.
        drop((tx, stream, c));
    });
    eventually("gw-1 disconnected", Duration::from_secs(10), || {
        match w.record("gw-1") {
            Some(r) if !r.connected => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let b = sha(2);
    w.publish(&b);
    rt.block_on(async {
        // Another certificate claims the dead gateway's id, saying it
        // applied the new commit, and ACKs whatever it gets.
        let mut c = dial(server.addr, &evil).await.unwrap();
        let Err(e) = subscribe(&mut c, hello("east", "gw-1", &b)).await else {
            panic!("another certificate took over gw-1's record");
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("/gateway/gw-1") && e.message().contains("cannot speak for it"),
            "{}",
            e.message()
        );

        // Its own id: a Hello claiming the current commit counts for nothing
        // until the snapshot sent on this stream is ACKed.
        let (tx, mut stream) = subscribe(&mut c, hello("east", "gw-evil", &b))
            .await
            .unwrap();
        let snap = next_snapshot(&mut stream).await;
        assert_eq!(
            snap.version, b,
            "the current snapshot is sent whatever the Hello claims"
        );
        let rec = w.record("gw-evil").unwrap();
        assert!(rec.connected && rec.applied.is_none(), "{rec:?}");
        tx.send(ack(&b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop((tx, stream));
    });
    w.wait_acked("gw-evil", &b);
    let rec = w.record("gw-1").unwrap();
    assert!(
        rec.identity.ends_with("/gateway/gw-1") && rec.applied.as_deref() != Some(b.as_str()),
        "gw-1's record was falsified: {rec:?}"
    );
    assert!(
        server.metric(
            "meshfed_syncer_subscriptions_refused_total",
            &["gateway_id_taken"]
        ) >= 1.0
    );
}

/// Issue 21, item 11: one gateway certificate subscribing with 400
/// phantom gateway ids (the attack used 2,000) leaves at most `--max-gateways-per-identity` (16)
/// records, so it cannot grow the records file or hold every rollout
/// pending with thousands of ids; another certificate's gateway is still
/// served.
#[test]
fn a_flood_of_phantom_gateway_ids_from_one_certificate_is_bounded() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    w.publish(&sha(1));
    let evil = w.pki.gateway("east", "gw-evil");
    let real = w.pki.gateway("east", "gw-1");
    let refused = rt.block_on(async {
        let mut c = dial(server.addr, &evil).await.unwrap();
        let mut refused = 0;
        let mut open = Vec::new();
        for i in 0..400 {
            match subscribe(&mut c, hello("east", &format!("phantom-{i}"), "")).await {
                // Half of them stay open, half hang up at once.
                Ok(s) if i % 2 == 0 => open.push(s),
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    refused += 1;
                }
            }
        }
        let mut c = dial(server.addr, &real).await.unwrap();
        let (_tx, mut stream) = subscribe(&mut c, hello("east", "gw-1", "")).await.unwrap();
        assert_eq!(next_snapshot(&mut stream).await.version, sha(1));
        drop(open);
        refused
    });
    let evil_records = w
        .rollout
        .gateways()
        .iter()
        .filter(|g| g.identity.ends_with("/gateway/gw-evil"))
        .count();
    assert!(
        evil_records <= meshfed_syncer::rollout::DEFAULT_MAX_IDS_PER_IDENTITY,
        "{evil_records} records for one certificate"
    );
    assert!(refused > 0, "16 open streams should have refused the rest");
    assert!(w.record("gw-1").is_some());
    assert!(
        server.metric(
            "meshfed_syncer_subscriptions_refused_total",
            &["too_many_gateway_ids"]
        ) >= 1.0
    );
}

fn goodbye(id: &str) -> pb::GatewayMessage {
    pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Goodbye(pb::Goodbye {
            gateway_id: id.into(),
            reason: "drained".into(),
        })),
    }
}

/// Issue 22, item 9: a goodbye retires only the stream's own record. A
/// gateway naming another gateway's id in its goodbye is refused
/// (`PERMISSION_DENIED`) and the victim stays connected; a second stream
/// of the same id saying goodbye while the first is open retires nothing;
/// the gateway's own goodbye on its last stream retires its record at once
/// (the call ends with OK), and the syncer advertises that it accepts
/// goodbyes in the Subscribe response.
#[test]
fn a_goodbye_retires_only_the_streams_own_record() {
    let rt = runtime();
    let w = World::new();
    let server = w.server(&rt, "127.0.0.1:0".parse().unwrap());
    let a = sha(1);
    w.publish(&a);
    let real = w.pki.gateway("east", "gw-1");
    let evil = w.pki.gateway("east", "gw-evil");
    rt.block_on(async {
        let mut c = dial(server.addr, &real).await.unwrap();
        let (tx1, rx1) = mpsc::channel(4);
        tx1.send(hello("east", "gw-1", "")).await.unwrap();
        let resp = c
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx1))
            .await
            .unwrap();
        assert!(
            pb::accepts_goodbye(resp.metadata()),
            "the syncer does not advertise goodbyes: {:?}",
            resp.metadata()
        );
        let mut stream1 = resp.into_inner();
        assert_eq!(next_snapshot(&mut stream1).await.version, a);
        tx1.send(ack(&a)).await.unwrap();

        // Another certificate, on its own stream, says goodbye for gw-1.
        let mut e = dial(server.addr, &evil).await.unwrap();
        let (etx, mut estream) = subscribe(&mut e, hello("east", "gw-evil", ""))
            .await
            .unwrap();
        assert_eq!(next_snapshot(&mut estream).await.version, a);
        etx.send(goodbye("gw-1")).await.unwrap();
        let end = loop {
            match estream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        let status = end.expect_err("a forged goodbye must end the call with an error");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("only for itself"),
            "{}",
            status.message()
        );

        // The same certificate's second stream of gw-1 says goodbye while the
        // first stream is open: the record stays with the first.
        let mut c2 = dial(server.addr, &real).await.unwrap();
        let (tx2, mut stream2) = subscribe(&mut c2, hello("east", "gw-1", "")).await.unwrap();
        assert_eq!(next_snapshot(&mut stream2).await.version, a);
        tx2.send(goodbye("gw-1")).await.unwrap();
        drop(tx2);
        while let Ok(Some(_)) = stream2.message().await {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rec = w.record("gw-1").unwrap();
        assert!(
            rec.connected && rec.left.is_none(),
            "a goodbye on a second stream retired the record the first stream holds: {rec:?}"
        );
        let rec = w.record("gw-evil").unwrap();
        assert!(
            rec.left.is_none(),
            "the refused goodbye retired its sender: {rec:?}"
        );

        // gw-1's own goodbye on its last stream: retired, call ended with OK.
        tx1.send(goodbye("gw-1")).await.unwrap();
        drop(tx1);
        let end = loop {
            match stream1.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(end, Ok(None)),
            "the goodbye's call ends with OK: {end:?}"
        );
    });
    let rec = w.record("gw-1").unwrap();
    assert!(
        !rec.connected && rec.left.as_ref().is_some_and(|d| d.reason == "drained"),
        "{rec:?}"
    );
    assert_eq!(server.metric("meshfed_syncer_goodbyes_total", &[]), 1.0);
    assert!(
        server.metric(
            "meshfed_syncer_subscriptions_refused_total",
            &["goodbye_not_own"]
        ) >= 1.0
    );
    server.stop(&rt);
}

/// Issue 22, item 9, compatibility: a real gateway that drains says goodbye
/// to a syncer that accepts one (its record is retired at once), and sends
/// none to a syncer that does not say so (one from before goodbyes, which
/// would end the call on the unknown message): that record is only
/// disconnected, and counts as pending for the known window as before.
#[test]
fn a_draining_gateway_says_goodbye_only_to_a_syncer_that_accepts_one() {
    let rt = runtime();
    for advertise in [true, false] {
        let w = World::new();
        let server = Server::start_advertising(
            &rt,
            &w.syncer_creds,
            "127.0.0.1:0".parse().unwrap(),
            w.rollout.clone(),
            w.publish.subscribe(),
            meshfed_syncer::rollout::DEFAULT_MAX_IDS_PER_IDENTITY,
            advertise,
        );
        let a = sha(1);
        w.publish(&a);
        let mut gw = w.gateway("gw-1", server.addr, &[]);
        w.wait_acked("gw-1", &a);
        assert_eq!(gw.terminate(), Some(0), "{}", gw.log_tail());
        let rec = eventually("gw-1 disconnected", Duration::from_secs(10), || {
            match w.record("gw-1") {
                Some(r) if !r.connected => Ok(r),
                other => Err(format!("{other:?}")),
            }
        });
        if advertise {
            assert!(rec.left.is_some(), "no goodbye recorded: {rec:?}");
            assert_eq!(server.metric("meshfed_syncer_goodbyes_total", &[]), 1.0);
        } else {
            assert!(
                rec.left.is_none(),
                "a goodbye was sent to a syncer that does not accept one: {rec:?}"
            );
            assert_eq!(server.metric("meshfed_syncer_goodbyes_total", &[]), 0.0);
            assert!(
                gw.log_tail().contains("does not accept goodbyes"),
                "{}",
                gw.log_tail()
            );
        }
        assert_eq!(
            server.metric("meshfed_syncer_subscriptions_refused_total", &[]),
            0.0,
            "advertise={advertise}"
        );
        server.stop(&rt);
    }
}
