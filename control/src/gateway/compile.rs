//! What the Gateway API objects ask of this proxy, decided without I/O: which GatewayClasses are
//! ours, which Gateway listeners to open, which routes attach to which listeners (by
//! `parentRefs`, `sectionName`/`port`, protocol and `allowedRoutes`), and the attached routes
//! turned into [`RouteObject`]s for the shared route compile, with ReferenceGrants deciding
//! cross-namespace backends.

use std::collections::BTreeMap;
use std::sync::Arc;

use dataplane::{Match, Transport};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::gateway::{
    GROUP, GatewayClassSpec, GatewaySpec, L4Rule, ParentReference, ReferenceGrantSpec,
};
use crate::crd::{RouteBackendRef, RouteRule, RouteSpec, ServicePortRef};
use crate::inventory::Object;
use crate::route::RouteObject;

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
}

/// A route of either kind.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Route {
    /// Which kind.
    pub kind: RouteKind,
    /// Identity.
    pub meta: Meta,
    /// `metadata.creationTimestamp`.
    pub created: String,
    /// Its parents.
    pub parent_refs: Vec<ParentReference>,
    /// Its rules.
    pub rules: Vec<L4Rule>,
}

/// The Gateway API objects, typed (objects that do not read are skipped).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// GatewayClasses.
    pub classes: Vec<(Meta, GatewayClassSpec)>,
    /// Gateways.
    pub gateways: Vec<(Meta, GatewaySpec)>,
    /// UDPRoutes and TCPRoutes.
    pub routes: Vec<L4Route>,
    /// ReferenceGrants.
    pub grants: Vec<(Meta, ReferenceGrantSpec)>,
}

fn meta(o: &Object) -> Meta {
    Meta {
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        generation: o
            .raw
            .pointer("/metadata/generation")
            .and_then(Value::as_i64),
    }
}

fn spec<T: DeserializeOwned>(o: &Object) -> Option<T> {
    match serde_json::from_value(o.raw.get("spec")?.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("{} {}/{} skipped: spec: {e}", o.kind, o.namespace, o.name);
            None
        }
    }
}

impl Model {
    /// Reads the inventory's Gateway API objects.
    pub fn read(objects: &[Arc<Object>]) -> Self {
        let mut m = Self::default();
        for o in objects {
            match o.kind.as_str() {
                "GatewayClass" => m.classes.extend(spec(o).map(|s| (meta(o), s))),
                "Gateway" => m.gateways.extend(spec(o).map(|s| (meta(o), s))),
                "ReferenceGrant" => m.grants.extend(spec(o).map(|s| (meta(o), s))),
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
                    if let Some(s) = spec::<L4Spec>(o) {
                        m.routes.push(L4Route {
                            kind,
                            meta: meta(o),
                            created: o
                                .raw
                                .pointer("/metadata/creationTimestamp")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            parent_refs: s.parent_refs,
                            rules: s.rules,
                        });
                    }
                }
                _ => {}
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
    /// Our Gateways.
    pub gateways: Vec<(Meta, GatewaySpec)>,
    /// Their UDP and TCP listeners.
    pub listeners: Vec<Listener>,
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
            });
        }
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
        created: route.created.clone(),
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

/// Whether a backendRef names a core Service (the kind served).
fn is_service(b: &crate::crd::gateway::BackendRef) -> bool {
    b.group.as_deref().unwrap_or("").is_empty()
        && b.kind.as_deref().unwrap_or("Service") == "Service"
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
