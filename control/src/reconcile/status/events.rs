//! Kubernetes Events (SPEC section 8): what the reconcilers find wrong with an object (a
//! Forwarder's port taken or its target not resolving, a Route's entry point missing, a Gateway
//! listener's port unavailable) is recorded as an `events.k8s.io/v1` Event on that object, so
//! `kubectl describe` shows it where operators look first.
//!
//! A reconciler lists the problems it sees now with what it wants written ([`super::Wanted`]);
//! the [`EventGate`] (sans-io) decides which become Events: a problem when it appears (not
//! while it stays), at most once per [`REPEAT_AFTER`] per object and reason, and no more than
//! [`BURST`] at once across the instance, refilled at one per [`REFILL`]. A problem held back
//! is published when it may be, if it is still there. Each publish goes through kube's event
//! recorder, which creates the Event the first time and afterwards counts repeats into its
//! `series` (one Event per object, reason and node, its count rising) instead of adding more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{StatusKey, StatusOf};

/// The same problem of one object is published again (its count moved on) after this long.
pub const REPEAT_AFTER: Duration = Duration::from_secs(10);
/// Events one instance may publish at once.
pub const BURST: u32 = 20;
/// One more may be published per this long.
pub const REFILL: Duration = Duration::from_secs(1);
/// How long a gone problem's last publish is remembered (for [`REPEAT_AFTER`]).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// The Event API's limit on `note`, in bytes.
const MAX_NOTE: usize = 1024;
/// How long one publish may wait on the API server.
const CALL_LIMIT: Duration = Duration::from_secs(3);

/// What is wrong, as an Event's `reason`.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Reason {
    /// A Forwarder's listen port is held by something else (another process, a listener of
    /// this proxy, an older object).
    PortConflict,
    /// A Forwarder's listen port could not be opened for another reason (a port below 1024
    /// without CAP_NET_BIND_SERVICE, no descriptor left).
    ListenFailed,
    /// A Forwarder's target does not resolve to a usable address.
    TargetUnresolvable,
    /// A Route names an entry point this proxy does not have.
    EntryPointMissing,
    /// A Gateway listener's port cannot be opened on this node.
    PortUnavailable,
}

impl Reason {
    /// The Event's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortConflict => "PortConflict",
            Self::ListenFailed => "ListenFailed",
            Self::TargetUnresolvable => "TargetUnresolvable",
            Self::EntryPointMissing => "EntryPointMissing",
            Self::PortUnavailable => "PortUnavailable",
        }
    }

    /// The Event's `action`: what the proxy was doing.
    fn action(self) -> &'static str {
        match self {
            Self::PortConflict | Self::ListenFailed | Self::PortUnavailable => "Listen",
            Self::TargetUnresolvable => "Resolve",
            Self::EntryPointMissing => "Attach",
        }
    }

    const ALL: [Self; 5] = [
        Self::PortConflict,
        Self::ListenFailed,
        Self::TargetUnresolvable,
        Self::EntryPointMissing,
        Self::PortUnavailable,
    ];
}

/// One problem an instance sees with an object now.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Problem {
    /// What kind.
    pub reason: Reason,
    /// In words (the Event's `note`).
    pub note: String,
}

/// The problems a reconciler sees now, per object, with the object's uid.
pub type Problems = BTreeMap<StatusKey, (String, Vec<Problem>)>;

/// What the gate knows of one object's problem.
#[derive(Debug)]
struct Seen {
    /// Seen in the observation before this one.
    was: bool,
    /// Seen in this observation.
    present: bool,
    /// Appeared (again) but not published yet.
    pending: bool,
    last_published: Option<Instant>,
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The object.
    pub key: StatusKey,
    /// Its uid.
    pub uid: String,
    /// The problem.
    pub problem: Problem,
}

/// Decides which problems become Events (see the module header). Pure: time comes in.
#[derive(Debug)]
pub struct EventGate {
    seen: HashMap<(StatusKey, Reason), Seen>,
    tokens: u32,
    refilled: Instant,
}

impl EventGate {
    /// A gate with a full burst.
    pub fn new(now: Instant) -> Self {
        Self {
            seen: HashMap::new(),
            tokens: BURST,
            refilled: now,
        }
    }

    /// Takes the problems seen `now` and returns those to publish now, in key order.
    pub fn observe(&mut self, now: Instant, problems: &Problems) -> Vec<Due> {
        self.refill(now);
        for seen in self.seen.values_mut() {
            seen.was = seen.present;
            seen.present = false;
        }
        let mut due = Vec::new();
        for (key, (uid, list)) in problems {
            for problem in list {
                let seen = self
                    .seen
                    .entry((key.clone(), problem.reason))
                    .or_insert(Seen {
                        was: false,
                        present: false,
                        pending: false,
                        last_published: None,
                    });
                // Seen twice in one observation (two ports taken): one Event says it.
                if seen.present {
                    continue;
                }
                seen.present = true;
                if !seen.was {
                    // It appeared (or came back): one Event, now or when it may be.
                    seen.pending = true;
                }
                let rested = seen
                    .last_published
                    .is_none_or(|at| now.saturating_duration_since(at) >= REPEAT_AFTER);
                if seen.pending && rested && self.tokens > 0 {
                    self.tokens -= 1;
                    seen.pending = false;
                    seen.last_published = Some(now);
                    due.push(Due {
                        key: key.clone(),
                        uid: uid.clone(),
                        problem: problem.clone(),
                    });
                }
            }
        }
        // A problem that went away is not published late; its last publish is remembered a
        // while, so one that flaps is still held to REPEAT_AFTER.
        self.seen.retain(|_, s| {
            if !s.present {
                s.pending = false;
            }
            s.present
                || s.last_published
                    .is_some_and(|at| now.saturating_duration_since(at) < FORGET_AFTER)
        });
        due
    }

    /// Whether a problem waits for its turn (the caller looks again within a second).
    pub fn holding_back(&self) -> bool {
        self.seen.values().any(|s| s.pending)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = u32::try_from(elapsed.as_nanos() / REFILL.as_nanos()).unwrap_or(u32::MAX);
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled += REFILL * earned.min(BURST);
            if self.tokens == BURST {
                self.refilled = now;
            }
        }
    }
}

/// `udp_director_events_total{reason,result}`: Events published or refused by the API server.
pub type EventCounts = Family<[(&'static str, &'static str); 2], Counter>;

/// Creates every reason and result of `counts` at zero.
pub(super) fn show_every_event(counts: &EventCounts) {
    for reason in Reason::ALL {
        for result in ["published", "failed"] {
            let _ = counts.get_or_create(&[("reason", reason.as_str()), ("result", result)]);
        }
    }
}

/// `udp_director_object_problems{kind,namespace,name,reason}`: 1 for each problem this
/// instance sees with an object now (a Forwarder's port taken, a Route's entry point missing, a
/// Gateway listener's port unavailable, a target not resolving); the series goes when the
/// problem does. Where an Event says a problem appeared, this says it is still there, so an
/// alert can wait on it (`UdpDirectorListenerNotOpen`).
pub type ProblemGauge = Family<ProblemLabels, Gauge>;

/// The labels of [`ProblemGauge`].
pub type ProblemLabels = [(&'static str, String); 4];

/// Keeps a [`ProblemGauge`] showing one writer's problems: its own series only, since the
/// writers of the other reconcilers show theirs on the same family.
#[derive(Debug, Default)]
pub struct ProblemsShown {
    shown: HashSet<ProblemLabels>,
}

impl ProblemsShown {
    /// Shows `problems` on `gauge`: a series at 1 for each, and those this writer showed
    /// before that are gone removed.
    pub fn show(&mut self, gauge: &ProblemGauge, problems: &Problems) {
        let now: HashSet<ProblemLabels> = problems
            .iter()
            .flat_map(|(key, (_, list))| {
                list.iter().map(move |p| {
                    [
                        ("kind", key.of.kind().to_owned()),
                        ("namespace", key.namespace.clone()),
                        ("name", key.name.clone()),
                        ("reason", p.reason.as_str().to_owned()),
                    ]
                })
            })
            .collect();
        for gone in self.shown.difference(&now) {
            gauge.remove(gone);
        }
        for labels in &now {
            gauge.get_or_create(labels).set(1);
        }
        self.shown = now;
    }
}

/// Publishes the gate's Events through kube's recorder, as the instance on `node`.
#[derive(Clone)]
pub struct Publisher {
    recorder: Recorder,
    counts: EventCounts,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher reporting as controller `udp-director`, instance `node`.
    pub fn new(client: kube::Client, node: &str, counts: EventCounts) -> Self {
        let reporter = Reporter {
            controller: "udp-director".into(),
            instance: Some(node.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            counts,
        }
    }

    /// Publishes `due`; a failure is counted and logged (the status says it all the same).
    pub async fn publish(&self, due: &Due) {
        let resource = due.key.of.resource();
        let regarding = ObjectReference {
            api_version: Some(resource.api_version),
            kind: Some(resource.kind),
            name: Some(due.key.name.clone()),
            namespace: (!due.key.namespace.is_empty()).then(|| due.key.namespace.clone()),
            uid: (!due.uid.is_empty()).then(|| due.uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: due.problem.reason.as_str().into(),
            note: Some(truncate(&due.problem.note, MAX_NOTE)),
            action: due.problem.reason.action().into(),
            secondary: None,
        };
        let published =
            tokio::time::timeout(CALL_LIMIT, self.recorder.publish(&event, &regarding)).await;
        let result = match published {
            Ok(Ok(())) => "published",
            Ok(Err(e)) => {
                log::warn!(
                    "{} {}/{}: event {} not recorded: {}",
                    due.key.of.kind_name(),
                    due.key.namespace,
                    due.key.name,
                    due.problem.reason.as_str(),
                    super::describe(&e)
                );
                "failed"
            }
            Err(_) => {
                log::warn!(
                    "{} {}/{}: event {} not recorded: the API server did not answer",
                    due.key.of.kind_name(),
                    due.key.namespace,
                    due.key.name,
                    due.problem.reason.as_str()
                );
                "failed"
            }
        };
        self.counts
            .get_or_create(&[("reason", due.problem.reason.as_str()), ("result", result)])
            .inc();
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl StatusOf {
    /// The kind's name, for logs.
    fn kind_name(self) -> &'static str {
        self.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> StatusKey {
        StatusKey {
            of: StatusOf::Forwarder,
            namespace: "games".into(),
            name: name.into(),
        }
    }

    fn problems(list: &[(&str, Reason)]) -> Problems {
        let mut out = Problems::new();
        for (name, reason) in list {
            out.entry(key(name))
                .or_insert_with(|| (format!("uid-{name}"), Vec::new()))
                .1
                .push(Problem {
                    reason: *reason,
                    note: format!("{name} is not well"),
                });
        }
        out
    }

    fn names(due: &[Due]) -> Vec<(String, Reason)> {
        due.iter()
            .map(|d| (d.key.name.clone(), d.problem.reason))
            .collect()
    }

    #[test]
    fn a_problem_is_published_when_it_appears_not_while_it_stays() {
        let t0 = Instant::now();
        let mut gate = EventGate::new(t0);
        let p = problems(&[
            ("a", Reason::PortConflict),
            ("b", Reason::TargetUnresolvable),
        ]);
        let due = gate.observe(t0, &p);
        assert_eq!(
            names(&due),
            [
                ("a".into(), Reason::PortConflict),
                ("b".into(), Reason::TargetUnresolvable)
            ]
        );
        assert_eq!(due[0].uid, "uid-a");
        // Still there, an hour of passes later: nothing more.
        for s in 1..100 {
            assert!(
                gate.observe(t0 + Duration::from_secs(s * 36), &p)
                    .is_empty()
            );
        }
        assert!(!gate.holding_back());
    }

    #[test]
    fn a_problem_that_comes_back_is_published_again_but_not_more_often_than_repeat_after() {
        let t0 = Instant::now();
        let mut gate = EventGate::new(t0);
        let bad = problems(&[("a", Reason::PortConflict)]);
        let good = Problems::new();
        assert_eq!(gate.observe(t0, &bad).len(), 1);
        // It flaps every 100 ms: held back until REPEAT_AFTER has passed, then one more.
        let mut published = Vec::new();
        for i in 1..=300u64 {
            let now = t0 + Duration::from_millis(100 * i);
            let list = if i % 2 == 0 { &bad } else { &good };
            if !gate.observe(now, list).is_empty() {
                published.push(now - t0);
            }
        }
        assert_eq!(
            published,
            [
                Duration::from_secs(10),
                Duration::from_secs(20),
                Duration::from_secs(30)
            ]
        );
        // Held back while present; dropped (not published late) once it is gone.
        assert!(gate.observe(t0 + Duration::from_secs(31), &good).is_empty());
        assert!(!gate.holding_back());
        assert!(gate.observe(t0 + Duration::from_secs(45), &good).is_empty());
    }

    #[test]
    fn a_held_back_problem_is_published_when_it_may_be_if_still_there() {
        let t0 = Instant::now();
        let mut gate = EventGate::new(t0);
        let bad = problems(&[("a", Reason::EntryPointMissing)]);
        assert_eq!(gate.observe(t0, &bad).len(), 1);
        assert!(
            gate.observe(t0 + Duration::from_secs(1), &Problems::new())
                .is_empty()
        );
        assert!(gate.observe(t0 + Duration::from_secs(2), &bad).is_empty());
        assert!(gate.holding_back());
        assert!(gate.observe(t0 + Duration::from_secs(9), &bad).is_empty());
        assert_eq!(gate.observe(t0 + Duration::from_secs(10), &bad).len(), 1);
        assert!(!gate.holding_back());
    }

    #[test]
    fn a_burst_of_problems_is_capped_and_the_rest_follow_at_the_refill_rate() {
        let t0 = Instant::now();
        let mut gate = EventGate::new(t0);
        let many: Vec<(String, Reason)> = (0..50)
            .map(|i| (format!("f{i:02}"), Reason::PortConflict))
            .collect();
        let list: Vec<(&str, Reason)> = many.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        let p = problems(&list);
        assert_eq!(gate.observe(t0, &p).len(), BURST as usize);
        assert!(gate.holding_back());
        assert!(gate.observe(t0 + Duration::from_millis(500), &p).is_empty());
        assert_eq!(gate.observe(t0 + Duration::from_secs(3), &p).len(), 3);
        let mut total = BURST as usize + 3;
        for s in 4..=60 {
            total += gate.observe(t0 + Duration::from_secs(s), &p).len();
        }
        assert_eq!(total, 50, "every one, in time");
        assert!(!gate.holding_back());
    }

    #[test]
    fn one_event_per_reason_of_an_object() {
        let t0 = Instant::now();
        let mut gate = EventGate::new(t0);
        let p = problems(&[
            ("a", Reason::PortConflict),
            ("a", Reason::PortConflict),
            ("a", Reason::TargetUnresolvable),
        ]);
        assert_eq!(
            names(&gate.observe(t0, &p)),
            [
                ("a".into(), Reason::PortConflict),
                ("a".into(), Reason::TargetUnresolvable)
            ]
        );
    }

    #[test]
    fn a_long_note_is_cut_on_a_character_boundary() {
        let note = "é".repeat(1000);
        let cut = truncate(&note, MAX_NOTE);
        assert!(cut.len() <= MAX_NOTE);
        assert!(cut.ends_with("..."));
        assert_eq!(truncate("short", MAX_NOTE), "short");
    }

    #[test]
    fn the_gauge_shows_each_problem_while_it_lasts_and_only_this_writers() {
        let gauge = ProblemGauge::default();
        let mut other = ProblemsShown::default();
        let mut route_key = key("r");
        route_key.of = StatusOf::Route;
        let mut theirs = Problems::new();
        theirs.insert(
            route_key,
            (
                "uid-r".into(),
                vec![Problem {
                    reason: Reason::EntryPointMissing,
                    note: "no such entry point".into(),
                }],
            ),
        );
        other.show(&gauge, &theirs);
        let mut mine = ProblemsShown::default();
        mine.show(
            &gauge,
            &problems(&[
                ("a", Reason::PortConflict),
                ("b", Reason::TargetUnresolvable),
            ]),
        );
        let scrape = || {
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register("udp_director_object_problems", "help", gauge.clone());
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        };
        let line = |kind: &str, name: &str, reason: &str| {
            format!(
                "udp_director_object_problems{{kind=\"{kind}\",namespace=\"games\",name=\"{name}\",reason=\"{reason}\"}} 1"
            )
        };
        assert_eq!(
            scrape(),
            vec![
                line("Forwarder", "a", "PortConflict"),
                line("Forwarder", "b", "TargetUnresolvable"),
                line("Route", "r", "EntryPointMissing"),
            ]
        );
        // a's port is free again: its series goes, the other writer's stays.
        mine.show(&gauge, &problems(&[("b", Reason::TargetUnresolvable)]));
        assert_eq!(
            scrape(),
            vec![
                line("Forwarder", "b", "TargetUnresolvable"),
                line("Route", "r", "EntryPointMissing"),
            ]
        );
        mine.show(&gauge, &Problems::new());
        assert_eq!(scrape(), vec![line("Route", "r", "EntryPointMissing")]);
    }
}
