//! Which config keys change live and which need a restart (sans-io): what a reload may apply.

use super::Config;

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

/// What `new` changes that the running proxy cannot apply live, if anything (the first such
/// key). Listeners, threads, sockets and the inventory's watches are set up once at start;
/// everything else (mappings' paths and ports, load balancing, the default endpoint, timeouts,
/// limits, rate limits, token keys, route and forwarder settings) applies live.
pub fn needs_restart(running: &Config, new: &Config) -> Option<NeedsRestart> {
    let differs = |key: &str, changed: bool, why: &'static str| {
        changed.then(|| NeedsRestart {
            key: key.to_string(),
            why,
        })
    };
    const PORT: &str = "changed; listeners are bound once at start";
    differs(
        "bindAddress",
        running.bind_address != new.bind_address,
        PORT,
    )
    .or_else(|| differs("queryPort", running.query_port != new.query_port, PORT))
    .or_else(|| differs("adminPort", running.admin_port != new.admin_port, PORT))
    .or_else(|| differs("dataPorts", running.data_ports != new.data_ports, PORT))
    .or_else(|| {
        differs(
            "entryPoints",
            running.entry_points != new.entry_points,
            PORT,
        )
    })
    .or_else(|| {
        differs(
            "workers",
            running.workers != new.workers,
            "changed; worker threads start once",
        )
    })
    .or_else(|| {
        differs(
            "cpuAffinity",
            running.affinity != new.affinity,
            "changed; threads are pinned once at start",
        )
    })
    .or_else(|| {
        differs(
            "socketBufferBytes",
            running.socket_buffer_bytes != new.socket_buffer_bytes,
            "changed; socket buffers are set when a socket opens",
        )
    })
    .or_else(|| {
        differs(
            "busyPollMicros",
            running.busy_poll != new.busy_poll,
            "changed; workers read it once at start",
        )
    })
    .or_else(|| {
        differs(
            "controlPacketMagicBytes",
            running.control_magic != new.control_magic,
            "changed; live sessions' clients would send the old magic",
        )
    })
    .or_else(|| {
        differs(
            "inventory",
            running.inventory != new.inventory,
            "changed; the inventory source starts once",
        )
    })
    .or_else(|| {
        differs(
            "sessionsApi",
            running.sessions_api != new.sessions_api
                || running.sessions_api_audiences != new.sessions_api_audiences,
            "changed; the admin server's authorizer is set up at start",
        )
    })
    .or_else(|| {
        let (a, b) = (&running.forwarders, &new.forwarders);
        match (a, b) {
            (None, None) => None,
            (Some(a), Some(b)) => differs(
                "forwarders.namespace",
                a.namespace != b.namespace,
                "changed; the Forwarder watch is per namespace",
            )
            .or_else(|| {
                differs(
                    "forwarders.servicePorts",
                    a.udp_service != b.udp_service || a.tcp_service != b.tcp_service,
                    "changed; the Services written are set up at start",
                )
            }),
            _ => differs(
                "forwarders",
                true,
                "turned on or off; the Forwarder watch starts once",
            ),
        }
    })
    .or_else(|| {
        differs(
            "gatewayApi.controllerName",
            running.gateway_controller != new.gateway_controller,
            "changed; the Gateway API watches start once",
        )
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
        let field = if old.group != new.group {
            "group"
        } else if old.version != new.version {
            "version"
        } else if old.resource != new.resource {
            "resource"
        } else if old.kind != new.kind {
            "kind"
        } else {
            continue;
        };
        return Some(NeedsRestart {
            key: format!("resourceQueryMapping.{name}.{field}"),
            why: "changed; each resource type is watched from start",
        });
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
