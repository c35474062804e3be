//! Upgrades without dropping players (SPEC §12), end to end with the binary: proxy A serves
//! token and forwarder sessions with traffic flowing; proxy B starts on the same config and
//! hand-off socket, takes over, and A exits. Every UDP session keeps working without a new
//! token, the backend sees the same source port before and after, a token A issued is
//! redeemable once on B, a live migration works on B, a TCP connection open on A finishes its
//! transfer, new connections reach B; and the refusals leave A serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

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
    forward: u16,
    tcp_forward: u16,
}

fn config(p: &Ports, socket: &std::path::Path, data: u16) -> String {
    format!(
        r#"
bindAddress: 127.0.0.1
queryPort: {query}
adminPort: {admin}
dataPorts: [{{name: game, port: {data}, protocol: udp}}]
workers: 2
drainSeconds: 5
inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 50}}
resourceQueryMapping:
  gameserver: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}
forwarders: {{namespace: games, resolveIntervalSeconds: 1}}
handoff: {{socketPath: {socket}}}
"#,
        query = p.query,
        admin = p.admin,
        socket = socket.display(),
    )
}

fn inventory(p: &Ports, a: SocketAddr, b: SocketAddr, tcp: SocketAddr) -> String {
    let forwarder = |name: &str, listen: u16, target: SocketAddr, protocol: &str| {
        format!(
            "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
             namespace: games, creationTimestamp: \"2026-01-01T00:00:00Z\"}}\n  spec: {{{protocol}: \
             {{listenPort: {listen}, targetHost: \"{}\", targetPort: {}}}}}\n",
            target.ip(),
            target.port()
        )
    };
    format!(
        "{}{}{}{}",
        gameserver("gs-a", "Ready", a, ", map: a"),
        gameserver("gs-b", "Ready", b, ", map: b"),
        forwarder("fwd", p.forward, a, "udp"),
        forwarder("fwd-tcp", p.tcp_forward, tcp, "tcp"),
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
        forward: free_port(),
        tcp_forward: free_port(),
    }
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
    let a_echo = PortEcho::spawn("a");
    let b_echo = PortEcho::spawn("b");
    let tcp_echo = slow_tcp_echo();
    let p = ports();
    let scratch = scratch_dir();
    let socket = scratch.join("handoff.sock");
    let mut old = Proxy::start(
        &config(&p, &socket, p.data),
        &inventory(&p, a_echo.addr, b_echo.addr, tcp_echo),
    );
    old.eventually("forwarders open", |px| {
        px.metric(r#"udp_director_forwarders{protocol="udp"}"#) == 1.0
            && px.metric(r#"udp_director_forwarders{protocol="tcp"}"#) == 1.0
    });
    let data = local(p.data);
    let forward = local(p.forward);

    // A token session and a forwarder session with traffic; a token issued but not redeemed.
    let token_client = client();
    let token = old.token(QUERY_A);
    let (tag, token_port) = exchange(&token_client, data, &token);
    assert_eq!(tag, "a");
    let fwd_client = client();
    let (_, fwd_port) = exchange(&fwd_client, forward, "hello");
    let spare = old.token(QUERY_B);
    let move_to_b = old.token(QUERY_B);
    // A TCP transfer in flight through A.
    let mut tcp = TcpStream::connect(local(p.tcp_forward)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");

    // Traffic keeps flowing while B takes over.
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = Arc::clone(&stop);
        let c = token_client.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = c.send_to(format!("pump{n}").as_bytes(), data);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let new = successor(&old);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    pump.join().unwrap();
    // Drain the pump's replies.
    while datagram_within(&token_client, Duration::from_millis(200)).is_some() {}

    // The TCP connection opened on A still carries its transfer; A has stopped accepting.
    tcp.write_all(b"during").unwrap();
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"during");
    drop(tcp);
    let status = exited_within(&mut old, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("A did not exit after the hand-off:\n{}", old.log()));
    assert!(status.success(), "A: {status}\n{}", old.log());

    // Every UDP session goes on, from the same source port, without a new token.
    assert_eq!(
        exchange(&token_client, data, "after"),
        ("a".into(), token_port)
    );
    assert_eq!(
        exchange(&fwd_client, forward, "after"),
        ("a".into(), fwd_port)
    );
    // A token A issued is redeemable on B, once.
    let spare_client = client();
    assert_eq!(exchange(&spare_client, data, &spare).0, "b");
    let again = client();
    again.send_to(spare.as_bytes(), data).unwrap();
    expect_nothing(&again, Duration::from_millis(300));
    // A live migration on B moves the taken-over session.
    token_client
        .send_to(&control_packet(&move_to_b), data)
        .unwrap();
    new.eventually("the session moved to b", |_| {
        exchange(&token_client, data, "moved").0 == "b"
    });
    // New TCP connections reach B.
    let mut tcp = TcpStream::connect(local(p.tcp_forward)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"new-tc").unwrap();
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"new-tc");
    // B's query port (A's socket) answers.
    let _ = new.token(QUERY_A);
    assert_eq!(
        new.metric(r#"udp_director_handoff_total{result="took_over"}"#),
        1.0
    );
    assert!(new.metric("udp_director_handoff_sessions_total") >= 2.0);
}

#[test]
fn a_successor_with_another_data_port_is_refused_and_the_old_process_serves_on() {
    let echo = PortEcho::spawn("a");
    let p = ports();
    let scratch = scratch_dir();
    let socket = scratch.join("handoff.sock");
    let old = Proxy::start(
        &config(&p, &socket, p.data),
        &inventory(&p, echo.addr, echo.addr, echo.addr),
    );
    let data = local(p.data);
    let c = client();
    let token = old.token(QUERY_A);
    let (_, port) = exchange(&c, data, &token);

    let dir = scratch_dir();
    std::fs::copy(old.dir.join("inventory.yaml"), dir.join("inventory.yaml")).unwrap();
    std::fs::write(dir.join("config.yaml"), config(&p, &socket, free_port())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_udp-director"))
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused the hand-off") && err.contains("dataPorts"),
        "{err}"
    );
    // A never stopped reading.
    assert_eq!(exchange(&c, data, "still"), ("a".into(), port));
    assert_eq!(
        old.metric(r#"udp_director_handoff_total{result="refused"}"#),
        1.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A successor that connects, says hello, receives the state and goes away without taking
/// over: A reads its sockets again and loses no session.
#[test]
fn a_successor_that_dies_after_receiving_leaves_the_old_process_serving() {
    use dataplane::handoff::stream::Channel;
    use dataplane::handoff::wire::{Answer, State};
    let echo = PortEcho::spawn("a");
    let p = ports();
    let scratch = scratch_dir();
    let socket = scratch.join("handoff.sock");
    let old = Proxy::start(
        &config(&p, &socket, p.data),
        &inventory(&p, echo.addr, echo.addr, echo.addr),
    );
    let data = local(p.data);
    let c = client();
    let token = old.token(QUERY_A);
    let (_, port) = exchange(&c, data, &token);

    let text = std::fs::read_to_string(old.dir.join("config.yaml")).unwrap();
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut channel = Channel::new(stream, Duration::from_secs(5)).unwrap();
    channel
        .send(&dataplane::handoff::new::hello(text, 2), &[])
        .unwrap();
    let (answer, _): (Answer, _) = channel.recv().unwrap();
    assert_eq!(answer, Answer::Accept);
    let (state, fds): (State, _) = channel.recv().unwrap();
    assert_eq!(
        state
            .workers
            .iter()
            .map(|w| w.sessions.len())
            .sum::<usize>(),
        1
    );
    assert!(!fds.is_empty());
    // Dies here: no `Taken`.
    drop(fds);
    drop(channel);
    old.eventually("A counts the failed hand-off", |px| {
        px.metric(r#"udp_director_handoff_total{result="failed"}"#) == 1.0
    });
    assert_eq!(exchange(&c, data, "still"), ("a".into(), port));
}
