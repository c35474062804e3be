//! Batched datagram I/O: `recvmmsg`/`sendmmsg` on Linux, one `recvfrom`/`sendto` per datagram
//! elsewhere (or when batching is switched off, which is how the portable path is tested here).
//!
//! [`RecvBatch`] holds datagrams read from a data-port socket. [`SendQueue`] holds replies bound
//! for clients through one data-port socket; replies are received from a session's upstream socket
//! straight into the queue's free slots, so the reply path copies nothing in user space.
//!
//! Every slot is [`SLOT_BYTES`] long so that no datagram (up to 65507 bytes of payload) is ever
//! truncated. The buffers are zero-filled allocations, so pages are touched only when used.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Datagrams moved per syscall.
pub(crate) const BATCH: usize = 32;
/// Room for the largest UDP datagram.
pub(crate) const SLOT_BYTES: usize = 65_536;

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    unsafe { mem::zeroed() }
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

/// Datagrams read from one unconnected socket, with their sources.
pub(crate) struct RecvBatch {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
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
            addrs: [zeroed_storage(); BATCH],
            addr_lens: [0; BATCH],
            count: 0,
        }
    }

    /// Reads up to [`BATCH`] datagrams; `Err(WouldBlock)` when none is waiting. A result below
    /// `BATCH` means the socket's queue was empty when the call returned.
    pub(crate) fn recv(&mut self, fd: RawFd, batch_io: bool) -> io::Result<usize> {
        self.count = 0;
        let n = if batch_io {
            sys::recv_many(
                fd,
                &mut self.buf,
                &mut self.lens,
                Some((&mut self.addrs, &mut self.addr_lens)),
                BATCH,
            )?
        } else {
            portable::recv_many(
                fd,
                &mut self.buf,
                &mut self.lens,
                Some((&mut self.addrs, &mut self.addr_lens)),
                BATCH,
            )?
        };
        self.count = n;
        Ok(n)
    }

    /// Datagram `i` of the last `recv` and its source (None for an address family we do not
    /// proxy).
    #[inline]
    pub(crate) fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let start = i * SLOT_BYTES;
        let data = &self.buf[start..start + self.lens[i]];
        (data, to_socket_addr(&self.addrs[i], self.addr_lens[i]))
    }
}

/// Replies waiting to go out through one data-port socket.
pub(crate) struct SendQueue {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    count: usize,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("count", &self.count)
            .finish()
    }
}

/// What a flush did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Flushed {
    pub(crate) dropped: u64,
}

impl SendQueue {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; BATCH * SLOT_BYTES].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: [zeroed_storage(); BATCH],
            addr_lens: [0; BATCH],
            count: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_full(&self) -> bool {
        self.count == BATCH
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reads datagrams from a connected socket into the free slots, each addressed to `dest`.
    /// Returns how many and their total bytes; `Err(WouldBlock)` when none is waiting.
    pub(crate) fn recv_from_connected(
        &mut self,
        fd: RawFd,
        dest: &SockAddr,
        batch_io: bool,
    ) -> io::Result<(usize, usize)> {
        let start = self.count;
        let free = BATCH - start;
        let buf = &mut self.buf[start * SLOT_BYTES..];
        let lens = &mut self.lens[start..];
        let n = if batch_io {
            sys::recv_many(fd, buf, lens, None, free)?
        } else {
            portable::recv_many(fd, buf, lens, None, free)?
        };
        let mut bytes = 0;
        for i in start..start + n {
            bytes += self.lens[i];
            // SAFETY: `dest.len()` bytes at `dest.as_ptr()` are a valid socket address, and
            // sockaddr_storage is large enough for any of them.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    dest.as_ptr().cast::<u8>(),
                    (&raw mut self.addrs[i]).cast::<u8>(),
                    dest.len() as usize,
                );
            }
            self.addr_lens[i] = dest.len();
        }
        self.count += n;
        Ok((n, bytes))
    }

    /// Sends everything queued. A datagram the kernel refuses (full send buffer, unreachable
    /// client) is dropped and counted: UDP gives no delivery guarantee, and holding replies back
    /// would delay every other session on this socket.
    pub(crate) fn flush(&mut self, fd: RawFd, batch_io: bool) -> Flushed {
        let mut flushed = Flushed::default();
        let mut sent = 0;
        while sent < self.count {
            let result = if batch_io {
                sys::send_many(
                    fd,
                    &self.buf,
                    &self.lens,
                    &self.addrs,
                    &self.addr_lens,
                    sent,
                    self.count,
                )
            } else {
                portable::send_many(
                    fd,
                    &self.buf,
                    &self.lens,
                    &self.addrs,
                    &self.addr_lens,
                    sent,
                    self.count,
                )
            };
            match result {
                Ok(n) if n > 0 => sent += n,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    flushed.dropped += (self.count - sent) as u64;
                    break;
                }
                Err(e) => {
                    log::debug!("dropping a reply: {e}");
                    flushed.dropped += 1;
                    sent += 1;
                }
            }
        }
        self.count = 0;
        flushed
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

type AddrSlots<'a> = Option<(
    &'a mut [libc::sockaddr_storage; BATCH],
    &'a mut [libc::socklen_t; BATCH],
)>;

#[cfg(target_os = "linux")]
mod sys {
    use super::*;

    /// `recvmmsg(2)` of up to `max` datagrams into consecutive slots of `buf`.
    pub(super) fn recv_many(
        fd: RawFd,
        buf: &mut [u8],
        lens: &mut [usize],
        mut addrs: AddrSlots<'_>,
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
            let (name, namelen) = match addrs.as_mut() {
                Some((a, _)) => (
                    (&raw mut a[i]).cast(),
                    mem::size_of::<libc::sockaddr_storage>() as u32,
                ),
                None => (std::ptr::null_mut(), 0),
            };
            hdrs[i].write(libc::mmsghdr {
                msg_hdr: msghdr_for(iov, name, namelen),
                msg_len: 0,
            });
        }
        // SAFETY: the first `max` headers are initialised and point at live, exclusively borrowed
        // buffers (`buf`, `addrs`) that outlive the call; the kernel writes at most `iov_len` bytes
        // per slot and at most `msg_namelen` bytes of address.
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
            if let Some((_, l)) = addrs.as_mut() {
                l[i] = hdr.msg_hdr.msg_namelen;
            }
        }
        Ok(n)
    }

    /// `sendmmsg(2)` of slots `from..to`; returns how many the kernel took.
    pub(super) fn send_many(
        fd: RawFd,
        buf: &[u8],
        lens: &[usize],
        addrs: &[libc::sockaddr_storage; BATCH],
        addr_lens: &[libc::socklen_t; BATCH],
        from: usize,
        to: usize,
    ) -> io::Result<usize> {
        let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        let mut hdrs: [MaybeUninit<libc::mmsghdr>; BATCH] = [MaybeUninit::uninit(); BATCH];
        let count = to - from;
        for (j, i) in (from..to).enumerate() {
            let iov = iovs[j].write(libc::iovec {
                // The kernel only reads through this pointer for a send.
                iov_base: buf[i * SLOT_BYTES..].as_ptr().cast_mut().cast(),
                iov_len: lens[i],
            });
            hdrs[j].write(libc::mmsghdr {
                msg_hdr: msghdr_for(iov, (&raw const addrs[i]).cast_mut().cast(), addr_lens[i]),
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
        mut addrs: AddrSlots<'_>,
        max: usize,
    ) -> io::Result<usize> {
        let max = max.min(BATCH).min(buf.len() / SLOT_BYTES);
        let mut n = 0;
        while n < max {
            let slot = &mut buf[n * SLOT_BYTES..(n + 1) * SLOT_BYTES];
            let (name, mut namelen) = match addrs.as_mut() {
                Some((a, _)) => (
                    (&raw mut a[n]).cast::<libc::sockaddr>(),
                    mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
                ),
                None => (std::ptr::null_mut(), 0),
            };
            // SAFETY: `slot` is an exclusively borrowed buffer of SLOT_BYTES, and `name` is null
            // or points at a sockaddr_storage of `namelen` bytes.
            let r = unsafe {
                libc::recvfrom(
                    fd,
                    slot.as_mut_ptr().cast(),
                    SLOT_BYTES,
                    0,
                    name,
                    &raw mut namelen,
                )
            };
            if r < 0 {
                let err = io::Error::last_os_error();
                if n > 0 && err.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(err);
            }
            lens[n] = r as usize;
            if let Some((_, l)) = addrs.as_mut() {
                l[n] = namelen;
            }
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn send_many(
        fd: RawFd,
        buf: &[u8],
        lens: &[usize],
        addrs: &[libc::sockaddr_storage; BATCH],
        addr_lens: &[libc::socklen_t; BATCH],
        from: usize,
        to: usize,
    ) -> io::Result<usize> {
        for i in from..to {
            // SAFETY: the slot holds `lens[i]` initialised bytes and `addrs[i]` a socket address
            // of `addr_lens[i]` bytes; both are only read.
            let r = unsafe {
                libc::sendto(
                    fd,
                    buf[i * SLOT_BYTES..].as_ptr().cast(),
                    lens[i],
                    0,
                    (&raw const addrs[i]).cast(),
                    addr_lens[i],
                )
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
        assert_eq!(rx.recv(a.as_raw_fd(), batch_io).unwrap(), sizes.len());
        for (i, &size) in sizes.iter().enumerate() {
            let (data, from) = rx.get(i);
            assert_eq!(data.len(), size);
            assert!(data.iter().all(|&x| x == i as u8));
            assert_eq!(from, Some(b.local_addr().unwrap()));
        }
        assert_eq!(
            rx.recv(a.as_raw_fd(), batch_io).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // Replies: b connected to a, received into a send queue addressed to c, flushed from a.
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        a.send_to(b"one", b.local_addr().unwrap()).unwrap();
        a.send_to(&[7; 65507], b.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut tx = SendQueue::new();
        let dest = SockAddr::from(c.local_addr().unwrap());
        let (n, bytes) = tx
            .recv_from_connected(b.as_raw_fd(), &dest, batch_io)
            .unwrap();
        assert_eq!((n, bytes), (2, 3 + 65507));
        assert_eq!(tx.flush(a.as_raw_fd(), batch_io).dropped, 0);
        assert!(tx.is_empty());
        let mut buf = vec![0; 70000];
        let (len, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], from), (&b"one"[..], a.local_addr().unwrap()));
        let (len, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(len, 65507);
    }

    #[test]
    fn batched_round_trip() {
        round_trip(true);
    }

    #[test]
    fn portable_round_trip() {
        round_trip(false);
    }

    #[test]
    fn batch_is_bounded() {
        let (a, b) = pair();
        for i in 0..BATCH + 5 {
            b.send_to(&[i as u8], a.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rx = RecvBatch::new();
        assert_eq!(rx.recv(a.as_raw_fd(), true).unwrap(), BATCH);
        assert_eq!(rx.recv(a.as_raw_fd(), true).unwrap(), 5);
    }
}
