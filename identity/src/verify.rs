//! The trust rules, as rustls verifiers, and what a verified chain tells us.
//!
//! A peer's chain is accepted when, in this order:
//! 1. it verifies to one of the anchors of the [`TrustBundle`] (webpki: the
//!    signatures, every certificate's validity period, the CA flags and path
//!    lengths, the key usage for the side of the connection);
//! 2. the certificate after the leaf is the leaf's issuer (checked by
//!    verifying the leaf against that certificate alone), and it is a cluster
//!    intermediate: a CA whose one URI SAN is `spiffe://<td>/meshfed/cluster/<c>`;
//! 3. the leaf has exactly one URI SAN, a gateway, syncer or workload SPIFFE
//!    ID, in the intermediate's trust domain, and a gateway leaf names the
//!    intermediate's cluster (the cluster binding);
//! 4. the peer is who this side expected: for a client, the TLS server name
//!    says it ([`ExpectedPeer`]); for a server, its [`AcceptClients`] policy.
//!
//! The peer's cluster is the intermediate's: learnt from the chain, never
//! from the peer's word. Every refusal is counted by reason in
//! [`HandshakeRefusals`] and logged (certificates are public; no key
//! material is ever at hand here).
//!
//! TLS session resumption is disabled by [`super::store`]'s configurations so
//! that every handshake goes through these rules with the current bundle.
//!
//! This module does not read files ([`super::store`]) or decide what an
//! identity may do beyond [`may_assert`] (authorization is the snapshot's).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{OtherError, SignatureScheme};

use super::certs::CertInfo;
use super::spiffe::SpiffeId;
use super::{GATEWAY_DNS_SUFFIX, SYNCER_DNS_NAME};

/// Why a handshake was refused, as counted in [`HandshakeRefusals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The chain does not lead to an anchor of the bundle.
    UnknownCa,
    /// A certificate of the chain has expired.
    Expired,
    /// A certificate of the chain is not valid yet.
    NotYetValid,
    /// The leaf's cluster or trust domain is not its issuer's.
    ClusterMismatch,
    /// A valid identity, but not the cluster or role this side expected.
    WrongPeer,
    /// The syncer's certificate was issued by another cluster's CA than the
    /// designated one (`--syncer-issuer`).
    WrongIssuer,
    /// No SPIFFE ID, a garbled one, or an issuer that is no cluster CA.
    BadIdentity,
    /// Anything else (bad signature, wrong key usage, bad encoding...).
    Other,
}

impl RefusalReason {
    /// Every reason, in the order [`HandshakeRefusals::snapshot`] lists them.
    pub const ALL: [RefusalReason; 8] = [
        RefusalReason::UnknownCa,
        RefusalReason::Expired,
        RefusalReason::NotYetValid,
        RefusalReason::ClusterMismatch,
        RefusalReason::WrongPeer,
        RefusalReason::WrongIssuer,
        RefusalReason::BadIdentity,
        RefusalReason::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::UnknownCa => "unknown_ca",
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::ClusterMismatch => "cluster_mismatch",
            RefusalReason::WrongPeer => "wrong_peer",
            RefusalReason::WrongIssuer => "wrong_issuer",
            RefusalReason::BadIdentity => "bad_identity",
            RefusalReason::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Handshake refusals by reason, shared by every verifier of a process and
/// read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct HandshakeRefusals {
    counts: [AtomicU64; RefusalReason::ALL.len()],
}

impl HandshakeRefusals {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one refusal.
    pub fn record(&self, reason: RefusalReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one reason.
    pub fn count(&self, reason: RefusalReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// Every reason with its count, for metrics (`reason` label).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        RefusalReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.count(*r)))
            .collect()
    }
}

/// Why a chain or identity is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The chain leads to no anchor of the bundle.
    #[error(
        "the peer's certificate was not issued under any anchor of our trust bundle \
         ({source}; it sent {presented} certificate(s)); hint: the peer's cert.pem must hold \
         its leaf followed by its cluster's intermediate, and our bundle.pem must hold the \
         anchor above that intermediate (during an anchor rotation, both anchors)"
    )]
    UnknownCa {
        /// webpki's finding.
        source: rustls::Error,
        /// How many certificates the peer sent.
        presented: usize,
    },
    /// A certificate of the chain has expired.
    #[error(
        "the peer's certificate chain has expired ({source}); hint: reissue it with \
         `meshfed-gateway certs ...`, and check both machines' clocks"
    )]
    Expired {
        /// webpki's finding, with the times.
        source: rustls::Error,
    },
    /// A certificate of the chain is not valid yet.
    #[error(
        "the peer's certificate chain is not valid yet ({source}); hint: check both machines' \
         clocks (certificates are issued valid from 5 minutes in the past)"
    )]
    NotYetValid {
        /// webpki's finding, with the times.
        source: rustls::Error,
    },
    /// The chain fails webpki for another reason.
    #[error("the peer's certificate chain is invalid: {source}")]
    Chain {
        /// webpki's finding.
        source: rustls::Error,
    },
    /// No certificate at all.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// Only a leaf: the cluster cannot be known.
    #[error(
        "the peer presented its leaf without the intermediate that issued it, so its cluster \
         cannot be known; hint: its cert.pem must hold the leaf followed by the intermediate"
    )]
    MissingIntermediate,
    /// The certificate after the leaf did not issue it.
    #[error(
        "the certificate after the peer's leaf is not the leaf's issuer ({source}), so the \
         cluster it names does not bind the leaf; hint: cert.pem must be the leaf followed by \
         the intermediate that signed it"
    )]
    NotIssuedByIntermediate {
        /// webpki's finding when verifying the leaf against that certificate alone.
        source: rustls::Error,
    },
    /// The leaf's or the intermediate's SPIFFE identity is missing or garbled.
    #[error("the peer's {which} certificate `{subject}` {problem}")]
    BadIdentity {
        /// `leaf` or `intermediate`.
        which: &'static str,
        /// Its subject, to find it.
        subject: String,
        /// What is wrong, with a hint.
        problem: String,
    },
    /// A gateway leaf names another cluster than its issuer's.
    #[error(
        "the peer's certificate {id} claims cluster `{claimed}` but was issued by the \
         intermediate CA of cluster `{issuer_cluster}`; a cluster's CA issues only for its own \
         cluster; hint: reissue it with `{claimed}`'s CA (`certs gateway --ca <{claimed} CA dir>`)"
    )]
    ClusterMismatch {
        /// The leaf's ID.
        id: Box<SpiffeId>,
        /// The cluster the leaf claims.
        claimed: String,
        /// The cluster of its issuer.
        issuer_cluster: String,
    },
    /// The leaf's trust domain is not its issuer's.
    #[error(
        "the peer's certificate {id} is in trust domain `{leaf_trust_domain}` but was issued by \
         the intermediate of cluster `{issuer_cluster}`, in trust domain \
         `{issuer_trust_domain}`; an intermediate issues only in its own trust domain"
    )]
    TrustDomainMismatch {
        /// The leaf's ID.
        id: Box<SpiffeId>,
        /// The leaf's trust domain.
        leaf_trust_domain: String,
        /// The issuer's cluster.
        issuer_cluster: String,
        /// The issuer's trust domain.
        issuer_trust_domain: String,
    },
    /// A valid identity, not the one expected.
    #[error(
        "expected {expected}, but the peer is {} of cluster `{}`; hint: {hint}",
        .peer.id, .peer.cluster
    )]
    WrongPeer {
        /// Who was expected.
        expected: String,
        /// Who answered.
        peer: Box<PeerIdentity>,
        /// What to check.
        hint: &'static str,
    },
    /// The TLS server name names no meshfed peer.
    #[error(
        "the server name `{0}` names no meshfed peer; dial `<cluster>.cluster.meshfed.internal` \
         for a gateway of <cluster>, or `syncer.meshfed.internal` for the syncer"
    )]
    UnknownServerName(String),
    /// A forwarded caller identity that the peer may not assert.
    #[error("{peer} may not assert the caller identity {claimed}: {why}")]
    MayNotAssert {
        /// The asserting peer.
        peer: Box<SpiffeId>,
        /// The identity it asserted.
        claimed: Box<SpiffeId>,
        /// Which rule it breaks.
        why: String,
    },
    /// The trust bundle has no anchor, or an anchor rustls cannot use.
    #[error("trust bundle: {0}")]
    Bundle(String),
}

impl IdentityError {
    /// The refusal counter this error counts under.
    pub fn reason(&self) -> RefusalReason {
        match self {
            IdentityError::UnknownCa { .. } => RefusalReason::UnknownCa,
            IdentityError::Expired { .. } => RefusalReason::Expired,
            IdentityError::NotYetValid { .. } => RefusalReason::NotYetValid,
            IdentityError::ClusterMismatch { .. } | IdentityError::TrustDomainMismatch { .. } => {
                RefusalReason::ClusterMismatch
            }
            IdentityError::WrongPeer { .. } | IdentityError::UnknownServerName(_) => {
                RefusalReason::WrongPeer
            }
            IdentityError::NoCertificate
            | IdentityError::MissingIntermediate
            | IdentityError::NotIssuedByIntermediate { .. }
            | IdentityError::BadIdentity { .. } => RefusalReason::BadIdentity,
            IdentityError::Chain { .. }
            | IdentityError::MayNotAssert { .. }
            | IdentityError::Bundle(_) => RefusalReason::Other,
        }
    }

    /// The rustls error to fail the handshake with: webpki's own precise
    /// error where rustls has one (so the peer gets the matching alert:
    /// unknown CA, certificate expired...), else `CertificateError::Other`
    /// carrying this error's message.
    pub fn into_rustls(self) -> rustls::Error {
        match self {
            IdentityError::UnknownCa { source, .. }
            | IdentityError::Expired { source }
            | IdentityError::NotYetValid { source }
            | IdentityError::Chain { source } => source,
            other => rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(Refusal(other)),
            ))),
        }
    }
}

/// An [`IdentityError`] inside a `rustls::Error` (`CertificateError::Other`).
/// rustls prints that variant with `{:?}`, so this Debug shows the message
/// an operator should read. Downcast the `OtherError`'s inner error to it to
/// get the structured error back.
pub struct Refusal(pub IdentityError);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Who a peer is, as its verified chain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The leaf's SPIFFE ID.
    pub id: SpiffeId,
    /// The cluster of the intermediate that issued the leaf.
    pub cluster: String,
    /// The trust domain (the leaf's, equal to its issuer's).
    pub trust_domain: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (cluster `{}`)", self.id, self.cluster)
    }
}

/// Reads the identity from a chain that rustls has already verified with
/// the verifiers here: the leaf's SPIFFE ID and the cluster of the
/// intermediate after it. It checks the binding again (cheaply, no
/// signatures), so it never reports a cluster the chain does not bind.
///
/// With quinn: `connection.peer_identity()` is a `Box<dyn Any>` that
/// downcasts to `Vec<CertificateDer<'static>>`.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<PeerIdentity, IdentityError> {
    match chain {
        [] => Err(IdentityError::NoCertificate),
        [_] => Err(IdentityError::MissingIntermediate),
        [leaf, issuer, ..] => bind(leaf, issuer),
    }
}

/// The trust-domain rule for forwarded caller identities: a peer may assert
/// a caller's identity only if it is a gateway, the caller is a workload,
/// and the workload is in the trust domain of the gateway's own cluster
/// (the cluster from its chain). `cluster_trust_domains` gives a cluster's
/// declared trust domain (`Cluster.spec.trustDomain` in the policy); for a
/// cluster without one, the trust domain of the peer's own certificate (its
/// cluster intermediate's) is used.
pub fn may_assert(
    peer: &PeerIdentity,
    claimed: &SpiffeId,
    cluster_trust_domains: impl Fn(&str) -> Option<String>,
) -> Result<(), IdentityError> {
    let refuse = |why: String| {
        Err(IdentityError::MayNotAssert {
            peer: Box::new(peer.id.clone()),
            claimed: Box::new(claimed.clone()),
            why,
        })
    };
    if !matches!(peer.id, SpiffeId::Gateway { .. }) {
        return refuse(format!(
            "only gateways forward caller identities, and this peer is a {}",
            peer.id.kind()
        ));
    }
    if !matches!(claimed, SpiffeId::Workload { .. }) {
        return refuse(format!(
            "a gateway may assert only workload identities, and this is a {}",
            claimed.kind()
        ));
    }
    let allowed = cluster_trust_domains(&peer.cluster).unwrap_or_else(|| peer.trust_domain.clone());
    if claimed.trust_domain() != allowed {
        return refuse(format!(
            "a gateway may assert only workloads of its own cluster's trust domain, and cluster \
             `{}` is in `{allowed}`, not `{}`",
            peer.cluster,
            claimed.trust_domain()
        ));
    }
    Ok(())
}

/// Which key usage the peer's leaf must allow: its side of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS server (EKU serverAuth).
    Server,
    /// The peer is the TLS client (EKU clientAuth).
    Client,
}

/// The anchors a peer's chain must lead to. Holds several during a rotation.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Anchors,
    provider: Arc<CryptoProvider>,
}

impl TrustBundle {
    /// A bundle of `anchors` (DER); at least one.
    pub fn new(anchors: &[CertificateDer<'_>]) -> Result<Self, IdentityError> {
        let mut roots = RootCertStore::empty();
        for (i, anchor) in anchors.iter().enumerate() {
            roots
                .add(anchor.clone().into_owned())
                .map_err(|e| IdentityError::Bundle(format!("anchor #{}: {e}", i + 1)))?;
        }
        if roots.is_empty() {
            return Err(IdentityError::Bundle("it holds no anchor".to_owned()));
        }
        let provider = super::crypto_provider();
        let anchors =
            Anchors::new(roots, &provider).map_err(|e| IdentityError::Bundle(e.to_string()))?;
        Ok(TrustBundle { anchors, provider })
    }

    /// How many anchors it holds.
    pub fn len(&self) -> usize {
        self.anchors.roots.len()
    }

    /// Never true: a bundle holds at least one anchor.
    pub fn is_empty(&self) -> bool {
        self.anchors.roots.is_empty()
    }

    /// Applies rules 1 to 3 of the module docs to a chain that a `role`
    /// peer presented, at time `now`.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<PeerIdentity, IdentityError> {
        self.anchors
            .verify(role, end_entity, intermediates, now, &self.provider)
            .map_err(|source| {
                let presented = 1 + intermediates.len();
                // An anchor of ours and a foreign one with the same name
                // (both default-named, say): webpki finds ours by name and
                // reports its signature as bad. If the leaf is sound under
                // the intermediate it came with, the break is above that
                // intermediate: a CA we do not trust.
                let foreign_anchor =
                    matches!(
                        source,
                        rustls::Error::InvalidCertificate(CertificateError::BadSignature)
                    ) && self.signed_by_first_intermediate(role, end_entity, intermediates, now);
                if foreign_anchor {
                    // Told as such, so the peer gets the unknown_ca alert.
                    IdentityError::UnknownCa {
                        source: CertificateError::UnknownIssuer.into(),
                        presented,
                    }
                } else {
                    classify(source, presented)
                }
            })?;
        let issuer = intermediates
            .first()
            .ok_or(IdentityError::MissingIntermediate)?;
        // Rule 2: the certificate after the leaf signed it. Verifying the
        // leaf with that certificate as the only anchor proves it.
        let not_issued = |source| IdentityError::NotIssuedByIntermediate { source };
        let mut only = RootCertStore::empty();
        only.add(issuer.clone().into_owned()).map_err(not_issued)?;
        Anchors::new(only, &self.provider)
            .map_err(|e| IdentityError::Bundle(e.to_string()))?
            .verify(role, end_entity, &[], now, &self.provider)
            .map_err(not_issued)?;
        bind(end_entity, issuer)
    }
}

impl TrustBundle {
    /// Whether the leaf verifies with the first intermediate presented as
    /// its only anchor.
    fn signed_by_first_intermediate(
        &self,
        role: PeerRole,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let Some(issuer) = intermediates.first() else {
            return false;
        };
        let mut only = RootCertStore::empty();
        if only.add(issuer.clone().into_owned()).is_err() {
            return false;
        }
        Anchors::new(only, &self.provider)
            .is_ok_and(|a| a.verify(role, end_entity, &[], now, &self.provider).is_ok())
    }
}

/// A root store with webpki's chain check for either role: rustls exposes
/// the server-role check as a function, the client-role one as a verifier.
#[derive(Debug, Clone)]
struct Anchors {
    roots: Arc<RootCertStore>,
    client_webpki: Arc<dyn ClientCertVerifier>,
}

impl Anchors {
    fn new(
        roots: RootCertStore,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let roots = Arc::new(roots);
        let client_webpki =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        Ok(Anchors {
            roots,
            client_webpki,
        })
    }

    fn verify(
        &self,
        role: PeerRole,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        provider: &CryptoProvider,
    ) -> Result<(), rustls::Error> {
        match role {
            PeerRole::Server => rustls::client::verify_server_cert_signed_by_trust_anchor(
                &ParsedCertificate::try_from(end_entity)?,
                &self.roots,
                intermediates,
                now,
                provider.signature_verification_algorithms.all,
            ),
            PeerRole::Client => self
                .client_webpki
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ()),
        }
    }
}

fn classify(source: rustls::Error, presented: usize) -> IdentityError {
    match &source {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer => IdentityError::UnknownCa { source, presented },
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                IdentityError::Expired { source }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                IdentityError::NotYetValid { source }
            }
            _ => IdentityError::Chain { source },
        },
        _ => IdentityError::Chain { source },
    }
}

/// Rules 2 (the issuer is a cluster intermediate) and 3 (the binding),
/// without signatures: the caller has checked them.
fn bind(
    leaf: &CertificateDer<'_>,
    issuer: &CertificateDer<'_>,
) -> Result<PeerIdentity, IdentityError> {
    let bad = |which: &'static str, subject: &str, problem: String| IdentityError::BadIdentity {
        which,
        subject: subject.to_owned(),
        problem,
    };
    let issuer_info = CertInfo::parse(issuer, "intermediate")
        .map_err(|e| bad("intermediate", "?", format!("cannot be parsed: {e}")))?;
    let Some(SpiffeId::ClusterCa {
        trust_domain: issuer_td,
        cluster,
    }) = issuer_info.cluster_ca()
    else {
        return Err(bad(
            "intermediate",
            &issuer_info.subject,
            format!(
                "is not a meshfed cluster CA: it needs CA:TRUE and exactly one URI SAN \
                 `spiffe://<td>/meshfed/cluster/<cluster>` (it has {:?}); hint: issue it with \
                 `meshfed-gateway certs intermediate`",
                issuer_info.uris
            ),
        ));
    };
    let leaf_info = CertInfo::parse(leaf, "leaf")
        .map_err(|e| bad("leaf", "?", format!("cannot be parsed: {e}")))?;
    let id = match leaf_info.spiffe_id() {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            return Err(bad(
                "leaf",
                &leaf_info.subject,
                format!("has a bad SPIFFE ID: {e}"),
            ));
        }
        None => {
            return Err(bad(
                "leaf",
                &leaf_info.subject,
                format!(
                    "must carry exactly one URI SAN, its SPIFFE ID, and has {}",
                    leaf_info.uris.len()
                ),
            ));
        }
    };
    if id.trust_domain() != issuer_td {
        return Err(IdentityError::TrustDomainMismatch {
            leaf_trust_domain: id.trust_domain().to_owned(),
            id: Box::new(id),
            issuer_cluster: cluster,
            issuer_trust_domain: issuer_td,
        });
    }
    match &id {
        SpiffeId::Gateway {
            cluster: claimed, ..
        } if *claimed != cluster => {
            return Err(IdentityError::ClusterMismatch {
                claimed: claimed.clone(),
                id: Box::new(id),
                issuer_cluster: cluster,
            });
        }
        SpiffeId::ClusterCa { .. } => {
            return Err(bad(
                "leaf",
                &leaf_info.subject,
                format!("carries a cluster CA's ID ({id}), which no leaf may carry"),
            ));
        }
        _ => {}
    }
    Ok(PeerIdentity {
        id,
        cluster,
        trust_domain: issuer_td,
    })
}

/// Who a client expects at the other end, from the TLS server name it dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// `<cluster>.cluster.meshfed.internal`: a gateway of that cluster.
    Gateway {
        /// The cluster.
        cluster: String,
    },
    /// `syncer.meshfed.internal`: a syncer.
    Syncer,
}

impl ExpectedPeer {
    /// Reads the server name; anything but the two meshfed forms is refused.
    pub fn from_server_name(name: &ServerName<'_>) -> Result<Self, IdentityError> {
        let ServerName::DnsName(dns) = name else {
            return Err(IdentityError::UnknownServerName(format!("{name:?}")));
        };
        let host = dns.as_ref().to_ascii_lowercase();
        if host == SYNCER_DNS_NAME {
            return Ok(ExpectedPeer::Syncer);
        }
        match host.strip_suffix(GATEWAY_DNS_SUFFIX) {
            Some(cluster) if !cluster.is_empty() && !cluster.contains('.') => {
                Ok(ExpectedPeer::Gateway {
                    cluster: cluster.to_owned(),
                })
            }
            _ => Err(IdentityError::UnknownServerName(host)),
        }
    }

    /// The server name to dial for this peer.
    pub fn server_name(&self) -> Result<ServerName<'static>, IdentityError> {
        let name = match self {
            ExpectedPeer::Gateway { cluster } => super::gateway_dns_name(cluster),
            ExpectedPeer::Syncer => SYNCER_DNS_NAME.to_owned(),
        };
        ServerName::try_from(name.clone()).map_err(|_| IdentityError::UnknownServerName(name))
    }

    /// Whether `peer` is the expected one.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), IdentityError> {
        let ok = match (self, &peer.id) {
            (ExpectedPeer::Gateway { cluster }, SpiffeId::Gateway { .. }) => {
                *cluster == peer.cluster
            }
            (ExpectedPeer::Syncer, SpiffeId::Syncer { .. }) => true,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        let (expected, hint) = match self {
            ExpectedPeer::Gateway { cluster } => (
                format!("a gateway of cluster `{cluster}`"),
                "check that the address dialled belongs to that cluster's gateways",
            ),
            ExpectedPeer::Syncer => (
                "the syncer".to_owned(),
                "check that the address dialled is the syncer's",
            ),
        };
        Err(IdentityError::WrongPeer {
            expected,
            peer: Box::new(peer.clone()),
            hint,
        })
    }
}

/// Which clients a server accepts (once their chain passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptClients {
    /// Gateways of any cluster: the tunnel, and the syncer's server.
    Gateways,
    /// Workloads issued by this cluster's intermediate: a local listener.
    Workloads {
        /// This gateway's cluster.
        cluster: String,
    },
    /// Any valid meshfed identity (gateway, syncer or workload).
    Any,
}

impl AcceptClients {
    /// Whether `peer` is accepted.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), IdentityError> {
        let (ok, expected, hint) = match self {
            AcceptClients::Gateways => (
                matches!(peer.id, SpiffeId::Gateway { .. }),
                "a meshfed gateway".to_owned(),
                "only gateways connect to this listener; workloads call the outbound listener",
            ),
            AcceptClients::Workloads { cluster } => (
                matches!(peer.id, SpiffeId::Workload { .. }) && peer.cluster == *cluster,
                format!("a workload of cluster `{cluster}`"),
                "this listener serves local workloads, with certificates from this cluster's CA",
            ),
            AcceptClients::Any => (true, String::new(), ""),
        };
        if ok {
            Ok(())
        } else {
            Err(IdentityError::WrongPeer {
                expected,
                peer: Box::new(peer.clone()),
                hint,
            })
        }
    }
}

/// Counts, logs and converts a refusal.
fn refuse(refusals: &HandshakeRefusals, side: &'static str, error: IdentityError) -> rustls::Error {
    let reason = error.reason();
    refusals.record(reason);
    tracing::warn!(reason = reason.as_str(), side, error = %error, "refused a TLS peer");
    error.into_rustls()
}

/// The client side's verifier of servers: the trust rules, then the
/// expected peer from the server name. DNS names in the certificate are not
/// matched: the SPIFFE ID and the chain's cluster decide.
#[derive(Debug)]
pub struct MeshServerVerifier {
    bundle: Arc<TrustBundle>,
    refusals: Arc<HandshakeRefusals>,
}

impl MeshServerVerifier {
    /// A verifier over `bundle`, counting refusals in `refusals`.
    pub fn new(bundle: Arc<TrustBundle>, refusals: Arc<HandshakeRefusals>) -> Self {
        MeshServerVerifier { bundle, refusals }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        ExpectedPeer::from_server_name(server_name)
            .and_then(|expected| {
                let peer = self
                    .bundle
                    .verify(end_entity, intermediates, now, PeerRole::Server)?;
                expected.check(&peer)
            })
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| refuse(&self.refusals, "client", e))
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
            &self.bundle.provider.signature_verification_algorithms,
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
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side's verifier of clients: the trust rules, then its
/// [`AcceptClients`] policy. With `mandatory` false, a client without a
/// certificate is let through (a permissive local listener); one that
/// presents a certificate is still held to every rule.
#[derive(Debug)]
pub struct MeshClientVerifier {
    bundle: Arc<TrustBundle>,
    refusals: Arc<HandshakeRefusals>,
    accept: AcceptClients,
    mandatory: bool,
}

impl MeshClientVerifier {
    /// A verifier over `bundle` accepting `accept`.
    pub fn new(
        bundle: Arc<TrustBundle>,
        refusals: Arc<HandshakeRefusals>,
        accept: AcceptClients,
        mandatory: bool,
    ) -> Self {
        MeshClientVerifier {
            bundle,
            refusals,
            accept,
            mandatory,
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.bundle.anchors.client_webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .verify(end_entity, intermediates, now, PeerRole::Client)
            .and_then(|peer| self.accept.check(&peer))
            .map(|()| ClientCertVerified::assertion())
            .map_err(|e| refuse(&self.refusals, "server", e))
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
            &self.bundle.provider.signature_verification_algorithms,
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
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
