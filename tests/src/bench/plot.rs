//! SVG plots for the benchmark report: `<scenario>.svg` beside
//! `<scenario>.json`, drawn from the same JSON value the scenario returned
//! (so a plot never shows a number the JSON does not hold).
//!
//! Reading a scenario's JSON gives a [`Chart`], a small model that knows
//! nothing of plotters; [`svg`] draws one with plotters' SVG backend. The
//! text is SVG `<text>` set in the viewer's fonts, so no font library is
//! linked (plotters' `ttf` feature is off). Scenarios without a plot
//! (`cost`, `validation`), skipped scenarios and scenarios that measured
//! nothing give no chart rather than an error. This module does not own the
//! numbers (the scenarios) nor the report around the plots
//! ([`super::write_results`]).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use super::Section;

/// How the series are drawn across the categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Side by side within each category.
    Bars,
    /// One line per series, a point per category.
    Lines,
}

/// One plot: a value per (category, series); a missing value is a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    /// Under the category labels; empty when the categories say it all.
    pub x_label: String,
    pub y_label: String,
    pub kind: Kind,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

/// A named series: one value per category of its [`Chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// The chart for a scenario's JSON, if the scenario has one and measured
/// anything.
pub fn chart(scenario: &str, json: &Value) -> Option<Chart> {
    if json.get("skipped").is_some() {
        return None;
    }
    match scenario {
        "hop" => hop(json),
        "lossy" => lossy(json),
        "propagation" => propagation(json),
        "capacity" => medians(
            json,
            "median_rps",
            "Capacity: closed-loop maximum req/s",
            "req/s (median of runs)",
        ),
        "bulk" => medians(
            json,
            "median",
            "Bulk: single-stream throughput",
            "MB/s (median of runs)",
        ),
        _ => None,
    }
}

/// Draws `section`'s plot as `<scenario>.svg` in `dir`; `Ok(None)` when it
/// has none (see [`chart`]).
pub fn write(dir: &Path, section: &Section) -> anyhow::Result<Option<PathBuf>> {
    let Some(chart) = chart(&section.scenario, &section.json) else {
        return Ok(None);
    };
    // A plot is never worth the run's results: a panic inside plotters is
    // an error like any other.
    let svg = std::panic::catch_unwind(|| svg(&chart))
        .map_err(|_| anyhow!("plotters panicked drawing {:?}", chart.title))??;
    let path = dir.join(format!("{}.svg", section.scenario));
    std::fs::write(&path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}

/// Scenario 1: added p50 and p99 per (protocol, rate), per proxy.
fn hop(json: &Value) -> Option<Chart> {
    let mut g = Grid::default();
    for c in json["cells"].as_array()? {
        let Some(path) = c["path"].as_str() else {
            continue;
        };
        if path == "direct" {
            continue;
        }
        let protocol = match c["protocol"].as_str() {
            Some("http1") => "HTTP/1.1",
            Some("http2") => "HTTP/2",
            Some("grpc") => "gRPC",
            Some(other) => other,
            None => "?",
        };
        let category = format!("{protocol}, {} req/s", c["rate"]);
        for q in ["p50", "p99"] {
            g.put(
                &category,
                &format!("{} {q}", system(path)),
                number(&c["added_ms"][q]),
            );
        }
    }
    g.chart(
        "Hop latency added over direct (median of runs)",
        "",
        "added latency (ms)",
        Kind::Bars,
    )
}

/// Scenario 5: p50 and p99 per link profile, per system.
fn lossy(json: &Value) -> Option<Chart> {
    let mut g = Grid::default();
    for r in json["rows"].as_array()? {
        let Some(path) = r["path"].as_str() else {
            continue;
        };
        let category = match (number(&r["loss"]), number(&r["rtt_ms"])) {
            (Some(loss), Some(rtt)) => format!("{:.0}% loss, {rtt:.0} ms RTT", loss * 100.0),
            _ => "unknown link".into(),
        };
        for q in ["p50", "p99"] {
            g.put(
                &category,
                &format!("{} {q}", system(path)),
                number(&r[format!("{q}_ms")]),
            );
        }
    }
    g.chart(
        "Lossy link: 100 concurrent requests",
        "",
        "latency (ms)",
        Kind::Bars,
    )
}

/// Scenario 6: webhook → all ACKed, p50 and p99 against subscribers, a
/// pair of lines per repository size.
fn propagation(json: &Value) -> Option<Chart> {
    let mut g = Grid::default();
    for c in json["cells"].as_array()? {
        let subscribers = &c["subscribers"];
        let resources = &c["resources"];
        for q in ["p50", "p99"] {
            g.put(
                &subscribers.to_string(),
                &format!("{resources} resources {q}"),
                number(&c["webhook_to_all_acked_ms"][q]),
            );
        }
    }
    g.chart(
        "Propagation: webhook → every subscriber ACKed",
        "subscribers",
        "latency (ms)",
        Kind::Lines,
    )
}

/// Scenarios 3 and 4: the median per path, with meshfed / HAProxy in the
/// title.
fn medians(json: &Value, key: &str, title: &str, y_label: &str) -> Option<Chart> {
    let mut g = Grid::default();
    for r in json["rows"].as_array()? {
        if let Some(path) = r["path"].as_str() {
            g.put(&system(path), "median", number(&r[key]));
        }
    }
    let title = match number(&json["ratio_meshfed_over_haproxy"]) {
        Some(ratio) => format!("{title} (meshfed / HAProxy: {ratio:.2}×)"),
        None => title.to_string(),
    };
    g.chart(&title, "", y_label, Kind::Bars)
}

/// A finite number, or nothing (JSON null: a NaN the scenario wrote).
fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// A path's name as the report spells it.
fn system(path: &str) -> String {
    match path.strip_prefix("haproxy") {
        Some(rest) => format!("HAProxy{rest}"),
        None => path.to_string(),
    }
}

/// Values by (category, series), both in first-seen order.
#[derive(Debug, Default)]
struct Grid {
    categories: Vec<String>,
    series: Vec<Series>,
}

impl Grid {
    fn put(&mut self, category: &str, series: &str, value: Option<f64>) {
        let ci = match self.categories.iter().position(|c| c == category) {
            Some(i) => i,
            None => {
                self.categories.push(category.to_string());
                self.categories.len() - 1
            }
        };
        let si = match self.series.iter().position(|s| s.name == series) {
            Some(i) => i,
            None => {
                self.series.push(Series {
                    name: series.to_string(),
                    values: Vec::new(),
                });
                self.series.len() - 1
            }
        };
        let n = self.categories.len();
        for s in &mut self.series {
            s.values.resize(n, None);
        }
        self.series[si].values[ci] = value;
    }

    /// `None` when no value was measured.
    fn chart(self, title: &str, x_label: &str, y_label: &str, kind: Kind) -> Option<Chart> {
        let chart = Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            kind,
            categories: self.categories,
            series: self.series,
        };
        let measured = chart.values().next().is_some();
        measured.then_some(chart)
    }
}

impl Chart {
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
    }

    /// The y axis: from 0 (or below, for negative values) to the largest
    /// value with room above it for the legend.
    fn y_range(&self) -> (f64, f64) {
        let (lo, hi) = self
            .values()
            .fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let lo = if lo < 0.0 { lo - 0.05 * span } else { 0.0 };
        (lo, hi + 0.35 * span)
    }
}

const SIZE: (u32, u32) = (960, 480);
const FONT: &str = "sans-serif";

/// Pairs of a dark and a light shade: series come as p50, p99 of one
/// system or repository size.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(158, 202, 225),
    RGBColor(230, 85, 13),
    RGBColor(253, 174, 107),
    RGBColor(49, 163, 84),
    RGBColor(161, 217, 155),
    RGBColor(117, 107, 177),
    RGBColor(188, 189, 220),
];

/// The chart as an SVG document.
pub fn svg(chart: &Chart) -> anyhow::Result<String> {
    let mut out = String::new();
    draw(chart, &mut out)?;
    Ok(out)
}

fn draw(chart: &Chart, out: &mut String) -> anyhow::Result<()> {
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let n = chart.categories.len();
    let right = n as f64 - 0.5;
    let (lo, hi) = chart.y_range();
    let mut cc = ChartBuilder::on(&root)
        .caption(&chart.title, (FONT, 20))
        .margin(16)
        .x_label_area_size(if chart.x_label.is_empty() { 32 } else { 56 })
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5..right, lo..hi)?;
    // Categories are labelled below by hand: plotters' own x labels are
    // picked "nice" numbers, which may skip a category.
    // As many decimals as the scale needs, so "50000.0" doesn't run into
    // the axis description.
    let decimals = match hi - lo {
        s if s >= 50.0 => 0,
        s if s >= 2.0 => 1,
        _ => 2,
    };
    let y_fmt = |v: &f64| format!("{v:.decimals$}");
    cc.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&y_fmt)
        .y_max_light_lines(2)
        .y_desc(chart.y_label.as_str())
        .label_style((FONT, 14))
        .draw()?;
    let label = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, c) in chart.categories.iter().enumerate() {
        let (x, y) = cc.backend_coord(&(i as f64, lo));
        root.draw(&Text::new(c.as_str(), (x, y + 8), label.clone()))?;
    }
    if !chart.x_label.is_empty() {
        let (x0, y) = cc.backend_coord(&(-0.5, lo));
        let (x1, _) = cc.backend_coord(&(right, lo));
        root.draw(&Text::new(
            chart.x_label.as_str(),
            ((x0 + x1) / 2, y + 30),
            label.clone(),
        ))?;
    }
    if lo < 0.0 {
        cc.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, 0.0), (right, 0.0)],
            BLACK,
        )))?;
    }
    let m = chart.series.len().max(1) as f64;
    for (j, s) in chart.series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let points = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as f64, v)));
        let drawn = match chart.kind {
            Kind::Bars => {
                // The group fills 80% of a category; each bar 90% of its share.
                let w = 0.8 / m;
                cc.draw_series(points.map(|(x, v)| {
                    let x0 = x - 0.4 + j as f64 * w;
                    Rectangle::new([(x0, 0.0), (x0 + 0.9 * w, v)], color.filled())
                }))?
            }
            Kind::Lines => {
                // Consecutive measured points are joined; a gap breaks the line.
                let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
                let mut run = Vec::new();
                for (i, v) in s.values.iter().enumerate() {
                    match v {
                        Some(v) => run.push((i as f64, *v)),
                        None => runs.push(std::mem::take(&mut run)),
                    }
                }
                runs.push(run);
                cc.draw_series(
                    runs.into_iter()
                        .filter(|r| r.len() > 1)
                        .map(|r| PathElement::new(r, color.stroke_width(2))),
                )?;
                cc.draw_series(points.map(|p| Circle::new(p, 4, color.filled())))?
            }
        };
        drawn
            .label(s.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    // One series needs no legend: the title and the axis say what it is.
    if chart.series.len() > 1 {
        cc.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests;
