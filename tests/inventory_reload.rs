//! File inventory changes reach queries and sessions without a restart.

mod common;

use std::time::Duration;

use common::*;

const NEW: &str =
    r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"new"}}"#;

#[test]
fn servers_added_and_removed_live() {
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let only_a = gameserver("gs-a", "Ready", a.addr, "");
    let proxy = Proxy::start(&base_config(""), &only_a);
    assert_eq!(proxy.query(NEW)["code"], "no_match");

    // Added: queries find it.
    proxy.write_inventory(&(only_a.clone() + &gameserver("gs-b", "Ready", b.addr, ", map: new")));
    proxy.eventually("new server visible", |p| {
        p.query(NEW).get("token").is_some()
    });
    assert_eq!(
        proxy.metric(r#"udp_director_inventory_objects{resource_type="gameserver"}"#),
        2.0
    );

    // Sessions to both.
    let to_b = client();
    to_b.send_to(proxy.token(NEW).as_bytes(), proxy.data_addr())
        .unwrap();
    to_b.send_to(b"1", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&to_b), b"B1");
    let to_a = client();
    let a_only =
        r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"missing"}}"#;
    assert_eq!(proxy.query(a_only)["code"], "no_match");
    let token_a = proxy.token(r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"agones.dev/fleet":"f1"}}"#);
    to_a.send_to(token_a.as_bytes(), proxy.data_addr()).unwrap();
    to_a.send_to(b"1", proxy.data_addr()).unwrap();
    let first = expect_datagram(&to_a);
    assert_eq!(proxy.sessions().len(), 2, "{first:?}");

    // A bad file is refused (seen, and counted) and the last good inventory stays.
    let parse_errors = r#"udp_director_inventory_file_refusals_total{reason="parse_error"}"#;
    assert_eq!(proxy.metric(parse_errors), 0.0);
    proxy.write_inventory("items: [unclosed");
    proxy.eventually("the bad file refused", |p| p.metric(parse_errors) == 1.0);
    assert!(proxy.query(NEW).get("token").is_some());

    // Removed: its sessions end, the other's continue.
    proxy.write_inventory(&only_a);
    proxy.eventually("b's session ended", |p| p.sessions().len() == 1);
    assert_eq!(proxy.query(NEW)["code"], "no_match");
    to_b.send_to(b"2", proxy.data_addr()).unwrap();
    expect_nothing(&to_b, Duration::from_millis(300));
    to_a.send_to(b"2", proxy.data_addr()).unwrap();
    assert_eq!(expect_datagram(&to_a)[1..], *b"2");
}
