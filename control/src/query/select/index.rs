//! The query index: built once per inventory snapshot, so a query does no work per object that
//! can be done per snapshot. Each mapping's objects are resolved to their backends once, and
//! listed by namespace and by label pair, so a query walks the shortest list its namespace and
//! label selector allow instead of every object of its resource type.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Candidate, resolve};
use crate::config::Mapping;
use crate::inventory::{Object, Snapshot};

/// One object of a mapping, and its backend if it has a usable one.
#[derive(Debug)]
pub struct Entry {
    /// The object.
    pub object: Arc<Object>,
    /// The object with its backend, when it resolves.
    pub candidate: Option<Candidate>,
}

/// Status paths whose values a mapping index keeps, at most (each costs a string per object;
/// more distinct paths are read from the objects on every query instead).
const MAX_STATUS_PATHS: usize = 16;

/// One mapping's objects, in name order, with their lists.
#[derive(Debug, Default)]
pub struct MappingIndex {
    /// Every object, in (namespace, name) order.
    pub entries: Vec<Entry>,
    by_namespace: HashMap<String, Vec<u32>>,
    by_label: HashMap<(String, String), Vec<u32>>,
    /// Per status path asked for: every entry's value there, read once per snapshot.
    /// Keyed by the parsed path, so spellings of one path (`a[0]`, `a[00]`) share an entry.
    status: parking_lot::Mutex<HashMap<crate::query::jsonpath::Path, Arc<StatusColumn>>>,
}

/// Every entry's value at one status path, as small ids into the table of its distinct values
/// (a fleet has few: `Ready`, `Allocated`, …). A query turns its expected values into ids once
/// and then compares integers in one array, instead of following a string per object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StatusColumn {
    /// Per entry: the id of its value, or [`StatusColumn::ABSENT`].
    ids: Vec<u32>,
    values: HashMap<String, u32>,
}

impl StatusColumn {
    /// The id of an entry with no value at the path.
    const ABSENT: u32 = u32::MAX;

    fn read(entries: &[Entry], path: &crate::query::jsonpath::Path) -> Self {
        let mut column = Self::default();
        column.ids = entries
            .iter()
            .map(|e| match path.get_string(&e.object.raw) {
                Some(value) => {
                    let next = u32::try_from(column.values.len()).unwrap_or(Self::ABSENT - 1);
                    *column.values.entry(value).or_insert(next)
                }
                None => Self::ABSENT,
            })
            .collect();
        column
    }

    /// The ids of those of `expected` that some entry has.
    pub fn ids_of(&self, expected: &[String]) -> Vec<u32> {
        expected
            .iter()
            .filter_map(|v| self.values.get(v).copied())
            .collect()
    }

    /// Whether entry `i` has one of the values `ids` stand for.
    pub fn has(&self, i: usize, ids: &[u32]) -> bool {
        self.ids.get(i).is_some_and(|id| ids.contains(id))
    }
}

/// What a [`MappingIndex::narrow`]ed list already guarantees of its entries, so the caller
/// does not check it again (each check reads the object, one cache miss per entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrowed {
    /// Nothing: every entry.
    Nothing,
    /// Every entry is in the query's namespace.
    Namespace,
    /// Every entry has the query's label selector's `n`th pair (in the selector's order).
    Label(usize),
}

impl MappingIndex {
    fn build(
        objects: &[Arc<Object>],
        mapping: &Mapping,
        snapshot: &Snapshot,
        ports: usize,
    ) -> Self {
        let mut index = Self::default();
        for (i, object) in objects.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            index
                .by_namespace
                .entry(object.namespace.clone())
                .or_default()
                .push(i);
            for (k, v) in &object.labels {
                index
                    .by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(i);
            }
            let candidate = resolve(mapping, object, snapshot, ports).map(|backend| Candidate {
                object: Arc::clone(object),
                backend,
            });
            index.entries.push(Entry {
                object: Arc::clone(object),
                candidate,
            });
        }
        index
    }

    /// Every entry's value at status path `path`, kept for the snapshot's life; `None` once
    /// [`MAX_STATUS_PATHS`] paths are kept (read per query then).
    pub fn status_values(&self, path: &crate::query::jsonpath::Path) -> Option<Arc<StatusColumn>> {
        let mut cache = self.status.lock();
        if let Some(values) = cache.get(path) {
            return Some(Arc::clone(values));
        }
        if cache.len() >= MAX_STATUS_PATHS {
            return None;
        }
        let values = Arc::new(StatusColumn::read(&self.entries, path));
        cache.insert(path.clone(), Arc::clone(&values));
        Some(values)
    }

    /// The entries (with their positions) that may match `namespace` and `labels`: the
    /// shortest of their lists (in name order), and what that list guarantees; every entry
    /// when the query names neither. The caller applies every other filter to what comes back.
    pub fn narrow<'a>(
        &'a self,
        namespace: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> (Box<dyn Iterator<Item = (usize, &'a Entry)> + 'a>, Narrowed) {
        static EMPTY: Vec<u32> = Vec::new();
        let mut shortest: Option<(&Vec<u32>, Narrowed)> = None;
        let mut consider = |list: &'a Vec<u32>, by: Narrowed| {
            if shortest.is_none_or(|(s, _)| list.len() < s.len()) {
                shortest = Some((list, by));
            }
        };
        if let Some(ns) = namespace {
            consider(
                self.by_namespace.get(ns).unwrap_or(&EMPTY),
                Narrowed::Namespace,
            );
        }
        for (n, (k, v)) in labels.iter().enumerate() {
            consider(
                self.by_label.get(&(k.clone(), v.clone())).unwrap_or(&EMPTY),
                Narrowed::Label(n),
            );
        }
        match shortest {
            Some((list, by)) => (
                Box::new(
                    list.iter()
                        .map(|&i| (i as usize, &self.entries[i as usize])),
                ),
                by,
            ),
            None => (Box::new(self.entries.iter().enumerate()), Narrowed::Nothing),
        }
    }

    /// The status paths queries asked about.
    pub(super) fn status_paths(&self) -> Vec<crate::query::jsonpath::Path> {
        self.status.lock().keys().cloned().collect()
    }
}

/// Every mapping's index, for one snapshot.
#[derive(Debug, Default)]
pub struct QueryIndex {
    mappings: HashMap<String, MappingIndex>,
}

impl QueryIndex {
    /// Indexes `snapshot` for `mappings`; `ports` is the number of data ports.
    pub fn build(
        snapshot: &Snapshot,
        mappings: &std::collections::BTreeMap<String, Mapping>,
        ports: usize,
    ) -> Self {
        let mappings = mappings
            .iter()
            .map(|(name, mapping)| {
                let objects = snapshot
                    .by_mapping
                    .get(name)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (
                    name.clone(),
                    MappingIndex::build(objects, mapping, snapshot, ports),
                )
            })
            .collect();
        Self { mappings }
    }

    /// Indexes `snapshot` like [`QueryIndex::build`], and reads up front the status values of
    /// every path that queries asked `previous` about: the index is built off the query path,
    /// so the first query after a change does not walk the whole fleet for them (about 5 ms at
    /// 10,000 GameServers), and a fleet that changes every 100 ms keeps its queries fast.
    pub fn build_warm(
        snapshot: &Snapshot,
        mappings: &std::collections::BTreeMap<String, Mapping>,
        ports: usize,
        previous: Option<&Self>,
    ) -> Self {
        let index = Self::build(snapshot, mappings, ports);
        if let Some(previous) = previous {
            for (name, mapping) in &index.mappings {
                let asked = previous
                    .mappings
                    .get(name)
                    .map(MappingIndex::status_paths)
                    .unwrap_or_default();
                for path in asked {
                    drop(mapping.status_values(&path));
                }
            }
        }
        index
    }

    /// The index of resource type `name`.
    pub fn mapping(&self, name: &str) -> Option<&MappingIndex> {
        self.mappings.get(name)
    }
}
