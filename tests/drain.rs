//! SIGTERM: stop taking new sessions, keep forwarding for drainSeconds, then exit 0.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_drains_then_exits_cleanly() {
    let a = Echo::plain();
    let config = base_config("").replace("drainSeconds: 1", "drainSeconds: 2");
    let mut proxy = Proxy::start(&config, &gameserver("gs-a", "Ready", a.addr, ""));
    let c = client();
    c.send_to(
        proxy.token(r#"{"resourceType":"gameserver"}"#).as_bytes(),
        proxy.data_addr(),
    )
    .unwrap();
    let unused = proxy.token(r#"{"resourceType":"gameserver"}"#);
    c.send_to(b"before", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"before");

    let started = Instant::now();
    proxy.terminate();
    proxy.eventually("not ready while draining", |p| {
        p.http("GET", "/readyz").0 != 200
    });
    // The drain can be watched: readiness says 503, liveness stays 200, metrics answer and
    // queries are told to go elsewhere.
    assert_eq!(proxy.http("GET", "/readyz").0, 503);
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
    assert_eq!(proxy.http("GET", "/metrics").0, 200);
    assert_eq!(
        proxy.query(r#"{"resourceType":"gameserver"}"#)["code"],
        "draining"
    );
    // Existing sessions keep forwarding during the drain.
    c.send_to(b"during", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"during");
    // New sessions are refused, even with a valid token.
    let late = client();
    late.send_to(unused.as_bytes(), proxy.data_addr()).unwrap();
    late.send_to(b"x", proxy.data_addr()).unwrap();
    expect_nothing(&late, Duration::from_millis(300));

    let status = proxy.child.wait().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took >= Duration::from_millis(1900), "drained for {took:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let config = base_config("").replace("drainSeconds: 1", "drainSeconds: 60");
    let mut proxy = Proxy::start(&config, "[]\n");
    proxy.terminate();
    proxy.eventually("draining", |p| p.http("GET", "/readyz").0 == 503);
    let started = Instant::now();
    proxy.terminate();
    let status = proxy.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
