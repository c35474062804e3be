//! The query side of the control thread: the query port's server ([`server`]) and protocol
//! ([`protocol`]), the director that answers a query with a token ([`director`]), selection
//! over the inventory and its index ([`select`]), the dot paths mappings read ([`jsonpath`]),
//! and the connection limits the server keeps ([`conn_limit`]).

pub mod conn_limit;
pub mod director;
pub mod jsonpath;
pub mod protocol;
pub mod select;
pub mod server;

pub use protocol::{ErrorCode, Query, QueryError, Scalar, StatusQuery, TokenAnswer};
