//! The echo server: one thread per socket, each bound with SO_REUSEPORT to the same address, so
//! the kernel spreads clients over threads like it does over the proxy's workers.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

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
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    pub(crate) seconds: u64,
}

pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_recv_buffer_size(4 << 20)?;
    s.set_send_buffer_size(4 << 20)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

pub(crate) fn run(args: &EchoArgs) -> anyhow::Result<()> {
    let first = bind_reuseport(args.bind)?;
    let addr = first.local_addr()?;
    println!("echo listening on {addr} with {} threads", args.threads);
    let deadline = (args.seconds > 0).then(|| Instant::now() + Duration::from_secs(args.seconds));
    let mut sockets = vec![first];
    for _ in 1..args.threads {
        sockets.push(bind_reuseport(addr)?);
    }
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|s| std::thread::spawn(move || serve(&s, deadline)))
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve(socket: &UdpSocket, deadline: Option<Instant>) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 65536];
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}
