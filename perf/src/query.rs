//! Query-port benchmark: C connections, each sending one request and waiting for its answer
//! before the next; reports queries/s, the latency distribution and error answers by code.
//! With `--allocate`, allocating queries against plain ones on a real API server (`allocate`).

mod allocate;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

use crate::proxy::ProxyArgs;

/// Arguments of `query`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The proxy's query port (not with `--allocate`, which starts its own proxy).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub(crate) addr: SocketAddr,
    /// The request line to send (not with `--allocate`).
    #[arg(long, default_value = r#"{"resourceType":"gameserver"}"#)]
    pub(crate) request: String,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Measured seconds (with `--allocate`: of each phase).
    #[arg(long, default_value_t = 3.0)]
    pub(crate) duration: f64,
    /// Allocating queries (`"allocate": true`) against plain selection ones, interleaved, on
    /// the suite's API server with the stand-in for Agones' allocation API: starts its own
    /// proxy (the release `udp-director` beside this binary, or `--proxy-bin`) on a namespace
    /// of `--gameservers` Allocated GameServers, and deletes the namespace at the end. Needs
    /// `--k8s-run`, root (the stand-in's network namespace), `ip`, `openssl` and `kubectl`.
    #[arg(long)]
    pub(crate) allocate: bool,
    /// With `--allocate`: a running API server's directory (`scripts/k8s-apiserver.sh start
    /// DIR`, with the aggregation layer; its admin kubeconfig DIR/kubeconfig is the proxy's).
    #[arg(long, env = "UDP_DIRECTOR_K8S_RUN")]
    pub(crate) k8s_run: Option<PathBuf>,
    /// With `--allocate`: GameServers, all Allocated with a `players` counter of room enough
    /// for any run, so the mapping's backfill selector always finds one.
    #[arg(long, default_value_t = 50)]
    pub(crate) gameservers: usize,
    /// With `--allocate`: rounds, each a plain phase then an allocating one.
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    /// With `--allocate`: the proxy to start.
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
}

/// What some connections' answers came to.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Every answer's time from the request's write to the answer's line, in ns.
    pub(crate) histogram: Histogram<u64>,
    /// Answers with a token.
    pub(crate) tokens: u64,
    /// Error answers by their `code` (`unreadable` for an answer that is neither).
    pub(crate) codes: BTreeMap<String, u64>,
}

impl Tally {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::new(3)?,
            tokens: 0,
            codes: BTreeMap::new(),
        })
    }

    pub(crate) fn add(&mut self, other: &Self) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.tokens += other.tokens;
        for (code, n) in &other.codes {
            *self.codes.entry(code.clone()).or_default() += n;
        }
        Ok(())
    }

    /// Answers without a token.
    pub(crate) fn errors(&self) -> u64 {
        self.codes.values().sum()
    }

    /// The latency at quantile `q`, in ms (NaN without answers).
    pub(crate) fn ms(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            f64::NAN
        } else {
            self.histogram.value_at_quantile(q) as f64 / 1e6
        }
    }

    /// The slowest answer, in ms (NaN without answers).
    pub(crate) fn max_ms(&self) -> f64 {
        if self.histogram.is_empty() {
            f64::NAN
        } else {
            self.histogram.max() as f64 / 1e6
        }
    }
}

pub(crate) fn run(args: &QueryArgs) -> anyhow::Result<()> {
    if args.allocate {
        return allocate::run(args);
    }
    let (tally, _) = measure(args.addr, &args.request, args.connections, args.duration)?;
    let histogram = &tally.histogram;
    let errors = tally.errors();
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let rate = histogram.len() as f64 / args.duration;
    println!(
        "query        {} connections: {rate:>8.0} queries/s  error answers {errors}  p50 {:.1} µs  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        args.connections,
        us(0.5),
        us(0.99),
        us(0.999),
        histogram.max() as f64 / 1000.0
    );
    println!(
        "{}",
        serde_json::json!({"label": "query", "connections": args.connections, "queries_per_second": rate,
            "error_answers": errors, "errors_by_code": tally.codes, "p50_us": us(0.5),
            "p99_us": us(0.99), "p999_us": us(0.999)})
    );
    Ok(())
}

/// `connections` connections to `addr`, each sending `request` and waiting for its answer
/// before the next, for `seconds`; with the seconds until the last answer came, which is later
/// by up to the slowest answer.
pub(crate) fn measure(
    addr: SocketAddr,
    request: &str,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<(Tally, f64)> {
    let began = Instant::now();
    let end = began + Duration::from_secs_f64(seconds);
    let results: Vec<anyhow::Result<Tally>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|_| s.spawn(|| one_connection(addr, request, end)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a connection's thread panicked"))
            })
            .collect()
    });
    let elapsed = began.elapsed().as_secs_f64();
    let mut tally = Tally::new()?;
    for r in results {
        tally.add(&r?)?;
    }
    Ok((tally, elapsed))
}

fn one_connection(addr: SocketAddr, request: &str, end: Instant) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let request = format!("{request}\n");
    while Instant::now() < end {
        let started = Instant::now();
        writer.write_all(request.as_bytes())?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the proxy closed the connection");
        }
        tally
            .histogram
            .record(started.elapsed().as_nanos() as u64)?;
        // A token answer is counted without parsing it: the loop stays as cheap as it was.
        if line.contains("\"token\"") {
            tally.tokens += 1;
        } else {
            let answer: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let code = answer["code"].as_str().unwrap_or("unreadable");
            *tally.codes.entry(code.to_owned()).or_default() += 1;
        }
    }
    Ok(tally)
}
