//! Backends that speak PROXY protocol v2, as a game server or DNS server behind the proxy would:
//! they read the header (with their own parser, written from the protocol's text, not the
//! proxy's) and answer with what it said, so a test sees exactly what the backend learned.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a PROXY v2 header said.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct HeaderSeen {
    /// `true` for DGRAM (UDP), `false` for STREAM (TCP).
    pub dgram: bool,
    /// The client's address, as the proxy saw it.
    pub source: SocketAddr,
    /// The proxy address the client sent to.
    pub destination: SocketAddr,
}

/// Splits a header off `bytes`: `Ok(Some((header, rest)))` when one is there and valid,
/// `Ok(None)` when `bytes` does not start with the signature, `Err` when it does but the
/// header is malformed or incomplete.
pub fn split_header(bytes: &[u8]) -> Result<Option<(HeaderSeen, &[u8])>, String> {
    if !bytes.starts_with(SIGNATURE) {
        return Ok(None);
    }
    if bytes.len() < 16 {
        return Err("truncated header".into());
    }
    if bytes[12] != 0x21 {
        return Err(format!("version/command {:#04x}, not 0x21", bytes[12]));
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let body = bytes
        .get(16..16 + len)
        .ok_or("header longer than the data")?;
    let (dgram, v6) = match bytes[13] {
        0x11 => (false, false),
        0x12 => (true, false),
        0x21 => (false, true),
        0x22 => (true, true),
        other => return Err(format!("family/protocol {other:#04x}")),
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (source, destination) = if v6 {
        if len < 36 {
            return Err("IPv6 body too short".into());
        }
        let ip = |at: usize| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[at..at + 16]);
            IpAddr::from(o)
        };
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    } else {
        if len < 12 {
            return Err("IPv4 body too short".into());
        }
        let ip = |at: usize| IpAddr::from([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    };
    Ok(Some((
        HeaderSeen {
            dgram,
            source,
            destination,
        },
        &bytes[16 + len..],
    )))
}

/// The answer line a PROXY-aware backend sends: `H <dgram|stream> <source> <destination> |`
/// followed by the payload, or `- |` and the payload when there was no header.
fn describe(header: Option<HeaderSeen>) -> String {
    match header {
        Some(h) => format!(
            "H {} {} {} |",
            if h.dgram { "dgram" } else { "stream" },
            h.source,
            h.destination
        ),
        None => "- |".into(),
    }
}

/// Parses an answer of a [`ProxyEcho`] or [`TcpProxyEcho`]: the header it saw and the payload.
pub fn read_answer(answer: &[u8]) -> (Option<HeaderSeen>, Vec<u8>) {
    let text = String::from_utf8_lossy(answer);
    let (head, payload) = text.split_once('|').expect("an echo answer");
    let mut words = head.split_whitespace();
    let seen = match words.next() {
        Some("H") => {
            let dgram = words.next() == Some("dgram");
            let source = words.next().unwrap().parse().unwrap();
            let destination = words.next().unwrap().parse().unwrap();
            Some(HeaderSeen {
                dgram,
                source,
                destination,
            })
        }
        _ => None,
    };
    (seen, payload.as_bytes().to_vec())
}

/// A UDP backend that reads a PROXY v2 header off each datagram (if there is one) and answers
/// what it saw, then the payload. A malformed header gets `E <why>`.
#[derive(Debug)]
pub struct ProxyEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    _thread: JoinHandle<()>,
}

impl ProxyEcho {
    /// On `bind` (`127.0.0.1:0`, `[::1]:0`, or a namespace's address).
    pub fn spawn(bind: &str) -> Self {
        let socket = UdpSocket::bind(bind).unwrap();
        let addr = socket.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let reply = match split_header(&buf[..n]) {
                    Ok(Some((h, rest))) => [describe(Some(h)).as_bytes(), rest].concat(),
                    Ok(None) => [describe(None).as_bytes(), &buf[..n]].concat(),
                    Err(why) => format!("E {why}").into_bytes(),
                };
                let _ = socket.send_to(&reply, from);
            }
        });
        Self {
            addr,
            _thread: thread,
        }
    }
}

/// A TCP backend that reads a PROXY v2 header at the start of each connection and answers
/// what it saw once, then echoes the rest of the stream.
#[derive(Debug)]
pub struct TcpProxyEcho {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl TcpProxyEcho {
    /// On `bind`.
    pub fn spawn(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 65536];
                    // Read until the header is decided (its 16 fixed bytes and its body).
                    let (header, rest) = loop {
                        match split_header(&got) {
                            Ok(Some((h, rest))) => break (Some(h), rest.to_vec()),
                            Ok(None) if got.len() >= SIGNATURE.len() => break (None, got.clone()),
                            Ok(None) if !SIGNATURE.starts_with(&got) => break (None, got.clone()),
                            _ => {}
                        }
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    if stream.write_all(describe(header).as_bytes()).is_err()
                        || stream.write_all(&rest).is_err()
                    {
                        return;
                    }
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr }
    }
}
