//! Faults are inputs (SPEC §8, §10). Running out of descriptors is survived: a flood of new
//! sources, or a descriptor limit lowered on the running proxy, refuses only the sessions that
//! needed a new socket (counted as `upstream_setup`); every worker lives on, live sessions keep
//! forwarding, the query port, `/healthz` and inventory edits keep working, and new sessions
//! open again once descriptors free up. Forwarders and routes aimed at the proxy itself are
//! refused and loop nowhere; a Route's absurd timeout is refused where it is read.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;

const ANY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;
const SETUP_DROPS: &str =
    r#"udp_director_packets_dropped_total{reason="upstream_setup",source="internal"}"#;
const LOOP_DROPS: &str = r#"udp_director_packets_dropped_total{reason="loop",source="internal"}"#;

/// A UDP `Forwarder` list entry; `extra` goes into its port spec.
fn forwarder(name: &str, listen: u16, target: SocketAddr, extra: &str) -> String {
    forwarder_on("udp", name, listen, target, extra)
}

fn tcp_forwarder(name: &str, listen: u16, target: SocketAddr) -> String {
    forwarder_on("tcp", name, listen, target, "")
}

fn forwarder_on(
    protocol: &str,
    name: &str,
    listen: u16,
    target: SocketAddr,
    extra: &str,
) -> String {
    format!(
        "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
         namespace: games, creationTimestamp: \"2025-01-01T00:00:00Z\"}}\n  spec: {{{protocol}: \
         {{listenPort: {listen}, targetHost: \"{}\", targetPort: {}{extra}}}}}\n",
        target.ip(),
        target.port()
    )
}

/// One exchange on a connection to a tagged TCP echo (its tag byte comes first, once).
fn tcp_answers(s: &mut std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while got.len() < 4 || !got.ends_with(b"ping") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

fn open_fds(proxy: &Proxy) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", proxy.child.id()))
        .unwrap()
        .count()
}

fn set_nofile(proxy: &Proxy, soft: usize) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={}", proxy.child.id()))
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(out.status.success(), "{out:?}");
}

/// One round trip from `c` to `to`.
fn answers(c: &UdpSocket, to: SocketAddr) -> bool {
    c.send_to(b"ping", to).unwrap();
    datagram_within(c, Duration::from_millis(500)).as_deref() == Some(b"ping")
}

/// Everything control does still works: health, a query, an inventory edit.
fn control_still_works(proxy: &Proxy, inventory: &str, echo: &Echo, what: &str) {
    assert_eq!(
        proxy.http("GET", "/healthz").0,
        200,
        "{what}: {}",
        proxy.log()
    );
    assert!(
        proxy.query(ANY).get("token").is_some(),
        "{what}: the query port answers"
    );
    let edited = format!(
        "{inventory}{}",
        gameserver("gs-added", "Ready", echo.addr, ", map: added")
    );
    proxy.write_inventory(&edited);
    proxy.eventually(&format!("{what}: an inventory edit applies"), |p| {
        p.query(
            r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"added"}}"#,
        )
        .get("token")
        .is_some()
    });
    proxy.write_inventory(inventory);
}

#[test]
fn twenty_thousand_sources_kill_no_worker_and_their_sockets_are_given_back() {
    let echo = Echo::plain();
    let target = Echo::plain();
    let port = free_port();
    let inventory = gameserver("gs", "Ready", echo.addr, "")
        + &forwarder("flooded", port, target.addr, ", idleTimeoutSeconds: 6");
    let proxy = Proxy::start(&base_config("forwarders: {namespace: games}\n"), &inventory);
    // The limit this machine has (and CI's): 20,000, soft and hard, so the flood outruns the
    // budget whatever limit the test itself was started with.
    let out = Command::new("prlimit")
        .arg(format!("--pid={}", proxy.child.id()))
        .arg("--nofile=20000:20000")
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(out.status.success(), "{out:?}");
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    proxy.eventually("the forwarder listens", |_| answers(&client(), at));
    let player = client();
    player
        .send_to(proxy.token(ANY).as_bytes(), proxy.data_addr())
        .unwrap();
    assert!(answers(&player, proxy.data_addr()));
    let before = open_fds(&proxy);

    // 20,000 source addresses, one datagram each, as spoofed UDP gives: every one a session to
    // the same backend, so each needs a socket of its own, more than the descriptors allow.
    for i in 0..20_000u32 {
        let ip = [
            127,
            1 + (i / 62_500) as u8,
            (i / 250 % 250) as u8,
            (i % 250 + 1) as u8,
        ];
        let c = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap();
        c.send_to(b"x", at).unwrap();
        // Paced, so that the datagrams reach the proxy rather than overflow its socket.
        if i % 500 == 499 {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    proxy.eventually("the sessions past the budget are refused", |p| {
        p.metric(SETUP_DROPS) > 0.0
            && p.metric("udp_director_sessions_active")
                + p.metric(SETUP_DROPS)
                + p.metric("udp_director_sessions_expired_total")
                >= 19_000.0
    });
    let refused = proxy.metric(SETUP_DROPS);
    assert!(
        (500.0..20_000.0).contains(&refused),
        "{refused} refused: the budget ends near the descriptor limit"
    );
    assert!(answers(&player, proxy.data_addr()), "the player's session");
    control_still_works(&proxy, &inventory, &echo, "at the limit");
    assert!(
        proxy.log().contains("descriptors: limit"),
        "{}",
        proxy.log()
    );

    // The flood's sessions idle out; once their places leave quarantine, new clients are
    // served, and the sockets opened for the peak are closed again.
    proxy.eventually_within(
        Duration::from_secs(30),
        "a new client is served again",
        |_| answers(&client_on("127.0.0.9:0"), at),
    );
    proxy.eventually_within(
        Duration::from_secs(60),
        "the descriptor count returns to the working size",
        |p| open_fds(p) <= before + 8,
    );
    assert!(answers(&player, proxy.data_addr()));
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
}

#[test]
fn a_limit_lowered_on_the_running_proxy_refuses_only_new_sessions() {
    let echo = Echo::plain();
    let voice = Echo::plain();
    let forwarded = Echo::plain();
    let port = free_port();
    let tcp_echo = TcpEcho::tagged(b'T');
    let tcp_port = free_port();
    let inventory = gameserver("gs", "Ready", echo.addr, "")
        + &route_to(voice.addr)
        + &forwarder("fw", port, forwarded.addr, "")
        + &tcp_forwarder("tcp-fw", tcp_port, tcp_echo.addr);
    let proxy = Proxy::start(
        &base_config(&format!(
            "forwarders: {{namespace: games}}\nentryPoints: [{{name: voice, port: 0}}]\n\
             defaultEndpoint: {ANY}\n"
        )),
        &inventory,
    );
    let fw = SocketAddr::from(([127, 0, 0, 1], port));
    let entry = proxy.entry_addr("voice");
    proxy.eventually("the forwarder listens", |_| answers(&client(), fw));
    // Live sessions of every kind: token, default, route, forwarder.
    let player = client();
    player
        .send_to(proxy.token(ANY).as_bytes(), proxy.data_addr())
        .unwrap();
    let live = [
        (player, proxy.data_addr()),
        (client(), proxy.data_addr()),
        (client(), entry),
        (client(), fw),
    ];
    for (c, to) in &live {
        assert!(answers(c, *to), "{to}");
    }
    let tcp_at = SocketAddr::from(([127, 0, 0, 1], tcp_port));
    proxy.eventually("the TCP forwarder listens", |_| {
        std::net::TcpStream::connect(tcp_at).is_ok()
    });
    let mut live_tcp = tcp_client(tcp_at);
    assert!(tcp_answers(&mut live_tcp));

    // The soft limit a few above what the proxy holds: the data plane's budget is spent.
    set_nofile(&proxy, open_fds(&proxy) + 16);
    let refused_before = proxy.metric(SETUP_DROPS);
    for to in [proxy.data_addr(), entry, fw] {
        for _ in 0..20 {
            let _ = answers(&client(), to);
        }
    }
    assert!(
        proxy.metric(SETUP_DROPS) > refused_before,
        "new sessions are refused and counted"
    );
    // A new TCP connection is accepted and closed at once, counted; the live one streams on.
    let tcp_refused =
        r#"udp_director_tcp_connections_refused_total{reason="upstream_setup",source="internal"}"#;
    let mut refused = tcp_client(tcp_at);
    expect_closed(&mut refused);
    proxy.eventually("the refused connection is counted", |p| {
        p.metric(tcp_refused) >= 1.0
    });
    assert!(tcp_answers(&mut live_tcp), "the live TCP connection");
    for (c, to) in &live {
        assert!(answers(c, *to), "a live session at {to} keeps forwarding");
    }
    control_still_works(&proxy, &inventory, &echo, "limit lowered");
    // A forwarder added now cannot get its sockets: its status says why.
    let late = free_port();
    proxy.write_inventory(&format!(
        "{inventory}{}",
        forwarder("late", late, forwarded.addr, "")
    ));
    proxy.eventually("the late forwarder says it is out of descriptors", |p| {
        p.http("GET", "/forwarders")
            .1
            .contains("out of descriptors")
    });

    // Raised again: everything answers, and the late forwarder opens.
    set_nofile(&proxy, 20_000);
    let late_at = SocketAddr::from(([127, 0, 0, 1], late));
    proxy.eventually("the late forwarder opens", |_| answers(&client(), late_at));
    for to in [proxy.data_addr(), entry, fw] {
        for _ in 0..20 {
            assert!(answers(&client(), to), "a new client at {to}");
        }
    }
    for (c, to) in &live {
        assert!(answers(c, *to), "{to}");
    }
    assert!(tcp_answers(&mut tcp_client(tcp_at)), "a new TCP connection");
    assert!(tcp_answers(&mut live_tcp));
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
}

#[test]
fn forwarders_aimed_at_the_proxy_are_refused_and_nothing_loops() {
    let echo = Echo::plain();
    let (a, b, me) = (free_port(), free_port(), free_port());
    let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let inventory = gameserver("gs", "Ready", echo.addr, "")
        + &forwarder("self", me, local(me), "")
        + &forwarder("ping", a, local(b), "")
        + &forwarder("pong", b, local(a), "")
        + &forwarder("fine", free_port(), echo.addr, "");
    let proxy = Proxy::start(&base_config("forwarders: {namespace: games}\n"), &inventory);
    let view = |p: &Proxy| -> serde_json::Value {
        serde_json::from_str(&p.http("GET", "/forwarders").1).unwrap()
    };
    proxy.eventually("the good forwarder is ready", |p| {
        view(p)
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "fine" && f["ready"] == true)
    });
    for name in ["self", "ping", "pong"] {
        let v = view(&proxy);
        let f = v
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap();
        assert_eq!(f["ready"], false, "{name}: {f}");
        assert!(f.to_string().contains("forward to itself"), "{name}: {f}");
    }
    // Nothing listens on the refused ports, so a datagram there goes nowhere; the proxy's
    // descriptors stay where they are.
    let before = open_fds(&proxy);
    let c = client();
    for p in [a, b, me] {
        c.send_to(b"x", local(p)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(open_fds(&proxy) <= before + 2);
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
}

#[test]
fn a_route_whose_endpoint_is_the_proxy_leaves_it_out() {
    // A Route whose Service's endpoint is its own entry point: planned, that endpoint is left
    // out (and said), so no datagram goes round.
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &base_config("entryPoints: [{name: voice, port: 0}]\n"),
        &gameserver("gs", "Ready", echo.addr, ""),
    );
    let entry = proxy.entry_addr("voice");
    proxy.write_inventory(&(gameserver("gs", "Ready", echo.addr, "") + &route_to(entry)));
    proxy.eventually("the route says why it serves nobody", |p| {
        p.http("GET", "/routes")
            .1
            .contains("routing there would loop")
    });
    let (_, routes) = proxy.http("GET", "/routes");
    assert!(routes.contains("\"readyEndpoints\":0"), "{routes}");
    let c = client();
    c.send_to(b"round and round", entry).unwrap();
    proxy.eventually("dropped as no_route", |p| {
        p.metric(r#"udp_director_packets_dropped_total{reason="no_route",source="client"}"#) >= 1.0
    });
    assert_eq!(proxy.metric(LOOP_DROPS), 0.0);
    assert!(proxy.sessions().is_empty());
    assert_eq!(proxy.http("GET", "/healthz").0, 200);
}

#[test]
fn a_route_with_an_absurd_session_timeout_is_refused_and_kills_nothing() {
    let echo = Echo::plain();
    let voice = Echo::plain();
    let proxy = Proxy::start(
        &base_config("entryPoints: [{name: voice, port: 0}]\n"),
        &gameserver("gs", "Ready", echo.addr, ""),
    );
    let entry = proxy.entry_addr("voice");
    // 2^63 seconds: what once overflowed a worker's clock on the route's first client.
    let huge = route_to(voice.addr).replace(
        "spec: {entryPoint: voice,",
        "spec: {entryPoint: voice, sessionTimeoutSeconds: 9223372036854775808,",
    );
    assert!(huge.contains("9223372036854775808"));
    proxy.write_inventory(&(gameserver("gs", "Ready", echo.addr, "") + &huge));
    // The file inventory takes a file only whole: it is refused, naming the field, and the
    // last good inventory stays.
    proxy.eventually("the file is refused, naming the field", |p| {
        p.log()
            .contains("spec.sessionTimeoutSeconds: must be 1 to 86400, not 9223372036854775808")
    });
    let c = client();
    for _ in 0..3 {
        c.send_to(b"hello", entry).unwrap();
    }
    expect_nothing(&c, Duration::from_millis(300));
    assert_eq!(proxy.http("GET", "/healthz").0, 200, "{}", proxy.log());
    // The fixed route serves, on the same workers.
    proxy.write_inventory(&(gameserver("gs", "Ready", echo.addr, "") + &route_to(voice.addr)));
    proxy.eventually("the valid route serves", |_| answers(&client(), entry));
}
