// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::*;
use crate::body;

const IDLE: Duration = Duration::from_secs(90);

fn key(h2: bool) -> EndpointKey {
    EndpointKey {
        addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        h2,
        tls: 0,
    }
}

/// A connection as `connect` makes one, over an in-memory pipe to a hyper
/// server (so a paused clock is exact); the server's task ends when the
/// pool closes the connection.
async fn open(pool: &Arc<ClusterPool>, h2: bool) -> (Conn, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let served = tokio::spawn(async move {
        let io = TokioIo::new(server);
        let _ = if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        };
    });
    let k = key(h2);
    let slot = {
        let mut st = pool.lock();
        st.connections += 1;
        st.endpoints.entry(k).or_default().open += 1;
        ConnSlot {
            pool: pool.clone(),
            key: k,
        }
    };
    let conn = handshake(TokioIo::new(client), h2, slot, IDLE)
        .await
        .unwrap();
    (conn, served)
}

async fn get(lease: &mut Lease, h2: bool) {
    let uri = if h2 { "http://ratings/" } else { "/" };
    let req = Request::get(uri).body(body::empty()).unwrap();
    let resp = lease.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_http1_connection_closes_at_the_idle_timeout_without_another_request() {
    let pool = Arc::new(ClusterPool::default());
    let limits = Limits {
        idle_timeout: IDLE,
        ..Limits::default()
    };
    let (conn, served) = open(&pool, false).await;
    let mut lease = pool.lease(
        key(false),
        conn,
        pool.count_request(&limits).unwrap(),
        &limits,
    );
    // A request in flight for longer than the idle timeout keeps it open.
    tokio::time::sleep(IDLE * 2).await;
    get(&mut lease, false).await;
    drop(lease);
    assert_eq!(pool.stats().1, 1);
    tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
    assert_eq!(pool.stats().1, 1, "open until the idle timeout");
    assert!(!served.is_finished());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::timeout(Duration::from_secs(1), served)
        .await
        .expect("the endpoint saw its connection close")
        .unwrap();
    assert_eq!(pool.stats().1, 0, "its count is given back");
    assert!(pool.lock().endpoints.is_empty(), "and its entry is gone");
}

#[tokio::test(start_paused = true)]
async fn a_used_connection_is_timed_from_its_last_request() {
    let pool = Arc::new(ClusterPool::default());
    let limits = Limits::default();
    let (conn, served) = open(&pool, false).await;
    let mut lease = pool.lease(
        key(false),
        conn,
        pool.count_request(&limits).unwrap(),
        &limits,
    );
    get(&mut lease, false).await;
    drop(lease);
    for _ in 0..3 {
        tokio::time::sleep(IDLE - Duration::from_secs(10)).await;
        // Taken from the pool again, as a request would.
        let Some(idle) = pool
            .lock()
            .endpoints
            .get_mut(&key(false))
            .unwrap()
            .idle
            .pop()
        else {
            panic!("the connection was closed while in use");
        };
        let mut lease = pool.lease(
            key(false),
            Conn::H1(Some(idle)),
            pool.count_request(&limits).unwrap(),
            &limits,
        );
        get(&mut lease, false).await;
    }
    assert!(!served.is_finished(), "3 × 80 s of use is not idle");
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(1), served)
        .await
        .expect("closed once idle")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_http2_connection_closes_at_the_idle_timeout() {
    let pool = Arc::new(ClusterPool::default());
    let limits = Limits::default();
    let (conn, served) = open(&pool, true).await;
    let Conn::H2(tx, usage) = &conn else {
        panic!("not HTTP/2")
    };
    // Shared in the pool, as acquire keeps it.
    pool.lock()
        .endpoints
        .get_mut(&key(true))
        .unwrap()
        .shared
        .push(Shared {
            tx: tx.clone(),
            served: 1,
            usage: usage.clone(),
        });
    let mut lease = pool.lease(
        key(true),
        conn,
        pool.count_request(&limits).unwrap(),
        &limits,
    );
    get(&mut lease, true).await;
    drop(lease);
    tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
    assert!(!served.is_finished());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::timeout(Duration::from_secs(1), served)
        .await
        .expect("the endpoint saw its connection close")
        .unwrap();
    assert_eq!(pool.stats().1, 0);
    assert!(pool.lock().endpoints.is_empty());
}
