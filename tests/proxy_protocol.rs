//! PROXY protocol v2 to backends through the real binary (SPEC §9): backends that parse the
//! header with their own reader see the client's address and the proxy address it used, on
//! every datagram (`v2`), on a session's first one (`v2-first`, again after a move), and once at
//! TCP connection start; IPv4 and IPv6; for mappings, forwarders and routes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

use common::*;

fn config(bind: &str) -> String {
    format!(
        r#"
bindAddress: "{bind}"
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
dataPorts:
  - {{name: game, port: 0, protocol: udp}}
  - {{name: chat, port: 0, protocol: tcp}}
inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 50}}
resourceQueryMapping:
  every:
    {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address,
     ports: [{{name: game, portName: game}}, {{name: chat, portName: chat}}], proxyProtocol: v2}}
  first:
    {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address,
     ports: [{{name: game, portName: game}}, {{name: chat, portName: chat}}], proxyProtocol: v2-first}}
"#
    )
}

fn server(name: &str, state: &str, ip: &str, game: u16, chat: u16) -> String {
    format!(
        "- apiVersion: agones.dev/v1\n  kind: GameServer\n  metadata: {{name: {name}, namespace: starx}}\n  \
         status: {{state: {state}, address: \"{ip}\", ports: [{{name: game, port: {game}}}, {{name: chat, port: {chat}}}]}}\n"
    )
}

fn query(mapping: &str, state: &str) -> String {
    format!(
        r#"{{"resourceType":"{mapping}","namespace":"starx","statusQuery":{{"jsonPath":"status.state","expectedValue":"{state}"}}}}"#
    )
}

/// Sends `payload` and returns what the backend saw: the header (if any) and the payload.
fn through(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> (Option<HeaderSeen>, Vec<u8>) {
    c.send_to(payload, to).unwrap();
    read_answer(&expect_datagram(c))
}

fn dgram(source: SocketAddr, destination: SocketAddr) -> Option<HeaderSeen> {
    Some(HeaderSeen {
        dgram: true,
        source,
        destination,
    })
}

/// Reads a TCP proxy echo's answer up to and including its `|`, then `n` payload bytes.
fn tcp_answer(s: &mut TcpStream, n: usize) -> (Option<HeaderSeen>, Vec<u8>) {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"|") {
        s.read_exact(&mut byte).unwrap();
        got.push(byte[0]);
    }
    got.extend_from_slice(&read_exact_within(s, n));
    read_answer(&got)
}

#[test]
fn token_sessions_carry_headers_over_udp_and_tcp_on_ipv4_and_ipv6() {
    for bind in ["127.0.0.1", "::1"] {
        let any = SocketAddr::new(bind.parse().unwrap(), 0).to_string();
        let a = ProxyEcho::spawn(&any);
        let b = ProxyEcho::spawn(&any);
        let chat = TcpProxyEcho::spawn(&any);
        let inventory = server("gs-a", "Ready", bind, a.addr.port(), chat.addr.port())
            + &server("gs-b", "Allocated", bind, b.addr.port(), chat.addr.port());
        let proxy = Proxy::start(&config(bind), &inventory);
        let port = |name: &str| proxy.data.iter().find(|(n, _)| n == name).unwrap().1;
        let (game, chat_port) = (port("game"), port("chat"));

        // v2: every datagram.
        let c = client_on(&any);
        let me = c.local_addr().unwrap();
        c.send_to(proxy.token(&query("every", "Ready")).as_bytes(), game)
            .unwrap();
        for payload in [&b"one"[..], b"two", &[7u8; 1200]] {
            assert_eq!(
                through(&c, game, payload),
                (dgram(me, game), payload.to_vec()),
                "{bind}"
            );
        }

        // v2-first: the first datagram only, and the first again after a move.
        let c = client_on(&any);
        let me = c.local_addr().unwrap();
        c.send_to(proxy.token(&query("first", "Ready")).as_bytes(), game)
            .unwrap();
        assert_eq!(through(&c, game, b"1"), (dgram(me, game), b"1".to_vec()));
        assert_eq!(through(&c, game, b"2"), (None, b"2".to_vec()));
        let moved = proxy.token(&query("first", "Allocated"));
        c.send_to(&control_packet(&moved), game).unwrap();
        assert_eq!(through(&c, game, b"3"), (dgram(me, game), b"3".to_vec()));
        assert_eq!(through(&c, game, b"4"), (None, b"4".to_vec()));

        // TCP: one STREAM header at connection start, before the bytes sent with the token.
        for mapping in ["every", "first"] {
            let token = proxy.token(&query(mapping, "Ready"));
            let mut s = tcp_client(chat_port);
            s.write_all(format!("{token}\nhello").as_bytes()).unwrap();
            let (seen, payload) = tcp_answer(&mut s, 5);
            let want = HeaderSeen {
                dgram: false,
                source: s.local_addr().unwrap(),
                destination: chat_port,
            };
            assert_eq!(
                (seen, payload),
                (Some(want), b"hello".to_vec()),
                "{mapping}"
            );
            s.write_all(b"more").unwrap();
            assert_eq!(read_exact_within(&mut s, 4), b"more", "no second header");
        }
    }
}

#[test]
fn a_v2_first_header_waits_for_a_datagram_that_leaves() {
    for bind in ["127.0.0.1", "::1"] {
        let any = SocketAddr::new(bind.parse().unwrap(), 0).to_string();
        let a = ProxyEcho::spawn(&any);
        let chat = TcpProxyEcho::spawn(&any);
        let inventory = server("gs-a", "Ready", bind, a.addr.port(), chat.addr.port());
        let proxy = Proxy::start(&config(bind), &inventory);
        let game = proxy.data.iter().find(|(n, _)| n == "game").unwrap().1;
        let c = client_on(&any);
        let me = c.local_addr().unwrap();
        c.send_to(proxy.token(&query("first", "Ready")).as_bytes(), game)
            .unwrap();
        // The first datagram cannot leave with the header in front (65,507 bytes is the most
        // an IPv4 datagram holds, 65,527 an IPv6 one): the next one carries the header, and
        // the backend never sees the session without it.
        c.send_to(&[7u8; 65507], game).unwrap();
        assert_eq!(
            through(&c, game, b"after"),
            (dgram(me, game), b"after".to_vec()),
            "{bind}"
        );
        assert_eq!(through(&c, game, b"then"), (None, b"then".to_vec()));
        // Dropped as the client's doing, not the backend's.
        let dropped = |reason: &str, source: &str| {
            proxy.metric(&format!(
                r#"udp_director_packets_dropped_total{{reason="{reason}",source="{source}"}}"#
            ))
        };
        assert_eq!(dropped("oversize", "client"), 1.0, "{bind}");
        assert_eq!(dropped("upstream_send", "backend"), 0.0, "{bind}");
    }
}

#[test]
fn forwarders_and_routes_send_headers_too() {
    let udp = ProxyEcho::spawn("127.0.0.1:0");
    let tcp = TcpProxyEcho::spawn("127.0.0.1:0");
    let voice = ProxyEcho::spawn("127.0.0.1:0");
    let (fwd_udp, fwd_tcp) = (free_port(), free_port());
    let inventory = format!(
        "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: dns, namespace: games}}\n  \
         spec: {{udp: {{listenPort: {fwd_udp}, targetHost: \"127.0.0.1\", targetPort: {}}}, \
         tcp: {{listenPort: {fwd_tcp}, targetHost: \"127.0.0.1\", targetPort: {}}}, proxyProtocol: v2}}\n\
         - {{apiVersion: v1, kind: Service, metadata: {{name: voice, namespace: games}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n\
         - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: voice-1, namespace: games, labels: {{kubernetes.io/service-name: voice}}}}, \
         ports: [{{name: voice, port: {}}}], endpoints: [{{addresses: [\"127.0.0.1\"], conditions: {{ready: true}}}}]}}\n\
         - {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: voice, namespace: games}}, \
         spec: {{entryPoint: voice, proxyProtocol: v2-first, rules: [{{backends: [{{service: voice, port: voice}}]}}]}}}}\n",
        udp.addr.port(),
        tcp.addr.port(),
        voice.addr.port()
    );
    let proxy = Proxy::start(
        &base_config("forwarders: {namespace: games}\nentryPoints: [{name: voice, port: 0}]\n"),
        &inventory,
    );
    let fwd = SocketAddr::from(([127, 0, 0, 1], fwd_udp));
    let c = client();
    let me = c.local_addr().unwrap();
    proxy.eventually("the forwarder forwards", |_| {
        c.send_to(b"q", fwd).unwrap();
        datagram_within(&c, std::time::Duration::from_millis(200)).is_some()
    });
    for _ in 0..3 {
        assert_eq!(
            through(&c, fwd, b"query"),
            (dgram(me, fwd), b"query".to_vec())
        );
    }
    let fwd_tcp = SocketAddr::from(([127, 0, 0, 1], fwd_tcp));
    let mut s = tcp_client(fwd_tcp);
    s.write_all(b"hi").unwrap();
    let want = HeaderSeen {
        dgram: false,
        source: s.local_addr().unwrap(),
        destination: fwd_tcp,
    };
    assert_eq!(tcp_answer(&mut s, 2), (Some(want), b"hi".to_vec()));

    let entry = proxy.entry_addr("voice");
    let v = client();
    let me = v.local_addr().unwrap();
    proxy.eventually("the route routes", |_| {
        v.send_to(b"x", entry).unwrap();
        datagram_within(&v, std::time::Duration::from_millis(200))
            .is_some_and(|a| read_answer(&a).0.is_some())
    });
    assert_eq!(through(&v, entry, b"y"), (None, b"y".to_vec()));
    let fresh = client();
    let me_too = fresh.local_addr().unwrap();
    assert_ne!(me, me_too);
    assert_eq!(
        through(&fresh, entry, b"z"),
        (dgram(me_too, entry), b"z".to_vec())
    );
}
