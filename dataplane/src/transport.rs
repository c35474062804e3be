//! The transports a listener or session runs over: a leaf type that every layer names
//! (listeners, sessions, errors, metrics) and that names nothing itself.

/// Transport of a listener.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Transport {
    /// Datagrams.
    Udp,
    /// Streams.
    Tcp,
}

impl Transport {
    /// Every transport, in metric-label order.
    pub const ALL: [Self; 2] = [Self::Udp, Self::Tcp];

    /// `udp`, as in `udp/7777`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}
