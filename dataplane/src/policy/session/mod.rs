//! The session shard of one worker (sans-io: no syscalls, no clock reads; `now` is passed in).
//!
//! Sessions live in a slab addressed by [`SessionId`] (slot + generation, so a stale id never
//! reaches a reused slot) and are found by [`SessionKey`] through an `ahash` map. Idle expiry uses
//! [`IdleWheel`]: traffic only stores `last_active`, and a session is looked at again only when its
//! deadline comes round, so the cost of expiry does not grow with busy sessions.
//!
//! The table is generic over the upstream socket type so it can be driven in tests without I/O.

mod key;
mod timer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;

use crate::policy::grant::BackendId;
pub use key::SessionKey;
pub(crate) use timer::IdleWheel;

/// How a session came to be; also the `origin` label of `udp_director_sessions_created_total`.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum SessionKind {
    /// Opened by redeeming a token.
    Token,
    /// Opened for a client without a token, to the default backend.
    Default,
    /// Opened by a forwarder listener, to its target.
    Forwarder,
    /// Opened on a route entry point, to the endpoint its rule picked.
    Route,
}

impl SessionKind {
    /// Every kind, in metric-label order.
    pub const ALL: [Self; 4] = [Self::Token, Self::Default, Self::Forwarder, Self::Route];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Default => "default",
            Self::Forwarder => "forwarder",
            Self::Route => "route",
        }
    }
}

/// Handle of a live session: slab slot plus the slot's generation when the session was made.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct SessionId {
    slot: u32,
    generation: u32,
}

impl SessionId {
    /// The slab slot, used to derive the session's `mio::Token`.
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

/// Per-session traffic counters.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct SessionStats {
    /// Datagrams client → backend.
    pub packets_upstream: u64,
    /// Bytes client → backend.
    pub bytes_upstream: u64,
    /// Datagrams backend → client.
    pub packets_downstream: u64,
    /// Bytes backend → client.
    pub bytes_downstream: u64,
}

/// One client's session on one data port.
#[derive(Debug)]
pub struct Session<S> {
    /// Client address and listener.
    pub key: SessionKey,
    /// The client address pre-encoded for `sendmmsg`, done once per session instead of per reply.
    pub client_sockaddr: socket2::SockAddr,
    /// The session's way to its backend (a place on a shared upstream socket, or a TCP
    /// splice).
    pub upstream: S,
    /// The backend's address.
    pub target: SocketAddr,
    /// Backend identity (for load-balancing counts and removal).
    pub backend: BackendId,
    /// How the session was opened.
    pub kind: SessionKind,
    /// When it was opened.
    pub created: Instant,
    /// Last datagram in either direction.
    pub last_active: Instant,
    /// No traffic either way for this long ends the session (its listener's timeout).
    pub idle_timeout: Duration,
    /// Traffic counters.
    pub stats: SessionStats,
    /// The proxy address the client sent its first datagram to, on a wildcard-bound UDP
    /// listener: its replies leave from there.
    pub local: Option<std::net::IpAddr>,
}

struct Slot<S> {
    generation: u32,
    session: Option<Session<S>>,
    /// Its place in its listener's list (`by_listener`), while it holds a session.
    listed_at: u32,
}

/// A worker's sessions.
pub struct SessionTable<S> {
    slots: Vec<Slot<S>>,
    free: Vec<u32>,
    by_key: AHashMap<SessionKey, SessionId>,
    /// The slots of each listener's sessions (unordered), so a change to one listener touches
    /// its own sessions only, however many the others have.
    by_listener: AHashMap<u16, Vec<u32>>,
    wheel: IdleWheel,
}

impl<S> std::fmt::Debug for SessionTable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("live", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

/// Longest idle timeout a session keeps: a longer one (from a CRD or a config) is this. Far
/// beyond any game's, and far enough from `Instant`'s range that no deadline overflows.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// When a session last active at `last_active` expires; never overflows (a timeout past
/// [`MAX_IDLE_TIMEOUT`] counts as that).
#[inline]
pub fn idle_deadline(last_active: Instant, timeout: Duration) -> Instant {
    let timeout = timeout.min(MAX_IDLE_TIMEOUT);
    last_active
        .checked_add(timeout)
        .unwrap_or_else(|| last_active + Duration::from_secs(86_400))
}

impl<S> SessionTable<S> {
    /// An empty table; each session ends after its own `idle_timeout` without traffic.
    pub fn new(epoch: Instant) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: AHashMap::new(),
            by_listener: AHashMap::new(),
            wheel: IdleWheel::new(epoch),
        }
    }

    /// The slab slot the next [`Self::insert`] will use, so a session's socket can be registered
    /// under its final `mio::Token` before the session exists (and before a token is spent on it).
    pub fn next_slot(&self) -> usize {
        self.free
            .last()
            .map_or(self.slots.len(), |&slot| slot as usize)
    }

    /// The id the next [`Self::insert`] will return.
    pub fn next_id(&self) -> SessionId {
        let slot = self.next_slot();
        SessionId {
            slot: slot as u32,
            generation: self.slots.get(slot).map_or(0, |s| s.generation),
        }
    }

    /// Room for `more` sessions without growing (a hand-off installs many at once).
    pub fn reserve(&mut self, more: usize) {
        self.slots.reserve(more);
        self.by_key.reserve(more);
    }

    /// Adds a session; the caller has checked that `session.key` is not present.
    pub fn insert(&mut self, session: Session<S>) -> SessionId {
        let key = session.key;
        let deadline = idle_deadline(session.last_active, session.idle_timeout);
        let id = match self.free.pop() {
            Some(slot) => {
                let entry = &mut self.slots[slot as usize];
                entry.session = Some(session);
                SessionId {
                    slot,
                    generation: entry.generation,
                }
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 sessions");
                self.slots.push(Slot {
                    generation: 0,
                    session: Some(session),
                    listed_at: 0,
                });
                SessionId {
                    slot,
                    generation: 0,
                }
            }
        };
        self.by_key.insert(key, id);
        let listed = self.by_listener.entry(key.port).or_default();
        self.slots[id.slot as usize].listed_at = listed.len() as u32;
        listed.push(id.slot);
        self.wheel.schedule(id, deadline);
        id
    }

    /// The sessions of listener `port`, in no particular order.
    pub fn on_listener(&self, port: u16) -> Vec<SessionId> {
        self.by_listener.get(&port).map_or_else(Vec::new, |slots| {
            slots
                .iter()
                .map(|&slot| SessionId {
                    slot,
                    generation: self.slots[slot as usize].generation,
                })
                .collect()
        })
    }

    /// The session of a client on a data port.
    #[inline]
    pub fn find(&self, key: &SessionKey) -> Option<SessionId> {
        self.by_key.get(key).copied()
    }

    /// The session behind an id, if it still lives.
    #[inline]
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Session<S>> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.session.as_mut()
    }

    /// The session behind an id, if it still lives, to read.
    #[inline]
    pub fn get(&self, id: SessionId) -> Option<&Session<S>> {
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.session.as_ref()
    }

    /// The live session in a slab slot (mio tokens carry only the slot).
    #[inline]
    pub fn by_slot_mut(&mut self, slot: usize) -> Option<(SessionId, &mut Session<S>)> {
        let entry = self.slots.get_mut(slot)?;
        let id = SessionId {
            slot: slot as u32,
            generation: entry.generation,
        };
        entry.session.as_mut().map(|s| (id, s))
    }

    /// Gives a live session a new idle timeout. A shorter one is scheduled now, so it takes
    /// effect on time rather than at the deadline already in the wheel (which, when it comes,
    /// finds the session not due and schedules it once more: one extra wheel entry per
    /// shortening, for the session's life).
    pub fn set_idle_timeout(&mut self, id: SessionId, timeout: Duration) {
        let Some(session) = self.get_mut(id) else {
            return;
        };
        let shorter = timeout < session.idle_timeout;
        session.idle_timeout = timeout;
        if shorter {
            let deadline = idle_deadline(session.last_active, timeout);
            self.wheel.schedule(id, deadline);
        }
    }

    /// Removes a session and returns it (its socket is the caller's to deregister and close).
    pub fn remove(&mut self, id: SessionId) -> Option<Session<S>> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let session = slot.session.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        let at = slot.listed_at as usize;
        self.free.push(id.slot);
        self.by_key.remove(&session.key);
        if let Some(listed) = self.by_listener.get_mut(&session.key.port) {
            listed.swap_remove(at);
            if let Some(&moved) = listed.get(at) {
                self.slots[moved as usize].listed_at = at as u32;
            }
            if listed.is_empty() {
                self.by_listener.remove(&session.key.port);
            }
        }
        Some(session)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no session lives.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Iterates over live sessions.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &Session<S>)> {
        self.slots.iter().enumerate().filter_map(|(slot, entry)| {
            entry.session.as_ref().map(|s| {
                (
                    SessionId {
                        slot: slot as u32,
                        generation: entry.generation,
                    },
                    s,
                )
            })
        })
    }

    /// Removes and returns every session idle for at least its timeout at `now`. Looks only at
    /// sessions whose last scheduled deadline has come; busy ones are rescheduled, not expired.
    pub fn expire_idle(&mut self, now: Instant, expired: &mut Vec<Session<S>>) {
        self.expire_idle_refreshed(now, expired, |_| {});
    }

    /// [`Self::expire_idle`], with `refresh` given each session whose deadline has come
    /// before it is judged, to move `last_active` for traffic the table did not see (the
    /// kernel fast path's).
    pub fn expire_idle_refreshed(
        &mut self,
        now: Instant,
        expired: &mut Vec<Session<S>>,
        mut refresh: impl FnMut(&mut Session<S>),
    ) {
        let mut due = self.wheel.take_due(now);
        for id in due.drain(..) {
            let Some(session) = self.get_mut(id) else {
                continue; // removed since it was scheduled
            };
            if idle_deadline(session.last_active, session.idle_timeout) <= now {
                refresh(session);
            }
            let deadline = idle_deadline(session.last_active, session.idle_timeout);
            if deadline <= now {
                if let Some(s) = self.remove(id) {
                    expired.push(s);
                }
            } else {
                self.wheel.schedule(id, deadline);
            }
        }
        self.wheel.recycle(due);
    }

    /// How long until the idle wheel next needs a look, if any session lives.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.is_empty() {
            None
        } else {
            Some(self.wheel.until_next_tick(now))
        }
    }
}

#[cfg(test)]
mod tests;
