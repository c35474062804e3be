//! `migrate`: live migrations under load. K clients keep W datagrams in flight through the proxy
//! to server A or B (tagged echo servers); one client after another sends a control packet with
//! a token for the other server. Every reply is checked: a datagram sent before a client's reset
//! must be answered by its old server, one sent after by its new server. Reports the datagrams
//! lost, split into those in flight at a reset (the old server's late replies, which the proxy
//! drops by design when it closes the old upstream socket) and the rest; those answered by the
//! wrong server; and the time from each reset to the first reply from the new server.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

use crate::echo::{Echo, TAG_OFFSET};
use crate::load::token;
use crate::proxy::{ProxyArgs, Server};

#[derive(Debug, clap::Args)]
pub(crate) struct MigrateArgs {
    /// Clients under load.
    #[arg(long, default_value_t = 8)]
    pub(crate) clients: usize,
    /// Datagrams in flight per client.
    #[arg(long, default_value_t = 8)]
    pub(crate) window: usize,
    /// Payload bytes (at least 21).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Migrations to perform.
    #[arg(long, default_value_t = 1000)]
    pub(crate) migrations: usize,
    /// Milliseconds between two migrations.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) interval_ms: f64,
    /// A migrating client first waits for its in-flight replies (a client that resets between
    /// exchanges); without it, replies still in flight from the old server are lost.
    #[arg(long)]
    pub(crate) quiesce: bool,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// Label for the JSON line.
    #[arg(long, default_value = "migrate")]
    pub(crate) label: String,
}

const MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";
const NAMES: [&str; 2] = ["a", "b"];
const LOST_AFTER: Duration = Duration::from_millis(500);

struct Client {
    socket: UdpSocket,
    seq: u64,
    /// Sequence → send time, for datagrams not yet answered.
    in_flight: BTreeMap<u64, Instant>,
    server: usize,
    /// Sequence numbers at which this client's resets took effect, ascending. Servers
    /// alternate from server 0, so the resets at or before a sequence say which server owes it.
    switches: Vec<u64>,
    reset_at: Option<Instant>,
    quiescing_since: Option<Instant>,
}

#[derive(Default)]
struct Counts {
    sent: u64,
    answered: u64,
    wrong_server: u64,
    lost_in_flight_at_reset: u64,
    lost_other: u64,
}

impl Counts {
    /// Counts an unanswered datagram: one sent within a window before some reset was in flight
    /// when its server's socket closed (its late reply is dropped by design, SPEC section 3).
    fn lose(&mut self, c: &Client, seq: u64, window: usize) {
        if c.switches
            .iter()
            .any(|&k| seq < k && seq + window as u64 >= k)
        {
            self.lost_in_flight_at_reset += 1;
        } else {
            self.lost_other += 1;
        }
    }
}

pub(crate) fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    if args.size <= TAG_OFFSET {
        bail!("--size must be more than {TAG_OFFSET}");
    }
    let servers = [
        Echo::start("127.0.0.1:0".parse()?, 1, Some(0))?,
        Echo::start("127.0.0.1:0".parse()?, 1, Some(1))?,
    ];
    let proxy = args.proxy.start(
        &[
            Server {
                name: NAMES[0],
                addr: servers[0].addr,
            },
            Server {
                name: NAMES[1],
                addr: servers[1].addr,
            },
        ],
        "",
    )?;
    // The query for a token to server a or b.
    let requests =
        NAMES.map(|n| format!(r#"{{"resourceType":"gameserver","labelSelector":{{"id":"{n}"}}}}"#));
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(proxy.data)?;
        socket.send(token(proxy.query, &requests[0])?.as_bytes())?;
        socket.set_nonblocking(true)?;
        clients.push(Client {
            socket,
            seq: 0,
            in_flight: BTreeMap::new(),
            server: 0,
            switches: Vec::new(),
            reset_at: None,
            quiescing_since: None,
        });
    }
    let mut switch_time = Histogram::<u64>::new(3)?;
    let mut counts = Counts::default();
    let mut out = vec![0u8; args.size];
    let mut buf = vec![0u8; 65536];
    let interval = Duration::from_secs_f64(args.interval_ms / 1000.0);
    let started = Instant::now();
    let mut next_migration = started + Duration::from_millis(200);
    let (mut migrations, mut turn) = (0usize, 0usize);
    let mut finished_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if finished_at.is_some_and(|f| now.duration_since(f) > LOST_AFTER) {
            break;
        }
        // Start the next migration: at once, or after the client's replies are in (--quiesce).
        if finished_at.is_none() && now >= next_migration {
            let c = &mut clients[turn % args.clients];
            c.quiescing_since.get_or_insert(now);
            let settled = !args.quiesce
                || c.in_flight.is_empty()
                || now.duration_since(c.quiescing_since.unwrap_or(now)) > LOST_AFTER;
            if settled {
                let new = 1 - c.server;
                let mut packet = MAGIC.to_vec();
                packet.extend_from_slice(token(proxy.query, &requests[new])?.as_bytes());
                c.socket.send(&packet)?;
                c.server = new;
                c.switches.push(c.seq);
                c.reset_at = Some(Instant::now());
                c.quiescing_since = None;
                migrations += 1;
                turn += 1;
                next_migration = now + interval;
                if migrations == args.migrations {
                    finished_at = Some(now);
                }
            }
        }
        for (id, c) in clients.iter_mut().enumerate() {
            let quiescing = c.quiescing_since.is_some() && args.quiesce;
            while finished_at.is_none() && !quiescing && c.in_flight.len() < args.window {
                out[..4].copy_from_slice(&(id as u32).to_be_bytes());
                out[4..12].copy_from_slice(&c.seq.to_be_bytes());
                if c.socket.send(&out).is_err() {
                    break;
                }
                c.in_flight.insert(c.seq, Instant::now());
                c.seq += 1;
                counts.sent += 1;
            }
            while let Ok(n) = c.socket.recv(&mut buf) {
                if n <= TAG_OFFSET {
                    counts.wrong_server += 1;
                    continue;
                }
                let seq = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                if c.in_flight.remove(&seq).is_none() {
                    continue;
                }
                counts.answered += 1;
                let expected = c.switches.partition_point(|&k| k <= seq) % 2;
                if usize::from(buf[TAG_OFFSET]) != expected {
                    counts.wrong_server += 1;
                } else if c.switches.last().is_some_and(|&k| seq >= k)
                    && let Some(at) = c.reset_at.take()
                {
                    let _ = switch_time.record(at.elapsed().as_nanos().max(1) as u64);
                }
            }
            // Unanswered for too long: lost, before or after the client's last reset.
            let now = Instant::now();
            let lost: Vec<u64> = c
                .in_flight
                .iter()
                .filter(|(_, t)| now.duration_since(**t) > LOST_AFTER)
                .map(|(s, _)| *s)
                .collect();
            for seq in lost {
                c.in_flight.remove(&seq);
                counts.lose(c, seq, args.window);
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    for c in &clients {
        for &seq in c.in_flight.keys() {
            counts.lose(c, seq, args.window);
        }
    }
    let us = |q: f64| switch_time.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{:<12} {} migrations, {} clients x {} in flight{}: sent {}, answered {}, lost in flight at a reset {}, \
         lost otherwise {}, wrong server {}; first reply from the new server p50 {:.1} µs p99 {:.1} max {:.1}",
        args.label,
        migrations,
        args.clients,
        args.window,
        if args.quiesce { " (quiesced)" } else { "" },
        counts.sent,
        counts.answered,
        counts.lost_in_flight_at_reset,
        counts.lost_other,
        counts.wrong_server,
        us(0.5),
        us(0.99),
        switch_time.max() as f64 / 1000.0
    );
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "migrations": migrations, "clients": args.clients, "window": args.window,
            "quiesce": args.quiesce, "sent": counts.sent, "answered": counts.answered,
            "lost_in_flight_at_reset": counts.lost_in_flight_at_reset, "lost_other": counts.lost_other,
            "wrong_server": counts.wrong_server, "switch_p50_us": us(0.5), "switch_p99_us": us(0.99),
            "switch_max_us": switch_time.max() as f64 / 1000.0,
        })
    );
    Ok(())
}
