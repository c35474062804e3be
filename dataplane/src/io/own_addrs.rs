//! What the proxy's own traffic looks like from outside, so that it never proxies to itself:
//! the host's addresses (a target there on a port one of our listeners holds is a loop, refused
//! when a forwarder or route is planned), and the local ports of our shared upstream sockets (a
//! datagram from one of them arriving on a listener is our own, looped back by some chain the
//! planner could not see: dropped and counted as `loop`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a read of the host's addresses is trusted.
const ADDRS_TTL: Duration = Duration::from_secs(5);

/// The host's interface addresses, read again at most every [`ADDRS_TTL`].
#[derive(Debug, Default)]
pub(crate) struct HostAddrs {
    cached: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

impl HostAddrs {
    /// Whether traffic sent to `ip` stays on this host: loopback, a wildcard (which the kernel
    /// takes as this host), or one of its interfaces' addresses.
    pub(crate) fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let mut cached = self.cached.lock();
        let now = Instant::now();
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < ADDRS_TTL);
        if !fresh {
            match interface_addresses() {
                Ok(addrs) => *cached = Some((now, addrs)),
                Err(e) => log::debug!("cannot read the host's addresses: {e}"),
            }
        }
        cached
            .as_ref()
            .is_some_and(|(_, addrs)| addrs.contains(&ip))
    }
}

/// The addresses of this host's interfaces (`getifaddrs`).
pub(crate) fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    Ok(interfaces()?.into_iter().map(|i| i.ip).collect())
}

/// One address of one of this host's interfaces.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(crate) struct InterfaceAddr {
    /// The interface's name.
    pub(crate) name: String,
    /// Its index (0 when it could not be read).
    pub(crate) index: u32,
    /// Whether it is a loopback interface.
    pub(crate) loopback: bool,
    /// The address.
    pub(crate) ip: IpAddr,
}

/// Every IPv4 and IPv6 address of this host's interfaces, with the interface (`getifaddrs`).
pub(crate) fn interfaces() -> io::Result<Vec<InterfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `getifaddrs` writes a list head into the valid `head`; on success the list is
    // ours until `freeifaddrs`.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list `getifaddrs` returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null `ifa_addr` points to a `sockaddr` whose family says its type.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let ip = if family == libc::AF_INET {
            // SAFETY: an `AF_INET` address is a `sockaddr_in`.
            let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
        } else if family == libc::AF_INET6 {
            // SAFETY: an `AF_INET6` address is a `sockaddr_in6`.
            let sin6 = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in6>() };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        } else {
            continue;
        };
        // SAFETY: `ifa_name` is a NUL-terminated string of the list, not yet freed.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        // SAFETY: `if_nametoindex` reads the NUL-terminated `name`.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        found.push(InterfaceAddr {
            name: name.to_string_lossy().into_owned(),
            index,
            loopback: entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
            ip,
        });
    }
    // SAFETY: `head` came from a successful `getifaddrs` and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// The local ports our shared upstream sockets are bound to, per address family (each socket
/// has a port of its own in its family), shared by every worker.
pub(crate) struct OwnPorts {
    /// IPv4 and IPv6, indexed by port.
    held: [Box<[AtomicBool]>; 2],
}

impl std::fmt::Debug for OwnPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnPorts").finish_non_exhaustive()
    }
}

impl Default for OwnPorts {
    fn default() -> Self {
        let table = || (0..=u16::MAX).map(|_| AtomicBool::new(false)).collect();
        Self {
            held: [table(), table()],
        }
    }
}

impl OwnPorts {
    /// An upstream socket of the family (`ipv6`) was bound to `port`.
    pub(crate) fn add(&self, ipv6: bool, port: u16) {
        self.held[usize::from(ipv6)][usize::from(port)].store(true, Ordering::Relaxed);
    }

    /// The upstream socket of the family bound to `port` was closed.
    pub(crate) fn remove(&self, ipv6: bool, port: u16) {
        self.held[usize::from(ipv6)][usize::from(port)].store(false, Ordering::Relaxed);
    }

    /// Whether a datagram from `from_ip:from_port`, sent to our address `to`, came from one
    /// of our own upstream sockets: from a port one of them holds in that family, and from this
    /// host (the kernel gives a datagram to a local address the source address it was sent
    /// to, or loopback's).
    #[inline]
    pub(crate) fn is_own(&self, from_ip: IpAddr, from_port: u16, to: IpAddr) -> bool {
        let from_ip = from_ip.to_canonical();
        self.held[usize::from(from_ip.is_ipv6())][usize::from(from_port)].load(Ordering::Relaxed)
            && (from_ip == to.to_canonical() || from_ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_wildcards_and_the_interfaces_addresses_are_local() {
        let host = HostAddrs::default();
        assert!(host.is_local("127.0.0.1".parse().unwrap()));
        assert!(host.is_local("127.9.9.9".parse().unwrap()));
        assert!(host.is_local("::1".parse().unwrap()));
        assert!(host.is_local("0.0.0.0".parse().unwrap()));
        assert!(host.is_local("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!host.is_local("192.0.2.7".parse().unwrap()), "TEST-NET-1");
        let all = interface_addresses().unwrap();
        assert!(all.iter().any(IpAddr::is_loopback), "{all:?}");
        for ip in all {
            assert!(host.is_local(ip), "{ip}");
        }
    }

    #[test]
    fn a_datagram_from_our_own_upstream_port_on_this_host_is_ours() {
        let own = OwnPorts::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let node: IpAddr = "10.0.0.5".parse().unwrap();
        let player: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(!own.is_own(lo, 40000, lo));
        own.add(false, 40000);
        assert!(own.is_own(lo, 40000, lo));
        assert!(
            own.is_own("::ffff:127.0.0.1".parse().unwrap(), 40000, lo6),
            "an IPv4 source on a dual-stack listener"
        );
        assert!(
            own.is_own(node, 40000, node),
            "sent to the node's own address"
        );
        assert!(
            !own.is_own(player, 40000, node),
            "a player that happens to use the same port is not us"
        );
        assert!(
            !own.is_own(lo6, 40000, lo6),
            "an IPv6 client on a port only our IPv4 socket holds is not us"
        );
        own.add(true, 40000);
        assert!(own.is_own(lo6, 40000, lo6));
        own.remove(false, 40000);
        assert!(!own.is_own(lo, 40000, lo));
        assert!(
            own.is_own(lo6, 40000, lo6),
            "the other family's socket still holds it"
        );
    }
}
