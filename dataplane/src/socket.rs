//! Socket builders (socket2): data-port listeners with `SO_REUSEPORT`, and connected upstream
//! sockets for sessions. One error variant per syscall step, so a failure names its cause.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::SocketError;

/// Binds a non-blocking UDP socket with `SO_REUSEPORT` so every worker can bind the same port.
/// `[::]` binds dual-stack.
pub(crate) fn bind_reuseport_udp(
    addr: SocketAddr,
    recv_buffer_bytes: usize,
    send_buffer_bytes: usize,
) -> Result<UdpSocket, SocketError> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|source| SocketError::Create { addr, source })?;
    let opt = |option: &'static str, r: io::Result<()>| {
        r.map_err(|source| SocketError::SetOption {
            addr,
            option,
            source,
        })
    };
    if addr.is_ipv6() {
        opt("IPV6_V6ONLY", socket.set_only_v6(false))?;
    }
    opt("SO_REUSEADDR", socket.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", socket.set_reuse_port(true))?;
    opt("SO_RCVBUF", socket.set_recv_buffer_size(recv_buffer_bytes))?;
    opt("SO_SNDBUF", socket.set_send_buffer_size(send_buffer_bytes))?;
    warn_if_capped(
        addr,
        "SO_RCVBUF",
        recv_buffer_bytes,
        socket.recv_buffer_size(),
    );
    warn_if_capped(
        addr,
        "SO_SNDBUF",
        send_buffer_bytes,
        socket.send_buffer_size(),
    );
    opt("O_NONBLOCK", socket.set_nonblocking(true))?;
    socket
        .bind(&addr.into())
        .map_err(|source| SocketError::Bind { addr, source })?;
    Ok(socket.into())
}

/// A UDP socket for `addr` with no reuse option (dual-stack for `[::]`), not bound yet.
fn plain_udp_socket(addr: SocketAddr) -> Result<Socket, SocketError> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|source| SocketError::Create { addr, source })?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(false)
            .map_err(|source| SocketError::SetOption {
                addr,
                option: "IPV6_V6ONLY",
                source,
            })?;
    }
    Ok(socket)
}

/// Fails when another socket holds `addr`, even one of another process with `SO_REUSEPORT`: a
/// plain bind (neither `SO_REUSEADDR`, which for UDP would also let two sockets share a port,
/// nor `SO_REUSEPORT`) before the real ones. Without it a second instance started by mistake
/// would silently take half of the clients, whose tokens it does not know.
pub(crate) fn probe_exclusive_udp(addr: SocketAddr) -> Result<(), SocketError> {
    let socket = plain_udp_socket(addr)?;
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            SocketError::Taken { addr, source }
        } else {
            SocketError::Bind { addr, source }
        }
    })
}

/// `addr` with port 0 replaced by a port no other socket holds. Binding port 0 directly with
/// `SO_REUSEADDR`/`SO_REUSEPORT` would not do: the kernel may then pick a port that another
/// reuse-port socket of the same user holds, and silently share it.
pub(crate) fn unique_udp_port(addr: SocketAddr) -> Result<SocketAddr, SocketError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let socket = plain_udp_socket(addr)?;
    socket
        .bind(&addr.into())
        .map_err(|source| SocketError::Bind { addr, source })?;
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| SocketError::Bind {
            addr,
            source: io::Error::other("no local address after bind"),
        })
}

/// A non-blocking UDP socket on an ephemeral port, connected to `target`: the backend sees one
/// stable peer per session, and the kernel filters out datagrams from anyone but `target`.
pub(crate) fn connect_upstream_udp(target: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    // connect(2) on an unbound UDP socket binds an ephemeral port as part of the same call.
    socket.connect(&SockAddr::from(target))?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// The kernel silently caps socket buffers at `net.core.rmem_max`/`wmem_max`; say so, because a
/// small buffer turns bursts into drops.
fn warn_if_capped(addr: SocketAddr, option: &str, wanted: usize, got: io::Result<usize>) {
    // Linux reports twice the size it was given (the other half is bookkeeping).
    if let Ok(got) = got
        && got < wanted
    {
        log::warn!(
            "{addr}: {option} is {got} bytes, not the {wanted} configured; raise \
             net.core.rmem_max / net.core.wmem_max to absorb bursts"
        );
    }
}
