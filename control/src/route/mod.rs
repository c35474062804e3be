//! Routes (SPEC §7): entry points from the config, opened as listeners at start, whose rule
//! tables are compiled from `Route` objects and their Services' EndpointSlices
//! ([`compile`], pure) and swapped into the workers whenever the inventory changes them.

pub mod compile;

pub use compile::{API_VERSION, KIND, RouteObject, is_route};
