//! A udp-director process for a benchmark: a config and a file inventory in a temp dir, the
//! binary started on port 0 and its addresses read from its `listening` line. Killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// A game server in the proxy's inventory.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
}

#[derive(Debug)]
pub(crate) struct ProxyProcess {
    child: Child,
    dir: PathBuf,
    pub(crate) pid: u32,
    pub(crate) query: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) data: SocketAddr,
    /// The first route entry point, if any.
    pub(crate) entry: Option<SocketAddr>,
}

/// Which proxy a benchmark starts; shared by `compare`, `sessions` and `migrate`.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Proxy binary (default: udp-director beside this binary).
    #[arg(long)]
    pub(crate) proxy_bin: Option<PathBuf>,
    /// Proxy worker threads (default: the proxy's own, one per core).
    #[arg(long)]
    pub(crate) proxy_workers: Option<usize>,
}

impl ProxyArgs {
    /// Starts the chosen proxy on `servers` with one UDP data port (see
    /// [`ProxyProcess::start`]).
    pub(crate) fn start(&self, servers: &[Server], extra: &str) -> anyhow::Result<ProxyProcess> {
        let bin = binary(self.proxy_bin.as_deref())?;
        ProxyProcess::start(
            &bin,
            servers,
            self.proxy_workers,
            "dataPort: 0\n",
            extra,
            "",
        )
    }

    /// Starts the chosen proxy as [`Self::start`] does, with a UDP `Forwarder` to the first
    /// server in its inventory file; returns the proxy and the forwarder's listen address once
    /// a datagram through it comes back.
    pub(crate) fn start_forwarder(
        &self,
        servers: &[Server],
        extra: &str,
    ) -> anyhow::Result<(ProxyProcess, SocketAddr)> {
        let bin = binary(self.proxy_bin.as_deref())?;
        let target = servers.first().context("a server to forward to")?.addr;
        // A free port (the kernel's pick, let go at once) for the forwarder to listen on.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let forwarder = format!(
            "- {{apiVersion: udp-director.dev/v1alpha1, kind: Forwarder, metadata: {{name: perf, namespace: perf}}, \
             spec: {{udp: {{listenPort: {port}, targetHost: \"{}\", targetPort: {}}}}}}}\n",
            target.ip(),
            target.port()
        );
        let extra = format!("{extra}forwarders: {{namespace: perf}}\n");
        let proxy = ProxyProcess::start(
            &bin,
            servers,
            self.proxy_workers,
            "dataPort: 0\n",
            &extra,
            &forwarder,
        )?;
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        echoes_through(listen)
            .with_context(|| format!("the forwarder on {listen} did not open"))?;
        Ok((proxy, listen))
    }

    /// Starts the chosen proxy as [`Self::start`] does, with an entry point `perf` and a
    /// `Route` balancing it over `endpoints` (one Service, one EndpointSlice, all on one port);
    /// returns the proxy and the entry point's address once a datagram through it comes back.
    pub(crate) fn start_route(
        &self,
        servers: &[Server],
        endpoints: &[SocketAddr],
        extra: &str,
    ) -> anyhow::Result<(ProxyProcess, SocketAddr)> {
        let bin = binary(self.proxy_bin.as_deref())?;
        let port = endpoints.first().context("an endpoint")?.port();
        let addresses: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{{addresses: [\"{}\"]}}", e.ip()))
            .collect();
        let objects = format!(
            "- {{apiVersion: v1, kind: Service, metadata: {{name: echo, namespace: perf}}, spec: {{ports: [{{name: echo, port: 5000}}]}}}}\n\
             - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: echo-1, namespace: perf, labels: {{kubernetes.io/service-name: echo}}}}, \
             ports: [{{name: echo, port: {port}}}], endpoints: [{}]}}\n\
             - {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: perf, namespace: perf}}, \
             spec: {{entryPoint: perf, rules: [{{backends: [{{service: echo, port: echo}}]}}]}}}}\n",
            addresses.join(", ")
        );
        let extra = format!("{extra}entryPoints: [{{name: perf, port: 0}}]\n");
        let proxy = ProxyProcess::start(
            &bin,
            servers,
            self.proxy_workers,
            "dataPort: 0\n",
            &extra,
            &objects,
        )?;
        let entry = proxy.entry.context("the proxy printed no entry point")?;
        echoes_through(entry).with_context(|| format!("the route on {entry} did not answer"))?;
        Ok((proxy, entry))
    }

    /// Starts the chosen proxy as [`Self::start`] does, with `objects` (inventory list
    /// entries) added to its inventory file.
    pub(crate) fn start_with_objects(
        &self,
        servers: &[Server],
        extra: &str,
        objects: &str,
    ) -> anyhow::Result<ProxyProcess> {
        let bin = binary(self.proxy_bin.as_deref())?;
        ProxyProcess::start(
            &bin,
            servers,
            self.proxy_workers,
            "dataPort: 0\n",
            extra,
            objects,
        )
    }

    /// Starts the chosen proxy on `servers` with one UDP data port and no default endpoint:
    /// only clients with a token get a session.
    pub(crate) fn start_tokens_only(
        &self,
        servers: &[Server],
        extra: &str,
    ) -> anyhow::Result<ProxyProcess> {
        let bin = binary(self.proxy_bin.as_deref())?;
        ProxyProcess::start_with(
            &bin,
            servers,
            self.proxy_workers,
            "dataPort: 0\n",
            extra,
            "",
            false,
        )
    }

    /// Starts the chosen proxy on `servers` with one TCP data port instead.
    pub(crate) fn start_tcp(
        &self,
        servers: &[Server],
        extra: &str,
    ) -> anyhow::Result<ProxyProcess> {
        let bin = binary(self.proxy_bin.as_deref())?;
        let ports = "dataPorts: [{name: default, port: 0, protocol: tcp}]\n";
        ProxyProcess::start(&bin, servers, self.proxy_workers, ports, extra, "")
    }
}

/// Waits (up to 5 s) until a datagram sent to `addr` comes back.
fn echoes_through(addr: SocketAddr) -> anyhow::Result<()> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    probe.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
    let mut buf = [0u8; 16];
    for _ in 0..100 {
        probe.send_to(b"ready?", addr)?;
        if probe.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("no answer from {addr}")
}

/// The proxy binary: `--proxy-bin`, else `udp-director` beside this binary (same target dir).
pub(crate) fn binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name("udp-director"),
    };
    if !path.exists() {
        bail!(
            "no proxy binary at {} (build it: cargo build --release; or pass --proxy-bin)",
            path.display()
        );
    }
    Ok(path)
}

impl ProxyProcess {
    /// Starts the proxy with `servers` in its inventory (labelled `id: <name>`), the first one
    /// also the default endpoint (clients without a token), its data port(s) from the
    /// `data_ports` config line, `extra` config lines and `objects` (list entries) added to the
    /// inventory file.
    pub(crate) fn start(
        bin: &Path,
        servers: &[Server],
        workers: Option<usize>,
        data_ports: &str,
        extra: &str,
        objects: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, servers, workers, data_ports, extra, objects, true)
    }

    /// [`Self::start`], with or without the default endpoint (without: a client with no token
    /// gets no session).
    pub(crate) fn start_with(
        bin: &Path,
        servers: &[Server],
        workers: Option<usize>,
        data_ports: &str,
        extra: &str,
        objects: &str,
        default_endpoint: bool,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("udp-director-perf-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let inventory: String = servers
            .iter()
            .map(|s| {
                format!(
                    "- {{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: {n}, namespace: perf, labels: {{id: {n}}}}}, status: {{state: Ready, address: \"{}\", ports: [{{name: default, port: {}}}]}}}}\n",
                    s.addr.ip(),
                    s.addr.port(),
                    n = s.name
                )
            })
            .collect();
        std::fs::write(dir.join("inventory.yaml"), inventory + objects)?;
        let default = match servers.first() {
            Some(s) if default_endpoint => format!(
                "defaultEndpoint: {{resourceType: gameserver, labelSelector: {{id: {}}}}}\n",
                s.name
            ),
            _ => String::new(),
        };
        let workers = workers
            .map(|w| format!("workers: {w}\n"))
            .unwrap_or_default();
        let config = format!(
            "bindAddress: 127.0.0.1\nqueryPort: 0\nadminPort: 0\n{data_ports}drainSeconds: 0\n{workers}{extra}\
             inventory: {{kind: file, path: inventory.yaml}}\n\
             resourceQueryMapping:\n  gameserver: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}\n\
             {default}"
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(dir.join("config.yaml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("proxy stdout")?).read_line(&mut line)?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in the proxy's first line {line:?}"))
        };
        let query = field("query=")?.parse()?;
        let admin = field("admin=")?.parse()?;
        // `data=NAME/PROTOCOL=ADDR,…`: the first data port.
        let data = field("data=")?
            .split(',')
            .next()
            .and_then(|port| port.split_once('='))
            .context("data port")?
            .1
            .parse()?;
        let entry = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("entry="))
            .and_then(|e| e.split(',').next()?.split_once('=')?.1.parse().ok());
        let pid = child.id();
        let proxy = Self {
            child,
            dir,
            pid,
            query,
            admin,
            data,
            entry,
        };
        // Ready once the inventory is in: a query answers with a token.
        for _ in 0..100 {
            if crate::load::token(proxy.query, r#"{"resourceType":"gameserver"}"#).is_ok() {
                return Ok(proxy);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!("the proxy did not become ready")
    }
}

impl ProxyProcess {
    /// The inventory file it watches.
    pub(crate) fn inventory_path(&self) -> PathBuf {
        self.dir.join("inventory.yaml")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prints a proxy's resident and peak memory.
pub(crate) fn print_memory(label: &str, pid: u32) {
    let mib = |f| status_kib(pid, f).unwrap_or(0) as f64 / 1024.0;
    println!(
        "{label} memory: RSS {:.1} MiB, peak {:.1} MiB",
        mib("VmRSS"),
        mib("VmHWM")
    );
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM…).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's open-file limit to its hard limit (a socket per session).
pub(crate) fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, live struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
        l.rlim_cur
    }
}

/// The value of one series (exact name with labels) in a `/metrics` text.
pub(crate) fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of every series of a family whose labels include `label` (`protocol="udp"`).
pub(crate) fn sum_series(metrics: &str, family: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            labels.contains(label).then(|| value.trim().parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
