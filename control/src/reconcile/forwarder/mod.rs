//! Forwarders (SPEC §6): the reconciler that turns `Forwarder` objects (from the Kubernetes
//! watch or the inventory file) into data-plane listeners, and reports back.
//!
//! One task owns it. When what it reads moves (Forwarders, Services, EndpointSlices, Gateway API
//! objects: the inventory's versions say so, and a GameServer update moves none), it plans again
//! what the objects ask for ([`plan`], [`planned`], sans-io, each object read once when it
//! changes) and re-plans only the forwarders that change touched: their targets resolved
//! ([`resolve`]) and diffed against the listeners they hold: open, update (target or idle
//! timeout, sessions kept), close. A DNS answer that moved re-plans the forwarders of that name;
//! once a second, only those that time alone may change (a listener that did not open, a target
//! that loops back) are re-planned.
//! A port that a Gateway listener also asks for goes by the port rule ([`crate::reconcile::ports`]): the
//! Gateways served here are read from the same snapshot, and a forwarder opens only what it wins.
//! It acts only once the inventory has listed, so a forwarder deleted while the proxy was down
//! is never opened. Each instance's view goes into `status.instances` (server-side apply, one
//! field manager per node, [`status`]) and the managed Service ports follow the forwarders.

pub mod metrics;
pub mod plan;
pub mod planned;
pub mod resolve;
#[cfg(test)]
mod tests;

pub use plan::{API_VERSION, ForwarderObject, KIND, is_dns_label, is_forwarder};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::policy::proxy_protocol::ProxyMode;
use dataplane::{
    BackendId, CloseMode, Controller, ListenError, ListenerCounters, ListenerKind, ListenerSpec,
    ListenerStats, OpenedListener, Transport,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ForwardersConfig};
use crate::crd::ForwarderInstance;
use crate::inventory::Snapshot;
use crate::reconcile::ports::{self, ClaimCache};
use crate::reconcile::status::events::{Problem, Reason};
use crate::reconcile::status::{self, StatusKey, StatusOf, Wanted};
use plan::{Claim, ParseCache, Reading, Reserved};
use planned::{Managed, Planned, PlannedClaim};
use resolve::{DnsCache, DnsError, Host, ResolveError};

/// How often the reconciler looks again without a change: lookups that fell due, forwarders
/// that time alone may change (a port another process held, a target that looped back),
/// counters to fold.
const TICK: Duration = Duration::from_secs(1);
/// How soon a listener is tried again when its port is still being let go by a closing one.
const RETRY_SOON: Duration = Duration::from_millis(50);
/// A closed listener's counters are read this long before they are folded into totals, so the
/// last datagrams its workers counted are not lost.
const RETIRE_AFTER: Duration = Duration::from_secs(5);

/// What one instance knows of one forwarder, shared with the admin API and metrics.
#[derive(Debug, Default)]
pub struct ForwarderView {
    /// The object exists (a deleted forwarder stays until its counters are folded).
    pub present: bool,
    /// Namespace.
    pub namespace: String,
    /// Every listener it asks for is open here.
    pub ready: bool,
    /// Open listeners, as `udp/27015`.
    pub listening: Vec<String>,
    /// Why not ready, or a warning.
    pub message: Option<String>,
    /// Where each open listener forwards to, as `udp/27015 -> 10.0.0.7:27015`.
    pub targets: Vec<String>,
    /// Counters of its open listeners, and of closed ones not yet folded into `closed`.
    pub(crate) live: Vec<(Transport, Arc<ListenerCounters>, Option<Instant>)>,
    /// What closed listeners counted.
    pub(crate) closed: ListenerStats,
    /// Control-side errors by type (`listen`, `resolve`).
    pub(crate) errors: BTreeMap<&'static str, u64>,
}

/// Every forwarder this instance serves, by name.
pub type ForwarderTable = Arc<Mutex<BTreeMap<String, ForwarderView>>>;

/// A listener the reconciler holds.
#[derive(Debug)]
struct Held {
    handle: OpenedListener,
    port: u16,
    /// The `targetHost` it was resolved from.
    host: String,
    target: SocketAddr,
    idle_timeout: Duration,
    proxy: ProxyMode,
}

/// The forwarder reconciler.
pub struct Reconciler {
    config: ForwardersConfig,
    controller: Controller,
    bind: IpAddr,
    session_timeout: Duration,
    /// The ports this instance holds itself, as bound.
    reserved: Vec<Reserved>,
    /// The proxy's own ports as configured: the same on every instance, so every instance
    /// computes the same Service port set (bound ports can differ, e.g. port 0).
    configured: Vec<Reserved>,
    /// `gatewayApi.controllerName`: the Gateways whose listeners claim ports too.
    gateway_controller: Option<String>,
    /// Their listeners' claims, read again only when the Gateway API objects change.
    gateway_claims: ClaimCache,
    /// Each Forwarder as it read, read again only when it changes.
    parses: ParseCache,
    /// What the inputs decide per forwarder, as of `planned_from`.
    planned: Planned,
    /// The versions of the inputs `planned` was computed from: Forwarders, Services,
    /// EndpointSlices, Gateway API objects.
    planned_from: Option<[u64; 4]>,
    held: BTreeMap<(String, Transport), Held>,
    dns: DnsCache,
    table: ForwarderTable,
    /// The node this instance writes as, and what it wants written (read by the writer task,
    /// so a slow API server never holds up a listener change).
    writes: Option<(String, watch::Sender<Arc<Wanted>>)>,
    /// The last message logged per forwarder, so a persisting problem is logged once.
    logged: HashMap<String, Option<String>>,
    /// The forwarders that time alone may change (a listener that did not open, a target that
    /// loops back): each re-planned once a second, or soon (`true`) where a closing listener
    /// is letting go of the port. The others wait for a change of what they read.
    waiting: BTreeMap<String, bool>,
    /// A closed listener's counters wait to be folded.
    retiring: bool,
    /// Forwarders re-planned so far: what the changes cost.
    #[cfg(test)]
    replanned: usize,
}

/// What the next pass re-plans.
#[derive(Debug, Default)]
struct Dirty {
    /// Every forwarder (the settings changed).
    all: bool,
    /// These forwarders.
    names: BTreeSet<String>,
    /// The managed Services' port sets moved.
    services: bool,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler for `config.forwarders`, opening listeners through `controller`. The ports
    /// the proxy holds itself (`query`, `admin`, the data ports as bound) are never given to a
    /// forwarder. `writes` reaches the writer of status and Service ports (Kubernetes
    /// inventory only).
    pub fn new(
        config: &Config,
        controller: Controller,
        own_ports: Vec<Reserved>,
        writes: Option<status::Writes>,
    ) -> Option<Self> {
        let forwarders = config.forwarders.clone()?;
        let configured = ports::configured(config);
        Some(Self {
            config: forwarders,
            controller,
            bind: config.bind_address,
            session_timeout: config.session_timeout,
            reserved: own_ports,
            configured,
            gateway_controller: config.gateway_controller.clone(),
            gateway_claims: ClaimCache::default(),
            parses: ParseCache::default(),
            planned: Planned::default(),
            planned_from: None,
            held: BTreeMap::new(),
            dns: DnsCache::default(),
            table: ForwarderTable::default(),
            writes: writes.map(|w| (w.node, w.tx)),
            logged: HashMap::new(),
            waiting: BTreeMap::new(),
            retiring: false,
            #[cfg(test)]
            replanned: 0,
        })
    }

    /// The table the admin API and metrics read.
    pub fn table(&self) -> ForwarderTable {
        Arc::clone(&self.table)
    }

    /// Runs until the inventory channel closes.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<Arc<Snapshot>>,
        mut live: watch::Receiver<Arc<Config>>,
    ) {
        let (answers_tx, mut answers) =
            mpsc::unbounded_channel::<(String, Result<Vec<IpAddr>, DnsError>)>();
        let mut dirty = Dirty::default();
        loop {
            let snapshot = Arc::clone(&inventory.borrow_and_update());
            self.step(&snapshot, &mut dirty, Instant::now());
            for host in self.dns.take_due(Instant::now()) {
                let tx = answers_tx.clone();
                tokio::spawn(async move {
                    let result = lookup(&host).await;
                    let _ = tx.send((host, result));
                });
            }
            let soon = self.waiting.values().any(|soon| *soon);
            tokio::select! {
                // A change of what no forwarder reads (a GameServer) costs a version comparison.
                changed = inventory.changed() => if changed.is_err() { return },
                Ok(()) = live.changed() => {
                    self.follow(&live.borrow_and_update());
                    dirty.all = true;
                }
                Some((host, result)) = answers.recv() => {
                    let interval = self.config.resolve_interval;
                    if self.dns.answered(&host, result, Instant::now(), interval) {
                        dirty.names.extend(self.planned.using_dns(&host));
                    }
                }
                // Only what time alone may change: thousands of forwarders that are open, or
                // refused for a reason only a change of the objects lifts, cost no pass a
                // second (lookups falling due are taken above, and their answers wake the loop).
                () = tokio::time::sleep(if soon { RETRY_SOON } else { TICK }) => {
                    self.tick(&mut dirty, Instant::now());
                }
            }
        }
    }

    /// What time changes: the forwarders waiting on it are marked for the next pass, and the
    /// counters of listeners closed a while ago are folded.
    fn tick(&mut self, dirty: &mut Dirty, now: Instant) {
        dirty.names.extend(self.waiting.keys().cloned());
        if self.retiring {
            self.retiring = self.fold_retired(now);
        }
    }

    /// Takes the settings a config reload may change: the default idle timeout and the DNS
    /// re-resolution interval (the namespace and Services are fixed at start).
    fn follow(&mut self, config: &Config) {
        self.session_timeout = config.session_timeout;
        if let Some(f) = &config.forwarders {
            self.config.resolve_interval = f.resolve_interval;
        }
    }

    /// One pass over everything: every forwarder re-planned from `snapshot` and its listeners
    /// brought in line; what status and the Services should say handed to the writer.
    pub fn reconcile(&mut self, snapshot: &Snapshot, now: Instant) {
        self.planned_from = None;
        let mut dirty = Dirty {
            all: true,
            ..Dirty::default()
        };
        self.step(snapshot, &mut dirty, now);
    }

    /// Plans again if an input moved (which marks what it touched), then re-plans what is
    /// marked; nothing when nothing is.
    fn step(&mut self, snapshot: &Snapshot, dirty: &mut Dirty, now: Instant) {
        if !snapshot.forwarders_loaded {
            return;
        }
        let v = snapshot.versions;
        let inputs = [v.forwarders, v.services, v.endpoint_slices, v.gateway_api];
        if self.planned_from != Some(inputs) {
            let before = self.planned_from;
            self.planned_from = Some(inputs);
            let services_moved = before.is_none_or(|b| b[1..3] != inputs[1..3]);
            let others_moved = before.is_none_or(|b| b[1..] != inputs[1..]);
            let namespace = &self.config.namespace;
            let parsed = self.parses.read(
                snapshot
                    .forwarders
                    .iter()
                    .filter(|o| plan::served_from(o, namespace)),
            );
            // Only Forwarders moved, and none of those served here reads otherwise (a status
            // write, another namespace's): the plan stands.
            if !others_moved && !self.parses.moved() {
                return self.pass_dirty(dirty, snapshot, now);
            }
            let planned = self.plan(&parsed, snapshot);
            dirty
                .names
                .extend(planned.touched(&self.planned, services_moved));
            dirty.services |= planned.services != self.planned.services;
            // Names no forwarder looks up any more are forgotten.
            let names = planned.dns_names();
            self.dns.retain(|host| names.contains(host));
            self.planned = planned;
        }
        self.pass_dirty(dirty, snapshot, now);
    }

    /// Re-plans what `dirty` marks, if anything.
    fn pass_dirty(&mut self, dirty: &mut Dirty, snapshot: &Snapshot, now: Instant) {
        if !dirty.all && dirty.names.is_empty() && !dirty.services {
            return;
        }
        let names = if dirty.all {
            self.everyone()
        } else {
            std::mem::take(&mut dirty.names)
        };
        *dirty = Dirty::default();
        self.pass(&names, snapshot, now);
    }

    /// What the inputs decide for every forwarder served here (`parsed`: each as it read).
    fn plan(&mut self, parsed: &[Reading<'_>], snapshot: &Snapshot) -> Planned {
        // The Gateway listeners served here claim ports too; until their watches have listed,
        // none is known (a missing Gateway API must not keep forwarders waiting).
        let gateway_claims = match &self.gateway_controller {
            Some(controller) if snapshot.gateway_loaded => {
                self.gateway_claims.get(&snapshot.gateway_api, |objects| {
                    crate::reconcile::gateway::compile::served_port_claims(objects, controller)
                })
            }
            _ => Arc::default(),
        };
        let managed = self.writes.is_some().then(|| Managed {
            configured: &self.configured,
            udp: self.config.udp_service.as_deref(),
            tcp: self.config.tcp_service.as_deref(),
            namespace: &self.config.namespace,
            services: &snapshot.services,
        });
        Planned::build(parsed, &self.reserved, &gateway_claims, managed.as_ref())
    }

    /// Every forwarder this instance knows of: planned, holding a listener, in the table,
    /// waiting, or with a status entry.
    fn everyone(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.planned.forwarders.keys().cloned().collect();
        names.extend(self.held.keys().map(|(name, _)| name.clone()));
        names.extend(self.table.lock().keys().cloned());
        names.extend(self.waiting.keys().cloned());
        if let Some((_, tx)) = &self.writes {
            names.extend(tx.borrow().statuses.keys().map(|k| k.name.clone()));
        }
        names
    }

    /// Re-plans the forwarders `names` (a forwarder no longer planned is gone): listeners
    /// brought in line with the plan, their views published, and what status and the Services
    /// should say handed to the writer.
    fn pass(&mut self, names: &BTreeSet<String>, snapshot: &Snapshot, now: Instant) {
        #[cfg(test)]
        {
            self.replanned += names.len();
        }
        // Taken for the pass, so resolving (which records DNS names) can borrow `self`.
        let planned = std::mem::take(&mut self.planned);
        let mut reports: BTreeMap<String, Report> = BTreeMap::new();
        // What each claim wants, resolved; `None` where it cannot be opened now.
        let mut wanted: BTreeMap<(String, Transport), Option<Want>> = BTreeMap::new();
        for name in names {
            let Some(p) = planned.forwarders.get(name) else {
                continue;
            };
            let mut report = Report {
                uid: p.uid.clone(),
                generation: p.generation,
                problems: p.invalid.clone(),
                ..Report::default()
            };
            for c in &p.claims {
                let want = self.want_of(c, &mut report, snapshot, now);
                wanted.insert((name.clone(), c.claim.transport), want);
            }
            report.notes.extend(p.notes.iter().cloned());
            reports.insert(name.clone(), report);
        }
        self.planned = planned;

        // Closes first, so a port given up here can be opened by another forwarder below.
        for name in names {
            for transport in Transport::ALL {
                let key = (name.clone(), transport);
                let Some(held) = self.held.get(&key) else {
                    continue;
                };
                if matches!(wanted.get(&key), Some(Some(w)) if w.port == held.port) {
                    continue;
                }
                if let Some(held) = self.held.remove(&key) {
                    log::info!(
                        "forwarder {}: closing {}/{}",
                        key.0,
                        key.1.as_str(),
                        held.port
                    );
                    self.controller.close_listener(&held.handle, CloseMode::End);
                    self.retire(&key, now);
                }
            }
        }
        for (key, want) in &wanted {
            let Some(want) = want else { continue };
            let report = reports.entry(key.0.clone()).or_default();
            if self.apply(key, want, report) {
                report
                    .listening
                    .push(format!("{}/{}", key.1.as_str(), want.port));
                report.targets.push(format!(
                    "{}/{} -> {}",
                    key.1.as_str(),
                    want.port,
                    want.target
                ));
            } else {
                report.retry = true;
            }
        }
        for name in names {
            self.waiting.remove(name);
        }
        for (name, report) in &reports {
            if report.retry {
                self.waiting.insert(name.clone(), report.pending);
            }
        }
        self.publish(names, &reports);
        self.retiring = self.fold_retired(now);
        self.hand_over(names, &reports);
    }

    /// What one listener of a forwarder wants opened (`None`: nothing, `report` says why).
    fn want_of(
        &mut self,
        planned: &PlannedClaim,
        report: &mut Report,
        snapshot: &Snapshot,
        now: Instant,
    ) -> Option<Want> {
        let claim = &planned.claim;
        report.requested += 1;
        let key = (claim.forwarder.name.clone(), claim.transport);
        let host = &claim.port.target_host;
        // The address in use, while the name is the same: kept when a lookup fails.
        let current = self
            .held
            .get(&key)
            .filter(|h| h.host == *host && h.port == claim.port.listen_port)
            .map(|h| h.target);
        if let Err(why) = &claim.verdict {
            report.problems.push(why.to_string());
            report.event(Reason::PortConflict, why);
            return None;
        }
        match self.resolve(host, snapshot, current.map(|t| t.ip()), now) {
            // A literal IP or a Service address that no session could be sent to: the
            // listener would look ready while dropping every datagram.
            Ok(ip) if let Some(why) = resolve::not_unicast(ip) => {
                let why = format!(
                    "{}: target {} is {why}, not a unicast address: nothing could be forwarded \
                     there",
                    claim.label(),
                    SocketAddr::new(ip, claim.port.target_port)
                );
                report.event(Reason::TargetUnresolvable, &why);
                report.problems.push(why);
                None
            }
            Ok(ip) if let Some(holder) = self.loops_back(planned, ip) => {
                report.problems.push(format!(
                    "{}: target {} is this proxy's own {holder}: it would forward to itself",
                    claim.label(),
                    SocketAddr::new(ip, claim.port.target_port)
                ));
                // The proxy's listeners and the host's addresses move without the inventory.
                report.retry = true;
                None
            }
            Ok(ip) => {
                if let Some(note) = self.dns.stale_reason(host) {
                    report.notes.push(note);
                }
                Some(self.want(claim, SocketAddr::new(ip, claim.port.target_port)))
            }
            Err(why) => {
                report.errors.push("resolve");
                match current {
                    Some(target) => {
                        report
                            .notes
                            .push(format!("{why}; still forwarding to {target}"));
                        Some(self.want(claim, target))
                    }
                    None => {
                        report.problems.push(why.to_string());
                        report.event(Reason::TargetUnresolvable, &why);
                        None
                    }
                }
            }
        }
    }

    /// The listener of this proxy that the claim's target (`ip`) would reach, if it is on this
    /// host at a port one of our listeners holds or a forwarder was granted (this one
    /// included): forwarding there loops.
    fn loops_back(&self, planned: &PlannedClaim, ip: IpAddr) -> Option<String> {
        let claim = &planned.claim;
        let target = SocketAddr::new(ip, claim.port.target_port);
        if let Some(holder) = self.controller.own_listener_at(target, claim.transport) {
            return Some(holder);
        }
        let other = planned.loops_to.as_ref()?;
        self.controller.is_local_address(ip).then(|| other.clone())
    }

    fn want(&self, claim: &Claim, target: SocketAddr) -> Want {
        Want {
            port: claim.port.listen_port,
            host: claim.port.target_host.clone(),
            target,
            idle_timeout: claim
                .port
                .idle_timeout_seconds
                .map_or(self.session_timeout, Duration::from_secs),
            proxy: claim.forwarder.spec.proxy_protocol.into(),
            owner: format!(
                "forwarder {}/{}",
                claim.forwarder.namespace, claim.forwarder.name
            ),
        }
    }

    /// The address of `host`; `current` is the one the listener uses now, kept while it is
    /// still a valid answer (a headless Service's endpoint that is still ready).
    fn resolve(
        &mut self,
        host: &str,
        snapshot: &Snapshot,
        current: Option<IpAddr>,
        now: Instant,
    ) -> Result<IpAddr, ResolveError> {
        match Host::parse(host) {
            Host::Ip(ip) => Ok(ip),
            Host::Service { name, namespace } => {
                resolve::service_address(snapshot, namespace, name, current).map_err(|source| {
                    ResolveError::Service {
                        host: host.to_string(),
                        source,
                    }
                })
            }
            Host::Dns(name) => Ok(self.dns.lookup(name, now)?),
        }
    }

    /// Brings one held listener in line with `want`: opens or updates it. True when it is open
    /// (as wanted) afterwards.
    fn apply(&mut self, key: &(String, Transport), want: &Want, report: &mut Report) -> bool {
        let kind = ListenerKind::Forward {
            target: want.target,
            backend: backend_id(key, want.target),
            proxy: want.proxy,
        };
        if let Some(held) = self.held.get_mut(key) {
            if held.target == want.target
                && held.idle_timeout == want.idle_timeout
                && held.proxy == want.proxy
            {
                held.host.clone_from(&want.host);
                return true;
            }
            if self
                .controller
                .update_listener(&held.handle, kind, want.idle_timeout)
            {
                if held.target != want.target {
                    log::info!(
                        "forwarder {}: {}/{} now goes to {}",
                        key.0,
                        key.1.as_str(),
                        want.port,
                        want.target
                    );
                }
                held.target = want.target;
                held.host.clone_from(&want.host);
                held.idle_timeout = want.idle_timeout;
                held.proxy = want.proxy;
                return true;
            }
            // The data plane is going down: nothing to hold any more.
            self.held.remove(key);
            return false;
        }
        let spec = ListenerSpec {
            owner: want.owner.clone(),
            bind: SocketAddr::new(self.bind, want.port),
            transport: key.1,
            kind,
            idle_timeout: want.idle_timeout,
        };
        match self.controller.open_listener(spec) {
            Ok(handle) => {
                log::info!(
                    "forwarder {}: {}/{} open, forwarding to {}",
                    key.0,
                    key.1.as_str(),
                    want.port,
                    want.target
                );
                if let Some(counters) = self.controller.listener_counters(&handle) {
                    let mut table = self.table.lock();
                    let view = table.entry(key.0.clone()).or_default();
                    view.live.push((key.1, counters, None));
                }
                self.held.insert(
                    key.clone(),
                    Held {
                        handle,
                        port: want.port,
                        host: want.host.clone(),
                        target: want.target,
                        idle_timeout: want.idle_timeout,
                        proxy: want.proxy,
                    },
                );
                true
            }
            Err(ListenError::Taken { holder, .. }) if holder.ends_with("(closing)") => {
                // A listener given up a moment ago is still letting go of the port.
                report.pending = true;
                false
            }
            Err(e) => {
                // Held by another listener of ours, or by another process.
                let conflict = matches!(
                    e,
                    ListenError::Taken { .. }
                        | ListenError::Socket(dataplane::error::SocketError::Taken { .. })
                );
                let reason = if conflict {
                    Reason::PortConflict
                } else {
                    Reason::ListenFailed
                };
                report.event(reason, &e);
                report.problems.push(e.to_string());
                report.errors.push("listen");
                false
            }
        }
    }

    /// Marks the counters of a closed listener for folding.
    fn retire(&mut self, key: &(String, Transport), now: Instant) {
        self.retiring = true;
        let mut table = self.table.lock();
        if let Some(view) = table.get_mut(&key.0) {
            for (transport, _, closed_at) in &mut view.live {
                if *transport == key.1 && closed_at.is_none() {
                    *closed_at = Some(now);
                }
            }
        }
    }

    /// Folds the counters of listeners closed `RETIRE_AFTER` ago; true while others wait.
    fn fold_retired(&mut self, now: Instant) -> bool {
        let mut table = self.table.lock();
        let mut waiting = false;
        for view in table.values_mut() {
            let closed = &mut view.closed;
            view.live.retain(|(_, counters, closed_at)| {
                let done = closed_at.is_some_and(|t| now.duration_since(t) >= RETIRE_AFTER);
                if done {
                    add_stats(closed, &counters.snapshot());
                }
                waiting |= closed_at.is_some() && !done;
                !done
            });
        }
        // A forwarder that is gone leaves once its last counters are folded.
        table.retain(|_, view| view.present || !view.live.is_empty());
        waiting
    }

    /// Puts the outcome of the forwarders `names` in the shared table; one that is gone leaves
    /// it (and its metric series end) once nothing of its is open.
    fn publish(&mut self, names: &BTreeSet<String>, reports: &BTreeMap<String, Report>) {
        let mut table = self.table.lock();
        for name in names {
            let Some(report) = reports.get(name) else {
                if let Some(view) = table.get_mut(name) {
                    view.present = false;
                    view.ready = false;
                    view.listening.clear();
                    view.targets.clear();
                    if view.live.is_empty() {
                        table.remove(name);
                    }
                }
                self.logged.remove(name);
                continue;
            };
            let view = table.entry(name.clone()).or_default();
            view.present = true;
            view.namespace.clone_from(&self.config.namespace);
            let (ready, message) = report.outcome();
            view.ready = ready;
            view.listening.clone_from(&report.listening);
            view.message.clone_from(&message);
            view.targets.clone_from(&report.targets);
            for e in &report.errors {
                // Counted when the problem appears, not once a second while it lasts.
                if self.logged.get(name) != Some(&message) {
                    *view.errors.entry(e).or_default() += 1;
                }
            }
            if self.logged.get(name) != Some(&message) && !report.pending {
                match &message {
                    Some(m) if !ready => log::warn!("forwarder {name}: not ready: {m}"),
                    Some(m) => log::warn!("forwarder {name}: {m}"),
                    None => log::info!("forwarder {name}: ready"),
                }
                self.logged.insert(name.clone(), message);
            }
        }
    }

    /// Hands the writer this instance's status entries with those of `names` as they are now,
    /// and the managed Services' port sets; nothing when neither moved.
    fn hand_over(&self, names: &BTreeSet<String>, reports: &BTreeMap<String, Report>) {
        let Some((node, tx)) = &self.writes else {
            return;
        };
        let previous = Arc::clone(&tx.borrow());
        let mut updates = Vec::new();
        let mut problems = previous.problems.clone();
        for name in names {
            let key = StatusKey {
                of: StatusOf::Forwarder,
                namespace: self.config.namespace.clone(),
                name: name.clone(),
            };
            match reports.get(name) {
                None => drop(problems.remove(&key)),
                Some(report) if report.pending => {}
                Some(report) if report.events.is_empty() => drop(problems.remove(&key)),
                Some(report) => {
                    problems.insert(key.clone(), (report.uid.clone(), report.events.clone()));
                }
            }
            let entry = match reports.get(name) {
                None => None,
                // Settles within moments; until then the last entry stands.
                Some(report) if report.pending => previous.statuses.get(&key).cloned(),
                Some(report) => {
                    let (ready, message) = report.outcome();
                    let instance = ForwarderInstance {
                        node: node.clone(),
                        ready,
                        listening: report.listening.clone(),
                        message,
                        observed_generation: report.generation,
                        last_update_time: None,
                    };
                    serde_json::to_value(instance)
                        .ok()
                        .map(|instance| (report.uid.clone(), instance))
                }
            };
            if previous.statuses.get(&key) != entry.as_ref() {
                updates.push((key, entry));
            }
        }
        if updates.is_empty()
            && previous.services == self.planned.services
            && previous.problems == problems
        {
            return;
        }
        let mut statuses = previous.statuses.clone();
        for (key, entry) in updates {
            match entry {
                Some(entry) => statuses.insert(key, entry),
                None => statuses.remove(&key),
            };
        }
        let wanted = Wanted {
            statuses,
            services: self.planned.services.clone(),
            problems,
        };
        crate::reconcile::status::hand_over(tx, wanted);
    }
}

/// What a claim asks the data plane for.
#[derive(Debug)]
struct Want {
    port: u16,
    host: String,
    target: SocketAddr,
    idle_timeout: Duration,
    proxy: ProxyMode,
    owner: String,
}

/// One forwarder's outcome of a pass.
#[derive(Debug, Default)]
struct Report {
    uid: String,
    generation: Option<i64>,
    requested: usize,
    listening: Vec<String>,
    targets: Vec<String>,
    /// Why a listener is not open.
    problems: Vec<String>,
    /// Warnings that leave it ready (a stale DNS answer in use).
    notes: Vec<String>,
    /// Control-side error types, for metrics.
    errors: Vec<&'static str>,
    /// What is recorded as Events on the object.
    events: Vec<Problem>,
    /// A listener waits for a closing one to let go of its port (moments).
    pending: bool,
    /// Time alone may change the outcome: a listener did not open, or a target loops back.
    retry: bool,
}

impl Report {
    fn event(&mut self, reason: Reason, note: &dyn std::fmt::Display) {
        self.events.push(Problem {
            reason,
            note: note.to_string(),
        });
    }

    fn outcome(&self) -> (bool, Option<String>) {
        let ready = self.problems.is_empty() && self.listening.len() == self.requested;
        let all: Vec<&str> = self
            .problems
            .iter()
            .chain(&self.notes)
            .map(String::as_str)
            .collect();
        (ready, (!all.is_empty()).then(|| all.join("; ")))
    }
}

/// A stable id per forwarder listener and target.
fn backend_id(key: &(String, Transport), target: SocketAddr) -> BackendId {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("forwarder", key, target).hash(&mut h);
    BackendId(h.finish())
}

fn add_stats(into: &mut ListenerStats, s: &ListenerStats) {
    into.packets_upstream += s.packets_upstream;
    into.bytes_upstream += s.bytes_upstream;
    into.packets_downstream += s.packets_downstream;
    into.bytes_downstream += s.bytes_downstream;
    for (i, d) in into.dropped.iter_mut().zip(&s.dropped) {
        *i += d;
    }
}

/// One DNS lookup (the system resolver, on a blocking thread): every address.
async fn lookup(host: &str) -> Result<Vec<IpAddr>, DnsError> {
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
        .await?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err(DnsError::NoAddress);
    }
    Ok(addrs)
}

/// The ports the proxy holds itself, as forwarder conflicts name them.
pub use crate::reconcile::ports::own_ports;
