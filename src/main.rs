//! `udp-director`: parse arguments, load and validate the config, start the data plane workers
//! and the control thread, wait for them. Everything else lives in the `dataplane` and `control`
//! crates.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use control::config::Config;

/// Kubernetes-native stateful UDP proxy for game-server fleets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (YAML) for running the proxy. Without one (outside a cluster), the built-in
    /// example of deploy/examples/local.yaml runs, with its file inventory.
    #[arg(long, env = "CONFIG_PATH", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run,
    /// Validate a config file and exit: 0 when valid, 1 with the reason otherwise.
    CheckConfig {
        /// Config file to check.
        file: PathBuf,
    },
    /// Ask a running proxy's query port for a token and print it.
    Query(QueryArgs),
    /// Print the CustomResourceDefinitions of udp-director (generated from its Rust types; the
    /// copies in `deploy/crds/` are these).
    Crds {
        /// Print the Gateway API CRDs of the types udp-director reads instead, for a test API
        /// server (clusters install the official ones).
        #[arg(long)]
        gateway_api_for_tests: bool,
    },
    /// Print the least-privilege ClusterRole a config needs (list and watch on exactly the
    /// resource types it watches), with `forwarders` the Role `NAME-forwarders` in their
    /// namespace, and when it writes status the Role `NAME-lease` (the status Lease) in the
    /// proxy's namespace (`POD_NAMESPACE`), for `deploy/`.
    Rbac {
        /// Config file.
        file: PathBuf,
        /// metadata.name of the ClusterRole.
        #[arg(long, default_value = "udp-director")]
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct QueryArgs {
    /// Query port address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    addr: String,
    /// Resource type (a key of resourceQueryMapping).
    #[arg(long)]
    resource_type: String,
    /// Namespace to search.
    #[arg(long)]
    namespace: Option<String>,
    /// Label that must match, as key=value (repeatable).
    #[arg(short = 'l', long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Annotation that must match, as key=value (repeatable).
    #[arg(short = 'a', long = "annotation", value_parser = key_value)]
    annotations: Vec<(String, String)>,
    /// Status field to test, as a dot path (e.g. status.state).
    #[arg(long, requires = "status_value")]
    status_path: Option<String>,
    /// Accepted value of --status-path (repeatable).
    #[arg(long)]
    status_value: Vec<String>,
    /// Print the whole JSON answer instead of the token alone.
    #[arg(long)]
    json: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    install_panic_hook();
    let args = Args::parse();
    let result = match args.command {
        None | Some(Command::Run) => match args.config {
            Some(path) => Config::load(&path)
                .map_err(Into::into)
                .and_then(|c| run(Arc::new(c), Some(path))),
            // The built-in example has no file to reload.
            None => embedded_default().and_then(|c| run(Arc::new(c), None)),
        },
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Query(q)) => query(&q),
        Some(Command::Crds {
            gateway_api_for_tests,
        }) => if gateway_api_for_tests {
            control::crd::gateway_api_yaml()
        } else {
            control::crd::all_yaml()
        }
        .map(|yaml| print!("{yaml}"))
        .map_err(anyhow::Error::from),
        Some(Command::Rbac { file, name }) => Config::load(&file)
            .map(|config| {
                print!("{}", control::inventory::kube::cluster_role(&config, &name));
                print!(
                    "{}",
                    control::inventory::kube::forwarders_role(&config, &name)
                );
                print!("{}", control::status::lease::role(&config, &name));
            })
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-director: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code of a process ended by a panic where panics unwind (debug builds), as Rust's
/// own test harness uses.
const PANIC_EXIT_CODE: i32 = 101;

/// A panic in any thread is logged with the thread's name and ends the process: a worker or the
/// control thread that died quietly would leave a proxy that answers probes while it drops
/// traffic. Release builds abort after the hook (`panic = "abort"`); where panics unwind (debug
/// builds, tests) the hook exits itself, so nothing catches the panic and carries on.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let message = info.payload_as_str().unwrap_or("(no message)");
        let location = info
            .location()
            .map_or_else(String::new, |l| format!(" at {l}"));
        // Captured only when RUST_BACKTRACE asks, like the default hook.
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
            _ => String::new(),
        };
        if log::log_enabled!(log::Level::Error) {
            log::error!("thread {name} panicked{location}: {message}; the process ends{backtrace}");
        } else {
            // Filtered off (`RUST_LOG=off`): a death still leaves its reason.
            eprintln!("udp-director: thread {name} panicked{location}: {message}{backtrace}");
        }
        if cfg!(panic = "unwind") {
            std::process::exit(PANIC_EXIT_CODE);
        }
    }));
}

/// The example config of `deploy/examples/`, built in: `udp-director` with no config runs it on
/// this machine, game servers from the example file inventory (written to a temp file when
/// `deploy/examples/local-inventory.yaml` is not under the working directory).
const EMBEDDED_CONFIG: &str = include_str!("../deploy/examples/local.yaml");
const EMBEDDED_INVENTORY: &str = include_str!("../deploy/examples/local-inventory.yaml");

fn embedded_default() -> anyhow::Result<Config> {
    // In a cluster the fleet, its mappings and RBAC differ per deployment: no guessing there.
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        anyhow::bail!(
            "no config: pass --config FILE or set CONFIG_PATH (see deploy/overlays/ for \
             in-cluster configs)"
        );
    }
    let mut config = Config::from_yaml(EMBEDDED_CONFIG)?;
    let local = Path::new("deploy/examples/local-inventory.yaml");
    let path = if local.exists() {
        local.to_path_buf()
    } else {
        let path = std::env::temp_dir().join("udp-director-example-inventory.yaml");
        std::fs::write(&path, EMBEDDED_INVENTORY)
            .with_context(|| format!("writing the example inventory to {}", path.display()))?;
        path
    };
    log::info!(
        "no config given: running the built-in example (deploy/examples/local.yaml) with the \
         file inventory {}",
        path.display()
    );
    if let control::config::InventoryConfig::File { path: p, .. } = &mut config.inventory {
        *p = path;
    }
    Ok(config)
}

/// Runs the proxy on `config`, loaded from `path` (reloaded from it on SIGHUP or a change).
fn run(config: Arc<Config>, path: Option<PathBuf>) -> anyhow::Result<()> {
    check_fd_budget(&config)?;
    let plane = dataplane::DataPlane::start(config.dataplane()).context("data plane")?;
    let control = control::start(Arc::clone(&config), path, &plane).context("control plane")?;
    let data: Vec<String> = config
        .data_ports
        .iter()
        .zip(plane.local_addrs())
        .map(|(p, a)| format!("{}/{}={a}", p.name, p.protocol.as_str()))
        .collect();
    let entry: Vec<String> = control
        .entry_points
        .iter()
        .map(|(name, t, a)| format!("{name}/{}={a}", t.as_str()))
        .collect();
    // One machine-readable line, for scripts and tests that start the proxy on port 0.
    println!(
        "listening query={} admin={} data={}{}",
        control.query_addr,
        control.admin_addr,
        data.join(","),
        if entry.is_empty() {
            String::new()
        } else {
            format!(" entry={}", entry.join(","))
        }
    );
    std::io::stdout().flush().ok();
    control.join();
    plane.join().context("data plane")?;
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    check_fd_budget(&config)?;
    println!(
        "{}: ok ({} data ports, {} resource types, {} workers)",
        path.display(),
        config.data_ports.len(),
        config.mappings.len(),
        config.workers
    );
    Ok(())
}

fn query(q: &QueryArgs) -> anyhow::Result<()> {
    let mut request = serde_json::json!({
        "type": "query",
        "resourceType": q.resource_type,
        "labelSelector": q.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "annotationSelector": q.annotations.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    });
    if let Some(ns) = &q.namespace {
        request["namespace"] = ns.clone().into();
    }
    if let Some(path) = &q.status_path {
        request["statusQuery"] =
            serde_json::json!({"jsonPath": path, "expectedValues": q.status_value});
    }
    let mut stream =
        TcpStream::connect(&q.addr).with_context(|| format!("connect to {}", q.addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("unexpected answer: {line:?}"))?;
    if let Some(error) = answer.get("error") {
        bail!(
            "{} ({})",
            error.as_str().unwrap_or("?"),
            answer["code"].as_str().unwrap_or("?")
        );
    }
    if q.json {
        println!("{answer}");
    } else {
        println!("{}", answer["token"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// File descriptors a worker holds before any session: its epoll instance, its waker and one
/// socket per data port.
const FDS_PER_WORKER_BASE: u64 = 2;
/// What the rest of the process holds: listeners, the inventory, the API client, logs.
const FDS_RESERVED: u64 = 64;

/// The workers must fit in the open-file limit this process can raise itself to, with room to
/// spare; otherwise the start fails half-way on `Too many open files`. Checked by `check-config`
/// too, so it refuses what a start on this machine would.
fn check_fd_budget(config: &Config) -> anyhow::Result<()> {
    let workers = config.workers.get() as u64;
    let needed = workers * (FDS_PER_WORKER_BASE + config.data_ports.len() as u64) + FDS_RESERVED;
    let limit = open_file_hard_limit();
    if needed > limit / 2 {
        bail!(
            "config key `workers`: {workers} workers need about {needed} file descriptors before \
             any session, more than half of this machine's open-file limit ({limit}); use fewer \
             workers or raise the limit"
        );
    }
    Ok(())
}

/// The open-file hard limit: what the soft limit is raised to at start.
fn open_file_hard_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return u64::MAX;
    }
    limit.rlim_max
}
