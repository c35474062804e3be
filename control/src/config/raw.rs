//! The config file as written: a strict serde schema (`deny_unknown_fields`), with the option
//! values as enums, so a misspelt value is refused by the parser, naming its key and the values
//! it may take. [`super::validate`] turns it into a [`super::Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use super::{
    DEFAULT_ADMIN_PORT, DEFAULT_CONTROL_MAGIC_HEX, DEFAULT_DATA_PORT, DEFAULT_DRAIN_SECONDS,
    DEFAULT_FILE_POLL_MILLIS, DEFAULT_FORWARDERS_NAMESPACE, DEFAULT_INVENTORY_MAX_BYTES,
    DEFAULT_MAX_QUERY_CONNECTIONS, DEFAULT_MAX_QUERY_CONNECTIONS_PER_IP, DEFAULT_MAX_SESSIONS,
    DEFAULT_QUERY_IDLE_TIMEOUT_SECONDS, DEFAULT_QUERY_PORT, DEFAULT_RESOLVE_INTERVAL_SECONDS,
    DEFAULT_SESSION_TIMEOUT_SECONDS, DEFAULT_SESSIONS_API_AUDIENCE, DEFAULT_STATUS_LEASE,
    DEFAULT_TCP_TOKEN_TIMEOUT_SECONDS, DEFAULT_TOKEN_TTL_SECONDS, DEFAULT_WATCHDOG_SECONDS,
    SessionsApiAuth,
};
use crate::protocol::Query;

/// The config file as written (camelCase keys). See `deploy/examples/` for complete files.
///
/// Every field's doc comment is its entry in the configuration reference
/// (`udp-director config-reference`, `docs/configuration.md`), with its default in `x-default`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawConfig {
    /// TCP port of the query server (0 picks a free one; the proxy prints what it bound).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_QUERY_PORT))]
    pub(super) query_port: Option<u16>,
    /// A single UDP data port, named `default`; exclusive with `dataPorts`. Without either,
    /// one UDP data port `default` on 7777.
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_DATA_PORT))]
    pub(super) data_port: Option<u16>,
    /// Named data ports, UDP or TCP, in order; exclusive with `dataPort`; at least one. Names
    /// are unique, and no port is given twice for the same protocol.
    #[serde(default)]
    #[schemars(extend("x-default" = "`[{name: default, port: 7777}]`"))]
    pub(super) data_ports: Option<Vec<RawDataPort>>,
    /// Address every listener binds (an IP address); `::` for dual stack.
    #[serde(default)]
    #[schemars(extend("x-default" = "`0.0.0.0`"))]
    pub(super) bind_address: Option<String>,
    /// TCP port of the admin HTTP server (metrics, health, sessions); not the `queryPort`
    /// (0 picks a free one).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_ADMIN_PORT))]
    pub(super) admin_port: Option<u16>,
    /// Token lifetime in seconds: how long a token stays redeemable after it is issued (1 to
    /// 86400). Also accepted as `tokenTTLSeconds`.
    #[serde(default, alias = "tokenTTLSeconds")]
    #[schemars(extend("x-default" = DEFAULT_TOKEN_TTL_SECONDS))]
    pub(super) token_ttl_seconds: Option<u64>,
    /// Seconds without traffic either way after which a session ends (1 to 86400).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_SESSION_TIMEOUT_SECONDS))]
    pub(super) session_timeout_seconds: Option<u64>,
    /// Seconds a TCP client has to send its token on a TCP data port before it goes to the
    /// default endpoint, or is closed without one (1 to 86400).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_TCP_TOKEN_TIMEOUT_SECONDS))]
    pub(super) tcp_token_timeout_seconds: Option<u64>,
    /// Seconds a query connection may wait before sending a full request (1 to 86400).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_QUERY_IDLE_TIMEOUT_SECONDS))]
    pub(super) query_idle_timeout_seconds: Option<u64>,
    /// Concurrent query connections; more are refused (at least 1).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_MAX_QUERY_CONNECTIONS))]
    pub(super) max_query_connections: Option<usize>,
    /// Concurrent query connections from one IP address; more are refused (at least 1).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_MAX_QUERY_CONNECTIONS_PER_IP))]
    pub(super) max_query_connections_per_ip: Option<usize>,
    /// Who may use the admin sessions API (`GET`/`DELETE /sessions`), which shows player
    /// addresses and ends sessions.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{auth: loopback}`"))]
    pub(super) sessions_api: Option<RawSessionsApi>,
    /// Live sessions across the proxy; a waiting TCP connection counts as one (at least 1).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_MAX_SESSIONS))]
    pub(super) max_sessions: Option<usize>,
    /// Live sessions per client IP (at least 1).
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) max_sessions_per_ip: Option<usize>,
    /// Hex prefix of control packets (an even number of hex digits, optionally after `0x`;
    /// 1 to 32 bytes).
    #[serde(default)]
    #[schemars(extend("x-default" = format!("`{DEFAULT_CONTROL_MAGIC_HEX}`")))]
    pub(super) control_packet_magic_bytes: Option<String>,
    /// Data-plane worker threads (`dp-worker-N`), 1 to 1024.
    #[serde(default)]
    #[schemars(extend("x-default" = "one per core"))]
    pub(super) workers: Option<usize>,
    /// Worker pinning: `auto` (worker i on core i) or a list of core ids, each one this
    /// process may run on.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) cpu_affinity: Option<RawAffinity>,
    /// `SO_RCVBUF` and `SO_SNDBUF`, in bytes, of UDP data-port and shared upstream sockets (at
    /// least 4096).
    #[serde(default)]
    #[schemars(extend("x-default" = dataplane::config::DEFAULT_SOCKET_BUFFER_BYTES))]
    pub(super) socket_buffer_bytes: Option<usize>,
    /// Microseconds a worker keeps polling without sleeping after traffic (at most 10000; 0 is
    /// off): lower latency for CPU.
    #[serde(default)]
    #[schemars(extend("x-default" = 0))]
    pub(super) busy_poll_micros: Option<u64>,
    /// Seconds to keep forwarding after SIGTERM before exiting (at most 3600).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_DRAIN_SECONDS))]
    pub(super) drain_seconds: Option<u64>,
    /// Seconds a data-plane worker, the control thread or the query thread may go without a
    /// heartbeat before it counts as stuck and `/healthz` answers 503 naming it (1 to 3600).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_WATCHDOG_SECONDS))]
    pub(super) watchdog_seconds: Option<u64>,
    /// Where game servers are found: a Kubernetes API server (in-cluster, else `KUBECONFIG`)
    /// or a YAML file of Kubernetes-shaped objects.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{kind: kubernetes}`"))]
    pub(super) inventory: Option<RawInventory>,
    /// Resource types a query may name, by the name a query gives as `resourceType`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) resource_query_mapping: BTreeMap<String, RawMapping>,
    /// How one backend is chosen among the matches, for queries and the default endpoint.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{type: leastSessions}`"))]
    pub(super) load_balancing: Option<RawLoadBalancing>,
    /// A query object, as sent to the query port (`resourceType` naming a
    /// `resourceQueryMapping` entry, `namespace`, `labelSelector`, `annotationSelector`,
    /// `statusQuery`), used for clients that arrive without a token.
    #[serde(default)]
    #[schemars(
        with = "Option<BTreeMap<String, serde_json::Value>>",
        extend("x-default" = "none")
    )]
    pub(super) default_endpoint: Option<Query>,
    /// `Forwarder` custom resources: declarative `listenPort → targetHost:targetPort`
    /// forwarding, on when present (`forwarders: {}` for the defaults).
    #[serde(default)]
    #[schemars(extend("x-default" = "off"))]
    pub(super) forwarders: Option<RawForwarders>,
    /// Listen ports whose new clients the `Route` objects route; none turns routes off. Names
    /// are unique, and none is also a data port of the same protocol.
    #[serde(default)]
    #[schemars(extend("x-default" = "`[]`"))]
    pub(super) entry_points: Vec<RawDataPort>,
    /// Route settings; needs at least one entry in `entryPoints`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) routes: Option<RawRoutes>,
    /// Gateway API: with `controllerName`, the proxy serves the Gateways whose GatewayClass
    /// names that controller.
    #[serde(default)]
    #[schemars(extend("x-default" = "off"))]
    pub(super) gateway_api: Option<RawGatewayApi>,
    /// Flood protection: per-source-IP token buckets for datagrams from addresses without a
    /// session and for TCP connections; off unless present.
    #[serde(default)]
    #[schemars(extend("x-default" = "off"))]
    pub(super) rate_limit: Option<RawRateLimit>,
    /// The kernel fast path for established UDP sessions: a tc ingress BPF program that
    /// forwards their datagrams inside the kernel (needs CAP_BPF and CAP_NET_ADMIN; without
    /// them, or kernel support, the proxy says why once and runs in user space).
    #[serde(default)]
    #[schemars(extend("x-default" = "`{kind: none}`"))]
    pub(super) fast_path: Option<RawFastPath>,
    /// Upgrades without dropping players: a starting proxy that finds a running one on
    /// `socketPath` takes over its sockets and UDP sessions (SPEC §12), and then listens there
    /// for its own successor.
    #[serde(default)]
    #[schemars(extend("x-default" = "off"))]
    pub(super) handoff: Option<RawHandoff>,
    /// Sealed tokens, which any replica holding the key redeems; UUID tokens (redeemed only by
    /// the instance that issued them) when absent.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) token_secret: Option<RawTokenSecret>,
    /// Seal (or record) the querying client's IP in each grant; only that address may redeem
    /// the token.
    #[serde(default)]
    #[schemars(extend("x-default" = false))]
    pub(super) bind_token_to_client_ip: bool,
}

/// `tokenSecret`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTokenSecret {
    /// Path of the key file (a mounted Secret): base64 keys of 32 bytes, one a line, at most
    /// 16; the first seals, every one opens. Watched like the config file, so a rotated Secret
    /// applies.
    #[schemars(extend("x-default" = "required"))]
    pub(super) file: String,
}

/// `fastPath`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFastPath {
    /// `tc` (a tc ingress program, tcx where the kernel has it, clsact otherwise) or `none`.
    #[schemars(extend("x-default" = "`none`"))]
    pub(super) kind: RawFastPathKind,
    /// The interfaces the program is attached to, by name; every interface with an address
    /// that is not loopback when empty.
    #[serde(default)]
    #[schemars(extend("x-default" = "`[]`"))]
    pub(super) interfaces: Vec<String>,
}

/// `handoff`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawHandoff {
    /// The Unix socket the running proxy listens on for its successor: an absolute path in a
    /// directory both pods mount (a hostPath in Kubernetes), at most 107 bytes.
    #[schemars(extend("x-default" = "required"))]
    pub(super) socket_path: String,
}

/// `fastPath.kind`.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawFastPathKind {
    /// A tc ingress program.
    Tc,
    /// Off.
    None,
}

/// `rateLimit`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRateLimit {
    /// Datagrams (and TCP connections) per second from one source IP without a session (1 to
    /// 1000000).
    #[schemars(extend("x-default" = "required"))]
    pub(super) per_ip_packets_per_second: u32,
    /// Bucket size per source IP (1 to 1000000).
    #[serde(default)]
    #[schemars(extend("x-default" = "`perIpPacketsPerSecond`"))]
    pub(super) per_ip_burst: Option<u32>,
    /// New sessions per second from one source IP (1 to 1000000).
    #[serde(default)]
    #[schemars(extend("x-default" = "unlimited"))]
    pub(super) new_sessions_per_ip_per_second: Option<u32>,
}

/// `gatewayApi`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawGatewayApi {
    /// The Gateway API controller name this proxy serves GatewayClasses of, a domain-prefixed
    /// path like `udp-director.dev/gateway-controller`. Without it no Gateway is served:
    /// `leaseName` alone names a fleet's status Lease (its Forwarder and Route entries of
    /// departed nodes are still cleaned up by the holder).
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) controller_name: Option<String>,
    /// The name (a DNS label) of the status Lease, in the proxy's namespace, that elects the
    /// one instance writing whole-object status.
    #[serde(default)]
    #[schemars(extend("x-default" = format!("`{DEFAULT_STATUS_LEASE}`")))]
    pub(super) lease_name: Option<String>,
}

/// `routes`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRoutes {
    /// A route may send clients to a Service in another namespace than its own.
    #[serde(default)]
    #[schemars(extend("x-default" = false))]
    pub(super) allow_cross_namespace: bool,
}

/// `forwarders`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawForwarders {
    /// The namespace (a DNS label) whose `Forwarder` objects are served; file objects without
    /// a namespace count as in it.
    #[serde(default)]
    #[schemars(extend(
        "x-default" = format!("the proxy's own (`POD_NAMESPACE`), else `{DEFAULT_FORWARDERS_NAMESPACE}`")
    ))]
    pub(super) namespace: Option<String>,
    /// Services, in the forwarders' namespace and created beforehand, that carry one port per
    /// forwarder listener.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) service_ports: Option<RawServicePorts>,
    /// Seconds between DNS lookups of a forwarder's `targetHost` (1 to 86400).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_RESOLVE_INTERVAL_SECONDS))]
    pub(super) resolve_interval_seconds: Option<u64>,
}

/// `forwarders.servicePorts`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServicePorts {
    /// The Service (a DNS label) that carries a port per UDP forwarder listener.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) udp: Option<String>,
    /// The Service (a DNS label) that carries a port per TCP forwarder listener; may be the
    /// UDP one.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) tcp: Option<String>,
}

/// An item of `dataPorts` or `entryPoints`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataPort {
    /// The port's name, not empty and unique in its list: grants, mappings' `ports` and query
    /// answers name data ports by it, `Route`s name entry points by it.
    #[schemars(extend("x-default" = "required"))]
    pub(super) name: String,
    /// Listen port.
    #[schemars(extend("x-default" = "required"))]
    pub(super) port: u16,
    /// Transport: `udp` or `tcp` (`UDP` and `TCP` are accepted too).
    #[serde(default)]
    #[schemars(extend("x-default" = "`udp`"))]
    pub(super) protocol: Option<RawProtocol>,
}

/// `sessionsApi`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSessionsApi {
    /// `loopback`: only callers on loopback (the node itself, `kubectl port-forward`,
    /// `kubectl exec`); `kubernetes`: also a remote caller whose bearer token the API server's
    /// TokenReview accepts and whose user a SubjectAccessReview allows `list`/`delete` on
    /// `sessions.udp-director.dev`.
    #[schemars(extend("x-default" = "required"))]
    pub(super) auth: SessionsApiAuth,
    /// With `auth: kubernetes` only: the audiences a caller's token must be issued for, none
    /// empty; `[]` accepts the API server's own tokens.
    #[serde(default)]
    #[schemars(extend("x-default" = format!("`[{DEFAULT_SESSIONS_API_AUDIENCE}]`")))]
    pub(super) audiences: Option<Vec<String>>,
}

/// `cpuAffinity`: `auto` or core ids.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum RawAffinity {
    /// `auto`.
    Word(String),
    /// Core ids.
    Cores(Vec<usize>),
}

/// `inventory`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawInventory {
    /// `kubernetes`: a watch-driven cache of every mapped resource type plus Services and
    /// EndpointSlices; `file`: Kubernetes-shaped objects from a YAML file, reloaded on change.
    #[schemars(extend("x-default" = "required"))]
    pub(super) kind: RawInventoryKind,
    /// With `kind: file` (and required there): the inventory file, relative to the config
    /// file's directory.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) path: Option<PathBuf>,
    /// With `kind: file`: milliseconds between checks of the file for a change (10 to 60000).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_FILE_POLL_MILLIS))]
    pub(super) poll_interval_millis: Option<u64>,
    /// With `kind: kubernetes`: the namespaces (DNS labels) to watch.
    #[serde(default)]
    #[schemars(extend("x-default" = "the whole cluster"))]
    pub(super) watch_namespaces: Option<Vec<String>>,
    /// With `kind: kubernetes`: a label selector (`k=v,…`, not empty) applied to every mapped
    /// resource type (not to Services and EndpointSlices), so a proxy on a big cluster caches
    /// only its fleet.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) label_selector: Option<String>,
    /// With `kind: file`: a larger file, in bytes, is refused and the last good inventory kept
    /// (1 to 1 GiB).
    #[serde(default)]
    #[schemars(extend("x-default" = DEFAULT_INVENTORY_MAX_BYTES))]
    pub(super) max_bytes: Option<u64>,
}

/// A `resourceQueryMapping` entry: the resource type and a locator, direct (`addressPath` with
/// `portName`, `portPath` or `ports`) or service-based (`serviceSelectorLabel` with
/// `serviceTargetPortName`), not both.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMapping {
    /// API group (`""` for core; lowercase letters, digits, `-`, `.`).
    #[schemars(extend("x-default" = "required"))]
    pub(super) group: String,
    /// API version (not empty; lowercase letters, digits, `-`).
    #[schemars(extend("x-default" = "required"))]
    pub(super) version: String,
    /// Plural resource name, like `gameservers` (not empty; lowercase letters, digits, `-`).
    #[schemars(extend("x-default" = "required"))]
    pub(super) resource: String,
    /// Kind, like `GameServer` (letters and digits).
    #[serde(default)]
    #[schemars(extend("x-default" = "derived from `resource`"))]
    pub(super) kind: Option<String>,
    /// Direct: dot path of the backend address in the object, a string field, or with
    /// `addressType` an array of `{type, address}` entries (e.g. Agones `status.addresses`).
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) address_path: Option<String>,
    /// Direct: the `type` of the entry to pick from an address array (e.g. `PodIP`).
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) address_type: Option<String>,
    /// Direct: a named port (Agones `status.ports[].name` or Pod
    /// `spec.containers[].ports[].name`) every data port goes to; exclusive with `portPath`
    /// and `ports`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) port_name: Option<String>,
    /// Direct: dot path of the port number every data port goes to; exclusive with `portName`
    /// and `ports`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) port_path: Option<String>,
    /// Direct, multi-port: where each named data port goes; not empty.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) ports: Option<Vec<RawMappedPort>>,
    /// Service-based: the label key of the Service labelled `<label>=<object name>` in the
    /// object's namespace, whose ClusterIP is the backend.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) service_selector_label: Option<String>,
    /// Service-based: the name of that Service's port every data port goes to.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) service_target_port_name: Option<String>,
    /// PROXY protocol v2 headers to this mapping's backends: `none`; `v2` on every UDP
    /// datagram; `v2-first` on a session's first datagram and the first after it moves. TCP
    /// gets one header at connection start with either.
    #[serde(default)]
    #[schemars(extend("x-default" = "`none`"))]
    pub(super) proxy_protocol: Option<RawProxyMode>,
    /// Agones allocation on query (an `agones.dev` `gameservers` mapping only): a query with
    /// `"allocate": true`, or every query with `enabled`, creates a `GameServerAllocation`
    /// instead of only selecting a server.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) allocation: Option<RawAllocation>,
}

/// A mapping's `allocation`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAllocation {
    /// Every query of this mapping allocates; otherwise only a query with `"allocate": true`.
    #[serde(default)]
    #[schemars(extend("x-default" = false))]
    pub(super) enabled: bool,
    /// Backfill: first an `Allocated` server with room left on this counter (of Agones
    /// `status.counters`), then a `Ready` one.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) backfill: Option<RawBackfill>,
    /// Labels and annotations written on the allocated server; `{tokenId}` in a value is
    /// replaced by the id of the token the answer carries.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) metadata: Option<RawAllocationMetadata>,
    /// Counter actions applied to the allocated server, by counter name, like
    /// `{players: {action: Increment, amount: 1}}`.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{}`"))]
    pub(super) counters: BTreeMap<String, RawCounterAction>,
    /// Time one allocation may take, retries on `Contention` and API errors included (100
    /// to 30000).
    #[serde(default)]
    #[schemars(extend("x-default" = 2000))]
    pub(super) timeout_ms: Option<u64>,
}

/// `allocation.backfill`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawBackfill {
    /// The counter whose room (capacity less count) must be at least one.
    #[schemars(extend("x-default" = "required"))]
    pub(super) counter: String,
}

/// `allocation.metadata`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAllocationMetadata {
    /// Labels to set.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{}`"))]
    pub(super) labels: BTreeMap<String, String>,
    /// Annotations to set.
    #[serde(default)]
    #[schemars(extend("x-default" = "`{}`"))]
    pub(super) annotations: BTreeMap<String, String>,
}

/// A counter action of `allocation.counters`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCounterAction {
    /// `Increment` or `Decrement`.
    #[schemars(extend("x-default" = "required"))]
    pub(super) action: RawCounterVerb,
    /// By how much (1 to 1000000).
    #[serde(default)]
    #[schemars(extend("x-default" = 1))]
    pub(super) amount: Option<u64>,
}

/// `Increment` or `Decrement`.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
pub(super) enum RawCounterVerb {
    /// Adds `amount`.
    Increment,
    /// Takes `amount` away.
    Decrement,
}

/// An item of a mapping's `ports`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMappedPort {
    /// The data port's name (of `dataPorts`).
    #[schemars(extend("x-default" = "required"))]
    pub(super) name: String,
    /// A named port in the object; exclusive with `portPath`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) port_name: Option<String>,
    /// Dot path of the port number in the object; exclusive with `portName`.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) port_path: Option<String>,
}

/// `loadBalancing`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLoadBalancing {
    /// `leastSessions`: fewest live sessions plus outstanding grants on this instance;
    /// `labelArithmetic`: most available, where available = max − current − local sessions −
    /// outstanding grants − overlap and only available > 0 is eligible; `roundRobin`;
    /// `random`.
    #[serde(rename = "type")]
    #[schemars(extend("x-default" = "required"))]
    pub(super) kind: RawLoadBalancingType,
    /// With `labelArithmetic` (and required there): the label holding the current player
    /// count.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) current_label: Option<String>,
    /// With `labelArithmetic` (and required there): the label holding the capacity.
    #[serde(default)]
    #[schemars(extend("x-default" = "none"))]
    pub(super) max_label: Option<String>,
    /// With `labelArithmetic`: head-room kept free.
    #[serde(default)]
    #[schemars(extend("x-default" = 0))]
    pub(super) overlap: Option<i64>,
}

/// `protocol` of a data port or entry point.
#[derive(Clone, Copy, Debug, Deserialize, Eq, JsonSchema, PartialEq)]
pub(super) enum RawProtocol {
    #[serde(rename = "udp", alias = "UDP")]
    Udp,
    #[serde(rename = "tcp", alias = "TCP")]
    Tcp,
}

/// `inventory.kind`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawInventoryKind {
    File,
    Kubernetes,
}

/// `loadBalancing.type`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawLoadBalancingType {
    LeastSessions,
    LabelArithmetic,
    RoundRobin,
    Random,
}

/// `proxyProtocol` of a mapping.
#[derive(Clone, Copy, Debug, Deserialize, Eq, JsonSchema, PartialEq)]
pub(super) enum RawProxyMode {
    #[serde(rename = "none")]
    None,
    #[serde(rename = "v2")]
    V2,
    #[serde(rename = "v2-first")]
    V2First,
}
