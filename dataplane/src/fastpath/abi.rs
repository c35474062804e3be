//! The BPF program's map layouts (mirrored from `dataplane/bpf/fastpath.bpf.c`; change both
//! or neither) and the two entries that offload one session (sans-io).

use std::net::{IpAddr, SocketAddr};

/// `AF_INET` and `AF_INET6` as the program reads them.
const FAMILY_V4: u8 = 2;
const FAMILY_V6: u8 = 10;

/// Which datagram an entry is for: addresses and ports as they arrive (ports in network byte
/// order; an IPv4 address in the first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
pub(crate) struct Key {
    family: u8,
    pad: [u8; 3],
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// What a datagram under [`Key`] becomes, and what the kernel forwarded under it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Value {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    direction: u32,
    ifindex: u32,
    /// Set by the program (a reply entry is forwarded only once its client side matched).
    armed: u32,
    /// Datagrams the kernel forwarded under this entry.
    pub(crate) packets: u64,
    /// Their payload bytes.
    pub(crate) bytes: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the last one (0: none yet).
    pub(crate) last_ns: u64,
}

/// The program's settings: the control magic, whose datagrams always go to user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Config {
    magic_len: u32,
    magic: [u8; MAGIC_MAX],
}

/// The longest control magic the program compares.
pub(crate) const MAGIC_MAX: usize = 32;

/// What the kernel forwarded in one direction, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Counter {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

// SAFETY: plain `repr(C)` structs of integers and byte arrays with no padding the compiler
// adds (every field is aligned by the explicit `pad` fields), so any bytes are a valid value
// and the layout is the C program's.
unsafe impl aya::Pod for Key {}
// SAFETY: as for `Key`.
unsafe impl aya::Pod for Value {}
// SAFETY: as for `Key`.
unsafe impl aya::Pod for Config {}
// SAFETY: as for `Key`.
unsafe impl aya::Pod for Counter {}

/// The direction index of the program's counters and entries.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Direction {
    /// Client to backend.
    Upstream = 0,
    /// Backend to client.
    Downstream = 1,
}

impl Config {
    /// The settings for `magic`; `None` when it is longer than the program compares (then
    /// nothing can be offloaded safely).
    pub(crate) fn new(magic: &[u8]) -> Option<Self> {
        if magic.len() > MAGIC_MAX {
            return None;
        }
        let mut config = Self {
            magic_len: magic.len() as u32,
            magic: [0; MAGIC_MAX],
        };
        config.magic[..magic.len()].copy_from_slice(magic);
        Some(config)
    }
}

/// One offloaded session's way through the proxy: who talks to which address of the proxy,
/// and where each direction leaves.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Path {
    /// The client's address.
    pub(crate) client: SocketAddr,
    /// The proxy address and port the client sends to (the listener's).
    pub(crate) listener: SocketAddr,
    /// The proxy address and port the backend sees (the upstream socket's).
    pub(crate) upstream: SocketAddr,
    /// The backend's address.
    pub(crate) target: SocketAddr,
    /// The interface the route to the backend leaves by.
    pub(crate) to_target_ifindex: u32,
    /// The interface the route to the client leaves by.
    pub(crate) to_client_ifindex: u32,
}

/// The upstream and downstream entries of `path`; `None` when its addresses are not all of
/// one family (the program rewrites addresses in place).
pub(crate) fn entries(path: &Path) -> Option<[(Key, Value); 2]> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, listener, upstream, target) = (
        canonical(path.client),
        canonical(path.listener),
        canonical(path.upstream),
        canonical(path.target),
    );
    let family = family(client.ip());
    if [listener, upstream, target]
        .iter()
        .any(|a| self::family(a.ip()) != family)
    {
        return None;
    }
    let up = (
        key(family, client, listener),
        value(
            upstream,
            target,
            Direction::Upstream,
            path.to_target_ifindex,
        ),
    );
    let down = (
        key(family, target, upstream),
        value(
            listener,
            client,
            Direction::Downstream,
            path.to_client_ifindex,
        ),
    );
    Some([up, down])
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

fn bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// A port as the program reads it: in network byte order in memory.
fn wire_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn key(family: u8, from: SocketAddr, to: SocketAddr) -> Key {
    Key {
        family,
        pad: [0; 3],
        sport: wire_port(from.port()),
        dport: wire_port(to.port()),
        saddr: bytes(from.ip()),
        daddr: bytes(to.ip()),
    }
}

fn value(from: SocketAddr, to: SocketAddr, direction: Direction, ifindex: u32) -> Value {
    Value {
        saddr: bytes(from.ip()),
        daddr: bytes(to.ip()),
        sport: wire_port(from.port()),
        dport: wire_port(to.port()),
        direction: direction as u32,
        ifindex,
        ..Value::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn path(client: &str, listener: &str, upstream: &str, target: &str) -> Path {
        Path {
            client: addr(client),
            listener: addr(listener),
            upstream: addr(upstream),
            target: addr(target),
            to_target_ifindex: 7,
            to_client_ifindex: 3,
        }
    }

    /// The bytes the program reads, field by field.
    fn raw<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: `T` is one of this module's `repr(C)` structs without implicit padding;
        // reading it as bytes reads initialised memory of its size.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn the_layouts_are_the_c_programs() {
        assert_eq!(size_of::<Key>(), 40);
        assert_eq!(size_of::<Value>(), 72);
        assert_eq!(size_of::<Config>(), 36);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(std::mem::offset_of!(Value, packets), 48);
    }

    #[test]
    fn an_ipv4_session_is_rewritten_both_ways_with_ports_in_network_order() {
        let [(up_key, up), (down_key, down)] = entries(&path(
            "10.1.0.2:40000",
            "10.1.0.1:7777",
            "10.2.0.1:50000",
            "10.2.0.2:5000",
        ))
        .unwrap();
        let k = raw(&up_key);
        assert_eq!(k[0], 2, "AF_INET");
        assert_eq!(&k[4..6], &40000u16.to_be_bytes());
        assert_eq!(&k[6..8], &7777u16.to_be_bytes());
        assert_eq!(&k[8..12], &[10, 1, 0, 2]);
        assert_eq!(&k[12..24], &[0; 12]);
        assert_eq!(&k[24..28], &[10, 1, 0, 1]);
        let v = raw(&up);
        assert_eq!(
            &v[0..4],
            &[10, 2, 0, 1],
            "from the upstream socket's address"
        );
        assert_eq!(&v[16..20], &[10, 2, 0, 2], "to the backend");
        assert_eq!(&v[32..34], &50000u16.to_be_bytes());
        assert_eq!(&v[34..36], &5000u16.to_be_bytes());
        assert_eq!(up.direction, 0);
        assert_eq!(up.ifindex, 7);
        // The reply: the backend to the upstream socket becomes the listener to the client.
        assert_eq!(
            down_key,
            key(FAMILY_V4, addr("10.2.0.2:5000"), addr("10.2.0.1:50000"))
        );
        assert_eq!(
            down,
            value(
                addr("10.1.0.1:7777"),
                addr("10.1.0.2:40000"),
                Direction::Downstream,
                3
            )
        );
    }

    #[test]
    fn ipv6_and_mapped_addresses_take_their_family() {
        let [(k, v), _] = entries(&path(
            "[fd00::2]:40000",
            "[fd00::1]:7777",
            "[fd01::1]:50000",
            "[fd01::2]:5000",
        ))
        .unwrap();
        assert_eq!(k.family, FAMILY_V6);
        assert_eq!(
            k.saddr,
            "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            v.daddr,
            "fd01::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        // A client of a dual-stack listener arrives as a mapped address: on the wire it is
        // IPv4, and so is its entry.
        let [(k, _), _] = entries(&path(
            "[::ffff:10.1.0.2]:40000",
            "[::ffff:10.1.0.1]:7777",
            "10.2.0.1:50000",
            "10.2.0.2:5000",
        ))
        .unwrap();
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(&k.saddr[..4], &[10, 1, 0, 2]);
    }

    #[test]
    fn a_cross_family_session_has_no_entries() {
        assert!(
            entries(&path(
                "[fd00::2]:40000",
                "[fd00::1]:7777",
                "10.2.0.1:50000",
                "10.2.0.2:5000",
            ))
            .is_none()
        );
    }

    #[test]
    fn the_magic_fits_or_nothing_is_offloaded() {
        let c = Config::new(b"\xFF\xFF\xFF\xFFRESET").unwrap();
        assert_eq!(c.magic_len, 9);
        assert_eq!(&c.magic[..9], b"\xFF\xFF\xFF\xFFRESET");
        assert!(Config::new(&[0xAA; MAGIC_MAX + 1]).is_none());
    }
}
