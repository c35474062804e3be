//! kubectl as the admin of the API server the stand-in registers with: the few calls its
//! registration makes (an apply, a get). Blocking; no retries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// kubectl as the user of one kubeconfig.
#[derive(Clone, Debug)]
pub(super) struct Kubectl {
    pub(super) kubeconfig: PathBuf,
}

impl Kubectl {
    /// The admin of the API server whose run directory is `run` (`run/kubeconfig`).
    pub(super) fn admin(run: &Path) -> Self {
        Self {
            kubeconfig: run.join("kubeconfig"),
        }
    }

    /// `kubectl ARGS` with `stdin`: Ok(stdout) or Err(stderr, or why it did not run).
    pub(super) fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl: {e}"))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.unwrap_or("").as_bytes())
                .map_err(|e| format!("kubectl's stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("kubectl: {e}"))?;
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        if out.status.success() {
            Ok(text(out.stdout))
        } else {
            Err(text(out.stderr))
        }
    }

    /// A cluster-scoped object as JSON (`Null` when it cannot be read).
    pub(super) fn get_json(&self, resource: &str, name: &str) -> Value {
        self.run(&["get", resource, name, "-o", "json"], None)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }
}
