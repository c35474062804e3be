//! The reconcilers: what the objects ask for made so in the data plane and said back in their
//! status. Forwarders ([`forwarder`]), Routes ([`route`]) and the Gateway API ([`gateway`]),
//! one port rule across them ([`ports`]), what a target may be ([`unicast`]), and the status
//! writers with the Lease that makes whole-object status one truth ([`status`]).

pub mod forwarder;
pub mod gateway;
pub mod ports;
pub mod route;
pub mod status;
pub mod unicast;
