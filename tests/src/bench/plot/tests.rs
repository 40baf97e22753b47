use serde_json::json;

use super::*;

/// A hop result as `dataplane::hop` writes it: direct, meshfed and HAProxy
/// at two protocols and two rates, one added p50 below direct (noise).
fn hop_json() -> Value {
    let mut cells = Vec::new();
    for protocol in ["http1", "grpc"] {
        for rate in [200, 1000] {
            cells.push(json!({"protocol": protocol, "rate": rate, "path": "direct",
                "latency_ms": {"p50": 0.2, "p99": 0.9}, "added_ms": null}));
            cells.push(
                json!({"protocol": protocol, "rate": rate, "path": "meshfed",
                "added_ms": {"p50": -0.01, "p90": 0.2, "p99": 0.4, "p99.9": 0.9}}),
            );
            cells.push(
                json!({"protocol": protocol, "rate": rate, "path": "haproxy",
                "added_ms": {"p50": 0.15, "p90": 0.3, "p99": 0.7, "p99.9": 1.2}}),
            );
        }
    }
    json!({"scenario": "hop", "cells": cells})
}

/// The contents of the SVG's `<text>` elements, trimmed.
fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
        .map(|(text, _)| text.trim())
        .collect()
}

fn section(scenario: &str, json: Value) -> Section {
    Section {
        scenario: scenario.into(),
        title: format!("{scenario} (test)"),
        markdown: "| a |\n|---|\n".into(),
        json,
    }
}

#[test]
fn hop_plot_shows_added_p50_and_p99_per_proxy_for_each_protocol_and_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &section("hop", hop_json()))
        .unwrap()
        .unwrap();
    assert_eq!(path, dir.path().join("hop.svg"));
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "meshfed p50",
        "meshfed p99",
        "HAProxy p50",
        "HAProxy p99",
        "HTTP/1.1, 200 req/s",
        "HTTP/1.1, 1000 req/s",
        "gRPC, 200 req/s",
        "gRPC, 1000 req/s",
        "added latency (ms)",
    ] {
        assert!(texts(&svg).contains(&label), "no {label:?} in {svg}");
    }
    assert!(
        !texts(&svg).iter().any(|t| t.starts_with("direct")),
        "direct is the baseline, not a series"
    );
    // 4 categories × 4 series, one bar each.
    let chart = chart("hop", &hop_json()).unwrap();
    assert_eq!(chart.series.len() * chart.categories.len(), 16);
    assert!(
        chart.y_range().0 < 0.0,
        "a negative added latency stays on the axis"
    );
}

#[test]
fn propagation_plot_has_p50_and_p99_lines_per_repository_size_over_subscribers() {
    let cells: Vec<Value> = [10, 1000]
        .iter()
        .flat_map(|&resources| {
            [1, 10, 100].map(|subscribers| {
                json!({"resources": resources, "subscribers": subscribers,
                    "webhook_to_all_acked_ms": {"p50": subscribers as f64, "p99": 2.0 * subscribers as f64}})
            })
        })
        .collect();
    let json = json!({"scenario": "propagation", "cells": cells});
    let chart = chart("propagation", &json).unwrap();
    assert_eq!(
        (chart.kind, chart.categories.clone()),
        (Kind::Lines, vec!["1".into(), "10".into(), "100".into()])
    );
    let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "10 resources p50",
            "10 resources p99",
            "1000 resources p50",
            "1000 resources p99"
        ]
    );
    let svg = svg(&chart).unwrap();
    for label in names.iter().chain(&["subscribers", "100"]) {
        assert!(texts(&svg).contains(label), "no {label:?} in {svg}");
    }
}

#[test]
fn skipped_unmeasured_and_unplotted_scenarios_get_no_plot_and_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let nothing_measured = json!({"scenario": "lossy", "rows": [
        {"loss": 0.01, "rtt_ms": 20, "path": "meshfed (QUIC)", "p50_ms": null, "p99_ms": null},
    ]});
    for s in [
        Section::skipped("hop", "haproxy is not installed"),
        section("lossy", nothing_measured),
        section("capacity", json!({"scenario": "capacity", "rows": []})),
        section(
            "validation",
            json!({"scenario": "validation", "p50_ms": 3.0}),
        ),
        section("propagation", json!({})),
    ] {
        assert!(write(dir.path(), &s).unwrap().is_none(), "{}", s.scenario);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn report_embeds_each_plot_written_beside_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = json!({"scenario": "capacity", "ratio_meshfed_over_haproxy": 0.9, "rows": [
        {"path": "direct", "median_rps": 9000.0},
        {"path": "meshfed", "median_rps": 4500.0},
        {"path": "haproxy", "median_rps": 5000.0},
    ]});
    let sections = [
        section("hop", hop_json()),
        section("capacity", capacity),
        Section::skipped("bulk", "no haproxy"),
    ];
    let report = super::super::write_results(dir.path(), true, &sections).unwrap();
    let report = std::fs::read_to_string(report).unwrap();
    for name in ["hop", "capacity"] {
        assert!(dir.path().join(format!("{name}.json")).exists());
        assert!(dir.path().join(format!("{name}.svg")).exists());
        assert!(report.contains(&format!("]({name}.svg)")), "{report}");
    }
    assert!(!dir.path().join("bulk.svg").exists());
    let svg = std::fs::read_to_string(dir.path().join("capacity.svg")).unwrap();
    assert!(
        svg.contains("meshfed / HAProxy: 0.90×"),
        "the ratio is in the title"
    );
}

#[test]
fn a_plot_that_cannot_be_written_is_noted_in_the_report_and_the_numbers_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the SVG should go: the write fails.
    std::fs::create_dir(dir.path().join("hop.svg")).unwrap();
    let report =
        super::super::write_results(dir.path(), true, &[section("hop", hop_json())]).unwrap();
    let report = std::fs::read_to_string(report).unwrap();
    assert!(report.contains("*No plot: cannot write"), "{report}");
    assert!(dir.path().join("hop.json").is_file());
}
