//! The recorded stream of the current hand-off format, `fixtures/handoff-v1.bin`: a Hello, an
//! Accept and a State whose frames announce the State's descriptors (the descriptors themselves
//! are not in a file). It must keep reading back as the same messages, and the State must pass
//! `check`: a change to `wire` or to the framing that breaks this breaks a hand-off from the
//! release that wrote it.
//!
//! `UPDATE_HANDOFF_FIXTURE=1 cargo test -p dataplane --test handoff_fixture` rewrites the file
//! (and the fuzz seeds made from it). Do that only when the format version changes, keeping the
//! old file and a test that still reads it for as long as that release can be upgraded from.

use std::path::{Path, PathBuf};

use dataplane::handoff::stream::{MAX_FDS_PER_FRAME, decode_stream, encode_message};
use dataplane::handoff::wire::{
    Answer, Hello, State, VERSION, WireBackend, WireGrant, WireLedgerEntry, WireListener,
    WireListenerKind, WirePoolSocket, WireProxyMode, WireProxyState, WireSession, WireSessionKind,
    WireStats, WireTransport, WireWorker, accepts_version,
};

fn fixture_hello() -> Hello {
    Hello {
        version: VERSION,
        release: "0.1.0".to_owned(),
        pid: 4242,
        config: "workers: 2\ndataPorts: [7000]\n".to_owned(),
        restart_keys: vec![("workers".to_owned(), "2".to_owned())],
    }
}

/// Descriptors a fixture state names.
const FIXTURE_FDS: usize = 12;
const FIXTURE_WORKERS: usize = 2;

/// A state that touches every part of the format: listeners of each kind and transport, IPv4
/// and IPv6, sessions of each kind with and without PROXY state, grants and ledger entries with
/// tokens past 64 bits. Its descriptors: listeners 0..6, pools 6..10, query 10, admin 11.
fn fixture_state() -> State {
    let listener = |id: u16, transport, addr: &str, kind, fds: [u32; 2]| WireListener {
        id,
        owner: format!("fixture listener {id}"),
        transport,
        addr: addr.parse().unwrap(),
        kind,
        idle_timeout_ms: 30_000 * u64::from(id + 1),
        fds: fds.to_vec(),
    };
    let session = |listener, client: &str, kind, pool, proxy| WireSession {
        listener,
        client: client.parse().unwrap(),
        reply_to: client.parse().unwrap(),
        local: Some("192.0.2.10".parse().unwrap()),
        target: "10.0.0.7:7777".parse().unwrap(),
        backend: 0xdead_beef_0000_0001,
        kind,
        pool,
        age_ms: 3_600_000,
        idle_ms: 250,
        idle_timeout_ms: 300_000,
        stats: WireStats {
            packets_upstream: 1,
            bytes_upstream: 2,
            packets_downstream: 3,
            bytes_downstream: u64::MAX,
        },
        proxy,
    };
    let pool = |number, port, fd| WirePoolSocket { number, port, fd };
    State {
        release: "0.1.0".to_owned(),
        listeners: vec![
            listener(
                0,
                WireTransport::Udp,
                "0.0.0.0:7000",
                WireListenerKind::TokenPort,
                [0, 1],
            ),
            listener(
                1,
                WireTransport::Udp,
                "[::]:7100",
                WireListenerKind::Forward {
                    target: "[2001:db8::1]:7777".parse().unwrap(),
                    backend: 42,
                    proxy: WireProxyMode::V2First,
                },
                [2, 3],
            ),
            listener(
                7,
                WireTransport::Tcp,
                "127.0.0.1:7200",
                WireListenerKind::Route,
                [4, 5],
            ),
        ],
        workers: vec![
            WireWorker {
                pools: vec![pool(0, 40_000, 6), pool(1, 40_001, 7)],
                sessions: vec![
                    session(0, "198.51.100.1:5000", WireSessionKind::Token, 0, None),
                    session(
                        1,
                        "[2001:db8::2]:5001",
                        WireSessionKind::Forwarder,
                        1,
                        Some(WireProxyState {
                            every: false,
                            pending: true,
                        }),
                    ),
                ],
            },
            WireWorker {
                pools: vec![pool(0, 40_002, 8), pool(2, 40_003, 9)],
                sessions: vec![
                    session(0, "198.51.100.2:5002", WireSessionKind::Default, 2, None),
                    session(
                        0,
                        "198.51.100.3:5003",
                        WireSessionKind::Route,
                        0,
                        Some(WireProxyState {
                            every: true,
                            pending: false,
                        }),
                    ),
                ],
            },
        ],
        grants: vec![
            WireGrant {
                token: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
                backend: WireBackend {
                    id: 42,
                    addrs: vec![Some("10.0.0.7:7777".parse().unwrap()), None],
                    proxy: WireProxyMode::V2,
                },
                expires_in_ms: 29_000,
                client: Some("198.51.100.9".parse().unwrap()),
                sealed: false,
                redeemed: 0b01,
            },
            WireGrant {
                token: u128::MAX,
                backend: WireBackend {
                    id: 43,
                    addrs: vec![Some("[2001:db8::7]:7777".parse().unwrap())],
                    proxy: WireProxyMode::None,
                },
                expires_in_ms: 1,
                client: None,
                sealed: true,
                redeemed: 0,
            },
        ],
        ledger: vec![WireLedgerEntry {
            token: 1 << 100,
            keep_ms: 150_000,
            ports: 0b11,
        }],
        query_fd: Some(10),
        admin_fd: Some(11),
    }
}

fn fixture_answer() -> Answer {
    Answer::Accept
}

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/handoff-v1.bin")
}

/// The frames of the fixture exchange, descriptors counted in the headers.
fn fixture_stream() -> Vec<u8> {
    let hello = serde_json::to_vec(&fixture_hello()).unwrap();
    let answer = serde_json::to_vec(&fixture_answer()).unwrap();
    let state = serde_json::to_vec(&fixture_state()).unwrap();
    let mut bytes = encode_message(&hello, 0).unwrap();
    bytes.extend(encode_message(&answer, 0).unwrap());
    bytes.extend(encode_message(&state, FIXTURE_FDS).unwrap());
    bytes
}

#[test]
fn fixture_of_the_current_format_reads_back() {
    if std::env::var_os("UPDATE_HANDOFF_FIXTURE").is_some_and(|v| v == "1") {
        write_fixture_and_seeds();
    }
    let bytes = std::fs::read(fixture_path()).unwrap();
    let messages = decode_stream(&bytes).unwrap();
    assert_eq!(messages.len(), 3);
    let hello: Hello = serde_json::from_slice(&messages[0].json).unwrap();
    assert!(accepts_version(hello.version), "version {}", hello.version);
    assert_eq!(hello, fixture_hello());
    let answer: Answer = serde_json::from_slice(&messages[1].json).unwrap();
    assert_eq!(answer, fixture_answer());
    let state: State = serde_json::from_slice(&messages[2].json).unwrap();
    assert_eq!(state, fixture_state());
    assert_eq!(
        messages.iter().map(|m| m.fds).collect::<Vec<_>>(),
        [0, 0, FIXTURE_FDS]
    );
    state.check(FIXTURE_WORKERS, FIXTURE_FDS).unwrap();
}

/// The fixture, and fuzz seeds from it: the whole exchange, and a multi-frame message.
fn write_fixture_and_seeds() {
    let stream = fixture_stream();
    std::fs::create_dir_all(fixture_path().parent().unwrap()).unwrap();
    std::fs::write(fixture_path(), &stream).unwrap();
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/handoff_stream");
    std::fs::create_dir_all(&seeds).unwrap();
    std::fs::write(seeds.join("seed-v1-exchange"), &stream).unwrap();
    let json = serde_json::to_vec(&fixture_state()).unwrap();
    let multi = encode_message(&json, MAX_FDS_PER_FRAME + FIXTURE_FDS).unwrap();
    std::fs::write(seeds.join("seed-v1-multi-frame"), multi).unwrap();
}
