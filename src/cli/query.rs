//! `udp-director query`: ask a running proxy's query port for a token (SPEC §2).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
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

/// A `--label` or `--annotation` with no `=` in it.
#[derive(Debug)]
struct NotKeyValue {
    /// What was given.
    given: String,
}

impl std::fmt::Display for NotKeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is not key=value", self.given)
    }
}

impl std::error::Error for NotKeyValue {}

fn key_value(s: &str) -> Result<(String, String), NotKeyValue> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| NotKeyValue {
            given: s.to_string(),
        })
}

/// Sends the query and prints the token (or the whole answer with `--json`).
pub(crate) fn query(q: &QueryArgs) -> anyhow::Result<()> {
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
