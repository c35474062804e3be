//! Whether one established UDP session may be offloaded to the kernel (sans-io; SPEC §11).

use std::net::{IpAddr, SocketAddr};

/// What is known of a session when its first reply is forwarded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    /// The client's address.
    pub(crate) client: SocketAddr,
    /// The backend's address.
    pub(crate) target: SocketAddr,
    /// The proxy address the client sent to (its listener's address, or on a wildcard
    /// listener the one its first datagram named); `None`: not known.
    pub(crate) listener_ip: Option<IpAddr>,
    /// The listener's port.
    pub(crate) listener_port: u16,
    /// Its path to the backend carries a PROXY protocol v2 header per datagram.
    pub(crate) proxy_header: bool,
    /// The client's address is over its flood limit right now.
    pub(crate) rate_limited: bool,
}

/// Why a session stays in user space.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Kept {
    /// `proxyProtocol: v2`: each datagram carries a header user space writes.
    ProxyHeader,
    /// Its source is over a rate limit: user space keeps counting it.
    RateLimited,
    /// The client and the backend are of different address families.
    CrossFamily,
    /// The proxy address the client sent to is not known (a wildcard listener without
    /// packet info).
    NoListenerAddress,
    /// One side is on this host (loopback or a local address): there is no interface to
    /// forward to.
    Local,
}

/// The offload decision for `c`.
pub(crate) fn decide(c: &Candidate) -> Result<IpAddr, Kept> {
    if c.proxy_header {
        return Err(Kept::ProxyHeader);
    }
    if c.rate_limited {
        return Err(Kept::RateLimited);
    }
    let client = c.client.ip().to_canonical();
    let target = c.target.ip().to_canonical();
    if client.is_ipv4() != target.is_ipv4() {
        return Err(Kept::CrossFamily);
    }
    let listener = c
        .listener_ip
        .map(|ip| ip.to_canonical())
        .filter(|ip| !ip.is_unspecified())
        .ok_or(Kept::NoListenerAddress)?;
    if listener.is_ipv4() != client.is_ipv4() {
        return Err(Kept::CrossFamily);
    }
    if client.is_loopback() || target.is_loopback() {
        return Err(Kept::Local);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate() -> Candidate {
        Candidate {
            client: "10.1.0.2:40000".parse().unwrap(),
            target: "10.2.0.2:5000".parse().unwrap(),
            listener_ip: Some("10.1.0.1".parse().unwrap()),
            listener_port: 7777,
            proxy_header: false,
            rate_limited: false,
        }
    }

    #[test]
    fn a_plain_session_is_offloaded_from_the_address_its_client_sent_to() {
        assert_eq!(decide(&candidate()), Ok("10.1.0.1".parse().unwrap()));
        let mapped = Candidate {
            listener_ip: Some("::ffff:10.1.0.1".parse().unwrap()),
            client: "[::ffff:10.1.0.2]:40000".parse().unwrap(),
            ..candidate()
        };
        assert_eq!(decide(&mapped), Ok("10.1.0.1".parse().unwrap()));
    }

    #[test]
    fn proxy_headers_rate_limits_and_mixed_families_stay_in_user_space() {
        let c = Candidate {
            proxy_header: true,
            ..candidate()
        };
        assert_eq!(decide(&c), Err(Kept::ProxyHeader));
        let c = Candidate {
            rate_limited: true,
            ..candidate()
        };
        assert_eq!(decide(&c), Err(Kept::RateLimited));
        let c = Candidate {
            target: "[fd01::2]:5000".parse().unwrap(),
            ..candidate()
        };
        assert_eq!(decide(&c), Err(Kept::CrossFamily));
        let c = Candidate {
            listener_ip: Some("fd00::1".parse().unwrap()),
            ..candidate()
        };
        assert_eq!(decide(&c), Err(Kept::CrossFamily));
    }

    #[test]
    fn an_unknown_listener_address_or_a_local_side_stays_in_user_space() {
        for listener_ip in [None, Some("0.0.0.0".parse().unwrap())] {
            let c = Candidate {
                listener_ip,
                ..candidate()
            };
            assert_eq!(decide(&c), Err(Kept::NoListenerAddress));
        }
        let c = Candidate {
            target: "127.0.0.1:5000".parse().unwrap(),
            ..candidate()
        };
        assert_eq!(decide(&c), Err(Kept::Local));
    }
}
