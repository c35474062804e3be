//! Agones allocation on query (SPEC section 13): a query that asks to allocate creates a
//! `GameServerAllocation` (`allocation.agones.dev/v1`, create only) in its namespace, and is
//! answered with a token for the server Agones marked `Allocated`.
//!
//! The request body and the reading of the answer are sans-io ([`request`], [`read_answer`]);
//! [`Allocator`] makes the API call, retrying `Contention` and API errors with a back-off
//! within the mapping's `timeoutMs`, and remembers recent `requestId`s ([`RequestIds`]) so a
//! retried query gets the same server instead of a second one. Nothing here blocks the query
//! thread: the call is awaited on the connection's own task, so other queries go on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::Backend;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::config::Allocation;

/// The `result` label values of `udp_director_allocations_total`.
pub const RESULTS: [&str; 4] = ["allocated", "no_capacity", "contention", "error"];

/// Remembered request ids at most; the oldest go first past it.
const MAX_REQUEST_IDS: usize = 10_000;
/// The first retry waits this long, doubling up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What a query asks Agones for: where and which servers, and what to write on the one it
/// gets.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The query's namespace.
    pub namespace: &'a str,
    /// The query's label selector.
    pub labels: &'a BTreeMap<String, String>,
    /// The mapping's allocation settings.
    pub allocation: &'a Allocation,
    /// The id of the token the answer will carry (for `{tokenId}` in the metadata).
    pub token_id: &'a str,
}

/// The `GameServerAllocation` for `r`: with backfill, first an `Allocated` server with room on
/// the counter, then a `Ready` one; the metadata and counter actions the mapping names.
pub fn request(r: &Request<'_>) -> Value {
    let labels = json!(r.labels);
    let mut selectors = Vec::new();
    if let Some(counter) = &r.allocation.backfill_counter {
        selectors.push(json!({
            "matchLabels": labels,
            "gameServerState": "Allocated",
            "counters": {counter: {"minAvailable": 1}},
        }));
    }
    selectors.push(json!({"matchLabels": labels, "gameServerState": "Ready"}));
    let fill = |map: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        map.iter()
            .map(|(k, v)| (k.clone(), v.replace("{tokenId}", r.token_id)))
            .collect()
    };
    let counters: BTreeMap<&str, Value> = r
        .allocation
        .counters
        .iter()
        .map(|(name, amount)| {
            let action = if *amount >= 0 {
                "Increment"
            } else {
                "Decrement"
            };
            (
                name.as_str(),
                json!({"action": action, "amount": amount.unsigned_abs()}),
            )
        })
        .collect();
    let mut spec = json!({
        "selectors": selectors,
        "metadata": {
            "labels": fill(&r.allocation.labels),
            "annotations": fill(&r.allocation.annotations),
        },
    });
    if !counters.is_empty() {
        spec["counters"] = json!(counters);
    }
    json!({
        "apiVersion": "allocation.agones.dev/v1",
        "kind": "GameServerAllocation",
        "metadata": {"namespace": r.namespace},
        "spec": spec,
    })
}

/// What Agones answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A server is ours: its name and the status fields the mapping reads its address and
    /// ports from (`address`, `addresses`, `ports`, `nodeName`).
    Allocated {
        /// `status.gameServerName`.
        name: String,
        /// The allocation's status, as a GameServer's `status` to resolve.
        status: Value,
    },
    /// No server matched (`UnAllocated`).
    UnAllocated,
    /// Another allocator took the server (`Contention`).
    Contention,
}

/// Reads a created allocation's `status`.
pub fn read_answer(object: &Value) -> Result<Outcome, String> {
    let status = object.get("status").ok_or("the allocation has no status")?;
    match status.get("state").and_then(Value::as_str) {
        Some("Allocated") => {
            let name = status
                .get("gameServerName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or("an Allocated answer names no gameServerName")?;
            Ok(Outcome::Allocated {
                name: name.to_owned(),
                status: status.clone(),
            })
        }
        Some("UnAllocated") => Ok(Outcome::UnAllocated),
        Some("Contention") => Ok(Outcome::Contention),
        Some(other) => Err(format!(
            "unknown allocation state `{}`",
            crate::quote::quote(other)
        )),
        None => Err("the allocation's status has no state".into()),
    }
}

/// The allocated server as an inventory object, so the mapping resolves its address and
/// ports (and its backend id) exactly as it would the watched GameServer.
pub fn allocated_object(
    kind: &str,
    namespace: &str,
    name: &str,
    status: &Value,
) -> crate::inventory::Object {
    crate::inventory::Object {
        api_version: "agones.dev/v1".into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        raw: json!({"status": status}),
    }
}

/// Why an allocation gave no server.
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// `UnAllocated`: nothing matched.
    #[error("no GameServer matches the allocation's selectors")]
    NoCapacity,
    /// `Contention` until the time ran out.
    #[error("allocation met Contention until the {0:?} timeout")]
    Contention(Duration),
    /// The API server refused (not retried: RBAC, no such API).
    #[error("{0}")]
    Refused(String),
    /// API errors or no answer until the time ran out, or an unreadable answer.
    #[error("{0}")]
    Failed(String),
}

impl AllocateError {
    /// The `result` label of `udp_director_allocations_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::NoCapacity => "no_capacity",
            Self::Contention(_) => "contention",
            Self::Refused(_) | Self::Failed(_) => "error",
        }
    }
}

/// Creates allocations through the API server.
#[derive(Clone)]
pub struct Allocator {
    client: kube::Client,
    ids: Arc<parking_lot::Mutex<RequestIds>>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator").finish_non_exhaustive()
    }
}

/// The resource allocations are created as.
fn resource() -> ApiResource {
    ApiResource {
        group: "allocation.agones.dev".into(),
        version: "v1".into(),
        api_version: "allocation.agones.dev/v1".into(),
        kind: "GameServerAllocation".into(),
        plural: "gameserverallocations".into(),
    }
}

impl Allocator {
    /// An allocator calling the API server through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            ids: Arc::default(),
        }
    }

    /// The slot of request id `key`, where its server is remembered.
    pub fn request_slot(&self, key: RequestKey, now: Instant) -> Slot {
        self.ids.lock().slot(key, now)
    }

    /// Creates `body` in `namespace`, retrying `Contention` and API errors that may pass with
    /// a back-off, until `timeout` from `started`.
    pub async fn allocate(
        &self,
        namespace: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Outcome, AllocateError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource());
        let object: DynamicObject = serde_json::from_value(body.clone())
            .map_err(|e| AllocateError::Failed(format!("allocation request: {e}")))?;
        let mut backoff = BACKOFF_MIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // What went wrong this time, to retry or, when the time is up, to answer.
            let error =
                match tokio::time::timeout(left, api.create(&PostParams::default(), &object)).await
                {
                    Err(_) => AllocateError::Failed(format!(
                        "the API server did not answer within {timeout:?}"
                    )),
                    Ok(Ok(created)) => {
                        let value = serde_json::to_value(&created)
                            .map_err(|e| AllocateError::Failed(e.to_string()))?;
                        match read_answer(&value) {
                            Ok(Outcome::Contention) => AllocateError::Contention(timeout),
                            Ok(outcome) => return Ok(outcome),
                            Err(e) => return Err(AllocateError::Failed(e)),
                        }
                    }
                    Ok(Err(kube::Error::Api(e))) if matches!(e.code, 401 | 403 | 404) => {
                        return Err(AllocateError::Refused(refusal(
                            namespace, e.code, &e.message,
                        )));
                    }
                    Ok(Err(e)) => AllocateError::Failed(format!(
                        "creating a GameServerAllocation in {namespace}: {}",
                        crate::reconcile::status::describe(&e)
                    )),
                };
            let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                return Err(error);
            }
            tokio::time::sleep(jitter(wait)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// What a refusal means to an operator.
fn refusal(namespace: &str, code: u16, message: &str) -> String {
    let why = crate::quote::quote_message(message);
    match code {
        404 => format!("allocation.agones.dev/v1 is not served here (is Agones installed?): {why}"),
        _ => format!(
            "the proxy may not create gameserverallocations in {namespace} (`udp-director rbac` \
             grants it for mappings with allocation settings): {why}"
        ),
    }
}

/// `wait`, give or take a quarter, so allocators that met the same contention spread out.
fn jitter(wait: Duration) -> Duration {
    let quarter = wait / 4;
    wait - quarter + quarter.mul_f64(2.0 * fastrand::f64())
}

/// A request id as remembered: with the resource type and namespace it was asked for.
pub type RequestKey = (String, String, String);

/// Where one request id's server is kept: held while its allocation runs, so a retry that
/// arrives meanwhile waits for it and takes the same server.
pub type Slot = Arc<tokio::sync::Mutex<Option<Remembered>>>;

/// A server given for a request id, until the token TTL ends.
#[derive(Clone, Debug)]
pub struct Remembered {
    /// The server.
    pub backend: Backend,
    /// Until when a retry gets it.
    pub until: Instant,
}

/// Recent request ids, bounded: the oldest are forgotten first.
#[derive(Debug, Default)]
pub struct RequestIds {
    slots: HashMap<RequestKey, Slot>,
    order: VecDeque<(Instant, RequestKey)>,
}

impl RequestIds {
    /// The slot of `key`, made if new; ids older than the bound are forgotten.
    pub fn slot(&mut self, key: RequestKey, now: Instant) -> Slot {
        if let Some(slot) = self.slots.get(&key) {
            return Arc::clone(slot);
        }
        while self.slots.len() >= MAX_REQUEST_IDS {
            let Some((_, old)) = self.order.pop_front() else {
                break;
            };
            self.slots.remove(&old);
        }
        let slot = Slot::default();
        self.slots.insert(key.clone(), Arc::clone(&slot));
        self.order.push_back((now, key));
        slot
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation() -> Allocation {
        Allocation {
            enabled: false,
            backfill_counter: None,
            labels: BTreeMap::from([("udp-director.dev/token".into(), "{tokenId}".into())]),
            annotations: BTreeMap::from([("note".into(), "by {tokenId}".into())]),
            counters: BTreeMap::from([("players".into(), 1)]),
            timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_request_selects_ready_servers_by_the_querys_labels_and_writes_the_metadata() {
        let labels = BTreeMap::from([("agones.dev/fleet".to_string(), "f1".to_string())]);
        let a = allocation();
        let body = request(&Request {
            namespace: "games",
            labels: &labels,
            allocation: &a,
            token_id: "t-1",
        });
        assert_eq!(body["kind"], "GameServerAllocation");
        assert_eq!(body["metadata"]["namespace"], "games");
        let selectors = body["spec"]["selectors"].as_array().unwrap();
        assert_eq!(selectors.len(), 1);
        assert_eq!(selectors[0]["gameServerState"], "Ready");
        assert_eq!(selectors[0]["matchLabels"]["agones.dev/fleet"], "f1");
        assert_eq!(
            body["spec"]["metadata"]["labels"]["udp-director.dev/token"],
            "t-1"
        );
        assert_eq!(body["spec"]["metadata"]["annotations"]["note"], "by t-1");
        assert_eq!(
            body["spec"]["counters"]["players"],
            json!({"action": "Increment", "amount": 1})
        );
    }

    #[test]
    fn backfill_asks_for_an_allocated_server_with_room_before_a_ready_one() {
        let mut a = allocation();
        a.backfill_counter = Some("players".into());
        a.counters = BTreeMap::from([("players".into(), -2)]);
        let body = request(&Request {
            namespace: "games",
            labels: &BTreeMap::new(),
            allocation: &a,
            token_id: "t",
        });
        let selectors = body["spec"]["selectors"].as_array().unwrap();
        assert_eq!(selectors.len(), 2);
        assert_eq!(selectors[0]["gameServerState"], "Allocated");
        assert_eq!(
            selectors[0]["counters"]["players"],
            json!({"minAvailable": 1})
        );
        assert_eq!(selectors[1]["gameServerState"], "Ready");
        assert_eq!(
            body["spec"]["counters"]["players"],
            json!({"action": "Decrement", "amount": 2})
        );
    }

    #[test]
    fn answers_are_read_by_state_and_nothing_else_is_trusted() {
        let allocated = json!({"status": {"state": "Allocated", "gameServerName": "gs-1",
            "address": "10.0.0.5", "ports": [{"name": "default", "port": 7001}]}});
        match read_answer(&allocated).unwrap() {
            Outcome::Allocated { name, status } => {
                assert_eq!(name, "gs-1");
                assert_eq!(status["ports"][0]["port"], 7001);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_answer(&json!({"status": {"state": "UnAllocated"}})).unwrap(),
            Outcome::UnAllocated
        );
        assert_eq!(
            read_answer(&json!({"status": {"state": "Contention"}})).unwrap(),
            Outcome::Contention
        );
        for bad in [
            json!({}),
            json!({"status": {}}),
            json!({"status": {"state": "Allocated"}}),
            json!({"status": {"state": "Allocated", "gameServerName": ""}}),
            json!({"status": {"state": "Exploded"}}),
            json!({"status": {"state": 7}}),
        ] {
            assert!(read_answer(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_bounded_and_a_known_id_finds_its_slot() {
        let now = Instant::now();
        let mut ids = RequestIds::default();
        let key = |i: usize| {
            (
                "gameserver".to_string(),
                "games".to_string(),
                format!("r{i}"),
            )
        };
        let first = ids.slot(key(0), now);
        assert!(Arc::ptr_eq(&first, &ids.slot(key(0), now)));
        for i in 1..=MAX_REQUEST_IDS {
            let _ = ids.slot(key(i), now);
        }
        assert_eq!(ids.len(), MAX_REQUEST_IDS);
        assert!(
            !Arc::ptr_eq(&first, &ids.slot(key(0), now)),
            "the oldest was forgotten"
        );
    }

    #[test]
    fn the_back_off_spreads_around_its_value() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(75) && j <= Duration::from_millis(125));
        }
    }
}
