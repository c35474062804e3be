//! What a target or an endpoint may be: a unicast address (sans-io).

use std::net::IpAddr;

/// Why `ip` cannot be a target (`None`: it can): the unspecified address, the limited broadcast
/// address or a multicast address. The data plane refuses to open a session to one (every
/// datagram would fail or spray a network), so a target or endpoint that is one is refused where
/// it enters, with this reason in its status, instead of looking ready while nothing passes. An
/// IPv4-mapped IPv6 address counts as its IPv4 address, as the data plane sees it. A subnet's
/// broadcast address cannot be told from the address alone and is not caught.
pub fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}
