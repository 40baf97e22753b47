#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use super::*;

#[path = "../../../tests/support/client_hello.rs"]
mod client_hello;

use client_hello::{hello_message, records, sni_extension as sni_ext};

/// A post-quantum-sized hello: a 1,216-byte key share (X25519MLKEM768),
/// padding, and the server name last.
fn big_hello_sni_last(name: &str) -> Vec<u8> {
    let msg = hello_message(&[
        (0x0033, vec![0x11; 1216 + 36]),
        (0x0015, vec![0; 300]),
        sni_ext(name.as_bytes()),
    ]);
    records(&msg, MAX_RECORD)
}

#[test]
fn sni_is_read_from_a_real_client_hello() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("Ratings.default.svc.cluster.local").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(
        client_hello(&hello),
        Hello::Sni("ratings.default.svc.cluster.local".into())
    );
    assert_eq!(
        classify(&hello),
        Step::Done(Detected::Tls {
            sni: Some("ratings.default.svc.cluster.local".into())
        })
    );
}

#[test]
fn a_hello_over_1_kib_with_the_server_name_last_is_read_once_all_of_it_is_here() {
    let hello = big_hello_sni_last("ratings.default");
    assert!(hello.len() > 1500, "{}", hello.len());
    assert_eq!(client_hello(&hello), Hello::Sni("ratings.default".into()));
    // Every cut before the end waits for more, asking for more than it has.
    for cut in 0..hello.len() {
        match client_hello(&hello[..cut]) {
            Hello::Incomplete { need } => {
                assert!(need > cut && need <= MAX_HELLO, "cut {cut}: need {need}")
            }
            other => panic!("cut at {cut} of {}: {other:?}", hello.len()),
        }
    }
    // What the listener peeked before: 1,024 bytes hold no name.
    assert!(matches!(
        client_hello(&hello[..1024]),
        Hello::Incomplete { need } if need == hello.len()
    ));
}

#[test]
fn a_hello_spanning_several_records_is_reassembled() {
    let msg = hello_message(&[(0x0015, vec![0; 900]), sni_ext(b"db.example.com")]);
    for size in [1, 3, 100, 512] {
        let hello = records(&msg, size);
        assert_eq!(
            client_hello(&hello),
            Hello::Sni("db.example.com".into()),
            "records of {size}"
        );
        for cut in [0, 4, 5, 6, hello.len() / 2, hello.len() - 1] {
            assert!(
                matches!(client_hello(&hello[..cut]), Hello::Incomplete { need } if need > cut),
                "records of {size}, cut at {cut}"
            );
        }
    }
}

#[test]
fn a_whole_hello_without_a_server_name_is_absent_not_incomplete() {
    let hello = records(&hello_message(&[(0x0015, vec![0; 10])]), MAX_RECORD);
    assert_eq!(client_hello(&hello), Hello::Absent);
    assert_eq!(classify(&hello), Step::Done(Detected::Tls { sni: None }));
    // No extensions at all (TLS 1.2 allows it).
    let mut msg = hello_message(&[]);
    msg.truncate(msg.len() - 2);
    let len = (msg.len() - 4) as u32;
    msg[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    assert_eq!(client_hello(&records(&msg, MAX_RECORD)), Hello::Absent);
}

#[test]
fn malformed_hellos_say_what_is_wrong() {
    let good = hello_message(&[sni_ext(b"a.example")]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a handshake record", {
            // The hello's first 10 bytes, then an application data record.
            let mut two = records(&good[..10], MAX_RECORD);
            two.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
            two
        }),
        (
            "record length out of range",
            vec![0x16, 0x03, 0x01, 0x40, 0x01, 0x01],
        ),
        (
            "record length out of range",
            vec![0x16, 0x03, 0x01, 0x00, 0x00],
        ),
        (
            "not a ClientHello",
            records(&[0x02, 0, 0, 1, 0], MAX_RECORD),
        ),
        ("host name that is not a DNS name", {
            records(&hello_message(&[sni_ext(b"a/b")]), MAX_RECORD)
        }),
        ("host name that is empty", {
            records(&hello_message(&[sni_ext(b"")]), MAX_RECORD)
        }),
        ("two server_name extensions", {
            records(
                &hello_message(&[sni_ext(b"a.b"), sni_ext(b"c.d")]),
                MAX_RECORD,
            )
        }),
        ("runs past the extension list", {
            let mut m = good.clone();
            // The server_name extension's length, made too long.
            let at = m.len() - sni_ext(b"a.example").1.len() - 2;
            m[at] = 0xff;
            records(&m, MAX_RECORD)
        }),
        ("session id over 32 bytes", {
            let mut m = good.clone();
            m[4 + 2 + 32] = 33;
            records(&m, MAX_RECORD)
        }),
    ];
    for (want, bytes) in cases {
        match client_hello(&bytes) {
            Hello::Malformed(why) => assert!(why.contains(want), "{want}: {why}"),
            other => panic!("{want}: {other:?}"),
        }
    }
}

#[test]
fn hellos_over_16_kib_are_read_up_to_the_bound() {
    // The name early in a 20 KiB hello: found in the first 16 KiB.
    let early = records(
        &hello_message(&[sni_ext(b"early.example"), (0x0015, vec![0; 20_000])]),
        MAX_RECORD,
    );
    assert!(matches!(
        client_hello(&early[..1000]),
        Hello::Incomplete { .. }
    ));
    assert_eq!(
        client_hello(&early[..MAX_HELLO]),
        Hello::Sni("early.example".into())
    );
    assert_eq!(client_hello(&early), Hello::Sni("early.example".into()));
    // The name after 16 KiB: refused, never waited for.
    let late = records(
        &hello_message(&[(0x0015, vec![0; 20_000]), sni_ext(b"late.example")]),
        MAX_RECORD,
    );
    assert!(matches!(client_hello(&late), Hello::Malformed(why) if why.contains("16 KiB")));
    assert_eq!(at_deadline(&late), Detected::Tls { sni: None });
}

#[test]
fn http_and_opaque_bytes_are_classified_as_before() {
    assert_eq!(classify(b""), Step::Need(1));
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Step::Done(Detected::Http));
    assert_eq!(classify(H2_PREFACE), Step::Done(Detected::Http));
    assert_eq!(classify(b"CONNECT "), Step::Done(Detected::Http));
    assert_eq!(classify(b"GE"), Step::Need(3));
    assert_eq!(classify(b"SSH-2.0-OpenSSH"), Step::Done(Detected::Opaque));
    assert_eq!(classify(b"get / HTTP/1.1"), Step::Done(Detected::Opaque));
    assert_eq!(classify(&[b'A'; 17]), Step::Done(Detected::Opaque));
    assert_eq!(classify(&[0x16, 0x01]), Step::Done(Detected::Opaque));
    assert_eq!(classify(&[0x16]), Step::Need(5));
    assert_eq!(at_deadline(b"GE"), Detected::Opaque);
    assert_eq!(at_deadline(&[0x16, 0x03]), Detected::Tls { sni: None });
}

#[test]
fn the_h2_preface_is_recognised_in_pieces_of_any_size() {
    for piece in 1..=H2_PREFACE.len() {
        let mut p = Preface::default();
        let mut got = Vec::new();
        for chunk in H2_PREFACE.chunks(piece) {
            got.extend(p.feed(chunk));
        }
        assert_eq!(got, [PrefaceIs::H2], "pieces of {piece}");
        assert_eq!(p.feed(b"more"), None);
    }
    let mut p = Preface::default();
    assert_eq!(p.feed(b"PRI * HTTP/2"), None);
    assert!(!p.decided());
    assert_eq!(p.feed(b".1"), Some(PrefaceIs::Other));
    assert!(p.decided());
    let mut p = Preface::default();
    assert_eq!(p.feed(b"GET / HTTP/1.1\r\n"), Some(PrefaceIs::Other));
    assert_eq!(p.feed(b""), None);
}
