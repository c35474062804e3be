//! `udp-director-perf`: a UDP echo server and a load generator that measure round trips and
//! latency (HDR histograms) directly or through the proxy, with the proxy's token flow.
//!
//! Everything stays on loopback and every run stops by itself.

mod churn;
mod compare;
mod echo;
mod fastpath;
mod flood;
mod handoff;
mod listeners;
mod load;
mod migrate;
mod proxy;
mod query;
mod report;
mod sessions;
mod soak;
mod tcp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator and echo server for udp-director.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A multi-threaded UDP echo server (SO_REUSEPORT), the game-server stand-in.
    Echo(echo::EchoArgs),
    /// K clients, each keeping W datagrams in flight; reports round trips/s, loss and latency.
    Load(load::LoadArgs),
    /// One client, one datagram in flight: pure latency.
    Latency(load::LoadArgs),
    /// Query-port throughput and latency.
    Query(query::QueryArgs),
    /// N concurrent sessions: setup rate, proxy memory per session, no cross-talk.
    Sessions(sessions::SessionsArgs),
    /// One client process of `sessions` (started by it).
    #[command(hide = true)]
    SessionsClient(sessions::ClientArgs),
    /// Live migrations under load: loss, wrong-server replies, time to the new server.
    Migrate(migrate::MigrateArgs),
    /// Direct vs through the proxy (and other proxies), interleaved, with ratios.
    Compare(compare::CompareArgs),
    /// TCP data port: MB/s and connection setups/s, direct vs through the proxy.
    Tcp(tcp::TcpArgs),
    /// Live sessions' throughput with and without a session-less flood from one address.
    Flood(flood::FloodArgs),
    /// Everything at once for a long time: the proxy's RSS and open fds, sampled.
    Soak(soak::SoakArgs),
    /// N idle UDP forwarders: time to open, memory, descriptors, idle CPU, first vs last.
    Listeners(listeners::ListenersArgs),
    /// The control thread at fleet scale, on a real API server: GameServer status churn,
    /// control CPU, query latency, time to apply a Forwarder change.
    Churn(churn::ChurnArgs),
    /// The kernel fast path against plain routing and the proxy in user space (root only).
    ///
    /// Makes a client and a server network namespace, each joined to this host by a veth pair
    /// (PREFIX.1.0/24 and PREFIX.2.0/24, `--prefix`, default 10.77), with an echo server in the
    /// server namespace and the load in the client namespace, and measures, round by round
    /// (`--rounds`, default 2) at each load (`--shapes`, default 64x32,1x1; `--seconds` each,
    /// default 5, after `--warmup`): this host routing between the namespaces, the proxy in user
    /// space (a UDP Forwarder on 0.0.0.0), and the same proxy with `fastPath: {kind: tc}` on both
    /// host ends (`--baseline-bin` adds another proxy binary in user space). Reports round
    /// trips/s, loss, p50/p99 and what each adds over routing, the whole machine's CPU per round
    /// trip and the proxy's own, the share of upstream datagrams the kernel carried, and whether
    /// the fast path's goals are met. `--proxy-log debug` keeps the proxy's logs (why a session
    /// was not offloaded); `--plain-checksums` turns checksum offload off on every veth end.
    /// Everything it makes is removed when it ends, on Ctrl-C and on a panic too.
    #[command(name = "fastpath")]
    FastPath(fastpath::FastPathArgs),
    /// An upgrade under load: proxy B takes over from proxy A (SPEC §12) while N sessions
    /// carry traffic.
    ///
    /// Proxy A (`--proxy-workers`, default 2) serves `--sessions` UDP forwarder sessions
    /// (default 10000, spread over `--backends` echo backends, default 10) with `--rate`
    /// datagrams/s in all (default 1000); after `--before` seconds (default 2) B starts on A's
    /// config file and takes over through the hand-off socket, the load goes on for `--after`
    /// seconds (default 3), A exits, and every session sends once more. Reports the sessions
    /// and datagrams lost, the longest gap in replies across the hand-off, round trips before
    /// and after, and what A and B say they moved; checks the goals (no session lost, no
    /// datagram lost, a gap under 50 ms). `--rounds` repeats with fresh proxies.
    #[command(name = "handoff")]
    HandOff(handoff::HandOffArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Echo(a) => echo::run(&a),
        Command::Load(a) => load::run(&a).map(|_| ()),
        Command::Latency(mut a) => {
            a.shape.clients = 1;
            a.shape.window = 1;
            load::run(&a).map(|_| ())
        }
        Command::Query(a) => query::run(&a),
        Command::Sessions(a) => sessions::run(&a),
        Command::SessionsClient(a) => sessions::run_client(&a),
        Command::Migrate(a) => migrate::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Tcp(a) => tcp::run(&a),
        Command::Flood(a) => flood::run(&a),
        Command::Soak(a) => soak::run(&a),
        Command::Listeners(a) => listeners::run(&a),
        Command::Churn(a) => churn::run(&a),
        Command::FastPath(a) => fastpath::run(&a),
        Command::HandOff(a) => handoff::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-director-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}
