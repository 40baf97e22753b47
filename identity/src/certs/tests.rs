use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;
use crate::testutil::{Federation, TD, TempDir, window};

fn ekus(der: &[u8]) -> (bool, bool) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    (eku.server_auth, eku.client_auth)
}

#[test]
fn a_gateway_leaf_carries_its_spiffe_id_its_dns_name_and_both_ekus() {
    let fed = Federation::new("root");

    let leaf = fed.gateway("east", "gw-0");

    let info = CertInfo::parse(&leaf.der, "leaf").unwrap();
    assert!(!info.is_ca);
    assert_eq!(
        info.uris,
        ["spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0"]
    );
    assert_eq!(info.dns_names, ["east.cluster.meshfed.internal"]);
    assert_eq!(ekus(&leaf.der), (true, true));
    // cert.pem: the leaf, then the intermediate that issued it.
    let chain = certs_from_pem(leaf.chain_pem.as_bytes(), "chain").unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(pem_of(&chain[1]), fed.east.cert_pem());
}

#[test]
fn syncer_and_workload_leaves_carry_their_names() {
    let fed = Federation::new("root");
    let syncer = SpiffeId::syncer(TD, "s-0").unwrap();
    let workload = SpiffeId::workload(TD, "default", "reviews").unwrap();

    let s = issue_leaf(&fed.west, &syncer, &[], Validity::days(1)).unwrap();
    let w = issue_leaf(
        &fed.west,
        &workload,
        &["reviews.default.svc".into()],
        Validity::days(1),
    )
    .unwrap();

    let s = CertInfo::parse(&s.der, "syncer").unwrap();
    assert_eq!(s.spiffe_id().unwrap().unwrap(), syncer);
    assert_eq!(s.dns_names, ["syncer.meshfed.internal"]);
    let w = CertInfo::parse(&w.der, "workload").unwrap();
    assert_eq!(w.spiffe_id().unwrap().unwrap(), workload);
    assert_eq!(w.dns_names, ["reviews.default.svc"]);
}

#[test]
fn an_intermediate_is_a_pathlen_0_ca_naming_its_cluster_and_an_anchor_is_self_signed() {
    let anchor = new_anchor("root", Validity::days(2)).unwrap();
    let root = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem).unwrap();
    assert_eq!(*root.kind(), IssuerKind::Anchor);
    let anchor_info = CertInfo::parse(&anchor.der, "anchor").unwrap();
    assert!(anchor_info.is_ca && anchor_info.self_signed);

    let east = new_intermediate(&root, "east", TD, Validity::days(1)).unwrap();

    let info = CertInfo::parse(&east.der, "intermediate").unwrap();
    assert!(info.is_ca && !info.self_signed);
    assert_eq!(info.path_len, Some(0));
    assert_eq!(info.uris, ["spiffe://cluster.local/meshfed/cluster/east"]);
    let issuer = Issuer::from_pem(&east.cert_pem, &east.key_pem).unwrap();
    assert_eq!(
        *issuer.kind(),
        IssuerKind::Intermediate {
            cluster: "east".into(),
            trust_domain: TD.into()
        }
    );
}

#[test]
fn an_intermediate_refuses_gateways_of_other_clusters_and_other_trust_domains() {
    let fed = Federation::new("root");

    let other_cluster = SpiffeId::gateway(TD, "east", "gw-0").unwrap();
    let e = issue_leaf(&fed.west, &other_cluster, &[], Validity::days(1)).unwrap_err();
    assert!(e.to_string().contains("use `east`'s CA"), "{e}");

    let other_td = SpiffeId::workload("other.example", "ns", "sa").unwrap();
    let e = issue_leaf(&fed.west, &other_td, &[], Validity::days(1)).unwrap_err();
    assert!(
        e.to_string().contains("only in its own trust domain"),
        "{e}"
    );

    let ca = SpiffeId::cluster_ca(TD, "west").unwrap();
    assert!(issue_leaf(&fed.west, &ca, &[], Validity::days(1)).is_err());
}

#[test]
fn anchors_issue_only_intermediates_and_intermediates_only_leaves() {
    let anchor = new_anchor("root", Validity::days(2)).unwrap();
    let root = Issuer::from_pem(&anchor.cert_pem, &anchor.key_pem).unwrap();
    let id = SpiffeId::gateway(TD, "east", "gw-0").unwrap();
    let e = issue_leaf(&root, &id, &[], Validity::days(1)).unwrap_err();
    assert!(e.to_string().contains("not by the trust anchor"), "{e}");

    let fed = Federation::new("root");
    let e = new_intermediate(&fed.east, "north", TD, Validity::days(1)).unwrap_err();
    assert!(e.to_string().contains("pathlen 0"), "{e}");
}

#[test]
fn an_issuer_refuses_a_key_that_is_not_its_certificates_and_a_leaf_as_ca() {
    let a = new_anchor("a", Validity::days(1)).unwrap();
    let b = new_anchor("b", Validity::days(1)).unwrap();
    let e = Issuer::from_pem(&a.cert_pem, &b.key_pem).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not belong to the CA certificate"),
        "{e}"
    );

    let leaf = Federation::new("root").gateway("east", "gw-0");
    let e = Issuer::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(e.to_string().contains("is not a CA"), "{e}");
}

#[test]
fn a_certificate_never_outlives_its_issuer() {
    let fed = Federation::new("root");
    let id = SpiffeId::gateway(TD, "east", "gw-0").unwrap();

    let leaf = issue_leaf(&fed.east, &id, &[], Validity::days(10_000)).unwrap();

    let info = CertInfo::parse(&leaf.der, "leaf").unwrap();
    let limit = fed.east.not_after();
    assert!(info.not_after <= limit, "{:?} > {limit:?}", info.not_after);
    assert!(info.not_after + Duration::from_secs(1) >= limit);
    assert!(new_anchor("x", window(1, -1)).is_err());
}

#[test]
fn pem_of_round_trips_through_the_pem_parser() {
    let leaf = Federation::new("root").gateway("east", "gw-0");
    let text = pem_of(&leaf.der);
    assert_eq!(text, leaf.cert_pem.replace("\r\n", "\n"));
    assert_eq!(
        certs_from_pem(text.as_bytes(), "x").unwrap(),
        vec![leaf.der]
    );
}

#[test]
fn keys_are_written_at_mode_0600_and_existing_files_are_kept_without_overwrite() {
    let tmp = TempDir::new("write");
    let dir = tmp.path().join("out");
    let files = [
        OutFile {
            name: "cert.pem",
            contents: "CERT",
            secret: false,
        },
        OutFile {
            name: "key.pem",
            contents: "KEY",
            secret: true,
        },
    ];

    write_files(&dir, &files, false).unwrap();

    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("key.pem"), 0o600);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o077,
        0
    );
    let again = [OutFile {
        name: "key.pem",
        contents: "OTHER",
        secret: true,
    }];
    let e = write_files(&dir, &again, false).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(dir.join("key.pem")).unwrap(), "KEY");

    write_files(&dir, &again, true).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        "OTHER"
    );
    assert_eq!(mode("key.pem"), 0o600);
}
