//! Routes + Services + EndpointSlices → one [`RouteTable`] per entry point, and what each route
//! reports (a pure function of the inventory, unit-tested). Routes of one entry point are taken
//! oldest first (creationTimestamp, then namespace and name), their rules in order.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dataplane::{Cidr, Match, RouteBackend, RouteCounter, RouteTable, Rule};
use serde_json::Value;

use crate::crd::{MAX_ROUTE_TIMEOUT_SECONDS, RouteBackendRef, RouteSpec, ServicePortRef};
use crate::inventory::{Object, SERVICE_NAME_LABEL};

/// apiVersion of `Route` objects.
pub const API_VERSION: &str = "udp-director.dev/v1alpha1";
/// Kind of `Route` objects.
pub const KIND: &str = "Route";

/// Whether `o` is a `Route`.
pub fn is_route(o: &Object) -> bool {
    o.api_version == API_VERSION && o.kind == KIND
}

/// One `Route`, typed and checked, its matches parsed once.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteObject {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (empty in a file).
    pub uid: String,
    /// `metadata.creationTimestamp` (RFC 3339, sorts as text; empty in a file).
    pub created: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The spec as written.
    pub spec: RouteSpec,
    /// Each rule's match, parsed.
    pub matches: Vec<Match>,
}

impl RouteObject {
    /// Reads a `Route` inventory object; the error names the field.
    pub fn from_object(object: &Object) -> Result<Self, String> {
        let spec = object.raw.get("spec").ok_or("spec: missing")?;
        let spec: RouteSpec =
            serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
        if spec.entry_point.is_empty() {
            return Err("spec.entryPoint: must not be empty".into());
        }
        if let Some(s) = spec.session_timeout_seconds
            && !(1..=MAX_ROUTE_TIMEOUT_SECONDS).contains(&s)
        {
            return Err(format!(
                "spec.sessionTimeoutSeconds: must be 1 to {MAX_ROUTE_TIMEOUT_SECONDS}, not {s}"
            ));
        }
        if spec.rules.is_empty() {
            return Err("spec.rules: at least one rule is needed".into());
        }
        let mut matches = Vec::with_capacity(spec.rules.len());
        for (i, rule) in spec.rules.iter().enumerate() {
            if rule.backends.is_empty() {
                return Err(format!("spec.rules[{i}].backends: at least one is needed"));
            }
            let m = rule.matcher.clone().unwrap_or_default();
            let key = format!("spec.rules[{i}].match");
            let source_cidrs = m
                .source_cidrs
                .iter()
                .enumerate()
                .map(|(j, c)| Cidr::parse(c).map_err(|e| format!("{key}.sourceCidrs[{j}]: {e}")))
                .collect::<Result<_, _>>()?;
            let source_ports = m
                .source_ports
                .iter()
                .enumerate()
                .map(|(j, p)| port_range(p).map_err(|e| format!("{key}.sourcePorts[{j}]: {e}")))
                .collect::<Result<_, _>>()?;
            matches.push(Match {
                source_cidrs,
                source_ports,
            });
        }
        let meta = object.raw.get("metadata");
        let text = |field: &str| {
            meta.and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(Self {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            uid: text("uid"),
            created: text("creationTimestamp"),
            generation: meta
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64),
            spec,
            matches,
        })
    }

    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `"9001"` or `"10000-10100"`.
fn port_range(text: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{s}` is not a port (1 to 65535)"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("`{text}`: the range is empty"));
    }
    Ok((lo, hi))
}

/// Whether a ReferenceGrant lets routes of a namespace refer to a Service (route namespace,
/// Service namespace, Service name).
pub type Granted<'a> = dyn Fn(&str, &str, &str) -> bool + 'a;

/// The listener of this proxy that an endpoint reached from an entry point (by name) would
/// land on, if any: a route there would proxy to itself.
pub type OwnListener<'a> = dyn Fn(&str, SocketAddr) -> Option<String> + 'a;

/// What the compile reads besides the routes.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// Services (any namespace).
    pub services: &'a [Arc<Object>],
    /// EndpointSlices (any namespace).
    pub slices: &'a [Arc<Object>],
    /// The configured entry points' names.
    pub entry_points: &'a [String],
    /// `routes.allowCrossNamespace`.
    pub allow_cross_namespace: bool,
    /// `sessionTimeoutSeconds`, for routes that set none.
    pub session_timeout: Duration,
    /// Gateway API rules: a backend in another namespace needs a ReferenceGrant there (this
    /// says whether one permits route namespace → Service namespace/name), instead of
    /// `allow_cross_namespace`; and an invalid backend keeps its weighted share (dropped).
    pub gateway: Option<&'a Granted<'a>>,
    /// Tells endpoints that are this proxy's own listeners, which are left out (and said).
    pub own_listener: Option<&'a OwnListener<'a>>,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("entry_points", &self.entry_points)
            .field("allow_cross_namespace", &self.allow_cross_namespace)
            .field("gateway", &self.gateway.is_some())
            .finish_non_exhaustive()
    }
}

/// One route's outcome.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteReport {
    /// Its uid, so a re-created route is written anew.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Ready endpoints over all its backends.
    pub ready_endpoints: u32,
    /// What is wrong; ready when empty.
    pub problems: Vec<String>,
    /// A backend's Service (or its port) does not exist.
    pub not_found: bool,
    /// A backend in another namespace is not permitted.
    pub not_permitted: bool,
}

/// The counters a compile hands to the tables, kept across compiles so counts survive a swap:
/// sessions per (route, Service), re-homes per rule.
#[derive(Debug, Default)]
pub struct Counters {
    /// By (`namespace/route`, `namespace/service`).
    pub sessions: HashMap<(String, String), Arc<RouteCounter>>,
    /// By (`namespace/route`, rule key).
    pub rehomed: HashMap<(String, u64), Arc<RouteCounter>>,
}

/// Every entry point's table and every route's report.
#[derive(Debug, Default)]
pub struct Compiled {
    /// By entry point name (every configured one, possibly with no rules).
    pub tables: BTreeMap<String, RouteTable>,
    /// By (namespace, name).
    pub reports: BTreeMap<(String, String), RouteReport>,
}

/// Compiles the routes. Counters of routes and Services no longer present are forgotten.
pub fn compile(routes: &[RouteObject], inputs: Inputs<'_>, counters: &mut Counters) -> Compiled {
    let mut out = Compiled {
        tables: inputs
            .entry_points
            .iter()
            .map(|e| (e.clone(), RouteTable::default()))
            .collect(),
        reports: BTreeMap::new(),
    };
    let mut order: Vec<&RouteObject> = routes.iter().collect();
    order.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });
    let mut used_sessions = Vec::new();
    let mut used_rehomed = Vec::new();
    for route in order {
        let full = route.full_name();
        let mut report = RouteReport {
            uid: route.uid.clone(),
            generation: route.generation,
            ..RouteReport::default()
        };
        let Some(table) = out.tables.get_mut(&route.spec.entry_point) else {
            report.problems.push(format!(
                "entry point `{}` is not in this proxy's entryPoints",
                route.spec.entry_point
            ));
            out.reports
                .insert((route.namespace.clone(), route.name.clone()), report);
            continue;
        };
        let idle_timeout = route
            .spec
            .session_timeout_seconds
            .map_or(inputs.session_timeout, Duration::from_secs);
        for (i, (rule, matcher)) in route.spec.rules.iter().zip(&route.matches).enumerate() {
            let key = rule_key(&full, i);
            let mut backends = Vec::new();
            for b in &rule.backends {
                match endpoints_of(route, b, inputs) {
                    Ok((service, mut endpoints)) => {
                        if let Some(own) = inputs.own_listener {
                            endpoints.retain(|e| match own(&route.spec.entry_point, *e) {
                                Some(holder) => {
                                    report.problems.push(format!(
                                        "Service {service}: endpoint {e} is this proxy's own \
                                         {holder}: routing there would loop, left out"
                                    ));
                                    false
                                }
                                None => true,
                            });
                        }
                        report.ready_endpoints +=
                            u32::try_from(endpoints.len()).unwrap_or(u32::MAX);
                        if endpoints.is_empty() && b.weight > 0 {
                            report
                                .problems
                                .push(format!("Service {service} has no ready endpoint"));
                        }
                        let id = (full.clone(), service.clone());
                        let sessions = Arc::clone(counters.sessions.entry(id.clone()).or_default());
                        used_sessions.push(id);
                        backends.push(RouteBackend {
                            service,
                            weight: b.weight,
                            endpoints,
                            sessions,
                            drops_share: false,
                        });
                    }
                    Err(refusal) => {
                        match refusal.kind {
                            Refusal::NotFound => report.not_found = true,
                            Refusal::NotPermitted => report.not_permitted = true,
                        }
                        report.problems.push(refusal.why);
                        // The Gateway API keeps an invalid backend's share, and drops it.
                        if inputs.gateway.is_some() && b.weight > 0 {
                            backends.push(RouteBackend {
                                service: format!("(invalid) {}", b.service),
                                weight: b.weight,
                                endpoints: Vec::new(),
                                sessions: Arc::default(),
                                drops_share: true,
                            });
                        }
                    }
                }
            }
            let rehomed_id = (full.clone(), key);
            let rehomed = Arc::clone(counters.rehomed.entry(rehomed_id.clone()).or_default());
            used_rehomed.push(rehomed_id);
            table.rules.push(Rule {
                key,
                route: full.clone(),
                matcher: matcher.clone(),
                backends,
                idle_timeout,
                proxy: route.spec.proxy_protocol.into(),
                rehomed,
            });
        }
        out.reports
            .insert((route.namespace.clone(), route.name.clone()), report);
    }
    counters.sessions.retain(|k, _| used_sessions.contains(k));
    counters.rehomed.retain(|k, _| used_rehomed.contains(k));
    out
}

/// A rule's identity across compiles.
fn rule_key(route: &str, index: usize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("route", route, index).hash(&mut h);
    h.finish()
}

/// Why a backend is left out.
#[derive(Debug)]
struct Refused {
    kind: Refusal,
    why: String,
}

#[derive(Debug)]
enum Refusal {
    NotFound,
    NotPermitted,
}

fn not_found(why: String) -> Refused {
    Refused {
        kind: Refusal::NotFound,
        why,
    }
}

/// The ready endpoints of a backend's Service port, sorted; the error says why there are none
/// to speak of (refused namespace, no such Service or port).
fn endpoints_of(
    route: &RouteObject,
    backend: &RouteBackendRef,
    inputs: Inputs<'_>,
) -> Result<(String, Vec<SocketAddr>), Refused> {
    let namespace = backend.namespace.as_deref().unwrap_or(&route.namespace);
    let service_name = format!("{namespace}/{}", backend.service);
    if namespace != route.namespace {
        let (permitted, how) = match inputs.gateway {
            Some(granted) => (
                granted(&route.namespace, namespace, &backend.service),
                "no ReferenceGrant there permits it",
            ),
            None => (
                inputs.allow_cross_namespace,
                "set routes.allowCrossNamespace",
            ),
        };
        if !permitted {
            return Err(Refused {
                kind: Refusal::NotPermitted,
                why: format!("backend {service_name} is in another namespace ({how})"),
            });
        }
    }
    let service = inputs
        .services
        .iter()
        .find(|s| s.namespace == namespace && s.name == backend.service)
        .ok_or_else(|| not_found(format!("Service {service_name} not found")))?;
    let ports = service
        .raw
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let port_name = ports
        .iter()
        .find(|p| match &backend.port {
            ServicePortRef::Name(n) => p.get("name").and_then(Value::as_str) == Some(n),
            ServicePortRef::Number(n) => {
                p.get("port").and_then(Value::as_u64) == Some(u64::from(*n))
            }
        })
        .map(|p| p.get("name").and_then(Value::as_str).unwrap_or_default())
        .ok_or_else(|| {
            let port = match &backend.port {
                ServicePortRef::Name(n) => n.clone(),
                ServicePortRef::Number(n) => n.to_string(),
            };
            not_found(format!("Service {service_name} has no port {port}"))
        })?;
    let mut endpoints: Vec<SocketAddr> = inputs
        .slices
        .iter()
        .filter(|s| {
            s.namespace == namespace
                && s.labels.get(SERVICE_NAME_LABEL).map(String::as_str) == Some(&backend.service)
        })
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
    Ok((service_name, endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Vec<Arc<Object>> {
        let values: Vec<Value> = serde_yaml::from_str(yaml).unwrap();
        values
            .into_iter()
            .map(|v| Arc::new(Object::from_value(v).unwrap()))
            .collect()
    }

    fn route(yaml: &str) -> RouteObject {
        RouteObject::from_object(&objects(yaml)[0]).unwrap()
    }

    const SERVICES: &str = r#"
- {apiVersion: v1, kind: Service, metadata: {name: eu, namespace: games}, spec: {ports: [{name: voice, port: 5000}]}}
- {apiVersion: v1, kind: Service, metadata: {name: us, namespace: games}, spec: {ports: [{name: voice, port: 5000}]}}
- {apiVersion: v1, kind: Service, metadata: {name: other, namespace: elsewhere}, spec: {ports: [{port: 6000}]}}
"#;

    const SLICES: &str = r#"
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: eu-1, namespace: games, labels: {kubernetes.io/service-name: eu}}
  ports: [{name: voice, port: 15000}]
  endpoints: [{addresses: [10.0.0.2]}, {addresses: [10.0.0.1], conditions: {ready: true}}, {addresses: [10.0.0.9], conditions: {ready: false}}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: us-1, namespace: games, labels: {kubernetes.io/service-name: us}}
  ports: [{name: voice, port: 15001}]
  endpoints: [{addresses: [10.1.0.1]}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: other-1, namespace: elsewhere, labels: {kubernetes.io/service-name: other}}
  ports: [{port: 16000}]
  endpoints: [{addresses: [10.2.0.1]}]
"#;

    fn inputs<'a>(
        services: &'a [Arc<Object>],
        slices: &'a [Arc<Object>],
        eps: &'a [String],
    ) -> Inputs<'a> {
        Inputs {
            services,
            slices,
            entry_points: eps,
            allow_cross_namespace: false,
            session_timeout: Duration::from_secs(300),
            gateway: None,
            own_listener: None,
        }
    }

    #[test]
    fn an_endpoint_that_is_the_proxy_itself_is_left_out() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let r = route(
            "- {apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: voice, \
             namespace: games}, spec: {entryPoint: voice, rules: [{backends: [{service: eu, \
             port: voice}]}]}}",
        );
        let ours: SocketAddr = "10.0.0.2:15000".parse().unwrap();
        let own = |entry: &str, e: SocketAddr| {
            assert_eq!(entry, "voice");
            (e == ours).then(|| "entry point voice".to_string())
        };
        let c = compile(
            &[r],
            Inputs {
                own_listener: Some(&own),
                ..inputs(&services, &slices, &eps)
            },
            &mut Counters::default(),
        );
        assert_eq!(
            c.tables["voice"].rules[0].backends[0].endpoints,
            ["10.0.0.1:15000".parse::<SocketAddr>().unwrap()]
        );
        let report = &c.reports[&("games".to_string(), "voice".to_string())];
        assert_eq!(report.ready_endpoints, 1);
        assert_eq!(
            report.problems,
            [
                "Service games/eu: endpoint 10.0.0.2:15000 is this proxy's own entry point voice: \
              routing there would loop, left out"
            ]
        );
    }

    #[test]
    fn routes_compile_to_weighted_ready_endpoints() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let r = route(
            r#"
- apiVersion: udp-director.dev/v1alpha1
  kind: Route
  metadata: {name: voice, namespace: games, generation: 3}
  spec:
    entryPoint: voice
    sessionTimeoutSeconds: 60
    rules:
    - match: {sourceCidrs: ["10.0.0.0/8"], sourcePorts: ["9001", "10000-10100"]}
      backends: [{service: eu, port: voice, weight: 3}, {service: us, port: 5000}]
    - backends: [{service: us, port: voice}]
"#,
        );
        let mut counters = Counters::default();
        let c = compile(&[r], inputs(&services, &slices, &eps), &mut counters);
        let table = &c.tables["voice"];
        assert_eq!(table.rules.len(), 2);
        let first = &table.rules[0];
        assert_eq!(first.idle_timeout, Duration::from_secs(60));
        assert_eq!(first.matcher.source_ports, [(9001, 9001), (10000, 10100)]);
        assert_eq!(first.backends[0].weight, 3);
        assert_eq!(
            first.backends[0].endpoints,
            [
                "10.0.0.1:15000".parse().unwrap(),
                "10.0.0.2:15000".parse().unwrap()
            ],
            "ready ones only, sorted, on the slice's port"
        );
        assert_eq!(
            first.backends[1].endpoints,
            ["10.1.0.1:15001".parse().unwrap()],
            "port by number"
        );
        let report = &c.reports[&("games".to_string(), "voice".to_string())];
        assert_eq!(report.problems, Vec::<String>::new());
        assert_eq!(report.ready_endpoints, 4);
        assert_eq!(report.generation, Some(3));
        // A recompile keeps the counters, so counts survive the swap.
        first.backends[0].sessions.inc();
        let r = c.reports.len();
        assert_eq!(r, 1);
        let again = compile(
            &[route_again()],
            inputs(&services, &slices, &eps),
            &mut counters,
        );
        assert_eq!(again.tables["voice"].rules[0].backends[0].sessions.get(), 1);
        assert_eq!(
            again.tables["voice"].rules[0].key,
            c.tables["voice"].rules[0].key
        );
    }

    fn route_again() -> RouteObject {
        route(
            r#"
- apiVersion: udp-director.dev/v1alpha1
  kind: Route
  metadata: {name: voice, namespace: games}
  spec: {entryPoint: voice, rules: [{backends: [{service: eu, port: voice, weight: 3}]}]}
"#,
        )
    }

    #[test]
    fn bad_backends_drop_their_share_and_say_why() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let r = route(
            r#"
- apiVersion: udp-director.dev/v1alpha1
  kind: Route
  metadata: {name: voice, namespace: games}
  spec:
    entryPoint: voice
    rules:
    - backends: [{service: eu, port: voice}, {service: gone, port: voice}, {service: eu, port: nope}, {service: other, namespace: elsewhere, port: 6000}]
"#,
        );
        let mut counters = Counters::default();
        let c = compile(
            std::slice::from_ref(&r),
            inputs(&services, &slices, &eps),
            &mut counters,
        );
        assert_eq!(c.tables["voice"].rules[0].backends.len(), 1);
        let problems = &c.reports[&("games".into(), "voice".into())].problems;
        assert_eq!(
            problems,
            &[
                "Service games/gone not found".to_string(),
                "Service games/eu has no port nope".to_string(),
                "backend elsewhere/other is in another namespace (set routes.allowCrossNamespace)"
                    .to_string(),
            ]
        );
        let allowed = Inputs {
            allow_cross_namespace: true,
            ..inputs(&services, &slices, &eps)
        };
        let c = compile(&[r], allowed, &mut counters);
        let rule = &c.tables["voice"].rules[0];
        assert_eq!(rule.backends.len(), 2);
        assert_eq!(
            rule.backends[1].endpoints,
            ["10.2.0.1:16000".parse().unwrap()],
            "unnamed port"
        );
    }

    #[test]
    fn under_gateway_rules_an_invalid_backend_keeps_its_share_and_grants_decide() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let r = route(
            r#"
- apiVersion: udp-director.dev/v1alpha1
  kind: Route
  metadata: {name: voice, namespace: games}
  spec:
    entryPoint: voice
    rules: [{backends: [{service: us, port: voice}, {service: gone, port: voice}, {service: other, namespace: elsewhere, port: 6000}]}]
"#,
        );
        let granted = |from: &str, to: &str, service: &str| {
            from == "games" && to == "elsewhere" && service == "other"
        };
        let gateway = Inputs {
            gateway: Some(&granted),
            ..inputs(&services, &slices, &eps)
        };
        let c = compile(std::slice::from_ref(&r), gateway, &mut Counters::default());
        let rule = &c.tables["voice"].rules[0];
        let shares: Vec<(bool, usize)> = rule
            .backends
            .iter()
            .map(|b| (b.drops_share, b.endpoints.len()))
            .collect();
        assert_eq!(
            shares,
            [(false, 1), (true, 0), (false, 1)],
            "granted: served"
        );
        let report = &c.reports[&("games".into(), "voice".into())];
        assert!(report.not_found && !report.not_permitted);
        // One valid and one invalid backend, 1:1: half the clients are dropped.
        let mut p = dataplane_picker();
        let served = (0..100)
            .filter(|i| {
                rule_table(&c)
                    .pick(&mut p, format!("1.1.1.1:{i}").parse().unwrap())
                    .is_some()
            })
            .count();
        assert_eq!(served, 67, "two valid shares of three");
        let refused = |_: &str, _: &str, _: &str| false;
        let strict = Inputs {
            gateway: Some(&refused),
            ..inputs(&services, &slices, &eps)
        };
        let c = compile(&[r], strict, &mut Counters::default());
        assert!(c.reports[&("games".into(), "voice".into())].not_permitted);
    }

    fn dataplane_picker() -> dataplane::policy::route::Picker {
        dataplane::policy::route::Picker::default()
    }

    fn rule_table(c: &Compiled) -> &dataplane::RouteTable {
        &c.tables["voice"]
    }

    #[test]
    fn an_unknown_entry_point_and_bad_matches_are_reported() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let r = route(
            r#"
- apiVersion: udp-director.dev/v1alpha1
  kind: Route
  metadata: {name: r, namespace: games}
  spec: {entryPoint: chat, rules: [{backends: [{service: eu, port: voice}]}]}
"#,
        );
        let c = compile(
            &[r],
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        assert!(c.tables["voice"].rules.is_empty());
        assert_eq!(
            c.reports[&("games".into(), "r".into())].problems,
            ["entry point `chat` is not in this proxy's entryPoints"]
        );
        let bad = |m: &str| {
            RouteObject::from_object(&objects(&format!(
                "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: r, namespace: g}}, spec: {{entryPoint: e, rules: [{{match: {m}, backends: [{{service: s, port: 1}}]}}]}}}}"
            ))[0])
            .unwrap_err()
        };
        let timeout = |t: &str| {
            RouteObject::from_object(&objects(&format!(
                "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: r, namespace: g}}, spec: {{entryPoint: e, sessionTimeoutSeconds: {t}, rules: [{{backends: [{{service: s, port: 1}}]}}]}}}}"
            ))[0])
            .map(|_| ())
        };
        assert_eq!(
            timeout("9223372036854775808"),
            Err("spec.sessionTimeoutSeconds: must be 1 to 86400, not 9223372036854775808".into())
        );
        assert!(timeout("0").is_err());
        assert_eq!(timeout("86400"), Ok(()));
        assert!(
            bad("{sourceCidrs: [10.0.0.1/8]}").starts_with("spec.rules[0].match.sourceCidrs[0]: ")
        );
        assert!(bad("{sourcePorts: [\"9-1\"]}").contains("empty"));
        assert!(bad("{sourcePorts: [\"0\"]}").contains("not a port"));
        assert!(bad("{sourcePorts: [\"x\"]}").starts_with("spec.rules[0].match.sourcePorts[0]"));
    }

    #[test]
    fn older_routes_come_first() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let make = |name: &str, created: &str| {
            route(&format!(
                "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: {name}, namespace: games, creationTimestamp: \"{created}\"}}, spec: {{entryPoint: voice, rules: [{{backends: [{{service: eu, port: voice}}]}}]}}}}"
            ))
        };
        let routes = [
            make("b", "2026-01-02T00:00:00Z"),
            make("a", "2026-01-03T00:00:00Z"),
        ];
        let c = compile(
            &routes,
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        let order: Vec<&str> = c.tables["voice"]
            .rules
            .iter()
            .map(|r| r.route.as_str())
            .collect();
        assert_eq!(order, ["games/b", "games/a"]);
    }
}
