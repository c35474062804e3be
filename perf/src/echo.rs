//! The echo server, the game-server stand-in: one thread per socket, each bound with
//! SO_REUSEPORT to the same address (the kernel spreads clients over threads as it does over the
//! proxy's workers), reading and answering up to 32 datagrams per system call (recvmmsg /
//! sendmmsg). With `--tag`, byte 20 of every reply (the first after the load generator's header)
//! is replaced by the tag, so a reply says which server answered. `--tcp` also echoes TCP
//! streams on the same port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Arguments of `echo`.
#[derive(Debug, clap::Args)]
pub(crate) struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub(crate) bind: SocketAddr,
    /// Threads (sockets).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Write this byte at offset 20 of every UDP reply, to tell servers apart.
    #[arg(long)]
    pub(crate) tag: Option<u8>,
    /// Also echo TCP connections on the same port.
    #[arg(long)]
    pub(crate) tcp: bool,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    pub(crate) seconds: u64,
}

/// Where the load generator's header ends; a tagged echo marks this byte.
pub(crate) const TAG_OFFSET: usize = 20;
const BATCH: usize = 32;
/// Room for the largest UDP payload, so nothing is truncated.
const SLOT: usize = 65536;

pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_recv_buffer_size(4 << 20)?;
    s.set_send_buffer_size(4 << 20)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A running in-process echo server; stops when dropped.
#[derive(Debug)]
pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// Starts `threads` UDP echo threads on `bind` (port 0 picks one).
    pub(crate) fn start(
        bind: SocketAddr,
        threads: usize,
        tag: Option<u8>,
    ) -> std::io::Result<Self> {
        // Port 0 with SO_REUSEPORT could land on a port another reuse-port socket of this user
        // holds (a proxy's data port in a test running beside): take a port nobody holds first.
        let addr = if bind.port() == 0 {
            UdpSocket::bind(bind)?.local_addr()?
        } else {
            bind
        };
        let mut sockets = Vec::with_capacity(threads.max(1));
        for _ in 0..threads.max(1) {
            sockets.push(bind_reuseport(addr)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .map(|s| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || serve(&s, tag, &stop))
            })
            .collect();
        Ok(Self {
            addr,
            stop,
            threads,
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(crate) fn run(args: &EchoArgs) -> anyhow::Result<()> {
    let echo = Echo::start(args.bind, args.threads, args.tag)?;
    if args.tcp {
        let listener = TcpListener::bind(echo.addr)?;
        std::thread::spawn(move || serve_tcp(&listener));
    }
    println!(
        "echo listening on {} with {} threads{}",
        echo.addr,
        args.threads,
        if args.tcp { " (udp and tcp)" } else { "" }
    );
    if args.seconds > 0 {
        std::thread::sleep(Duration::from_secs(args.seconds));
    } else {
        loop {
            std::thread::park();
        }
    }
    Ok(())
}

fn serve_tcp(listener: &TcpListener) {
    for mut stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
}

/// Answers every datagram, a batch per system call, until `stop`.
fn serve(socket: &UdpSocket, tag: Option<u8>, stop: &AtomicBool) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let fd = socket.as_raw_fd();
    let mut bufs = vec![vec![0u8; SLOT]; BATCH];
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    // SAFETY: as above.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while !stop.load(Ordering::Relaxed) {
        iovs.clear();
        for (i, buf) in bufs.iter_mut().enumerate() {
            iovs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            });
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&raw mut addrs[i]).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iovlen = 1;
        }
        for (msg, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            msg.msg_hdr.msg_iov = iov;
        }
        // SAFETY: every mmsghdr points at a live buffer and address of this frame; the timeout
        // set on the socket bounds the wait (MSG_WAITFORONE returns once one has arrived).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        for (i, msg) in msgs.iter_mut().take(n).enumerate() {
            let len = msg.msg_len as usize;
            if let Some(t) = tag
                && len > TAG_OFFSET
            {
                bufs[i][TAG_OFFSET] = t;
            }
            iovs[i].iov_len = len;
        }
        // SAFETY: the first `n` headers hold the received lengths and source addresses.
        unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as u32, 0) };
        for iov in &mut iovs[..n] {
            iov.iov_len = SLOT;
        }
    }
}

/// Backends for benchmarks with many of them: `count` UDP sockets on loopback, echoing from one
/// mio thread (a thread each would crowd the cores the proxy is measured on). `stamp` may
/// rewrite each reply before it leaves, given the address it came from. Stops when dropped.
#[derive(Debug)]
pub(crate) struct MultiEcho {
    pub(crate) addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MultiEcho {
    pub(crate) fn start(count: usize, stamp: fn(&mut [u8], SocketAddr)) -> anyhow::Result<Self> {
        let mut poll = mio::Poll::new()?;
        let mut sockets = Vec::with_capacity(count);
        for i in 0..count {
            let mut s = mio::net::UdpSocket::bind("127.0.0.1:0".parse()?)?;
            poll.registry()
                .register(&mut s, mio::Token(i), mio::Interest::READABLE)?;
            sockets.push(s);
        }
        let addrs = sockets
            .iter()
            .map(mio::net::UdpSocket::local_addr)
            .collect::<std::io::Result<_>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut events = mio::Events::with_capacity(1024);
                let mut buf = [0u8; 2048];
                while !stopped.load(Ordering::Relaxed) {
                    if poll
                        .poll(&mut events, Some(Duration::from_millis(20)))
                        .is_err()
                    {
                        continue;
                    }
                    for event in &events {
                        let s = &sockets[event.token().0];
                        // Edge triggered: read until the socket is empty.
                        while let Ok((n, from)) = s.recv_from(&mut buf) {
                            stamp(&mut buf[..n], from);
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                }
            })?;
        Ok(Self {
            addrs,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MultiEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
