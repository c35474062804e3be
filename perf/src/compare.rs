//! `compare`: the same load directly against an echo server and through the proxy (and through
//! any other UDP proxy command named), interleaved A B A B … so drift on the machine hits every
//! contender alike. Prints each run, then a summary with ratios against direct.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::echo::Echo;
use crate::load::{LoadArgs, Report, Shape};
use crate::proxy::{ProxyArgs, Server};

#[derive(Debug, clap::Args)]
pub(crate) struct CompareArgs {
    /// The load of every run.
    #[command(flatten)]
    pub(crate) shape: Shape,
    /// Rounds of (direct, proxy, others…).
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    /// Echo server threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) echo_threads: usize,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// The proxy's busyPollMicros (0: off, the product default).
    #[arg(long, default_value_t = 0)]
    pub(crate) proxy_busy_poll_micros: u64,
    /// Clients get a token from the query port first (else they are default-endpoint clients).
    #[arg(long)]
    pub(crate) token: bool,
    /// Clients reach the echo server through a UDP `Forwarder` (from the inventory file)
    /// instead of the data port.
    #[arg(long, conflicts_with = "token")]
    pub(crate) forwarder: bool,
    /// Clients reach N echo servers (on 127.0.0.1, .3, .4, …, one port) through a route entry
    /// point: a `Route` over a Service whose EndpointSlice lists them (0: off).
    #[arg(long, default_value_t = 0, conflicts_with_all = ["token", "forwarder"])]
    pub(crate) route_endpoints: usize,
    /// Another UDP proxy to compare, as NAME=LISTEN_ADDR=COMMAND; `{echo}` in COMMAND is replaced
    /// by the echo server's address. E.g. socat=127.0.0.1:7900='socat UDP4-LISTEN:7900,fork,reuseaddr UDP4:{echo}'.
    #[arg(long)]
    pub(crate) other: Vec<String>,
    /// Directory for `<label>.hgrm` files and `latency.svg`.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

struct Contender {
    label: String,
    target: SocketAddr,
    query: Option<SocketAddr>,
    pid: Option<u32>,
    total: Option<Report>,
}

/// Another proxy started for a comparison; killed on drop.
pub(crate) struct Other {
    child: Child,
    /// Its name in the report.
    pub(crate) label: String,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
}

impl Drop for Other {
    fn drop(&mut self) {
        // SIGTERM first: a proxy with worker processes (nginx) stops them on it, while a
        // SIGKILL would leave them running, holding the port and this process's stdout.
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Other {
    /// Starts `NAME=LISTEN_ADDR=COMMAND` with `{echo}` in COMMAND replaced by `backend`, and
    /// gives it half a second to listen.
    pub(crate) fn start(spec: &str, backend: SocketAddr) -> anyhow::Result<Self> {
        let mut parts = spec.splitn(3, '=');
        let (Some(name), Some(addr), Some(cmd)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("--other {spec:?} is not NAME=LISTEN_ADDR=COMMAND");
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec {}",
                cmd.replace("{echo}", &backend.to_string())
            ))
            .spawn()?;
        let pid = child.id();
        let mut other = Self {
            child,
            label: name.into(),
            addr: addr.parse()?,
            pid,
        };
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = other.child.try_wait()? {
            anyhow::bail!("--other {name} exited at once ({status})");
        }
        Ok(other)
    }
}

pub(crate) fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let echo = Echo::start("127.0.0.1:0".parse()?, args.echo_threads, None)?;
    // The extra line is the only config difference from the product defaults.
    let extra = format!("busyPollMicros: {}\n", args.proxy_busy_poll_micros);
    let servers = [Server {
        name: "echo",
        addr: echo.addr,
    }];
    // The route's other endpoints, beside the first echo server.
    let mut more_echos = Vec::new();
    for i in 1..args.route_endpoints {
        let addr = SocketAddr::from(([127, 0, 0, 2 + i as u8], echo.addr.port()));
        more_echos.push(Echo::start(addr, args.echo_threads, None)?);
    }
    let (proxy, proxy_target) = if args.forwarder {
        args.proxy.start_forwarder(&servers, &extra)?
    } else if args.route_endpoints > 0 {
        let mut endpoints = vec![echo.addr];
        endpoints.extend(more_echos.iter().map(|e| e.addr));
        args.proxy.start_route(&servers, &endpoints, &extra)?
    } else {
        let proxy = args.proxy.start(&servers, &extra)?;
        let data = proxy.data;
        (proxy, data)
    };
    let mut contenders = vec![
        Contender {
            label: "direct".into(),
            target: echo.addr,
            query: None,
            pid: None,
            total: None,
        },
        Contender {
            label: if args.forwarder {
                "udp-director (forwarder)".into()
            } else if args.route_endpoints > 0 {
                format!("udp-director (route, {} endpoints)", args.route_endpoints)
            } else {
                "udp-director".into()
            },
            target: proxy_target,
            query: args.token.then_some(proxy.query),
            pid: Some(proxy.pid),
            total: None,
        },
    ];
    let mut others = Vec::new();
    for spec in &args.other {
        let other = Other::start(spec, echo.addr)?;
        contenders.push(Contender {
            label: other.label.clone(),
            target: other.addr,
            query: None,
            pid: Some(other.pid),
            total: None,
        });
        others.push(other);
    }

    for round in 0..args.rounds {
        for c in &mut contenders {
            let load = LoadArgs {
                target: c.target,
                query: c.query,
                resource_type: "gameserver".into(),
                shape: args.shape.clone(),
                proxy_pid: c.pid,
                label: format!("{}#{}", c.label, round + 1),
                hgrm: None,
                svg: None,
            };
            let r = crate::load::run(&load)?;
            match &mut c.total {
                None => c.total = Some(r),
                Some(t) => t.append(&r)?,
            }
        }
    }
    summarize(args, &contenders)?;
    crate::proxy::print_memory("udp-director", proxy.pid);
    Ok(())
}

fn summarize(args: &CompareArgs, contenders: &[Contender]) -> anyhow::Result<()> {
    let totals: Vec<(&str, &Report)> = contenders
        .iter()
        .filter_map(|c| Some((c.label.as_str(), c.total.as_ref()?)))
        .collect();
    let Some((_, direct)) = totals.first() else {
        return Ok(());
    };
    let rate = |r: &Report| r.round_trips as f64 / r.seconds;
    let p = |r: &Report, q: f64| r.histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "\nsummary: {} clients x {} in flight, {} B, {} rounds of {} s\n{:<14} {:>12} {:>8} {:>9} {:>9} {:>9} {:>14} {:>14}",
        args.shape.clients,
        args.shape.window,
        args.shape.size,
        args.rounds,
        args.shape.duration,
        "",
        "rt/s",
        "ratio",
        "loss %",
        "p50 µs",
        "p99 µs",
        "+p50 µs",
        "rt/CPU-s"
    );
    for (label, r) in &totals {
        let loss = 100.0 * r.sent.saturating_sub(r.round_trips) as f64 / r.sent.max(1) as f64;
        let per_cpu = r
            .proxy_cpu_seconds
            .map(|c| r.round_trips as f64 / c.max(1e-9));
        println!(
            "{label:<14} {:>12.0} {:>8.2} {:>9.3} {:>9.1} {:>9.1} {:>14.1} {:>14}",
            rate(r),
            rate(r) / rate(direct),
            loss,
            p(r, 0.5),
            p(r, 0.99),
            p(r, 0.5) - p(direct, 0.5),
            per_cpu.map_or("-".into(), |v| format!("{v:.0}"))
        );
        println!(
            "{}",
            serde_json::json!({
                "summary": label, "clients": args.shape.clients, "window": args.shape.window, "size": args.shape.size,
                "round_trips_per_second": rate(r), "ratio_to_direct": rate(r) / rate(direct),
                "loss_percent": loss, "misdelivered": r.misdelivered,
                "p50_us": p(r, 0.5), "p99_us": p(r, 0.99), "p999_us": p(r, 0.999),
                "added_p50_us": p(r, 0.5) - p(direct, 0.5),
                "round_trips_per_proxy_cpu_second": per_cpu,
            })
        );
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        for (label, r) in &totals {
            crate::report::write(
                &dir.join(format!("{label}.hgrm")),
                &crate::report::hgrm(&r.histogram),
            )?;
        }
        let series: Vec<(&str, &Histogram<u64>)> =
            totals.iter().map(|(l, r)| (*l, &r.histogram)).collect();
        let title = format!(
            "round trips, {} clients x {} in flight, {} B",
            args.shape.clients, args.shape.window, args.shape.size
        );
        crate::report::write(
            &dir.join("latency.svg"),
            &crate::report::svg(&title, &series),
        )?;
    }
    Ok(())
}
