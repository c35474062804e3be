//! The query protocol's request and answer shapes (SPEC section 2), its error codes, and the
//! dot paths a query or a mapping reads ([`jsonpath`]). The lowest layer of the control
//! crate besides names and quoting: the config (a default endpoint is a query, a mapping has
//! paths) and the query side both read it, and it reads neither.

pub mod jsonpath;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A query for a backend, as sent on the query port and used for the default endpoint.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Query {
    /// Request type; only `query` exists.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Key of `resourceQueryMapping`.
    pub resource_type: String,
    /// Namespace to search; all namespaces when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels that must all be equal.
    #[serde(default)]
    pub label_selector: BTreeMap<String, String>,
    /// Annotations that must all be equal.
    #[serde(default)]
    pub annotation_selector: BTreeMap<String, String>,
    /// A field of the object that must have one of the expected values.
    #[serde(default)]
    pub status_query: Option<StatusQuery>,
    /// Allocate the server through Agones (a `GameServerAllocation`) instead of only
    /// selecting one (SPEC section 13); the mapping must have `allocation` settings.
    #[serde(default)]
    pub allocate: bool,
    /// The client's id of this request: a retried query with the same id (and resource type
    /// and namespace) within the token TTL answers with the same server instead of
    /// allocating another.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The longest `requestId` accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// `statusQuery`: a dot path and the value(s) it must have (compared as strings).
#[derive(Clone, Debug, Deserialize, Eq, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StatusQuery {
    /// Dot path with `[n]` indexes, e.g. `status.state`.
    pub json_path: String,
    /// The one value accepted.
    #[serde(default)]
    pub expected_value: Option<Scalar>,
    /// Any of these values is accepted.
    #[serde(default)]
    pub expected_values: Option<Vec<Scalar>>,
}

/// A JSON/YAML scalar compared as a string (`3`, `true` and `"3"` all work).
#[derive(Clone, Debug, Deserialize, Eq, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    /// A string.
    Str(String),
    /// A number.
    Num(serde_json::Number),
    /// A boolean.
    Bool(bool),
}

impl Scalar {
    /// The string form used for comparison.
    pub fn as_string(&self) -> String {
        match self {
            Self::Str(s) => s.clone(),
            Self::Num(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

impl StatusQuery {
    /// The accepted values as strings.
    pub fn expected(&self) -> Vec<String> {
        let mut out: Vec<String> = self.expected_value.iter().map(Scalar::as_string).collect();
        out.extend(self.expected_values.iter().flatten().map(Scalar::as_string));
        out
    }
}

/// A query that breaks a rule serde cannot express.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum InvalidQuery {
    /// `type` other than `query`.
    #[error("unknown request type `{0}` (only `query` exists)")]
    UnknownType(String),
    /// `resourceType: ""`.
    #[error("`resourceType` must not be empty")]
    EmptyResourceType,
    /// `statusQuery.jsonPath: ""`.
    #[error("`statusQuery.jsonPath` must not be empty")]
    EmptyStatusPath,
    /// Both `expectedValue` and `expectedValues`.
    #[error("`statusQuery` takes `expectedValue` or `expectedValues`, not both")]
    BothExpected,
    /// Neither.
    #[error("`statusQuery` needs `expectedValue` or `expectedValues`")]
    NoExpected,
    /// `expectedValues: []`.
    #[error("`statusQuery.expectedValues` must not be empty")]
    EmptyExpected,
    /// A `jsonPath` that does not parse.
    #[error("`statusQuery.jsonPath`: {0}")]
    StatusPath(#[from] crate::protocol::jsonpath::PathError),
    /// A `requestId` that is empty, too long or not printable ASCII.
    #[error("`requestId` must be 1 to {MAX_REQUEST_ID} printable ASCII characters")]
    BadRequestId,
}

impl Query {
    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), InvalidQuery> {
        if let Some(kind) = &self.kind
            && kind != "query"
        {
            return Err(InvalidQuery::UnknownType(
                crate::quote::quote(kind).into_owned(),
            ));
        }
        if self.resource_type.is_empty() {
            return Err(InvalidQuery::EmptyResourceType);
        }
        if let Some(sq) = &self.status_query {
            if sq.json_path.is_empty() {
                return Err(InvalidQuery::EmptyStatusPath);
            }
            match (&sq.expected_value, &sq.expected_values) {
                (Some(_), Some(_)) => return Err(InvalidQuery::BothExpected),
                (None, None) => return Err(InvalidQuery::NoExpected),
                (None, Some(v)) if v.is_empty() => return Err(InvalidQuery::EmptyExpected),
                _ => {}
            }
            crate::protocol::jsonpath::Path::parse(&sq.json_path)?;
        }
        if let Some(id) = &self.request_id
            && (id.is_empty()
                || id.len() > MAX_REQUEST_ID
                || !id.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(InvalidQuery::BadRequestId);
        }
        Ok(())
    }
}

/// Machine-readable failure codes of the query protocol.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid JSON of the request schema, or too large.
    BadRequest,
    /// `resourceType` is not in `resourceQueryMapping`.
    UnknownResourceType,
    /// No object matches the filters.
    NoMatch,
    /// Objects match, but none has capacity left (`labelArithmetic`).
    NoCapacity,
    /// Objects match, but none has a usable address and port.
    BackendUnresolvable,
    /// The inventory has not loaded yet.
    InventoryUnavailable,
    /// The proxy cannot take the request now (connection limit, data plane busy).
    Overloaded,
    /// The proxy is shutting down and opens no new sessions.
    Draining,
    /// Allocation kept meeting `Contention` (another allocator took the server) until
    /// `allocation.timeoutMs` ran out.
    Contention,
    /// The allocation could not be made: the API server refused it (RBAC, no Agones), did
    /// not answer in time, or answered something unreadable.
    AllocationFailed,
}

impl ErrorCode {
    /// Every code, in metric-label order.
    pub const ALL: [Self; 10] = [
        Self::BadRequest,
        Self::UnknownResourceType,
        Self::NoMatch,
        Self::NoCapacity,
        Self::BackendUnresolvable,
        Self::InventoryUnavailable,
        Self::Overloaded,
        Self::Draining,
        Self::Contention,
        Self::AllocationFailed,
    ];

    /// The code as it appears on the wire and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownResourceType => "unknown_resource_type",
            Self::NoMatch => "no_match",
            Self::NoCapacity => "no_capacity",
            Self::BackendUnresolvable => "backend_unresolvable",
            Self::InventoryUnavailable => "inventory_unavailable",
            Self::Overloaded => "overloaded",
            Self::Draining => "draining",
            Self::Contention => "contention",
            Self::AllocationFailed => "allocation_failed",
        }
    }
}

/// A failed query: a human message and a machine code.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, thiserror::Error)]
#[error("{error} ({})", code.as_str())]
pub struct QueryError {
    /// Human message.
    pub error: String,
    /// Machine code.
    pub code: ErrorCode,
}

impl QueryError {
    /// A failure with a code and message.
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            code,
        }
    }
}

/// A successful query.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenAnswer {
    /// The token, a UUID v4.
    pub token: String,
    /// Seconds it stays redeemable.
    pub ttl_seconds: u64,
    /// Data port name → proxy port, for every port the token opens.
    pub ports: BTreeMap<String, u16>,
}
