//! The two syscalls of the hand-off stream: `sendmsg` with descriptors as `SCM_RIGHTS`, and
//! `recvmsg` that owns every descriptor it receives at once (close-on-exec), so that no error
//! path can leak one. Retries, timeouts and counting are the caller's.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// One `sendmsg` of `parts`, with `fds` as `SCM_RIGHTS` when there are any (at most
/// [`super::MAX_FDS_PER_FRAME`]).
pub(super) fn send_with_fds(
    socket: RawFd,
    parts: [&[u8]; 2],
    fds: &[BorrowedFd<'_>],
    control: &mut [u64],
) -> io::Result<usize> {
    let mut iov = parts.map(|part| libc::iovec {
        iov_base: part.as_ptr().cast_mut().cast(),
        iov_len: part.len(),
    });
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        let len = (fds.len() * mem::size_of::<libc::c_int>()) as u32;
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(len) } as usize;
        if space > mem::size_of_val(control) {
            // Callers pass at most a frame's descriptors, well within `control`.
            return Err(io::ErrorKind::InvalidInput.into());
        }
        control.fill(0);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `control` has room for `space` bytes (checked above), so the header
        // CMSG_FIRSTHDR points at and the descriptors written from CMSG_DATA lie inside it, and
        // it outlives the call. CMSG_LEN is arithmetic.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (slices borrowed for the call, only read) and at
    // `control`, all alive until it returns. MSG_NOSIGNAL: a closed peer is an EPIPE error,
    // not a signal that ends the process.
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What one `recvmsg` brought.
pub(super) struct Received {
    pub(super) bytes: usize,
    pub(super) fds: Vec<OwnedFd>,
    /// The kernel dropped control data (descriptors it could not deliver are closed).
    pub(super) truncated: bool,
}

/// One `recvmsg` into `buf`, descriptors owned (close-on-exec) as soon as they are read.
pub(super) fn recv_with_fds(
    socket: RawFd,
    buf: &mut [u8],
    control: &mut [u64],
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(control) as _;
    // SAFETY: `msg` points at `buf` and `control`, both writable for the lengths given and
    // alive until the call returns.
    let n = unsafe { libc::recvmsg(socket, &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages into
    // `control`; the CMSG_* walk stays inside them. Each SCM_RIGHTS entry is a descriptor the
    // kernel just installed in this process and nothing else refers to, so it is owned here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                let bytes = (header.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..bytes / mem::size_of::<libc::c_int>() {
                    let fd = data.add(i).read_unaligned();
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            // Other control messages (credentials, when a caller asks for them) hold no
            // descriptor and are not this stream's business.
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}
