//! Gateway API (SPEC §7): Gateways of the GatewayClasses that name this proxy's controller get
//! their UDP and TCP listeners opened at run time as entry points, the UDPRoutes and TCPRoutes
//! attached to them compiled into the same rule tables as `Route` objects, and the status the
//! API defines written back.

pub mod compile;

/// Whether `o` is a Gateway API object.
pub fn is_gateway_api(o: &crate::inventory::Object) -> bool {
    o.api_version
        .strip_prefix(crate::crd::gateway::GROUP)
        .is_some_and(|rest| rest.starts_with('/'))
}
