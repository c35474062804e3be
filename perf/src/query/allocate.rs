//! `query --allocate`: what allocation on query costs next to plain selection, in one run. On
//! the suite's API server (`--k8s-run`), with the stand-in for Agones' allocation API (testkit)
//! registered through its aggregation layer, a namespace holds N GameServers, all Allocated
//! with a `players` counter of huge capacity, so the backfill selector always finds room. The
//! proxy (the Kubernetes inventory on that namespace, as the API server's admin) is asked, in
//! interleaved rounds: plain selection queries (`statusQuery` Allocated, answered from its watch
//! cache) and allocating ones (`"allocate": true`: a `GameServerAllocation` through the API
//! server to the stand-in, which lists the namespace and writes the chosen server twice).
//!
//! The stand-in takes candidates in name order and does not batch, as Agones' allocator does:
//! concurrent allocations all pick the first server and all but one meet `Contention`, which
//! the proxy retries with a back-off. The figure is the proxy's allocation path on a contended
//! server, not Agones' throughput.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use testkit::agones::AgonesAllocatorStandIn;

use super::{QueryArgs, Tally};

/// The players counter's capacity on every GameServer: no run comes near it.
const PLAYERS_CAPACITY: i64 = 1_000_000_000;
/// The label every GameServer carries, and both queries select by.
const FLEET: &str = "perf";
/// API writes in flight while creating the GameServers.
const CREATES_IN_FLIGHT: usize = 16;
/// How long the proxy may take to print its addresses, and then to be ready.
const PROXY_START_WITHIN: Duration = Duration::from_secs(30);

/// One kind of query's figures over every round.
#[derive(Debug)]
struct Side {
    tally: Tally,
    /// From each phase's start to its last answer, summed.
    seconds: f64,
    /// The stand-in's creates during this kind's phases, by state (retries included).
    standin: BTreeMap<String, u64>,
    /// The GameServers those creates allocated, by name.
    allocated_onto: BTreeMap<String, u64>,
    /// `udp_director_allocations_total` by result, counted during this kind's phases.
    proxy_allocations: BTreeMap<String, f64>,
}

pub(super) fn run(args: &QueryArgs) -> anyhow::Result<()> {
    let run = args.k8s_run.as_deref().context(
        "--allocate needs the suite's API server: --k8s-run DIR (or UDP_DIRECTOR_K8S_RUN)",
    )?;
    if !run.join("kubeconfig").exists() {
        bail!(
            "no kubeconfig in {} (start one: scripts/k8s-apiserver.sh start {0})",
            run.display()
        );
    }
    if args.gameservers == 0 || args.rounds == 0 || args.connections == 0 {
        bail!("--gameservers, --rounds and --connections must be at least 1");
    }
    let bin = match &args.proxy.proxy_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("udp-director"),
    };
    if !bin.exists() {
        bail!(
            "no proxy binary at {} (build it: cargo build --release; or pass --proxy-bin)",
            bin.display()
        );
    }
    let standin = AgonesAllocatorStandIn::start(run)?;
    eprintln!(
        "query --allocate: the stand-in for Agones' allocation API listens on {}",
        standin.addr
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let namespace = format!("perf-allocate-{}", std::process::id());
    let client = runtime.block_on(client_for(&run.join("kubeconfig")))?;
    let result = runtime
        .block_on(populate(&client, &namespace, args.gameservers))
        .and_then(|()| {
            let proxy = AllocatingProxy::start(&bin, args.proxy.proxy_workers, run, &namespace)?;
            measure(args, &proxy, standin, &namespace)
        });
    if let Err(e) = runtime.block_on(delete_all(&client, &namespace)) {
        eprintln!("query --allocate: cleanup of namespace {namespace}: {e:#}");
    }
    result
}

/// The rounds, each a plain phase then an allocating one, and the report.
fn measure(
    args: &QueryArgs,
    proxy: &AllocatingProxy,
    standin: &AgonesAllocatorStandIn,
    namespace: &str,
) -> anyhow::Result<()> {
    let select = json!({"resourceType": "gameserver", "namespace": namespace,
        "labelSelector": {"agones.dev/fleet": FLEET},
        "statusQuery": {"jsonPath": "status.state", "expectedValue": "Allocated"}})
    .to_string();
    let allocate = json!({"resourceType": "gameserver", "namespace": namespace,
        "labelSelector": {"agones.dev/fleet": FLEET}, "allocate": true})
    .to_string();
    // The watch has every server: a plain query answers with a token.
    crate::load::token(proxy.query, &select).context("the proxy's first plain query")?;
    let mut sides = [Side::new()?, Side::new()?];
    for round in 1..=args.rounds {
        for (side, (name, request)) in sides
            .iter_mut()
            .zip([("select", &select), ("allocate", &allocate)])
        {
            let served_before = standin.requests(namespace).len();
            let metrics_before = proxy.allocations_total();
            let (tally, seconds) =
                super::measure(proxy.query, request, args.connections, args.duration)?;
            let served = standin.requests(namespace);
            for record in &served[served_before.min(served.len())..] {
                *side.standin.entry(record.state.clone()).or_default() += 1;
                if let Some(gs) = &record.game_server {
                    *side.allocated_onto.entry(gs.clone()).or_default() += 1;
                }
            }
            for (result, count) in proxy.allocations_total() {
                let before = metrics_before.get(&result).copied().unwrap_or(0.0);
                *side.proxy_allocations.entry(result).or_default() += count - before;
            }
            eprintln!(
                "query --allocate: round {round} {name:<8} {:>8.0} queries/s  p50 {:.3} ms  p99 \
                 {:.3} ms  errors {}",
                tally.histogram.len() as f64 / seconds,
                tally.ms(0.5),
                tally.ms(0.99),
                tally.errors()
            );
            side.tally.add(&tally)?;
            side.seconds += seconds;
        }
    }
    print(args, &sides);
    Ok(())
}

impl Side {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            tally: Tally::new()?,
            seconds: 0.0,
            standin: BTreeMap::new(),
            allocated_onto: BTreeMap::new(),
            proxy_allocations: BTreeMap::new(),
        })
    }

    fn rate(&self) -> f64 {
        self.tally.histogram.len() as f64 / self.seconds
    }

    fn json(&self) -> Value {
        let us = |q: f64| self.tally.ms(q) * 1e3;
        json!({"queries_per_second": self.rate(), "seconds": self.seconds, "answers": self.tally.histogram.len(),
            "tokens": self.tally.tokens, "error_answers": self.tally.errors(),
            "errors_by_code": self.tally.codes, "p50_us": us(0.5), "p99_us": us(0.99),
            "p999_us": us(0.999), "max_us": self.tally.max_ms() * 1e3,
            "standin_creates": self.standin, "allocated_onto_servers": self.allocated_onto.len(),
            "proxy_allocations": self.proxy_allocations})
    }
}

/// Both kinds side by side, then the JSON line.
fn print(args: &QueryArgs, sides: &[Side; 2]) {
    let [select, allocate] = sides;
    println!(
        "query --allocate  {} connections, {} GameServers (Allocated, players capacity \
         {PLAYERS_CAPACITY}), {} rounds of {} s each kind, interleaved",
        args.connections, args.gameservers, args.rounds, args.duration
    );
    println!("{:<28} {:>16} {:>16}", "", "select", "allocate");
    let row = |label: &str, f: &dyn Fn(&Side) -> String| {
        println!("{label:<28} {:>16} {:>16}", f(select), f(allocate));
    };
    row("queries/s", &|s| format!("{:.0}", s.rate()));
    row("p50 ms", &|s| format!("{:.3}", s.tally.ms(0.5)));
    row("p99 ms", &|s| format!("{:.3}", s.tally.ms(0.99)));
    row("p99.9 ms", &|s| format!("{:.3}", s.tally.ms(0.999)));
    row("max ms", &|s| format!("{:.3}", s.tally.max_ms()));
    row("answers with a token", &|s| s.tally.tokens.to_string());
    row("error answers", &|s| s.tally.errors().to_string());
    let codes: std::collections::BTreeSet<&String> =
        sides.iter().flat_map(|s| s.tally.codes.keys()).collect();
    for code in codes {
        row(&format!("  {code}"), &|s| {
            s.tally.codes.get(code).copied().unwrap_or(0).to_string()
        });
    }
    let states: std::collections::BTreeSet<&String> =
        sides.iter().flat_map(|s| s.standin.keys()).collect();
    row("stand-in creates", &|s| {
        s.standin.values().sum::<u64>().to_string()
    });
    for state in states {
        row(&format!("  {state}"), &|s| {
            s.standin.get(state).copied().unwrap_or(0).to_string()
        });
    }
    row("GameServers allocated onto", &|s| {
        s.allocated_onto.len().to_string()
    });
    row("proxy allocations_total", &|s| {
        let counted: Vec<String> = s
            .proxy_allocations
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(result, n)| format!("{result} {n:.0}"))
            .collect();
        if counted.is_empty() {
            "-".into()
        } else {
            counted.join(", ")
        }
    });
    println!(
        "{}",
        json!({"label": "query-allocate", "connections": args.connections,
            "gameservers": args.gameservers, "rounds": args.rounds,
            "seconds_each": args.duration, "select": select.json(), "allocate": allocate.json()})
    );
}

/// The proxy under test: the Kubernetes inventory on the run's namespace, as the API server's
/// admin, with an allocating mapping that backfills on `players`. Killed on drop.
#[derive(Debug)]
struct AllocatingProxy {
    child: Child,
    dir: PathBuf,
    query: SocketAddr,
    admin: SocketAddr,
}

impl AllocatingProxy {
    fn start(
        bin: &Path,
        workers: Option<usize>,
        run: &Path,
        namespace: &str,
    ) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("udp-director-perf-allocate-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let workers = workers
            .map(|w| format!("workers: {w}\n"))
            .unwrap_or_default();
        let config = format!(
            "bindAddress: 127.0.0.1\nqueryPort: 0\nadminPort: 0\ndataPort: 0\ndrainSeconds: 0\n\
             {workers}inventory: {{kind: kubernetes, watchNamespaces: [{namespace}]}}\n\
             resourceQueryMapping:\n  gameserver: {{group: agones.dev, version: v1, \
             resource: gameservers, addressPath: status.address, portName: default, \
             allocation: {{backfill: {{counter: players}}, \
             counters: {{players: {{action: Increment}}}}}}}}\n"
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let stdout = std::fs::File::create(dir.join("stdout"))?;
        let stderr = std::fs::File::create(dir.join("proxy.log"))?;
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("--config")
            .arg(dir.join("config.yaml"))
            .env("KUBECONFIG", run.join("kubeconfig"))
            .env("POD_NAMESPACE", namespace)
            .env("NODE_NAME", "perf")
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut proxy = Self {
            child,
            dir,
            query: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        // The proxy's one line: `listening query=… admin=… data=…`.
        let line = loop {
            let out = std::fs::read_to_string(proxy.dir.join("stdout")).unwrap_or_default();
            if let Some(line) = out.lines().find(|l| l.starts_with("listening ")) {
                break line.to_owned();
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                bail!("the proxy exited ({status}): {}", proxy.log_tail());
            }
            if started.elapsed() > PROXY_START_WITHIN {
                bail!("the proxy printed no listening line: {}", proxy.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in the proxy's line {line:?}"))
        };
        proxy.query = field("query=")?.parse()?;
        proxy.admin = field("admin=")?.parse()?;
        // Ready: every initial list is done.
        while crate::soak::http_get(proxy.admin, "/readyz").is_none() {
            if started.elapsed() > PROXY_START_WITHIN {
                bail!(
                    "the proxy was not ready within {PROXY_START_WITHIN:?}: {}",
                    proxy.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proxy)
    }

    /// `udp_director_allocations_total` by result (empty when the metrics cannot be read).
    fn allocations_total(&self) -> BTreeMap<String, f64> {
        let metrics = crate::soak::http_get(self.admin, "/metrics").unwrap_or_default();
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("udp_director_allocations_total{result=\""))
            .filter_map(|l| {
                let (result, count) = l.split_once("\"} ")?;
                Some((result.to_owned(), count.trim().parse().ok()?))
            })
            .collect()
    }

    /// The last lines of the proxy's log, for an error.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AllocatingProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client of the API server as the user of `kubeconfig`.
async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn gameservers() -> ApiResource {
    resource("agones.dev", "v1", "GameServer", "gameservers")
}

fn namespaces(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &resource("", "v1", "Namespace", "namespaces"),
    )
}

/// Creates `namespace` and `count` GameServers in it, each written Allocated with room on its
/// `players` counter, as the Agones controller would after an allocation.
async fn populate(client: &kube::Client, namespace: &str, count: usize) -> anyhow::Result<()> {
    let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
    namespaces(client)
        .create(&PostParams::default(), &serde_json::from_value(object)?)
        .await
        .with_context(|| format!("creating namespace {namespace}"))?;
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &gameservers());
    let began = Instant::now();
    let mut results = futures::stream::iter(0..count)
        .map(|i| {
            let api = &api;
            async move {
                let name = format!("gs-{i:05}");
                let object = json!({"apiVersion": "agones.dev/v1", "kind": "GameServer",
                    "metadata": {"name": name, "namespace": namespace,
                        "labels": {"agones.dev/fleet": FLEET}},
                    "spec": {"ports": [{"name": "default", "containerPort": 7777}]}});
                api.create(&PostParams::default(), &serde_json::from_value(object)?)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                let address = format!("10.77.{}.{}", i / 256 % 256, i % 256);
                let status = json!({"status": {"state": "Allocated", "address": address,
                    "ports": [{"name": "default", "port": 7777}],
                    "counters": {"players": {"count": 0, "capacity": PLAYERS_CAPACITY}}}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("writing the status of {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATES_IN_FLIGHT);
    while let Some(result) = results.next().await {
        result?;
    }
    eprintln!(
        "query --allocate: {count} GameServers in {namespace} in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Deletes what the run created, and the namespace. No controller-manager runs beside the
/// suite's API server, so nothing would empty the namespace: the GameServers and what the
/// proxy wrote there (its status Lease, Events) are deleted here, best effort for the latter,
/// and the namespace is finalized by hand.
async fn delete_all(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let (all, everything) = (ListParams::default(), DeleteParams::default());
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &gameservers())
        .delete_collection(&everything, &all)
        .await
        .context("deleting the GameServers")?;
    for r in [
        resource("coordination.k8s.io", "v1", "Lease", "leases"),
        resource("events.k8s.io", "v1", "Event", "events"),
    ] {
        let _ = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &r)
            .delete_collection(&everything, &all)
            .await;
    }
    let namespaces = namespaces(client);
    namespaces.delete(namespace, &everything).await?;
    let finalized = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace}, "spec": {"finalizers": []}});
    namespaces
        .replace_subresource("finalize", namespace, &PostParams::default(), &finalized)
        .await?;
    Ok(())
}
