//! Helpers for driving a real data plane over loopback: echo backends, clients, grants.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::{
    Backend, BackendId, Controller, DataPlane, DataPlaneConfig, DataPortConfig, Grant, TokenId,
};

pub const WAIT: Duration = Duration::from_secs(2);

/// A data plane on loopback port 0 with `workers` workers and `ports` data ports.
pub struct Proxy {
    pub plane: Option<DataPlane>,
    pub ctl: Controller,
    pub addrs: Vec<SocketAddr>,
}

impl Proxy {
    pub fn start(workers: usize, tweak: impl FnOnce(&mut DataPlaneConfig)) -> Self {
        Self::start_on("127.0.0.1:0", workers, tweak)
    }

    pub fn start_on(bind: &str, workers: usize, tweak: impl FnOnce(&mut DataPlaneConfig)) -> Self {
        let mut cfg = DataPlaneConfig::with_ports(vec![DataPortConfig {
            name: "game".into(),
            bind: bind.parse().unwrap(),
        }]);
        cfg.workers = NonZeroUsize::new(workers).unwrap();
        tweak(&mut cfg);
        let plane = DataPlane::start(cfg).expect("data plane starts");
        let ctl = plane.controller();
        let addrs = plane.local_addrs().to_vec();
        Self {
            plane: Some(plane),
            ctl,
            addrs,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Publishes a grant for `targets` (one per data port) and returns its token text.
    pub fn grant(&self, backend: u64, targets: &[Option<SocketAddr>], ttl: Duration) -> String {
        let uuid = random_uuid();
        let grant = Grant::new(
            TokenId(uuid),
            Backend {
                id: BackendId(backend),
                addrs: targets.to_vec().into(),
            },
            Instant::now() + ttl,
        );
        self.ctl.publish_grant(grant).unwrap();
        TokenId(uuid).to_string()
    }

    pub fn grant_one(&self, backend: u64, target: SocketAddr) -> String {
        self.grant(backend, &[Some(target)], Duration::from_secs(30))
    }

    pub fn set_default(&self, backend: u64, target: Option<SocketAddr>) {
        self.ctl.set_default(target.map(|t| Backend {
            id: BackendId(backend),
            addrs: vec![Some(t)].into(),
        }));
    }

    pub fn sessions(&self) -> Vec<dataplane::SessionInfo> {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let asked = self.ctl.list_sessions(Arc::new(move |list| {
            tx.lock().unwrap().send(list).unwrap();
        }));
        (0..asked)
            .flat_map(|_| rx.recv_timeout(WAIT).expect("worker answers"))
            .collect()
    }

    /// Polls until `f` holds, or fails after a few seconds.
    pub fn eventually(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.shutdown();
        if let Some(p) = self.plane.take() {
            p.join().unwrap();
        }
    }
}

pub fn random_uuid() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: AtomicU64 = AtomicU64::new(1);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    let hi = h.finish();
    h.write_u64(hi);
    let lo = h.finish();
    // Version 4, variant 1, like a real token.
    ((u128::from(hi) << 64 | u128::from(lo)) & !(0xF << 76) | (0x4 << 76)) & !(0x3 << 62)
        | (0x2 << 62)
}

/// A UDP echo server on loopback. With a tag, replies are `[tag] ++ payload`; without, the
/// payload unchanged. Records every peer it saw.
pub struct Echo {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn plain() -> Self {
        Self::spawn("127.0.0.1:0", None)
    }

    pub fn tagged(tag: u8) -> Self {
        Self::spawn("127.0.0.1:0", Some(tag))
    }

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

pub fn control_packet(token: &str) -> Vec<u8> {
    let mut p = dataplane::config::DEFAULT_CONTROL_MAGIC.to_vec();
    p.extend_from_slice(token.as_bytes());
    p
}
