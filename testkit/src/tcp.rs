//! TCP backends for loopback tests: one that hands every accepted connection to the test, and
//! an echo that tags each connection's replies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use crate::WAIT;

/// A TCP listener on loopback whose accepted connections (with read timeouts) come to the test.
#[derive(Debug)]
pub struct TcpBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Receiver<TcpStream>,
}

impl TcpBackend {
    /// Listens on a free loopback port.
    pub fn spawn() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(WAIT)).unwrap();
                if tx.send(stream).is_err() {
                    return; // the test is done with this backend
                }
            }
        });
        Self { addr, accepted }
    }

    /// The next connection the proxy opened to this backend.
    pub fn accept(&self) -> TcpStream {
        self.accepted
            .recv_timeout(WAIT)
            .expect("the proxy connects to the backend")
    }

    /// Asserts no connection arrives within `within`.
    pub fn expect_no_connection(&self, within: Duration) {
        match self.accepted.recv_timeout(within) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(s) => panic!("unexpected connection from {:?}", s.peer_addr()),
            Err(e) => panic!("{e}"),
        }
    }
}

/// A TCP echo: each connection gets `[tag]` first, then every byte it sends, back; it half-closes
/// when the client does.
#[derive(Debug)]
pub struct TcpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl TcpEcho {
    /// An echo whose connections start their replies with `tag`.
    pub fn tagged(tag: u8) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    if stream.write_all(&[tag]).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr }
    }
}

/// A TCP connection to `addr` with read and write timeouts.
pub fn tcp_client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Asserts the peer closes `s` (EOF or reset) before the read timeout, sending nothing.
pub fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("got {n} bytes, expected the connection to close"),
        Err(e) => panic!("expected the connection to close: {e}"),
    }
}

/// Reads exactly `n` bytes, or fails with what came.
pub fn read_exact_within(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}
