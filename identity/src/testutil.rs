//! Test fixtures for the identity module: a CA hierarchy made in memory,
//! rogue peers that present whatever chain a test forges, an in-memory
//! rustls handshake, and a temporary directory.
//!
//! Built for this crate's tests, and for other crates' tests with the
//! `testutil` feature; never in a binary. A fixture that cannot be made
//! panics, as a test should.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, DigitallySignedStruct, DistinguishedName,
};
use rustls::{ServerConfig, ServerConnection, SignatureScheme};

use super::certs::{self, IssuedCert, Issuer, Validity};
use super::spiffe::SpiffeId;
use super::store::Credentials;

pub const TD: &str = "cluster.local";

/// An anchor with the intermediates of clusters east and west.
#[derive(Debug)]
pub struct Federation {
    pub anchor: IssuedCert,
    pub east: Issuer,
    pub west: Issuer,
}

impl Federation {
    pub fn new(name: &str) -> Self {
        super::install_crypto_provider();
        let anchor = certs::new_anchor(name, Validity::days(30)).unwrap();
        let root = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem).unwrap();
        let intermediate = |cluster: &str| {
            let cert = certs::new_intermediate(&root, cluster, TD, Validity::days(20)).unwrap();
            Issuer::from_pem(&cert.cert_pem, &cert.key_pem).unwrap()
        };
        Federation {
            east: intermediate("east"),
            west: intermediate("west"),
            anchor,
        }
    }

    pub fn bundle(&self) -> &str {
        &self.anchor.cert_pem
    }

    pub fn gateway(&self, cluster: &str, id: &str) -> IssuedCert {
        let issuer = if cluster == "east" {
            &self.east
        } else {
            &self.west
        };
        let id = SpiffeId::gateway(TD, cluster, id).unwrap();
        certs::issue_leaf(issuer, &id, &[], Validity::days(10)).unwrap()
    }

    pub fn gateway_creds(&self, cluster: &str, id: &str) -> Credentials {
        creds(self.bundle(), &self.gateway(cluster, id))
    }
}

pub fn creds(bundle: &str, leaf: &IssuedCert) -> Credentials {
    Credentials::from_pem(
        bundle.as_bytes(),
        leaf.chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
    )
    .unwrap()
}

/// A validity window relative to now.
pub fn window(from_days: i64, to_days: i64) -> Validity {
    let at = |days: i64| {
        let d = Duration::from_secs(days.unsigned_abs() * 86_400);
        if days < 0 {
            SystemTime::now() - d
        } else {
            SystemTime::now() + d
        }
    };
    Validity::between(at(from_days), at(to_days))
}

fn parse(chain_pem: &str, key_pem: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (
        chain,
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
    )
}

/// A client that presents `chain_pem` as is and accepts any server.
pub fn rogue_client(chain_pem: &str, key_pem: &str) -> Arc<ClientConfig> {
    let (chain, key) = parse(chain_pem, key_pem);
    Arc::new(
        ClientConfig::builder_with_provider(super::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A server that presents `chain_pem` as is and accepts any client.
pub fn rogue_server(chain_pem: &str, key_pem: &str) -> Arc<ServerConfig> {
    let (chain, key) = parse(chain_pem, key_pem);
    Arc::new(
        ServerConfig::builder_with_provider(super::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(AcceptAnything))
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// What an in-memory handshake ended with, on each side.
#[derive(Debug)]
pub struct Handshake {
    pub client_error: Option<rustls::Error>,
    pub server_error: Option<rustls::Error>,
    /// The chain the client received from the server.
    pub client_saw: Option<Vec<CertificateDer<'static>>>,
    /// The chain the server received from the client.
    pub server_saw: Option<Vec<CertificateDer<'static>>>,
}

impl Handshake {
    pub fn succeeded(&self) -> bool {
        self.client_error.is_none() && self.server_error.is_none()
    }
}

/// Drives a client and a server against each other in memory.
pub fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> Handshake {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut client = Connection::Client(ClientConnection::new(client, name).unwrap());
    let mut server = Connection::Server(ServerConnection::new(server).unwrap());
    let (mut client_error, mut server_error) = (None, None);
    for _ in 0..32 {
        let sent = transfer(&mut client, &mut server, &mut server_error);
        let answered = transfer(&mut server, &mut client, &mut client_error);
        if !sent && !answered {
            break;
        }
    }
    let handshaken = |c: &Connection, e: &Option<rustls::Error>| e.is_none() && !c.is_handshaking();
    if !handshaken(&client, &client_error) && client_error.is_none() {
        client_error = Some(rustls::Error::General("handshake did not finish".into()));
    }
    if !handshaken(&server, &server_error) && server_error.is_none() {
        server_error = Some(rustls::Error::General("handshake did not finish".into()));
    }
    let saw = |c: &Connection| {
        c.peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
    };
    Handshake {
        client_saw: saw(&client),
        server_saw: saw(&server),
        client_error,
        server_error,
    }
}

fn transfer(
    from: &mut Connection,
    to: &mut Connection,
    to_error: &mut Option<rustls::Error>,
) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        match from.write_tls(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if buf.is_empty() {
        return false;
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        match to.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Err(e) = to.process_new_packets() {
        to_error.get_or_insert(e);
    }
    true
}

/// Accepts any peer: the rogue side of a test never refuses, so that only
/// the honest side's verdict is observed.
#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAnything {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "meshfed-identity-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
