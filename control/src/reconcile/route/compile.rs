//! Routes + Services + EndpointSlices → one [`RouteTable`] per entry point, and what each route
//! reports (a pure function of the inventory, unit-tested). Routes of one entry point are taken
//! oldest first (creationTimestamp, then namespace and name), their rules in order, so a rule
//! whose clients an earlier rule (of its route or an older one) already takes serves nobody;
//! that, and a rule whose backends all weigh 0, is found here and said in the route's report.
//!
//! One rule for every backend, `Route` and Gateway API route alike: a backend keeps its weighted
//! share of new clients, and that share goes to its own ready endpoints only. When it has none
//! (its Service or port is missing, it is not permitted, or it has no ready endpoint right now)
//! those clients are dropped and counted as `no_route`, never sent to the rule's other backends.
//! The Gateway API requires it of an invalid backend; a valid Service with no ready endpoint is
//! treated the same because the weights are the operator's statement of how much each backend
//! may take: moving a large backend's share onto a small one (a canary, a region) while the
//! large one restarts could overwhelm it, and one rule is easier to reason about than two.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dataplane::{Cidr, Match, RouteBackend, RouteCounter, RouteTable, Rule};

use super::backends::{CrossNamespace, Endpoints, Refusal, ServiceIndex, endpoints_of};
pub use super::backends::{Granted, Resolved};
pub use super::object::{API_VERSION, InvalidRoute, KIND, PortRangeError, RouteObject, is_route};
use crate::inventory::Object;

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
    /// `allow_cross_namespace`.
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
    /// What is wrong with its backends (a missing Service, a refused namespace, no ready
    /// endpoint, an endpoint that is the proxy itself); not ready while any.
    pub problems: Vec<String>,
    /// Why it serves no client at all (every rule shadowed by an earlier one, or with nothing
    /// to send to); not ready while set.
    pub unserved: Option<String>,
    /// What leaves it ready but is worth saying: a rule that serves nobody while others serve,
    /// an endpoint left out because its address is not unicast.
    pub warnings: Vec<String>,
    /// A backend's Service (or its port) does not exist.
    pub not_found: bool,
    /// A backend in another namespace is not permitted.
    pub not_permitted: bool,
    /// Its entry point is not one of this proxy's (the problem says which).
    pub entry_point_missing: bool,
}

impl RouteReport {
    /// Whether it serves: every backend resolved, and some client reaches a rule of it.
    pub fn ready(&self) -> bool {
        self.problems.is_empty() && self.unserved.is_none()
    }

    /// What status says: why it is not ready, then the warnings (`None` when all is well).
    pub fn message(&self) -> Option<String> {
        let all: Vec<&str> = self
            .problems
            .iter()
            .chain(&self.unserved)
            .chain(&self.warnings)
            .map(String::as_str)
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// What a compile keeps for the next: the counters it hands to the tables, so counts survive a
/// swap (sessions per (route, Service), re-homes per rule), and the backends it resolved.
#[derive(Debug, Default)]
pub struct Counters {
    /// By (`namespace/route`, `namespace/service`).
    pub sessions: HashMap<(String, String), Arc<RouteCounter>>,
    /// By (`namespace/route`, rule key).
    pub rehomed: HashMap<(String, u64), Arc<RouteCounter>>,
    /// Each backend's endpoints as the last compile read them, with what they were read from.
    pub resolved: Resolved,
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
    let services = ServiceIndex::new(inputs.services, inputs.slices);
    let mut used_sessions = Vec::new();
    let mut used_rehomed = Vec::new();
    // Per entry point, where each rule of its table came from, in table order (for shadowing).
    let mut origins: BTreeMap<String, Vec<Origin<'_>>> = BTreeMap::new();
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
            report.entry_point_missing = true;
            out.reports
                .insert((route.namespace.clone(), route.name.clone()), report);
            continue;
        };
        let idle_timeout = route
            .spec
            .session_timeout_seconds
            .map_or(inputs.session_timeout, Duration::from_secs);
        let earlier = origins.entry(route.spec.entry_point.clone()).or_default();
        let mut idle_rules = Vec::new();
        for (i, (rule, matcher)) in route.spec.rules.iter().zip(&route.matches).enumerate() {
            let key = rule_key(&full, i);
            if let Some(why) = rule_serves_nobody(route, i, matcher, rule, earlier) {
                idle_rules.push(why);
            }
            earlier.push(Origin {
                route: &route.namespace,
                name: &route.name,
                index: i,
                matcher,
            });
            let mut backends = Vec::new();
            for b in &rule.backends {
                let cross = match inputs.gateway {
                    Some(granted) => CrossNamespace::Granted(granted),
                    None => CrossNamespace::Allowed(inputs.allow_cross_namespace),
                };
                match endpoints_of(route, b, cross, &services, &mut counters.resolved) {
                    Ok(Endpoints {
                        service,
                        addrs: mut endpoints,
                        left_out,
                    }) => {
                        for (ip, why) in left_out {
                            report.warnings.push(format!(
                                "Service {service}: endpoint {ip} is {why}, not a unicast \
                                 address: left out"
                            ));
                        }
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
                            report.problems.push(format!(
                                "Service {service} has no ready endpoint: its share of new \
                                 clients is dropped"
                            ));
                        }
                        let id = (full.clone(), service.clone());
                        let sessions = Arc::clone(counters.sessions.entry(id.clone()).or_default());
                        used_sessions.push(id);
                        // The one rule (see the header): with no ready endpoint, its share drops.
                        backends.push(RouteBackend {
                            service,
                            weight: b.weight,
                            endpoints,
                            sessions,
                            drops_share: true,
                        });
                    }
                    Err(refusal) => {
                        match refusal.kind {
                            Refusal::NotFound => report.not_found = true,
                            Refusal::NotPermitted => report.not_permitted = true,
                        }
                        report.problems.push(refusal.why);
                        // An invalid backend keeps its share too, and drops it.
                        if b.weight > 0 {
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
        if route.spec.rules.is_empty() {
            // A Gateway API route may have none (a `Route` is refused without).
            report.unserved = Some("it has no rules: it serves no client".to_string());
        } else if idle_rules.len() == route.spec.rules.len() {
            report.unserved = Some(if idle_rules.iter().all(|r| r.weightless) {
                "every backend weighs 0: it serves no client".to_string()
            } else {
                let why: Vec<&str> = idle_rules.iter().map(|r| r.why.as_str()).collect();
                format!("it serves no client: {}", why.join("; "))
            });
        } else {
            report.warnings.extend(
                idle_rules
                    .into_iter()
                    .map(|r| format!("{}: it serves nobody", r.why)),
            );
        }
        out.reports
            .insert((route.namespace.clone(), route.name.clone()), report);
    }
    counters.sessions.retain(|k, _| used_sessions.contains(k));
    counters.rehomed.retain(|k, _| used_rehomed.contains(k));
    counters.resolved.forget_unused();
    out
}

/// Where a rule of an entry point's table came from.
#[derive(Debug)]
struct Origin<'a> {
    route: &'a str,
    name: &'a str,
    index: usize,
    matcher: &'a Match,
}

/// A rule that no client reaches, or whose clients have nowhere to go.
#[derive(Debug)]
struct IdleRule {
    why: String,
    /// It has backends, and every one weighs 0.
    weightless: bool,
}

/// Why rule `index` of `route` serves no client, if it does not: an earlier rule on its entry
/// point (`earlier`, in table order) takes every client it would, or it has no backend of any
/// weight. A rule that only some earlier rule partly overlaps is the ordinary case (specific
/// rules first, a catch-all last) and is not reported.
fn rule_serves_nobody(
    route: &RouteObject,
    index: usize,
    matcher: &Match,
    rule: &crate::crd::RouteRule,
    earlier: &[Origin<'_>],
) -> Option<IdleRule> {
    let n = index + 1;
    if let Some(o) = earlier.iter().find(|o| covers(o.matcher, matcher)) {
        let how = if *o.matcher == Match::default() {
            "no match"
        } else {
            "its match covers this one's"
        };
        let by = if o.route == route.namespace && o.name == route.name {
            format!("rule {}", o.index + 1)
        } else {
            format!(
                "route {}/{}'s rule {}, which comes first on entry point {}",
                o.route,
                o.name,
                o.index + 1,
                route.spec.entry_point
            )
        };
        return Some(IdleRule {
            why: format!("rule {n} is shadowed by {by} ({how})"),
            weightless: false,
        });
    }
    if rule.backends.is_empty() {
        Some(IdleRule {
            why: format!("rule {n} has no backends"),
            weightless: false,
        })
    } else if rule.backends.iter().all(|b| b.weight == 0) {
        Some(IdleRule {
            why: format!("rule {n}: every backend weighs 0"),
            weightless: true,
        })
    } else {
        None
    }
}

/// Whether every client `inner` takes, `outer` takes too (so `outer`, coming first, leaves
/// `inner` nobody). Each match takes the clients in (its blocks) × (its ports), so this holds
/// when `outer`'s blocks cover `inner`'s and its ports cover `inner`'s, each as a union: two
/// halves of a block cover the block. Exact for one earlier rule; several earlier rules that
/// only together cover a rule are not looked for.
pub fn covers(outer: &Match, inner: &Match) -> bool {
    ports_cover(&outer.source_ports, &inner.source_ports)
        && blocks_cover(&outer.source_cidrs, &inner.source_cidrs)
}

/// Whether the union of `outer`'s inclusive port ranges holds every port of `inner`'s (an empty
/// list: every port).
fn ports_cover(outer: &[(u16, u16)], inner: &[(u16, u16)]) -> bool {
    if outer.is_empty() {
        return true;
    }
    let mut sorted = outer.to_vec();
    sorted.sort_unstable();
    let every = [(1, u16::MAX)];
    let inner = if inner.is_empty() { &every[..] } else { inner };
    inner.iter().all(|&(lo, hi)| {
        // Walk the sorted ranges from `lo`: covered once the walk passes `hi`.
        let mut next = u32::from(lo);
        for &(a, b) in &sorted {
            if u32::from(a) > next {
                break;
            }
            next = next.max(u32::from(b) + 1);
            if next > u32::from(hi) {
                return true;
            }
        }
        next > u32::from(hi)
    })
}

/// An address block as bits: IPv6 or not, the address, the prefix length.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Block {
    v6: bool,
    bits: u128,
    len: u8,
}

impl Block {
    fn of(cidr: &Cidr) -> Self {
        let (v6, bits) = match cidr.addr() {
            IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (true, u128::from(v6)),
        };
        Self {
            v6,
            bits,
            len: cidr.prefix_len(),
        }
    }

    const fn width(self) -> u8 {
        if self.v6 { 128 } else { 32 }
    }

    fn mask(self, bits: u128) -> u128 {
        let host = u32::from(self.width() - self.len);
        bits & u128::MAX.checked_shl(host).unwrap_or(0)
    }

    /// Whether `other` lies within this block.
    fn holds(self, other: Self) -> bool {
        self.v6 == other.v6 && self.len <= other.len && self.mask(other.bits) == self.bits
    }

    /// Its two halves (`None` for a single address).
    fn halves(self) -> Option<(Self, Self)> {
        (self.len < self.width()).then(|| {
            let len = self.len + 1;
            let bit = 1u128 << (self.width() - len);
            (
                Self { len, ..self },
                Self {
                    len,
                    bits: self.bits | bit,
                    ..self
                },
            )
        })
    }
}

/// Whether the union of `outer`'s blocks holds every block of `inner` (an empty list: every
/// IPv4 and IPv6 address).
fn blocks_cover(outer: &[Cidr], inner: &[Cidr]) -> bool {
    if outer.is_empty() {
        return true;
    }
    let outer: Vec<Block> = outer.iter().map(Block::of).collect();
    let every = [
        Block {
            v6: false,
            bits: 0,
            len: 0,
        },
        Block {
            v6: true,
            bits: 0,
            len: 0,
        },
    ];
    let inner: Vec<Block> = if inner.is_empty() {
        every.to_vec()
    } else {
        inner.iter().map(Block::of).collect()
    };
    inner.iter().all(|b| block_covered(*b, &outer))
}

/// Blocks nest or are apart, so `block` is covered when one block holds it, or when both its
/// halves are; with no block inside it either, nothing covers it. The recursion follows only
/// the blocks inside `block`: at most their number times the address width.
fn block_covered(block: Block, outer: &[Block]) -> bool {
    if outer.iter().any(|o| o.holds(block)) {
        return true;
    }
    if !outer.iter().any(|o| block.holds(*o)) {
        return false;
    }
    block
        .halves()
        .is_some_and(|(a, b)| block_covered(a, outer) && block_covered(b, outer))
}

/// A rule's identity across compiles.
fn rule_key(route: &str, index: usize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("route", route, index).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Vec<Arc<Object>> {
        let values: Vec<serde_json::Value> = serde_yaml::from_str(yaml).unwrap();
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
    fn a_compile_reads_again_only_the_backends_whose_service_or_slices_changed() {
        let (services, mut slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let routes = [
            route(
                "- {apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: a, \
                 namespace: games}, spec: {entryPoint: voice, rules: [{backends: [{service: eu, \
                 port: voice}, {service: us, port: voice}]}]}}",
            ),
            route(
                "- {apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: b, \
                 namespace: games}, spec: {entryPoint: voice, rules: [{match: {sourceCidrs: \
                 [10.9.0.0/16]}, backends: [{service: us, port: 5000}]}]}}",
            ),
        ];
        let mut counters = Counters::default();
        let first = compile(&routes, inputs(&services, &slices, &eps), &mut counters);
        assert_eq!(counters.resolved.reads(), 3, "eu:voice, us:voice, us:5000");
        // Nothing changed: nothing is read again, and the tables are the same.
        let again = compile(&routes, inputs(&services, &slices, &eps), &mut counters);
        assert_eq!(counters.resolved.reads(), 3);
        assert_eq!(again.reports, first.reports);
        // eu's slice changes (a new object, as a watch delivers it): only eu's backend is read.
        let eu = slices.iter().position(|s| s.name == "eu-1").unwrap();
        let mut changed = (*slices[eu]).clone();
        changed.raw["endpoints"] = serde_json::json!([{"addresses": ["10.0.0.7"]}]);
        slices[eu] = Arc::new(changed);
        let c = compile(&routes, inputs(&services, &slices, &eps), &mut counters);
        assert_eq!(counters.resolved.reads(), 4);
        let eu_endpoints = &c.tables["voice"]
            .rules
            .iter()
            .find(|r| r.route == "games/a")
            .unwrap()
            .backends[0];
        assert_eq!(eu_endpoints.service, "games/eu");
        assert_eq!(
            eu_endpoints.endpoints,
            ["10.0.0.7:15000".parse::<SocketAddr>().unwrap()]
        );
        // us goes away: both backends on it are read (and found missing); eu's is kept.
        let without_us: Vec<Arc<Object>> = services
            .iter()
            .filter(|s| s.name != "us")
            .cloned()
            .collect();
        let c = compile(&routes, inputs(&without_us, &slices, &eps), &mut counters);
        assert_eq!(
            counters.resolved.reads(),
            4,
            "a missing Service is a lookup, not a read"
        );
        let a = &c.reports[&("games".to_string(), "a".to_string())];
        assert_eq!(a.problems, ["Service games/us not found"]);
        assert!(a.not_found);
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

    /// How many of `n` new clients (distinct source ports) rule table `entry` serves.
    fn served(c: &Compiled, entry: &str, n: u16) -> usize {
        let mut p = dataplane_picker();
        (1..=n)
            .filter(|i| {
                c.tables[entry]
                    .pick(&mut p, SocketAddr::from(([1, 1, 1, 1], *i)))
                    .is_some()
            })
            .count()
    }

    #[test]
    fn bad_backends_keep_their_share_which_is_dropped_and_say_why() {
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
    - backends: [{service: eu, port: voice}, {service: gone, port: voice}, {service: eu, port: nope}, {service: other, namespace: elsewhere, port: 6000}, {service: gone, port: voice, weight: 0}]
"#,
        );
        let mut counters = Counters::default();
        let c = compile(
            std::slice::from_ref(&r),
            inputs(&services, &slices, &eps),
            &mut counters,
        );
        let shares: Vec<(u32, usize)> = c.tables["voice"].rules[0]
            .backends
            .iter()
            .map(|b| (b.weight, b.endpoints.len()))
            .collect();
        assert_eq!(
            shares,
            [(1, 2), (1, 0), (1, 0), (1, 0)],
            "every invalid backend with weight keeps its share, with nowhere to send it"
        );
        assert!(
            c.tables["voice"].rules[0]
                .backends
                .iter()
                .all(|b| b.drops_share)
        );
        assert_eq!(served(&c, "voice", 100), 25, "one share of four is served");
        let report = &c.reports[&("games".into(), "voice".into())];
        assert_eq!(
            report.problems,
            [
                "Service games/gone not found",
                "Service games/eu has no port nope",
                "backend elsewhere/other is in another namespace (set routes.allowCrossNamespace)",
                "Service games/gone not found",
            ]
        );
        assert!(report.not_found && report.not_permitted && !report.ready());
        let allowed = Inputs {
            allow_cross_namespace: true,
            ..inputs(&services, &slices, &eps)
        };
        let c = compile(&[r], allowed, &mut counters);
        let rule = &c.tables["voice"].rules[0];
        assert_eq!(rule.backends.len(), 4);
        assert_eq!(
            rule.backends[3].endpoints,
            ["10.2.0.1:16000".parse().unwrap()],
            "unnamed port"
        );
        assert_eq!(served(&c, "voice", 100), 50, "two shares of four");
    }

    #[test]
    fn a_backend_with_no_ready_endpoint_drops_its_share_too() {
        let services = objects(&format!(
            "{SERVICES}- {{apiVersion: v1, kind: Service, metadata: {{name: empty, namespace: games}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n"
        ));
        let slices = objects(SLICES);
        let eps = ["voice".to_string()];
        let r = route(
            "- {apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: voice, \
             namespace: games}, spec: {entryPoint: voice, rules: [{backends: [{service: us, \
             port: voice, weight: 3}, {service: empty, port: voice}]}]}}",
        );
        // The same rule under the Route's settings and under the Gateway API's.
        let granted = |_: &str, _: &str, _: &str| true;
        for gateway in [None, Some(&granted as &Granted<'_>)] {
            let c = compile(
                std::slice::from_ref(&r),
                Inputs {
                    gateway,
                    ..inputs(&services, &slices, &eps)
                },
                &mut Counters::default(),
            );
            assert_eq!(
                served(&c, "voice", 100),
                75,
                "the empty Service's share is dropped, not sent to `us`"
            );
            let report = &c.reports[&("games".into(), "voice".into())];
            assert_eq!(
                report.problems,
                ["Service games/empty has no ready endpoint: its share of new clients is dropped"]
            );
            assert!(!report.not_found, "it exists");
        }
    }

    #[test]
    fn under_gateway_rules_grants_decide() {
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
        let shares: Vec<usize> = rule.backends.iter().map(|b| b.endpoints.len()).collect();
        assert_eq!(shares, [1, 0, 1], "granted: served");
        let report = &c.reports[&("games".into(), "voice".into())];
        assert!(report.not_found && !report.not_permitted);
        assert_eq!(served(&c, "voice", 99), 66, "two valid shares of three");
        let refused = |_: &str, _: &str, _: &str| false;
        let strict = Inputs {
            gateway: Some(&refused),
            ..inputs(&services, &slices, &eps)
        };
        let c = compile(&[r], strict, &mut Counters::default());
        assert!(c.reports[&("games".into(), "voice".into())].not_permitted);
        assert_eq!(served(&c, "voice", 99), 33);
    }

    #[test]
    fn endpoints_that_are_not_unicast_are_left_out_and_said() {
        let services = objects(SERVICES);
        let slices = objects(
            r#"
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: eu-1, namespace: games, labels: {kubernetes.io/service-name: eu}}
  ports: [{name: voice, port: 15000}]
  endpoints: [{addresses: [10.0.0.1]}, {addresses: [224.0.0.1]}, {addresses: [0.0.0.0]}, {addresses: [255.255.255.255]}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: us-1, namespace: games, labels: {kubernetes.io/service-name: us}}
  ports: [{name: voice, port: 15001}]
  endpoints: [{addresses: ["ff02::1"]}]
"#,
        );
        let eps = ["voice".to_string()];
        let r = route(
            "- {apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {name: voice, \
             namespace: games}, spec: {entryPoint: voice, rules: [{backends: [{service: eu, \
             port: voice}, {service: us, port: voice}]}]}}",
        );
        let c = compile(
            &[r],
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        let rule = &c.tables["voice"].rules[0];
        assert_eq!(
            rule.backends[0].endpoints,
            ["10.0.0.1:15000".parse::<SocketAddr>().unwrap()]
        );
        assert!(rule.backends[1].endpoints.is_empty());
        let report = &c.reports[&("games".into(), "voice".into())];
        assert_eq!(report.ready_endpoints, 1, "counted as not ready");
        assert_eq!(
            report.warnings,
            [
                "Service games/eu: endpoint 0.0.0.0 is the unspecified address, not a unicast \
                 address: left out",
                "Service games/eu: endpoint 224.0.0.1 is a multicast address, not a unicast \
                 address: left out",
                "Service games/eu: endpoint 255.255.255.255 is the broadcast address, not a \
                 unicast address: left out",
                "Service games/us: endpoint ff02::1 is a multicast address, not a unicast \
                 address: left out",
            ]
        );
        assert_eq!(
            report.problems,
            ["Service games/us has no ready endpoint: its share of new clients is dropped"]
        );
    }

    fn match_of(cidrs: &[&str], ports: &[(u16, u16)]) -> Match {
        Match {
            source_cidrs: cidrs.iter().map(|c| Cidr::parse(c).unwrap()).collect(),
            source_ports: ports.to_vec(),
        }
    }

    #[test]
    fn a_match_covers_another_when_its_blocks_and_ports_hold_all_of_it() {
        let all = Match::default();
        let eight = match_of(&["10.0.0.0/8"], &[]);
        assert!(covers(&all, &eight), "no match takes every client");
        assert!(covers(&all, &all));
        assert!(!covers(&eight, &all));
        assert!(covers(&eight, &match_of(&["10.1.0.0/16", "10.2.3.4"], &[])));
        assert!(!covers(
            &eight,
            &match_of(&["10.1.0.0/16", "11.0.0.1"], &[])
        ));
        assert!(
            covers(&match_of(&["10.0.0.0/9", "10.128.0.0/9"], &[]), &eight),
            "two halves cover the block"
        );
        assert!(!covers(
            &match_of(&["10.0.0.0/9", "10.192.0.0/10"], &[]),
            &eight
        ));
        assert!(
            covers(&match_of(&["0.0.0.0/0", "::/0"], &[]), &all),
            "both families whole: every client"
        );
        assert!(
            !covers(&match_of(&["0.0.0.0/0"], &[]), &all),
            "IPv6 clients left"
        );
        assert!(covers(
            &match_of(&["0.0.0.0/0"], &[]),
            &match_of(&["::ffff:10.0.0.0/104"], &[])
        ));
        assert!(!covers(&match_of(&["::/0"], &[]), &eight), "another family");
        // Ports: a union of ranges, and both axes must hold.
        let low = match_of(&[], &[(1, 1000), (1001, 2000)]);
        assert!(covers(&low, &match_of(&["10.0.0.0/8"], &[(500, 1500)])));
        assert!(!covers(&low, &match_of(&[], &[(500, 2001)])));
        assert!(!covers(&low, &all), "ports above 2000 left");
        assert!(covers(&match_of(&[], &[(1, 65535)]), &all));
        assert!(!covers(&match_of(&[], &[(2, 65535)]), &all), "port 1 left");
        let both = match_of(&["10.0.0.0/8"], &[(9000, 9100)]);
        assert!(covers(&both, &match_of(&["10.0.0.1"], &[(9001, 9001)])));
        assert!(
            !covers(&both, &match_of(&["10.0.0.1"], &[])),
            "every port of it"
        );
        assert!(
            !covers(&both, &match_of(&[], &[(9001, 9001)])),
            "every address"
        );
    }

    fn ordered(name: &str, created: &str, rules: &str) -> RouteObject {
        route(&format!(
            "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: {name}, \
             namespace: games, creationTimestamp: \"{created}\"}}, spec: {{entryPoint: voice, \
             rules: {rules}}}}}"
        ))
    }

    #[test]
    fn a_route_that_serves_no_client_is_not_ready_and_says_why() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let eu = "{service: eu, port: voice}";
        let routes = [
            ordered(
                "old",
                "2026-01-01T00:00:00Z",
                &format!(
                    "[{{match: {{sourcePorts: [\"9000-9100\"]}}, backends: [{eu}]}}, {{backends: [{eu}]}}, \
                     {{match: {{sourceCidrs: [10.0.0.0/8]}}, backends: [{eu}]}}]"
                ),
            ),
            ordered(
                "young",
                "2026-01-02T00:00:00Z",
                &format!("[{{backends: [{eu}]}}]"),
            ),
            ordered(
                "weightless",
                "2025-12-01T00:00:00Z",
                "[{match: {sourceCidrs: [192.0.2.0/24]}, backends: [{service: eu, port: voice, weight: 0}, {service: us, port: voice, weight: 0}]}]",
            ),
        ];
        let c = compile(
            &routes,
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        let report = |name: &str| &c.reports[&("games".to_string(), name.to_string())];
        // A catch-all of its own before its last rule: a warning, still ready.
        assert!(report("old").ready());
        assert_eq!(
            report("old").message().as_deref(),
            Some("rule 3 is shadowed by rule 2 (no match): it serves nobody")
        );
        // Every rule behind an older route's catch-all: not ready.
        assert!(!report("young").ready());
        assert_eq!(
            report("young").unserved.as_deref(),
            Some(
                "it serves no client: rule 1 is shadowed by route games/old's rule 2, which \
                 comes first on entry point voice (no match)"
            )
        );
        assert!(!report("weightless").ready());
        assert_eq!(
            report("weightless").message().as_deref(),
            Some("every backend weighs 0: it serves no client")
        );
        let mut ruleless = ordered("ruleless", "", &format!("[{{backends: [{eu}]}}]"));
        ruleless.spec.rules.clear();
        ruleless.matches.clear();
        let c2 = compile(
            &[ruleless],
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        assert_eq!(
            c2.reports[&("games".into(), "ruleless".into())]
                .message()
                .as_deref(),
            Some("it has no rules: it serves no client"),
            "a Gateway API route may have no rules"
        );
        // Its rule still takes its clients (and drops them).
        assert_eq!(c.tables["voice"].rules.len(), 5);
        assert!(
            c.tables["voice"]
                .pick(&mut dataplane_picker(), "192.0.2.7:5".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn a_rule_covered_by_an_earlier_match_and_weightless_rules_are_said() {
        let (services, slices) = (objects(SERVICES), objects(SLICES));
        let eps = ["voice".to_string()];
        let eu = "{service: eu, port: voice}";
        let only = ordered(
            "r",
            "",
            &format!(
                "[{{match: {{sourceCidrs: [10.0.0.0/8]}}, backends: [{eu}]}}, \
                 {{match: {{sourceCidrs: [10.1.0.0/16], sourcePorts: [\"9000\"]}}, backends: [{eu}]}}]"
            ),
        );
        let c = compile(
            &[only],
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        let report = &c.reports[&("games".into(), "r".into())];
        assert!(report.ready(), "rule 1 serves");
        assert_eq!(
            report.warnings,
            ["rule 2 is shadowed by rule 1 (its match covers this one's): it serves nobody"]
        );
        let mixed = ordered(
            "m",
            "",
            "[{match: {sourcePorts: [\"1-10\"]}, backends: [{service: eu, port: voice, weight: 0}]}, {backends: [{service: eu, port: voice}]}]",
        );
        let c = compile(
            &[mixed],
            inputs(&services, &slices, &eps),
            &mut Counters::default(),
        );
        let report = &c.reports[&("games".into(), "m".into())];
        assert!(report.ready());
        assert_eq!(
            report.warnings,
            ["rule 1: every backend weighs 0: it serves nobody"]
        );
    }

    fn dataplane_picker() -> dataplane::policy::route::Picker {
        dataplane::policy::route::Picker::default()
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
            .to_string()
        };
        let timeout = |t: &str| {
            RouteObject::from_object(&objects(&format!(
                "- {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: r, namespace: g}}, spec: {{entryPoint: e, sessionTimeoutSeconds: {t}, rules: [{{backends: [{{service: s, port: 1}}]}}]}}}}"
            ))[0])
            .map(|_| ())
            .map_err(|e| e.to_string())
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
