//! What the inputs decide for each forwarder served here (its listeners' verdicts by the port
//! rule, which forwarder holds the port its target names, the notes its Service ports leave),
//! computed again only when an input moves (Forwarders, Services, EndpointSlices, the Gateway
//! listeners' claims), and which forwarders a change touches: the reconciler re-plans those and
//! leaves the others alone (SPEC §10: a Forwarder change re-plans that forwarder and the port
//! claims it touches). Sans-io: nothing is opened, resolved or written here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use dataplane::Transport;

use super::plan::{self, Claim, ForwarderObject, Reading, Reserved, ServicePort};
use super::resolve::Host;
use crate::inventory::Object;
use crate::reconcile::ports;

/// The plan of every forwarder served here, and the managed Services' port sets.
#[derive(Debug, Default, PartialEq)]
pub struct Planned {
    /// By forwarder name.
    pub forwarders: BTreeMap<String, ForwarderPlan>,
    /// The managed Services' port sets, by Service name (empty without managed Services).
    pub services: BTreeMap<String, Vec<ServicePort>>,
}

/// What the inputs decide for one forwarder.
#[derive(Debug, Default, PartialEq)]
pub struct ForwarderPlan {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Why the object does not read (it then claims nothing).
    pub invalid: Vec<String>,
    /// Its listeners, each with its verdict.
    pub claims: Vec<PlannedClaim>,
    /// What its Service ports leave out, said in its status.
    pub notes: Vec<String>,
}

/// One listener of a forwarder, as planned.
#[derive(Debug, PartialEq)]
pub struct PlannedClaim {
    /// The listener and its verdict.
    pub claim: Claim,
    /// The forwarder granted the port (of this transport) the target names, as status names
    /// it: forwarding there from an address of this host would loop.
    pub loops_to: Option<String>,
}

/// The managed Services a plan computes port sets for.
#[derive(Debug)]
pub struct Managed<'a> {
    /// The proxy's own ports as configured (the same on every instance, unlike bound ones).
    pub configured: &'a [Reserved],
    /// The Service of UDP listeners.
    pub udp: Option<&'a str>,
    /// The Service of TCP listeners.
    pub tcp: Option<&'a str>,
    /// Their namespace.
    pub namespace: &'a str,
    /// Services as watched, for the ports they have under other names.
    pub services: &'a [Arc<Object>],
}

impl Planned {
    /// Plans the forwarders `parsed` (each object with what it read as): their listeners get
    /// their ports by the port rule against the proxy's own ports (`reserved`, as bound) and
    /// the Gateway listeners' claims; `managed`, when given, gets its port sets.
    pub fn build(
        parsed: &[Reading<'_>],
        reserved: &[Reserved],
        gateway_claims: &[ports::Claim],
        managed: Option<&Managed<'_>>,
    ) -> Self {
        let mut forwarders: BTreeMap<String, ForwarderPlan> = BTreeMap::new();
        let mut objects = Vec::new();
        for (o, result) in parsed {
            match result {
                Ok(f) => objects.push(Arc::clone(f)),
                Err(e) => {
                    let p = forwarders.entry(o.name.clone()).or_default();
                    p.uid = plan::uid_of(o);
                    p.invalid.push(format!("invalid: {e}"));
                    p.generation = o
                        .raw
                        .pointer("/metadata/generation")
                        .and_then(serde_json::Value::as_i64);
                }
            }
        }
        let claims = plan::claims(&objects, reserved, gateway_claims);
        let granted: HashMap<(Transport, u16), String> = claims
            .iter()
            .filter(|c| c.verdict.is_ok())
            .map(|c| {
                let owner = format!("forwarder {}/{}", c.forwarder.namespace, c.forwarder.name);
                ((c.transport, c.port.listen_port), owner)
            })
            .collect();
        for claim in claims {
            let loops_to = granted
                .get(&(claim.transport, claim.port.target_port))
                .cloned();
            let p = forwarders.entry(claim.forwarder.name.clone()).or_default();
            p.generation = claim.forwarder.generation;
            p.uid.clone_from(&claim.forwarder.uid);
            p.claims.push(PlannedClaim { claim, loops_to });
        }
        let services = match managed {
            Some(m) => service_ports(m, &objects, gateway_claims, &mut forwarders),
            None => BTreeMap::new(),
        };
        Self {
            forwarders,
            services,
        }
    }

    /// The forwarders whose plan differs from `before`'s (new, gone or changed) and, when
    /// Services or EndpointSlices moved (`services_moved`), those aimed at a Service: what a
    /// change of the inputs touches.
    pub fn touched(&self, before: &Self, services_moved: bool) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .forwarders
            .iter()
            .filter(|(name, p)| {
                before.forwarders.get(*name) != Some(*p) || (services_moved && p.targets_service())
            })
            .map(|(name, _)| name.clone())
            .collect();
        out.extend(
            before
                .forwarders
                .keys()
                .filter(|name| !self.forwarders.contains_key(*name))
                .cloned(),
        );
        out
    }

    /// The DNS names the forwarders look up: those of listeners that may have their ports.
    pub fn dns_names(&self) -> HashSet<&str> {
        self.granted_claims()
            .filter_map(|(_, c)| match Host::parse(&c.port.target_host) {
                Host::Dns(name) => Some(name),
                _ => None,
            })
            .collect()
    }

    /// The forwarders that look up DNS name `host`.
    pub fn using_dns(&self, host: &str) -> BTreeSet<String> {
        self.granted_claims()
            .filter(|(_, c)| Host::parse(&c.port.target_host) == Host::Dns(host))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn granted_claims(&self) -> impl Iterator<Item = (&String, &Claim)> {
        self.forwarders.iter().flat_map(|(name, p)| {
            p.claims
                .iter()
                .filter(|c| c.claim.verdict.is_ok())
                .map(move |c| (name, &c.claim))
        })
    }
}

impl ForwarderPlan {
    /// Whether a listener of it is aimed at a Service (its address follows the Service watch).
    fn targets_service(&self) -> bool {
        self.claims
            .iter()
            .any(|c| matches!(Host::parse(&c.claim.port.target_host), Host::Service { .. }))
    }
}

/// The managed Services' port sets: each granted listener by the configured ports (the same on
/// every instance), less the ports a live Service has under other names; what is left out goes
/// into the forwarder's notes.
fn service_ports(
    managed: &Managed<'_>,
    objects: &[Arc<ForwarderObject>],
    gateway_claims: &[ports::Claim],
    forwarders: &mut BTreeMap<String, ForwarderPlan>,
) -> BTreeMap<String, Vec<ServicePort>> {
    let mut out: BTreeMap<String, Vec<ServicePort>> = BTreeMap::new();
    let claims = plan::claims(objects, managed.configured, gateway_claims);
    let shared = managed.udp.is_some() && managed.udp == managed.tcp;
    for (service, transport) in [(managed.udp, Transport::Udp), (managed.tcp, Transport::Tcp)] {
        let Some(service) = service else { continue };
        let (ports, refused) = plan::service_ports(&claims, transport, shared);
        for (forwarder, why) in refused {
            forwarders.entry(forwarder).or_default().notes.push(why);
        }
        out.entry(service.to_string()).or_default().extend(ports);
    }
    for (service, ports) in &mut out {
        let live =
            plan::live_ports(managed.services, managed.namespace, service).unwrap_or_default();
        let (mut apply, left_out) = plan::leave_out_taken(std::mem::take(ports), &live);
        for (port, why) in left_out {
            let owner = claims.iter().find(|c| {
                c.verdict.is_ok() && c.transport == port.protocol && c.port.listen_port == port.port
            });
            if let Some(c) = owner {
                forwarders
                    .entry(c.forwarder.name.clone())
                    .or_default()
                    .notes
                    .push(format!(
                        "{} has no port on Service {service}: {why}",
                        c.label()
                    ));
            }
        }
        apply.sort();
        *ports = apply;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::forwarder::plan::ParseCache;

    fn object(name: &str, created: &str, spec: &str) -> Arc<Object> {
        let yaml = format!(
            "apiVersion: udp-director.dev/v1alpha1\nkind: Forwarder\nmetadata: {{name: {name}, \
             namespace: games, creationTimestamp: \"{created}\"}}\nspec: {spec}\n"
        );
        Arc::new(Object::from_value(serde_yaml::from_str(&yaml).unwrap()).unwrap())
    }

    fn udp(listen: u16, host: &str, target: u16) -> String {
        format!("{{udp: {{listenPort: {listen}, targetHost: \"{host}\", targetPort: {target}}}}}")
    }

    fn build(cache: &mut ParseCache, objects: &[Arc<Object>]) -> Planned {
        let parsed = cache.read(objects);
        let managed = Managed {
            configured: &[],
            udp: Some("relay"),
            tcp: None,
            namespace: "games",
            services: &[],
        };
        Planned::build(&parsed, &[], &[], Some(&managed))
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_change_touches_the_forwarders_it_moves_and_no_other() {
        let mut cache = ParseCache::default();
        let a = object("a", "1", &udp(7000, "10.0.0.1", 1));
        let b = object("b", "2", &udp(7001, "10.0.0.2", 1));
        let c = object("c", "3", &udp(7002, "db.example", 1));
        let svc = object("d", "4", &udp(7003, "gs.games.svc", 1));
        let first = build(&mut cache, &[a.clone(), b.clone(), c.clone(), svc.clone()]);
        assert_eq!(
            first.touched(&Planned::default(), true),
            names(&["a", "b", "c", "d"]),
            "everything is new"
        );
        assert!(
            build(&mut cache, &[a.clone(), b.clone(), c.clone(), svc.clone()])
                .touched(&first, false)
                .is_empty(),
            "nothing moved"
        );
        assert_eq!(
            first.touched(&first, true),
            names(&["d"]),
            "Services moved: only what is aimed at one"
        );
        // `b` moves to `a`'s port: `b` loses it (and its Service port), `a` is untouched.
        let b2 = object("b", "2", &udp(7000, "10.0.0.2", 1));
        let second = build(&mut cache, &[a.clone(), b2, c.clone(), svc.clone()]);
        assert_eq!(second.touched(&first, false), names(&["b"]));
        assert!(second.forwarders["b"].claims[0].claim.verdict.is_err());
        assert_eq!(second.services["relay"].len(), 3);
        // `a` goes: `b` wins the port, both are touched.
        let third = build(
            &mut cache,
            &[object("b", "2", &udp(7000, "10.0.0.2", 1)), c, svc],
        );
        assert_eq!(third.touched(&second, false), names(&["a", "b"]));
        assert!(third.forwarders["b"].claims[0].claim.verdict.is_ok());
    }

    #[test]
    fn a_forwarder_whose_target_port_another_takes_is_touched() {
        let mut cache = ParseCache::default();
        let a = object("a", "1", &udp(7000, "127.0.0.1", 7100));
        let b = object("b", "2", &udp(7001, "10.0.0.2", 1));
        let first = build(&mut cache, &[a.clone(), b]);
        assert_eq!(first.forwarders["a"].claims[0].loops_to, None);
        // `b` now listens where `a` forwards to: `a` would loop through `b`.
        let second = build(
            &mut cache,
            &[a, object("b", "2", &udp(7100, "10.0.0.2", 1))],
        );
        assert_eq!(second.touched(&first, false), names(&["a", "b"]));
        assert_eq!(
            second.forwarders["a"].claims[0].loops_to.as_deref(),
            Some("forwarder games/b")
        );
    }

    #[test]
    fn dns_names_are_those_of_granted_listeners() {
        let mut cache = ParseCache::default();
        let planned = build(
            &mut cache,
            &[
                object("a", "1", &udp(7000, "db.example.", 1)),
                object("b", "2", &udp(7000, "other.example", 1)),
                object("c", "3", &udp(7001, "db.example", 1)),
                object("bad", "4", "{}"),
            ],
        );
        assert_eq!(
            planned.dns_names(),
            HashSet::from(["db.example"]),
            "b's port is a's"
        );
        assert_eq!(planned.using_dns("db.example"), names(&["a", "c"]));
        assert_eq!(
            planned.forwarders["bad"].invalid,
            ["invalid: spec: neither udp nor tcp is given"]
        );
    }
}
