//! Which of this host's addresses and interfaces the route to a peer uses: the source address
//! the backend sees (a wildcard-bound upstream socket leaves from the route's preferred
//! source) and the interface the program redirects to. Read once per peer address and kept a
//! while, not once per session.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::io::own_addrs::{InterfaceAddr, interfaces};

/// How long a route read is trusted.
const TTL: Duration = Duration::from_secs(30);
/// Peers remembered at most (then forgotten all at once: a cache, not a table).
const MAX_PEERS: usize = 4096;

/// The route to one peer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Route {
    /// The source address the kernel picks for it.
    pub(crate) source: IpAddr,
    /// The interface holding that address (where the route leaves).
    pub(crate) ifindex: u32,
}

/// Why a peer has no route the program can use.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    /// No route, or no socket to ask with.
    #[error("no route: {0}")]
    Io(#[from] io::Error),
    /// The route leaves by a loopback interface, or by one whose address is not on any
    /// interface (the program can only redirect to an interface).
    #[error("the route's source {0} is not on a non-loopback interface")]
    NoInterface(IpAddr),
    /// The peer is this host (one of its own addresses): nothing to forward to.
    #[error("{0} is this host")]
    Local(IpAddr),
}

/// A worker's routes, by peer address.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    peers: HashMap<IpAddr, (Instant, Route)>,
    interfaces: Option<(Instant, Vec<InterfaceAddr>)>,
}

impl Routes {
    /// The route to `peer`, from the cache when it is fresh.
    pub(crate) fn to(&mut self, peer: IpAddr, now: Instant) -> Result<Route, RouteError> {
        let peer = peer.to_canonical();
        if let Some((at, route)) = self.peers.get(&peer)
            && now.saturating_duration_since(*at) < TTL
        {
            return Ok(*route);
        }
        let source = source_for(peer)?;
        // A peer on one of this host's addresses is reached through the local stack (a game
        // server on the node's address, behind a hostPort DNAT), never out of an interface.
        if source == peer {
            return Err(RouteError::Local(peer));
        }
        let ifindex = self.interface_of(source, now)?;
        let route = Route { source, ifindex };
        if self.peers.len() >= MAX_PEERS {
            self.peers.clear();
        }
        self.peers.insert(peer, (now, route));
        Ok(route)
    }

    fn interface_of(&mut self, source: IpAddr, now: Instant) -> Result<u32, RouteError> {
        let fresh = self
            .interfaces
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < TTL);
        if !fresh {
            self.interfaces = Some((now, interfaces()?));
        }
        self.interfaces
            .as_ref()
            .and_then(|(_, all)| all.iter().find(|i| i.ip == source))
            .filter(|i| !i.loopback && i.index != 0)
            .map(|i| i.index)
            .ok_or(RouteError::NoInterface(source))
    }
}

/// The source address the kernel picks for datagrams to `peer`: a connected UDP socket's own
/// address (connecting a UDP socket sends nothing).
fn source_for(peer: IpAddr) -> io::Result<IpAddr> {
    let any = if peer.is_ipv4() {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let probe = UdpSocket::bind(any)?;
    probe.connect(SocketAddr::new(peer, 9))?;
    Ok(probe.local_addr()?.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_peer_is_never_redirected() {
        let mut routes = Routes::default();
        let e = routes
            .to("127.0.0.1".parse().unwrap(), Instant::now())
            .unwrap_err();
        // Its source is itself (local); either way nothing is offloaded.
        assert!(
            matches!(e, RouteError::Local(_) | RouteError::NoInterface(_)),
            "{e}"
        );
    }

    #[test]
    fn a_peer_on_one_of_this_hosts_addresses_is_local() {
        let mut routes = Routes::default();
        let own = crate::io::own_addrs::interfaces()
            .unwrap()
            .into_iter()
            .find(|i| !i.loopback && i.ip.is_ipv4())
            .map(|i| i.ip);
        let Some(own) = own else {
            return; // a host with loopback only: nothing to check
        };
        let e = routes.to(own, Instant::now()).unwrap_err();
        assert!(matches!(e, RouteError::Local(_)), "{e}");
    }
}
