//! Flood protection (sans-io): per-source-IP token buckets for datagrams from addresses without
//! a session, and for new sessions (SPEC §9, `rateLimit`). Each worker has its own table, so
//! nothing is shared or locked; the kernel spreads one address's source ports over the workers,
//! so an address that varies its port gets up to the limit on each worker.
//!
//! The table has a fixed number of slots, so memory stays the same under a flood from a million
//! spoofed sources: an address hashes to one slot, and an address that finds its slot held by
//! another takes it over with a full bucket. A single source flooding keeps finding its own
//! slot and runs dry; many sources each get their own allowance, which is what a per-source
//! limit means.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The configured rates.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RateLimit {
    /// Datagrams per second from one address without a session.
    pub packets_per_second: u32,
    /// How many may come at once before the rate applies.
    pub burst: u32,
    /// New sessions per second from one address (0: no limit).
    pub sessions_per_second: u32,
}

/// Slots per worker table: 65,536 × 24 bytes = 1.5 MiB, whatever the flood.
const SLOTS: usize = 1 << 16;

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Hash of the address that holds the slot (0: free).
    tag: u64,
    /// Packet tokens, in thousandths.
    packets: u32,
    /// Session tokens, in thousandths.
    sessions: u32,
    /// Milliseconds since the table's epoch at the last refill (u64: no wrap in any uptime).
    at: u64,
}

/// One worker's buckets.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    slots: Box<[Slot]>,
    epoch: Instant,
    hasher: ahash::RandomState,
}

impl RateLimiter {
    /// The rates it applies.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// A table for `limit`, its clock starting at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            slots: vec![Slot::default(); SLOTS].into_boxed_slice(),
            epoch: now,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Whether a datagram from `ip` (no session) may be looked at; takes a token if so.
    pub fn admit_packet(&mut self, ip: IpAddr, now: Instant) -> bool {
        let slot = self.slot(ip, now);
        take(&mut slot.packets)
    }

    /// Whether `ip` may open a new session now; takes a token if so.
    pub fn admit_session(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.limit.sessions_per_second == 0 {
            return true;
        }
        let slot = self.slot(ip, now);
        take(&mut slot.sessions)
    }

    /// Whether `ip` is at its limit now: its datagrams without a session, or its new
    /// sessions, would be refused. Looks only; an address without a slot is not.
    pub fn over_limit(&self, ip: IpAddr, now: Instant) -> bool {
        let (index, tag) = self.place(ip);
        let slot = &self.slots[index];
        if slot.tag != tag {
            return false;
        }
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        let elapsed = ms.saturating_sub(slot.at);
        let refilled = |tokens: u32, rate: u32| {
            u64::from(tokens).saturating_add(elapsed.saturating_mul(u64::from(rate)))
        };
        refilled(slot.packets, self.limit.packets_per_second) < 1000
            || (self.limit.sessions_per_second > 0
                && refilled(slot.sessions, self.limit.sessions_per_second) < 1000)
    }

    /// `ip`'s slot index and the tag it holds that slot under.
    fn place(&self, ip: IpAddr) -> (usize, u64) {
        let mut h = self.hasher.build_hasher();
        match ip.to_canonical() {
            IpAddr::V4(v4) => h.write_u32(u32::from(v4)),
            IpAddr::V6(v6) => h.write_u128(u128::from(v6)),
        }
        let hash = h.finish();
        ((hash >> 48) as usize & (SLOTS - 1), hash | 1)
    }

    /// `ip`'s slot, refilled to `now` (a slot another address held starts full).
    fn slot(&mut self, ip: IpAddr, now: Instant) -> &mut Slot {
        // The tag is never 0, the free tag.
        let (index, tag) = self.place(ip);
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        let limit = self.limit;
        let slot = &mut self.slots[index];
        let burst = limit.burst.max(1).saturating_mul(1000);
        let session_burst = limit.sessions_per_second.max(1).saturating_mul(1000);
        if slot.tag != tag {
            *slot = Slot {
                tag,
                packets: burst,
                sessions: session_burst,
                at: ms,
            };
            return slot;
        }
        let elapsed = ms.saturating_sub(slot.at);
        if elapsed > 0 {
            // Tokens are thousandths: a rate of R per second adds R per millisecond.
            let refill = |tokens: u32, rate: u32, cap: u32| {
                let added = elapsed.saturating_mul(u64::from(rate));
                u32::try_from((u64::from(tokens) + added).min(u64::from(cap))).unwrap_or(cap)
            };
            slot.packets = refill(slot.packets, limit.packets_per_second, burst);
            slot.sessions = refill(slot.sessions, limit.sessions_per_second, session_burst);
            slot.at = ms;
        }
        slot
    }

    /// Bytes the table holds, whatever the traffic.
    pub fn memory(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }
}

/// Takes one whole token (1000 thousandths) if there is one.
fn take(tokens: &mut u32) -> bool {
    if *tokens >= 1000 {
        *tokens -= 1000;
        true
    } else {
        false
    }
}

/// Control packets a session may send at once: a live migration takes one, a client that
/// retries a lost one a few.
pub(crate) const CONTROL_BURST: u32 = 4;
/// Control packets per second a session earns back once its burst is spent.
pub(crate) const CONTROL_PER_SECOND: u32 = 2;

/// One session's allowance of control packets. Each costs a token lookup, and a sealed one an
/// AEAD open, so a client with a session must not be able to send them at line rate (they
/// never reach the per-source limits, which look at session-less datagrams only). Always on,
/// far above what a real client needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ControlBudget {
    /// In thousandths of a packet.
    tokens: u32,
    at: Instant,
}

impl ControlBudget {
    /// A full allowance.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            tokens: CONTROL_BURST * 1000,
            at: now,
        }
    }

    /// Whether one more control packet may be looked at now; takes it if so.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_millis();
        let earned = u32::try_from(earned * u128::from(CONTROL_PER_SECOND)).unwrap_or(u32::MAX);
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(CONTROL_BURST * 1000);
            self.at = now;
        }
        take(&mut self.tokens)
    }
}

/// How long an address that ran dry waits for its next datagram: for logs and tests.
pub fn interval(limit: &RateLimit) -> Duration {
    Duration::from_secs(1) / limit.packets_per_second.max(1)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_session_gets_a_burst_of_control_packets_then_a_trickle() {
        let t0 = Instant::now();
        let mut b = ControlBudget::new(t0);
        let burst = (0..100).filter(|_| b.admit(t0)).count();
        assert_eq!(burst, CONTROL_BURST as usize);
        // A flood over ten seconds gets the rate, no more.
        let mut passed = 0;
        for ms in 1..=10_000u64 {
            if b.admit(t0 + Duration::from_millis(ms)) {
                passed += 1;
            }
        }
        assert_eq!(passed, 10 * CONTROL_PER_SECOND as usize);
        // A quiet minute refills the burst, never more.
        let later = t0 + Duration::from_secs(70);
        assert_eq!((0..100).filter(|_| b.admit(later)).count(), 4);
    }

    use super::*;

    fn limit() -> RateLimit {
        RateLimit {
            packets_per_second: 100,
            burst: 10,
            sessions_per_second: 2,
        }
    }

    #[test]
    fn an_address_is_over_its_limit_while_its_bucket_is_dry_and_looking_takes_nothing() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(limit(), t0);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!r.over_limit(ip, t0), "never seen: not limited");
        for _ in 0..9 {
            assert!(r.admit_packet(ip, t0));
            assert!(!r.over_limit(ip, t0), "looking does not take a token");
        }
        assert!(r.admit_packet(ip, t0), "the last of the burst");
        assert!(r.over_limit(ip, t0), "the burst is spent");
        // 100 per second: one whole token back after 10 ms.
        assert!(!r.over_limit(ip, t0 + Duration::from_millis(10)));
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(!r.over_limit(other, t0));
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(limit(), t0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let passed = (0..50).filter(|_| rl.admit_packet(ip, t0)).count();
        assert_eq!(passed, 10, "the burst");
        // 100 per second: one every 10 ms.
        assert!(!rl.admit_packet(ip, t0 + Duration::from_millis(5)));
        assert!(rl.admit_packet(ip, t0 + Duration::from_millis(15)));
        // After a quiet second the bucket is full again, not fuller.
        let later = t0 + Duration::from_secs(5);
        assert_eq!((0..50).filter(|_| rl.admit_packet(ip, later)).count(), 10);
        // Another source is not touched by the first one's flood.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(rl.admit_packet(other, later));
        assert_eq!(interval(&limit()), Duration::from_millis(10));
    }

    #[test]
    fn the_clock_runs_for_longer_than_any_uptime() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(limit(), t0);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let day = Duration::from_secs(86_400);
        // 60 days in: past where a u32 millisecond clock would stop.
        for d in [50u32, 60] {
            let t = t0 + day * d;
            assert_eq!(
                (0..50).filter(|_| rl.admit_packet(ip, t)).count(),
                10,
                "day {d}"
            );
            assert!(
                rl.admit_packet(ip, t + Duration::from_millis(15)),
                "refills on day {d}"
            );
        }
    }

    #[test]
    fn new_sessions_have_their_own_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(limit(), t0);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(rl.admit_session(ip, t0));
        assert!(rl.admit_session(ip, t0));
        assert!(!rl.admit_session(ip, t0), "two per second");
        assert!(rl.admit_session(ip, t0 + Duration::from_millis(600)));
        let unlimited = RateLimit {
            sessions_per_second: 0,
            ..limit()
        };
        let mut rl = RateLimiter::new(unlimited, t0);
        assert!((0..100).all(|_| rl.admit_session(ip, t0)));
    }

    #[test]
    fn a_million_spoofed_sources_use_the_same_memory() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(limit(), t0);
        let before = rl.memory();
        let mut admitted = 0;
        for i in 0..1_000_000u32 {
            if rl.admit_packet(IpAddr::from(i.to_be_bytes()), t0) {
                admitted += 1;
            }
        }
        assert_eq!(rl.memory(), before, "a fixed table");
        assert!(before <= 2 << 20, "{before} bytes");
        assert_eq!(admitted, 1_000_000, "each source within its own allowance");
        // The one real flooder still runs dry.
        let flooder: IpAddr = "198.51.100.7".parse().unwrap();
        assert!((0..1000).filter(|_| rl.admit_packet(flooder, t0)).count() <= 10);
    }
}
