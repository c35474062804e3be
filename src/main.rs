//! `udp-director`: parse arguments and run the subcommand: the proxy itself (`cli::run`: the
//! data plane workers and the control thread, waited for) or one of the tools in `cli`.
//! Everything else lives in the `dataplane` and `control` crates.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use control::config::Config;

use cli::query::QueryArgs;

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
    /// Print the configuration reference (Markdown): every config key with its type, default,
    /// whether a reload applies it live, and what it does, generated from the config types
    /// (`docs/configuration.md` is this).
    ConfigReference,
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    cli::panic::install_panic_hook();
    let args = Args::parse();
    let result = match args.command {
        None | Some(Command::Run) => match args.config {
            Some(path) => Config::load(&path)
                .map_err(Into::into)
                .and_then(|c| cli::run::run(Arc::new(c), Some(path))),
            // The built-in example has no file to reload.
            None => cli::run::embedded_default().and_then(|c| cli::run::run(Arc::new(c), None)),
        },
        Some(Command::CheckConfig { file }) => cli::check::check_config(&file),
        Some(Command::Query(q)) => cli::query::query(&q),
        Some(Command::Crds {
            gateway_api_for_tests,
        }) => cli::manifests::crds(gateway_api_for_tests),
        Some(Command::ConfigReference) => cli::manifests::config_reference(),
        Some(Command::Rbac { file, name }) => cli::manifests::rbac(&file, &name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-director: {e:#}");
            ExitCode::FAILURE
        }
    }
}
