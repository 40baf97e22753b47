use std::io::IoSliceMut;

use quinn::ConnectionIdGenerator;
use quinn::udp::RecvMeta;
use quinn_proto::HashedConnectionIdGenerator;

use super::{Classifier, DatagramDrops, Verdict, split_batches, take_split};

const KEY: u64 = 0x5eed_cafe_f00d_d00d;

/// A connection ID this endpoint issued.
fn ours() -> Vec<u8> {
    HashedConnectionIdGenerator::from_key(KEY)
        .generate_cid()
        .to_vec()
}

/// One another endpoint (another key) issued.
fn theirs() -> Vec<u8> {
    HashedConnectionIdGenerator::from_key(!KEY)
        .generate_cid()
        .to_vec()
}

fn short_header(cid: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0x41];
    p.extend_from_slice(cid);
    p.resize(len, 0xaa);
    p
}

/// A long header: `ty` 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry.
fn long_header(ty: u8, version: u32, dcid: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0 | (ty << 4)];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[7; 8]);
    p.resize(len.max(p.len()), 0);
    p
}

#[test]
fn what_quinn_would_take_passes() {
    let c = Classifier::new(KEY);
    // Short headers for our connection IDs, whatever their length.
    assert_eq!(c.classify(&short_header(&ours(), 9)), Verdict::Pass);
    assert_eq!(c.classify(&short_header(&ours(), 1400)), Verdict::Pass);
    // A client's Initial (its own random ID) padded to 1,200, and anything
    // longer.
    assert_eq!(
        c.classify(&long_header(0, 1, &theirs(), 1200)),
        Verdict::Pass
    );
    assert_eq!(
        c.classify(&long_header(0, 1, &[9; 20], 1472)),
        Verdict::Pass
    );
    // A server's short Initial (an ACK) to our own dial: our ID.
    assert_eq!(c.classify(&long_header(0, 1, &ours(), 60)), Verdict::Pass);
    // Handshake, 0-RTT and Retry of any size: quinn routes them.
    for ty in 1..=3 {
        assert_eq!(
            c.classify(&long_header(ty, 1, &theirs(), 50)),
            Verdict::Pass
        );
    }
    // Drafts quinn still speaks.
    assert_eq!(
        c.classify(&long_header(2, 0xff00_001d, &theirs(), 50)),
        Verdict::Pass
    );
    // Version Negotiation answering our dial.
    assert_eq!(c.classify(&long_header(0, 0, &ours(), 40)), Verdict::Pass);
}

#[test]
fn a_clear_quic_bit_a_cut_header_or_nothing_is_not_quic() {
    let c = Classifier::new(KEY);
    assert_eq!(c.classify(&[]), Verdict::NotQuic);
    // TLS over TCP's first record, sent to the UDP port.
    assert_eq!(c.classify(b"\x16\x03\x01\x00\x05hello"), Verdict::NotQuic);
    assert_eq!(c.classify(&[0u8; 1200]), Verdict::NotQuic);
    let mut p = short_header(&ours(), 40);
    p[0] &= !0x40;
    assert_eq!(c.classify(&p), Verdict::NotQuic, "greasing is off");
    let mut p = long_header(0, 1, &ours(), 1200);
    p[0] &= !0x40;
    assert_eq!(c.classify(&p), Verdict::NotQuic);
    // Too short for a connection ID or a version.
    assert_eq!(c.classify(&short_header(&ours(), 8)), Verdict::NotQuic);
    assert_eq!(c.classify(&[0xc0, 0, 0, 0]), Verdict::NotQuic);
}

#[test]
fn a_version_quinn_does_not_speak_is_unsupported_version() {
    let c = Classifier::new(KEY);
    for v in [2, 0x6b33_43cf, 0x0a1a_2a3a, 0xff00_001c, u32::MAX] {
        for len in [40, 1200] {
            assert_eq!(
                c.classify(&long_header(0, v, &theirs(), len)),
                Verdict::UnsupportedVersion,
                "version {v:#x}, {len} bytes"
            );
        }
    }
}

#[test]
fn an_initial_under_1200_bytes_for_an_id_we_did_not_issue_is_short_initial() {
    let c = Classifier::new(KEY);
    assert_eq!(
        c.classify(&long_header(0, 1, &theirs(), 1199)),
        Verdict::ShortInitial
    );
    assert_eq!(
        c.classify(&long_header(0, 1, &[1; 20], 300)),
        Verdict::ShortInitial
    );
    assert_eq!(
        c.classify(&long_header(0, 1, &[], 100)),
        Verdict::ShortInitial
    );
    // A connection ID length past the datagram's end.
    let mut p = long_header(0, 1, &ours(), 30);
    p[5] = 200;
    assert_eq!(c.classify(&p), Verdict::ShortInitial);
}

#[test]
fn a_short_header_for_an_id_we_never_issued_is_unknown_cid() {
    let c = Classifier::new(KEY);
    assert_eq!(
        c.classify(&short_header(&theirs(), 60)),
        Verdict::UnknownCid
    );
    // Plaintext whose first byte happens to have the QUIC bit ('G', 0x47).
    assert_eq!(c.classify(b"GET / HTTP/1.1\r\n\r\n"), Verdict::UnknownCid);
    // A restarted gateway (a new key) does not know its old IDs.
    let restarted = Classifier::new(KEY.wrapping_add(1));
    assert_eq!(
        restarted.classify(&short_header(&ours(), 60)),
        Verdict::UnknownCid
    );
}

/// A receive batch: a GRO buffer of three plaintext datagrams (dropped
/// whole), then a GRO buffer mixing garbage and a packet of ours (kept
/// whole, each datagram counted), an empty datagram (dropped), then a lone
/// packet of ours.
#[test]
fn a_batch_is_classified_datagram_by_datagram_and_all_garbage_buffers_are_dropped() {
    let c = Classifier::new(KEY);
    let drops = DatagramDrops::default();
    let stride = 40;
    let mut a: Vec<u8> = [vec![0x10; stride], vec![0x20; stride], vec![0x30; 7]].concat();
    let mut b: Vec<u8> = [
        vec![0x00; stride],
        short_header(&ours(), stride),
        short_header(&theirs(), stride),
    ]
    .concat();
    let mut empty = vec![0u8; 16];
    let mut last = short_header(&ours(), 30);
    let marker = last.clone();
    let meta_of = |len, stride| RecvMeta {
        len,
        stride,
        ..RecvMeta::default()
    };
    let mut meta = [
        meta_of(a.len(), stride),
        meta_of(b.len(), stride),
        meta_of(0, 0),
        meta_of(last.len(), last.len()),
    ];
    let (a_len, b_len) = (a.len(), b.len());
    let mut bufs = [
        IoSliceMut::new(&mut a),
        IoSliceMut::new(&mut b),
        IoSliceMut::new(&mut empty),
        IoSliceMut::new(&mut last),
    ];
    let kept = c.filter(&drops, &mut bufs, &mut meta, 4);
    assert_eq!(kept, 2);
    assert_eq!((meta[0].len, meta[1].len), (b_len, marker.len()));
    assert_eq!(bufs[0][0..stride], [0x00; 40][..]);
    assert_eq!(bufs[1][..meta[1].len], marker[..]);
    assert_eq!(
        (meta[2].len, meta[3].len),
        (0, a_len),
        "the dropped buffers moved behind"
    );
    assert_eq!(
        drops.snapshot(),
        vec![
            ("not_quic", 5),
            ("unsupported_version", 0),
            ("short_initial", 0),
            ("unknown_cid", 1),
        ]
    );
}

/// The datagrams handed over, as (len, stride, bytes).
fn handed(bufs: &[IoSliceMut<'_>], meta: &[RecvMeta], used: usize) -> Vec<(usize, usize, Vec<u8>)> {
    (0..used)
        .map(|i| (meta[i].len, meta[i].stride, bufs[i][..meta[i].len].to_vec()))
        .collect()
}

fn meta_of(len: usize, stride: usize) -> RecvMeta {
    RecvMeta {
        len,
        stride,
        ..RecvMeta::default()
    }
}

/// A coalesced batch becomes one buffer per datagram, in the order they
/// arrived: the first stays, the next fill the free buffers; what does not
/// fit waits in the queue, with every buffer received after it, and comes
/// out first at the next receive; a buffer of one datagram is left alone.
/// (Before the fix the single datagram received after the batch was handed
/// over before the batch's tail: 1, 9, 2, 3, then 4.)
#[test]
fn a_coalesced_batch_is_split_into_one_buffer_per_datagram_in_arrival_order() {
    let stride = 4;
    // Buffer 0: a batch of 4 datagrams (the last one short); buffer 1: one
    // datagram; buffers 2 and 3: free, 8 bytes each.
    let mut a: Vec<u8> = [&[1u8; 4][..], &[2; 4], &[3; 4], &[4; 2]].concat();
    let mut b = vec![9u8; 3];
    let (mut f1, mut f2) = (vec![0u8; 8], vec![0u8; 8]);
    let mut meta = [
        meta_of(a.len(), stride),
        meta_of(3, 3),
        RecvMeta::default(),
        RecvMeta::default(),
    ];
    let mut bufs = [
        IoSliceMut::new(&mut a),
        IoSliceMut::new(&mut b),
        IoSliceMut::new(&mut f1),
        IoSliceMut::new(&mut f2),
    ];
    let mut rest = std::collections::VecDeque::new();
    let used = split_batches(&mut bufs, &mut meta, 2, &mut rest);
    assert_eq!(
        handed(&bufs, &meta, used),
        vec![(4, 4, vec![1; 4]), (4, 4, vec![2; 4]), (4, 4, vec![3; 4])]
    );
    assert_eq!(
        rest.len(),
        2,
        "the batch's tail and what came after it wait"
    );
    // The next receive hands them over first, in order.
    let used = take_split(&mut bufs, &mut meta, &mut rest);
    assert_eq!(
        handed(&bufs, &meta, used),
        vec![(2, 2, vec![4; 2]), (3, 3, vec![9; 3])]
    );
    assert!(rest.is_empty());
}

/// Two batches received at once, with room for all: every datagram of the
/// first comes before any of the second (the old split gave 1, 3, 2, 4,
/// and quinn's peer read the gap as loss).
#[test]
fn two_batches_received_at_once_keep_their_order() {
    let mut a: Vec<u8> = [&[1u8; 4][..], &[2; 4]].concat();
    let mut b: Vec<u8> = [&[3u8; 4][..], &[4; 4], &[5; 1]].concat();
    let (mut f1, mut f2, mut f3) = (vec![0u8; 8], vec![0u8; 8], vec![0u8; 8]);
    let mut meta = [
        meta_of(8, 4),
        meta_of(9, 4),
        RecvMeta::default(),
        RecvMeta::default(),
        RecvMeta::default(),
    ];
    let mut bufs = [
        IoSliceMut::new(&mut a),
        IoSliceMut::new(&mut b),
        IoSliceMut::new(&mut f1),
        IoSliceMut::new(&mut f2),
        IoSliceMut::new(&mut f3),
    ];
    let mut rest = std::collections::VecDeque::new();
    let used = split_batches(&mut bufs, &mut meta, 2, &mut rest);
    assert_eq!(
        handed(&bufs, &meta, used),
        vec![
            (4, 4, vec![1; 4]),
            (4, 4, vec![2; 4]),
            (4, 4, vec![3; 4]),
            (4, 4, vec![4; 4]),
            (1, 1, vec![5; 1]),
        ]
    );
    assert!(rest.is_empty());
}
