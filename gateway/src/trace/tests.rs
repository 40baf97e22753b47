use super::*;

#[test]
fn sampling_is_a_percentage_from_0_to_100() {
    assert_eq!(parse_sampling("1"), Ok(1.0));
    assert_eq!(parse_sampling("0.5%"), Ok(0.5));
    assert_eq!(parse_sampling("100"), Ok(100.0));
    assert!(parse_sampling("101").unwrap_err().contains("from 0 to 100"));
    assert!(parse_sampling("-1").is_err());
    assert!(parse_sampling("NaN").is_err());
    assert!(
        parse_sampling("lots")
            .unwrap_err()
            .contains("not a percentage")
    );
}

#[test]
fn the_endpoint_must_be_plain_http_with_a_host() {
    assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
    assert!(
        parse_endpoint("https://otel:4317")
            .unwrap_err()
            .contains("collector agent")
    );
    assert!(parse_endpoint("otel:4317").is_err());
    assert!(parse_endpoint("http://").is_err());
}

#[test]
fn thresholds_cover_the_ends_exactly() {
    assert_eq!(threshold(1.0), u64::MAX);
    assert_eq!(threshold(0.0), 0);
    let half = threshold(0.5);
    assert!(half > u64::MAX / 2 - 4096 && half < u64::MAX / 2 + 4096);
}

#[test]
fn url_path_drops_the_query() {
    assert_eq!(path_of("/ratings/1?token=secret"), "/ratings/1");
    assert_eq!(path_of("/"), "/");
}

fn tracer(percent: f64) -> Arc<Tracing> {
    // Nothing listens there: spans are dropped by the exporter, which is
    // all these tests need.
    let settings = Settings {
        otlp_endpoint: Some("http://127.0.0.1:9".into()),
        sampling_percent: percent,
    };
    Tracing::start(&settings, "east", "gw-0", TraceMetrics::default())
        .unwrap()
        .unwrap()
}

fn request(pairs: &[(&'static str, &str)]) -> http::Request<()> {
    let mut b = http::Request::get("http://ratings.default:9080/r/1?x=1");
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

#[tokio::test]
async fn a_sampled_hop_becomes_the_parent_of_the_next_hop() {
    let t = tracer(0.0);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut req = request(&[("traceparent", tp)]);
    let hop = t
        .outbound(&mut req)
        .expect("a sampled caller is followed at 0%");
    let (trace, span) = hop.ids();
    assert_eq!(trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_ne!(span, 0x00f067aa0ba902b7);
    assert_eq!(
        req.headers()["traceparent"],
        format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span:016x}-01").as_str()
    );
}

#[tokio::test]
async fn unsampled_requests_record_nothing_and_carry_one_decision() {
    let t = tracer(0.0);
    // No context: a new trace, not sampled, told to the next hops.
    let mut req = request(&[]);
    assert!(t.outbound(&mut req).is_none());
    let seen = context::extract(req.headers());
    assert_eq!(seen.sampled, Some(false));
    assert!(seen.parent.is_some());
    // An unsampled caller's context passes on unchanged, even at 100%.
    let t = tracer(100.0);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let mut req = request(&[("traceparent", tp)]);
    assert!(t.outbound(&mut req).is_none());
    assert_eq!(req.headers()["traceparent"], tp);
}

#[tokio::test]
async fn without_a_caller_decision_the_ratio_decides() {
    let t = tracer(100.0);
    let mut req = request(&[]);
    let hop = t.outbound(&mut req).expect("100% samples every root");
    let seen = context::extract(req.headers());
    assert_eq!(seen.sampled, Some(true));
    assert_eq!(
        seen.parent.map(|p| (p.trace_id, p.span_id)),
        Some(hop.ids())
    );
}
