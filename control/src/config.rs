//! The YAML configuration: a strict raw schema (`#[serde(deny_unknown_fields)]`) turned into a
//! validated [`Config`] by [`Config::from_yaml`]. Every rejection names the key and the reason.
//! The config is immutable once the proxy runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::jsonpath::Path as JsonPath;
use crate::query::Query;
use crate::quote::quote;

pub const DEFAULT_QUERY_PORT: u16 = 9000;
pub const DEFAULT_DATA_PORT: u16 = 7777;
pub const DEFAULT_ADMIN_PORT: u16 = 9090;
pub const DEFAULT_TOKEN_TTL_SECONDS: u64 = 30;
pub const DEFAULT_SESSION_TIMEOUT_SECONDS: u64 = 300;
/// Default `tcpTokenTimeoutSeconds`: how long a TCP client has to send its token.
pub const DEFAULT_TCP_TOKEN_TIMEOUT_SECONDS: u64 = 10;
pub const DEFAULT_QUERY_IDLE_TIMEOUT_SECONDS: u64 = 10;
pub const DEFAULT_MAX_QUERY_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_QUERY_CONNECTIONS_PER_IP: usize = 32;
/// Largest inventory file applied (`inventory.maxBytes`).
pub const DEFAULT_INVENTORY_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Most data-plane threads a config may ask for. Each costs a few file descriptors and about
/// 4 MiB of batch buffers, so a typo like `workers: 10000` is refused here rather than failing
/// at start after allocating gigabytes.
pub const MAX_WORKERS: usize = 1024;
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
pub const DEFAULT_DRAIN_SECONDS: u64 = 10;
/// Default `watchdogSeconds`: how long a thread may go without a heartbeat before `/healthz`
/// names it. Well above the half-second beat of an idle worker.
pub const DEFAULT_WATCHDOG_SECONDS: u64 = 10;
/// Longest `watchdogSeconds`: an hour of silence is a stuck thread whatever the load.
pub const MAX_WATCHDOG_SECONDS: u64 = 3600;
pub const DEFAULT_CONTROL_MAGIC_HEX: &str = "FFFFFFFF5245534554";
pub const DEFAULT_FILE_POLL_MILLIS: u64 = 1000;
/// Name of the data port when the config gives a bare `dataPort`.
pub const DEFAULT_DATA_PORT_NAME: &str = "default";
/// How often a forwarder's DNS `targetHost` is looked up again.
pub const DEFAULT_RESOLVE_INTERVAL_SECONDS: u64 = 30;
/// The forwarders' namespace when neither `forwarders.namespace` nor `POD_NAMESPACE` says.
pub const DEFAULT_FORWARDERS_NAMESPACE: &str = "udp-director";
/// `gatewayApi.leaseName` when not given.
pub const DEFAULT_STATUS_LEASE: &str = "udp-director-gateway";

/// Where the status Lease lives: the proxy's own namespace (`POD_NAMESPACE`, else
/// [`DEFAULT_FORWARDERS_NAMESPACE`]) and `gatewayApi.leaseName`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct StatusLease {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A configuration error, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (unknown key, wrong type); serde_yaml's message carries
    /// the key path and position. Not a `#[source]`: the message is the whole story, and an
    /// error chain printed with `{:#}` would repeat it.
    #[error("config: {0}")]
    Schema(serde_yaml::Error),
    /// A value fits the schema but not the rules.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<serde_yaml::Error> for ConfigError {
    fn from(e: serde_yaml::Error) -> Self {
        Self::Schema(e)
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The config file as written (camelCase keys). See `deploy/examples/` for complete files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    /// TCP port of the query server.
    #[serde(default)]
    query_port: Option<u16>,
    /// A single UDP data port (named `default`); exclusive with `dataPorts`.
    #[serde(default)]
    data_port: Option<u16>,
    /// Named data ports; exclusive with `dataPort`.
    #[serde(default)]
    data_ports: Option<Vec<RawDataPort>>,
    /// Address every listener binds; `::` for dual stack.
    #[serde(default)]
    bind_address: Option<String>,
    /// Admin HTTP port (metrics, health, sessions).
    #[serde(default)]
    admin_port: Option<u16>,
    /// Seconds a token stays redeemable after it is issued.
    #[serde(default, alias = "tokenTTLSeconds")]
    token_ttl_seconds: Option<u64>,
    /// Seconds without traffic after which a session ends.
    #[serde(default)]
    session_timeout_seconds: Option<u64>,
    /// Seconds a TCP client has to send its token on a TCP data port.
    #[serde(default)]
    tcp_token_timeout_seconds: Option<u64>,
    /// Seconds a query connection may wait before sending a full request.
    #[serde(default)]
    query_idle_timeout_seconds: Option<u64>,
    /// Concurrent query connections; more are refused.
    #[serde(default)]
    max_query_connections: Option<usize>,
    /// Concurrent query connections from one IP address; more are refused.
    #[serde(default)]
    max_query_connections_per_ip: Option<usize>,
    /// Who may use the admin sessions API (`GET`/`DELETE /sessions`).
    #[serde(default)]
    sessions_api: Option<RawSessionsApi>,
    /// Live sessions across the proxy.
    #[serde(default)]
    max_sessions: Option<usize>,
    /// Live sessions per client IP.
    #[serde(default)]
    max_sessions_per_ip: Option<usize>,
    /// Hex of the control packet prefix.
    #[serde(default)]
    control_packet_magic_bytes: Option<String>,
    /// Data-plane worker threads; default one per core.
    #[serde(default)]
    workers: Option<usize>,
    /// `auto` or a list of core ids to pin workers to.
    #[serde(default)]
    cpu_affinity: Option<RawAffinity>,
    /// SO_RCVBUF and SO_SNDBUF of every data-port socket.
    #[serde(default)]
    socket_buffer_bytes: Option<usize>,
    /// Microseconds a worker keeps polling after traffic before it sleeps.
    #[serde(default)]
    busy_poll_micros: Option<u64>,
    /// Seconds to keep forwarding after SIGTERM before exiting.
    #[serde(default)]
    drain_seconds: Option<u64>,
    /// Seconds a data-plane worker or the control thread may go without a heartbeat before
    /// `/healthz` answers 503 naming it.
    #[serde(default)]
    watchdog_seconds: Option<u64>,
    /// Where game servers are found.
    #[serde(default)]
    inventory: Option<RawInventory>,
    /// Resource types a query may name.
    #[serde(default)]
    resource_query_mapping: BTreeMap<String, RawMapping>,
    /// How one backend is chosen among the matches.
    #[serde(default)]
    load_balancing: Option<RawLoadBalancing>,
    /// Query used for clients that arrive without a token.
    #[serde(default)]
    default_endpoint: Option<Query>,
    /// `Forwarder` custom resources: on when present.
    #[serde(default)]
    forwarders: Option<RawForwarders>,
    /// Listen ports whose clients the `Route` objects route.
    #[serde(default)]
    entry_points: Vec<RawDataPort>,
    /// Route settings.
    #[serde(default)]
    routes: Option<RawRoutes>,
    /// Gateway API: on when present.
    #[serde(default)]
    gateway_api: Option<RawGatewayApi>,
    /// Flood protection: off unless present.
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    /// Sealed tokens: the key file (a mounted Secret); UUID tokens when absent.
    #[serde(default)]
    token_secret: Option<RawTokenSecret>,
    /// Seal (or record) the querying client's IP in each grant; only it may redeem.
    #[serde(default)]
    bind_token_to_client_ip: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTokenSecret {
    file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRateLimit {
    per_ip_packets_per_second: u32,
    #[serde(default)]
    per_ip_burst: Option<u32>,
    #[serde(default)]
    new_sessions_per_ip_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGatewayApi {
    controller_name: String,
    /// The status Lease's name (in the proxy's namespace).
    #[serde(default)]
    lease_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRoutes {
    #[serde(default)]
    allow_cross_namespace: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawForwarders {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_ports: Option<RawServicePorts>,
    #[serde(default)]
    resolve_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicePorts {
    #[serde(default)]
    udp: Option<String>,
    #[serde(default)]
    tcp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataPort {
    name: String,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSessionsApi {
    /// `loopback` (default) or `kubernetes`.
    auth: String,
    /// With `kubernetes`: the audiences a caller's token must be issued for.
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAffinity {
    Word(String),
    Cores(Vec<usize>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawInventory {
    kind: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    poll_interval_millis: Option<u64>,
    #[serde(default)]
    watch_namespaces: Option<Vec<String>>,
    #[serde(default)]
    label_selector: Option<String>,
    #[serde(default)]
    max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMapping {
    group: String,
    version: String,
    resource: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    address_path: Option<String>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    port_name: Option<String>,
    #[serde(default)]
    port_path: Option<String>,
    #[serde(default)]
    ports: Option<Vec<RawMappedPort>>,
    #[serde(default)]
    service_selector_label: Option<String>,
    #[serde(default)]
    service_target_port_name: Option<String>,
    /// PROXY protocol v2 headers to this mapping's backends (`none`, `v2`, `v2-first`).
    #[serde(default)]
    proxy_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMappedPort {
    name: String,
    #[serde(default)]
    port_name: Option<String>,
    #[serde(default)]
    port_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLoadBalancing {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    current_label: Option<String>,
    #[serde(default)]
    max_label: Option<String>,
    #[serde(default)]
    overlap: Option<i64>,
}

/// Transport of a data port (`protocol: udp|tcp`).
pub use dataplane::Transport as Protocol;

/// A validated data port.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DataPort {
    /// Name used in grants, mappings and query answers.
    pub name: String,
    /// Listen port.
    pub port: u16,
    /// Transport.
    pub protocol: Protocol,
}

/// Where the inventory comes from.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum InventoryConfig {
    /// A YAML file of Kubernetes-shaped objects, reloaded when it changes.
    File {
        /// File path.
        path: PathBuf,
        /// How often the file is checked for changes.
        poll_interval: Duration,
        /// A larger file is refused (and the last good inventory kept).
        max_bytes: u64,
    },
    /// A Kubernetes API server (in-cluster or `KUBECONFIG`), watched into local caches.
    Kubernetes {
        /// Namespaces to watch; empty means the whole cluster.
        namespaces: Vec<String>,
        /// Label selector applied to every mapped resource type (not to Services and
        /// EndpointSlices, which are narrowed by the labels the mappings use), so a proxy on a
        /// big cluster caches only its fleet.
        label_selector: Option<String>,
    },
}

/// How a resource's backend address and ports are found.
#[derive(Clone, Debug)]
pub enum Locator {
    /// Address and ports read from the object itself.
    Direct {
        /// Dot path of the address (a string, or with `address_type` an array of
        /// `{type, address}`), parsed at load.
        address_path: JsonPath,
        /// Pick the entry of this `type` from an address array.
        address_type: Option<String>,
        /// Per data port (index into `Config::data_ports`), where its port comes from.
        ports: Vec<(usize, PortSource)>,
    },
    /// The Service labelled `<label>=<object name>` in the object's namespace: its ClusterIP and
    /// named port (for every data port).
    Service {
        /// Label key on the Service.
        selector_label: String,
        /// Name of the Service port.
        target_port_name: String,
    },
}

/// Where a port number comes from.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum PortSource {
    /// A named port: Agones `status.ports[].name` or Pod `spec.containers[].ports[].name`.
    Name(String),
    /// A dot path to a number, parsed at load.
    Path(JsonPath),
}

/// A resource type a query can name.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// API group (`""` for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Plural resource name (`gameservers`).
    pub resource: String,
    /// Kind (`GameServer`); derived from `resource` unless given.
    pub kind: Option<String>,
    /// How backends are located.
    pub locator: Locator,
    /// PROXY protocol v2 headers to its backends.
    pub proxy_protocol: dataplane::policy::proxy_protocol::ProxyMode,
}

impl Mapping {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// True when an object of this `kind` belongs to the mapping.
    pub fn matches_kind(&self, kind: &str) -> bool {
        match &self.kind {
            Some(k) => k == kind,
            None => plural_of(kind) == self.resource,
        }
    }
}

/// The lowercase plural of a kind, as Kubernetes names resources (`GameServer` → `gameservers`,
/// `Policy` → `policies`, `Ingress` → `ingresses`).
pub fn plural_of(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('s')
        || lower.ends_with('x')
        || lower.ends_with("ch")
        || lower.ends_with("sh")
    {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y')
        && !stem.ends_with(['a', 'e', 'i', 'o', 'u'])
    {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    }
}

/// Load-balancing strategy.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum LoadBalancing {
    /// Fewest live sessions plus outstanding grants on this instance.
    LeastSessions,
    /// Capacity from labels: `max − current − local sessions − outstanding grants − overlap`.
    LabelArithmetic {
        /// Label holding the current player count.
        current_label: String,
        /// Label holding the capacity.
        max_label: String,
        /// Head-room kept free.
        overlap: i64,
    },
    /// Rotate through the matches.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// The audience a remote sessions API caller's token must carry by default: a token minted for
/// the proxy (`kubectl create token NAME --audience udp-director`) cannot be replayed against
/// the API server, and an API server token is not accepted here.
pub const DEFAULT_SESSIONS_API_AUDIENCE: &str = "udp-director";

/// Who may use the sessions API, which shows player addresses and ends sessions.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum SessionsApiAuth {
    /// Only callers on loopback (the node itself, `kubectl port-forward`, `kubectl exec`).
    #[default]
    Loopback,
    /// Loopback, or a remote caller whose bearer token the API server's TokenReview accepts and
    /// whose user a SubjectAccessReview allows `list`/`delete` on `sessions.udp-director.dev`.
    Kubernetes,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address every listener binds.
    pub bind_address: IpAddr,
    /// Query server port.
    pub query_port: u16,
    /// Admin HTTP port.
    pub admin_port: u16,
    /// Data ports in declaration order.
    pub data_ports: Vec<DataPort>,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Idle session timeout.
    pub session_timeout: Duration,
    /// How long a TCP client has to send its token.
    pub tcp_token_timeout: Duration,
    /// Query connection idle limit.
    pub query_idle_timeout: Duration,
    /// Concurrent query connections.
    pub max_query_connections: usize,
    /// Concurrent query connections from one IP address.
    pub max_query_connections_per_ip: usize,
    /// Who may use the sessions API.
    pub sessions_api: SessionsApiAuth,
    /// Audiences a remote sessions API caller's token must be issued for (empty: the API
    /// server's own).
    pub sessions_api_audiences: Vec<String>,
    /// Global session cap.
    pub max_sessions: usize,
    /// Per-IP session cap.
    pub max_sessions_per_ip: Option<usize>,
    /// Control packet prefix.
    pub control_magic: Vec<u8>,
    /// Worker thread count.
    pub workers: NonZeroUsize,
    /// Worker pinning.
    pub affinity: dataplane::WorkerAffinity,
    /// Socket buffer size of data-port sockets.
    pub socket_buffer_bytes: usize,
    /// Busy-poll window of the workers (zero: off).
    pub busy_poll: Duration,
    /// Drain period after SIGTERM.
    pub drain: Duration,
    /// Heartbeat silence after which a thread counts as stuck (`/healthz` 503).
    pub watchdog: Duration,
    /// Inventory source.
    pub inventory: InventoryConfig,
    /// Resource types by query name.
    pub mappings: BTreeMap<String, Mapping>,
    /// Load balancing.
    pub load_balancing: LoadBalancing,
    /// Default endpoint query.
    pub default_endpoint: Option<Query>,
    /// Forwarders, when enabled.
    pub forwarders: Option<ForwardersConfig>,
    /// Route entry points, in declaration order (none: routes are off).
    pub entry_points: Vec<DataPort>,
    /// A route may send clients to a Service in another namespace.
    pub routes_allow_cross_namespace: bool,
    /// The Gateway API controller name this proxy serves GatewayClasses of, when enabled.
    pub gateway_controller: Option<String>,
    /// The Lease that elects the one instance writing whole-object status (SPEC §7).
    pub status_lease: StatusLease,
    /// Per-source-IP flood limits, when enabled.
    pub rate_limit: Option<dataplane::RateLimit>,
    /// Sealed tokens, when `tokenSecret` is set.
    pub token_secret: Option<TokenSecret>,
    /// Only the querying client's IP may redeem a token.
    pub bind_token_to_client_ip: bool,
}

/// `tokenSecret`: the key file and the keys read from it at load.
#[derive(Clone, Debug)]
pub struct TokenSecret {
    /// The key file (watched with the config file: a Secret update rotates the keys).
    pub file: PathBuf,
    /// Its keys: the first seals, all open.
    pub keys: Arc<dataplane::policy::seal::KeyRing>,
}

impl TokenSecret {
    /// Reads the key file; errors name `tokenSecret.file`.
    pub fn read(file: PathBuf) -> Result<Self, ConfigError> {
        let text = read_config_file(&file).map_err(|e| {
            invalid(
                "tokenSecret.file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let keys = dataplane::policy::seal::KeyRing::parse(&text)
            .map_err(|e| invalid("tokenSecret.file", format!("{}: {e}", file.display())))?;
        Ok(Self {
            file,
            keys: Arc::new(keys),
        })
    }
}

/// `forwarders`: declarative `listenPort → targetHost:targetPort` forwarding from `Forwarder`
/// objects (SPEC §6).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ForwardersConfig {
    /// The namespace whose `Forwarder` objects are served (file objects without a namespace
    /// count as in it).
    pub namespace: String,
    /// The Service, in `namespace`, that carries a port per UDP forwarder listener.
    pub udp_service: Option<String>,
    /// The Service that carries a port per TCP forwarder listener (may be the UDP one).
    pub tcp_service: Option<String>,
    /// How often a DNS `targetHost` is looked up again.
    pub resolve_interval: Duration,
}

/// The largest config or key file read: a config is a few KiB, and a path swapped for
/// something endless must not be read into memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads a config (or key) file as text, refusing what is not a regular file once symlinks are
/// followed (a ConfigMap or Secret mount is a symlink) and what is over [`MAX_CONFIG_BYTES`].
/// It is opened without blocking (a FIFO cannot hold the reader) and read through
/// `Read::take`, so a path swapped for `/dev/zero` or a growing file is never read past the
/// cap. Refusals are `InvalidData` errors that say why.
pub fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something else"
        };
        return Err(refuse(format!("not a regular file ({what})")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "larger than {MAX_CONFIG_BYTES} bytes, the most a config file may be"
        )));
    }
    String::from_utf8(bytes).map_err(|e| refuse(format!("not UTF-8 text: {e}")))
}

impl Config {
    /// Reads and validates a config file ([`read_config_file`]). Relative inventory paths are
    /// resolved against the config file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_yaml(&text)?;
        if let InventoryConfig::File { path: inv, .. } = &mut config.inventory
            && inv.is_relative()
            && let Some(dir) = path.parent()
        {
            *inv = dir.join(&*inv);
        }
        Ok(config)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text)?;
        Self::try_from(raw)
    }

    /// The data plane's settings derived from this config.
    pub fn dataplane(&self) -> dataplane::DataPlaneConfig {
        let ports = self
            .data_ports
            .iter()
            .map(|p| dataplane::DataPortConfig {
                name: p.name.clone(),
                bind: SocketAddr::new(self.bind_address, p.port),
                transport: p.protocol,
            })
            .collect();
        let mut dp = dataplane::DataPlaneConfig::with_ports(ports);
        dp.workers = self.workers;
        dp.affinity = self.affinity.clone();
        dp.session_timeout = self.session_timeout;
        dp.tcp_token_timeout = self.tcp_token_timeout;
        dp.max_sessions = self.max_sessions;
        dp.max_sessions_per_ip = self.max_sessions_per_ip;
        dp.control_magic = self.control_magic.clone();
        dp.recv_buffer_bytes = self.socket_buffer_bytes;
        dp.send_buffer_bytes = self.socket_buffer_bytes;
        dp.busy_poll = self.busy_poll;
        dp.rate_limit = self.rate_limit;
        dp.token_keys = self.token_secret.as_ref().map(|t| Arc::clone(&t.keys));
        // Every query and admin connection the control thread may hold at once, plus its own
        // (runtime, API client, files).
        dp.control_fd_reserve = self
            .max_query_connections
            .saturating_add(crate::admin::MAX_ADMIN_CONNECTIONS)
            .saturating_add(dataplane::io::fd_budget::CONTROL_RESERVE_BASE);
        dp
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let bind_address = match raw.bind_address.as_deref() {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(s) => s
                .parse()
                .map_err(|e| invalid("bindAddress", format!("`{s}` is not an IP address: {e}")))?,
        };
        let data_ports = data_ports(raw.data_port, raw.data_ports)?;
        let data_ports_for_seal = data_ports.len();
        let entry_points = named_ports("entryPoints", raw.entry_points)?;
        for (i, e) in entry_points.iter().enumerate() {
            if e.port != 0
                && data_ports
                    .iter()
                    .any(|d| d.port == e.port && d.protocol == e.protocol)
            {
                return Err(invalid(
                    format!("entryPoints[{i}].port"),
                    format!("{} is also a data port", e.port),
                ));
            }
        }
        let routes_allow_cross_namespace = match raw.routes {
            Some(_) if entry_points.is_empty() => {
                return Err(invalid(
                    "routes",
                    "routes need at least one entry point (entryPoints)",
                ));
            }
            Some(r) => r.allow_cross_namespace,
            None => false,
        };
        let seconds = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(key, "must be at least 1")),
                s if s > 86_400 => Err(invalid(key, "must be at most 86400 (one day)")),
                s => Ok(Duration::from_secs(s)),
            }
        };
        let positive = |key: &str, v: Option<usize>, default: usize| match v.unwrap_or(default) {
            0 => Err(invalid(key, "must be at least 1")),
            n => Ok(n),
        };
        let control_magic = parse_magic(
            raw.control_packet_magic_bytes
                .as_deref()
                .unwrap_or(DEFAULT_CONTROL_MAGIC_HEX),
        )?;
        let workers = match raw.workers {
            Some(0) => return Err(invalid("workers", "must be at least 1")),
            Some(n) if n > MAX_WORKERS => {
                return Err(invalid(
                    "workers",
                    format!("{n} is more than {MAX_WORKERS}; use about one per core"),
                ));
            }
            Some(n) => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        };
        let affinity = affinity(raw.cpu_affinity, &dataplane::available_cores())?;
        let socket_buffer_bytes = match raw.socket_buffer_bytes {
            None => dataplane::config::DEFAULT_SOCKET_BUFFER_BYTES,
            Some(n) if n < 4096 => {
                return Err(invalid("socketBufferBytes", "must be at least 4096"));
            }
            Some(n) => n,
        };
        let busy_poll = match raw.busy_poll_micros {
            Some(n) if n > 10_000 => {
                return Err(invalid(
                    "busyPollMicros",
                    "must be at most 10000 (10 ms); a worker spinning longer only burns CPU",
                ));
            }
            n => Duration::from_micros(n.unwrap_or(0)),
        };
        let inventory = inventory(raw.inventory)?;
        let mut mappings = BTreeMap::new();
        for (name, m) in raw.resource_query_mapping {
            let key = format!("resourceQueryMapping.{name}");
            mappings.insert(name, mapping(&key, m, &data_ports)?);
        }
        let load_balancing = load_balancing(raw.load_balancing)?;
        if let Some(q) = &raw.default_endpoint {
            q.validate()
                .map_err(|reason| invalid("defaultEndpoint", reason))?;
            if !mappings.contains_key(&q.resource_type) {
                return Err(invalid(
                    "defaultEndpoint.resourceType",
                    format!("`{}` is not in resourceQueryMapping", q.resource_type),
                ));
            }
        }
        let query_port = raw.query_port.unwrap_or(DEFAULT_QUERY_PORT);
        let admin_port = raw.admin_port.unwrap_or(DEFAULT_ADMIN_PORT);
        if query_port != 0 && query_port == admin_port {
            return Err(invalid(
                "adminPort",
                format!(
                    "{admin_port} is also the queryPort; the two TCP listeners need their own ports"
                ),
            ));
        }
        let sessions_api = match raw.sessions_api.as_ref().map(|a| a.auth.as_str()) {
            None | Some("loopback") => SessionsApiAuth::Loopback,
            Some("kubernetes") => SessionsApiAuth::Kubernetes,
            Some(other) => {
                return Err(invalid(
                    "sessionsApi.auth",
                    format!("`{}` is neither `loopback` nor `kubernetes`", quote(other)),
                ));
            }
        };
        let sessions_api_audiences = match raw.sessions_api.and_then(|a| a.audiences) {
            Some(_) if sessions_api == SessionsApiAuth::Loopback => {
                return Err(invalid(
                    "sessionsApi.audiences",
                    "only applies to `auth: kubernetes`",
                ));
            }
            Some(list) if list.iter().any(String::is_empty) => {
                return Err(invalid("sessionsApi.audiences", "an audience is empty"));
            }
            Some(list) => list,
            None if sessions_api == SessionsApiAuth::Kubernetes => {
                vec![DEFAULT_SESSIONS_API_AUDIENCE.to_string()]
            }
            None => Vec::new(),
        };
        Ok(Self {
            bind_address,
            query_port,
            admin_port,
            data_ports,
            token_ttl: seconds(
                "tokenTtlSeconds",
                raw.token_ttl_seconds,
                DEFAULT_TOKEN_TTL_SECONDS,
            )?,
            session_timeout: seconds(
                "sessionTimeoutSeconds",
                raw.session_timeout_seconds,
                DEFAULT_SESSION_TIMEOUT_SECONDS,
            )?,
            tcp_token_timeout: seconds(
                "tcpTokenTimeoutSeconds",
                raw.tcp_token_timeout_seconds,
                DEFAULT_TCP_TOKEN_TIMEOUT_SECONDS,
            )?,
            query_idle_timeout: seconds(
                "queryIdleTimeoutSeconds",
                raw.query_idle_timeout_seconds,
                DEFAULT_QUERY_IDLE_TIMEOUT_SECONDS,
            )?,
            max_query_connections: positive(
                "maxQueryConnections",
                raw.max_query_connections,
                DEFAULT_MAX_QUERY_CONNECTIONS,
            )?,
            max_query_connections_per_ip: positive(
                "maxQueryConnectionsPerIp",
                raw.max_query_connections_per_ip,
                DEFAULT_MAX_QUERY_CONNECTIONS_PER_IP,
            )?,
            sessions_api,
            sessions_api_audiences,
            max_sessions: positive("maxSessions", raw.max_sessions, DEFAULT_MAX_SESSIONS)?,
            max_sessions_per_ip: match raw.max_sessions_per_ip {
                Some(0) => return Err(invalid("maxSessionsPerIp", "must be at least 1")),
                other => other,
            },
            control_magic,
            workers,
            affinity,
            socket_buffer_bytes,
            busy_poll,
            drain: match raw.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS) {
                s if s > 3600 => return Err(invalid("drainSeconds", "must be at most 3600")),
                s => Duration::from_secs(s),
            },
            watchdog: match raw.watchdog_seconds.unwrap_or(DEFAULT_WATCHDOG_SECONDS) {
                s @ 1..=MAX_WATCHDOG_SECONDS => Duration::from_secs(s),
                _ => {
                    return Err(invalid(
                        "watchdogSeconds",
                        format!("must be between 1 and {MAX_WATCHDOG_SECONDS}"),
                    ));
                }
            },
            inventory,
            mappings,
            load_balancing,
            default_endpoint: raw.default_endpoint,
            forwarders: raw
                .forwarders
                .map(|f| forwarders(f, std::env::var("POD_NAMESPACE").ok()))
                .transpose()?,
            entry_points,
            routes_allow_cross_namespace,
            status_lease: StatusLease {
                namespace: std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|ns| !ns.is_empty())
                    .unwrap_or_else(|| DEFAULT_FORWARDERS_NAMESPACE.to_string()),
                name: match raw.gateway_api.as_ref().and_then(|g| g.lease_name.clone()) {
                    Some(name) => {
                        dns_label("gatewayApi.leaseName", &name)?;
                        name
                    }
                    None => DEFAULT_STATUS_LEASE.to_string(),
                },
            },
            rate_limit: raw.rate_limit.map(rate_limit).transpose()?,
            token_secret: match raw.token_secret {
                Some(t) if t.file.is_empty() => {
                    return Err(invalid("tokenSecret.file", "is empty"));
                }
                Some(t) => {
                    if data_ports_for_seal > dataplane::policy::seal::MAX_SEALED_PORTS {
                        return Err(invalid(
                            "tokenSecret",
                            format!(
                                "a sealed token names at most {} data ports",
                                dataplane::policy::seal::MAX_SEALED_PORTS
                            ),
                        ));
                    }
                    Some(TokenSecret::read(PathBuf::from(t.file))?)
                }
                None => None,
            },
            bind_token_to_client_ip: raw.bind_token_to_client_ip,
            gateway_controller: match raw.gateway_api {
                None => None,
                Some(g) => {
                    let name = g.controller_name;
                    // The API's form: a domain-prefixed path (`example.net/gateway-controller`).
                    let valid = name.split_once('/').is_some_and(|(domain, path)| {
                        domain.contains('.') && !path.is_empty() && name.len() <= 253
                    });
                    if !valid {
                        return Err(invalid(
                            "gatewayApi.controllerName",
                            format!(
                                "`{}` is not a domain-prefixed path like udp-director.dev/gateway-controller",
                                quote(&name)
                            ),
                        ));
                    }
                    Some(name)
                }
            },
        })
    }
}

/// `rateLimit`: the burst defaults to one second's packets; new sessions are unlimited unless
/// given.
fn rate_limit(raw: RawRateLimit) -> Result<dataplane::RateLimit, ConfigError> {
    if raw.per_ip_packets_per_second == 0 {
        return Err(invalid(
            "rateLimit.perIpPacketsPerSecond",
            "must be at least 1 (leave rateLimit out to turn it off)",
        ));
    }
    const MAX: u32 = 1_000_000;
    if raw.per_ip_packets_per_second > MAX {
        return Err(invalid(
            "rateLimit.perIpPacketsPerSecond",
            "must be at most 1000000",
        ));
    }
    let burst = raw.per_ip_burst.unwrap_or(raw.per_ip_packets_per_second);
    if burst == 0 || burst > MAX {
        return Err(invalid("rateLimit.perIpBurst", "must be 1 to 1000000"));
    }
    if raw.new_sessions_per_ip_per_second.is_some_and(|s| s > MAX) {
        return Err(invalid(
            "rateLimit.newSessionsPerIpPerSecond",
            "must be at most 1000000",
        ));
    }
    if raw.new_sessions_per_ip_per_second == Some(0) {
        return Err(invalid(
            "rateLimit.newSessionsPerIpPerSecond",
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    Ok(dataplane::RateLimit {
        packets_per_second: raw.per_ip_packets_per_second,
        burst,
        sessions_per_second: raw.new_sessions_per_ip_per_second.unwrap_or(0),
    })
}

/// `forwarders`; `pod_namespace` is the proxy's own namespace (`POD_NAMESPACE`), if known.
fn forwarders(
    raw: RawForwarders,
    pod_namespace: Option<String>,
) -> Result<ForwardersConfig, ConfigError> {
    let namespace = match raw.namespace {
        Some(ns) => {
            dns_label("forwarders.namespace", &ns)?;
            ns
        }
        None => pod_namespace
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| DEFAULT_FORWARDERS_NAMESPACE.to_string()),
    };
    let ports = raw.service_ports.unwrap_or_default();
    let service =
        |key: &str, name: Option<String>| name.map(|n| dns_label(key, &n).map(|()| n)).transpose();
    let resolve_interval = match raw
        .resolve_interval_seconds
        .unwrap_or(DEFAULT_RESOLVE_INTERVAL_SECONDS)
    {
        0 => {
            return Err(invalid(
                "forwarders.resolveIntervalSeconds",
                "must be at least 1",
            ));
        }
        s if s > 86_400 => {
            return Err(invalid(
                "forwarders.resolveIntervalSeconds",
                "must be at most 86400 (one day)",
            ));
        }
        s => Duration::from_secs(s),
    };
    Ok(ForwardersConfig {
        namespace,
        udp_service: service("forwarders.servicePorts.udp", ports.udp)?,
        tcp_service: service("forwarders.servicePorts.tcp", ports.tcp)?,
        resolve_interval,
    })
}

/// Namespace and Service names are DNS labels (RFC 1123): at most 63 lowercase letters, digits
/// and `-`, starting and ending with a letter or digit.
fn dns_label(key: &str, name: &str) -> Result<(), ConfigError> {
    if crate::forwarder::is_dns_label(name) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "`{}` is not a valid name (at most 63 lowercase letters, digits and `-`, \
                 starting and ending with a letter or digit)",
                quote(name)
            ),
        ))
    }
}

/// Worker pinning; core ids must be among `available` (the cores this process may run on), so a
/// typo is refused here instead of turning into a warning per worker at start.
fn affinity(
    raw: Option<RawAffinity>,
    available: &[usize],
) -> Result<dataplane::WorkerAffinity, ConfigError> {
    match raw {
        None => Ok(dataplane::WorkerAffinity::None),
        Some(RawAffinity::Word(w)) if w == "auto" => Ok(dataplane::WorkerAffinity::Auto),
        Some(RawAffinity::Word(w)) if w == "none" => Ok(dataplane::WorkerAffinity::None),
        Some(RawAffinity::Word(w)) => Err(invalid(
            "cpuAffinity",
            format!(
                "`{}` is neither `auto`, `none` nor a list of core ids",
                quote(&w)
            ),
        )),
        Some(RawAffinity::Cores(cores)) if cores.is_empty() => {
            Err(invalid("cpuAffinity", "the core list is empty"))
        }
        Some(RawAffinity::Cores(cores)) => {
            let unknown: Vec<String> = cores
                .iter()
                .filter(|c| !available.contains(c))
                .map(ToString::to_string)
                .collect();
            if unknown.is_empty() {
                return Ok(dataplane::WorkerAffinity::Cores(cores));
            }
            let have: Vec<String> = available.iter().map(ToString::to_string).collect();
            Err(invalid(
                "cpuAffinity",
                format!(
                    "core {} not available to this process (available: {})",
                    unknown.join(", "),
                    if have.is_empty() {
                        "none could be read".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            ))
        }
    }
}

fn data_ports(
    single: Option<u16>,
    list: Option<Vec<RawDataPort>>,
) -> Result<Vec<DataPort>, ConfigError> {
    let ports = match (single, list) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "dataPorts",
                "give either `dataPort` or `dataPorts`, not both",
            ));
        }
        (Some(port), None) => vec![DataPort {
            name: DEFAULT_DATA_PORT_NAME.into(),
            port,
            protocol: Protocol::Udp,
        }],
        (None, None) => vec![DataPort {
            name: DEFAULT_DATA_PORT_NAME.into(),
            port: DEFAULT_DATA_PORT,
            protocol: Protocol::Udp,
        }],
        (None, Some(list)) => named_ports("dataPorts", list)?,
    };
    if ports.is_empty() {
        return Err(invalid("dataPorts", "at least one data port is needed"));
    }
    Ok(ports)
}

/// A list of named ports (`dataPorts`, `entryPoints`): names unique and not empty, protocol
/// `udp` (default) or `tcp`, no (port, protocol) twice.
fn named_ports(list_key: &str, list: Vec<RawDataPort>) -> Result<Vec<DataPort>, ConfigError> {
    let mut out: Vec<DataPort> = Vec::with_capacity(list.len());
    for (i, p) in list.into_iter().enumerate() {
        let key = format!("{list_key}[{i}]");
        if p.name.is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        if out.iter().any(|o| o.name == p.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("`{}` is used twice", p.name),
            ));
        }
        let protocol = match p.protocol.as_deref().unwrap_or("udp") {
            "udp" | "UDP" => Protocol::Udp,
            "tcp" | "TCP" => Protocol::Tcp,
            other => {
                return Err(invalid(
                    format!("{key}.protocol"),
                    format!("`{other}` is neither `udp` nor `tcp`"),
                ));
            }
        };
        if p.port != 0
            && out
                .iter()
                .any(|o| o.port == p.port && o.protocol == protocol)
        {
            return Err(invalid(
                format!("{key}.port"),
                format!("{} is used twice", p.port),
            ));
        }
        out.push(DataPort {
            name: p.name,
            port: p.port,
            protocol,
        });
    }
    Ok(out)
}

fn parse_magic(hex: &str) -> Result<Vec<u8>, ConfigError> {
    let key = "controlPacketMagicBytes";
    let hex = hex.trim().trim_start_matches("0x");
    if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(invalid(
            key,
            format!(
                "`{}` must be an even number of hex digits, at least 2",
                quote(hex)
            ),
        ));
    }
    if hex.len() > 64 {
        return Err(invalid(key, "must be at most 32 bytes"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|e| invalid(key, format!("`{hex}` is not hex: {e}")))
        })
        .collect()
}

fn inventory(raw: Option<RawInventory>) -> Result<InventoryConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(InventoryConfig::Kubernetes {
            namespaces: Vec::new(),
            label_selector: None,
        });
    };
    // A key that belongs to the other kind is a mistake worth naming, not something to ignore.
    let only_for = |present: bool, key: &str, kind: &str| {
        if present {
            Err(invalid(
                format!("inventory.{key}"),
                format!("only applies to `kind: {kind}`"),
            ))
        } else {
            Ok(())
        }
    };
    match raw.kind.as_str() {
        "file" => {
            only_for(
                raw.watch_namespaces.is_some(),
                "watchNamespaces",
                "kubernetes",
            )?;
            only_for(raw.label_selector.is_some(), "labelSelector", "kubernetes")?;
            let path = raw
                .path
                .ok_or_else(|| invalid("inventory.path", "is required for `kind: file`"))?;
            let millis = raw.poll_interval_millis.unwrap_or(DEFAULT_FILE_POLL_MILLIS);
            if !(10..=60_000).contains(&millis) {
                return Err(invalid(
                    "inventory.pollIntervalMillis",
                    "must be 10 to 60000",
                ));
            }
            let max_bytes = match raw.max_bytes {
                None => DEFAULT_INVENTORY_MAX_BYTES,
                Some(0) => return Err(invalid("inventory.maxBytes", "must be at least 1")),
                Some(n) if n > 1 << 30 => {
                    return Err(invalid("inventory.maxBytes", "must be at most 1 GiB"));
                }
                Some(n) => n,
            };
            Ok(InventoryConfig::File {
                path,
                poll_interval: Duration::from_millis(millis),
                max_bytes,
            })
        }
        "kubernetes" => {
            only_for(raw.path.is_some(), "path", "file")?;
            only_for(
                raw.poll_interval_millis.is_some(),
                "pollIntervalMillis",
                "file",
            )?;
            only_for(raw.max_bytes.is_some(), "maxBytes", "file")?;
            let namespaces = raw.watch_namespaces.unwrap_or_default();
            for (i, ns) in namespaces.iter().enumerate() {
                if !is_dns_label(ns) {
                    return Err(invalid(
                        format!("inventory.watchNamespaces[{i}]"),
                        format!("`{ns}` is not a valid namespace name"),
                    ));
                }
            }
            let label_selector = match raw.label_selector {
                Some(s) if s.trim().is_empty() => {
                    return Err(invalid(
                        "inventory.labelSelector",
                        "must not be empty; leave it out to watch every object",
                    ));
                }
                other => other,
            };
            Ok(InventoryConfig::Kubernetes {
                namespaces,
                label_selector,
            })
        }
        other => Err(invalid(
            "inventory.kind",
            format!("`{other}` is neither `kubernetes` nor `file`"),
        )),
    }
}

/// An RFC 1123 label, as namespace names must be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn port_source(
    key: &str,
    name: Option<String>,
    path: Option<String>,
) -> Result<PortSource, ConfigError> {
    match (name, path) {
        (Some(n), None) if !n.is_empty() => Ok(PortSource::Name(n)),
        (None, Some(p)) if !p.is_empty() => JsonPath::parse(&p)
            .map(PortSource::Path)
            .map_err(|e| invalid(format!("{key}.portPath"), e)),
        (Some(_), Some(_)) => Err(invalid(key, "give `portName` or `portPath`, not both")),
        _ => Err(invalid(key, "needs a non-empty `portName` or `portPath`")),
    }
}

fn mapping(key: &str, m: RawMapping, data_ports: &[DataPort]) -> Result<Mapping, ConfigError> {
    if m.version.is_empty() {
        return Err(invalid(format!("{key}.version"), "must not be empty"));
    }
    if m.resource.is_empty() {
        return Err(invalid(format!("{key}.resource"), "must not be empty"));
    }
    // These names reach API paths and the generated RBAC: only what Kubernetes allows in them
    // (a DNS subdomain for the group, lowercase alphanumerics for version and resource).
    let name_ok = |s: &str, dots: bool| {
        s.len() <= 253
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
            })
    };
    for (field, value, dots) in [
        ("group", &m.group, true),
        ("version", &m.version, false),
        ("resource", &m.resource, false),
    ] {
        if !name_ok(value, dots) {
            return Err(invalid(
                format!("{key}.{field}"),
                format!(
                    "`{}` is not a Kubernetes API {field} name (lowercase letters, digits, `-`{})",
                    quote(value),
                    if dots { ", `.`" } else { "" }
                ),
            ));
        }
    }
    if let Some(kind) = &m.kind
        && (kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(invalid(
            format!("{key}.kind"),
            format!("`{}` is not a Kubernetes kind name", quote(kind)),
        ));
    }
    let service = m.service_selector_label.is_some() || m.service_target_port_name.is_some();
    let direct = m.address_path.is_some()
        || m.address_type.is_some()
        || m.port_name.is_some()
        || m.port_path.is_some()
        || m.ports.is_some();
    let locator = match (direct, service) {
        (true, true) => {
            return Err(invalid(
                key,
                "mixes direct keys (addressPath, ports…) with service keys (serviceSelectorLabel…)",
            ));
        }
        (false, false) => {
            return Err(invalid(
                key,
                "needs `addressPath` with `portName`/`portPath`/`ports`, or `serviceSelectorLabel` \
                 with `serviceTargetPortName`",
            ));
        }
        (false, true) => Locator::Service {
            selector_label: m
                .service_selector_label
                .ok_or_else(|| invalid(format!("{key}.serviceSelectorLabel"), "is required"))?,
            target_port_name: m
                .service_target_port_name
                .ok_or_else(|| invalid(format!("{key}.serviceTargetPortName"), "is required"))?,
        },
        (true, false) => {
            let address_path = m
                .address_path
                .ok_or_else(|| invalid(format!("{key}.addressPath"), "is required"))?;
            let address_path = JsonPath::parse(&address_path)
                .map_err(|e| invalid(format!("{key}.addressPath"), e))?;
            let ports = match m.ports {
                Some(list) => {
                    if m.port_name.is_some() || m.port_path.is_some() {
                        return Err(invalid(
                            format!("{key}.ports"),
                            "give `ports` or `portName`/`portPath`, not both",
                        ));
                    }
                    let mut out = Vec::new();
                    for (i, p) in list.into_iter().enumerate() {
                        let pkey = format!("{key}.ports[{i}]");
                        let index = data_ports
                            .iter()
                            .position(|d| d.name == p.name)
                            .ok_or_else(|| {
                                invalid(
                                    format!("{pkey}.name"),
                                    format!("`{}` is not a data port name", p.name),
                                )
                            })?;
                        out.push((index, port_source(&pkey, p.port_name, p.port_path)?));
                    }
                    if out.is_empty() {
                        return Err(invalid(format!("{key}.ports"), "must not be empty"));
                    }
                    out
                }
                None => {
                    // One port: every data port goes to it.
                    let src = port_source(key, m.port_name, m.port_path)?;
                    (0..data_ports.len()).map(|i| (i, src.clone())).collect()
                }
            };
            Locator::Direct {
                address_path,
                address_type: m.address_type,
                ports,
            }
        }
    };
    use dataplane::policy::proxy_protocol::ProxyMode;
    let proxy_protocol = match m.proxy_protocol.as_deref() {
        None | Some("none") => ProxyMode::None,
        Some("v2") => ProxyMode::V2,
        Some("v2-first") => ProxyMode::V2First,
        Some(other) => {
            return Err(invalid(
                format!("{key}.proxyProtocol"),
                format!("`{}` is not one of none, v2, v2-first", quote(other)),
            ));
        }
    };
    Ok(Mapping {
        group: m.group,
        version: m.version,
        resource: m.resource,
        kind: m.kind,
        locator,
        proxy_protocol,
    })
}

fn load_balancing(raw: Option<RawLoadBalancing>) -> Result<LoadBalancing, ConfigError> {
    let Some(raw) = raw else {
        return Ok(LoadBalancing::LeastSessions);
    };
    let extra = raw.current_label.is_some() || raw.max_label.is_some() || raw.overlap.is_some();
    let plain = |lb: LoadBalancing| {
        if extra {
            Err(invalid(
                "loadBalancing",
                "currentLabel/maxLabel/overlap only apply to `type: labelArithmetic`",
            ))
        } else {
            Ok(lb)
        }
    };
    match raw.kind.as_str() {
        "leastSessions" => plain(LoadBalancing::LeastSessions),
        "roundRobin" => plain(LoadBalancing::RoundRobin),
        "random" => plain(LoadBalancing::Random),
        "labelArithmetic" => Ok(LoadBalancing::LabelArithmetic {
            current_label: raw
                .current_label
                .ok_or_else(|| invalid("loadBalancing.currentLabel", "is required"))?,
            max_label: raw
                .max_label
                .ok_or_else(|| invalid("loadBalancing.maxLabel", "is required"))?,
            overlap: raw.overlap.unwrap_or(0),
        }),
        other => Err(invalid(
            "loadBalancing.type",
            format!("`{other}` is not one of leastSessions, labelArithmetic, roundRobin, random"),
        )),
    }
}

#[cfg(test)]
mod tests;
