//! What a GameServerAllocation asks for, read as Agones reads it: the request's types (parsed
//! from untrusted JSON), its validation, selector matching over GameServer objects, and the
//! metadata, state and counter changes an allocation writes. No I/O: the stand-in's server
//! (`super`) lists, chooses with these, and writes.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kube::api::DynamicObject;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{GROUP, LAST_ALLOCATED, VERSION};

/// A GameServerAllocation request (`allocation.agones.dev/v1`), as far as the stand-in reads
/// it: unknown fields are ignored, as Agones' decoder does.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GameServerAllocation {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<RequestMeta>,
    spec: Option<AllocationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestMeta {
    name: Option<String>,
    generate_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllocationSpec {
    /// Tried in order; the first that matches a GameServer wins.
    selectors: Option<Vec<Selector>>,
    /// The deprecated form: `preferred` in order, then `required`.
    required: Option<Selector>,
    preferred: Option<Vec<Selector>>,
    /// Labels and annotations put on the allocated GameServer.
    metadata: Option<MetaPatch>,
    /// Actions on the allocated GameServer's counters.
    counters: Option<BTreeMap<String, CounterAction>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Selector {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<Requirement>>,
    /// `Ready` (the default) or `Allocated` (backfill).
    game_server_state: Option<String>,
    counters: Option<BTreeMap<String, CounterSelector>>,
}

#[derive(Clone, Debug, Deserialize)]
struct Requirement {
    key: String,
    operator: String,
    values: Option<Vec<String>>,
}

/// Bounds on a counter; a max of 0 means none. Available is capacity − count.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CounterSelector {
    min_count: Option<i64>,
    max_count: Option<i64>,
    min_available: Option<i64>,
    max_available: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
struct CounterAction {
    /// `Increment` or `Decrement`, by `amount`.
    action: Option<String>,
    amount: Option<i64>,
    capacity: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct MetaPatch {
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

impl GameServerAllocation {
    /// The type fields, where given, must name this kind.
    pub(super) fn check_type(&self) -> Result<(), String> {
        let api_version = format!("{GROUP}/{VERSION}");
        match (self.api_version.as_deref(), self.kind.as_deref()) {
            (Some(v), _) if v != api_version => {
                Err(format!("apiVersion {v:?} is not {api_version}"))
            }
            (_, Some(k)) if k != "GameServerAllocation" => {
                Err(format!("kind {k:?} is not GameServerAllocation"))
            }
            _ => Ok(()),
        }
    }

    /// The answer's name when no server was allocated: the request's, or one generated.
    pub(super) fn name(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let meta = self.metadata.as_ref();
        if let Some(name) = meta.and_then(|m| m.name.clone()).filter(|n| !n.is_empty()) {
            return name;
        }
        let prefix = meta
            .and_then(|m| m.generate_name.clone())
            .unwrap_or_else(|| "gameserverallocation-".into());
        let random = std::collections::hash_map::RandomState::new()
            .hash_one(N.fetch_add(1, Ordering::Relaxed));
        format!("{prefix}{:05x}", random & 0xf_ffff)
    }

    /// Agones' metadata patch of the allocated `gs`: labels and annotations merged in, and the
    /// time of this allocation stamped.
    pub(super) fn patch_metadata(&self, gs: &mut DynamicObject, now: SystemTime) {
        let patch = self
            .spec
            .clone()
            .unwrap_or_default()
            .metadata
            .unwrap_or_default();
        gs.metadata
            .labels
            .get_or_insert_default()
            .extend(patch.labels.unwrap_or_default());
        let annotations = gs.metadata.annotations.get_or_insert_default();
        annotations.extend(patch.annotations.unwrap_or_default());
        annotations.insert(LAST_ALLOCATED.into(), rfc3339(now, true));
    }

    /// The allocated `gs`'s new status: `Allocated`, with the counter actions applied.
    pub(super) fn patch_status(&self, gs: &mut DynamicObject) {
        if !gs.data["status"].is_object() {
            gs.data["status"] = json!({});
        }
        if let Some(status) = gs.data["status"].as_object_mut() {
            status.insert("state".into(), "Allocated".into());
            let actions = self.spec.clone().unwrap_or_default().counters;
            apply_counter_actions(status, &actions.unwrap_or_default());
        }
    }

    /// The selectors in the order they are tried; without any, `preferred` then `required`
    /// (an empty selector: any Ready server).
    pub(super) fn selectors(&self) -> Vec<Selector> {
        let spec = self.spec.clone().unwrap_or_default();
        match spec.selectors {
            Some(selectors) if !selectors.is_empty() => selectors,
            _ => {
                let mut all = spec.preferred.unwrap_or_default();
                all.push(spec.required.unwrap_or_default());
                all
            }
        }
    }

    /// What Agones' validation refuses: (field, why) for each.
    pub(super) fn invalid_fields(&self) -> Vec<(String, String)> {
        let mut causes = Vec::new();
        for (i, selector) in self.selectors().iter().enumerate() {
            let at = format!("spec.selectors[{i}]");
            if let Some(state) = &selector.game_server_state
                && state != "Ready"
                && state != "Allocated"
            {
                causes.push((
                    format!("{at}.gameServerState"),
                    format!("{state:?} is not Ready or Allocated"),
                ));
            }
            for (j, r) in selector.match_expressions.iter().flatten().enumerate() {
                let field = format!("{at}.matchExpressions[{j}]");
                let values = r.values.as_ref().map_or(0, Vec::len);
                match (r.operator.as_str(), values) {
                    ("In" | "NotIn", 0) => causes.push((field, "In and NotIn need values".into())),
                    ("Exists" | "DoesNotExist", 1..) => {
                        causes.push((field, "Exists and DoesNotExist take no values".into()));
                    }
                    ("In" | "NotIn" | "Exists" | "DoesNotExist", _) => {}
                    (other, _) => causes.push((field, format!("unknown operator {other:?}"))),
                }
            }
            for (name, c) in selector.counters.iter().flatten() {
                let bounds = [c.min_count, c.max_count, c.min_available, c.max_available];
                if bounds.iter().flatten().any(|b| *b < 0) {
                    causes.push((
                        format!("{at}.counters.{name}"),
                        "bounds must be 0 or more".into(),
                    ));
                }
            }
        }
        let spec = self.spec.clone().unwrap_or_default();
        for (name, a) in spec.counters.iter().flatten() {
            let field = format!("spec.counters.{name}");
            if let Some(action) = a
                .action
                .as_deref()
                .filter(|a| *a != "Increment" && *a != "Decrement")
            {
                causes.push((
                    field.clone(),
                    format!("action {action:?} is not Increment or Decrement"),
                ));
            }
            if a.amount.is_some_and(|n| n < 0) || a.capacity.is_some_and(|n| n < 0) {
                causes.push((field, "amount and capacity must be 0 or more".into()));
            }
        }
        causes
    }
}

impl Selector {
    /// Whether `gs` is a candidate: its state, labels and counters.
    pub(super) fn matches(&self, gs: &DynamicObject) -> bool {
        let state = gs.data["status"]["state"].as_str().unwrap_or_default();
        if state != self.game_server_state.as_deref().unwrap_or("Ready") {
            return false;
        }
        let label = |key: &str| gs.metadata.labels.as_ref().and_then(|l| l.get(key));
        let labels_match = self
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| label(k) == Some(v));
        let expressions_match = self.match_expressions.iter().flatten().all(|r| {
            let values = r.values.as_deref().unwrap_or_default();
            match (r.operator.as_str(), label(&r.key)) {
                ("In", Some(v)) => values.contains(v),
                ("NotIn", v) => v.is_none_or(|v| !values.contains(v)),
                ("Exists", v) => v.is_some(),
                ("DoesNotExist", v) => v.is_none(),
                _ => false,
            }
        });
        labels_match && expressions_match && self.counters_match(&gs.data["status"]["counters"])
    }

    fn counters_match(&self, counters: &Value) -> bool {
        self.counters.iter().flatten().all(|(name, bounds)| {
            let Some(counter) = counters.get(name) else {
                return false;
            };
            let count = counter["count"].as_i64().unwrap_or(0);
            let available = counter["capacity"]
                .as_i64()
                .unwrap_or(0)
                .saturating_sub(count);
            let at_least = |value: i64, min: Option<i64>| value >= min.unwrap_or(0);
            let at_most = |value: i64, max: Option<i64>| max.is_none_or(|m| m == 0 || value <= m);
            at_least(count, bounds.min_count)
                && at_most(count, bounds.max_count)
                && at_least(available, bounds.min_available)
                && at_most(available, bounds.max_available)
        })
    }
}

/// The status of an allocation of `gs`, as Agones reports it.
pub(super) fn allocated_status(gs: &DynamicObject) -> Map<String, Value> {
    let mut status = Map::new();
    status.insert(
        "gameServerName".into(),
        gs.metadata.name.clone().unwrap_or_default().into(),
    );
    for field in ["ports", "address", "addresses", "nodeName", "counters"] {
        if let Some(value) = gs.data["status"].get(field) {
            status.insert(field.into(), value.clone());
        }
    }
    status.insert("source".into(), "local".into());
    status.insert(
        "metadata".into(),
        json!({"labels": gs.metadata.labels, "annotations": gs.metadata.annotations}),
    );
    status
}

/// Agones' counter actions on a GameServer's `status`: capacity first, then the count moved
/// and kept within 0..=capacity. A counter the server lacks is left alone (Agones records a
/// warning event and allocates anyway).
fn apply_counter_actions(
    status: &mut Map<String, Value>,
    actions: &BTreeMap<String, CounterAction>,
) {
    for (name, action) in actions {
        let Some(counter) = status
            .get_mut("counters")
            .and_then(|c| c.get_mut(name))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        if let Some(capacity) = action.capacity {
            counter.insert("capacity".into(), capacity.into());
        }
        let capacity = counter.get("capacity").and_then(Value::as_i64).unwrap_or(0);
        let count = counter.get("count").and_then(Value::as_i64).unwrap_or(0);
        let moved = match (action.action.as_deref(), action.amount) {
            (Some("Increment"), Some(amount)) => count.saturating_add(amount),
            (Some("Decrement"), Some(amount)) => count.saturating_sub(amount),
            _ => continue,
        };
        counter.insert("count".into(), moved.clamp(0, capacity.max(0)).into());
    }
}

/// `t` as RFC 3339 in UTC, with nanoseconds or whole seconds.
pub(super) fn rfc3339(t: SystemTime, nanos: bool) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = (since.as_secs() / 86_400, since.as_secs() % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), for days since 1970 (never negative).
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let time = format!(
        "{:02}:{:02}:{:02}",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    );
    let fraction = if nanos {
        format!(".{:09}", since.subsec_nanos())
    } else {
        String::new()
    };
    format!("{year:04}-{month:02}-{day:02}T{time}{fraction}Z")
}
