//! Control's part in a hand-off (SPEC §12): whether a successor may take over (its config
//! keeps every restart key, the worker count is the same, no data port is on a port the
//! kernel picked), the sockets of the query and admin servers it inherits, and the server
//! that waits for the next successor.

use std::net::TcpListener;
use std::sync::Arc;

use dataplane::handoff::old::Vetting;
use dataplane::handoff::wire::Hello;

use crate::config::Config;

/// The listening sockets of the query and admin servers, taken over from the predecessor.
#[derive(Debug, Default)]
pub struct Inherited {
    pub query: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Whether a successor saying `hello` may take over from a process running `running` with
/// `workers` workers: the reason when not.
/// `path` is the running config's file: the successor's runs from the same one (the same
/// mount), so relative paths in it resolve alike.
pub fn vet(
    running: &Config,
    path: Option<&std::path::Path>,
    workers: usize,
    hello: &Hello,
) -> Result<(), String> {
    if let Some(port) = running.data_ports.iter().find(|p| p.port == 0) {
        return Err(format!(
            "data port {} is on a port the kernel picked (0): its successor could not name it",
            port.name
        ));
    }
    let new = match path {
        Some(path) => Config::from_file_text(&hello.config, path),
        None => Config::from_yaml(&hello.config),
    }
    .map_err(|e| format!("its config does not load here: {e}"))?;
    if let Some(change) = crate::config::live::needs_restart(running, &new) {
        return Err(format!("its config changes a restart key: {change}"));
    }
    let theirs = hello
        .restart_keys
        .iter()
        .find(|(k, _)| k == "workers")
        .map(|(_, v)| v.as_str());
    if theirs != Some(workers.to_string().as_str()) {
        return Err(format!(
            "it runs {} workers and this process {workers}: each worker's sockets and sessions \
             go to the worker of the same index",
            theirs.unwrap_or("an unknown number of")
        ));
    }
    Ok(())
}

/// [`vet`] for the hand-off server.
pub(crate) fn vetting(
    running: Arc<Config>,
    path: Option<std::path::PathBuf>,
    workers: usize,
) -> Vetting {
    Box::new(move |hello| vet(&running, path.as_deref(), workers, hello))
}
