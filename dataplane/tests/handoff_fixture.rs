//! The recorded streams of the hand-off formats this release reads, `fixtures/handoff-vN.bin`
//! (format 1: session batches as JSON; format 2: as binary): each the whole exchange in order
//! (Hello, Accept, Proceed, the State, its session batches, Taken, Released), the State's frames
//! announcing its descriptors (the descriptors themselves are not in a file). It must keep reading
//! back as the same messages, and the State with its batches must pass `check`: a change to `wire`
//! or to the framing that breaks this breaks a hand-off from the release that wrote it.
//!
//! `handoff-v1.bin` (and the `seed-v1-*` fuzz seeds) are the stream of the release that wrote
//! format 1 (commit 91be642), kept byte for byte: never rewrite them.
//! `UPDATE_HANDOFF_FIXTURE=1 cargo test -p dataplane --test handoff_fixture` rewrites the
//! current format's file and its fuzz seed. Do that only when the format version changes,
//! keeping the older files read back here for as long as their releases can be upgraded from.

use std::net::SocketAddrV6;
use std::path::{Path, PathBuf};

use dataplane::handoff::stream::{RawMessage, decode_stream, encode_message};
use dataplane::handoff::wire::{
    Answer, Decision, Hello, READS, Released, SessionBatch, State, Taken, VERSION, WireBackend,
    WireGrant, WireLedgerEntry, WireListener, WireListenerKind, WirePoolSocket, WireProxyMode,
    WireProxyState, WireSession, WireSessionKind, WireStats, WireTransport, WireWorker,
    accepts_version, decode_batch, encode_batch, limits,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The formats recorded (a file each): every one this release reads.
const RECORDED: &[u32] = &[1, 2];

/// The Hello the release that wrote `version` sent: the formats it read.
fn fixture_hello(version: u32) -> Hello {
    Hello {
        version,
        reads: if version == 1 { vec![1] } else { vec![1, 2] },
        release: "0.1.0".to_owned(),
        pid: 4242,
    }
}

fn fixture_answer(version: u32) -> Answer {
    Answer::Accept {
        version,
        release: "0.1.0".to_owned(),
        config: "workers: 2\ndataPorts: [7000]\n".to_owned(),
        workers: FIXTURE_WORKERS as u32,
        pid: 4141,
    }
}

const FIXTURE_RELEASED: Released = Released { gap_us: 12_345 };

/// Descriptors a fixture state names.
const FIXTURE_FDS: usize = 12;
const FIXTURE_WORKERS: usize = 2;

/// Session batches the fixture state announces: one per worker.
const FIXTURE_BATCHES: u32 = 2;

/// A state that touches every part of the format, as the new process holds it once its
/// session batches are in: listeners of each kind and transport, IPv4 and IPv6, sessions of
/// each kind with and without PROXY state, grants and ledger entries with tokens past 64 bits,
/// a default backend. Its descriptors: listeners 0..6, pools 6..10, query 10, admin 11.
fn fixture_state(version: u32) -> State {
    let listener = |id: u16, transport, addr: &str, kind, fds: [u32; 2]| WireListener {
        id,
        owner: format!("fixture listener {id}"),
        transport,
        addr: addr.parse().unwrap(),
        kind,
        idle_timeout_ms: 30_000 * u64::from(id + 1),
        fds: fds.to_vec(),
        closing: false,
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
    let mut state = State {
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
        session_batches: FIXTURE_BATCHES,
        default: Some(WireBackend {
            id: 44,
            addrs: vec![None, Some("[2001:db8::8]:7777".parse().unwrap())],
            proxy: WireProxyMode::V2First,
        }),
    };
    if version >= 2 {
        // Format 2 keeps what format 1's text drops: a link-local client's interface and a
        // flow label.
        let client = SocketAddrV6::new("fe80::1".parse().unwrap(), 5004, 0, 3).into();
        state.workers[0].sessions.push(WireSession {
            client,
            reply_to: client,
            target: SocketAddrV6::new("2001:db8::7".parse().unwrap(), 7777, 0xbeef, 0).into(),
            ..session(1, "[fe80::1]:5004", WireSessionKind::Forwarder, 1, None)
        });
    }
    state
}

/// The fixture state as it travels: its sessions moved out into batches of one worker each,
/// as the old process sends them.
fn fixture_wire(version: u32) -> (State, Vec<SessionBatch>) {
    let mut state = fixture_state(version);
    let batches: Vec<SessionBatch> = state
        .workers
        .iter_mut()
        .enumerate()
        .map(|(worker, w)| SessionBatch {
            worker: worker as u32,
            sessions: std::mem::take(&mut w.sessions),
        })
        .collect();
    assert_eq!(batches.len(), FIXTURE_BATCHES as usize);
    (state, batches)
}

fn fixture_path(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/handoff-v{version}.bin"))
}

fn json(message: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(message).unwrap()
}

/// The frames of the fixture exchange in format `version`, in order, descriptors counted in
/// the headers.
fn fixture_stream(version: u32) -> Vec<u8> {
    let (state, batches) = fixture_wire(version);
    let mut messages = vec![
        (json(&fixture_hello(version)), 0),
        (json(&fixture_answer(version)), 0),
        (json(&Decision::Proceed), 0),
        (json(&state), FIXTURE_FDS),
    ];
    messages.extend(
        batches
            .iter()
            .map(|batch| (encode_batch(version, batch).unwrap(), 0)),
    );
    messages.push((json(&Taken), 0));
    messages.push((json(&FIXTURE_RELEASED), 0));
    messages
        .iter()
        .flat_map(|(json, fds)| encode_message(json, *fds).unwrap())
        .collect()
}

/// The next message of the stream, as a `T` (parsed as the receiving side would).
fn next<T: DeserializeOwned>(messages: &mut impl Iterator<Item = RawMessage>) -> (T, usize) {
    let message = messages.next().expect("the stream ended early");
    let value = serde_json::from_slice(&message.bytes).unwrap_or_else(|e| {
        panic!(
            "{e}: {} as {}",
            String::from_utf8_lossy(&message.bytes),
            std::any::type_name::<T>()
        )
    });
    (value, message.fds)
}

#[test]
fn fixture_of_each_format_read_reads_back() {
    if std::env::var_os("UPDATE_HANDOFF_FIXTURE").is_some_and(|v| v == "1") {
        write_fixture_and_seeds();
    }
    assert_eq!(
        RECORDED, READS,
        "a recorded stream for every format this release reads"
    );
    for &version in RECORDED {
        read_back(version);
    }
}

fn read_back(version: u32) {
    let bytes = std::fs::read(fixture_path(version)).unwrap();
    let mut messages = decode_stream(&bytes).unwrap().into_iter();

    let (hello, fds): (Hello, _) = next(&mut messages);
    assert_eq!((&hello, fds), (&fixture_hello(version), 0));
    let (answer, fds): (Answer, _) = next(&mut messages);
    assert_eq!((&answer, fds), (&fixture_answer(version), 0));
    let Answer::Accept {
        version, workers, ..
    } = answer
    else {
        panic!("refused");
    };
    // Each side reads what the other writes.
    assert!(hello.reads.contains(&version), "{hello:?} {version}");
    assert!(accepts_version(version), "version {version}");
    assert!(accepts_version(hello.version), "version {}", hello.version);
    let (decision, fds): (Decision, _) = next(&mut messages);
    assert_eq!((decision, fds), (Decision::Proceed, 0));

    let (mut state, fds): (State, _) = next(&mut messages);
    let (wire_state, wire_batches) = fixture_wire(version);
    assert_eq!((&state, fds), (&wire_state, FIXTURE_FDS));
    let bounds = limits(version).unwrap();
    assert!(state.session_batches <= bounds.batches);
    let mut batches = Vec::new();
    for _ in 0..state.session_batches {
        let message = messages.next().expect("the stream ended early");
        let batch = decode_batch(version, &message.bytes).unwrap();
        assert_eq!(message.fds, 0);
        assert!(batch.sessions.len() <= bounds.sessions_per_batch);
        batches.push(batch.clone());
        state.workers[batch.worker as usize]
            .sessions
            .extend(batch.sessions);
    }
    assert_eq!(batches, wire_batches);
    assert_eq!(state, fixture_state(version));
    state.check(workers as usize, fds).unwrap();
    assert_eq!(workers as usize, FIXTURE_WORKERS);

    let (Taken, fds) = next(&mut messages);
    assert_eq!(fds, 0);
    let (released, fds): (Released, _) = next(&mut messages);
    assert_eq!((released, fds), (FIXTURE_RELEASED, 0));
    assert_eq!(messages.next(), None, "messages after Released");
}

/// A State written without the session batch count and the default backend (an older writer of
/// format 1) parses, with no batches and no default backend.
#[test]
fn state_without_the_newer_fields_parses() {
    let older = State {
        session_batches: 0,
        default: None,
        ..fixture_state(1)
    };
    // Through text: the tokens are past what a `serde_json::Value` holds.
    let json = serde_json::to_string(&older).unwrap();
    let json = json
        .strip_suffix(r#","session_batches":0,"default":null}"#)
        .expect("the newer fields come last")
        .to_owned()
        + "}";
    assert!(!json.contains("session_batches") && !json.contains("default"));
    let state: State = serde_json::from_str(&json).unwrap();
    assert_eq!(state, older);
}

/// The current format's fixture, and a fuzz seed of it.
fn write_fixture_and_seeds() {
    let stream = fixture_stream(VERSION);
    std::fs::create_dir_all(fixture_path(VERSION).parent().unwrap()).unwrap();
    std::fs::write(fixture_path(VERSION), &stream).unwrap();
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/handoff_stream");
    std::fs::create_dir_all(&seeds).unwrap();
    std::fs::write(seeds.join(format!("seed-v{VERSION}-exchange")), &stream).unwrap();
}
