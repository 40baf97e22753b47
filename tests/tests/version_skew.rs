//! Tunnel version skew against a real gateway, with test doubles of other
//! versions' peers. docs/tunnel.md ("Versions and ALPN") promises: the
//! version is chosen by ALPN, newest first; a gateway of version N also
//! speaks N−1; with no common version the handshake fails with
//! `no_application_protocol` (QUIC error 0x0178); and within a version only
//! what an older peer can ignore may change.
//!
//! `meshfed/1` is the only ALPN id so far, but its framing has moved within
//! the version: the OPEN frame gained the optional SNI field (tag `0x08`).
//! `support/framing_n1.rs` keeps the framing from before that change as a
//! frozen, hand-written encoder and decoder that does not call the gateway's
//! `wire::frame`, and two tests drive it against a real gateway process
//! over real QUIC with mutual TLS, through to a real backend:
//!
//! - an N−1 *source* (a quinn client with a peer cluster's gateway
//!   credentials) reads today's announcements and gets an HTTP request with
//!   a streamed body and trailers, and a TCP stream, served;
//! - an N−1 *destination* (a quinn server with the destination cluster's
//!   gateway credentials, announcing like the old gateway) is dialed by
//!   today's gateway and decodes its OPEN frames, skipping the SNI field it
//!   does not know, and today's gateway decodes its answers.
//!
//! The other doubles (`support/peer.rs`, today's framing) are the
//! neighbours in ALPN: a *newer* peer (offers `meshfed/2, meshfed/1`) must
//! be served in `meshfed/1`, and a peer of a version this gateway does not
//! speak (`meshfed/0`) must be refused with the documented error.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/framing_n1.rs"]
mod n1;
#[path = "support/peer.rs"]
mod peer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshfed_gateway::wire::frame::Frame;
use meshfed_tests::federation::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// The caller a source gateway asserts: a workload of east's trust domain.
const CALLER: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// The N−1 HTTP OPEN for `method path` on `SERVICE`, every optional field
/// the old gateway sent included.
fn n1_http_open(method: &str, path: &str, headers: Vec<n1::Field>) -> n1::Frame {
    n1::Frame::Open(Box::new(n1::Open {
        kind: 1,
        service: SERVICE.into(),
        port: 80,
        caller: Some(CALLER.into()),
        source_version: Some("n-1-double".into()),
        http: Some(n1::Request {
            method: method.into(),
            scheme: "http".into(),
            authority: "ratings".into(),
            path: path.into(),
            headers,
        }),
        ..Default::default()
    }))
}

/// Reads frames until the stream ends; every frame must decode with the
/// N−1 decoder.
async fn n1_read_all(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> Vec<n1::Frame> {
    let mut frames = Vec::new();
    while let Some(f) = n1::read_frame(recv, buf).await {
        frames.push(f);
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_n_minus_1_source_reads_todays_announcements_and_gets_http_and_tcp_served() {
    let (backend, _b) = http_backend("ratings-west").await;
    let (dir, _east, west) = two_clusters("ratings", backend, vec![]);
    let pki = Pki {
        dir: dir.path().to_path_buf(),
    };
    let creds = peer::creds_from_dir(&pki.gateway("east", "n-1"));
    let endpoint = peer::client(creds, &[n1::ALPN], false);
    let conn = peer::connect(&endpoint, west.tunnel, "west").await.unwrap();

    // Today's control stream, read by the N−1 decoder: ANNOUNCE frames whose
    // JSON the old reader understands.
    let mut control = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
        .await
        .expect("west opened no control stream")
        .unwrap();
    let mut cbuf = Vec::new();
    let announcement = match n1::read_frame(&mut control, &mut cbuf).await {
        Some(n1::Frame::Announce(json)) => n1::decode_announcement(&json).unwrap(),
        other => panic!("expected ANNOUNCE on the control stream, got {other:?}"),
    };
    assert_eq!(announcement.cluster, "west");
    assert!(!announcement.draining);
    assert!(
        announcement.services.contains(&(SERVICE.to_string(), 1, 1)),
        "west announces {:?}",
        announcement.services
    );

    // HTTP: a POST whose body comes in two DATA frames, then trailers.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut request = n1::encode(&n1_http_open(
        "POST",
        "/ratings/7",
        vec![("content-type".into(), b"application/json".to_vec())],
    ));
    request.extend(n1::encode(&n1::Frame::Data(b"{\"stars\":".to_vec())));
    request.extend(n1::encode(&n1::Frame::Data(b"5}".to_vec())));
    request.extend(n1::encode(&n1::Frame::Trailers(vec![(
        "x-checksum".into(),
        b"c0ffee".to_vec(),
    )])));
    send.write_all(&request).await.unwrap();
    send.finish().unwrap();
    let mut buf = Vec::new();
    let frames = n1_read_all(&mut recv, &mut buf).await;
    let Some(n1::Frame::Response { status, headers }) = frames.first() else {
        panic!("expected RESPONSE first, got {frames:?}");
    };
    assert_eq!(*status, 200, "{frames:?}");
    assert!(
        headers.contains(&("x-served-by".into(), b"ratings-west".to_vec())),
        "{headers:?}"
    );
    let body: Vec<u8> = frames[1..]
        .iter()
        .filter_map(|f| match f {
            n1::Frame::Data(d) => Some(d.clone()),
            n1::Frame::Trailers(_) => None,
            other => panic!("unexpected frame in a response body: {other:?}"),
        })
        .flatten()
        .collect();
    assert_eq!(String::from_utf8_lossy(&body), "ratings-west:11");

    // TCP: OPEN (no CALLER, as N−1 sent none on TCP), ACCEPT, then raw
    // bytes both ways: an HTTP/1.1 exchange with the backend, unframed.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = n1::Frame::Open(Box::new(n1::Open {
        kind: 2,
        service: SERVICE.into(),
        port: 80,
        source_version: Some("n-1-double".into()),
        ..Default::default()
    }));
    send.write_all(&n1::encode(&open)).await.unwrap();
    let mut buf = Vec::new();
    match n1::read_frame(&mut recv, &mut buf).await {
        Some(n1::Frame::Accept) => {}
        other => panic!("expected ACCEPT, got {other:?}"),
    }
    send.write_all(b"GET /tcp HTTP/1.1\r\nhost: ratings\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    // No FIN yet: hyper closes a connection whose reading half ends, maybe
    // before it answers. `connection: close` makes the backend end it.
    let rest = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("the TCP stream did not end")
        .unwrap();
    let _ = send.finish();
    buf.extend(rest);
    let raw = String::from_utf8_lossy(&buf);
    assert!(
        raw.starts_with("HTTP/1.1 200") && raw.ends_with("ratings-west"),
        "{raw}"
    );
}

/// A TLS ClientHello for `server_name`, as rustls writes it.
fn client_hello(server_name: &str) -> Vec<u8> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// A quinn server with the gateway credentials in `dir`, requiring a client
/// certificate under the bundle's anchor, offering only the N−1 ALPN.
fn n1_server(dir: &std::path::Path) -> quinn::Endpoint {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let creds = peer::creds_from_dir(dir);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&creds.bundle).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain, creds.key)
        .unwrap();
    tls.alpn_protocols = vec![n1::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Serves one stream as the N−1 destination: decodes the OPEN, records it,
/// and answers HTTP with a RESPONSE and a DATA frame naming what it saw,
/// TCP with ACCEPT then a line about the first bytes that follow.
async fn n1_serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    opens: Arc<Mutex<Vec<n1::Open>>>,
) {
    let mut buf = Vec::new();
    let Some(n1::Frame::Open(open)) = n1::read_frame(&mut recv, &mut buf).await else {
        panic!("the stream did not start with an OPEN");
    };
    opens.lock().unwrap().push((*open).clone());
    if let Some(http) = &open.http {
        let body: usize = n1_read_all(&mut recv, &mut buf)
            .await
            .iter()
            .map(|f| match f {
                n1::Frame::Data(d) => d.len(),
                _ => 0,
            })
            .sum();
        let text = format!(
            "n-1 saw {} {} for {}, {body} body bytes",
            http.method, http.path, http.authority
        );
        let mut answer = n1::encode(&n1::Frame::Response {
            status: 200,
            headers: vec![
                ("content-type".into(), b"text/plain".to_vec()),
                ("x-served-by".into(), b"n-1-double".to_vec()),
            ],
        });
        answer.extend(n1::encode(&n1::Frame::Data(text.into_bytes())));
        send.write_all(&answer).await.unwrap();
    } else {
        send.write_all(&n1::encode(&n1::Frame::Accept))
            .await
            .unwrap();
        // Raw bytes: whatever followed the OPEN, then the first chunk.
        let mut got = std::mem::take(&mut buf);
        if got.is_empty()
            && let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await
        {
            got.extend_from_slice(&chunk.bytes);
        }
        let reply = format!("n-1 got {} raw bytes, first 0x{:02x}", got.len(), got[0]);
        send.write_all(reply.as_bytes()).await.unwrap();
    }
    let _ = send.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_gateway_sends_to_an_n_minus_1_destination_which_skips_the_sni_field() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // The N−1 destination: west's gateway, as the old release ran it.
    let server = n1_server(&pki.gateway("west", "n-1"));
    let west_port = server.local_addr().unwrap().port();
    let opens = Arc::new(Mutex::new(Vec::new()));
    let services = [
        "ratings.default.svc.cluster.local",
        "echo.default.svc.cluster.local",
    ];
    let double = tokio::spawn({
        let opens = opens.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                let Ok(conn) = incoming.await else { continue };
                let opens = opens.clone();
                tokio::spawn(async move {
                    // The control stream: an announcement at once and every
                    // 2 s (a link is available while one is under 16 s old).
                    let mut control = conn.open_uni().await.unwrap();
                    tokio::spawn(async move {
                        for seq in 1.. {
                            let json = n1::encode_announcement(seq, "west", &services, 1);
                            if control
                                .write_all(&n1::encode(&n1::Frame::Announce(json)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    });
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(n1_serve_stream(send, recv, opens.clone()));
                    }
                });
            }
        }
    });

    let east_port = free_udp_port();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let export = |name: &str| {
        format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: default}}\n"
        )
    };
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}{}{}",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port]).trim_end_matches("---\n"),
            export("ratings"),
            export("echo"),
        ),
    )
    .unwrap();
    let east = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy,
        discovery: None,
        tunnel_port: east_port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    });
    east.wait_links("west", 1);

    // HTTP through today's gateway to the N−1 destination and back.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/ratings/7?x=1", east.outbound))
        .header("host", "ratings")
        .header("x-request-tag", "skew")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{:?}\n{}",
        resp.headers(),
        east.log_tail()
    );
    assert_eq!(resp.headers()["x-served-by"], "n-1-double");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "n-1 saw GET /ratings/7?x=1 for ratings, 0 body bytes"
    );

    // TLS routed by SNI: today's OPEN carries tag 0x08, which N−1 skips.
    let hello = client_hello("echo.default.svc.cluster.local");
    let mut tcp = tokio::net::TcpStream::connect(east.outbound).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("the TCP stream through the tunnel did not end")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("n-1 got {} raw bytes, first 0x16", hello.len())
    );

    let opens = opens.lock().unwrap().clone();
    double.abort();
    let [http_open, tcp_open] = &opens[..] else {
        panic!("expected two OPENs, got {opens:?}");
    };
    // Today's HTTP OPEN uses only fields N−1 knows.
    assert_eq!(http_open.kind, 1);
    assert_eq!(http_open.service, "ratings.default.svc.cluster.local");
    assert!(http_open.skipped.is_empty(), "{http_open:?}");
    let head = http_open.http.as_ref().unwrap();
    assert!(
        head.headers
            .contains(&("x-request-tag".into(), b"skew".to_vec())),
        "{head:?}"
    );
    // Today's TCP OPEN carries the SNI as optional tag 0x08, and N−1
    // skipped it and decoded the rest.
    assert_eq!(tcp_open.kind, 2);
    assert_eq!(tcp_open.service, "echo.default.svc.cluster.local");
    assert_eq!(
        tcp_open.skipped,
        vec![(0x08, b"echo.default.svc.cluster.local".to_vec())]
    );
}

/// Today's encoder against the frozen decoder, frame by frame: an OPEN with
/// every field today's gateway can write (SNI included) decodes, with the
/// SNI skipped and nothing else lost; and N−1's own bytes decode with
/// today's decoder into the same request.
#[test]
fn todays_frames_decode_with_the_n_minus_1_decoder_and_back() {
    use meshfed_gateway::wire::frame::{self, Open, RequestHead, StreamKind};
    let today = Open {
        kind: StreamKind::Tcp,
        service: "echo.default.svc.cluster.local".into(),
        port: 443,
        subset: Some("v2".into()),
        subset_labels: vec![("version".into(), "v2".into())],
        caller: Some(CALLER.into()),
        source_version: Some("3f2c9e1".into()),
        sni: Some("echo.example.com".into()),
        http: None,
    };
    let mut wire = bytes::BytesMut::new();
    frame::encode(&Frame::Open(Box::new(today.clone())), &mut wire).unwrap();
    let mut buf = wire.to_vec();
    let Ok(Some(n1::Frame::Open(old))) = n1::decode(&mut buf) else {
        panic!("N−1 refused today's TCP OPEN");
    };
    assert!(buf.is_empty());
    assert_eq!(
        *old,
        n1::Open {
            kind: 2,
            service: today.service.clone(),
            port: 443,
            subset: Some("v2".into()),
            subset_labels: vec![("version".into(), "v2".into())],
            caller: Some(CALLER.into()),
            source_version: Some("3f2c9e1".into()),
            http: None,
            skipped: vec![(0x08, b"echo.example.com".to_vec())],
        }
    );

    // N−1's HTTP OPEN, decoded today: the same request, no SNI.
    let old = n1_http_open(
        "PATCH",
        "/ratings/7?x=1",
        vec![("content-type".into(), b"application/json".to_vec())],
    );
    let mut wire = bytes::BytesMut::from(&n1::encode(&old)[..]);
    let Ok(Some(Frame::Open(now))) = frame::decode(&mut wire) else {
        panic!("today's decoder refused N−1's HTTP OPEN");
    };
    assert_eq!(
        *now,
        Open {
            kind: StreamKind::Http,
            service: SERVICE.into(),
            port: 80,
            subset: None,
            subset_labels: vec![],
            caller: Some(CALLER.into()),
            source_version: Some("n-1-double".into()),
            sni: None,
            http: Some(RequestHead {
                method: http::Method::PATCH,
                scheme: "http".into(),
                authority: "ratings".into(),
                path: "/ratings/7?x=1".into(),
                headers: {
                    let mut h = http::HeaderMap::new();
                    h.append("content-type", "application/json".parse().unwrap());
                    h
                },
            }),
        }
    );
    // And N−1 writes byte for byte what today's encoder writes for a
    // request without SNI: the change added a field, it moved nothing.
    let mut again = bytes::BytesMut::new();
    frame::encode(&Frame::Open(now), &mut again).unwrap();
    assert_eq!(again.to_vec(), n1::encode(&old));
}
