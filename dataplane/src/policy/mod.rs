//! Sans-io decisions: what a worker does with a datagram, a connection or a session, decided
//! without socket I/O or a clock (the caller passes `now`), so each is unit-tested on its own.
//! (Sealing a token draws its nonce from the OS's random source; nothing else here calls the
//! kernel.)
//!
//! - [`admit`]: a new client's first bytes, its listener and the context → open to a target, or
//!   drop with a reason; [`packet`] and [`prefix`] read tokens and control packets from a
//!   datagram and from a TCP stream's first bytes; [`grant`] and [`seal`] judge tokens (UUID
//!   grants, sealed tokens, the replica's nonce ledger).
//! - [`route`]: route tables and the weighted, sticky pick.
//! - [`limits`] and [`ratelimit`]: session caps and per-source (and per-session) token buckets.
//! - [`proxy_protocol`]: PROXY v2 headers, built once per path.
//! - [`upstream`]: which shared upstream socket a new UDP session leaves from.
//! - [`session`]: the per-worker session table, its per-listener index and the idle wheel.

pub(crate) mod admit;
pub mod grant;
pub(crate) mod limits;
pub mod packet;
pub(crate) mod prefix;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod route;
pub mod seal;
pub mod session;
pub(crate) mod upstream;
