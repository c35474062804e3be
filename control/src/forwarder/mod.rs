//! Forwarders (SPEC §6): the reconciler that turns `Forwarder` objects (from the Kubernetes
//! watch or the inventory file) into data-plane listeners, and reports back.
//!
//! One task owns it. On every inventory change, DNS answer and once a second it recomputes
//! what the objects ask for ([`plan`], sans-io), resolves targets ([`resolve`]), and diffs that
//! against the listeners it holds: open, update (target or idle timeout, sessions kept), close.
//! A port that a Gateway listener also asks for goes by the port rule ([`crate::ports`]): the
//! Gateways served here are read from the same snapshot, and a forwarder opens only what it wins.
//! It acts only once the inventory has listed, so a forwarder deleted while the proxy was down
//! is never opened. Each instance's view goes into `status.instances` (server-side apply, one
//! field manager per node, [`status`]) and the managed Service ports follow the forwarders.

pub mod metrics;
pub mod plan;
pub mod resolve;

pub use plan::{API_VERSION, ForwarderObject, KIND, is_dns_label, is_forwarder};

use std::collections::{BTreeMap, HashMap};
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
use crate::ports::{self, ClaimCache};
use crate::status::{self, StatusKey, StatusOf, Wanted};
use plan::{Claim, Reserved, ServicePort};
use resolve::{DnsCache, Host};

/// How often the reconciler looks again without a change (DNS due, a port another process
/// held, a failed status write).
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
    held: BTreeMap<(String, Transport), Held>,
    dns: DnsCache,
    table: ForwarderTable,
    /// Writes status and Service ports (Kubernetes inventory); started by [`Self::run`].
    writer: Option<status::Writer>,
    /// The node this instance writes as, and what it wants written (read by the writer task,
    /// so a slow API server never holds up a listener change).
    writes: Option<(String, watch::Sender<Arc<Wanted>>)>,
    /// The last message logged per forwarder, so a persisting problem is logged once.
    logged: HashMap<String, Option<String>>,
    retry_soon: bool,
    /// The last pass left nothing for time alone to change: every forwarder open and well,
    /// none waiting for a port, no closed listener's counters left to fold.
    settled: bool,
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
    /// forwarder. `writer` writes status and Service ports (Kubernetes inventory only).
    pub fn new(
        config: &Config,
        controller: Controller,
        own_ports: Vec<Reserved>,
        writer: Option<status::Writer>,
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
            held: BTreeMap::new(),
            dns: DnsCache::default(),
            table: ForwarderTable::default(),
            writer,
            writes: None,
            logged: HashMap::new(),
            retry_soon: false,
            settled: false,
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
        if let Some(writer) = self.writer.take() {
            let node = writer.node().to_string();
            self.writes = Some((node, writer.spawn(inventory.clone())));
        }
        let (answers_tx, mut answers) =
            mpsc::unbounded_channel::<(String, Result<Vec<IpAddr>, String>)>();
        loop {
            let wait = if self.retry_soon { RETRY_SOON } else { TICK };
            let ticked = tokio::select! {
                changed = inventory.changed() => if changed.is_err() { return } else { false },
                Ok(()) = live.changed() => {
                    self.follow(&live.borrow_and_update());
                    false
                }
                Some((host, result)) = answers.recv() => {
                    self.dns.answered(&host, result, Instant::now(), self.config.resolve_interval);
                    false
                }
                () = tokio::time::sleep(wait) => true,
            };
            // A tick alone changes nothing once the last pass settled (lookups falling due are
            // taken below, and their answers wake the loop): thousands of idle forwarders then
            // cost the control thread no pass a second.
            if !(ticked && self.settled) {
                let snapshot = Arc::clone(&inventory.borrow_and_update());
                self.reconcile(&snapshot, Instant::now());
            }
            for host in self.dns.take_due(Instant::now()) {
                let tx = answers_tx.clone();
                tokio::spawn(async move {
                    let result = lookup(&host).await;
                    let _ = tx.send((host, result));
                });
            }
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

    /// One pass: listeners brought in line with the objects; what status and the Services
    /// should say handed to the writer.
    pub fn reconcile(&mut self, snapshot: &Snapshot, now: Instant) {
        if !snapshot.forwarders_loaded {
            return;
        }
        self.retry_soon = false;
        let mut reports: BTreeMap<String, Report> = BTreeMap::new();
        let mut objects = Vec::new();
        for o in snapshot
            .forwarders
            .iter()
            .filter(|o| plan::served_from(o, &self.config.namespace))
        {
            match ForwarderObject::from_object(o) {
                Ok(f) => objects.push(f),
                Err(e) => {
                    let report = reports.entry(o.name.clone()).or_default();
                    report.uid = plan::uid_of(o);
                    report.problems.push(format!("invalid: {e}"));
                    report.generation = o
                        .raw
                        .pointer("/metadata/generation")
                        .and_then(|g| g.as_i64());
                }
            }
        }
        // The Gateway listeners served here claim ports too; until their watches have listed,
        // none is known (a missing Gateway API must not keep forwarders waiting).
        let gateway_claims = match &self.gateway_controller {
            Some(controller) if snapshot.gateway_loaded => {
                self.gateway_claims.get(&snapshot.gateway_api, |objects| {
                    crate::gateway::compile::served_port_claims(objects, controller)
                })
            }
            _ => Arc::default(),
        };
        let claims = plan::claims(&objects, &self.reserved, &gateway_claims);
        // What each claim wants, resolved; `None` where it cannot be opened now.
        let mut wanted: BTreeMap<(String, Transport), Option<Want>> = BTreeMap::new();
        for claim in &claims {
            let name = &claim.forwarder.name;
            let report = reports.entry(name.clone()).or_default();
            report.generation = claim.forwarder.generation;
            report.uid.clone_from(&claim.forwarder.uid);
            report.requested += 1;
            let key = (name.clone(), claim.transport);
            let host = &claim.port.target_host;
            // The address in use, while the name is the same: kept when a lookup fails.
            let current = self
                .held
                .get(&key)
                .filter(|h| h.host == *host && h.port == claim.port.listen_port)
                .map(|h| h.target);
            let want = match &claim.verdict {
                Err(why) => {
                    report.problems.push(why.clone());
                    None
                }
                Ok(()) => match self.resolve(host, snapshot, current.map(|t| t.ip()), now) {
                    // A literal IP or a Service address that no session could be sent to: the
                    // listener would look ready while dropping every datagram.
                    Ok(ip) if let Some(why) = resolve::not_unicast(ip) => {
                        report.problems.push(format!(
                            "{}: target {} is {why}, not a unicast address: nothing could be \
                             forwarded there",
                            claim.label(),
                            SocketAddr::new(ip, claim.port.target_port)
                        ));
                        None
                    }
                    Ok(ip) if let Some(holder) = self.loops_back(&claims, claim, ip) => {
                        report.problems.push(format!(
                            "{}: target {} is this proxy's own {holder}: it would forward \
                             to itself",
                            claim.label(),
                            SocketAddr::new(ip, claim.port.target_port)
                        ));
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
                                report.problems.push(why);
                                None
                            }
                        }
                    }
                },
            };
            wanted.insert(key, want);
        }
        self.dns.retain_used();

        // Closes first, so a port given up here can be opened by another forwarder below.
        let stale: Vec<(String, Transport)> = self
            .held
            .iter()
            .filter(|(key, held)| !matches!(wanted.get(*key), Some(Some(w)) if w.port == held.port))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
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
            }
        }
        let services = match &self.writes {
            Some(_) => self.service_ports(&objects, &gateway_claims, snapshot, &mut reports),
            None => BTreeMap::new(),
        };
        let retiring = self.fold_retired(now);
        self.settled = !self.retry_soon
            && !retiring
            && reports.values().all(|r| {
                let (ready, message) = r.outcome();
                ready && message.is_none() && !r.pending && r.errors.is_empty()
            });
        self.publish(&reports);
        if let Some((node, tx)) = &self.writes {
            let previous = Arc::clone(&tx.borrow());
            let wanted = Wanted {
                statuses: self.statuses(node, &reports, &previous),
                services,
            };
            crate::status::hand_over(tx, wanted);
        }
    }

    /// The listener of this proxy that `claim`'s target (`ip`) would reach, if it is on this
    /// host at a port one of our listeners holds or a forwarder claims (this one included):
    /// forwarding there loops.
    fn loops_back(&self, claims: &[Claim<'_>], claim: &Claim<'_>, ip: IpAddr) -> Option<String> {
        let target = SocketAddr::new(ip, claim.port.target_port);
        if let Some(holder) = self.controller.own_listener_at(target, claim.transport) {
            return Some(holder);
        }
        let other = claims.iter().find(|c| {
            c.transport == claim.transport
                && c.port.listen_port == target.port()
                && c.verdict.is_ok()
        })?;
        self.controller.is_local_address(ip).then(|| {
            format!(
                "forwarder {}/{}",
                other.forwarder.namespace, other.forwarder.name
            )
        })
    }

    fn want(&self, claim: &Claim<'_>, target: SocketAddr) -> Want {
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
    ) -> Result<IpAddr, String> {
        match Host::parse(host) {
            Host::Ip(ip) => Ok(ip),
            Host::Service { name, namespace } => {
                resolve::service_address(snapshot, namespace, name, current)
                    .map_err(|e| format!("targetHost {host}: {e}"))
            }
            Host::Dns(name) => self.dns.lookup(name, now),
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
                self.retry_soon = true;
                report.pending = true;
                false
            }
            Err(e) => {
                report.problems.push(e.to_string());
                report.errors.push("listen");
                false
            }
        }
    }

    /// Marks the counters of a closed listener for folding.
    fn retire(&mut self, key: &(String, Transport), now: Instant) {
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
        waiting
    }

    /// Puts this pass's outcome in the shared table; forwarders that are gone leave it (and
    /// their metric series end) once nothing of theirs is open.
    fn publish(&mut self, reports: &BTreeMap<String, Report>) {
        let mut table = self.table.lock();
        for (name, report) in reports {
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
        for (name, view) in table.iter_mut() {
            if !reports.contains_key(name) {
                view.present = false;
                view.ready = false;
                view.listening.clear();
                view.targets.clear();
            }
        }
        table.retain(|name, view| reports.contains_key(name) || !view.live.is_empty());
        self.logged.retain(|name, _| reports.contains_key(name));
    }

    /// The managed Services' port sets: each granted listener by the configured ports (the
    /// same on every instance), less the ports a live Service has under other names; what is
    /// left out is said in the forwarder's status message.
    fn service_ports(
        &self,
        objects: &[ForwarderObject],
        gateway_claims: &[ports::Claim],
        snapshot: &Snapshot,
        reports: &mut BTreeMap<String, Report>,
    ) -> BTreeMap<String, Vec<ServicePort>> {
        let mut out: BTreeMap<String, Vec<ServicePort>> = BTreeMap::new();
        let claims = plan::claims(objects, &self.configured, gateway_claims);
        let (udp, tcp) = (&self.config.udp_service, &self.config.tcp_service);
        let shared = udp.is_some() && udp == tcp;
        for (service, transport) in [(udp, Transport::Udp), (tcp, Transport::Tcp)] {
            let Some(service) = service else { continue };
            let (ports, refused) = plan::service_ports(&claims, transport, shared);
            for (forwarder, why) in refused {
                reports.entry(forwarder).or_default().notes.push(why);
            }
            out.entry(service.clone()).or_default().extend(ports);
        }
        for (service, ports) in &mut out {
            let live = plan::live_ports(&snapshot.services, &self.config.namespace, service)
                .unwrap_or_default();
            let (mut apply, left_out) = plan::leave_out_taken(std::mem::take(ports), &live);
            for (port, why) in left_out {
                let owner = claims.iter().find(|c| {
                    c.verdict.is_ok()
                        && c.transport == port.protocol
                        && c.port.listen_port == port.port
                });
                if let Some(c) = owner {
                    reports
                        .entry(c.forwarder.name.clone())
                        .or_default()
                        .notes
                        .push(format!(
                            "{} has no port on Service {service}: {why}",
                            c.label()
                        ));
                }
            }
            apply.sort();
            *ports = apply;
        }
        out
    }

    /// What this instance's status entries say now, by forwarder name.
    fn statuses(
        &self,
        node: &str,
        reports: &BTreeMap<String, Report>,
        previous: &Wanted,
    ) -> BTreeMap<StatusKey, (String, serde_json::Value)> {
        reports
            .iter()
            .filter_map(|(name, report)| {
                let key = StatusKey {
                    of: StatusOf::Forwarder,
                    namespace: self.config.namespace.clone(),
                    name: name.clone(),
                };
                if report.pending {
                    // Settles within moments; until then the last entry stands.
                    return previous.statuses.get(&key).map(|e| (key, e.clone()));
                }
                let (ready, message) = report.outcome();
                let instance = ForwarderInstance {
                    node: node.to_string(),
                    ready,
                    listening: report.listening.clone(),
                    message,
                    observed_generation: report.generation,
                    last_update_time: None,
                };
                let instance = serde_json::to_value(instance).ok()?;
                Some((key, (report.uid.clone(), instance)))
            })
            .collect()
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
    /// A listener waits for a closing one to let go of its port (moments).
    pending: bool,
}

impl Report {
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
async fn lookup(host: &str) -> Result<Vec<IpAddr>, String> {
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| e.to_string())?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err("no address".into());
    }
    Ok(addrs)
}

/// The ports the proxy holds itself, as forwarder conflicts name them: the query and admin
/// ports, each data port and each route entry point (name, transport, bound port).
pub fn own_ports(
    query: u16,
    admin: u16,
    data: &[(String, Transport, u16)],
    entry: &[(String, Transport, u16)],
) -> Vec<Reserved> {
    ports::own_ports(query, admin, data, entry)
}
