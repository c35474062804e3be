//! Batched datagram I/O: `recvmmsg`/`sendmmsg` on Linux, one `recvfrom`/`sendto` per datagram
//! elsewhere (or when batching is switched off, which is how the portable path is tested here).
//!
//! [`RecvBatch`] holds datagrams read from unconnected sockets, with their sources: a
//! listener's, or (replies) those of several upstream sockets in turn.
//! [`UpstreamBatch`] sends the client datagrams of one `RecvBatch` on to their backends through
//! the worker's shared upstream sockets, and [`ReplyBatch`] the replies held in one `RecvBatch`
//! (read from the upstream sockets) back to their clients through the listeners' sockets: one
//! `sendmmsg` per socket, straight out of the receive buffer. Nothing is held per socket, so a
//! worker's thousands of idle listeners cost it no buffer each. `Addrs` is the address
//! storage all three share.
//!
//! Every slot is [`SLOT_BYTES`] long so that no datagram (up to 65507 bytes of payload) is ever
//! truncated. The buffers are zero-filled allocations, so pages are touched only when used.

use std::cell::Cell;
use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use socket2::SockAddr;

use crate::io::pktinfo::{self, CtrlBuf, EMPTY_CTRL};
use crate::policy::proxy_protocol::ProxyHeader;

/// Datagrams moved per syscall.
pub(crate) const BATCH: usize = 32;
// An [`UpstreamBatch`] stores receive slots as `u8`.
const _: () = assert!(BATCH <= 256);
/// Room for the largest UDP datagram.
pub(crate) const SLOT_BYTES: usize = 65_536;

/// The most bytes a UDP datagram to `to` carries: 65,535 less the IPv4 and UDP headers
/// (65,507), or for IPv6 less the UDP header alone (65,527: an IPv6 payload length leaves out
/// the IPv6 header). An IPv4-mapped address is IPv4.
pub(crate) fn max_payload(to: IpAddr) -> usize {
    if to.to_canonical().is_ipv4() {
        65_507
    } else {
        65_527
    }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    unsafe { mem::zeroed() }
}

/// The socket addresses of up to [`BATCH`] datagrams in the kernel's form: where each came
/// from (a receive) or goes (a send).
struct Addrs {
    storage: [libc::sockaddr_storage; BATCH],
    lens: [libc::socklen_t; BATCH],
}

impl Addrs {
    fn new() -> Self {
        Self {
            storage: [zeroed_storage(); BATCH],
            lens: [0; BATCH],
        }
    }

    /// Copies `addr` into slot `i`.
    fn set(&mut self, i: usize, addr: &SockAddr) {
        // SAFETY: `addr.len()` bytes at `addr.as_ptr()` are a valid socket address, and
        // sockaddr_storage is large enough for any of them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                addr.as_ptr().cast::<u8>(),
                (&raw mut self.storage[i]).cast::<u8>(),
                addr.len() as usize,
            );
        }
        self.lens[i] = addr.len();
    }

    /// Slot `i` decoded (`None` for a family other than IPv4 and IPv6).
    fn get(&self, i: usize) -> Option<SocketAddr> {
        to_socket_addr(&self.storage[i], self.lens[i])
    }
}

/// Decodes a kernel-written socket address; `None` for families other than IPv4 and IPv6.
fn to_socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits in it and has
            // no stricter alignment.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Datagrams read from one unconnected socket, with their sources (and, when asked, the
/// address each was sent to).
pub(crate) struct RecvBatch {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: Addrs,
    ctrls: [CtrlBuf; BATCH],
    locals: [Option<IpAddr>; BATCH],
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; BATCH * SLOT_BYTES].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: Addrs::new(),
            ctrls: [EMPTY_CTRL; BATCH],
            locals: [None; BATCH],
            count: 0,
        }
    }

    /// Reads up to [`BATCH`] datagrams in place of those held; `Err(WouldBlock)` when none is
    /// waiting. A result below `BATCH` means the socket's queue was empty when the call
    /// returned. With `pktinfo` (a socket with [`crate::io::pktinfo::enable`]) each datagram's
    /// destination address is read too.
    #[cfg(test)]
    pub(crate) fn recv(&mut self, fd: RawFd, batch_io: bool, pktinfo: bool) -> io::Result<usize> {
        self.clear();
        self.recv_more(fd, batch_io, pktinfo)
    }

    /// [`Self::recv`] into the free slots, after the datagrams held (which stay, so replies
    /// read from many sockets can leave together): up to [`Self::room`] datagrams, fewer when
    /// the socket's queue was empty.
    pub(crate) fn recv_more(
        &mut self,
        fd: RawFd,
        batch_io: bool,
        pktinfo: bool,
    ) -> io::Result<usize> {
        let (from, room) = (self.count, self.room());
        if room == 0 {
            return Ok(0);
        }
        let slots = Slots {
            base: from,
            addrs: Some(&mut self.addrs),
            ctrl: pktinfo.then_some((&mut self.ctrls, &mut self.locals)),
        };
        let buf = &mut self.buf[from * SLOT_BYTES..];
        let lens = &mut self.lens[from..];
        let n = if batch_io {
            sys::recv_many(fd, buf, lens, slots, room)?
        } else {
            portable::recv_many(fd, buf, lens, slots, room)?
        };
        if !pktinfo {
            self.locals[from..from + n].fill(None);
        }
        self.count += n;
        Ok(n)
    }

    /// Datagrams held.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Free slots.
    #[inline]
    pub(crate) fn room(&self) -> usize {
        BATCH - self.count
    }

    /// Forgets the datagrams held.
    #[inline]
    pub(crate) fn clear(&mut self) {
        self.count = 0;
    }

    /// The address datagram `i` was sent to, when the receive asked for it.
    #[inline]
    pub(crate) fn local(&self, i: usize) -> Option<IpAddr> {
        self.locals[i]
    }

    /// Datagram `i` of the last `recv` and its source (None for an address family we do not
    /// proxy).
    #[inline]
    pub(crate) fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (self.data(i), self.addrs.get(i))
    }

    /// Datagram `i` of the last `recv`.
    #[inline]
    pub(crate) fn data(&self, i: usize) -> &[u8] {
        let start = i * SLOT_BYTES;
        &self.buf[start..start + self.lens[i]]
    }
}

/// One datagram to send, and where.
#[derive(Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    /// Sent in front of `data` in the same datagram (a PROXY protocol header), from its own
    /// buffer: a second iovec, not a copy of the payload.
    prefix: &'a [u8],
    data: &'a [u8],
    addr: &'a libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    /// Leave from this address (`IP_PKTINFO`), not the one the kernel would pick.
    src: Option<IpAddr>,
}

/// Calls `each(key, group)` once per distinct key among `keys`, `group` holding the indexes
/// of the entries with that key in order; groups come in the order of their first entries.
fn for_each_group(keys: &[u32], mut each: impl FnMut(u32, &[usize])) {
    let mut done = [false; BATCH];
    let mut group = [0usize; BATCH];
    for first in 0..keys.len() {
        if done[first] {
            continue;
        }
        let key = keys[first];
        let mut len = 0;
        for (i, taken) in done.iter_mut().enumerate().take(keys.len()).skip(first) {
            if !*taken && keys[i] == key {
                *taken = true;
                group[len] = i;
                len += 1;
            }
        }
        each(key, &group[..len]);
    }
}

/// Sends datagrams `0..count` (`msg(i)` is datagram `i`) in as few syscalls as the kernel takes
/// them. Returns how many were dropped: one the kernel refuses is skipped, and a full send
/// buffer drops the rest (UDP gives no delivery guarantee; holding them back would only delay
/// everything behind them).
fn send_all<'a>(
    fd: RawFd,
    count: usize,
    batch_io: bool,
    msg: impl Fn(usize) -> Outgoing<'a>,
) -> u64 {
    send_all_noting(fd, count, batch_io, msg, |_| {})
}

/// [`send_all`], telling `dropped(i)` of each datagram dropped.
fn send_all_noting<'a>(
    fd: RawFd,
    count: usize,
    batch_io: bool,
    msg: impl Fn(usize) -> Outgoing<'a>,
    mut on_drop: impl FnMut(usize),
) -> u64 {
    let mut dropped = 0;
    let mut sent = 0;
    while sent < count {
        // One datagram left: sendto(2) does less work in the kernel than a sendmmsg(2) of one,
        // and at one round trip in flight that is every send.
        let result = if batch_io && count - sent > 1 {
            sys::send_many(fd, sent, count, &msg)
        } else {
            portable::send_many(fd, sent, count, &msg)
        };
        match result {
            Ok(n) if n > 0 => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The kernel takes no more now (full send buffer, or a send of nothing).
            Ok(_) => {
                (sent..count).for_each(&mut on_drop);
                dropped += (count - sent) as u64;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                (sent..count).for_each(&mut on_drop);
                dropped += (count - sent) as u64;
                break;
            }
            Err(e) => {
                log::debug!("dropping a datagram: {e}");
                on_drop(sent);
                dropped += 1;
                sent += 1;
            }
        }
    }
    dropped
}

/// What an [`UpstreamBatch::flush`] did.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct SentUpstream {
    /// Datagrams the kernel took.
    pub(crate) packets: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// Datagrams dropped (refused, full send buffer, socket gone).
    pub(crate) dropped: u64,
}

/// The PROXY protocol header an upstream datagram carries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Header<'a> {
    /// None.
    None,
    /// `v2`: a header of its own, as every datagram of the session has.
    Every(&'a ProxyHeader),
    /// `v2-first`: the session's one header. If this datagram is lost, the header passes to
    /// the session's next datagram in the batch, so none of them leaves without it first.
    First(&'a ProxyHeader),
}

/// Client datagrams of one [`RecvBatch`] queued for their backends: each names the shared
/// upstream socket it leaves from (a session's) and its destination. [`Self::flush`] sends
/// them with one `sendmmsg` per socket, pointing at the receive buffer: nothing is copied.
///
/// A socket carries at most one session per destination, so within one socket's group the
/// datagrams to one destination are one session's, in the order they came.
pub(crate) struct UpstreamBatch {
    sockets: [u32; BATCH],
    slots: [u8; BATCH],
    /// PROXY protocol headers, copied from their sessions (a session may end before the
    /// flush); empty for datagrams without one.
    headers: [ProxyHeader; BATCH],
    /// Entries whose header is a `v2-first` one ([`Header::First`]).
    first: [bool; BATCH],
    /// After a flush: whether the `v2-first` header queued with entry `i` was lost, with every
    /// datagram it passed to.
    header_lost: [bool; BATCH],
    addrs: Addrs,
    count: usize,
}

impl std::fmt::Debug for UpstreamBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl UpstreamBatch {
    pub(crate) fn new() -> Self {
        Self {
            sockets: [0; BATCH],
            slots: [0; BATCH],
            headers: [ProxyHeader::EMPTY; BATCH],
            first: [false; BATCH],
            header_lost: [false; BATCH],
            addrs: Addrs::new(),
            count: 0,
        }
    }

    /// The entry the next [`Self::push`] fills.
    pub(crate) fn next_entry(&self) -> usize {
        self.count
    }

    /// Queues datagram `slot` of the current receive batch, to go out of upstream socket
    /// `socket` to `dest`, behind `header`. At most one entry per receive slot, so it never
    /// overflows.
    pub(crate) fn push(&mut self, socket: u32, slot: usize, dest: &SockAddr, header: Header<'_>) {
        let i = self.count;
        debug_assert!(i < BATCH && slot < BATCH);
        self.sockets[i] = socket;
        self.slots[i] = slot as u8;
        (self.headers[i], self.first[i]) = match header {
            Header::None => (ProxyHeader::EMPTY, false),
            Header::Every(h) => (*h, false),
            Header::First(h) => (*h, true),
        };
        self.addrs.set(i, dest);
        self.count += 1;
    }

    /// After a [`Self::flush`]: whether the `v2-first` header queued with `entry` never left
    /// (its datagram was lost, and so was every later one of the session it passed to).
    pub(crate) fn header_lost(&self, entry: usize) -> bool {
        self.header_lost[entry]
    }

    /// Sends what is queued, grouped by socket (`fd_of` turns a socket number into its fd;
    /// `None`: gone, its datagrams dropped). A `v2-first` header whose datagram is lost
    /// passes to the session's next datagram of the batch; [`Self::header_lost`] tells which
    /// were lost for good.
    pub(crate) fn flush(
        &mut self,
        rx: &RecvBatch,
        batch_io: bool,
        fd_of: impl Fn(u32) -> Option<RawFd>,
    ) -> SentUpstream {
        let count = std::mem::take(&mut self.count);
        let mut result = SentUpstream::default();
        // Which entry's header goes in front of each entry: its own, or a `v2-first` one
        // passed on from a lost entry (at most one per session, so one place each).
        let carrier: [Cell<u8>; BATCH] = std::array::from_fn(|i| Cell::new(i as u8));
        let passing: [Cell<bool>; BATCH] = std::array::from_fn(|i| Cell::new(self.first[i]));
        let lost: [Cell<bool>; BATCH] = Default::default();
        for_each_group(&self.sockets[..count], |socket, group| {
            let len = group.len();
            let Some(fd) = fd_of(socket) else {
                for k in 0..len {
                    self.pass_on(group, k, &carrier, &passing, &lost);
                }
                result.dropped += len as u64;
                return;
            };
            let size = |k: usize| rx.data(usize::from(self.slots[group[k]])).len() as u64;
            let mut lost_bytes = 0;
            let dropped = send_all_noting(
                fd,
                len,
                batch_io,
                |k| {
                    let i = group[k];
                    Outgoing {
                        prefix: self.headers[usize::from(carrier[i].get())].as_bytes(),
                        data: rx.data(usize::from(self.slots[i])),
                        addr: &self.addrs.storage[i],
                        addr_len: self.addrs.lens[i],
                        src: None,
                    }
                },
                |k| {
                    lost_bytes += size(k);
                    // Before the next send builds the datagrams after this one.
                    self.pass_on(group, k, &carrier, &passing, &lost);
                },
            );
            result.dropped += dropped;
            result.packets += len as u64 - dropped;
            result.bytes += (0..len).map(size).sum::<u64>() - lost_bytes;
        });
        self.header_lost = lost.map(Cell::into_inner);
        result
    }

    /// Datagram `group[k]` (of one socket's `group`) was lost: a `v2-first` header it carried
    /// passes to the session's next datagram in the group, unless that one has a header of its
    /// own (or there is none), in which case it is lost.
    fn pass_on(
        &self,
        group: &[usize],
        k: usize,
        carrier: &[Cell<u8>; BATCH],
        passing: &[Cell<bool>; BATCH],
        lost: &[Cell<bool>; BATCH],
    ) {
        let i = group[k];
        if !passing[i].replace(false) {
            return;
        }
        let dest = |j: usize| self.addrs.get(j);
        let next = group[k + 1..].iter().copied().find(|&j| dest(j) == dest(i));
        let origin = carrier[i].get();
        match next {
            Some(j) if self.headers[j].as_bytes().is_empty() => {
                carrier[j].set(origin);
                passing[j].set(true);
            }
            _ => lost[usize::from(origin)].set(true),
        }
    }
}

/// Replies held in one [`RecvBatch`] (read from the shared upstream sockets) queued for their
/// clients: each names the listener socket it leaves from, its client and, for a wildcard
/// listener, the address it leaves from. [`Self::flush`] sends them with one `sendmmsg` per listener
/// socket, pointing at the receive buffer: nothing is copied, and no listener holds a queue.
pub(crate) struct ReplyBatch {
    listeners: [u32; BATCH],
    slots: [u8; BATCH],
    /// The source address each reply must leave from (`IP_PKTINFO`), if any.
    srcs: [Option<IpAddr>; BATCH],
    addrs: Addrs,
    count: usize,
}

impl std::fmt::Debug for ReplyBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl ReplyBatch {
    pub(crate) fn new() -> Self {
        Self {
            listeners: [0; BATCH],
            slots: [0; BATCH],
            srcs: [None; BATCH],
            addrs: Addrs::new(),
            count: 0,
        }
    }

    /// Queues datagram `slot` of the current receive batch to leave listener `listener`'s
    /// socket for `dest`, from `src` when given. At most one entry per receive slot, so it
    /// never overflows.
    pub(crate) fn push(
        &mut self,
        listener: u32,
        slot: usize,
        dest: &SockAddr,
        src: Option<IpAddr>,
    ) {
        let i = self.count;
        debug_assert!(i < BATCH && slot < BATCH);
        self.listeners[i] = listener;
        self.slots[i] = slot as u8;
        self.srcs[i] = src;
        self.addrs.set(i, dest);
        self.count += 1;
    }

    /// Sends what is queued, grouped by listener (`fd_of` turns a listener number into its
    /// socket; `None`: gone, its replies dropped). A reply the kernel refuses (full send
    /// buffer, unreachable client) is dropped: UDP gives no delivery guarantee, and holding
    /// replies back would delay every other session on the socket. `dropped(listener, n)`
    /// hears of each listener's drops; returns them all.
    pub(crate) fn flush(
        &mut self,
        rx: &RecvBatch,
        batch_io: bool,
        fd_of: impl Fn(u32) -> Option<RawFd>,
        mut dropped: impl FnMut(u32, u64),
    ) -> u64 {
        let count = std::mem::take(&mut self.count);
        let mut all = 0;
        for_each_group(&self.listeners[..count], |listener, group| {
            let lost = match fd_of(listener) {
                Some(fd) => send_all(fd, group.len(), batch_io, |k| {
                    let i = group[k];
                    Outgoing {
                        prefix: &[],
                        data: rx.data(usize::from(self.slots[i])),
                        addr: &self.addrs.storage[i],
                        addr_len: self.addrs.lens[i],
                        src: self.srcs[i],
                    }
                }),
                None => group.len() as u64,
            };
            if lost > 0 {
                dropped(listener, lost);
                all += lost;
            }
        });
        all
    }
}

/// Builds the `msghdr` for slot `i` of `buf`, pointing at `iov` and an optional address.
fn msghdr_for(iov: &mut libc::iovec, name: *mut libc::c_void, namelen: u32) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero is "no name, no iov, no control".
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = name;
    hdr.msg_namelen = namelen;
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    hdr
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// The `msghdr` of one outgoing datagram: its prefix (if any) and data as one or two iovecs
/// in `iov`, its destination, and its source address (if any) as a control message in `ctrl`.
fn outgoing_msghdr(
    m: &Outgoing<'_>,
    iov: &mut [libc::iovec; 2],
    ctrl: &mut MaybeUninit<CtrlBuf>,
) -> libc::msghdr {
    // The kernel only reads through these pointers for a send.
    let data = libc::iovec {
        iov_base: m.data.as_ptr().cast_mut().cast(),
        iov_len: m.data.len(),
    };
    let n = if m.prefix.is_empty() {
        iov[0] = data;
        1
    } else {
        iov[0] = libc::iovec {
            iov_base: m.prefix.as_ptr().cast_mut().cast(),
            iov_len: m.prefix.len(),
        };
        iov[1] = data;
        2
    };
    let mut hdr = msghdr_for(
        &mut iov[0],
        std::ptr::from_ref(m.addr).cast_mut().cast(),
        m.addr_len,
    );
    hdr.msg_iovlen = n;
    if let Some(src) = m.src {
        // Written only for a datagram that carries one: most sends touch no control buffer.
        pktinfo::write(&mut hdr, ctrl.write(EMPTY_CTRL), src);
    }
    hdr
}

/// Where a receive writes what besides the data: source addresses, and with packet info on,
/// control buffers and the destination addresses read from them.
struct Slots<'a> {
    /// The batch slot the receive's first datagram goes to.
    base: usize,
    addrs: Option<&'a mut Addrs>,
    ctrl: Option<(&'a mut [CtrlBuf; BATCH], &'a mut [Option<IpAddr>; BATCH])>,
}

impl Slots<'_> {
    /// The `msghdr` of the receive's datagram `i` into `iov`.
    fn msghdr(&mut self, i: usize, iov: &mut libc::iovec) -> libc::msghdr {
        let i = self.base + i;
        let (name, namelen) = match self.addrs.as_mut() {
            Some(a) => (
                (&raw mut a.storage[i]).cast(),
                mem::size_of::<libc::sockaddr_storage>() as u32,
            ),
            None => (std::ptr::null_mut(), 0),
        };
        let mut hdr = msghdr_for(iov, name, namelen);
        if let Some((ctrls, _)) = self.ctrl.as_mut() {
            hdr.msg_control = ctrls[i].as_mut_ptr().cast();
            hdr.msg_controllen = mem::size_of::<CtrlBuf>() as _;
        }
        hdr
    }

    /// Records what the kernel wrote for the receive's datagram `i`.
    fn received(&mut self, i: usize, hdr: &libc::msghdr) {
        let i = self.base + i;
        if let Some(a) = self.addrs.as_mut() {
            a.lens[i] = hdr.msg_namelen;
        }
        if let Some((_, locals)) = self.ctrl.as_mut() {
            locals[i] = pktinfo::read(hdr);
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::*;

    /// `recvmmsg(2)` of up to `max` datagrams into consecutive slots of `buf`.
    pub(super) fn recv_many(
        fd: RawFd,
        buf: &mut [u8],
        lens: &mut [usize],
        mut slots: Slots<'_>,
        max: usize,
    ) -> io::Result<usize> {
        let max = max.min(BATCH).min(buf.len() / SLOT_BYTES);
        let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        let mut hdrs: [MaybeUninit<libc::mmsghdr>; BATCH] = [MaybeUninit::uninit(); BATCH];
        for i in 0..max {
            let slot = &mut buf[i * SLOT_BYTES..(i + 1) * SLOT_BYTES];
            let iov = iovs[i].write(libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            });
            hdrs[i].write(libc::mmsghdr {
                msg_hdr: slots.msghdr(i, iov),
                msg_len: 0,
            });
        }
        // SAFETY: the first `max` headers are initialised and point at live, exclusively borrowed
        // buffers (`buf`, the address and control slots) that outlive the call; the kernel
        // writes at most `iov_len` bytes per slot, `msg_namelen` bytes of address and
        // `msg_controllen` bytes of control messages.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr().cast(),
                max as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            // SAFETY: the kernel filled in the first `n` headers.
            let hdr = unsafe { hdrs[i].assume_init_ref() };
            lens[i] = hdr.msg_len as usize;
            slots.received(i, &hdr.msg_hdr);
        }
        Ok(n)
    }

    /// `sendmmsg(2)` of datagrams `from..to` (`msg(i)` is datagram `i`); returns how many the
    /// kernel took.
    pub(super) fn send_many<'a>(
        fd: RawFd,
        from: usize,
        to: usize,
        msg: &impl Fn(usize) -> Outgoing<'a>,
    ) -> io::Result<usize> {
        let mut iovs: [[libc::iovec; 2]; BATCH] = [[EMPTY_IOV; 2]; BATCH];
        let mut ctrls = [const { MaybeUninit::<CtrlBuf>::uninit() }; BATCH];
        let mut hdrs: [MaybeUninit<libc::mmsghdr>; BATCH] = [MaybeUninit::uninit(); BATCH];
        let count = (to - from).min(BATCH);
        for j in 0..count {
            let m = msg(from + j);
            hdrs[j].write(libc::mmsghdr {
                msg_hdr: outgoing_msghdr(&m, &mut iovs[j], &mut ctrls[j]),
                msg_len: 0,
            });
        }
        // SAFETY: the first `count` headers are initialised and point at buffers and addresses
        // that are borrowed for the call and only read by the kernel.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr().cast(), count as libc::c_uint, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(not(target_os = "linux"))]
use portable as sys;

/// One syscall per datagram; works on every Unix.
mod portable {
    use super::*;

    pub(super) fn recv_many(
        fd: RawFd,
        buf: &mut [u8],
        lens: &mut [usize],
        mut slots: Slots<'_>,
        max: usize,
    ) -> io::Result<usize> {
        let max = max.min(BATCH).min(buf.len() / SLOT_BYTES);
        let mut n = 0;
        while n < max {
            let slot = &mut buf[n * SLOT_BYTES..(n + 1) * SLOT_BYTES];
            let mut iov = libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            };
            let mut hdr = slots.msghdr(n, &mut iov);
            // SAFETY: `hdr` points at `iov` (an exclusively borrowed slot of SLOT_BYTES) and at
            // the address and control slots, all live for the call.
            let r = unsafe { libc::recvmsg(fd, &raw mut hdr, libc::MSG_DONTWAIT) };
            if r < 0 {
                let err = io::Error::last_os_error();
                if n > 0 && err.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(err);
            }
            lens[n] = r as usize;
            slots.received(n, &hdr);
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn send_many<'a>(
        fd: RawFd,
        from: usize,
        to: usize,
        msg: &impl Fn(usize) -> Outgoing<'a>,
    ) -> io::Result<usize> {
        for i in from..to {
            let m = msg(i);
            let r = if m.prefix.is_empty() && m.src.is_none() {
                // SAFETY: `m.data` is initialised and `m.addr` holds a socket address of
                // `m.addr_len` bytes; both are only read.
                unsafe {
                    libc::sendto(
                        fd,
                        m.data.as_ptr().cast(),
                        m.data.len(),
                        0,
                        std::ptr::from_ref(m.addr).cast(),
                        m.addr_len,
                    )
                }
            } else {
                let mut iov = [EMPTY_IOV; 2];
                let mut ctrl = MaybeUninit::uninit();
                let hdr = outgoing_msghdr(&m, &mut iov, &mut ctrl);
                // SAFETY: `hdr` points at `iov` (live for the call) and at `m`'s buffers and
                // address, which the kernel only reads.
                unsafe { libc::sendmsg(fd, &raw const hdr, 0) }
            };
            if r < 0 {
                let err = io::Error::last_os_error();
                return if i == from { Err(err) } else { Ok(i - from) };
            }
        }
        Ok(to - from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn round_trip(batch_io: bool) {
        let (a, b) = pair();
        let sizes = [1usize, 64, 1400, 9000, 65507];
        for (i, &size) in sizes.iter().enumerate() {
            b.send_to(&vec![i as u8; size], a.local_addr().unwrap())
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(
            rx.recv(a.as_raw_fd(), batch_io, false).unwrap(),
            sizes.len()
        );
        for (i, &size) in sizes.iter().enumerate() {
            let (data, from) = rx.get(i);
            assert_eq!(data.len(), size);
            assert!(data.iter().all(|&x| x == i as u8));
            assert_eq!(from, Some(b.local_addr().unwrap()));
        }
        assert_eq!(
            rx.recv(a.as_raw_fd(), batch_io, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // Replies: the datagrams of the receive batch out of two listener sockets (a and d)
        // to c, grouped by socket, straight from the receive buffer; one for a listener that
        // is gone is dropped and told.
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        let d = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut tx = ReplyBatch::new();
        let dest = SockAddr::from(c.local_addr().unwrap());
        for slot in 0..sizes.len() {
            tx.push(if slot % 2 == 0 { 1 } else { 2 }, slot, &dest, None);
        }
        tx.push(9, 0, &dest, None);
        let listeners = |n: u32| match n {
            1 => Some(a.as_raw_fd()),
            2 => Some(d.as_raw_fd()),
            _ => None,
        };
        let mut told = Vec::new();
        let dropped = tx.flush(&rx, batch_io, listeners, |l, n| told.push((l, n)));
        assert_eq!((dropped, told), (1, vec![(9, 1)]));
        let mut buf = vec![0; 70000];
        for (slot, from) in [(0, &a), (2, &a), (4, &a), (1, &d), (3, &d)] {
            let (len, src) = c.recv_from(&mut buf).unwrap();
            assert_eq!(src, from.local_addr().unwrap(), "slot {slot}");
            assert_eq!(&buf[..len], rx.data(slot), "slot {slot}");
        }
        c.set_nonblocking(true).unwrap();
        assert_eq!(
            c.recv_from(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(tx.flush(&rx, batch_io, listeners, |_, _| {}), 0, "emptied");

        // Upstream: datagrams of one receive batch out of two sockets to two peers, grouped
        // by socket, straight from the receive buffer.
        let (u1, u2) = pair();
        let (p1, p2) = pair();
        for i in 0..6u8 {
            b.send_to(&[i; 100], a.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rx.recv(a.as_raw_fd(), batch_io, false).unwrap(), 6);
        let mut up = UpstreamBatch::new();
        let to1 = SockAddr::from(p1.local_addr().unwrap());
        let to2 = SockAddr::from(p2.local_addr().unwrap());
        // Datagrams to p2 carry a PROXY header, sent from its own buffer in front.
        let header = ProxyHeader::new(
            crate::policy::proxy_protocol::HeaderTransport::Dgram,
            "192.0.2.1:1000".parse().unwrap(),
            "192.0.2.2:7777".parse().unwrap(),
        );
        for slot in 0..6 {
            // Even slots leave from u1 to p1, odd ones from u2 to p2, interleaved.
            let (socket, dest, h) = if slot % 2 == 0 {
                (1, &to1, Header::None)
            } else {
                (2, &to2, Header::Every(&header))
            };
            up.push(socket, slot, dest, h);
        }
        let fds = |n: u32| match n {
            1 => Some(u1.as_raw_fd()),
            2 => Some(u2.as_raw_fd()),
            _ => None,
        };
        let sent = up.flush(&rx, batch_io, fds);
        assert_eq!(
            (sent.packets, sent.bytes, sent.dropped),
            (6, 600, 0),
            "payload bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        for (peer, from, first, prefix) in
            [(&p1, &u1, 0u8, &[][..]), (&p2, &u2, 1, header.as_bytes())]
        {
            for k in 0..3u8 {
                let (len, src) = peer.recv_from(&mut buf).unwrap();
                assert_eq!(src, from.local_addr().unwrap());
                assert_eq!(&buf[..prefix.len()], prefix);
                assert_eq!(&buf[prefix.len()..len], &[first + 2 * k; 100], "in order");
            }
        }
        // A socket that is gone drops its datagrams and counts them.
        up.push(9, 0, &to1, Header::None);
        assert_eq!(up.flush(&rx, batch_io, fds).dropped, 1);
        // One datagram the kernel refuses (an IPv6 destination on an IPv4 socket) in the
        // middle of a group is dropped alone; the rest leave.
        let v6 = SockAddr::from("[::1]:9".parse::<SocketAddr>().unwrap());
        for slot in 0..6 {
            up.push(1, slot, if slot == 2 { &v6 } else { &to1 }, Header::None);
        }
        let sent = up.flush(&rx, batch_io, fds);
        assert_eq!((sent.packets, sent.bytes, sent.dropped), (5, 500, 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        for slot in [0u8, 1, 3, 4, 5] {
            let (len, _) = p1.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], &[slot; 100]);
        }
    }

    #[test]
    fn batched_round_trip() {
        round_trip(true);
    }

    #[test]
    fn portable_round_trip() {
        round_trip(false);
    }

    /// A wildcard socket with packet info: each datagram's destination is read, and a reply
    /// given a source leaves from it, batched or not.
    fn pktinfo_round_trip(batch_io: bool) {
        let a = UdpSocket::bind("0.0.0.0:0").unwrap();
        a.set_nonblocking(true).unwrap();
        crate::io::pktinfo::enable(a.as_raw_fd(), false).unwrap();
        let port = a.local_addr().unwrap().port();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        for dst in ["127.0.0.1", "127.0.0.2"] {
            c.send_to(dst.as_bytes(), (dst, port)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(rx.recv(a.as_raw_fd(), batch_io, true).unwrap(), 2);
        let mut tx = ReplyBatch::new();
        let dest = SockAddr::from(c.local_addr().unwrap());
        for i in 0..2 {
            let local = rx.local(i).expect("a destination address");
            assert_eq!(local.to_string().as_bytes(), rx.data(i));
            tx.push(1, i, &dest, Some(local));
        }
        // Two replies so the batched path takes sendmmsg, not sendto.
        let fd = |_| Some(a.as_raw_fd());
        assert_eq!(tx.flush(&rx, batch_io, fd, |_, _| panic!("dropped")), 0);
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(
                from.ip().to_string().as_bytes(),
                &buf[..n],
                "left from its address"
            );
            assert_eq!(from.port(), port);
        }
    }

    #[test]
    fn batched_pktinfo_round_trip() {
        pktinfo_round_trip(true);
    }

    #[test]
    fn portable_pktinfo_round_trip() {
        pktinfo_round_trip(false);
    }

    /// A `v2-first` header whose datagram the kernel refuses (too big with the header on)
    /// goes in front of the session's next datagram of the batch; one with no datagram left to
    /// pass to, or whose socket is gone, is reported lost.
    fn first_headers_pass_on(batch_io: bool) {
        let (a, b) = pair();
        let (u1, u2) = pair();
        let (p1, p2) = pair();
        b.send_to(&[0; 65507], a.local_addr().unwrap()).unwrap();
        b.send_to(&[1; 100], a.local_addr().unwrap()).unwrap();
        b.send_to(&[2; 100], a.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(rx.recv(a.as_raw_fd(), batch_io, false).unwrap(), 3);
        let header = |client_port: u16| {
            ProxyHeader::new(
                crate::policy::proxy_protocol::HeaderTransport::Dgram,
                SocketAddr::from(([192, 0, 2, 1], client_port)),
                "192.0.2.2:7777".parse().unwrap(),
            )
        };
        let [hx, hy, hz, hw, hv, hv2] = [1, 2, 3, 4, 5, 6].map(header);
        let to1 = SockAddr::from(p1.local_addr().unwrap());
        let to2 = SockAddr::from(p2.local_addr().unwrap());
        let mut up = UpstreamBatch::new();
        // (socket, receive slot, destination, header): slot 0 is too big for any header.
        let entries = [
            (1, 0, &to1, Header::First(&hx)),  // refused: hx passes to entry 1
            (1, 1, &to1, Header::None),        // leaves with hx
            (1, 2, &to1, Header::None),        // leaves bare
            (1, 0, &to2, Header::First(&hy)),  // refused, nothing after it: lost
            (2, 1, &to1, Header::First(&hz)),  // leaves with hz
            (9, 2, &to1, Header::First(&hw)),  // socket gone: lost
            (2, 0, &to2, Header::First(&hv)),  // refused; the next has its own header: lost
            (2, 2, &to2, Header::First(&hv2)), // leaves with hv2
        ];
        for (e, (socket, slot, dest, h)) in entries.into_iter().enumerate() {
            assert_eq!(up.next_entry(), e);
            up.push(socket, slot, dest, h);
        }
        let fds = |n: u32| match n {
            1 => Some(u1.as_raw_fd()),
            2 => Some(u2.as_raw_fd()),
            _ => None,
        };
        let sent = up.flush(&rx, batch_io, fds);
        assert_eq!((sent.packets, sent.dropped), (4, 4));
        let lost: Vec<bool> = (0..entries.len()).map(|e| up.header_lost(e)).collect();
        assert_eq!(lost, [false, false, false, true, false, true, true, false]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = vec![0; 70000];
        for (peer, from, prefix, data) in [
            (&p1, &u1, hx.as_bytes(), [1u8; 100]),
            (&p1, &u1, &[][..], [2; 100]),
            (&p1, &u2, hz.as_bytes(), [1; 100]),
            (&p2, &u2, hv2.as_bytes(), [2; 100]),
        ] {
            let (len, src) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(src, from.local_addr().unwrap());
            assert_eq!(&buf[..prefix.len()], prefix);
            assert_eq!(&buf[prefix.len()..len], &data[..]);
        }
        for peer in [&p1, &p2] {
            assert_eq!(
                peer.recv_from(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
    }

    #[test]
    fn batched_first_headers_pass_on() {
        first_headers_pass_on(true);
    }

    #[test]
    fn portable_first_headers_pass_on() {
        first_headers_pass_on(false);
    }

    /// Reads from two sockets into one batch: the first read's datagrams stay, the second
    /// fills only the free slots, and a full batch reads nothing.
    fn receives_gather_until_full(batch_io: bool) {
        let (a, b) = pair();
        let (c, _) = pair();
        for i in 0..3u8 {
            b.send_to(&[i], a.local_addr().unwrap()).unwrap();
        }
        for i in 0..BATCH as u8 {
            b.send_to(&[100 + i], c.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(rx.recv_more(a.as_raw_fd(), batch_io, false).unwrap(), 3);
        assert_eq!((rx.len(), rx.room()), (3, BATCH - 3));
        assert_eq!(
            rx.recv_more(c.as_raw_fd(), batch_io, false).unwrap(),
            BATCH - 3
        );
        assert_eq!(rx.room(), 0);
        let got: Vec<u8> = (0..BATCH).map(|i| rx.data(i)[0]).collect();
        let want: Vec<u8> = (0..3).chain(100..100 + BATCH as u8 - 3).collect();
        assert_eq!(got, want);
        assert_eq!(rx.get(BATCH - 1).1, Some(b.local_addr().unwrap()));
        assert_eq!(rx.recv_more(c.as_raw_fd(), batch_io, false).unwrap(), 0);
        rx.clear();
        assert_eq!(rx.recv_more(c.as_raw_fd(), batch_io, false).unwrap(), 3);
        assert_eq!(rx.data(0), &[100 + BATCH as u8 - 3]);
    }

    #[test]
    fn batched_receives_gather_until_full() {
        receives_gather_until_full(true);
    }

    #[test]
    fn portable_receives_gather_until_full() {
        receives_gather_until_full(false);
    }

    #[test]
    fn batch_is_bounded() {
        let (a, b) = pair();
        for i in 0..BATCH + 5 {
            b.send_to(&[i as u8], a.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(rx.recv(a.as_raw_fd(), true, false).unwrap(), BATCH);
        assert_eq!(rx.recv(a.as_raw_fd(), true, false).unwrap(), 5);
    }
}
