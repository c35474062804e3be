//! Config reload (SPEC §8): on SIGHUP, or when the config file or the `tokenSecret` file
//! changes (a ConfigMap or Secret mount swaps a symlink), the file is read and checked again.
//! What can change live is applied without dropping a session; a change that needs a restart,
//! or an invalid file, is refused with a log line naming the key, and the running config stays.
//! The file is read like the inventory: off the control thread (a blocking task), and only a
//! regular file of at most [`crate::config::MAX_CONFIG_BYTES`] ([`crate::config::read_config_file`]),
//! so a path swapped for `/dev/zero` or a FIFO is refused instead of read without end.
//!
//! The running config is a `watch` channel: the director, the query server and the
//! reconcilers read it where they use it, and the data plane gets its part through
//! [`dataplane::Controller::reconfigure`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::Config;
use crate::config::live::{NeedsRestart, needs_restart};
use crate::metrics::Metrics;

/// How often the config and key files are looked at.
const POLL: Duration = Duration::from_secs(1);

/// What identifies a file's content without reading it: device, inode, size and mtime of
/// what the path resolves to (a swapped symlink changes the inode).
type Stamp = Option<(u64, u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.modified().ok()?))
}

/// Watches the config file (and the key file it names) and reloads on a change or SIGHUP.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    live: watch::Sender<Arc<Config>>,
    controller: dataplane::Controller,
    metrics: Arc<Metrics>,
}

/// How a reload ended.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// Applied (or nothing changed).
    Applied,
    /// A change that needs a restart; nothing applied.
    Refused(NeedsRestart),
    /// The file does not load; nothing applied.
    Invalid(String),
}

impl Reloader {
    /// A reloader of `path`, the file `live`'s config was loaded from.
    pub fn new(
        path: PathBuf,
        live: watch::Sender<Arc<Config>>,
        controller: dataplane::Controller,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path,
            live,
            controller,
            metrics,
        }
    }

    /// Reads the file again (on a blocking thread, never on the control thread that answers
    /// queries and probes) and applies it if it can.
    pub async fn reload(&self) -> Outcome {
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let outcome = match loaded {
            Err(e) => Outcome::Invalid(format!("the reader thread failed: {e}")),
            Ok(Err(e)) => Outcome::Invalid(with_causes(&e)),
            Ok(Ok(new)) => {
                let running = Arc::clone(&self.live.borrow());
                match needs_restart(&running, &new) {
                    Some(refusal) => Outcome::Refused(refusal),
                    None => {
                        self.controller.reconfigure(new.dataplane().live());
                        self.live.send_replace(Arc::new(new));
                        Outcome::Applied
                    }
                }
            }
        };
        let path = self.path.display();
        match &outcome {
            Outcome::Applied => {
                log::info!("config reloaded from {path}");
                self.metrics.count_reload("applied");
            }
            Outcome::Refused(why) => {
                log::error!("config reload refused: {why}; the running config stays");
                self.metrics.count_reload("refused");
            }
            Outcome::Invalid(e) => {
                log::error!("config reload refused: {e}; the running config stays");
                self.metrics.count_reload("invalid");
            }
        }
        outcome
    }

    /// The files whose change triggers a reload: the config, and the key file it names.
    fn stamps(&self) -> (Stamp, Stamp) {
        let secret = self
            .live
            .borrow()
            .token_secret
            .as_ref()
            .map(|s| s.file.clone());
        (stamp(&self.path), secret.as_deref().and_then(stamp))
    }

    /// Reloads on SIGHUP and on a change of either file, until the process ends.
    pub async fn run(self) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("no SIGHUP reload: {e}");
                None
            }
        };
        let mut seen = self.stamps();
        let mut poll = tokio::time::interval(POLL);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup => {
                    log::info!("SIGHUP: reloading {}", self.path.display());
                    self.reload().await;
                    seen = self.stamps();
                }
                _ = poll.tick() => {
                    let now = self.stamps();
                    if now != seen {
                        // A missing file (mid-swap) is not a change to act on yet.
                        if now.0.is_some() {
                            self.reload().await;
                        }
                        seen = self.stamps();
                    }
                }
            }
        }
    }
}

/// An error and its causes on one line (`cannot read config file x: not a regular file`): a
/// refused reload is only a log line, so it must carry the reason.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Without a config file (the built-in example), SIGHUP reloads nothing: said, not fatal.
pub async fn no_file_to_reload() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        log::warn!("SIGHUP: no config file to reload (running the built-in example)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_CONFIG_BYTES;

    /// What `Config::load` says about `path`, with its causes, as a refused reload logs it.
    fn refusal(path: &Path) -> String {
        with_causes(&Config::load(path).unwrap_err())
    }

    #[test]
    fn only_a_regular_file_under_the_cap_is_read() {
        let dir = std::env::temp_dir().join(format!("reload-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = "inventory: {kind: file, path: /tmp/none.yaml}
";
        let file = dir.join("config.yaml");
        std::fs::write(&file, good).unwrap();
        assert!(Config::load(&file).is_ok());
        // A ConfigMap mount: a symlink to the file.
        let link = dir.join("link.yaml");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(Config::load(&link).is_ok());

        // A symlink to /dev/zero: refused at once, nothing read.
        let zero = dir.join("zero.yaml");
        let _ = std::fs::remove_file(&zero);
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = refusal(&zero);
        assert!(
            e.contains(&zero.display().to_string()) && e.contains("not a regular file (a device)"),
            "{e}"
        );
        // A FIFO with no writer: refused, not waited on.
        let fifo = dir.join("fifo.yaml");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(refusal(&fifo).contains("not a regular file (a FIFO)"));
        assert!(refusal(&dir).contains("not a regular file (a directory)"));

        // Over the cap: refused naming the path and the cap.
        let big = dir.join("big.yaml");
        let mut text = good.to_string();
        text.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&big, &text).unwrap();
        let e = refusal(&big);
        assert!(
            e.contains(&big.display().to_string())
                && e.contains(&format!("larger than {MAX_CONFIG_BYTES} bytes")),
            "{e}"
        );
        // At the cap: read.
        text.truncate(MAX_CONFIG_BYTES as usize);
        std::fs::write(&big, &text).unwrap();
        assert!(Config::load(&big).is_ok());
        // Missing: the OS error, once.
        let e = refusal(&dir.join("missing.yaml"));
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
