//! The `Route` custom resource (SPEC §7): an entry point's rules, matching new clients by
//! source address and port and balancing them over weighted Kubernetes Services. Each proxy
//! instance writes its own entry of `status.instances` (server-side apply, one field manager
//! per node), like `Forwarder`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ProxyProtocol;

/// Longest `spec.sessionTimeoutSeconds` (a day), as the CRD's schema says; the file inventory
/// is held to it too.
pub const MAX_ROUTE_TIMEOUT_SECONDS: u64 = 86_400;

/// `apiVersion` of a Route.
pub const API_VERSION: &str = "udp-director.dev/v1alpha1";
/// `kind` of a Route.
pub const KIND: &str = "Route";

/// Whether an object of `api_version` and `kind` is a Route.
pub fn is_route(api_version: &str, kind: &str) -> bool {
    api_version == API_VERSION && kind == KIND
}

/// Which entry point a route serves, and its rules.
#[derive(CustomResource, Clone, Debug, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[kube(
    group = "udp-director.dev",
    version = "v1alpha1",
    kind = "Route",
    namespaced,
    status = "RouteStatus",
    shortname = "udr",
    printcolumn = r#"{"name":"Entry point","type":"string","jsonPath":".spec.entryPoint"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.instances[*].ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// The name of an entry point of the config (`entryPoints[].name`).
    #[schemars(length(min = 1, max = 63))]
    pub entry_point: String,
    /// Idle timeout of the route's sessions (default: the config's `sessionTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub session_timeout_seconds: Option<u64>,
    /// PROXY protocol header toward the backends.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Tried in order; the first whose match holds takes the client.
    #[schemars(length(min = 1))]
    pub rules: Vec<RouteRule>,
}

/// One rule.
#[derive(Clone, Debug, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// Which clients it takes (none: every client).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<RouteMatch>,
    /// Where they go, by weight.
    #[schemars(length(min = 1))]
    pub backends: Vec<RouteBackendRef>,
}

/// Every given field must hold.
#[derive(Clone, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Client address blocks, IPv4 or IPv6 (`10.0.0.0/8`, `2001:db8::/32`, or one address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
    /// Client ports: single ports (`"9001"`) or inclusive ranges (`"10000-10100"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ports: Vec<String>,
}

/// A weighted Service.
#[derive(Clone, Debug, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteBackendRef {
    /// Service name.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// Its namespace (default: the route's; another only with `routes.allowCrossNamespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service port, by name or number.
    #[schemars(schema_with = "port_by_name_or_number")]
    pub port: ServicePortRef,
    /// Its share of new sessions (0: none).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: u32,
}

/// The schema of a port by name or number: left to the proxy to read (a value that is neither
/// makes the Route invalid, said in its status and counted), not declared
/// `x-kubernetes-int-or-string`. With that marker the API servers our test suite runs (1.20)
/// cannot build a merge schema for the Route, so server-side apply treats all of it as atomic
/// and each node's `status.instances` entry replaces the others' (measured: two field managers,
/// one entry left). Without it the entries merge by `node` on every version.
fn port_by_name_or_number(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The Service port, by name (`voice`) or number (`5000`).",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn default_weight() -> u32 {
    1
}

/// A Service port by name (`voice`) or number (`5000`).
#[derive(Clone, Debug, Deserialize, Eq, Hash, JsonSchema, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ServicePortRef {
    /// `spec.ports[].port`.
    Number(u16),
    /// `spec.ports[].name`.
    Name(String),
}

/// Each proxy instance's view of the route.
#[derive(Clone, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// One entry per proxy instance (node), written by that instance only.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub instances: Vec<RouteInstance>,
}

/// One proxy instance's state of a route.
#[derive(Clone, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteInstance {
    /// The node the instance runs on (`NODE_NAME`).
    pub node: String,
    /// Every backend resolved and the entry point serving.
    pub ready: bool,
    /// Ready endpoints over all its backends.
    pub ready_endpoints: u32,
    /// What is wrong (a missing Service, a refused cross-namespace backend, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this entry describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When this instance last wrote its entry (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_parses() {
        let yaml = r#"
apiVersion: udp-director.dev/v1alpha1
kind: Route
metadata: {name: voice, namespace: games}
spec:
  entryPoint: voice
  sessionTimeoutSeconds: 60
  proxyProtocol: none
  rules:
  - match: {sourceCidrs: ["10.0.0.0/8", "2001:db8::/32"], sourcePorts: ["9001", "10000-10100"]}
    backends: [{service: voice-eu, port: voice, weight: 3}, {service: voice-us, namespace: games, port: 5000, weight: 1}]
  - backends: [{service: voice-any, port: 5000}]
"#;
        let r: Route = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(r.spec.entry_point, "voice");
        let first = &r.spec.rules[0];
        assert_eq!(
            first.matcher.as_ref().unwrap().source_ports,
            ["9001", "10000-10100"]
        );
        assert_eq!(first.backends[0].port, ServicePortRef::Name("voice".into()));
        assert_eq!(first.backends[1].port, ServicePortRef::Number(5000));
        assert_eq!(
            r.spec.rules[1].backends[0].weight, 1,
            "weight defaults to 1"
        );
        assert!(r.spec.rules[1].matcher.is_none());
    }
}
