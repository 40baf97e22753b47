//! The trust rules, shown by real rustls handshakes driven in memory: the
//! honest side uses the configurations of [`super::store`], a rogue side
//! presents whatever chain a test forges and accepts anything, so each test
//! observes the honest side's verdict alone.

use std::sync::Arc;

use rustls::{CertificateError, ClientConfig};

use super::certs::{self, IssuedCert, Validity};
use super::spiffe::SpiffeId;
use super::store::{Credentials, client_config, server_config, server_config_client_auth_optional};
use super::testutil::{Federation, TD, creds, handshake, rogue_client, rogue_server, window};
use super::verify::{
    HandshakeRefusals, IdentityError, MeshServerVerifier, PeerIdentity, RefusalReason, may_assert,
    peer_identity,
};

const ALPN: &[u8] = b"meshfed-test";

fn alpn() -> Vec<Vec<u8>> {
    vec![ALPN.to_vec()]
}

/// The honest side (`honest`) meets a rogue peer presenting `rogue`, first
/// as the client dialling `dial`, then as the tunnel server. Returns the
/// honest side's error each time, and the refusal counters.
fn refused_both_ways(
    honest: &Credentials,
    rogue: &IssuedCert,
    dial: &str,
) -> (rustls::Error, rustls::Error, Arc<HandshakeRefusals>) {
    let refusals = Arc::new(HandshakeRefusals::new());
    let as_client = handshake(
        client_config(honest, &alpn(), refusals.clone()).unwrap(),
        rogue_server(&rogue.chain_pem, &rogue.key_pem),
        dial,
    );
    let as_server = handshake(
        rogue_client(&rogue.chain_pem, &rogue.key_pem),
        server_config(honest, &alpn(), refusals.clone()).unwrap(),
        &super::gateway_dns_name(&honest.cluster),
    );
    (
        as_client
            .client_error
            .expect("the honest client must refuse the rogue server"),
        as_server
            .server_error
            .expect("the honest server must refuse the rogue client"),
        refusals,
    )
}

fn only(refusals: &HandshakeRefusals, reason: RefusalReason, count: u64) {
    for (label, n) in refusals.snapshot() {
        let expected = if label == reason.as_str() { count } else { 0 };
        assert_eq!(
            n,
            expected,
            "refusals[{label}] in {:?}",
            refusals.snapshot()
        );
    }
}

#[test]
fn gateways_of_two_clusters_under_one_anchor_connect_and_each_learns_the_others_cluster() {
    let fed = Federation::new("root");
    let east = fed.gateway_creds("east", "gw-0");
    let west = fed.gateway_creds("west", "gw-1");
    let refusals = Arc::new(HandshakeRefusals::new());

    let done = handshake(
        client_config(&east, &alpn(), refusals.clone()).unwrap(),
        server_config(&west, &alpn(), refusals.clone()).unwrap(),
        "west.cluster.meshfed.internal",
    );

    assert!(done.succeeded(), "{done:?}");
    let seen_by_west = peer_identity(&done.server_saw.unwrap()).unwrap();
    assert_eq!(seen_by_west.cluster, "east");
    assert_eq!(
        seen_by_west.id,
        SpiffeId::gateway(TD, "east", "gw-0").unwrap()
    );
    let seen_by_east = peer_identity(&done.client_saw.unwrap()).unwrap();
    assert_eq!(seen_by_east.cluster, "west");
    assert_eq!(seen_by_east.trust_domain, TD);
    only(&refusals, RefusalReason::Other, 0);
}

#[test]
fn a_peer_under_a_foreign_anchor_is_refused_as_unknown_ca() {
    let fed = Federation::new("root");
    let foreign = Federation::new("someone else's root");
    let east = fed.gateway_creds("east", "gw-0");

    let (as_client, as_server, refusals) = refused_both_ways(
        &east,
        &foreign.gateway("west", "gw-9"),
        "west.cluster.meshfed.internal",
    );

    for e in [as_client, as_server] {
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }
    only(&refusals, RefusalReason::UnknownCa, 2);
}

#[test]
fn a_peer_under_a_foreign_anchor_with_our_anchors_name_is_refused_as_unknown_ca() {
    // Both anchors carry the same name, as two default-named ones do:
    // webpki finds ours by name and sees a bad signature.
    let fed = Federation::new("meshfed root");
    let foreign = Federation::new("meshfed root");
    let east = fed.gateway_creds("east", "gw-0");

    let (as_client, as_server, refusals) = refused_both_ways(
        &east,
        &foreign.gateway("west", "gw-9"),
        "west.cluster.meshfed.internal",
    );

    for e in [as_client, as_server] {
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }
    only(&refusals, RefusalReason::UnknownCa, 2);
}

#[test]
fn a_leaf_of_wests_intermediate_claiming_cluster_east_is_refused_as_cluster_mismatch() {
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let id = SpiffeId::gateway(TD, "east", "impostor").unwrap();
    let forged = certs::issue_leaf_unchecked(&fed.west, &id, &[], Validity::days(1)).unwrap();

    let (as_client, as_server, refusals) =
        refused_both_ways(&honest, &forged, "east.cluster.meshfed.internal");

    for e in [as_client, as_server] {
        let message = e.to_string();
        assert!(message.contains("claims cluster `east`"), "{message}");
        assert!(
            message.contains("intermediate CA of cluster `west`"),
            "{message}"
        );
    }
    only(&refusals, RefusalReason::ClusterMismatch, 2);
}

#[test]
fn a_leaf_in_another_trust_domain_than_its_intermediate_is_refused_as_cluster_mismatch() {
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let id = SpiffeId::gateway("evil.example", "east", "gw-0").unwrap();
    let forged = certs::issue_leaf_unchecked(&fed.east, &id, &[], Validity::days(1)).unwrap();

    let (as_client, _, refusals) =
        refused_both_ways(&honest, &forged, "east.cluster.meshfed.internal");

    assert!(
        as_client
            .to_string()
            .contains("trust domain `evil.example`"),
        "{as_client}"
    );
    only(&refusals, RefusalReason::ClusterMismatch, 2);
}

#[test]
fn an_expired_leaf_is_refused_as_expired() {
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let id = SpiffeId::gateway(TD, "east", "old").unwrap();
    let expired = certs::issue_leaf(&fed.east, &id, &[], window(-10, -1)).unwrap();

    let (as_client, as_server, refusals) =
        refused_both_ways(&honest, &expired, "east.cluster.meshfed.internal");

    for e in [as_client, as_server] {
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
            ),
            "{e:?}"
        );
    }
    only(&refusals, RefusalReason::Expired, 2);
}

#[test]
fn a_not_yet_valid_leaf_is_refused_as_not_yet_valid() {
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let id = SpiffeId::gateway(TD, "east", "future").unwrap();
    let future = certs::issue_leaf(&fed.east, &id, &[], window(1, 5)).unwrap();

    let (as_client, as_server, refusals) =
        refused_both_ways(&honest, &future, "east.cluster.meshfed.internal");

    for e in [as_client, as_server] {
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. })
            ),
            "{e:?}"
        );
    }
    only(&refusals, RefusalReason::NotYetValid, 2);
}

#[test]
fn a_bundle_with_two_anchors_accepts_leaves_under_either_for_rotation() {
    let old = Federation::new("old root");
    let new = Federation::new("new root");
    let both = format!("{}{}", old.bundle(), new.bundle());
    let server = creds(&both, &new.gateway("west", "gw-0"));
    let refusals = Arc::new(HandshakeRefusals::new());

    for client in [
        creds(&both, &old.gateway("east", "a")),
        creds(&both, &new.gateway("east", "b")),
    ] {
        let done = handshake(
            client_config(&client, &alpn(), refusals.clone()).unwrap(),
            server_config(&server, &alpn(), refusals.clone()).unwrap(),
            "west.cluster.meshfed.internal",
        );
        assert!(done.succeeded(), "{done:?}");
    }
    // A server that still trusts only the old anchor refuses the new leaves.
    let stale = creds(old.bundle(), &old.gateway("west", "gw-1"));
    let done = handshake(
        client_config(
            &creds(&both, &new.gateway("east", "c")),
            &alpn(),
            refusals.clone(),
        )
        .unwrap(),
        server_config(&stale, &alpn(), refusals.clone()).unwrap(),
        "west.cluster.meshfed.internal",
    );
    assert!(done.server_error.is_some(), "{done:?}");
    only(&refusals, RefusalReason::UnknownCa, 1);
}

#[test]
fn dialling_one_cluster_and_reaching_another_clusters_gateway_is_refused_as_wrong_peer() {
    let fed = Federation::new("root");
    let east = fed.gateway_creds("east", "gw-0");
    let west = fed.gateway_creds("west", "gw-0");
    let refusals = Arc::new(HandshakeRefusals::new());

    let done = handshake(
        client_config(&east, &alpn(), refusals.clone()).unwrap(),
        server_config(&west, &alpn(), refusals.clone()).unwrap(),
        "north.cluster.meshfed.internal",
    );

    let e = done.client_error.unwrap().to_string();
    assert!(e.contains("expected a gateway of cluster `north`"), "{e}");
    assert!(e.contains("cluster `west`"), "{e}");
    only(&refusals, RefusalReason::WrongPeer, 1);
}

#[test]
fn a_server_name_that_names_no_meshfed_peer_is_refused_as_wrong_peer() {
    let fed = Federation::new("root");
    let east = fed.gateway_creds("east", "gw-0");
    let west = fed.gateway_creds("west", "gw-0");
    let refusals = Arc::new(HandshakeRefusals::new());

    for name in [
        "example.com",
        "a.west.cluster.meshfed.internal",
        "cluster.meshfed.internal",
    ] {
        let done = handshake(
            client_config(&east, &alpn(), refusals.clone()).unwrap(),
            server_config(&west, &alpn(), refusals.clone()).unwrap(),
            name,
        );
        let e = done.client_error.unwrap().to_string();
        assert!(e.contains("names no meshfed peer"), "{name}: {e}");
    }
    only(&refusals, RefusalReason::WrongPeer, 3);
}

#[test]
fn the_syncer_is_accepted_under_the_syncer_name_and_refused_under_a_cluster_name() {
    let fed = Federation::new("root");
    let east = fed.gateway_creds("east", "gw-0");
    let id = SpiffeId::syncer(TD, "syncer-0").unwrap();
    let syncer = creds(
        fed.bundle(),
        &certs::issue_leaf(&fed.east, &id, &[], Validity::days(1)).unwrap(),
    );
    let refusals = Arc::new(HandshakeRefusals::new());
    let syncer_server = || {
        super::store::server_config_accepting(
            &syncer,
            &alpn(),
            refusals.clone(),
            super::verify::AcceptClients::Gateways,
            true,
        )
        .unwrap()
    };

    let done = handshake(
        client_config(&east, &alpn(), refusals.clone()).unwrap(),
        syncer_server(),
        "syncer.meshfed.internal",
    );
    assert!(done.succeeded(), "{done:?}");
    assert_eq!(peer_identity(&done.client_saw.unwrap()).unwrap().id, id);

    let done = handshake(
        client_config(&east, &alpn(), refusals.clone()).unwrap(),
        syncer_server(),
        "east.cluster.meshfed.internal",
    );
    assert!(done.client_error.is_some(), "{done:?}");
    only(&refusals, RefusalReason::WrongPeer, 1);
}

#[test]
fn the_tunnel_refuses_workloads_and_the_permissive_local_listener_takes_its_own_clusters() {
    let fed = Federation::new("root");
    let gateway = fed.gateway_creds("east", "gw-0");
    let workload = |issuer| {
        let id = SpiffeId::workload(TD, "default", "productpage").unwrap();
        creds(
            fed.bundle(),
            &certs::issue_leaf(issuer, &id, &[], Validity::days(1)).unwrap(),
        )
    };
    let (local, remote) = (workload(&fed.east), workload(&fed.west));
    let refusals = Arc::new(HandshakeRefusals::new());
    let name = "east.cluster.meshfed.internal";
    let tunnel = || server_config(&gateway, &alpn(), refusals.clone()).unwrap();
    let listener =
        || server_config_client_auth_optional(&gateway, &alpn(), refusals.clone()).unwrap();
    let as_client = |c: &Credentials| client_config(c, &alpn(), refusals.clone()).unwrap();

    let refused = handshake(as_client(&local), tunnel(), name);
    let e = refused.server_error.unwrap().to_string();
    assert!(e.contains("expected a meshfed gateway"), "{e}");

    let accepted = handshake(as_client(&local), listener(), name);
    assert!(accepted.succeeded(), "{accepted:?}");
    assert_eq!(
        peer_identity(&accepted.server_saw.unwrap())
            .unwrap()
            .cluster,
        "east"
    );

    let refused = handshake(as_client(&remote), listener(), name);
    assert!(refused.server_error.is_some(), "{refused:?}");

    // Anonymous: no client certificate at all.
    let anonymous = ClientConfig::builder_with_provider(super::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(
            gateway.trust_bundle(),
            refusals.clone(),
        )))
        .with_no_client_auth();
    let accepted = handshake(Arc::new(anonymous.clone()), listener(), name);
    assert!(accepted.succeeded(), "{accepted:?}");
    assert!(accepted.server_saw.is_none());
    let refused = handshake(Arc::new(anonymous), tunnel(), name);
    assert!(refused.server_error.is_some(), "{refused:?}");

    // The anonymous refusal is rustls's own (no certificate), not counted here.
    only(&refusals, RefusalReason::WrongPeer, 2);
}

#[test]
fn a_leaf_presented_without_its_intermediate_is_refused() {
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let mut bare = fed.gateway("east", "gw-0");
    bare.chain_pem = bare.cert_pem.clone();

    let (as_client, _, refusals) =
        refused_both_ways(&honest, &bare, "east.cluster.meshfed.internal");

    assert!(
        as_client.to_string().contains("UnknownIssuer"),
        "{as_client}"
    );
    only(&refusals, RefusalReason::UnknownCa, 2);
    let chain = certs::certs_from_pem(bare.chain_pem.as_bytes(), "leaf").unwrap();
    assert!(matches!(
        peer_identity(&chain),
        Err(IdentityError::MissingIntermediate)
    ));
}

#[test]
fn the_cluster_comes_from_the_leafs_issuer_not_from_the_certificate_after_it() {
    // The leaf is east's; the rogue puts west's intermediate right after it
    // (and east's further down, so that the chain itself still verifies).
    let fed = Federation::new("root");
    let honest = fed.gateway_creds("west", "gw-0");
    let id = SpiffeId::workload(TD, "default", "productpage").unwrap();
    let leaf = certs::issue_leaf(&fed.east, &id, &[], Validity::days(1)).unwrap();
    let mut rogue = leaf.clone();
    rogue.chain_pem = format!(
        "{}{}{}",
        leaf.cert_pem,
        fed.west.cert_pem(),
        fed.east.cert_pem()
    );

    let (_, as_server, refusals) =
        refused_both_ways(&honest, &rogue, "east.cluster.meshfed.internal");

    assert!(
        as_server.to_string().contains("is not the leaf's issuer"),
        "{as_server}"
    );
    only(&refusals, RefusalReason::BadIdentity, 2);
}

#[test]
fn peer_identity_reads_the_id_and_the_issuing_intermediates_cluster() {
    let fed = Federation::new("root");
    let west = fed.gateway_creds("west", "gw-3");

    let peer = peer_identity(&west.chain).unwrap();

    assert_eq!(
        peer,
        PeerIdentity {
            id: SpiffeId::gateway(TD, "west", "gw-3").unwrap(),
            cluster: "west".into(),
            trust_domain: TD.into(),
        }
    );
    assert_eq!(west.identity(), peer);
    assert!(matches!(
        peer_identity(&[]),
        Err(IdentityError::NoCertificate)
    ));
}

fn gateway_of(cluster: &str, trust_domain: &str) -> PeerIdentity {
    PeerIdentity {
        id: SpiffeId::gateway(trust_domain, cluster, "gw-0").unwrap(),
        cluster: cluster.into(),
        trust_domain: trust_domain.into(),
    }
}

#[test]
fn a_gateway_may_assert_workloads_of_its_own_clusters_trust_domain_only() {
    let productpage = |td: &str| SpiffeId::workload(td, "default", "productpage").unwrap();
    let shared = |_: &str| None;

    assert!(may_assert(&gateway_of("east", TD), &productpage(TD), shared).is_ok());
    let e = may_assert(
        &gateway_of("east", TD),
        &productpage("other.example"),
        shared,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cluster `east` is in `cluster.local`"),
        "{e}"
    );

    // A cluster that declares its own trust domain.
    let declared = |c: &str| (c == "west").then(|| "west.example".to_owned());
    assert!(
        may_assert(
            &gateway_of("west", TD),
            &productpage("west.example"),
            declared
        )
        .is_ok()
    );
    assert!(may_assert(&gateway_of("west", TD), &productpage(TD), declared).is_err());
    assert!(may_assert(&gateway_of("east", TD), &productpage(TD), declared).is_ok());
}

#[test]
fn only_gateways_assert_and_only_workload_identities_can_be_asserted() {
    let workload = SpiffeId::workload(TD, "default", "productpage").unwrap();
    let not_a_gateway = PeerIdentity {
        id: workload.clone(),
        cluster: "east".into(),
        trust_domain: TD.into(),
    };
    let e = may_assert(&not_a_gateway, &workload, |_| None).unwrap_err();
    assert!(
        e.to_string()
            .contains("only gateways forward caller identities"),
        "{e}"
    );

    for claimed in [
        SpiffeId::gateway(TD, "east", "gw-1").unwrap(),
        SpiffeId::syncer(TD, "s").unwrap(),
        SpiffeId::cluster_ca(TD, "east").unwrap(),
    ] {
        let e = may_assert(&gateway_of("east", TD), &claimed, |_| None).unwrap_err();
        assert!(e.to_string().contains("only workload identities"), "{e}");
    }
}

#[test]
fn refusal_counters_list_every_reason_for_metrics() {
    let refusals = HandshakeRefusals::new();
    refusals.record(RefusalReason::Expired);
    refusals.record(RefusalReason::Expired);
    refusals.record(RefusalReason::WrongPeer);

    assert_eq!(
        refusals.snapshot(),
        vec![
            ("unknown_ca", 0),
            ("expired", 2),
            ("not_yet_valid", 0),
            ("cluster_mismatch", 0),
            ("wrong_peer", 1),
            ("wrong_issuer", 0),
            ("bad_identity", 0),
            ("other", 0),
        ]
    );
}
