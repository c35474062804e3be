//! Admin HTTP: metrics that move, health, readiness, session listing and kill.

mod common;

use common::*;

#[test]
fn metrics_sessions_and_kill() {
    let a = Echo::plain();
    let proxy = Proxy::start(&base_config(""), &gameserver("gs-a", "Ready", a.addr, ""));
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
    assert_eq!(proxy.http("GET", "/readyz").0, 200);
    assert_eq!(proxy.http("GET", "/nope").0, 404);
    assert_eq!(proxy.http("POST", "/metrics").0, 405);

    let c1 = client();
    let c2 = client();
    for c in [&c1, &c2] {
        c.send_to(
            proxy.token(r#"{"resourceType":"gameserver"}"#).as_bytes(),
            proxy.data_addr(),
        )
        .unwrap();
        c.send_to(b"12345", proxy.data_addr()).unwrap();
        assert_eq!(expect_datagram(c), b"12345");
    }
    let garbage = client();
    garbage.send_to(b"garbage", proxy.data_addr()).unwrap();
    proxy.query("nonsense");

    proxy.eventually("counters visible", |p| {
        p.metric(r#"udp_director_packets_dropped_total{reason="no_session",source="client"}"#)
            == 1.0
    });
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="ok"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_queries_total{result="bad_request"}"#),
        1.0
    );
    assert_eq!(proxy.metric("udp_director_tokens_issued_total"), 2.0);
    assert_eq!(proxy.metric("udp_director_tokens_redeemed_total"), 2.0);
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{origin="token",protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_active{protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_packets_total{direction="upstream",protocol="udp"}"#),
        2.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_bytes_total{direction="downstream",protocol="udp"}"#),
        10.0
    );
    // Selection time only: the unparseable request is counted in queries_total, not timed.
    assert_eq!(
        proxy.metric("udp_director_query_duration_seconds_count"),
        2.0
    );
    let (_, body) = proxy.http("GET", "/metrics");
    assert!(!body.contains("127.0.0.1"), "no client addresses in labels");

    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 2);
    let s = sessions
        .iter()
        .find(|s| s["client"] == c1.local_addr().unwrap().to_string())
        .unwrap();
    assert_eq!(s["target"], a.addr.to_string());
    assert_eq!(s["dataPort"], "default");
    assert_eq!(s["origin"], "token");
    assert_eq!(s["protocol"], "udp");
    assert_eq!(s["packetsUpstream"], 1);
    assert_eq!(s["bytesDownstream"], 5);

    let (status, body) = proxy.http("DELETE", &format!("/sessions/{}", c1.local_addr().unwrap()));
    assert_eq!((status, body.as_str()), (200, r#"{"killed":1}"#));
    assert_eq!(proxy.sessions().len(), 1);
    assert_eq!(proxy.http("DELETE", "/sessions/10.9.9.9:1").0, 404);
    assert_eq!(proxy.http("DELETE", "/sessions/bogus").0, 400);
    assert_eq!(proxy.metric("udp_director_sessions_closed_total"), 1.0);
    // The killed client has no session now; its next datagram is dropped.
    c1.send_to(b"x", proxy.data_addr()).unwrap();
    expect_nothing(&c1, std::time::Duration::from_millis(200));
}
