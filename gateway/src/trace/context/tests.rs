use super::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
const SPAN: u64 = 0x00f067aa0ba902b7;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn w3c_traceparent_is_read_with_its_sampled_flag() {
    let e = extract(&headers(&[(TRACEPARENT, TP)]));
    assert_eq!(
        e.parent,
        Some(Ids {
            trace_id: TRACE,
            span_id: SPAN
        })
    );
    assert_eq!(e.sampled, Some(true));
    assert!(e.from_traceparent);
    let e = extract(&headers(&[(TRACEPARENT, &TP.replace("-01", "-00"))]));
    assert_eq!(e.sampled, Some(false));
}

#[test]
fn malformed_traceparents_are_ignored() {
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // v00 with extra
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // misplaced dash
        "garbage",
    ] {
        assert_eq!(parse_traceparent(bad), None, "{bad}");
    }
    // A later version may append fields.
    assert!(parse_traceparent(&format!("01{}-extra", &TP[2..])).is_some());
    // Two traceparents: invalid, so no parent.
    let e = extract(&headers(&[(TRACEPARENT, TP), (TRACEPARENT, TP)]));
    assert_eq!(e.parent, None);
}

#[test]
fn b3_single_and_multi_are_read_when_there_is_no_traceparent() {
    let e = extract(&headers(&[(
        B3,
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    )]));
    assert_eq!(
        e.parent.unwrap().trace_id,
        0x80f198ee56343ba864fe8b2a57d3eff7
    );
    assert_eq!(e.parent.unwrap().span_id, 0xe457b5a2e4d86bd1);
    assert_eq!(e.sampled, Some(true));
    assert!(e.b3_single && !e.from_traceparent && !e.b3_trace_id_64);

    let e = extract(&headers(&[
        (B3_TRACE_ID, "64fe8b2a57d3eff7"),
        (B3_SPAN_ID, "e457b5a2e4d86bd1"),
        (B3_SAMPLED, "0"),
    ]));
    assert_eq!(e.parent.unwrap().trace_id, 0x64fe8b2a57d3eff7);
    assert_eq!(e.sampled, Some(false));
    assert!(e.b3_multi && e.b3_trace_id_64);

    // Debug means sampled; no sampled header defers the decision.
    let e = extract(&headers(&[
        (B3_TRACE_ID, "64fe8b2a57d3eff7"),
        (B3_SPAN_ID, "e457b5a2e4d86bd1"),
        (B3_FLAGS, "1"),
    ]));
    assert_eq!(e.sampled, Some(true));
    let e = extract(&headers(&[(B3, "64fe8b2a57d3eff7-e457b5a2e4d86bd1")]));
    assert_eq!(e.sampled, None);
    assert!(e.parent.is_some());
    // A lone sampling state: a decision without a trace.
    let e = extract(&headers(&[(B3, "0")]));
    assert_eq!((e.parent, e.sampled), (None, Some(false)));
}

#[test]
fn inject_makes_the_new_span_the_parent_in_every_format_that_arrived() {
    let mut h = headers(&[
        (TRACEPARENT, TP),
        (TRACESTATE, "congo=t61rcWkgMzE"),
        (B3, "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
        (B3_TRACE_ID, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (B3_SPAN_ID, "00f067aa0ba902b7"),
        (B3_SAMPLED, "1"),
    ]);
    let seen = extract(&h);
    let next = Ids {
        trace_id: TRACE,
        span_id: 0x1111111111111111,
    };
    inject(&mut h, &seen, next, true);
    assert_eq!(
        h[TRACEPARENT],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
    );
    assert_eq!(h[TRACESTATE], "congo=t61rcWkgMzE");
    assert_eq!(
        h[B3],
        "4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-1-00f067aa0ba902b7"
    );
    assert_eq!(h[B3_SPAN_ID], "1111111111111111");
    assert_eq!(h[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
    assert_eq!(h[B3_SAMPLED], "1");
    // What was written reads back as the new span.
    let again = extract(&h);
    assert_eq!(again.parent, Some(next));
}

#[test]
fn a_new_trace_gets_a_traceparent_and_drops_a_foreign_tracestate() {
    let mut h = headers(&[(TRACESTATE, "congo=t61rcWkgMzE")]);
    let seen = extract(&h);
    let next = Ids {
        trace_id: 7,
        span_id: 9,
    };
    inject(&mut h, &seen, next, false);
    assert_eq!(
        h[TRACEPARENT],
        "00-00000000000000000000000000000007-0000000000000009-00"
    );
    assert!(h.get(TRACESTATE).is_none());
    assert!(h.get(B3).is_none() && h.get(B3_TRACE_ID).is_none());
}

#[test]
fn b3_64_bit_trace_ids_keep_their_width() {
    let mut h = headers(&[
        (B3_TRACE_ID, "64fe8b2a57d3eff7"),
        (B3_SPAN_ID, "e457b5a2e4d86bd1"),
    ]);
    let seen = extract(&h);
    let next = Ids {
        trace_id: 0x64fe8b2a57d3eff7,
        span_id: 0x22,
    };
    inject(&mut h, &seen, next, true);
    assert_eq!(h[B3_TRACE_ID], "64fe8b2a57d3eff7");
    assert_eq!(h[B3_PARENT_SPAN_ID], "e457b5a2e4d86bd1");
    assert_eq!(
        h[TRACEPARENT],
        "00-000000000000000064fe8b2a57d3eff7-0000000000000022-01"
    );
}
