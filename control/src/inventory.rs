//! The inventory: Kubernetes-shaped objects, grouped by the resource types of
//! `resourceQueryMapping`, plus Services for service-based mappings.
//!
//! A source ([`InventorySource`]) yields complete object lists; [`run`] turns each into an
//! immutable [`Snapshot`] and publishes it on a `watch` channel, so a query reads a consistent
//! view without waiting on anything. A source error keeps the last good snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::config::Mapping;

/// One object (GameServer, Pod, Service, …) with its commonly used metadata pulled out.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty for cluster-scoped or unset).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// The whole object, for paths into `spec` and `status`.
    pub raw: Value,
}

impl Object {
    /// Reads the metadata of a raw object; fails when `apiVersion`, `kind` or `metadata.name` is
    /// missing.
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let map = |v: Option<&Value>| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| {
                            let v = match v {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                Value::Bool(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((k.clone(), v))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let meta = raw.get("metadata");
        let api_version = text(raw.get("apiVersion")).ok_or("missing apiVersion")?;
        let kind = text(raw.get("kind")).ok_or("missing kind")?;
        let name = text(meta.and_then(|m| m.get("name"))).ok_or("missing metadata.name")?;
        Ok(Self {
            api_version,
            kind,
            namespace: text(meta.and_then(|m| m.get("namespace"))).unwrap_or_default(),
            name,
            labels: map(meta.and_then(|m| m.get("labels"))),
            annotations: map(meta.and_then(|m| m.get("annotations"))),
            raw,
        })
    }
}

/// An immutable view of the inventory.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// True once a source delivered its first complete list.
    pub loaded: bool,
    /// Objects per mapping name, sorted by namespace and name.
    pub by_mapping: BTreeMap<String, Vec<Arc<Object>>>,
    /// Services (core v1), for service-based mappings.
    pub services: Vec<Arc<Object>>,
}

impl Snapshot {
    /// Groups objects by the mappings they belong to.
    pub fn build(objects: Vec<Object>, mappings: &BTreeMap<String, Mapping>) -> Self {
        let mut by_mapping: BTreeMap<String, Vec<Arc<Object>>> =
            mappings.keys().map(|k| (k.clone(), Vec::new())).collect();
        let mut services = Vec::new();
        for object in objects {
            let object = Arc::new(object);
            if object.api_version == "v1" && object.kind == "Service" {
                services.push(Arc::clone(&object));
            }
            for (name, mapping) in mappings {
                if object.api_version == mapping.api_version() && mapping.matches_kind(&object.kind)
                {
                    by_mapping
                        .get_mut(name)
                        .expect("every mapping has a list")
                        .push(Arc::clone(&object));
                }
            }
        }
        for list in by_mapping.values_mut() {
            list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        }
        Self {
            loaded: true,
            by_mapping,
            services,
        }
    }

    /// The Service in `namespace` labelled `label=value`.
    pub fn service_labelled(&self, namespace: &str, label: &str, value: &str) -> Option<&Object> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.labels.get(label).is_some_and(|v| v == value))
            .map(Arc::as_ref)
    }
}

/// Why a source could not deliver a list.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{path} is not valid YAML: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message, with position.
        source: serde_yaml::Error,
    },
}

/// Something that yields the complete current object list, then each changed list.
pub trait InventorySource: Send + 'static {
    /// Human name for logs.
    fn describe(&self) -> String;

    /// The first call returns the current list; later calls wait for a change.
    fn next(&mut self) -> impl Future<Output = Result<Vec<Object>, InventoryError>> + Send;
}

/// Drives a source: publishes a snapshot per delivered list, logs and keeps the last good one on
/// errors. Returns when every receiver is gone.
pub async fn run<S: InventorySource>(
    mut source: S,
    mappings: BTreeMap<String, Mapping>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    loop {
        let result = tokio::select! {
            r = source.next() => r,
            () = tx.closed() => return,
        };
        match result {
            Ok(objects) => {
                let snapshot = Snapshot::build(objects, &mappings);
                let counts: Vec<String> = snapshot
                    .by_mapping
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.len()))
                    .collect();
                log::info!("inventory from {}: {}", source.describe(), counts.join(" "));
                if tx.send(Arc::new(snapshot)).is_err() {
                    return;
                }
            }
            Err(e) => log::warn!("inventory not updated, keeping the last good one: {e}"),
        }
    }
}

/// A YAML file of objects (multi-document, or `kind: List` with `items`, as `kubectl get -o yaml`
/// prints), re-read when its content changes. Polling, rather than inotify, also sees a ConfigMap
/// volume's symlink swap.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    poll_interval: Duration,
    last: Option<Vec<u8>>,
}

impl FileSource {
    /// A source for `path`, checked every `poll_interval`.
    pub fn new(path: PathBuf, poll_interval: Duration) -> Self {
        Self {
            path,
            poll_interval,
            last: None,
        }
    }
}

impl InventorySource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn next(&mut self) -> Result<Vec<Object>, InventoryError> {
        loop {
            let read = tokio::fs::read(&self.path).await;
            match read {
                Ok(bytes) if self.last.as_ref() != Some(&bytes) => {
                    let parsed = parse_objects(&bytes, &self.path);
                    self.last = Some(bytes);
                    return parsed;
                }
                Ok(_) => {}
                Err(source) => {
                    // Report a missing or unreadable file once, not every poll.
                    if self.last.as_ref().is_none_or(|l| !l.is_empty()) {
                        self.last = Some(Vec::new());
                        return Err(InventoryError::Read {
                            path: self.path.clone(),
                            source,
                        });
                    }
                }
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }
}

/// Parses a YAML stream of objects; `List` documents are flattened. Objects without the basic
/// metadata are skipped with a warning rather than failing the whole file.
pub fn parse_objects(bytes: &[u8], path: &std::path::Path) -> Result<Vec<Object>, InventoryError> {
    use serde::Deserialize;
    let mut values = Vec::new();
    for doc in serde_yaml::Deserializer::from_slice(bytes) {
        let value = Value::deserialize(doc).map_err(|source| InventoryError::Parse {
            path: path.to_owned(),
            source,
        })?;
        match value {
            Value::Null => {}
            Value::Object(ref m) if m.get("items").is_some_and(Value::is_array) => {
                if let Some(Value::Array(items)) = m.get("items") {
                    values.extend(items.iter().cloned());
                }
            }
            Value::Array(items) => values.extend(items),
            other => values.push(other),
        }
    }
    let mut objects = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        match Object::from_value(v) {
            Ok(o) => objects.push(o),
            Err(e) => log::warn!("{}: object #{i} skipped: {e}", path.display()),
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"
inventory: {kind: file, path: x.yaml}
resourceQueryMapping:
  gameserver: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}
  pod: {group: "", version: v1, resource: pods, addressPath: status.podIP, portName: game}
  custom: {group: example.com, version: v2, resource: arenas, kind: BattleArena, addressPath: a, portPath: p}
"#;

    #[test]
    fn list_and_multi_document_forms() {
        let config = Config::from_yaml(CONFIG).unwrap();
        let list = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: agones.dev/v1, kind: GameServer, metadata: {name: gs-1, namespace: a}}
- {apiVersion: v1, kind: Pod, metadata: {name: p-1, namespace: a}}
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: a, labels: {app: x}}
---
apiVersion: example.com/v2
kind: BattleArena
metadata: {name: arena}
---
apiVersion: agones.dev/v1beta1
kind: GameServer
metadata: {name: old-version}
---
kind: GameServer
metadata: {name: no-api-version}
"#;
        let objects = parse_objects(list.as_bytes(), "t.yaml".as_ref()).unwrap();
        assert_eq!(objects.len(), 5, "one object without apiVersion skipped");
        let snap = Snapshot::build(objects, &config.mappings);
        assert_eq!(snap.by_mapping["gameserver"].len(), 1);
        assert_eq!(snap.by_mapping["pod"].len(), 1);
        assert_eq!(snap.by_mapping["custom"].len(), 1);
        assert_eq!(snap.services.len(), 1);
        assert!(snap.service_labelled("a", "app", "x").is_some());
        assert!(snap.service_labelled("b", "app", "x").is_none());
    }

    #[test]
    fn invalid_yaml_is_an_error() {
        assert!(parse_objects(b"a: [unclosed", "t.yaml".as_ref()).is_err());
    }

    #[test]
    fn plurals() {
        use crate::config::plural_of;
        assert_eq!(plural_of("GameServer"), "gameservers");
        assert_eq!(plural_of("Pod"), "pods");
        assert_eq!(plural_of("Ingress"), "ingresses");
        assert_eq!(plural_of("NetworkPolicy"), "networkpolicies");
        assert_eq!(plural_of("Gateway"), "gateways");
    }
}
