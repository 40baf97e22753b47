//! Credentials on disk, the rustls configurations built from them, and hot
//! reload.
//!
//! A credentials directory holds the files a Kubernetes Secret volume would
//! mount (see docs/identity.md):
//! - `bundle.pem`: the trust anchors, one or more (several during rotation);
//! - `cert.pem`: our leaf followed by our cluster's intermediate;
//! - `key.pem`: the leaf's private key (PKCS#8, SEC1 or PKCS#1 PEM).
//!
//! Loading checks everything a peer would check, and more: the key matches
//! the leaf, and the chain passes our own trust rules against our own bundle
//! (so a gateway refuses to start with credentials its peers would refuse).
//!
//! [`watch`] re-reads the files through their paths (every interval, or
//! with [`watch_on`] when a change watcher says so), so the atomic `..data`
//! symlink swap of a Secret volume is seen, and publishes a new
//! [`Credentials`] only when the contents changed and are valid. Existing
//! connections keep the credentials they were made with; callers build new
//! configurations for new handshakes.
//!
//! This module does not issue certificates ([`super::certs`]) nor decide
//! whom to trust ([`super::verify`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::certs::{CertInfo, certs_from_pem};
use super::spiffe::SpiffeId;
use super::verify::{
    AcceptClients, HandshakeRefusals, IdentityError, MeshClientVerifier, MeshServerVerifier,
    PeerIdentity, PeerRole, TrustBundle,
};

/// The trust anchors.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Our leaf followed by our intermediate.
pub const CERT_FILE: &str = "cert.pem";
/// Our leaf's private key.
pub const KEY_FILE: &str = "key.pem";

/// Why credentials cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}; hint: {hint}")]
    Read {
        /// The file.
        path: String,
        /// The OS's reason.
        source: std::io::Error,
        /// What to try.
        hint: &'static str,
    },
    /// A file's contents are not what it should hold.
    #[error("{path}: {problem}; hint: {hint}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
        /// What to try.
        hint: String,
    },
    /// The key is not the leaf's.
    #[error(
        "{key}: the private key does not match the certificate in {cert}; hint: the two must \
         come from the same `meshfed-gateway certs` command (a Secret updated half-way?)"
    )]
    KeyMismatch {
        /// The key file.
        key: String,
        /// The certificate file.
        cert: String,
    },
    /// The chain fails our own trust rules.
    #[error("{cert} is not trusted by {bundle}: {source}")]
    Untrusted {
        /// The certificate file.
        cert: String,
        /// The bundle file.
        bundle: String,
        /// The rule it breaks.
        source: Box<IdentityError>,
    },
    /// rustls refused to build a configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Our identity: the bundle we trust, the chain we present and its key, and
/// what the chain says about us.
pub struct Credentials {
    /// The trust anchors, DER.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Our leaf followed by our intermediate, DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our leaf's private key. Never log it.
    pub key: PrivateKeyDer<'static>,
    /// Our SPIFFE ID.
    pub id: SpiffeId,
    /// Our cluster (our intermediate's).
    pub cluster: String,
    /// Our trust domain.
    pub trust_domain: String,
    /// When the chain stops being valid: the earliest end of validity of
    /// the leaf and the intermediate.
    pub not_after: SystemTime,
    bundle: Arc<TrustBundle>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id.to_string())
            .field("cluster", &self.cluster)
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.anchors.len())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads and checks `dir`'s `bundle.pem`, `cert.pem` and `key.pem`.
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        let files = FileSet::read(dir)?;
        Self::from_files(dir, &files)
    }

    /// Checks credentials given as PEM texts; errors name the standard file
    /// names.
    pub fn from_pem(bundle: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, StoreError> {
        let files = FileSet {
            bundle: bundle.to_vec(),
            cert: cert.to_vec(),
            key: key.to_vec(),
        };
        Self::from_files(Path::new(""), &files)
    }

    fn from_files(dir: &Path, files: &FileSet) -> Result<Self, StoreError> {
        let name = |file: &str| dir.join(file).display().to_string();
        let (bundle_path, cert_path, key_path) =
            (name(BUNDLE_FILE), name(CERT_FILE), name(KEY_FILE));
        let invalid = |path: &str, problem: String, hint: &str| StoreError::Invalid {
            path: path.to_owned(),
            problem,
            hint: hint.to_owned(),
        };

        let anchors = certs_from_pem(&files.bundle, "trust bundle").map_err(|e| {
            invalid(
                &bundle_path,
                e.to_string(),
                "it must hold the trust anchor(s) as PEM; copy the anchor directory's bundle.pem",
            )
        })?;
        for (i, der) in anchors.iter().enumerate() {
            let info = CertInfo::parse(der, &format!("anchor #{}", i + 1))
                .map_err(|e| invalid(&bundle_path, e.to_string(), "rebuild it"))?;
            if !info.is_ca {
                return Err(invalid(
                    &bundle_path,
                    format!("anchor #{} `{}` is not a CA", i + 1, info.subject),
                    "a bundle holds trust anchors only; build it with `meshfed-gateway certs bundle`",
                ));
            }
        }
        let bundle = Arc::new(TrustBundle::new(&anchors).map_err(|e| {
            invalid(
                &bundle_path,
                e.to_string(),
                "it must hold CA certificates as PEM",
            )
        })?);
        let chain = certs_from_pem(&files.cert, "certificate chain").map_err(|e| {
            invalid(
                &cert_path,
                e.to_string(),
                "it must hold our leaf followed by our cluster's intermediate, as PEM",
            )
        })?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| {
            invalid(
                &key_path,
                format!("no usable private key ({e})"),
                "it must hold the leaf's private key as PEM (`-----BEGIN PRIVATE KEY-----`)",
            )
        })?;

        let certified =
            CertifiedKey::from_der(chain.clone(), key.clone_key(), &super::crypto_provider())
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => StoreError::KeyMismatch {
                        key: key_path.clone(),
                        cert: cert_path.clone(),
                    },
                    other => invalid(
                        &key_path,
                        format!("the private key cannot be used: {other}"),
                        "use an ECDSA P-256 key as `meshfed-gateway certs` writes",
                    ),
                })?;

        let now = UnixTime::now();
        let untrusted = |source| StoreError::Untrusted {
            cert: cert_path.clone(),
            bundle: bundle_path.clone(),
            source: Box::new(source),
        };
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| invalid(&cert_path, "no certificate".to_owned(), "reissue it"))?;
        // Both roles: we present the same chain as a server and as a client.
        let me = bundle
            .verify(leaf, intermediates, now, PeerRole::Server)
            .and_then(|_| bundle.verify(leaf, intermediates, now, PeerRole::Client))
            .map_err(untrusted)?;

        let mut not_after = None::<SystemTime>;
        for (i, der) in chain.iter().take(2).enumerate() {
            let info = CertInfo::parse(der, if i == 0 { "leaf" } else { "intermediate" })
                .map_err(|e| invalid(&cert_path, e.to_string(), "reissue it"))?;
            not_after = Some(not_after.map_or(info.not_after, |t| t.min(info.not_after)));
        }
        let PeerIdentity {
            id,
            cluster,
            trust_domain,
        } = me;
        // Last, so that a wrong certificate is reported as such first.
        if !dir.as_os_str().is_empty() {
            refuse_world_readable(&dir.join(KEY_FILE), &key_path)?;
        }
        Ok(Credentials {
            anchors,
            chain,
            key,
            id,
            cluster,
            trust_domain,
            not_after: not_after.unwrap_or(SystemTime::UNIX_EPOCH),
            bundle,
            certified: Arc::new(certified),
        })
    }

    /// The anchors as a bundle for verifiers.
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.clone()
    }

    /// Our identity, as a peer would read it from our chain.
    pub fn identity(&self) -> PeerIdentity {
        PeerIdentity {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// The tunnel's server configuration: TLS 1.3 only, client certificates
/// required, and only gateways (of any cluster) accepted.
pub fn server_config(
    creds: &Credentials,
    alpn: &[Vec<u8>],
    refusals: Arc<HandshakeRefusals>,
) -> Result<Arc<ServerConfig>, StoreError> {
    server_config_accepting(creds, alpn, refusals, AcceptClients::Gateways, true)
}

/// A local listener's server configuration in permissive mode: TLS 1.3
/// only, client certificates optional; a client that presents one must be a
/// workload of our cluster and pass every rule. Anonymous clients get
/// through, so the caller must treat them as unauthenticated.
pub fn server_config_client_auth_optional(
    creds: &Credentials,
    alpn: &[Vec<u8>],
    refusals: Arc<HandshakeRefusals>,
) -> Result<Arc<ServerConfig>, StoreError> {
    let accept = AcceptClients::Workloads {
        cluster: creds.cluster.clone(),
    };
    server_config_accepting(creds, alpn, refusals, accept, false)
}

/// A server configuration with an explicit client policy (the syncer's
/// server, for one, accepts gateways with `mandatory` true).
pub fn server_config_accepting(
    creds: &Credentials,
    alpn: &[Vec<u8>],
    refusals: Arc<HandshakeRefusals>,
    accept: AcceptClients,
    mandatory: bool,
) -> Result<Arc<ServerConfig>, StoreError> {
    let verifier = MeshClientVerifier::new(creds.bundle.clone(), refusals, accept, mandatory);
    let mut config = ServerConfig::builder_with_provider(super::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(OurCert(creds.certified.clone())));
    config.alpn_protocols = alpn.to_vec();
    // No resumption: every handshake meets the current bundle and rules.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client configuration: TLS 1.3 only, presents our chain, and accepts
/// the server that the server name asks for
/// (`<cluster>.cluster.meshfed.internal` or `syncer.meshfed.internal`).
pub fn client_config(
    creds: &Credentials,
    alpn: &[Vec<u8>],
    refusals: Arc<HandshakeRefusals>,
) -> Result<Arc<ClientConfig>, StoreError> {
    let verifier = MeshServerVerifier::new(creds.bundle.clone(), refusals);
    let mut config = ClientConfig::builder_with_provider(super::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(OurCert(creds.certified.clone())));
    config.alpn_protocols = alpn.to_vec();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Our chain and key, for either side of a handshake.
#[derive(Debug)]
struct OurCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OurCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OurCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Loads `dir` now (refusing to start on invalid credentials), then polls
/// it every `interval` and publishes new credentials when the files'
/// contents change and pass every check. An invalid new set is logged (once
/// it has been seen unchanged on two polls in a row, so that a set read in
/// the middle of an update is not reported) and the previous credentials
/// stay. The task stops when every receiver is dropped. Call it inside a
/// tokio runtime.
pub fn watch(
    dir: PathBuf,
    interval: Duration,
) -> Result<(watch::Receiver<Arc<Credentials>>, JoinHandle<()>), StoreError> {
    watch_on(dir, Wakes::Every(interval))
}

/// When [`watch_on`] reads the files again.
#[derive(Debug)]
pub enum Wakes {
    /// Every interval.
    Every(Duration),
    /// At each message, e.g. from a change watcher (the gateway's inotify
    /// one). A changed set that is invalid is read again after `confirm`
    /// (and `confirmed` is called), so it is reported without waiting for
    /// the next message.
    On {
        wakes: tokio::sync::mpsc::Receiver<()>,
        confirm: Duration,
        confirmed: fn(),
    },
}

/// [`watch`], reading the files again when `wakes` says.
pub fn watch_on(
    dir: PathBuf,
    wakes: Wakes,
) -> Result<(watch::Receiver<Arc<Credentials>>, JoinHandle<()>), StoreError> {
    let files = FileSet::read(&dir)?;
    let creds = Credentials::from_files(&dir, &files)?;
    tracing::info!(dir = %dir.display(), id = %creds.id, cluster = %creds.cluster, "loaded credentials");
    let (tx, rx) = watch::channel(Arc::new(creds));
    let task = tokio::spawn(reload_loop(dir, wakes, tx, files));
    Ok((rx, task))
}

async fn reload_loop(
    dir: PathBuf,
    wakes: Wakes,
    tx: watch::Sender<Arc<Credentials>>,
    mut current: FileSet,
) {
    let (mut ticker, mut messages, confirm) = match wakes {
        Wakes::Every(interval) => {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.tick().await;
            (Some(t), None, None)
        }
        Wakes::On {
            wakes,
            confirm,
            confirmed,
        } => (None, Some(wakes), Some((confirm, confirmed))),
    };
    // A changed set that failed once, and the one last reported as invalid.
    let mut pending: Option<Seen> = None;
    let mut reported: Option<Seen> = None;
    // Reads failing for want of descriptors: said once, not blamed on the
    // files, and retried at the next tick.
    let mut starved = false;
    loop {
        // Waiting to confirm an invalid set (or a starved read): look
        // again after `confirm` even without a message.
        let recheck = match confirm {
            Some((after, _)) if pending.is_some() || starved => Some(after),
            _ => None,
        };
        tokio::select! {
            () = tx.closed() => return,
            _ = async { ticker.as_mut()?.tick().await; Some(()) }, if ticker.is_some() => {}
            woke = async { messages.as_mut()?.recv().await }, if messages.is_some() => {
                if woke.is_none() {
                    // The watcher is gone: nothing will say when to look.
                    return;
                }
            }
            () = tokio::time::sleep(recheck.unwrap_or_default()), if recheck.is_some() => {
                if let Some((_, confirmed)) = confirm {
                    confirmed();
                }
            }
        }
        let read = FileSet::read_async(&dir).await;
        match &read {
            Err(e) if e.exhaustion().is_some() => {
                if !starved {
                    tracing::warn!(
                        dir = %dir.display(), error = %e,
                        "cannot check the credentials for changes: out of a resource, not a problem with the credentials; keeping the current ones and retrying"
                    );
                    starved = true;
                }
                continue;
            }
            Ok(_) if starved => {
                tracing::info!(dir = %dir.display(), "the credentials directory is readable again");
                starved = false;
            }
            _ => {}
        }
        let (seen, result) = match read {
            Ok(files) if files == current => {
                pending = None;
                continue;
            }
            Ok(files) => {
                let result = Credentials::from_files(&dir, &files).map_err(|e| e.to_string());
                (Seen::Files(files), result)
            }
            Err(e) => {
                let error = e.to_string();
                (Seen::Unreadable(error.clone()), Err(error))
            }
        };
        match result {
            Ok(creds) => {
                tracing::info!(
                    dir = %dir.display(), id = %creds.id, cluster = %creds.cluster,
                    "credentials changed on disk; new handshakes use them"
                );
                if let Seen::Files(files) = seen {
                    current = files;
                }
                pending = None;
                reported = None;
                tx.send_replace(Arc::new(creds));
            }
            Err(_) if reported.as_ref() == Some(&seen) => {}
            Err(error) if pending.as_ref() == Some(&seen) => {
                tracing::error!(
                    dir = %dir.display(), %error,
                    "the credentials on disk changed but are invalid; keeping the previous ones"
                );
                reported = pending.take();
            }
            Err(_) => pending = Some(seen),
        }
    }
}

/// The three files' contents (compared, never logged).
#[derive(Clone, PartialEq, Eq)]
struct FileSet {
    bundle: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl FileSet {
    fn read(dir: &Path) -> Result<Self, StoreError> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|source| read_error(&path, source))
        };
        Ok(FileSet {
            bundle: read(BUNDLE_FILE)?,
            cert: read(CERT_FILE)?,
            key: read(KEY_FILE)?,
        })
    }

    /// Reads through the paths, following symlinks anew each time, so a
    /// swapped `..data` link is seen.
    async fn read_async(dir: &Path) -> Result<Self, StoreError> {
        let read = |file: &str| {
            let path = dir.join(file);
            async move {
                tokio::fs::read(&path)
                    .await
                    .map_err(|source| read_error(&path, source))
            }
        };
        Ok(FileSet {
            bundle: read(BUNDLE_FILE).await?,
            cert: read(CERT_FILE).await?,
            key: read(KEY_FILE).await?,
        })
    }
}

/// A private key any local user can read is refused (the mode of the file
/// a symlink leads to, as in a Secret volume): it is as good as leaked.
#[cfg(unix)]
fn refuse_world_readable(path: &Path, shown: &str) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| read_error(path, source))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(StoreError::Invalid {
            path: shown.to_owned(),
            problem: format!(
                "the private key is readable by every user (mode {:04o})",
                mode & 0o7777
            ),
            hint: "chmod 600 it (`meshfed-gateway certs` writes keys 0600; on Kubernetes set \
                   defaultMode: 0400 on the Secret volume)"
                .to_owned(),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_world_readable(_path: &Path, _shown: &str) -> Result<(), StoreError> {
    Ok(())
}

fn read_error(path: &Path, source: std::io::Error) -> StoreError {
    // Out of descriptors (or memory), the files are not to blame: say so.
    let hint = meshfed_cli::io::exhaustion(&source).unwrap_or(
        "a credentials directory holds bundle.pem, cert.pem and key.pem, as \
         `meshfed-gateway certs gateway --out DIR` writes them",
    );
    StoreError::Read {
        path: path.display().to_string(),
        source,
        hint,
    }
}

impl StoreError {
    /// When the files could not be read for want of a resource (too many
    /// open files...), what ran out: the credentials themselves may be fine.
    pub fn exhaustion(&self) -> Option<&'static str> {
        match self {
            StoreError::Read { source, .. } => meshfed_cli::io::exhaustion(source),
            _ => None,
        }
    }
}

/// What one poll saw.
#[derive(PartialEq, Eq)]
enum Seen {
    Files(FileSet),
    Unreadable(String),
}

#[cfg(test)]
mod tests;
