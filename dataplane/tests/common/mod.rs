//! Helpers for driving a real data plane over loopback: echo backends, clients, grants.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dataplane::{
    Backend, BackendId, Controller, DataPlane, DataPlaneConfig, DataPortConfig, Grant, TokenId,
};

pub use testkit::*;

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
        let mut cfg =
            DataPlaneConfig::with_ports(vec![DataPortConfig::udp("game", bind.parse().unwrap())]);
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
                proxy: Default::default(),
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
            proxy: Default::default(),
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

    /// Ends every session of `client` through the control API; returns how many ended.
    pub fn kill(&self, client: SocketAddr) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let asked = self.ctl.kill_sessions(
            dataplane::ctl::ClientMatch::Addr(client),
            Arc::new(move |n| tx.lock().unwrap().send(n).unwrap()),
        );
        (0..asked).map(|_| rx.recv_timeout(WAIT).unwrap()).sum()
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

pub fn control_packet(token: &str) -> Vec<u8> {
    let mut p = dataplane::config::DEFAULT_CONTROL_MAGIC.to_vec();
    p.extend_from_slice(token.as_bytes());
    p
}

/// An error and its causes, as `anyhow` prints them with `{:#}`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
