//! Issuing certificates with rcgen (ECDSA P-256), reading what a certificate
//! says, and writing PEM files with private keys at mode 0600.
//!
//! - [`new_anchor`]: a self-signed root CA, the federation's trust anchor;
//! - [`new_intermediate`]: a cluster's CA, issued by an anchor: CA with
//!   pathlen 0 and the URI SAN `spiffe://<td>/meshfed/cluster/<cluster>`;
//! - [`issue_leaf`]: a gateway, syncer or workload leaf, issued by a
//!   cluster's intermediate: not a CA, URI SAN = its SPIFFE ID, EKU
//!   serverAuth + clientAuth, and for gateways and the syncer a DNS SAN.
//!
//! Issuance refuses what verification would refuse (a gateway leaf for a
//! cluster that is not the issuer's), so an operator learns it at once rather
//! than at the first handshake. Every validity window is clamped to the
//! issuer's, since a certificate cannot outlive the CA that vouches for it.
//!
//! This module does not decide whom to trust ([`super::verify`]) or where a
//! running gateway finds its files ([`super::store`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::spiffe::SpiffeId;

/// How far back a new certificate's validity starts, so that a peer whose
/// clock runs a little behind ours accepts it at once.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Longest allowed common name (RFC 5280's upper bound).
const MAX_COMMON_NAME: usize = 64;

/// Why a certificate could not be issued, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to build or sign the certificate.
    #[error("cannot {what}: {source}")]
    Rcgen {
        /// What we were doing.
        what: &'static str,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A certificate is not valid DER or PEM.
    #[error("{what}: not a valid X.509 certificate: {detail}")]
    Malformed {
        /// Which certificate.
        what: String,
        /// The parser's reason.
        detail: String,
    },
    /// The issuer's certificate and key do not belong together, or the
    /// certificate cannot issue what was asked.
    #[error("{0}")]
    Issuer(String),
    /// A SPIFFE ID or name component is invalid.
    #[error(transparent)]
    Spiffe(#[from] super::spiffe::SpiffeError),
    /// The validity window is empty or ends before it starts.
    #[error(
        "the validity window is empty: it would end at {not_after}s after the epoch, \
         not after its start at {not_before}s; {hint}"
    )]
    Validity {
        /// Start, in seconds since the epoch.
        not_before: i64,
        /// End, in seconds since the epoch.
        not_after: i64,
        /// What to try.
        hint: &'static str,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS's reason.
        source: io::Error,
    },
    /// Files exist and overwriting was not asked for.
    #[error("{} already exist(s); remove them or pass --force to overwrite", .0.join(", "))]
    Exists(Vec<String>),
}

/// A validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The certificate is not valid before this.
    pub not_before: SystemTime,
    /// The certificate is not valid after this.
    pub not_after: SystemTime,
}

impl Validity {
    /// From [`CLOCK_SKEW_ALLOWANCE`] ago until `days` from now.
    pub fn days(days: u32) -> Self {
        Self::from_now(Duration::from_secs(u64::from(days) * 24 * 60 * 60))
    }

    /// From [`CLOCK_SKEW_ALLOWANCE`] ago until `lifetime` from now.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
            // An absurd lifetime gives an empty window, refused at issuance.
            not_after: now.checked_add(lifetime).unwrap_or(now),
        }
    }

    /// An explicit window (tests use it for expired and future certificates).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Self {
        Validity {
            not_before,
            not_after,
        }
    }
}

/// A certificate just issued, as PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate alone.
    pub cert_pem: String,
    /// The certificate followed by its issuer's (for leaves: the
    /// `cert.pem` a gateway presents); the certificate alone for an anchor
    /// or intermediate.
    pub chain_pem: String,
    /// Its private key, PKCS#8. Never log it.
    pub key_pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What kind of CA an [`Issuer`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerKind {
    /// A trust anchor: issues cluster intermediates.
    Anchor,
    /// A cluster's intermediate: issues leaves for that cluster only.
    Intermediate {
        /// The cluster it names in its URI SAN.
        cluster: String,
        /// Its trust domain.
        trust_domain: String,
    },
}

/// A CA that can sign: its certificate and key, loaded from PEM.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    cert_pem: String,
    kind: IssuerKind,
    not_after: SystemTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("kind", &self.kind)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads a CA from its certificate and key PEM. Refuses a certificate
    /// that is not a CA, a key that is not the certificate's, and a CA that
    /// is neither an anchor (self-signed) nor a meshfed cluster intermediate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let der = first_cert(cert_pem.as_bytes(), "CA certificate")?;
        let info = CertInfo::parse(&der, "CA certificate")?;
        if !info.is_ca {
            return Err(CertError::Issuer(format!(
                "the certificate `{}` is not a CA (basicConstraints CA:TRUE is missing); \
                 point --ca at a directory made by `certs anchor` or `certs intermediate`",
                info.subject
            )));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|source| CertError::Rcgen {
            what: "read the CA's private key (expected a PKCS#8 PEM `PRIVATE KEY`)",
            source,
        })?;
        if key.der_bytes() != info.public_key.as_slice() {
            return Err(CertError::Issuer(format!(
                "the private key does not belong to the CA certificate `{}`; \
                 ca.key and ca.pem must come from the same `certs` command",
                info.subject
            )));
        }
        let kind = match info.cluster_ca() {
            Some(SpiffeId::ClusterCa {
                trust_domain,
                cluster,
            }) => IssuerKind::Intermediate {
                cluster,
                trust_domain,
            },
            _ if info.self_signed => IssuerKind::Anchor,
            _ => {
                return Err(CertError::Issuer(format!(
                    "the CA `{}` is neither a trust anchor (self-signed) nor a meshfed cluster \
                     intermediate (URI SAN spiffe://<td>/meshfed/cluster/<cluster>)",
                    info.subject
                )));
            }
        };
        let signer =
            rcgen::Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| CertError::Rcgen {
                what: "use the CA certificate as an issuer",
                source,
            })?;
        Ok(Issuer {
            signer,
            cert_pem: pem_of(&der),
            kind,
            not_after: info.not_after,
        })
    }

    /// What kind of CA this is.
    pub fn kind(&self) -> &IssuerKind {
        &self.kind
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The end of the CA's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Creates a trust anchor: a self-signed CA, no path length limit beyond the
/// intermediates' own pathlen 0.
pub fn new_anchor(common_name: &str, validity: Validity) -> Result<IssuedCert, CertError> {
    let mut params = base_params(common_name, validity)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = new_key()?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Rcgen {
            what: "self-sign the trust anchor",
            source,
        })?;
    let cert_pem = cert.pem();
    Ok(IssuedCert {
        chain_pem: cert_pem.clone(),
        cert_pem,
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    })
}

/// Issues cluster `cluster`'s intermediate CA under an anchor.
pub fn new_intermediate(
    issuer: &Issuer,
    cluster: &str,
    trust_domain: &str,
    validity: Validity,
) -> Result<IssuedCert, CertError> {
    if issuer.kind != IssuerKind::Anchor {
        return Err(CertError::Issuer(
            "an intermediate is issued by a trust anchor, and this CA is itself a cluster \
             intermediate (pathlen 0); point --ca at the anchor's directory"
                .to_owned(),
        ));
    }
    let id = SpiffeId::cluster_ca(trust_domain, cluster)?;
    let mut params = base_params(
        &format!("meshfed intermediate CA for cluster {cluster}"),
        clamp(validity, issuer),
    )?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri_san(&id)?];
    params.use_authority_key_identifier_extension = true;
    sign(params, issuer, "sign the intermediate")
}

/// Issues a leaf for `id` under a cluster's intermediate, with the DNS name
/// of gateways and the syncer plus `extra_dns_names`.
pub fn issue_leaf(
    issuer: &Issuer,
    id: &SpiffeId,
    extra_dns_names: &[String],
    validity: Validity,
) -> Result<IssuedCert, CertError> {
    let IssuerKind::Intermediate {
        cluster,
        trust_domain,
    } = &issuer.kind
    else {
        return Err(CertError::Issuer(
            "leaves are issued by a cluster's intermediate, not by the trust anchor: \
             the verifier learns a peer's cluster from the intermediate; make one with \
             `meshfed-gateway certs intermediate` and point --ca at it"
                .to_owned(),
        ));
    };
    if id.trust_domain() != trust_domain {
        return Err(CertError::Issuer(format!(
            "{id} is in trust domain `{}`, but this intermediate (cluster `{cluster}`) is in \
             `{trust_domain}`; an intermediate issues only in its own trust domain",
            id.trust_domain()
        )));
    }
    match id {
        SpiffeId::Gateway { cluster: own, .. } if own != cluster => {
            return Err(CertError::Issuer(format!(
                "{id} belongs to cluster `{own}`, but this is the intermediate of cluster \
                 `{cluster}`; a cluster's CA issues only for its own cluster: use `{own}`'s CA"
            )));
        }
        SpiffeId::ClusterCa { .. } => {
            return Err(CertError::Issuer(format!(
                "{id} names a cluster CA; use `new_intermediate` (`certs intermediate`) for it"
            )));
        }
        _ => {}
    }
    issue_leaf_unchecked(issuer, id, extra_dns_names, validity)
}

/// Signs a leaf without the issuance checks: tests use it to forge the
/// certificates the verifier must refuse.
pub(crate) fn issue_leaf_unchecked(
    issuer: &Issuer,
    id: &SpiffeId,
    extra_dns_names: &[String],
    validity: Validity,
) -> Result<IssuedCert, CertError> {
    let common_name = match id {
        SpiffeId::Gateway { cluster, id, .. } => format!("meshfed gateway {id} of {cluster}"),
        SpiffeId::Syncer { id, .. } => format!("meshfed syncer {id}"),
        SpiffeId::Workload {
            namespace,
            service_account,
            ..
        } => format!("{service_account}.{namespace}"),
        SpiffeId::ClusterCa { cluster, .. } => format!("cluster {cluster}"),
    };
    let mut params = base_params(&common_name, clamp(validity, issuer))?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![uri_san(id)?];
    for name in id.dns_name().iter().chain(extra_dns_names) {
        let name = name.clone().try_into().map_err(|source| CertError::Rcgen {
            what: "use a DNS name (ASCII only)",
            source,
        })?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.use_authority_key_identifier_extension = true;
    sign(params, issuer, "sign the leaf")
}

/// What a certificate says, as far as meshfed cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as text.
    pub subject: String,
    /// The issuer, as text.
    pub issuer: String,
    /// Subject equals issuer.
    pub self_signed: bool,
    /// basicConstraints CA:TRUE.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
    /// Every URI SAN, verbatim.
    pub uris: Vec<String>,
    /// Every DNS SAN.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Start of validity, as text (RFC 2822-like, UTC).
    pub not_before_text: String,
    /// End of validity, as text.
    pub not_after_text: String,
    /// The serial number, hex.
    pub serial: String,
    /// The raw subject public key (the BIT STRING's content).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses a DER certificate; `what` names it in errors.
    pub fn parse(der: &[u8], what: &str) -> Result<Self, CertError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Malformed {
                what: what.to_owned(),
                detail: e.to_string(),
            })?;
        Self::from_x509(&cert, what)
    }

    fn from_x509(cert: &X509Certificate<'_>, what: &str) -> Result<Self, CertError> {
        let malformed = |detail: String| CertError::Malformed {
            what: what.to_owned(),
            detail,
        };
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| malformed(format!("subjectAltName: {e}")))?;
        for name in san.iter().flat_map(|san| &san.value.general_names) {
            match name {
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                _ => {}
            }
        }
        let constraints = cert
            .basic_constraints()
            .map_err(|e| malformed(format!("basicConstraints: {e}")))?;
        let validity = cert.validity();
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
            is_ca: constraints.as_ref().is_some_and(|bc| bc.value.ca),
            path_len: constraints.and_then(|bc| bc.value.path_len_constraint),
            uris,
            dns_names,
            not_before: system_time(validity.not_before.timestamp()),
            not_after: system_time(validity.not_after.timestamp()),
            not_before_text: validity.not_before.to_string(),
            not_after_text: validity.not_after.to_string(),
            serial: cert.raw_serial_as_string(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// The certificate's SPIFFE ID, if it has exactly one URI SAN and that
    /// parses. (SPIFFE's X.509-SVID allows exactly one URI SAN.)
    pub fn spiffe_id(&self) -> Option<Result<SpiffeId, super::spiffe::SpiffeError>> {
        match self.uris.as_slice() {
            [uri] => Some(SpiffeId::parse(uri)),
            _ => None,
        }
    }

    /// The cluster-CA ID of an intermediate, if that is what it carries.
    pub fn cluster_ca(&self) -> Option<SpiffeId> {
        match self.spiffe_id() {
            Some(Ok(id @ SpiffeId::ClusterCa { .. })) if self.is_ca => Some(id),
            _ => None,
        }
    }
}

/// Every certificate in a PEM text, in order. `what` names the text in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Malformed {
            what: what.to_owned(),
            detail: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Malformed {
            what: what.to_owned(),
            detail: "no `-----BEGIN CERTIFICATE-----` block found".to_owned(),
        });
    }
    Ok(certs)
}

/// One file to write with [`write_files`].
#[derive(Debug, Clone, Copy)]
pub struct OutFile<'a> {
    /// The file's name inside the directory.
    pub name: &'a str,
    /// Its contents.
    pub contents: &'a str,
    /// A private key: written at mode 0600 (else 0644).
    pub secret: bool,
}

/// Writes `files` into `dir` (made at mode 0700 if missing). Without
/// `overwrite`, refuses (before writing anything) if any file exists, and
/// creates each with `O_EXCL`. With it, replaces each file atomically
/// (a new file renamed over the old one), so a process polling the
/// directory never reads half a file. Keys are created at mode 0600 from the
/// start, never widened later.
pub fn write_files(dir: &Path, files: &[OutFile<'_>], overwrite: bool) -> Result<(), CertError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Write { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_err(dir))?;
    if !overwrite {
        let existing: Vec<String> = files
            .iter()
            .map(|f| dir.join(f.name))
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::Exists(existing));
        }
    }
    for file in files {
        let path = dir.join(file.name);
        let mode = if file.secret { 0o600 } else { 0o644 };
        if overwrite {
            let tmp = dir.join(format!(".{}.tmp-{}", file.name, std::process::id()));
            let _ = fs::remove_file(&tmp);
            write_new(&tmp, file.contents, mode).map_err(write_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(write_err(&path))?;
        } else {
            write_new(&path, file.contents, mode).map_err(write_err(&path))?;
        }
    }
    Ok(())
}

fn write_new(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

fn new_key() -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Rcgen {
        what: "generate an ECDSA P-256 key",
        source,
    })
}

fn base_params(common_name: &str, validity: Validity) -> Result<CertificateParams, CertError> {
    if validity.not_after <= validity.not_before {
        return Err(CertError::Validity {
            not_before: unix_seconds(validity.not_before),
            not_after: unix_seconds(validity.not_after),
            hint: "give a positive number of days, and check that the issuing CA has not expired",
        });
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "meshfed");
    params
        .distinguished_name
        .push(DnType::CommonName, truncate(common_name, MAX_COMMON_NAME));
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    // 16 random bytes with the top bit clear: a positive, unique serial.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

fn sign(
    params: CertificateParams,
    issuer: &Issuer,
    what: &'static str,
) -> Result<IssuedCert, CertError> {
    let key = new_key()?;
    let cert = params
        .signed_by(&key, &issuer.signer)
        .map_err(|source| CertError::Rcgen { what, source })?;
    let cert_pem = cert.pem();
    let chain_pem = match issuer.kind {
        IssuerKind::Anchor => cert_pem.clone(),
        IssuerKind::Intermediate { .. } => format!("{cert_pem}{}", issuer.cert_pem),
    };
    Ok(IssuedCert {
        chain_pem,
        cert_pem,
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    })
}

fn clamp(validity: Validity, issuer: &Issuer) -> Validity {
    Validity {
        not_before: validity.not_before,
        not_after: validity.not_after.min(issuer.not_after),
    }
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CertError> {
    let uri = id
        .to_string()
        .try_into()
        .map_err(|source| CertError::Rcgen {
            what: "encode the SPIFFE ID as a URI SAN",
            source,
        })?;
    Ok(SanType::URI(uri))
}

fn first_cert(pem: &[u8], what: &str) -> Result<CertificateDer<'static>, CertError> {
    certs_from_pem(pem, what)?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::Malformed {
            what: what.to_owned(),
            detail: "no certificate".to_owned(),
        })
}

/// PEM text of one DER certificate.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    const LINE: usize = 64;
    let b64 = base64(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(LINE) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}

/// Seconds since the epoch, negative before it.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests;
