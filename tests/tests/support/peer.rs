//! A test double of a peer gateway: a bare quinn client with credentials
//! and ALPN of the test's choosing, speaking the library's own framing (or
//! raw bytes). It plays the peers that real gateways never are: forged or
//! stale certificates, other protocol versions, hostile headers.
//!
//! Shared by `security.rs`, `version_skew.rs` and `lossy.rs` (`#[path]`
//! module); each uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshfed_gateway::wire::frame::{self, Frame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A chain (leaf first) and its key.
pub struct Creds {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub bundle: std::path::PathBuf,
}

/// Credentials as `meshfed-gateway certs gateway` wrote them in `dir`.
pub fn creds_from_dir(dir: &Path) -> Creds {
    Creds {
        chain: CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect(),
        key: PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap(),
        bundle: dir.join("bundle.pem"),
    }
}

/// A gateway certificate for `cluster` issued by the CA in `ca_dir` (as
/// `Pki::cluster_ca` made it) with the validity given, forged with rcgen
/// because `meshfed-gateway certs` issues only valid ones.
pub fn forged(
    ca_dir: &Path,
    cluster: &str,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> Creds {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![format!("{cluster}.cluster.meshfed.internal")]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("spiffe://cluster.local/meshfed/cluster/{cluster}/gateway/forged")
            .try_into()
            .unwrap(),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let mut chain = vec![cert.der().clone()];
    chain
        .extend(CertificateDer::pem_slice_iter(ca_pem.as_bytes()).map(|c| c.unwrap().into_owned()));
    Creds {
        chain,
        key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        bundle: ca_dir.join("bundle.pem"),
    }
}

/// A quinn client endpoint presenting `creds`, offering `alpn`; with
/// `resumption`, rustls keeps session tickets and may send early data.
pub fn client(creds: Creds, alpn: &[&[u8]], resumption: bool) -> quinn::Endpoint {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&creds.bundle).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(creds.chain, creds.key)
        .unwrap();
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    if resumption {
        tls.enable_early_data = true;
    } else {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// Connects to a gateway of `cluster` at `addr`; the handshake's outcome.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    cluster: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let connecting = endpoint
        .connect(addr, &format!("{cluster}.cluster.meshfed.internal"))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("handshake timed out")
}

/// An HTTP GET OPEN for `service` (a canonical host).
pub fn get_open(service: &str, authority: &str) -> Frame {
    Frame::Open(Box::new(frame::Open {
        kind: frame::StreamKind::Http,
        service: service.into(),
        port: 80,
        subset: None,
        subset_labels: vec![],
        caller: None,
        source_version: None,
        sni: None,
        http: Some(frame::RequestHead {
            method: http::Method::GET,
            scheme: "http".into(),
            authority: authority.into(),
            path: "/".into(),
            headers: http::HeaderMap::new(),
        }),
    }))
}

/// Writes `bytes` on a new stream, finishes it, and returns the first
/// frame the gateway answers.
pub async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Frame {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let mut buf = BytesMut::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(f) = frame::decode(&mut buf).unwrap() {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = recv.read(&mut chunk).await.unwrap().expect("stream ended");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no answer")
}

/// The encoding of `f`.
pub fn encode(f: &Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame::encode(f, &mut out).unwrap();
    out.to_vec()
}
