//! Token redemption, payload fidelity, default backend and garbage handling over loopback.

mod common;

use std::time::Duration;

use common::*;
use dataplane::{DropReason, SessionKind, TokenRejectReason};

#[test]
fn token_round_trip_and_payload_sizes() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let token = proxy.grant_one(1, echo.addr);
    let c = client();
    c.send_to(token.as_bytes(), proxy.addr()).unwrap();
    for size in [1usize, 1400, 9000, 65507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        c.send_to(&payload, proxy.addr()).unwrap();
        let reply = expect_datagram(&c);
        assert_eq!(
            reply.len(),
            size,
            "payload of {size} bytes comes back whole"
        );
        assert_eq!(reply, payload);
    }
    // The token itself was consumed, not forwarded.
    assert_eq!(echo.received.load(std::sync::atomic::Ordering::Relaxed), 4);
    let counters = proxy.ctl.counters();
    assert_eq!(counters.tokens_redeemed, 1);
    assert_eq!(counters.created(SessionKind::Token), 1);
    assert_eq!(counters.packets_upstream, 4);
    assert_eq!(counters.packets_downstream, 4);
    assert_eq!(counters.bytes_upstream, 1 + 1400 + 9000 + 65507);
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].client, c.local_addr().unwrap());
    assert_eq!(sessions[0].target, echo.addr);
    assert_eq!(sessions[0].stats.packets_downstream, 4);
}

#[test]
fn token_with_trailing_newline_opens_a_session() {
    let proxy = Proxy::start(1, |_| {});
    let echo = Echo::plain();
    for suffix in ["\n", "\r\n"] {
        let token = proxy.grant_one(1, echo.addr);
        let c = client();
        c.send_to(format!("{token}{suffix}").as_bytes(), proxy.addr())
            .unwrap();
        c.send_to(b"hello", proxy.addr()).unwrap();
        assert_eq!(expect_datagram(&c), b"hello");
    }
}

#[test]
fn a_token_is_single_use_and_expires() {
    let proxy = Proxy::start(1, |_| {});
    let echo = Echo::plain();
    let token = proxy.grant_one(1, echo.addr);
    let first = client();
    first.send_to(token.as_bytes(), proxy.addr()).unwrap();
    first.send_to(b"a", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&first), b"a");

    let second = client();
    second.send_to(token.as_bytes(), proxy.addr()).unwrap();
    second.send_to(b"b", proxy.addr()).unwrap();
    expect_nothing(&second, Duration::from_millis(200));

    let short = proxy.grant(2, &[Some(echo.addr)], Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(150));
    let late = client();
    late.send_to(short.as_bytes(), proxy.addr()).unwrap();
    expect_nothing(&late, Duration::from_millis(200));

    let unknown = client();
    unknown
        .send_to(b"00000000-0000-4000-8000-000000000000", proxy.addr())
        .unwrap();
    proxy.eventually("three rejections counted", |p| {
        let c = p.ctl.counters();
        c.rejected(TokenRejectReason::Used) == 1
            && c.rejected(TokenRejectReason::Expired) == 1
            && c.rejected(TokenRejectReason::Unknown) == 1
    });
    assert_eq!(proxy.sessions().len(), 1);
}

#[test]
fn garbage_first_datagrams_create_no_session() {
    let proxy = Proxy::start(2, |_| {});
    let c = client();
    let mut magic_garbage = control_packet("x");
    magic_garbage.truncate(12);
    let garbage: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        vec![0; 36],
        vec![0xFF; 1200],
        b"550e8400-e29b-41d4-a716-44665544000".to_vec(),
        magic_garbage,
        vec![],
    ];
    for g in &garbage {
        c.send_to(g, proxy.addr()).unwrap();
    }
    proxy.eventually("all garbage dropped", |p| {
        let c = p.ctl.counters();
        c.dropped(DropReason::NoSession)
            + c.dropped(DropReason::TokenRejected)
            + c.dropped(DropReason::MalformedControl)
            == garbage.len() as u64
    });
    assert!(proxy.sessions().is_empty());
    assert_eq!(proxy.ctl.counters().sessions_active, 0);
}

#[test]
fn default_backend_on_and_off() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::tagged(9);
    // Off: a tokenless client is dropped.
    let c = client();
    c.send_to(b"ping", proxy.addr()).unwrap();
    expect_nothing(&c, Duration::from_millis(200));
    // On: its datagram is forwarded, and so is the next.
    proxy.set_default(5, Some(echo.addr));
    let d = client();
    d.send_to(b"ping", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&d), b"\x09ping");
    d.send_to(b"pong", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&d), b"\x09pong");
    // An invalid token also falls back to the default backend.
    let e = client();
    e.send_to(b"00000000-0000-4000-8000-000000000000", proxy.addr())
        .unwrap();
    assert_eq!(
        expect_datagram(&e),
        b"\x0900000000-0000-4000-8000-000000000000"
    );
    assert_eq!(proxy.ctl.counters().created(SessionKind::Default), 2);
    // Off again: existing default sessions keep going, new clients are dropped.
    proxy.set_default(0, None);
    let f = client();
    f.send_to(b"ping", proxy.addr()).unwrap();
    expect_nothing(&f, Duration::from_millis(200));
    d.send_to(b"still", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&d), b"\x09still");
}

#[test]
fn removed_backend_ends_token_sessions_and_moves_default_ones() {
    let proxy = Proxy::start(1, |_| {});
    let old = Echo::tagged(1);
    let new = Echo::tagged(2);
    proxy.set_default(10, Some(old.addr));
    let tokened = client();
    tokened
        .send_to(proxy.grant_one(10, old.addr).as_bytes(), proxy.addr())
        .unwrap();
    let tokenless = client();
    tokenless.send_to(b"a", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&tokenless), b"\x01a");
    assert_eq!(proxy.sessions().len(), 2);

    proxy.set_default(11, Some(new.addr));
    proxy.ctl.remove_backend(dataplane::BackendId(10));
    proxy.eventually("token session ended", |p| p.sessions().len() == 1);
    tokenless.send_to(b"b", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&tokenless), b"\x02b");
    tokened.send_to(b"c", proxy.addr()).unwrap();
    // Its session is gone and it has no token: it becomes a default session to the new backend.
    assert_eq!(expect_datagram(&tokened), b"\x02c");
}

#[test]
fn multi_port_grant_redeems_once_per_port() {
    let proxy = Proxy::start(2, |cfg| {
        cfg.data_ports.push(dataplane::DataPortConfig::udp(
            "voice",
            "127.0.0.1:0".parse().unwrap(),
        ));
    });
    let game = Echo::tagged(1);
    let voice = Echo::tagged(2);
    let token = proxy.grant(
        3,
        &[Some(game.addr), Some(voice.addr)],
        Duration::from_secs(30),
    );
    let c = client();
    c.send_to(token.as_bytes(), proxy.addrs[0]).unwrap();
    c.send_to(token.as_bytes(), proxy.addrs[1]).unwrap();
    c.send_to(b"g", proxy.addrs[0]).unwrap();
    assert_eq!(expect_datagram(&c), b"\x01g");
    c.send_to(b"v", proxy.addrs[1]).unwrap();
    assert_eq!(expect_datagram(&c), b"\x02v");
    // A second use on either port fails.
    let d = client();
    d.send_to(token.as_bytes(), proxy.addrs[1]).unwrap();
    d.send_to(b"v", proxy.addrs[1]).unwrap();
    expect_nothing(&d, Duration::from_millis(200));
}

#[test]
fn ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        testkit::skip_test("no IPv6 loopback on this machine");
        return;
    }
    let proxy = Proxy::start_on("[::]:0", 2, |_| {});
    let echo = Echo::spawn("[::1]:0", None);
    let token = proxy.grant_one(1, echo.addr);
    let c = client_on("[::1]:0");
    let port = proxy.addr().port();
    let target: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    c.send_to(token.as_bytes(), target).unwrap();
    c.send_to(b"six", target).unwrap();
    assert_eq!(expect_datagram(&c), b"six");
    // The dual-stack socket also serves IPv4 clients.
    let echo4 = Echo::plain();
    let token = proxy.grant_one(2, echo4.addr);
    let c4 = client();
    let target4: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    c4.send_to(token.as_bytes(), target4).unwrap();
    c4.send_to(b"four", target4).unwrap();
    assert_eq!(expect_datagram(&c4), b"four");
}

#[test]
fn portable_io_path_forwards_too() {
    let proxy = Proxy::start(1, |cfg| cfg.batch_io = false);
    let echo = Echo::plain();
    let c = client();
    c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    for i in 0..50u8 {
        c.send_to(&[i; 100], proxy.addr()).unwrap();
        assert_eq!(expect_datagram(&c), [i; 100]);
    }
}

#[test]
fn busy_polling_workers_forward_expire_and_stop() {
    // A long spin window: the worker must still honour its idle timer and stop on shutdown.
    let proxy = Proxy::start(2, |c| {
        c.busy_poll = Duration::from_millis(5);
        c.session_timeout = Duration::from_millis(300);
    });
    let echo = Echo::plain();
    let c = client();
    c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    for i in 0..50u8 {
        c.send_to(&[i], proxy.addr()).unwrap();
        assert_eq!(expect_datagram(&c), [i]);
    }
    proxy.eventually("the idle session expires", |p| p.sessions().is_empty());
}

#[test]
fn a_moved_default_session_sends_the_new_backends_proxy_header() {
    use dataplane::policy::proxy_protocol::ProxyMode;
    let proxy = Proxy::start(1, |_| {});
    let (old, new) = (
        ProxyEcho::spawn("127.0.0.1:0"),
        ProxyEcho::spawn("127.0.0.1:0"),
    );
    let default = |id: u64, addr, proxy_mode| dataplane::Backend {
        id: dataplane::BackendId(id),
        addrs: vec![Some(addr)].into(),
        proxy: proxy_mode,
    };
    proxy
        .ctl
        .set_default(Some(default(10, old.addr, ProxyMode::None)));
    let c = client();
    let me = c.local_addr().unwrap();
    c.send_to(b"a", proxy.addr()).unwrap();
    assert_eq!(read_answer(&expect_datagram(&c)), (None, b"a".to_vec()));
    // The old backend leaves; the new default's mapping asks for `v2-first`.
    proxy
        .ctl
        .set_default(Some(default(11, new.addr, ProxyMode::V2First)));
    proxy.ctl.remove_backend(dataplane::BackendId(10));
    proxy.eventually("moved", |p| {
        p.sessions().first().is_some_and(|s| s.target == new.addr)
    });
    c.send_to(b"b", proxy.addr()).unwrap();
    let seen = HeaderSeen {
        dgram: true,
        source: me,
        destination: proxy.addr(),
    };
    assert_eq!(
        read_answer(&expect_datagram(&c)),
        (Some(seen), b"b".to_vec())
    );
    c.send_to(b"c", proxy.addr()).unwrap();
    assert_eq!(read_answer(&expect_datagram(&c)), (None, b"c".to_vec()));
}
