//! The rules a config must follow beyond its schema: ranges, exclusive keys, names, ports used
//! twice, keys that belong to another option. Pure: what it needs of the machine and the pod
//! comes in an [`Environment`], and the key file is read by the caller.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;
use super::*;
use crate::quote::quote;

/// A config as validated, and the token key file it names (read after, by the caller).
pub(super) struct Validated {
    pub(super) config: Config,
    pub(super) token_secret_file: Option<PathBuf>,
}

/// Validates the raw config against the rules, in `env`; reads nothing. The token key file is
/// only named here (`tokenSecret.file`): [`super::Config::from_yaml_in`] reads it after.
pub(super) fn validate(raw: RawConfig, env: &Environment) -> Result<Validated, ConfigError> {
    let token_secret_file = match &raw.token_secret {
        Some(t) if t.file.is_empty() => {
            return Err(invalid("tokenSecret.file", "is empty"));
        }
        Some(t) => Some(PathBuf::from(&t.file)),
        None => None,
    };
    let config = {
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
            None => env.parallelism,
        };
        let affinity = affinity(raw.cpu_affinity, &env.cores)?;
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
                .map_err(|reason| invalid("defaultEndpoint", reason.to_string()))?;
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
        let sessions_api = raw
            .sessions_api
            .as_ref()
            .map_or(SessionsApiAuth::Loopback, |a| a.auth);
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
        Config {
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
                .map(|f| forwarders(f, env.pod_namespace.clone()))
                .transpose()?,
            entry_points,
            routes_allow_cross_namespace,
            status_lease: StatusLease {
                namespace: env
                    .pod_namespace
                    .clone()
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
            fast_path: match raw.fast_path {
                None
                | Some(RawFastPath {
                    kind: RawFastPathKind::None,
                    ..
                }) => None,
                Some(RawFastPath { interfaces, .. }) => {
                    for name in &interfaces {
                        // IFNAMSIZ: 15 bytes and a NUL; no slash or space.
                        let valid = !name.is_empty()
                            && name.len() <= 15
                            && !name.contains(['/', ' ', ':'])
                            && name != "."
                            && name != "..";
                        if !valid {
                            return Err(invalid(
                                "fastPath.interfaces",
                                format!("`{}` is not an interface name", quote(name)),
                            ));
                        }
                    }
                    Some(dataplane::fastpath::FastPathConfig { interfaces })
                }
            },
            handoff: raw.handoff.map(handoff).transpose()?,
            // Read by `Config::from_yaml_in`, once the rest is known to be valid.
            token_secret: match raw.token_secret {
                Some(_) if data_ports_for_seal > dataplane::policy::seal::MAX_SEALED_PORTS => {
                    return Err(invalid(
                        "tokenSecret",
                        format!(
                            "a sealed token names at most {} data ports",
                            dataplane::policy::seal::MAX_SEALED_PORTS
                        ),
                    ));
                }
                _ => None,
            },
            bind_token_to_client_ip: raw.bind_token_to_client_ip,
            gateway_controller: match raw.gateway_api.and_then(|g| g.controller_name) {
                None => None,
                Some(name) => {
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
        }
    };
    Ok(Validated {
        config,
        token_secret_file,
    })
}

/// `handoff.socketPath`: absolute, and short enough for a Unix socket address.
fn handoff(raw: RawHandoff) -> Result<super::Handoff, ConfigError> {
    /// `sun_path` holds 108 bytes with the terminating NUL.
    const MAX_SOCKET_PATH: usize = 107;
    let path = raw.socket_path;
    if !path.starts_with('/') {
        return Err(invalid(
            "handoff.socketPath",
            format!("`{}` is not an absolute path", quote(&path)),
        ));
    }
    if path.len() > MAX_SOCKET_PATH || path.ends_with('/') || path.contains('\0') {
        return Err(invalid(
            "handoff.socketPath",
            format!(
                "`{}` is not a Unix socket path (a file name, at most {MAX_SOCKET_PATH} bytes)",
                quote(&path)
            ),
        ));
    }
    Ok(super::Handoff {
        socket_path: path.into(),
    })
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

/// Namespace, Service and Lease names are DNS labels (RFC 1123).
fn dns_label(key: &str, name: &str) -> Result<(), ConfigError> {
    crate::names::dns_label(name)
        .map_err(|why| invalid(key, format!("`{}` is not a valid name: {why}", quote(name))))
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
        let protocol = match p.protocol {
            None | Some(RawProtocol::Udp) => Protocol::Udp,
            Some(RawProtocol::Tcp) => Protocol::Tcp,
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
    match raw.kind {
        RawInventoryKind::File => {
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
        RawInventoryKind::Kubernetes => {
            only_for(raw.path.is_some(), "path", "file")?;
            only_for(
                raw.poll_interval_millis.is_some(),
                "pollIntervalMillis",
                "file",
            )?;
            only_for(raw.max_bytes.is_some(), "maxBytes", "file")?;
            let namespaces = raw.watch_namespaces.unwrap_or_default();
            for (i, ns) in namespaces.iter().enumerate() {
                dns_label(&format!("inventory.watchNamespaces[{i}]"), ns)?;
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
    }
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
            .map_err(|e| invalid(format!("{key}.portPath"), e.to_string())),
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
                .map_err(|e| invalid(format!("{key}.addressPath"), e.to_string()))?;
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
    let proxy_protocol = match m.proxy_protocol {
        None | Some(RawProxyMode::None) => ProxyMode::None,
        Some(RawProxyMode::V2) => ProxyMode::V2,
        Some(RawProxyMode::V2First) => ProxyMode::V2First,
    };
    let allocation = m
        .allocation
        .map(|a| allocation(key, &m.group, &m.resource, a))
        .transpose()?;
    Ok(Mapping {
        group: m.group,
        version: m.version,
        resource: m.resource,
        kind: m.kind,
        locator,
        proxy_protocol,
        allocation,
    })
}

/// A mapping's `allocation`: Agones GameServers only, a timeout in range, counter amounts in
/// range, label and annotation keys Kubernetes accepts.
fn allocation(
    key: &str,
    group: &str,
    resource: &str,
    raw: RawAllocation,
) -> Result<Allocation, ConfigError> {
    let field = |f: &str| format!("{key}.allocation{f}");
    if group != "agones.dev" || resource != "gameservers" {
        return Err(invalid(
            field(""),
            "allocation is Agones' (group agones.dev, resource gameservers)",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_ALLOCATION_TIMEOUT_MS);
    if !(100..=30_000).contains(&timeout_ms) {
        return Err(invalid(field(".timeoutMs"), "must be 100 to 30000"));
    }
    let metadata = raw.metadata.unwrap_or_default();
    for (what, map) in [
        ("labels", &metadata.labels),
        ("annotations", &metadata.annotations),
    ] {
        for k in map.keys() {
            if !qualified_name(k) {
                return Err(invalid(
                    field(&format!(".metadata.{what}")),
                    format!("`{}` is not a Kubernetes key", quote(k)),
                ));
            }
        }
    }
    let mut counters = BTreeMap::new();
    for (name, action) in raw.counters {
        let amount = action.amount.unwrap_or(1);
        if !(1..=1_000_000).contains(&amount) || name.is_empty() {
            return Err(invalid(
                field(&format!(".counters.{name}.amount")),
                "must be 1 to 1000000",
            ));
        }
        let signed = i64::try_from(amount).unwrap_or(1);
        counters.insert(
            name,
            match action.action {
                RawCounterVerb::Increment => signed,
                RawCounterVerb::Decrement => -signed,
            },
        );
    }
    let backfill_counter = match raw.backfill {
        Some(b) if b.counter.is_empty() => {
            return Err(invalid(field(".backfill.counter"), "must not be empty"));
        }
        b => b.map(|b| b.counter),
    };
    Ok(Allocation {
        enabled: raw.enabled,
        backfill_counter,
        labels: metadata.labels,
        annotations: metadata.annotations,
        counters,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// Default `allocation.timeoutMs`.
const DEFAULT_ALLOCATION_TIMEOUT_MS: u64 = 2000;

/// A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most
/// 63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    });
    name_ok && prefix_ok
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
    match raw.kind {
        RawLoadBalancingType::LeastSessions => plain(LoadBalancing::LeastSessions),
        RawLoadBalancingType::RoundRobin => plain(LoadBalancing::RoundRobin),
        RawLoadBalancingType::Random => plain(LoadBalancing::Random),
        RawLoadBalancingType::LabelArithmetic => Ok(LoadBalancing::LabelArithmetic {
            current_label: raw
                .current_label
                .ok_or_else(|| invalid("loadBalancing.currentLabel", "is required"))?,
            max_label: raw
                .max_label
                .ok_or_else(|| invalid("loadBalancing.maxLabel", "is required"))?,
            overlap: raw.overlap.unwrap_or(0),
        }),
    }
}
