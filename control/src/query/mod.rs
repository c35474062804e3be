//! The query side of the control thread: the query port's server ([`server`]), the director
//! that answers a query with a token ([`director`]), selection over the inventory and its index
//! ([`select`]), and the connection limits the server keeps ([`conn_limit`]). The protocol's
//! shapes and paths are [`crate::protocol`]'s (re-exported here), a layer below both this and
//! the config.

pub mod allocate;
pub mod conn_limit;
pub mod director;
pub mod select;
pub mod server;

pub use crate::protocol::jsonpath;
pub use crate::protocol::{ErrorCode, Query, QueryError, Scalar, StatusQuery, TokenAnswer};
