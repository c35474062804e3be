//! `churn`: the control thread at fleet scale (SPEC §10). A real kube-apiserver (the one
//! `scripts/k8s-apiserver.sh` runs for the Kubernetes suite) holds, in one namespace, N Agones
//! GameServers, F UDP Forwarders (all to one echo server) and R Routes on one entry point (each
//! with its own Service and EndpointSlice), and the proxy watches that namespace. Then, for a
//! measured window, GameServer statuses are patched at a steady rate (a fleet at work) while:
//! the proxy's `control` thread's CPU is sampled; the query port is asked for Ready servers of a
//! fleet at a modest steady rate; and a few times a Forwarder is moved to another port or a new
//! one is created, timed from the API write returning to the first datagram echoed through the
//! new listener. Creating the objects takes minutes at this scale and is not measured.
//!
//! The API server is driven with kube-rs on a current-thread tokio runtime that one thread of
//! this process drives; everything else here is plain threads, as in the rest of the harness.

mod cluster;
mod proxy;
mod report;
mod window;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::echo::Echo;
use crate::proxy::{ProxyArgs, status_kib};
use cluster::{ApiServer, Cluster, Runtime};
use proxy::{ChurnProxy, free_ports};
use report::Report;
use window::{Window, echoes_within};

/// Arguments of `churn`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChurnArgs {
    /// A running API server's directory (`scripts/k8s-apiserver.sh start DIR`; its admin
    /// kubeconfig is DIR/kubeconfig). Without it, one is started in a temp dir and stopped at
    /// the end (refused while another one listens on the API port).
    #[arg(long, env = "UDP_DIRECTOR_K8S_RUN")]
    k8s_run: Option<PathBuf>,
    /// The script that starts an API server when no `--k8s-run` is given.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/k8s-apiserver.sh"))]
    k8s_script: PathBuf,
    /// The namespace to fill and watch (default: churn-<pid>). On a `--k8s-run` server it is
    /// emptied and deleted at the end unless `--keep`.
    #[arg(long)]
    namespace: Option<String>,
    /// Agones GameServers (status Ready, an address and a port).
    #[arg(long, default_value_t = 10_000)]
    gameservers: usize,
    /// Fleets the GameServers are spread over (label `agones.dev/fleet`); each query asks for
    /// a Ready server of one of them.
    #[arg(long, default_value_t = 20)]
    fleets: usize,
    /// UDP Forwarders, each on its own port, all to one echo server.
    #[arg(long, default_value_t = 2_000)]
    forwarders: usize,
    /// Routes on one entry point, each over its own Service and EndpointSlice.
    #[arg(long, default_value_t = 500)]
    routes: usize,
    /// GameServer status patches per second during the window (each flips one random
    /// server between Ready and Allocated).
    #[arg(long, default_value_t = 200.0)]
    patch_rate: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Queries per second during the window, on one connection.
    #[arg(long, default_value_t = 100.0)]
    query_rate: f64,
    /// Forwarder changes during the window, evenly spread: a forwarder moved to a new
    /// listenPort, then a new forwarder created, taking turns.
    #[arg(long, default_value_t = 6)]
    forwarder_changes: usize,
    /// The forwarders (and the changes' new ports) listen on the first free ports from here.
    #[arg(long, default_value_t = 20_000)]
    first_port: u16,
    /// API requests in flight while creating the objects.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds over which the settled proxy's idle control CPU is measured before the window.
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
    /// Seconds to wait for every forwarder and route to be ready, and then as long again at
    /// most for the control thread to settle (three seconds in a row under a tenth of a core;
    /// after its start it writes every forwarder's and route's status, and at full scale that
    /// kept it busy for nearly three minutes). Past either wait the run goes on, and says so.
    #[arg(long, default_value_t = 600.0)]
    settle_timeout: f64,
    /// Leave the namespace and its objects on the `--k8s-run` server (a rerun with
    /// `--namespace` reuses them). A server this run started is stopped with everything in it.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    proxy: ProxyArgs,
}

/// How long a forwarder change may take before it counts as timed out.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// GameServer patches in flight at most: past this the patcher falls behind (the rate it
/// reached is reported beside the rate asked).
const PATCHES_IN_FLIGHT: usize = 64;
/// The control thread counts as settled below this share of a core, three seconds in a row.
const SETTLED_CORES: f64 = 0.1;

pub(crate) fn run(args: &ChurnArgs) -> anyhow::Result<()> {
    if args.gameservers == 0 || args.fleets == 0 || args.forwarders == 0 {
        bail!("--gameservers, --fleets and --forwarders must be at least 1");
    }
    if args.patch_rate <= 0.0 || args.query_rate <= 0.0 || args.duration <= 0.0 {
        bail!("--patch-rate, --query-rate and --duration must be positive");
    }
    let apiserver = ApiServer::find_or_start(args)?;
    let runtime = Runtime::start()?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| format!("churn-{}", std::process::id()));
    let cluster = runtime
        .block_on(Cluster::connect(
            &apiserver.run.join("kubeconfig"),
            namespace,
        ))
        .context("connecting to the API server")?;
    let result = measure(args, &runtime, &cluster, &apiserver);
    if args.keep {
        eprintln!("churn: kept namespace {}", cluster.namespace);
    } else if !apiserver.started_here() {
        // A server of our own goes, with everything in it; a shared one is left as found.
        eprintln!("churn: deleting namespace {}", cluster.namespace);
        if let Err(e) = runtime.block_on(cluster.delete_all()) {
            eprintln!("churn: cleanup of {}: {e:#}", cluster.namespace);
        }
    }
    drop(runtime);
    drop(apiserver);
    result
}

fn measure(
    args: &ChurnArgs,
    runtime: &Runtime,
    cluster: &Cluster,
    apiserver: &ApiServer,
) -> anyhow::Result<()> {
    let echo = Echo::start("127.0.0.1:0".parse()?, 1, None)?;
    let ports = free_ports(args.first_port, args.forwarders + args.forwarder_changes)?;
    let (ports, spare) = ports.split_at(args.forwarders);

    let began = Instant::now();
    let created = runtime.block_on(cluster.populate(args, ports, echo.addr))?;
    let populate_seconds = began.elapsed().as_secs_f64();
    eprintln!(
        "churn: {created} API writes in {populate_seconds:.1} s ({:.0}/s)",
        created as f64 / populate_seconds
    );

    let proxy = ChurnProxy::start(args, &apiserver.run, &cluster.namespace)?;
    eprintln!(
        "churn: proxy pid {}, control thread {}",
        proxy.pid, proxy.control_tid
    );
    let settle_timeout = Duration::from_secs_f64(args.settle_timeout);
    let ready = proxy.wait_ready(args.forwarders, args.routes, settle_timeout)?;
    // The forwarders pass datagrams at all (the first one does) before any change is timed.
    echoes_within(ports[0], Duration::from_secs(5))?
        .with_context(|| format!("no echo through the forwarder on {}", ports[0]))?;
    let settle_seconds = proxy.settle(settle_timeout);
    let idle = proxy.control_cores(Duration::from_secs_f64(args.idle_seconds));

    eprintln!("churn: the window starts ({} s)", args.duration);
    let window = Window::run(args, runtime, cluster, &proxy, apiserver, spare, echo.addr)?;
    let rss_kib = status_kib(proxy.pid, "VmRSS").unwrap_or(0);
    let hwm_kib = status_kib(proxy.pid, "VmHWM").unwrap_or(0);
    drop(proxy);

    let report = Report {
        args,
        namespace: &cluster.namespace,
        populate_seconds,
        created,
        ready,
        settle_seconds,
        idle_control_cores: idle,
        window,
        rss_kib,
        hwm_kib,
    };
    report.print();
    Ok(())
}
