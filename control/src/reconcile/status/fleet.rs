//! What the fleet says, from what each instance reports (sans-io): a Gateway listener's state
//! across the nodes that serve it, which nodes have left, and the two rules that make a
//! whole-object status one truth under one writer: other controllers' route `parents` entries
//! are kept, and a condition's `lastTransitionTime` moves only when its status does.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// What one instance reports of the Gateway listeners it serves: per listener key
/// (`namespace/gateway/listener`), `None` when open there, else why not.
pub type ListenerFacts = BTreeMap<String, Option<String>>;

/// How many nodes a listener's message names, before it counts the rest.
const NAMED_NODES: usize = 5;

/// One Gateway listener across the fleet.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct ListenerState {
    /// Nodes where it is open, in name order.
    pub open_on: Vec<String>,
    /// Nodes where it is not, with why, in name order.
    pub not_open: Vec<(String, String)>,
}

impl ListenerState {
    /// Open on every instance that serves it (and on at least one).
    pub fn programmed(&self) -> bool {
        !self.open_on.is_empty() && self.not_open.is_empty()
    }

    /// One line for a condition's message: where it is not open and why, then where it is.
    pub fn describe(&self) -> String {
        if self.open_on.is_empty() && self.not_open.is_empty() {
            return "no instance has opened it yet".into();
        }
        // A few nodes by name, then counts: the message stays short on a large fleet.
        let mut parts: Vec<String> = self
            .not_open
            .iter()
            .take(NAMED_NODES)
            .map(|(node, why)| format!("not open on node {node}: {why}"))
            .collect();
        if self.not_open.len() > NAMED_NODES {
            parts.push(format!("and on {} more", self.not_open.len() - NAMED_NODES));
        }
        match self.open_on.len() {
            0 => {}
            n => {
                let mut names: Vec<&str> = self
                    .open_on
                    .iter()
                    .take(NAMED_NODES)
                    .map(String::as_str)
                    .collect();
                if n > NAMED_NODES {
                    names.push("…");
                }
                parts.push(format!(
                    "open on {n} of {} node(s) ({})",
                    n + self.not_open.len(),
                    names.join(", ")
                ));
            }
        }
        parts.join("; ")
    }
}

/// Each listener's state across the fleet, from every live instance's report.
pub fn aggregate(reports: &BTreeMap<String, ListenerFacts>) -> BTreeMap<String, ListenerState> {
    let mut out: BTreeMap<String, ListenerState> = BTreeMap::new();
    // Reports are by node name, in order, so each list comes out in node order.
    for (node, facts) in reports {
        for (listener, fact) in facts {
            let state = out.entry(listener.clone()).or_default();
            match fact {
                None => state.open_on.push(node.clone()),
                Some(why) => state.not_open.push((node.clone(), why.clone())),
            }
        }
    }
    out
}

/// An instance's `status.instances` entry on one of our objects, as the holder finds it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct InstanceEntry {
    /// The node it names.
    pub node: String,
    /// Its `lastUpdateTime`, if it has one that parses.
    pub last_update: Option<Timestamp>,
}

/// The nodes, among those named by `entries`, that have left: those in `gone` (their per-node
/// Lease lapsed). A node without a Lease in this fleet is never taken for gone: it may belong
/// to another fleet, run an older release, or be unable to write its Lease. `me` never departs.
pub fn departed(entries: &[InstanceEntry], gone: &BTreeSet<String>, me: &str) -> BTreeSet<String> {
    entries
        .iter()
        .filter(|e| e.node != me && gone.contains(&e.node))
        .map(|e| e.node.clone())
        .collect()
}

/// A route's `status.parents` as the writer applies it: the list is atomic, so the entries of
/// other controllers are carried over as they are, ours (`controller`) are replaced in place
/// (matched by `parentRef`), dropped when no longer wanted, and new ones appended.
pub fn merge_parents(current: Option<&Value>, ours: &[Value], controller: &str) -> Vec<Value> {
    let is_ours = |p: &Value| p.get("controllerName").and_then(Value::as_str) == Some(controller);
    let mut placed = vec![false; ours.len()];
    let mut out = Vec::new();
    for p in current.and_then(Value::as_array).into_iter().flatten() {
        if !is_ours(p) {
            out.push(p.clone());
            continue;
        }
        if let Some(i) = ours
            .iter()
            .position(|o| o.get("parentRef") == p.get("parentRef"))
            .filter(|i| !placed[*i])
        {
            placed[i] = true;
            out.push(ours[i].clone());
        }
    }
    for (i, o) in ours.iter().enumerate() {
        if !placed[i] {
            out.push(o.clone());
        }
    }
    out
}

/// Copies onto `desired` the `lastTransitionTime` of every condition whose status has not
/// changed since `current`; the others keep the empty time that the writer stamps with now.
/// Conditions are matched by `type`; list entries above them by `name` (Gateway listeners) or
/// by `parentRef` and `controllerName` (route parents).
pub fn carry_transition_times(desired: &mut Value, current: &Value) {
    match (desired, current) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want.iter_mut() {
                if let Some(old) = have.get(key) {
                    carry_transition_times(value, old);
                }
            }
            if let (Some(status), Some(old_status), Some(old_time)) = (
                want.get("status").filter(|_| want.contains_key("type")),
                have.get("status"),
                have.get("lastTransitionTime"),
            ) && status == old_status
                && want.get("type") == have.get("type")
            {
                let old_time = old_time.clone();
                want.insert("lastTransitionTime".into(), old_time);
            }
        }
        (Value::Array(want), Value::Array(have)) => {
            for item in want.iter_mut() {
                if let Some(old) = have.iter().find(|h| same_entry(item, h)) {
                    carry_transition_times(item, old);
                }
            }
        }
        _ => {}
    }
}

/// Whether two list entries are the same entry: a condition by `type`, a listener by `name`,
/// a route parent by `parentRef` and `controllerName`.
fn same_entry(a: &Value, b: &Value) -> bool {
    for key in ["type", "name"] {
        if let Some(k) = a.get(key) {
            return b.get(key) == Some(k);
        }
    }
    match a.get("parentRef") {
        Some(r) => {
            b.get("parentRef") == Some(r) && b.get("controllerName") == a.get("controllerName")
        }
        None => false,
    }
}

/// Whether any condition under `value` still waits for its `lastTransitionTime`.
pub fn has_unstamped(value: &Value) -> bool {
    match value {
        Value::Object(map) => {
            map.get("lastTransitionTime").and_then(Value::as_str) == Some("")
                || map.values().any(has_unstamped)
        }
        Value::Array(items) => items.iter().any(has_unstamped),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(list: &[(&str, Option<&str>)]) -> ListenerFacts {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn a_listener_is_programmed_only_where_every_serving_node_opened_it() {
        let reports = BTreeMap::from([
            (
                "node-a".to_string(),
                facts(&[("ns/gw/voice", None), ("ns/gw/chat", None)]),
            ),
            (
                "node-b".to_string(),
                facts(&[
                    ("ns/gw/voice", Some("udp/7000 is held by another process")),
                    ("ns/gw/chat", None),
                ]),
            ),
        ]);
        let states = aggregate(&reports);
        let chat = &states["ns/gw/chat"];
        assert!(chat.programmed());
        assert_eq!(chat.open_on, ["node-a", "node-b"]);
        let voice = &states["ns/gw/voice"];
        assert!(!voice.programmed());
        assert_eq!(
            voice.describe(),
            "not open on node node-b: udp/7000 is held by another process; open on 1 of 2 \
             node(s) (node-a)"
        );
        assert!(!ListenerState::default().programmed());
        assert_eq!(
            ListenerState::default().describe(),
            "no instance has opened it yet"
        );
    }

    #[test]
    fn only_nodes_whose_lease_lapsed_depart_and_never_this_one() {
        let entry = |node: &str| InstanceEntry {
            node: node.into(),
            last_update: None,
        };
        let entries = [
            entry("live"),
            entry("lapsed"),
            entry("no-lease"),
            entry("me"),
        ];
        let gone = BTreeSet::from(["lapsed".to_string(), "me".to_string()]);
        assert_eq!(
            departed(&entries, &gone, "me")
                .into_iter()
                .collect::<Vec<_>>(),
            ["lapsed"]
        );
    }

    #[test]
    fn other_controllers_parents_are_kept_in_place_and_ours_replaced() {
        let current = json!([
            {"parentRef": {"name": "a"}, "controllerName": "us", "conditions": [1]},
            {"parentRef": {"name": "a"}, "controllerName": "them", "conditions": [2]},
            {"parentRef": {"name": "gone"}, "controllerName": "us", "conditions": [3]},
        ]);
        let ours = [
            json!({"parentRef": {"name": "new"}, "controllerName": "us", "conditions": [5]}),
            json!({"parentRef": {"name": "a"}, "controllerName": "us", "conditions": [4]}),
        ];
        assert_eq!(
            merge_parents(Some(&current), &ours, "us"),
            [
                json!({"parentRef": {"name": "a"}, "controllerName": "us", "conditions": [4]}),
                json!({"parentRef": {"name": "a"}, "controllerName": "them", "conditions": [2]}),
                json!({"parentRef": {"name": "new"}, "controllerName": "us", "conditions": [5]}),
            ]
        );
        assert_eq!(
            merge_parents(Some(&current), &[], "us"),
            [json!({"parentRef": {"name": "a"}, "controllerName": "them", "conditions": [2]})],
            "ours all gone, theirs stay"
        );
        assert_eq!(merge_parents(None, &ours, "us").len(), 2);
    }

    #[test]
    fn a_transition_time_moves_only_when_the_status_does() {
        let current = json!({
            "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "T1"}],
            "listeners": [
                {"name": "voice", "attachedRoutes": 1, "conditions": [
                    {"type": "Accepted", "status": "True", "lastTransitionTime": "T2"},
                    {"type": "Programmed", "status": "True", "lastTransitionTime": "T3"},
                ]},
            ],
            "parents": [{"parentRef": {"name": "gw"}, "controllerName": "us", "conditions": [
                {"type": "ResolvedRefs", "status": "True", "lastTransitionTime": "T4"}]}],
        });
        let mut desired = json!({
            "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": ""}],
            "listeners": [
                {"name": "voice", "attachedRoutes": 2, "conditions": [
                    {"type": "Accepted", "status": "True", "lastTransitionTime": ""},
                    {"type": "Programmed", "status": "False", "lastTransitionTime": ""},
                ]},
                {"name": "new", "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": ""}]},
            ],
            "parents": [{"parentRef": {"name": "gw"}, "controllerName": "us", "conditions": [
                {"type": "ResolvedRefs", "status": "True", "lastTransitionTime": ""}]}],
        });
        carry_transition_times(&mut desired, &current);
        assert_eq!(desired["conditions"][0]["lastTransitionTime"], "T1");
        let voice = &desired["listeners"][0]["conditions"];
        assert_eq!(
            voice[0]["lastTransitionTime"], "T2",
            "attachedRoutes moved, Accepted did not"
        );
        assert_eq!(
            voice[1]["lastTransitionTime"], "",
            "Programmed changed status"
        );
        assert_eq!(
            desired["listeners"][1]["conditions"][0]["lastTransitionTime"],
            ""
        );
        assert_eq!(
            desired["parents"][0]["conditions"][0]["lastTransitionTime"],
            "T4"
        );
        assert!(has_unstamped(&desired));
        let mut settled = current.clone();
        carry_transition_times(&mut settled, &current);
        assert!(!has_unstamped(&settled));
    }
}
