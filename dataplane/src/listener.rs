//! Listeners: the listen ports of the data plane, opened, closed and drained while it runs.
//! Token ports (the config's data ports) are the first kind; forwarders and route entry points
//! will be others. Every worker holds its own `SO_REUSEPORT` socket of every listener.
//!
//! [`PortRegistry`] is the sans-io owner table behind [`crate::Controller::open_listener`]: it
//! hands out listener ids and refuses a second owner of the same (protocol, port), since
//! `SO_REUSEPORT` would otherwise silently split one port between two owners.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::error::ListenError;
pub use crate::transport::Transport;

/// A listener's id: its index in every worker's listener table, and for a token port the
/// data-port index that grants and backends use.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ListenerId(pub u16);

/// What a listener does with a new client.
#[derive(Clone, Debug)]
pub enum ListenerKind {
    /// A token port: a token or control packet opens a session to its grant's backend;
    /// anything else goes to the default backend. RESET magic is honoured here only.
    TokenPort,
    /// A forwarder: every new client gets a session to `target`, and its first datagram (or
    /// every byte of its connection) is forwarded. Updating the target moves the listener's UDP
    /// sessions at once; TCP connections keep the target they were opened to.
    Forward {
        /// Where its sessions go.
        target: SocketAddr,
        /// Control's identity for the forwarder, as its sessions report it.
        backend: crate::policy::grant::BackendId,
        /// PROXY protocol v2 headers to the target.
        proxy: crate::policy::proxy_protocol::ProxyMode,
    },
    /// A route entry point: each new client (UDP) or connection (TCP) is matched against the
    /// table's rules and given an endpoint it keeps. A new table re-homes the UDP sessions whose
    /// endpoint it no longer lists; TCP connections keep theirs.
    Route {
        /// The compiled rules.
        table: std::sync::Arc<crate::policy::route::RouteTable>,
    },
}

impl PartialEq for ListenerKind {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::TokenPort, Self::TokenPort) => true,
            (
                Self::Forward {
                    target,
                    backend,
                    proxy,
                },
                Self::Forward {
                    target: t,
                    backend: b,
                    proxy: p,
                },
            ) => target == t && backend == b && proxy == p,
            (Self::Route { table }, Self::Route { table: t }) => std::sync::Arc::ptr_eq(table, t),
            _ => false,
        }
    }
}

impl Eq for ListenerKind {}

/// A listener to open.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    /// Who owns it, for conflict messages (`data port game`, `forwarder games/gs-1`).
    pub owner: String,
    /// Address to bind; port 0 picks one port shared by every worker.
    pub bind: SocketAddr,
    /// Transport.
    pub transport: Transport,
    /// What it does.
    pub kind: ListenerKind,
    /// Its sessions end after this long without traffic in either direction.
    pub idle_timeout: Duration,
}

/// How a listener is closed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CloseMode {
    /// Close now: its sessions end.
    End,
    /// Take no new sessions; close once its last session has ended.
    Drain,
}

/// A listener that is open: the handle to close it with.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct OpenedListener {
    /// Its id.
    pub id: ListenerId,
    /// The bound address (the real port when asked for 0).
    pub addr: SocketAddr,
    /// Tells this listener from a later one that reuses its id: a stale handle closes nothing.
    pub generation: u64,
}

/// Most listeners open at once (ids are `u16`).
pub(crate) const MAX_LISTENERS: usize = 1 << 16;

/// Which ports are open and by whom.
#[derive(Debug, Default)]
pub(crate) struct PortRegistry {
    /// Indexed by listener id.
    open: Vec<Option<Entry>>,
    /// The listener holding each (transport, port), so a check costs the same with 10 or
    /// 10,000 listeners open.
    by_port: ahash::AHashMap<(Transport, u16), u16>,
    /// Ids below `open.len()` that are free, lowest first.
    free: std::collections::BinaryHeap<std::cmp::Reverse<u16>>,
    /// Stamps each opened listener, so a late message about a closed one never touches a
    /// listener that reused its id.
    next_generation: u64,
}

#[derive(Debug)]
struct Entry {
    transport: Transport,
    port: u16,
    /// The address its sockets are bound to.
    ip: std::net::IpAddr,
    owner: String,
    generation: u64,
    /// A close was asked; the port stays held until every worker has let go of it.
    closing: bool,
    counters: std::sync::Arc<crate::metrics::ListenerCounters>,
    /// Its sockets' descriptors, given back when every worker has let go of it.
    _lease: crate::io::fd_budget::FdLease,
    /// Taken over from the previous process (SPEC §12) and not yet claimed by this one's
    /// config or reconcilers.
    handed_over: bool,
}

impl PortRegistry {
    /// The owner holding (transport, port), if any (a closing listener still holds it).
    pub(crate) fn holder(&self, transport: Transport, port: u16) -> Option<String> {
        self.holder_bound(transport, port).map(|(holder, _)| holder)
    }

    /// The owner holding (transport, port), and the address it is bound to.
    pub(crate) fn holder_bound(
        &self,
        transport: Transport,
        port: u16,
    ) -> Option<(String, std::net::IpAddr)> {
        let id = *self.by_port.get(&(transport, port))?;
        let e = self.open.get(usize::from(id))?.as_ref()?;
        let holder = if e.closing {
            format!("{} (closing)", e.owner)
        } else {
            e.owner.clone()
        };
        Some((holder, e.ip))
    }

    /// Checks `spec` can be opened: its port is not held by another listener.
    pub(crate) fn check(&self, spec: &ListenerSpec) -> Result<(), ListenError> {
        match self.holder(spec.transport, spec.bind.port()) {
            Some(holder) => Err(ListenError::Taken {
                transport: spec.transport,
                port: spec.bind.port(),
                holder,
            }),
            None => Ok(()),
        }
    }

    /// Records an opened listener bound to `port`; returns its id (the lowest free one) and
    /// generation.
    pub(crate) fn insert(
        &mut self,
        transport: Transport,
        bound: SocketAddr,
        owner: String,
        counters: std::sync::Arc<crate::metrics::ListenerCounters>,
        lease: crate::io::fd_budget::FdLease,
    ) -> Result<(ListenerId, u64), ListenError> {
        let port = bound.port();
        let slot = match self.free.pop() {
            Some(std::cmp::Reverse(slot)) => usize::from(slot),
            None if self.open.len() < MAX_LISTENERS => {
                self.open.push(None);
                self.open.len() - 1
            }
            None => return Err(ListenError::Full { max: MAX_LISTENERS }),
        };
        if port != 0 {
            self.by_port.insert((transport, port), slot as u16);
        }
        self.next_generation += 1;
        self.open[slot] = Some(Entry {
            transport,
            port,
            ip: bound.ip(),
            owner,
            generation: self.next_generation,
            closing: false,
            counters,
            _lease: lease,
            handed_over: false,
        });
        Ok((ListenerId(slot as u16), self.next_generation))
    }

    /// Records a listener taken over from the previous process under the id it had there,
    /// until this process's config or a reconciler claims it ([`Self::claimable`]).
    pub(crate) fn adopt(
        &mut self,
        id: ListenerId,
        transport: Transport,
        bound: SocketAddr,
        owner: String,
        counters: std::sync::Arc<crate::metrics::ListenerCounters>,
        lease: crate::io::fd_budget::FdLease,
    ) -> Result<u64, ListenError> {
        let slot = usize::from(id.0);
        if self.open.get(slot).is_some_and(Option::is_some)
            || self.by_port.contains_key(&(transport, bound.port()))
            || bound.port() == 0
        {
            return Err(ListenError::Taken {
                transport,
                port: bound.port(),
                holder: "another handed-over listener".into(),
            });
        }
        while self.open.len() <= slot {
            let gap = self.open.len();
            self.open.push(None);
            if gap != slot {
                self.free.push(std::cmp::Reverse(gap as u16));
            }
        }
        // The slot may have been a gap left by an earlier adoption.
        self.free
            .retain(|std::cmp::Reverse(free)| usize::from(*free) != slot);
        self.by_port.insert((transport, bound.port()), id.0);
        self.next_generation += 1;
        self.open[slot] = Some(Entry {
            transport,
            port: bound.port(),
            ip: bound.ip(),
            owner: format!("{owner} (handed over)"),
            generation: self.next_generation,
            closing: false,
            counters,
            _lease: lease,
            handed_over: true,
        });
        Ok(self.next_generation)
    }

    /// The handed-over listener `spec` takes over instead of binding: same protocol, port
    /// and address, not closing. Its id, address and generation.
    pub(crate) fn claimable(&self, spec: &ListenerSpec) -> Option<OpenedListener> {
        let id = *self.by_port.get(&(spec.transport, spec.bind.port()))?;
        let e = self.open.get(usize::from(id))?.as_ref()?;
        (e.handed_over && !e.closing && e.ip == spec.bind.ip()).then(|| OpenedListener {
            id: ListenerId(id),
            addr: SocketAddr::new(e.ip, e.port),
            generation: e.generation,
        })
    }

    /// `owner` has claimed handed-over listener `id`: it is an ordinary listener from now on.
    pub(crate) fn claim(&mut self, id: ListenerId, owner: String) {
        if let Some(e) = self
            .open
            .get_mut(usize::from(id.0))
            .and_then(Option::as_mut)
        {
            e.owner = owner;
            e.handed_over = false;
        }
    }

    /// The handed-over listeners nothing has claimed.
    pub(crate) fn unclaimed(&self) -> Vec<OpenedListener> {
        self.open
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                let e = e.as_ref()?;
                (e.handed_over && !e.closing).then(|| OpenedListener {
                    id: ListenerId(slot as u16),
                    addr: SocketAddr::new(e.ip, e.port),
                    generation: e.generation,
                })
            })
            .collect()
    }

    /// The owner of each open or closing listener, by id.
    pub(crate) fn owners(&self) -> Vec<(ListenerId, String)> {
        self.open
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| Some((ListenerId(slot as u16), e.as_ref()?.owner.clone())))
            .collect()
    }

    /// Whether this listener (id and generation) is open and not closing.
    pub(crate) fn is_open(&self, id: ListenerId, generation: u64) -> bool {
        self.open
            .get(usize::from(id.0))
            .and_then(Option::as_ref)
            .is_some_and(|e| e.generation == generation && !e.closing)
    }

    /// The counters of this listener (id and generation), while it is registered.
    pub(crate) fn counters(
        &self,
        id: ListenerId,
        generation: u64,
    ) -> Option<std::sync::Arc<crate::metrics::ListenerCounters>> {
        self.open
            .get(usize::from(id.0))
            .and_then(Option::as_ref)
            .filter(|e| e.generation == generation)
            .map(|e| std::sync::Arc::clone(&e.counters))
    }

    /// Marks an open listener as closing; false when that listener is not open (closed, or
    /// closing already, or its id now belongs to a later one): such a close does nothing.
    pub(crate) fn begin_close(&mut self, id: ListenerId, generation: u64) -> bool {
        let Some(entry) = self
            .open
            .get_mut(usize::from(id.0))
            .and_then(Option::as_mut)
        else {
            return false;
        };
        if entry.closing || entry.generation != generation {
            return false;
        }
        entry.closing = true;
        true
    }

    /// Forgets a closed listener, if the entry is still that one; its port and id can be
    /// reused.
    pub(crate) fn finish_close(&mut self, id: ListenerId, generation: u64) {
        if let Some(slot) = self.open.get_mut(usize::from(id.0))
            && let Some(entry) = slot.take_if(|e| e.generation == generation)
        {
            if self.by_port.get(&(entry.transport, entry.port)) == Some(&id.0) {
                self.by_port.remove(&(entry.transport, entry.port));
            }
            self.free.push(std::cmp::Reverse(id.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> std::sync::Arc<crate::metrics::ListenerCounters> {
        std::sync::Arc::new(crate::metrics::ListenerCounters::new(1))
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn lease() -> crate::io::fd_budget::FdLease {
        crate::io::fd_budget::FdBudget::with_limit(0, Box::new(|| 100))
            .try_take(1)
            .unwrap()
    }

    fn spec(port: u16) -> ListenerSpec {
        ListenerSpec {
            owner: format!("test {port}"),
            bind: SocketAddr::from(([127, 0, 0, 1], port)),
            transport: Transport::Udp,
            kind: ListenerKind::TokenPort,
            idle_timeout: Duration::from_secs(300),
        }
    }

    #[test]
    fn one_owner_per_port_and_ids_are_reused() {
        let mut r = PortRegistry::default();
        r.check(&spec(7777)).unwrap();
        let (a, generation) = r
            .insert(
                Transport::Udp,
                at(7777),
                "data port game".into(),
                counters(),
                lease(),
            )
            .unwrap();
        let (b, _) = r
            .insert(
                Transport::Udp,
                at(7778),
                "data port voice".into(),
                counters(),
                lease(),
            )
            .unwrap();
        assert_eq!((a, b), (ListenerId(0), ListenerId(1)));
        let e = r.check(&spec(7777)).unwrap_err().to_string();
        assert_eq!(e, "udp/7777 is already open for data port game");
        assert!(r.begin_close(a, generation));
        assert!(!r.begin_close(a, generation), "a second close does nothing");
        let e = r.check(&spec(7777)).unwrap_err().to_string();
        assert_eq!(e, "udp/7777 is already open for data port game (closing)");
        r.finish_close(a, generation);
        r.check(&spec(7777)).unwrap();
        let (again, new_generation) = r
            .insert(Transport::Udp, at(7777), "x".into(), counters(), lease())
            .unwrap();
        assert_eq!(again, ListenerId(0), "the lowest free id");
        // A late finish, or a stale close, of the old listener leaves the new one alone.
        r.finish_close(a, generation);
        assert!(!r.begin_close(a, generation));
        assert!(r.check(&spec(7777)).is_err());
        assert!(r.begin_close(again, new_generation));
        assert!(!r.begin_close(ListenerId(9), 1), "never opened");
        // Port 0 asks the kernel for a free port: never a conflict.
        r.check(&spec(0)).unwrap();
    }
}
