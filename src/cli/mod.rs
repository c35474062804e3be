//! The subcommands of `udp-director`, one module each: running the proxy, checking a config,
//! asking a query port, and printing the manifests generated from the code.

pub(crate) mod check;
pub(crate) mod manifests;
pub(crate) mod panic;
pub(crate) mod query;
pub(crate) mod run;
