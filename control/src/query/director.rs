//! The director: control's state and decisions. It answers queries from the inventory snapshot,
//! mints and publishes grants, keeps this instance's load per backend (live sessions from worker
//! events plus outstanding grants), keeps the default backend current and ends sessions whose
//! backend left the inventory.
//!
//! Everything runs on the control thread; the mutex is never held across an await and is
//! uncontended in practice (one runtime thread), it only makes the state shareable among tasks.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ahash::AHashMap;
use crossbeam_channel::Receiver;
use dataplane::{Backend, BackendId, Controller, Grant, TokenId, WorkerEvent};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::Config;
use crate::inventory::Snapshot;
use crate::metrics::Metrics;
use crate::query::allocate::{self, Allocator};
use crate::query::select::{self, Candidate};
use crate::query::{ErrorCode, Query, QueryError, TokenAnswer};

/// Control's shared state.
#[derive(Debug)]
pub struct Director {
    /// The running config: replaced whole by a reload.
    config: watch::Receiver<Arc<Config>>,
    controller: Controller,
    /// Data port name → the port the proxy actually listens on.
    public_ports: Vec<(String, u16)>,
    inventory: watch::Receiver<Arc<Snapshot>>,
    events: Receiver<WorkerEvent>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// A hand-off is under way (SPEC §12): no token is issued, since the grants have been
    /// described to the successor already.
    handing_off: AtomicBool,
    state: Mutex<LoadState>,
    /// The query index (built as the inventory changes, off the control thread), keyed by the
    /// snapshot and the config it was built from.
    index: Arc<Mutex<IndexCache>>,
    /// Creates Agones allocations (Kubernetes inventory only).
    allocator: Option<Allocator>,
}

/// A token's identity, drawn before its backend is known (an allocation writes it on the
/// server it allocates).
#[derive(Clone, Copy, Debug)]
enum Prepared {
    /// A UUID token with this id.
    Uuid(TokenId),
    /// A sealed token with this nonce (whose id it makes).
    Sealed(dataplane::policy::seal::Nonce),
}

impl Prepared {
    fn id(&self) -> TokenId {
        match self {
            Self::Uuid(id) => *id,
            Self::Sealed(nonce) => nonce.token_id(),
        }
    }
}

/// The versions of the parts of a snapshot a query index reads: the mapped objects, and the
/// Services and EndpointSlices that Service-based mappings resolve through. A snapshot that
/// moved on for anything else (a Forwarder, a status written back) keeps the index.
type IndexInputs = (u64, u64, u64);

fn index_inputs(snapshot: &Snapshot) -> IndexInputs {
    let v = snapshot.versions;
    (v.mapped, v.services, v.endpoint_slices)
}

/// The query index last built, and whether a build is under way.
#[derive(Debug, Default)]
struct IndexCache {
    current: Option<IndexOf>,
    building: bool,
}

/// A query index and what it was built from.
#[derive(Debug)]
struct IndexOf {
    snapshot: Arc<Snapshot>,
    /// The versions of what the index reads in `snapshot`.
    inputs: IndexInputs,
    config: Arc<Config>,
    index: Arc<select::QueryIndex>,
}

#[derive(Debug, Default)]
struct LoadState {
    sessions: AHashMap<BackendId, u64>,
    outstanding: AHashMap<TokenId, (BackendId, Instant)>,
    /// Outstanding grants in expiry order (one TTL for all, so issue order), so expiring them
    /// looks only at those due instead of at every grant on every query.
    expiries: std::collections::VecDeque<(Instant, TokenId)>,
    outstanding_per_backend: AHashMap<BackendId, u64>,
    /// Round-robin position of queries, per resource type.
    rotation: BTreeMap<String, u64>,
    /// Round-robin position of the default endpoint, apart from the queries' so that periodic
    /// default refreshes do not make queries skip servers.
    default_rotation: u64,
    default_backend: Option<Backend>,
    /// How logs name the backends this instance knows of (namespace/name and addresses),
    /// rather than by their internal id.
    names: AHashMap<BackendId, String>,
}

impl LoadState {
    fn load(&self, id: BackendId) -> u64 {
        self.sessions.get(&id).copied().unwrap_or(0)
            + self.outstanding_per_backend.get(&id).copied().unwrap_or(0)
    }

    fn settle_grant(&mut self, token: TokenId) {
        if let Some((backend, _)) = self.outstanding.remove(&token) {
            decrement(&mut self.outstanding_per_backend, backend);
        }
    }

    fn apply(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::SessionOpened { backend, token, .. } => {
                *self.sessions.entry(backend).or_default() += 1;
                if let Some(t) = token {
                    self.settle_grant(t);
                }
            }
            WorkerEvent::SessionMoved { from, to, token } => {
                decrement(&mut self.sessions, from);
                *self.sessions.entry(to).or_default() += 1;
                if let Some(t) = token {
                    self.settle_grant(t);
                }
            }
            WorkerEvent::SessionClosed { backend, .. } => decrement(&mut self.sessions, backend),
        }
    }

    fn name(&self, id: BackendId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("backend {:016x}", id.0))
    }

    /// Forgets names of backends nothing refers to any more.
    fn prune_names(&mut self) {
        let default = self.default_backend.as_ref().map(|b| b.id);
        let (sessions, outstanding) = (&self.sessions, &self.outstanding_per_backend);
        self.names.retain(|id, _| {
            sessions.contains_key(id) || outstanding.contains_key(id) || default == Some(*id)
        });
    }

    fn expire_grants(&mut self, now: Instant) {
        while let Some(&(expires, token)) = self.expiries.front() {
            if expires > now {
                break;
            }
            self.expiries.pop_front();
            // A redeemed grant has left `outstanding` already.
            if let Some((backend, _)) = self.outstanding.remove(&token) {
                decrement(&mut self.outstanding_per_backend, backend);
            }
        }
    }
}

/// A fresh token identity of the kind `config` issues.
fn prepare(config: &Config) -> Result<Prepared, QueryError> {
    Ok(match &config.token_secret {
        Some(_) => Prepared::Sealed(
            dataplane::policy::seal::Nonce::fresh()
                .map_err(|e| QueryError::new(ErrorCode::Overloaded, e.to_string()))?,
        ),
        None => Prepared::Uuid(TokenId(uuid::Uuid::new_v4().as_u128())),
    })
}

/// Who selects: a client's query, or the default endpoint's periodic refresh.
#[derive(Clone, Copy, Debug)]
enum Picker {
    Query,
    DefaultEndpoint,
}

fn decrement(map: &mut AHashMap<BackendId, u64>, key: BackendId) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Director {
    /// A director steering `controller`'s workers from `inventory`.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        controller: Controller,
        local_addrs: &[std::net::SocketAddr],
        inventory: watch::Receiver<Arc<Snapshot>>,
        events: Receiver<WorkerEvent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let public_ports = config
            .borrow()
            .data_ports
            .iter()
            .zip(local_addrs)
            .map(|(p, addr)| (p.name.clone(), addr.port()))
            .collect();
        Self {
            config,
            controller,
            public_ports,
            inventory,
            events,
            metrics,
            draining: AtomicBool::new(false),
            handing_off: AtomicBool::new(false),
            state: Mutex::new(LoadState::default()),
            index: Arc::default(),
            allocator: None,
        }
    }

    /// This director with `allocator` for queries that allocate (SPEC section 13).
    pub fn with_allocator(mut self, allocator: Option<Allocator>) -> Self {
        self.allocator = allocator;
        self
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.borrow())
    }

    /// The data-plane handle.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// The current inventory snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.inventory.borrow())
    }

    /// True once the inventory delivered its first list.
    pub fn is_ready(&self) -> bool {
        self.inventory.borrow().loaded && !self.draining.load(Ordering::Relaxed)
    }

    /// Answers a query from `client`: select a backend and mint a token. A UUID token's grant
    /// is published to every worker; a sealed token carries its grant itself.
    pub fn query(&self, query: &Query, client: IpAddr) -> Result<TokenAnswer, QueryError> {
        let started = Instant::now();
        let result = self.answer(query, client, started);
        self.metrics
            .observe_query(result.as_ref().err().map(|e| e.code), started.elapsed());
        result
    }

    fn answer(
        &self,
        query: &Query,
        client: IpAddr,
        now: Instant,
    ) -> Result<TokenAnswer, QueryError> {
        query
            .validate()
            .map_err(|e| QueryError::new(ErrorCode::BadRequest, e.to_string()))?;
        if self.draining.load(Ordering::Relaxed) {
            return Err(QueryError::new(
                ErrorCode::Draining,
                "the proxy is draining and opens no new sessions; ask another instance",
            ));
        }
        let backend = self.pick(query, Picker::Query, now)?.backend;
        let config = self.config();
        let prepared = prepare(&config)?;
        self.mint(backend, client, now, prepared)
    }

    /// Mints the token `prepared` for `backend`: a UUID token's grant is published to every
    /// worker, a sealed token carries it; the grant counts toward the backend's load until it
    /// is redeemed or expires.
    fn mint(
        &self,
        backend: Backend,
        client: IpAddr,
        now: Instant,
        prepared: Prepared,
    ) -> Result<TokenAnswer, QueryError> {
        if self.handing_off.load(Ordering::Acquire) {
            return Err(QueryError::new(
                ErrorCode::Draining,
                "the proxy is handing over to its successor on this node; ask again",
            ));
        }
        let ports = self
            .public_ports
            .iter()
            .enumerate()
            .filter(|(i, _)| backend.addr_for(*i).is_some())
            .map(|(_, (name, port))| (name.clone(), *port))
            .collect();
        let backend_id = backend.id;
        let config = self.config();
        let ttl = config.token_ttl;
        let expires = now + ttl;
        let bound = config
            .bind_token_to_client_ip
            .then(|| client.to_canonical());
        let token = match (&config.token_secret, prepared) {
            (Some(secret), Prepared::Sealed(nonce)) => {
                let expires_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    + ttl;
                secret
                    .keys
                    .seal_with(&nonce, &backend, expires_unix, bound)
                    .map_err(|e| QueryError::new(ErrorCode::Overloaded, e.to_string()))?
                    .text
            }
            (_, prepared) => {
                let id = prepared.id();
                let grant = Grant::new(id, backend, expires);
                let grant = match bound {
                    Some(ip) => grant.bound_to(ip),
                    None => grant,
                };
                self.controller
                    .publish_grant(grant)
                    .map_err(|e| QueryError::new(ErrorCode::Overloaded, e.to_string()))?;
                id.to_string()
            }
        };
        let id = prepared.id();
        {
            let mut state = self.state.lock();
            state.outstanding.insert(id, (backend_id, expires));
            state.expiries.push_back((expires, id));
            *state.outstanding_per_backend.entry(backend_id).or_default() += 1;
        }
        self.metrics.tokens_issued.inc();
        Ok(TokenAnswer {
            token,
            ttl_seconds: ttl.as_secs(),
            ports,
        })
    }

    /// Answers a query from `client`, allocating through Agones when the query or its mapping
    /// asks to (SPEC section 13), else as [`Self::query`] does. An allocation awaits the API
    /// server on the caller's task: other queries are answered meanwhile.
    pub async fn query_async(
        &self,
        query: &Query,
        client: IpAddr,
    ) -> Result<TokenAnswer, QueryError> {
        let config = self.config();
        let allocates = query.allocate
            || config
                .mappings
                .get(&query.resource_type)
                .and_then(|m| m.allocation.as_ref())
                .is_some_and(|a| a.enabled);
        if !allocates {
            return self.query(query, client);
        }
        let started = Instant::now();
        let result = self.allocate_answer(query, client, &config).await;
        self.metrics
            .observe_query(result.as_ref().err().map(|e| e.code), started.elapsed());
        result
    }

    async fn allocate_answer(
        &self,
        query: &Query,
        client: IpAddr,
        config: &Arc<Config>,
    ) -> Result<TokenAnswer, QueryError> {
        let bad = |message: String| QueryError::new(ErrorCode::BadRequest, message);
        query.validate().map_err(|e| bad(e.to_string()))?;
        if self.draining.load(Ordering::Relaxed) {
            return Err(QueryError::new(
                ErrorCode::Draining,
                "the proxy is draining and opens no new sessions; ask another instance",
            ));
        }
        let kind = &query.resource_type;
        let quoted = crate::quote::quote(kind);
        let mapping = config.mappings.get(kind).ok_or_else(|| {
            QueryError::new(
                ErrorCode::UnknownResourceType,
                format!("unknown resourceType `{quoted}`"),
            )
        })?;
        let allocation = mapping.allocation.as_ref().ok_or_else(|| {
            bad(format!(
                "resourceType `{quoted}` cannot allocate: its mapping has no allocation \
                 settings (resourceQueryMapping.{quoted}.allocation)"
            ))
        })?;
        let namespace = query
            .namespace
            .as_deref()
            .ok_or_else(|| bad("an allocating query needs a namespace".into()))?;
        if !query.annotation_selector.is_empty() || query.status_query.is_some() {
            return Err(bad(
                "an allocating query selects by labelSelector only: Agones picks a Ready server \
                 (with backfill, first an Allocated one with room)"
                    .into(),
            ));
        }
        let allocator = self.allocator.as_ref().ok_or_else(|| {
            QueryError::new(
                ErrorCode::AllocationFailed,
                "allocation needs the Kubernetes inventory (inventory.kind: kubernetes)",
            )
        })?;
        let now = Instant::now();
        // A retried request waits for the first one's allocation and gets its server.
        let slot = query.request_id.as_ref().map(|id| {
            allocator.request_slot((kind.clone(), namespace.to_owned(), id.clone()), now)
        });
        let mut remembered = match &slot {
            Some(slot) => Some(slot.lock().await),
            None => None,
        };
        let prepared = prepare(config)?;
        if let Some(r) = remembered.as_ref().and_then(|r| r.as_ref())
            && r.until > Instant::now()
        {
            return self.mint(r.backend.clone(), client, Instant::now(), prepared);
        }
        let token_id = prepared.id().to_string();
        let body = allocate::request(&allocate::Request {
            namespace,
            labels: &query.label_selector,
            allocation,
            token_id: &token_id,
        });
        let started = Instant::now();
        let outcome = allocator
            .allocate(namespace, &body, allocation.timeout)
            .await;
        let label = match &outcome {
            Ok(allocate::Outcome::Allocated { .. }) => "allocated",
            Ok(allocate::Outcome::UnAllocated) => "no_capacity",
            Ok(allocate::Outcome::Contention) => "contention",
            Err(e) => e.result(),
        };
        self.metrics.observe_allocation(label, started.elapsed());
        let (name, status) = match outcome {
            Ok(allocate::Outcome::Allocated { name, status }) => (name, status),
            Ok(allocate::Outcome::UnAllocated) | Err(allocate::AllocateError::NoCapacity) => {
                return Err(QueryError::new(
                    ErrorCode::NoCapacity,
                    format!("no {kind} in {namespace} matches the query (UnAllocated)"),
                ));
            }
            Ok(allocate::Outcome::Contention) | Err(allocate::AllocateError::Contention(_)) => {
                return Err(QueryError::new(
                    ErrorCode::Contention,
                    format!(
                        "other allocators kept taking the {kind} servers of {namespace} for {} ms; \
                         try again",
                        allocation.timeout.as_millis()
                    ),
                ));
            }
            Err(e) => {
                log::warn!("allocation in {namespace} for {client}: {e}");
                return Err(QueryError::new(ErrorCode::AllocationFailed, e.to_string()));
            }
        };
        let object = allocate::allocated_object(
            mapping.kind.as_deref().unwrap_or("GameServer"),
            namespace,
            &name,
            &status,
        );
        let backend = select::resolve(mapping, &object, &self.snapshot(), self.public_ports.len())
            .ok_or_else(|| {
                QueryError::new(
                    ErrorCode::BackendUnresolvable,
                    format!("allocated {namespace}/{name} has no usable address and port"),
                )
            })?;
        log::debug!("allocated {namespace}/{name} for {client}");
        self.state
            .lock()
            .names
            .insert(backend.id, format!("{namespace}/{name}"));
        if let Some(r) = remembered.as_mut() {
            **r = Some(allocate::Remembered {
                backend: backend.clone(),
                until: Instant::now() + config.token_ttl,
            });
        }
        self.mint(backend, client, Instant::now(), prepared)
    }

    /// The query index for `snapshot` under `config`. When only the snapshot moved on (game
    /// servers changed), the last index answers while the new one is built on a blocking
    /// thread: a rebuild over a large fleet takes tens of milliseconds, which queries on the
    /// control thread must not wait for. The first index, and one for a new config, are built
    /// here.
    fn index_of(&self, snapshot: &Arc<Snapshot>, config: &Arc<Config>) -> Arc<select::QueryIndex> {
        let mut cached = self.index.lock();
        if let Some(c) = cached.current.as_ref()
            && Arc::ptr_eq(&c.config, config)
        {
            if Arc::ptr_eq(&c.snapshot, snapshot) || c.inputs == index_inputs(snapshot) {
                return Arc::clone(&c.index);
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let stale = Arc::clone(&c.index);
                if !cached.building {
                    cached.building = true;
                    self.build_in_background(&runtime);
                }
                return stale;
            }
        }
        let index = Arc::new(select::QueryIndex::build_warm(
            snapshot,
            &config.mappings,
            self.public_ports.len(),
            cached.current.as_ref().map(|c| &*c.index),
        ));
        let old = cached.current.replace(IndexOf {
            snapshot: Arc::clone(snapshot),
            inputs: index_inputs(snapshot),
            config: Arc::clone(config),
            index: Arc::clone(&index),
        });
        // The old snapshot may be held here alone now: free it (tens of thousands of objects)
        // off the control thread, as the inventory does with the snapshots it replaces.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
            Err(_) => drop(old),
        }
        index
    }

    /// Builds the index of the latest snapshot on a blocking thread, and again while the
    /// snapshot moved on during the build; a new config's index (built in place) wins.
    fn build_in_background(&self, runtime: &tokio::runtime::Handle) {
        let cache = Arc::clone(&self.index);
        let inventory = self.inventory.clone();
        let live = self.config.clone();
        let ports = self.public_ports.len();
        drop(runtime.spawn_blocking(move || {
            loop {
                let snapshot = Arc::clone(&inventory.borrow());
                let config = Arc::clone(&live.borrow());
                let previous = cache.lock().current.as_ref().map(|c| Arc::clone(&c.index));
                let index = Arc::new(select::QueryIndex::build_warm(
                    &snapshot,
                    &config.mappings,
                    ports,
                    previous.as_deref(),
                ));
                drop(previous);
                let mut cached = cache.lock();
                let current = cached.current.as_ref();
                if current.is_some_and(|c| Arc::ptr_eq(&c.config, &config)) {
                    let old = cached.current.replace(IndexOf {
                        snapshot: Arc::clone(&snapshot),
                        inputs: index_inputs(&snapshot),
                        config,
                        index,
                    });
                    drop(cached);
                    drop(old);
                    cached = cache.lock();
                }
                if index_inputs(&inventory.borrow()) == index_inputs(&snapshot) {
                    cached.building = false;
                    return;
                }
            }
        }));
    }

    /// Runs selection for a query against the current snapshot and load, and remembers how to
    /// name the chosen backend in logs.
    fn pick(&self, query: &Query, picker: Picker, now: Instant) -> Result<Candidate, QueryError> {
        let snapshot = self.snapshot();
        if !snapshot.loaded {
            return Err(QueryError::new(
                ErrorCode::InventoryUnavailable,
                "the inventory has not loaded yet; try again shortly",
            ));
        }
        let config = self.config();
        config.mappings.get(&query.resource_type).ok_or_else(|| {
            QueryError::new(
                ErrorCode::UnknownResourceType,
                format!(
                    "unknown resourceType `{}` (known: {})",
                    crate::quote::quote(&query.resource_type),
                    config
                        .mappings
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let index = self.index_of(&snapshot, &config);
        let empty = select::index::MappingIndex::default();
        let candidates =
            select::matching(query, index.mapping(&query.resource_type).unwrap_or(&empty))?;
        self.absorb_events(now);
        let mut state = self.state.lock();
        let mut rotation = match picker {
            Picker::Query => state
                .rotation
                .get(&query.resource_type)
                .copied()
                .unwrap_or(0),
            Picker::DefaultEndpoint => state.default_rotation,
        };
        let chosen = select::choose(
            &config.load_balancing,
            &candidates,
            |id| state.load(id),
            &mut rotation,
        )?;
        match picker {
            Picker::Query => match state.rotation.get_mut(&query.resource_type) {
                Some(r) => *r = rotation,
                None => {
                    state.rotation.insert(query.resource_type.clone(), rotation);
                }
            },
            Picker::DefaultEndpoint => state.default_rotation = rotation,
        }
        let chosen = candidates[chosen].clone();
        state
            .names
            .entry(chosen.backend.id)
            .or_insert_with(|| describe(&chosen));
        Ok(chosen)
    }

    /// Folds pending worker events into the load counts and forgets expired grants.
    pub fn absorb_events(&self, now: Instant) {
        let mut state = self.state.lock();
        while let Ok(event) = self.events.try_recv() {
            state.apply(event);
        }
        state.expire_grants(now);
    }

    /// Reacts to a new snapshot (or a periodic tick): re-select the default backend, then end
    /// sessions of backends that are gone. The default is set first so that moved default
    /// sessions land on the new one.
    pub fn reconcile(&self) {
        let now = Instant::now();
        self.absorb_events(now);
        let snapshot = self.snapshot();
        if !snapshot.loaded {
            return;
        }
        // The index is built here, on the control loop as the inventory changes, so the first
        // query after a change does not pay for it.
        let index = self.index_of(&snapshot, &self.config());
        self.refresh_default(now);
        let mut known = HashSet::new();
        for name in snapshot.by_mapping.keys() {
            for e in index.mapping(name).map_or(&[][..], |m| &m.entries) {
                if let Some(c) = &e.candidate {
                    known.insert(c.backend.id);
                }
            }
        }
        let mut state = self.state.lock();
        let gone: Vec<(BackendId, String)> = state
            .sessions
            .keys()
            .filter(|id| !known.contains(id))
            .map(|&id| (id, state.name(id)))
            .collect();
        state.prune_names();
        drop(state);
        for (id, name) in gone {
            log::info!("{name} left the inventory (or changed address); ending its sessions");
            self.controller.remove_backend(id);
        }
    }

    /// Re-evaluates the default endpoint query; publishes only when the choice changes.
    pub fn refresh_default(&self, now: Instant) {
        let config = self.config();
        let chosen = match &config.default_endpoint {
            // No default endpoint (any more, after a reload): none is published.
            None => None,
            Some(query) => match self.pick(query, Picker::DefaultEndpoint, now) {
                Ok(c) => Some(c.backend),
                Err(e) => {
                    log::debug!("default endpoint unresolved: {e}");
                    None
                }
            },
        };
        let mut state = self.state.lock();
        if state.default_backend != chosen {
            match &chosen {
                Some(b) => log::info!("default backend now {}", state.name(b.id)),
                None => log::warn!("no default backend: clients without a token are dropped"),
            }
            state.default_backend.clone_from(&chosen);
            drop(state);
            self.controller.set_default(chosen);
        }
    }

    /// Counts a request refused before it reached selection (unparseable, oversized, idle,
    /// over a connection limit).
    pub fn count_refused(&self, code: ErrorCode) {
        self.metrics.count_query(Some(code));
    }

    /// Stops (or resumes, after a failed hand-off) issuing tokens while a hand-off holds the
    /// workers' state.
    pub fn pause_tokens(&self, paused: bool) {
        self.handing_off.store(paused, Ordering::Release);
    }

    /// Stops minting tokens and tells the workers to open no new sessions.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.controller.drain();
    }

    /// Name of a data port by its index in the data plane.
    pub fn data_port_name(&self, index: usize) -> &str {
        self.public_ports
            .get(index)
            .map(|(n, _)| n.as_str())
            .unwrap_or("?")
    }
}

/// `namespace/name (addresses)` of a candidate, for logs.
fn describe(candidate: &Candidate) -> String {
    let addrs: Vec<String> = candidate
        .backend
        .addrs
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    let o = &candidate.object;
    format!(
        "{} {}/{} at {}",
        o.kind,
        o.namespace,
        o.name,
        addrs.join(", ")
    )
}
