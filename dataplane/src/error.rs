//! Errors of starting and running the data plane. Per-datagram problems are never errors: they
//! are [`crate::DropReason`]s, counted and dropped.

use std::io;
use std::net::SocketAddr;

use crate::transport::Transport;

/// Binding a data-port socket failed; one variant per syscall step so the message says which.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// `socket(2)` failed.
    #[error("could not create a socket for {addr}")]
    Create {
        /// Address the socket was meant for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A `setsockopt(2)` failed.
    #[error("could not set {option} on the socket for {addr}")]
    SetOption {
        /// Address the socket was meant for.
        addr: SocketAddr,
        /// Option name, as in `man 7 socket`.
        option: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The port is held by another socket, likely another process (a second instance).
    #[error(
        "{transport} port {addr} is already in use by another process (is another \
         udp-director running on this port?)",
        transport = .transport.as_str().to_uppercase()
    )]
    Taken {
        /// Transport of the port.
        transport: Transport,
        /// Address that is taken.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// `bind(2)` failed (port in use, address not on this host, privileged port).
    #[error("could not bind {addr}")]
    Bind {
        /// Address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// Starting the data plane failed; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A data port could not be opened (the cause follows in the error chain).
    #[error("cannot open data port {name}")]
    Listen {
        /// The data port's name.
        name: String,
        /// Why.
        source: ListenError,
    },
    /// The event loop could not be created or a socket not registered.
    #[error("could not set up the event loop of worker {worker}")]
    Poll {
        /// Worker index.
        worker: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The worker thread could not be spawned.
    #[error("could not spawn worker thread {worker}")]
    Spawn {
        /// Worker index.
        worker: usize,
        /// The OS error.
        source: io::Error,
    },
    /// What a running proxy handed over could not be installed (it serves on).
    #[error("taking over from the running proxy: {0}")]
    HandOff(String),
    /// The configuration names no data port, or more than the data plane supports.
    #[error("the data plane needs between 1 and {max} data ports, got {got}")]
    DataPortCount {
        /// Ports configured.
        got: usize,
        /// Supported maximum.
        max: usize,
    },
}

/// A worker's event loop failed; the worker thread ends with it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `epoll_wait` failed for a reason other than a signal.
    #[error("worker {worker}: poll failed")]
    Poll {
        /// Worker index.
        worker: usize,
        /// The OS error.
        source: io::Error,
    },
}

/// Opening a listener failed; nothing was opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another listener of this data plane holds the port.
    #[error("{transport}/{port} is already open for {holder}", transport = .transport.as_str())]
    Taken {
        /// Transport.
        transport: Transport,
        /// Port.
        port: u16,
        /// The owner that holds it.
        holder: String,
    },
    /// The socket could not be bound (another process holds the port, no such address, …).
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Every listener id is in use.
    #[error("no free listener id ({max} listeners are open)")]
    Full {
        /// Listeners open.
        max: usize,
    },
    /// The workers are gone.
    #[error("the data plane is shutting down")]
    Stopped,
    /// Its sockets (one per worker) would eat into the descriptors kept for the control
    /// thread.
    #[error(
        "out of descriptors: {needed} needed, {held} of the data plane's {allowed} in use \
         (raise the open-file limit)"
    )]
    Descriptors {
        /// Sockets the listener needs (one per worker).
        needed: usize,
        /// Descriptors the data plane holds.
        held: usize,
        /// Descriptors the data plane may hold.
        allowed: usize,
    },
}
