//! PROXY protocol v2 headers to backends (sans-io): the client's address and the proxy address
//! it sent to, so a game server behind the proxy sees who its player is.
//!
//! A header is built once per session (per upstream path: a session moved to another backend
//! starts a new one) and copied in front of the datagrams that carry it; nothing is encoded
//! per datagram.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The v2 signature every header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// The longest header this proxy builds: signature, version/command, family, length, and two
/// IPv6 addresses with their ports.
pub const MAX_HEADER_LEN: usize = 16 + 36;

/// Which datagrams of a session carry a header (`proxyProtocol`).
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
pub enum ProxyMode {
    /// No header.
    #[default]
    None,
    /// On every UDP datagram (as DNS servers expect); once at TCP connection start.
    V2,
    /// On the first UDP datagram of a session only; once at TCP connection start.
    V2First,
}

impl ProxyMode {
    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::V2 => "v2",
            Self::V2First => "v2-first",
        }
    }
}

/// The transport a header describes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum HeaderTransport {
    /// `STREAM` (TCP).
    Stream,
    /// `DGRAM` (UDP).
    Dgram,
}

/// A built header, kept inline (no allocation).
#[derive(Clone, Copy, Eq, PartialEq)]
pub struct ProxyHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl std::fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ProxyHeader")
            .field(&parse(self.as_bytes()))
            .finish()
    }
}

impl ProxyHeader {
    /// No header (zero bytes).
    pub const EMPTY: Self = Self {
        bytes: [0; MAX_HEADER_LEN],
        len: 0,
    };

    /// The header for traffic from `client` to the proxy address `proxy`. IPv4-mapped
    /// addresses count as IPv4; a pair of mixed families is written as IPv6.
    pub fn new(transport: HeaderTransport, client: SocketAddr, proxy: SocketAddr) -> Self {
        let (src, dst) = (client.ip().to_canonical(), proxy.ip().to_canonical());
        let (family, addrs): (u8, Vec<u8>) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (0x10, [s.octets(), d.octets()].concat()),
            _ => (0x20, [v6(src).octets(), v6(dst).octets()].concat()),
        };
        let protocol = match transport {
            HeaderTransport::Stream => 0x01,
            HeaderTransport::Dgram => 0x02,
        };
        let body_len = addrs.len() + 4;
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[..12].copy_from_slice(&SIGNATURE);
        bytes[12] = VERSION_PROXY;
        bytes[13] = family | protocol;
        bytes[14..16].copy_from_slice(&(body_len as u16).to_be_bytes());
        let mut at = 16;
        bytes[at..at + addrs.len()].copy_from_slice(&addrs);
        at += addrs.len();
        bytes[at..at + 2].copy_from_slice(&client.port().to_be_bytes());
        bytes[at + 2..at + 4].copy_from_slice(&proxy.port().to_be_bytes());
        Self {
            bytes,
            len: (16 + body_len) as u8,
        }
    }

    /// The header's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A parsed v2 header: what a backend reads.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Parsed {
    /// Header length; the payload starts after it.
    pub len: usize,
    /// `STREAM` or `DGRAM`; `None` for `LOCAL` or an unspecified protocol.
    pub transport: Option<HeaderTransport>,
    /// Source (the client) and destination (the proxy), for the INET families.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Parses a v2 header at the start of `bytes` (for tests, tools and fuzzing; the proxy itself
/// only writes headers). `None` if it is not a complete, well-formed v2 header.
pub fn parse(bytes: &[u8]) -> Option<Parsed> {
    if bytes.len() < 16 || bytes[..12] != SIGNATURE || bytes[12] >> 4 != 2 {
        return None;
    }
    let body_len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let body = bytes.get(16..16 + body_len)?;
    let transport = match bytes[13] & 0x0F {
        0x01 => Some(HeaderTransport::Stream),
        0x02 => Some(HeaderTransport::Dgram),
        _ => None,
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let addrs = match (bytes[12] & 0x0F, bytes[13] >> 4) {
        (0x01, 0x01) if body.len() >= 12 => {
            let mut ips = [[0u8; 4]; 2];
            ips[0].copy_from_slice(&body[0..4]);
            ips[1].copy_from_slice(&body[4..8]);
            Some((
                SocketAddr::new(IpAddr::from(ips[0]), port(8)),
                SocketAddr::new(IpAddr::from(ips[1]), port(10)),
            ))
        }
        (0x01, 0x02) if body.len() >= 36 => {
            let mut ips = [[0u8; 16]; 2];
            ips[0].copy_from_slice(&body[0..16]);
            ips[1].copy_from_slice(&body[16..32]);
            Some((
                SocketAddr::new(IpAddr::from(ips[0]), port(32)),
                SocketAddr::new(IpAddr::from(ips[1]), port(34)),
            ))
        }
        _ => None,
    };
    Some(Parsed {
        len: 16 + body_len,
        transport,
        addrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_dgram_header_bytes_are_the_spec_example() {
        let h = ProxyHeader::new(
            HeaderTransport::Dgram,
            "203.0.113.7:40000".parse().unwrap(),
            "198.51.100.1:7777".parse().unwrap(),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x12, 0, 12]);
        want.extend_from_slice(&[203, 0, 113, 7, 198, 51, 100, 1]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&7777u16.to_be_bytes());
        assert_eq!(h.as_bytes(), &want[..]);
    }

    #[test]
    fn round_trips_for_both_families_and_transports() {
        let cases = [
            ("10.0.0.1:1", "10.0.0.2:2", 28),
            ("[2001:db8::1]:1000", "[2001:db8::2]:7777", 52),
            // A dual-stack socket's IPv4 client: written as IPv4.
            ("[::ffff:10.0.0.1]:5", "[::ffff:10.0.0.2]:6", 28),
        ];
        for (client, proxy, len) in cases {
            let (client, proxy): (SocketAddr, SocketAddr) =
                (client.parse().unwrap(), proxy.parse().unwrap());
            for t in [HeaderTransport::Stream, HeaderTransport::Dgram] {
                let h = ProxyHeader::new(t, client, proxy);
                assert_eq!(h.as_bytes().len(), len);
                let mut datagram = h.as_bytes().to_vec();
                datagram.extend_from_slice(b"payload");
                let p = parse(&datagram).unwrap();
                assert_eq!(p.len, len);
                assert_eq!(&datagram[p.len..], b"payload");
                assert_eq!(p.transport, Some(t));
                let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                assert_eq!(p.addrs, Some((canon(client), canon(proxy))));
            }
        }
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let h = ProxyHeader::new(
            HeaderTransport::Dgram,
            "10.0.0.1:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        );
        let p = parse(h.as_bytes()).unwrap();
        assert_eq!(p.len, 52);
        assert_eq!(
            p.addrs.unwrap().0,
            "[::ffff:10.0.0.1]:1".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn parse_refuses_short_or_foreign_input() {
        let h = ProxyHeader::new(
            HeaderTransport::Dgram,
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
        );
        for n in 0..h.as_bytes().len() {
            assert_eq!(parse(&h.as_bytes()[..n]), None, "{n}");
        }
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), None);
    }
}
