//! Forwarders with the file inventory (SPEC §6): the whole lifecycle by editing the file, port
//! conflicts reported without disturbing anything else (a Gateway listener on a forwarder's port
//! goes by the same rule: the older keeps it), the largest datagrams, the idle timer counted in
//! both directions, DNS targets, and the per-forwarder metrics.

mod common;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = "forwarders: {namespace: games, resolveIntervalSeconds: 1}\n";

/// A `Forwarder` list entry for the inventory file.
fn forwarder(name: &str, created: &str, spec: &str) -> String {
    format!(
        "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
         namespace: games, creationTimestamp: \"{created}\"}}\n  spec: {spec}\n"
    )
}

/// `{listenPort, targetHost, targetPort}` to `target`.
fn to(listen: u16, target: SocketAddr) -> String {
    format!(
        "{{listenPort: {listen}, targetHost: \"{}\", targetPort: {}}}",
        target.ip(),
        target.port()
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// This instance's view of forwarder `name` (`GET /forwarders`).
fn view(p: &Proxy, name: &str) -> serde_json::Value {
    let (code, body) = p.http("GET", "/forwarders");
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.into_iter()
        .find(|f| f["name"] == name)
        .unwrap_or(serde_json::Value::Null)
}

fn ready(p: &Proxy, name: &str) -> bool {
    view(p, name)["ready"] == true
}

/// Sends `payload` from `c` to `port` and returns the reply, if one comes.
fn round_trip(c: &UdpSocket, port: u16, payload: &[u8]) -> Option<Vec<u8>> {
    c.send_to(payload, local(port)).unwrap();
    datagram_within(c, Duration::from_millis(500))
}

/// What must not notice a forwarder's changes: a token session on the data port, and a live
/// session through a neighbouring forwarder (its backend sees the same relay address).
struct Bystanders {
    /// Keeps the game server running.
    _game: Echo,
    data: SocketAddr,
    player: UdpSocket,
    neighbour_port: u16,
    neighbour_backend: UdpSocket,
    neighbour_client: UdpSocket,
    relay: SocketAddr,
}

impl Bystanders {
    /// Their inventory objects: a GameServer and the neighbour forwarder.
    fn objects(game: &Echo, port: u16, backend: &UdpSocket) -> String {
        format!(
            "{}{}",
            gameserver("gs", "Ready", game.addr, ""),
            forwarder(
                "neighbour",
                "2025-01-01T00:00:00Z",
                &format!("{{udp: {}}}", to(port, backend.local_addr().unwrap()))
            )
        )
    }

    fn parts() -> (Echo, u16, UdpSocket) {
        let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
        backend.set_read_timeout(Some(WAIT)).unwrap();
        (Echo::tagged(b'G'), free_port(), backend)
    }

    /// Opens both sessions on a running proxy.
    fn start(
        proxy: &Proxy,
        (game, neighbour_port, neighbour_backend): (Echo, u16, UdpSocket),
    ) -> Self {
        let player = client();
        let token = proxy.token(r#"{"resourceType":"gameserver","namespace":"starx"}"#);
        player.send_to(token.as_bytes(), proxy.data_addr()).unwrap();
        player.send_to(b"p", proxy.data_addr()).unwrap();
        assert_eq!(expect_datagram(&player), b"Gp");
        proxy.eventually("the neighbour is ready", |p| ready(p, "neighbour"));
        let neighbour_client = client();
        neighbour_client
            .send_to(b"n", local(neighbour_port))
            .unwrap();
        let mut buf = [0u8; 16];
        let (_, relay) = neighbour_backend.recv_from(&mut buf).unwrap();
        Self {
            _game: game,
            data: proxy.data_addr(),
            player,
            neighbour_port,
            neighbour_backend,
            neighbour_client,
            relay,
        }
    }

    fn check(&self, after: &str) {
        self.player.send_to(b"q", self.data).unwrap();
        assert_eq!(
            expect_datagram(&self.player),
            b"Gq",
            "token session after {after}"
        );
        self.neighbour_client
            .send_to(b"m", local(self.neighbour_port))
            .unwrap();
        let mut buf = [0u8; 16];
        let (_, relay) = self.neighbour_backend.recv_from(&mut buf).unwrap();
        assert_eq!(
            relay, self.relay,
            "the neighbour's session survived {after}"
        );
        self.neighbour_backend.send_to(b"back", relay).unwrap();
        assert_eq!(expect_datagram(&self.neighbour_client), b"back");
    }
}

#[test]
fn a_forwarder_follows_every_edit_of_the_file() {
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    let (ta, tb) = (TcpEcho::tagged(b'a'), TcpEcho::tagged(b'b'));
    let (p1, p2) = (free_port(), free_port());
    let parts = Bystanders::parts();
    let others = Bystanders::objects(&parts.0, parts.1, &parts.2);
    let game_1 = |spec: String| {
        format!(
            "{others}{}",
            forwarder("game-1", "2026-01-01T00:00:00Z", &spec)
        )
    };
    let both = |udp: &Echo, tcp: &TcpEcho, port: u16| {
        game_1(format!(
            "{{udp: {}, tcp: {}}}",
            to(port, udp.addr),
            to(port, tcp.addr)
        ))
    };
    let proxy = Proxy::start(&base_config(CONFIG), &both(&a, &ta, p1));
    let bystanders = Bystanders::start(&proxy, parts);
    proxy.eventually("the forwarder is ready", |p| ready(p, "game-1"));
    let v = view(&proxy, "game-1");
    assert_eq!(
        v["listening"],
        serde_json::json!([format!("udp/{p1}"), format!("tcp/{p1}")])
    );
    assert_eq!(v["message"], serde_json::Value::Null);

    // UDP and TCP through it.
    let c = client();
    assert_eq!(round_trip(&c, p1, b"1").unwrap(), b"A1");
    let mut old_tcp = tcp_client(local(p1));
    old_tcp.write_all(b"x").unwrap();
    assert_eq!(read_exact_within(&mut old_tcp, 2), b"ax");

    // Target change: the UDP session moves on its next datagram, the TCP connection stays.
    proxy.write_inventory(&both(&b, &tb, p1));
    proxy.eventually("the UDP session moved", |p| {
        p.sessions()
            .iter()
            .any(|s| s["protocol"] == "udp" && s["target"] == b.addr.to_string())
    });
    assert_eq!(round_trip(&c, p1, b"2").unwrap(), b"B2");
    old_tcp.write_all(b"y").unwrap();
    assert_eq!(
        read_exact_within(&mut old_tcp, 1),
        b"y",
        "TCP keeps its target"
    );
    let mut new_tcp = tcp_client(local(p1));
    new_tcp.write_all(b"z").unwrap();
    assert_eq!(read_exact_within(&mut new_tcp, 2), b"bz");
    bystanders.check("a target change");

    // Only the idle timeout changes: every session stays.
    proxy.write_inventory(&game_1(format!(
        "{{udp: {{listenPort: {p1}, targetHost: \"127.0.0.1\", targetPort: {}, idleTimeoutSeconds: 77}}, tcp: {}}}",
        b.addr.port(),
        to(p1, tb.addr)
    )));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(round_trip(&c, p1, b"i").unwrap(), b"Bi");
    new_tcp.write_all(b"j").unwrap();
    assert_eq!(read_exact_within(&mut new_tcp, 1), b"j");

    // listenPort change: the old port closes (its sessions end), the new one opens.
    proxy.write_inventory(&both(&b, &tb, p2));
    proxy.eventually("the listener moved", |p| {
        view(p, "game-1")["listening"]
            == serde_json::json!([format!("udp/{p2}"), format!("tcp/{p2}")])
    });
    expect_closed(&mut old_tcp);
    expect_closed(&mut new_tcp);
    assert_eq!(
        round_trip(&c, p1, b"3"),
        None,
        "nothing listens on the old port"
    );
    assert_eq!(round_trip(&c, p2, b"4").unwrap(), b"B4");
    bystanders.check("a listenPort change");

    // Metrics that move.
    let up = proxy
        .metric(r#"udp_director_forwarder_bytes_total{forwarder="game-1",direction="upstream"}"#);
    assert!(up >= 4.0, "{up}");
    assert_eq!(
        proxy.metric(r#"udp_director_forwarders{protocol="udp"}"#),
        2.0,
        "game-1 and the neighbour"
    );
    assert_eq!(
        proxy.metric(r#"udp_director_forwarder_clients{forwarder="game-1"}"#),
        1.0,
        "the UDP client on the new port (the TCP connections ended with the old one)"
    );

    // TCP dropped from the spec: its listener closes, the UDP session stays.
    let mut tcp = tcp_client(local(p2));
    assert_eq!(read_exact_within(&mut tcp, 1), b"b", "connected through");
    proxy.write_inventory(&game_1(format!("{{udp: {}}}", to(p2, b.addr))));
    proxy.eventually("UDP only", |p| {
        view(p, "game-1")["listening"] == serde_json::json!([format!("udp/{p2}")])
    });
    expect_closed(&mut tcp);
    assert_eq!(round_trip(&c, p2, b"u").unwrap(), b"Bu");
    assert_eq!(
        proxy.metric(r#"udp_director_forwarders{protocol="tcp"}"#),
        0.0
    );

    // A typo refuses the whole file: the running forwarder stays as it is.
    proxy.write_inventory(&game_1(format!(
        "{{udp: {{listenPort: {p2}, targetPort: 1}}}}"
    )));
    proxy.eventually("the bad file is refused", |p| {
        p.log().contains("targetHost")
    });
    assert_eq!(round_trip(&c, p2, b"5").unwrap(), b"B5");

    // Delete: listeners close, sessions end, its series go.
    proxy.write_inventory(&others);
    proxy.eventually("the forwarder is gone", |p| {
        view(p, "game-1").is_null()
            && !p
                .sessions()
                .iter()
                .any(|s| s["client"] == c.local_addr().unwrap().to_string())
    });
    assert_eq!(round_trip(&c, p2, b"6"), None);
    assert_eq!(
        proxy.metric(r#"udp_director_forwarders{protocol="udp"}"#),
        1.0
    );
    bystanders.check("a delete");
}

#[test]
fn port_conflicts_are_reported_and_disturb_nothing() {
    let (a, b) = (Echo::tagged(b'A'), Echo::tagged(b'B'));
    let (contested, squatted) = (free_port(), free_port());
    // Another process holds `squatted`.
    let squatter = UdpSocket::bind(local(squatted)).unwrap();
    // A forwarder of one listener: `{protocol: {listenPort: port, target}}`.
    let one = |name: &str, created: &str, protocol: &str, port: u16, target: SocketAddr| {
        forwarder(
            name,
            created,
            &format!("{{{protocol}: {}}}", to(port, target)),
        )
    };
    let (jan, feb) = ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
    let older = one("older", jan, "udp", contested, a.addr);
    let younger = one("aaa-younger", feb, "udp", contested, b.addr);
    let proxy = Proxy::start(&base_config(CONFIG), "[]\n");
    let query_port = proxy.query.port();
    let data_port = proxy.data_addr().port();
    let on_query_port = one("on-query", jan, "tcp", query_port, a.addr);
    let on_data_port = one("on-data", jan, "udp", data_port, a.addr);
    let on_squatted = one("on-squatted", jan, "udp", squatted, a.addr);
    proxy.write_inventory(&format!(
        "{younger}{older}{on_query_port}{on_data_port}{on_squatted}"
    ));
    proxy.eventually("the older forwarder is ready", |p| ready(p, "older"));
    let message = |name: &str| {
        view(&proxy, name)["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    proxy.eventually("every conflict is reported", |p| {
        !view(p, "on-squatted")["message"].is_null()
    });
    assert_eq!(view(&proxy, "aaa-younger")["ready"], false);
    assert_eq!(
        message("aaa-younger"),
        format!("udp/{contested} is held by forwarder older (older)")
    );
    assert_eq!(
        message("on-query"),
        format!("tcp/{query_port} is held by the query port")
    );
    assert_eq!(
        message("on-data"),
        format!("udp/{data_port} is held by data port default")
    );
    assert!(
        message("on-squatted").contains("another process"),
        "{}",
        message("on-squatted")
    );
    assert!(
        proxy.metric(
            r#"udp_director_forwarder_errors_total{forwarder="on-squatted",type="listen"}"#
        ) >= 1.0
    );

    // Nothing else was disturbed: the older forwarder and the token port serve.
    let c = client();
    assert_eq!(round_trip(&c, contested, b"1").unwrap(), b"A1");
    assert_eq!(proxy.http("GET", "/readyz").0, 200);

    // The other process lets go: the forwarder opens. The older one goes: the younger takes over.
    drop(squatter);
    proxy.eventually("the freed port is taken", |p| ready(p, "on-squatted"));
    proxy.write_inventory(&format!("{younger}{on_squatted}"));
    proxy.eventually("the younger forwarder has the port", |p| {
        ready(p, "aaa-younger")
    });
    let c = client();
    assert_eq!(round_trip(&c, contested, b"2").unwrap(), b"B2");
}

#[test]
fn the_largest_datagrams_pass_and_the_idle_timer_counts_both_ways() {
    let echo = Echo::plain();
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (big, quiet) = (free_port(), free_port());
    let idle = |port: u16, target: SocketAddr| {
        format!(
            "{{udp: {{listenPort: {port}, targetHost: \"127.0.0.1\", targetPort: {}, idleTimeoutSeconds: 2}}}}",
            target.port()
        )
    };
    let proxy = Proxy::start(
        &base_config(CONFIG),
        &format!(
            "{}{}",
            forwarder("big", "", &idle(big, echo.addr)),
            forwarder("quiet", "", &idle(quiet, server.local_addr().unwrap()))
        ),
    );
    proxy.eventually("both ready", |p| ready(p, "big") && ready(p, "quiet"));
    let c = client();
    let payload: Vec<u8> = (0..65507u32).map(|i| i as u8).collect();
    c.send_to(&payload, local(big)).unwrap();
    assert_eq!(
        expect_datagram(&c),
        payload,
        "65507 bytes pass whole, both ways"
    );

    // Only the server talks, for longer than the idle timeout: the session lives on.
    let player = client();
    player.send_to(b"hello", local(quiet)).unwrap();
    let mut buf = [0u8; 64];
    let (_, relay) = server.recv_from(&mut buf).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        server.send_to(b"tick", relay).unwrap();
        assert_eq!(expect_datagram(&player), b"tick");
        std::thread::sleep(Duration::from_millis(400));
    }
    let quiet_sessions = |p: &Proxy| {
        p.sessions()
            .iter()
            .filter(|s| s["client"] == player.local_addr().unwrap().to_string())
            .count()
    };
    assert_eq!(
        quiet_sessions(&proxy),
        1,
        "server→client traffic keeps it alive"
    );
    // Only the player talks: alive too, and on the same relay socket.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        player.send_to(b"tock", local(quiet)).unwrap();
        let (_, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(from, relay, "the same session");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(
        quiet_sessions(&proxy),
        1,
        "client→server traffic keeps it alive"
    );
    // Both silent: it ends after the forwarder's idle timeout.
    proxy.eventually("the idle session ends", |p| quiet_sessions(p) == 0);
    assert!(
        proxy.metric(
            r#"udp_director_forwarder_bytes_total{forwarder="big",direction="downstream"}"#
        ) >= 65507.0
    );
}

#[test]
fn dns_targets_resolve_and_a_name_that_never_does_is_not_ready() {
    let echo = Echo::tagged(b'D');
    let (named, missing) = (free_port(), free_port());
    let proxy = Proxy::start(
        &base_config(CONFIG),
        &format!(
            "{}{}",
            forwarder(
                "by-name",
                "",
                &format!(
                    "{{udp: {{listenPort: {named}, targetHost: localhost, targetPort: {}}}}}",
                    echo.addr.port()
                )
            ),
            forwarder(
                "nowhere",
                "",
                &format!(
                    "{{udp: {{listenPort: {missing}, targetHost: no-such-host.invalid, targetPort: 1}}}}"
                )
            )
        ),
    );
    proxy.eventually("the name resolves", |p| ready(p, "by-name"));
    let c = client();
    assert_eq!(round_trip(&c, named, b"1").unwrap(), b"D1");
    proxy.eventually("the lookup failure is reported", |p| {
        view(p, "nowhere")["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not resolve"))
    });
    assert_eq!(view(&proxy, "nowhere")["ready"], false);
    assert_eq!(view(&proxy, "nowhere")["listening"], serde_json::json!([]));
    assert_eq!(round_trip(&c, missing, b"2"), None);
}

#[test]
fn a_target_that_is_not_unicast_is_refused_with_the_reason() {
    let echo = Echo::tagged(b'U');
    let (group, wildcard, broadcast, fine) = (free_port(), free_port(), free_port(), free_port());
    let at = |ip: &str, listen: u16| {
        format!("{{udp: {{listenPort: {listen}, targetHost: \"{ip}\", targetPort: 5000}}}}")
    };
    let proxy = Proxy::start(
        &base_config(CONFIG),
        &format!(
            "{}{}{}{}",
            forwarder("group", "", &at("224.0.0.1", group)),
            forwarder("wildcard", "", &at("::", wildcard)),
            forwarder("broadcast", "", &at("255.255.255.255", broadcast)),
            forwarder("fine", "", &format!("{{udp: {}}}", to(fine, echo.addr))),
        ),
    );
    proxy.eventually("the unicast one is ready", |p| ready(p, "fine"));
    proxy.eventually("every refusal is reported", |p| {
        ["group", "wildcard", "broadcast"]
            .iter()
            .all(|f| !view(p, f)["message"].is_null())
    });
    for (name, port, why) in [
        ("group", group, "224.0.0.1:5000 is a multicast address"),
        ("wildcard", wildcard, "[::]:5000 is the unspecified address"),
        (
            "broadcast",
            broadcast,
            "255.255.255.255:5000 is the broadcast address",
        ),
    ] {
        let v = view(&proxy, name);
        assert_eq!(v["ready"], false, "{v}");
        assert_eq!(v["listening"], serde_json::json!([]), "{v}");
        assert_eq!(
            v["message"],
            format!(
                "udp/{port}: target {why}, not a unicast address: nothing could be forwarded there"
            ),
        );
        assert_eq!(udp_sockets_on_port(port), 0, "{name}: no listener opened");
    }
    let c = client();
    assert_eq!(round_trip(&c, fine, b"1").unwrap(), b"U1");
    // Aimed at a unicast address, the refused one opens.
    proxy.write_inventory(&format!(
        "{}{}",
        forwarder("group", "", &format!("{{udp: {}}}", to(group, echo.addr))),
        forwarder("fine", "", &format!("{{udp: {}}}", to(fine, echo.addr))),
    ));
    proxy.eventually("the retargeted forwarder is ready", |p| ready(p, "group"));
    assert_eq!(round_trip(&c, group, b"2").unwrap(), b"U2");
    assert_eq!(
        proxy.log().matches("forwarder group: not ready").count(),
        1,
        "the refusal is logged once, not on every pass"
    );
}

#[test]
fn a_forwarder_and_a_gateway_listener_on_one_port_go_to_the_older() {
    let (relayed, routed) = (Echo::tagged(b'F'), Echo::tagged(b'G'));
    let port = free_port();
    let gateway = |created: &str| {
        format!(
            "- {{apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {{name: ours}}, \
             spec: {{controllerName: udp-director.dev/gateway-controller}}}}\n\
             - {{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: edge, namespace: games, \
             creationTimestamp: \"{created}\"}}, spec: {{gatewayClassName: ours, listeners: [{{name: voice, port: {port}, protocol: UDP}}]}}}}\n\
             - {{apiVersion: gateway.networking.k8s.io/v1, kind: UDPRoute, metadata: {{name: voice, namespace: games}}, \
             spec: {{parentRefs: [{{name: edge, sectionName: voice}}], rules: [{{backendRefs: [{{name: voice, port: 5000}}]}}]}}}}\n\
             - {{apiVersion: v1, kind: Service, metadata: {{name: voice, namespace: games}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n\
             - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: voice-1, namespace: games, \
             labels: {{kubernetes.io/service-name: voice}}}}, ports: [{{name: voice, port: {}}}], \
             endpoints: [{{addresses: [\"{}\"]}}]}}\n",
            routed.addr.port(),
            routed.addr.ip()
        )
    };
    let relay = forwarder(
        "relay",
        "2026-02-01T00:00:00Z",
        &format!("{{udp: {}}}", to(port, relayed.addr)),
    );
    let config = base_config(&format!(
        "{CONFIG}gatewayApi: {{controllerName: udp-director.dev/gateway-controller}}\n"
    ));
    // The Gateway is older: its listener has the port, and the forwarder names it.
    let proxy = Proxy::start(
        &config,
        &format!("{}{relay}", gateway("2026-01-01T00:00:00Z")),
    );
    let c = client();
    proxy.eventually("the Gateway's listener serves", |_| {
        round_trip(&c, port, b"1").as_deref() == Some(b"G1".as_slice())
    });
    let held_by_gateway =
        format!("udp/{port} is held by Gateway games/edge listener voice (older)");
    proxy.eventually("the forwarder says who holds its port", |p| {
        view(p, "relay")["message"] == held_by_gateway.as_str()
    });
    assert_eq!(view(&proxy, "relay")["ready"], false);

    // The Gateway goes: the forwarder opens by itself.
    proxy.write_inventory(&relay);
    proxy.eventually("the forwarder serves", |p| {
        ready(p, "relay") && round_trip(&c, port, b"2").as_deref() == Some(b"F2".as_slice())
    });

    // A younger Gateway asks for the port: the forwarder keeps it, the listener is not opened
    // and says why.
    proxy.write_inventory(&format!("{}{relay}", gateway("2026-03-01T00:00:00Z")));
    let held_by_forwarder = format!(
        "gateway listener games/edge/voice: not open: udp/{port} is held by Forwarder \
         games/relay (older)"
    );
    proxy.eventually("the listener says who holds its port", |p| {
        p.log().contains(&held_by_forwarder)
    });
    assert!(ready(&proxy, "relay"));
    assert_eq!(
        round_trip(&c, port, b"3").as_deref(),
        Some(b"F3".as_slice())
    );
}
