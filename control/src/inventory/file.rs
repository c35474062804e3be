//! The file inventory: a YAML file of Kubernetes-shaped objects, polled for changes. The
//! embedded default for running without a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{InventoryError, InventorySource, Object, Snapshot};
use crate::config::Mapping;

/// A YAML file of objects (multi-document, or `kind: List` with `items`, as `kubectl get -o yaml`
/// prints), re-read when its content changes. Polling, rather than inotify, also sees a ConfigMap
/// volume's symlink swap.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    poll_interval: Duration,
    mappings: BTreeMap<String, Mapping>,
    last: Option<Vec<u8>>,
}

impl FileSource {
    /// A source for `path`, checked every `poll_interval`.
    pub fn new(
        path: PathBuf,
        poll_interval: Duration,
        mappings: BTreeMap<String, Mapping>,
    ) -> Self {
        Self {
            path,
            poll_interval,
            mappings,
            last: None,
        }
    }
}

impl InventorySource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn next(&mut self) -> Result<Snapshot, InventoryError> {
        loop {
            let read = tokio::fs::read(&self.path).await;
            match read {
                Ok(bytes) if self.last.as_ref() != Some(&bytes) => {
                    let parsed = parse_objects(&bytes, &self.path);
                    self.last = Some(bytes);
                    let snapshot = Snapshot::build(parsed?, &self.mappings);
                    log::info!("inventory from {}: {}", self.describe(), snapshot.counts());
                    return Ok(snapshot);
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
pub fn parse_objects(bytes: &[u8], path: &Path) -> Result<Vec<Object>, InventoryError> {
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
- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: svc-abc, namespace: a, labels: {kubernetes.io/service-name: svc}},
   ports: [{name: game, port: 7654}],
   endpoints: [{addresses: [10.0.0.1], conditions: {ready: false}}, {addresses: [10.0.0.2]}]}
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
        assert_eq!(objects.len(), 6, "one object without apiVersion skipped");
        let snap = Snapshot::build(objects, &config.mappings);
        assert_eq!(snap.by_mapping["gameserver"].len(), 1);
        assert_eq!(snap.by_mapping["pod"].len(), 1);
        assert_eq!(snap.by_mapping["custom"].len(), 1);
        assert_eq!(snap.services.len(), 1);
        assert!(snap.service_labelled("a", "app", "x").is_some());
        assert!(snap.service_labelled("b", "app", "x").is_none());
        assert_eq!(
            snap.ready_endpoint("a", "svc", "game"),
            Some("10.0.0.2:7654".parse().unwrap()),
            "the first endpoint is not ready"
        );
        assert_eq!(snap.ready_endpoint("a", "svc", "voice"), None);
        assert_eq!(snap.ready_endpoint("b", "svc", "game"), None);
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
