//! The key of a session: client address and listener id.

use std::net::SocketAddr;

/// A client on a listener. The same client address on two listeners is two sessions.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct SessionKey {
    /// The client's address as seen by the proxy.
    pub client: SocketAddr,
    /// The listener's id (the data ports come first, in config order).
    pub port: u16,
}
