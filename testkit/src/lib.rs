//! Helpers for loopback tests across the workspace: UDP echo backends that can tag their
//! replies, TCP backends, PROXY protocol v2 backends, client sockets with timeouts, and assertions on what arrives. Real
//! sockets only. [`agones`] is a stand-in for Agones' allocation API on a real kube-apiserver,
//! for the allocation tests and `perf query --allocate`.

pub mod agones;
mod proxy;
mod tcp;
pub use proxy::{HeaderSeen, ProxyEcho, TcpProxyEcho, read_answer, split_header};
pub use tcp::{TcpBackend, TcpEcho, expect_closed, read_exact_within, tcp_client};

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a test waits for a datagram it expects.
pub const WAIT: Duration = Duration::from_secs(2);

/// A UDP echo server on loopback. With a tag, replies are `[tag] ++ payload`; without, the
/// payload unchanged. Records every peer it saw.
#[derive(Debug)]
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Datagrams received so far.
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// Replies with the payload unchanged.
    pub fn plain() -> Self {
        Self::spawn("127.0.0.1:0", None)
    }

    /// Replies with `[tag] ++ payload`.
    pub fn tagged(tag: u8) -> Self {
        Self::spawn("127.0.0.1:0", Some(tag))
    }

    /// An echo on `bind`, tagging replies when `tag` is set.
    pub fn spawn(bind: &str, tag: Option<u8>) -> Self {
        let socket = UdpSocket::bind(bind).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let received = Arc::clone(&received);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut out = vec![0u8; 65537];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    received.fetch_add(1, Ordering::Relaxed);
                    let reply = match tag {
                        Some(t) => {
                            out[0] = t;
                            out[1..=n].copy_from_slice(&buf[..n]);
                            &out[..=n]
                        }
                        None => &buf[..n],
                    };
                    let _ = socket.send_to(reply, from);
                }
            })
        };
        Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket with a receive timeout.
pub fn client() -> UdpSocket {
    client_on("127.0.0.1:0")
}

/// A client socket bound to `bind`, with a receive timeout.
pub fn client_on(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Receives one datagram or panics after the socket's timeout.
pub fn expect_datagram(s: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let (n, _) = s.recv_from(&mut buf).expect("a datagram arrives");
    buf.truncate(n);
    buf
}

/// One datagram if it arrives within `within`: for polling loops, where a datagram lost in a
/// change (a session ending under it) is a retry, not a failure.
pub fn datagram_within(s: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = vec![0u8; 65536];
    let got = s.recv_from(&mut buf);
    s.set_read_timeout(Some(WAIT)).unwrap();
    let (n, _) = got.ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Asserts nothing arrives within `within`.
pub fn expect_nothing(s: &UdpSocket, within: Duration) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 65536];
    let got = s.recv_from(&mut buf);
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert!(
        got.is_err(),
        "unexpected datagram: {:?}",
        got.map(|(n, _)| &buf[..n])
    );
}

/// Number of UDP sockets on this host connected to `peer` (an IPv4 loopback address), read from
/// `/proc/net/udp`. Unlike a count of this process's fds, other tests running in parallel do not
/// disturb it, because each test has its own echo backend.
pub fn udp_sockets_connected_to(peer: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = peer else {
        panic!("IPv4 only");
    };
    // /proc/net/udp prints the address as the in-memory u32 in hex, and the port in hex.
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(2) == Some(wanted.as_str()))
        .count()
}

/// Open UDP sockets (of any process) bound to local port `port`, any address.
pub fn udp_sockets_on_port(port: u16) -> usize {
    let wanted = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .is_some_and(|local| local.ends_with(&wanted))
                })
                .count()
        })
        .sum()
}

/// Marks the calling test as skipped because `reason` (something this machine lacks) keeps it
/// from running: said loudly on the terminal, and a failure under `CI=true`, where every test
/// must run. The caller returns right after.
pub fn skip_test(reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, and this test cannot run here: {reason}"
    );
    // Straight to the terminal: the test harness captures eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** test SKIPPED: {reason} ***\n");
}

/// A port free for both UDP and TCP on loopback, outside the ephemeral range (so no socket
/// bound to port 0 elsewhere takes it meanwhile), for listeners whose port a test must name.
pub fn free_port() -> u16 {
    use std::net::TcpListener;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    // A start that differs between test processes running at once.
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 25,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (port - 20_000) % 12_000;
        let udp = UdpSocket::bind(("127.0.0.1", port));
        let tcp = TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            return port;
        }
    }
}

/// Runs `ip ARGS` (iproute2): the network namespaces and veth pairs of the tests.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
