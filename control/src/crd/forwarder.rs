//! The `Forwarder` custom resource (SPEC §6): declarative `listenPort → targetHost:targetPort`
//! forwarding for UDP and TCP. Each proxy instance writes its own entry of `status.instances`
//! (server-side apply, one field manager per node), so the list is a map keyed by `node`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest `idleTimeoutSeconds` (a year), as the CRD's schema says; the file inventory is
/// held to it too.
pub const MAX_FORWARDER_IDLE_SECONDS: u64 = 31_536_000;

/// `apiVersion` of a Forwarder.
pub const API_VERSION: &str = "udp-director.dev/v1alpha1";
/// `kind` of a Forwarder.
pub const KIND: &str = "Forwarder";

/// Whether an object of `api_version` and `kind` is a Forwarder.
pub fn is_forwarder(api_version: &str, kind: &str) -> bool {
    api_version == API_VERSION && kind == KIND
}

/// What a forwarder forwards: a UDP port, a TCP port, or both.
#[derive(CustomResource, Clone, Debug, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[kube(
    group = "udp-director.dev",
    version = "v1alpha1",
    kind = "Forwarder",
    namespaced,
    status = "ForwarderStatus",
    shortname = "fwd",
    printcolumn = r#"{"name":"UDP","type":"integer","jsonPath":".spec.udp.listenPort"}"#,
    printcolumn = r#"{"name":"TCP","type":"integer","jsonPath":".spec.tcp.listenPort"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.udp.targetHost"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.instances[*].ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderSpec {
    /// The UDP listener, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ForwardPort>,
    /// The TCP listener, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ForwardPort>,
    /// PROXY protocol header toward the target.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
}

/// One forwarded port.
#[derive(Clone, Debug, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardPort {
    /// Port the proxy listens on, on its `bindAddress`.
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: u16,
    /// Where traffic goes: an IP address or a DNS name (`<service>.<namespace>.svc…` names
    /// follow the Service watch).
    #[schemars(length(min = 1, max = 253))]
    pub target_host: String,
    /// The target's port.
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: u16,
    /// A session ends after this long without traffic in either direction (default: the
    /// config's `sessionTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub idle_timeout_seconds: Option<u64>,
}

/// PROXY protocol v2 toward the target (SPEC §9).
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    #[serde(rename = "none")]
    None,
    /// A header on every datagram (UDP) or at connection start (TCP).
    #[serde(rename = "v2")]
    V2,
    /// A header on a session's first datagram only (UDP); at connection start (TCP).
    #[serde(rename = "v2-first")]
    V2First,
}

impl From<ProxyProtocol> for dataplane::policy::proxy_protocol::ProxyMode {
    fn from(p: ProxyProtocol) -> Self {
        match p {
            ProxyProtocol::None => Self::None,
            ProxyProtocol::V2 => Self::V2,
            ProxyProtocol::V2First => Self::V2First,
        }
    }
}

/// Each proxy instance's view of the forwarder.
#[derive(Clone, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderStatus {
    /// One entry per proxy instance (node), written by that instance only.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub instances: Vec<ForwarderInstance>,
}

/// One proxy instance's state of a forwarder.
#[derive(Clone, Debug, Default, Deserialize, Eq, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderInstance {
    /// The node the instance runs on (`NODE_NAME`).
    pub node: String,
    /// Every listener the spec asks for is open on this instance.
    pub ready: bool,
    /// The listeners open, as `udp/27015`, `tcp/27015`.
    pub listening: Vec<String>,
    /// Why not ready (a port conflict naming its holder, a name that does not resolve).
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
    use kube::CustomResourceExt;

    #[test]
    fn the_spec_example_parses_and_round_trips() {
        let yaml = r#"
apiVersion: udp-director.dev/v1alpha1
kind: Forwarder
metadata: {name: game-1001, namespace: udp-director}
spec:
  udp: {listenPort: 27015, targetHost: gs-1001.games.svc.cluster.local, targetPort: 27015, idleTimeoutSeconds: 30}
  tcp: {listenPort: 27015, targetHost: gs-1001.games.svc.cluster.local, targetPort: 27015, idleTimeoutSeconds: 3600}
  proxyProtocol: v2-first
status:
  instances:
  - {node: node-a, ready: true, listening: ["udp/27015", "tcp/27015"], message: "", observedGeneration: 3}
"#;
        let f: Forwarder = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(f.spec.udp.as_ref().unwrap().idle_timeout_seconds, Some(30));
        assert_eq!(f.spec.proxy_protocol, ProxyProtocol::V2First);
        let status = f.status.as_ref().unwrap();
        assert_eq!(status.instances[0].listening, ["udp/27015", "tcp/27015"]);
        let again: Forwarder = serde_yaml::from_str(&serde_yaml::to_string(&f).unwrap()).unwrap();
        assert_eq!(again.spec, f.spec);
        let e = serde_yaml::from_str::<ForwarderSpec>("proxyProtocol: v3\n").unwrap_err();
        assert!(e.to_string().contains("v3"), "{e}");
    }

    #[test]
    fn the_crd_validates_ports_and_keys_instances_by_node() {
        let crd = serde_json::to_value(Forwarder::crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(crd["spec"]["group"], "udp-director.dev");
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let udp = &spec["udp"]["properties"];
        assert_eq!(udp["listenPort"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(udp["listenPort"]["maximum"].as_f64(), Some(65535.0));
        assert_eq!(udp["targetHost"]["minLength"].as_u64(), Some(1));
        let required: Vec<&str> = spec["udp"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(required, ["listenPort", "targetHost", "targetPort"]);
        let instances = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["instances"];
        assert_eq!(instances["x-kubernetes-list-type"], "map");
        assert_eq!(instances["x-kubernetes-list-map-keys"][0], "node");
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["UDP", "TCP", "Target", "Ready", "Age"]);
    }
}
