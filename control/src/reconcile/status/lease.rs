//! The status Lease (SPEC §7): one instance at a time writes what is a fact about the fleet —
//! the status of Gateways, GatewayClasses and Gateway API routes — holding a
//! `coordination.k8s.io/v1` Lease, and cleans up the `status.instances` entries of nodes that
//! have left. Every instance keeps a per-node Lease of its own, renewed every few seconds,
//! which says it is alive and carries its facts (which Gateway listeners it holds open) for the
//! holder to aggregate ([`super::fleet`]).
//!
//! The election is client-go's: read the Lease, and renew it (ours) or take it over (no holder,
//! or its `resourceVersion` unchanged for a whole `leaseDurationSeconds` as seen by this
//! instance's own clock, never another node's) with a replace that carries the
//! `resourceVersion` read, so two instances that both try get one success and one conflict. A
//! holder that cannot renew stops acting as one before the Lease can lapse for the others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::fleet::{
    DEPARTED_AFTER, InstanceEntry, Lapsed, ListenerFacts, NodeLease, NodeLeases, departed,
};
use super::{StatusOf, describe, field_manager};
use crate::config::{Config, InventoryConfig, StatusLease as LeaseConfig};
use crate::inventory::{Object, Snapshot};

/// The label of every per-node Lease; its value is the name of the status Lease, so a fleet
/// is the instances that elect through one Lease.
pub const FLEET_LABEL: &str = "udp-director.dev/fleet";
/// The per-node Lease's annotation holding its [`ListenerFacts`] as JSON.
pub const FACTS_ANNOTATION: &str = "udp-director.dev/gateway-listeners";

/// How often an instance looks at the Lease (and a holder at the fleet's reports).
const TICK: Duration = Duration::from_secs(2);
/// How often a holder renews.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// The status Lease's duration: unchanged this long, it is taken over.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A holder that has not renewed for this long stops writing: before the others, who wait
/// [`LEASE_DURATION`] from their last sight of a change, can take over.
const HOLD_WITHOUT_RENEW: Duration = Duration::from_secs(10);
/// How often an instance renews its per-node Lease when its facts do not change.
const NODE_RENEW: Duration = Duration::from_secs(5);
/// How often the holder looks for departed nodes.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);
/// At most this many departed entries are removed per look, so a holder never spends longer
/// than its Lease on cleaning up.
const CLEANUP_BATCH: usize = 32;
/// Any one call to the API server: a holder whose calls hang must not go on believing it holds.
const API_TIMEOUT: Duration = Duration::from_secs(3);

/// Until when this instance may write as the holder: its last renewal plus
/// [`HOLD_WITHOUT_RENEW`], shared with the status writer, which checks it before every write.
#[derive(Clone, Debug, Default)]
pub struct HoldDeadline(Arc<parking_lot::Mutex<Option<Instant>>>);

impl HoldDeadline {
    /// Whether this instance holds the status Lease now.
    pub fn holding(&self) -> bool {
        self.0.lock().is_some_and(|until| Instant::now() < until)
    }

    fn set(&self, until: Option<Instant>) {
        *self.0.lock() = until;
    }
}

/// `call`, or a timeout error after [`API_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", API_TIMEOUT.as_secs()),
        )))),
    }
}

/// What an instance knows of the fleet, for the reconcilers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// This instance holds the status Lease: it writes the whole-object status.
    pub holder: bool,
    /// The facts of every live instance, by node (the holder's view; empty otherwise).
    pub reports: BTreeMap<String, ListenerFacts>,
}

/// Whether a config writes status at all, and so takes part in the status Lease: with the
/// Kubernetes inventory and forwarders, route entry points or the Gateway API.
pub fn elects(config: &Config) -> bool {
    matches!(config.inventory, InventoryConfig::Kubernetes { .. })
        && (config.forwarders.is_some()
            || !config.entry_points.is_empty()
            || config.gateway_controller.is_some())
}

/// The Role the status Lease needs in the proxy's namespace (empty when the config does not
/// elect): the status Lease and the per-node Leases.
pub fn role(config: &Config, name: &str) -> String {
    if !elects(config) {
        return String::new();
    }
    format!(
        "---\n# Generated by `udp-director rbac`: the status Lease (one writer of whole-object status)\n\
         # and each instance's per-node Lease, in the proxy's namespace.\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}-lease\n  \
         namespace: {}\nrules:\n\
         - apiGroups: [\"coordination.k8s.io\"]\n  resources: [leases]\n  \
         verbs: [get, list, create, update, patch, delete]\n",
        config.status_lease.namespace
    )
}

/// The name of `node`'s per-node Lease in the fleet of `lease`: a DNS subdomain (at most 253
/// characters; a longer one ends in a hash of the whole).
pub fn node_lease_name(lease: &str, node: &str) -> String {
    let name = format!("{lease}-{node}");
    if name.len() <= 253 {
        return name;
    }
    // FNV-1a: stable across builds, unlike the standard library's hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let head: String = name.chars().take(236).collect();
    format!("{}-{hash:016x}", head.trim_end_matches(['-', '.']))
}

/// One instance's side of the status Lease.
pub struct Elector {
    client: Client,
    leases: Api<Lease>,
    config: LeaseConfig,
    node: String,
    /// Who holds the status Lease when this process does: the node and a token of this
    /// process, so two processes on one node (an upgrade's old and new pod) are two candidates.
    identity: String,
    deadline: HoldDeadline,
    /// The per-node Leases as this instance has listed them: whether a node is alive is judged
    /// by its Lease changing as seen by this instance's clock, and by another node's clock only
    /// where this instance was not looking.
    node_leases: NodeLeases,
    /// The status Lease's `resourceVersion` as last read, and since when it is unchanged.
    observed: Option<(String, Instant)>,
    /// When this instance last renewed the status Lease as its holder.
    renewed: Option<Instant>,
    /// The facts last written to the per-node Lease, and when.
    reported: Option<(Instant, ListenerFacts)>,
    last_cleanup: Option<Instant>,
    /// The last error logged per concern, so a persisting one is logged once.
    logged: BTreeMap<&'static str, String>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// The deadline the status writer checks before each write.
    pub fn deadline(&self) -> HoldDeadline {
        self.deadline.clone()
    }

    /// The instance on `node` in the fleet of `config`.
    pub fn new(client: Client, config: LeaseConfig, node: String) -> Self {
        let token = uuid::Uuid::new_v4().simple().to_string();
        Self {
            leases: Api::namespaced(client.clone(), &config.namespace),
            client,
            config,
            // `_` never appears in a node name (a DNS subdomain).
            identity: format!("{node}_{}", &token[..8]),
            deadline: HoldDeadline::default(),
            node_leases: NodeLeases::default(),
            node,
            observed: None,
            renewed: None,
            reported: None,
            last_cleanup: None,
            logged: BTreeMap::new(),
        }
    }

    /// Runs until `stop` says so: reports this instance's facts (none once `facts` closes: no
    /// Gateway API), takes part in the election, and publishes what it knows of the fleet on
    /// `fleet`. Stopping, a holder hands the Lease back.
    pub async fn run(
        mut self,
        mut facts: watch::Receiver<ListenerFacts>,
        inventory: watch::Receiver<Arc<Snapshot>>,
        fleet: watch::Sender<Arc<Fleet>>,
        mut stop: watch::Receiver<bool>,
    ) {
        log::info!(
            "status lease {}/{}: taking part as node {}",
            self.config.namespace,
            self.config.name,
            self.node
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut facts_open = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = facts.changed(), if facts_open => facts_open = changed.is_ok(),
                _ = stop.changed() => {
                    // Nothing more is written as the holder, then the Lease goes back.
                    self.deadline.set(None);
                    fleet.send_replace(Arc::new(Fleet::default()));
                    if self.renewed.is_some() {
                        let released = bounded(self.release()).await;
                        self.settle("status lease not released", released);
                    }
                    return;
                }
            }
            let mine = facts.borrow_and_update().clone();
            // The election first: renewing must not wait behind anything else.
            let held = bounded(self.elect()).await;
            let mut holder = match held {
                Ok(holder) => {
                    self.settle("status lease not read", Ok(()));
                    holder
                }
                Err(e) => {
                    self.settle("status lease not read", Err(e));
                    self.renewed
                        .is_some_and(|at| at.elapsed() < HOLD_WITHOUT_RENEW)
                }
            };
            if !holder {
                self.deadline.set(None);
            }
            let result = bounded(self.report(&mine)).await;
            self.settle("per-node lease not renewed", result);
            let mut next = Fleet {
                holder,
                reports: BTreeMap::new(),
            };
            if holder {
                match bounded(self.read_reports()).await {
                    Ok((reports, lapsed)) => {
                        self.settle("per-node leases not listed", Ok(()));
                        next.reports = reports;
                        let snapshot = Arc::clone(&inventory.borrow());
                        if self
                            .last_cleanup
                            .is_none_or(|at| at.elapsed() >= CLEANUP_EVERY)
                        {
                            self.last_cleanup = Some(Instant::now());
                            self.clean_up(&snapshot, &lapsed).await;
                        }
                    }
                    Err(e) => {
                        self.settle("per-node leases not listed", Err(e));
                        // A new holder that has never read the fleet does not write yet.
                        if fleet.borrow().holder {
                            next.reports = fleet.borrow().reports.clone();
                        } else {
                            holder = false;
                            next.holder = false;
                        }
                    }
                }
                if holder {
                    // Its own facts as they are now, not as last written.
                    next.reports.insert(self.node.clone(), mine);
                }
            }
            let was = fleet.borrow().holder;
            if was != holder {
                log::info!(
                    "status lease {}/{}: node {} {} the fleet's status",
                    self.config.namespace,
                    self.config.name,
                    self.node,
                    if holder {
                        "now writes"
                    } else {
                        "no longer writes"
                    }
                );
            }
            fleet.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
        }
    }

    /// Logs an error once until it changes or clears.
    fn settle(&mut self, what: &'static str, result: Result<(), kube::Error>) {
        match result {
            Ok(()) => {
                if self.logged.remove(what).is_some() {
                    log::info!("status lease: {what} — working again");
                }
            }
            Err(e) => {
                let e = describe(&e);
                if self.logged.get(what) != Some(&e) {
                    log::warn!(
                        "status lease {}/{}: {what} (retried every {} s): {e}",
                        self.config.namespace,
                        self.config.name,
                        TICK.as_secs()
                    );
                    self.logged.insert(what, e);
                }
            }
        }
    }

    /// Writes this instance's per-node Lease when its facts changed or it is due a renewal.
    async fn report(&mut self, facts: &ListenerFacts) -> Result<(), kube::Error> {
        if self
            .reported
            .as_ref()
            .is_some_and(|(at, last)| last == facts && at.elapsed() < NODE_RENEW)
        {
            return Ok(());
        }
        let name = node_lease_name(&self.config.name, &self.node);
        let facts_json = serde_json::to_string(facts).unwrap_or_else(|_| "{}".into());
        let now = Timestamp::now();
        let patch = json!({
            "metadata": {
                "labels": {FLEET_LABEL: self.config.name},
                "annotations": {FACTS_ANNOTATION: facts_json},
            },
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": DEPARTED_AFTER.as_secs(),
                // Serialized as the API's MicroTime: exactly six fractional digits.
                "renewTime": MicroTime(now),
            },
        });
        let written = match self
            .leases
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        namespace: Some(self.config.namespace.clone()),
                        labels: Some([(FLEET_LABEL.to_string(), self.config.name.clone())].into()),
                        annotations: Some([(FACTS_ANNOTATION.to_string(), facts_json)].into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.node.clone()),
                        lease_duration_seconds: Some(secs(DEPARTED_AFTER)),
                        renew_time: Some(MicroTime(now)),
                        ..LeaseSpec::default()
                    }),
                };
                self.leases.create(&PostParams::default(), &lease).await
            }
            other => other,
        };
        written?;
        self.reported = Some((Instant::now(), facts.clone()));
        Ok(())
    }

    /// One round of the election: true when this instance holds the status Lease after it.
    async fn elect(&mut self) -> Result<bool, kube::Error> {
        if self.renewed.is_some_and(|at| at.elapsed() < RENEW_EVERY) {
            return Ok(true);
        }
        let now = Instant::now();
        let Some(mut lease) = self.leases.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.holding(LeaseSpec::default(), true)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(self.won(&created, now)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.take().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let unchanged = observe(&mut self.observed, &version, now);
        let decision = decide(&holder, &self.identity, unchanged, duration);
        if decision == Decision::Follow {
            self.renewed = None;
            return Ok(false);
        }
        let mine = decision == Decision::Renew;
        if !mine {
            log::info!(
                "status lease {}/{}: taking it over from {}",
                self.config.namespace,
                self.config.name,
                if holder.is_empty() {
                    "no holder"
                } else {
                    holder.as_str()
                }
            );
        }
        lease.spec = Some(self.holding(spec, !mine));
        // The resourceVersion read rides along: a concurrent taker gets a conflict.
        match self
            .leases
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => Ok(self.won(&updated, now)),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Hands the status Lease back (no holder), if this instance still holds it.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.leases.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.leases
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        self.renewed = None;
        log::info!(
            "status lease {}/{}: handed back by node {}",
            self.config.namespace,
            self.config.name,
            self.node
        );
        Ok(())
    }

    /// `spec` renewed by this instance; `acquired` when it takes the Lease over.
    fn holding(&self, mut spec: LeaseSpec, acquired: bool) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        if acquired {
            spec.acquire_time = Some(now.clone());
            // Counted from 0 at creation, as client-go does.
            spec.lease_transitions = Some(match spec.lease_transitions {
                None => 0,
                Some(n) => n.saturating_add(1),
            });
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs(LEASE_DURATION));
        spec.renew_time = Some(now);
        spec
    }

    fn won(&mut self, lease: &Lease, at: Instant) -> bool {
        self.observed = lease
            .metadata
            .resource_version
            .clone()
            .map(|version| (version, at));
        self.renewed = Some(at);
        self.deadline.set(Some(at + HOLD_WITHOUT_RENEW));
        true
    }

    /// The facts of every instance whose per-node Lease is fresh, and the nodes that have left
    /// with their Lease's name and `resourceVersion`, as [`NodeLeases::look`] judges them.
    async fn read_reports(
        &mut self,
    ) -> Result<(BTreeMap<String, ListenerFacts>, Lapsed), kube::Error> {
        let selector = format!("{FLEET_LABEL}={}", self.config.name);
        let list = self
            .leases
            .list(&ListParams::default().labels(&selector))
            .await?;
        let leases = list.items.into_iter().filter_map(node_lease).collect();
        Ok(self
            .node_leases
            .look(leases, Instant::now(), Timestamp::now()))
    }

    /// Removes the `status.instances` entries of departed nodes from every Forwarder and Route
    /// the inventory holds (at most [`CLEANUP_BATCH`] per call), then, once none is left, their
    /// per-node Leases. An entry is removed by applying an empty list as its node's own field
    /// manager: server-side apply drops what that manager alone owned, which is its entry.
    async fn clean_up(&mut self, snapshot: &Snapshot, lapsed: &Lapsed) {
        if lapsed.is_empty() {
            return;
        }
        let gone: std::collections::BTreeSet<String> = lapsed.keys().cloned().collect();
        let objects = snapshot
            .forwarders
            .iter()
            .map(|o| (StatusOf::Forwarder, o))
            .chain(snapshot.routes.iter().map(|o| (StatusOf::Route, o)));
        let mut pending: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut budget = CLEANUP_BATCH;
        for (of, object) in objects {
            for node in departed(&instance_entries(object), &gone, &self.node) {
                if budget == 0 {
                    pending.insert(node);
                    continue;
                }
                budget -= 1;
                match bounded(self.remove_entry(of, object, &node)).await {
                    Ok(()) => log::info!(
                        "{} {}/{}: removed the status entry of node {node}, which has left",
                        object.kind,
                        object.namespace,
                        object.name
                    ),
                    Err(e) => {
                        pending.insert(node);
                        self.settle("a departed node's status entry not removed", Err(e));
                    }
                }
            }
        }
        for (node, (name, version)) in lapsed {
            if pending.contains(node) || *node == self.node {
                continue;
            }
            // Only the Lease as listed: one renewed since is not deleted.
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: Some(version.clone()),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match bounded(self.leases.delete(name, &params)).await {
                Ok(_) => {
                    log::info!("status lease: node {node} has left; its lease {name} is deleted");
                }
                Err(e) => self.settle("a departed node's lease not deleted", Err(e)),
            }
        }
    }

    async fn remove_entry(
        &self,
        of: StatusOf,
        object: &Object,
        node: &str,
    ) -> Result<(), kube::Error> {
        let resource = of.resource();
        let patch = json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": {"name": object.name, "namespace": object.namespace},
            "status": {"instances": []},
        });
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &object.namespace, &resource);
        api.patch_status(
            &object.name,
            &PatchParams::apply(&field_manager(node)),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
    }
}

/// A per-node Lease as the holder judges it: `None` without a name, `resourceVersion`, holder
/// or `renewTime`, none of which an instance's own Lease lacks. Facts that do not parse count
/// as none.
fn node_lease(lease: Lease) -> Option<NodeLease> {
    let spec = lease.spec?;
    let facts = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FACTS_ANNOTATION))
        .and_then(|text| serde_json::from_str::<ListenerFacts>(text).ok())
        .unwrap_or_default();
    Some(NodeLease {
        name: lease.metadata.name?,
        version: lease.metadata.resource_version?,
        node: spec.holder_identity?,
        renewed: spec.renew_time?.0,
        facts,
    })
}

/// The `status.instances` entries of one of our objects.
fn instance_entries(object: &Object) -> Vec<InstanceEntry> {
    object
        .raw
        .pointer("/status/instances")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            Some(InstanceEntry {
                node: entry.get("node")?.as_str()?.to_string(),
                last_update: entry
                    .get("lastUpdateTime")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse().ok()),
            })
        })
        .collect()
}

/// What an instance does with the status Lease as it reads it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Decision {
    /// It holds it: renew.
    Renew,
    /// No holder, or the holder let it lapse: take it over.
    TakeOver,
    /// Another holds it: write nothing.
    Follow,
}

/// The election's rule: `holder` as read, this instance's `me`, how long this instance has
/// seen the Lease unchanged, and the Lease's duration.
fn decide(holder: &str, me: &str, unchanged: Duration, duration: Duration) -> Decision {
    if holder == me {
        Decision::Renew
    } else if holder.is_empty() || unchanged >= duration {
        Decision::TakeOver
    } else {
        Decision::Follow
    }
}

/// Records `version` as read at `now` and says how long it has been unchanged, by this
/// instance's clock (a version seen for the first time: no time at all).
fn observe(observed: &mut Option<(String, Instant)>, version: &str, now: Instant) -> Duration {
    let since = match observed {
        Some((seen, at)) if seen == version => *at,
        _ => now,
    };
    *observed = Some((version.to_string(), since));
    now.duration_since(since)
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_over_only_when_free_or_unchanged_for_its_duration() {
        let d = LEASE_DURATION;
        let me = "node-a_1234";
        assert_eq!(decide(me, me, Duration::ZERO, d), Decision::Renew);
        assert_eq!(
            decide("", me, Duration::ZERO, d),
            Decision::TakeOver,
            "handed back"
        );
        assert_eq!(
            decide("node-b_9", me, d - Duration::from_millis(1), d),
            Decision::Follow
        );
        assert_eq!(decide("node-b_9", me, d, d), Decision::TakeOver, "lapsed");
        // Same node, another process (an upgrade's other pod): another candidate.
        assert_eq!(
            decide("node-a_5678", me, Duration::ZERO, d),
            Decision::Follow
        );
    }

    #[test]
    fn unchanged_time_is_counted_from_the_first_sight_of_a_version() {
        let start = Instant::now();
        let mut observed = None;
        assert_eq!(observe(&mut observed, "1", start), Duration::ZERO);
        let later = start + Duration::from_secs(7);
        assert_eq!(observe(&mut observed, "1", later), Duration::from_secs(7));
        // A renewal (a new version) starts the count again.
        assert_eq!(observe(&mut observed, "2", later), Duration::ZERO);
        let much_later = later + Duration::from_secs(20);
        assert_eq!(
            observe(&mut observed, "2", much_later),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn a_node_lease_name_is_a_dns_subdomain_even_for_a_long_node_name() {
        assert_eq!(
            node_lease_name("udp-director-gateway", "node-a"),
            "udp-director-gateway-node-a"
        );
        let long = "n".repeat(250);
        let name = node_lease_name("udp-director-gateway", &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(
            name,
            node_lease_name("udp-director-gateway", &"n".repeat(251))
        );
    }

    #[test]
    fn a_node_lease_is_read_with_its_facts() {
        let lease = |annotation: &str| -> Lease {
            serde_json::from_value(json!({
                "metadata": {
                    "name": "udp-director-gateway-node-a", "resourceVersion": "42",
                    "annotations": {FACTS_ANNOTATION: annotation},
                },
                "spec": {"holderIdentity": "node-a", "renewTime": "2026-12-03T10:00:00.000000Z"},
            }))
            .unwrap()
        };
        let read = node_lease(lease(r#"{"ns/gw/voice": null, "ns/gw/chat": "held"}"#)).unwrap();
        assert_eq!(read.name, "udp-director-gateway-node-a");
        assert_eq!(read.version, "42");
        assert_eq!(read.node, "node-a");
        assert_eq!(read.renewed, "2026-12-03T10:00:00Z".parse().unwrap());
        assert_eq!(read.facts["ns/gw/voice"], None);
        assert_eq!(read.facts["ns/gw/chat"].as_deref(), Some("held"));
        assert!(
            node_lease(lease("not json")).unwrap().facts.is_empty(),
            "unreadable facts: none"
        );
        let mut unrenewed = lease("{}");
        unrenewed.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(node_lease(unrenewed), None);
    }

    #[test]
    fn instance_entries_are_read_from_status() {
        let object = Object::from_value(json!({
            "apiVersion": "udp-director.dev/v1alpha1", "kind": "Route",
            "metadata": {"name": "r", "namespace": "ns"},
            "status": {"instances": [
                {"node": "a", "lastUpdateTime": "2026-12-03T10:00:00Z"},
                {"node": "b"},
                {"ready": true},
            ]},
        }))
        .unwrap();
        let entries = instance_entries(&object);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].node, "a");
        assert!(entries[0].last_update.is_some());
        assert_eq!(entries[1].last_update, None);
    }
}
