//! Live migration with control packets.

mod common;

use std::time::Duration;

use common::*;
use dataplane::{DropReason, TokenRejectReason};

/// Sends `count` sequence-numbered datagrams and checks every reply comes from `tag` in order.
fn exchange(c: &std::net::UdpSocket, proxy: &Proxy, tag: u8, seq: &mut u32, count: u32) {
    let first = *seq;
    for _ in 0..count {
        c.send_to(&seq.to_be_bytes(), proxy.addr()).unwrap();
        *seq += 1;
    }
    for expected in first..*seq {
        let reply = expect_datagram(c);
        assert_eq!(reply[0], tag, "seq {expected} answered by the wrong server");
        assert_eq!(
            &reply[1..],
            expected.to_be_bytes(),
            "seq out of order or lost"
        );
    }
}

#[test]
fn hundred_resets_lose_and_misdeliver_nothing() {
    let proxy = Proxy::start(2, |_| {});
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let c = client();
    c.send_to(proxy.grant_one(1, a.addr).as_bytes(), proxy.addr())
        .unwrap();
    let mut seq = 0u32;
    exchange(&c, &proxy, b'A', &mut seq, 10);
    for round in 0..100 {
        let (tag, addr, id) = if round % 2 == 0 {
            (b'B', b.addr, 2)
        } else {
            (b'A', a.addr, 1)
        };
        let token = proxy.grant_one(id, addr);
        // The control packet and the datagrams right behind it are sent without waiting: the
        // datagrams must reach the new server only.
        c.send_to(&control_packet(&token), proxy.addr()).unwrap();
        exchange(&c, &proxy, tag, &mut seq, 10);
    }
    let counters = proxy.ctl.counters();
    assert_eq!(counters.sessions_reset, 100);
    assert_eq!(counters.packets_upstream, u64::from(seq));
    assert_eq!(counters.packets_downstream, u64::from(seq));
    let total = a.received.load(std::sync::atomic::Ordering::Relaxed)
        + b.received.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(total, u64::from(seq), "control packets are not forwarded");
    assert_eq!(proxy.sessions().len(), 1);
}

#[test]
fn bad_control_tokens_leave_the_session_intact() {
    let proxy = Proxy::start(1, |_| {});
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let c = client();
    c.send_to(proxy.grant_one(1, a.addr).as_bytes(), proxy.addr())
        .unwrap();
    let mut seq = 0;
    exchange(&c, &proxy, b'A', &mut seq, 3);

    // Unknown token.
    c.send_to(
        &control_packet("00000000-0000-4000-8000-000000000000"),
        proxy.addr(),
    )
    .unwrap();
    exchange(&c, &proxy, b'A', &mut seq, 3);
    // Expired token.
    let expired = proxy.grant(2, &[Some(b.addr)], Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(100));
    c.send_to(&control_packet(&expired), proxy.addr()).unwrap();
    exchange(&c, &proxy, b'A', &mut seq, 3);
    // Used token: another client redeems it first.
    let used = proxy.grant_one(2, b.addr);
    let other = client();
    other.send_to(used.as_bytes(), proxy.addr()).unwrap();
    proxy.eventually("other client redeemed", |p| p.sessions().len() == 2);
    c.send_to(&control_packet(&used), proxy.addr()).unwrap();
    exchange(&c, &proxy, b'A', &mut seq, 3);
    // Malformed body.
    let mut junk = control_packet("");
    junk.extend_from_slice(b"junk");
    c.send_to(&junk, proxy.addr()).unwrap();
    exchange(&c, &proxy, b'A', &mut seq, 3);

    let counters = proxy.ctl.counters();
    assert_eq!(counters.sessions_reset, 0);
    assert_eq!(counters.rejected(TokenRejectReason::Unknown), 1);
    assert_eq!(counters.rejected(TokenRejectReason::Expired), 1);
    assert_eq!(counters.rejected(TokenRejectReason::Used), 1);
    assert_eq!(counters.dropped(DropReason::TokenRejected), 3);
    assert_eq!(counters.dropped(DropReason::MalformedControl), 1);
}

#[test]
fn late_replies_from_the_old_server_are_dropped() {
    let proxy = Proxy::start(1, |_| {});
    // A "slow" old server: a raw socket we answer from by hand after the reset.
    let old = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    old.set_read_timeout(Some(WAIT)).unwrap();
    let new = Echo::tagged(b'N');
    let c = client();
    c.send_to(
        proxy.grant_one(1, old.local_addr().unwrap()).as_bytes(),
        proxy.addr(),
    )
    .unwrap();
    c.send_to(b"q", proxy.addr()).unwrap();
    let mut buf = [0u8; 64];
    let (_, session_peer) = old.recv_from(&mut buf).unwrap();
    c.send_to(&control_packet(&proxy.grant_one(2, new.addr)), proxy.addr())
        .unwrap();
    c.send_to(b"r", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"Nr");
    // The old server answers late, to the session's old upstream port: nothing reaches the client.
    old.send_to(b"late", session_peer).unwrap();
    expect_nothing(&c, Duration::from_millis(200));
}

/// A session that cannot be set up (its backend address is the broadcast address, which no
/// session may send to) must not spend the token, on a first datagram or on a control packet:
/// the retry fails the same way instead of as `used`.
#[test]
fn a_socket_that_cannot_be_made_spends_no_token() {
    let proxy = Proxy::start(2, |_| {});
    let a = Echo::tagged(b'A');
    let unreachable: std::net::SocketAddr = "255.255.255.255:9".parse().unwrap();

    let fresh = client();
    let token = proxy.grant_one(1, unreachable);
    for _ in 0..2 {
        fresh.send_to(token.as_bytes(), proxy.addr()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.eventually("both first datagrams refused at setup", |p| {
        p.ctl.counters().dropped(DropReason::UpstreamSetup) == 2
    });

    let c = client();
    c.send_to(proxy.grant_one(1, a.addr).as_bytes(), proxy.addr())
        .unwrap();
    let mut seq = 0u32;
    exchange(&c, &proxy, b'A', &mut seq, 3);
    let token = proxy.grant_one(2, unreachable);
    for _ in 0..2 {
        c.send_to(&control_packet(&token), proxy.addr()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.eventually("both control packets refused at setup", |p| {
        p.ctl.counters().dropped(DropReason::UpstreamSetup) == 4
    });
    assert_eq!(
        proxy.ctl.counters().rejected(TokenRejectReason::Used),
        0,
        "no token was spent"
    );
    // The session is where it was.
    exchange(&c, &proxy, b'A', &mut seq, 3);
}
