//! `tcp`: TCP data-port throughput (MB/s) and connection setups per second, directly against
//! a TCP backend and through the proxy, interleaved A B A B … like `compare`. Clients send no
//! token, so the proxy sends them to its default endpoint (the backend): the first byte is not
//! a token character, which decides at once, with no wait for `tcpTokenTimeoutSeconds`.
//!
//! The backend answers each connection's first read with one byte and then discards what it
//! reads, counting it. A throughput run streams from `--connections` clients for `--seconds`
//! and counts what the backend received; a setup run has `--setup-clients` clients each
//! connecting, sending one byte, reading the answer and closing, in a loop.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::proxy::{ProxyArgs, Server};

#[derive(Debug, clap::Args)]
pub(crate) struct TcpArgs {
    /// Connections streaming at once in a throughput run.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Clients opening connections at once in a setup run.
    #[arg(long, default_value_t = 4)]
    setup_clients: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of (direct, proxy).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Bytes per write of a streaming client.
    #[arg(long, default_value_t = 64 * 1024)]
    write_size: usize,
    /// Another TCP proxy to compare, as NAME=LISTEN_ADDR=COMMAND; `{echo}` in COMMAND is the
    /// backend's address; repeat for several in the same run. E.g.
    /// nginx=127.0.0.1:7901='scripts/nginx-peer.sh tcp 127.0.0.1:7901 {echo}',
    /// haproxy=127.0.0.1:7902='scripts/haproxy-peer.sh tcp 127.0.0.1:7902 {echo}'.
    #[arg(long)]
    other: Vec<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

/// A TCP backend: one byte back on the first read, then a counting sink.
struct Backend {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl Backend {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let _ = stream.set_nodelay(true);
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut answered = false;
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                counter.fetch_add(n as u64, Ordering::Relaxed);
                                if !answered {
                                    answered = true;
                                    if stream.write_all(b"!").is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(Self { addr, received })
    }
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    stream_seconds: f64,
    setups: u64,
    setup_seconds: f64,
    failures: u64,
}

pub(crate) fn run(args: &TcpArgs) -> anyhow::Result<()> {
    crate::proxy::raise_fd_limit();
    let backend = Backend::start()?;
    let proxy = args.proxy.start_tcp(
        &[Server {
            name: "sink",
            addr: backend.addr,
        }],
        "",
    )?;
    let others = args
        .other
        .iter()
        .map(|spec| crate::compare::Other::start(spec, backend.addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut contenders = vec![("direct", backend.addr), ("udp-director", proxy.data)];
    contenders.extend(others.iter().map(|o| (o.label.as_str(), o.addr)));
    let mut totals: Vec<Totals> = contenders.iter().map(|_| Totals::default()).collect();
    let duration = Duration::from_secs_f64(args.seconds);
    for round in 1..=args.rounds {
        for ((label, target), total) in contenders.iter().zip(&mut totals) {
            let (bytes, secs) = stream(
                *target,
                &backend,
                args.connections,
                args.write_size,
                duration,
            )
            .with_context(|| format!("{label}: streaming"))?;
            let (setups, failures, setup_secs) = setups(*target, args.setup_clients, duration);
            println!(
                "{label}#{round}: {:.0} MB/s over {} connection(s); {:.0} setups/s ({} failed)",
                bytes as f64 / secs / 1e6,
                args.connections,
                setups as f64 / setup_secs,
                failures
            );
            total.bytes += bytes;
            total.stream_seconds += secs;
            total.setups += setups;
            total.setup_seconds += setup_secs;
            total.failures += failures;
        }
    }
    let mbps = |t: &Totals| t.bytes as f64 / t.stream_seconds / 1e6;
    let sps = |t: &Totals| t.setups as f64 / t.setup_seconds;
    println!(
        "\nsummary: {} streaming connection(s), {} setup clients, {} rounds of {} s\n{:<14} {:>10} {:>8} {:>12} {:>8} {:>8}",
        args.connections,
        args.setup_clients,
        args.rounds,
        args.seconds,
        "",
        "MB/s",
        "ratio",
        "setups/s",
        "ratio",
        "failed"
    );
    for ((label, _), t) in contenders.iter().zip(&totals) {
        println!(
            "{label:<14} {:>10.0} {:>8.2} {:>12.0} {:>8.2} {:>8}",
            mbps(t),
            mbps(t) / mbps(&totals[0]),
            sps(t),
            sps(t) / sps(&totals[0]),
            t.failures
        );
        println!(
            "{}",
            serde_json::json!({
                "summary": label, "connections": args.connections,
                "megabytes_per_second": mbps(t), "ratio_to_direct": mbps(t) / mbps(&totals[0]),
                "setups_per_second": sps(t), "setup_ratio_to_direct": sps(t) / sps(&totals[0]),
                "setup_failures": t.failures,
            })
        );
    }
    crate::proxy::print_memory("udp-director", proxy.pid);
    Ok(())
}

/// Streams from `connections` clients for `duration`; returns the bytes the backend received
/// in that time and the seconds it took.
fn stream(
    target: SocketAddr,
    backend: &Backend,
    connections: usize,
    write_size: usize,
    duration: Duration,
) -> anyhow::Result<(u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut s = TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        // The first byte is no token character: default endpoint at once. Wait for the
        // backend's answer so the clock starts on an established splice.
        s.write_all(b"x")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one)
            .context("no answer from the backend")?;
        streams.push(s);
    }
    let start_bytes = backend.received.load(Ordering::Relaxed);
    let started = Instant::now();
    let threads: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; write_size];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Both);
            })
        })
        .collect();
    std::thread::sleep(duration);
    let bytes = backend.received.load(Ordering::Relaxed) - start_bytes;
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok((bytes, secs))
}

/// `clients` loops of connect, one byte each way, close, for `duration`: (completed, failed,
/// seconds).
fn setups(target: SocketAddr, clients: usize, duration: Duration) -> (u64, u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(target)?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.write_all(b"x")?;
                        let mut one = [0u8; 1];
                        s.read_exact(&mut one)
                    })();
                    if ok.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}
