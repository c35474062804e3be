//! A udp-director process for one `fastpath` run: a generated config (on the wildcard
//! address, with or without the fast path) and a file inventory with one UDP `Forwarder` to
//! the echo server, its log in a file of the run's scratch directory. Killed on drop.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use super::FastPathArgs;
use super::net::{Topology, leftovers};

/// A proxy started for one run: a `Forwarder` from the wildcard to the echo server, its log
/// in a file; killed on drop.
#[derive(Debug)]
pub(super) struct Proxy {
    child: Child,
    pub(super) pid: u32,
    admin: SocketAddr,
    /// The forwarder's address as clients reach it (this host's end of the client pair).
    pub(super) listen: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts `bin` with a forwarder to `echo` (and the fast path on `fast_path`'s interfaces),
    /// and waits until a datagram from the client namespace comes back through it.
    pub(super) fn start(
        bin: &Path,
        args: &FastPathArgs,
        net: &Topology,
        name: &str,
        echo: SocketAddr,
        fast_path: Option<[&str; 2]>,
    ) -> anyhow::Result<Self> {
        // A free port (the kernel's pick, let go at once) for the forwarder.
        let port = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?
            .local_addr()?
            .port();
        let inventory = format!(
            "- {{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: echo, namespace: perf, labels: {{id: echo}}}}, \
             status: {{state: Ready, address: \"{ip}\", ports: [{{name: default, port: {p}}}]}}}}\n\
             - {{apiVersion: udp-director.dev/v1alpha1, kind: Forwarder, metadata: {{name: perf, namespace: perf}}, \
             spec: {{udp: {{listenPort: {port}, targetHost: \"{ip}\", targetPort: {p}}}}}}}\n",
            ip = echo.ip(),
            p = echo.port(),
        );
        let workers = args
            .proxy
            .proxy_workers
            .map(|w| format!("workers: {w}\n"))
            .unwrap_or_default();
        let fast = fast_path
            .map(|[a, b]| format!("fastPath: {{kind: tc, interfaces: [{a}, {b}]}}\n"))
            .unwrap_or_default();
        let config = format!(
            "bindAddress: 0.0.0.0\nqueryPort: 0\nadminPort: 0\ndataPort: 0\ndrainSeconds: 0\n{workers}{fast}\
             forwarders: {{namespace: perf}}\n\
             inventory: {{kind: file, path: {name}.inventory.yaml}}\n\
             resourceQueryMapping:\n  gameserver: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}\n"
        );
        std::fs::write(
            net.scratch.join(format!("{name}.inventory.yaml")),
            inventory,
        )?;
        let config_path = net.scratch.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config)?;
        let log = net.scratch.join(format!("{name}.log"));
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", &args.proxy_log)
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        leftovers().pids.push(pid);
        let stdout = child.stdout.take().context("the proxy's stdout")?;
        let mut proxy = Self {
            child,
            pid,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen: SocketAddr::new(net.client_host_ip.into(), port),
            log,
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let admin: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "the proxy did not start ({:?}); its log:\n{}",
                    line.trim(),
                    proxy.log_tail(40)
                )
            })?;
        proxy.admin.set_port(admin.port());
        net.probe(proxy.listen).with_context(|| {
            format!(
                "the forwarder on {} did not answer; the proxy's log:\n{}",
                proxy.listen,
                proxy.log_tail(40)
            )
        })?;
        Ok(proxy)
    }

    /// Its `/metrics` text.
    pub(super) fn metrics(&self) -> Option<String> {
        crate::soak::http_get(self.admin, "/metrics")
    }

    /// The last `lines` lines of its log.
    pub(super) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints the warnings and errors it logged that no earlier run's proxy logged (`seen`:
    /// the messages so far, without their time).
    pub(super) fn print_problems(&self, seen: &mut BTreeSet<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .filter(|l| seen.insert(l.split_once("] ").map_or(*l, |(_, m)| m).to_owned()))
            .collect();
        for l in problems.iter().take(10) {
            println!("  proxy: {l}");
        }
        if problems.len() > 10 {
            println!(
                "  proxy: … {} more in {}",
                problems.len() - 10,
                self.log.display()
            );
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        leftovers().pids.retain(|p| *p != self.pid);
    }
}
