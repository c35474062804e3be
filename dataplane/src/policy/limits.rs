//! Session caps shared by all workers: a global count and an optional per-client-IP count.
//!
//! Touched only when a session opens or closes, never per datagram. The per-IP map is sharded so
//! workers setting up sessions for different clients rarely meet on one lock. The caps can
//! change at run time (config reload); the per-IP counts are kept even without a per-IP cap,
//! so one turned on later counts the sessions already open.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ahash::AHashMap;
use parking_lot::Mutex;

use crate::metrics::DropReason;

const IP_SHARDS: usize = 64;

/// Global and per-IP session admission.
#[derive(Debug)]
pub(crate) struct SessionLimits {
    max_sessions: AtomicUsize,
    /// Zero: no per-IP cap.
    max_per_ip: AtomicUsize,
    live: AtomicUsize,
    per_ip: Box<[Mutex<AHashMap<IpAddr, usize>>]>,
    hasher: ahash::RandomState,
}

impl SessionLimits {
    pub(crate) fn new(max_sessions: usize, max_per_ip: Option<usize>) -> Self {
        Self {
            max_sessions: AtomicUsize::new(max_sessions),
            max_per_ip: AtomicUsize::new(max_per_ip.unwrap_or(0)),
            live: AtomicUsize::new(0),
            per_ip: (0..IP_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    /// New caps, for sessions opened from now on (the ones open stay, even over a lowered cap).
    pub(crate) fn set_caps(&self, max_sessions: usize, max_per_ip: Option<usize>) {
        self.max_sessions.store(max_sessions, Ordering::Release);
        self.max_per_ip
            .store(max_per_ip.unwrap_or(0), Ordering::Release);
    }

    /// Reserves a session slot for `ip`, or says which cap refused it.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Result<(), DropReason> {
        if self.live.fetch_add(1, Ordering::AcqRel) >= self.max_sessions.load(Ordering::Acquire) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(DropReason::SessionLimit);
        }
        let max = self.max_per_ip.load(Ordering::Acquire);
        let mut shard = self.shard(ip).lock();
        let count = shard.entry(ip).or_insert(0);
        if max != 0 && *count >= max {
            if *count == 0 {
                shard.remove(&ip);
            }
            drop(shard);
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(DropReason::IpLimit);
        }
        *count += 1;
        Ok(())
    }

    /// Takes a slot for a session that exists already (one handed over by the previous
    /// process), over the caps if need be: the caps refuse new sessions, never live ones.
    pub(crate) fn acquire_existing(&self, ip: IpAddr) {
        self.live.fetch_add(1, Ordering::AcqRel);
        *self.shard(ip).lock().entry(ip).or_insert(0) += 1;
    }

    /// Returns a slot taken by [`Self::try_acquire`].
    pub(crate) fn release(&self, ip: IpAddr) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        let mut shard = self.shard(ip).lock();
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }

    /// Sessions live across all workers.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<AHashMap<IpAddr, usize>> {
        let index = self.hasher.hash_one(ip) as usize % IP_SHARDS;
        &self.per_ip[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_and_per_ip_caps() {
        let limits = SessionLimits::new(3, Some(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Err(DropReason::IpLimit));
        assert_eq!(limits.try_acquire(b), Ok(()));
        assert_eq!(limits.try_acquire(b), Err(DropReason::SessionLimit));
        assert_eq!(limits.live(), 3);
        limits.release(a);
        assert_eq!(limits.try_acquire(b), Ok(()));
        assert_eq!(limits.try_acquire(b), Err(DropReason::SessionLimit));
        limits.release(b);
        limits.release(b);
        limits.release(a);
        assert_eq!(limits.live(), 0);
    }

    #[test]
    fn caps_change_at_run_time_and_count_what_is_open() {
        let limits = SessionLimits::new(10, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limits.try_acquire(a), Ok(()));
        }
        // A per-IP cap turned on later counts the three already open.
        limits.set_caps(10, Some(3));
        assert_eq!(limits.try_acquire(a), Err(DropReason::IpLimit));
        limits.set_caps(3, None);
        assert_eq!(
            limits.try_acquire("10.0.0.2".parse().unwrap()),
            Err(DropReason::SessionLimit)
        );
        limits.set_caps(10, Some(4));
        assert_eq!(limits.try_acquire(a), Ok(()));
        for _ in 0..4 {
            limits.release(a);
        }
        assert_eq!(limits.live(), 0);
        assert!(
            limits.per_ip.iter().all(|s| s.lock().is_empty()),
            "no entry left"
        );
    }
}
