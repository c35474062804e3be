//! The measured window of `churn`: GameServer status patches at a steady rate, queries at a
//! steady rate and forwarder changes, side by side, while the CPU counters are sampled.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;

use super::cluster::{
    ApiServer, CHANGE_LABEL, Cluster, Runtime, create, forwarder, forwarders, gameservers,
};
use super::proxy::{ChurnProxy, Cores, CpuSnapshot};
use super::{CHANGE_TIMEOUT, ChurnArgs, PATCHES_IN_FLIGHT};

/// What the measured window saw.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) seconds: f64,
    pub(super) cores: Cores,
    /// The control thread's busiest second.
    pub(super) control_peak: f64,
    pub(super) patches: Patches,
    pub(super) queries: Queries,
    pub(super) changes: Vec<Change>,
}

/// The GameServer status patches of the window.
#[derive(Debug)]
pub(super) struct Patches {
    pub(super) sent: u64,
    pub(super) failed: u64,
    pub(super) first_error: Option<String>,
    /// The API server's answer time, in nanoseconds.
    pub(super) latency: Histogram<u64>,
}

/// The queries of the window.
#[derive(Debug)]
pub(super) struct Queries {
    /// From each query's send to its answer, in nanoseconds.
    pub(super) latency: Histogram<u64>,
    /// From each query's place in the schedule to its answer: what a client arriving on
    /// schedule waits, the time queued behind a slow answer included (one connection sends
    /// one query at a time, so a stall would otherwise hide the queries it held back).
    pub(super) scheduled: Histogram<u64>,
    /// Answers that were errors, and the first one.
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// The proxy's own answer times over the window, from its histogram: what of the latency
    /// is the proxy's, apart from the machine's scheduling of both sides.
    pub(super) proxy_side: ProxySide,
}

/// The window's share of `udp_director_query_duration_seconds` (parse to token, in the proxy).
#[derive(Debug, Default)]
pub(super) struct ProxySide {
    /// Answers counted.
    pub(super) answers: u64,
    /// The upper bound of the bucket that holds the 99th percentile, in milliseconds.
    pub(super) p99_at_most_ms: f64,
    /// Answers that took over 0.8 ms (the histogram's boundary nearest below 1 ms).
    pub(super) over_800us: u64,
}

impl ProxySide {
    /// From the histogram's buckets before and after the window.
    pub(super) fn between(before: &[(f64, u64)], after: &[(f64, u64)]) -> Self {
        let delta: Vec<(f64, u64)> = after
            .iter()
            .map(|(le, n)| {
                let was = before.iter().find(|(b, _)| b == le).map_or(0, |(_, n)| *n);
                (*le, n.saturating_sub(was))
            })
            .collect();
        let answers = delta.last().map_or(0, |(_, n)| *n);
        let p99_at_most_ms = delta
            .iter()
            .find(|(_, n)| *n as f64 >= answers as f64 * 0.99)
            .map_or(f64::NAN, |(le, _)| le * 1e3);
        let under = delta
            .iter()
            .filter(|(le, _)| *le <= 0.000_800_1)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        Self {
            answers,
            p99_at_most_ms,
            over_800us: answers.saturating_sub(under),
        }
    }
}

/// One forwarder change: what, and how long until its new listener echoed.
#[derive(Debug)]
pub(super) struct Change {
    pub(super) kind: &'static str,
    pub(super) name: String,
    pub(super) port: u16,
    /// From the API write returning to the first echo; None: not within [`CHANGE_TIMEOUT`].
    pub(super) seconds: Option<f64>,
}

impl Window {
    pub(super) fn run(
        args: &ChurnArgs,
        runtime: &Runtime,
        cluster: &Cluster,
        proxy: &ChurnProxy,
        apiserver: &ApiServer,
        spare_ports: &[u16],
        echo: SocketAddr,
    ) -> anyhow::Result<Self> {
        let span = Duration::from_secs_f64(args.duration);
        let stop = Arc::new(AtomicBool::new(false));
        let answered_before = proxy.answer_buckets();
        let start = CpuSnapshot::take(proxy, apiserver);
        let end = start.at + span;
        let patcher = runtime.handle.spawn(patch_statuses(
            cluster.api(&gameservers()),
            args.gameservers,
            args.patch_rate,
            Arc::clone(&stop),
        ));
        let (cores, control_peak, queries, changes) = std::thread::scope(|s| {
            let queries = s.spawn(|| query_steadily(proxy.query, &cluster.namespace, args, end));
            let changes = s.spawn(|| {
                change_forwarders(runtime, cluster, args, spare_ports, echo, start.at, span)
            });
            let mut last = start;
            let mut peak: f64 = 0.0;
            while Instant::now() < end {
                std::thread::sleep(
                    end.saturating_duration_since(Instant::now())
                        .min(Duration::from_secs(1)),
                );
                let now = CpuSnapshot::take(proxy, apiserver);
                peak = peak.max(Cores::between(&last, &now).control);
                last = now;
            }
            stop.store(true, Ordering::Relaxed);
            let cores = Cores::between(&start, &last);
            let join = |e| anyhow::anyhow!("a thread of the window panicked: {e:?}");
            anyhow::Ok((
                cores,
                peak,
                queries.join().map_err(join)??,
                changes.join().map_err(join)??,
            ))
        })?;
        let patches = runtime.block_on(patcher)??;
        let mut queries = queries;
        queries.proxy_side = ProxySide::between(&answered_before, &proxy.answer_buckets());
        Ok(Self {
            seconds: span.as_secs_f64(),
            cores,
            control_peak,
            patches,
            queries,
            changes,
        })
    }
}

/// Patches GameServer statuses at `rate` per second until `stop`: each flips one random
/// server between Ready and Allocated, so every patch is a change the proxy is told of.
async fn patch_statuses(
    api: Api<DynamicObject>,
    count: usize,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Patches> {
    let mut allocated = vec![false; count];
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PATCHES_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut patches = Patches {
        sent: 0,
        failed: 0,
        first_error: None,
        latency: Histogram::new(3)?,
    };
    let count_one = |done: Result<(Duration, Result<(), String>), _>, p: &mut Patches| match done {
        Ok((took, Ok(()))) => {
            let _ = p.latency.record(took.as_nanos() as u64);
        }
        Ok((_, Err(e))) => {
            p.failed += 1;
            p.first_error.get_or_insert(e);
        }
        Err(e) => {
            p.failed += 1;
            p.first_error.get_or_insert(format!("{e}"));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let i = fastrand::usize(..count);
        allocated[i] = !allocated[i];
        let state = if allocated[i] { "Allocated" } else { "Ready" };
        let api = api.clone();
        patches.sent += 1;
        tasks.spawn(async move {
            let began = Instant::now();
            let body = json!({"status": {"state": state}});
            let result = api
                .patch_status(
                    &format!("gs-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            drop(permit);
            (began.elapsed(), result)
        });
        while let Some(done) = tasks.try_join_next() {
            count_one(done, &mut patches);
        }
    }
    while let Some(done) = tasks.join_next().await {
        count_one(done, &mut patches);
    }
    Ok(patches)
}

/// Queries the query port at `query_rate` on one connection until `end`: a Ready server of a
/// random fleet, as a matchmaker would ask. The schedule is kept: after a slow answer the
/// queries it held back go at once, one after another, until the schedule is met again.
fn query_steadily(
    addr: SocketAddr,
    namespace: &str,
    args: &ChurnArgs,
    end: Instant,
) -> anyhow::Result<Queries> {
    use std::io::{BufRead, BufReader, Write};
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut queries = Queries {
        latency: Histogram::new(3)?,
        scheduled: Histogram::new(3)?,
        errors: 0,
        first_error: None,
        proxy_side: ProxySide::default(),
    };
    let every = Duration::from_secs_f64(1.0 / args.query_rate);
    let mut next = Instant::now();
    let mut line = String::new();
    while next < end {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let request = format!(
            "{}\n",
            json!({"resourceType": "gameserver", "namespace": namespace,
                "labelSelector": {"agones.dev/fleet": format!("fleet-{}", fastrand::usize(..args.fleets))},
                "statusQuery": {"jsonPath": "status.state", "expectedValue": "Ready"}})
        );
        let began = Instant::now();
        writer.write_all(request.as_bytes())?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the proxy closed the query connection");
        }
        queries.latency.record(began.elapsed().as_nanos() as u64)?;
        queries.scheduled.record(next.elapsed().as_nanos() as u64)?;
        if line.contains("\"error\"") {
            queries.errors += 1;
            queries
                .first_error
                .get_or_insert_with(|| line.trim().to_owned());
        }
        next += every;
    }
    Ok(queries)
}

/// Changes forwarders at evenly spread moments of the window: a forwarder moved to a spare
/// port, then a new forwarder on one, taking turns; each timed from the write returning to
/// the first datagram echoed through its new listener.
fn change_forwarders(
    runtime: &Runtime,
    cluster: &Cluster,
    args: &ChurnArgs,
    spare_ports: &[u16],
    echo: SocketAddr,
    start: Instant,
    span: Duration,
) -> anyhow::Result<Vec<Change>> {
    let api = cluster.api(&forwarders());
    let mut changes = Vec::new();
    let n = spare_ports.len();
    for (k, &port) in spare_ports.iter().enumerate() {
        let at = start + span.mul_f64((k as f64 + 0.5) / n as f64);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (kind, name) = if k % 2 == 0 {
            (
                "move",
                format!("fwd-{}", fastrand::usize(..args.forwarders)),
            )
        } else {
            ("create", format!("fwd-new-{k}"))
        };
        let written = runtime.block_on(async {
            match kind {
                "move" => {
                    let body = json!({"spec": {"udp": {"listenPort": port}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                        .await
                        .map(drop)
                        .with_context(|| format!("moving {name}"))
                }
                _ => {
                    let (key, value) = CHANGE_LABEL.split_once('=').unwrap_or_default();
                    let labels = json!({ key: value });
                    let object = forwarder(&cluster.namespace, &name, port, echo, labels);
                    create(&api, object).await
                }
            }
        });
        written?;
        let seconds = echoes_within(port, CHANGE_TIMEOUT)?.map(|d| d.as_secs_f64());
        changes.push(Change {
            kind,
            name,
            port,
            seconds,
        });
    }
    Ok(changes)
}

/// How long until a datagram sent to 127.0.0.1:`port` comes back (one every millisecond), or
/// None within `timeout`.
pub(super) fn echoes_within(port: u16, timeout: Duration) -> anyhow::Result<Option<Duration>> {
    let began = Instant::now();
    let probe = UdpSocket::bind("127.0.0.1:0")?;
    probe.set_read_timeout(Some(Duration::from_millis(1)))?;
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut buf = [0u8; 64];
    while began.elapsed() < timeout {
        probe.send_to(b"churn", to)?;
        match probe.recv_from(&mut buf) {
            Ok((_, from)) if from == to => return Ok(Some(began.elapsed())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}
