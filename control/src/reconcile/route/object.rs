//! A `Route` as the proxy reads it: the CRD's spec checked (each error names the field) and
//! its matches parsed once, when the object changes, not on every compile.

use dataplane::{Cidr, Match};
use serde_json::Value;

use crate::crd::{MAX_ROUTE_TIMEOUT_SECONDS, RouteSpec};
use crate::inventory::Object;

/// apiVersion of `Route` objects.
pub use crate::crd::route::API_VERSION;
/// Kind of `Route` objects.
pub use crate::crd::route::KIND;

/// Whether `o` is a `Route`.
pub fn is_route(o: &Object) -> bool {
    crate::crd::route::is_route(&o.api_version, &o.kind)
}

/// One `Route`, typed and checked, its matches parsed once.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteObject {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (empty in a file).
    pub uid: String,
    /// `metadata.creationTimestamp` (RFC 3339, sorts as text; empty in a file).
    pub created: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The spec as written.
    pub spec: RouteSpec,
    /// Each rule's match, parsed.
    pub matches: Vec<Match>,
}

impl RouteObject {
    /// Reads a `Route` inventory object; the error names the field.
    pub fn from_object(object: &Object) -> Result<Self, InvalidRoute> {
        let spec = object.raw.get("spec").ok_or(InvalidRoute::NoSpec)?;
        let spec: RouteSpec = serde_json::from_value(spec.clone()).map_err(InvalidRoute::Spec)?;
        if spec.entry_point.is_empty() {
            return Err(InvalidRoute::EmptyEntryPoint);
        }
        if let Some(s) = spec.session_timeout_seconds
            && !(1..=MAX_ROUTE_TIMEOUT_SECONDS).contains(&s)
        {
            return Err(InvalidRoute::SessionTimeout(s));
        }
        if spec.rules.is_empty() {
            return Err(InvalidRoute::NoRules);
        }
        let mut matches = Vec::with_capacity(spec.rules.len());
        for (rule, r) in spec.rules.iter().enumerate() {
            if r.backends.is_empty() {
                return Err(InvalidRoute::NoBackends(rule));
            }
            let m = r.matcher.clone().unwrap_or_default();
            let source_cidrs = m
                .source_cidrs
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    Cidr::parse(c).map_err(|source| InvalidRoute::SourceCidr {
                        rule,
                        index,
                        source,
                    })
                })
                .collect::<Result<_, _>>()?;
            let source_ports = m
                .source_ports
                .iter()
                .enumerate()
                .map(|(index, p)| {
                    port_range(p).map_err(|source| InvalidRoute::SourcePorts {
                        rule,
                        index,
                        source,
                    })
                })
                .collect::<Result<_, _>>()?;
            matches.push(Match {
                source_cidrs,
                source_ports,
            });
        }
        let meta = object.raw.get("metadata");
        let text = |field: &str| {
            meta.and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(Self {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            uid: text("uid"),
            created: text("creationTimestamp"),
            generation: meta
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64),
            spec,
            matches,
        })
    }

    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a `Route` does not read; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRoute {
    /// No `spec`.
    #[error("spec: missing")]
    NoSpec,
    /// `spec` does not deserialize (serde names the field).
    #[error("spec: {0}")]
    Spec(#[source] serde_json::Error),
    /// `spec.entryPoint: ""`.
    #[error("spec.entryPoint: must not be empty")]
    EmptyEntryPoint,
    /// `spec.sessionTimeoutSeconds` out of range.
    #[error("spec.sessionTimeoutSeconds: must be 1 to {MAX_ROUTE_TIMEOUT_SECONDS}, not {0}")]
    SessionTimeout(u64),
    /// `spec.rules: []`.
    #[error("spec.rules: at least one rule is needed")]
    NoRules,
    /// A rule with no backend.
    #[error("spec.rules[{0}].backends: at least one is needed")]
    NoBackends(usize),
    /// A source CIDR that does not parse.
    #[error("spec.rules[{rule}].match.sourceCidrs[{index}]: {source}")]
    SourceCidr {
        /// The rule's position.
        rule: usize,
        /// The CIDR's position.
        index: usize,
        /// Why.
        source: dataplane::CidrError,
    },
    /// A source port range that does not parse.
    #[error("spec.rules[{rule}].match.sourcePorts[{index}]: {source}")]
    SourcePorts {
        /// The rule's position.
        rule: usize,
        /// The range's position.
        index: usize,
        /// Why.
        source: PortRangeError,
    },
}

/// Why a text is not a source port range.
#[derive(Debug, thiserror::Error)]
pub enum PortRangeError {
    /// One end is not a port.
    #[error("`{0}` is not a port (1 to 65535)")]
    NotAPort(String),
    /// `9-1`.
    #[error("`{0}`: the range is empty")]
    Empty(String),
}

/// `"9001"` or `"10000-10100"`.
fn port_range(text: &str) -> Result<(u16, u16), PortRangeError> {
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| PortRangeError::NotAPort(s.to_owned()))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(PortRangeError::Empty(text.to_owned()));
    }
    Ok((lo, hi))
}
