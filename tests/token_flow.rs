//! The whole token flow through the real binary: query → token → datagrams, migration, default
//! endpoint, and every query error code.

mod common;

use std::time::Duration;

use common::*;

const READY: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Ready"}}"#;
const ALLOCATED: &str = r#"{"resourceType":"gameserver","namespace":"starx","statusQuery":{"jsonPath":"status.state","expectedValue":"Allocated"}}"#;

#[test]
fn query_token_datagrams_and_migration() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let inventory =
        gameserver("gs-a", "Ready", a.addr, "") + &gameserver("gs-b", "Allocated", b.addr, "");
    let proxy = Proxy::start(&base_config(""), &inventory);

    let answer = proxy.query(READY);
    assert_eq!(answer["ttlSeconds"], 30);
    assert_eq!(answer["ports"]["default"], proxy.data_addr().port());
    let token = answer["token"].as_str().unwrap();
    assert_eq!(token.len(), 36);
    assert!(
        !answer.to_string().contains(&a.addr.port().to_string()),
        "backend never revealed"
    );

    let c = client();
    c.send_to(token.as_bytes(), proxy.data_addr()).unwrap();
    for i in 0..20u8 {
        c.send_to(&[i; 300], proxy.data_addr()).unwrap();
        let reply = expect_datagram(&c);
        assert_eq!(reply[0], b'A');
        assert_eq!(&reply[1..], &[i; 300]);
    }
    // Live migration to the Allocated server with a second token.
    let second = proxy.token(ALLOCATED);
    c.send_to(&control_packet(&second), proxy.data_addr())
        .unwrap();
    c.send_to(b"after", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"Bafter");
    // Both tokens are spent.
    let d = client();
    d.send_to(token.as_bytes(), proxy.data_addr()).unwrap();
    d.send_to(b"x", proxy.data_addr()).unwrap();
    expect_nothing(&d, Duration::from_millis(300));
}

#[test]
fn default_endpoint_takes_tokenless_clients() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let inventory =
        gameserver("gs-a", "Allocated", a.addr, "") + &gameserver("gs-b", "Ready", b.addr, "");
    let config = base_config(&format!("defaultEndpoint: {READY}\n"));
    let proxy = Proxy::start(&config, &inventory);
    let c = client();
    proxy.eventually("default endpoint applied", |_| {
        c.send_to(b"hello", proxy.data_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 64];
        matches!(c.recv_from(&mut buf), Ok((6, _)) if &buf[..6] == b"Bhello")
    });
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{kind="default",protocol="udp"}"#),
        1.0
    );
}

#[test]
fn every_error_code() {
    let a = Echo::plain();
    let inventory = gameserver("gs-a", "Ready", a.addr, "")
        + "- apiVersion: agones.dev/v1\n  kind: GameServer\n  metadata: {name: no-address, namespace: lost, labels: {}}\n  status: {state: Ready}\n";
    let proxy = Proxy::start(&base_config("maxQueryConnections: 1\n"), &inventory);
    let code = |q: &str| proxy.query(q)["code"].as_str().unwrap_or("ok").to_string();
    assert_eq!(code("not json"), "bad_request");
    assert_eq!(
        code(r#"{"resourceType":"gameserver","colour":"red"}"#),
        "bad_request"
    );
    assert_eq!(code(r#"{"resourceType":7}"#), "bad_request");
    assert_eq!(
        code(r#"{"type":"subscribe","resourceType":"gameserver"}"#),
        "bad_request"
    );
    assert_eq!(
        code(r#"{"resourceType":"gameserver","statusQuery":{"jsonPath":"status.state"}}"#),
        "bad_request"
    );
    assert_eq!(code(r#"{"resourceType":"pod"}"#), "unknown_resource_type");
    assert_eq!(
        code(r#"{"resourceType":"gameserver","namespace":"nowhere"}"#),
        "no_match"
    );
    assert_eq!(
        code(r#"{"resourceType":"gameserver","namespace":"lost"}"#),
        "backend_unresolvable"
    );
    assert_eq!(code(READY), "ok");
    // overloaded: the one allowed connection is taken.
    let hog = std::net::TcpStream::connect(proxy.query).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(code(READY), "overloaded");
    drop(hog);
    proxy.eventually("slot freed", |p| p.query(READY).get("token").is_some());

    // no_capacity: labelArithmetic with no room left.
    let full = gameserver("gs-full", "Ready", a.addr, ", players: '10', max: '10'");
    let lb = "loadBalancing: {type: labelArithmetic, currentLabel: players, maxLabel: max}\n";
    let proxy = Proxy::start(&base_config(lb), &full);
    assert_eq!(proxy.query(READY)["code"], "no_capacity");

    // inventory_unavailable: the file does not exist yet.
    let proxy = Proxy::start(&base_config(""), "");
    let answer = proxy.query(READY);
    assert_eq!(answer["code"], "inventory_unavailable", "{answer}");
    assert_eq!(proxy.http("GET", "/readyz").0, 503);
    proxy.write_inventory(&gameserver("gs-a", "Ready", a.addr, ""));
    proxy.eventually("ready once the file appears", |p| {
        p.http("GET", "/readyz").0 == 200
    });
    assert!(proxy.query(READY).get("token").is_some());
}

#[test]
fn label_arithmetic_counts_grants_of_this_instance() {
    let a = Echo::plain();
    let b = Echo::plain();
    let inventory = gameserver("gs-a", "Ready", a.addr, ", players: '7', max: '10'")
        + &gameserver("gs-b", "Ready", b.addr, ", players: '9', max: '10'");
    let lb = "loadBalancing: {type: labelArithmetic, currentLabel: players, maxLabel: max}\n";
    let proxy = Proxy::start(&base_config(lb), &inventory);
    // a has 3 free, b has 1: a, a, then a tie (1 each) goes to a by name, then b, then none.
    // Each client keeps its socket, so no later client reuses its port and lands in its session.
    let mut players = Vec::new();
    for _ in 0..4 {
        let token = proxy.token(READY);
        let c = client();
        c.send_to(token.as_bytes(), proxy.data_addr()).unwrap();
        c.send_to(b"?", proxy.data_addr()).unwrap();
        expect_datagram(&c);
        players.push(c);
    }
    let sessions = proxy.sessions();
    let to_a = sessions
        .iter()
        .filter(|s| s["target"] == a.addr.to_string())
        .count();
    let to_b = sessions
        .iter()
        .filter(|s| s["target"] == b.addr.to_string())
        .count();
    assert_eq!((to_a, to_b), (3, 1), "{sessions:?}");
    assert_eq!(proxy.query(READY)["code"], "no_capacity");
}

#[test]
fn default_endpoint_refreshes_do_not_disturb_query_round_robin() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let inventory =
        gameserver("gs-a", "Ready", a.addr, "") + &gameserver("gs-b", "Ready", b.addr, "");
    let config = base_config(&format!(
        "loadBalancing: {{type: roundRobin}}\ndefaultEndpoint: {READY}\n"
    ));
    let proxy = Proxy::start(&config, &inventory);
    let mut served_by = Vec::new();
    for _ in 0..4 {
        // Longer than the one-second default refresh, so refreshes fall between queries.
        std::thread::sleep(Duration::from_millis(1100));
        let c = client();
        c.send_to(proxy.token(READY).as_bytes(), proxy.data_addr())
            .unwrap();
        c.send_to(b"?", proxy.data_addr()).unwrap();
        served_by.push(expect_datagram(&c)[0]);
    }
    assert_eq!(
        served_by, b"ABAB",
        "queries alternate between the two servers"
    );
}
