//! The YAML configuration: a strict raw schema (`#[serde(deny_unknown_fields)]`) turned into a
//! validated [`Config`] by [`Config::from_yaml`]. Every rejection names the key and the reason.
//! The config is immutable once the proxy runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::Query;
use crate::protocol::jsonpath::Path as JsonPath;

mod file;
pub mod live;
mod raw;
pub mod reference;
mod validate;

pub use file::{MAX_CONFIG_BYTES, read_config_file};

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
/// Concurrent admin connections, in total and from one address: enough for probes, a few
/// Prometheus servers and operators, far below the open-file limit.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;
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
    /// Agones allocation on query, when the mapping allows it.
    pub allocation: Option<Allocation>,
}

/// A mapping's `allocation` (SPEC section 13).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Allocation {
    /// Every query allocates (else only one with `"allocate": true`).
    pub enabled: bool,
    /// Backfill onto `Allocated` servers with room on this counter first.
    pub backfill_counter: Option<String>,
    /// Labels written on the allocated server (`{tokenId}` replaced).
    pub labels: BTreeMap<String, String>,
    /// Annotations written on the allocated server (`{tokenId}` replaced).
    pub annotations: BTreeMap<String, String>,
    /// Counter actions: name → signed amount.
    pub counters: BTreeMap<String, i64>,
    /// Time one allocation may take, retries included.
    pub timeout: std::time::Duration,
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
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, schemars::JsonSchema, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionsApiAuth {
    /// Only callers on loopback (the node itself, `kubectl port-forward`, `kubectl exec`).
    #[default]
    Loopback,
    /// Loopback, or a remote caller whose bearer token the API server's TokenReview accepts and
    /// whose user a SubjectAccessReview allows `list`/`delete` on `sessions.udp-director.dev`.
    Kubernetes,
}

/// What validation needs to know of the process and the machine, gathered once, so the rules
/// themselves read nothing.
#[derive(Clone, Debug)]
pub struct Environment {
    /// `POD_NAMESPACE`: the proxy's own namespace, where it runs in a cluster.
    pub pod_namespace: Option<String>,
    /// The cores this process may run on (`cpuAffinity` names them).
    pub cores: Vec<usize>,
    /// The default number of workers: one per core available.
    pub parallelism: NonZeroUsize,
}

impl Environment {
    /// This process's.
    pub fn of_this_process() -> Self {
        Self {
            pod_namespace: std::env::var("POD_NAMESPACE").ok(),
            cores: dataplane::available_cores(),
            parallelism: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }
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
    /// The kernel fast path, when `fastPath.kind` is `tc`.
    pub fast_path: Option<dataplane::fastpath::FastPathConfig>,
    /// Sealed tokens, when `tokenSecret` is set.
    pub token_secret: Option<TokenSecret>,
    /// The hand-off socket, when `handoff` is set (SPEC §12).
    pub handoff: Option<Handoff>,
    /// Only the querying client's IP may redeem a token.
    pub bind_token_to_client_ip: bool,
}

/// `handoff`: where the running proxy waits for its successor.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Handoff {
    /// The Unix socket's path (absolute, fits `sun_path`).
    pub socket_path: PathBuf,
}

/// `tokenSecret`: the key file and the keys read from it at load.
#[derive(Clone, Debug)]
pub struct TokenSecret {
    /// The key file (watched with the config file: a Secret update rotates the keys).
    pub file: PathBuf,
    /// Its keys: the first seals, all open.
    pub keys: Arc<dataplane::policy::seal::KeyRing>,
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

impl Config {
    /// Reads and validates a config file ([`read_config_file`]). Relative inventory paths are
    /// resolved against the config file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file_text(&text, path)
    }

    /// Parses the text of the config file at `path` (paths in it are relative to its
    /// directory): a successor's config as it would load it (SPEC §12).
    pub fn from_file_text(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::from_yaml(text)?;
        if let InventoryConfig::File { path: inv, .. } = &mut config.inventory
            && inv.is_relative()
            && let Some(dir) = path.parent()
        {
            *inv = dir.join(&*inv);
        }
        Ok(config)
    }

    /// Parses and validates YAML text, in this process's environment.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_in(text, &Environment::of_this_process())
    }

    /// Parses and validates YAML text in `env`, then reads the token key file it names.
    pub fn from_yaml_in(text: &str, env: &Environment) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = serde_yaml::from_str(text)?;
        let validate::Validated {
            mut config,
            token_secret_file,
        } = validate::validate(raw, env)?;
        config.token_secret = token_secret_file.map(TokenSecret::read).transpose()?;
        Ok(config)
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
        dp.fast_path = self.fast_path.clone();
        dp.token_keys = self.token_secret.as_ref().map(|t| Arc::clone(&t.keys));
        // Every query and admin connection the control thread may hold at once, plus its own
        // (runtime, API client, files).
        dp.control_fd_reserve = self
            .max_query_connections
            .saturating_add(MAX_ADMIN_CONNECTIONS)
            .saturating_add(dataplane::io::fd_budget::CONTROL_RESERVE_BASE);
        dp
    }
}

#[cfg(test)]
mod tests;
