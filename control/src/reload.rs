//! Config reload (SPEC §8): on SIGHUP, or when the config file or the `tokenSecret` file
//! changes (a ConfigMap or Secret mount swaps a symlink), the file is read and checked again.
//! What can change live is applied without dropping a session; a change that needs a restart,
//! or an invalid file, is refused with a log line naming the key, and the running config stays.
//! The file is read like the inventory: off the control thread (a blocking task), and only a
//! regular file of at most [`crate::config::MAX_CONFIG_BYTES`] ([`crate::config::read_config_file`]),
//! so a path swapped for `/dev/zero` or a FIFO is refused instead of read without end.
//!
//! The running config is a `watch` channel: the director, the query server and the
//! reconcilers read it where they use it, and the data plane gets its part through
//! [`dataplane::Controller::reconfigure`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;

/// How often the config and key files are looked at.
const POLL: Duration = Duration::from_secs(1);

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

/// What identifies a file's content without reading it: device, inode, size and mtime of
/// what the path resolves to (a swapped symlink changes the inode).
type Stamp = Option<(u64, u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.modified().ok()?))
}

/// Watches the config file (and the key file it names) and reloads on a change or SIGHUP.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    live: watch::Sender<Arc<Config>>,
    controller: dataplane::Controller,
    metrics: Arc<Metrics>,
}

/// How a reload ended.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// Applied (or nothing changed).
    Applied,
    /// A change that needs a restart; nothing applied.
    Refused(NeedsRestart),
    /// The file does not load; nothing applied.
    Invalid(String),
}

impl Reloader {
    /// A reloader of `path`, the file `live`'s config was loaded from.
    pub fn new(
        path: PathBuf,
        live: watch::Sender<Arc<Config>>,
        controller: dataplane::Controller,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path,
            live,
            controller,
            metrics,
        }
    }

    /// Reads the file again (on a blocking thread, never on the control thread that answers
    /// queries and probes) and applies it if it can.
    pub async fn reload(&self) -> Outcome {
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let outcome = match loaded {
            Err(e) => Outcome::Invalid(format!("the reader thread failed: {e}")),
            Ok(Err(e)) => Outcome::Invalid(with_causes(&e)),
            Ok(Ok(new)) => {
                let running = Arc::clone(&self.live.borrow());
                match needs_restart(&running, &new) {
                    Some(refusal) => Outcome::Refused(refusal),
                    None => {
                        self.controller.reconfigure(new.dataplane().live());
                        self.live.send_replace(Arc::new(new));
                        Outcome::Applied
                    }
                }
            }
        };
        let path = self.path.display();
        match &outcome {
            Outcome::Applied => {
                log::info!("config reloaded from {path}");
                self.metrics.count_reload("applied");
            }
            Outcome::Refused(why) => {
                log::error!("config reload refused: {why}; the running config stays");
                self.metrics.count_reload("refused");
            }
            Outcome::Invalid(e) => {
                log::error!("config reload refused: {e}; the running config stays");
                self.metrics.count_reload("invalid");
            }
        }
        outcome
    }

    /// The files whose change triggers a reload: the config, and the key file it names.
    fn stamps(&self) -> (Stamp, Stamp) {
        let secret = self
            .live
            .borrow()
            .token_secret
            .as_ref()
            .map(|s| s.file.clone());
        (stamp(&self.path), secret.as_deref().and_then(stamp))
    }

    /// Reloads on SIGHUP and on a change of either file, until the process ends.
    pub async fn run(self) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("no SIGHUP reload: {e}");
                None
            }
        };
        let mut seen = self.stamps();
        let mut poll = tokio::time::interval(POLL);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup => {
                    log::info!("SIGHUP: reloading {}", self.path.display());
                    self.reload().await;
                    seen = self.stamps();
                }
                _ = poll.tick() => {
                    let now = self.stamps();
                    if now != seen {
                        // A missing file (mid-swap) is not a change to act on yet.
                        if now.0.is_some() {
                            self.reload().await;
                        }
                        seen = self.stamps();
                    }
                }
            }
        }
    }
}

/// An error and its causes on one line (`cannot read config file x: not a regular file`): a
/// refused reload is only a log line, so it must carry the reason.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Without a config file (the built-in example), SIGHUP reloads nothing: said, not fatal.
pub async fn no_file_to_reload() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        log::warn!("SIGHUP: no config file to reload (running the built-in example)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_CONFIG_BYTES;

    /// What `Config::load` says about `path`, with its causes, as a refused reload logs it.
    fn refusal(path: &Path) -> String {
        with_causes(&Config::load(path).unwrap_err())
    }

    #[test]
    fn only_a_regular_file_under_the_cap_is_read() {
        let dir = std::env::temp_dir().join(format!("reload-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = "inventory: {kind: file, path: /tmp/none.yaml}
";
        let file = dir.join("config.yaml");
        std::fs::write(&file, good).unwrap();
        assert!(Config::load(&file).is_ok());
        // A ConfigMap mount: a symlink to the file.
        let link = dir.join("link.yaml");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(Config::load(&link).is_ok());

        // A symlink to /dev/zero: refused at once, nothing read.
        let zero = dir.join("zero.yaml");
        let _ = std::fs::remove_file(&zero);
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = refusal(&zero);
        assert!(
            e.contains(&zero.display().to_string()) && e.contains("not a regular file (a device)"),
            "{e}"
        );
        // A FIFO with no writer: refused, not waited on.
        let fifo = dir.join("fifo.yaml");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(refusal(&fifo).contains("not a regular file (a FIFO)"));
        assert!(refusal(&dir).contains("not a regular file (a directory)"));

        // Over the cap: refused naming the path and the cap.
        let big = dir.join("big.yaml");
        let mut text = good.to_string();
        text.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&big, &text).unwrap();
        let e = refusal(&big);
        assert!(
            e.contains(&big.display().to_string())
                && e.contains(&format!("larger than {MAX_CONFIG_BYTES} bytes")),
            "{e}"
        );
        // At the cap: read.
        text.truncate(MAX_CONFIG_BYTES as usize);
        std::fs::write(&big, &text).unwrap();
        assert!(Config::load(&big).is_ok());
        // Missing: the OS error, once.
        let e = refusal(&dir.join("missing.yaml"));
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

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
