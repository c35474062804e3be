//! The config file as written: a strict serde schema (`deny_unknown_fields`), with the option
//! values as enums, so a misspelt value is refused by the parser, naming its key and the values
//! it may take. [`super::validate`] turns it into a [`super::Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::SessionsApiAuth;
use crate::protocol::Query;

/// The config file as written (camelCase keys). See `deploy/examples/` for complete files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawConfig {
    /// TCP port of the query server.
    #[serde(default)]
    pub(super) query_port: Option<u16>,
    /// A single UDP data port (named `default`); exclusive with `dataPorts`.
    #[serde(default)]
    pub(super) data_port: Option<u16>,
    /// Named data ports; exclusive with `dataPort`.
    #[serde(default)]
    pub(super) data_ports: Option<Vec<RawDataPort>>,
    /// Address every listener binds; `::` for dual stack.
    #[serde(default)]
    pub(super) bind_address: Option<String>,
    /// Admin HTTP port (metrics, health, sessions).
    #[serde(default)]
    pub(super) admin_port: Option<u16>,
    /// Seconds a token stays redeemable after it is issued.
    #[serde(default, alias = "tokenTTLSeconds")]
    pub(super) token_ttl_seconds: Option<u64>,
    /// Seconds without traffic after which a session ends.
    #[serde(default)]
    pub(super) session_timeout_seconds: Option<u64>,
    /// Seconds a TCP client has to send its token on a TCP data port.
    #[serde(default)]
    pub(super) tcp_token_timeout_seconds: Option<u64>,
    /// Seconds a query connection may wait before sending a full request.
    #[serde(default)]
    pub(super) query_idle_timeout_seconds: Option<u64>,
    /// Concurrent query connections; more are refused.
    #[serde(default)]
    pub(super) max_query_connections: Option<usize>,
    /// Concurrent query connections from one IP address; more are refused.
    #[serde(default)]
    pub(super) max_query_connections_per_ip: Option<usize>,
    /// Who may use the admin sessions API (`GET`/`DELETE /sessions`).
    #[serde(default)]
    pub(super) sessions_api: Option<RawSessionsApi>,
    /// Live sessions across the proxy.
    #[serde(default)]
    pub(super) max_sessions: Option<usize>,
    /// Live sessions per client IP.
    #[serde(default)]
    pub(super) max_sessions_per_ip: Option<usize>,
    /// Hex of the control packet prefix.
    #[serde(default)]
    pub(super) control_packet_magic_bytes: Option<String>,
    /// Data-plane worker threads; default one per core.
    #[serde(default)]
    pub(super) workers: Option<usize>,
    /// `auto` or a list of core ids to pin workers to.
    #[serde(default)]
    pub(super) cpu_affinity: Option<RawAffinity>,
    /// SO_RCVBUF and SO_SNDBUF of every data-port socket.
    #[serde(default)]
    pub(super) socket_buffer_bytes: Option<usize>,
    /// Microseconds a worker keeps polling after traffic before it sleeps.
    #[serde(default)]
    pub(super) busy_poll_micros: Option<u64>,
    /// Seconds to keep forwarding after SIGTERM before exiting.
    #[serde(default)]
    pub(super) drain_seconds: Option<u64>,
    /// Seconds a data-plane worker or the control thread may go without a heartbeat before
    /// `/healthz` answers 503 naming it.
    #[serde(default)]
    pub(super) watchdog_seconds: Option<u64>,
    /// Where game servers are found.
    #[serde(default)]
    pub(super) inventory: Option<RawInventory>,
    /// Resource types a query may name.
    #[serde(default)]
    pub(super) resource_query_mapping: BTreeMap<String, RawMapping>,
    /// How one backend is chosen among the matches.
    #[serde(default)]
    pub(super) load_balancing: Option<RawLoadBalancing>,
    /// Query used for clients that arrive without a token.
    #[serde(default)]
    pub(super) default_endpoint: Option<Query>,
    /// `Forwarder` custom resources: on when present.
    #[serde(default)]
    pub(super) forwarders: Option<RawForwarders>,
    /// Listen ports whose clients the `Route` objects route.
    #[serde(default)]
    pub(super) entry_points: Vec<RawDataPort>,
    /// Route settings.
    #[serde(default)]
    pub(super) routes: Option<RawRoutes>,
    /// Gateway API: on when present.
    #[serde(default)]
    pub(super) gateway_api: Option<RawGatewayApi>,
    /// Flood protection: off unless present.
    #[serde(default)]
    pub(super) rate_limit: Option<RawRateLimit>,
    /// Sealed tokens: the key file (a mounted Secret); UUID tokens when absent.
    #[serde(default)]
    pub(super) token_secret: Option<RawTokenSecret>,
    /// Seal (or record) the querying client's IP in each grant; only it may redeem.
    #[serde(default)]
    pub(super) bind_token_to_client_ip: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTokenSecret {
    pub(super) file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRateLimit {
    pub(super) per_ip_packets_per_second: u32,
    #[serde(default)]
    pub(super) per_ip_burst: Option<u32>,
    #[serde(default)]
    pub(super) new_sessions_per_ip_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawGatewayApi {
    /// Without it no Gateway is served: `leaseName` alone names a fleet's status Lease (its
    /// Forwarder and Route entries of departed nodes are still cleaned up by the holder).
    #[serde(default)]
    pub(super) controller_name: Option<String>,
    /// The status Lease's name (in the proxy's namespace).
    #[serde(default)]
    pub(super) lease_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRoutes {
    #[serde(default)]
    pub(super) allow_cross_namespace: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawForwarders {
    #[serde(default)]
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) service_ports: Option<RawServicePorts>,
    #[serde(default)]
    pub(super) resolve_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServicePorts {
    #[serde(default)]
    pub(super) udp: Option<String>,
    #[serde(default)]
    pub(super) tcp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataPort {
    pub(super) name: String,
    pub(super) port: u16,
    #[serde(default)]
    pub(super) protocol: Option<RawProtocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSessionsApi {
    /// `loopback` (default) or `kubernetes`.
    pub(super) auth: SessionsApiAuth,
    /// With `kubernetes`: the audiences a caller's token must be issued for.
    #[serde(default)]
    pub(super) audiences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawAffinity {
    Word(String),
    Cores(Vec<usize>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawInventory {
    pub(super) kind: RawInventoryKind,
    #[serde(default)]
    pub(super) path: Option<PathBuf>,
    #[serde(default)]
    pub(super) poll_interval_millis: Option<u64>,
    #[serde(default)]
    pub(super) watch_namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub(super) label_selector: Option<String>,
    #[serde(default)]
    pub(super) max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMapping {
    pub(super) group: String,
    pub(super) version: String,
    pub(super) resource: String,
    #[serde(default)]
    pub(super) kind: Option<String>,
    #[serde(default)]
    pub(super) address_path: Option<String>,
    #[serde(default)]
    pub(super) address_type: Option<String>,
    #[serde(default)]
    pub(super) port_name: Option<String>,
    #[serde(default)]
    pub(super) port_path: Option<String>,
    #[serde(default)]
    pub(super) ports: Option<Vec<RawMappedPort>>,
    #[serde(default)]
    pub(super) service_selector_label: Option<String>,
    #[serde(default)]
    pub(super) service_target_port_name: Option<String>,
    /// PROXY protocol v2 headers to this mapping's backends (`none`, `v2`, `v2-first`).
    #[serde(default)]
    pub(super) proxy_protocol: Option<RawProxyMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMappedPort {
    pub(super) name: String,
    #[serde(default)]
    pub(super) port_name: Option<String>,
    #[serde(default)]
    pub(super) port_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLoadBalancing {
    #[serde(rename = "type")]
    pub(super) kind: RawLoadBalancingType,
    #[serde(default)]
    pub(super) current_label: Option<String>,
    #[serde(default)]
    pub(super) max_label: Option<String>,
    #[serde(default)]
    pub(super) overlap: Option<i64>,
}

/// `protocol` of a data port or entry point.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
pub(super) enum RawProtocol {
    #[serde(rename = "udp", alias = "UDP")]
    Udp,
    #[serde(rename = "tcp", alias = "TCP")]
    Tcp,
}

/// `inventory.kind`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawInventoryKind {
    File,
    Kubernetes,
}

/// `loadBalancing.type`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawLoadBalancingType {
    LeastSessions,
    LabelArithmetic,
    RoundRobin,
    Random,
}

/// `proxyProtocol` of a mapping.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
pub(super) enum RawProxyMode {
    #[serde(rename = "none")]
    None,
    #[serde(rename = "v2")]
    V2,
    #[serde(rename = "v2-first")]
    V2First,
}
