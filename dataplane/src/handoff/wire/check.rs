//! [`State::check`]: what a received [`State`] must satisfy before anything of it is
//! installed. The state is untrusted input (another process wrote it, the framing only bounds
//! its size): every descriptor index it names must be one that came with it, used once, and
//! every cross-reference must resolve, so installing it cannot index out of bounds, share a
//! socket between two owners, or overflow a clock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::{State, WireSession, WireTransport};

/// Longest idle timeout a listener or session may carry: the session table's own cap (a
/// forwarder may ask for up to a year).
pub const MAX_IDLE_TIMEOUT_MS: u64 = crate::policy::session::MAX_IDLE_TIMEOUT.as_millis() as u64;

/// Longest age, idle time, grant lifetime or ledger retention: no real value comes near, and
/// the new process can add any of them to its clock without overflow.
pub const MAX_ELAPSED_MS: u64 = 5 * 366 * 86_400_000;

/// Longest text (release, listener owner): these are for logs.
pub const MAX_TEXT_BYTES: usize = 1024;

/// Most data ports a grant may name: its redemptions are a bit per port in a `u64`.
pub const MAX_GRANT_PORTS: usize = 64;

/// What a descriptor index of a [`State`] is for, to name it in errors.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum DescriptorUse {
    QueryPort,
    AdminPort,
    Listener { id: u16, worker: usize },
    Pool { worker: usize, number: u32 },
}

impl std::fmt::Display for DescriptorUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueryPort => f.write_str("the query port's socket"),
            Self::AdminPort => f.write_str("the admin port's socket"),
            Self::Listener { id, worker } => write!(f, "listener {id}'s socket of worker {worker}"),
            Self::Pool { worker, number } => write!(f, "worker {worker}'s pool socket {number}"),
        }
    }
}

/// Why a [`State`] cannot be installed; each names the offending item.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("the state is for {found} workers, this process runs {expected}")]
    WorkerCount { expected: usize, found: usize },
    #[error("listener {id} ({owner}) has {found} sockets, one per worker ({expected}) expected")]
    ListenerSockets {
        id: u16,
        owner: String,
        expected: usize,
        found: usize,
    },
    #[error("listener id {id} appears twice")]
    DuplicateListener { id: u16 },
    #[error("worker {worker} lists pool socket {number} twice")]
    DuplicatePool { worker: usize, number: u32 },
    #[error("{user} is descriptor {index}, but only {count} came with the state")]
    DescriptorOutOfRange {
        user: DescriptorUse,
        index: u32,
        count: usize,
    },
    #[error("{user} is descriptor {index}, which is already {first}")]
    DescriptorReused {
        user: DescriptorUse,
        index: u32,
        first: DescriptorUse,
    },
    #[error(
        "worker {worker}: the session of {client} names listener {listener}, which is no UDP listener of the state"
    )]
    UnknownListener {
        worker: usize,
        client: SocketAddr,
        listener: u16,
    },
    #[error(
        "worker {worker}: the session of {client} names pool socket {pool}, which that worker does not have"
    )]
    UnknownPool {
        worker: usize,
        client: SocketAddr,
        pool: u32,
    },
    #[error("worker {worker}: a second session of {client} on listener {listener}")]
    DuplicateSession {
        worker: usize,
        client: SocketAddr,
        listener: u16,
    },
    // Grants and ledger entries are named by position: their tokens are secrets a player holds.
    #[error("grant {index} has the token of grant {first}")]
    DuplicateGrant { index: usize, first: usize },
    #[error("ledger entry {index} has the token of ledger entry {first}")]
    DuplicateLedgerEntry { index: usize, first: usize },
    #[error("{what} is {ms} ms, over the limit of {limit} ms")]
    Duration { what: String, ms: u64, limit: u64 },
    #[error("{what} has {len} {unit}, over the limit of {limit}")]
    TooLarge {
        what: String,
        len: usize,
        unit: &'static str,
        limit: usize,
    },
}

impl State {
    /// Refuses a state this process cannot install as it is: run by `workers` workers, with
    /// `fds` descriptors received beside it. Every listener has a socket per worker, every
    /// descriptor index is below `fds` and used at most once, every session names a UDP
    /// listener of the state and a pool socket of its own worker, ids are unique, and times and
    /// sizes are within bounds (so nothing downstream overflows or allocates without limit).
    pub fn check(&self, workers: usize, fds: usize) -> Result<(), StateError> {
        if self.workers.len() != workers {
            return Err(StateError::WorkerCount {
                expected: workers,
                found: self.workers.len(),
            });
        }
        check_text("the release", &self.release)?;
        let mut descriptors = Descriptors {
            count: fds,
            users: HashMap::new(),
        };
        if let Some(fd) = self.query_fd {
            descriptors.claim(fd, DescriptorUse::QueryPort)?;
        }
        if let Some(fd) = self.admin_fd {
            descriptors.claim(fd, DescriptorUse::AdminPort)?;
        }
        let mut listener_ids = HashSet::new();
        let mut udp_listeners = HashSet::new();
        for l in &self.listeners {
            if !listener_ids.insert(l.id) {
                return Err(StateError::DuplicateListener { id: l.id });
            }
            check_text(&format!("listener {}'s owner", l.id), &l.owner)?;
            if l.fds.len() != workers {
                return Err(StateError::ListenerSockets {
                    id: l.id,
                    owner: l.owner.clone(),
                    expected: workers,
                    found: l.fds.len(),
                });
            }
            check_ms(l.idle_timeout_ms, MAX_IDLE_TIMEOUT_MS, || {
                format!("listener {}'s idle timeout", l.id)
            })?;
            for (worker, &fd) in l.fds.iter().enumerate() {
                descriptors.claim(fd, DescriptorUse::Listener { id: l.id, worker })?;
            }
            if l.transport == WireTransport::Udp {
                udp_listeners.insert(l.id);
            }
        }
        let mut session_keys = HashSet::new();
        for (worker, w) in self.workers.iter().enumerate() {
            let mut pools = HashSet::new();
            for p in &w.pools {
                if !pools.insert(p.number) {
                    return Err(StateError::DuplicatePool {
                        worker,
                        number: p.number,
                    });
                }
                descriptors.claim(
                    p.fd,
                    DescriptorUse::Pool {
                        worker,
                        number: p.number,
                    },
                )?;
            }
            for s in &w.sessions {
                check_session(worker, s, &udp_listeners, &pools)?;
                if !session_keys.insert((s.listener, s.client)) {
                    return Err(StateError::DuplicateSession {
                        worker,
                        client: s.client,
                        listener: s.listener,
                    });
                }
            }
        }
        let mut grant_tokens = HashMap::new();
        for (index, g) in self.grants.iter().enumerate() {
            if let Some(&first) = grant_tokens.get(&g.token) {
                return Err(StateError::DuplicateGrant { index, first });
            }
            grant_tokens.insert(g.token, index);
            if g.backend.addrs.len() > MAX_GRANT_PORTS {
                return Err(StateError::TooLarge {
                    what: format!("grant {index}'s backend"),
                    len: g.backend.addrs.len(),
                    unit: "data port addresses",
                    limit: MAX_GRANT_PORTS,
                });
            }
            check_ms(g.expires_in_ms, MAX_ELAPSED_MS, || {
                format!("grant {index}'s time to expiry")
            })?;
        }
        let mut ledger_tokens = HashMap::new();
        for (index, e) in self.ledger.iter().enumerate() {
            if let Some(&first) = ledger_tokens.get(&e.token) {
                return Err(StateError::DuplicateLedgerEntry { index, first });
            }
            ledger_tokens.insert(e.token, index);
            check_ms(e.keep_ms, MAX_ELAPSED_MS, || {
                format!("ledger entry {index}'s retention")
            })?;
        }
        Ok(())
    }
}

/// The descriptor indices a state names so far, and for what.
struct Descriptors {
    count: usize,
    users: HashMap<u32, DescriptorUse>,
}

impl Descriptors {
    fn claim(&mut self, index: u32, user: DescriptorUse) -> Result<(), StateError> {
        if index as usize >= self.count {
            return Err(StateError::DescriptorOutOfRange {
                user,
                index,
                count: self.count,
            });
        }
        if let Some(&first) = self.users.get(&index) {
            return Err(StateError::DescriptorReused { user, index, first });
        }
        self.users.insert(index, user);
        Ok(())
    }
}

fn check_session(
    worker: usize,
    s: &WireSession,
    udp_listeners: &HashSet<u16>,
    pools: &HashSet<u32>,
) -> Result<(), StateError> {
    if !udp_listeners.contains(&s.listener) {
        return Err(StateError::UnknownListener {
            worker,
            client: s.client,
            listener: s.listener,
        });
    }
    if !pools.contains(&s.pool) {
        return Err(StateError::UnknownPool {
            worker,
            client: s.client,
            pool: s.pool,
        });
    }
    let what = |field: &str| format!("worker {worker}: the session of {}'s {field}", s.client);
    check_ms(s.idle_timeout_ms, MAX_IDLE_TIMEOUT_MS, || {
        what("idle timeout")
    })?;
    check_ms(s.age_ms, MAX_ELAPSED_MS, || what("age"))?;
    check_ms(s.idle_ms, MAX_ELAPSED_MS, || what("idle time"))
}

fn check_ms(ms: u64, limit: u64, what: impl FnOnce() -> String) -> Result<(), StateError> {
    if ms > limit {
        return Err(StateError::Duration {
            what: what(),
            ms,
            limit,
        });
    }
    Ok(())
}

fn check_text(what: &str, text: &str) -> Result<(), StateError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(StateError::TooLarge {
            what: what.to_owned(),
            len: text.len(),
            unit: "bytes",
            limit: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    /// Two workers; a UDP listener (descriptors 0, 1), a TCP one (2, 3), a pool socket per
    /// worker (4, 5), the query and admin ports (6, 7): 8 descriptors.
    fn state() -> State {
        let listener = |id, transport, fds| WireListener {
            id,
            owner: format!("data port {id}"),
            transport,
            addr: "0.0.0.0:7777".parse().unwrap(),
            kind: WireListenerKind::TokenPort,
            idle_timeout_ms: 30_000,
            fds,
            closing: false,
        };
        let session = WireSession {
            listener: 1,
            client: "192.0.2.1:5000".parse().unwrap(),
            reply_to: "192.0.2.1:5000".parse().unwrap(),
            local: None,
            target: "10.0.0.1:7000".parse().unwrap(),
            backend: 1,
            kind: WireSessionKind::Token,
            pool: 0,
            age_ms: 1000,
            idle_ms: 10,
            idle_timeout_ms: 30_000,
            stats: WireStats::default(),
            proxy: None,
        };
        let pool = |fd| WirePoolSocket {
            number: 0,
            port: 40_000,
            fd,
        };
        State {
            release: "1.0.0".to_owned(),
            listeners: vec![
                listener(1, WireTransport::Udp, vec![0, 1]),
                listener(2, WireTransport::Tcp, vec![2, 3]),
            ],
            workers: vec![
                WireWorker {
                    pools: vec![pool(4)],
                    sessions: vec![session],
                },
                WireWorker {
                    pools: vec![pool(5)],
                    sessions: vec![],
                },
            ],
            grants: vec![WireGrant {
                token: 7,
                backend: WireBackend {
                    id: 1,
                    addrs: vec![Some("10.0.0.1:7000".parse().unwrap())],
                    proxy: WireProxyMode::None,
                },
                expires_in_ms: 30_000,
                client: None,
                sealed: false,
                redeemed: 0,
            }],
            ledger: vec![WireLedgerEntry {
                token: 9,
                keep_ms: 60_000,
                ports: 1,
            }],
            query_fd: Some(6),
            admin_fd: Some(7),
            session_batches: 0,
            default: None,
        }
    }

    fn refused(state: &State) -> StateError {
        let err = state.check(2, 8).unwrap_err();
        assert!(!err.to_string().is_empty());
        err
    }

    #[test]
    fn sample_state_passes() {
        state().check(2, 8).unwrap();
        // More descriptors than named is not an error: the extra ones are closed.
        state().check(2, 9).unwrap();
        State {
            workers: vec![WireWorker::default()],
            ..State::default()
        }
        .check(1, 0)
        .unwrap();
    }

    #[test]
    fn refuses_another_worker_count() {
        let err = state().check(3, 8).unwrap_err();
        assert_eq!(
            err,
            StateError::WorkerCount {
                expected: 3,
                found: 2
            }
        );
    }

    #[test]
    fn refuses_a_listener_without_a_socket_per_worker() {
        let mut s = state();
        s.listeners[1].fds.pop();
        assert!(matches!(
            refused(&s),
            StateError::ListenerSockets {
                id: 2,
                found: 1,
                ..
            }
        ));
    }

    #[test]
    fn refuses_duplicate_listener_ids() {
        let mut s = state();
        s.listeners[1].id = 1;
        assert_eq!(refused(&s), StateError::DuplicateListener { id: 1 });
    }

    #[test]
    fn refuses_descriptors_out_of_range() {
        let mut s = state();
        s.admin_fd = Some(8);
        assert_eq!(
            refused(&s),
            StateError::DescriptorOutOfRange {
                user: DescriptorUse::AdminPort,
                index: 8,
                count: 8
            }
        );
        let mut s = state();
        s.workers[1].pools[0].fd = u32::MAX;
        assert!(matches!(
            refused(&s),
            StateError::DescriptorOutOfRange { .. }
        ));
    }

    #[test]
    fn refuses_a_descriptor_used_twice() {
        let mut s = state();
        s.workers[0].pools[0].fd = 1;
        assert_eq!(
            refused(&s),
            StateError::DescriptorReused {
                user: DescriptorUse::Pool {
                    worker: 0,
                    number: 0
                },
                index: 1,
                first: DescriptorUse::Listener { id: 1, worker: 1 },
            }
        );
        let mut s = state();
        s.query_fd = Some(7);
        assert!(matches!(refused(&s), StateError::DescriptorReused { .. }));
    }

    #[test]
    fn refuses_duplicate_pool_numbers() {
        let mut s = state();
        let mut again = s.workers[1].pools[0].clone();
        again.fd = 4;
        s.workers[1].pools.push(again);
        assert_eq!(
            refused(&s),
            StateError::DuplicatePool {
                worker: 1,
                number: 0
            }
        );
    }

    #[test]
    fn refuses_a_session_on_an_unknown_or_tcp_listener() {
        for listener in [2, 3] {
            let mut s = state();
            s.workers[0].sessions[0].listener = listener;
            assert!(matches!(
                refused(&s),
                StateError::UnknownListener { worker: 0, listener: l, .. } if l == listener
            ));
        }
    }

    #[test]
    fn refuses_a_session_on_another_workers_pool() {
        let mut s = state();
        s.workers[1].pools[0].number = 1;
        let mut session = s.workers[0].sessions[0].clone();
        session.pool = 1;
        s.workers[0].sessions.push(session);
        assert!(matches!(
            refused(&s),
            StateError::UnknownPool {
                worker: 0,
                pool: 1,
                ..
            }
        ));
    }

    #[test]
    fn refuses_duplicate_sessions() {
        let mut s = state();
        s.workers[1].pools[0].number = 0;
        let session = s.workers[0].sessions[0].clone();
        s.workers[1].sessions.push(session);
        assert!(matches!(
            refused(&s),
            StateError::DuplicateSession { worker: 1, .. }
        ));
    }

    #[test]
    fn refuses_times_out_of_bounds() {
        let mutations: [fn(&mut State); 6] = [
            |s| s.listeners[0].idle_timeout_ms = MAX_IDLE_TIMEOUT_MS + 1,
            |s| s.workers[0].sessions[0].idle_timeout_ms = MAX_IDLE_TIMEOUT_MS + 1,
            |s| s.workers[0].sessions[0].age_ms = u64::MAX,
            |s| s.workers[0].sessions[0].idle_ms = MAX_ELAPSED_MS + 1,
            |s| s.grants[0].expires_in_ms = u64::MAX,
            |s| s.ledger[0].keep_ms = MAX_ELAPSED_MS + 1,
        ];
        for mutate in mutations {
            let mut s = state();
            mutate(&mut s);
            assert!(matches!(refused(&s), StateError::Duration { .. }));
        }
        let mut s = state();
        s.workers[0].sessions[0].age_ms = MAX_ELAPSED_MS;
        s.check(2, 8).unwrap();
    }

    #[test]
    fn refuses_oversized_text_and_grants() {
        let mut s = state();
        s.release = "x".repeat(MAX_TEXT_BYTES + 1);
        assert!(matches!(refused(&s), StateError::TooLarge { .. }));
        let mut s = state();
        s.listeners[0].owner = "x".repeat(MAX_TEXT_BYTES + 1);
        assert!(matches!(refused(&s), StateError::TooLarge { .. }));
        let mut s = state();
        s.grants[0].backend.addrs = vec![None; MAX_GRANT_PORTS + 1];
        assert!(matches!(refused(&s), StateError::TooLarge { .. }));
    }

    #[test]
    fn refuses_duplicate_grant_and_ledger_tokens() {
        let mut s = state();
        s.grants.push(s.grants[0].clone());
        assert_eq!(
            refused(&s),
            StateError::DuplicateGrant { index: 1, first: 0 }
        );
        let mut s = state();
        s.ledger.push(s.ledger[0]);
        assert_eq!(
            refused(&s),
            StateError::DuplicateLedgerEntry { index: 1, first: 0 }
        );
    }
}
