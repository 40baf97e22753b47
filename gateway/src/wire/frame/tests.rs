use super::*;

fn open_http() -> Open {
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("curl/8"));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    Open {
        kind: StreamKind::Http,
        service: "ratings.default.svc.cluster.local".into(),
        port: 9080,
        subset: Some("v2".into()),
        subset_labels: vec![("version".into(), "v2".into())],
        caller: Some("spiffe://cluster.local/ns/default/sa/productpage".into()),
        source_version: Some("abc123".into()),
        sni: None,
        http: Some(RequestHead {
            method: Method::POST,
            scheme: "http".into(),
            authority: "ratings".into(),
            path: "/ratings/1?x=y".into(),
            headers,
        }),
    }
}

fn all_frames() -> Vec<Frame> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert("grpc-message", HeaderValue::from_static("unavailable"));
    vec![
        Frame::Open(Box::new(open_http())),
        Frame::Open(Box::new(Open {
            kind: StreamKind::Tcp,
            http: None,
            subset: None,
            subset_labels: vec![],
            caller: None,
            source_version: None,
            ..open_http()
        })),
        Frame::Open(Box::new(Open {
            kind: StreamKind::Tcp,
            http: None,
            sni: Some("db.example.com".into()),
            ..open_http()
        })),
        Frame::Response(Box::new(ResponseHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        })),
        Frame::Data(Bytes::from_static(b"hello")),
        Frame::Data(Bytes::new()),
        Frame::Trailers(trailers),
        Frame::Error(StreamError {
            refusal: Refusal::NotExported,
            message: "ratings is not exported from west".into(),
        }),
        Frame::Accept,
        Frame::Announce(Bytes::from_static(b"{}")),
    ]
}

#[test]
fn every_frame_round_trips() {
    let mut buf = BytesMut::new();
    for f in all_frames() {
        encode(&f, &mut buf).unwrap();
    }
    for want in all_frames() {
        assert_eq!(decode(&mut buf).unwrap(), Some(want));
    }
    assert!(buf.is_empty());
    assert_eq!(decode(&mut buf).unwrap(), None);
}

#[test]
fn frames_decode_when_bytes_arrive_one_at_a_time() {
    let mut wire = BytesMut::new();
    for f in all_frames() {
        encode(&f, &mut wire).unwrap();
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in wire.iter() {
        buf.put_u8(*b);
        while let Some(f) = decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, all_frames());
}

#[test]
fn data_header_matches_the_encoder() {
    let mut a = BytesMut::new();
    encode(&Frame::Data(Bytes::from_static(b"abc")), &mut a).unwrap();
    let mut b = BytesMut::from(&data_header(3)[..]);
    b.extend_from_slice(b"abc");
    assert_eq!(a, b);
}

#[test]
fn oversized_frames_are_refused_before_they_are_buffered() {
    let mut buf = BytesMut::new();
    buf.put_u8(0x03);
    buf.put_u32((MAX_DATA_FRAME + 1) as u32);
    assert!(matches!(decode(&mut buf), Err(FrameError::TooLarge { .. })));
    let mut buf = BytesMut::new();
    buf.put_u8(0x01);
    buf.put_u32(u32::MAX);
    assert!(matches!(decode(&mut buf), Err(FrameError::TooLarge { .. })));
}

#[test]
fn unknown_frame_types_and_garbage_are_errors() {
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    assert!(matches!(
        decode(&mut buf),
        Err(FrameError::UnknownType(b'G'))
    ));
}

#[test]
fn unknown_optional_fields_are_skipped_and_critical_ones_refused() {
    let mut buf = BytesMut::new();
    encode(
        &Frame::Response(Box::new(ResponseHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        })),
        &mut buf,
    )
    .unwrap();
    // Append an optional field 0x7f to the RESPONSE block and fix its length.
    let mut with_optional = buf.clone();
    with_optional.extend_from_slice(&[0x7f, 0, 1, 42]);
    let len = (with_optional.len() - 5) as u32;
    with_optional[1..5].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode(&mut with_optional),
        Ok(Some(Frame::Response(_)))
    ));
    let mut with_critical = buf.clone();
    with_critical.extend_from_slice(&[0x81, 0, 0]);
    let len = (with_critical.len() - 5) as u32;
    with_critical[1..5].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        decode(&mut with_critical),
        Err(FrameError::UnknownCriticalField(0x81))
    );
}

#[test]
fn truncated_fields_and_missing_required_fields_are_errors() {
    // A RESPONSE whose status field claims 2 bytes but has 1.
    let mut buf = BytesMut::new();
    buf.put_u8(0x02);
    buf.put_u32(4);
    buf.extend_from_slice(&[0x20, 0, 2, 1]);
    assert_eq!(decode(&mut buf), Err(FrameError::Truncated { tag: 0x20 }));
    // A RESPONSE with no status.
    let mut buf = BytesMut::new();
    buf.put_u8(0x02);
    buf.put_u32(0);
    assert_eq!(decode(&mut buf), Err(FrameError::Missing("status")));
}

#[test]
fn invalid_header_names_are_refused() {
    let mut buf = BytesMut::new();
    buf.put_u8(0x04);
    let field = [&[0x14u8, 0, 7, 0, 3][..], b"a b", b"xy"].concat();
    buf.put_u32(field.len() as u32);
    buf.extend_from_slice(&field);
    assert!(matches!(
        decode(&mut buf),
        Err(FrameError::Malformed { tag: 0x14, .. })
    ));
}

#[test]
fn refusals_map_to_statuses_and_round_trip_their_codes() {
    for r in Refusal::ALL {
        assert_eq!(Refusal::from_code(r.code()), r);
    }
    assert_eq!(Refusal::NotExported.http_status(), StatusCode::NOT_FOUND);
    assert_eq!(Refusal::Timeout.http_status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(Refusal::from_code(999), Refusal::Internal);
}

#[test]
fn the_encoder_refuses_what_the_decoder_would_refuse_and_writes_nothing() {
    let mut headers = HeaderMap::new();
    for i in 0..600 {
        headers.append(
            HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    let mut buf = BytesMut::from(&b"kept"[..]);
    let too_many = Frame::Trailers(headers);
    assert_eq!(encode(&too_many, &mut buf), Err(FrameError::TooManyFields));
    let mut big = HeaderMap::new();
    big.insert(
        "x-big",
        HeaderValue::from_bytes(&vec![b'a'; 40_000]).unwrap(),
    );
    big.insert(
        "x-big-2",
        HeaderValue::from_bytes(&vec![b'a'; 40_000]).unwrap(),
    );
    assert!(matches!(
        encode(&Frame::Trailers(big), &mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    let data = Frame::Data(Bytes::from(vec![0u8; MAX_DATA_FRAME + 1]));
    assert!(matches!(
        encode(&data, &mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(&buf[..], b"kept", "nothing was written");
}

#[test]
fn an_open_without_a_scheme_is_refused_rather_than_given_one() {
    let mut open = open_http();
    let mut buf = BytesMut::new();
    encode(&Frame::Open(Box::new(open.clone())), &mut buf).unwrap();
    // Drop the SCHEME field (tag 0x11) by re-encoding by hand.
    open.http.as_mut().unwrap().scheme.clear();
    let mut wire = BytesMut::new();
    encode(&Frame::Open(Box::new(open)), &mut wire).unwrap();
    let without: Vec<u8> = {
        let payload = &wire[5..];
        let mut out = Vec::new();
        let mut p = 0;
        while p < payload.len() {
            let len = u16::from_be_bytes([payload[p + 1], payload[p + 2]]) as usize;
            if payload[p] != 0x11 {
                out.extend_from_slice(&payload[p..p + 3 + len]);
            }
            p += 3 + len;
        }
        out
    };
    let mut f = BytesMut::new();
    f.put_u8(0x01);
    f.put_u32(without.len() as u32);
    f.extend_from_slice(&without);
    assert_eq!(decode(&mut f), Err(FrameError::Missing("scheme")));
}

#[test]
fn sni_is_an_optional_field_older_opens_decode_without_it() {
    let tcp = Open {
        kind: StreamKind::Tcp,
        http: None,
        sni: None,
        ..open_http()
    };
    let mut old = BytesMut::new();
    encode(&Frame::Open(Box::new(tcp.clone())), &mut old).unwrap();
    // An OPEN as a peer without the SNI field writes it: no tag 0x08.
    assert!(!old[5..].windows(3).any(|w| w == [tag::SNI, 0, 14]));
    let Ok(Some(Frame::Open(o))) = decode(&mut old) else {
        panic!("an OPEN without SNI does not decode");
    };
    assert_eq!(o.sni, None);
    let with = Open {
        sni: Some("db.example.com".into()),
        ..tcp
    };
    let mut buf = BytesMut::new();
    encode(&Frame::Open(Box::new(with.clone())), &mut buf).unwrap();
    // The field is tag 0x08, below MUST_UNDERSTAND: older peers skip it.
    const { assert!(tag::SNI < tag::MUST_UNDERSTAND) };
    assert!(buf[5..].windows(3).any(|w| w == [tag::SNI, 0, 14]));
    assert_eq!(decode(&mut buf), Ok(Some(Frame::Open(Box::new(with)))));
}
