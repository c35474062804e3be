//! What the fleet says, from what each instance reports (sans-io): whose per-node report is
//! fresh, a Gateway listener's state across the nodes that serve it, which nodes have left, and
//! the two rules that make a whole-object status one truth under one writer: other
//! controllers' route `parents` entries are kept, and a condition's `lastTransitionTime` moves
//! only when its status does. No I/O and no clock reads here: time is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// What one instance reports of the Gateway listeners it serves: per listener key
/// (`namespace/gateway/listener`), `None` when open there, else why not.
pub type ListenerFacts = BTreeMap<String, Option<String>>;

/// How many nodes a listener's message names, before it counts the rest.
const NAMED_NODES: usize = 5;
/// A per-node report whose Lease has not changed for this long is not counted: its instance
/// stopped, or cannot reach the API server to say otherwise. Instances renew every 5 s.
pub const REPORT_FRESH: Duration = Duration::from_secs(20);
/// How far the clock of a node that wrote a per-node Lease may run behind the holder's before
/// the Lease's `renewTime` makes the holder take a live node's report for stale. It is spent
/// only where the holder was not looking (see [`NodeLeases`]): a live node is misjudged only
/// when the holder's clock runs some 20 s ahead (this, plus [`REPORT_FRESH`], less the age of
/// a renewal), and then only until its next renewal.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5);
/// An instance whose per-node Lease was not renewed for this long has left the fleet: the
/// holder removes its `status.instances` entries and its Lease.
pub const DEPARTED_AFTER: Duration = Duration::from_secs(300);

/// One per-node Lease as listed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct NodeLease {
    /// The Lease's name.
    pub name: String,
    /// Its `resourceVersion`: every renewal changes it.
    pub version: String,
    /// The node it reports for (its `holderIdentity`).
    pub node: String,
    /// Its `renewTime`, by the clock of the node that wrote it.
    pub renewed: Timestamp,
    /// What it reports.
    pub facts: ListenerFacts,
}

/// Departed nodes: each one's per-node Lease name and `resourceVersion`, by node.
pub type Lapsed = BTreeMap<String, (String, String)>;

/// The per-node Leases as the holder has listed them, and what they say at each look.
///
/// A report is fresh while its Lease has changed within [`REPORT_FRESH`], counted on the
/// holder's own clock from its first listing of the Lease's current version. Where the holder
/// was not looking — its first look after taking the status Lease over, or one after a gap —
/// that count starts earlier by what the version's `renewTime` shows, less
/// [`CLOCK_SKEW_ALLOWANCE`] and never before the previous look (a version not listed then was
/// written since). So a new holder does not count the facts of a node that stopped just
/// before the failover as current, and a holder whose clock runs ahead misjudges a live node
/// at most until its next renewal, whose version it lists within a look.
///
/// A node has left by a stricter rule that trusts no other clock with that count: its Lease
/// says it was renewed over [`DEPARTED_AFTER`] ago *and* the holder itself has listed the same
/// version for [`REPORT_FRESH`], so a holder whose clock runs ahead departs nobody who is
/// still renewing.
#[derive(Debug, Default)]
pub struct NodeLeases {
    /// Each Lease's current version as first listed, by Lease name.
    seen: BTreeMap<String, Sighting>,
    /// When the previous look listed them.
    looked: Option<Instant>,
}

/// A per-node Lease's `resourceVersion` as the holder tracks it.
#[derive(Clone, Debug, Eq, PartialEq)]
struct Sighting {
    version: String,
    /// When this instance first listed it, by its own clock.
    at: Instant,
    /// How long it had been unchanged by then, as far as the holder can tell without having
    /// looked: zero for a version that appeared between two looks a moment apart.
    before: Duration,
}

impl NodeLeases {
    /// One look at every per-node Lease of the fleet, listed at `now` and `wall` (the same
    /// moment on this instance's monotonic and wall clocks): the facts of each node whose
    /// report is fresh, and the nodes that have left.
    pub fn look(
        &mut self,
        leases: Vec<NodeLease>,
        now: Instant,
        wall: Timestamp,
    ) -> (BTreeMap<String, ListenerFacts>, Lapsed) {
        // A version not listed at the previous look was written since.
        let unlooked = self.looked.map(|then| now.saturating_duration_since(then));
        let mut reports = BTreeMap::new();
        let mut lapsed = Lapsed::new();
        let mut seen = BTreeMap::new();
        for lease in leases {
            // Negative (renewed "later" than now, by a clock ahead of ours): none.
            let age = Duration::try_from(wall.duration_since(lease.renewed)).unwrap_or_default();
            let sighting = match self.seen.remove(&lease.name) {
                Some(s) if s.version == lease.version => s,
                _ => {
                    let shown = age.saturating_sub(CLOCK_SKEW_ALLOWANCE);
                    Sighting {
                        version: lease.version.clone(),
                        at: now,
                        before: unlooked.map_or(shown, |gap| shown.min(gap)),
                    }
                }
            };
            let observed = now.saturating_duration_since(sighting.at);
            if age > DEPARTED_AFTER && observed >= REPORT_FRESH {
                lapsed.insert(
                    lease.node.clone(),
                    (lease.name.clone(), lease.version.clone()),
                );
            }
            if observed.saturating_add(sighting.before) < REPORT_FRESH {
                reports.insert(lease.node, lease.facts);
            }
            seen.insert(lease.name, sighting);
        }
        self.seen = seen;
        self.looked = Some(now);
        (reports, lapsed)
    }
}

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
    use k8s_openapi::jiff::SignedDuration;
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

    /// The instant and wall-clock time `secs` into a test: the holder's two clocks.
    fn at(start: Instant, secs: u64) -> (Instant, Timestamp) {
        let wall: Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        (
            start + Duration::from_secs(secs),
            wall + SignedDuration::from_secs(i64::try_from(secs).unwrap()),
        )
    }

    /// `node`'s per-node Lease at `version`, renewed at `renewed` (by the node's clock).
    fn lease(node: &str, version: &str, renewed: Timestamp) -> NodeLease {
        NodeLease {
            name: format!("udp-director-gateway-{node}"),
            version: version.into(),
            node: node.into(),
            renewed,
            facts: facts(&[("ns/gw/voice", None)]),
        }
    }

    fn ago(wall: Timestamp, secs: u64) -> Timestamp {
        wall - SignedDuration::from_secs(i64::try_from(secs).unwrap())
    }

    fn nodes(reports: &BTreeMap<String, ListenerFacts>) -> Vec<&str> {
        reports.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_new_holder_does_not_count_a_report_renewed_long_ago_at_its_first_look() {
        let start = Instant::now();
        let mut leases = NodeLeases::default();
        let (now, wall) = at(start, 0);
        // A failover: "dead" stopped long ago; "live" renewed just now; "edge" is as old as a
        // report still counted can be, given the writer's clock, and "over" just older.
        let edge = (REPORT_FRESH + CLOCK_SKEW_ALLOWANCE).as_secs() - 1;
        let (reports, lapsed) = leases.look(
            vec![
                lease("dead", "7", ago(wall, 60)),
                lease("edge", "8", ago(wall, edge)),
                lease("live", "9", ago(wall, 1)),
                lease("over", "6", ago(wall, edge + 1)),
            ],
            now,
            wall,
        );
        assert_eq!(nodes(&reports), ["edge", "live"]);
        assert_eq!(reports["live"], facts(&[("ns/gw/voice", None)]));
        assert!(lapsed.is_empty(), "departure waits for its own sighting");
        // A look later, "edge" has not changed: its count went on from its renewal, not from
        // this holder's first sight of it.
        let (now, wall) = at(start, 2);
        let (reports, _) = leases.look(
            vec![
                lease("dead", "7", ago(wall, 62)),
                lease("edge", "8", ago(wall, edge + 2)),
                lease("live", "10", ago(wall, 0)),
                lease("over", "6", ago(wall, edge + 3)),
            ],
            now,
            wall,
        );
        assert_eq!(nodes(&reports), ["live"]);
    }

    #[test]
    fn a_report_counts_until_its_lease_has_been_unchanged_for_a_while_as_seen() {
        let start = Instant::now();
        let mut leases = NodeLeases::default();
        let (now, wall) = at(start, 0);
        let renewed = ago(wall, 0);
        let (reports, _) = leases.look(vec![lease("a", "1", renewed)], now, wall);
        assert_eq!(nodes(&reports), ["a"]);
        let (now, wall) = at(start, 19);
        let (reports, _) = leases.look(vec![lease("a", "1", renewed)], now, wall);
        assert_eq!(nodes(&reports), ["a"]);
        let (now, wall) = at(start, 20);
        let (reports, _) = leases.look(vec![lease("a", "1", renewed)], now, wall);
        assert!(reports.is_empty(), "unchanged for {REPORT_FRESH:?}");
        // A renewal counts it again.
        let (now, wall) = at(start, 22);
        let (reports, _) = leases.look(vec![lease("a", "2", ago(wall, 1))], now, wall);
        assert_eq!(nodes(&reports), ["a"]);
    }

    #[test]
    fn a_holder_whose_clock_runs_ahead_misjudges_a_live_node_only_until_it_renews() {
        let start = Instant::now();
        let mut leases = NodeLeases::default();
        // Every renewal looks a minute old to this holder.
        let ahead = 60;
        let (now, wall) = at(start, 0);
        // With nothing but its renewTime to go by, it is taken for stale at first...
        let (reports, _) = leases.look(vec![lease("a", "1", ago(wall, ahead))], now, wall);
        assert!(reports.is_empty());
        // ...and counted from its next renewal on, looked at a moment apart.
        for (secs, version) in [(2, "2"), (4, "2"), (6, "2"), (8, "3"), (10, "3"), (12, "4")] {
            let (now, wall) = at(start, secs);
            let (reports, lapsed) =
                leases.look(vec![lease("a", version, ago(wall, ahead))], now, wall);
            assert_eq!(nodes(&reports), ["a"], "at {secs} s");
            assert!(lapsed.is_empty());
        }
    }

    #[test]
    fn a_holder_back_after_a_gap_judges_what_changed_meanwhile_by_its_renewal() {
        let start = Instant::now();
        let mut leases = NodeLeases::default();
        let (now, wall) = at(start, 0);
        let first = vec![lease("a", "1", wall), lease("b", "2", wall)];
        let (reports, _) = leases.look(first, now, wall);
        assert_eq!(nodes(&reports), ["a", "b"]);
        // Two minutes not holding; meanwhile "a" renewed and then stopped half a minute ago,
        // and "b" renewed just now.
        let (now, wall) = at(start, 120);
        let again = vec![
            lease("a", "5", ago(wall, 30)),
            lease("b", "6", ago(wall, 1)),
        ];
        let (reports, _) = leases.look(again, now, wall);
        assert_eq!(nodes(&reports), ["b"]);
    }

    #[test]
    fn a_node_departs_only_once_the_holder_itself_saw_its_old_lease_unchanged() {
        let start = Instant::now();
        let mut leases = NodeLeases::default();
        let (now, wall) = at(start, 0);
        let long_ago = ago(wall, 3600);
        let (reports, lapsed) = leases.look(vec![lease("gone", "4", long_ago)], now, wall);
        assert!(reports.is_empty());
        assert!(lapsed.is_empty(), "a first sight departs nobody");
        let (now, wall) = at(start, 19);
        let (_, lapsed) = leases.look(vec![lease("gone", "4", long_ago)], now, wall);
        assert!(lapsed.is_empty());
        let (now, wall) = at(start, 20);
        let (_, lapsed) = leases.look(vec![lease("gone", "4", long_ago)], now, wall);
        assert_eq!(
            lapsed,
            Lapsed::from([(
                "gone".to_string(),
                ("udp-director-gateway-gone".to_string(), "4".to_string())
            )])
        );
        // A node still renewing never departs, however far behind its clock is.
        let mut leases = NodeLeases::default();
        for (secs, version) in [
            (0, "1"),
            (5, "2"),
            (10, "3"),
            (15, "4"),
            (20, "5"),
            (25, "6"),
        ] {
            let (now, wall) = at(start, secs);
            let (_, lapsed) = leases.look(vec![lease("a", version, ago(wall, 3600))], now, wall);
            assert!(lapsed.is_empty(), "at {secs} s");
        }
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
