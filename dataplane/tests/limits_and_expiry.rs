//! Idle expiry, session caps, admin kill, drain and shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dataplane::DropReason;
use dataplane::ctl::ClientMatch;

#[test]
fn idle_sessions_expire_and_their_places_are_not_reused_at_once() {
    // One worker: each worker has its own sockets, and which worker a client lands on is the
    // kernel's hash.
    let proxy = Proxy::start(1, |cfg| cfg.session_timeout = Duration::from_millis(500));
    let echo = Echo::plain();
    let clients: Vec<_> = (0..20).map(|_| client()).collect();
    for c in &clients {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
    }
    proxy.eventually("20 sessions", |p| p.ctl.counters().sessions_active == 20);
    // Twenty sessions to one backend address: twenty sockets, one source port each.
    assert_eq!(proxy.ctl.counters().upstream_sockets, 20);
    // Keep one session busy past the timeout; the others go idle.
    let busy = &clients[0];
    for _ in 0..10 {
        busy.send_to(b"x", proxy.addr()).unwrap();
        assert_eq!(expect_datagram(busy), b"x");
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.eventually("idle ones expired", |p| {
        p.ctl.counters().sessions_expired == 19
    });
    assert_eq!(proxy.sessions().len(), 1);
    // New sessions to the same backend do not take the places the expired ones left (the
    // backend may still send there for the old players): new sockets, for a while.
    let again: Vec<_> = (0..19).map(|_| client()).collect();
    for c in &again {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
        c.send_to(b"y", proxy.addr()).unwrap();
        assert_eq!(expect_datagram(c), b"y");
    }
    assert_eq!(proxy.ctl.counters().upstream_sockets, 39);
    drop(clients);
    drop(again);
    proxy.eventually("all expired", |p| p.ctl.counters().sessions_active == 0);
}

#[test]
fn sessions_to_many_backends_share_upstream_sockets_and_replies_find_their_session() {
    let proxy = Proxy::start(1, |_| {});
    // 8 backends × 3 sessions each: 3 sockets carry all 24, each session keeps its own
    // (socket, backend) pair, so every backend sees 3 distinct source ports.
    let backends: Vec<Echo> = (0..8).map(Echo::tagged).collect();
    let mut clients = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        for _ in 0..3 {
            let c = client();
            c.send_to(proxy.grant_one(i as u64, b.addr).as_bytes(), proxy.addr())
                .unwrap();
            clients.push((i as u8, c));
        }
    }
    for round in 0..3u8 {
        for (_, c) in &clients {
            c.send_to(&[round], proxy.addr()).unwrap();
        }
        for (tag, c) in &clients {
            assert_eq!(
                expect_datagram(c),
                [*tag, round],
                "a reply reaches its own client"
            );
        }
    }
    assert_eq!(proxy.ctl.counters().upstream_sockets, 3);
    // A stranger writing to a shared socket is dropped and counted, never delivered; so is
    // a late reply from a backend the session has left.
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    let c = client();
    c.send_to(
        proxy.grant_one(99, server.local_addr().unwrap()).as_bytes(),
        proxy.addr(),
    )
    .unwrap();
    c.send_to(b"hi", proxy.addr()).unwrap();
    let mut buf = [0u8; 16];
    let (_, upstream) = server.recv_from(&mut buf).unwrap();
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(b"spoof", upstream).unwrap();
    server.send_to(b"real", upstream).unwrap();
    assert_eq!(expect_datagram(&c), b"real");
    expect_nothing(&c, Duration::from_millis(100));
    proxy.eventually("the stray is counted", |p| {
        p.ctl.counters().dropped(DropReason::StrayReply) == 1
    });
}

#[test]
fn a_late_reply_after_a_move_never_reaches_the_next_session_to_that_backend() {
    let proxy = Proxy::start(1, |_| {});
    let old = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    old.set_read_timeout(Some(WAIT)).unwrap();
    let new = Echo::tagged(b'N');
    let a = client();
    a.send_to(
        proxy.grant_one(1, old.local_addr().unwrap()).as_bytes(),
        proxy.addr(),
    )
    .unwrap();
    a.send_to(b"a", proxy.addr()).unwrap();
    let mut buf = [0u8; 16];
    let (_, a_port) = old.recv_from(&mut buf).unwrap();
    // A moves to another backend; C then opens a session to A's old backend.
    a.send_to(&control_packet(&proxy.grant_one(2, new.addr)), proxy.addr())
        .unwrap();
    a.send_to(b"m", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&a), b"Nm");
    let c = client();
    c.send_to(
        proxy.grant_one(1, old.local_addr().unwrap()).as_bytes(),
        proxy.addr(),
    )
    .unwrap();
    c.send_to(b"c", proxy.addr()).unwrap();
    let (_, c_port) = old.recv_from(&mut buf).unwrap();
    assert_ne!(c_port, a_port, "C does not get A's old source port");
    // The old backend, still talking to A's old port: dropped, for nobody.
    old.send_to(b"late", a_port).unwrap();
    expect_nothing(&c, Duration::from_millis(100));
    expect_nothing(&a, Duration::from_millis(10));
    proxy.eventually("the late reply is a stray", |p| {
        p.ctl.counters().dropped(DropReason::StrayReply) == 1
    });
    old.send_to(b"to c", c_port).unwrap();
    assert_eq!(expect_datagram(&c), b"to c");
}

#[test]
fn replies_keep_a_session_alive() {
    let proxy = Proxy::start(1, |cfg| cfg.session_timeout = Duration::from_millis(400));
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    let c = client();
    c.send_to(
        proxy.grant_one(1, server.local_addr().unwrap()).as_bytes(),
        proxy.addr(),
    )
    .unwrap();
    c.send_to(b"hi", proxy.addr()).unwrap();
    let mut buf = [0u8; 16];
    let (_, peer) = server.recv_from(&mut buf).unwrap();
    // Only the server talks for a while: the session must stay.
    for _ in 0..8 {
        server.send_to(b"tick", peer).unwrap();
        assert_eq!(expect_datagram(&c), b"tick");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(proxy.ctl.counters().sessions_expired, 0);
}

#[test]
fn max_sessions_refuses_new_ones_only() {
    let proxy = Proxy::start(2, |cfg| cfg.max_sessions = 3);
    let echo = Echo::plain();
    let clients: Vec<_> = (0..5).map(|_| client()).collect();
    for c in &clients {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.eventually("two refused", |p| {
        p.ctl.counters().dropped(DropReason::SessionLimit) == 2
    });
    assert_eq!(proxy.sessions().len(), 3);
    for c in &clients[..3] {
        c.send_to(b"ok", proxy.addr()).unwrap();
        assert_eq!(expect_datagram(c), b"ok");
    }
}

#[test]
fn max_sessions_per_ip() {
    let proxy = Proxy::start(2, |cfg| cfg.max_sessions_per_ip = Some(2));
    let echo = Echo::plain();
    let clients: Vec<_> = (0..4).map(|_| client()).collect();
    for c in &clients {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.eventually("two refused", |p| {
        p.ctl.counters().dropped(DropReason::IpLimit) == 2
    });
    assert_eq!(proxy.sessions().len(), 2);
    // Another IP on the loopback net is a different budget.
    let other = client_on("127.0.0.2:0");
    other
        .send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    other.send_to(b"hi", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&other), b"hi");
}

#[test]
fn kill_sessions_by_client() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let a = client();
    let b = client();
    for c in [&a, &b] {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
    }
    proxy.eventually("2 sessions", |p| p.sessions().len() == 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let asked = proxy.ctl.kill_sessions(
        ClientMatch::Addr(a.local_addr().unwrap()),
        Arc::new(move |n| tx.lock().unwrap().send(n).unwrap()),
    );
    let killed: usize = (0..asked).map(|_| rx.recv_timeout(WAIT).unwrap()).sum();
    assert_eq!(killed, 1);
    let left = proxy.sessions();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].client, b.local_addr().unwrap());
    assert_eq!(proxy.ctl.counters().sessions_closed, 1);
}

#[test]
fn drain_keeps_sessions_but_opens_none() {
    let proxy = Proxy::start(2, |_| {});
    let echo = Echo::plain();
    let old = client();
    old.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    proxy.set_default(1, Some(echo.addr));
    proxy.eventually("session", |p| p.sessions().len() == 1);
    proxy.ctl.drain();
    let token = proxy.grant_one(1, echo.addr);
    let new = client();
    new.send_to(token.as_bytes(), proxy.addr()).unwrap();
    new.send_to(b"x", proxy.addr()).unwrap();
    expect_nothing(&new, Duration::from_millis(200));
    old.send_to(b"still here", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&old), b"still here");
    assert_eq!(proxy.ctl.counters().dropped(DropReason::Draining), 2);
}

#[test]
fn shutdown_closes_every_socket() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    let upstream_port = {
        let proxy = Proxy::start(2, |_| {});
        let c = client();
        c.send_to(
            proxy.grant_one(1, server.local_addr().unwrap()).as_bytes(),
            proxy.addr(),
        )
        .unwrap();
        c.send_to(b"x", proxy.addr()).unwrap();
        let mut buf = [0u8; 8];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(udp_sockets_on_port(from.port()), 1);
        from.port()
    };
    assert_eq!(udp_sockets_on_port(upstream_port), 0);
}

#[test]
fn port_in_use_is_a_clear_start_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = dataplane::DataPlaneConfig::with_ports(vec![dataplane::DataPortConfig::udp(
        "game",
        taken.local_addr().unwrap(),
    )]);
    cfg.workers = std::num::NonZeroUsize::new(1).unwrap();
    let err = chain(&dataplane::DataPlane::start(cfg).unwrap_err());
    let port = taken.local_addr().unwrap().to_string();
    assert!(
        err.contains("data port game") && err.contains("already in use") && err.contains(&port),
        "{err}"
    );
}

#[test]
fn a_second_data_plane_on_the_same_port_is_refused() {
    // The first holds the port the way every instance does: SO_REUSEADDR + SO_REUSEPORT.
    let first = Proxy::start(2, |_| {});
    let mut cfg = dataplane::DataPlaneConfig::with_ports(vec![dataplane::DataPortConfig::udp(
        "game",
        first.addr(),
    )]);
    cfg.workers = std::num::NonZeroUsize::new(2).unwrap();
    let err = chain(&dataplane::DataPlane::start(cfg).unwrap_err());
    assert!(
        err.contains(&first.addr().to_string()) && err.contains("already in use"),
        "{err}"
    );
    // The first still serves.
    let echo = Echo::spawn("127.0.0.1:0", None);
    let c = client();
    c.send_to(first.grant_one(1, echo.addr).as_bytes(), first.addr())
        .unwrap();
    c.send_to(b"still mine", first.addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"still mine");
}

#[test]
fn workers_are_named_and_pinned() {
    let proxy = Proxy::start(2, |cfg| {
        cfg.affinity = dataplane::WorkerAffinity::Cores(vec![0]);
    });
    // Workers pin themselves as their threads start, so wait for it rather than sample once.
    proxy.eventually("both workers pinned to core 0", |_| {
        workers_pinned_to_core_0() >= 2
    });
    drop(proxy);
}

/// Threads of this process named `dp-worker-*` whose allowed CPUs are exactly core 0. Tests run
/// in parallel, so other proxies' (unpinned) workers are present too and are not counted.
fn workers_pinned_to_core_0() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_string();
            (name.starts_with("dp-worker-") && cpus == "0").then_some(())
        })
        .count()
}

/// A player refused at a cap (`cap` set by `tweak`, dropped as `reason`) keeps its token: once
/// the session holding the slot ends, the retry with the same token opens the session.
fn refused_token_redeems_once_a_slot_frees(
    tweak: impl FnOnce(&mut dataplane::DataPlaneConfig),
    reason: DropReason,
) {
    let proxy = Proxy::start(2, tweak);
    let echo = Echo::plain();
    let holder = client();
    holder
        .send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
        .unwrap();
    proxy.eventually("one session", |p| p.sessions().len() == 1);
    let player = client();
    let token = proxy.grant_one(1, echo.addr);
    player.send_to(token.as_bytes(), proxy.addr()).unwrap();
    proxy.eventually("refused at the cap", |p| {
        p.ctl.counters().dropped(reason) == 1
    });
    assert_eq!(proxy.kill(holder.local_addr().unwrap()), 1);
    player.send_to(token.as_bytes(), proxy.addr()).unwrap();
    player.send_to(b"in", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&player), b"in");
    assert_eq!(proxy.ctl.counters().tokens_redeemed, 2);
    assert_eq!(proxy.ctl.counters().tokens_rejected.iter().sum::<u64>(), 0);
}

#[test]
fn a_token_refused_at_max_sessions_redeems_once_a_slot_frees() {
    refused_token_redeems_once_a_slot_frees(|cfg| cfg.max_sessions = 1, DropReason::SessionLimit);
}

#[test]
fn a_token_refused_at_max_sessions_per_ip_redeems_once_a_slot_frees() {
    refused_token_redeems_once_a_slot_frees(
        |cfg| cfg.max_sessions_per_ip = Some(1),
        DropReason::IpLimit,
    );
}

#[test]
fn an_ipv4_mapped_backend_address_is_an_ipv4_backend() {
    let proxy = Proxy::start(1, |_| {});
    let echo = Echo::tagged(b'M');
    let mapped: std::net::SocketAddr = format!("[::ffff:127.0.0.1]:{}", echo.addr.port())
        .parse()
        .unwrap();
    let c = client();
    c.send_to(proxy.grant_one(1, mapped).as_bytes(), proxy.addr())
        .unwrap();
    c.send_to(b"v4", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"Mv4");
    assert_eq!(proxy.ctl.counters().dropped(DropReason::StrayReply), 0);
}

#[test]
fn a_flooding_source_is_rate_limited_and_sessions_of_others_keep_flowing() {
    let proxy = Proxy::start(2, |c| {
        c.rate_limit = Some(dataplane::RateLimit {
            packets_per_second: 20,
            burst: 5,
            sessions_per_second: 0,
        });
    });
    let echo = Echo::tagged(b'E');
    let player = client();
    let token = proxy.grant_one(1, echo.addr);
    player.send_to(token.as_bytes(), proxy.addr()).unwrap();
    player.send_to(b"1", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&player), b"E1");
    // One address sends garbage (no token, no default backend) as fast as it can.
    let flooder = client();
    for _ in 0..500 {
        flooder.send_to(b"junk", proxy.addr()).unwrap();
    }
    // (The kernel may drop some of the burst at the socket buffer: most is enough.)
    proxy.eventually("the flood is counted", |p| {
        let c = p.ctl.counters();
        c.dropped(DropReason::RateLimited) + c.dropped(DropReason::NoSession) >= 450
    });
    let c = proxy.ctl.counters();
    assert!(
        c.dropped(DropReason::NoSession) <= 5 + 2 * 20,
        "only the burst (and the refill) gets past the bucket: {c:?}"
    );
    assert!(c.dropped(DropReason::RateLimited) >= 350);
    // The player's session is not limited: it has a session.
    for i in 0..50u8 {
        player.send_to(&[i], proxy.addr()).unwrap();
        assert_eq!(expect_datagram(&player), [b'E', i]);
    }
}

#[test]
fn only_sessions_that_open_spend_the_session_rate_and_tcp_is_limited_too() {
    let proxy = Proxy::start(1, |c| {
        c.rate_limit = Some(dataplane::RateLimit {
            packets_per_second: 1000,
            burst: 1000,
            sessions_per_second: 1,
        });
    });
    let echo = Echo::tagged(b'E');
    // Junk and a refused token spend no session token: the real token still opens one.
    let c = client();
    for _ in 0..5 {
        c.send_to(b"junk", proxy.addr()).unwrap();
    }
    c.send_to(b"00000000-0000-4000-8000-000000000000", proxy.addr())
        .unwrap();
    let token = proxy.grant_one(1, echo.addr);
    c.send_to(token.as_bytes(), proxy.addr()).unwrap();
    c.send_to(b"1", proxy.addr()).unwrap();
    assert_eq!(expect_datagram(&c), b"E1");
    // A second session from the same address within the second is refused.
    let again = client();
    let token = proxy.grant_one(1, echo.addr);
    again.send_to(token.as_bytes(), proxy.addr()).unwrap();
    expect_nothing(&again, Duration::from_millis(200));
    assert!(proxy.ctl.counters().dropped(DropReason::RateLimited) >= 1);
}

#[test]
fn tcp_connections_over_the_rate_are_refused() {
    use std::io::Read;
    let proxy = Proxy::start(1, |c| {
        c.rate_limit = Some(dataplane::RateLimit {
            packets_per_second: 1,
            burst: 2,
            sessions_per_second: 0,
        });
    });
    let backend = TcpEcho::tagged(b't');
    let fw = proxy
        .ctl
        .open_listener(dataplane::ListenerSpec {
            owner: "test".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            transport: dataplane::Transport::Tcp,
            kind: dataplane::ListenerKind::Forward {
                target: backend.addr,
                backend: dataplane::BackendId(7),
                proxy: Default::default(),
            },
            idle_timeout: Duration::from_secs(60),
        })
        .unwrap();
    let served = (0..5)
        .filter(|_| {
            let mut s = tcp_client(fw.addr);
            let mut tag = [0u8; 1];
            matches!(s.read(&mut tag), Ok(1))
        })
        .count();
    assert_eq!(served, 2, "the burst, then the rate");
    assert_eq!(proxy.ctl.counters().refused(DropReason::RateLimited), 3);
}
