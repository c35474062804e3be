//! Route entry points over real loopback sockets: weighted picks, sticky sessions, re-homing
//! when an endpoint leaves, `no_route`, per-route idle timeouts, and TCP connections picked by
//! the same rules.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dataplane::{
    Cidr, DropReason, ListenerKind, ListenerSpec, Match, OpenedListener, RouteBackend,
    RouteCounter, RouteTable, Rule, SessionKind, Transport,
};

fn backend(weight: u32, endpoints: &[SocketAddr], sessions: &Arc<RouteCounter>) -> RouteBackend {
    RouteBackend {
        service: "games/svc".into(),
        weight,
        endpoints: endpoints.to_vec(),
        sessions: Arc::clone(sessions),
        drops_share: false,
    }
}

fn rule(key: u64, matcher: Match, backends: Vec<RouteBackend>, idle: u64) -> Rule {
    Rule {
        key,
        route: "games/route".into(),
        matcher,
        backends,
        idle_timeout: Duration::from_secs(idle),
        proxy: Default::default(),
        rehomed: Arc::default(),
    }
}

fn kind(rules: Vec<Rule>) -> ListenerKind {
    ListenerKind::Route {
        table: Arc::new(RouteTable { rules }),
    }
}

fn open(proxy: &Proxy, transport: Transport, kind: ListenerKind) -> OpenedListener {
    proxy
        .ctl
        .open_listener(ListenerSpec {
            owner: "entry point test".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            transport,
            kind,
            idle_timeout: Duration::from_secs(300),
        })
        .unwrap()
}

#[test]
fn sessions_stick_to_their_endpoint_and_are_rehomed_when_it_leaves() {
    let proxy = Proxy::start(2, |_| {});
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    let counted = Arc::new(RouteCounter::default());
    let both = kind(vec![rule(
        1,
        Match::default(),
        vec![backend(1, &[a.addr, b.addr], &counted)],
        300,
    )]);
    let entry = open(&proxy, Transport::Udp, both);
    let clients: Vec<_> = (0..8).map(|_| client()).collect();
    let mut first = Vec::new();
    for c in &clients {
        c.send_to(b"1", entry.addr).unwrap();
        first.push(expect_datagram(c)[0]);
    }
    assert!(first.contains(&b'A') && first.contains(&b'B'), "{first:?}");
    // Every datagram of a session reaches the same endpoint.
    for _ in 0..5 {
        for (c, tag) in clients.iter().zip(&first) {
            c.send_to(b"2", entry.addr).unwrap();
            assert_eq!(expect_datagram(c)[0], *tag);
        }
    }
    assert_eq!(counted.get(), 8);
    assert!(
        proxy
            .sessions()
            .iter()
            .all(|s| s.kind == SessionKind::Route)
    );

    // A leaves: its sessions re-home to B, the others stay where they were.
    let rehomed = Arc::new(RouteCounter::default());
    let mut only_b = rule(
        1,
        Match::default(),
        vec![backend(1, &[b.addr], &counted)],
        300,
    );
    only_b.rehomed = Arc::clone(&rehomed);
    let table = ListenerKind::Route {
        table: Arc::new(RouteTable {
            rules: vec![only_b],
        }),
    };
    assert!(
        proxy
            .ctl
            .update_listener(&entry, table, Duration::from_secs(300))
    );
    let moved = first.iter().filter(|t| **t == b'A').count() as u64;
    proxy.eventually("A's sessions re-homed", |_| rehomed.get() == moved);
    for c in &clients {
        c.send_to(b"3", entry.addr).unwrap();
        assert_eq!(expect_datagram(c)[0], b'B');
    }
    assert_eq!(proxy.sessions().len(), 8, "moved, none lost or reopened");
    assert_eq!(proxy.ctl.counters().sessions_rehomed, moved);

    // No endpoint at all: the sessions end, counted as no_route; so are new clients.
    let none = kind(vec![rule(1, Match::default(), vec![], 300)]);
    assert!(
        proxy
            .ctl
            .update_listener(&entry, none, Duration::from_secs(300))
    );
    proxy.eventually("stranded sessions end", |p| p.sessions().is_empty());
    let c = client();
    c.send_to(b"4", entry.addr).unwrap();
    expect_nothing(&c, Duration::from_millis(200));
    let counters = proxy.ctl.counters();
    assert_eq!(counters.dropped(DropReason::NoRoute), 8 + 1);
    let on_entry = proxy.ctl.listener_counters(&entry).unwrap().snapshot();
    assert_eq!(on_entry.dropped(DropReason::NoRoute), 9);
}

#[test]
fn rules_match_source_and_carry_their_idle_timeout() {
    let proxy = Proxy::start(1, |_| {});
    let (local2, any) = (Echo::tagged(b'2'), Echo::tagged(b'*'));
    let n = Arc::new(RouteCounter::default());
    let only_127_0_0_2 = Match {
        source_cidrs: vec![Cidr::parse("127.0.0.2/32").unwrap()],
        source_ports: vec![],
    };
    let entry = open(
        &proxy,
        Transport::Udp,
        kind(vec![
            rule(1, only_127_0_0_2, vec![backend(1, &[local2.addr], &n)], 1),
            rule(2, Match::default(), vec![backend(1, &[any.addr], &n)], 300),
        ]),
    );
    let from_2 = client_on("127.0.0.2:0");
    from_2.send_to(b"x", entry.addr).unwrap();
    assert_eq!(expect_datagram(&from_2), b"2x");
    let from_1 = client();
    from_1.send_to(b"y", entry.addr).unwrap();
    assert_eq!(expect_datagram(&from_1), b"*y");
    // The first rule's 1 s idle timeout ends its session; the catch-all's stays.
    proxy.eventually("the 1 s session expired", |p| {
        let s = p.sessions();
        s.len() == 1 && s[0].client == from_1.local_addr().unwrap()
    });
}

#[test]
fn tcp_connections_pick_by_the_same_rules_and_keep_their_endpoint() {
    let proxy = Proxy::start(2, |_| {});
    let (a, b) = (TcpEcho::tagged(b'a'), TcpEcho::tagged(b'b'));
    let n = Arc::new(RouteCounter::default());
    let to_a = kind(vec![rule(
        1,
        Match::default(),
        vec![backend(1, &[a.addr], &n)],
        300,
    )]);
    let entry = open(&proxy, Transport::Tcp, to_a);
    let mut old = tcp_client(entry.addr);
    old.write_all(b"x").unwrap();
    assert_eq!(read_exact_within(&mut old, 2), b"ax");
    let to_b = kind(vec![rule(
        1,
        Match::default(),
        vec![backend(1, &[b.addr], &n)],
        300,
    )]);
    assert!(
        proxy
            .ctl
            .update_listener(&entry, to_b, Duration::from_secs(300))
    );
    proxy.eventually("a new connection goes to B", |_| {
        let mut new = tcp_client(entry.addr);
        new.write_all(b"y").is_ok() && read_exact_within(&mut new, 2) == b"by"
    });
    old.write_all(b"z").unwrap();
    assert_eq!(read_exact_within(&mut old, 1), b"z", "a stream cannot move");
    assert_eq!(
        n.get(),
        proxy.ctl.counters().tcp_created(SessionKind::Route)
    );
    // No rule: the connection is refused and counted.
    let none = kind(vec![]);
    assert!(
        proxy
            .ctl
            .update_listener(&entry, none, Duration::from_secs(300))
    );
    proxy.eventually("refused as no_route", |p| {
        let mut c = tcp_client(entry.addr);
        let mut buf = [0u8; 1];
        use std::io::Read;
        matches!(c.read(&mut buf), Ok(0)) && p.ctl.counters().refused(DropReason::NoRoute) >= 1
    });
}

#[test]
fn a_route_swap_touches_its_own_sessions_not_the_ten_thousand_of_another_listener() {
    let proxy = Proxy::start(2, |_| {});
    // Another entry point with 10,000 sessions over 100 endpoints (nobody needs to answer:
    // a session opens on its first datagram).
    let counted = Arc::new(RouteCounter::default());
    let silent: Vec<SocketAddr> = (1..=100)
        .map(|i| SocketAddr::from(([127, 3, 0, i], 9)))
        .collect();
    let busy = open(
        &proxy,
        Transport::Udp,
        kind(vec![rule(
            1,
            Match::default(),
            vec![backend(1, &silent, &counted)],
            300,
        )]),
    );
    // One socket per source address, kept so each round resends from the same addresses: a
    // datagram the kernel dropped under the burst is sent again, and one that made its session
    // only adds to it.
    let sources: Vec<std::net::UdpSocket> = (0..10_000u32)
        .map(|i| {
            let ip = [127, 2, (i / 250) as u8, (i % 250 + 1) as u8];
            std::net::UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap()
        })
        .collect();
    for _round in 0..20 {
        if proxy.ctl.counters().created(SessionKind::Route) >= 10_000 {
            break;
        }
        for (i, c) in sources.iter().enumerate() {
            c.send_to(b"x", busy.addr).unwrap();
            if i % 250 == 249 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(proxy.ctl.counters().created(SessionKind::Route), 10_000);
    drop(sources);
    // The swapped entry point: one session, whose endpoint then leaves.
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    let table = |to: SocketAddr| {
        kind(vec![rule(
            2,
            Match::default(),
            vec![backend(1, &[to], &counted)],
            300,
        )])
    };
    let entry = open(&proxy, Transport::Udp, table(a.addr));
    let c = client();
    c.send_to(b"1", entry.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"A1");
    assert!(
        proxy
            .ctl
            .update_listener(&entry, table(b.addr), Duration::from_secs(300))
    );
    proxy.eventually("the swapped entry point's session is re-homed", |p| {
        p.ctl.counters().sessions_rehomed == 1
    });
    c.send_to(b"2", entry.addr).unwrap();
    assert_eq!(expect_datagram(&c), b"B2");
    // The busy entry point's sessions are where they were.
    let sessions = proxy.sessions();
    let on_busy = sessions
        .iter()
        .filter(|s| silent.contains(&s.target))
        .count();
    assert_eq!((on_busy, sessions.len()), (10_000, 10_001));
    assert_eq!(proxy.ctl.counters().sessions_rehomed, 1);
}
