//! Query-port benchmark: C connections, each sending one request and waiting for its answer
//! before the next; reports queries/s and the latency distribution.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

/// Arguments of `query`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The proxy's query port.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub(crate) addr: SocketAddr,
    /// The request line to send.
    #[arg(long, default_value = r#"{"resourceType":"gameserver"}"#)]
    pub(crate) request: String,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) duration: f64,
}

pub(crate) fn run(args: &QueryArgs) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let results: Vec<anyhow::Result<(Histogram<u64>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.connections)
            .map(|_| s.spawn(|| one_connection(args, end)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for r in results {
        let (h, e) = r?;
        histogram.add(&h)?;
        errors += e;
    }
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
            "error_answers": errors, "p50_us": us(0.5), "p99_us": us(0.99), "p999_us": us(0.999)})
    );
    Ok(())
}

fn one_connection(args: &QueryArgs, end: Instant) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    let stream = TcpStream::connect(args.addr)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let request = format!("{}\n", args.request);
    while Instant::now() < end {
        let started = Instant::now();
        writer.write_all(request.as_bytes())?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the proxy closed the connection");
        }
        histogram.record(started.elapsed().as_nanos() as u64)?;
        if line.contains("\"error\"") {
            errors += 1;
        }
    }
    Ok((histogram, errors))
}
