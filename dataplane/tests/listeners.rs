//! Listeners opened, closed and drained while traffic flows, and what refuses to open.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use dataplane::{CloseMode, DropReason, ListenerId, ListenerKind, ListenerSpec, Transport};

fn token_port(port: u16) -> ListenerSpec {
    ListenerSpec {
        owner: format!("test port {port}"),
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        transport: Transport::Udp,
        kind: ListenerKind::TokenPort,
        idle_timeout: Duration::from_secs(300),
    }
}

/// A grant for listener `id` only.
fn grant_on(proxy: &Proxy, id: ListenerId, target: SocketAddr) -> String {
    let mut targets = vec![None; usize::from(id.0) + 1];
    targets[usize::from(id.0)] = Some(target);
    proxy.grant(1, &targets, Duration::from_secs(30))
}

#[test]
fn listeners_open_and_close_under_traffic_without_touching_the_others() {
    let proxy = Arc::new(Proxy::start(2, |_| {}));
    let echo = Echo::plain();
    // Steady traffic on the config's data port the whole time: every datagram must come back.
    let steady = client();
    steady
        .send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (proxy, stop) = (Arc::clone(&proxy), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                steady.send_to(&sent.to_be_bytes(), proxy.addr()).unwrap();
                assert_eq!(expect_datagram(&steady), sent.to_be_bytes(), "seq {sent}");
                sent += 1;
            }
            sent
        })
    };

    for _ in 0..5 {
        let opened = proxy.ctl.open_listener(token_port(0)).unwrap();
        assert_ne!(opened.addr.port(), 0);
        let c = client();
        c.send_to(
            grant_on(&proxy, opened.id, echo.addr).as_bytes(),
            opened.addr,
        )
        .unwrap();
        c.send_to(b"on the new one", opened.addr).unwrap();
        assert_eq!(expect_datagram(&c), b"on the new one");
        proxy.ctl.close_listener(&opened, CloseMode::End);
        proxy.eventually("its session ended with it", |p| {
            p.sessions()
                .iter()
                .all(|s| s.data_port != usize::from(opened.id.0))
        });
        // The port is gone: nothing answers any more, and every worker let go of it.
        c.send_to(b"after close", opened.addr).unwrap();
        expect_nothing(&c, Duration::from_millis(100));
        proxy.eventually("the port is free", |_| UdpSocket::bind(opened.addr).is_ok());
    }
    stop.store(true, Ordering::Relaxed);
    let exchanged = traffic.join().unwrap();
    assert!(exchanged > 0);
    assert_eq!(
        proxy.sessions().len(),
        1,
        "the steady session is still there"
    );
    assert_eq!(proxy.ctl.counters().dropped(DropReason::UpstreamSend), 0);
}

#[test]
fn a_port_in_use_is_refused_at_once_and_opens_nothing() {
    let proxy = Proxy::start(2, |_| {});
    // Held by this data plane: named by its owner.
    let e = proxy
        .ctl
        .open_listener(token_port(proxy.addr().port()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "udp/{} is already open for data port game",
            proxy.addr().port()
        )
    );
    // Held by another socket (another process): the bind error, synchronously.
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    let e = chain(
        &proxy
            .ctl
            .open_listener(token_port(other.local_addr().unwrap().port()))
            .unwrap_err(),
    );
    assert!(e.contains("already in use by another process"), "{e}");
    // Nothing was left half-open: the next listener gets the next id.
    let opened = proxy.ctl.open_listener(token_port(0)).unwrap();
    assert_eq!(opened.id, ListenerId(1));
}

#[test]
fn a_draining_listener_keeps_its_sessions_and_closes_after_the_last() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let opened = proxy.ctl.open_listener(token_port(0)).unwrap();
    let old = client();
    old.send_to(
        grant_on(&proxy, opened.id, echo.addr).as_bytes(),
        opened.addr,
    )
    .unwrap();
    old.send_to(b"1", opened.addr).unwrap();
    assert_eq!(expect_datagram(&old), b"1");

    proxy.ctl.close_listener(&opened, CloseMode::Drain);
    std::thread::sleep(Duration::from_millis(50));
    // No new session, even with a valid token.
    let late = client();
    late.send_to(
        grant_on(&proxy, opened.id, echo.addr).as_bytes(),
        opened.addr,
    )
    .unwrap();
    late.send_to(b"x", opened.addr).unwrap();
    expect_nothing(&late, Duration::from_millis(200));
    // The old one keeps forwarding.
    old.send_to(b"2", opened.addr).unwrap();
    assert_eq!(expect_datagram(&old), b"2");
    // The port is still held while it drains.
    assert!(
        proxy
            .ctl
            .open_listener(token_port(opened.addr.port()))
            .is_err()
    );

    // Its last session ends: the listener closes, and the port can be opened again.
    assert_eq!(proxy.kill(old.local_addr().unwrap()), 1);
    proxy.eventually("the port is free again", |p| {
        p.ctl.open_listener(token_port(opened.addr.port())).is_ok()
    });
}

#[test]
fn each_listener_times_its_sessions_out_by_its_own_timeout() {
    // The data port keeps sessions for 300 s; a listener opened with 400 ms ends its own.
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let short = proxy
        .ctl
        .open_listener(ListenerSpec {
            idle_timeout: Duration::from_millis(400),
            ..token_port(0)
        })
        .unwrap();
    let long_lived = client();
    long_lived
        .send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    let brief = client();
    brief
        .send_to(grant_on(&proxy, short.id, echo.addr).as_bytes(), short.addr)
        .unwrap();
    proxy.eventually("two sessions", |p| p.sessions().len() == 2);
    proxy.eventually("the short listener's session expired", |p| {
        p.ctl.counters().sessions_expired == 1
    });
    let left = proxy.sessions();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].client, long_lived.local_addr().unwrap());
}

#[test]
fn a_drain_keeps_every_workers_socket_until_all_its_sessions_end() {
    // With several workers, a worker that dropped its socket as soon as *its* sessions ended
    // would shrink the reuse-port group, and the kernel would re-hash the remaining clients
    // onto workers that do not know them.
    let proxy = Proxy::start(4, |_| {});
    let echo = Echo::plain();
    let opened = proxy.ctl.open_listener(token_port(0)).unwrap();
    let clients: Vec<UdpSocket> = (0..24).map(|_| client()).collect();
    for c in &clients {
        c.send_to(
            grant_on(&proxy, opened.id, echo.addr).as_bytes(),
            opened.addr,
        )
        .unwrap();
    }
    proxy.eventually("24 sessions", |p| p.sessions().len() == 24);
    let workers: std::collections::BTreeSet<usize> =
        proxy.sessions().iter().map(|s| s.worker).collect();
    assert!(
        workers.len() > 1,
        "sessions on several workers: {workers:?}"
    );

    proxy.ctl.close_listener(&opened, CloseMode::Drain);
    // End sessions one by one; every one left keeps being answered.
    for (ended, c) in clients.iter().enumerate() {
        for (i, other) in clients.iter().enumerate().skip(ended) {
            let seq = format!("{ended}/{i}");
            other.send_to(seq.as_bytes(), opened.addr).unwrap();
            assert_eq!(
                expect_datagram(other),
                seq.as_bytes(),
                "client {i} after {ended} ended"
            );
        }
        assert_eq!(proxy.kill(c.local_addr().unwrap()), 1);
    }
    proxy.eventually("every worker let go of the port", |_| {
        UdpSocket::bind(opened.addr).is_ok()
    });
}

#[test]
fn a_stale_or_second_close_does_nothing() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let first = proxy.ctl.open_listener(token_port(0)).unwrap();
    proxy.ctl.close_listener(&first, CloseMode::End);
    proxy.ctl.close_listener(&first, CloseMode::End);
    // The id comes free once every worker has let go; the next listener takes it.
    let mut second = proxy.ctl.open_listener(token_port(0)).unwrap();
    let mut tries = 0;
    while second.id != first.id && tries < 100 {
        proxy.ctl.close_listener(&second, CloseMode::End);
        std::thread::sleep(Duration::from_millis(10));
        second = proxy.ctl.open_listener(token_port(0)).unwrap();
        tries += 1;
    }
    assert_eq!(second.id, first.id, "the id was reused");
    // A close through the old handle leaves the new listener alone.
    proxy.ctl.close_listener(&first, CloseMode::End);
    let c = client();
    c.send_to(
        grant_on(&proxy, second.id, echo.addr).as_bytes(),
        second.addr,
    )
    .unwrap();
    c.send_to(b"still open", second.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"still open");
}

fn tcp_token_port(port: u16) -> ListenerSpec {
    ListenerSpec {
        transport: Transport::Tcp,
        ..token_port(port)
    }
}

#[test]
fn tcp_listeners_open_refuse_conflicts_and_close_without_touching_udp() {
    use std::io::Write;
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    // A UDP and a TCP listener on one port number: another (protocol, port), so allowed. The
    // number must be free for both, and other tests' TCP sockets come and go: try a few.
    let (udp, same_number) = (0..50)
        .find_map(|_| {
            let port = UdpSocket::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            let udp = proxy.ctl.open_listener(token_port(port)).ok()?;
            match proxy.ctl.open_listener(tcp_token_port(port)) {
                Ok(tcp) => Some((udp, tcp)),
                Err(_) => {
                    proxy.ctl.close_listener(&udp, CloseMode::End);
                    None
                }
            }
        })
        .expect("a port number free for UDP and TCP");
    let port = udp.addr.port();
    let steady = client();
    steady
        .send_to(grant_on(&proxy, udp.id, echo.addr).as_bytes(), udp.addr)
        .unwrap();
    steady.send_to(b"udp", udp.addr).unwrap();
    assert_eq!(expect_datagram(&steady), b"udp");
    let e = proxy
        .ctl
        .open_listener(tcp_token_port(port))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("tcp/{port} is already open for test port {port}")
    );
    // Held by another process: refused synchronously, with the reason.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = chain(
        &proxy
            .ctl
            .open_listener(tcp_token_port(other.local_addr().unwrap().port()))
            .unwrap_err(),
    );
    assert!(
        e.contains("TCP port") && e.contains("already in use"),
        "{e}"
    );

    // A TCP session on it, then close it: the session ends, the port is freed, and the UDP
    // session on the same port number carries on.
    let backend = TcpBackend::spawn();
    let token = grant_on(&proxy, same_number.id, backend.addr);
    let mut c = tcp_client(same_number.addr);
    c.write_all(format!("{token}\nx").as_bytes()).unwrap();
    let mut server = backend.accept();
    assert_eq!(read_exact_within(&mut server, 1), b"x");
    proxy.ctl.close_listener(&same_number, CloseMode::End);
    let mut buf = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut c, &mut buf),
        Ok(0) | Err(_)
    ));
    proxy.eventually("the TCP port is free", |_| {
        std::net::TcpListener::bind(same_number.addr).is_ok()
    });
    steady.send_to(b"udp still", udp.addr).unwrap();
    assert_eq!(expect_datagram(&steady), b"udp still");
    assert_eq!(proxy.sessions().len(), 1);
}

#[test]
fn a_listener_is_updated_while_it_serves_and_new_sessions_take_the_change() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let opened = proxy.ctl.open_listener(token_port(0)).unwrap();
    let before = client();
    before
        .send_to(
            grant_on(&proxy, opened.id, echo.addr).as_bytes(),
            opened.addr,
        )
        .unwrap();
    before.send_to(b"a", opened.addr).unwrap();
    assert_eq!(expect_datagram(&before), b"a");
    assert!(proxy.ctl.update_listener(
        &opened,
        ListenerKind::TokenPort,
        Duration::from_millis(300)
    ));
    let after = client();
    after
        .send_to(
            grant_on(&proxy, opened.id, echo.addr).as_bytes(),
            opened.addr,
        )
        .unwrap();
    after.send_to(b"b", opened.addr).unwrap();
    assert_eq!(expect_datagram(&after), b"b");
    // The session opened after the update goes idle after 300 ms; the one before keeps its
    // 300 s and never missed a datagram.
    proxy.eventually("the new session expired", |p| {
        p.ctl.counters().sessions_expired == 1
    });
    before.send_to(b"still", opened.addr).unwrap();
    assert_eq!(expect_datagram(&before), b"still");
    assert_eq!(proxy.sessions().len(), 1);
    // A closed listener (or a stale handle) is not updated.
    proxy.ctl.close_listener(&opened, CloseMode::End);
    assert!(
        !proxy
            .ctl
            .update_listener(&opened, ListenerKind::TokenPort, Duration::from_secs(1))
    );
}
