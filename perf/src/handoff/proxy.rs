//! The two proxies of a `handoff` round: A on a config with `handoff: {socketPath}` and fixed
//! ports (a successor is refused when a data port is 0), one UDP `Forwarder` per backend in a
//! file inventory; B started later on A's very config file, as a rollout's new pod is. Both log
//! at `info` into files of the round's scratch directory, where the hand-off's own account of
//! itself is read back (A: what it handed over and the gap it measured; B: what it took over).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(super) use crate::proxy::{series, sum_series};

/// The fixed ports of a round, all distinct numbers (a forwarder on the number of one of the
/// proxy's own ports would not open, whatever the protocol).
#[derive(Debug)]
pub(super) struct Ports {
    pub(super) query: u16,
    pub(super) admin: u16,
    pub(super) data: u16,
    pub(super) forwarders: Vec<u16>,
}

impl Ports {
    /// Ports the kernel hands out now, held together while chosen so that none comes twice,
    /// then let go for the proxy to bind.
    pub(super) fn pick(forwarders: usize) -> anyhow::Result<Self> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut taken = std::collections::BTreeSet::new();
        while tcp.len() < 2 {
            let l = TcpListener::bind("127.0.0.1:0")?;
            if taken.insert(l.local_addr()?.port()) {
                tcp.push(l);
            }
        }
        while udp.len() < 1 + forwarders {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            if taken.insert(s.local_addr()?.port()) {
                udp.push(s);
            }
        }
        let port = |a: std::io::Result<SocketAddr>| a.map(|a| a.port());
        Ok(Self {
            query: port(tcp[0].local_addr())?,
            admin: port(tcp[1].local_addr())?,
            data: port(udp[0].local_addr())?,
            forwarders: udp[1..]
                .iter()
                .map(|s| port(s.local_addr()))
                .collect::<std::io::Result<_>>()?,
        })
    }
}

/// Writes A's config and inventory into `dir`: a forwarder from `ports.forwarders[i]` to
/// `backends[i]`, workers and drain as given, and the hand-off socket in `dir`. Returns the
/// config file's path.
pub(super) fn write_config(
    dir: &Path,
    ports: &Ports,
    backends: &[SocketAddr],
    workers: usize,
    drain_seconds: u64,
    max_sessions: usize,
) -> anyhow::Result<PathBuf> {
    let mut inventory = format!(
        "- {{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: echo, namespace: perf, labels: {{id: echo}}}}, \
         status: {{state: Ready, address: \"{}\", ports: [{{name: default, port: {}}}]}}}}\n",
        backends[0].ip(),
        backends[0].port()
    );
    for (i, (port, target)) in ports.forwarders.iter().zip(backends).enumerate() {
        inventory += &format!(
            "- {{apiVersion: udp-director.dev/v1alpha1, kind: Forwarder, metadata: {{name: perf-{i}, namespace: perf}}, \
             spec: {{udp: {{listenPort: {port}, targetHost: \"{}\", targetPort: {}}}}}}}\n",
            target.ip(),
            target.port()
        );
    }
    std::fs::write(dir.join("inventory.yaml"), inventory)?;
    let config = format!(
        "bindAddress: 127.0.0.1\nqueryPort: {}\nadminPort: {}\n\
         dataPorts: [{{name: game, port: {}, protocol: udp}}]\n\
         workers: {workers}\ndrainSeconds: {drain_seconds}\nmaxSessions: {max_sessions}\n\
         inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 100}}\n\
         resourceQueryMapping:\n  gameserver: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}\n\
         forwarders: {{namespace: perf}}\n\
         handoff: {{socketPath: {}}}\n",
        ports.query,
        ports.admin,
        ports.data,
        dir.join("handoff.sock").display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// A proxy process of a round; killed on drop.
#[derive(Debug)]
pub(super) struct Proxy {
    child: Child,
    pub(super) log: PathBuf,
    /// Kept open: the proxy writes its `listening` line there and nothing after, but a closed
    /// pipe would turn a later line into a failed write.
    _stdout: BufReader<ChildStdout>,
}

impl Proxy {
    /// Starts `bin` on `config` (RUST_LOG=info, its log in `log`) and returns once it has
    /// printed its `listening` line: for a successor, once it has taken over.
    pub(super) fn start(bin: &Path, config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("the proxy's stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let proxy = Self {
            child,
            log,
            _stdout: stdout,
        };
        if !line.starts_with("listening") {
            bail!(
                "the proxy did not start ({:?}); its log ({}):\n{}",
                line.trim(),
                proxy.log.display(),
                proxy.log_tail(30)
            );
        }
        Ok(proxy)
    }

    /// Waits until it has exited (at most `limit`): its status, or `None`.
    pub(super) fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Its log so far.
    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub(super) fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The warnings and errors it logged.
    pub(super) fn problems(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 10 s) until the proxy on `admin` is ready and has `forwarders` UDP forwarders
/// open.
pub(super) fn wait_ready(
    proxy: &Proxy,
    admin: SocketAddr,
    forwarders: usize,
) -> anyhow::Result<()> {
    let want = forwarders as f64;
    for _ in 0..500 {
        let ready = crate::soak::http_get(admin, "/readyz").is_some();
        let open = crate::soak::http_get(admin, "/metrics")
            .and_then(|m| series(&m, r#"udp_director_forwarders{protocol="udp"}"#));
        if ready && open == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "proxy A did not open its {forwarders} forwarders within 10 s; its log ({}):\n{}",
        proxy.log.display(),
        proxy.log_tail(30)
    )
}

/// What A said it handed over: `handed over N UDP sessions and M sockets; the gap was G`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct HandedOver {
    pub(super) sessions: u64,
    pub(super) sockets: u64,
    pub(super) gap: Duration,
}

/// Reads A's `handed over` line from its log.
pub(super) fn handed_over(log: &str) -> Option<HandedOver> {
    let line = log.lines().find(|l| l.contains("hand-off: handed over "))?;
    let rest = line.split_once("handed over ")?.1;
    let (sessions, rest) = rest.split_once(" UDP sessions and ")?;
    let (sockets, rest) = rest.split_once(" sockets; the gap was ")?;
    let gap = rest.split(';').next()?;
    Some(HandedOver {
        sessions: sessions.trim().parse().ok()?,
        sockets: sockets.trim().parse().ok()?,
        gap: debug_duration(gap.trim())?,
    })
}

/// A `Duration` as its `Debug` prints it (`18.234567ms`, `950µs`, `1.5s`, `12ns`).
fn debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_proxys_account_is_read_from_its_log() {
        let log = "[2026-12-04T15:00:00Z INFO  dataplane::handoff::old] hand-off: waiting for a successor on /tmp/x/handoff.sock\n\
                   [2026-12-04T15:00:02Z INFO  dataplane::handoff::old] hand-off: handed over 10010 UDP sessions and 1034 sockets; the gap was 23.456789ms; finishing TCP connections, then exiting\n";
        assert_eq!(
            handed_over(log),
            Some(HandedOver {
                sessions: 10010,
                sockets: 1034,
                gap: Duration::from_nanos(23_456_789),
            })
        );
        assert_eq!(handed_over("nothing here"), None);
    }

    #[test]
    fn debug_durations_parse_in_every_unit() {
        assert_eq!(debug_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(debug_duration("950µs"), Some(Duration::from_micros(950)));
        assert_eq!(debug_duration("12ns"), Some(Duration::from_nanos(12)));
        assert_eq!(debug_duration("12"), None);
        assert_eq!(debug_duration("3parsecs"), None);
    }

    #[test]
    fn families_are_summed_over_the_matching_labels() {
        let text = "udp_director_sessions_created_total{kind=\"token\",protocol=\"udp\"} 3\n\
                    udp_director_sessions_created_total{kind=\"forwarder\",protocol=\"udp\"} 4\n\
                    udp_director_sessions_created_total{kind=\"forwarder\",protocol=\"tcp\"} 9\n";
        assert_eq!(
            sum_series(
                text,
                "udp_director_sessions_created_total",
                "protocol=\"udp\""
            ),
            Some(7.0)
        );
        assert_eq!(sum_series(text, "udp_director_nothing", "x"), None);
    }
}
