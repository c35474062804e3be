//! Grants: what a token opens. A grant maps each data port it covers to a backend address and can
//! be redeemed once per data port, exactly once even when several workers race on it.
//!
//! Control publishes one `Arc<Grant>` to every worker; redemption is a single atomic swap on the
//! port's flag, so no lock is taken and no worker needs to hear from another. A sealed token's
//! grant is made by the worker that opens it; its redemptions go to the replica's
//! [`NonceLedger`], shared by every worker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use parking_lot::Mutex;

use crate::policy::proxy_protocol::ProxyMode;

/// Why a token was not redeemed.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum TokenRejectReason {
    /// No grant with this token is known (never issued, or long gone).
    Unknown,
    /// The grant's TTL passed.
    Expired,
    /// The grant was already redeemed on this data port.
    Used,
    /// The grant does not cover this data port.
    WrongPort,
    /// A sealed token that did not open: truncated, tampered with, or sealed with a key this
    /// replica does not hold.
    Invalid,
    /// The token is bound to another client address (`bindTokenToClientIp`).
    WrongClient,
}

impl TokenRejectReason {
    /// Every reason, in metric-label order.
    pub const ALL: [Self; 6] = [
        Self::Unknown,
        Self::Expired,
        Self::Used,
        Self::WrongPort,
        Self::Invalid,
        Self::WrongClient,
    ];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::WrongPort => "wrong_port",
            Self::Invalid => "invalid",
            Self::WrongClient => "wrong_client",
        }
    }
}

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
    /// PROXY protocol v2 headers to it (its mapping's `proxyProtocol`).
    pub proxy: ProxyMode,
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
    /// With `bindTokenToClientIp`: only this client address (canonical form) may redeem it.
    pub client: Option<IpAddr>,
    redeemed: Redemptions,
}

/// Where a grant's redemptions are recorded.
#[derive(Debug)]
enum Redemptions {
    /// A grant control published: one flag per data port, in the grant.
    Flags(Box<[AtomicBool]>),
    /// A sealed token's grant: the replica's ledger, keyed by the token's nonce.
    Ledger(Arc<NonceLedger>),
}

impl Grant {
    /// A fresh grant; `backend.addrs` decides which ports it covers.
    pub fn new(token: TokenId, backend: Backend, expires_at: Instant) -> Self {
        let redeemed = Redemptions::Flags(
            backend
                .addrs
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
        );
        Self {
            token,
            backend,
            expires_at,
            client: None,
            redeemed,
        }
    }

    /// The grant of an opened sealed token: its redemptions go to `ledger`.
    pub fn sealed(
        token: TokenId,
        backend: Backend,
        expires_at: Instant,
        client: Option<IpAddr>,
        ledger: Arc<NonceLedger>,
    ) -> Self {
        Self {
            token,
            backend,
            expires_at,
            client: client.map(|ip| ip.to_canonical()),
            redeemed: Redemptions::Ledger(ledger),
        }
    }

    /// A published grant taken over from the previous process (SPEC §12): `redeemed` has a
    /// bit per data port it was redeemed on there, so it stays spent on those ports here.
    pub fn handed_over(
        token: TokenId,
        backend: Backend,
        expires_at: Instant,
        client: Option<IpAddr>,
        redeemed: u64,
    ) -> Self {
        let mut grant = Self::new(token, backend, expires_at);
        grant.client = client.map(|ip| ip.to_canonical());
        if let Redemptions::Flags(flags) = &grant.redeemed {
            for (port, flag) in flags.iter().enumerate() {
                flag.store(redeemed & port_bit(port) != 0, Ordering::Release);
            }
        }
        grant
    }

    /// The data ports a published grant was redeemed on, a bit per port; `None` for a sealed
    /// token's grant, whose redemptions are in the ledger.
    pub fn redeemed_ports(&self) -> Option<u64> {
        match &self.redeemed {
            Redemptions::Flags(flags) => Some(
                flags
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.load(Ordering::Acquire))
                    .fold(0, |bits, (port, _)| bits | port_bit(port)),
            ),
            Redemptions::Ledger(_) => None,
        }
    }

    /// Binds the grant to one client address (`bindTokenToClientIp`).
    pub fn bound_to(mut self, client: IpAddr) -> Self {
        self.client = Some(client.to_canonical());
        self
    }

    /// Whether the grant could be redeemed on `port` by `client` now, without redeeming it:
    /// the target address, or why not. A worker checks first, sets up everything a session
    /// needs (limits, socket), and only then redeems, so a session refused on the way does not
    /// spend the token.
    pub fn check(
        &self,
        port: usize,
        client: IpAddr,
        now: Instant,
    ) -> Result<SocketAddr, TokenRejectReason> {
        if now >= self.expires_at {
            return Err(TokenRejectReason::Expired);
        }
        if self
            .client
            .is_some_and(|bound| bound != client.to_canonical())
        {
            return Err(TokenRejectReason::WrongClient);
        }
        let target = self
            .backend
            .addr_for(port)
            .ok_or(TokenRejectReason::WrongPort)?;
        let used = match &self.redeemed {
            Redemptions::Flags(flags) => flags[port].load(Ordering::Acquire),
            Redemptions::Ledger(ledger) => ledger.is_used(self.token, port),
        };
        if used {
            return Err(TokenRejectReason::Used);
        }
        Ok(target)
    }

    /// Redeems the grant on `port`: returns the target address the first time only.
    pub fn redeem(
        &self,
        port: usize,
        client: IpAddr,
        now: Instant,
    ) -> Result<SocketAddr, TokenRejectReason> {
        let target = self.check(port, client, now)?;
        let won = match &self.redeemed {
            // AcqRel: the winner of the swap is the only redeemer; losers see `true`.
            Redemptions::Flags(flags) => !flags[port].swap(true, Ordering::AcqRel),
            Redemptions::Ledger(ledger) => ledger.redeem(self.token, port, self.expires_at, now),
        };
        if !won {
            return Err(TokenRejectReason::Used);
        }
        Ok(target)
    }

    /// True when no further redemption can succeed (expired, or used on every port it covers).
    pub fn is_spent(&self, now: Instant) -> bool {
        if now >= self.expires_at {
            return true;
        }
        let served = self
            .backend
            .addrs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_some());
        match &self.redeemed {
            Redemptions::Flags(flags) => served
                .into_iter()
                .all(|(port, _)| flags[port].load(Ordering::Acquire)),
            Redemptions::Ledger(ledger) => served
                .into_iter()
                .all(|(port, _)| ledger.is_used(self.token, port)),
        }
    }
}

/// Number of independently locked shards of a [`NonceLedger`].
const LEDGER_SHARDS: usize = 16;

/// How long past its expiry a redeemed sealed token stays in the ledger. Expiry is read from
/// the token against the wall clock, the ledger runs on the monotonic one: if the wall clock
/// steps back after a redemption, the token opens again for that long, and the entry must
/// outlive it. Steps larger than this reopen a replay window of their size.
const LEDGER_GRACE: Duration = Duration::from_secs(120);

/// The sealed tokens this replica has redeemed, per data port, until they expire: a sealed
/// token is redeemed at most once per data port on each replica, whichever worker sees it.
///
/// Only tokens whose tag verified reach it, so its size is bounded by the tokens the replicas
/// issued within one TTL; expired entries are swept from a shard as it grows.
#[derive(Debug)]
pub struct NonceLedger {
    shards: Box<[Mutex<LedgerShard>]>,
}

#[derive(Debug, Default)]
struct LedgerShard {
    /// Token → (its expiry, a bit per data port redeemed).
    used: AHashMap<TokenId, (Instant, u64)>,
    /// The shard is swept when it grows past this.
    sweep_at: usize,
}

impl Default for NonceLedger {
    fn default() -> Self {
        Self {
            shards: (0..LEDGER_SHARDS)
                .map(|_| {
                    Mutex::new(LedgerShard {
                        used: AHashMap::new(),
                        sweep_at: 1024,
                    })
                })
                .collect(),
        }
    }
}

impl NonceLedger {
    fn shard(&self, token: TokenId) -> &Mutex<LedgerShard> {
        // The token is a random nonce: its low bits spread evenly.
        &self.shards[(token.0 as usize) % LEDGER_SHARDS]
    }

    /// Whether `token` was redeemed on `port` here.
    pub fn is_used(&self, token: TokenId, port: usize) -> bool {
        let bit = port_bit(port);
        self.shard(token)
            .lock()
            .used
            .get(&token)
            .is_some_and(|(_, ports)| ports & bit != 0)
    }

    /// Records the redemption of `token` on `port`: true the first time only.
    pub fn redeem(&self, token: TokenId, port: usize, expires_at: Instant, now: Instant) -> bool {
        let bit = port_bit(port);
        let mut shard = self.shard(token).lock();
        let entry = shard
            .used
            .entry(token)
            .or_insert((expires_at + LEDGER_GRACE, 0));
        if entry.1 & bit != 0 {
            return false;
        }
        entry.1 |= bit;
        if shard.used.len() >= shard.sweep_at {
            shard.used.retain(|_, (expires, _)| *expires > now);
            shard.sweep_at = (shard.used.len() * 2).max(1024);
        }
        true
    }

    /// Every entry still kept at `now`: (token, kept until, a bit per data port redeemed),
    /// for the hand-off to a successor.
    pub fn entries(&self, now: Instant) -> Vec<(TokenId, Instant, u64)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            all.extend(
                shard
                    .used
                    .iter()
                    .filter(|(_, (keep, _))| *keep > now)
                    .map(|(token, (keep, ports))| (*token, *keep, *ports)),
            );
        }
        all
    }

    /// Takes over an entry of the previous process's ledger: `token` stays redeemed on
    /// `ports` until `keep_until`.
    pub fn adopt(&self, token: TokenId, keep_until: Instant, ports: u64) {
        let mut shard = self.shard(token).lock();
        let entry = shard.used.entry(token).or_insert((keep_until, 0));
        entry.0 = entry.0.max(keep_until);
        entry.1 |= ports;
    }

    /// Entries held (redeemed tokens not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().used.len()).sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A data port's bit in a ledger entry; sealed tokens name at most 16 ports, indexes past 63
/// share the last bit (never reached: the data plane has far fewer ports).
fn port_bit(port: usize) -> u64 {
    1 << port.min(63)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn grant(addrs: Vec<Option<SocketAddr>>, ttl: Duration) -> (Grant, Instant) {
        let now = Instant::now();
        let backend = Backend {
            id: BackendId(7),
            addrs: addrs.into(),
            proxy: Default::default(),
        };
        (Grant::new(TokenId(1), backend, now + ttl), now)
    }

    #[test]
    fn redeems_once_per_port() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:7001".parse().unwrap();
        let (g, now) = grant(vec![Some(a), Some(b), None], Duration::from_secs(30));
        assert_eq!(g.check(0, C, now), Ok(a));
        assert_eq!(g.check(0, C, now), Ok(a), "checking spends nothing");
        assert_eq!(g.redeem(0, C, now), Ok(a));
        assert_eq!(g.check(0, C, now), Err(TokenRejectReason::Used));
        assert_eq!(g.redeem(0, C, now), Err(TokenRejectReason::Used));
        assert!(!g.is_spent(now));
        assert_eq!(g.redeem(2, C, now), Err(TokenRejectReason::WrongPort));
        assert_eq!(g.redeem(9, C, now), Err(TokenRejectReason::WrongPort));
        assert_eq!(g.redeem(1, C, now), Ok(b));
        assert!(g.is_spent(now));
    }

    #[test]
    fn expired_never_redeems() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let (g, now) = grant(vec![Some(a)], Duration::from_secs(1));
        assert_eq!(
            g.redeem(0, C, now + Duration::from_secs(1)),
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
                        s.spawn(move || usize::from(g.redeem(0, C, now).is_ok()))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1);
        }
    }

    #[test]
    fn a_bound_grant_redeems_only_for_its_client_in_either_address_form() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let (g, now) = grant(vec![Some(a)], Duration::from_secs(30));
        let g = g.bound_to("::ffff:192.0.2.1".parse().unwrap());
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(g.redeem(0, other, now), Err(TokenRejectReason::WrongClient));
        assert_eq!(g.redeem(0, C, now), Ok(a));
    }

    #[test]
    fn sealed_grants_share_the_ledger_once_per_port_and_racing_threads_win_once() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let now = Instant::now();
        let ledger = Arc::new(NonceLedger::default());
        let backend = Backend {
            id: BackendId(7),
            addrs: vec![Some(a), Some(a)].into(),
            proxy: Default::default(),
        };
        let make = || {
            Arc::new(Grant::sealed(
                TokenId(99),
                backend.clone(),
                now + Duration::from_secs(30),
                None,
                Arc::clone(&ledger),
            ))
        };
        // Two workers each opened the same token: one grant object each.
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let g = make();
                    s.spawn(move || usize::from(g.redeem(0, C, now).is_ok()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        let g = make();
        assert_eq!(g.check(0, C, now), Err(TokenRejectReason::Used));
        assert!(!g.is_spent(now));
        assert_eq!(g.redeem(1, C, now), Ok(a), "the other port is still open");
        assert!(g.is_spent(now));
        assert_eq!(ledger.len(), 1);
    }

    #[test]
    fn the_ledger_sweeps_expired_tokens_as_it_grows() {
        let ledger = NonceLedger::default();
        let now = Instant::now();
        for i in 0..100_000u128 {
            assert!(ledger.redeem(TokenId(i), 0, now + Duration::from_secs(1), now));
        }
        let later = now + LEDGER_GRACE + Duration::from_secs(2);
        for i in 100_000..200_000u128 {
            assert!(ledger.redeem(TokenId(i), 0, later + Duration::from_secs(1), later));
        }
        assert!(
            ledger.len() < 110_000,
            "expired tokens were kept: {}",
            ledger.len()
        );
    }
}
