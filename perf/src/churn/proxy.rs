//! The proxy under test in `churn` (the Kubernetes inventory on the run's namespace), and the
//! CPU counters the run reads: its control thread, itself, the API server, etcd, the machine.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::cluster::{ApiServer, ENTRY_POINT};
use super::{ChurnArgs, SETTLED_CORES};

/// The first `count` ports from `from` that this process can bind on 127.0.0.1 (UDP) now.
pub(super) fn free_ports(from: u16, count: usize) -> anyhow::Result<Vec<u16>> {
    let ports: Vec<u16> = (from..=u16::MAX)
        .filter(|&port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
        .take(count)
        .collect();
    if ports.len() < count {
        bail!("only {} free UDP ports from {from}", ports.len());
    }
    Ok(ports)
}

/// The proxy under test, with the Kubernetes inventory on the run's namespace. Killed on drop.
#[derive(Debug)]
pub(super) struct ChurnProxy {
    child: Child,
    dir: PathBuf,
    pub(super) pid: u32,
    pub(super) control_tid: u32,
    pub(super) query: SocketAddr,
    admin: SocketAddr,
}

/// When the proxy was ready, after its start.
#[derive(Debug)]
pub(super) struct Ready {
    /// `/readyz` answered 200 (every initial list done).
    pub(super) ready_seconds: f64,
    /// Every forwarder and route ready, or the wait gave up.
    pub(super) open_seconds: f64,
    pub(super) forwarders_ready: usize,
    pub(super) routes_ready: usize,
}

impl ChurnProxy {
    pub(super) fn start(args: &ChurnArgs, run: &Path, namespace: &str) -> anyhow::Result<Self> {
        let bin = match &args.proxy.proxy_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("udp-director"),
        };
        if !bin.exists() {
            bail!(
                "no proxy binary at {} (build it: cargo build --release; or pass --proxy-bin)",
                bin.display()
            );
        }
        let dir =
            std::env::temp_dir().join(format!("udp-director-churn-proxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let workers = args
            .proxy
            .proxy_workers
            .map(|w| format!("workers: {w}\n"))
            .unwrap_or_default();
        let config = format!(
            "bindAddress: 127.0.0.1\nqueryPort: 0\nadminPort: 0\ndrainSeconds: 0\n{workers}\
             dataPorts: [{{name: game, port: 0}}]\n\
             entryPoints: [{{name: {ENTRY_POINT}, port: 0}}]\n\
             forwarders: {{namespace: {namespace}}}\n\
             inventory: {{kind: kubernetes, watchNamespaces: [{namespace}]}}\n\
             resourceQueryMapping:\n  gameserver: {{group: agones.dev, version: v1, resource: gameservers, \
             addressPath: status.address, ports: [{{name: game, portName: default}}]}}\n"
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let stdout = std::fs::File::create(dir.join("stdout"))?;
        let stderr = std::fs::File::create(dir.join("proxy.log"))?;
        let started = Instant::now();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(dir.join("config.yaml"))
            .env("KUBECONFIG", run.join("kubeconfig"))
            .env("POD_NAMESPACE", namespace)
            .env("NODE_NAME", "churn")
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut proxy = Self {
            child,
            dir,
            pid,
            control_tid: 0,
            query: "0.0.0.0:0".parse()?,
            admin: "0.0.0.0:0".parse()?,
        };
        // The proxy's one line: `listening query=… admin=… data=…`.
        let line = loop {
            let out = std::fs::read_to_string(proxy.dir.join("stdout")).unwrap_or_default();
            if let Some(line) = out.lines().find(|l| l.starts_with("listening ")) {
                break line.to_owned();
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                bail!("the proxy exited ({status}): {}", proxy.log_tail());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the proxy printed no listening line: {}", proxy.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in the proxy's line {line:?}"))
        };
        proxy.query = field("query=")?.parse()?;
        proxy.admin = field("admin=")?.parse()?;
        proxy.control_tid = threads(pid)
            .iter()
            .find(|t| t.name == "control")
            .map(|t| t.tid)
            .context("the proxy has no thread named control")?;
        Ok(proxy)
    }

    /// The last lines of the proxy's log, for an error.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for `/readyz`, then for every forwarder and route to be ready (up to `timeout`;
    /// past it the run goes on with what is ready, and says so).
    pub(super) fn wait_ready(
        &self,
        forwarders: usize,
        routes: usize,
        timeout: Duration,
    ) -> anyhow::Result<Ready> {
        let started = Instant::now();
        while crate::soak::http_get(self.admin, "/readyz").is_none() {
            if started.elapsed() > timeout {
                bail!(
                    "the proxy was not ready within {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready_seconds = started.elapsed().as_secs_f64();
        let count_ready = |path: &str| {
            crate::soak::http_get(self.admin, path)
                .and_then(|r| Some(r.split_once("\r\n\r\n")?.1.to_owned()))
                .and_then(|body| serde_json::from_str::<Vec<Value>>(&body).ok())
                .map_or(0, |list| list.iter().filter(|o| o["ready"] == true).count())
        };
        loop {
            let (f, r) = (count_ready("/forwarders"), count_ready("/routes"));
            let done = f >= forwarders && r >= routes;
            if done || started.elapsed() > timeout {
                if !done {
                    eprintln!(
                        "churn: after {timeout:?}, {f} of {forwarders} forwarders and {r} of \
                         {routes} routes ready; going on"
                    );
                }
                return Ok(Ready {
                    ready_seconds,
                    open_seconds: started.elapsed().as_secs_f64(),
                    forwarders_ready: f,
                    routes_ready: r,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the control thread has used under [`SETTLED_CORES`] for three seconds in a
    /// row (the proxy's first status writes, and their echoes through its own watches, are
    /// done); returns how long that took, or None if it did not within `timeout`.
    /// The proxy's own count of query answer times (`udp_director_query_duration_seconds`):
    /// each bucket's upper bound in seconds and its cumulative count.
    pub(super) fn answer_buckets(&self) -> Vec<(f64, u64)> {
        let Some(metrics) = crate::soak::http_get(self.admin, "/metrics") else {
            return Vec::new();
        };
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("udp_director_query_duration_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, count) = l.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    }

    pub(super) fn settle(&self, timeout: Duration) -> Option<f64> {
        let started = Instant::now();
        let mut quiet = 0;
        let mut said = Instant::now();
        while started.elapsed() < timeout {
            let cores = self.control_cores(Duration::from_secs(1));
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                eprintln!(
                    "churn: waiting for the control thread to settle: {cores:.2} of a core after \
                     {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
            if cores < SETTLED_CORES {
                quiet += 1;
                if quiet == 3 {
                    return Some(started.elapsed().as_secs_f64());
                }
            } else {
                quiet = 0;
            }
        }
        None
    }

    /// The control thread's CPU over `span`, in cores.
    pub(super) fn control_cores(&self, span: Duration) -> f64 {
        let before = thread_ns(self.pid, self.control_tid).0;
        let began = Instant::now();
        std::thread::sleep(span);
        let used = thread_ns(self.pid, self.control_tid)
            .0
            .saturating_sub(before);
        used as f64 / 1e9 / began.elapsed().as_secs_f64()
    }
}

impl Drop for ChurnProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One thread of a process.
#[derive(Debug)]
struct Thread {
    tid: u32,
    name: String,
}

fn threads(pid: u32) -> Vec<Thread> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some(Thread {
                tid: task.file_name().to_str()?.parse().ok()?,
                name: name.trim_end().to_owned(),
            })
        })
        .collect()
}

/// A thread's time on a CPU so far and its time spent runnable but waiting for one, in
/// nanoseconds: from `schedstat`, which the scheduler keeps exactly; else the tick-sampled
/// `utime + stime` of `stat`, and no wait.
fn thread_ns(pid: u32, tid: u32) -> (u64, u64) {
    let task = format!("/proc/{pid}/task/{tid}");
    std::fs::read_to_string(format!("{task}/schedstat"))
        .ok()
        .and_then(|s| {
            let mut fields = s.split_whitespace().map(|f| f.parse().ok());
            Some((fields.next()??, fields.next()??))
        })
        .unwrap_or_else(|| (stat_ns(&format!("{task}/stat")), 0))
}

/// A process's CPU time so far (every thread, live or exited), in nanoseconds.
fn process_ns(pid: u32) -> u64 {
    stat_ns(&format!("/proc/{pid}/stat"))
}

/// `utime + stime` of a `stat` file, in nanoseconds.
fn stat_ns(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    let (Some(user), Some(system)) = (ticks(14), ticks(15)) else {
        return 0;
    };
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (user + system) * 1_000_000_000 / hz
}

/// The whole machine's busy and total CPU time so far (in USER_HZ ticks, every core).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU counters of everything that matters, at one moment.
#[derive(Clone, Copy, Debug)]
pub(super) struct CpuSnapshot {
    pub(super) at: Instant,
    control_ns: u64,
    control_wait_ns: u64,
    proxy_ns: u64,
    harness_ns: u64,
    apiserver_ns: u64,
    etcd_ns: u64,
    machine_busy: u64,
    machine_total: u64,
}

impl CpuSnapshot {
    pub(super) fn take(proxy: &ChurnProxy, apiserver: &ApiServer) -> Self {
        let (machine_busy, machine_total) = machine_ticks();
        let (control_ns, control_wait_ns) = thread_ns(proxy.pid, proxy.control_tid);
        Self {
            at: Instant::now(),
            control_ns,
            control_wait_ns,
            proxy_ns: process_ns(proxy.pid),
            harness_ns: process_ns(std::process::id()),
            apiserver_ns: apiserver.pid("apiserver").map_or(0, process_ns),
            etcd_ns: apiserver.pid("etcd").map_or(0, process_ns),
            machine_busy,
            machine_total,
        }
    }
}

/// Cores used between two snapshots.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cores {
    pub(super) control: f64,
    /// The control thread's time runnable but waiting for a CPU (the machine was busy), as a
    /// share of the span: its latencies include this.
    pub(super) control_wait: f64,
    pub(super) proxy: f64,
    /// This process: the API client writing the patches, the queries, the probes.
    pub(super) harness: f64,
    pub(super) apiserver: f64,
    pub(super) etcd: f64,
    /// Every core of the machine, busy with anything.
    pub(super) machine: f64,
}

impl Cores {
    pub(super) fn between(a: &CpuSnapshot, b: &CpuSnapshot) -> Self {
        let seconds = b.at.duration_since(a.at).as_secs_f64();
        let cores = |x: u64, y: u64| y.saturating_sub(x) as f64 / 1e9 / seconds;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = b.machine_total.saturating_sub(a.machine_total).max(1) as f64;
        Self {
            control: cores(a.control_ns, b.control_ns),
            control_wait: cores(a.control_wait_ns, b.control_wait_ns),
            proxy: cores(a.proxy_ns, b.proxy_ns),
            harness: cores(a.harness_ns, b.harness_ns),
            apiserver: cores(a.apiserver_ns, b.apiserver_ns),
            etcd: cores(a.etcd_ns, b.etcd_ns),
            machine: b.machine_busy.saturating_sub(a.machine_busy) as f64 / total * cpus,
        }
    }
}
