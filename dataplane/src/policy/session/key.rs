//! The key of a session: client address and data port index.

use std::net::SocketAddr;

/// A client on a data port. The same client address on two data ports is two sessions.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct SessionKey {
    /// The client's address as seen by the proxy.
    pub client: SocketAddr,
    /// Index of the data port in the data plane's configuration.
    pub port: u16,
}
