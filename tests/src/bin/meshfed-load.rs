//! `meshfed-load`: the open-loop load generator of `meshfed_tests::load`,
//! for people and scripts. It sends at a fixed rate, measures latency from
//! each request's intended send time, and prints a table, or one JSON object
//! with `--json`.
//!
//! Exit code: 0 when every request succeeded, 1 when any failed, 2 for a
//! bad command line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use meshfed_tests::load::{self, LoadSpec, Protocol};

/// Open-loop, fixed-rate HTTP/1.1, HTTP/2 (h2c) and unary gRPC load
/// generator. Latency is measured from each request's intended send time, so
/// a stalled server shows up as latency and timeouts, never as a lower rate.
#[derive(Debug, Parser)]
#[command(name = "meshfed-load", version)]
struct Args {
    /// Address to connect to, e.g. 127.0.0.1:15001.
    #[arg(long)]
    target: SocketAddr,
    /// Host header / :authority, e.g. ratings.default.
    #[arg(long)]
    authority: String,
    /// Request path; for gRPC /package.Service/Method.
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second.
    #[arg(long)]
    rate: u32,
    /// How long to send, e.g. 10s, 500ms, 2m (a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, value_enum, default_value_t = Proto::Http1)]
    protocol: Proto,
    /// Request body size in bytes (GET when 0, POST otherwise).
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Extra request header as name:value; repeat for more.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Per-request timeout, counted from the intended send time.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    timeout: Duration,
    /// Most requests in flight; beyond it requests fail as "overload".
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Most TCP connections. HTTP/1.1 queues requests when all are busy, so
    /// give it about rate × latency.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Count responses by the value of this response header, e.g. x-served-by.
    #[arg(long)]
    tally_header: Option<String>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proto {
    Http1,
    Http2,
    Grpc,
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Http1 => Protocol::Http1,
            Proto::Http2 => Protocol::Http2,
            Proto::Grpc => Protocol::Grpc,
        }
    }
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "" | "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => bail!("unknown unit {unit:?} in {text:?}; use h, m, s, ms or us"),
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("{text:?} is out of range"))
}

fn parse_header(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => bail!("{text:?} is not a header like name:value"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let spec = LoadSpec {
        target: args.target,
        authority: args.authority,
        path: args.path,
        protocol: args.protocol.into(),
        rate: args.rate,
        duration: args.duration,
        body_bytes: args.body_bytes,
        headers: args.headers,
        timeout: args.timeout,
        max_in_flight: args.max_in_flight,
        connections: args.connections,
        tally_header: args.tally_header,
    };
    if let Err(e) = spec.validate() {
        eprintln!("meshfed-load: {e}");
        return ExitCode::from(2);
    }
    let report = load::run(spec).await;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn headers_split_at_the_first_colon() {
        assert_eq!(
            parse_header("x-a: b:c").unwrap(),
            ("x-a".to_string(), "b:c".to_string())
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header(":v").is_err());
    }
}
