//! The address a datagram was sent to, and the source address of a reply (`IP_PKTINFO` /
//! `IPV6_PKTINFO` control messages): on a socket bound to a wildcard address, a reply must
//! leave from the address the client sent to, or a client of a node's secondary address gets
//! its replies from the primary one and drops them.
//!
//! Each datagram of a batch has its own control buffer in the same `recvmmsg`/`sendmmsg`: one
//! `cmsg` per datagram, no extra syscall.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// Room for the packet-info control messages of a datagram (`u64`s: `cmsghdr` alignment): an
/// IPv4 datagram on a dual-stack socket may carry both `IP_PKTINFO` (32 bytes with its
/// header) and `IPV6_PKTINFO` (40).
pub(crate) type CtrlBuf = [u64; 12];

/// An empty control buffer.
pub(crate) const EMPTY_CTRL: CtrlBuf = [0; 12];

/// Asks the kernel for the destination address of every datagram received on `fd` (IPv4, and
/// for an IPv6 socket IPv6 too: a dual-stack socket reports IPv4 datagrams as `IP_PKTINFO`).
pub(crate) fn enable(fd: RawFd, ipv6: bool) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
    if ipv6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
    }
    Ok(())
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live c_int of the length given, only read by the kernel.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const one).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The local address in the control messages of a received `hdr` (whose control buffer the
/// kernel filled), if there is one: where the client's datagram arrived.
pub(crate) fn read(hdr: &libc::msghdr) -> Option<IpAddr> {
    // `msg_controllen` is a size_t on glibc and a socklen_t on musl.
    #[allow(clippy::unnecessary_cast)]
    let len = hdr.msg_controllen as usize;
    if hdr.msg_control.is_null() || len < mem::size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages into the
    // buffer `msg_control` points at; the CMSG_* walk stays within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                // The local address the datagram reached (for a broadcast, the interface's
                // own address, not the broadcast address): what a reply can leave from.
                return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_spec_dst.s_addr,
                ))));
            }
            if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)).to_canonical());
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

/// Points `hdr` at `ctrl` (zeroed), filled with a control message that makes the datagram leave from
/// `src`. An IPv4 source is given as `IP_PKTINFO` (also on a dual-stack socket, for an IPv4
/// client), an IPv6 one as `IPV6_PKTINFO`.
pub(crate) fn write(hdr: &mut libc::msghdr, ctrl: &mut CtrlBuf, src: IpAddr) {
    let (level, kind, len) = match src {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            mem::size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            mem::size_of::<libc::in6_pktinfo>(),
        ),
    };
    hdr.msg_control = ctrl.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic; the space of one pktinfo message fits in
    // `CtrlBuf` (checked below), so CMSG_FIRSTHDR is the start of `ctrl` and the writes through
    // it and CMSG_DATA stay inside the buffer, which outlives the send.
    unsafe {
        let space = libc::CMSG_SPACE(len as u32) as usize;
        debug_assert!(space <= mem::size_of::<CtrlBuf>());
        hdr.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match src {
            IpAddr::V4(ip) => std::ptr::write_unaligned(
                data.cast(),
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(ip) => std::ptr::write_unaligned(
                data.cast(),
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_message_reads_back_for_both_families() {
        for src in ["10.1.2.3", "2001:db8::7"] {
            let src: IpAddr = src.parse().unwrap();
            // SAFETY: msghdr is plain old data; all-zero is "nothing".
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            let mut ctrl = EMPTY_CTRL;
            write(&mut hdr, &mut ctrl, src);
            // `write` sets the field a send takes its source from, `read` the local address
            // a receive reports: the same field (ipi_spec_dst, ipi6_addr).
            assert_eq!(read(&hdr), Some(src));
        }
    }

    #[test]
    fn no_control_reads_as_none() {
        // SAFETY: as above.
        let hdr: libc::msghdr = unsafe { mem::zeroed() };
        assert_eq!(read(&hdr), None);
    }
}
