//! Where a forwarder's `targetHost` points. An IP address is itself; a
//! `<service>.<namespace>.svc[.<cluster domain>]` name follows the Service watch (its ClusterIP,
//! or for a headless Service its first ready endpoint), so a change applies when the watch
//! delivers it; any other name is looked up by DNS every `resolveIntervalSeconds`, and a failed
//! lookup keeps the last good address. [`DnsCache`] is the sans-io part of the DNS side: which
//! names are due, and what each resolved to. [`not_unicast`] is the one test of whether an
//! address can be a target at all, for forwarders and route endpoints alike. Each way a
//! `targetHost` can fail to give an address is a variant of [`ResolveError`], whose text is
//! what the forwarder's status says.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::inventory::{SERVICE_NAME_LABEL, Snapshot};

pub use crate::reconcile::unicast::not_unicast;

/// What kind of name a `targetHost` is.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Host<'a> {
    /// An IP address.
    Ip(IpAddr),
    /// A cluster Service name.
    Service {
        /// Service name.
        name: &'a str,
        /// Its namespace.
        namespace: &'a str,
    },
    /// Any other DNS name.
    Dns(&'a str),
}

impl<'a> Host<'a> {
    /// Reads a `targetHost`.
    pub fn parse(host: &'a str) -> Self {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Self::Ip(ip);
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut labels = host.split('.');
        match (labels.next(), labels.next(), labels.next()) {
            (Some(name), Some(namespace), Some("svc"))
                if !name.is_empty() && !namespace.is_empty() =>
            {
                Self::Service { name, namespace }
            }
            _ => Self::Dns(host),
        }
    }
}

/// Why a `targetHost` gives no address now: a forwarder's status says it (`Display`), and a
/// listener that already forwards keeps its target meanwhile.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum ResolveError {
    /// A cluster Service name whose Service gives no address.
    #[error("targetHost {host}: {source}")]
    Service {
        /// The `targetHost`, as written.
        host: String,
        /// Why the Service gives none.
        source: ServiceError,
    },
    /// A DNS name with no answer yet, or none that can be a target.
    #[error(transparent)]
    Dns(#[from] LookupError),
}

/// Why a Service in the snapshot gives no address.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum ServiceError {
    /// No such Service (yet, or any more).
    #[error("Service {namespace}/{name} not found")]
    NotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A headless Service none of whose endpoints is ready.
    #[error("headless Service {namespace}/{name} has no ready endpoint")]
    NoReadyEndpoint {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A headless Service whose ready endpoints are none of them unicast ([`not_unicast`]).
    #[error(
        "headless Service {namespace}/{name} has no ready endpoint with a unicast address \
         ({left_out} left out)"
    )]
    NoUnicastEndpoint {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Ready endpoints left out for their address.
        left_out: usize,
    },
}

/// What [`DnsCache::lookup`] has for a name that has no address to give.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum LookupError {
    /// Every lookup so far failed.
    #[error("targetHost {host} does not resolve: {source}")]
    Failed {
        /// The name.
        host: String,
        /// Why the last lookup failed.
        source: DnsError,
    },
    /// The first lookup has not answered yet.
    #[error("targetHost {host} is being looked up")]
    Pending {
        /// The name.
        host: String,
    },
}

/// Why one DNS lookup gave no address a forwarder can use.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DnsError {
    /// The resolver failed (no such name, no answer in time, …).
    #[error("{source}")]
    Resolver {
        /// The resolver's error (shared: the last error is kept, and told to every forwarder
        /// of the name).
        source: Arc<io::Error>,
    },
    /// The resolver answered with no address at all.
    #[error("no address")]
    NoAddress,
    /// Every address it answered with is one no session can be sent to.
    #[error("it answers with no unicast address ({first} is {why})")]
    NotUnicast {
        /// The first address of the answer.
        first: IpAddr,
        /// What it is ([`not_unicast`]).
        why: &'static str,
    },
}

impl From<io::Error> for DnsError {
    fn from(source: io::Error) -> Self {
        Self::Resolver {
            source: Arc::new(source),
        }
    }
}

/// Equal when they read the same: a lookup that fails again for the same reason changes nothing
/// a forwarder says.
impl PartialEq for DnsError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Resolver { source: a }, Self::Resolver { source: b }) => {
                Arc::ptr_eq(a, b) || (a.kind() == b.kind() && a.to_string() == b.to_string())
            }
            (Self::NoAddress, Self::NoAddress) => true,
            (Self::NotUnicast { first: a, why: x }, Self::NotUnicast { first: b, why: y }) => {
                a == b && x == y
            }
            _ => false,
        }
    }
}

impl Eq for DnsError {}

/// The address of a Service in the snapshot: its ClusterIP, or for a headless Service a ready
/// endpoint: `current` while it is still ready (a new slice sorting first does not move the
/// sessions), else the first (slices in name order).
pub fn service_address(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    current: Option<IpAddr>,
) -> Result<IpAddr, ServiceError> {
    let service = snapshot
        .services
        .iter()
        .find(|s| s.namespace == namespace && s.name == name)
        .ok_or_else(|| ServiceError::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let cluster_ip = service
        .raw
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("None");
    if let Ok(ip) = cluster_ip.parse() {
        return Ok(ip);
    }
    let ready: Vec<IpAddr> = snapshot
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.namespace == namespace && s.labels.get(SERVICE_NAME_LABEL).is_some_and(|v| v == name)
        })
        .flat_map(|slice| {
            slice
                .raw
                .get("endpoints")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
        })
        // An absent `ready` condition means ready (EndpointSlice API contract).
        .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
        .filter_map(|e| e.pointer("/addresses/0")?.as_str()?.parse().ok())
        .collect();
    let total = ready.len();
    let unicast: Vec<IpAddr> = ready
        .into_iter()
        .filter(|ip| not_unicast(*ip).is_none())
        .collect();
    pick(&unicast, current).ok_or_else(|| {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        match total - unicast.len() {
            0 => ServiceError::NoReadyEndpoint { namespace, name },
            left_out => ServiceError::NoUnicastEndpoint {
                namespace,
                name,
                left_out,
            },
        }
    })
}

/// `current` if it is among `addrs`, else the first IPv4 address, else the first: an answer
/// that only changes order moves nothing, and a name with both families (`localhost`)
/// resolves the same way everywhere.
fn pick(addrs: &[IpAddr], current: Option<IpAddr>) -> Option<IpAddr> {
    current
        .filter(|c| addrs.contains(c))
        .or_else(|| addrs.iter().find(|ip| ip.is_ipv4()).copied())
        .or_else(|| addrs.first().copied())
}

/// DNS answers per name, and when each name is due for another lookup.
#[derive(Debug, Default)]
pub struct DnsCache {
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The last good answer.
    addr: Option<IpAddr>,
    /// The last lookup's error, if it failed.
    error: Option<DnsError>,
    /// When the next lookup is due (`None` while one runs).
    due: Option<Instant>,
}

impl DnsCache {
    /// The answer for `host`: the last good address (even when the latest lookup failed), or
    /// why there is none. A new name is due at once.
    pub fn lookup(&mut self, host: &str, now: Instant) -> Result<IpAddr, LookupError> {
        let entry = self.entries.entry(host.to_string()).or_insert(Entry {
            addr: None,
            error: None,
            due: Some(now),
        });
        match (entry.addr, &entry.error) {
            (Some(addr), _) => Ok(addr),
            (None, Some(e)) => Err(LookupError::Failed {
                host: host.to_string(),
                source: e.clone(),
            }),
            (None, None) => Err(LookupError::Pending {
                host: host.to_string(),
            }),
        }
    }

    /// The last lookup failed while an older answer is still used: the reason, for status.
    pub fn stale_reason(&self, host: &str) -> Option<String> {
        let e = self.entries.get(host)?;
        match (e.addr, &e.error) {
            (Some(addr), Some(error)) => Some(format!(
                "the last lookup of {host} failed ({error}); still using {addr}"
            )),
            _ => None,
        }
    }

    /// Names whose lookup is due; they count as running until [`Self::answered`].
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        self.entries
            .iter_mut()
            .filter(|(_, e)| e.due.is_some_and(|d| d <= now))
            .map(|(host, e)| {
                e.due = None;
                host.clone()
            })
            .collect()
    }

    /// The earliest time a lookup is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.due).min()
    }

    /// Records a lookup's result; true when the address a forwarder would use changed (or the
    /// name resolved for the first time, or failed for the first time).
    pub fn answered(
        &mut self,
        host: &str,
        result: Result<Vec<IpAddr>, DnsError>,
        now: Instant,
        interval: Duration,
    ) -> bool {
        let Some(e) = self.entries.get_mut(host) else {
            return false; // forgotten meanwhile
        };
        e.due = Some(now + interval);
        // Only a unicast answer can be a target; an answer with none counts as a failed lookup
        // (the last good address stays).
        let result = result.and_then(|addrs| {
            let unicast: Vec<IpAddr> = addrs
                .iter()
                .copied()
                .filter(|ip| not_unicast(*ip).is_none())
                .collect();
            match addrs.first() {
                Some(&first) if unicast.is_empty() => Err(DnsError::NotUnicast {
                    first,
                    why: not_unicast(first).unwrap_or("not unicast"),
                }),
                _ => Ok(unicast),
            }
        });
        match result.and_then(|addrs| pick(&addrs, e.addr).ok_or(DnsError::NoAddress)) {
            Ok(addr) => {
                let changed = e.addr != Some(addr) || e.error.is_some();
                e.addr = Some(addr);
                e.error = None;
                changed
            }
            Err(error) => {
                let changed = e.error.as_ref() != Some(&error);
                e.error = Some(error);
                changed
            }
        }
    }

    /// Forgets the names `keep` says no forwarder looks up any more.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|host, _| keep(host));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Object, Snapshot};
    use std::sync::Arc;

    #[test]
    fn only_unicast_addresses_can_be_targets() {
        for (bad, why) in [
            ("0.0.0.0", "the unspecified address"),
            ("::", "the unspecified address"),
            ("255.255.255.255", "the broadcast address"),
            ("::ffff:255.255.255.255", "the broadcast address"),
            ("224.0.0.1", "a multicast address"),
            ("239.255.255.250", "a multicast address"),
            ("ff02::1", "a multicast address"),
            ("::ffff:224.0.0.1", "a multicast address"),
        ] {
            assert_eq!(not_unicast(bad.parse().unwrap()), Some(why), "{bad}");
        }
        for good in [
            "10.0.0.1",
            "127.0.0.1",
            "192.168.1.255",
            "223.255.255.255",
            "240.0.0.1",
            "::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(not_unicast(good.parse().unwrap()), None, "{good}");
        }
    }

    #[test]
    fn a_name_that_answers_with_no_unicast_address_does_not_resolve() {
        let mut dns = DnsCache::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        dns.lookup("mcast", t0).unwrap_err();
        dns.take_due(t0);
        let group: IpAddr = "224.0.0.1".parse().unwrap();
        let host: IpAddr = "10.0.0.5".parse().unwrap();
        dns.answered("mcast", Ok(vec![group]), t0, every);
        let e = dns.lookup("mcast", t0).unwrap_err();
        assert_eq!(
            e,
            LookupError::Failed {
                host: "mcast".into(),
                source: DnsError::NotUnicast {
                    first: group,
                    why: "a multicast address"
                }
            }
        );
        assert_eq!(
            e.to_string(),
            "targetHost mcast does not resolve: it answers with no unicast address \
             (224.0.0.1 is a multicast address)"
        );
        dns.answered("mcast", Ok(vec![group, host]), t0, every);
        assert_eq!(
            dns.lookup("mcast", t0),
            Ok(host),
            "the unicast answer is taken"
        );
        assert!(dns.answered("mcast", Ok(vec![group]), t0, every));
        assert_eq!(
            dns.lookup("mcast", t0),
            Ok(host),
            "the last good address stays"
        );
        assert!(
            dns.stale_reason("mcast")
                .unwrap()
                .contains("no unicast address")
        );
    }

    #[test]
    fn hosts_are_told_apart() {
        assert_eq!(
            Host::parse("10.0.0.1"),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(Host::parse("[::1]"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            Host::parse("gs-1.games.svc.cluster.local"),
            Host::Service {
                name: "gs-1",
                namespace: "games"
            }
        );
        assert_eq!(
            Host::parse("gs-1.games.svc"),
            Host::Service {
                name: "gs-1",
                namespace: "games"
            }
        );
        assert_eq!(Host::parse("gs-1.games"), Host::Dns("gs-1.games"));
        assert_eq!(Host::parse("example.com."), Host::Dns("example.com"));
        assert_eq!(Host::parse("a.b.svcx.local"), Host::Dns("a.b.svcx.local"));
    }

    fn snapshot(yaml: &str) -> Snapshot {
        let values: Vec<serde_json::Value> = serde_yaml::from_str(yaml).unwrap();
        let mut s = Snapshot::default();
        for v in values {
            let o = Arc::new(Object::from_value(v).unwrap());
            if o.kind == "Service" {
                s.services.push(o);
            } else {
                s.endpoint_slices.push(o);
            }
        }
        s
    }

    #[test]
    fn services_resolve_to_their_cluster_ip_or_a_ready_endpoint() {
        let s = snapshot(
            r#"
- {apiVersion: v1, kind: Service, metadata: {name: vip, namespace: g}, spec: {clusterIP: 10.96.0.7}}
- {apiVersion: v1, kind: Service, metadata: {name: hl, namespace: g}, spec: {clusterIP: None}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: hl-a, namespace: g, labels: {kubernetes.io/service-name: hl}}
  endpoints: [{addresses: [10.1.0.1], conditions: {ready: false}}, {addresses: [10.1.0.2]}, {addresses: [10.1.0.3]}]
- {apiVersion: v1, kind: Service, metadata: {name: mc, namespace: g}, spec: {clusterIP: None}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: mc-a, namespace: g, labels: {kubernetes.io/service-name: mc}}
  endpoints: [{addresses: [224.0.0.1]}, {addresses: [0.0.0.0]}]
"#,
        );
        assert_eq!(
            service_address(&s, "g", "vip", None),
            Ok("10.96.0.7".parse().unwrap())
        );
        assert_eq!(
            service_address(&s, "g", "hl", None),
            Ok("10.1.0.2".parse().unwrap())
        );
        let third = "10.1.0.3".parse().unwrap();
        assert_eq!(
            service_address(&s, "g", "hl", Some(third)),
            Ok(third),
            "the endpoint in use stays while it is ready"
        );
        assert_eq!(
            service_address(&s, "g", "hl", Some("10.1.0.1".parse().unwrap())),
            Ok("10.1.0.2".parse().unwrap()),
            "not ready: moved"
        );
        let refused = |namespace, name| {
            service_address(&s, namespace, name, None)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(refused("other", "vip"), "Service other/vip not found");
        assert_eq!(
            refused("g", "mc"),
            "headless Service g/mc has no ready endpoint with a unicast address (2 left out)"
        );
        assert_eq!(
            service_address(&s, "g", "mc", None),
            Err(ServiceError::NoUnicastEndpoint {
                namespace: "g".into(),
                name: "mc".into(),
                left_out: 2
            })
        );
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_good_address() {
        let mut dns = DnsCache::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        assert_eq!(
            dns.lookup("db", t0),
            Err(LookupError::Pending { host: "db".into() })
        );
        assert_eq!(
            dns.lookup("db", t0).unwrap_err().to_string(),
            "targetHost db is being looked up"
        );
        assert_eq!(dns.take_due(t0), ["db"]);
        assert!(dns.take_due(t0).is_empty(), "one lookup at a time");
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(dns.answered("db", Ok(vec![v6, ip, other]), t0, every));
        assert_eq!(dns.lookup("db", t0), Ok(ip), "IPv4 first");
        assert!(
            !dns.answered("db", Ok(vec![other, ip]), t0, every),
            "a reordered answer moves nothing"
        );
        assert_eq!(dns.lookup("db", t0), Ok(ip));
        assert!(dns.take_due(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(dns.next_due(), Some(t0 + every));
        assert_eq!(dns.take_due(t0 + every), ["db"]);
        let failed = |why: &str| Err(io::Error::other(why.to_string()).into());
        assert!(dns.answered("db", failed("timeout"), t0 + every, every));
        assert_eq!(dns.lookup("db", t0), Ok(ip), "the last good address stays");
        assert!(dns.stale_reason("db").unwrap().contains("timeout"));
        assert!(
            !dns.answered("db", failed("timeout"), t0, every),
            "same error"
        );
        // A name that never resolved says why.
        dns.lookup("nx", t0).unwrap_err();
        dns.take_due(t0);
        dns.answered("nx", failed("no such host"), t0, every);
        assert!(!dns.answered("gone", Ok(vec![]), t0, every), "unknown name");
        assert_eq!(
            dns.lookup("nx", t0).unwrap_err().to_string(),
            "targetHost nx does not resolve: no such host"
        );
        // Names nobody asks for any more are forgotten.
        dns.retain(|name| name == "db");
        assert_eq!(dns.lookup("db", t0), Ok(ip), "still asked for: kept");
        assert_eq!(
            dns.lookup("nx", t0),
            Err(LookupError::Pending { host: "nx".into() }),
            "forgotten"
        );
        dns.retain(|_| false);
        assert!(dns.lookup("db", t0).is_err(), "forgotten, looked up anew");
    }
}
