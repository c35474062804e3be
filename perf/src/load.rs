//! The load generator. Each datagram carries `client id | sequence | send time`, so a reply tells
//! its round-trip time and whether it reached the right client. Clients are spread over threads;
//! each thread polls its sockets and keeps every client's window full.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

/// The load itself, shared by `load`, `latency` and `compare`.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Shape {
    /// Concurrent clients (one socket, one proxy session each).
    #[arg(long, default_value_t = 64)]
    pub(crate) clients: usize,
    /// Datagrams in flight per client.
    #[arg(long, default_value_t = 32)]
    pub(crate) window: usize,
    /// Payload bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup: f64,
    /// Load-generator threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
}

/// Arguments of `load` and `latency`.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// Where datagrams go: the proxy's data port, or an echo server directly.
    #[arg(long)]
    pub(crate) target: SocketAddr,
    /// Proxy query port: each client first gets a token and sends it (token flow).
    #[arg(long)]
    pub(crate) query: Option<SocketAddr>,
    /// resourceType for the token query.
    #[arg(long, default_value = "gameserver")]
    pub(crate) resource_type: String,
    #[command(flatten)]
    pub(crate) shape: Shape,
    /// PID of the proxy, to report its CPU use during the measured period.
    #[arg(long)]
    pub(crate) proxy_pid: Option<u32>,
    /// Label for the JSON line.
    #[arg(long, default_value = "run")]
    pub(crate) label: String,
    /// Write the latency percentile distribution (.hgrm text) here.
    #[arg(long)]
    pub(crate) hgrm: Option<std::path::PathBuf>,
    /// Write an SVG plot of the latency distribution here.
    #[arg(long)]
    pub(crate) svg: Option<std::path::PathBuf>,
}

/// Results of one run.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) round_trips: u64,
    pub(crate) sent: u64,
    pub(crate) misdelivered: u64,
    pub(crate) seconds: f64,
    pub(crate) proxy_cpu_seconds: Option<f64>,
    pub(crate) histogram: Histogram<u64>,
}

impl Report {
    /// Adds the counts and latencies of a part of the same run (another thread's clients).
    fn add_part(&mut self, part: &Self) -> anyhow::Result<()> {
        self.round_trips += part.round_trips;
        self.sent += part.sent;
        self.misdelivered += part.misdelivered;
        self.histogram.add(&part.histogram)?;
        Ok(())
    }

    /// Appends a later run: its counts and latencies, its time and the proxy CPU it used.
    pub(crate) fn append(&mut self, later: &Self) -> anyhow::Result<()> {
        self.add_part(later)?;
        self.seconds += later.seconds;
        self.proxy_cpu_seconds = self
            .proxy_cpu_seconds
            .zip(later.proxy_cpu_seconds)
            .map(|(a, b)| a + b);
        Ok(())
    }
}

const HEADER: usize = 20;
/// A client with replies missing for this long refills its window (the rest count as lost).
const STALL: Duration = Duration::from_millis(200);

struct Client {
    id: u32,
    socket: UdpSocket,
    seq: u64,
    in_flight: usize,
    last_reply: Instant,
}

/// Sends one query (a JSON object) to the query port and returns the token of the answer.
pub(crate) fn token(query: SocketAddr, request: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(query).context("query port")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{request}")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    match v["token"].as_str() {
        Some(t) => Ok(t.to_string()),
        None => bail!("query failed: {line}"),
    }
}

/// CPU seconds (user + system) of `pid` and of its live child processes: a proxy with worker
/// processes (nginx) does its work in those.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let own = stat_fields(pid)?;
    let ticks = |f: &[String]| -> f64 {
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        field(11) + field(12)
    };
    let mut total = ticks(&own);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Field 1 after the command is the parent pid.
            if let Some(f) = stat_fields(child)
                .filter(|f| f.get(1).map(String::as_str) == Some(&pid.to_string()))
            {
                total += ticks(&f);
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(total / hz)
}

/// The fields of /proc/PID/stat after the command name (state, ppid, …).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

pub(crate) fn run(args: &LoadArgs) -> anyhow::Result<Report> {
    if args.shape.size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    let bind = if args.target.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let request = format!(r#"{{"resourceType":"{}"}}"#, args.resource_type);
    let mut clients = Vec::with_capacity(args.shape.clients);
    for id in 0..args.shape.clients {
        let socket = UdpSocket::bind(bind)?;
        socket.connect(args.target)?;
        if let Some(q) = args.query {
            socket.send(token(q, &request)?.as_bytes())?;
        }
        socket.set_nonblocking(true)?;
        clients.push(Client {
            id: id as u32,
            socket,
            seq: 0,
            in_flight: 0,
            last_reply: Instant::now(),
        });
    }
    let threads = args.shape.threads.clamp(1, args.shape.clients.max(1));
    let mut groups: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        groups[i % threads].push(c);
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.shape.warmup);
    let end = measure_from + Duration::from_secs_f64(args.shape.duration);
    let cpu_before = std::sync::Mutex::new(None);
    let results: Vec<anyhow::Result<Report>> = std::thread::scope(|s| {
        let pid = args.proxy_pid;
        let cpu_before = &cpu_before;
        s.spawn(move || {
            std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
            *cpu_before.lock().unwrap() = pid.and_then(cpu_seconds);
            // A progress line for long runs, on stderr so stdout stays table + JSON.
            if args.shape.duration >= 5.0 {
                while Instant::now() < end {
                    std::thread::sleep(Duration::from_secs(1));
                    let done = Instant::now().saturating_duration_since(measure_from);
                    eprint!(
                        "\r{}: {:.0}/{:.0} s ",
                        args.label,
                        done.as_secs_f64().min(args.shape.duration),
                        args.shape.duration
                    );
                }
                eprintln!();
            }
        });
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| s.spawn(move || drive(g, args, measure_from, end)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu_after = args.proxy_pid.and_then(cpu_seconds);
    let mut total = Report {
        round_trips: 0,
        sent: 0,
        misdelivered: 0,
        seconds: args.shape.duration,
        proxy_cpu_seconds: match (*cpu_before.lock().unwrap(), cpu_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        histogram: Histogram::new(3)?,
    };
    for r in results {
        total.add_part(&r?)?;
    }
    print_report(args, &total);
    if let Some(path) = &args.hgrm {
        crate::report::write(path, &crate::report::hgrm(&total.histogram))?;
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "{}: {} clients x {} in flight, {} B",
            args.label, args.shape.clients, args.shape.window, args.shape.size
        );
        crate::report::write(
            path,
            &crate::report::svg(&title, &[(&args.label, &total.histogram)]),
        )?;
    }
    Ok(total)
}

fn drive(
    mut clients: Vec<Client>,
    args: &LoadArgs,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Report> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let (mut round_trips, mut sent, mut misdelivered) = (0u64, 0u64, 0u64);
    let mut out = vec![0u8; args.shape.size];
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
    // Replies still arriving after `end` are received (not counted) until this grace ends.
    let grace_end = end + Duration::from_millis(300);
    loop {
        let now = Instant::now();
        if now >= grace_end {
            break;
        }
        let measuring = now >= measure_from && now < end;
        for c in &mut clients {
            if now < end {
                if c.in_flight > 0 && now.duration_since(c.last_reply) > STALL {
                    c.in_flight = 0; // presumed lost
                    c.last_reply = now;
                }
                while c.in_flight < args.shape.window {
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
        seconds: args.shape.duration,
        proxy_cpu_seconds: None,
        histogram,
    })
}

pub(crate) fn print_report(args: &LoadArgs, r: &Report) {
    let us = |q: f64| r.histogram.value_at_quantile(q) as f64 / 1000.0;
    let rate = r.round_trips as f64 / r.seconds;
    let loss = if r.sent == 0 {
        0.0
    } else {
        100.0 * (r.sent.saturating_sub(r.round_trips)) as f64 / r.sent as f64
    };
    let per_cpu = r
        .proxy_cpu_seconds
        .map(|cpu| r.round_trips as f64 / cpu.max(1e-9));
    println!(
        "{:<12} {:>5} clients x {:>3} in flight, {:>5} B: {:>10.0} rt/s  loss {:>6.3}%  misdelivered {}  \
         p50 {:.1} µs  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}{}",
        args.label,
        args.shape.clients,
        args.shape.window,
        args.shape.size,
        rate,
        loss,
        r.misdelivered,
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        r.histogram.max() as f64 / 1000.0,
        per_cpu.map_or(String::new(), |p| format!(
            "  {p:.0} rt per proxy CPU-second"
        ))
    );
    let json = serde_json::json!({
        "label": args.label, "clients": args.shape.clients, "window": args.shape.window, "size": args.shape.size,
        "seconds": r.seconds, "round_trips": r.round_trips, "round_trips_per_second": rate,
        "sent": r.sent, "loss_percent": loss, "misdelivered": r.misdelivered,
        "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "p999_us": us(0.999),
        "max_us": r.histogram.max() as f64 / 1000.0,
        "proxy_cpu_seconds": r.proxy_cpu_seconds, "round_trips_per_proxy_cpu_second": per_cpu,
    });
    println!("{json}");
}
