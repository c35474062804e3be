//! The stand-in for Agones' allocation API (testkit/src/agones/) on the suite's API server: a
//! thin adapter that starts it from a [`Cluster`] and skips the test, loudly, where it cannot
//! run (it needs root for its network namespace). Everything else is testkit's.

use std::ops::Deref;
use std::sync::OnceLock;

use testkit::agones::{AgonesAllocatorStandIn as StandIn, StandInError};
#[allow(unused_imports)]
pub use testkit::agones::{
    AllocationRecord, GROUP, LAST_ALLOCATED, Refusal, VERSION, create_allocation,
    create_allocation_raw,
};

use super::cluster::Cluster;
use super::skip_test;

/// This test process's stand-in (testkit's, through [`Deref`]).
#[derive(Debug)]
pub struct AgonesAllocatorStandIn(&'static StandIn);

impl AgonesAllocatorStandIn {
    /// The stand-in, registered with `cluster`'s API server and reachable through it. None
    /// (after saying so; a failure under CI=true) where it cannot run; a panic where it runs
    /// but the API server does not reach it.
    pub fn start(cluster: &Cluster) -> Option<&'static Self> {
        static ADAPTER: OnceLock<AgonesAllocatorStandIn> = OnceLock::new();
        match StandIn::start(&cluster.run) {
            Ok(standin) => Some(ADAPTER.get_or_init(|| Self(standin))),
            Err(e @ StandInError::Unavailable { .. }) => {
                skip_test(&e.to_string());
                None
            }
            Err(e) => panic!("{e}"),
        }
    }
}

impl Deref for AgonesAllocatorStandIn {
    type Target = StandIn;

    fn deref(&self) -> &StandIn {
        self.0
    }
}
