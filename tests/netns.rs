//! Across a real network path (SPEC §9): clients in a network namespace joined to this host by
//! a veth pair, reaching a proxy bound to the wildcard address. Replies leave from the address
//! the client sent to on a two-address host; PROXY headers carry the client's real,
//! non-loopback address; a flood from many source addresses is limited per address while a
//! session keeps its traffic. Root only: skipped loudly elsewhere, required under `CI=true`.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};

use common::netns::NetNs;
use common::*;

const QUERY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;

fn namespace() -> Option<NetNs> {
    match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            skip_test(&format!("cannot make a network namespace: {e}"));
            None
        }
    }
}

/// The base config on the wildcard address.
fn wildcard(extra: &str) -> String {
    base_config(extra).replace("bindAddress: 127.0.0.1", "bindAddress: 0.0.0.0")
}

/// In the namespace: sends `token` then `payload` to `to` from a fresh socket and returns the
/// reply, the address it came from, and the socket (kept open by the caller, so a later
/// client cannot get its port and be taken for the same client).
fn from_ns(
    ns: &NetNs,
    token: &str,
    to: SocketAddr,
    payload: &'static [u8],
) -> (Vec<u8>, SocketAddr, UdpSocket) {
    let token = token.to_string();
    ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.send_to(token.as_bytes(), to).unwrap();
        c.send_to(payload, to).unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, from) = c.recv_from(&mut buf).expect("a reply");
        buf.truncate(n);
        (buf, from, c)
    })
}

#[test]
fn replies_leave_from_the_address_the_client_sent_to() {
    let Some(ns) = namespace() else { return };
    let second = ns.add_host_address().unwrap();
    let echo = Echo::tagged(b'E');
    // IPv4 wildcard, and the dual-stack one (IPv4 clients arrive as mapped addresses).
    for bind in ["0.0.0.0", "\"::\""] {
        let config =
            base_config("").replace("bindAddress: 127.0.0.1", &format!("bindAddress: {bind}"));
        let proxy = Proxy::start(&config, &gameserver("gs", "Ready", echo.addr, ""));
        let port = proxy.data_addr().port();
        let mut clients = Vec::new();
        for to in [second, ns.host_ip] {
            let to = SocketAddr::new(to, port);
            let (reply, from, c) = from_ns(&ns, &proxy.token(QUERY), to, b"ping");
            clients.push(c);
            assert_eq!(reply, b"Eping", "{bind}");
            assert_eq!(
                from, to,
                "{bind}: the reply left from the address the client sent to"
            );
        }
        // Both sessions are known by the client's real address.
        let sessions = proxy.sessions();
        assert_eq!(sessions.len(), 2, "{sessions:?}");
        assert!(
            sessions.iter().all(|s| s["client"]
                .as_str()
                .unwrap()
                .starts_with(&ns.ns_ip.to_string())),
            "{sessions:?}"
        );
    }
}

#[test]
fn ipv6_replies_leave_from_the_address_the_client_sent_to() {
    let Some(ns) = namespace() else { return };
    let (host, client_ip, second) = match ns.add_ipv6() {
        Ok(addrs) => addrs,
        Err(e) => {
            skip_test(&format!("no IPv6 on the veth pair: {e}"));
            return;
        }
    };
    let echo = Echo::tagged(b'E');
    let config = base_config("").replace("bindAddress: 127.0.0.1", "bindAddress: \"::\"");
    let proxy = Proxy::start(&config, &gameserver("gs", "Ready", echo.addr, ""));
    let port = proxy.data_addr().port();
    // Each client stays open to the end, so the next cannot get its port and be taken for
    // the same client (whose session would forward the new token as data).
    let mut clients = Vec::new();
    for to in [second, host] {
        let to = SocketAddr::new(to, port);
        let token = proxy.token(QUERY);
        let (reply, from, c) = ns.run(move || {
            let c = UdpSocket::bind("[::]:0").unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            c.send_to(token.as_bytes(), to).unwrap();
            c.send_to(b"ping", to).unwrap();
            let mut buf = vec![0u8; 2048];
            let (n, from) = c.recv_from(&mut buf).expect("a reply");
            buf.truncate(n);
            (buf, from, c)
        });
        clients.push(c);
        assert_eq!(reply, b"Eping");
        assert_eq!(
            from, to,
            "the reply left from the address the client sent to"
        );
    }
    let sessions = proxy.sessions();
    assert!(
        sessions.iter().all(|s| s["client"]
            .as_str()
            .unwrap()
            .contains(&client_ip.to_string())),
        "{sessions:?}"
    );
}

#[test]
fn proxy_headers_carry_the_real_client_address() {
    let Some(ns) = namespace() else { return };
    let second = ns.add_host_address().unwrap();
    let udp = ProxyEcho::spawn("127.0.0.1:0");
    let tcp = TcpProxyEcho::spawn("127.0.0.1:0");
    let config = r#"
bindAddress: 0.0.0.0
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
dataPorts:
  - {name: game, port: 0, protocol: udp}
  - {name: chat, port: 0, protocol: tcp}
inventory: {kind: file, path: inventory.yaml, pollIntervalMillis: 50}
resourceQueryMapping:
  gameserver:
    {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address,
     ports: [{name: game, portName: game}, {name: chat, portName: chat}], proxyProtocol: v2}
"#;
    let inventory = format!(
        "- apiVersion: agones.dev/v1\n  kind: GameServer\n  metadata: {{name: gs, namespace: starx}}\n  \
         status: {{state: Ready, address: \"127.0.0.1\", ports: [{{name: game, port: {}}}, {{name: chat, port: {}}}]}}\n",
        udp.addr.port(),
        tcp.addr.port()
    );
    let proxy = Proxy::start(config, &inventory);
    let port = |name: &str| proxy.data.iter().find(|(n, _)| n == name).unwrap().1.port();

    // UDP to the secondary address: the header names the namespace's client and that address.
    let to = SocketAddr::new(second, port("game"));
    let token = proxy.token(QUERY);
    let (answer, client) = ns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.send_to(token.as_bytes(), to).unwrap();
        c.send_to(b"hello", to).unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = c.recv_from(&mut buf).expect("a reply");
        buf.truncate(n);
        // The client's own address as the namespace routes it.
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.connect(to).unwrap();
        let port = c.local_addr().unwrap().port();
        (buf, SocketAddr::new(probe.local_addr().unwrap().ip(), port))
    });
    let (seen, payload) = read_answer(&answer);
    assert_eq!(client.ip(), ns.ns_ip);
    assert_eq!(
        seen,
        Some(HeaderSeen {
            dgram: true,
            source: client,
            destination: to
        })
    );
    assert_eq!(payload, b"hello");

    // TCP to the host's primary address.
    let to = SocketAddr::new(ns.host_ip, port("chat"));
    let token = proxy.token(QUERY);
    let (answer, client) = ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(format!("{token}hi").as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"|hi") {
            std::io::Read::read_exact(&mut s, &mut byte).unwrap();
            got.push(byte[0]);
        }
        (got, s.local_addr().unwrap())
    });
    let (seen, payload) = read_answer(&answer);
    assert_eq!(
        seen,
        Some(HeaderSeen {
            dgram: false,
            source: client,
            destination: to
        })
    );
    assert_eq!(payload, b"hi");
}

#[test]
fn a_flood_from_many_addresses_is_limited_per_address_and_a_session_keeps_its_traffic() {
    let Some(ns) = namespace() else { return };
    const SOURCES: u8 = 100;
    const EACH: usize = 300;
    let sources = ns.add_ns_addresses(SOURCES).unwrap();
    let echo = Echo::plain();
    let proxy = Proxy::start(
        &wildcard("rateLimit: {perIpPacketsPerSecond: 20, perIpBurst: 20}\n"),
        &gameserver("gs", "Ready", echo.addr, ""),
    );
    let data = SocketAddr::new(ns.host_ip, proxy.data_addr().port());
    // A player on loopback with a live session.
    let player = client();
    let local = SocketAddr::from(([127, 0, 0, 1], data.port()));
    player
        .send_to(proxy.token(QUERY).as_bytes(), local)
        .unwrap();
    player.send_to(b"warm-up", local).unwrap();
    assert_eq!(expect_datagram(&player), b"warm-up");

    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            ns.run(|| {
                let sockets: Vec<UdpSocket> = sources
                    .iter()
                    .map(|ip: &IpAddr| UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap())
                    .collect();
                let mut sent = 0u64;
                for _ in 0..EACH {
                    for socket in &sockets {
                        if socket.send_to(b"garbage", data).is_ok() {
                            sent += 1;
                        }
                    }
                }
                sent
            })
        });
        // The player's round trips during the flood: every one answered.
        for i in 0..200u32 {
            let payload = i.to_be_bytes();
            player.send_to(&payload, local).unwrap();
            assert_eq!(expect_datagram(&player), payload, "round trip {i}");
        }
        flood.join().unwrap()
    });
    assert_eq!(flood, u64::from(SOURCES) * EACH as u64);
    // Each address had its burst (plus what refilled while it sent); the rest was limited.
    let limited = |p: &Proxy| {
        p.metric(r#"udp_director_packets_dropped_total{reason="rate_limited",source="client"}"#)
    };
    let no_session = |p: &Proxy| {
        p.metric(r#"udp_director_packets_dropped_total{reason="no_session",source="client"}"#)
    };
    proxy.eventually("the flood is counted", |p| {
        limited(p) + no_session(p) >= flood as f64 * 0.95
    });
    let (limited, passed) = (limited(&proxy), no_session(&proxy));
    assert!(
        limited >= flood as f64 * 0.6,
        "limited {limited} of {flood} (passed {passed})"
    );
    // Per address, not shared: every source got through at least its burst.
    assert!(passed >= f64::from(SOURCES) * 20.0 * 0.9, "passed {passed}");
    assert_eq!(proxy.sessions().len(), 1, "no session for garbage");
}
