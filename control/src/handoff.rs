//! Control's part in a hand-off (SPEC §12). New process: whether it may take over from a
//! predecessor (its config, read with this release's parser, keeps every restart key; no data
//! port is on a port the kernel picked), and the query and admin sockets it inherits. Old
//! process: the server that waits for the next successor, started once this process serves.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use dataplane::handoff::old::{ControlSockets, HandedOver, Hooks};

use crate::config::Config;
use crate::query::director::Director;

/// The listening sockets of the query and admin servers, taken over from the predecessor.
#[derive(Debug, Default)]
pub struct Inherited {
    pub query: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Whether this process, running `mine` (loaded from `path`), may take over from one running
/// the config file text `theirs`: the reason when not. The newer release decides, with its
/// own parser, which reads every key an older one could have.
pub fn vet(mine: &Config, path: Option<&Path>, theirs: &str) -> Result<(), String> {
    let theirs = match path {
        Some(path) => Config::from_file_text(theirs, path),
        None => Config::from_yaml(theirs),
    }
    .map_err(|e| format!("its config does not load here: {e}"))?;
    if let Some(port) = theirs.data_ports.iter().find(|p| p.port == 0) {
        return Err(format!(
            "its data port {} is on a port the kernel picked (0): it cannot be named",
            port.name
        ));
    }
    if let Some(change) = crate::config::live::needs_restart(&theirs, mine) {
        return Err(format!("this config changes a restart key: {change}"));
    }
    Ok(())
}

/// What the hand-off server needs, kept from [`crate::start`] until this process serves.
pub(crate) struct Successors {
    pub(crate) path: std::path::PathBuf,
    pub(crate) config_text: String,
    pub(crate) sockets: ControlSockets,
    pub(crate) director: Arc<Director>,
    pub(crate) handed_over: tokio::sync::watch::Sender<Option<HandedOver>>,
}

impl std::fmt::Debug for Successors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Successors")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Successors {
    /// Listens for the next successor.
    pub(crate) fn serve(self, controller: dataplane::Controller) -> std::io::Result<()> {
        let (pause, resume) = (Arc::clone(&self.director), Arc::clone(&self.director));
        let handed_over = self.handed_over;
        dataplane::handoff::old::serve(
            self.path,
            controller,
            self.config_text,
            self.sockets,
            Hooks {
                freezing: Box::new(move || pause.pause_tokens(true)),
                failed: Box::new(move || resume.pause_tokens(false)),
                taken: Box::new(move |done| {
                    let _ = handed_over.send(Some(done));
                }),
            },
        )
        .map(drop)
    }
}

/// Duplicates of the query and admin listening sockets, for a successor.
pub(crate) fn control_sockets(
    query: &tokio::net::TcpListener,
    admin: &tokio::net::TcpListener,
) -> std::io::Result<ControlSockets> {
    Ok(ControlSockets {
        query: Some(query.as_fd().try_clone_to_owned()?),
        admin: Some(admin.as_fd().try_clone_to_owned()?),
    })
}
