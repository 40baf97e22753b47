//! Tunnel version skew against a real gateway, with test doubles of other
//! versions' peers (`support/peer.rs`). docs/tunnel.md ("Versions and
//! ALPN") promises: the version is chosen by ALPN, newest first; a gateway
//! of version N also speaks N−1; with no common version the handshake fails
//! with `no_application_protocol` (QUIC error 0x0178).
//!
//! `meshfed/1` is the only version so far, so there is no N−1 framing to
//! keep yet. The doubles are therefore the two neighbours of today's
//! gateway: a *newer* peer (offers `meshfed/2, meshfed/1`, as version 2 will)
//! must be served in `meshfed/1`, and a peer of a version this gateway does
//! not speak (`meshfed/0`, standing for any version that has left the list)
//! must be refused with the documented error. When version 2 lands, its
//! gateway keeps a `meshfed/1` double here (the framing of today, the
//! library's `frame` module at that commit) and the first test becomes the
//! N−1 interoperability test.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/peer.rs"]
mod peer;

use meshfed_gateway::tunnel::frame::Frame;
use meshfed_tests::federation::*;

const SERVICE: &str = "ratings.default.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_peer_offering_meshfed_2_then_1_is_served_in_meshfed_1() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, _east, west) = two_clusters("ratings", backend, vec![]);
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let creds = peer::creds_from_dir(&pki.gateway("east", "v2"));
    let endpoint = peer::client(creds, &[b"meshfed/2", b"meshfed/1"], false);
    let conn = peer::connect(&endpoint, west.tunnel, "west").await.unwrap();
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap();
    assert_eq!(alpn, b"meshfed/1");
    match peer::exchange(&conn, &peer::encode(&peer::get_open(SERVICE, "ratings"))).await {
        Frame::Response(head) => assert_eq!(head.status, 200),
        other => panic!("expected RESPONSE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_no_common_version_is_refused_with_no_application_protocol() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, east, west) = two_clusters("ratings", backend, vec![]);
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let creds = peer::creds_from_dir(&pki.gateway("east", "v0"));
    let endpoint = peer::client(creds, &[b"meshfed/0"], false);
    let err = peer::connect(&endpoint, west.tunnel, "west")
        .await
        .expect_err("a peer with no common version was accepted");
    let text = err.to_string();
    match &err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(
                u64::from(close.error_code),
                0x0178,
                "TLS alert 120 (no_application_protocol): {text}"
            );
        }
        other => panic!("expected a CONNECTION_CLOSE 0x0178, got {other:?}"),
    }
    // The gateway is unaffected.
    assert_eq!(east.links_up("west"), 1);
}
