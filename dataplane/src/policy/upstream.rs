//! Shared upstream sockets, the sans-io part (SPEC §10): which of a worker's shared upstream
//! sockets a new UDP session to a backend address leaves from.
//!
//! One connected socket per session would cap a node at its ephemeral ports (~28k per source
//! address) and its open-file limit. Instead a worker keeps unconnected upstream sockets, each
//! with its own local port, and a socket carries at most one session per backend address: the
//! backend still sees one stable source address and port per player, and replies are told
//! apart by (socket, source address). A worker then needs as many sockets as its busiest
//! backend has sessions on it, not one per session.

use std::collections::{BTreeSet, VecDeque};
use std::net::{SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

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

/// How long a place (socket, backend address) a session left stays unused. The backend may
/// still send to the session's old source port for a while (replies in flight, or a server
/// that has not noticed the player moved); a new session to the same backend in the same
/// place would get them, and the backend would take it for the old player.
pub(crate) const PLACE_QUARANTINE: Duration = Duration::from_secs(10);

/// The form a backend address takes as a key, so the address a session was given and the
/// source address the kernel reports for its replies match: IPv4-mapped IPv6 as IPv4, no IPv6
/// flow label, and a scope id only where it means something (link-local addresses).
pub(crate) fn peer_key(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => addr,
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => {
                let link_local = v6.ip().segments()[0] & 0xffc0 == 0xfe80;
                let scope = if link_local { v6.scope_id() } else { 0 };
                SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, scope))
            }
        },
    }
}

/// How long a shared upstream socket opened for a peak stays open once no backend address
/// has a place on it, before it is closed: long enough that a steady load does not open and
/// close sockets, short enough that the descriptor count returns to the working size.
pub(crate) const SOCKET_IDLE: Duration = Duration::from_secs(30);

/// Which socket each backend address's sessions use, over sockets numbered `0..open` per
/// address family.
///
/// Invariant: no place is handed out on a socket that is not open. A new socket is asked for
/// only as the next number (`open`), and counted only once it opened; a failed open changes
/// nothing, so the next session cannot be handed a number past the sockets that exist.
#[derive(Debug, Default)]
pub(crate) struct SocketAssigner {
    targets: AHashMap<SocketAddr, TargetUse>,
    /// Sockets open, IPv4 and IPv6.
    open: [u32; 2],
}

/// The sockets one backend address uses: `0..high_water`, minus the free places.
///
/// A place given back waits out its quarantine in `quarantined` (in release order, which is
/// expiry order), then joins `ready`, from which the lowest is taken first: sessions pack onto
/// the low sockets, so after a peak the high ones empty out and can be closed. Every step is
/// O(log n) in the places of one backend, however many a flood left behind.
#[derive(Debug, Default)]
struct TargetUse {
    high_water: u32,
    /// Places given back and still in quarantine, oldest first, with when.
    quarantined: VecDeque<(u32, Instant)>,
    /// Places free past their quarantine.
    ready: BTreeSet<u32>,
}

impl TargetUse {
    /// Moves the places whose quarantine is over at `now` to `ready`.
    fn mature(&mut self, now: Instant) {
        while let Some(&(index, since)) = self.quarantined.front()
            && now.saturating_duration_since(since) >= PLACE_QUARANTINE
        {
            self.quarantined.pop_front();
            self.ready.insert(index);
        }
    }

    /// Forgets the free places at the top of the range, so the sockets there serve no one.
    fn trim(&mut self) {
        while let Some(top) = self.high_water.checked_sub(1)
            && self.ready.last() == Some(&top)
        {
            self.ready.pop_last();
            self.high_water = top;
        }
    }
}

fn family(target: SocketAddr) -> usize {
    usize::from(target.is_ipv6())
}

impl SocketAssigner {
    /// A socket for a new session to `target`, one no live session to `target` uses and none
    /// left within [`PLACE_QUARANTINE`], the lowest such. When every open socket of its family
    /// is taken, `open_socket(n)` is asked to open socket `n` (the next number); if that fails,
    /// nothing is recorded and its error is returned.
    pub(crate) fn acquire<E>(
        &mut self,
        target: SocketAddr,
        now: Instant,
        open_socket: impl FnOnce(u32) -> Result<(), E>,
    ) -> Result<u32, E> {
        let open = &mut self.open[family(target)];
        let used = self.targets.entry(target).or_default();
        used.mature(now);
        if let Some(index) = used.ready.pop_first() {
            return Ok(index);
        }
        let index = used.high_water;
        debug_assert!(index <= *open, "a place past the open sockets");
        if index >= *open {
            if let Err(e) = open_socket(index) {
                if used.high_water == 0 {
                    self.targets.remove(&target);
                }
                return Err(e);
            }
            *open = index + 1;
        }
        used.high_water += 1;
        Ok(index)
    }

    /// Takes over the places of the previous process's sessions (SPEC §12): `open` sockets per
    /// family (numbered from 0, as there), and the socket each backend address's live
    /// sessions are on. The free places below a backend's highest start a quarantine at `now`
    /// (one may have been given back there a moment ago: a late reply must not reach a new
    /// session). A place named twice is refused (false): two sessions to one backend on one
    /// socket could not be told apart.
    pub(crate) fn adopt(
        &mut self,
        open: [u32; 2],
        places: &[(SocketAddr, u32)],
        now: Instant,
    ) -> bool {
        let mut taken: AHashMap<SocketAddr, BTreeSet<u32>> = AHashMap::new();
        for &(target, index) in places {
            if index >= open[family(target)] || !taken.entry(target).or_default().insert(index) {
                return false;
            }
        }
        self.open = open;
        self.targets.clear();
        for (target, indexes) in taken {
            let high_water = indexes.last().map_or(0, |top| top + 1);
            let quarantined = (0..high_water)
                .filter(|i| !indexes.contains(i))
                .map(|i| (i, now))
                .collect();
            self.targets.insert(
                target,
                TargetUse {
                    high_water,
                    quarantined,
                    ready: BTreeSet::new(),
                },
            );
        }
        true
    }

    /// The session to `target` on socket `index` has ended, moved or was never made.
    pub(crate) fn release(&mut self, target: SocketAddr, index: u32, now: Instant) {
        let Some(used) = self.targets.get_mut(&target) else {
            return;
        };
        debug_assert!(
            index < used.high_water && !used.ready.contains(&index),
            "a place released twice, or never handed out"
        );
        used.quarantined.push_back((index, now));
    }

    /// Forgets places free past the quarantine at the top of a backend address's range, and
    /// backend addresses with no place left (their sockets stay for other backends). Returns,
    /// per family, how many sockets some backend address still has a place on: those above
    /// may be closed ([`Self::closed_above`]). Call now and then.
    pub(crate) fn sweep(&mut self, now: Instant) -> [u32; 2] {
        let mut needed = [0u32; 2];
        self.targets.retain(|target, used| {
            used.mature(now);
            used.trim();
            let f = family(*target);
            needed[f] = needed[f].max(used.high_water);
            used.high_water > 0
        });
        needed
    }

    /// The pool closed the sockets of a family from `open` up (none with a place, see
    /// [`Self::sweep`]).
    pub(crate) fn closed_above(&mut self, ipv6: bool, open: u32) {
        let f = usize::from(ipv6);
        debug_assert!(
            self.targets
                .iter()
                .all(|(t, u)| family(*t) != f || u.high_water <= open),
            "a socket closed under a place"
        );
        self.open[f] = self.open[f].min(open);
    }

    /// Sockets open per family, as the assigner counts them.
    #[cfg(test)]
    fn open(&self) -> [u32; 2] {
        self.open
    }

    /// Backend addresses known.
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
    fn backend_addresses_are_keyed_as_the_kernel_reports_sources() {
        let key = |a: &str| peer_key(a.parse().unwrap()).to_string();
        assert_eq!(key("[::ffff:10.0.0.1]:7000"), "10.0.0.1:7000");
        assert_eq!(key("10.0.0.1:7000"), "10.0.0.1:7000");
        let flow = SocketAddr::V6(SocketAddrV6::new("2001:db8::1".parse().unwrap(), 9, 77, 3));
        assert_eq!(peer_key(flow).to_string(), "[2001:db8::1]:9");
        let link = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 5, 3));
        assert_eq!(peer_key(link).to_string(), "[fe80::1%3]:9");
    }

    /// Acquires with every socket opening.
    fn take(s: &mut SocketAssigner, target: SocketAddr, now: Instant) -> u32 {
        s.acquire(target, now, |_| Ok::<(), ()>(())).unwrap()
    }

    #[test]
    fn one_session_per_backend_address_and_socket() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let t0 = Instant::now();
        let mut s = SocketAssigner::default();
        // Three sessions to A need three sockets; B shares them.
        assert_eq!(
            [
                take(&mut s, a, t0),
                take(&mut s, a, t0),
                take(&mut s, a, t0)
            ],
            [0, 1, 2]
        );
        assert_eq!([take(&mut s, b, t0), take(&mut s, b, t0)], [0, 1]);
        // A's socket 1 frees up: within the quarantine a new session to A does not get it
        // (the backend may still send there for the old player)...
        s.release(a, 1, t0);
        assert_eq!(take(&mut s, a, t0 + Duration::from_secs(1)), 3);
        // ...after it, it does, lowest first.
        s.release(a, 0, t0 + Duration::from_secs(2));
        let later = t0 + PLACE_QUARANTINE + Duration::from_secs(2);
        assert_eq!(take(&mut s, a, later), 0);
        assert_eq!(take(&mut s, a, later), 1);
        for i in 0..4 {
            s.release(a, i, later);
        }
        s.sweep(later);
        assert_eq!(
            s.targets(),
            2,
            "A is kept while its places are in quarantine"
        );
        s.sweep(later + PLACE_QUARANTINE);
        assert_eq!(s.targets(), 1, "and forgotten after");
        assert_eq!(take(&mut s, a, later + PLACE_QUARANTINE), 0);
        // Releasing for an unknown target does nothing.
        s.release("10.9.9.9:1".parse().unwrap(), 0, later);
    }

    #[test]
    fn a_socket_that_fails_to_open_is_never_handed_out() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
        let t0 = Instant::now();
        let mut s = SocketAssigner::default();
        let asked = std::cell::RefCell::new(Vec::new());
        let open_if = |ok: bool, s: &mut SocketAssigner, t: SocketAddr| {
            s.acquire(t, t0, |n| {
                asked.borrow_mut().push(n);
                if ok { Ok(()) } else { Err("EMFILE") }
            })
        };
        assert_eq!(open_if(true, &mut s, a), Ok(0));
        assert_eq!(open_if(true, &mut s, a), Ok(1));
        // Out of descriptors: the third session to A is refused, and nothing is recorded...
        assert_eq!(open_if(false, &mut s, a), Err("EMFILE"));
        assert_eq!(open_if(false, &mut s, a), Err("EMFILE"));
        assert_eq!(s.open(), [2, 0]);
        // ...so B still shares the open sockets, and A, once a socket opens, gets number 2:
        // never a number past the sockets that exist.
        assert_eq!(open_if(false, &mut s, b), Ok(0));
        assert_eq!(open_if(true, &mut s, a), Ok(2));
        assert_eq!(*asked.borrow(), [0, 1, 2, 2, 2]);
        // A refused first session of a backend leaves no trace of it; the families count
        // apart.
        assert_eq!(open_if(false, &mut s, v6), Err("EMFILE"));
        assert_eq!(s.targets(), 2);
        assert_eq!(open_if(true, &mut s, v6), Ok(0));
        assert_eq!(s.open(), [3, 1]);
    }

    #[test]
    fn sockets_opened_for_a_peak_are_closable_once_its_places_are_free() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let t0 = Instant::now();
        let mut s = SocketAssigner::default();
        // A peak of 50 sessions to A; one (on socket 0) outlives it.
        for _ in 0..50 {
            take(&mut s, a, t0);
        }
        for i in 1..50 {
            s.release(a, i, t0);
        }
        assert_eq!(
            s.sweep(t0),
            [50, 0],
            "in quarantine: every socket is needed"
        );
        assert_eq!(s.sweep(t0 + PLACE_QUARANTINE), [1, 0]);
        s.closed_above(false, 1);
        assert_eq!(s.open(), [1, 0]);
        // The next session to A opens socket 1 again rather than reusing a closed one.
        let later = t0 + PLACE_QUARANTINE;
        let mut opened = None;
        assert_eq!(
            s.acquire(a, later, |n| {
                opened = Some(n);
                Ok::<(), ()>(())
            }),
            Ok(1)
        );
        assert_eq!(opened, Some(1));
        // A place in quarantine in the middle of the range is kept, and so is its socket.
        s.release(a, 0, later);
        assert_eq!(s.sweep(later), [2, 0]);
    }

    #[test]
    fn after_a_peak_a_new_session_takes_the_lowest_socket_so_the_rest_can_close() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let t0 = Instant::now();
        let mut s = SocketAssigner::default();
        for _ in 0..50 {
            take(&mut s, a, t0);
        }
        // Released in a scrambled order, as sessions end.
        for i in (0..50).map(|i| (i * 37) % 50) {
            s.release(a, i, t0);
        }
        let later = t0 + PLACE_QUARANTINE;
        // A long-lived session arriving after the peak packs onto socket 0, not onto the
        // place freed longest ago, so only one socket stays needed.
        assert_eq!(take(&mut s, a, later), 0);
        assert_eq!(s.sweep(later), [1, 0]);
    }

    #[test]
    fn a_flood_of_places_is_swept_in_log_time() {
        // 100,000 sessions to one backend (a spoofed-source flood on a forwarder), all ended in
        // a scrambled order: one sweep forgets them all without a quadratic scan.
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let t0 = Instant::now();
        let mut s = SocketAssigner::default();
        const N: u32 = 100_000;
        for _ in 0..N {
            take(&mut s, a, t0);
        }
        for i in 0..N {
            s.release(a, (i * 7919) % N, t0);
        }
        // (A quadratic sweep would take minutes here and hang this test.)
        assert_eq!(s.sweep(t0 + PLACE_QUARANTINE), [0, 0]);
        assert_eq!(s.targets(), 0);
    }

    #[test]
    fn a_hundred_thousand_sessions_over_a_thousand_backends_need_a_hundred_sockets() {
        let now = Instant::now();
        let mut s = SocketAssigner::default();
        let mut max = 0;
        for i in 0..100_000u32 {
            let target = SocketAddr::from(([10, 1, (i % 1000 / 250) as u8, (i % 250) as u8], 7000));
            max = max.max(take(&mut s, target, now));
        }
        assert_eq!(max + 1, 100);
        assert_eq!(s.open(), [100, 0]);
    }

    #[test]
    fn adopted_places_stay_taken_and_the_gaps_below_are_free() {
        let t0 = Instant::now();
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let mut s = SocketAssigner::default();
        assert!(s.adopt([3, 0], &[(a, 0), (a, 2), (b, 1)], t0));
        assert_eq!(s.open(), [3, 0]);
        let never = |_| -> Result<(), ()> { panic!("no socket should open") };
        // `a` has 0 and 2: the free place 1 comes first once its quarantine is over, then a
        // new socket (3).
        let t0 = t0 + PLACE_QUARANTINE;
        assert_eq!(s.acquire(a, t0, never), Ok(1));
        let mut opened = None;
        assert_eq!(
            s.acquire(a, t0, |n| {
                opened = Some(n);
                Ok::<_, ()>(())
            }),
            Ok(3)
        );
        assert_eq!(opened, Some(3));
        // `b` has 1: 0 is free.
        assert_eq!(s.acquire(b, t0, never), Ok(0));
        // A place named twice, or past the open sockets, is refused.
        let mut s = SocketAssigner::default();
        assert!(!s.adopt([2, 0], &[(a, 1), (a, 1)], t0));
        assert!(!s.adopt([2, 0], &[(a, 2)], t0));
    }
}
