//! `fastpath`: the kernel fast path (SPEC §11) against plain kernel routing and the proxy in
//! user space, on the topology it is built for: a client namespace and a server namespace, each
//! joined to this host by a veth pair, the proxy on this host on the wildcard address. Three
//! contenders, interleaved round by round at each load: the host routing between the
//! namespaces (no proxy), the proxy in user space (a UDP `Forwarder` to the echo server), and
//! the same proxy with `fastPath: {kind: tc}` on both host ends. Reports round trips/s, loss,
//! latency added over routing and the whole machine's CPU per round trip (the program runs in
//! the softirq of whichever core receives), and checks the goals.
//!
//! Root only. What it makes (namespaces, veth pairs, proxies, a scratch directory) goes when it
//! ends, however it ends: drop guards, a Ctrl-C handler, a panic hook (release builds abort on
//! panic), and at start the leftovers of a run that was killed.

mod drive;
mod net;
mod proxy;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};

use crate::echo::Echo;
use crate::load::Report;
use crate::proxy::{ProxyArgs, series};
use net::Topology;
use proxy::Proxy;

/// Arguments of `fastpath`.
#[derive(Debug, clap::Args)]
pub(crate) struct FastPathArgs {
    /// Loads, each CLIENTSxWINDOW (clients, datagrams in flight per client); every round
    /// measures every contender at each.
    #[arg(long, value_delimiter = ',', default_values = ["64x32", "1x1"])]
    pub(crate) shapes: Vec<Load>,
    /// Rounds of (routing, user space, fast path) at each load.
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) seconds: f64,
    /// Seconds of warm-up before each run is measured (sessions set up and offloaded).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup: f64,
    /// Payload bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Load-generator threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Echo server threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) echo_threads: usize,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// Another proxy binary (a build from before the fast path, say) run as a fourth
    /// contender, in user space with the same config: whether user space is unchanged.
    #[arg(long)]
    pub(crate) baseline_bin: Option<PathBuf>,
    /// The proxy's RUST_LOG. Its log goes to a file per run; at any level but `warn` the
    /// files are kept (`debug` says why a session was not offloaded).
    #[arg(long, default_value = "warn")]
    pub(crate) proxy_log: String,
    /// First two octets of the two /24 networks: the client side is PREFIX.1.0/24, the
    /// server side PREFIX.2.0/24 (this host is .1 on both, the namespaces .2).
    #[arg(long, default_value = "10.77")]
    pub(crate) prefix: String,
    /// Checksum offload off on every veth end, as the fast-path tests run.
    #[arg(long)]
    pub(crate) plain_checksums: bool,
}

/// One load: clients, each keeping `window` datagrams in flight.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Load {
    clients: usize,
    window: usize,
}

impl FromStr for Load {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (c, w) = s
            .split_once(['x', 'X', '×'])
            .ok_or_else(|| format!("{s:?} is not CLIENTSxWINDOW"))?;
        let number = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{v:?} in {s:?} is not a positive number"))
        };
        Ok(Self {
            clients: number(c)?,
            window: number(w)?,
        })
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.clients, self.window)
    }
}

/// What carries the datagrams between the namespaces.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Contender {
    /// This host forwarding between the two veth pairs; clients send straight to the echo.
    Routing,
    /// The proxy, a `Forwarder` to the echo, no fast path.
    UserSpace,
    /// The same with `fastPath: {kind: tc}` on both host ends.
    FastPath,
    /// `--baseline-bin` as `UserSpace`.
    Baseline,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::UserSpace => "user space",
            Self::FastPath => "fast path",
            Self::Baseline => "baseline",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::UserSpace => "user-space",
            Self::FastPath => "fast-path",
            Self::Baseline => "baseline",
        }
    }
}

/// Where the load generator's header ends (`client id | sequence | send time`), as in `load`.
const HEADER: usize = 20;
/// The fast path's goals: its added CPU per round trip at most this fraction of user space's,
/// its added p50 at most this many microseconds.
const CPU_GOAL_FRACTION: f64 = 0.2;
const P50_GOAL_MICROS: f64 = 8.0;
/// Other processes using more of a CPU than this (%) during a run make the summary say so.
const OTHERS_NOTE_PERCENT: f64 = 5.0;

pub(crate) fn run(args: &FastPathArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "perf fastpath must run as root: it makes network namespaces and veth pairs, sets \
             forwarding on them, and the proxy attaches a BPF program (CAP_BPF, CAP_NET_ADMIN)"
        );
    }
    if args.size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    if args.shapes.is_empty() || args.rounds == 0 || args.seconds <= 0.0 {
        bail!("nothing to measure: give --shapes, --rounds ≥ 1 and --seconds > 0");
    }
    let bin = proxy_binary(args.proxy.proxy_bin.as_deref())?;
    let baseline = args
        .baseline_bin
        .as_deref()
        .map(|b| proxy_binary(Some(b)))
        .transpose()?;
    net::install_cleanup();
    net::remove_stale();
    let keep_logs = args.proxy_log != "warn";
    let net = Topology::create(&args.prefix, args.plain_checksums, keep_logs)?;
    let echo = net.in_server(|| {
        Ok(Echo::start(
            SocketAddr::new(net.server_ip.into(), 0),
            args.echo_threads,
            None,
        )?)
    })?;
    net.probe(echo.addr)
        .context("plain routing between the namespaces does not work")?;
    println!(
        "topology: clients in {} ({}) via {}, echo in {} on {} via {}; the proxy on {} and {}; \
         load average {}",
        net.client_ns,
        net.client_ip,
        net.client_link,
        net.server_ns,
        echo.addr,
        net.server_link,
        net.client_host_ip,
        net.server_host_ip,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut contenders = vec![
        (Contender::Routing, None),
        (Contender::UserSpace, Some(bin.clone())),
        (Contender::FastPath, Some(bin)),
    ];
    if let Some(b) = baseline {
        contenders.push((Contender::Baseline, Some(b)));
    }
    let mut totals: Vec<Vec<Total>> = args
        .shapes
        .iter()
        .map(|_| contenders.iter().map(|_| Total::default()).collect())
        .collect();
    let mut bench = Bench {
        args,
        net: &net,
        echo: echo.addr,
        seen: BTreeSet::new(),
    };
    for round in 1..=args.rounds {
        for (shape, load) in args.shapes.iter().enumerate() {
            for (i, (contender, bin)) in contenders.iter().enumerate() {
                let outcome = bench.measure(*load, *contender, bin.as_deref(), round)?;
                totals[shape][i].add(outcome)?;
            }
        }
    }
    for (shape, load) in args.shapes.iter().enumerate() {
        let rows: Vec<(Contender, &Total)> = contenders
            .iter()
            .map(|(c, _)| *c)
            .zip(&totals[shape])
            .collect();
        summarize(args, *load, &rows);
    }
    if keep_logs {
        println!("proxy logs kept in {}", net.scratch.display());
    }
    Ok(())
}

/// Where the runs happen: the topology and its echo server, and the proxy's messages
/// printed so far (each is printed once).
#[derive(Debug)]
struct Bench<'a> {
    args: &'a FastPathArgs,
    net: &'a Topology,
    echo: SocketAddr,
    seen: BTreeSet<String>,
}

impl Bench<'_> {
    /// One run of `contender` (with proxy binary `bin`) at `load` in `round`: the proxy
    /// started for it (and stopped after), fresh clients in the client namespace, the
    /// measured period's counts and CPU; printed, and returned.
    fn measure(
        &mut self,
        load: Load,
        contender: Contender,
        bin: Option<&Path>,
        round: usize,
    ) -> anyhow::Result<Outcome> {
        let (args, net, echo) = (self.args, self.net, self.echo);
        let label = format!("{}#{round}", contender.label());
        let proxy = match bin {
            None => None,
            Some(bin) => {
                let fast_path = (contender == Contender::FastPath)
                    .then_some([net.client_link.as_str(), net.server_link.as_str()]);
                let name = format!("{}-{round}-{load}", contender.slug());
                let p = Proxy::start(bin, args, net, &name, echo, fast_path)?;
                if contender == Contender::FastPath {
                    let enabled = p
                        .metrics()
                        .and_then(|m| series(&m, "udp_director_fastpath_enabled"));
                    if enabled != Some(1.0) {
                        bail!(
                            "the fast path is not on (udp_director_fastpath_enabled {}); the proxy's log:\n{}",
                            enabled.map_or("absent".into(), |v| v.to_string()),
                            p.log_tail(40)
                        );
                    }
                }
                Some(p)
            }
        };
        let target = proxy.as_ref().map_or(echo, |p| p.listen);
        let sockets = net.in_client(|| {
            let mut all = Vec::with_capacity(load.clients);
            for _ in 0..load.clients {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                s.connect(target)?;
                s.set_nonblocking(true)?;
                all.push(s);
            }
            Ok(all)
        })?;
        let outcome = drive::drive_all(sockets, load, args, proxy.as_ref(), &label)?;
        print_run(&label, contender, load, args, &outcome);
        if let Some(p) = &proxy {
            p.print_problems(&mut self.seen);
        }
        Ok(outcome)
    }
}

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    report: Report,
    machine_cpu_seconds: f64,
    /// What the machine spent beside this process and the proxy: others' load (at most; the
    /// kernel charges softirq work to the task it interrupts, so a little of ours may be in).
    others_cpu_seconds: f64,
    /// Of the machine's, irq + softirq time (the kernel's forwarding, fast path or not).
    interrupts_cpu_seconds: f64,
    /// This process's (the load generator and the echo server, with the softirq work done
    /// on their time).
    own_cpu_seconds: f64,
    /// Upstream datagrams of the measured period by who forwarded them (proxy runs only).
    carried: Option<Carried>,
}

/// Upstream datagrams forwarded by the kernel and by user space, and the offloaded sessions
/// at the end.
#[derive(Clone, Copy, Debug, Default)]
struct Carried {
    kernel: f64,
    user: f64,
    offloaded_sessions: f64,
}

impl Outcome {
    /// Other processes' CPU in % of one CPU over the measured period.
    fn others_percent(&self) -> f64 {
        100.0 * self.others_cpu_seconds.max(0.0) / self.report.seconds.max(1e-9)
    }

    /// CPU µs per round trip of `seconds`.
    fn per_round_trip(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.report.round_trips.max(1) as f64
    }
}

impl Carried {
    fn kernel_share(&self) -> f64 {
        100.0 * self.kernel / (self.kernel + self.user).max(1.0)
    }
}

/// One contender's runs at one load, added up.
#[derive(Debug, Default)]
struct Total {
    report: Option<Report>,
    machine_cpu_seconds: f64,
    /// The most other processes used in one of the runs, in % of a CPU.
    others_max_percent: f64,
    carried: Option<Carried>,
}

impl Total {
    fn add(&mut self, o: Outcome) -> anyhow::Result<()> {
        self.machine_cpu_seconds += o.machine_cpu_seconds;
        self.others_max_percent = self.others_max_percent.max(o.others_percent());
        match &mut self.report {
            None => self.report = Some(o.report),
            Some(r) => r.append(&o.report)?,
        }
        if let Some(c) = o.carried {
            let t = self.carried.get_or_insert_with(Carried::default);
            t.kernel += c.kernel;
            t.user += c.user;
            t.offloaded_sessions = c.offloaded_sessions;
        }
        Ok(())
    }
}

/// Figures of a report, in the table's units.
#[derive(Clone, Copy, Debug)]
struct Figures {
    rate: f64,
    loss: f64,
    p50: f64,
    p99: f64,
    /// Machine CPU µs per round trip.
    cpu: f64,
    /// The proxy's own CPU µs per round trip.
    proxy_cpu: Option<f64>,
}

impl Figures {
    fn of(r: &Report, machine_cpu_seconds: f64) -> Self {
        let us = |q: f64| r.histogram.value_at_quantile(q) as f64 / 1000.0;
        let per_rt = |cpu: f64| cpu * 1e6 / r.round_trips.max(1) as f64;
        Self {
            rate: r.round_trips as f64 / r.seconds,
            loss: 100.0 * r.sent.saturating_sub(r.round_trips) as f64 / r.sent.max(1) as f64,
            p50: us(0.5),
            p99: us(0.99),
            cpu: per_rt(machine_cpu_seconds),
            proxy_cpu: r.proxy_cpu_seconds.map(per_rt),
        }
    }
}

fn print_run(label: &str, contender: Contender, load: Load, args: &FastPathArgs, o: &Outcome) {
    let f = Figures::of(&o.report, o.machine_cpu_seconds);
    let proxy = f
        .proxy_cpu
        .map_or(String::new(), |p| format!("  proxy {p:.2} µs/rt"));
    let carried = o.carried.map_or(String::new(), |c| {
        format!(
            "  kernel carried {:.2}% upstream ({:.0} of {:.0})",
            c.kernel_share(),
            c.kernel,
            c.kernel + c.user
        ) + &if contender == Contender::FastPath {
            format!(
                ", {:.0} of {} sessions offloaded (the clients' and the readiness probe's)",
                c.offloaded_sessions,
                load.clients + 1
            )
        } else {
            String::new()
        }
    });
    println!(
        "{label:<13} {load:>6}: {:>9.0} rt/s  loss {:>6.3}%  misdelivered {}  p50 {:.1} µs  p99 {:.1}  \
         machine {:.2} µs/rt (irq+softirq {:.2}; others {:.0}% of a CPU){proxy}{carried}",
        f.rate,
        f.loss,
        o.report.misdelivered,
        f.p50,
        f.p99,
        f.cpu,
        o.per_round_trip(o.interrupts_cpu_seconds),
        o.others_percent()
    );
    println!(
        "{}",
        serde_json::json!({
            "run": label, "contender": contender.label(), "clients": load.clients,
            "window": load.window, "size": args.size, "seconds": o.report.seconds,
            "round_trips": o.report.round_trips, "sent": o.report.sent,
            "round_trips_per_second": f.rate, "loss_percent": f.loss,
            "misdelivered": o.report.misdelivered, "p50_us": f.p50, "p99_us": f.p99,
            "machine_cpu_seconds": o.machine_cpu_seconds, "machine_cpu_us_per_round_trip": f.cpu,
            "other_processes_cpu_percent": o.others_percent(),
            "interrupts_cpu_us_per_round_trip": o.per_round_trip(o.interrupts_cpu_seconds),
            "load_and_echo_cpu_us_per_round_trip": o.per_round_trip(o.own_cpu_seconds),
            "proxy_cpu_seconds": o.report.proxy_cpu_seconds, "proxy_cpu_us_per_round_trip": f.proxy_cpu,
            "kernel_upstream": o.carried.map(|c| c.kernel), "user_upstream": o.carried.map(|c| c.user),
            "kernel_percent": o.carried.map(|c| c.kernel_share()),
        })
    );
}

fn summarize(args: &FastPathArgs, load: Load, rows: &[(Contender, &Total)]) {
    let figures: Vec<(Contender, Figures, &Total)> = rows
        .iter()
        .filter_map(|(c, t)| {
            let r = t.report.as_ref()?;
            Some((*c, Figures::of(r, t.machine_cpu_seconds), *t))
        })
        .collect();
    let find = |want: Contender| figures.iter().find(|(c, _, _)| *c == want).map(|f| f.1);
    let Some(routing) = find(Contender::Routing) else {
        return;
    };
    println!(
        "\nsummary: {} clients x {} in flight, {} B, {} rounds of {} s\n{:<12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
        load.clients,
        load.window,
        args.size,
        args.rounds,
        args.seconds,
        "",
        "rt/s",
        "loss %",
        "p50 µs",
        "p99 µs",
        "+p50 µs",
        "+p99 µs",
        "CPU µs/rt",
        "+CPU µs",
        "proxy µs",
        "kernel %"
    );
    for (c, f, t) in &figures {
        println!(
            "{:<12} {:>10.0} {:>7.3} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.2} {:>9.2} {:>9} {:>8}",
            c.label(),
            f.rate,
            f.loss,
            f.p50,
            f.p99,
            f.p50 - routing.p50,
            f.p99 - routing.p99,
            f.cpu,
            f.cpu - routing.cpu,
            f.proxy_cpu.map_or("-".into(), |p| format!("{p:.2}")),
            t.carried
                .map_or("-".into(), |k| format!("{:.2}", k.kernel_share()))
        );
    }
    for (c, f, t) in &figures {
        println!(
            "{}",
            serde_json::json!({
                "summary": c.label(), "clients": load.clients, "window": load.window,
                "size": args.size, "rounds": args.rounds, "seconds": args.seconds,
                "round_trips_per_second": f.rate, "loss_percent": f.loss,
                "p50_us": f.p50, "p99_us": f.p99,
                "added_p50_us": f.p50 - routing.p50, "added_p99_us": f.p99 - routing.p99,
                "machine_cpu_us_per_round_trip": f.cpu,
                "added_cpu_us_per_round_trip": f.cpu - routing.cpu,
                "proxy_cpu_us_per_round_trip": f.proxy_cpu,
                "kernel_percent": t.carried.map(|k| k.kernel_share()),
            })
        );
    }
    let busiest = figures
        .iter()
        .map(|(_, _, t)| t.others_max_percent)
        .fold(0.0, f64::max);
    if busiest > OTHERS_NOTE_PERCENT {
        println!(
            "note: other processes used up to {busiest:.0}% of a CPU during a run at {load}: the machine was busy and these figures are disturbed"
        );
    }
    let (Some(user), Some(fast)) = (find(Contender::UserSpace), find(Contender::FastPath)) else {
        return;
    };
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let (user_added, fast_added) = (user.cpu - routing.cpu, fast.cpu - routing.cpu);
    let cpu_limit = user_added * CPU_GOAL_FRACTION;
    println!(
        "goal at {load}: fast path's added CPU {fast_added:.2} µs/rt ≤ user space's {user_added:.2} / 5 = {cpu_limit:.2}: {}",
        met(fast_added <= cpu_limit)
    );
    let fast_p50 = fast.p50 - routing.p50;
    let in_flight = load.clients * load.window;
    println!(
        "goal at {load}: fast path's added p50 {fast_p50:.1} µs ≤ {P50_GOAL_MICROS} µs: {}{}",
        met(fast_p50 <= P50_GOAL_MICROS),
        if in_flight > 1 {
            // Little's law: with the window always full, latency is in flight / rate.
            format!(
                " (with {in_flight} in flight, latency is mostly queueing: in flight / rate is \
                 {:.0} µs for routing, {:.0} for the fast path)",
                in_flight as f64 * 1e6 / routing.rate.max(1.0),
                in_flight as f64 * 1e6 / fast.rate.max(1.0)
            )
        } else {
            String::new()
        }
    );
    if let Some(base) = find(Contender::Baseline) {
        println!(
            "user space against the baseline at {load}: rt/s {:+.1}%, p50 {:+.1} µs, CPU {:+.2} µs/rt, proxy CPU {}",
            100.0 * (user.rate / base.rate.max(1e-9) - 1.0),
            user.p50 - base.p50,
            user.cpu - base.cpu,
            user.proxy_cpu
                .zip(base.proxy_cpu)
                .map_or("-".into(), |(u, b)| format!("{:+.2} µs/rt", u - b))
        );
    }
}

/// What was sampled at the start and at the end of the measured period.
#[derive(Clone, Copy, Debug)]
struct Sample {
    machine: MachineCpu,
    /// This process's CPU (load generator and echo server).
    own_cpu_seconds: f64,
    proxy_cpu_seconds: Option<f64>,
    counters: Option<Carried>,
}

fn sample(proxy: Option<&Proxy>) -> Sample {
    Sample {
        machine: MachineCpu::read(),
        own_cpu_seconds: own_cpu_seconds(),
        proxy_cpu_seconds: proxy.and_then(|p| crate::load::cpu_seconds(p.pid)),
        counters: proxy.and_then(|p| {
            let m = p.metrics()?;
            Some(Carried {
                kernel: series(
                    &m,
                    r#"udp_director_fastpath_packets_total{direction="upstream"}"#,
                )
                .unwrap_or(0.0),
                user: series(
                    &m,
                    r#"udp_director_packets_total{direction="upstream",protocol="udp"}"#,
                )
                .unwrap_or(0.0),
                offloaded_sessions: series(&m, "udp_director_fastpath_sessions").unwrap_or(0.0),
            })
        }),
    }
}

/// The whole machine's CPU seconds so far, all CPUs, from /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
struct MachineCpu {
    /// Everything but idle and iowait: user, nice, system, irq, softirq, steal.
    busy: f64,
    /// Of which irq and softirq (where the fast path runs).
    interrupts: f64,
}

impl MachineCpu {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
            return Self::default();
        };
        let f: Vec<f64> = cpu
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        let field = |i: usize| f.get(i).copied().unwrap_or(0.0) / clock_ticks();
        // user nice system idle iowait irq softirq steal (guest time is inside user already).
        Self {
            busy: field(0) + field(1) + field(2) + field(5) + field(6) + field(7),
            interrupts: field(5) + field(6),
        }
    }
}

/// This process's CPU seconds, all threads (user + system).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name: state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rfind(')')
        .map_or("", |at| &stat[at + 1..])
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64
}

/// The proxy binary: `given`, else `udp-director` beside this binary.
fn proxy_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name("udp-director"),
    };
    if !path.exists() {
        bail!(
            "no proxy binary at {} (build it: cargo build --release -p udp-director; or pass --proxy-bin)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_parse_as_clients_by_window() {
        assert_eq!(
            "64x32".parse::<Load>(),
            Ok(Load {
                clients: 64,
                window: 32
            })
        );
        assert_eq!(
            "1×1".parse::<Load>().map(|l| l.to_string()),
            Ok("1x1".into())
        );
        assert!("64".parse::<Load>().is_err());
        assert!("0x4".parse::<Load>().is_err());
    }

    #[test]
    fn a_series_is_read_by_its_exact_name() {
        let text = "udp_director_fastpath_enabled 1\n\
                    udp_director_fastpath_packets_total{direction=\"upstream\"} 12\n\
                    udp_director_fastpath_packets_total{direction=\"downstream\"} 11\n";
        assert_eq!(series(text, "udp_director_fastpath_enabled"), Some(1.0));
        assert_eq!(
            series(
                text,
                r#"udp_director_fastpath_packets_total{direction="downstream"}"#
            ),
            Some(11.0)
        );
        assert_eq!(series(text, "udp_director_fastpath"), None);
    }
}
