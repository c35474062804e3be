//! Selection: filter an inventory snapshot by a query, resolve each match to a backend address
//! per data port, and pick one by the configured load-balancing strategy.
//!
//! Filtering order (SPEC section 5): namespace, label selector, status query, annotation
//! selector, then load balancing. Everything here is pure; the load counts come in as a function.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dataplane::{Backend, BackendId};
use serde_json::Value;

use crate::config::{LoadBalancing, Locator, Mapping, PortSource};
use crate::inventory::{Object, Snapshot};
use crate::query::jsonpath::Path;
use crate::query::{ErrorCode, Query, QueryError};

pub mod index;
use index::Narrowed;
pub use index::QueryIndex;

/// A matching object and where its traffic goes.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The inventory object.
    pub object: Arc<Object>,
    /// Its backend (address per data port).
    pub backend: Backend,
}

/// Objects of the query's resource type that pass every filter, resolved to backends.
/// Errors: unknown type, nothing matches, or nothing that matches has an address. (Builds an
/// index for this one call: the query path keeps one per snapshot, see [`matching`].)
pub fn candidates(
    query: &Query,
    mapping: &Mapping,
    snapshot: &Snapshot,
    data_ports: usize,
) -> Result<Vec<Candidate>, QueryError> {
    let mappings = std::iter::once((query.resource_type.clone(), mapping.clone())).collect();
    let index = QueryIndex::build(snapshot, &mappings, data_ports);
    let empty = index::MappingIndex::default();
    let mapping_index = index.mapping(&query.resource_type).unwrap_or(&empty);
    matching(query, mapping_index).map(|list| list.into_iter().cloned().collect())
}

/// The indexed objects that pass every filter (namespace, label selector, status query,
/// annotation selector), resolved: the same answer as [`candidates`], walking only the
/// shortest list the namespace and label selector allow, with backends resolved once per
/// snapshot.
pub fn matching<'a>(
    query: &Query,
    index: &'a index::MappingIndex,
) -> Result<Vec<&'a Candidate>, QueryError> {
    let status = match &query.status_query {
        Some(sq) => {
            let path = Path::parse(&sq.json_path)
                .map_err(|e| QueryError::new(ErrorCode::BadRequest, e.to_string()))?;
            let expected = sq.expected();
            // The values at this path, read once per snapshot (while few paths are in use).
            let column = index.status_values(&path).map(|c| {
                let ids = c.ids_of(&expected);
                (c, ids)
            });
            Some((path, column, expected))
        }
        None => None,
    };
    let (narrowed, by) = index.narrow(query.namespace.as_deref(), &query.label_selector);
    let mut matched = 0usize;
    let resolved: Vec<&Candidate> = narrowed
        .filter(|(i, e)| {
            let o = &e.object;
            (by == Narrowed::Namespace
                || query.namespace.as_ref().is_none_or(|ns| &o.namespace == ns))
                && query
                    .label_selector
                    .iter()
                    .enumerate()
                    .filter(|(n, _)| by != Narrowed::Label(*n))
                    .all(|(_, (k, v))| o.labels.get(k) == Some(v))
                && match &status {
                    Some((_, Some((column, ids)), _)) => column.has(*i, ids),
                    Some((path, None, expected)) => path
                        .get_string(&o.raw)
                        .is_some_and(|v| expected.contains(&v)),
                    None => true,
                }
                && subset(&query.annotation_selector, &o.annotations)
        })
        .map(|(_, e)| e)
        .filter_map(|e| {
            matched += 1;
            e.candidate.as_ref()
        })
        .collect();
    if matched == 0 {
        return Err(QueryError::new(
            ErrorCode::NoMatch,
            format!(
                "no {} matches the query{}",
                query.resource_type,
                query
                    .namespace
                    .as_ref()
                    .map(|ns| format!(" in namespace {}", crate::quote::quote(ns)))
                    .unwrap_or_default()
            ),
        ));
    }
    if resolved.is_empty() {
        return Err(QueryError::new(
            ErrorCode::BackendUnresolvable,
            format!(
                "{matched} matching {} found, but none has a usable address and port",
                query.resource_type
            ),
        ));
    }
    Ok(resolved)
}

fn subset(
    wanted: &std::collections::BTreeMap<String, String>,
    have: &std::collections::BTreeMap<String, String>,
) -> bool {
    wanted.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The backend of an object: its address on each data port, or None when it has no usable
/// address or none of its ports resolve.
pub fn resolve(
    mapping: &Mapping,
    object: &Object,
    snapshot: &Snapshot,
    data_ports: usize,
) -> Option<Backend> {
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; data_ports];
    match &mapping.locator {
        Locator::Direct {
            address_path,
            address_type,
            ports,
        } => {
            let ip = direct_address(&object.raw, address_path, address_type.as_deref())?;
            for (index, source) in ports {
                if let (Some(slot), Some(port)) =
                    (addrs.get_mut(*index), port_of(&object.raw, source))
                {
                    *slot = Some(SocketAddr::new(ip, port));
                }
            }
        }
        Locator::Service {
            selector_label,
            target_port_name,
        } => {
            let service =
                snapshot.service_labelled(&object.namespace, selector_label, &object.name)?;
            let spec = service.raw.get("spec")?;
            // A ClusterIP Service is reached through its virtual IP and the Service port; a
            // headless one (`clusterIP: None`) through a ready endpoint of its EndpointSlices.
            let addr = match spec.get("clusterIP")?.as_str()?.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(
                    ip,
                    named_port(spec.get("ports")?, target_port_name, "port")?,
                ),
                Err(_) => {
                    snapshot.ready_endpoint(&service.namespace, &service.name, target_port_name)?
                }
            };
            addrs.iter_mut().for_each(|a| *a = Some(addr));
        }
    }
    if addrs.iter().all(Option::is_none) {
        return None;
    }
    Some(Backend {
        id: backend_id(object, &addrs),
        addrs: addrs.into(),
        proxy: mapping.proxy_protocol,
    })
}

/// A stable id per (object, IP addresses): an object whose IP changes (a rescheduled pod) is a
/// new backend, so sessions to its old address are ended like those of a deleted one. Ports
/// are left out: a mapping that gains a data port on reload, or reads the same address from
/// another path, keeps its backends and their sessions.
fn backend_id(object: &Object, addrs: &[Option<SocketAddr>]) -> BackendId {
    let mut ips: Vec<IpAddr> = addrs.iter().flatten().map(SocketAddr::ip).collect();
    ips.sort_unstable();
    ips.dedup();
    let mut h = DefaultHasher::new();
    (&object.kind, &object.namespace, &object.name, ips).hash(&mut h);
    BackendId(h.finish())
}

fn direct_address(raw: &Value, path: &Path, address_type: Option<&str>) -> Option<IpAddr> {
    let value = path.get(raw)?;
    let text = match address_type {
        None => value.as_str()?,
        Some(kind) => value
            .as_array()?
            .iter()
            .find(|e| e.get("type").and_then(Value::as_str) == Some(kind))?
            .get("address")?
            .as_str()?,
    };
    text.parse().ok()
}

fn number(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|&p| p != 0)
}

/// A port by name or by path.
fn port_of(raw: &Value, source: &PortSource) -> Option<u16> {
    match source {
        PortSource::Path(p) => p.get(raw).and_then(number),
        // Agones `status.ports[]`, then Pod containers, then Service ports.
        PortSource::Name(name) => raw
            .pointer("/status/ports")
            .and_then(|ports| named_port(ports, name, "port"))
            .or_else(|| {
                raw.pointer("/spec/containers")?
                    .as_array()?
                    .iter()
                    .filter_map(|c| c.get("ports"))
                    .find_map(|ports| named_port(ports, name, "containerPort"))
            })
            .or_else(|| named_port(raw.pointer("/spec/ports")?, name, "port")),
    }
}

/// In an array of `{name, <field>}` entries, the number of the one called `name`.
fn named_port(ports: &Value, name: &str, field: &str) -> Option<u16> {
    ports
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get(field)
        .and_then(number)
}

/// Picks one candidate. `local_load` is this instance's live sessions plus outstanding grants
/// for a backend; `rotation` is the round-robin counter of this query's resource type.
pub fn choose<C: std::borrow::Borrow<Candidate>>(
    strategy: &LoadBalancing,
    candidates: &[C],
    local_load: impl Fn(BackendId) -> u64,
    rotation: &mut u64,
) -> Result<usize, QueryError> {
    debug_assert!(!candidates.is_empty());
    match strategy {
        LoadBalancing::LeastSessions => Ok(candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| local_load(c.borrow().backend.id))
            .map(|(i, _)| i)
            .unwrap_or(0)),
        LoadBalancing::RoundRobin => {
            let i = (*rotation % candidates.len() as u64) as usize;
            *rotation = rotation.wrapping_add(1);
            Ok(i)
        }
        LoadBalancing::Random => Ok(fastrand::usize(..candidates.len())),
        LoadBalancing::LabelArithmetic {
            current_label,
            max_label,
            overlap,
        } => {
            let label =
                |o: &Object, k: &str| o.labels.get(k).and_then(|v| v.trim().parse::<i64>().ok());
            candidates
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let c = c.borrow();
                    let max = label(&c.object, max_label)?;
                    let current = label(&c.object, current_label)?;
                    let local = i64::try_from(local_load(c.backend.id)).unwrap_or(i64::MAX);
                    let available = max
                        .saturating_sub(current)
                        .saturating_sub(local)
                        .saturating_sub(*overlap);
                    (available > 0).then_some((i, available))
                })
                // Most available wins; the first in name order on a tie.
                .max_by_key(|&(i, available)| (available, std::cmp::Reverse(i)))
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    QueryError::new(
                        ErrorCode::NoCapacity,
                        format!(
                            "{} servers match, but none has capacity ({max_label} - {current_label} \
                             - local sessions - overlap {overlap} <= 0)",
                            candidates.len()
                        ),
                    )
                })
        }
    }
}

#[cfg(test)]
mod tests;
