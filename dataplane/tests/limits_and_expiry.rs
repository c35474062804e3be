//! Idle expiry, session caps, admin kill, drain and shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dataplane::DropReason;
use dataplane::ctl::ClientMatch;

#[test]
fn idle_sessions_expire_and_free_their_sockets() {
    let proxy = Proxy::start(2, |cfg| cfg.session_timeout = Duration::from_millis(500));
    // Sockets are counted by the address they are connected to: an echo on an address of its
    // own, so sockets other tests still hold to a reused 127.0.0.1 port are not counted.
    let echo = Echo::spawn("127.0.0.77:0", None);
    let clients: Vec<_> = (0..20).map(|_| client()).collect();
    for c in &clients {
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
    }
    proxy.eventually("20 sessions", |p| p.ctl.counters().sessions_active == 20);
    assert_eq!(
        udp_sockets_connected_to(echo.addr),
        20,
        "one upstream socket per session"
    );
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
    drop(clients);
    proxy.eventually("busy one expired too", |p| {
        p.ctl.counters().sessions_active == 0
    });
    assert_eq!(
        udp_sockets_connected_to(echo.addr),
        0,
        "every upstream socket closed"
    );
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
    let echo = Echo::spawn("127.0.0.78:0", None);
    {
        let proxy = Proxy::start(2, |_| {});
        let c = client();
        c.send_to(proxy.grant_one(1, echo.addr).as_bytes(), proxy.addr())
            .unwrap();
        proxy.eventually("session", |p| p.sessions().len() == 1);
        assert_eq!(udp_sockets_connected_to(echo.addr), 1);
    }
    assert_eq!(udp_sockets_connected_to(echo.addr), 0);
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
