//! TLS to endpoints, from a DestinationRule's `tls` (Istio's
//! `ClientTLSSettings`).
//!
//! | mode | the gateway presents | the endpoint's certificate must |
//! |---|---|---|
//! | `DISABLE` | plaintext | — |
//! | `SIMPLE` | nothing | chain to `caCertificates` (a PEM file on the gateway host), else to the mesh's trust anchors |
//! | `MUTUAL` | `clientCertificate` + `privateKey` (files) | as `SIMPLE` |
//! | `ISTIO_MUTUAL` | the gateway's own mesh certificate (reloaded with it) | pass the mesh's trust rules (chain to the anchors through a cluster intermediate) |
//!
//! The name checked: with `subjectAltNames`, one of them must be among the
//! certificate's DNS or URI SANs (for the mesh anchors, its SPIFFE ID);
//! without them, a `caCertificates` chain is checked against the server
//! name (`sni`, else the service host), as any HTTPS client does, and a
//! mesh chain is accepted for any identity in the mesh (Istio's
//! ISTIO_MUTUAL without `subjectAltNames`). `insecureSkipVerify` skips the
//! chain and name checks, never the handshake signatures. Istio's `SIMPLE`
//! without `caCertificates` would use the system roots; a gateway reaching
//! its own cluster's endpoints has no reason to trust the web PKI, so the
//! mesh anchors stand in.
//!
//! ALPN offers `h2` for HTTP/2 (gRPC) connections and `http/1.1` otherwise.
//!
//! Configurations are built off the runtime thread (`spawn_blocking`: they
//! read files), once per distinct `tls` setting and service: for every
//! setting of a snapshot before it is applied ([`TlsCache::prepare`]), and
//! again when the gateway's credentials reload (which is also when changed
//! `caCertificates`/`clientCertificate` files are read again). A request
//! only looks its configuration up. A setting that cannot be built (a file
//! missing or unreadable) is remembered as failed: its requests fail at once
//! with the error naming the file, and it is tried again at the next
//! snapshot, at a credential reload, or, on use, every [`RETRY_FAILED`]
//! (so a file put in place later is found). A setting the table lacks (a
//! request still on an older snapshot) is built on first use, also off the
//! runtime thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshfed_policy::Snapshot;
use meshfed_policy::snapshot::{EndpointTls, EndpointTlsMode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::time::Instant;

use crate::identity::store::Credentials;
use crate::identity::verify::{PeerRole, TrustBundle};

/// Why TLS to an endpoint cannot be set up. Each names the setting and
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read DestinationRule tls.{field} `{path}` for {service}: {source}; the file must exist on the gateway host"
    )]
    Read {
        field: &'static str,
        path: String,
        service: String,
        source: std::io::Error,
    },
    #[error("DestinationRule tls.{field} `{path}` for {service} is not usable: {problem}")]
    Invalid {
        field: &'static str,
        path: String,
        service: String,
        problem: String,
    },
    #[error(
        "DestinationRule tls for {service} is MUTUAL but has no {missing}; set clientCertificate and privateKey, or use ISTIO_MUTUAL for the mesh certificate"
    )]
    MutualWithoutCert {
        service: String,
        missing: &'static str,
    },
    #[error("the TLS server name `{name}` for {service} is not valid; set tls.sni to a DNS name")]
    ServerName { name: String, service: String },
    #[error("ISTIO_MUTUAL to {service}: the gateway has no mesh credentials loaded yet")]
    NoCredentials { service: String },
    #[error("cannot build the TLS configuration for {service}: {source}")]
    Rustls {
        service: String,
        source: rustls::Error,
    },
    /// A failure remembered from an earlier build (not retried per request).
    #[error(
        "{0} (the gateway tries again at the next snapshot, at a certificate reload, and every {secs} s while requests need it)",
        secs = RETRY_FAILED.as_secs()
    )]
    Remembered(Arc<TlsError>),
    #[error("building the TLS configuration for {service} failed: {reason}")]
    Task { service: String, reason: String },
}

/// How often a remembered failure is tried again while requests need it.
pub const RETRY_FAILED: Duration = Duration::from_secs(5);

/// What a connection to an endpoint needs for TLS.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// Distinguishes pools: connections made with different settings are
    /// never shared.
    pub id: u64,
    pub h1: Arc<ClientConfig>,
    pub h2: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TlsSetup {
    /// Connects TLS over `tcp`.
    pub async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
        h2: bool,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = if h2 { &self.h2 } else { &self.h1 };
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake with {addr}: {e}")))
    }
}

/// Built configurations and remembered failures, by service and setting;
/// see the module docs.
#[derive(Debug, Default)]
pub struct TlsCache {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// What requests read.
    table: ArcSwap<Table>,
    /// What rebuilds build from; held only to read or replace it.
    inputs: Mutex<Inputs>,
    /// Held across a rebuild (on a blocking thread, never the runtime's),
    /// so that the last rebuild to run sees the latest inputs.
    building: Mutex<()>,
    next_id: AtomicU64,
}

#[derive(Debug, Default, Clone)]
struct Inputs {
    creds: Option<Arc<Credentials>>,
    /// Every setting of the applied snapshot, with its service.
    wanted: Arc<Vec<(EndpointTls, String)>>,
}

type Table = HashMap<String, Vec<(EndpointTls, Entry)>>;

#[derive(Debug, Clone)]
enum Entry {
    Ready(TlsSetup),
    Failed {
        error: Arc<TlsError>,
        at: Instant,
        /// Whether a retry is running.
        retrying: Arc<AtomicBool>,
    },
}

impl TlsCache {
    /// Sets (or replaces) the gateway's own credentials, and rebuilds every
    /// configuration off the runtime thread; until that is done, requests
    /// use the previous ones.
    pub fn set_identity(&self, creds: Arc<Credentials>) {
        if let Ok(mut i) = self.shared.inputs.lock() {
            i.creds = Some(creds);
        }
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || shared.rebuild(false))),
            Err(_) => shared.rebuild(false),
        }
    }

    /// Records the settings of `snapshot` without building them (at start,
    /// before credentials are loaded; [`TlsCache::set_identity`] builds).
    pub fn want(&self, snapshot: &Snapshot) {
        if let Ok(mut i) = self.shared.inputs.lock() {
            i.wanted = Arc::new(wanted(snapshot));
        }
    }

    /// Builds every setting of `snapshot` on a blocking thread, before it
    /// is applied: settings built before are kept (their connections stay
    /// pooled); remembered failures are tried again.
    pub async fn prepare(&self, snapshot: Arc<Snapshot>) {
        let shared = self.shared.clone();
        let task = move || {
            let settings = Arc::new(wanted(&snapshot));
            if let Ok(mut i) = shared.inputs.lock() {
                i.wanted = settings;
            }
            shared.rebuild(true)
        };
        if let Err(e) = tokio::task::spawn_blocking(task).await {
            tracing::error!(error = %e, "building endpoint TLS configurations failed");
        }
    }

    /// The setup for `tls` to endpoints of `service`; `None` for plaintext.
    /// A lookup, except for a setting the table lacks, which is built on a
    /// blocking thread.
    pub async fn setup(
        &self,
        tls: &EndpointTls,
        service: &str,
    ) -> Result<Option<TlsSetup>, TlsError> {
        if tls.mode == EndpointTlsMode::Disable {
            return Ok(None);
        }
        match self.lookup(tls, service) {
            Some(Entry::Ready(s)) => Ok(Some(s)),
            Some(Entry::Failed {
                error,
                at,
                retrying,
            }) => {
                if at.elapsed() >= RETRY_FAILED && !retrying.swap(true, Ordering::AcqRel) {
                    let (shared, tls, service) =
                        (self.shared.clone(), tls.clone(), service.to_string());
                    tokio::task::spawn_blocking(move || {
                        shared.build_one(&tls, &service);
                    });
                }
                Err(TlsError::Remembered(error))
            }
            None => Box::pin(self.build_missing(tls, service)).await,
        }
    }

    fn lookup(&self, tls: &EndpointTls, service: &str) -> Option<Entry> {
        let table = self.shared.table.load();
        table
            .get(service)?
            .iter()
            .find(|(t, _)| t == tls)
            .map(|(_, e)| e.clone())
    }

    async fn build_missing(
        &self,
        tls: &EndpointTls,
        service: &str,
    ) -> Result<Option<TlsSetup>, TlsError> {
        let (shared, t, svc) = (self.shared.clone(), tls.clone(), service.to_string());
        let built = tokio::task::spawn_blocking(move || shared.build_one(&t, &svc))
            .await
            .map_err(|e| TlsError::Task {
                service: service.to_string(),
                reason: e.to_string(),
            })?;
        match built {
            Entry::Ready(s) => Ok(Some(s)),
            Entry::Failed { error, .. } => Err(TlsError::Remembered(error)),
        }
    }
}

impl Shared {
    fn inputs(&self) -> Inputs {
        self.inputs
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn entry(&self, tls: &EndpointTls, service: &str, creds: Option<&Credentials>) -> Entry {
        match build(tls, service, creds) {
            Ok((h1, h2, server_name)) => Entry::Ready(TlsSetup {
                id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                h1,
                h2,
                server_name,
            }),
            Err(e) => {
                tracing::warn!(%service, error = %e, "TLS to endpoints cannot be set up; requests fail until it is fixed");
                Entry::Failed {
                    error: Arc::new(e),
                    at: Instant::now(),
                    retrying: Arc::default(),
                }
            }
        }
    }

    /// Builds the table for the wanted settings. With `keep`, settings
    /// already built are kept as they are; without, everything is built
    /// again (the credentials changed). Blocks: reads files.
    fn rebuild(&self, keep: bool) {
        let _one_at_a_time = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let inputs = self.inputs();
        let old = self.table.load_full();
        let mut table = Table::new();
        for (tls, service) in inputs.wanted.iter() {
            let kept = keep
                .then(|| old.get(service))
                .flatten()
                .and_then(|l| l.iter().find(|(t, _)| t == tls))
                .and_then(|(_, e)| matches!(e, Entry::Ready(_)).then(|| e.clone()));
            let e = kept.unwrap_or_else(|| self.entry(tls, service, inputs.creds.as_deref()));
            table
                .entry(service.clone())
                .or_default()
                .push((tls.clone(), e));
        }
        self.table.store(Arc::new(table));
    }

    /// Builds one setting and puts it in the table. Blocks: reads files.
    fn build_one(&self, tls: &EndpointTls, service: &str) -> Entry {
        let creds = self.inputs().creds;
        let e = self.entry(tls, service, creds.as_deref());
        self.table.rcu(|t| {
            let mut t = Table::clone(t);
            // Bounded by the policy's distinct settings; a bound anyway.
            if t.values().map(Vec::len).sum::<usize>() >= 1024 {
                t.clear();
            }
            let list = t.entry(service.to_string()).or_default();
            list.retain(|(have, _)| have != tls);
            list.push((tls.clone(), e.clone()));
            t
        });
        e
    }
}

/// Every endpoint TLS setting in `snapshot` but DISABLE, with its service:
/// each DestinationRule's, its subsets' and their ports'.
fn wanted(snapshot: &Snapshot) -> Vec<(EndpointTls, String)> {
    let mut out = Vec::new();
    for (service, d) in &snapshot.policy.destinations {
        // Distinct per service (a service has a handful).
        let mut mine: Vec<&EndpointTls> = Vec::new();
        let policies =
            std::iter::once(&d.traffic_policy).chain(d.subsets.values().map(|s| &s.traffic_policy));
        for tp in policies {
            let settings = tp
                .tls
                .iter()
                .chain(tp.ports.values().filter_map(|p| p.tls.as_ref()));
            for t in settings {
                if t.mode != EndpointTlsMode::Disable && !mine.contains(&t) {
                    mine.push(t);
                }
            }
        }
        out.extend(mine.into_iter().map(|t| (t.clone(), service.clone())));
    }
    out
}

type Built = (Arc<ClientConfig>, Arc<ClientConfig>, ServerName<'static>);

fn build(tls: &EndpointTls, service: &str, creds: Option<&Credentials>) -> Result<Built, TlsError> {
    let provider = crate::identity::crypto_provider();
    let name = tls.sni.clone().unwrap_or_else(|| service.to_string());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName {
        name,
        service: service.to_string(),
    })?;
    let svc = || service.to_string();
    let read = |field: &'static str, path: &str| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            field,
            path: path.to_string(),
            service: svc(),
            source,
        })
    };
    let invalid = |field: &'static str, path: &str, problem: String| TlsError::Invalid {
        field,
        path: path.to_string(),
        service: svc(),
        problem,
    };
    // Whom to trust.
    let roots = match (&tls.ca_certificates, tls.mode) {
        (Some(path), m) if m != EndpointTlsMode::IstioMutual => {
            let pem = read("caCertificates", path)?;
            let mut store = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| invalid("caCertificates", path, e.to_string()))?;
                store
                    .add(c)
                    .map_err(|e| invalid("caCertificates", path, e.to_string()))?;
            }
            if store.is_empty() {
                return Err(invalid(
                    "caCertificates",
                    path,
                    "it holds no PEM certificate".into(),
                ));
            }
            let store = Arc::new(store);
            let webpki =
                WebPkiServerVerifier::builder_with_provider(store.clone(), provider.clone())
                    .build()
                    .map_err(|e| invalid("caCertificates", path, e.to_string()))?;
            Roots::Custom { webpki, store }
        }
        _ => match creds {
            Some(c) => Roots::Mesh(c.trust_bundle()),
            None => {
                return Err(TlsError::NoCredentials { service: svc() });
            }
        },
    };
    let verifier = Arc::new(EndpointVerifier {
        roots,
        sans: tls.subject_alt_names.clone(),
        skip: tls.insecure_skip_verify,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            service: svc(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match tls.mode {
        EndpointTlsMode::Disable | EndpointTlsMode::Simple => builder.with_no_client_auth(),
        EndpointTlsMode::Mutual => {
            let cert_path =
                tls.client_certificate
                    .as_deref()
                    .ok_or_else(|| TlsError::MutualWithoutCert {
                        service: svc(),
                        missing: "clientCertificate",
                    })?;
            let key_path =
                tls.private_key
                    .as_deref()
                    .ok_or_else(|| TlsError::MutualWithoutCert {
                        service: svc(),
                        missing: "privateKey",
                    })?;
            let pem = read("clientCertificate", cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("clientCertificate", cert_path, e.to_string()))?;
            if chain.is_empty() {
                return Err(invalid(
                    "clientCertificate",
                    cert_path,
                    "it holds no PEM certificate".into(),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(&read("privateKey", key_path)?)
                .map_err(|e| invalid("privateKey", key_path, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("privateKey", key_path, e.to_string()))?
        }
        EndpointTlsMode::IstioMutual => {
            let c = creds.ok_or_else(|| TlsError::NoCredentials { service: svc() })?;
            builder
                .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
                .map_err(|source| TlsError::Rustls {
                    service: svc(),
                    source,
                })?
        }
    };
    let mut h1 = config.clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut h2 = config;
    h2.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(h1), Arc::new(h2), server_name))
}

#[derive(Debug)]
enum Roots {
    /// The mesh's anchors and trust rules.
    Mesh(Arc<TrustBundle>),
    /// `caCertificates`, with standard WebPKI checks.
    Custom {
        webpki: Arc<WebPkiServerVerifier>,
        store: Arc<RootCertStore>,
    },
}

/// The endpoint verifier: the chain per [`Roots`], then the name per the
/// module docs.
#[derive(Debug)]
struct EndpointVerifier {
    roots: Roots,
    sans: Vec<String>,
    skip: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EndpointVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.skip {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.roots {
            Roots::Mesh(bundle) => {
                let peer = bundle
                    .verify(end_entity, intermediates, now, PeerRole::Server)
                    .map_err(|e| {
                        rustls::Error::General(format!(
                            "the endpoint's certificate fails the mesh trust rules: {e}"
                        ))
                    })?;
                if self.sans.is_empty() || self.sans.contains(&peer.id.to_string()) {
                    return Ok(ServerCertVerified::assertion());
                }
                Err(rustls::Error::General(format!(
                    "the endpoint is {}, not one of tls.subjectAltNames {:?}",
                    peer.id, self.sans
                )))
            }
            Roots::Custom { webpki, store } => {
                if self.sans.is_empty() {
                    return webpki.verify_server_cert(
                        end_entity,
                        intermediates,
                        server_name,
                        ocsp,
                        now,
                    );
                }
                // The chain here; the names against the SANs below.
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &rustls::server::ParsedCertificate::try_from(end_entity)?,
                    store,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )?;
                let have = sans_of(end_entity);
                if self.sans.iter().any(|want| have.contains(want)) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "the endpoint's certificate names {have:?}, none of tls.subjectAltNames {:?}",
                        self.sans
                    )))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The DNS and URI SANs of a certificate.
fn sans_of(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_string()),
            GeneralName::URI(u) => Some((*u).to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use meshfed_policy::snapshot::{ClusterPolicy, DestinationPolicy, TrafficPolicy};

    use super::*;

    const SERVICE: &str = "ratings.default.svc.cluster.local";

    /// A snapshot whose only DestinationRule says `tls` for [`SERVICE`].
    fn snapshot(tls: &EndpointTls) -> Arc<Snapshot> {
        let mut policy = ClusterPolicy::default();
        policy.destinations.insert(
            SERVICE.into(),
            DestinationPolicy {
                traffic_policy: TrafficPolicy {
                    tls: Some(tls.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        Arc::new(Snapshot::new("v1", policy))
    }

    fn simple(ca: &std::path::Path) -> EndpointTls {
        EndpointTls {
            mode: EndpointTlsMode::Simple,
            ca_certificates: Some(ca.display().to_string()),
            ..Default::default()
        }
    }

    fn write_ca(path: &std::path::Path) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(path, params.self_signed(&key).unwrap().pem()).unwrap();
    }

    /// Waits (in real time: the build runs on a blocking thread) until
    /// `cache` has built `tls`.
    async fn until_built(cache: &TlsCache, tls: &EndpointTls) {
        for _ in 0..500 {
            if let Some(Entry::Ready(_)) = cache.lookup(tls, SERVICE) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
            tokio::task::yield_now().await;
        }
        panic!("the retry never built the configuration");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_ca_file_fails_fast_naming_it_and_is_not_read_again_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let tls = simple(&ca);
        let cache = TlsCache::default();
        cache.prepare(snapshot(&tls)).await;
        let e = cache.setup(&tls, SERVICE).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("caCertificates") && text.contains(&ca.display().to_string()),
            "{text}"
        );
        // The file appears: requests still get the remembered failure, so
        // they did not read it again.
        write_ca(&ca);
        for _ in 0..3 {
            assert!(matches!(
                cache.setup(&tls, SERVICE).await,
                Err(TlsError::Remembered(_))
            ));
        }
        // After RETRY_FAILED, a request starts one retry off the runtime
        // thread (and still fails at once); the next ones find it built.
        tokio::time::advance(RETRY_FAILED).await;
        assert!(cache.setup(&tls, SERVICE).await.is_err());
        until_built(&cache, &tls).await;
        assert!(cache.setup(&tls, SERVICE).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_new_snapshot_retries_a_failed_setting_and_keeps_built_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, good_ca) = (dir.path().join("late.pem"), dir.path().join("good.pem"));
        write_ca(&good_ca);
        let (late, good) = (simple(&ca), simple(&good_ca));
        let mut snap = (*snapshot(&late)).clone();
        snap.policy.destinations.insert(
            "other.default.svc.cluster.local".into(),
            DestinationPolicy {
                traffic_policy: TrafficPolicy {
                    tls: Some(good.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let snap = Arc::new(snap);
        let cache = TlsCache::default();
        cache.prepare(snap.clone()).await;
        assert!(cache.setup(&late, SERVICE).await.is_err());
        let other = "other.default.svc.cluster.local";
        let before = cache.setup(&good, other).await.unwrap().unwrap().id;
        write_ca(&ca);
        cache.prepare(snap).await;
        assert!(cache.setup(&late, SERVICE).await.unwrap().is_some());
        // Built once: the same configuration (and so the same pooled
        // connections) after the new snapshot.
        assert_eq!(cache.setup(&good, other).await.unwrap().unwrap().id, before);
    }

    #[tokio::test]
    async fn a_setting_the_snapshot_did_not_name_is_built_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        write_ca(&ca);
        let cache = TlsCache::default();
        assert!(cache.setup(&simple(&ca), SERVICE).await.unwrap().is_some());
        let plain = EndpointTls::default();
        assert!(cache.setup(&plain, SERVICE).await.unwrap().is_none());
    }
}
