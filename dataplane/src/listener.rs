//! Listeners: the listen ports of the data plane, opened, closed and drained while it runs.
//! Token ports (the config's data ports) are the first kind; forwarders and route entry points
//! will be others. Every worker holds its own `SO_REUSEPORT` socket of every listener.
//!
//! [`PortRegistry`] is the sans-io owner table behind [`crate::Controller::open_listener`]: it
//! hands out listener ids and refuses a second owner of the same (protocol, port), since
//! `SO_REUSEPORT` would otherwise silently split one port between two owners.

use std::net::SocketAddr;
use std::time::Duration;

/// A listener's id: its index in every worker's listener table, and for a token port the
/// data-port index that grants and backends use.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ListenerId(pub u16);

/// What a listener does with a new client.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ListenerKind {
    /// A token port: a token or control packet opens a session to its grant's backend;
    /// anything else goes to the default backend. RESET magic is honoured here only.
    TokenPort,
}

/// Transport of a listener.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Transport {
    /// Datagrams.
    Udp,
}

impl Transport {
    /// `udp`, as in `udp/7777`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
        }
    }
}

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

/// A listener that is open.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct OpenedListener {
    /// Its id.
    pub id: ListenerId,
    /// The bound address (the real port when asked for 0).
    pub addr: SocketAddr,
}

/// Opening a listener failed; nothing was opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another listener of this data plane holds the port.
    #[error("{transport}/{port} is already open for {holder}", transport = .transport.as_str())]
    Taken {
        /// Transport.
        transport: Transport,
        /// Port.
        port: u16,
        /// The owner that holds it.
        holder: String,
    },
    /// The socket could not be bound (another process holds the port, no such address, …).
    #[error(transparent)]
    Socket(#[from] crate::error::SocketError),
    /// Every listener id is in use.
    #[error("no free listener id ({max} listeners are open)")]
    Full {
        /// Listeners open.
        max: usize,
    },
    /// The workers are gone.
    #[error("the data plane is shutting down")]
    Stopped,
}

/// Most listeners open at once (ids are `u16`).
pub(crate) const MAX_LISTENERS: usize = 1 << 16;

/// Which ports are open and by whom.
#[derive(Debug, Default)]
pub(crate) struct PortRegistry {
    /// Indexed by listener id: (transport, bound port, owner).
    open: Vec<Option<(Transport, u16, String)>>,
}

impl PortRegistry {
    /// The owner holding (transport, port), if any.
    pub(crate) fn holder(&self, transport: Transport, port: u16) -> Option<&str> {
        self.open.iter().flatten().find_map(|(t, p, owner)| {
            (*t == transport && *p == port && port != 0).then_some(owner.as_str())
        })
    }

    /// Checks `spec` can be opened: its port is not held by another listener.
    pub(crate) fn check(&self, spec: &ListenerSpec) -> Result<(), ListenError> {
        match self.holder(spec.transport, spec.bind.port()) {
            Some(holder) => Err(ListenError::Taken {
                transport: spec.transport,
                port: spec.bind.port(),
                holder: holder.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Records an opened listener bound to `port`; returns its id (the lowest free one).
    pub(crate) fn insert(
        &mut self,
        transport: Transport,
        port: u16,
        owner: String,
    ) -> Result<ListenerId, ListenError> {
        let slot = match self.open.iter().position(Option::is_none) {
            Some(slot) => slot,
            None if self.open.len() < MAX_LISTENERS => {
                self.open.push(None);
                self.open.len() - 1
            }
            None => return Err(ListenError::Full { max: MAX_LISTENERS }),
        };
        self.open[slot] = Some((transport, port, owner));
        Ok(ListenerId(slot as u16))
    }

    /// Forgets a closed listener; its port and id can be reused.
    pub(crate) fn remove(&mut self, id: ListenerId) {
        if let Some(entry) = self.open.get_mut(usize::from(id.0)) {
            *entry = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = r
            .insert(Transport::Udp, 7777, "data port game".into())
            .unwrap();
        let b = r
            .insert(Transport::Udp, 7778, "data port voice".into())
            .unwrap();
        assert_eq!((a, b), (ListenerId(0), ListenerId(1)));
        let e = r.check(&spec(7777)).unwrap_err().to_string();
        assert_eq!(e, "udp/7777 is already open for data port game");
        r.remove(a);
        r.check(&spec(7777)).unwrap();
        assert_eq!(
            r.insert(Transport::Udp, 7777, "x".into()).unwrap(),
            ListenerId(0),
            "the lowest free id"
        );
        // Port 0 asks the kernel for a free port: never a conflict.
        r.check(&spec(0)).unwrap();
    }
}
