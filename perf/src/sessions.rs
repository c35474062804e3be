//! `sessions`: N concurrent sessions through the proxy. Measures how fast they are set up (one
//! datagram out, its reply back, per new client socket), the proxy's resident memory per
//! session, and that every session still reaches its own client afterwards.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::echo::Echo;
use crate::proxy::{ProxyArgs, Server, raise_fd_limit, status_kib};

#[derive(Debug, clap::Args)]
pub(crate) struct SessionsArgs {
    /// Concurrent sessions to open.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) sessions: usize,
    /// Setups in flight at once.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch: usize,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// Label for the JSON line.
    #[arg(long, default_value = "sessions")]
    pub(crate) label: String,
}

fn id_of(reply: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(reply.get(..4)?.try_into().ok()?))
}

/// Sends one datagram per socket (`batch` at a time) and waits for each reply; returns
/// (answered, misdelivered).
fn round(
    sockets: &[UdpSocket],
    target: SocketAddr,
    batch: usize,
) -> anyhow::Result<(usize, usize)> {
    let (mut ok, mut wrong) = (0, 0);
    let mut buf = [0u8; 64];
    for (chunk_index, chunk) in sockets.chunks(batch.max(1)).enumerate() {
        for (i, s) in chunk.iter().enumerate() {
            let id = (chunk_index * batch + i) as u32;
            s.send_to(&id.to_be_bytes(), target)?;
        }
        for (i, s) in chunk.iter().enumerate() {
            let id = (chunk_index * batch + i) as u32;
            match s.recv(&mut buf) {
                Ok(n) if id_of(&buf[..n]) == Some(id) => ok += 1,
                Ok(_) => wrong += 1,
                Err(_) => {}
            }
        }
    }
    Ok((ok, wrong))
}

pub(crate) fn run(args: &SessionsArgs) -> anyhow::Result<()> {
    let limit = raise_fd_limit();
    if (args.sessions as u64) + 64 > limit {
        bail!(
            "{} sessions need {} open files here; the limit is {limit}",
            args.sessions,
            args.sessions + 64
        );
    }
    let echo = Echo::start("127.0.0.1:0".parse()?, 2, None)?;
    let extra = format!("maxSessions: {}\n", args.sessions + 1000);
    let proxy = args.proxy.start(
        &[Server {
            name: "echo",
            addr: echo.addr,
        }],
        &extra,
    )?;
    // Clients bind to 127.0.1.x, so they leave 127.0.0.1's ephemeral ports (one per session,
    // about 28k by default) to the proxy's upstream sockets.
    let sockets: Vec<UdpSocket> = (0..args.sessions)
        .map(|i| {
            let s = UdpSocket::bind((
                std::net::Ipv4Addr::new(127, 0, 1, 1 + (i / 20_000) as u8),
                0,
            ))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()?;
    let rss_before = status_kib(proxy.pid, "VmRSS").unwrap_or(0);

    let started = Instant::now();
    let (opened, wrong_setup) = round(&sockets, proxy.data, args.batch)?;
    let setup_seconds = started.elapsed().as_secs_f64();
    // Let the control thread take in the session events before reading memory.
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = status_kib(proxy.pid, "VmRSS").unwrap_or(0);
    let (answered, wrong) = round(&sockets, proxy.data, args.batch)?;

    let per_session = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / opened.max(1) as f64;
    let rate = opened as f64 / setup_seconds;
    println!(
        "{:<12} {} sessions: {} opened in {:.2} s ({:.0} setups/s); proxy RSS {:.1} → {:.1} MiB, {:.0} B per session; \
         second round {} answered, {} misdelivered",
        args.label,
        args.sessions,
        opened,
        setup_seconds,
        rate,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_session,
        answered,
        wrong + wrong_setup
    );
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "sessions": args.sessions, "opened": opened,
            "setup_seconds": setup_seconds, "setups_per_second": rate,
            "proxy_rss_before_kib": rss_before, "proxy_rss_after_kib": rss_after,
            "proxy_bytes_per_session": per_session,
            "answered_second_round": answered, "misdelivered": wrong + wrong_setup,
        })
    );
    Ok(())
}
