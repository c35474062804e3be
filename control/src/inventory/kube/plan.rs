//! What the Kubernetes inventory watches, from the config alone ([`plan`]), and the RBAC that
//! follows from the same plan ([`cluster_role`], [`forwarders_role`]), so the shipped roles and
//! the watches cannot drift apart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kube::api::ApiResource;

use crate::config::{Config, InventoryConfig, Locator, Mapping};
use crate::inventory::{ENDPOINT_SLICE_API_VERSION, SERVICE_API_VERSION, SERVICE_NAME_LABEL};

/// What a watched resource type is used for.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Feed {
    /// A resource type of `resourceQueryMapping`.
    Mapped,
    /// Services, for service-based mappings.
    Services,
    /// EndpointSlices, for service-based mappings to headless Services.
    EndpointSlices,
    /// `Forwarder` objects.
    Forwarders,
    /// `Route` objects.
    Routes,
    /// Gateway API objects.
    Gateway,
}

/// Where a resource type is watched.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Scope {
    /// In `inventory.watchNamespaces` (the whole cluster when empty).
    Inventory,
    /// In the whole cluster (Services and EndpointSlices a forwarder's target may name).
    Cluster,
    /// In one namespace (the forwarders').
    Namespace(String),
}

/// One resource type to watch.
#[derive(Clone, Debug)]
pub struct WatchPlan {
    /// Group, version, kind and plural.
    pub resource: ApiResource,
    /// Server-side label selector.
    pub label_selector: Option<String>,
    /// What the objects are for.
    pub feed: Feed,
    /// Which namespaces.
    pub scope: Scope,
}

impl WatchPlan {
    /// `plural.group`, or `plural` for the core group: the name RBAC and metrics use.
    pub fn name(&self) -> String {
        if self.resource.group.is_empty() {
            self.resource.plural.clone()
        } else {
            format!("{}.{}", self.resource.plural, self.resource.group)
        }
    }
}

/// The resource types a config needs watched.
pub fn plan(config: &Config) -> Vec<WatchPlan> {
    let label_selector = match &config.inventory {
        InventoryConfig::Kubernetes { label_selector, .. } => label_selector.clone(),
        InventoryConfig::File { .. } => None,
    };
    let mut plans: Vec<WatchPlan> = Vec::new();
    for mapping in config.mappings.values() {
        let resource = mapped_resource(mapping);
        if !plans.iter().any(|p| same_type(&p.resource, &resource)) {
            plans.push(WatchPlan {
                resource,
                label_selector: label_selector.clone(),
                feed: Feed::Mapped,
                scope: Scope::Inventory,
            });
        }
    }
    let mut service_labels: Vec<&str> = config
        .mappings
        .values()
        .filter_map(|m| match &m.locator {
            Locator::Service { selector_label, .. } => Some(selector_label.as_str()),
            Locator::Direct { .. } => None,
        })
        .collect();
    service_labels.sort_unstable();
    service_labels.dedup();
    let services = || core_resource(SERVICE_API_VERSION, "Service", "services");
    let slices = || {
        core_resource(
            ENDPOINT_SLICE_API_VERSION,
            "EndpointSlice",
            "endpointslices",
        )
    };
    if !config.entry_points.is_empty() {
        plans.push(WatchPlan {
            resource: udp_director_resource("Route", "routes"),
            label_selector: None,
            feed: Feed::Routes,
            scope: Scope::Inventory,
        });
    }
    if config.gateway_controller.is_some() {
        let gateway = |version: &str, kind: &str, plural: &str| ApiResource {
            group: crate::crd::gateway::GROUP.into(),
            version: version.into(),
            api_version: format!("{}/{version}", crate::crd::gateway::GROUP),
            kind: kind.into(),
            plural: plural.into(),
        };
        plans.push(WatchPlan {
            resource: gateway("v1", "GatewayClass", "gatewayclasses"),
            label_selector: None,
            feed: Feed::Gateway,
            scope: Scope::Cluster,
        });
        for (version, kind, plural) in [
            ("v1", "Gateway", "gateways"),
            ("v1", "UDPRoute", "udproutes"),
            ("v1", "TCPRoute", "tcproutes"),
        ] {
            plans.push(WatchPlan {
                resource: gateway(version, kind, plural),
                label_selector: None,
                feed: Feed::Gateway,
                scope: Scope::Inventory,
            });
        }
        // A grant lives where the backends are, which may be outside watchNamespaces.
        plans.push(WatchPlan {
            resource: gateway("v1beta1", "ReferenceGrant", "referencegrants"),
            label_selector: None,
            feed: Feed::Gateway,
            scope: Scope::Cluster,
        });
    }
    if config.forwarders.is_some()
        || !config.entry_points.is_empty()
        || config.gateway_controller.is_some()
    {
        // A forwarder's `<service>.<namespace>.svc` target, or a route's backend, may name
        // any Service, so every Service and EndpointSlice is watched (which also covers
        // service-based mappings).
        plans.push(WatchPlan {
            resource: services(),
            label_selector: None,
            feed: Feed::Services,
            scope: Scope::Cluster,
        });
        plans.push(WatchPlan {
            resource: slices(),
            label_selector: Some(SERVICE_NAME_LABEL.to_string()),
            feed: Feed::EndpointSlices,
            scope: Scope::Cluster,
        });
        if let Some(forwarders) = &config.forwarders {
            plans.push(WatchPlan {
                resource: forwarder_resource(),
                label_selector: None,
                feed: Feed::Forwarders,
                scope: Scope::Namespace(forwarders.namespace.clone()),
            });
        }
        return plans;
    }
    for label in &service_labels {
        // An existence selector: only the Services a mapping can point at are cached.
        plans.push(WatchPlan {
            resource: services(),
            label_selector: Some((*label).to_string()),
            feed: Feed::Services,
            scope: Scope::Inventory,
        });
    }
    if !service_labels.is_empty() {
        plans.push(WatchPlan {
            resource: slices(),
            label_selector: Some(SERVICE_NAME_LABEL.to_string()),
            feed: Feed::EndpointSlices,
            scope: Scope::Inventory,
        });
    }
    plans
}

fn forwarder_resource() -> ApiResource {
    udp_director_resource(crate::crd::forwarder::KIND, "forwarders")
}

fn udp_director_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "udp-director.dev".into(),
        version: "v1alpha1".into(),
        api_version: "udp-director.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub(super) fn mapped_resource(mapping: &Mapping) -> ApiResource {
    ApiResource {
        group: mapping.group.clone(),
        version: mapping.version.clone(),
        api_version: mapping.api_version(),
        // The kind only labels cached objects (and keys backend ids), so it must be the same
        // for every event; the resource name stands in when the config gives none.
        kind: mapping
            .kind
            .clone()
            .unwrap_or_else(|| mapping.resource.clone()),
        plural: mapping.resource.clone(),
    }
}

pub(super) fn core_resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        plural: plural.to_string(),
    }
}

pub(super) fn same_type(a: &ApiResource, b: &ApiResource) -> bool {
    a.group == b.group && a.version == b.version && a.plural == b.plural
}

/// What recording Events needs (kube's recorder creates an Event, then patches its count).
const EVENTS_RULE: &str =
    "- apiGroups: [\"events.k8s.io\"]\n  resources: [events]\n  verbs: [create, patch]\n";

/// A least-privilege ClusterRole for a config: `list` and `watch` (all a watcher does) on each
/// watched resource type, nothing else.
pub fn cluster_role(config: &Config, name: &str) -> String {
    let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let plans = plan(config);
    // Namespaced watches are granted by the forwarders' Role ([`forwarders_role`]).
    for p in plans
        .iter()
        .filter(|p| !matches!(p.scope, Scope::Namespace(_)))
    {
        let resources = by_group.entry(p.resource.group.as_str()).or_default();
        if !resources.contains(&p.resource.plural.as_str()) {
            resources.push(&p.resource.plural);
        }
    }
    let mut out = format!(
        "# Generated by `udp-director rbac`: list and watch on exactly what the config watches\n\
         # (and, with sessionsApi.auth: kubernetes, create on token and access reviews; with\n\
         # entryPoints, patch on routes/status).\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules:"
    );
    let reviews = config.sessions_api == crate::config::SessionsApiAuth::Kubernetes;
    // `rules:` then a list, or `rules: []` on its line when nothing is granted.
    out.push_str(if by_group.is_empty() && !reviews {
        " []\n"
    } else {
        "\n"
    });
    for (group, mut resources) in by_group {
        resources.sort_unstable();
        let _ = write!(
            out,
            "- apiGroups: [\"{group}\"]\n  resources: [{}]\n  verbs: [list, watch]\n",
            resources.join(", ")
        );
    }
    if config.gateway_controller.is_some() {
        // The status the Gateway API defines, for the classes, Gateways and routes served.
        out.push_str(
            "- apiGroups: [\"gateway.networking.k8s.io\"]\n  resources: [gatewayclasses/status, gateways/status, tcproutes/status, udproutes/status]\n  verbs: [patch]\n",
        );
    }
    if !config.entry_points.is_empty() {
        // Each instance writes its own entry of a route's status.
        out.push_str(
            "- apiGroups: [\"udp-director.dev\"]\n  resources: [routes/status]\n  verbs: [patch]\n",
        );
    }
    if !config.entry_points.is_empty() || config.gateway_controller.is_some() {
        // Events on the Routes and Gateways (in their namespaces): created once, then patched
        // as a repeat is counted into them.
        out.push_str(EVENTS_RULE);
    }
    if allocates(config) && allocation_namespaces(config).is_empty() {
        // Queries allocate Agones servers, in any namespace the proxy watches (all of them).
        out.push_str(ALLOCATION_RULE);
    }
    if reviews {
        // `sessionsApi.auth: kubernetes`: who a remote caller is, and whether it may.
        out.push_str(
            "- apiGroups: [\"authentication.k8s.io\"]\n  resources: [tokenreviews]\n  verbs: [create]\n\
             - apiGroups: [\"authorization.k8s.io\"]\n  resources: [subjectaccessreviews]\n  verbs: [create]\n",
        );
    }
    out
}

/// What creating Agones allocations needs (SPEC section 13): create only.
const ALLOCATION_RULE: &str = "- apiGroups: [\"allocation.agones.dev\"]\n  resources: [gameserverallocations]\n  verbs: [create]\n";

/// Whether a query may allocate (a mapping has `allocation` settings) with the Kubernetes
/// inventory.
fn allocates(config: &Config) -> bool {
    matches!(config.inventory, InventoryConfig::Kubernetes { .. })
        && config.mappings.values().any(|m| m.allocation.is_some())
}

/// The namespaces the inventory watches (empty: the whole cluster).
fn allocation_namespaces(config: &Config) -> &[String] {
    match &config.inventory {
        InventoryConfig::Kubernetes { namespaces, .. } => namespaces,
        InventoryConfig::File { .. } => &[],
    }
}

/// With allocation and watched namespaces, a Role and its RoleBinding in each of them:
/// `create` on `gameserverallocations` there and nowhere else (without watched namespaces the
/// ClusterRole grants it, as it does the watches).
pub fn allocation_roles(config: &Config, name: &str) -> String {
    if !allocates(config) {
        return String::new();
    }
    let mut out = String::new();
    for namespace in allocation_namespaces(config) {
        let _ = write!(
            out,
            "---\n# Generated by `udp-director rbac`: Agones allocations on query, in a watched namespace.\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}-allocation\n  \
             namespace: {namespace}\nrules:\n{ALLOCATION_RULE}\
             ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  \
             name: {name}-allocation\n  namespace: {namespace}\nroleRef:\n  \
             apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}-allocation\n\
             subjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {}\n",
            config.status_lease.namespace
        );
    }
    out
}

/// The Role the forwarders need in their namespace (empty without `forwarders`): `list` and
/// `watch` on the namespaced watches of [`plan`], `patch` on `forwarders/status` (each instance
/// writes its own entry), and `get`/`patch` on the named Services of `servicePorts` only.
pub fn forwarders_role(config: &Config, name: &str) -> String {
    let Some(forwarders) = &config.forwarders else {
        return String::new();
    };
    let mut out = format!(
        "---\n# Generated by `udp-director rbac`: what the forwarders need in their namespace.\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}-forwarders\n  \
         namespace: {}\nrules:\n",
        forwarders.namespace
    );
    for p in plan(config) {
        if matches!(p.scope, Scope::Namespace(_)) {
            let _ = write!(
                out,
                "- apiGroups: [\"{}\"]\n  resources: [{}]\n  verbs: [list, watch]\n",
                p.resource.group, p.resource.plural
            );
        }
    }
    let _ = write!(
        out,
        "- apiGroups: [\"{}\"]\n  resources: [forwarders/status]\n  verbs: [patch]\n",
        forwarder_resource().group
    );
    out.push_str(EVENTS_RULE);
    let mut services: Vec<&str> = [&forwarders.udp_service, &forwarders.tcp_service]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    services.sort_unstable();
    services.dedup();
    if !services.is_empty() {
        let _ = write!(
            out,
            "- apiGroups: [\"\"]\n  resources: [services]\n  resourceNames: [{}]\n  verbs: [get, patch]\n",
            services.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap()
    }

    const MAPPINGS: &str = r#"
dataPorts: [{name: game, port: 7777}]
inventory: {kind: kubernetes, watchNamespaces: [a, b], labelSelector: "fleet=x"}
resourceQueryMapping:
  gs: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: game}
  gs-pod-ip: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.addresses, addressType: PodIP, portName: game}
  pod: {group: "", version: v1, resource: pods, addressPath: status.podIP, portName: game}
  svc: {group: agones.dev, version: v1, resource: gameservers, serviceSelectorLabel: gs, serviceTargetPortName: game}
"#;

    #[test]
    fn one_watch_per_resource_type_plus_services_and_slices() {
        let plans = plan(&config(MAPPINGS));
        let names: Vec<(String, Option<String>)> = plans
            .iter()
            .map(|p| (p.name(), p.label_selector.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("gameservers.agones.dev".into(), Some("fleet=x".into())),
                ("pods".into(), Some("fleet=x".into())),
                ("services".into(), Some("gs".into())),
                (
                    "endpointslices.discovery.k8s.io".into(),
                    Some(SERVICE_NAME_LABEL.into())
                ),
            ]
        );
    }

    #[test]
    fn direct_mappings_watch_no_services() {
        let plans = plan(&config(
            "resourceQueryMapping:\n  pod: {group: \"\", version: v1, resource: pods, addressPath: status.podIP, portName: game}\n",
        ));
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].resource.api_version, "v1");
        assert_eq!(plans[0].label_selector, None);
    }

    #[test]
    fn a_role_with_nothing_to_watch_is_valid_yaml_with_no_rules() {
        // Found by the `config` fuzz target: `rules:` then `[]` on its own line.
        let role = cluster_role(&config("inventory: {kind: file, path: x.yaml}\n"), "u");
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["rules"], serde_json::json!([]), "{role}");
    }

    #[test]
    fn mapping_names_that_would_reach_the_role_raw_are_refused() {
        // Found by the `config` fuzz target: `resource: gameserve[s` went into the role as is.
        for (field, value) in [
            ("resource", "gameserve[s"),
            ("resource", "pods]\n- apiGroups: ['*']"),
            ("group", "agones.dev\"]"),
            ("version", "V1"),
            ("kind", "Game Server"),
        ] {
            let mut m = serde_json::json!({"group": "agones.dev", "version": "v1",
                "resource": "gameservers", "addressPath": "status.address", "portName": "default"});
            m[field] = serde_json::json!(value);
            let yaml = format!("resourceQueryMapping:\n  gs: {m}\n");
            let e = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(
                e.contains(&format!("resourceQueryMapping.gs.{field}")),
                "{e}"
            );
        }
    }

    #[test]
    fn cluster_role_lists_exactly_the_watched_types() {
        let role = cluster_role(&config(MAPPINGS), "udp-director");
        assert!(role.contains(
            "- apiGroups: [\"\"]\n  resources: [pods, services]\n  verbs: [list, watch]\n"
        ));
        assert!(role.contains(
            "- apiGroups: [\"agones.dev\"]\n  resources: [gameservers]\n  verbs: [list, watch]\n"
        ));
        assert!(
            role.contains("- apiGroups: [\"discovery.k8s.io\"]\n  resources: [endpointslices]\n")
        );
        assert_eq!(role.matches("apiGroups").count(), 3);
        assert!(
            !role.contains("verbs: [create]"),
            "no reviews without sessionsApi.auth"
        );
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["kind"], "ClusterRole");
    }

    #[test]
    fn kubernetes_sessions_auth_may_create_reviews_only() {
        let role = cluster_role(
            &config(&format!("sessionsApi: {{auth: kubernetes}}\n{MAPPINGS}")),
            "udp-director",
        );
        assert!(role.contains(
            "- apiGroups: [\"authentication.k8s.io\"]\n  resources: [tokenreviews]\n  verbs: [create]\n"
        ));
        assert!(role.contains(
            "- apiGroups: [\"authorization.k8s.io\"]\n  resources: [subjectaccessreviews]\n  verbs: [create]\n"
        ));
        assert_eq!(role.matches("apiGroups").count(), 5);
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["rules"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn forwarders_watch_their_namespace_and_every_service_with_a_role_of_their_own() {
        let c = config(&format!(
            "{MAPPINGS}forwarders: {{namespace: edge, servicePorts: {{udp: lb-udp, tcp: lb-tcp}}}}\n"
        ));
        let plans = plan(&c);
        let scoped: Vec<(String, Option<String>, Scope)> = plans
            .iter()
            .skip(2)
            .map(|p| (p.name(), p.label_selector.clone(), p.scope.clone()))
            .collect();
        assert_eq!(
            scoped,
            [
                ("services".into(), None, Scope::Cluster),
                (
                    "endpointslices.discovery.k8s.io".into(),
                    Some(SERVICE_NAME_LABEL.into()),
                    Scope::Cluster
                ),
                (
                    "forwarders.udp-director.dev".into(),
                    None,
                    Scope::Namespace("edge".into())
                ),
            ],
            "one Service watch serves both the mappings and the forwarders' targets"
        );
        let cluster = cluster_role(&c, "udp-director");
        assert!(
            !cluster.contains("forwarders"),
            "granted in the namespace only"
        );
        let role = forwarders_role(&c, "udp-director");
        let role = role.strip_prefix("---\n").expect("a document of its own");
        let parsed: serde_json::Value = serde_yaml::from_str(role).unwrap();
        assert_eq!(parsed["kind"], "Role");
        assert_eq!(parsed["metadata"]["name"], "udp-director-forwarders");
        assert_eq!(parsed["metadata"]["namespace"], "edge");
        assert_eq!(
            parsed["rules"],
            serde_json::json!([
                {"apiGroups": ["udp-director.dev"], "resources": ["forwarders"], "verbs": ["list", "watch"]},
                {"apiGroups": ["udp-director.dev"], "resources": ["forwarders/status"], "verbs": ["patch"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
                {"apiGroups": [""], "resources": ["services"], "resourceNames": ["lb-tcp", "lb-udp"], "verbs": ["get", "patch"]},
            ])
        );
        assert_eq!(
            forwarders_role(&config(MAPPINGS), "x"),
            "",
            "no forwarders, no Role"
        );
    }

    #[test]
    fn allocation_grants_create_on_gameserverallocations_where_the_proxy_watches_and_nothing_more()
    {
        let allocating = |inventory: &str| {
            config(&format!(
                "dataPorts: [{{name: game, port: 7777}}]\ninventory: {inventory}\n\
                 resourceQueryMapping:\n  gs: {{group: agones.dev, version: v1, resource: \
                 gameservers, addressPath: status.address, portName: game, allocation: {{}}}}\n"
            ))
        };
        // Cluster-wide watches: the ClusterRole grants it, no Role.
        let c = allocating("{kind: kubernetes}");
        let cluster = cluster_role(&c, "udp-director");
        assert!(
            cluster.contains(
                "- apiGroups: [\"allocation.agones.dev\"]\n  resources: [gameserverallocations]\n  verbs: [create]\n"
            ),
            "{cluster}"
        );
        assert!(allocation_roles(&c, "udp-director").is_empty());
        // Watched namespaces: a Role and its binding in each, none cluster-wide.
        let c = allocating("{kind: kubernetes, watchNamespaces: [a, b]}");
        assert!(!cluster_role(&c, "u").contains("gameserverallocations"));
        let roles = allocation_roles(&c, "u");
        for ns in ["a", "b"] {
            assert!(
                roles.contains(&format!(
                    "kind: Role\nmetadata:\n  name: u-allocation\n  namespace: {ns}\n"
                )),
                "{roles}"
            );
        }
        assert_eq!(roles.matches("verbs: [create]").count(), 2, "{roles}");
        assert_eq!(roles.matches("kind: RoleBinding").count(), 2, "{roles}");
        // Without allocation settings: nothing.
        let plain = config(MAPPINGS);
        assert!(!cluster_role(&plain, "u").contains("gameserverallocations"));
        assert!(allocation_roles(&plain, "u").is_empty());
    }
}
