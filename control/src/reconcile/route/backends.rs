//! A route backend's endpoints: its Service's port and the ready addresses of that Service's
//! EndpointSlices. Services and slices are indexed once per compile, so finding a backend's is
//! a lookup rather than a scan of every Service and slice; and each backend's answer is kept
//! from one compile to the next with the objects it was read from, so a compile reads again
//! only the backends whose Service or slices changed (SPEC section 10: an EndpointSlice change
//! costs the routes that use its Service).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use super::object::RouteObject;
use crate::crd::{RouteBackendRef, ServicePortRef};
use crate::inventory::{Object, SERVICE_NAME_LABEL};
use crate::reconcile::forwarder::resolve::not_unicast;

/// Whether a ReferenceGrant lets routes of a namespace refer to a Service (route namespace,
/// Service namespace, Service name).
pub type Granted<'a> = dyn Fn(&str, &str, &str) -> bool + 'a;

/// Who may send a route's clients to a Service in another namespace.
#[derive(Clone, Copy)]
pub(super) enum CrossNamespace<'a> {
    /// `Route`s: `routes.allowCrossNamespace`.
    Allowed(bool),
    /// Gateway API routes: a ReferenceGrant in the Service's namespace.
    Granted(&'a Granted<'a>),
}

/// Why a backend is left out.
#[derive(Clone, Debug)]
pub(super) struct Refused {
    pub(super) kind: Refusal,
    pub(super) why: String,
}

/// What kind of refusal (status reasons follow it).
#[derive(Clone, Copy, Debug)]
pub(super) enum Refusal {
    NotFound,
    NotPermitted,
}

fn not_found(why: String) -> Refused {
    Refused {
        kind: Refusal::NotFound,
        why,
    }
}

/// Ready endpoints left out because their address is not unicast, and why.
pub(super) type LeftOut = Vec<(IpAddr, &'static str)>;

/// A backend's Service (`namespace/name`), its ready endpoints (sorted), and the ready ones
/// left out because no session could be sent to their address.
#[derive(Clone, Debug)]
pub(super) struct Endpoints {
    pub(super) service: String,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) left_out: LeftOut,
}

/// Services by (namespace, name) and their EndpointSlices by (namespace, Service name), for
/// one compile.
pub(super) struct ServiceIndex<'a> {
    services: HashMap<(&'a str, &'a str), &'a Arc<Object>>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a Arc<Object>>>,
}

impl<'a> ServiceIndex<'a> {
    pub(super) fn new(services: &'a [Arc<Object>], slices: &'a [Arc<Object>]) -> Self {
        let mut index = Self {
            services: services
                .iter()
                .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
                .collect(),
            slices: HashMap::new(),
        };
        for slice in slices {
            if let Some(service) = slice.labels.get(SERVICE_NAME_LABEL) {
                index
                    .slices
                    .entry((slice.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        index
    }
}

/// One backend's (namespace, Service, port).
type BackendKey = (String, String, ServicePortRef);

/// What a backend resolved to, and the objects it was read from (held, so that an address
/// cannot be reused by a new object and mistaken for the old one).
#[derive(Debug)]
struct Resolution {
    service: Arc<Object>,
    slices: Vec<Arc<Object>>,
    answer: Result<Endpoints, Refused>,
}

impl Resolution {
    fn read_from(&self, service: &Arc<Object>, slices: &[&Arc<Object>]) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// Backends' answers kept from one compile to the next. The sources keep an unchanged object
/// as the same `Arc`, so "unchanged" is a pointer comparison per object.
#[derive(Debug, Default)]
pub struct Resolved {
    kept: HashMap<BackendKey, Resolution>,
    used: HashSet<BackendKey>,
    reads: u64,
}

impl Resolved {
    /// How many backends were read from their objects rather than taken from the last compile
    /// (since this was made).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Forgets the backends the last compile did not ask about.
    pub(super) fn forget_unused(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.kept.retain(|k, _| used.contains(k));
    }
}

/// The endpoints of `backend` of `route`, or why it has none to speak of (refused namespace,
/// no such Service or port).
pub(super) fn endpoints_of(
    route: &RouteObject,
    backend: &RouteBackendRef,
    cross: CrossNamespace<'_>,
    index: &ServiceIndex<'_>,
    resolved: &mut Resolved,
) -> Result<Endpoints, Refused> {
    let namespace = backend.namespace.as_deref().unwrap_or(&route.namespace);
    if namespace != route.namespace {
        let (permitted, how) = match cross {
            CrossNamespace::Granted(granted) => (
                granted(&route.namespace, namespace, &backend.service),
                "no ReferenceGrant there permits it",
            ),
            CrossNamespace::Allowed(allowed) => (allowed, "set routes.allowCrossNamespace"),
        };
        if !permitted {
            return Err(Refused {
                kind: Refusal::NotPermitted,
                why: format!(
                    "backend {namespace}/{} is in another namespace ({how})",
                    backend.service
                ),
            });
        }
    }
    let Some(service) = index
        .services
        .get(&(namespace, backend.service.as_str()))
        .copied()
    else {
        return Err(not_found(format!(
            "Service {namespace}/{} not found",
            backend.service
        )));
    };
    let slices = index
        .slices
        .get(&(namespace, backend.service.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let key = (
        namespace.to_owned(),
        backend.service.clone(),
        backend.port.clone(),
    );
    if let Some(kept) = resolved.kept.get(&key)
        && kept.read_from(service, slices)
    {
        let answer = kept.answer.clone();
        resolved.used.insert(key);
        return answer;
    }
    resolved.reads += 1;
    let answer = read(service, slices, &backend.port);
    resolved.kept.insert(
        key.clone(),
        Resolution {
            service: Arc::clone(service),
            slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            answer: answer.clone(),
        },
    );
    resolved.used.insert(key);
    answer
}

/// Reads the endpoints of `service`'s port `port` from its slices.
fn read(
    service: &Object,
    slices: &[&Arc<Object>],
    port: &ServicePortRef,
) -> Result<Endpoints, Refused> {
    let service_name = format!("{}/{}", service.namespace, service.name);
    let ports = service
        .raw
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let port_name = ports
        .iter()
        .find(|p| match port {
            ServicePortRef::Name(n) => p.get("name").and_then(Value::as_str) == Some(n),
            ServicePortRef::Number(n) => {
                p.get("port").and_then(Value::as_u64) == Some(u64::from(*n))
            }
        })
        .map(|p| p.get("name").and_then(Value::as_str).unwrap_or_default())
        .ok_or_else(|| {
            let port = match port {
                ServicePortRef::Name(n) => n.clone(),
                ServicePortRef::Number(n) => n.to_string(),
            };
            not_found(format!("Service {service_name} has no port {port}"))
        })?;
    let mut endpoints: Vec<SocketAddr> = slices
        .iter()
        .flat_map(|slice| {
            let port = slice
                .raw
                .get("ports")
                .and_then(Value::as_array)
                .and_then(|ports| {
                    ports.iter().find(|p| {
                        p.get("name").and_then(Value::as_str).unwrap_or_default() == port_name
                    })
                })
                .and_then(|p| p.get("port")?.as_u64())
                .and_then(|p| u16::try_from(p).ok());
            let endpoints = slice
                .raw
                .get("endpoints")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            endpoints
                .iter()
                // An absent `ready` condition means ready (EndpointSlice API contract).
                .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
                .filter_map(move |e| {
                    let ip: IpAddr = e.pointer("/addresses/0")?.as_str()?.parse().ok()?;
                    Some(SocketAddr::new(ip, port?))
                })
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let mut left_out: LeftOut = Vec::new();
    endpoints.retain(|e| match not_unicast(e.ip()) {
        Some(why) => {
            if !left_out.iter().any(|(ip, _)| *ip == e.ip()) {
                left_out.push((e.ip(), why));
            }
            false
        }
        None => true,
    });
    Ok(Endpoints {
        service: service_name,
        addrs: endpoints,
        left_out,
    })
}

/// The Services and EndpointSlices as a compile read them, and the Services its routes use: a
/// later change of Services or slices that touches none of those needs no compile.
#[derive(Debug, Default)]
pub(crate) struct ServicesSeen {
    services: Vec<Arc<Object>>,
    slices: Vec<Arc<Object>>,
    used: HashSet<(String, String)>,
}

impl ServicesSeen {
    /// What a compile of `routes` over `services` and `slices` read.
    pub(crate) fn of(
        routes: &[RouteObject],
        services: &[Arc<Object>],
        slices: &[Arc<Object>],
    ) -> Self {
        let used = routes
            .iter()
            .flat_map(|r| {
                r.spec.rules.iter().flat_map(|rule| {
                    rule.backends.iter().map(|b| {
                        let namespace = b.namespace.as_deref().unwrap_or(&r.namespace);
                        (namespace.to_owned(), b.service.clone())
                    })
                })
            })
            .collect();
        Self {
            services: services.to_vec(),
            slices: slices.to_vec(),
            used,
        }
    }

    /// Whether a reconciler must compile again: on its first pass, when what its routes are
    /// read from moved (`routes`, versions it compares as it likes), or when the Services or
    /// EndpointSlices moved (`services`) in a way that touches one its routes use. `last` is
    /// what the last pass read, as the same pair.
    pub(crate) fn must_compile<R: PartialEq>(
        &self,
        last: Option<&(R, [u64; 2])>,
        now: &(R, [u64; 2]),
        services: &[Arc<Object>],
        slices: &[Arc<Object>],
    ) -> bool {
        match last {
            None => true,
            Some((routes, seen)) => {
                *routes != now.0 || (*seen != now.1 && !self.unchanged_in(services, slices))
            }
        }
    }

    /// Whether every Service the routes use, and each one's slices, is in `services` and
    /// `slices` as it was (the same objects, present or absent alike).
    pub(crate) fn unchanged_in(&self, services: &[Arc<Object>], slices: &[Arc<Object>]) -> bool {
        let (before, now) = (
            ServiceIndex::new(&self.services, &self.slices),
            ServiceIndex::new(services, slices),
        );
        let same = |a: Option<&Arc<Object>>, b: Option<&Arc<Object>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.used.iter().all(|(namespace, name)| {
            let key = (namespace.as_str(), name.as_str());
            let slices_of = |index: &ServiceIndex<'_>| -> Vec<*const Object> {
                index
                    .slices
                    .get(&key)
                    .map(|list| list.iter().map(|s| Arc::as_ptr(s)).collect())
                    .unwrap_or_default()
            };
            same(
                before.services.get(&key).copied(),
                now.services.get(&key).copied(),
            ) && slices_of(&before) == slices_of(&now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(yaml: &str) -> Arc<Object> {
        Arc::new(Object::from_value(serde_yaml::from_str(yaml).unwrap()).unwrap())
    }

    fn service(name: &str) -> Arc<Object> {
        object(&format!(
            "{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: games}}, \
             spec: {{ports: [{{port: 5000}}]}}}}"
        ))
    }

    fn slice(name: &str, service: &str, ip: &str) -> Arc<Object> {
        object(&format!(
            "{{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: {name}, \
             namespace: games, labels: {{kubernetes.io/service-name: {service}}}}}, \
             ports: [{{port: 15000}}], endpoints: [{{addresses: [{ip}]}}]}}"
        ))
    }

    #[test]
    fn only_a_change_to_a_service_the_routes_use_asks_for_a_compile() {
        let route = RouteObject::from_object(&object(
            "{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: r, \
             namespace: games}, spec: {entryPoint: voice, rules: [{backends: [{service: eu, \
             port: 5000}, {service: later, port: 5000}]}]}}",
        ))
        .unwrap();
        let services = vec![service("eu"), service("unused")];
        let slices = vec![
            slice("eu-1", "eu", "10.0.0.1"),
            slice("u-1", "unused", "10.0.0.2"),
        ];
        let seen = ServicesSeen::of(std::slice::from_ref(&route), &services, &slices);
        assert!(seen.unchanged_in(&services, &slices));
        // Another Service and its slices come and go: nothing to compile.
        let other = vec![Arc::clone(&services[0]), service("unused2")];
        let other_slices = vec![Arc::clone(&slices[0]), slice("u-2", "unused2", "10.0.0.3")];
        assert!(seen.unchanged_in(&other, &other_slices));
        // The used Service's slice changes, or it gains one: compile.
        let changed = vec![slice("eu-1", "eu", "10.0.0.9"), Arc::clone(&slices[1])];
        assert!(!seen.unchanged_in(&services, &changed));
        let more = vec![
            Arc::clone(&slices[0]),
            Arc::clone(&slices[1]),
            slice("eu-2", "eu", "10.0.0.8"),
        ];
        assert!(!seen.unchanged_in(&services, &more));
        // The Service itself is replaced, or one the route names appears: compile.
        let replaced = vec![service("eu"), Arc::clone(&services[1])];
        assert!(!seen.unchanged_in(&replaced, &slices));
        let appeared = vec![
            Arc::clone(&services[0]),
            Arc::clone(&services[1]),
            service("later"),
        ];
        assert!(!seen.unchanged_in(&appeared, &slices));
        // As a reconciler asks: its first pass, its own inputs moved, or a used Service did.
        let now = ([1u64], [1u64, 1]);
        assert!(seen.must_compile(None, &now, &services, &slices));
        assert!(!seen.must_compile(Some(&now), &now, &services, &slices));
        assert!(seen.must_compile(Some(&([0], [1, 1])), &now, &services, &slices));
        assert!(!seen.must_compile(Some(&([1], [0, 0])), &now, &other, &other_slices));
        assert!(seen.must_compile(Some(&([1], [0, 0])), &now, &replaced, &slices));
    }
}
