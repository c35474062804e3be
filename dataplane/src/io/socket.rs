//! Socket builders (socket2): listener sockets with `SO_REUSEPORT` (UDP and TCP), and upstream
//! sockets for sessions. One error variant per syscall step, so a failure names its cause.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::SocketError;
use crate::listener::Transport;

/// Connections a TCP listener socket queues before the worker accepts them.
const TCP_BACKLOG: i32 = 1024;

/// One worker's socket of a listener, bound and (for TCP) listening.
#[derive(Debug)]
pub(crate) enum ListenSocket {
    /// A datagram socket.
    Udp(UdpSocket),
    /// A listening stream socket.
    Tcp(TcpListener),
}

fn new_socket(addr: SocketAddr, transport: Transport) -> Result<Socket, SocketError> {
    let (ty, protocol) = match transport {
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))
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

/// Binds a non-blocking listener socket with `SO_REUSEPORT` so every worker can bind the same
/// port (and, for TCP, starts listening). `[::]` binds dual-stack.
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    transport: Transport,
    recv_buffer_bytes: usize,
    send_buffer_bytes: usize,
) -> Result<ListenSocket, SocketError> {
    let socket = new_socket(addr, transport)?;
    let opt = |option: &'static str, r: io::Result<()>| {
        r.map_err(|source| SocketError::SetOption {
            addr,
            option,
            source,
        })
    };
    opt("SO_REUSEADDR", socket.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", socket.set_reuse_port(true))?;
    if transport == Transport::Udp {
        // A TCP listener's buffers are its connections' business (the kernel autotunes them).
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
    }
    if transport == Transport::Tcp {
        // Accepted connections inherit it (Linux copies the listener's options): one
        // setsockopt per listener rather than one per connection. Game traffic is small and
        // latency-bound.
        opt("TCP_NODELAY", socket.set_tcp_nodelay(true))?;
    }
    opt("O_NONBLOCK", socket.set_nonblocking(true))?;
    socket
        .bind(&addr.into())
        .map_err(|source| SocketError::Bind { addr, source })?;
    match transport {
        Transport::Udp => Ok(ListenSocket::Udp(socket.into())),
        Transport::Tcp => {
            socket
                .listen(TCP_BACKLOG)
                .map_err(|source| SocketError::Bind { addr, source })?;
            Ok(ListenSocket::Tcp(socket.into()))
        }
    }
}

/// Fails when another socket holds `addr`, even one of another process with `SO_REUSEPORT`: a
/// bind without `SO_REUSEPORT` before the real ones. Without it a second instance started by
/// mistake would silently take half of the clients, whose tokens it does not know.
///
/// A UDP probe sets no reuse option (for UDP `SO_REUSEADDR` would itself let two sockets share
/// a port). A TCP probe sets `SO_REUSEADDR`, which lets it bind over connections in TIME_WAIT
/// after a restart but still fails against another listening socket.
pub(crate) fn probe_exclusive(addr: SocketAddr, transport: Transport) -> Result<(), SocketError> {
    let socket = new_socket(addr, transport)?;
    if transport == Transport::Tcp {
        socket
            .set_reuse_address(true)
            .map_err(|source| SocketError::SetOption {
                addr,
                option: "SO_REUSEADDR",
                source,
            })?;
    }
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            SocketError::Taken {
                transport,
                addr,
                source,
            }
        } else {
            SocketError::Bind { addr, source }
        }
    })
}

/// `addr` with port 0 replaced by a port no other socket holds. Binding port 0 directly with
/// `SO_REUSEADDR`/`SO_REUSEPORT` would not do: the kernel may then pick a port that another
/// reuse-port socket of the same user holds, and silently share it.
pub(crate) fn unique_port(
    addr: SocketAddr,
    transport: Transport,
) -> Result<SocketAddr, SocketError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let socket = new_socket(addr, transport)?;
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

/// A non-blocking, unconnected UDP socket on an ephemeral port of the wildcard address of one
/// family: a shared upstream socket (see `crate::policy::upstream`).
pub(crate) fn bind_upstream_udp(
    ipv6: bool,
    recv_buffer_bytes: usize,
    send_buffer_bytes: usize,
) -> io::Result<mio::net::UdpSocket> {
    let (domain, any) = if ipv6 {
        (
            Domain::IPV6,
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
        )
    } else {
        (
            Domain::IPV4,
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        )
    };
    let socket = Socket::new(
        domain,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if ipv6 {
        // IPv4 backends get IPv4 sockets: replies then come from the address the session knows.
        socket.set_only_v6(true)?;
    }
    // Best effort: the kernel caps these at rmem_max/wmem_max, which the listener sockets
    // already warn about.
    let _ = socket.set_recv_buffer_size(recv_buffer_bytes);
    let _ = socket.set_send_buffer_size(send_buffer_bytes);
    socket.bind(&SockAddr::from(any))?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// A non-blocking TCP connection to `target`, in progress (it completes, or fails, on the
/// socket's first writable event). `TCP_NODELAY`: game traffic is small and latency-bound.
pub(crate) fn connect_upstream_tcp(target: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let stream = mio::net::TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    Ok(stream)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let Ok(ListenSocket::Tcp(listener)) = bind_reuseport(addr, Transport::Tcp, 0, 0) else {
            panic!("a TCP listener");
        };
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "no per-connection setsockopt needed"
        );
    }
}
