//! The resolver against a real, tiny authoritative DNS server on loopback
//! UDP, whose zone each test changes while it runs. No mocks: hickory sends
//! real queries and parses real responses (built with hickory-proto).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::*;

/// What the server answers for one name.
#[derive(Debug, Clone)]
enum Answer {
    /// Records by type, each with its TTL. A type without records gets an
    /// empty NOERROR answer (NODATA).
    Records(HashMap<RecordType, Vec<(RData, u32)>>),
    /// SERVFAIL to every query.
    Fail,
}

#[derive(Debug, Default)]
struct State {
    zone: HashMap<String, Answer>,
    /// Every question received, as (lowercase name without the final dot,
    /// type).
    queries: Vec<(String, RecordType)>,
}

/// An authoritative server for a test zone: unknown names get NXDOMAIN.
struct TestDns {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let response = answer(&shared, &request);
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        TestDns { addr, state, task }
    }

    fn resolver(&self) -> Resolver {
        Resolver::with_config(self.addr).unwrap()
    }

    /// Replaces the records of `rtype` at `name` (and ends a `fail`).
    fn set(&self, name: &str, rtype: RecordType, ttl: u32, data: Vec<RData>) {
        let mut state = self.state.lock().unwrap();
        let entry = state
            .zone
            .entry(key(name))
            .or_insert_with(|| Answer::Records(HashMap::new()));
        if let Answer::Fail = entry {
            *entry = Answer::Records(HashMap::new());
        }
        if let Answer::Records(by_type) = entry {
            by_type.insert(rtype, data.into_iter().map(|d| (d, ttl)).collect());
        }
    }

    fn fail(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .zone
            .insert(key(name), Answer::Fail);
    }

    fn queries(&self, name: &str, rtype: RecordType) -> usize {
        let state = self.state.lock().unwrap();
        state
            .queries
            .iter()
            .filter(|(n, t)| *n == key(name) && *t == rtype)
            .count()
    }

    fn total_queries(&self) -> usize {
        self.state.lock().unwrap().queries.len()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(state: &Mutex<State>, request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.add_queries(request.queries.iter().cloned());
    let mut state = state.lock().unwrap();
    for q in &request.queries {
        let name = key(&q.name().to_ascii());
        state.queries.push((name.clone(), q.query_type()));
        match state.zone.get(&name) {
            None => response.metadata.response_code = ResponseCode::NXDomain,
            Some(Answer::Fail) => response.metadata.response_code = ResponseCode::ServFail,
            Some(Answer::Records(by_type)) => {
                for (data, ttl) in by_type.get(&q.query_type()).into_iter().flatten() {
                    response.add_answer(Record::from_rdata(q.name().clone(), *ttl, data.clone()));
                }
            }
        }
    }
    response
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

fn aaaa(ip: Ipv6Addr) -> RData {
    RData::AAAA(AAAA(ip))
}

fn srv(priority: u16, weight: u16, port: u16, target: &str) -> RData {
    RData::SRV(SRV::new(
        priority,
        weight,
        port,
        Name::from_ascii(target).unwrap(),
    ))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Every test finishes within 5 s or fails.
async fn within_5s<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), test)
        .await
        .expect("test took longer than 5 s")
}

/// Polls `check` every 20 ms until it gives a value, for at most `patience`.
async fn eventually<T>(
    what: &str,
    patience: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {patience:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn host_port_resolves_a_then_aaaa_with_the_port_and_the_smallest_ttl() {
    within_5s(async {
        let dns = TestDns::start().await;
        dns.set(
            "web.zone.test",
            RecordType::A,
            60,
            vec![a([10, 0, 0, 1]), a([10, 0, 0, 2])],
        );
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        dns.set("web.zone.test", RecordType::AAAA, 30, vec![aaaa(v6)]);
        let resolver = dns.resolver();

        let before = Instant::now();
        let r = resolver.resolve("web.zone.test:8080").await.unwrap();
        assert_eq!(
            r.addrs,
            vec![
                sa("10.0.0.1:8080"),
                sa("10.0.0.2:8080"),
                sa("[fd00::1]:8080")
            ]
        );
        assert!(!r.stale);
        // The AAAA TTL (30 s) is the smallest.
        assert!(r.valid_until <= Instant::now() + Duration::from_secs(30));
        assert!(r.valid_until >= before + Duration::from_secs(28));

        // The convenience form gives the same addresses, from the table.
        let queries = dns.total_queries();
        let addrs = resolver
            .resolve_host_port("WEB.zone.test:8080")
            .await
            .unwrap();
        assert_eq!(addrs, r.addrs);
        assert_eq!(
            dns.total_queries(),
            queries,
            "a fresh answer is not asked again"
        );
    })
    .await;
}

#[tokio::test]
async fn srv_resolves_to_target_addresses_and_ports_by_priority_then_weight() {
    within_5s(async {
        let dns = TestDns::start().await;
        dns.set(
            "_gw._udp.zone.test",
            RecordType::SRV,
            20,
            vec![
                srv(20, 0, 9000, "c.zone.test."),
                srv(10, 10, 8443, "a.zone.test."),
                srv(10, 50, 7443, "b.zone.test."),
            ],
        );
        dns.set("a.zone.test", RecordType::A, 60, vec![a([10, 0, 1, 1])]);
        dns.set("b.zone.test", RecordType::A, 60, vec![a([10, 0, 1, 2])]);
        let v6: Ipv6Addr = "fd00::c".parse().unwrap();
        dns.set("c.zone.test", RecordType::AAAA, 10, vec![aaaa(v6)]);
        let resolver = dns.resolver();

        let r = resolver.resolve("_gw._udp.zone.test").await.unwrap();
        assert_eq!(
            r.addrs,
            vec![
                sa("10.0.1.2:7443"),
                sa("10.0.1.1:8443"),
                sa("[fd00::c]:9000")
            ],
            "priority 10 first, the heavier weight first within it"
        );
        // c's AAAA TTL (10 s) is the smallest of the SRV and its targets.
        assert!(r.valid_until <= Instant::now() + Duration::from_secs(10));
    })
    .await;
}

#[tokio::test]
async fn an_expired_ttl_is_asked_again_and_picks_up_a_changed_answer() {
    within_5s(async {
        let dns = TestDns::start().await;
        dns.set("api.zone.test", RecordType::A, 1, vec![a([10, 0, 0, 1])]);
        let resolver = dns.resolver();

        let first = resolver.resolve("api.zone.test:443").await.unwrap();
        assert_eq!(first.addrs, vec![sa("10.0.0.1:443")]);
        dns.set("api.zone.test", RecordType::A, 1, vec![a([10, 0, 0, 2])]);

        // Until the TTL runs out the answer comes from the table, however
        // often the caller asks; then the new answer is fetched.
        let seen_at = eventually("the changed answer", Duration::from_secs(4), async || {
            let r = resolver.resolve("api.zone.test:443").await.unwrap();
            if r.addrs == vec![sa("10.0.0.2:443")] {
                Some(Instant::now())
            } else {
                assert_eq!(r.addrs, first.addrs);
                None
            }
        })
        .await;
        assert!(
            seen_at >= first.valid_until,
            "re-asked before the TTL ran out"
        );
        assert!(
            dns.queries("api.zone.test", RecordType::A) <= 3,
            "polled every 20 ms for ~1 s, yet asked {} times",
            dns.queries("api.zone.test", RecordType::A)
        );
    })
    .await;
}

#[tokio::test]
async fn a_name_that_starts_failing_keeps_its_last_addresses_for_the_grace_period() {
    within_5s(async {
        let dns = TestDns::start().await;
        dns.set("db.zone.test", RecordType::A, 1, vec![a([10, 0, 0, 9])]);
        let grace = Duration::from_secs(1);
        let resolver = dns.resolver().with_grace(grace);

        let good = resolver.resolve("db.zone.test:5432").await.unwrap();
        dns.fail("db.zone.test");

        // After the TTL the name fails; its last addresses are served, stale.
        let stale = eventually("a stale answer", Duration::from_secs(3), async || {
            let r = resolver.resolve("db.zone.test:5432").await.unwrap();
            assert_eq!(r.addrs, good.addrs, "never an empty or different set");
            r.stale.then_some(r)
        })
        .await;
        assert!(Instant::now() >= good.valid_until);
        assert!(
            dns.queries("db.zone.test", RecordType::A) >= 2,
            "the failure was real"
        );
        assert_eq!(stale.addrs, vec![sa("10.0.0.9:5432")]);

        // Until the grace period is over: then the error comes through.
        let error = eventually(
            "the error after the grace period",
            Duration::from_secs(3),
            async || match resolver.resolve("db.zone.test:5432").await {
                Ok(r) => {
                    assert_eq!(r.addrs, good.addrs);
                    None
                }
                Err(e) => Some(e),
            },
        )
        .await;
        assert!(Instant::now() >= good.valid_until + grace);
        let message = error.to_string();
        assert!(
            message.contains("db.zone.test") && message.contains("A/AAAA"),
            "{message}"
        );

        // And a recovery is picked up.
        dns.set("db.zone.test", RecordType::A, 1, vec![a([10, 0, 0, 10])]);
        let back = eventually("the recovered answer", Duration::from_secs(2), async || {
            resolver.resolve("db.zone.test:5432").await.ok()
        })
        .await;
        assert_eq!(back.addrs, vec![sa("10.0.0.10:5432")]);
        assert!(!back.stale);
    })
    .await;
}

#[tokio::test]
async fn ip_literals_return_themselves_without_a_query() {
    within_5s(async {
        let dns = TestDns::start().await;
        let resolver = dns.resolver();
        for literal in ["192.0.2.7:443", "[2001:db8::7]:8443", "[::1]:80"] {
            let r = resolver.resolve(literal).await.unwrap();
            assert_eq!(r.addrs, vec![sa(literal)]);
        }
        assert_eq!(dns.total_queries(), 0);
    })
    .await;
}

#[tokio::test]
async fn nxdomain_is_an_error_naming_the_name_the_record_type_and_a_hint() {
    within_5s(async {
        let dns = TestDns::start().await;
        let resolver = dns.resolver();

        let e = resolver.resolve("missing.zone.test:80").await.unwrap_err();
        assert!(
            matches!(
                e,
                DnsError::NxDomain {
                    record: "A/AAAA",
                    ..
                }
            ),
            "{e:?}"
        );
        let message = e.to_string();
        for part in [
            "`missing.zone.test`",
            "A/AAAA",
            "NXDOMAIN",
            "search domain of /etc/resolv.conf",
        ] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }

        let e = resolver
            .resolve("_gw._udp.missing.zone.test")
            .await
            .unwrap_err();
        assert!(
            matches!(e, DnsError::NxDomain { record: "SRV", .. }),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("no SRV record for `_gw._udp.missing.zone.test`")
        );

        // A name that exists without the asked type is told apart.
        dns.set("txt-only.zone.test", RecordType::TXT, 60, vec![]);
        let e = resolver.resolve("txt-only.zone.test:80").await.unwrap_err();
        assert!(matches!(e, DnsError::NoRecords { .. }), "{e:?}");
    })
    .await;
}

#[tokio::test]
async fn ttls_are_clamped_between_one_second_and_five_minutes() {
    within_5s(async {
        let dns = TestDns::start().await;
        dns.set("zero.zone.test", RecordType::A, 0, vec![a([10, 0, 0, 3])]);
        dns.set(
            "day.zone.test",
            RecordType::A,
            86_400,
            vec![a([10, 0, 0, 4])],
        );
        let resolver = dns.resolver();

        let before = Instant::now();
        let zero = resolver.resolve("zero.zone.test:1").await.unwrap();
        assert!(zero.valid_until >= before + MIN_REFRESH);
        let asked = dns.queries("zero.zone.test", RecordType::A);
        resolver.resolve("zero.zone.test:1").await.unwrap();
        assert_eq!(
            dns.queries("zero.zone.test", RecordType::A),
            asked,
            "TTL 0 is held 1 s"
        );

        let day = resolver.resolve("day.zone.test:1").await.unwrap();
        assert!(day.valid_until <= Instant::now() + MAX_REFRESH);
    })
    .await;
}

#[test]
fn targets_that_are_not_host_port_or_srv_are_refused() {
    let ok = [
        ("10.0.0.1:80", Target::Literal(sa("10.0.0.1:80"))),
        ("[fd00::1]:80", Target::Literal(sa("[fd00::1]:80"))),
        (
            "gw.west.example:15443",
            Target::HostPort("gw.west.example", 15443),
        ),
        ("localhost:1", Target::HostPort("localhost", 1)),
        (
            "_meshfed._udp.west.example",
            Target::Srv("_meshfed._udp.west.example"),
        ),
    ];
    for (target, want) in ok {
        assert_eq!(Target::parse(target).unwrap(), want, "{target}");
    }
    for bad in [
        "gw.west.example",
        "fd00::1:80",
        "[fd00::zz]:80",
        "host:99999",
        ":80",
        "_meshfed._udp.west.example:80",
        "_meshfed._udp",
    ] {
        let e = Target::parse(bad).unwrap_err();
        assert!(matches!(e, DnsError::Target { .. }), "{bad}: {e:?}");
        assert!(e.to_string().contains(bad), "{e}");
    }
}

#[tokio::test]
async fn the_system_resolver_answers_localhost_without_a_name_server() {
    within_5s(async {
        let addrs = Resolver::from_system()
            .resolve_host_port("localhost:80")
            .await
            .unwrap();
        assert!(
            addrs.contains(&SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 80)),
            "{addrs:?}"
        );
    })
    .await;
}
