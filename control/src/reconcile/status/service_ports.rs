//! The ports of a Service the forwarders manage (SPEC §6): what each port is, and what the
//! Service as watched carries.

use std::sync::Arc;

use dataplane::Transport;

use crate::inventory::Object;

/// One port of a managed Service.
#[derive(Clone, Debug, Eq, Ord, PartialEq, PartialOrd)]
pub struct ServicePort {
    /// Port (and target port): the forwarder's `listenPort`.
    pub port: u16,
    /// Transport.
    pub protocol: Transport,
    /// The forwarder's name (with `-udp`/`-tcp` when one Service carries both protocols).
    pub name: String,
}

/// The ports Service `namespace/name` has in the snapshot (`None`: no such Service).
pub fn live_ports(
    services: &[Arc<Object>],
    namespace: &str,
    name: &str,
) -> Option<Vec<ServicePort>> {
    let service = services
        .iter()
        .find(|s| s.namespace == namespace && s.name == name)?;
    let ports = service
        .raw
        .pointer("/spec/ports")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    Some(
        ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                    protocol: match p.get("protocol").and_then(serde_json::Value::as_str) {
                        Some("UDP") => Transport::Udp,
                        Some("TCP") | None => Transport::Tcp,
                        Some(_) => return None, // SCTP: never one of ours
                    },
                    name: p
                        .get("name")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                })
            })
            .collect(),
    )
}
