//! Shared upstream sockets, the sans-io part (SPEC §10): which of a worker's shared upstream
//! sockets a new UDP session to a backend address leaves from.
//!
//! One connected socket per session would cap a node at its ephemeral ports (~28k per source
//! address) and its open-file limit. Instead a worker keeps unconnected upstream sockets, each
//! with its own local port, and a socket carries at most one session per backend address: the
//! backend still sees one stable source address and port per player, and replies are told
//! apart by (socket, source address). A worker then needs as many sockets as its busiest
//! backend has sessions on it, not one per session.

use std::net::SocketAddr;

use ahash::AHashMap;

/// Whether datagrams to `target` can be a session's: not a wildcard, broadcast or multicast
/// address, nor port 0. A session to one would only fail (or spray a network) on every
/// datagram, so it is refused at setup instead.
pub(crate) fn is_unicast_target(target: SocketAddr) -> bool {
    let ip = target.ip().to_canonical();
    let unicast = match ip {
        std::net::IpAddr::V4(v4) => !v4.is_broadcast(),
        std::net::IpAddr::V6(_) => true,
    };
    unicast && !ip.is_unspecified() && !ip.is_multicast() && target.port() != 0
}

/// Which socket each backend address's sessions use.
#[derive(Debug, Default)]
pub(crate) struct SocketAssigner {
    targets: AHashMap<SocketAddr, TargetUse>,
}

/// The sockets one backend address uses: `0..high_water`, minus `free`.
#[derive(Debug, Default)]
struct TargetUse {
    high_water: u32,
    free: Vec<u32>,
}

impl SocketAssigner {
    /// A socket for a new session to `target`, one no live session to `target` uses. It may be
    /// the first index past every socket opened so far: the caller opens that one.
    pub(crate) fn acquire(&mut self, target: SocketAddr) -> u32 {
        let used = self.targets.entry(target).or_default();
        used.free.pop().unwrap_or_else(|| {
            used.high_water += 1;
            used.high_water - 1
        })
    }

    /// The session to `target` on socket `index` has ended (or was never made).
    pub(crate) fn release(&mut self, target: SocketAddr, index: u32) {
        let Some(used) = self.targets.get_mut(&target) else {
            return;
        };
        used.free.push(index);
        if used.free.len() == used.high_water as usize {
            // No session to `target` is left: forget it (its sockets stay for others).
            self.targets.remove(&target);
        }
    }

    /// Backend addresses with at least one session.
    #[cfg(test)]
    fn targets(&self) -> usize {
        self.targets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unicast_backends_make_sessions() {
        for bad in [
            "255.255.255.255:9",
            "0.0.0.0:9",
            "224.0.0.1:9",
            "10.0.0.1:0",
            "[::]:9",
            "[ff02::1]:9",
            "[::ffff:255.255.255.255]:9",
        ] {
            assert!(!is_unicast_target(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "10.0.0.1:7777",
            "127.0.0.1:1",
            "[::1]:7777",
            "[2001:db8::1]:9",
        ] {
            assert!(is_unicast_target(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn one_session_per_backend_address_and_socket() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let mut s = SocketAssigner::default();
        // Three sessions to A need three sockets; B shares them.
        assert_eq!([s.acquire(a), s.acquire(a), s.acquire(a)], [0, 1, 2]);
        assert_eq!([s.acquire(b), s.acquire(b)], [0, 1]);
        // A's socket 1 frees up: the next session to A takes it, not a fourth socket.
        s.release(a, 1);
        assert_eq!(s.acquire(a), 1);
        assert_eq!(s.acquire(a), 3);
        for i in 0..4 {
            s.release(a, i);
        }
        assert_eq!(s.targets(), 1, "A is forgotten once its last session ends");
        assert_eq!(s.acquire(a), 0);
        // Releasing for an unknown target does nothing.
        s.release("10.9.9.9:1".parse().unwrap(), 0);
        s.release(b, 0);
        s.release(b, 1);
        s.release(a, 0);
        assert_eq!(s.targets(), 0);
    }

    #[test]
    fn a_hundred_thousand_sessions_over_a_thousand_backends_need_a_hundred_sockets() {
        let mut s = SocketAssigner::default();
        let mut max = 0;
        for i in 0..100_000u32 {
            let target = SocketAddr::from(([10, 1, (i % 1000 / 250) as u8, (i % 250) as u8], 7000));
            max = max.max(s.acquire(target));
        }
        assert_eq!(max + 1, 100);
    }
}
