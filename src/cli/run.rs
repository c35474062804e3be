//! Running the proxy: on a config file, or on the built-in example when there is none.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use control::config::Config;

use super::check::check_fd_budget;

/// The example config of `deploy/examples/`, built in: `udp-director` with no config runs it on
/// this machine, game servers from the example file inventory (written to a temp file when
/// `deploy/examples/local-inventory.yaml` is not under the working directory).
const EMBEDDED_CONFIG: &str = include_str!("../../deploy/examples/local.yaml");
const EMBEDDED_INVENTORY: &str = include_str!("../../deploy/examples/local-inventory.yaml");

/// The built-in example config, its inventory written out where needed.
pub(crate) fn embedded_default() -> anyhow::Result<Config> {
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
pub(crate) fn run(config: Arc<Config>, path: Option<PathBuf>) -> anyhow::Result<()> {
    check_fd_budget(&config)?;
    let dataplane_config = config.dataplane();
    let workers = dataplane_config.workers.get();
    // With `handoff`, a proxy already running on this node hands over (SPEC §12): taken once
    // this process's workers run, vetted with this release's config parser.
    let take = |socket: &std::path::Path| {
        let vet = |theirs: &str| control::handoff::vet(&config, path.as_deref(), theirs);
        dataplane::handoff::new::take_over(socket, workers, &vet)
    };
    let handoff = config.handoff.as_ref().map(|h| {
        let socket = h.socket_path.clone();
        move || take(&socket)
    });
    let (plane, inheritance) = dataplane::DataPlane::start_inheriting(
        dataplane_config,
        handoff
            .as_ref()
            .map(|f| f as &dyn Fn() -> Result<_, dataplane::handoff::new::TakeOverError>),
    )
    .context("data plane")?;
    let mut inherited = control::handoff::Inherited::default();
    if let Some(mut inheritance) = inheritance {
        inherited.query = inheritance.take_query_listener();
        inherited.admin = inheritance.take_admin_listener();
        // The predecessor lets go; only then do the workers read.
        inheritance
            .commit(&plane.controller())
            .context("taking over from the running proxy")?;
    }
    let mut control =
        control::start(Arc::clone(&config), path, &plane, inherited).context("control plane")?;
    control.serve_successors().context("hand-off")?;
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
