//! Upgrades without dropping players (SPEC §12), end to end with the binary: proxy A serves
//! token and forwarder sessions with traffic flowing; proxy B starts on the same config and
//! hand-off socket, takes over, and A exits. Every UDP session keeps working without a new
//! token, the backend sees the same source port before and after, a token A issued is
//! redeemable once on B, a live migration works on B, a TCP connection open on A finishes its
//! transfer, new connections reach B; and the refusals leave A serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dataplane::handoff::stream::Channel;
use dataplane::handoff::wire::{Answer, Decision, Hello, State, VERSION, decode_batch};

const QUERY_A: &str =
    r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"a"}}"#;
const QUERY_B: &str =
    r#"{"resourceType":"gameserver","namespace":"starx","labelSelector":{"map":"b"}}"#;

/// A UDP backend whose replies say which source port the datagram came from and which
/// backend answered: `"<tag> <port> <payload>"`.
struct PortEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl PortEcho {
    fn spawn(tag: &'static str) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let reply = format!(
                    "{tag} {} {}",
                    from.port(),
                    String::from_utf8_lossy(&buf[..n])
                );
                let _ = socket.send_to(reply.as_bytes(), from);
            }
        });
        Self { addr, stop }
    }
}

impl Drop for PortEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `payload` and returns (backend tag, source port the backend saw).
fn exchange(client: &UdpSocket, to: SocketAddr, payload: &str) -> (String, u16) {
    for _ in 0..3 {
        client.send_to(payload.as_bytes(), to).unwrap();
        if let Some(reply) = datagram_within(client, Duration::from_secs(2)) {
            let text = String::from_utf8(reply).unwrap();
            let mut parts = text.splitn(3, ' ');
            let tag = parts.next().unwrap().to_string();
            let port = parts.next().unwrap().parse().unwrap();
            assert_eq!(parts.next(), Some(payload), "{text}");
            return (tag, port);
        }
    }
    panic!("no reply to {payload:?} through {to}");
}

struct Ports {
    query: u16,
    admin: u16,
    data: u16,
    chat: u16,
    voice: u16,
    forward: u16,
    tcp_forward: u16,
}

fn config(p: &Ports, socket: &std::path::Path, data: u16) -> String {
    format!(
        r#"
bindAddress: 127.0.0.1
queryPort: {query}
adminPort: {admin}
dataPorts:
  - {{name: game, port: {data}, protocol: udp}}
  - {{name: chat, port: {chat}, protocol: tcp}}
entryPoints: [{{name: voice, port: {voice}}}]
workers: 2
drainSeconds: 5
inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 50}}
resourceQueryMapping:
  gameserver:
    {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address,
     ports: [{{name: game, portName: game}}, {{name: chat, portName: chat}}]}}
defaultEndpoint: {{resourceType: gameserver, namespace: starx, labelSelector: {{map: a}}}}
forwarders: {{namespace: games, resolveIntervalSeconds: 1}}
handoff: {{socketPath: {socket}}}
"#,
        query = p.query,
        admin = p.admin,
        chat = p.chat,
        voice = p.voice,
        socket = socket.display(),
    )
}

/// The backends: UDP echoes tagged `a`, `b` (game servers) and `r` (the route's endpoint),
/// and one slow TCP echo behind both game servers and the TCP forwarder.
struct Backends {
    a: PortEcho,
    b: PortEcho,
    r: PortEcho,
    tcp: SocketAddr,
}

impl Backends {
    fn spawn() -> Self {
        Self {
            a: PortEcho::spawn("a"),
            b: PortEcho::spawn("b"),
            r: PortEcho::spawn("r"),
            tcp: slow_tcp_echo(),
        }
    }
}

fn inventory(p: &Ports, be: &Backends) -> String {
    let forwarder = |name: &str, listen: u16, target: SocketAddr, protocol: &str| {
        format!(
            "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
             namespace: games, creationTimestamp: \"2026-01-01T00:00:00Z\"}}\n  spec: {{{protocol}: \
             {{listenPort: {listen}, targetHost: \"{}\", targetPort: {}}}}}\n",
            target.ip(),
            target.port()
        )
    };
    let server = |name: &str, map: &str, udp: SocketAddr| {
        format!(
            "- apiVersion: agones.dev/v1\n  kind: GameServer\n  metadata: {{name: {name}, \
             namespace: starx, labels: {{map: {map}}}}}\n  status: {{state: Ready, address: \
             \"127.0.0.1\", ports: [{{name: game, port: {}}}, {{name: chat, port: {}}}]}}\n",
            udp.port(),
            be.tcp.port()
        )
    };
    format!(
        "{}{}{}{}{}",
        server("gs-a", "a", be.a.addr),
        server("gs-b", "b", be.b.addr),
        forwarder("fwd", p.forward, be.a.addr, "udp"),
        forwarder("fwd-tcp", p.tcp_forward, be.tcp, "tcp"),
        route_to(be.r.addr),
    )
}

/// Starts proxy B on A's config file, as a rollout's new pod would.
fn successor(a: &Proxy) -> Proxy {
    Proxy::spawn(&[], scratch_dir(), &a.dir.join("config.yaml"), &[])
}

fn exited_within(p: &mut Proxy, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = p.child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn ports() -> Ports {
    Ports {
        query: free_port(),
        admin: free_port(),
        data: free_port(),
        chat: free_port(),
        voice: free_port(),
        forward: free_port(),
        tcp_forward: free_port(),
    }
}

/// Traffic on one session while a hand-off happens: a datagram every 5 ms (200/s), each
/// numbered, and every reply recorded with the source port the backend saw.
struct Pump {
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<Vec<(String, u16, u64)>>,
}

impl Pump {
    fn start(client: &UdpSocket, to: SocketAddr, stop: &Arc<AtomicBool>) -> Self {
        let (tx, rx) = (client.try_clone().unwrap(), client.try_clone().unwrap());
        let (stop_tx, stop_rx) = (Arc::clone(stop), Arc::clone(stop));
        let sender = std::thread::spawn(move || {
            let mut n = 0;
            while !stop_tx.load(Ordering::Relaxed) {
                let _ = tx.send_to(format!("pump {n}").as_bytes(), to);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        let receiver = std::thread::spawn(move || {
            let mut replies = Vec::new();
            let mut quiet_since: Option<Instant> = None;
            loop {
                match datagram_within(&rx, Duration::from_millis(50)) {
                    Some(reply) => {
                        quiet_since = None;
                        let text = String::from_utf8(reply).unwrap();
                        let parts: Vec<&str> = text.splitn(4, ' ').collect();
                        if let [tag, port, "pump", n] = parts[..] {
                            replies.push((
                                tag.to_string(),
                                port.parse().unwrap(),
                                n.parse().unwrap(),
                            ));
                        }
                    }
                    None if stop_rx.load(Ordering::Relaxed) => {
                        // Replies still on their way get half a second.
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(500) {
                            return replies;
                        }
                    }
                    None => {}
                }
            }
        });
        Self { sender, receiver }
    }

    /// Datagrams sent, and the replies (backend tag, source port there, number).
    fn finish(self) -> (u64, Vec<(String, u16, u64)>) {
        (self.sender.join().unwrap(), self.receiver.join().unwrap())
    }
}

/// Reads and drops what is waiting on `client`; how many replies.
fn drain(client: &UdpSocket) -> usize {
    let mut n = 0;
    while datagram_within(client, Duration::from_millis(200)).is_some() {
        n += 1;
    }
    n
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TCP backend that echoes what it reads, slowly enough that a transfer outlives the
/// hand-off.
fn slow_tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_successor_takes_over_every_udp_session_and_the_old_process_finishes_tcp() {
    let be = Backends::spawn();
    let p = ports();
    let scratch = scratch_dir();
    let socket = scratch.join("handoff.sock");
    // A logs what it handed over (an info line) for the count compared with B's below.
    let logging: [(&str, &std::ffi::OsStr); 1] =
        [("RUST_LOG", "warn,dataplane::handoff::old=info".as_ref())];
    let mut old = Proxy::launch(&config(&p, &socket, p.data), &inventory(&p, &be), &logging);
    old.eventually("forwarders open", |px| {
        px.metric(r#"udp_director_forwarders{protocol="udp"}"#) == 1.0
            && px.metric(r#"udp_director_forwarders{protocol="tcp"}"#) == 1.0
    });
    let (data, chat, voice) = (local(p.data), local(p.chat), local(p.voice));
    let forward = local(p.forward);

    // UDP sessions of every kind: a token, a default, a forwarder and a route session.
    let token_client = client();
    let token = old.token(QUERY_A);
    assert_eq!(exchange(&token_client, data, &token).0, "a");
    let (_, token_port) = exchange(&token_client, data, "hello");
    let default_client = client();
    let (tag, default_port) = exchange(&default_client, data, "no token");
    assert_eq!(tag, "a");
    let fwd_client = client();
    let (_, fwd_port) = exchange(&fwd_client, forward, "hello");
    let route_client = client();
    old.eventually("the route serves", |_| {
        route_client.send_to(b"probe", voice).unwrap();
        datagram_within(&route_client, Duration::from_millis(200)).is_some()
    });
    drain(&route_client);
    let (tag, route_port) = exchange(&route_client, voice, "hello");
    assert_eq!(tag, "r");
    // Tokens A issues and nobody has redeemed yet.
    let spare = old.token(QUERY_B);
    let move_to_b = old.token(QUERY_B);
    // TCP: a token session on the TCP data port and a forwarder connection, mid-transfer.
    let mut tcp_token = TcpStream::connect(chat).unwrap();
    tcp_token
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let chat_token = old.token(QUERY_A);
    tcp_token
        .write_all(format!("{chat_token}\nbefore").as_bytes())
        .unwrap();
    let mut got = [0u8; 6];
    tcp_token.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");
    let mut tcp = TcpStream::connect(local(p.tcp_forward)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"before").unwrap();
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");

    // Traffic flows on every UDP session (200 datagrams/s each) while B takes over.
    let stop = Arc::new(AtomicBool::new(false));
    let pumps = [
        (Pump::start(&token_client, data, &stop), ("a", token_port)),
        (
            Pump::start(&default_client, data, &stop),
            ("a", default_port),
        ),
        (Pump::start(&fwd_client, forward, &stop), ("a", fwd_port)),
        (Pump::start(&route_client, voice, &stop), ("r", route_port)),
    ];
    let new = successor(&old);
    new.eventually("B took over", |px| {
        px.metric(r#"udp_director_handoff_total{result="took_over"}"#) == 1.0
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    // Every datagram answered once, by the same backend from the same source port: nothing
    // was lost, read twice or sent from another socket across the hand-off.
    for (pump, (tag, port)) in pumps {
        let (sent, replies) = pump.finish();
        assert!(sent > 50, "{sent}");
        let mut numbers: Vec<u64> = replies.iter().map(|r| r.2).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), replies.len(), "a datagram answered twice");
        assert!(
            replies.len() as u64 >= sent,
            "{} of {sent} datagrams answered through {tag}",
            replies.len()
        );
        for (t, p, n) in &replies {
            assert_eq!((t.as_str(), *p), (tag, port), "datagram {n}");
        }
    }

    // The TCP connections opened on A still carry their transfers; then A exits.
    for conn in [&mut tcp_token, &mut tcp] {
        conn.write_all(b"during").unwrap();
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"during");
    }
    drop((tcp_token, tcp));
    let status = exited_within(&mut old, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("A did not exit after the hand-off:\n{}", old.log()));
    assert!(status.success(), "A: {status}\n{}", old.log());

    // Every UDP session goes on, from the same source port, without a new token.
    assert_eq!(
        exchange(&token_client, data, "after"),
        ("a".into(), token_port)
    );
    assert_eq!(
        exchange(&default_client, data, "after"),
        ("a".into(), default_port)
    );
    assert_eq!(
        exchange(&fwd_client, forward, "after"),
        ("a".into(), fwd_port)
    );
    assert_eq!(
        exchange(&route_client, voice, "after"),
        ("r".into(), route_port)
    );
    // A token A issued is redeemable on B, once.
    let spare_client = client();
    assert_eq!(exchange(&spare_client, data, &spare).0, "b");
    let again = client();
    again.send_to(spare.as_bytes(), data).unwrap();
    // (Without a session it would be a default client: the token is not redeemed twice.)
    let reply = String::from_utf8(expect_datagram(&again)).unwrap();
    assert!(reply.starts_with("a "), "a spent token opened {reply}");
    // A live migration on B moves a taken-over session.
    token_client
        .send_to(&control_packet(&move_to_b), data)
        .unwrap();
    new.eventually("the session moved to b", |_| {
        exchange(&token_client, data, "moved").0 == "b"
    });
    // New TCP connections reach B, on the data port and the forwarder.
    let mut tcp = TcpStream::connect(local(p.tcp_forward)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"new-tc").unwrap();
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"new-tc");
    let mut tcp_token = TcpStream::connect(chat).unwrap();
    tcp_token
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tcp_token
        .write_all(format!("{}\nnew-tc", new.token(QUERY_A)).as_bytes())
        .unwrap();
    tcp_token.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"new-tc");
    // B's query port (A's socket) answers, and B says what it took.
    assert!(new.metric("udp_director_handoff_sessions_total") >= 4.0);
    assert!(new.metric("udp_director_handoff_descriptors_total") >= 10.0);
    // Both sides count the same sockets handed over (control's two included).
    let log = old.log();
    let line = log
        .lines()
        .find(|l| l.contains("hand-off: handed over "))
        .unwrap_or_else(|| panic!("A's log: {log}"));
    let sockets: f64 = line
        .split(" UDP sessions and ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(
        new.metric("udp_director_handoff_descriptors_total"),
        sockets,
        "{line}"
    );
    let sessions = new.sessions();
    assert!(sessions.len() >= 5, "{sessions:?}");
}

/// A running proxy A with one token session; its client, the session's source port at the
/// backend, and the data port.
fn serving(p: &Ports, be: &Backends, socket: &std::path::Path) -> (Proxy, UdpSocket, u16) {
    let old = Proxy::start(&config(p, socket, p.data), &inventory(p, be));
    let c = client();
    let token = old.token(QUERY_A);
    exchange(&c, local(p.data), &token);
    let (_, port) = exchange(&c, local(p.data), "hello");
    (old, c, port)
}

#[test]
fn a_successor_with_another_data_port_is_refused_and_the_old_process_serves_on() {
    let be = Backends::spawn();
    let p = ports();
    let socket = scratch_dir().join("handoff.sock");
    let (old, c, port) = serving(&p, &be, &socket);

    let dir = scratch_dir();
    std::fs::copy(old.dir.join("inventory.yaml"), dir.join("inventory.yaml")).unwrap();
    std::fs::write(dir.join("config.yaml"), config(&p, &socket, free_port())).unwrap();
    let (code, _, err) = run_binary(&["--config", dir.join("config.yaml").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not taking over") && err.contains("dataPorts"),
        "{err}"
    );
    // A never stopped reading.
    assert_eq!(exchange(&c, local(p.data), "still"), ("a".into(), port));
    assert_eq!(
        old.metric(r#"udp_director_handoff_total{result="refused"}"#),
        1.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Connects to A as a successor saying `hello` would and tells it to proceed; returns the
/// format A writes.
fn knock(old: &Proxy, socket: &std::path::Path, hello: &Hello) -> (Channel, u32) {
    let text = std::fs::read_to_string(old.dir.join("config.yaml")).unwrap();
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut channel = Channel::new(stream, Duration::from_secs(5)).unwrap();
    channel.send(hello, &[]).unwrap();
    let (answer, _): (Answer, _) = channel.recv().unwrap();
    let Answer::Accept {
        config,
        workers,
        version,
        ..
    } = answer
    else {
        panic!("{answer:?}")
    };
    assert_eq!((config, workers), (text, 2));
    channel.send(&Decision::Proceed, &[]).unwrap();
    (channel, version)
}

/// A successor that receives the whole state and dies before it takes over: A reads its
/// sockets again and loses no session. The successor is of an older release, reading only
/// format 1 (a rollback): A writes that format for it.
#[test]
fn a_successor_that_dies_after_receiving_leaves_the_old_process_serving() {
    let be = Backends::spawn();
    let p = ports();
    let socket = scratch_dir().join("handoff.sock");
    let (old, c, port) = serving(&p, &be, &socket);
    let older = Hello {
        version: 1,
        reads: vec![1],
        ..dataplane::handoff::new::hello()
    };
    let (mut channel, version) = knock(&old, &socket, &older);
    assert_eq!(version, 1, "the newest format both read");
    let (state, fds): (State, _) = channel.recv().unwrap();
    assert_eq!(state.session_batches, 1);
    let (bytes, _) = channel.recv_bytes().unwrap();
    assert_eq!(bytes.first(), Some(&b'{'), "format 1's batches are JSON");
    let batch = decode_batch(1, &bytes).unwrap();
    assert_eq!(batch.sessions.len(), 1);
    assert!(!fds.is_empty());
    // Dies here: no `Taken`.
    drop((fds, channel));
    old.eventually("A counts the failed hand-off", |px| {
        px.metric(r#"udp_director_handoff_total{result="failed"}"#) == 1.0
    });
    assert_eq!(exchange(&c, local(p.data), "still"), ("a".into(), port));
    // And a later successor still takes over.
    let new = successor(&old);
    new.eventually("B took over", |px| {
        px.metric(r#"udp_director_handoff_total{result="took_over"}"#) == 1.0
    });
    assert_eq!(exchange(&c, local(p.data), "after"), ("a".into(), port));
}

/// A successor killed half-way through the state (it read a few bytes of it and its socket
/// closed): A serves on.
#[test]
fn a_successor_killed_half_way_through_the_state_leaves_the_old_process_serving() {
    let be = Backends::spawn();
    let p = ports();
    let socket = scratch_dir().join("handoff.sock");
    let (old, c, port) = serving(&p, &be, &socket);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    {
        let mut channel =
            Channel::new(stream.try_clone().unwrap(), Duration::from_secs(5)).unwrap();
        channel
            .send(&dataplane::handoff::new::hello(), &[])
            .unwrap();
        let (answer, _): (Answer, _) = channel.recv().unwrap();
        assert!(matches!(answer, Answer::Accept { .. }), "{answer:?}");
        channel.send(&Decision::Proceed, &[]).unwrap();
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut some = [0u8; 16];
    stream.read_exact(&mut some).unwrap();
    drop(stream);
    old.eventually("A counts the failed hand-off", |px| {
        px.metric(r#"udp_director_handoff_total{result="failed"}"#) == 1.0
    });
    assert_eq!(exchange(&c, local(p.data), "still"), ("a".into(), port));
}

/// An old process killed in the middle of sending (its socket closes half-way through a
/// frame): the new one exits with the reason and installs nothing; a malformed stream too.
#[test]
fn a_predecessor_that_dies_half_way_or_sends_garbage_makes_the_successor_exit_with_the_reason() {
    let p = ports();
    let dir = scratch_dir();
    let socket = dir.join("handoff.sock");
    let be = Backends::spawn();
    std::fs::write(dir.join("config.yaml"), config(&p, &socket, p.data)).unwrap();
    std::fs::write(dir.join("inventory.yaml"), inventory(&p, &be)).unwrap();
    for (what, cut) in [("killed mid-frame", true), ("garbage", false)] {
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let text = std::fs::read_to_string(dir.join("config.yaml")).unwrap();
        let fake = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut channel =
                Channel::new(stream.try_clone().unwrap(), Duration::from_secs(5)).unwrap();
            let _: (dataplane::handoff::wire::Hello, _) = channel.recv().unwrap();
            let accept = Answer::Accept {
                version: VERSION,
                release: "fake".into(),
                config: text.clone(),
                workers: 2,
                pid: std::process::id(),
            };
            channel.send(&accept, &[]).unwrap();
            let (decision, _): (Decision, _) = channel.recv().unwrap();
            assert_eq!(decision, Decision::Proceed);
            let mut raw = stream;
            if cut {
                // The first bytes of a frame header, then the process is gone.
                raw.write_all(b"UDH1\x00\x00").unwrap();
            } else {
                raw.write_all(&[0xAB; 64]).unwrap();
            }
        });
        let started = Instant::now();
        let (code, _, err) = run_binary(&["--config", dir.join("config.yaml").to_str().unwrap()]);
        fake.join().unwrap();
        assert_ne!(code, 0, "{what}: {err}");
        assert!(err.contains("hand-off"), "{what}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{what}: took {:?}",
            started.elapsed()
        );
        std::fs::remove_file(&socket).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Sealed tokens across a hand-off: one spent on A stays spent on B (the nonce ledger goes
/// with the sockets), one A issued and nobody spent opens a session on B, once.
#[test]
fn a_sealed_token_spent_on_the_old_process_stays_spent_on_the_new_one() {
    let be = Backends::spawn();
    let p = ports();
    let dir = scratch_dir();
    let socket = dir.join("handoff.sock");
    let keys = dir.join("token.keys");
    std::fs::write(&keys, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    // No default endpoint: a token refused is a datagram dropped, not a default session.
    let text = config(&p, &socket, p.data)
        .lines()
        .filter(|l| !l.starts_with("defaultEndpoint"))
        .collect::<Vec<_>>()
        .join("\n")
        + &format!("\ntokenSecret: {{file: {}}}\n", keys.display());
    let old = Proxy::start(&text, &inventory(&p, &be));
    let data = local(p.data);
    let spent = old.token(QUERY_A);
    let unspent = old.token(QUERY_B);
    let first = client();
    assert_eq!(exchange(&first, data, &spent).0, "a");

    let new = successor(&old);
    new.eventually("B took over", |px| {
        px.metric(r#"udp_director_handoff_total{result="took_over"}"#) == 1.0
    });
    // The session goes on; the spent token opens nothing new on B.
    assert_eq!(exchange(&first, data, "after").0, "a");
    let replay = client();
    replay.send_to(spent.as_bytes(), data).unwrap();
    expect_nothing(&replay, Duration::from_millis(300));
    assert!(new.metric(r#"udp_director_tokens_rejected_total{reason="used"}"#) >= 1.0);
    // The one nobody spent works on B, once.
    let later = client();
    assert_eq!(exchange(&later, data, &unspent).0, "b");
    let again = client();
    again.send_to(unspent.as_bytes(), data).unwrap();
    expect_nothing(&again, Duration::from_millis(300));
}

/// In a pod, the old process does not exit after handing over (its container would be
/// restarted with the old release); deleted (SIGTERM), it gives its TCP connections
/// `drainSeconds` and exits once they are done.
#[test]
fn in_a_pod_the_old_process_waits_for_its_deletion_and_then_finishes_its_tcp_connections() {
    let be = Backends::spawn();
    let p = ports();
    let socket = scratch_dir().join("handoff.sock");
    let mut old = Proxy::launch(
        &config(&p, &socket, p.data),
        &inventory(&p, &be),
        &[("KUBERNETES_SERVICE_HOST", std::ffi::OsStr::new("10.0.0.1"))],
    );
    old.eventually("ready", |px| px.http("GET", "/readyz").0 == 200);
    old.eventually("the TCP forwarder open", |px| {
        px.metric(r#"udp_director_forwarders{protocol="tcp"}"#) == 1.0
    });
    let mut tcp = TcpStream::connect(local(p.tcp_forward)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 6];
    tcp.write_all(b"before").unwrap();
    tcp.read_exact(&mut got).unwrap();

    let new = successor(&old);
    new.eventually("B took over", |px| {
        px.metric(r#"udp_director_handoff_total{result="took_over"}"#) == 1.0
    });
    assert!(
        exited_within(&mut old, Duration::from_secs(1)).is_none(),
        "A exited in a pod:\n{}",
        old.log()
    );
    // Deleted: the transfer goes on through the drain.
    old.terminate();
    std::thread::sleep(Duration::from_millis(200));
    tcp.write_all(b"during").unwrap();
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"during");
    drop(tcp);
    let status = exited_within(&mut old, Duration::from_secs(4))
        .unwrap_or_else(|| panic!("A did not exit once its TCP was done:\n{}", old.log()));
    assert!(status.success(), "{status}");
}
