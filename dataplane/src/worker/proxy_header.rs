//! The PROXY protocol v2 header of a UDP session's path, and when it rides along.

use std::net::{IpAddr, SocketAddr};

use crate::io::batch::Header;
use crate::policy::proxy_protocol::{HeaderTransport, ProxyHeader, ProxyMode};

use super::listeners::Listeners;

/// A UDP session's PROXY protocol header, built once when the session (or its move to another
/// backend) starts.
///
/// A `v2-first` header stays pending until a datagram carrying it has left: a datagram that
/// carries it is queued, the session's others carry none meanwhile, and the flush says whether
/// it left (the batch passes it to the session's next datagram if its own is lost) or was lost
/// (pending again, for the next datagram). So a backend never sees the session's traffic
/// without the header first, and a lost first datagram does not hide the client's address.
#[derive(Debug)]
pub(super) struct ProxyState {
    header: ProxyHeader,
    /// `v2`: every datagram; `v2-first`: one, until it has left.
    every: bool,
    /// `v2-first`: no datagram carrying the header has left yet.
    pending: bool,
    /// `v2-first`: the upstream batch entry queued with the header, until the flush.
    queued: Option<u8>,
}

impl ProxyState {
    /// A path's header state under `mode` on listener `port`: the header built now, once,
    /// with the address the client sent to (`local`, from packet info) or else the
    /// listener's, as destination.
    pub(super) fn for_path(
        listeners: &Listeners,
        mode: ProxyMode,
        client: SocketAddr,
        port: usize,
        local: Option<IpAddr>,
    ) -> Option<Box<Self>> {
        if mode == ProxyMode::None {
            return None;
        }
        let proxy = listeners.proxy_address(port, local)?;
        let header = ProxyHeader::new(HeaderTransport::Dgram, client, proxy);
        Some(Box::new(Self {
            header,
            every: mode == ProxyMode::V2,
            pending: true,
            queued: None,
        }))
    }

    /// Its state as the hand-off carries it: a header queued but not yet flushed counts as
    /// not sent (the batch is flushed before a hand-off, so none is).
    pub(super) fn wire(&self) -> crate::handoff::wire::WireProxyState {
        crate::handoff::wire::WireProxyState {
            every: self.every,
            pending: self.pending,
        }
    }

    /// A handed-over session's header state: rebuilt for its path, with whether a `v2-first`
    /// header is still to be sent as it was in the previous process.
    pub(super) fn handed_over(
        listeners: &Listeners,
        wire: crate::handoff::wire::WireProxyState,
        client: SocketAddr,
        port: usize,
        local: Option<IpAddr>,
    ) -> Option<Box<Self>> {
        let mode = if wire.every {
            ProxyMode::V2
        } else {
            ProxyMode::V2First
        };
        let mut state = Self::for_path(listeners, mode, client, port, local)?;
        state.pending = wire.every || wire.pending;
        Some(state)
    }

    /// The header the datagram queued as `entry` of the upstream batch carries.
    #[inline]
    pub(super) fn take(&mut self, entry: usize) -> Header<'_> {
        if self.every {
            return Header::Every(&self.header);
        }
        if !self.pending || self.queued.is_some() {
            return Header::None;
        }
        self.queued = Some(entry as u8);
        Header::First(&self.header)
    }

    /// Bytes of header the next datagram would carry.
    #[inline]
    pub(super) fn next_len(&self) -> usize {
        if self.every || (self.pending && self.queued.is_none()) {
            self.header.as_bytes().len()
        } else {
            0
        }
    }

    /// The flush's word on the header queued as `entry`: it left, or it was `lost` and is
    /// pending again. A header queued before the session moved is not this one: ignored.
    pub(super) fn settle(&mut self, entry: usize, lost: bool) {
        if self.queued == Some(entry as u8) {
            self.queued = None;
            self.pending = lost;
        }
    }
}
