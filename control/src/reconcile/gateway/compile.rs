//! What the Gateway API objects ask of this proxy, decided without I/O: which GatewayClasses are
//! ours, which Gateway listeners to open, which routes attach to which listeners (by
//! `parentRefs`, `sectionName`/`port`, protocol and `allowedRoutes`), and the attached routes
//! turned into [`RouteObject`]s for the shared route compile, with ReferenceGrants deciding
//! cross-namespace backends.
//!
//! A Gateway's listeners are read one by one: one that cannot be read (a port out of range, no
//! name, a name used twice, a field of the wrong shape) is kept as an [`InvalidListener`], whose
//! status says why, while the Gateway's other listeners open and serve. What cannot be read is
//! handed to the reconciler as problems, which [`Logged`] lets it log once per change rather
//! than on every pass.

use std::collections::BTreeMap;
use std::sync::Arc;

use dataplane::{Match, Transport};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::gateway::{
    AllowedRoutes, GROUP, GatewayClassSpec, GatewayListener, GatewaySpec, L4Rule, ParentReference,
    ReferenceGrantSpec,
};
use crate::crd::{RouteBackendRef, RouteRule, RouteSpec, ServicePortRef};
use crate::inventory::Object;
use crate::reconcile::ports;
use crate::reconcile::route::RouteObject;

/// A UDPRoute or a TCPRoute.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum RouteKind {
    /// `UDPRoute`, for `UDP` listeners.
    Udp,
    /// `TCPRoute`, for `TCP` listeners.
    Tcp,
}

impl RouteKind {
    /// The kind's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "UDPRoute",
            Self::Tcp => "TCPRoute",
        }
    }

    /// The transport of the listeners it attaches to.
    pub const fn transport(self) -> Transport {
        match self {
            Self::Udp => Transport::Udp,
            Self::Tcp => Transport::Tcp,
        }
    }
}

/// An object's identity and generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    /// Namespace (empty for GatewayClasses).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp` (empty when unset).
    pub created: String,
}

/// A route of either kind.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Route {
    /// Which kind.
    pub kind: RouteKind,
    /// Identity (its creationTimestamp included).
    pub meta: Meta,
    /// Its parents.
    pub parent_refs: Vec<ParentReference>,
    /// Its rules.
    pub rules: Vec<L4Rule>,
}

/// The Gateway API objects, typed (objects that do not read are skipped, and said in
/// `skipped`).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// GatewayClasses.
    pub classes: Vec<(Meta, GatewayClassSpec)>,
    /// Gateways, with the listeners that read (the others are in `invalid_listeners`).
    pub gateways: Vec<(Meta, GatewaySpec)>,
    /// Listeners of those Gateways that cannot be served as written.
    pub invalid_listeners: Vec<InvalidListener>,
    /// UDPRoutes and TCPRoutes.
    pub routes: Vec<L4Route>,
    /// ReferenceGrants.
    pub grants: Vec<(Meta, ReferenceGrantSpec)>,
    /// Objects left out because they do not read: (`Kind namespace/name`, why).
    pub skipped: Vec<(String, SpecError)>,
}

/// Why a Gateway API object's spec does not read, naming the field: its `Display` is what the
/// log says of the skipped object.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SpecError {
    /// No `spec` at all.
    #[error("spec: missing")]
    Missing,
    /// A `spec` of the wrong shape, as serde reads it.
    #[error("spec: {source}")]
    Malformed {
        /// What serde says, naming the field (shared, so a [`Model`] stays cheap to clone).
        source: Arc<serde_json::Error>,
    },
    /// A field the reading needs is absent, or of another type.
    #[error("spec.{field}: missing, or not {expected}")]
    Field {
        /// Its name under `spec`: `gatewayClassName`.
        field: &'static str,
        /// What it must be: `a string`.
        expected: &'static str,
    },
}

impl From<serde_json::Error> for SpecError {
    fn from(source: serde_json::Error) -> Self {
        Self::Malformed {
            source: Arc::new(source),
        }
    }
}

/// A Gateway listener that cannot be served as written, kept so that its status says why.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct InvalidListener {
    /// The Gateway (namespace, name).
    pub gateway: (String, String),
    /// Its place in `spec.listeners`.
    pub index: usize,
    /// Its name, when it has one of its own: a listener's status entry is keyed by name, so
    /// one with no name, or a name an earlier listener has, has none (its Gateway says why).
    pub name: Option<String>,
    /// Why, naming the field.
    pub why: String,
}

impl InvalidListener {
    /// `listener voice` or `listeners[2]`, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("listener {name}"),
            None => format!("listeners[{}]", self.index),
        }
    }
}

fn meta(o: &Object) -> Meta {
    Meta {
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        generation: o
            .raw
            .pointer("/metadata/generation")
            .and_then(Value::as_i64),
        created: o
            .raw
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    }
}

/// An object's typed spec; the error names the field.
fn spec<T: DeserializeOwned>(o: &Object) -> Result<T, SpecError> {
    let spec = o.raw.get("spec").ok_or(SpecError::Missing)?;
    Ok(serde_json::from_value(spec.clone())?)
}

/// A Gateway's spec with the listeners that read, and those that do not.
fn gateway_spec(o: &Object) -> Result<(GatewaySpec, Vec<InvalidListener>), SpecError> {
    let spec = o.raw.get("spec").ok_or(SpecError::Missing)?;
    let class = spec
        .get("gatewayClassName")
        .and_then(Value::as_str)
        .ok_or(SpecError::Field {
            field: "gatewayClassName",
            expected: "a string",
        })?;
    let entries = spec
        .get("listeners")
        .and_then(Value::as_array)
        .ok_or(SpecError::Field {
            field: "listeners",
            expected: "a list",
        })?;
    let mut listeners: Vec<GatewayListener> = Vec::new();
    let mut invalid = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let refused = |name: Option<String>, why: String| InvalidListener {
            gateway: (o.namespace.clone(), o.name.clone()),
            index,
            name,
            why,
        };
        match listener(entry) {
            Ok(l)
                if listeners.iter().any(|e| e.name == l.name)
                    || invalid
                        .iter()
                        .any(|i: &InvalidListener| i.name.as_ref() == Some(&l.name)) =>
            {
                let why = format!("name: `{}` is an earlier listener's", l.name);
                invalid.push(refused(None, why));
            }
            Ok(l) => listeners.push(l),
            Err((name, why)) => {
                // A name an earlier listener has cannot key a status entry of its own.
                let name = name.filter(|n| {
                    !listeners.iter().any(|e| e.name == *n)
                        && !invalid.iter().any(|i| i.name.as_ref() == Some(n))
                });
                invalid.push(refused(name, why));
            }
        }
    }
    let gateway = GatewaySpec {
        gateway_class_name: class.to_string(),
        listeners,
    };
    Ok((gateway, invalid))
}

/// One entry of `spec.listeners`, checked field by field; the error carries its name when it
/// has one, and why it cannot be served, naming the field.
fn listener(entry: &Value) -> Result<GatewayListener, (Option<String>, String)> {
    let name = match entry.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err((None, "name: missing, or not a string".into())),
    };
    let port = match entry.get("port") {
        Some(p) => match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => p,
            _ => {
                let why = format!("port: {p} is not a port (1 to 65535)");
                return Err((Some(name), why));
            }
        },
        None => return Err((Some(name), "port: missing".into())),
    };
    let Some(protocol) = entry.get("protocol").and_then(Value::as_str) else {
        return Err((Some(name), "protocol: missing, or not a string".into()));
    };
    let allowed_routes = match entry.get("allowedRoutes") {
        None | Some(Value::Null) => None,
        Some(a) => Some(
            serde_json::from_value::<AllowedRoutes>(a.clone())
                .map_err(|e| (Some(name.clone()), format!("allowedRoutes: {e}")))?,
        ),
    };
    Ok(GatewayListener {
        name,
        port,
        protocol: protocol.to_string(),
        allowed_routes,
    })
}

impl Model {
    /// Reads the inventory's Gateway API objects.
    pub fn read(objects: &[Arc<Object>]) -> Self {
        let mut m = Self::default();
        for o in objects {
            let read: Result<(), SpecError> = match o.kind.as_str() {
                "GatewayClass" => spec(o).map(|s| m.classes.push((meta(o), s))),
                "Gateway" => gateway_spec(o).map(|(s, invalid)| {
                    m.gateways.push((meta(o), s));
                    m.invalid_listeners.extend(invalid);
                }),
                "ReferenceGrant" => spec(o).map(|s| m.grants.push((meta(o), s))),
                "UDPRoute" | "TCPRoute" => {
                    let kind = if o.kind == "UDPRoute" {
                        RouteKind::Udp
                    } else {
                        RouteKind::Tcp
                    };
                    #[derive(serde::Deserialize)]
                    #[serde(rename_all = "camelCase")]
                    struct L4Spec {
                        #[serde(default)]
                        parent_refs: Vec<ParentReference>,
                        #[serde(default)]
                        rules: Vec<L4Rule>,
                    }
                    spec::<L4Spec>(o).map(|s| {
                        m.routes.push(L4Route {
                            kind,
                            meta: meta(o),
                            parent_refs: s.parent_refs,
                            rules: s.rules,
                        });
                    })
                }
                _ => Ok(()),
            };
            if let Err(e) = read {
                let subject = format!("{} {}/{}", o.kind, o.namespace, o.name);
                m.skipped.push((subject, e));
            }
        }
        m
    }

    /// Whether a ReferenceGrant in `to_namespace` lets routes of `kind` in `from_namespace`
    /// refer to Service `service` there.
    pub fn granted(
        &self,
        kind: RouteKind,
        from_namespace: &str,
        to_namespace: &str,
        service: &str,
    ) -> bool {
        self.grants.iter().any(|(m, g)| {
            m.namespace == to_namespace
                && g.from.iter().any(|f| {
                    f.group == GROUP && f.kind == kind.as_str() && f.namespace == from_namespace
                })
                && g.to.iter().any(|t| {
                    t.group.as_deref().unwrap_or_default().is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n == service)
                })
        })
    }
}

/// A listener to open: `namespace/gateway/listener` is its key and entry point name.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Listener {
    /// `namespace/gateway/listener`.
    pub key: String,
    /// The Gateway.
    pub gateway: (String, String),
    /// The listener's name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Transport.
    pub transport: Transport,
    /// `allowedRoutes.namespaces.from: All`.
    pub from_all: bool,
    /// Its Gateway's `metadata.creationTimestamp`: how old its claim to the port is.
    pub created: String,
}

impl Listener {
    /// Its claim to its port, as the port rule ([`ports`]) weighs it.
    pub fn port_claim(&self) -> ports::Claim {
        ports::Claim {
            created: self.created.clone(),
            kind: ports::Kind::Gateway,
            namespace: self.gateway.0.clone(),
            name: self.gateway.1.clone(),
            listener: self.name.clone(),
            transport: self.transport,
            port: self.port,
        }
    }
}

/// Whether a route attached to one of its parents, and whether its backends resolve.
#[derive(Clone, Debug, PartialEq)]
pub struct Attachment {
    /// The route.
    pub kind: RouteKind,
    /// Its identity.
    pub route: Meta,
    /// The parent reference, as written.
    pub parent: ParentReference,
    /// Keys of the listeners it attached to (empty: not accepted).
    pub listeners: Vec<String>,
    /// `Err((reason, message))` when not accepted.
    pub accepted: Result<(), (&'static str, String)>,
    /// A backendRef names something other than a core Service (its share is dropped).
    pub invalid_kind: bool,
}

/// What the objects ask for.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Our GatewayClasses, by name.
    pub classes: Vec<Meta>,
    /// Our Gateways (with the listeners that read).
    pub gateways: Vec<(Meta, GatewaySpec)>,
    /// Their UDP and TCP listeners.
    pub listeners: Vec<Listener>,
    /// Their listeners that cannot be served as written (not opened; their status says why).
    pub invalid_listeners: Vec<InvalidListener>,
    /// Every (route, parent) that names one of our Gateways.
    pub attachments: Vec<Attachment>,
    /// The attached routes as route objects, one per (route, listener).
    pub route_objects: Vec<RouteObject>,
}

/// Decides what `model` asks of the controller `controller`.
pub fn plan(model: &Model, controller: &str) -> Plan {
    let mut out = Plan::default();
    for (m, class) in &model.classes {
        if class.controller_name == controller {
            out.classes.push(m.clone());
        }
    }
    for (m, gw) in &model.gateways {
        if !out.classes.iter().any(|c| c.name == gw.gateway_class_name) {
            continue;
        }
        for l in &gw.listeners {
            let transport = match l.protocol.as_str() {
                "UDP" => Transport::Udp,
                "TCP" => Transport::Tcp,
                _ => continue,
            };
            out.listeners.push(Listener {
                key: format!("{}/{}/{}", m.namespace, m.name, l.name),
                gateway: (m.namespace.clone(), m.name.clone()),
                name: l.name.clone(),
                port: l.port,
                transport,
                from_all: l
                    .allowed_routes
                    .as_ref()
                    .and_then(|a| a.namespaces.as_ref())
                    .and_then(|n| n.from.as_deref())
                    == Some("All"),
                created: m.created.clone(),
            });
        }
        out.invalid_listeners.extend(
            model
                .invalid_listeners
                .iter()
                .filter(|l| l.gateway.0 == m.namespace && l.gateway.1 == m.name)
                .cloned(),
        );
        out.gateways.push((m.clone(), gw.clone()));
    }
    for route in &model.routes {
        for parent in &route.parent_refs {
            let group = parent.group.as_deref().unwrap_or(GROUP);
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            let namespace = parent.namespace.as_deref().unwrap_or(&route.meta.namespace);
            if group != GROUP
                || kind != "Gateway"
                || !out
                    .gateways
                    .iter()
                    .any(|(m, _)| m.namespace == namespace && m.name == parent.name)
            {
                continue; // not ours to speak for
            }
            let candidates: Vec<&Listener> = out
                .listeners
                .iter()
                .filter(|l| l.gateway.0 == namespace && l.gateway.1 == parent.name)
                .filter(|l| parent.section_name.as_ref().is_none_or(|s| *s == l.name))
                .filter(|l| parent.port.is_none_or(|p| p == l.port))
                .filter(|l| l.transport == route.kind.transport())
                .collect();
            let allowed: Vec<&Listener> = candidates
                .iter()
                .copied()
                .filter(|l| l.from_all || l.gateway.0 == route.meta.namespace)
                .collect();
            let accepted = if !allowed.is_empty() {
                Ok(())
            } else if !candidates.is_empty() {
                Err((
                    "NotAllowedByListeners",
                    "the listener takes routes from its own namespace only".to_string(),
                ))
            } else {
                Err((
                    "NoMatchingParent",
                    format!(
                        "no {} listener of Gateway {namespace}/{} matches",
                        route.kind.transport().as_str().to_ascii_uppercase(),
                        parent.name
                    ),
                ))
            };
            for l in &allowed {
                out.route_objects.push(as_route_object(route, &l.key));
            }
            out.attachments.push(Attachment {
                kind: route.kind,
                route: route.meta.clone(),
                parent: parent.clone(),
                listeners: allowed.iter().map(|l| l.key.clone()).collect(),
                accepted,
                invalid_kind: route
                    .rules
                    .iter()
                    .flat_map(|r| &r.backend_refs)
                    .any(|b| !is_service(b)),
            });
        }
    }
    out
}

/// An attached route as the route compile takes it: one rule per route rule, every client
/// matched (the API's L4 routes have no match), backends by Service port number.
fn as_route_object(route: &L4Route, listener: &str) -> RouteObject {
    let rules: Vec<RouteRule> = route
        .rules
        .iter()
        .map(|r| RouteRule {
            matcher: None,
            backends: r
                .backend_refs
                .iter()
                // A ref to anything but a Service resolves to no Service: its share drops.
                .map(|b| RouteBackendRef {
                    service: if is_service(b) {
                        b.name.clone()
                    } else {
                        String::new()
                    },
                    namespace: b.namespace.clone(),
                    port: ServicePortRef::Number(b.port.unwrap_or(0)),
                    weight: b.weight.unwrap_or(1),
                })
                .collect(),
        })
        .collect();
    RouteObject {
        namespace: route.meta.namespace.clone(),
        name: format!(
            "{}/{}",
            route.kind.as_str().to_ascii_lowercase(),
            route.meta.name
        ),
        uid: String::new(),
        created: route.meta.created.clone(),
        generation: route.meta.generation,
        matches: vec![Match::default(); rules.len()],
        spec: RouteSpec {
            entry_point: listener.to_string(),
            session_timeout_seconds: None,
            proxy_protocol: crate::crd::ProxyProtocol::None,
            rules,
        },
    }
}

/// The ports claimed by the listeners of the Gateways `controller` serves among `objects` (the
/// Gateway API objects; routes are not read): what forwarders are weighed against. The same
/// listeners as [`plan`]'s.
pub fn served_port_claims(objects: &[Arc<Object>], controller: &str) -> Vec<ports::Claim> {
    let gateways: Vec<Arc<Object>> = objects
        .iter()
        .filter(|o| matches!(o.kind.as_str(), "GatewayClass" | "Gateway"))
        .cloned()
        .collect();
    plan(&Model::read(&gateways), controller)
        .listeners
        .iter()
        .map(Listener::port_claim)
        .collect()
}

/// Whether a backendRef names a core Service (the kind served).
fn is_service(b: &crate::crd::gateway::BackendRef) -> bool {
    b.group.as_deref().unwrap_or("").is_empty()
        && b.kind.as_deref().unwrap_or("Service") == "Service"
}

/// What to say in the log, by subject: objects that do not read, our Gateways' listeners that
/// cannot be served as written, and listeners that did not open (`not_opened`: key, why).
pub fn problems<'a, W: std::fmt::Display + 'a>(
    model: &Model,
    plan: &Plan,
    not_opened: impl IntoIterator<Item = (&'a String, &'a W)>,
) -> BTreeMap<String, String> {
    let skipped = model
        .skipped
        .iter()
        .map(|(subject, why)| (subject.clone(), format!("skipped: {why}")));
    let invalid = plan.invalid_listeners.iter().map(|l| {
        let subject = format!("Gateway {}/{} {}", l.gateway.0, l.gateway.1, l.label());
        (subject, format!("not served: {}", l.why))
    });
    let closed = not_opened.into_iter().map(|(key, why)| {
        (
            format!("gateway listener {key}"),
            format!("not open: {why}"),
        )
    });
    skipped.chain(invalid).chain(closed).collect()
}

/// The problems last logged, by subject (`Gateway games/edge listener voice`), so that a
/// problem that lasts is logged when it appears or its text changes, not on every pass.
#[derive(Debug, Default)]
pub struct Logged {
    last: BTreeMap<String, String>,
}

impl Logged {
    /// Takes this pass's problems; returns those to log now (new, or changed since logged),
    /// and the subjects whose problem is gone. What is gone is forgotten, so its return is
    /// logged again.
    pub fn changes(
        &mut self,
        now: BTreeMap<String, String>,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let fresh = now
            .iter()
            .filter(|(subject, why)| self.last.get(*subject) != Some(*why))
            .map(|(s, w)| (s.clone(), w.clone()))
            .collect();
        let gone = self
            .last
            .keys()
            .filter(|s| !now.contains_key(*s))
            .cloned()
            .collect();
        self.last = now;
        (fresh, gone)
    }
}

/// Routes attached per listener key, for `attachedRoutes`.
pub fn attached_counts(plan: &Plan) -> BTreeMap<String, i32> {
    let mut counts: BTreeMap<String, i32> = BTreeMap::new();
    for a in &plan.attachments {
        for l in &a.listeners {
            *counts.entry(l.clone()).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Model {
        let values: Vec<Value> = serde_yaml::from_str(yaml).unwrap();
        let objects: Vec<Arc<Object>> = values
            .into_iter()
            .map(|v| Arc::new(Object::from_value(v).unwrap()))
            .collect();
        Model::read(&objects)
    }

    const OBJECTS: &str = r#"
- {apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {name: ours}, spec: {controllerName: udp-director.dev/gateway-controller}}
- {apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {name: theirs}, spec: {controllerName: example.com/other}}
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: edge, namespace: infra}
  spec:
    gatewayClassName: ours
    listeners:
    - {name: voice, port: 9001, protocol: UDP}
    - {name: chat, port: 9002, protocol: TCP, allowedRoutes: {namespaces: {from: All}}}
    - {name: web, port: 80, protocol: HTTP}
- {apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: other, namespace: infra}, spec: {gatewayClassName: theirs, listeners: [{name: x, port: 1, protocol: UDP}]}}
- apiVersion: gateway.networking.k8s.io/v1
  kind: UDPRoute
  metadata: {name: voice, namespace: infra}
  spec:
    parentRefs: [{name: edge, sectionName: voice}, {name: other}]
    rules: [{backendRefs: [{name: voice-eu, port: 5000, weight: 3}, {name: voice-us, namespace: games, port: 5000}]}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: UDPRoute
  metadata: {name: stranger, namespace: games}
  spec: {parentRefs: [{name: edge, namespace: infra, sectionName: voice}], rules: [{backendRefs: [{name: s, port: 1}]}]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: TCPRoute
  metadata: {name: chat, namespace: games}
  spec: {parentRefs: [{name: edge, namespace: infra, port: 9002}], rules: [{backendRefs: [{name: chat, port: 6000}]}]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: TCPRoute
  metadata: {name: wrong, namespace: infra}
  spec: {parentRefs: [{name: edge, sectionName: voice}], rules: [{backendRefs: [{name: chat, port: 6000}]}]}
- apiVersion: gateway.networking.k8s.io/v1beta1
  kind: ReferenceGrant
  metadata: {name: from-infra, namespace: games}
  spec: {from: [{group: gateway.networking.k8s.io, kind: UDPRoute, namespace: infra}], to: [{group: "", kind: Service, name: voice-us}]}
"#;

    #[test]
    fn our_classes_gateways_and_udp_tcp_listeners_only() {
        let p = plan(&model(OBJECTS), "udp-director.dev/gateway-controller");
        assert_eq!(p.classes.len(), 1);
        assert_eq!(
            p.gateways.len(),
            1,
            "a Gateway of another class is not ours"
        );
        let keys: Vec<(&str, Transport, u16)> = p
            .listeners
            .iter()
            .map(|l| (l.key.as_str(), l.transport, l.port))
            .collect();
        assert_eq!(
            keys,
            [
                ("infra/edge/voice", Transport::Udp, 9001),
                ("infra/edge/chat", Transport::Tcp, 9002)
            ],
            "HTTP is not served"
        );
    }

    #[test]
    fn routes_attach_by_section_port_protocol_and_namespace() {
        let p = plan(&model(OBJECTS), "udp-director.dev/gateway-controller");
        let by_name = |name: &str| {
            p.attachments
                .iter()
                .find(|a| a.route.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(by_name("voice").listeners, ["infra/edge/voice"]);
        assert_eq!(
            p.attachments
                .iter()
                .filter(|a| a.route.name == "voice")
                .count(),
            1,
            "the parent of another controller is not ours to speak for"
        );
        assert_eq!(
            by_name("chat").listeners,
            ["infra/edge/chat"],
            "by port, from All"
        );
        assert_eq!(
            by_name("stranger").accepted.as_ref().unwrap_err().0,
            "NotAllowedByListeners"
        );
        assert_eq!(
            by_name("wrong").accepted.as_ref().unwrap_err().0,
            "NoMatchingParent",
            "a TCPRoute on a UDP listener"
        );
        assert_eq!(attached_counts(&p)["infra/edge/voice"], 1);
        let voice = p
            .route_objects
            .iter()
            .find(|r| r.name == "udproute/voice")
            .unwrap();
        assert_eq!(voice.spec.entry_point, "infra/edge/voice");
        assert_eq!(voice.spec.rules[0].backends[0].weight, 3);
        assert_eq!(voice.spec.rules[0].backends[1].weight, 1, "default weight");
    }

    #[test]
    fn a_backend_ref_that_is_no_service_keeps_its_share_unresolved() {
        let m = model(&OBJECTS.replace(
            "backendRefs: [{name: chat, port: 6000}]}]}",
            "backendRefs: [{name: chat, port: 6000}, {group: example.com, kind: Pool, name: p, port: 1}]}]}",
        ));
        let p = plan(&m, "udp-director.dev/gateway-controller");
        let chat = p
            .attachments
            .iter()
            .find(|a| a.route.name == "chat")
            .unwrap();
        assert!(chat.invalid_kind);
        let object = p
            .route_objects
            .iter()
            .find(|r| r.name == "tcproute/chat")
            .unwrap();
        let backends = &object.spec.rules[0].backends;
        assert_eq!(backends.len(), 2, "kept, with its weight");
        assert_eq!(backends[1].service, "", "resolves to no Service");
        assert!(
            !p.attachments
                .iter()
                .find(|a| a.route.name == "voice")
                .unwrap()
                .invalid_kind
        );
    }

    #[test]
    fn a_listener_that_does_not_read_is_refused_alone() {
        let m = model(&OBJECTS.replace(
            "    - {name: web, port: 80, protocol: HTTP}\n",
            "    - {name: web, port: 80, protocol: HTTP}\n\
             \x20   - {name: big, port: 70000, protocol: UDP}\n\
             \x20   - {name: zero, port: 0, protocol: UDP}\n\
             \x20   - {port: 9003, protocol: UDP}\n\
             \x20   - {name: voice, port: 9004, protocol: UDP}\n\
             \x20   - {name: shape, port: 9005, protocol: [UDP]}\n\
             \x20   - {name: from, port: 9006, protocol: UDP, allowedRoutes: {namespaces: {from: 3}}}\n\
             \x20   - {name: voice, port: 99999, protocol: UDP}\n",
        ));
        assert!(m.skipped.is_empty(), "the Gateway reads: {:?}", m.skipped);
        let p = plan(&m, "udp-director.dev/gateway-controller");
        let keys: Vec<&str> = p.listeners.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            ["infra/edge/voice", "infra/edge/chat"],
            "the valid listeners are served"
        );
        let invalid: Vec<(usize, Option<&str>, &str)> = p
            .invalid_listeners
            .iter()
            .map(|l| (l.index, l.name.as_deref(), l.why.as_str()))
            .collect();
        assert_eq!(
            invalid[0],
            (3, Some("big"), "port: 70000 is not a port (1 to 65535)")
        );
        assert_eq!(
            invalid[1],
            (4, Some("zero"), "port: 0 is not a port (1 to 65535)")
        );
        assert_eq!(invalid[2], (5, None, "name: missing, or not a string"));
        assert_eq!(
            invalid[3],
            (6, None, "name: `voice` is an earlier listener's"),
            "a second `voice` has no status entry of its own"
        );
        assert_eq!(
            invalid[4],
            (7, Some("shape"), "protocol: missing, or not a string")
        );
        assert_eq!(invalid[5].1, Some("from"));
        assert!(
            invalid[5].2.starts_with("allowedRoutes: "),
            "{}",
            invalid[5].2
        );
        assert_eq!(
            invalid[6].1, None,
            "a used name, even on an invalid listener"
        );
        assert_eq!(invalid.len(), 7);
        assert_eq!(p.invalid_listeners[2].label(), "listeners[5]");
        // A Gateway of another class: not ours, its listeners not reported.
        let theirs = model(&OBJECTS.replace(
            "{name: x, port: 1, protocol: UDP}",
            "{name: x, port: 0, protocol: UDP}",
        ));
        assert_eq!(theirs.invalid_listeners.len(), 1);
        assert!(
            plan(&theirs, "udp-director.dev/gateway-controller")
                .invalid_listeners
                .is_empty()
        );
    }

    #[test]
    fn objects_that_do_not_read_are_skipped_and_logged_once_per_change() {
        let bad = r#"
- {apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: g, namespace: n}, spec: {listeners: []}}
- {apiVersion: gateway.networking.k8s.io/v1, kind: UDPRoute, metadata: {name: r, namespace: n}, spec: {rules: 3}}
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: edge, namespace: infra}
  spec: {gatewayClassName: ours, listeners: [{name: a, port: 0, protocol: UDP}]}
- {apiVersion: gateway.networking.k8s.io/v1, kind: GatewayClass, metadata: {name: ours}, spec: {controllerName: c}}
"#;
        let m = model(bad);
        let subjects: Vec<&str> = m.skipped.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(subjects, ["Gateway n/g", "UDPRoute n/r"]);
        assert_eq!(
            m.skipped[0].1.to_string(),
            "spec.gatewayClassName: missing, or not a string"
        );
        let p = plan(&m, "c");
        let not_open = (
            "infra/edge/b".to_string(),
            "udp/9 is held by another process".to_string(),
        );
        let now = problems(&m, &p, [(&not_open.0, &not_open.1)]);
        assert_eq!(now.len(), 4);
        assert_eq!(
            now["Gateway infra/edge listener a"],
            "not served: port: 0 is not a port (1 to 65535)"
        );
        assert_eq!(
            now["gateway listener infra/edge/b"],
            "not open: udp/9 is held by another process"
        );
        let mut logged = Logged::default();
        let (fresh, gone) = logged.changes(now.clone());
        assert_eq!(
            (fresh.len(), gone.len()),
            (4, 0),
            "each logged when it appears"
        );
        let (fresh, gone) = logged.changes(now.clone());
        assert!(
            fresh.is_empty() && gone.is_empty(),
            "not again on the next pass"
        );
        let mut changed = now;
        changed.insert("Gateway n/g".into(), "skipped: another reason".into());
        changed.remove("UDPRoute n/r");
        let (fresh, gone) = logged.changes(changed);
        assert_eq!(
            fresh,
            [(
                "Gateway n/g".to_string(),
                "skipped: another reason".to_string()
            )]
        );
        assert_eq!(gone, ["UDPRoute n/r"]);
    }

    #[test]
    fn served_listeners_claim_their_ports_as_old_as_their_gateway() {
        let yaml = OBJECTS.replace(
            "metadata: {name: edge, namespace: infra}",
            "metadata: {name: edge, namespace: infra, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
        );
        let values: Vec<Value> = serde_yaml::from_str(&yaml).unwrap();
        let objects: Vec<Arc<Object>> = values
            .into_iter()
            .map(|v| Arc::new(Object::from_value(v).unwrap()))
            .collect();
        let controller = "udp-director.dev/gateway-controller";
        let claims = served_port_claims(&objects, controller);
        let seen: Vec<(String, &str, Transport, u16)> = claims
            .iter()
            .map(|c| (c.owner(), c.created.as_str(), c.transport, c.port))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "Gateway infra/edge listener voice".to_string(),
                    "2026-01-01T00:00:00Z",
                    Transport::Udp,
                    9001
                ),
                (
                    "Gateway infra/edge listener chat".to_string(),
                    "2026-01-01T00:00:00Z",
                    Transport::Tcp,
                    9002
                ),
            ],
            "our Gateways' UDP and TCP listeners only"
        );
        let planned: Vec<ports::Claim> = plan(&Model::read(&objects), controller)
            .listeners
            .iter()
            .map(Listener::port_claim)
            .collect();
        assert_eq!(claims, planned, "the listeners the reconciler opens");
    }

    #[test]
    fn reference_grants_permit_by_kind_namespace_and_name() {
        let m = model(OBJECTS);
        assert!(m.granted(RouteKind::Udp, "infra", "games", "voice-us"));
        assert!(
            !m.granted(RouteKind::Udp, "infra", "games", "voice-eu"),
            "another name"
        );
        assert!(
            !m.granted(RouteKind::Tcp, "infra", "games", "voice-us"),
            "another kind"
        );
        assert!(
            !m.granted(RouteKind::Udp, "other", "games", "voice-us"),
            "another namespace"
        );
    }
}
