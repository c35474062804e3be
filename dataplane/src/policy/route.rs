//! Route tables (sans-io): what an entry point does with a new client. Control compiles Routes
//! (and Gateway API routes) with their Services' ready endpoints into one immutable
//! [`RouteTable`] per entry point and swaps it into the workers whole; a worker picks from it
//! for each new client with its own [`Picker`] (weighted rotation state), so nothing is shared
//! or locked on the pick but one counter add per session.
//!
//! The first rule whose match holds wins (all given match fields must hold). Among its
//! backends a smooth weighted rotation picks the Service (weight 0: never), and within a
//! Service its ready endpoints take turns. A session keeps its endpoint for its life; when a
//! new table no longer lists that endpoint for the session's rule, the session is re-homed by
//! that rule ([`RouteTable::rehome`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a text is not a CIDR block.
#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    /// The address part does not parse.
    #[error("`{text}` is not an IP address or CIDR block ({source})")]
    NotAnAddress {
        /// The text as given.
        text: String,
        /// Why.
        source: std::net::AddrParseError,
    },
    /// The prefix length is not a number up to the address width.
    #[error("`{text}`: the prefix length must be 0 to {max}")]
    PrefixLength {
        /// The text as given.
        text: String,
        /// The address width (32 or 128).
        max: u8,
    },
    /// Bits below the prefix are set (`10.0.0.1/8`): a typo rather than a block.
    #[error("`{0}` has host bits set")]
    HostBits(String),
}

/// An IPv4 or IPv6 address block.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host). Host bits must be
    /// zero, so a typo (`10.0.0.1/8`) is an error rather than a surprise.
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|source| CidrError::NotAnAddress {
            text: text.to_owned(),
            source,
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                CidrError::PrefixLength {
                    text: text.to_owned(),
                    max,
                }
            })?,
        };
        let cidr = Self { addr, len };
        if cidr.masked(addr) != bits(addr) {
            return Err(CidrError::HostBits(text.to_owned()));
        }
        // `::ffff:10.0.0.0/104` is an IPv4 block; clients are matched in their IPv4 form.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && len >= 96
        {
            return Ok(Self {
                addr: IpAddr::V4(v4),
                len: len - 96,
            });
        }
        Ok(cidr)
    }

    /// The block's first address.
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length: 0 to 32 (IPv4) or 128 (IPv6).
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == bits(self.addr)
    }

    fn masked(&self, ip: IpAddr) -> u128 {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host = u32::from(width - self.len);
        let mask = u128::MAX.checked_shl(host).unwrap_or(0);
        bits(ip) & mask
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Which clients a rule takes: every given field must hold; nothing given takes every client.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Match {
    /// The client address is in one of these (empty: any).
    pub source_cidrs: Vec<Cidr>,
    /// The client port is in one of these inclusive ranges (empty: any).
    pub source_ports: Vec<(u16, u16)>,
}

impl Match {
    /// Whether `client` is taken.
    pub fn holds(&self, client: SocketAddr) -> bool {
        (self.source_cidrs.is_empty() || self.source_cidrs.iter().any(|c| c.contains(client.ip())))
            && (self.source_ports.is_empty()
                || self
                    .source_ports
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&client.port())))
    }
}

/// A count shared by every worker and kept by control across table swaps (one per route and
/// Service), added to once per session, never per datagram.
#[derive(Debug, Default)]
pub struct RouteCounter(AtomicU64);

impl RouteCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One weighted Service of a rule, with its ready endpoints.
#[derive(Debug)]
pub struct RouteBackend {
    /// `namespace/name`, for logs.
    pub service: String,
    /// Its share (0: none).
    pub weight: u32,
    /// Ready endpoints, in a stable order.
    pub endpoints: Vec<SocketAddr>,
    /// Sessions opened to it.
    pub sessions: Arc<RouteCounter>,
    /// An invalid backend (a reference that does not resolve) that keeps its weighted share:
    /// clients it is picked for get no session, as the Gateway API asks, instead of going to
    /// the other backends.
    pub drops_share: bool,
}

/// One rule of a route.
#[derive(Debug)]
pub struct Rule {
    /// Identifies the rule across table swaps (route and rule index): sessions carry it.
    pub key: u64,
    /// `namespace/name` of the route, for logs.
    pub route: String,
    /// Which clients it takes.
    pub matcher: Match,
    /// Where they go.
    pub backends: Vec<RouteBackend>,
    /// Idle timeout of its sessions.
    pub idle_timeout: Duration,
    /// PROXY protocol v2 headers to its endpoints (its route's `proxyProtocol`).
    pub proxy: crate::policy::proxy_protocol::ProxyMode,
    /// Sessions it re-homed because their endpoint left.
    pub rehomed: Arc<RouteCounter>,
}

/// An entry point's rules, in order.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// First match wins.
    pub rules: Vec<Rule>,
}

/// Where a new session goes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Pick {
    /// Index of the rule in the table.
    pub rule: usize,
    /// Index of the backend in the rule.
    pub backend: usize,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// The rule's key.
    pub key: u64,
    /// The rule's idle timeout.
    pub idle_timeout: Duration,
    /// The rule's PROXY protocol mode.
    pub proxy: crate::policy::proxy_protocol::ProxyMode,
}

/// One worker's place in a table's rotations: per rule the smooth weighted round robin's
/// current weights, and per backend the next endpoint. Reset with each new table.
#[derive(Debug, Default)]
pub struct Picker {
    rules: Vec<RuleState>,
}

#[derive(Debug, Default, Clone)]
struct RuleState {
    current: Vec<i64>,
    next_endpoint: Vec<usize>,
}

impl Picker {
    /// Forgets the rotation (for a new table).
    pub fn reset(&mut self) {
        self.rules.clear();
    }
}

impl RouteTable {
    /// The first rule that takes `client`.
    pub fn rule_for(&self, client: SocketAddr) -> Option<usize> {
        self.rules.iter().position(|r| r.matcher.holds(client))
    }

    /// Where a new client goes: the first matching rule, a backend by weight, an endpoint in
    /// turn. `None` (dropped as `no_route`) when no rule matches or the matching rule has no
    /// ready endpoint.
    pub fn pick(&self, picker: &mut Picker, client: SocketAddr) -> Option<Pick> {
        self.pick_in(picker, self.rule_for(client)?)
    }

    /// A pick within rule `index`.
    pub fn pick_in(&self, picker: &mut Picker, index: usize) -> Option<Pick> {
        let rule = self.rules.get(index)?;
        if picker.rules.len() < self.rules.len() {
            picker.rules.resize(self.rules.len(), RuleState::default());
        }
        let state = &mut picker.rules[index];
        if state.current.len() != rule.backends.len() {
            state.current = vec![0; rule.backends.len()];
            state.next_endpoint = vec![0; rule.backends.len()];
        }
        // Smooth weighted round robin over the backends that can take a session: each gains
        // its weight, the richest is chosen and pays the total. Exact shares, well spread.
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in rule.backends.iter().enumerate() {
            if b.weight == 0 || (b.endpoints.is_empty() && !b.drops_share) {
                continue;
            }
            let w = i64::from(b.weight);
            total += w;
            state.current[i] += w;
            if best.is_none_or(|j| state.current[i] > state.current[j]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        state.current[chosen] -= total;
        let backend = &rule.backends[chosen];
        if backend.endpoints.is_empty() {
            return None; // an invalid backend's share
        }
        let turn = state.next_endpoint[chosen] % backend.endpoints.len();
        state.next_endpoint[chosen] = turn + 1;
        Some(Pick {
            rule: index,
            backend: chosen,
            endpoint: backend.endpoints[turn],
            key: rule.key,
            idle_timeout: rule.idle_timeout,
            proxy: rule.proxy,
        })
    }

    /// Whether rule `key` still sends sessions to `endpoint` (a backend with weight lists it).
    pub fn serves(&self, key: u64, endpoint: SocketAddr) -> bool {
        self.rules.iter().filter(|r| r.key == key).any(|r| {
            r.backends
                .iter()
                .any(|b| b.weight > 0 && b.endpoints.contains(&endpoint))
        })
    }

    /// Every (rule key, endpoint) pair [`Self::serves`] holds for, built once so that checking
    /// many sessions against a new table costs O(1) each.
    pub fn served(&self) -> ahash::AHashSet<(u64, SocketAddr)> {
        self.rules
            .iter()
            .flat_map(|r| {
                r.backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .flat_map(move |b| b.endpoints.iter().map(move |e| (r.key, *e)))
            })
            .collect()
    }

    /// A new endpoint for a session of rule `key` whose endpoint left: by the same rule while
    /// it exists, else by the first rule that takes the client. `None`: nowhere to go.
    pub fn rehome(&self, picker: &mut Picker, key: u64, client: SocketAddr) -> Option<Pick> {
        let index = self
            .rules
            .iter()
            .position(|r| r.key == key)
            .or_else(|| self.rule_for(client))?;
        self.pick_in(picker, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn backend(service: &str, weight: u32, endpoints: &[&str]) -> RouteBackend {
        RouteBackend {
            service: service.into(),
            weight,
            endpoints: endpoints.iter().map(|e| addr(e)).collect(),
            sessions: Arc::default(),
            drops_share: false,
        }
    }

    fn rule(key: u64, matcher: Match, backends: Vec<RouteBackend>) -> Rule {
        Rule {
            key,
            route: "games/voice".into(),
            matcher,
            backends,
            idle_timeout: Duration::from_secs(60),
            proxy: crate::policy::proxy_protocol::ProxyMode::None,
            rehomed: Arc::default(),
        }
    }

    #[test]
    fn cidrs_parse_strictly_and_match_both_families() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:10.1.1.1".parse().unwrap()),
            "mapped counts as IPv4"
        );
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("127.0.0.2")
                .unwrap()
                .contains("127.0.0.2".parse().unwrap())
        );
        assert!(matches!(
            Cidr::parse("10.0.0.1/8"),
            Err(CidrError::HostBits(t)) if t == "10.0.0.1/8"
        ));
        assert!(
            Cidr::parse("10.0.0.1/8")
                .unwrap_err()
                .to_string()
                .contains("host bits")
        );
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(
            mapped.to_string(),
            "10.0.0.0/8",
            "a mapped block is an IPv4 block"
        );
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(matches!(
            Cidr::parse("10.0.0.0/33"),
            Err(CidrError::PrefixLength { max: 32, .. })
        ));
        assert!(matches!(
            Cidr::parse("ten/8"),
            Err(CidrError::NotAnAddress { .. })
        ));
        assert_eq!(
            Cidr::parse("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
    }

    #[test]
    fn the_first_matching_rule_wins_and_every_field_must_hold() {
        let narrow = Match {
            source_cidrs: vec![Cidr::parse("127.0.0.2/32").unwrap()],
            source_ports: vec![(9001, 9001), (10000, 10100)],
        };
        let table = RouteTable {
            rules: vec![
                rule(1, narrow, vec![backend("a", 1, &["10.0.0.1:1"])]),
                rule(2, Match::default(), vec![backend("b", 1, &["10.0.0.2:1"])]),
            ],
        };
        assert_eq!(table.rule_for(addr("127.0.0.2:10050")), Some(0));
        assert_eq!(table.rule_for(addr("127.0.0.2:9001")), Some(0));
        assert_eq!(
            table.rule_for(addr("127.0.0.2:9002")),
            Some(1),
            "port outside"
        );
        assert_eq!(
            table.rule_for(addr("127.0.0.1:9001")),
            Some(1),
            "address outside"
        );
        let mut p = Picker::default();
        assert_eq!(
            table.pick(&mut p, addr("127.0.0.1:5")).unwrap().endpoint,
            addr("10.0.0.2:1")
        );
    }

    #[test]
    fn weights_split_exactly_and_endpoints_take_turns() {
        let table = RouteTable {
            rules: vec![rule(
                1,
                Match::default(),
                vec![
                    backend("eu", 3, &["10.0.0.1:1", "10.0.0.2:1"]),
                    backend("us", 1, &["10.0.1.1:1"]),
                    backend("off", 0, &["10.0.2.1:1"]),
                ],
            )],
        };
        let mut p = Picker::default();
        let mut counts = std::collections::HashMap::new();
        for i in 0..400 {
            let pick = table.pick(&mut p, addr(&format!("1.2.3.4:{i}"))).unwrap();
            *counts.entry(pick.endpoint).or_insert(0) += 1;
        }
        assert_eq!(counts[&addr("10.0.0.1:1")], 150);
        assert_eq!(counts[&addr("10.0.0.2:1")], 150);
        assert_eq!(counts[&addr("10.0.1.1:1")], 100);
        assert!(
            !counts.contains_key(&addr("10.0.2.1:1")),
            "weight 0 gets none"
        );
    }

    #[test]
    fn an_invalid_backend_drops_its_share() {
        let mut invalid = backend("missing", 1, &[]);
        invalid.drops_share = true;
        let table = RouteTable {
            rules: vec![rule(
                1,
                Match::default(),
                vec![backend("ok", 1, &["10.0.0.1:1"]), invalid],
            )],
        };
        let mut p = Picker::default();
        let served = (0..100)
            .filter(|i| table.pick(&mut p, addr(&format!("1.1.1.1:{i}"))).is_some())
            .count();
        assert_eq!(
            served, 50,
            "half the clients fall in the invalid backend's share"
        );
    }

    #[test]
    fn no_rule_or_no_ready_endpoint_is_no_route() {
        let only_local = Match {
            source_cidrs: vec![Cidr::parse("127.0.0.0/8").unwrap()],
            source_ports: vec![],
        };
        let table = RouteTable {
            rules: vec![rule(1, only_local, vec![backend("empty", 1, &[])])],
        };
        let mut p = Picker::default();
        assert_eq!(table.pick(&mut p, addr("10.0.0.1:1")), None, "no rule");
        assert_eq!(table.pick(&mut p, addr("127.0.0.1:1")), None, "no endpoint");
        assert_eq!(
            RouteTable::default().pick(&mut p, addr("127.0.0.1:1")),
            None
        );
    }

    #[test]
    fn a_session_whose_endpoint_left_is_rehomed_by_its_rule() {
        let old = RouteTable {
            rules: vec![rule(
                7,
                Match::default(),
                vec![backend("s", 1, &["10.0.0.1:1", "10.0.0.2:1"])],
            )],
        };
        let new = RouteTable {
            rules: vec![rule(
                7,
                Match::default(),
                vec![backend("s", 1, &["10.0.0.2:1"])],
            )],
        };
        assert!(old.serves(7, addr("10.0.0.1:1")));
        assert!(!new.serves(7, addr("10.0.0.1:1")), "not ready any more");
        assert!(new.serves(7, addr("10.0.0.2:1")));
        assert!(
            !new.serves(8, addr("10.0.0.2:1")),
            "another rule's endpoint"
        );
        let served = new.served();
        assert_eq!(served.len(), 1);
        assert!(served.contains(&(7, addr("10.0.0.2:1"))));
        assert!(!served.contains(&(7, addr("10.0.0.1:1"))));
        let mut p = Picker::default();
        let pick = new.rehome(&mut p, 7, addr("1.1.1.1:1")).unwrap();
        assert_eq!(pick.endpoint, addr("10.0.0.2:1"));
        // The rule is gone: the first rule that takes the client.
        let other = RouteTable {
            rules: vec![rule(
                9,
                Match::default(),
                vec![backend("t", 1, &["10.0.9.9:1"])],
            )],
        };
        assert_eq!(other.rehome(&mut p, 7, addr("1.1.1.1:1")).unwrap().key, 9);
    }
}
