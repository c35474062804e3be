//! The TCP splice through the real binary (SPEC §11): bytes move with `splice(2)` through
//! pooled kernel pipes, and a connection behaves as it did through the user-space copy: large
//! streams both ways intact behind slow readers, half-close, a token's line ending dropped with
//! the bytes behind it in the same segment delivered, and no descriptor left behind by
//! connections that come and go.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

/// One TCP data port whose clients without a token go to the default endpoint.
fn config() -> String {
    r#"
bindAddress: 127.0.0.1
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
dataPorts: [{name: default, port: 0, protocol: tcp}]
inventory: {kind: file, path: inventory.yaml, pollIntervalMillis: 50}
resourceQueryMapping:
  gameserver: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}
defaultEndpoint: {resourceType: gameserver, labelSelector: {id: one}}
"#
    .to_string()
}

fn inventory(backend: SocketAddr) -> String {
    format!(
        r#"- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: gs-1, namespace: starx, labels: {{id: one}}}}
  status: {{state: Ready, address: "127.0.0.1", ports: [{{name: default, port: {}}}]}}
"#,
        backend.port()
    )
}

/// `len` bytes that differ with `seed`, so a reordered, lost or duplicated chunk shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` on a thread, then closes that side.
fn send_all(s: &TcpStream, data: Vec<u8>) -> JoinHandle<()> {
    let mut s = s.try_clone().unwrap();
    std::thread::spawn(move || {
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    })
}

/// Reads to the end of the stream, pausing after every read (a slow reader).
fn read_slowly(s: &TcpStream) -> Vec<u8> {
    let mut s = s.try_clone().unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match s.read(&mut buf).unwrap() {
            0 => return got,
            n => got.extend_from_slice(&buf[..n]),
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A cheap digest, so a failure prints two numbers rather than megabytes.
fn digest(bytes: &[u8]) -> (usize, u64) {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (bytes.len(), hash)
}

#[test]
fn large_streams_each_way_arrive_intact_through_slow_readers() {
    const BYTES: usize = 8 << 20;
    let backend = TcpBackend::spawn();
    let proxy = Proxy::start(&config(), &inventory(backend.addr));
    let client = tcp_client(proxy.data_addr());
    // The first byte is no token character: the default endpoint at once.
    let mut up = b"#".to_vec();
    up.extend_from_slice(&pattern(1, BYTES));
    let down = pattern(2, BYTES);
    let client_writes = send_all(&client, up.clone());
    let server = backend.accept();
    let backend_writes = send_all(&server, down.clone());
    let backend_reads = std::thread::spawn(move || read_slowly(&server));
    let at_client = read_slowly(&client);
    let at_backend = backend_reads.join().unwrap();
    client_writes.join().unwrap();
    backend_writes.join().unwrap();
    assert_eq!(digest(&at_backend), digest(&up), "client → backend");
    assert_eq!(digest(&at_client), digest(&down), "backend → client");
    proxy.eventually("every byte counted", |p| {
        p.metric(r#"udp_director_bytes_total{direction="upstream",protocol="tcp"}"#)
            == (BYTES + 1) as f64
            && p.metric(r#"udp_director_bytes_total{direction="downstream",protocol="tcp"}"#)
                == BYTES as f64
    });
    proxy.eventually("the connection ended", |p| p.sessions().is_empty());
}

#[test]
fn a_half_closed_client_still_gets_the_reply() {
    let backend = TcpBackend::spawn();
    let proxy = Proxy::start(&config(), &inventory(backend.addr));
    let mut client = tcp_client(proxy.data_addr());
    client.write_all(b"#request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut server = backend.accept();
    let mut request = Vec::new();
    server.read_to_end(&mut request).unwrap();
    assert_eq!(request, b"#request", "the FIN passed on after the bytes");
    let reply = pattern(3, 1 << 20);
    server.write_all(&reply).unwrap();
    drop(server);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(digest(&got), digest(&reply));
    proxy.eventually("the connection ended", |p| p.sessions().is_empty());
}

#[test]
fn a_token_line_is_dropped_and_the_bytes_behind_it_in_its_segment_arrive() {
    let backend = TcpBackend::spawn();
    let proxy = Proxy::start(&config(), &inventory(backend.addr));
    let token = proxy.token(r#"{"resourceType":"gameserver","namespace":"starx"}"#);
    let mut client = tcp_client(proxy.data_addr());
    let tail = pattern(4, 2 << 20);
    // Token, line ending and the first data in one segment, then a stream behind them.
    client
        .write_all(format!("{token}\r\nhello").as_bytes())
        .unwrap();
    let writes = send_all(&client, tail.clone());
    let mut server = backend.accept();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    writes.join().unwrap();
    assert_eq!(&got[..5], b"hello");
    assert_eq!(digest(&got[5..]), digest(&tail));
    server.write_all(b"bye").unwrap();
    drop(server);
    assert_eq!(read_exact_within(&mut client, 3), b"bye");
    expect_closed(&mut client);
}

#[test]
fn connections_that_come_and_go_leave_no_descriptor_behind() {
    let echo = TcpEcho::tagged(b'!');
    let proxy = Proxy::start(&config(), &inventory(echo.addr));
    let pid = proxy.child.id();
    // The proxy's open pipes and sockets.
    let open = |kind: &str| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with(kind))
            .count()
    };
    let round_trip = |i: usize| {
        let mut c = tcp_client(proxy.data_addr());
        c.write_all(b"#x").unwrap();
        assert_eq!(read_exact_within(&mut c, 3), b"!#x", "connection {i}");
        c.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut c);
    };
    let unspliced = open("pipe:");
    // Warm up: the pipes the connections' reads take wait in the workers' pools after them.
    for i in 0..20 {
        round_trip(i);
    }
    proxy.eventually("the warm-up connections ended", |p| p.sessions().is_empty());
    let (pipes, sockets) = (open("pipe:"), open("socket:"));
    assert!(pipes > unspliced, "pooled pipes: {pipes} descriptors");
    for i in 0..300 {
        round_trip(i);
    }
    proxy.eventually("the connections ended", |p| p.sessions().is_empty());
    assert_eq!(open("pipe:"), pipes, "no pipe left behind");
    // The admin API's own connection may come or go.
    assert!(open("socket:") <= sockets + 2, "sockets closed");
}
