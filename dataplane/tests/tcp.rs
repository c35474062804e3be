//! TCP data ports over real loopback sockets: the token as first bytes, grants shared with UDP
//! ports, the default backend, the splice (half-close, backpressure, a large transfer), the
//! idle timeout, caps and the control API.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use dataplane::{DataPortConfig, DropReason, SessionKind, TokenRejectReason, Transport};

fn tcp_port(name: &str) -> DataPortConfig {
    DataPortConfig::tcp(name, "127.0.0.1:0".parse().unwrap())
}

/// A data plane whose only data port is TCP.
fn tcp_proxy(workers: usize, tweak: impl FnOnce(&mut dataplane::DataPlaneConfig)) -> Proxy {
    Proxy::start(workers, |cfg| {
        cfg.data_ports = vec![tcp_port("chat")];
        tweak(cfg);
    })
}

#[test]
fn a_token_as_first_bytes_splices_to_its_target_and_the_rest_is_data() {
    let proxy = tcp_proxy(2, |_| {});
    let backend = TcpBackend::spawn();
    for ending in ["", "\n", "\r\n"] {
        let token = proxy.grant_one(1, backend.addr);
        let mut client = tcp_client(proxy.addr());
        // The token, its line ending and the first data in one write: the data is forwarded,
        // the token and line ending are not.
        client
            .write_all(format!("{token}{ending}hello").as_bytes())
            .unwrap();
        let mut server = backend.accept();
        assert_eq!(read_exact_within(&mut server, 5), b"hello", "{ending:?}");
        server.write_all(b"welcome").unwrap();
        assert_eq!(read_exact_within(&mut client, 7), b"welcome");
    }
    // The token alone, its line ending in the next write.
    let token = proxy.grant_one(1, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client.write_all(token.as_bytes()).unwrap();
    let mut server = backend.accept();
    std::thread::sleep(Duration::from_millis(50));
    client.write_all(b"\r").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    client.write_all(b"\nping").unwrap();
    assert_eq!(read_exact_within(&mut server, 4), b"ping");
    // A lone `\r` after the token is data.
    let token = proxy.grant_one(1, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client.write_all(format!("{token}\r").as_bytes()).unwrap();
    let mut server = backend.accept();
    std::thread::sleep(Duration::from_millis(50));
    client.write_all(b"x").unwrap();
    assert_eq!(read_exact_within(&mut server, 2), b"\rx");

    // Counted just after the write that the backend may already have read.
    proxy.eventually("every byte counted", |p| {
        p.ctl.counters().tcp_bytes_upstream == 3 * 5 + 4 + 2
    });
    let c = proxy.ctl.counters();
    assert_eq!(c.tcp_created(SessionKind::Token), 5);
    assert_eq!(c.tokens_redeemed, 5);
    // The loop's connections were closed at both ends, which ends their sessions.
    proxy.eventually("closed connections end their sessions", |p| {
        p.ctl.counters().tcp_sessions_active == 2
    });
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.iter().all(|s| s.protocol == Transport::Tcp));
}

#[test]
fn one_grant_opens_udp_and_tcp_ports_in_any_order_once_each() {
    // udp, tcp, udp: indices 0, 1, 2 are listener ids, grant ports and mapping indices alike.
    let proxy = Proxy::start(2, |cfg| {
        cfg.data_ports.push(tcp_port("chat"));
        cfg.data_ports
            .push(DataPortConfig::udp("voice", "127.0.0.1:0".parse().unwrap()));
    });
    let game = Echo::tagged(1);
    let chat = TcpEcho::tagged(2);
    let voice = Echo::tagged(3);
    let token = proxy.grant(
        7,
        &[Some(game.addr), Some(chat.addr), Some(voice.addr)],
        Duration::from_secs(30),
    );
    // TCP first, then the second UDP port, then the first.
    let mut tcp = tcp_client(proxy.addrs[1]);
    tcp.write_all(format!("{token}\nabc").as_bytes()).unwrap();
    assert_eq!(read_exact_within(&mut tcp, 4), b"\x02abc");
    let v = client();
    v.send_to(token.as_bytes(), proxy.addrs[2]).unwrap();
    v.send_to(b"v", proxy.addrs[2]).unwrap();
    assert_eq!(expect_datagram(&v), b"\x03v");
    let g = client();
    g.send_to(token.as_bytes(), proxy.addrs[0]).unwrap();
    g.send_to(b"g", proxy.addrs[0]).unwrap();
    assert_eq!(expect_datagram(&g), b"\x01g");

    // The TCP port's redemption is spent: a second connection with it is closed.
    let mut again = tcp_client(proxy.addrs[1]);
    again.write_all(token.as_bytes()).unwrap();
    expect_closed(&mut again);
    let c = proxy.ctl.counters();
    assert_eq!(c.rejected(TokenRejectReason::Used), 1);
    assert_eq!(c.refused(DropReason::TokenRejected), 1);
    assert_eq!(c.tokens_redeemed, 3);
    let mut protocols: Vec<_> = proxy
        .sessions()
        .iter()
        .map(|s| (s.data_port, s.protocol))
        .collect();
    protocols.sort_by_key(|p| p.0);
    assert_eq!(
        protocols,
        [
            (0, Transport::Udp),
            (1, Transport::Tcp),
            (2, Transport::Udp)
        ]
    );
}

#[test]
fn without_a_token_the_default_backend_gets_every_byte_or_the_connection_closes() {
    let proxy = tcp_proxy(1, |cfg| cfg.tcp_token_timeout = Duration::from_millis(300));
    // No default: garbage is refused at once, silence at the token timeout.
    let mut garbage = tcp_client(proxy.addr());
    garbage.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    expect_closed(&mut garbage);
    assert_eq!(proxy.ctl.counters().refused(DropReason::NoSession), 1);
    let mut silent = tcp_client(proxy.addr());
    let started = Instant::now();
    expect_closed(&mut silent);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(proxy.ctl.counters().refused(DropReason::TokenTimeout), 1);
    // An unknown token is refused too.
    let mut unknown = tcp_client(proxy.addr());
    unknown
        .write_all(b"550e8400-e29b-41d4-a716-446655440000")
        .unwrap();
    expect_closed(&mut unknown);
    assert_eq!(proxy.ctl.counters().refused(DropReason::TokenRejected), 1);

    let fallback = TcpBackend::spawn();
    proxy.set_default(9, Some(fallback.addr));
    std::thread::sleep(Duration::from_millis(50));
    // A client that speaks first: its first bytes arrive intact, nothing held back.
    let mut speaker = tcp_client(proxy.addr());
    speaker.write_all(b"HELLO 1.0\n").unwrap();
    let mut server = fallback.accept();
    assert_eq!(read_exact_within(&mut server, 10), b"HELLO 1.0\n");
    // A prefix of a token that turns out not to be one: every byte so far goes first.
    let mut almost = tcp_client(proxy.addr());
    almost.write_all(b"550e8400-e29b").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    almost.write_all(b"-zz").unwrap();
    let mut server = fallback.accept();
    assert_eq!(read_exact_within(&mut server, 16), b"550e8400-e29b-zz");
    // A refused token goes to the default with its bytes.
    let mut refused = tcp_client(proxy.addr());
    refused
        .write_all(b"550e8400-e29b-41d4-a716-446655440000\nafter")
        .unwrap();
    let mut server = fallback.accept();
    assert_eq!(
        read_exact_within(&mut server, 42),
        b"550e8400-e29b-41d4-a716-446655440000\nafter"
    );
    // A client that gives up half-way through a token: what it sent, then its FIN.
    let mut quitter = tcp_client(proxy.addr());
    quitter.write_all(b"550e8400").unwrap();
    quitter.shutdown(Shutdown::Write).unwrap();
    let mut server = fallback.accept();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"550e8400");
    // Connect and close without a byte (a port scan): no backend connection at all.
    drop(tcp_client(proxy.addr()));
    fallback.expect_no_connection(Duration::from_millis(200));
    // A protocol where the server speaks first: the client waits out the token timeout.
    let mut listener = tcp_client(proxy.addr());
    let mut server = fallback.accept();
    server.write_all(b"WELCOME").unwrap();
    assert_eq!(read_exact_within(&mut listener, 7), b"WELCOME");
    assert_eq!(proxy.ctl.counters().tcp_created(SessionKind::Default), 5);
}

#[test]
fn half_close_keeps_the_other_direction_open_both_ways() {
    let proxy = tcp_proxy(1, |_| {});
    let backend = TcpBackend::spawn();

    // The client finishes sending first; the backend still answers afterwards.
    let token = proxy.grant_one(1, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client
        .write_all(format!("{token}\nrequest").as_bytes())
        .unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut server = backend.accept();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    server.write_all(b"response").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    proxy.eventually("the finished session ends", |p| {
        p.ctl.counters().tcp_sessions_active == 0
    });

    // The backend finishes first; the client keeps sending.
    let token = proxy.grant_one(1, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client.write_all(format!("{token}\n").as_bytes()).unwrap();
    let mut server = backend.accept();
    server.write_all(b"motd").unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"motd");
    client.write_all(b"still here").unwrap();
    assert_eq!(read_exact_within(&mut server, 10), b"still here");
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    proxy.eventually("the finished session ends", |p| {
        p.ctl.counters().tcp_sessions_active == 0
    });
}

/// FNV-1a, to compare what was sent with what arrived.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

#[test]
fn a_hundred_megabytes_arrive_intact_both_ways() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let proxy = tcp_proxy(2, |_| {});
    let echo = TcpEcho::tagged(0);
    let token = proxy.grant_one(1, echo.addr);
    let mut client = tcp_client(proxy.addr());
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client.write_all(format!("{token}\n").as_bytes()).unwrap();
    let mut writer = client.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        let mut chunk = vec![0u8; 61_001]; // odd size: writes and reads never line up
        let mut seed = 1u64;
        let mut sent = 0;
        while sent < TOTAL {
            let n = chunk.len().min(TOTAL - sent);
            for b in &mut chunk[..n] {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                *b = (seed >> 56) as u8;
            }
            fnv(&mut hash, &chunk[..n]);
            writer.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
        hash
    });
    assert_eq!(read_exact_within(&mut client, 1), [0]);
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut received = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = client.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        fnv(&mut hash, &buf[..n]);
        received += n;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(hash, sender.join().unwrap());
    proxy.eventually("every byte counted", |p| {
        let c = p.ctl.counters();
        c.tcp_bytes_upstream == TOTAL as u64 && c.tcp_bytes_downstream == TOTAL as u64 + 1
    });
}

#[test]
fn a_backend_that_does_not_read_stops_the_client_instead_of_growing_memory() {
    let proxy = tcp_proxy(1, |_| {});
    let backend = TcpBackend::spawn();
    let token = proxy.grant_one(1, backend.addr);
    let client = tcp_client(proxy.addr());
    (&client)
        .write_all(format!("{token}\n").as_bytes())
        .unwrap();
    let server = backend.accept(); // never read
    client.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    let mut stalled_since = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Write until the writes have made no progress for half a second.
    while Instant::now() < deadline {
        match (&client).write(&chunk) {
            Ok(n) => {
                written += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // What is held is the kernel's socket buffers on both connections plus one pipe buffer
    // in the proxy; an unbounded proxy would have taken all 20 s worth.
    assert!(stalled_since.is_some(), "the client was never stopped");
    let bound = 2 * (sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem")) + 1024 * 1024;
    assert!(written < bound, "{written} bytes taken in, bound {bound}");
    // Once the backend reads, everything flows again: nothing stalled for good.
    client.set_nonblocking(false).unwrap();
    let mut server = server;
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while got < written {
        let n = server.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {got} of {written} bytes");
        got += n;
    }
    assert_eq!(got, written);
    (&client).write_all(b"more").unwrap();
    assert_eq!(read_exact_within(&mut server, 4), b"more");
}

/// The largest buffer the kernel autotunes a TCP socket's buffer to (`net.ipv4.tcp_rmem` or
/// `tcp_wmem`, third field).
fn sysctl_max(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(8 * 1024 * 1024)
}

#[test]
fn idle_tcp_sessions_end_and_caps_count_connections() {
    let proxy = tcp_proxy(2, |cfg| {
        cfg.session_timeout = Duration::from_millis(400);
        cfg.max_sessions_per_ip = Some(2);
    });
    let backend = TcpBackend::spawn();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let token = proxy.grant_one(1, backend.addr);
        let mut c = tcp_client(proxy.addr());
        c.write_all(format!("{token}\nx").as_bytes()).unwrap();
        let mut s = backend.accept();
        assert_eq!(read_exact_within(&mut s, 1), b"x");
        clients.push((c, s));
    }
    // A third connection from the same IP is over `maxSessionsPerIp`, token or not.
    let token = proxy.grant_one(1, backend.addr);
    let mut third = tcp_client(proxy.addr());
    let _ = third.write_all(token.as_bytes());
    expect_closed(&mut third);
    assert_eq!(proxy.ctl.counters().refused(DropReason::IpLimit), 1);
    // Traffic keeps a session; silence ends it on both ends.
    let (mut busy, mut busy_server) = clients.remove(0);
    let (mut idle, mut idle_server) = clients.remove(0);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        busy.write_all(b"k").unwrap();
        assert_eq!(read_exact_within(&mut busy_server, 1), b"k");
    }
    expect_closed(&mut idle);
    expect_closed(&mut idle_server);
    proxy.eventually("the expiry is counted", |p| {
        p.ctl.counters().sessions_expired >= 1
    });
    busy.write_all(b"alive").unwrap();
    assert_eq!(read_exact_within(&mut busy_server, 5), b"alive");
}

#[test]
fn a_tcp_session_is_listed_and_killed_through_the_control_api() {
    let proxy = tcp_proxy(2, |_| {});
    let backend = TcpBackend::spawn();
    let token = proxy.grant_one(4, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client.write_all(format!("{token}\nhi").as_bytes()).unwrap();
    let mut server = backend.accept();
    assert_eq!(read_exact_within(&mut server, 2), b"hi");
    let local: SocketAddr = client.local_addr().unwrap();
    proxy.eventually("the bytes counted", |p| {
        p.sessions()
            .first()
            .is_some_and(|s| s.stats.bytes_upstream == 2)
    });
    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(
        (s.client, s.protocol, s.target, s.kind),
        (local, Transport::Tcp, backend.addr, SessionKind::Token)
    );
    assert_eq!(proxy.kill(local), 1);
    expect_closed(&mut client);
    expect_closed(&mut server);
    assert_eq!(proxy.ctl.counters().tcp_sessions_active, 0);
}

#[test]
fn an_unreachable_backend_closes_the_client_and_is_counted() {
    let proxy = tcp_proxy(1, |_| {});
    // A port nobody listens on: the connect is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = closed.local_addr().unwrap();
    drop(closed);
    let token = proxy.grant_one(1, target);
    let mut client = tcp_client(proxy.addr());
    client.write_all(format!("{token}\n").as_bytes()).unwrap();
    expect_closed(&mut client);
    proxy.eventually("the failed connect is counted and the session gone", |p| {
        let c = p.ctl.counters();
        c.refused(DropReason::UpstreamConnect) == 1 && c.tcp_sessions_active == 0
    });
}

#[test]
fn a_backend_that_never_answers_the_connect_is_given_up() {
    let proxy = tcp_proxy(1, |cfg| {
        cfg.tcp_connect_timeout = Duration::from_millis(300);
    });
    // A listener whose accept queue is full and never accepted: further SYNs go unanswered.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    full.listen(0).unwrap();
    let target = full.local_addr().unwrap().as_socket().unwrap();
    let queued: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_millis(100)).ok())
        .collect();
    let token = proxy.grant_one(1, target);
    let mut client = tcp_client(proxy.addr());
    client
        .write_all(
            format!(
                "{token}
"
            )
            .as_bytes(),
        )
        .unwrap();
    let started = Instant::now();
    expect_closed(&mut client);
    assert!(started.elapsed() >= Duration::from_millis(250));
    proxy.eventually("counted as a failed connect", |p| {
        let c = p.ctl.counters();
        c.refused(DropReason::UpstreamConnect) == 1 && c.tcp_sessions_active == 0
    });
    drop(queued);
}

#[test]
fn a_connection_waiting_for_its_token_holds_a_place_under_max_sessions() {
    let proxy = tcp_proxy(1, |cfg| {
        cfg.max_sessions = 1;
        cfg.tcp_token_timeout = Duration::from_millis(500);
    });
    let backend = TcpBackend::spawn();
    let mut silent = tcp_client(proxy.addr());
    std::thread::sleep(Duration::from_millis(50));
    let token = proxy.grant_one(1, backend.addr);
    let mut second = tcp_client(proxy.addr());
    let _ = second.write_all(token.as_bytes());
    expect_closed(&mut second);
    assert_eq!(proxy.ctl.counters().refused(DropReason::SessionLimit), 1);
    // Its wait over, the silent one lets go, and the token (never spent) still works.
    expect_closed(&mut silent);
    let mut third = tcp_client(proxy.addr());
    third.write_all(format!("{token}\nok").as_bytes()).unwrap();
    let mut server = backend.accept();
    assert_eq!(read_exact_within(&mut server, 2), b"ok");
}

#[test]
fn a_draining_tcp_listener_keeps_its_sessions_and_refuses_new_connections() {
    let proxy = Proxy::start(1, |_| {});
    let spec = dataplane::ListenerSpec {
        owner: "drain test".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        transport: Transport::Tcp,
        kind: dataplane::ListenerKind::TokenPort,
        idle_timeout: Duration::from_secs(300),
    };
    let opened = proxy.ctl.open_listener(spec).unwrap();
    let backend = TcpBackend::spawn();
    let mut targets = vec![None; usize::from(opened.id.0) + 1];
    targets[usize::from(opened.id.0)] = Some(backend.addr);
    let token = proxy.grant(1, &targets, Duration::from_secs(30));
    let mut live = tcp_client(opened.addr);
    live.write_all(format!("{token}\nx").as_bytes()).unwrap();
    let mut server = backend.accept();
    assert_eq!(read_exact_within(&mut server, 1), b"x");
    let mut waiting = tcp_client(opened.addr);
    std::thread::sleep(Duration::from_millis(50));

    proxy
        .ctl
        .close_listener(&opened, dataplane::CloseMode::Drain);
    expect_closed(&mut waiting);
    live.write_all(b"still").unwrap();
    assert_eq!(read_exact_within(&mut server, 5), b"still");
    // The last session ends: the listener goes, and its port with it.
    drop(live);
    drop(server);
    proxy.eventually("the drained port is free", |_| {
        std::net::TcpListener::bind(opened.addr).is_ok()
    });
}

#[test]
fn a_backend_leaving_the_inventory_ends_its_tcp_sessions() {
    let proxy = tcp_proxy(2, |_| {});
    let backend = TcpBackend::spawn();
    let token = proxy.grant_one(5, backend.addr);
    let mut client = tcp_client(proxy.addr());
    client.write_all(format!("{token}\nx").as_bytes()).unwrap();
    let mut server = backend.accept();
    assert_eq!(read_exact_within(&mut server, 1), b"x");
    proxy.ctl.remove_backend(dataplane::BackendId(5));
    expect_closed(&mut client);
    expect_closed(&mut server);
}
