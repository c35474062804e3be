//! Which config keys change live and which need a restart (sans-io): what a reload may apply.

use super::{Config, Mapping};

/// A change only a restart can apply.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct NeedsRestart {
    /// The config key.
    pub key: String,
    /// What about it cannot change live.
    pub why: &'static str,
}

impl std::fmt::Display for NeedsRestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {}: it needs a restart", self.key, self.why)
    }
}

/// How a reload treats a config key: the classification the reference documents
/// ([`super::reference`]) and [`needs_restart`] enforces, both read from `RESTART_KEYS`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ReloadClass {
    /// A changed value applies live.
    Live,
    /// A changed value is refused until a restart.
    Restart,
    /// Adding or removing it needs a restart; its settings below apply as they say.
    RestartToAddOrRemove,
}

impl ReloadClass {
    /// The words the reference prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Restart => "restart",
            Self::RestartToAddOrRemove => "restart to add or remove",
        }
    }
}

/// What a restart key covers.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Scope {
    /// The key and every key below it.
    Whole,
    /// Only turning the key on or off (adding or removing it).
    Presence,
}

/// A config key whose change only a restart can apply.
#[derive(Debug)]
struct RestartKey {
    /// The key a refusal names.
    key: &'static str,
    /// The config keys whose change it catches (`dataPort` is a shorthand of `dataPorts`).
    covers: &'static [&'static str],
    /// Whether the keys below it are caught too.
    scope: Scope,
    /// What about it cannot change live.
    why: &'static str,
    /// Whether it differs between the running config and the new one.
    changed: fn(&Config, &Config) -> bool,
}

const PORT: &str = "changed; listeners are bound once at start";

/// The keys only a restart can change, in the order a reload checks them. Listeners, threads,
/// sockets and the inventory's watches are set up once at start; everything else (mappings'
/// paths and ports, load balancing, the default endpoint, timeouts, limits, rate limits, token
/// keys, route and forwarder settings) applies live.
const RESTART_KEYS: &[RestartKey] = &[
    RestartKey {
        key: "bindAddress",
        covers: &["bindAddress"],
        scope: Scope::Whole,
        why: PORT,
        changed: |a, b| a.bind_address != b.bind_address,
    },
    RestartKey {
        key: "queryPort",
        covers: &["queryPort"],
        scope: Scope::Whole,
        why: PORT,
        changed: |a, b| a.query_port != b.query_port,
    },
    RestartKey {
        key: "adminPort",
        covers: &["adminPort"],
        scope: Scope::Whole,
        why: PORT,
        changed: |a, b| a.admin_port != b.admin_port,
    },
    RestartKey {
        key: "dataPorts",
        covers: &["dataPort", "dataPorts"],
        scope: Scope::Whole,
        why: PORT,
        changed: |a, b| a.data_ports != b.data_ports,
    },
    RestartKey {
        key: "entryPoints",
        covers: &["entryPoints"],
        scope: Scope::Whole,
        why: PORT,
        changed: |a, b| a.entry_points != b.entry_points,
    },
    RestartKey {
        key: "workers",
        covers: &["workers"],
        scope: Scope::Whole,
        why: "changed; worker threads start once",
        changed: |a, b| a.workers != b.workers,
    },
    RestartKey {
        key: "cpuAffinity",
        covers: &["cpuAffinity"],
        scope: Scope::Whole,
        why: "changed; threads are pinned once at start",
        changed: |a, b| a.affinity != b.affinity,
    },
    RestartKey {
        key: "socketBufferBytes",
        covers: &["socketBufferBytes"],
        scope: Scope::Whole,
        why: "changed; socket buffers are set when a socket opens",
        changed: |a, b| a.socket_buffer_bytes != b.socket_buffer_bytes,
    },
    RestartKey {
        key: "busyPollMicros",
        covers: &["busyPollMicros"],
        scope: Scope::Whole,
        why: "changed; workers read it once at start",
        changed: |a, b| a.busy_poll != b.busy_poll,
    },
    RestartKey {
        key: "controlPacketMagicBytes",
        covers: &["controlPacketMagicBytes"],
        scope: Scope::Whole,
        why: "changed; live sessions' clients would send the old magic",
        changed: |a, b| a.control_magic != b.control_magic,
    },
    RestartKey {
        key: "fastPath",
        covers: &["fastPath"],
        scope: Scope::Whole,
        why: "changed; the BPF program is loaded and attached once, at start",
        changed: |a, b| a.fast_path != b.fast_path,
    },
    RestartKey {
        key: "handoff",
        covers: &["handoff"],
        scope: Scope::Whole,
        why: "changed; the hand-off socket is taken at start",
        changed: |a, b| a.handoff != b.handoff,
    },
    RestartKey {
        key: "inventory",
        covers: &["inventory"],
        scope: Scope::Whole,
        why: "changed; the inventory source starts once",
        changed: |a, b| a.inventory != b.inventory,
    },
    RestartKey {
        key: "sessionsApi",
        covers: &["sessionsApi"],
        scope: Scope::Whole,
        why: "changed; the admin server's authorizer is set up at start",
        changed: |a, b| {
            a.sessions_api != b.sessions_api || a.sessions_api_audiences != b.sessions_api_audiences
        },
    },
    RestartKey {
        key: "forwarders",
        covers: &["forwarders"],
        scope: Scope::Presence,
        why: "turned on or off; the Forwarder watch starts once",
        changed: |a, b| a.forwarders.is_some() != b.forwarders.is_some(),
    },
    RestartKey {
        key: "forwarders.namespace",
        covers: &["forwarders.namespace"],
        scope: Scope::Whole,
        why: "changed; the Forwarder watch is per namespace",
        changed: |a, b| match (&a.forwarders, &b.forwarders) {
            (Some(a), Some(b)) => a.namespace != b.namespace,
            _ => false,
        },
    },
    RestartKey {
        key: "forwarders.servicePorts",
        covers: &["forwarders.servicePorts"],
        scope: Scope::Whole,
        why: "changed; the Services written are set up at start",
        changed: |a, b| match (&a.forwarders, &b.forwarders) {
            (Some(a), Some(b)) => a.udp_service != b.udp_service || a.tcp_service != b.tcp_service,
            _ => false,
        },
    },
    RestartKey {
        key: "gatewayApi.controllerName",
        covers: &["gatewayApi.controllerName"],
        scope: Scope::Whole,
        why: "changed; the Gateway API watches start once",
        changed: |a, b| a.gateway_controller != b.gateway_controller,
    },
    RestartKey {
        key: "gatewayApi.leaseName",
        covers: &["gatewayApi.leaseName"],
        scope: Scope::Whole,
        why: "changed; the status Lease is joined once, at start",
        changed: |a, b| a.status_lease != b.status_lease,
    },
];

/// Whether a field differs between two versions of a mapping.
type MappingChanged = fn(&Mapping, &Mapping) -> bool;

/// The `resourceQueryMapping` entry fields that pick the resource type (and so the watch): a
/// change of one needs a restart; the entry's other fields change live.
const MAPPING_RESTART_FIELDS: &[(&str, MappingChanged)] = &[
    ("group", |a, b| a.group != b.group),
    ("version", |a, b| a.version != b.version),
    ("resource", |a, b| a.resource != b.resource),
    ("kind", |a, b| a.kind != b.kind),
];

/// How a reload treats the config key at `path`: dotted camelCase keys, `[]` for a list's items
/// and `<name>` for a map's entries (`dataPorts[].port`, `resourceQueryMapping.<name>.group`).
pub fn reload_class(path: &str) -> ReloadClass {
    // `path` is `key` or below it.
    let under = |key: &str| {
        path.strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    for k in RESTART_KEYS {
        for key in k.covers {
            match k.scope {
                Scope::Presence if path == *key => return ReloadClass::RestartToAddOrRemove,
                Scope::Whole if under(key) => return ReloadClass::Restart,
                _ => {}
            }
        }
    }
    const ENTRY: &str = "resourceQueryMapping.<name>";
    if path == "resourceQueryMapping" || path == ENTRY {
        return ReloadClass::RestartToAddOrRemove;
    }
    if let Some(field) = path.strip_prefix(ENTRY).and_then(|f| f.strip_prefix('.'))
        && MAPPING_RESTART_FIELDS.iter().any(|(f, _)| *f == field)
    {
        return ReloadClass::Restart;
    }
    ReloadClass::Live
}

/// What `new` changes that the running proxy cannot apply live, if anything (the first such
/// key of `RESTART_KEYS`, then of the mappings).
pub fn needs_restart(running: &Config, new: &Config) -> Option<NeedsRestart> {
    RESTART_KEYS
        .iter()
        .find(|k| (k.changed)(running, new))
        .map(|k| NeedsRestart {
            key: k.key.to_string(),
            why: k.why,
        })
        .or_else(|| mapping_restart(running, new))
}

/// Mappings change live in their paths, ports, port names and PROXY protocol; which resource
/// types exist (and so which watches run) is set at start.
fn mapping_restart(running: &Config, new: &Config) -> Option<NeedsRestart> {
    let names = |c: &Config| c.mappings.keys().cloned().collect::<Vec<_>>();
    if names(running) != names(new) {
        let added = new
            .mappings
            .keys()
            .find(|k| !running.mappings.contains_key(*k));
        let removed = running
            .mappings
            .keys()
            .find(|k| !new.mappings.contains_key(*k));
        let name = added.or(removed).cloned().unwrap_or_default();
        return Some(NeedsRestart {
            key: format!("resourceQueryMapping.{name}"),
            why: "added or removed; each resource type is watched from start",
        });
    }
    for (name, old) in &running.mappings {
        let new = &new.mappings[name];
        if let Some((field, _)) = MAPPING_RESTART_FIELDS
            .iter()
            .find(|(_, changed)| changed(old, new))
        {
            return Some(NeedsRestart {
                key: format!("resourceQueryMapping.{name}.{field}"),
                why: "changed; each resource type is watched from start",
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_yaml(&format!(
            "inventory: {{kind: file, path: /tmp/none.yaml}}\n\
             resourceQueryMapping:\n  gs: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn live_keys_apply() {
        let running = config("");
        for extra in [
            "sessionTimeoutSeconds: 60\n",
            "tokenTtlSeconds: 5\n",
            "tcpTokenTimeoutSeconds: 3\n",
            "maxSessions: 10\nmaxSessionsPerIp: 2\n",
            "maxQueryConnections: 5\nmaxQueryConnectionsPerIp: 1\n",
            "rateLimit: {perIpPacketsPerSecond: 10}\n",
            "loadBalancing: {type: roundRobin}\n",
            "defaultEndpoint: {resourceType: gs, namespace: other}\n",
            "drainSeconds: 3\n",
            "bindTokenToClientIp: true\n",
        ] {
            assert_eq!(needs_restart(&running, &config(extra)), None, "{extra}");
        }
        // A mapping's paths and PROXY protocol change live.
        let mut paths = config("");
        paths.mappings.get_mut("gs").unwrap().proxy_protocol =
            dataplane::policy::proxy_protocol::ProxyMode::V2;
        assert_eq!(needs_restart(&running, &paths), None);
    }

    #[test]
    fn restart_keys_are_refused_by_name() {
        let running = config("");
        for (extra, key) in [
            ("dataPort: 7000\n", "dataPorts"),
            ("queryPort: 9001\n", "queryPort"),
            ("adminPort: 9091\n", "adminPort"),
            ("bindAddress: 127.0.0.1\n", "bindAddress"),
            ("workers: 7\n", "workers"),
            ("entryPoints: [{name: voice, port: 5000}]\n", "entryPoints"),
            ("controlPacketMagicBytes: DEAD\n", "controlPacketMagicBytes"),
            ("forwarders: {namespace: games}\n", "forwarders"),
            ("sessionsApi: {auth: kubernetes}\n", "sessionsApi"),
        ] {
            let refusal = needs_restart(&running, &config(extra)).expect(extra);
            assert_eq!(refusal.key, key, "{extra}");
            assert!(refusal.to_string().contains("restart"), "{refusal}");
        }
        let mut other_kind = config("");
        other_kind.mappings.get_mut("gs").unwrap().resource = "fleets".into();
        assert_eq!(
            needs_restart(&running, &other_kind).unwrap().key,
            "resourceQueryMapping.gs.resource"
        );
        let mut more = config("");
        let gs = more.mappings["gs"].clone();
        more.mappings.insert("pods".into(), gs);
        assert_eq!(
            needs_restart(&running, &more).unwrap().key,
            "resourceQueryMapping.pods"
        );
    }
}
