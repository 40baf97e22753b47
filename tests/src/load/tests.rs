use std::time::Duration;

use super::client::{Completed, Failure, grpc_frame, grpc_message};
use super::report::{Recorder, json_string};
use super::*;

#[test]
fn intended_send_times_are_exact_multiples_of_the_interval() {
    assert_eq!(offset(0, 1000), Some(Duration::ZERO));
    assert_eq!(offset(1, 1000), Some(Duration::from_millis(1)));
    assert_eq!(offset(3, 3), Some(Duration::from_secs(1)));
    // No drift after a day at 100k req/s.
    assert_eq!(
        offset(8_640_000_000, 100_000),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(offset(0, 0), None, "rate 0 sends nothing");
}

#[test]
fn grpc_messages_have_the_requested_size_from_six_bytes() {
    assert!(grpc_message(0).is_empty());
    for size in [1, 5] {
        assert_eq!(grpc_message(size).len(), 6, "size {size}");
    }
    for size in [6, 7, 100, 133, 134, 135, 1024, 16_390, 100_000] {
        assert_eq!(grpc_message(size).len(), size, "size {size}");
    }
}

#[test]
fn grpc_frame_is_an_uncompressed_length_prefixed_message() {
    let frame = grpc_frame(1024);
    assert_eq!(frame[0], 0, "compressed flag");
    assert_eq!(
        u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]),
        1024
    );
    assert_eq!(frame.len(), 5 + 1024);
    assert_eq!(&grpc_frame(0)[..], &[0, 0, 0, 0, 0]);
}

#[test]
fn grpc_padding_is_one_unknown_length_delimited_field() {
    let message = grpc_message(300);
    // Tag: field 2^29-1, wire type 2, as a 5-byte varint.
    assert_eq!(&message[..5], &[0xfa, 0xff, 0xff, 0xff, 0x0f]);
    // Length: 300 - 5 - 2 = 293 as a 2-byte varint.
    assert_eq!(&message[5..7], &[0xa5, 0x02]);
    assert!(message[7..].iter().all(|&b| b == 0));
}

#[test]
fn invalid_specs_are_refused_with_what_is_wrong() {
    let good = LoadSpec::default();
    assert_eq!(good.validate(), Ok(()));
    let cases = [
        (
            LoadSpec {
                path: "no-slash".into(),
                ..good.clone()
            },
            "path",
        ),
        (
            LoadSpec {
                headers: vec![("bad name".into(), "v".into())],
                ..good.clone()
            },
            "header name",
        ),
        (
            LoadSpec {
                authority: "a\nb".into(),
                ..good.clone()
            },
            "authority",
        ),
        (
            LoadSpec {
                tally_header: Some("x y".into()),
                ..good.clone()
            },
            "tally header",
        ),
    ];
    for (spec, what) in cases {
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn json_strings_are_escaped() {
    assert_eq!(json_string("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
}

#[tokio::test]
async fn rate_0_sends_nothing_for_the_duration() {
    let report = run(LoadSpec {
        rate: 0,
        duration: Duration::from_millis(20),
        ..LoadSpec::default()
    })
    .await;
    assert_eq!((report.sent, report.ok, report.failed), (0, 0, 0));
    assert!(report.elapsed >= Duration::from_millis(20));
}

#[tokio::test]
async fn an_invalid_spec_fails_every_request_with_its_reason() {
    let spec = LoadSpec {
        path: "nope".into(),
        rate: 1000,
        duration: Duration::from_millis(20),
        ..LoadSpec::default()
    };
    let report = run(spec).await;
    assert_eq!(report.sent, 20);
    assert_eq!(report.failed, 20);
    let (reason, _) = report.failures.iter().next().unwrap();
    assert!(reason.starts_with("invalid spec: path"), "{report}");
}

#[test]
fn grpc_length_prefix_is_padded_where_no_minimal_varint_fits() {
    // 134 = 5 (tag) + 1 + 128 is impossible (128 needs 2 bytes), so the
    // length 127 is written as the redundant varint ff 00.
    let message = grpc_message(134);
    assert_eq!(&message[5..7], &[0xff, 0x00]);
    assert_eq!(message.len() - 7, 127);
}

#[test]
fn the_table_and_json_show_counts_reasons_percentiles_and_tally() {
    let recorder = Recorder::new(Some("x-served-by".into()));
    let answered = |status, tally: &str, result| Completed {
        status: Some(status),
        tally: Some(tally.to_string()),
        result,
    };
    for _ in 0..3 {
        recorder.record(
            Some(Duration::from_micros(400)),
            answered(200, "east", Ok(())),
        );
    }
    recorder.record(
        Some(Duration::from_millis(2)),
        answered(503, "west", Err(Failure::Status(503))),
    );
    recorder.record(None, Completed::failed(Failure::Timeout));
    let report = recorder.finish(5, Duration::from_secs(1));

    assert_eq!((report.sent, report.ok, report.failed), (5, 3, 2));
    assert_eq!(report.failures_of("status 503"), 1);
    assert_eq!(report.latency.len(), 4, "timeouts have no latency");
    assert_eq!(report.achieved_rate(), 5.0);
    let table = report.to_string();
    for row in [
        "sent",
        "(5.0/s over 1.000s)",
        "  status 503",
        "  timeout",
        "p50",
        "p99.9",
        "max",
        "by x-served-by",
        "  east",
        "  west",
    ] {
        assert!(table.contains(row), "{row:?} missing from\n{table}");
    }
    let json = report.to_json();
    for part in [
        r#""sent":5,"ok":3,"failed":2"#,
        r#""failures":{"status 503":1,"timeout":1}"#,
        r#""status":{"200":3,"503":1}"#,
        r#""responses_by_header":{"east":3,"west":1}"#,
        r#""tally_header":"x-served-by""#,
    ] {
        assert!(json.contains(part), "{part} missing from {json}");
    }
}
