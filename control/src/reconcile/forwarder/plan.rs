//! What the forwarders ask for, decided without I/O: each `Forwarder` object typed and checked,
//! its listeners given their ports (or refused, naming who holds the port), and the Service
//! ports that follow from them. Every proxy instance computes the same result from the same
//! objects, which is what lets N replicas converge on one Service port set. Each object is read
//! once, when it changes ([`ParseCache`]): an Agones fleet's GameServer churn, or a change of one
//! Forwarder among thousands, reads no other Forwarder again.

use std::sync::Arc;

use dataplane::Transport;

use crate::crd::{ForwardPort, ForwarderSpec, MAX_FORWARDER_IDLE_SECONDS};
use crate::inventory::Object;
pub use crate::reconcile::ports::Reserved;
use crate::reconcile::ports::{self, Kind};

/// apiVersion of `Forwarder` objects.
pub use crate::crd::forwarder::API_VERSION;
/// Kind of `Forwarder` objects.
pub use crate::crd::forwarder::KIND;

/// Why a `Forwarder` object cannot be served, naming the field: its `Display` is what the
/// forwarder's status, and a file inventory's refusal, say.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ForwarderSpecError {
    /// No `spec` at all.
    #[error("spec: missing")]
    Missing,
    /// A `spec` of the wrong shape: a field missing, of the wrong type, or out of its type's
    /// range.
    #[error("spec: {source}")]
    Malformed {
        /// What serde says, naming the field (shared: a reading is kept and handed out).
        source: Arc<serde_json::Error>,
    },
    /// Neither `udp` nor `tcp`: nothing to listen on.
    #[error("spec: neither udp nor tcp is given")]
    NoListener,
    /// `listenPort: 0`.
    #[error("spec.{transport}.listenPort: must be 1 to 65535", transport = .transport.as_str())]
    ListenPort {
        /// The listener.
        transport: Transport,
    },
    /// `targetPort: 0`.
    #[error("spec.{transport}.targetPort: must be 1 to 65535", transport = .transport.as_str())]
    TargetPort {
        /// The listener.
        transport: Transport,
    },
    /// An empty `targetHost`, or one longer than any DNS name.
    #[error(
        "spec.{transport}.targetHost: must be 1 to 253 characters",
        transport = .transport.as_str()
    )]
    TargetHost {
        /// The listener.
        transport: Transport,
    },
    /// `idleTimeoutSeconds` out of range.
    #[error(
        "spec.{transport}.idleTimeoutSeconds: must be 1 to {max}, not {seconds}",
        transport = .transport.as_str(),
        max = MAX_FORWARDER_IDLE_SECONDS
    )]
    IdleTimeout {
        /// The listener.
        transport: Transport,
        /// What it says.
        seconds: u64,
    },
}

/// One `Forwarder`, typed and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwarderObject {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (empty for file objects): tells a re-created forwarder from the old one.
    pub uid: String,
    /// `metadata.creationTimestamp` (RFC 3339 in UTC, so it sorts as text); empty when unset
    /// (file objects), which sorts first.
    pub created: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// What it asks for.
    pub spec: ForwarderSpec,
}

impl ForwarderObject {
    /// Reads a `Forwarder` inventory object; the error names the field.
    pub fn from_object(object: &Object) -> Result<Self, ForwarderSpecError> {
        let spec = object.raw.get("spec").ok_or(ForwarderSpecError::Missing)?;
        let spec: ForwarderSpec =
            serde_json::from_value(spec.clone()).map_err(|e| ForwarderSpecError::Malformed {
                source: Arc::new(e),
            })?;
        if spec.udp.is_none() && spec.tcp.is_none() {
            return Err(ForwarderSpecError::NoListener);
        }
        for (transport, port) in listeners_of(&spec) {
            if port.listen_port == 0 {
                return Err(ForwarderSpecError::ListenPort { transport });
            }
            if port.target_port == 0 {
                return Err(ForwarderSpecError::TargetPort { transport });
            }
            if port.target_host.is_empty() || port.target_host.len() > 253 {
                return Err(ForwarderSpecError::TargetHost { transport });
            }
            if let Some(seconds) = port.idle_timeout_seconds
                && !(1..=MAX_FORWARDER_IDLE_SECONDS).contains(&seconds)
            {
                return Err(ForwarderSpecError::IdleTimeout { transport, seconds });
            }
        }
        let meta = object.raw.get("metadata");
        Ok(Self {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            uid: uid_of(object),
            created: meta
                .and_then(|m| m.get("creationTimestamp"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string(),
            generation: meta
                .and_then(|m| m.get("generation"))
                .and_then(serde_json::Value::as_i64),
            spec,
        })
    }

    /// The listeners it asks for: UDP first, then TCP.
    pub fn listeners(&self) -> impl Iterator<Item = (Transport, &ForwardPort)> {
        listeners_of(&self.spec)
    }

    /// The ports it claims, as the port rule ([`ports`]) weighs them: one per listener.
    pub fn port_claims(&self) -> impl Iterator<Item = ports::Claim> + '_ {
        self.listeners()
            .map(|(transport, port)| self.port_claim(transport, port))
    }

    fn port_claim(&self, transport: Transport, port: &ForwardPort) -> ports::Claim {
        ports::Claim {
            created: self.created.clone(),
            kind: Kind::Forwarder,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            listener: String::new(),
            transport,
            port: port.listen_port,
        }
    }
}

/// Whether `o` is one of the forwarders served from `namespace` (file objects without a
/// namespace count as in it).
pub fn served_from(o: &Object, namespace: &str) -> bool {
    o.namespace == namespace || o.namespace.is_empty()
}

/// The ports the forwarders served from `namespace` claim (those that read; one that does not
/// opens nothing): what Gateway listeners are weighed against. Objects are read through `cache`.
pub fn port_claims(
    cache: &mut ParseCache,
    objects: &[Arc<Object>],
    namespace: &str,
) -> Vec<ports::Claim> {
    cache
        .read(objects.iter().filter(|o| served_from(o, namespace)))
        .into_iter()
        .filter_map(|(_, parsed)| parsed.ok())
        .flat_map(|f| f.port_claims().collect::<Vec<_>>())
        .collect()
}

/// Each `Forwarder` as [`ForwarderObject::from_object`] read it, kept while the object is
/// unchanged, so a pass over thousands of unchanged forwarders deserialises none of them. An
/// object is unchanged when it is the same `Arc` (the Kubernetes source keeps unchanged objects
/// from one snapshot to the next) or what the reading looks at is equal: the name, uid,
/// `creationTimestamp`, `generation` and `spec`, so a status write (a new `resourceVersion`) or
/// a file reloaded for another object's sake reads nothing again either.
#[derive(Debug, Default)]
pub struct ParseCache {
    /// In the order of the last read: the inventory's (namespace, then name).
    entries: Vec<Parsed>,
    /// Objects read so far (each new or changed one once).
    reads: u64,
    /// The last [`Self::read`] read or forgot an object.
    moved: bool,
}

/// An object and what it reads as (why not, when it does not).
pub type Reading<'a> = (
    &'a Arc<Object>,
    Result<Arc<ForwarderObject>, ForwarderSpecError>,
);

/// One object and what it read as.
#[derive(Debug)]
struct Parsed {
    object: Arc<Object>,
    result: Result<Arc<ForwarderObject>, ForwarderSpecError>,
}

impl ParseCache {
    /// Each of `objects` with what it reads as, read again only where it changed; objects not
    /// in `objects` are forgotten. Objects come in the inventory's order (namespace, then
    /// name), so each is matched with its last reading by walking both lists once, without a
    /// look-up or an allocation; another order is still read right, only again.
    pub fn read<'a>(
        &mut self,
        objects: impl IntoIterator<Item = &'a Arc<Object>>,
    ) -> Vec<Reading<'a>> {
        let mut before = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut out = Vec::new();
        let mut moved = false;
        for object in objects {
            let name = (object.namespace.as_str(), object.name.as_str());
            let mut last = None;
            while let Some(e) = before.peek() {
                match (e.object.namespace.as_str(), e.object.name.as_str()).cmp(&name) {
                    // Gone (or out of order).
                    std::cmp::Ordering::Less => {
                        before.next();
                        moved = true;
                    }
                    std::cmp::Ordering::Equal => {
                        last = before.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            let parsed = match last {
                Some(mut last) if unchanged(&last.object, object) => {
                    // The newest `Arc`, so the next comparison is a pointer comparison.
                    last.object = Arc::clone(object);
                    last
                }
                _ => {
                    self.reads += 1;
                    moved = true;
                    Parsed {
                        object: Arc::clone(object),
                        result: ForwarderObject::from_object(object).map(Arc::new),
                    }
                }
            };
            out.push((object, parsed.result.clone()));
            self.entries.push(parsed);
        }
        self.moved = moved || before.next().is_some();
        out
    }

    /// Whether the last [`Self::read`] read an object (new or changed) or forgot one: when it
    /// did not, it gave what the one before gave.
    pub fn moved(&self) -> bool {
        self.moved
    }

    /// How many objects were deserialised so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }
}

/// Whether `new` reads as `old` did (see [`ParseCache`]).
fn unchanged(old: &Arc<Object>, new: &Arc<Object>) -> bool {
    if Arc::ptr_eq(old, new) {
        return true;
    }
    fn read(o: &Object) -> [Option<&serde_json::Value>; 4] {
        let meta = o.raw.get("metadata");
        [
            meta.and_then(|m| m.get("uid")),
            meta.and_then(|m| m.get("creationTimestamp")),
            meta.and_then(|m| m.get("generation")),
            o.raw.get("spec"),
        ]
    }
    old.namespace == new.namespace && old.name == new.name && read(old) == read(new)
}

fn listeners_of(spec: &ForwarderSpec) -> impl Iterator<Item = (Transport, &ForwardPort)> {
    [(Transport::Udp, &spec.udp), (Transport::Tcp, &spec.tcp)]
        .into_iter()
        .filter_map(|(t, p)| Some((t, p.as_ref()?)))
}

/// `metadata.uid`, or empty.
pub fn uid_of(o: &Object) -> String {
    o.raw
        .pointer("/metadata/uid")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Whether `o` is a `Forwarder`.
pub fn is_forwarder(o: &Object) -> bool {
    crate::crd::forwarder::is_forwarder(&o.api_version, &o.kind)
}

/// Why a forwarder listener may not have its port: the port rule ([`ports`]) gives it to
/// another (one of the proxy's own ports, an older forwarder or Gateway listener).
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("{refusal}")]
pub struct PortTaken {
    /// The port rule's refusal, naming the port and its holder: `udp/7000 is held by forwarder
    /// relay (older)`.
    pub refusal: String,
}

/// One listener a forwarder asks for, and whether it may have its port.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The forwarder.
    pub forwarder: Arc<ForwarderObject>,
    /// Transport.
    pub transport: Transport,
    /// What it asks for.
    pub port: ForwardPort,
    /// `Err(why)` when the port is someone else's.
    pub verdict: Result<(), PortTaken>,
}

impl PartialEq for Claim {
    fn eq(&self, other: &Self) -> bool {
        // An unchanged forwarder is the same `Arc` from one plan to the next.
        (Arc::ptr_eq(&self.forwarder, &other.forwarder) || self.forwarder == other.forwarder)
            && self.transport == other.transport
            && self.port == other.port
            && self.verdict == other.verdict
    }
}

impl Claim {
    /// `udp/27015`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.transport.as_str(), self.port.listen_port)
    }
}

/// Gives every forwarder listener its port by the port rule ([`ports`]): a port the proxy holds
/// itself (`reserved`), or an older forwarder or Gateway listener (`others`: the Gateway
/// listeners' claims) holds, is refused with the holder's name. Claims come back oldest
/// forwarder first (creationTimestamp, then name).
pub fn claims(
    forwarders: &[Arc<ForwarderObject>],
    reserved: &[Reserved],
    others: &[ports::Claim],
) -> Vec<Claim> {
    let mut order: Vec<&Arc<ForwarderObject>> = forwarders.iter().collect();
    order.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });
    let mine: Vec<(&Arc<ForwarderObject>, Transport, &ForwardPort, ports::Claim)> = order
        .into_iter()
        .flat_map(|f| {
            f.listeners()
                .map(move |(transport, port)| (f, transport, port, f.port_claim(transport, port)))
        })
        .collect();
    let all: Vec<&ports::Claim> = mine.iter().map(|m| &m.3).chain(others).collect();
    let verdicts = ports::assign(reserved, &all);
    mine.iter()
        .zip(verdicts)
        .map(|((forwarder, transport, port, claim), verdict)| Claim {
            forwarder: Arc::clone(forwarder),
            transport: *transport,
            port: (*port).clone(),
            verdict: verdict.map_err(|holder| PortTaken {
                refusal: holder.refusal(claim),
            }),
        })
        .collect()
}

pub use crate::reconcile::status::service_ports::{ServicePort, live_ports};

/// The ports the Service of `protocol` carries: one per granted listener of that protocol.
/// `shared` says one Service carries both protocols, so names get a protocol suffix to stay
/// unique. A forwarder whose name cannot be a port name (a DNS label) is left out and named
/// in the second list.
pub fn service_ports(
    claims: &[Claim],
    protocol: Transport,
    shared: bool,
) -> (Vec<ServicePort>, Vec<(String, String)>) {
    let mut ports = Vec::new();
    let mut refused = Vec::new();
    for c in claims
        .iter()
        .filter(|c| c.transport == protocol && c.verdict.is_ok())
    {
        let name = if shared {
            format!("{}-{}", c.forwarder.name, protocol.as_str())
        } else {
            c.forwarder.name.clone()
        };
        if is_dns_label(&name) {
            ports.push(ServicePort {
                port: c.port.listen_port,
                protocol,
                name,
            });
        } else {
            refused.push((
                c.forwarder.name.clone(),
                format!(
                    "{} has no Service port: `{name}` is not a valid port name (at most 63 \
                     lowercase letters, digits and `-`)",
                    c.label()
                ),
            ));
        }
    }
    ports.sort();
    (ports, refused)
}

/// Leaves out of `wanted` the ports that clash with a port the Service has now (`live`) that
/// is not one of `wanted`: the same port and protocol under another name, or the same name on
/// another port. Such a live port is the operator's (or one of ours on its way out, which the
/// apply of the rest removes, so the left-out port gets in on the next pass). Returns the ports
/// to apply and, for each left out, why.
pub fn leave_out_taken(
    wanted: Vec<ServicePort>,
    live: &[ServicePort],
) -> (Vec<ServicePort>, Vec<(ServicePort, String)>) {
    let others: Vec<&ServicePort> = live.iter().filter(|l| !wanted.contains(l)).collect();
    let mut apply = Vec::new();
    let mut left_out = Vec::new();
    for port in wanted {
        let clash = others
            .iter()
            .find(|o| (o.port == port.port && o.protocol == port.protocol) || o.name == port.name);
        match clash {
            Some(o) => {
                let why = format!(
                    "the port {}/{} named `{}` there",
                    o.port,
                    o.protocol.as_str().to_ascii_uppercase(),
                    o.name
                );
                left_out.push((port, why));
            }
            None => apply.push(port),
        }
    }
    (apply, left_out)
}

/// An RFC 1123 label: 1–63 lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(yaml: &str) -> Object {
        Object::from_value(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn forwarder(name: &str, created: &str, spec: &str) -> Arc<ForwarderObject> {
        Arc::new(
            ForwarderObject::from_object(&object(&format!(
                "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: {name}, namespace: ns, \
                 creationTimestamp: \"{created}\", generation: 2}}\nspec: {spec}\n"
            )))
            .unwrap(),
        )
    }

    fn reserved() -> Vec<Reserved> {
        vec![Reserved {
            transport: Transport::Tcp,
            port: 9000,
            holder: "the query port".into(),
        }]
    }

    #[test]
    fn the_older_forwarder_keeps_a_contested_port() {
        let f = [
            forwarder(
                "young",
                "2026-01-02T00:00:00Z",
                "{udp: {listenPort: 5000, targetHost: a, targetPort: 1}}",
            ),
            forwarder(
                "old",
                "2026-01-01T00:00:00Z",
                "{udp: {listenPort: 5000, targetHost: b, targetPort: 1}, tcp: {listenPort: 5000, targetHost: b, targetPort: 1}}",
            ),
        ];
        let c = claims(&f, &reserved(), &[]);
        let verdicts: Vec<(&str, String, Result<(), String>)> = c
            .iter()
            .map(|c| {
                let verdict = c.verdict.clone().map_err(|e| e.to_string());
                (c.forwarder.name.as_str(), c.label(), verdict)
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                ("old", "udp/5000".into(), Ok(())),
                ("old", "tcp/5000".into(), Ok(())),
                (
                    "young",
                    "udp/5000".into(),
                    Err("udp/5000 is held by forwarder old (older)".into())
                ),
            ]
        );
        assert_eq!(c[0].forwarder.generation, Some(2));
    }

    #[test]
    fn same_age_goes_by_name_and_the_proxys_own_ports_are_refused() {
        let f = [
            forwarder(
                "b",
                "",
                "{udp: {listenPort: 6000, targetHost: x, targetPort: 1}}",
            ),
            forwarder(
                "a",
                "",
                "{udp: {listenPort: 6000, targetHost: x, targetPort: 1}, tcp: {listenPort: 9000, targetHost: x, targetPort: 1}}",
            ),
        ];
        let c = claims(&f, &reserved(), &[]);
        assert_eq!(c[0].forwarder.name, "a");
        let refusal = |c: &Claim| c.verdict.as_ref().unwrap_err().to_string();
        assert_eq!(c[0].verdict, Ok(()));
        assert_eq!(
            refusal(&c[1]),
            "tcp/9000 is held by the query port",
            "UDP 9000 would be free: ports are per protocol"
        );
        assert_eq!(
            refusal(&c[2]),
            "udp/6000 is held by forwarder a (as old, and first by kind and name)"
        );
    }

    #[test]
    fn an_older_gateway_listener_keeps_its_port_and_a_younger_one_gives_it_up() {
        let listener = |created: &str, port: u16| ports::Claim {
            created: created.into(),
            kind: Kind::Gateway,
            namespace: "ns".into(),
            name: "edge".into(),
            listener: "voice".into(),
            transport: Transport::Udp,
            port,
        };
        let f = [forwarder(
            "relay",
            "2026-01-02T00:00:00Z",
            "{udp: {listenPort: 7000, targetHost: x, targetPort: 1}, tcp: {listenPort: 7001, targetHost: x, targetPort: 1}}",
        )];
        let older = [
            listener("2026-01-01T00:00:00Z", 7000),
            listener("2026-01-01T00:00:00Z", 7001),
        ];
        let c = claims(&f, &[], &older);
        assert_eq!(
            c[0].verdict,
            Err(PortTaken {
                refusal: "udp/7000 is held by Gateway ns/edge listener voice (older)".into()
            })
        );
        assert_eq!(c[1].verdict, Ok(()), "tcp/7001 is not udp/7001");
        let (udp, _) = service_ports(&c, Transport::Udp, false);
        assert!(udp.is_empty(), "the loser gets no Service port either");
        let younger = [listener("2026-01-03T00:00:00Z", 7000)];
        assert!(claims(&f, &[], &younger).iter().all(|c| c.verdict.is_ok()));
    }

    #[test]
    fn a_refused_claim_holds_nothing() {
        // `b` loses tcp/9000 to the proxy; `c` may then have udp/7000 which only `b` wanted
        // over tcp: nothing refused is counted as held.
        let f = [
            forwarder(
                "b",
                "1",
                "{tcp: {listenPort: 9000, targetHost: x, targetPort: 1}}",
            ),
            forwarder(
                "c",
                "2",
                "{tcp: {listenPort: 9000, targetHost: x, targetPort: 1}}",
            ),
        ];
        let c = claims(&f, &reserved(), &[]);
        assert!(c.iter().all(|c| {
            c.verdict
                .as_ref()
                .unwrap_err()
                .refusal
                .contains("query port")
        }));
    }

    #[test]
    fn objects_are_checked_field_by_field() {
        let bad = |spec: &str| {
            ForwarderObject::from_object(&object(&format!(
                "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: f}}\nspec: {spec}\n"
            )))
            .unwrap_err()
            .to_string()
        };
        assert_eq!(bad("{}"), "spec: neither udp nor tcp is given");
        assert_eq!(
            bad("{udp: {listenPort: 0, targetHost: a, targetPort: 1}}"),
            "spec.udp.listenPort: must be 1 to 65535"
        );
        assert!(
            bad("{tcp: {listenPort: 70000, targetHost: a, targetPort: 1}}").starts_with("spec: ")
        );
        assert!(bad("{udp: {listenPort: 1, targetPort: 1}}").contains("targetHost"));
        assert_eq!(
            bad("{udp: {listenPort: 1, targetHost: \"\", targetPort: 1}}"),
            "spec.udp.targetHost: must be 1 to 253 characters"
        );
        assert_eq!(
            bad("{tcp: {listenPort: 1, targetHost: a, targetPort: 1, idleTimeoutSeconds: 0}}"),
            "spec.tcp.idleTimeoutSeconds: must be 1 to 31536000, not 0"
        );
        assert_eq!(
            bad("{udp: {listenPort: 1, targetHost: a, targetPort: 1, \
                 idleTimeoutSeconds: 9223372036854775808}}"),
            "spec.udp.idleTimeoutSeconds: must be 1 to 31536000, not 9223372036854775808"
        );
    }

    #[test]
    fn service_ports_follow_the_granted_listeners() {
        let f = [
            forwarder(
                "game-1",
                "1",
                "{udp: {listenPort: 27015, targetHost: x, targetPort: 1}, tcp: {listenPort: 27015, targetHost: x, targetPort: 1}}",
            ),
            forwarder(
                "game-2",
                "2",
                "{udp: {listenPort: 27015, targetHost: x, targetPort: 1}}",
            ),
            forwarder(
                "Bad.Name",
                "3",
                "{udp: {listenPort: 27016, targetHost: x, targetPort: 1}}",
            ),
        ];
        let c = claims(&f, &[], &[]);
        let (udp, refused) = service_ports(&c, Transport::Udp, false);
        assert_eq!(
            udp,
            [ServicePort {
                port: 27015,
                protocol: Transport::Udp,
                name: "game-1".into()
            }],
            "the loser of a conflict gets no port"
        );
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "Bad.Name");
        let (tcp, _) = service_ports(&c, Transport::Tcp, true);
        assert_eq!(tcp[0].name, "game-1-tcp");
    }

    #[test]
    fn ports_the_service_has_under_other_names_are_left_out() {
        let port = |name: &str, port: u16, protocol| ServicePort {
            port,
            protocol,
            name: name.into(),
        };
        let wanted = vec![
            port("game-1", 27015, Transport::Udp),
            port("game-2", 27016, Transport::Udp),
            port("query", 27017, Transport::Udp),
            port("game-4", 9000, Transport::Udp),
        ];
        let live = [
            port("game-1", 27015, Transport::Udp), // ours already
            port("admin", 27016, Transport::Udp),  // the operator's, same port
            port("query", 9000, Transport::Tcp),   // the operator's, same name
        ];
        let (apply, left_out) = leave_out_taken(wanted, &live);
        assert_eq!(
            apply,
            [
                port("game-1", 27015, Transport::Udp),
                port("game-4", 9000, Transport::Udp)
            ],
            "9000/UDP is not 9000/TCP"
        );
        assert_eq!(left_out.len(), 2);
        assert_eq!(left_out[0].0.name, "game-2");
        assert_eq!(left_out[0].1, "the port 27016/UDP named `admin` there");
        assert_eq!(left_out[1].0.name, "query");
    }

    #[test]
    fn an_object_is_read_again_only_when_what_it_reads_changed() {
        let at = |version: &str, port: u16, status: &str| {
            Arc::new(object(&format!(
                "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: f, namespace: ns, \
                 uid: u1, resourceVersion: \"{version}\", generation: 1}}\nspec: {{udp: \
                 {{listenPort: {port}, targetHost: a, targetPort: 1}}}}\nstatus: {status}\n"
            )))
        };
        let bad = Arc::new(object(&format!(
            "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: g, namespace: ns}}\n\
             spec: {{}}\n"
        )));
        let mut cache = ParseCache::default();
        let first = at("1", 7000, "{}");
        let read = cache.read([&first, &bad]);
        assert_eq!(cache.reads(), 2);
        assert!(cache.moved());
        let parsed = Arc::clone(read[0].1.as_ref().unwrap());
        assert!(
            read[1].1.is_err(),
            "an object that does not read is kept too"
        );

        // The same Arcs: nothing is read.
        let again = cache.read([&first, &bad]);
        assert_eq!(cache.reads(), 2);
        assert!(!cache.moved());
        assert!(Arc::ptr_eq(again[0].1.as_ref().unwrap(), &parsed));
        // Another Arc of an equal object (a file reloaded), or a status written (a new
        // resourceVersion, the same spec): nothing is read.
        cache.read([&at("1", 7000, "{}"), &bad]);
        cache.read([&at("2", 7000, "{instances: [{node: n}]}"), &bad]);
        assert_eq!(cache.reads(), 2);
        assert!(!cache.moved());
        // The spec changed: read again.
        let third = at("3", 7001, "{}");
        let changed = cache.read([&third, &bad]);
        assert_eq!(cache.reads(), 3);
        assert!(cache.moved());
        assert_eq!(
            changed[0]
                .1
                .as_ref()
                .unwrap()
                .spec
                .udp
                .as_ref()
                .unwrap()
                .listen_port,
            7001
        );
        // Gone, then back: forgotten, so read anew.
        cache.read([&bad]);
        assert!(cache.moved(), "forgetting one moves too");
        cache.read([&at("3", 7001, "{}"), &bad]);
        assert_eq!(cache.reads(), 4);
        // Out of the inventory's order: read again, and right.
        let (a, b) = (at("3", 7001, "{}"), Arc::clone(&bad));
        let read = cache.read([&b, &a]);
        assert_eq!(
            (read[0].0.name.as_str(), read[1].0.name.as_str()),
            ("g", "f")
        );
        assert!(read[0].1.is_err() && read[1].1.is_ok());
        // Re-created under the same name: another uid is another object.
        let recreated = Arc::new(object(&format!(
            "apiVersion: {API_VERSION}\nkind: Forwarder\nmetadata: {{name: f, namespace: ns, \
             uid: u2, resourceVersion: \"9\", generation: 1}}\nspec: {{udp: \
             {{listenPort: 7001, targetHost: a, targetPort: 1}}}}\n"
        )));
        let read = cache.read([&recreated]);
        assert_eq!(cache.reads(), 6, "f out of order, then f re-created");
        assert_eq!(read[0].1.as_ref().unwrap().uid, "u2");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("game-1"));
        assert!(is_dns_label("a"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}
