//! `listeners`: what idle listeners cost. N UDP `Forwarder`s from the inventory file, all to
//! one echo server, on N free ports; reports the time from the proxy's start until all are
//! open (or refused: the descriptor budget refuses listeners past it), the proxy's RSS,
//! virtual size, open descriptors and CPU while idle (naming its busiest threads) against the
//! same proxy with none, and round trips through the first and the last forwarder, interleaved,
//! so a listener's place among many shows in its latency if it costs anything.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::echo::Echo;
use crate::proxy::{ProxyArgs, ProxyProcess, Server, status_kib};

#[derive(Debug, clap::Args)]
pub(crate) struct ListenersArgs {
    /// UDP forwarders to open.
    #[arg(long, default_value_t = 1000)]
    pub(crate) count: usize,
    /// Proxy worker threads (default: the proxy's own, one per core).
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// Proxy binary (default: udp-director beside this binary).
    #[arg(long)]
    pub(crate) proxy_bin: Option<std::path::PathBuf>,
    /// The forwarders listen on the first `count` ports from here that are free on
    /// 127.0.0.1 (below the usual ephemeral range, so nothing takes one meanwhile).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) first_port: u16,
    /// Seconds over which the proxy's idle CPU is measured.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) idle_seconds: f64,
    /// Round trips through each of the first and the last forwarder.
    #[arg(long, default_value_t = 500)]
    pub(crate) round_trips: usize,
    /// Seconds to wait for every forwarder to open or be refused.
    #[arg(long, default_value_t = 300.0)]
    pub(crate) open_timeout: f64,
}

/// The proxy's footprint at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Footprint {
    rss_kib: u64,
    vm_kib: u64,
    fds: u64,
}

impl Footprint {
    fn of(pid: u32) -> Self {
        Self {
            rss_kib: status_kib(pid, "VmRSS").unwrap_or(0),
            vm_kib: status_kib(pid, "VmSize").unwrap_or(0),
            fds: crate::soak::open_fds(pid),
        }
    }
}

pub(crate) fn run(args: &ListenersArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let echo = Echo::start("127.0.0.1:0".parse()?, 1, None)?;
    let servers = [Server {
        name: "echo",
        addr: echo.addr,
    }];
    let proxy_args = ProxyArgs {
        proxy_bin: args.proxy_bin.clone(),
        proxy_workers: args.workers,
    };
    let extra = "forwarders: {namespace: perf}\n";
    // The same proxy with no forwarder: what the listeners add is measured against it.
    let empty = proxy_args.start_with_objects(&servers, extra, "")?;
    std::thread::sleep(Duration::from_millis(500));
    let workers = worker_threads(empty.pid);
    let before = Footprint::of(empty.pid);
    let idle_before = idle_cpu(empty.pid, Duration::from_secs_f64(args.idle_seconds));
    drop(empty);

    let ports = free_ports(args.first_port, args.count)?;
    let objects: String = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                "- {{apiVersion: udp-director.dev/v1alpha1, kind: Forwarder, metadata: {{name: f{i}, namespace: perf}}, \
                 spec: {{udp: {{listenPort: {port}, targetHost: \"{}\", targetPort: {}}}}}}}\n",
                echo.addr.ip(),
                echo.addr.port()
            )
        })
        .collect();
    let started = Instant::now();
    let proxy = proxy_args.start_with_objects(&servers, extra, &objects)?;
    let settled = wait_open(
        &proxy,
        args.count,
        Duration::from_secs_f64(args.open_timeout),
    )?;
    let open_seconds = started.elapsed().as_secs_f64();
    let opened = settled.ready.len();
    // Let anything the opening left behind (allocations, status writes) settle first.
    std::thread::sleep(Duration::from_secs(1));
    let after = Footprint::of(proxy.pid);
    let idle = idle_cpu(proxy.pid, Duration::from_secs_f64(args.idle_seconds));

    let port_of = |name: &str| -> Option<u16> {
        let i: usize = name.strip_prefix('f')?.parse().ok()?;
        ports.get(i).copied()
    };
    // The first and the last forwarder that opened, in inventory order.
    let mut indexes: Vec<usize> = settled
        .ready
        .iter()
        .filter_map(|n| n.strip_prefix('f')?.parse().ok())
        .collect();
    indexes.sort_unstable();
    let (first, last) = match (indexes.first(), indexes.last()) {
        (Some(&a), Some(&b)) => (
            port_of(&format!("f{a}")).context("first port")?,
            port_of(&format!("f{b}")).context("last port")?,
        ),
        _ => bail!("no forwarder opened: {:?}", settled.refused_message),
    };
    let trips = round_trips(first, last, args.round_trips)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    // What the listeners added, all of it: control's share (each forwarder's object, its
    // view, its counters) as well as the workers'. Runs at two worker counts tell them apart.
    let added_rss = after.rss_kib.saturating_sub(before.rss_kib) * 1024;
    let per_listener = added_rss as f64 / opened.max(1) as f64;
    let per_listener_worker = per_listener / workers.max(1) as f64;
    // NaN (null in the JSON) for a forwarder that never answered.
    let us = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            f64::NAN
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    println!(
        "{} UDP forwarders, {workers} workers: {opened} open ({} refused) in {open_seconds:.2} s; \
         RSS {:.1} MiB ({:.1} with none: {per_listener:.0} B per listener, at most \
         {per_listener_worker:.0} per listener per worker), \
         virtual {:.0} MiB, {} fds; idle CPU {:.2} % of a core ({}; {:.2} % with none); \
         round trips p50/p99: \
         first {:.1}/{:.1} µs, last {:.1}/{:.1} µs, {} lost",
        args.count,
        args.count - opened,
        mib(after.rss_kib),
        mib(before.rss_kib),
        mib(after.vm_kib),
        after.fds,
        idle.percent,
        idle.busiest
            .iter()
            .map(|(name, p)| format!("{name} {p:.2} %"))
            .collect::<Vec<_>>()
            .join(", "),
        idle_before.percent,
        us(&trips.first, 0.5),
        us(&trips.first, 0.99),
        us(&trips.last, 0.5),
        us(&trips.last, 0.99),
        trips.lost,
    );
    if let Some(message) = &settled.refused_message {
        println!("a refused forwarder says: {message}");
    }
    for port in &trips.silent {
        println!("no answer through the forwarder on {port}: no round trips through it");
    }
    println!(
        "{}",
        serde_json::json!({
            "summary": "listeners",
            "count": args.count,
            "workers": workers,
            "opened": opened,
            "refused": args.count - opened,
            "open_seconds": open_seconds,
            "rss_kib": after.rss_kib,
            "rss_kib_without_listeners": before.rss_kib,
            "rss_bytes_per_listener": per_listener,
            "rss_bytes_per_listener_per_worker": per_listener_worker,
            "vm_size_kib": after.vm_kib,
            "vm_size_kib_without_listeners": before.vm_kib,
            "fds": after.fds,
            "fds_without_listeners": before.fds,
            "idle_cpu_percent": idle.percent,
            "idle_cpu_percent_without_listeners": idle_before.percent,
            "idle_cpu_busiest_threads": idle.busiest
                .iter()
                .map(|(name, p)| serde_json::json!({"thread": name, "percent": p}))
                .collect::<Vec<_>>(),
            "first_p50_us": us(&trips.first, 0.5),
            "first_p99_us": us(&trips.first, 0.99),
            "last_p50_us": us(&trips.last, 0.5),
            "last_p99_us": us(&trips.last, 0.99),
            "round_trips": trips.first.len() + trips.last.len(),
            "lost": trips.lost,
            "silent_ports": trips.silent,
        })
    );
    Ok(())
}

/// The first `count` ports from `from` that this process can bind on 127.0.0.1 (UDP) now.
fn free_ports(from: u16, count: usize) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(count);
    for port in from..=u16::MAX {
        if ports.len() == count {
            break;
        }
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    if ports.len() < count {
        bail!("only {} free UDP ports from {from}", ports.len());
    }
    Ok(ports)
}

/// The forwarders `GET /forwarders` lists as ready, once every one is ready or refused.
#[derive(Debug, Default)]
struct Settled {
    ready: Vec<String>,
    /// What one refused forwarder's status says.
    refused_message: Option<String>,
}

/// Polls `GET /forwarders` until all `count` forwarders are listed and each is ready or
/// says what is wrong, and that stays so for a second.
fn wait_open(proxy: &ProxyProcess, count: usize, timeout: Duration) -> anyhow::Result<Settled> {
    let deadline = Instant::now() + timeout;
    let mut last = (usize::MAX, usize::MAX);
    let mut steady_since = Instant::now();
    loop {
        let list = crate::soak::http_get(proxy.admin, "/forwarders")
            .and_then(|r| Some(r.split_once("\r\n\r\n")?.1.to_owned()))
            .and_then(|body| serde_json::from_str::<Vec<serde_json::Value>>(&body).ok())
            .unwrap_or_default();
        let ready: Vec<String> = list
            .iter()
            .filter(|f| f["ready"] == true)
            .filter_map(|f| f["name"].as_str().map(str::to_owned))
            .collect();
        let refused: Vec<&serde_json::Value> = list
            .iter()
            .filter(|f| f["ready"] != true && f["message"].as_str().is_some_and(|m| !m.is_empty()))
            .collect();
        let state = (ready.len(), refused.len());
        if state != last {
            last = state;
            steady_since = Instant::now();
        }
        let done = ready.len() == count
            || (ready.len() + refused.len() == count
                && steady_since.elapsed() >= Duration::from_secs(1));
        if done {
            return Ok(Settled {
                ready,
                refused_message: refused
                    .first()
                    .and_then(|f| f["message"].as_str().map(str::to_owned)),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "after {timeout:?}: {} of {count} forwarders listed, {} ready, {} refused",
                list.len(),
                ready.len(),
                refused.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The proxy's `dp-worker-*` threads.
fn worker_threads(pid: u32) -> usize {
    threads(pid)
        .iter()
        .filter(|t| t.name.starts_with("dp-worker"))
        .count()
}

/// One thread of the proxy at one moment.
#[derive(Debug)]
struct Thread {
    tid: u32,
    name: String,
    /// Time on a CPU so far, in nanoseconds.
    ns: u64,
}

/// Every thread of `pid`. CPU time from `schedstat`, which the scheduler keeps exactly: the
/// tick-sampled `utime`/`stime` of `stat` miss short bursts that start on a timer tick, which
/// is what an idle loop's wake-ups are.
fn threads(pid: u32) -> Vec<Thread> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let sched = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some(Thread {
                tid,
                name: name.trim_end().to_owned(),
                ns: sched.split_whitespace().next()?.parse().ok()?,
            })
        })
        .collect()
}

/// The proxy's CPU over a quiet `span`.
#[derive(Debug)]
struct IdleCpu {
    /// Per cent of one core, every thread together.
    percent: f64,
    /// The threads that used any, busiest first (at most three), by name.
    busiest: Vec<(String, f64)>,
}

fn idle_cpu(pid: u32, span: Duration) -> IdleCpu {
    let start = threads(pid);
    let began = Instant::now();
    std::thread::sleep(span);
    let end = threads(pid);
    let seconds = began.elapsed().as_secs_f64();
    let percent = |ns: u64| ns as f64 / 1e9 / seconds * 100.0;
    let mut used: Vec<(String, u64)> = end
        .iter()
        .map(|t| {
            let was = start.iter().find(|s| s.tid == t.tid).map_or(0, |s| s.ns);
            (t.name.clone(), t.ns.saturating_sub(was))
        })
        .filter(|(_, ns)| *ns > 0)
        .collect();
    used.sort_by_key(|(_, ns)| std::cmp::Reverse(*ns));
    let total = used.iter().map(|(_, ns)| ns).sum();
    IdleCpu {
        percent: percent(total),
        busiest: used
            .into_iter()
            .take(3)
            .map(|(name, ns)| (name, percent(ns)))
            .collect(),
    }
}

/// Round trips through two forwarders.
#[derive(Debug)]
struct Trips {
    first: Histogram<u64>,
    last: Histogram<u64>,
    lost: u64,
    /// Forwarders that did not answer at all (e.g. no descriptor left for a session's upstream
    /// socket), so none were timed through them.
    silent: Vec<u16>,
}

/// `count` round trips through each of the forwarders on `first` and `last`, taking turns,
/// after one each that opens their sessions (a forwarder that answers none of three is left
/// out).
fn round_trips(first: u16, last: u16, count: usize) -> anyhow::Result<Trips> {
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut trips = Trips {
        first: Histogram::new(3)?,
        last: Histogram::new(3)?,
        lost: 0,
        silent: Vec::new(),
    };
    let mut buf = [0u8; 64];
    let mut seq = 0u64;
    let mut trip = |port: u16| -> anyhow::Result<Option<u64>> {
        seq += 1;
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let began = Instant::now();
        client.send_to(&seq.to_be_bytes(), to)?;
        loop {
            match client.recv_from(&mut buf) {
                Ok((8, _)) if buf[..8] == seq.to_be_bytes() => {
                    return Ok(Some(began.elapsed().as_nanos() as u64));
                }
                // A late reply to an earlier, lost datagram.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    for port in [first, last] {
        let mut answered = false;
        for _ in 0..3 {
            if trip(port)?.is_some() {
                answered = true;
                break;
            }
        }
        if !answered {
            trips.silent.push(port);
        }
    }
    for _ in 0..count {
        for (port, h) in [(first, &mut trips.first), (last, &mut trips.last)] {
            if trips.silent.contains(&port) {
                continue;
            }
            match trip(port)? {
                Some(ns) => h.record(ns.max(1))?,
                None => trips.lost += 1,
            }
        }
    }
    Ok(trips)
}
