//! The file inventory: a YAML file of Kubernetes-shaped objects, polled for changes. The
//! embedded default for running without a cluster.
//!
//! A file is applied only whole and settled (SPEC section 8): a file whose size, mtime or inode
//! changed since the last poll is still being written and is looked at again on the next one
//! (a version that changes again before then is passed over, and counted as unsettled);
//! an empty file, a file over `maxBytes`, something that is not a regular file, invalid YAML or
//! any invalid object (missing metadata, a name or label past Kubernetes' limits, see
//! [`crate::names`]) is refused with the reason, and the last good inventory stays. An
//! operator who wants an empty inventory writes an explicit empty list (`[]`). Each refusal is
//! counted by reason, and each invalid object by kind ([`Rejections`]). Reading and parsing
//! run on a blocking thread, never on the control thread that answers queries.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::rejections::{FileRefusal, Rejections, kind_label};
use super::{InventoryError, InventorySource, Object, Snapshot};
use crate::config::Mapping;
use crate::names;

/// A YAML file of objects (multi-document, or `kind: List` with `items`, as `kubectl get -o yaml`
/// prints), re-read when it changes. Polling, rather than inotify, also sees a ConfigMap
/// volume's symlink swap.
pub struct FileSource {
    path: PathBuf,
    poll_interval: Duration,
    max_bytes: u64,
    mappings: BTreeMap<String, Mapping>,
    /// What the file looked like at the previous poll: a file is read only once it looks the
    /// same twice in a row.
    seen: Option<Stamp>,
    /// The stamp last acted on (applied or refused), so a file is judged once per change.
    judged: Option<Stamp>,
    /// Content of the last applied file: a rewrite with the same bytes changes nothing.
    applied: Option<Vec<u8>>,
    /// Refused files and invalid objects, counted.
    rejections: Rejections,
    /// The reconcilers' check of Forwarder and Route specs.
    spec_check: SpecCheck,
}

impl std::fmt::Debug for FileSource {
    // The spec check is a closure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("poll_interval", &self.poll_interval)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Stamp {
    File {
        len: u64,
        modified: Option<SystemTime>,
        /// Seconds and nanoseconds of the inode change time: unlike mtime, no writer can set
        /// it back (`cp -p`, `touch -r`).
        changed: (i64, i64),
        inode: (u64, u64),
    },
    /// Missing, unreadable, or not a regular file (a reason is reported once per change).
    Unusable(std::io::ErrorKind),
}

impl Stamp {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Self::File {
                len: m.len(),
                modified: m.modified().ok(),
                changed: (m.ctime(), m.ctime_nsec()),
                inode: (m.dev(), m.ino()),
            },
            Ok(_) => Self::Unusable(std::io::ErrorKind::InvalidInput),
            Err(e) => Self::Unusable(e.kind()),
        }
    }
}

impl FileSource {
    /// A source for `path`, checked every `poll_interval`; files over `max_bytes` are refused.
    /// Refusals are counted on `rejections`.
    pub fn new(
        path: PathBuf,
        poll_interval: Duration,
        max_bytes: u64,
        mappings: BTreeMap<String, Mapping>,
        rejections: Rejections,
        spec_check: SpecCheck,
    ) -> Self {
        rejections.show_file_reasons();
        Self {
            path,
            poll_interval,
            max_bytes,
            mappings,
            spec_check,
            seen: None,
            judged: None,
            applied: None,
            rejections,
        }
    }

    /// One look at the file: `None` while it is unchanged or not settled, else what to report.
    /// A refusal is counted here, once per version of the file.
    async fn poll_once(&mut self) -> Option<Result<Snapshot, InventoryError>> {
        let result = self.look().await;
        if let Some(Err(e)) = &result {
            self.rejections.count_file(e.refusal());
        }
        result
    }

    async fn look(&mut self) -> Option<Result<Snapshot, InventoryError>> {
        let path = self.path.clone();
        let stamp = tokio::task::spawn_blocking(move || Stamp::of(&path))
            .await
            .ok()?;
        let settled = self.seen == Some(stamp);
        // A version seen but not judged that has changed again was passed over, still being
        // written: counted, as every version not applied is.
        if self
            .seen
            .is_some_and(|seen| seen != stamp && self.judged != Some(seen))
        {
            self.rejections.count_file(FileRefusal::Unsettled);
        }
        self.seen = Some(stamp);
        if self.judged == Some(stamp) {
            return None;
        }
        // Nothing is loaded on the first look, so it acts at once; a later change waits until
        // the file looks the same on two polls in a row.
        if !settled && self.judged.is_some() {
            return None;
        }
        if let Stamp::Unusable(kind) = stamp {
            self.judged = Some(stamp);
            return Some(Err(self.unusable(kind)));
        }
        let path = self.path.clone();
        let max_bytes = self.max_bytes;
        let mappings = self.mappings.clone();
        let previous = self.applied.take();
        let rejections = self.rejections.clone();
        let check = Arc::clone(&self.spec_check);
        let outcome = tokio::task::spawn_blocking(move || {
            load(
                &path,
                stamp,
                max_bytes,
                &mappings,
                previous,
                &rejections,
                &*check,
            )
        })
        .await;
        let Ok((applied, loaded)) = outcome else {
            self.judged = Some(stamp);
            return Some(Err(InventoryError::Refused {
                path: self.path.clone(),
                cause: FileRefusal::ReadError,
                reason: "the reader thread failed".into(),
            }));
        };
        self.applied = applied;
        match loaded {
            Loaded::Moving(now) => {
                // Written to while it was read: judge it again once it is still.
                log::debug!(
                    "inventory: {} changed while it was read; reading it again once it is still",
                    self.path.display()
                );
                self.rejections.count_file(FileRefusal::Unsettled);
                self.seen = Some(now);
                None
            }
            Loaded::Unchanged => {
                self.judged = Some(stamp);
                None
            }
            Loaded::Snapshot(snapshot) => {
                self.judged = Some(stamp);
                Some(Ok(snapshot))
            }
            Loaded::Refused(e) => {
                self.judged = Some(stamp);
                Some(Err(e))
            }
        }
    }

    fn unusable(&self, kind: std::io::ErrorKind) -> InventoryError {
        match kind {
            std::io::ErrorKind::InvalidInput => InventoryError::Refused {
                path: self.path.clone(),
                cause: FileRefusal::NotRegular,
                reason: "not a regular file".into(),
            },
            kind => InventoryError::Read {
                path: self.path.clone(),
                source: kind.into(),
            },
        }
    }
}

/// What reading one settled version of the file gave.
enum Loaded {
    /// The same bytes as the inventory already applied.
    Unchanged,
    /// The file changed while it was read; this is its stamp now.
    Moving(Stamp),
    /// A complete, valid inventory.
    Snapshot(Snapshot),
    /// Not applied, for this reason.
    Refused(InventoryError),
}

/// Reads at most `max_bytes + 1` bytes, checks the file did not change meanwhile, parses it and
/// builds the snapshot; invalid objects are counted on `rejections`. Returns the content to
/// remember as applied, and the outcome. Runs on a blocking thread.
fn load(
    path: &Path,
    stamp: Stamp,
    max_bytes: u64,
    mappings: &BTreeMap<String, Mapping>,
    previous: Option<Vec<u8>>,
    rejections: &Rejections,
    spec_check: &CheckSpec,
) -> (Option<Vec<u8>>, Loaded) {
    let refuse = |cause: FileRefusal, reason: String| {
        Loaded::Refused(InventoryError::Refused {
            path: path.to_owned(),
            cause,
            reason,
        })
    };
    let mut bytes = Vec::new();
    // Non-blocking, so a FIFO swapped in since the stamp cannot hold this thread; a regular
    // file reads the same either way.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    let read = file.and_then(|f| {
        if !f.metadata()?.is_file() {
            return Ok(false);
        }
        f.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)?;
        Ok(true)
    });
    if let Ok(false) = read {
        let reason = "not a regular file".to_string();
        return (previous, refuse(FileRefusal::NotRegular, reason));
    }
    if let Err(source) = read {
        let e = InventoryError::Read {
            path: path.to_owned(),
            source,
        };
        return (previous, Loaded::Refused(e));
    }
    let now = Stamp::of(path);
    if now != stamp {
        return (previous, Loaded::Moving(now));
    }
    if bytes.len() as u64 > max_bytes {
        let reason = format!(
            "larger than inventory.maxBytes ({max_bytes} bytes); raise it or split the fleet"
        );
        return (previous, refuse(FileRefusal::TooLarge, reason));
    }
    if previous.as_deref() == Some(bytes.as_slice()) {
        return (previous, Loaded::Unchanged);
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        let reason = "the file is empty (write `[]` for an empty inventory)".to_string();
        return (previous, refuse(FileRefusal::Empty, reason));
    }
    let count = &mut |kind: Option<&str>| rejections.count_object(&kind_label(kind, mappings));
    match parse_checking(&bytes, path, spec_check, count) {
        Ok(objects) => {
            let snapshot = Snapshot::build(objects, mappings);
            (Some(bytes), Loaded::Snapshot(snapshot))
        }
        Err(e) => (previous, Loaded::Refused(e)),
    }
}

impl InventorySource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn next(&mut self) -> Result<Snapshot, InventoryError> {
        loop {
            if let Some(result) = self.poll_once().await {
                if let Ok(snapshot) = &result {
                    log::info!("inventory from {}: {}", self.describe(), snapshot.counts());
                }
                return result;
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }
}

/// Parses a YAML stream of objects; `List` documents and top-level sequences are flattened.
/// The whole file is refused when any object lacks the basic metadata or breaks Kubernetes'
/// limits on names and labels, or when the file holds no list and no object (say `[]` to mean
/// "no objects").
pub fn parse_objects(bytes: &[u8], path: &Path) -> Result<Vec<Object>, InventoryError> {
    parse_checking(bytes, path, &no_spec_check, &mut |_| {})
}

/// [`parse_objects`], refusing the file as the proxy does when `spec_check` refuses an object
/// (the proxy's check is [`crate::spec_check`]).
pub fn parse_objects_checked(
    bytes: &[u8],
    path: &Path,
    spec_check: &CheckSpec,
) -> Result<Vec<Object>, InventoryError> {
    parse_checking(bytes, path, spec_check, &mut |_| {})
}

/// What the reconcilers say of an object's spec before a file is taken in (a Forwarder or Route
/// that does not read refuses the file, keeping the running ones, instead of closing a
/// listener): `Err` with the kind and why. The inventory does not know what a spec may be;
/// `lib.rs` hands the reconcilers' check in.
pub type SpecCheck = Arc<CheckSpec>;

/// The check behind a [`SpecCheck`].
pub type CheckSpec = dyn Fn(&Object) -> Result<(), (&'static str, String)> + Send + Sync;

/// Takes every spec.
pub fn no_spec_check(_: &Object) -> Result<(), (&'static str, String)> {
    Ok(())
}

/// [`parse_objects`], calling `invalid` with the kind (when it has one) of each invalid
/// object: every object is checked, so each is counted, and the reason names the first.
fn parse_checking(
    bytes: &[u8],
    path: &Path,
    spec_check: &CheckSpec,
    invalid: &mut dyn FnMut(Option<&str>),
) -> Result<Vec<Object>, InventoryError> {
    use serde::Deserialize;
    let mut values = Vec::new();
    let mut explicit_list = false;
    for doc in serde_yaml::Deserializer::from_slice(bytes) {
        let value = Value::deserialize(doc).map_err(|source| InventoryError::Parse {
            path: path.to_owned(),
            source,
        })?;
        match value {
            Value::Null => {}
            Value::Object(mut m) if m.get("items").is_some_and(Value::is_array) => {
                explicit_list = true;
                if let Some(Value::Array(items)) = m.remove("items") {
                    values.extend(items);
                }
            }
            Value::Array(items) => {
                explicit_list = true;
                values.extend(items);
            }
            other => values.push(other),
        }
    }
    if values.is_empty() && !explicit_list {
        return Err(InventoryError::Refused {
            path: path.to_owned(),
            cause: FileRefusal::Empty,
            reason: "no objects and no list (write `[]` for an empty inventory)".into(),
        });
    }
    let mut objects = Vec::with_capacity(values.len());
    let mut first_error: Option<String> = None;
    let mut more_errors = 0usize;
    for (i, value) in values.into_iter().enumerate() {
        match check_object(value, spec_check) {
            Ok(object) if first_error.is_none() => objects.push(object),
            // The file is refused already: the rest is only checked and counted.
            Ok(_) => {}
            Err((kind, why)) => {
                invalid(kind.as_deref());
                if first_error.is_none() {
                    first_error = Some(format!("object #{i}{why}"));
                    objects = Vec::new();
                } else {
                    more_errors += 1;
                }
            }
        }
    }
    match first_error {
        None => Ok(objects),
        Some(mut reason) => {
            if more_errors > 0 {
                reason.push_str(&format!(" (and {more_errors} more invalid objects)"));
            }
            Err(InventoryError::Refused {
                path: path.to_owned(),
                cause: FileRefusal::InvalidObject,
                reason,
            })
        }
    }
}

/// One object of a file, checked: its metadata, Kubernetes' limits on its name and labels,
/// and, for a Forwarder or a Route, its spec. An error gives the object's kind (for the
/// counter) and the reason, to follow `object #i`.
fn check_object(value: Value, spec_check: &CheckSpec) -> Result<Object, (Option<String>, String)> {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let object = match Object::from_value(value) {
        Ok(o) => o,
        Err(e) => return Err((kind, format!(": {e}"))),
    };
    let failed = |why: String| {
        let shown = format!(" ({})", names::quote(&object.kind));
        Err((Some(object.kind.clone()), format!("{shown}: {why}")))
    };
    if let Err(why) = names::check_metadata(&object.name, &object.namespace, &object.labels) {
        return failed(why.to_string());
    }
    if let Err((what, e)) = spec_check(&object) {
        return Err((kind, format!(": {what} {}: {e}", object.name)));
    }
    Ok(object)
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
"#;
        let objects = parse_objects(list.as_bytes(), "t.yaml".as_ref()).unwrap();
        assert_eq!(objects.len(), 6);
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
    fn one_invalid_object_refuses_the_file() {
        let text = "- {apiVersion: v1, kind: Pod, metadata: {name: ok}}\n\
                    - {kind: GameServer, metadata: {name: no-api-version}}\n";
        let e = parse_objects(text.as_bytes(), "t.yaml".as_ref()).unwrap_err();
        assert!(
            e.to_string().contains("object #1: missing apiVersion"),
            "{e}"
        );
        // Cut off mid-object: the last object lost its metadata.
        let cut =
            "- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n- apiVersion: v1\n  kind: Pod\n";
        assert!(parse_objects(cut.as_bytes(), "t.yaml".as_ref()).is_err());
    }

    #[test]
    fn names_and_labels_past_kubernetes_limits_refuse_the_file() {
        let long = "g".repeat(10_000);
        for (object, says) in [
            (
                format!(
                    "{{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: {long}}}}}"
                ),
                "object #1 (`GameServer`): metadata.name `gggg",
            ),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: Pod_1}}".to_string(),
                "object #1 (`Pod`): metadata.name `Pod_1`: not a DNS-1123 subdomain",
            ),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a.b}}".to_string(),
                "metadata.namespace `a.b`",
            ),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: p, labels: {\"a b\": x}}}"
                    .to_string(),
                "metadata.labels key `a b`",
            ),
            (
                format!(
                    "{{apiVersion: v1, kind: Pod, metadata: {{name: p, labels: {{k: {}}}}}}}",
                    "v".repeat(64)
                ),
                "64 characters, over the limit of 63",
            ),
        ] {
            let text =
                format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: ok}}}}\n- {object}\n");
            let e = parse_objects(text.as_bytes(), "t.yaml".as_ref()).unwrap_err();
            assert_eq!(e.refusal(), FileRefusal::InvalidObject);
            let e = e.to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.len() < 300, "{} characters: {e}", e.len());
        }
    }

    #[test]
    fn every_invalid_object_is_counted_by_a_bounded_kind() {
        let config = Config::from_yaml(CONFIG).unwrap();
        let text = "- {apiVersion: agones.dev/v1, kind: GameServer, metadata: {name: Bad}}\n\
                    - {apiVersion: v1, kind: Pod, metadata: {name: ok}}\n\
                    - {apiVersion: v1, kind: Pod, metadata: {name: Bad}}\n\
                    - {apiVersion: x/v1, kind: Made-Up, metadata: {name: Bad}}\n\
                    - {metadata: {name: no-kind}}\n";
        let rejections = Rejections::default();
        let count = &mut |kind: Option<&str>| {
            rejections.count_object(&kind_label(kind, &config.mappings));
        };
        let e =
            parse_checking(text.as_bytes(), "t.yaml".as_ref(), &no_spec_check, count).unwrap_err();
        assert!(e.to_string().contains("object #0"), "{e}");
        assert!(
            e.to_string().contains("(and 3 more invalid objects)"),
            "{e}"
        );
        assert_eq!(rejections.objects("gameservers"), 1);
        assert_eq!(rejections.objects("pods"), 1);
        assert_eq!(rejections.objects("other"), 2);
    }

    #[test]
    fn only_an_explicit_list_is_empty() {
        for empty in ["[]", "items: []", "apiVersion: v1\nkind: List\nitems: []\n"] {
            let objects = parse_objects(empty.as_bytes(), "t.yaml".as_ref()).unwrap();
            assert!(objects.is_empty(), "{empty}");
        }
        for nothing in ["", "# just a comment\n", "---\n---\n"] {
            let e = parse_objects(nothing.as_bytes(), "t.yaml".as_ref()).unwrap_err();
            assert!(e.to_string().contains("[]"), "{nothing:?}: {e}");
        }
    }

    fn source(path: &Path, max_bytes: u64) -> FileSource {
        let config = Config::from_yaml(CONFIG).unwrap();
        FileSource::new(
            path.to_owned(),
            Duration::from_millis(10),
            max_bytes,
            config.mappings,
            Rejections::default(),
            Arc::new(no_spec_check),
        )
    }

    fn gameservers(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!("- {{apiVersion: agones.dev/v1, kind: GameServer, metadata: {{name: gs-{i}}}}}\n")
            })
            .collect()
    }

    /// Drives one poll at a time, as `next` does between its sleeps.
    #[tokio::test]
    async fn a_change_is_applied_only_once_settled_and_whole() {
        let dir = std::env::temp_dir().join(format!("inv-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inv.yaml");
        std::fs::write(&path, gameservers(2)).unwrap();
        let mut src = source(&path, 4096);
        let refused = src.rejections.clone();
        let first = src.poll_once().await.unwrap().unwrap();
        assert_eq!(
            first.by_mapping["gameserver"].len(),
            2,
            "first look applies at once"
        );
        assert!(src.poll_once().await.is_none(), "unchanged");

        // A change waits one poll, then applies.
        std::fs::write(&path, gameservers(3)).unwrap();
        assert!(src.poll_once().await.is_none(), "not settled yet");
        let next = src.poll_once().await.unwrap().unwrap();
        assert_eq!(next.by_mapping["gameserver"].len(), 3);
        assert_eq!(
            refused.files(FileRefusal::Unsettled),
            0,
            "a change that settles"
        );

        // Written again before it settled: that version is passed over, counted, and the last
        // one applies once still.
        std::fs::write(&path, gameservers(4)).unwrap();
        assert!(src.poll_once().await.is_none());
        std::fs::write(&path, gameservers(5)).unwrap();
        assert!(src.poll_once().await.is_none(), "not settled yet");
        assert_eq!(refused.files(FileRefusal::Unsettled), 1);
        let next = src.poll_once().await.unwrap().unwrap();
        assert_eq!(next.by_mapping["gameserver"].len(), 5);
        assert_eq!(refused.files(FileRefusal::Unsettled), 1, "counted once");

        // Truncated to nothing: refused once, then quiet.
        std::fs::write(&path, "").unwrap();
        assert!(src.poll_once().await.is_none());
        let e = src.poll_once().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(
            src.poll_once().await.is_none(),
            "a refusal is reported once"
        );
        assert_eq!(refused.files(FileRefusal::Empty), 1, "and counted once");

        // Over maxBytes: refused.
        std::fs::write(&path, gameservers(200)).unwrap();
        assert!(src.poll_once().await.is_none());
        let e = src.poll_once().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("maxBytes"), "{e}");
        assert_eq!(refused.files(FileRefusal::TooLarge), 1);

        // Not a regular file (a symlink to a device).
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(src.poll_once().await.is_none());
        let e = src.poll_once().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(refused.files(FileRefusal::NotRegular), 1);
        std::fs::remove_file(&path).unwrap();

        // An invalid object: the file refused, the object counted by its mapping's kind.
        std::fs::write(&path, gameservers(2).replace("gs-1", "GS_1")).unwrap();
        assert!(src.poll_once().await.is_none());
        let e = src.poll_once().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("metadata.name `GS_1`"), "{e}");
        assert_eq!(refused.files(FileRefusal::InvalidObject), 1);
        assert_eq!(refused.objects("gameservers"), 1);

        // Fixed: applied again; an explicit empty list empties it.
        std::fs::write(&path, gameservers(1)).unwrap();
        assert!(src.poll_once().await.is_none());
        let fixed = src.poll_once().await.unwrap().unwrap();
        assert_eq!(fixed.by_mapping["gameserver"].len(), 1);
        std::fs::write(&path, "[]\n").unwrap();
        assert!(src.poll_once().await.is_none());
        let empty = src.poll_once().await.unwrap().unwrap();
        assert!(empty.by_mapping["gameserver"].is_empty());
        let _ = std::fs::remove_dir_all(&dir);
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
