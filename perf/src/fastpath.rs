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

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::echo::Echo;
use crate::load::Report;
use crate::proxy::ProxyArgs;

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
/// A client with replies missing for this long refills its window (the rest count as lost).
const STALL: Duration = Duration::from_millis(200);
/// Replies still arriving after a run's end are received (not counted) for this long.
const GRACE: Duration = Duration::from_millis(300);
/// The fast path's goals: its added CPU per round trip at most this fraction of user space's,
/// its added p50 at most this many microseconds.
const CPU_GOAL_FRACTION: f64 = 0.2;
const P50_GOAL_MICROS: f64 = 8.0;
/// Names of what a run makes start with these, followed by its pid.
const NS_PREFIX: &str = "udfp-";
const LINK_PREFIXES: [&str; 2] = ["udfc", "udfs"];

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
    install_cleanup();
    remove_stale();
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
        let outcome = drive_all(sockets, load, args, proxy.as_ref(), &label)?;
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
    carried: Option<Carried>,
}

impl Total {
    fn add(&mut self, o: Outcome) -> anyhow::Result<()> {
        match &mut self.report {
            None => self.report = Some(o.report),
            Some(r) => r.append(&o.report)?,
        }
        self.machine_cpu_seconds += o.machine_cpu_seconds;
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
         machine {:.2} µs/rt{proxy}{carried}",
        f.rate, f.loss, o.report.misdelivered, f.p50, f.p99, f.cpu
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
    machine_cpu_seconds: f64,
    proxy_cpu_seconds: Option<f64>,
    counters: Option<Carried>,
}

fn sample(proxy: Option<&Proxy>) -> Sample {
    Sample {
        machine_cpu_seconds: machine_cpu_seconds(),
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

/// Busy CPU seconds of the whole machine, all CPUs (user, nice, system, irq, softirq, steal:
/// everything but idle and iowait), from /proc/stat.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A client of the load generator, as in `load`.
#[derive(Debug)]
struct Client {
    id: u32,
    socket: UdpSocket,
    seq: u64,
    in_flight: usize,
    last_reply: Instant,
}

/// Runs the load over `sockets` (already connected to the target): warm-up, the measured
/// period with the machine's and the proxy's CPU and counters sampled at its edges, and a
/// grace period for late replies.
fn drive_all(
    sockets: Vec<UdpSocket>,
    load: Load,
    args: &FastPathArgs,
    proxy: Option<&Proxy>,
    label: &str,
) -> anyhow::Result<Outcome> {
    let threads = args.threads.clamp(1, load.clients);
    let mut groups: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
    let now = Instant::now();
    for (i, socket) in sockets.into_iter().enumerate() {
        groups[i % threads].push(Client {
            id: i as u32,
            socket,
            seq: 0,
            in_flight: 0,
            last_reply: now,
        });
    }
    let measure_from = now + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let (edges, parts) = std::thread::scope(|s| {
        let edges = s.spawn(move || {
            std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
            let before = sample(proxy);
            if args.seconds >= 5.0 {
                while Instant::now() + Duration::from_secs(1) < end {
                    std::thread::sleep(Duration::from_secs(1));
                    let done = Instant::now().saturating_duration_since(measure_from);
                    eprint!(
                        "\r{label}: {:.0}/{:.0} s ",
                        done.as_secs_f64(),
                        args.seconds
                    );
                }
                eprint!("\r{:60}\r", "");
            }
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            (before, sample(proxy))
        });
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| s.spawn(move || drive(g, load, args.size, measure_from, end)))
            .collect();
        let parts: Vec<anyhow::Result<Report>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a load thread panicked")))
            .collect();
        (edges.join(), parts)
    });
    let Ok((before, after)) = edges else {
        bail!("the sampling thread panicked");
    };
    let mut report = Report {
        round_trips: 0,
        sent: 0,
        misdelivered: 0,
        seconds: args.seconds,
        proxy_cpu_seconds: None,
        histogram: Histogram::new(3)?,
    };
    for part in parts {
        // Parts are threads of this run: their counts add, their time does not (it is 0).
        report.append(&part?)?;
    }
    report.proxy_cpu_seconds = before
        .proxy_cpu_seconds
        .zip(after.proxy_cpu_seconds)
        .map(|(a, b)| b - a);
    let carried = before.counters.zip(after.counters).map(|(a, b)| Carried {
        kernel: b.kernel - a.kernel,
        user: b.user - a.user,
        offloaded_sessions: b.offloaded_sessions,
    });
    Ok(Outcome {
        report,
        machine_cpu_seconds: after.machine_cpu_seconds - before.machine_cpu_seconds,
        carried,
    })
}

/// The load generator's loop, as `load` runs it: keeps every client's window full, counts
/// and times the replies to datagrams sent in the measured period.
fn drive(
    mut clients: Vec<Client>,
    load: Load,
    size: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Report> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let (mut round_trips, mut sent, mut misdelivered) = (0u64, 0u64, 0u64);
    let mut out = vec![0u8; size];
    let mut buf = vec![0u8; 65536];
    let epoch = Instant::now();
    let mut fds: Vec<libc::pollfd> = clients
        .iter()
        .map(|c| libc::pollfd {
            fd: c.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let grace_end = end + GRACE;
    loop {
        let now = Instant::now();
        if now >= grace_end {
            break;
        }
        let measuring = now >= measure_from && now < end;
        if now < end {
            for c in &mut clients {
                if c.in_flight > 0 && now.duration_since(c.last_reply) > STALL {
                    c.in_flight = 0; // presumed lost
                    c.last_reply = now;
                }
                while c.in_flight < load.window {
                    out[..4].copy_from_slice(&c.id.to_be_bytes());
                    out[4..12].copy_from_slice(&c.seq.to_be_bytes());
                    let t = epoch.elapsed().as_nanos() as u64;
                    out[12..20].copy_from_slice(&t.to_be_bytes());
                    if c.socket.send(&out).is_err() {
                        break;
                    }
                    c.seq += 1;
                    c.in_flight += 1;
                    if measuring {
                        sent += 1;
                    }
                }
            }
        }
        // SAFETY: `fds` is a live array of pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
        if ready <= 0 {
            continue;
        }
        for (c, fd) in clients.iter_mut().zip(&fds) {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            while let Ok(n) = c.socket.recv(&mut buf) {
                let now = Instant::now();
                c.last_reply = now;
                c.in_flight = c.in_flight.saturating_sub(1);
                if n < HEADER || buf[..4] != c.id.to_be_bytes() {
                    misdelivered += 1;
                    continue;
                }
                let sent_at = u64::from_be_bytes(buf[12..20].try_into().unwrap_or_default());
                let sent_instant = epoch + Duration::from_nanos(sent_at);
                if sent_instant >= measure_from && sent_instant < end {
                    round_trips += 1;
                    let rtt = now.duration_since(sent_instant).as_nanos() as u64;
                    let _ = histogram.record(rtt.max(1));
                }
            }
        }
    }
    Ok(Report {
        round_trips,
        sent,
        misdelivered,
        seconds: 0.0,
        proxy_cpu_seconds: None,
        histogram,
    })
}

/// The value of one series (exact name with labels) in a `/metrics` text.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
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

/// The two namespaces around this host, with this run's scratch directory; removed on drop.
#[derive(Debug)]
struct Topology {
    client_ns: String,
    server_ns: String,
    /// This host's ends of the pairs (where the fast path attaches).
    client_link: String,
    server_link: String,
    client_ip: Ipv4Addr,
    client_host_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    server_host_ip: Ipv4Addr,
    scratch: PathBuf,
    keep_scratch: bool,
}

impl Topology {
    /// Makes both namespaces and pairs, routes between them through this host, and turns
    /// forwarding on for the two host ends only.
    fn create(prefix: &str, plain_checksums: bool, keep_scratch: bool) -> anyhow::Result<Self> {
        let octets: Vec<u8> = prefix
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()
            .filter(|o: &Vec<u8>| o.len() == 2)
            .with_context(|| format!("--prefix {prefix:?} is not two octets (like 10.77)"))?;
        let net = |third: u8, last: u8| Ipv4Addr::new(octets[0], octets[1], third, last);
        for third in [1, 2] {
            let subnet = format!("{}/24", net(third, 0));
            let used = output("ip", &["-o", "-4", "addr", "show", "to", &subnet])?;
            if !used.trim().is_empty() {
                bail!(
                    "{subnet} is already on this host (another perf fastpath running?); pass another --prefix:\n{used}"
                );
            }
        }
        let pid = std::process::id();
        let scratch = std::env::temp_dir().join(format!("udp-director-perf-fastpath-{pid}"));
        let t = Self {
            client_ns: format!("{NS_PREFIX}{pid}-c"),
            server_ns: format!("{NS_PREFIX}{pid}-s"),
            client_link: format!("{}{pid}", LINK_PREFIXES[0]),
            server_link: format!("{}{pid}", LINK_PREFIXES[1]),
            client_ip: net(1, 2),
            client_host_ip: net(1, 1),
            server_ip: net(2, 2),
            server_host_ip: net(2, 1),
            scratch,
            keep_scratch,
        };
        std::fs::create_dir_all(&t.scratch)?;
        {
            let mut l = leftovers();
            l.namespaces
                .extend([t.client_ns.clone(), t.server_ns.clone()]);
            l.links
                .extend([t.client_link.clone(), t.server_link.clone()]);
            if !keep_scratch {
                l.dirs.push(t.scratch.clone());
            }
        }
        t.join(
            &t.client_ns,
            &t.client_link,
            t.client_host_ip,
            t.client_ip,
            net(2, 0),
        )?;
        t.join(
            &t.server_ns,
            &t.server_link,
            t.server_host_ip,
            t.server_ip,
            net(1, 0),
        )?;
        if plain_checksums {
            for (ns, link) in [
                (&t.client_ns, &t.client_link),
                (&t.server_ns, &t.server_link),
            ] {
                run_cmd("ethtool", &["-K", link, "tx", "off", "rx", "off"])?;
                let inner = format!("{link}n");
                run_cmd(
                    "ip",
                    &[
                        "netns", "exec", ns, "ethtool", "-K", &inner, "tx", "off", "rx", "off",
                    ],
                )?;
            }
        }
        Ok(t)
    }

    /// Namespace `ns` joined to this host by the pair `link` (this end) / `link`n, a /24 with
    /// this host at `host_ip` and the namespace at `ns_ip`, the namespace routing `far` (the
    /// other namespace's /24) through this host, which forwards on `link`.
    fn join(
        &self,
        ns: &str,
        link: &str,
        host_ip: Ipv4Addr,
        ns_ip: Ipv4Addr,
        far: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let inner = format!("{link}n");
        let _ = run_cmd("ip", &["netns", "del", ns]);
        let _ = run_cmd("ip", &["link", "del", link]);
        run_cmd("ip", &["netns", "add", ns])?;
        run_cmd(
            "ip",
            &["link", "add", link, "type", "veth", "peer", "name", &inner],
        )?;
        run_cmd("ip", &["link", "set", &inner, "netns", ns])?;
        run_cmd(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", link],
        )?;
        run_cmd("ip", &["link", "set", link, "up"])?;
        run_cmd(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                &inner,
            ],
        )?;
        run_cmd("ip", &["-n", ns, "link", "set", &inner, "up"])?;
        run_cmd("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run_cmd(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "add",
                &format!("{far}/24"),
                "via",
                &host_ip.to_string(),
            ],
        )?;
        // Forwarding on this pair's host end only: IPv4 forwards by the receiving interface's
        // setting, and these interfaces go with the run, so nothing needs restoring.
        let sysctl = format!("/proc/sys/net/ipv4/conf/{link}/forwarding");
        std::fs::write(&sysctl, "1").with_context(|| format!("writing {sysctl}"))?;
        Ok(())
    }

    /// Runs `f` on a thread that joined the client namespace: sockets it opens live there.
    fn in_client<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        in_namespace(&self.client_ns, f)
    }

    /// Runs `f` on a thread that joined the server namespace.
    fn in_server<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        in_namespace(&self.server_ns, f)
    }

    /// Waits (up to 5 s) until a datagram from the client namespace to `to` comes back.
    fn probe(&self, to: SocketAddr) -> anyhow::Result<()> {
        self.in_client(|| {
            let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            probe.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = [0u8; 64];
            for _ in 0..100 {
                probe.send_to(b"ready?", to)?;
                if probe.recv_from(&mut buf).is_ok() {
                    return Ok(());
                }
            }
            bail!("no answer from {to} in the client namespace")
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting this host's end of a pair deletes the pair, with its addresses and routes.
        for link in [&self.client_link, &self.server_link] {
            let _ = run_cmd("ip", &["link", "del", link]);
        }
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = run_cmd("ip", &["netns", "del", ns]);
        }
        if !self.keep_scratch {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
        let mut l = leftovers();
        l.namespaces
            .retain(|n| *n != self.client_ns && *n != self.server_ns);
        l.links
            .retain(|n| *n != self.client_link && *n != self.server_link);
        l.dirs.retain(|d| *d != self.scratch);
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns`.
fn in_namespace<T: Send>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) with a namespace descriptor held open for the call; it moves
            // only this thread, which ends when `f` returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {ns}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a thread in {ns} panicked"))
    })
}

/// A proxy started for one run: a `Forwarder` from the wildcard to the echo server, its log
/// in a file; killed on drop.
#[derive(Debug)]
struct Proxy {
    child: Child,
    pid: u32,
    admin: SocketAddr,
    /// The forwarder's address as clients reach it (this host's end of the client pair).
    listen: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts `bin` with a forwarder to `echo` (and the fast path on `fast_path`'s interfaces),
    /// and waits until a datagram from the client namespace comes back through it.
    fn start(
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
    fn metrics(&self) -> Option<String> {
        crate::soak::http_get(self.admin, "/metrics")
    }

    /// The last `lines` lines of its log.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints the warnings and errors it logged that no earlier run's proxy logged (`seen`:
    /// the messages so far, without their time).
    fn print_problems(&self, seen: &mut BTreeSet<String>) {
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

/// What this run made and must undo however it ends.
#[derive(Debug)]
struct Leftovers {
    pids: Vec<u32>,
    links: Vec<String>,
    namespaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    pids: Vec::new(),
    links: Vec::new(),
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

/// Set by SIGINT and SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn leftovers() -> std::sync::MutexGuard<'static, Leftovers> {
    LEFTOVERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Undoes everything in [`LEFTOVERS`]: for a panic or a signal, where no drop runs.
fn clean_up() {
    let mut l = match LEFTOVERS.try_lock() {
        Ok(l) => l,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        // Held by a thread that is cleaning up already.
        Err(TryLockError::WouldBlock) => return,
    };
    for pid in l.pids.drain(..) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for link in l.links.drain(..) {
        let _ = run_cmd("ip", &["link", "del", &link]);
    }
    for ns in l.namespaces.drain(..) {
        let _ = run_cmd("ip", &["netns", "del", &ns]);
    }
    for dir in l.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// A panic hook and a SIGINT/SIGTERM handler that undo what the run made (a release build
/// aborts on panic, and a signal ends the process, without running drops).
fn install_cleanup() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        clean_up();
    }));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            if INTERRUPTED.load(Ordering::Relaxed) {
                eprintln!("\ninterrupted: removing the namespaces and stopping the proxy");
                clean_up();
                std::process::exit(130);
            }
        }
    });
}

/// Removes what earlier runs that were killed left: namespaces and links named after a
/// process that is gone.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing {name}, left by a run that is gone");
        for prefix in LINK_PREFIXES {
            let _ = run_cmd("ip", &["link", "del", &format!("{prefix}{pid}")]);
        }
        let _ = run_cmd("ip", &["netns", "del", &name]);
    }
}

/// Runs a command, failing with its standard error.
fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    output(program, args).map(drop)
}

/// Runs a command and returns its standard output, failing with its standard error.
fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
