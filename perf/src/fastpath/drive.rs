//! The load generator of `fastpath`, as `load` drives it (each datagram carries `client id |
//! sequence | send time`), over sockets opened in the client namespace: every client's window
//! kept full, replies to datagrams sent in the measured period counted and timed, and the
//! machine's and the proxy's CPU and counters sampled at the period's edges.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

use super::proxy::Proxy;
use super::{Carried, FastPathArgs, HEADER, Load, Outcome, sample};
use crate::load::Report;

/// A client with replies missing for this long refills its window (the rest count as lost).
const STALL: Duration = Duration::from_millis(200);
/// Replies still arriving after a run's end are received (not counted) for this long.
const GRACE: Duration = Duration::from_millis(300);

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
pub(super) fn drive_all(
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
    let machine = after.machine.busy - before.machine.busy;
    let interrupts = after.machine.interrupts - before.machine.interrupts;
    let own = after.own_cpu_seconds - before.own_cpu_seconds;
    Ok(Outcome {
        others_cpu_seconds: machine - own - report.proxy_cpu_seconds.unwrap_or(0.0),
        interrupts_cpu_seconds: interrupts,
        own_cpu_seconds: own,
        report,
        machine_cpu_seconds: machine,
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
