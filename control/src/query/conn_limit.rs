//! Connection admission for the TCP servers of the control thread (query and admin): a cap on
//! concurrent connections and one per source, so one client cannot take every slot and lock the
//! others out. A source is an IPv4 address, or an IPv6 /64: one subscriber's prefix holds more
//! addresses than any cap. A slot is held by a guard and returned when the guard drops.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ahash::AHashMap;
use parking_lot::Mutex;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Refusal {
    /// Every slot is taken.
    Total(usize),
    /// This address holds its share already.
    PerIp(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Total(n) => write!(f, "{n} connections open, the most this server takes"),
            Self::PerIp(n) => write!(
                f,
                "{n} connections open from this address (an IPv6 /64 counts as one), the most \
                 it may hold"
            ),
        }
    }
}

/// Concurrent connections, in total and per source IP.
#[derive(Debug)]
pub struct ConnectionSlots {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: AHashMap<IpAddr, usize>,
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    ip: IpAddr,
}

impl ConnectionSlots {
    /// Slots for at most `max_total` connections, `max_per_ip` of them from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            open: Mutex::new(Open::default()),
        })
    }

    /// New caps (config reload), for connections admitted from now on.
    pub fn set_caps(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// Admits a connection from `ip` (IPv4-mapped IPv6 counts as the IPv4 address, other IPv6
    /// as its /64), or says which cap refused it.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let ip = source_of(ip);
        let (max_total, max_per_ip) = (
            self.max_total.load(Ordering::Relaxed),
            self.max_per_ip.load(Ordering::Relaxed),
        );
        let mut open = self.open.lock();
        if open.total >= max_total {
            return Err(Refusal::Total(max_total));
        }
        let from_ip = open.per_ip.entry(ip).or_insert(0);
        if *from_ip >= max_per_ip {
            return Err(Refusal::PerIp(max_per_ip));
        }
        *from_ip += 1;
        open.total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            ip,
        })
    }
}

/// The source a connection counts against.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock();
        open.total -= 1;
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_slot() {
        let slots = ConnectionSlots::new(4, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.try_acquire(a).unwrap();
        let _a2 = slots.try_acquire(a).unwrap();
        assert_eq!(slots.try_acquire(a).unwrap_err(), Refusal::PerIp(2));
        // The mapped form of the same address is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(slots.try_acquire(mapped).unwrap_err(), Refusal::PerIp(2));
        let _b1 = slots.try_acquire(b).unwrap();
        let _b2 = slots.try_acquire(b).unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(slots.try_acquire(c).unwrap_err(), Refusal::Total(4));
        drop(a1);
        let _c1 = slots.try_acquire(c).unwrap();
        assert!(slots.open.lock().per_ip.len() == 3);
    }

    #[test]
    fn an_ipv6_prefix_is_one_source() {
        let slots = ConnectionSlots::new(10, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = slots.try_acquire(a).unwrap();
        let _b = slots.try_acquire(b).unwrap();
        assert_eq!(
            slots
                .try_acquire("2001:db8:1:2::77".parse().unwrap())
                .unwrap_err(),
            Refusal::PerIp(2),
            "the same /64"
        );
        let _c = slots.try_acquire(elsewhere).unwrap();
    }

    #[test]
    fn slots_come_back() {
        let slots = ConnectionSlots::new(1, 1);
        let ip: IpAddr = "::1".parse().unwrap();
        for _ in 0..3 {
            let slot = slots.try_acquire(ip).unwrap();
            assert!(slots.try_acquire(ip).is_err());
            drop(slot);
        }
        assert_eq!(slots.open.lock().total, 0);
        assert!(slots.open.lock().per_ip.is_empty());
    }
}
