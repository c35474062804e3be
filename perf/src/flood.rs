//! `flood`: one source address sending garbage as fast as it can (no token, so no session:
//! every datagram meets `rateLimit`) beside live token sessions; their throughput with and
//! without the flood, rounds interleaved, and the flood's drops as the proxy counted them.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context as _;

use crate::echo::Echo;
use crate::load::{LoadArgs, Shape};
use crate::proxy::{ProxyArgs, Server};

#[derive(Debug, clap::Args)]
pub(crate) struct FloodArgs {
    /// The sessions' load.
    #[command(flatten)]
    pub(crate) shape: Shape,
    /// Rounds of (quiet, flooded).
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// The proxy's rateLimit.perIpPacketsPerSecond (and burst).
    #[arg(long, default_value_t = 100)]
    pub(crate) per_ip_packets_per_second: u32,
    /// The flooder's address (a loopback address other than the sessions').
    #[arg(long, default_value = "127.0.0.2:0")]
    pub(crate) flood_from: SocketAddr,
}

pub(crate) fn run(args: &FloodArgs) -> anyhow::Result<()> {
    let echo = Echo::start("127.0.0.1:0".parse()?, 1, None)?;
    let pps = args.per_ip_packets_per_second;
    let proxy = args.proxy.start_tokens_only(
        &[Server {
            name: "echo",
            addr: echo.addr,
        }],
        &format!("rateLimit: {{perIpPacketsPerSecond: {pps}, perIpBurst: {pps}}}\n"),
    )?;
    if args.shape.clients as u64 >= u64::from(pps) {
        anyhow::bail!(
            "--clients must be under --per-ip-packets-per-second: the sessions' own first \
             datagrams come from one address too"
        );
    }
    let mut quiet = None;
    let mut flooded = None;
    let mut flood_sent = 0u64;
    for round in 0..args.rounds {
        for flood in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            // Bound here, so a flood address this machine lacks fails the run instead of
            // leaving the "flooded" rounds quiet.
            let socket = flood
                .then(|| UdpSocket::bind(args.flood_from))
                .transpose()
                .with_context(|| format!("binding the flooder to {}", args.flood_from))?;
            let flooder = socket.map(|s| {
                let (stop, sent, to) = (Arc::clone(&stop), Arc::clone(&sent), proxy.data);
                std::thread::spawn(move || {
                    let junk = [0x5au8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if s.send_to(&junk, to).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            });
            let load = LoadArgs {
                target: proxy.data,
                query: Some(proxy.query),
                resource_type: "gameserver".into(),
                shape: args.shape.clone(),
                proxy_pid: Some(proxy.pid),
                label: format!("{}#{}", if flood { "flooded" } else { "quiet" }, round + 1),
                hgrm: None,
                svg: None,
            };
            let r = crate::load::run(&load)?;
            stop.store(true, Ordering::Relaxed);
            if let Some(t) = flooder {
                let _ = t.join();
            }
            flood_sent += sent.load(Ordering::Relaxed);
            let total = if flood { &mut flooded } else { &mut quiet };
            match total {
                None => *total = Some(r),
                Some(t) => t.append(&r)?,
            }
        }
    }
    let rate = |r: &Option<crate::load::Report>| {
        r.as_ref().map_or(0.0, |r| r.round_trips as f64 / r.seconds)
    };
    let (q, f) = (rate(&quiet), rate(&flooded));
    let limited = metric(
        proxy.admin,
        r#"udp_director_packets_dropped_total{reason="rate_limited",source="client"}"#,
    );
    println!(
        "\nsummary: {} sessions x {} in flight; quiet {q:.0} rt/s, under a flood {f:.0} rt/s ({:.1} %); \
         the flood sent {flood_sent} datagrams, {limited} dropped as rate_limited",
        args.shape.clients,
        args.shape.window,
        if q > 0.0 { f / q * 100.0 } else { 0.0 }
    );
    println!(
        "{}",
        serde_json::json!({
            "summary": "flood",
            "clients": args.shape.clients,
            "window": args.shape.window,
            "quiet_round_trips_per_second": q,
            "flooded_round_trips_per_second": f,
            "flood_datagrams": flood_sent,
            "rate_limited": limited,
        })
    );
    Ok(())
}

/// One series of the proxy's `/metrics` (0 when absent).
pub(crate) fn metric(admin: SocketAddr, series: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
