//! `soak`: everything at once for a long time (default 10 minutes), to see that the proxy's
//! memory and open file descriptors stay flat. Session churn (sessions opened, used, left to
//! idle out), live migrations between servers, queries whose tokens are never redeemed,
//! inventory rewrites, and admin scrapes run side by side; the proxy's RSS and fd count are
//! sampled on an interval, and the summary compares the last third of the run with the first
//! (after a warm-up that lets caches and tables reach their working size).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::echo::{Echo, TAG_OFFSET};
use crate::proxy::{ProxyArgs, Server};

#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long the soak runs, in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub(crate) duration: f64,
    /// Seconds between samples of the proxy's RSS and open fds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) sample: f64,
    /// Threads opening, using and abandoning sessions.
    #[arg(long, default_value_t = 4)]
    pub(crate) churners: usize,
    /// Long-lived sessions that migrate between servers.
    #[arg(long, default_value_t = 8)]
    pub(crate) migrators: usize,
    /// The proxy's sessionTimeoutSeconds (abandoned sessions idle out after it).
    #[arg(long, default_value_t = 3)]
    pub(crate) session_timeout: u64,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
}

/// Counts of what the soak did.
#[derive(Debug, Default)]
struct Work {
    sessions: AtomicU64,
    round_trips: AtomicU64,
    migrations: AtomicU64,
    queries: AtomicU64,
    inventory_writes: AtomicU64,
    scrapes: AtomicU64,
    /// Queries that got no token.
    errors: AtomicU64,
    /// Round trips whose reply did not come within a second.
    lost: AtomicU64,
    /// Replies from another server than the session's, or changed.
    misdelivered: AtomicU64,
}

impl Work {
    fn count(&self, trip: Trip) {
        let counter = match trip {
            Trip::Answered => &self.round_trips,
            Trip::Lost => &self.lost,
            Trip::Misdelivered => &self.misdelivered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a round trip ended.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Trip {
    Answered,
    Lost,
    Misdelivered,
}

const SERVERS: [&str; 4] = ["gs0", "gs1", "gs2", "gs3"];
const MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";

pub(crate) fn run(args: &SoakArgs) -> anyhow::Result<()> {
    let echoes: Vec<Echo> = (0..SERVERS.len())
        .map(|i| Echo::start("127.0.0.1:0".parse().unwrap(), 1, Some(b'a' + i as u8)))
        .collect::<Result<_, _>>()?;
    let servers: Vec<Server> = SERVERS
        .iter()
        .zip(&echoes)
        .map(|(name, e)| Server { name, addr: e.addr })
        .collect();
    let proxy = args.proxy.start(
        &servers,
        &format!(
            "sessionTimeoutSeconds: {}\ntokenTtlSeconds: 5\n",
            args.session_timeout
        ),
    )?;
    let inventory = proxy.inventory_path();
    let original = std::fs::read_to_string(&inventory)?;
    let (data, query, admin, pid) = (proxy.data, proxy.query, proxy.admin, proxy.pid);
    let work = Arc::new(Work::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..args.churners {
            let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
            let hold = Duration::from_secs(args.session_timeout + 2);
            s.spawn(move || churn(data, query, hold, &work, &stop));
        }
        for i in 0..args.migrators {
            let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
            s.spawn(move || migrate(data, query, i, &work, &stop));
        }
        {
            let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if crate::load::token(query, &by_id(SERVERS[0])).is_ok() {
                        work.queries.fetch_add(1, Ordering::Relaxed);
                    } else {
                        work.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        {
            let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
            let (inventory, original) = (inventory.clone(), original.clone());
            s.spawn(move || {
                // Every 2 s the inventory gains, then loses, a fifth server and a relabel.
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let text = if n % 2 == 1 {
                        format!(
                            "{original}- {{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: extra, namespace: perf, labels: {{id: extra, round: \"{n}\"}}}}, status: {{state: Ready, address: \"127.0.0.1\", ports: [{{name: default, port: 9}}]}}}}\n"
                        )
                    } else {
                        original.clone()
                    };
                    let tmp = inventory.with_extension("tmp");
                    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &inventory).is_ok()
                    {
                        work.inventory_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    sleep_unless(&stop, Duration::from_secs(2));
                }
            });
        }
        {
            let (work, stop) = (Arc::clone(&work), Arc::clone(&stop));
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for path in ["/metrics", "/sessions", "/readyz"] {
                        if http_get(admin, path).is_some() {
                            work.scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    sleep_unless(&stop, Duration::from_millis(500));
                }
            });
        }
        let end = started + Duration::from_secs_f64(args.duration);
        println!("     t s    RSS KiB   open fds   sessions");
        while Instant::now() < end {
            let next = (Instant::now() + Duration::from_secs_f64(args.sample)).min(end);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let t = started.elapsed().as_secs_f64();
            let rss = crate::proxy::status_kib(pid, "VmRSS").unwrap_or(0);
            let fds = open_fds(pid);
            let sessions =
                crate::flood::metric(admin, r#"udp_director_sessions_active{protocol="udp"}"#);
            println!("{t:>8.0} {rss:>10} {fds:>10} {sessions:>10}");
            samples.push((t, rss, fds, sessions));
        }
        stop.store(true, Ordering::Relaxed);
    });
    if samples.is_empty() {
        anyhow::bail!("the soak ended before its first sample (--duration under --sample?)");
    }
    let third = (samples.len() / 3).max(1);
    let mean = |xs: &[(f64, u64, u64, u64)], f: fn(&(f64, u64, u64, u64)) -> u64| {
        xs.iter().map(|x| f(x) as f64).sum::<f64>() / xs.len().max(1) as f64
    };
    // The first sample is the warm-up: tables and caches grow to their working size.
    let early = &samples[1.min(samples.len() - 1)..(1 + third).min(samples.len())];
    let late = &samples[samples.len() - third..];
    let (rss_early, rss_late) = (mean(early, |x| x.1), mean(late, |x| x.1));
    let (fds_early, fds_late) = (mean(early, |x| x.2), mean(late, |x| x.2));
    let growth = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "\nsummary: {:.0} s; {} sessions opened, {} round trips, {} migrations, {} queries, \
         {} inventory writes, {} admin scrapes; {} failed queries, {} lost and {} misdelivered \
         replies; RSS {rss_early:.0} → {rss_late:.0} KiB \
         ({:+.1} %), open fds {fds_early:.0} → {fds_late:.0} ({:+.1} %)",
        started.elapsed().as_secs_f64(),
        count(&work.sessions),
        count(&work.round_trips),
        count(&work.migrations),
        count(&work.queries),
        count(&work.inventory_writes),
        count(&work.scrapes),
        count(&work.errors),
        count(&work.lost),
        count(&work.misdelivered),
        growth(rss_early, rss_late),
        growth(fds_early, fds_late),
    );
    println!(
        "{}",
        serde_json::json!({
            "summary": "soak",
            "seconds": started.elapsed().as_secs_f64(),
            "sessions": count(&work.sessions),
            "round_trips": count(&work.round_trips),
            "migrations": count(&work.migrations),
            "queries": count(&work.queries),
            "inventory_writes": count(&work.inventory_writes),
            "scrapes": count(&work.scrapes),
            "failed_queries": count(&work.errors),
            "lost": count(&work.lost),
            "misdelivered": count(&work.misdelivered),
            "rss_kib_early": rss_early,
            "rss_kib_late": rss_late,
            "fds_early": fds_early,
            "fds_late": fds_late,
            "samples": samples.iter().map(|s| serde_json::json!({"t": s.0, "rss_kib": s.1, "fds": s.2, "sessions": s.3})).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

fn by_id(name: &str) -> String {
    format!(r#"{{"resourceType":"gameserver","labelSelector":{{"id":"{name}"}}}}"#)
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sessions opened with a token, used for a few round trips, then abandoned to idle out. An
/// abandoned socket is held open for `hold` (past the proxy's idle timeout): a new socket on
/// the port of one whose session still lives would be that session, as it would be for a real
/// client behind a NAT that reused the port.
fn churn(data: SocketAddr, query: SocketAddr, hold: Duration, work: &Work, stop: &AtomicBool) {
    let mut n = 0usize;
    let mut held: std::collections::VecDeque<(Instant, UdpSocket)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        while held.front().is_some_and(|(at, _)| at.elapsed() > hold) {
            held.pop_front();
        }
        n += 1;
        let server = n % SERVERS.len();
        let Ok(token) = crate::load::token(query, &by_id(SERVERS[server])) else {
            work.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(c) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = c.send_to(token.as_bytes(), data);
        work.sessions.fetch_add(1, Ordering::Relaxed);
        for i in 0..5u8 {
            work.count(round_trip(&c, data, &[i; 32], b'a' + server as u8));
        }
        held.push_back((Instant::now(), c));
        // A steady churn, not a flood: each thread opens ~50 sessions a second.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One long session moved between the servers with control packets.
fn migrate(data: SocketAddr, query: SocketAddr, offset: usize, work: &Work, stop: &AtomicBool) {
    let Ok(c) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    let mut server = offset % SERVERS.len();
    let Ok(token) = crate::load::token(query, &by_id(SERVERS[server])) else {
        work.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = c.send_to(token.as_bytes(), data);
    work.sessions.fetch_add(1, Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        for i in 0..20u8 {
            work.count(round_trip(&c, data, &[i; 64], b'a' + server as u8));
        }
        server = (server + 1) % SERVERS.len();
        let Ok(token) = crate::load::token(query, &by_id(SERVERS[server])) else {
            work.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut packet = MAGIC.to_vec();
        packet.extend_from_slice(token.as_bytes());
        let _ = c.send_to(&packet, data);
        work.migrations.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `payload` (longer than [`TAG_OFFSET`]) and checks the reply came from the server
/// tagged `tag`, the rest of it unchanged.
fn round_trip(c: &UdpSocket, to: SocketAddr, payload: &[u8], tag: u8) -> Trip {
    if c.send_to(payload, to).is_err() {
        return Trip::Lost;
    }
    let mut buf = [0u8; 256];
    let Ok((n, _)) = c.recv_from(&mut buf) else {
        return Trip::Lost;
    };
    let mut want = payload.to_vec();
    want[TAG_OFFSET] = tag;
    if buf[..n] == want[..] {
        Trip::Answered
    } else {
        Trip::Misdelivered
    }
}

/// How many descriptors `pid` has open.
pub(crate) fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The whole response (status line, headers, body) to `GET path`, if it is a 200.
pub(crate) fn http_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}
