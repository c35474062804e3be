//! `handoff`: an upgrade under load (SPEC §12). Proxy A serves `--sessions` UDP sessions with
//! `--rate` datagrams/s flowing through them in all; after `--before` seconds proxy B starts on
//! A's config file (with `handoff: {socketPath}`), takes over, and A exits; the load goes on
//! for `--after` seconds, then every session sends one more datagram. Reports the sessions
//! lost, the datagrams lost, the longest gap in replies across the hand-off, the round trips
//! before and after, and what the proxies say they moved; checks the goals (no session and no
//! datagram lost at 1,000 datagrams/s, a gap under 50 ms).
//!
//! The sessions are forwarder sessions: one UDP `Forwarder` per backend (`--backends`), every
//! client socket connected to one of them, so each socket is one session keyed by its address
//! and the sessions spread over the backends (a worker needs as many upstream sockets as its
//! busiest backend has sessions, so one backend would mean thousands of upstream sockets).
//! Token sessions on a data port would need a query each and move the same way: a session is
//! a session to the hand-off. A forwarder opens a new session for a client it does not know,
//! so a lost session would come back by itself; the backends write the source port they saw
//! into each reply, and a session answered after the hand-off from another port than at setup
//! counts as lost (the game server would have seen a new player), as does one answered not
//! at all.
//!
//! The gap is the longest time with no reply to any session (the merged reply timeline)
//! from B's start to the load's end. At 1,000 datagrams/s over 10,000 sessions one session
//! sends every 10 s, so no session's own gap can be seen; and workers freeze and resume one
//! by one, so replies through one may go on while another's sessions wait. The longest a
//! datagram waited (the largest round trip after B started) is reported beside it: what the
//! unluckiest player saw.

mod figures;
mod output;
mod proxy;
mod traffic;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::echo::MultiEcho;
use crate::proxy::raise_fd_limit;
use figures::{Figures, Moments};
use output::summarize;
use proxy::{HandedOver, Ports, Proxy};
use traffic::{CHECK, Clients, HEADER, SETUP, backends};

/// Arguments of `handoff`.
#[derive(Debug, clap::Args)]
pub(crate) struct HandOffArgs {
    /// Live UDP sessions (one client socket each).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) sessions: usize,
    /// Backends (echo sockets, one forwarder each) the sessions are spread over.
    #[arg(long, default_value_t = 10)]
    pub(crate) backends: usize,
    /// Datagrams per second in all, round-robin over the sessions.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// Seconds of load before B starts.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) before: f64,
    /// Seconds of load after B started.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) after: f64,
    /// Rounds, each with fresh proxies and sessions.
    #[arg(long, default_value_t = 1)]
    pub(crate) rounds: usize,
    /// Payload bytes (at least 15).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Threads reading the replies.
    #[arg(long, default_value_t = 2)]
    pub(crate) threads: usize,
    /// Setup and check datagrams in flight at once.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch: usize,
    /// Proxy binary (default: udp-director beside this binary).
    #[arg(long)]
    pub(crate) proxy_bin: Option<PathBuf>,
    /// Proxy worker threads (A's and B's: a hand-off needs the same count).
    #[arg(long, default_value_t = 2)]
    pub(crate) proxy_workers: usize,
    /// A's `drainSeconds` (it has no TCP connections, so it exits at once after the hand-off).
    #[arg(long, default_value_t = 1)]
    pub(crate) drain_seconds: u64,
    /// Keep each round's scratch directory (configs, logs) even when every goal is met.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Label for the JSON line.
    #[arg(long, default_value = "handoff")]
    pub(crate) label: String,
}

/// The goals (SPEC §12): at 1,000 datagrams/s in all, with 10,000 sessions.
const GAP_GOAL: Duration = Duration::from_millis(50);
/// A datagram of the load not answered this long after the load ended is lost.
const GRACE: Duration = Duration::from_secs(1);
/// How long a setup or check batch's replies are awaited before the next batch goes.
const BATCH_WAIT: Duration = Duration::from_millis(500);
/// Tries after the first for a session's setup or check datagram.
const RETRIES: u64 = 2;

pub(crate) fn run(args: &HandOffArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.backends == 0 || args.rounds == 0 || args.threads == 0 {
        bail!("--sessions, --backends, --rounds and --threads must be at least 1");
    }
    if args.rate <= 0.0 || args.before <= 0.0 || args.after <= 0.0 {
        bail!("--rate, --before and --after must be more than 0");
    }
    if args.size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    let limit = raise_fd_limit();
    // The client sockets, the backends, and room for the rest.
    let needed = (args.sessions + args.backends + 256) as u64;
    if limit < needed {
        bail!(
            "{} sessions need about {needed} open files in this process; the limit is {limit} \
             (raise it, or use fewer --sessions)",
            args.sessions
        );
    }
    let bin = crate::proxy::binary(args.proxy_bin.as_deref())?;
    let backends = backends(args.backends)?;
    let mut rounds = Vec::with_capacity(args.rounds);
    for n in 1..=args.rounds {
        let r = round(args, &bin, &backends, n)?;
        r.print(args);
        rounds.push(r);
    }
    summarize(args, &rounds);
    Ok(())
}

/// What one round measured.
#[derive(Debug)]
struct Round {
    n: usize,
    figures: Figures,
    setup_seconds: f64,
    /// Sessions answered at the check's first try, and with its retries.
    checked_first: usize,
    checked: usize,
    send_errors: u64,
    misdelivered: u64,
    socket_errors: u64,
    /// From B's start: its `listening` line (it has taken over), A's exit.
    b_listening_ms: f64,
    a_exit_ms: Option<f64>,
    a_status: Option<ExitStatus>,
    a_said: Option<HandedOver>,
    b_metrics: BMetrics,
    problems: Vec<String>,
    load_average: String,
    rustc_processes: usize,
    /// Where its configs and logs were kept (when a goal was not met, or `--keep`).
    kept: Option<PathBuf>,
}

/// B's own figures, from its `/metrics` at the end.
#[derive(Debug, Default)]
struct BMetrics {
    handoff_sessions: Option<f64>,
    handoff_descriptors: Option<f64>,
    took_over: Option<f64>,
    /// The gap A measured and told B (`udp_director_handoff_gap_seconds`).
    gap_seconds: Option<f64>,
    /// UDP sessions B opened itself (not taken over): clients it did not know.
    created: Option<f64>,
    active: Option<f64>,
}

impl BMetrics {
    fn read(admin: SocketAddr) -> Self {
        let Some(m) = crate::soak::http_get(admin, "/metrics") else {
            return Self::default();
        };
        Self {
            handoff_sessions: proxy::series(&m, "udp_director_handoff_sessions_total"),
            handoff_descriptors: proxy::series(&m, "udp_director_handoff_descriptors_total"),
            took_over: proxy::series(&m, r#"udp_director_handoff_total{result="took_over"}"#),
            gap_seconds: proxy::series(&m, "udp_director_handoff_gap_seconds"),
            created: proxy::sum_series(
                &m,
                "udp_director_sessions_created_total",
                r#"protocol="udp""#,
            ),
            active: proxy::series(&m, r#"udp_director_sessions_active{protocol="udp"}"#),
        }
    }
}

impl Round {
    fn goals(&self) -> [bool; 3] {
        let f = &self.figures;
        [
            // B opened none itself: a session it re-opened for a client it did not know is
            // lost even when it happens to leave from the same upstream port.
            f.lost_sessions() == 0 && f.established > 0 && self.b_metrics.created == Some(0.0),
            f.lost == 0,
            Duration::from_nanos(f.gap_ns) < GAP_GOAL,
        ]
    }
}

/// The proxies once the hand-off is over: B started at the hand-off time (ns since the
/// round's origin), its `listening` line read, A's exit awaited.
struct Stage {
    a: Proxy,
    b: Proxy,
    spawned_ns: u64,
    listening_ns: u64,
    a_exit_ns: Option<u64>,
    a_status: Option<ExitStatus>,
}

fn round(args: &HandOffArgs, bin: &Path, backends: &MultiEcho, n: usize) -> anyhow::Result<Round> {
    let dir = std::env::temp_dir().join(format!(
        "udp-director-perf-handoff-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_round(args, bin, backends, n, &dir);
    match &result {
        Ok(r) if r.kept.is_none() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(_) => {}
        Err(_) => eprintln!("round {n}: configs and logs kept in {}", dir.display()),
    }
    result
}

fn run_round(
    args: &HandOffArgs,
    bin: &Path,
    backends: &MultiEcho,
    n: usize,
    dir: &Path,
) -> anyhow::Result<Round> {
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let rustc_processes = rustc_processes();
    let ports = Ports::pick(args.backends)?;
    let config = proxy::write_config(
        dir,
        &ports,
        &backends.addrs,
        args.proxy_workers,
        args.drain_seconds,
        args.sessions + 1000,
    )?;
    let admin = SocketAddr::from(([127, 0, 0, 1], ports.admin));
    let a = Proxy::start(bin, &config, dir.join("a.log")).context("proxy A")?;
    proxy::wait_ready(&a, admin, args.backends)?;
    let targets: Vec<SocketAddr> = ports
        .forwarders
        .iter()
        .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let origin = Instant::now();
    let (clients, polls) = Clients::open(args.sessions, &targets, args.threads, args.size, origin)?;
    let clients = &clients;
    let (traffic, received) = std::thread::scope(|s| {
        let receivers: Vec<_> = polls
            .into_iter()
            .map(|(poll, mine)| s.spawn(move || clients.receive(poll, &mine)))
            .collect();
        let traffic = drive(args, bin, &config, clients, a, s);
        clients.stop();
        let received: Vec<traffic::Received> = receivers
            .into_iter()
            .map(|r| r.join().unwrap_or_default())
            .collect();
        (traffic, received)
    });
    let traffic = traffic?;
    let b_metrics = BMetrics::read(admin);
    let stage = traffic.stage;
    let replies: Vec<traffic::Reply> = received
        .iter()
        .flat_map(|r| r.replies.iter().copied())
        .collect();
    let moments = Moments {
        load_start: traffic.load_start_ns,
        handoff: stage.spawned_ns,
        load_end: traffic.load_end_ns,
        grace: GRACE.as_nanos() as u64,
    };
    let figures = Figures::of(args.sessions, &traffic.sent, &replies, moments)?;
    let ms = |ns: u64| ns.saturating_sub(stage.spawned_ns) as f64 / 1e6;
    let mut problems = stage.a.problems();
    problems.extend(stage.b.problems());
    let mut r = Round {
        n,
        figures,
        setup_seconds: traffic.setup_seconds,
        checked_first: traffic.checked_first,
        checked: traffic.checked,
        send_errors: clients.send_errors(),
        misdelivered: received.iter().map(|r| r.misdelivered).sum(),
        socket_errors: received.iter().map(|r| r.errors).sum(),
        b_listening_ms: ms(stage.listening_ns),
        a_exit_ms: stage.a_exit_ns.map(ms),
        a_status: stage.a_status,
        a_said: proxy::handed_over(&stage.a.log_text()),
        b_metrics,
        problems,
        load_average,
        rustc_processes,
        kept: None,
    };
    if args.keep || r.goals().contains(&false) || r.a_status.is_none() {
        r.kept = Some(dir.to_owned());
    }
    Ok(r)
}

/// The traffic's part of a round and the stage it ended on.
struct Traffic {
    stage: Stage,
    sent: Vec<u64>,
    setup_seconds: f64,
    load_start_ns: u64,
    load_end_ns: u64,
    checked_first: usize,
    checked: usize,
}

/// Sessions opened, the load with B started in the middle of it, A's exit, the late replies
/// awaited, and every session checked once more.
fn drive<'scope, 'env: 'scope>(
    args: &'env HandOffArgs,
    bin: &'env Path,
    config: &'env Path,
    clients: &'env Clients,
    a: Proxy,
    s: &'scope std::thread::Scope<'scope, 'env>,
) -> anyhow::Result<Traffic> {
    let started = Instant::now();
    let (_, established) = clients.exchange_all(SETUP, args.batch, BATCH_WAIT, RETRIES);
    let setup_seconds = started.elapsed().as_secs_f64();
    if established == 0 {
        bail!(
            "no session could be opened through A; its log ({}):\n{}",
            a.log.display(),
            a.log_tail(30)
        );
    }
    let load_start = Instant::now();
    let handoff_at = load_start + Duration::from_secs_f64(args.before);
    let load_end = handoff_at + Duration::from_secs_f64(args.after);
    let drain = Duration::from_secs(args.drain_seconds);
    let conductor = s.spawn(move || successor(bin, config, clients, a, handoff_at, drain));
    let sent = clients.load(args.rate, load_start, load_end);
    let stage = conductor
        .join()
        .map_err(|_panic| anyhow::anyhow!("the thread starting B panicked"))??;
    std::thread::sleep((load_end + GRACE).saturating_duration_since(Instant::now()));
    let (checked_first, checked) = clients.exchange_all(CHECK, args.batch, BATCH_WAIT, RETRIES);
    Ok(Traffic {
        stage,
        sent,
        setup_seconds,
        load_start_ns: clients.ns(load_start),
        load_end_ns: clients.ns(load_end),
        checked_first,
        checked,
    })
}

/// At `at`, starts B on A's config file, as a rollout's new pod would, and waits for A to
/// exit (it has no TCP connection to finish).
fn successor(
    bin: &Path,
    config: &Path,
    clients: &Clients,
    mut a: Proxy,
    at: Instant,
    drain: Duration,
) -> anyhow::Result<Stage> {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    let dir = config.parent().context("the config's directory")?;
    let spawned_ns = clients.ns(Instant::now());
    let b = Proxy::start(bin, config, dir.join("b.log")).with_context(|| {
        format!(
            "proxy B; A's log ({}):\n{}",
            a.log.display(),
            a.log_tail(20)
        )
    })?;
    let listening_ns = clients.ns(Instant::now());
    let a_status = a.exited_within(drain + Duration::from_secs(10));
    let a_exit_ns = a_status.map(|_| clients.ns(Instant::now()));
    Ok(Stage {
        a,
        b,
        spawned_ns,
        listening_ns,
        a_exit_ns,
        a_status,
    })
}

/// Compilers running now: others building on this machine disturb the figures.
fn rustc_processes() -> usize {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "rustc")
                })
                .count()
        })
        .unwrap_or(0)
}
