//! Upgrades without dropping players (SPEC §12): a starting proxy takes the sockets, sessions,
//! grants and nonce ledger of the running one over a Unix socket, descriptors as
//! `SCM_RIGHTS`, so every UDP session continues with the same upstream source address and port.
//!
//! - [`wire`]: the versioned format (plain data, parsed as untrusted input).
//! - [`old`]: the running process's side (the server on the socket), [`new`]: the starting
//!   process's side; both drive the workers through the controller.
//! - [`stream`]: framing over the Unix socket, descriptors beside the frames, bounded sizes and
//!   timeouts.

pub(crate) mod fdtable;
pub mod new;
pub mod old;
pub(crate) mod share;
pub mod stats;
pub mod stream;
pub mod wire;

use crate::policy::proxy_protocol::ProxyMode;
use wire::WireProxyMode;

/// A PROXY protocol mode as the stream writes it.
pub(crate) fn wire_proxy_mode(mode: ProxyMode) -> WireProxyMode {
    match mode {
        ProxyMode::None => WireProxyMode::None,
        ProxyMode::V2 => WireProxyMode::V2,
        ProxyMode::V2First => WireProxyMode::V2First,
    }
}

/// A backend as the stream writes it.
pub(crate) fn wire_backend(b: &crate::policy::grant::Backend) -> wire::WireBackend {
    wire::WireBackend {
        id: b.id.0,
        addrs: b.addrs.to_vec(),
        proxy: wire_proxy_mode(b.proxy),
    }
}

/// A backend the stream names.
pub(crate) fn backend(b: wire::WireBackend) -> crate::policy::grant::Backend {
    crate::policy::grant::Backend {
        id: crate::policy::grant::BackendId(b.id),
        addrs: b.addrs.into_boxed_slice(),
        proxy: proxy_mode(b.proxy),
    }
}

/// A PROXY protocol mode the stream names.
pub(crate) fn proxy_mode(mode: WireProxyMode) -> ProxyMode {
    match mode {
        WireProxyMode::None => ProxyMode::None,
        WireProxyMode::V2 => ProxyMode::V2,
        WireProxyMode::V2First => ProxyMode::V2First,
    }
}
