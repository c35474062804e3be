//! Grants: what a token opens. A grant maps each data port it covers to a backend address and can
//! be redeemed once per data port, exactly once even when several workers race on it.
//!
//! Control publishes one `Arc<Grant>` to every worker; redemption is a single atomic swap on the
//! port's flag, so no lock is taken and no worker needs to hear from another.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::metrics::TokenRejectReason;

/// A token's value: the 128 bits of its UUID.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct TokenId(pub u128);

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// Control's identity for a backend (one inventory object), used to count its sessions and to end
/// them when it leaves the inventory.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct BackendId(pub u64);

/// A backend and its address on each data port (indexed like the data plane's data ports).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Backend {
    /// Control's identity for this backend.
    pub id: BackendId,
    /// `addrs[port]` is where datagrams arriving on data port `port` go; `None`: not served.
    pub addrs: Box<[Option<SocketAddr>]>,
}

impl Backend {
    /// The backend's address for a data port, if it serves that port.
    #[inline]
    pub fn addr_for(&self, port: usize) -> Option<SocketAddr> {
        self.addrs.get(port).copied().flatten()
    }
}

/// A single-use-per-port permission to open a session to `backend`.
#[derive(Debug)]
pub struct Grant {
    /// The token that redeems this grant.
    pub token: TokenId,
    /// Where sessions opened with this grant go.
    pub backend: Backend,
    /// The grant is void from this instant on.
    pub expires_at: Instant,
    redeemed: Box<[AtomicBool]>,
}

impl Grant {
    /// A fresh grant; `backend.addrs` decides which ports it covers.
    pub fn new(token: TokenId, backend: Backend, expires_at: Instant) -> Self {
        let redeemed = backend
            .addrs
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        Self {
            token,
            backend,
            expires_at,
            redeemed,
        }
    }

    /// Whether the grant could be redeemed on `port` now, without redeeming it: the target
    /// address, or why not. A worker checks first, sets up everything a session needs (limits,
    /// socket), and only then redeems, so a session refused on the way does not spend the token.
    pub fn check(&self, port: usize, now: Instant) -> Result<SocketAddr, TokenRejectReason> {
        if now >= self.expires_at {
            return Err(TokenRejectReason::Expired);
        }
        let target = self
            .backend
            .addr_for(port)
            .ok_or(TokenRejectReason::WrongPort)?;
        if self.redeemed[port].load(Ordering::Acquire) {
            return Err(TokenRejectReason::Used);
        }
        Ok(target)
    }

    /// Redeems the grant on `port`: returns the target address the first time only.
    pub fn redeem(&self, port: usize, now: Instant) -> Result<SocketAddr, TokenRejectReason> {
        let target = self.check(port, now)?;
        // AcqRel: the winner of the swap is the only redeemer; losers see `true`.
        if self.redeemed[port].swap(true, Ordering::AcqRel) {
            return Err(TokenRejectReason::Used);
        }
        Ok(target)
    }

    /// True when no further redemption can succeed (expired, or used on every port it covers).
    pub fn is_spent(&self, now: Instant) -> bool {
        now >= self.expires_at
            || self
                .redeemed
                .iter()
                .zip(self.backend.addrs.iter())
                .all(|(used, addr)| addr.is_none() || used.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn grant(addrs: Vec<Option<SocketAddr>>, ttl: Duration) -> (Grant, Instant) {
        let now = Instant::now();
        let backend = Backend {
            id: BackendId(7),
            addrs: addrs.into(),
        };
        (Grant::new(TokenId(1), backend, now + ttl), now)
    }

    #[test]
    fn redeems_once_per_port() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:7001".parse().unwrap();
        let (g, now) = grant(vec![Some(a), Some(b), None], Duration::from_secs(30));
        assert_eq!(g.check(0, now), Ok(a));
        assert_eq!(g.check(0, now), Ok(a), "checking spends nothing");
        assert_eq!(g.redeem(0, now), Ok(a));
        assert_eq!(g.check(0, now), Err(TokenRejectReason::Used));
        assert_eq!(g.redeem(0, now), Err(TokenRejectReason::Used));
        assert!(!g.is_spent(now));
        assert_eq!(g.redeem(2, now), Err(TokenRejectReason::WrongPort));
        assert_eq!(g.redeem(9, now), Err(TokenRejectReason::WrongPort));
        assert_eq!(g.redeem(1, now), Ok(b));
        assert!(g.is_spent(now));
    }

    #[test]
    fn expired_never_redeems() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let (g, now) = grant(vec![Some(a)], Duration::from_secs(1));
        assert_eq!(
            g.redeem(0, now + Duration::from_secs(1)),
            Err(TokenRejectReason::Expired)
        );
        assert!(g.is_spent(now + Duration::from_secs(1)));
        assert!(!g.is_spent(now));
    }

    #[test]
    fn racing_threads_redeem_exactly_once() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        for _ in 0..50 {
            let (g, now) = grant(vec![Some(a)], Duration::from_secs(30));
            let g = Arc::new(g);
            let wins: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        let g = Arc::clone(&g);
                        s.spawn(move || usize::from(g.redeem(0, now).is_ok()))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1);
        }
    }
}
