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
//! Configurations are built once per distinct `tls` setting and service,
//! and rebuilt when the gateway's credentials reload (which is also when
//! changed `caCertificates`/`clientCertificate` files are read again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshfed_policy::snapshot::{EndpointTls, EndpointTlsMode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

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
}

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

/// Built configurations, by setting and service.
#[derive(Debug, Default)]
pub struct TlsCache {
    entries: Mutex<Vec<(EndpointTls, String, TlsSetup)>>,
    creds: Mutex<Option<Arc<Credentials>>>,
    next_id: AtomicU64,
}

impl TlsCache {
    /// Sets (or replaces) the gateway's own credentials; configurations are
    /// rebuilt on next use.
    pub fn set_identity(&self, creds: Arc<Credentials>) {
        if let Ok(mut c) = self.creds.lock() {
            *c = Some(creds);
        }
        if let Ok(mut e) = self.entries.lock() {
            e.clear();
        }
    }

    /// The setup for `tls` to endpoints of `service`; `None` for plaintext.
    pub fn setup(&self, tls: &EndpointTls, service: &str) -> Result<Option<TlsSetup>, TlsError> {
        if tls.mode == EndpointTlsMode::Disable {
            return Ok(None);
        }
        if let Ok(entries) = self.entries.lock()
            && let Some((_, _, s)) = entries
                .iter()
                .find(|(t, svc, _)| t == tls && svc == service)
        {
            return Ok(Some(s.clone()));
        }
        let creds = self.creds.lock().ok().and_then(|c| c.clone());
        let (h1, h2, server_name) = build(tls, service, creds.as_deref())?;
        let setup = TlsSetup {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            h1,
            h2,
            server_name,
        };
        if let Ok(mut entries) = self.entries.lock() {
            // Bounded by the policy's distinct settings; a bound anyway.
            if entries.len() >= 1024 {
                entries.clear();
            }
            entries.push((tls.clone(), service.to_string(), setup.clone()));
        }
        Ok(Some(setup))
    }
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
