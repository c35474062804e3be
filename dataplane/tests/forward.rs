//! Forwarder listeners over real loopback sockets: every client goes to the target, nothing is
//! read as a token or a control packet, the largest datagrams pass, and an update of the target
//! moves UDP sessions at once while TCP connections keep theirs.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dataplane::{
    BackendId, CloseMode, ListenerKind, ListenerSpec, OpenedListener, SessionKind, Transport,
};

fn forward(target: SocketAddr) -> ListenerKind {
    ListenerKind::Forward {
        target,
        backend: BackendId(1000),
        proxy: Default::default(),
    }
}

fn open(proxy: &Proxy, transport: Transport, target: SocketAddr) -> OpenedListener {
    proxy
        .ctl
        .open_listener(ListenerSpec {
            owner: "forwarder test/fw".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            transport,
            kind: forward(target),
            idle_timeout: Duration::from_secs(300),
        })
        .unwrap()
}

#[test]
fn a_udp_forwarder_takes_every_client_and_every_datagram_as_traffic() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::tagged(b'F');
    let fw = open(&proxy, Transport::Udp, echo.addr);
    let c = client();
    // What a token port would consume (a token, a control packet) is data here.
    let token = proxy.grant_one(1, echo.addr);
    c.send_to(token.as_bytes(), fw.addr).unwrap();
    let mut expected = vec![b'F'];
    expected.extend_from_slice(token.as_bytes());
    assert_eq!(expect_datagram(&c), expected);
    let reset = control_packet(&token);
    c.send_to(&reset, fw.addr).unwrap();
    assert_eq!(expect_datagram(&c)[1..], reset[..]);
    // The largest UDP payload passes whole.
    let big = vec![0xabu8; 65507];
    let plain = Echo::plain();
    let fw_big = open(&proxy, Transport::Udp, plain.addr);
    c.send_to(&big, fw_big.addr).unwrap();
    assert_eq!(expect_datagram(&c), big);
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.iter().all(|s| s.kind == SessionKind::Forwarder));
    assert_eq!(proxy.ctl.counters().created(SessionKind::Forwarder), 2);
    assert_eq!(proxy.ctl.counters().tokens_redeemed, 0, "no token is read");
    assert!(
        proxy.plane.as_ref().unwrap().events().try_recv().is_err(),
        "forwarder sessions are not reported to control"
    );

    // Each listener counts its own traffic, and the counts outlive it.
    let counters = proxy.ctl.listener_counters(&fw_big).unwrap();
    let stats = counters.snapshot();
    assert_eq!(
        (stats.packets_upstream, stats.bytes_upstream),
        (1, 65507),
        "{stats:?}"
    );
    assert_eq!(
        (stats.packets_downstream, stats.bytes_downstream),
        (1, 65507)
    );
    assert_eq!(stats.sessions, 1);
    let first = proxy.ctl.listener_counters(&fw).unwrap().snapshot();
    assert_eq!(first.packets_upstream, 2);
    proxy.ctl.close_listener(&fw_big, CloseMode::End);
    proxy.eventually("its session ended", |p| p.sessions().len() == 1);
    let after = counters.snapshot();
    assert_eq!((after.bytes_upstream, after.sessions), (65507, 0));
}

#[test]
fn a_new_udp_target_moves_live_sessions_and_tcp_connections_keep_theirs() {
    let proxy = Proxy::start(2, |_| {});
    let a = Echo::tagged(b'A');
    let b = Echo::tagged(b'B');
    let fw = open(&proxy, Transport::Udp, a.addr);
    let c = client();
    c.send_to(b"1", fw.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"A1");
    assert!(
        proxy
            .ctl
            .update_listener(&fw, forward(b.addr), Duration::from_secs(300))
    );
    proxy.eventually("the session follows the new target", |p| {
        p.sessions().first().is_some_and(|s| s.target == b.addr)
    });
    c.send_to(b"2", fw.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"B2");
    assert_eq!(proxy.sessions().len(), 1, "moved, not reopened");
    assert_eq!(proxy.ctl.counters().created(SessionKind::Forwarder), 1);

    let ta = TcpEcho::tagged(b'a');
    let tb = TcpEcho::tagged(b'b');
    let tcp = open(&proxy, Transport::Tcp, ta.addr);
    // A server that speaks first reaches the client at once: no token wait on a forwarder.
    let mut old = tcp_client(tcp.addr);
    assert_eq!(read_exact_within(&mut old, 1), b"a");
    old.write_all(b"x").unwrap();
    assert_eq!(read_exact_within(&mut old, 1), b"x");
    assert!(
        proxy
            .ctl
            .update_listener(&tcp, forward(tb.addr), Duration::from_secs(300))
    );
    // Each worker applies the update on its next turn: new connections reach `b` once the
    // worker that accepts them has.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut new = tcp_client(tcp.addr);
        if read_exact_within(&mut new, 1) == b"b" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new connections still reach a"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    old.write_all(b"still a").unwrap();
    assert_eq!(read_exact_within(&mut old, 7), b"still a");
    proxy.ctl.close_listener(&tcp, CloseMode::End);
    expect_closed(&mut old);
}

#[test]
fn turning_a_token_port_into_a_forwarder_ends_its_sessions_and_a_new_id_keeps_them() {
    let proxy = Proxy::start(1, |_| {});
    let echo = Echo::tagged(b'T');
    let opened = proxy
        .ctl
        .open_listener(ListenerSpec {
            owner: "kind change".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            transport: Transport::Udp,
            kind: ListenerKind::TokenPort,
            idle_timeout: Duration::from_secs(300),
        })
        .unwrap();
    let mut targets = vec![None; usize::from(opened.id.0) + 1];
    targets[usize::from(opened.id.0)] = Some(echo.addr);
    let c = client();
    c.send_to(
        proxy.grant(1, &targets, Duration::from_secs(30)).as_bytes(),
        opened.addr,
    )
    .unwrap();
    c.send_to(b"t", opened.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"Tt");
    // A session admitted under token rules ends when the port becomes a forwarder.
    let fwd = Echo::tagged(b'F');
    assert!(
        proxy
            .ctl
            .update_listener(&opened, forward(fwd.addr), Duration::from_secs(300))
    );
    proxy.eventually("the token session ended", |p| p.sessions().is_empty());
    c.send_to(b"f", opened.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"Ff");
    // Same target, another forwarder id: the session stays and reports the new id.
    let renamed = ListenerKind::Forward {
        target: fwd.addr,
        backend: BackendId(2000),
        proxy: Default::default(),
    };
    assert!(
        proxy
            .ctl
            .update_listener(&opened, renamed, Duration::from_secs(300))
    );
    proxy.eventually("the session carries the new id", |p| {
        p.sessions()
            .first()
            .is_some_and(|s| s.backend == BackendId(2000))
    });
    assert_eq!(proxy.ctl.counters().created(SessionKind::Forwarder), 1);
}

#[test]
fn two_forwarders_aimed_at_each_other_loop_once_and_stop() {
    // The planner refuses such a pair; here they are opened past it, as a chain it could not
    // see would be. The datagram leaves our upstream socket for B, and B finds it is ours.
    let proxy = Proxy::start(2, |_| {});
    let parked = Echo::plain();
    let a = open(&proxy, Transport::Udp, parked.addr);
    let b = open(&proxy, Transport::Udp, a.addr);
    assert!(
        proxy
            .ctl
            .update_listener(&a, forward(b.addr), Duration::from_secs(300))
    );
    std::thread::sleep(Duration::from_millis(100));
    let c = client();
    c.send_to(b"round and round", a.addr).unwrap();
    proxy.eventually("the looped datagram is dropped", |p| {
        p.ctl.counters().dropped(dataplane::DropReason::Loop) == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.ctl.counters().dropped(dataplane::DropReason::Loop), 1);
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}: only the client's, on A");
    assert_eq!(sessions[0].target, b.addr);
    assert_eq!(proxy.ctl.counters().created(SessionKind::Forwarder), 1);
}
