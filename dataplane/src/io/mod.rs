//! The kernel's side of the data plane: everything that makes a syscall, kept thin so the
//! decisions in [`crate::policy`] stay testable without sockets.
//!
//! - [`socket`]: socket builders, one error per syscall step.
//! - [`batch`]: `recvmmsg`/`sendmmsg` batches (receive, upstream, per-worker replies), zero-copy
//!   from the receive buffer, with a portable fallback; [`pktinfo`] reads and writes the local
//!   address of a datagram on wildcard sockets.
//! - [`splice`]: the TCP splice between a client and its backend, with half-close and bounded
//!   buffers; [`pipe`] the kernel pipes it moves bytes through with `splice(2)`, pooled per
//!   worker.
//! - [`fd_budget`]: the descriptors the data plane may hold, against the process limit.
//! - [`own_addrs`]: the host's addresses and our upstream sockets' ports, to never proxy to
//!   ourselves.

pub(crate) mod batch;
pub mod fd_budget;
pub(crate) mod own_addrs;
pub(crate) mod pipe;
pub(crate) mod pktinfo;
pub(crate) mod socket;
pub(crate) mod splice;
