//! Who may open a port that more than one object asks for (SPEC §6 "Port conflicts", §7),
//! decided without I/O from the objects alone, so that every replica, and one replica before
//! and after a restart, names the same holder. The proxy's own ports (query, admin, data ports,
//! route entry points) come first; then, among Forwarders and Gateway listeners, the older
//! object (`metadata.creationTimestamp`; a listener goes by its Gateway's), then the kind's name
//! (`Forwarder` before `Gateway`), namespace, name and listener name. A claim is a transport and
//! a port: UDP and TCP on one number do not meet. A refused claim holds nothing.
//!
//! It knows no reconciler: the forwarder and Gateway reconcilers hand it plain claims, their
//! own and the other kind's, and each opens only what it wins.

use std::collections::HashMap;
use std::sync::Arc;

use dataplane::Transport;

use crate::config::Config;
use crate::inventory::Object;

/// The kinds of object that claim ports at run time. Declared in the order of their names,
/// which is the order the rule compares them in.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Kind {
    /// A `Forwarder`: one claim per listener (`udp`, `tcp`).
    Forwarder,
    /// A `Gateway`: one claim per UDP or TCP listener.
    Gateway,
}

impl Kind {
    /// The kind's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarder => "Forwarder",
            Self::Gateway => "Gateway",
        }
    }
}

/// A port the proxy holds itself, whatever the objects ask.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Reserved {
    /// Transport.
    pub transport: Transport,
    /// Port.
    pub port: u16,
    /// What holds it, as status says it: `the query port`.
    pub holder: String,
}

/// One port an object asks for.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Claim {
    /// `metadata.creationTimestamp` (RFC 3339 in UTC, so it sorts as text; a Gateway listener's
    /// is its Gateway's); empty when unset (file objects), which sorts first.
    pub created: String,
    /// The object's kind.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The Gateway listener's name; empty for a Forwarder.
    pub listener: String,
    /// Transport.
    pub transport: Transport,
    /// Port.
    pub port: u16,
}

impl Claim {
    /// The order of precedence: the older first, then by kind, namespace, name and listener.
    fn rank(&self) -> (&str, Kind, &str, &str, &str) {
        (
            &self.created,
            self.kind,
            &self.namespace,
            &self.name,
            &self.listener,
        )
    }

    /// `udp/7000`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.transport.as_str(), self.port)
    }

    /// The claimant as another kind's status names it: `Forwarder games/relay`,
    /// `Gateway games/edge listener voice`.
    pub fn owner(&self) -> String {
        match self.kind {
            Kind::Forwarder => format!("Forwarder {}/{}", self.namespace, self.name),
            Kind::Gateway => format!(
                "Gateway {}/{} listener {}",
                self.namespace, self.name, self.listener
            ),
        }
    }
}

/// What keeps a claim from its port.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Holder<'a> {
    /// One of the proxy's own ports.
    Own(&'a Reserved),
    /// A claim that comes first.
    Claim(&'a Claim),
}

impl Holder<'_> {
    /// Why `loser` is refused, naming the holder: `udp/7000 is held by Gateway games/edge
    /// listener voice (older)`. Between two Forwarders (one namespace) the name alone says it.
    pub fn refusal(&self, loser: &Claim) -> String {
        let holder = match self {
            Self::Own(r) => r.holder.clone(),
            Self::Claim(w) => {
                let who = if w.kind == Kind::Forwarder && loser.kind == Kind::Forwarder {
                    format!("forwarder {}", w.name)
                } else {
                    w.owner()
                };
                if w.created < loser.created {
                    format!("{who} (older)")
                } else {
                    format!("{who} (as old, and first by kind and name)")
                }
            }
        };
        format!("{} is held by {holder}", loser.label())
    }
}

/// Decides every claim: `Ok` where it may open its port, else what holds the port. Verdicts
/// come back in the order of `claims`; the result does not depend on that order.
pub fn assign<'a>(reserved: &'a [Reserved], claims: &[&'a Claim]) -> Vec<Result<(), Holder<'a>>> {
    let mut order: Vec<usize> = (0..claims.len()).collect();
    order.sort_by(|a, b| claims[*a].rank().cmp(&claims[*b].rank()));
    let mut verdicts = vec![Ok(()); claims.len()];
    let mut granted: HashMap<(Transport, u16), &'a Claim> = HashMap::new();
    for i in order {
        let claim = claims[i];
        let own = reserved
            .iter()
            .find(|r| r.transport == claim.transport && r.port == claim.port);
        verdicts[i] = match own {
            Some(r) => Err(Holder::Own(r)),
            None => match granted.get(&(claim.transport, claim.port)) {
                Some(winner) => Err(Holder::Claim(winner)),
                None => {
                    granted.insert((claim.transport, claim.port), claim);
                    Ok(())
                }
            },
        };
    }
    verdicts
}

/// The proxy's own ports, as refusals name them: the query and admin ports, each data port and
/// each route entry point (name, transport, port). Ports 0 (the system picks) are left out.
pub fn own_ports(
    query: u16,
    admin: u16,
    data: &[(String, Transport, u16)],
    entry: &[(String, Transport, u16)],
) -> Vec<Reserved> {
    let mut out = vec![
        Reserved {
            transport: Transport::Tcp,
            port: query,
            holder: "the query port".into(),
        },
        Reserved {
            transport: Transport::Tcp,
            port: admin,
            holder: "the admin port".into(),
        },
    ];
    for (name, transport, port) in data {
        out.push(Reserved {
            transport: *transport,
            port: *port,
            holder: format!("data port {name}"),
        });
    }
    for (name, transport, port) in entry {
        out.push(Reserved {
            transport: *transport,
            port: *port,
            holder: format!("entry point {name}"),
        });
    }
    out.retain(|r| r.port != 0);
    out
}

/// The proxy's own ports as `config` has them: the same on every instance.
pub fn configured(config: &Config) -> Vec<Reserved> {
    let named = |ports: &[crate::config::DataPort]| -> Vec<(String, Transport, u16)> {
        ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol, p.port))
            .collect()
    };
    own_ports(
        config.query_port,
        config.admin_port,
        &named(&config.data_ports),
        &named(&config.entry_points),
    )
}

/// Claims read from a list of inventory objects, read again only when the list changes
/// (an unchanged object is the same `Arc` from one snapshot to the next): a reconciler's
/// once-a-second pass then costs a pointer comparison per object of the other kind.
#[derive(Debug, Default)]
pub struct ClaimCache {
    objects: Vec<Arc<Object>>,
    claims: Arc<Vec<Claim>>,
}

impl ClaimCache {
    /// The claims of `objects`, by `read` when they are not those of last time.
    pub fn get(
        &mut self,
        objects: &[Arc<Object>],
        read: impl FnOnce(&[Arc<Object>]) -> Vec<Claim>,
    ) -> Arc<Vec<Claim>> {
        let same = self.objects.len() == objects.len()
            && self
                .objects
                .iter()
                .zip(objects)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            self.claims = Arc::new(read(objects));
            self.objects = objects.to_vec();
        }
        Arc::clone(&self.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder(name: &str, created: &str, transport: Transport, port: u16) -> Claim {
        Claim {
            created: created.into(),
            kind: Kind::Forwarder,
            namespace: "games".into(),
            name: name.into(),
            listener: String::new(),
            transport,
            port,
        }
    }

    fn listener(
        gateway: &str,
        name: &str,
        created: &str,
        transport: Transport,
        port: u16,
    ) -> Claim {
        Claim {
            created: created.into(),
            kind: Kind::Gateway,
            namespace: "games".into(),
            name: gateway.into(),
            listener: name.into(),
            transport,
            port,
        }
    }

    /// Each claim's verdict as text: `None` granted, else the refusal.
    fn verdicts(reserved: &[Reserved], claims: &[Claim]) -> Vec<Option<String>> {
        let refs: Vec<&Claim> = claims.iter().collect();
        assign(reserved, &refs)
            .iter()
            .zip(claims)
            .map(|(v, c)| v.err().map(|h| h.refusal(c)))
            .collect()
    }

    const JAN: &str = "2026-01-01T00:00:00Z";
    const FEB: &str = "2026-02-01T00:00:00Z";
    const UDP: Transport = Transport::Udp;
    const TCP: Transport = Transport::Tcp;

    #[test]
    fn the_proxys_own_ports_beat_both_kinds() {
        let own = own_ports(9000, 9090, &[("game".into(), UDP, 7777)], &[]);
        let claims = [
            forwarder("relay", "", TCP, 9000),
            listener("edge", "voice", "", UDP, 7777),
            listener("edge", "admin", "", TCP, 9090),
        ];
        assert_eq!(
            verdicts(&own, &claims),
            [
                Some("tcp/9000 is held by the query port".into()),
                Some("udp/7777 is held by data port game".into()),
                Some("tcp/9090 is held by the admin port".into()),
            ],
            "even the oldest object"
        );
    }

    #[test]
    fn the_older_object_wins_across_kinds() {
        let claims = [
            forwarder("relay", FEB, UDP, 7000),
            listener("edge", "voice", JAN, UDP, 7000),
        ];
        assert_eq!(
            verdicts(&[], &claims),
            [
                Some("udp/7000 is held by Gateway games/edge listener voice (older)".into()),
                None
            ]
        );
        let claims = [
            listener("edge", "voice", FEB, UDP, 7000),
            forwarder("relay", JAN, UDP, 7000),
        ];
        assert_eq!(
            verdicts(&[], &claims),
            [
                Some("udp/7000 is held by Forwarder games/relay (older)".into()),
                None
            ],
            "whichever comes first in the list"
        );
    }

    #[test]
    fn same_age_goes_by_kind_then_name_then_listener() {
        let claims = [
            listener("a-edge", "voice", JAN, UDP, 7000),
            forwarder("z-relay", JAN, UDP, 7000),
            forwarder("y-relay", JAN, UDP, 7000),
        ];
        assert_eq!(
            verdicts(&[], &claims),
            [
                Some(
                    "udp/7000 is held by Forwarder games/y-relay (as old, and first by kind \
                     and name)"
                        .into()
                ),
                Some(
                    "udp/7000 is held by forwarder y-relay (as old, and first by kind and name)"
                        .into()
                ),
                None,
            ],
            "Forwarder sorts before Gateway, then names"
        );
        let claims = [
            listener("edge", "b", JAN, UDP, 7000),
            listener("edge", "a", JAN, UDP, 7000),
        ];
        assert_eq!(
            verdicts(&[], &claims)[0].as_deref(),
            Some(
                "udp/7000 is held by Gateway games/edge listener a (as old, and first by kind and name)"
            )
        );
        assert!(Kind::Forwarder.as_str() < Kind::Gateway.as_str());
        assert!(
            Kind::Forwarder < Kind::Gateway,
            "the enum orders as the names"
        );
    }

    #[test]
    fn transports_are_apart() {
        let claims = [
            forwarder("relay", JAN, UDP, 7000),
            listener("edge", "voice", FEB, TCP, 7000),
            listener("edge", "chat", FEB, UDP, 7000),
        ];
        let own = own_ports(7000, 9090, &[], &[]);
        let v = verdicts(&own, &claims);
        assert_eq!(v[0], None, "the query port is TCP");
        assert_eq!(v[1].as_deref(), Some("tcp/7000 is held by the query port"));
        assert_eq!(
            v[2].as_deref(),
            Some("udp/7000 is held by Forwarder games/relay (older)")
        );
    }

    #[test]
    fn a_loser_wins_once_the_winner_goes_and_a_refused_claim_holds_nothing() {
        let relay = forwarder("relay", JAN, UDP, 7000);
        let voice = listener("edge", "voice", FEB, UDP, 7000);
        let late = forwarder("late", "2026-03-01T00:00:00Z", UDP, 7000);
        assert!(verdicts(&[], &[relay.clone(), voice.clone()])[1].is_some());
        assert_eq!(
            verdicts(&[], std::slice::from_ref(&voice)),
            [None],
            "the Forwarder deleted: the listener opens"
        );
        // The Forwarder loses to the proxy's own port: it holds nothing, so the listener has it.
        let own = [Reserved {
            transport: UDP,
            port: 7000,
            holder: "entry point voice".into(),
        }];
        let v = verdicts(&own, &[relay, voice, late]);
        assert!(v.iter().all(Option::is_some));
        assert!(
            v.iter()
                .all(|v| v.as_deref().unwrap().ends_with("entry point voice"))
        );
    }

    #[test]
    fn ports_zero_are_nobodys() {
        let own = own_ports(0, 9090, &[("game".into(), UDP, 0)], &[("e".into(), TCP, 5)]);
        let ports: Vec<u16> = own.iter().map(|r| r.port).collect();
        assert_eq!(ports, [9090, 5]);
    }

    #[test]
    fn the_cache_reads_again_only_when_the_list_changes() {
        let object = |name: &str| {
            Arc::new(
                Object::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "games"},
                }))
                .unwrap(),
            )
        };
        let (a, b) = (object("a"), object("b"));
        let mut cache = ClaimCache::default();
        let mut reads = 0;
        let mut read = |list: &[Arc<Object>]| {
            reads += 1;
            list.iter()
                .map(|o| forwarder(&o.name, "", UDP, 1))
                .collect::<Vec<_>>()
        };
        assert!(cache.get(&[], &mut read).is_empty());
        assert_eq!(cache.get(&[Arc::clone(&a)], &mut read).len(), 1);
        assert_eq!(cache.get(&[Arc::clone(&a)], &mut read).len(), 1);
        assert_eq!(cache.get(&[a, b], &mut read).len(), 2);
        assert_eq!(reads, 2, "an empty list and an unchanged one are not read");
    }
}
