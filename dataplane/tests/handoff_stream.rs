//! The hand-off stream over real Unix sockets: the whole exchange, with a full state, hundreds
//! of real descriptors and the sessions in batches, round-trips (the descriptors that arrive
//! are the sockets that were sent), and a peer that closes, stalls, lies about sizes or
//! descriptor counts, or sends garbage gets an error in bounded time, never a hang, a panic or
//! a leaked descriptor. (The recorded stream of the format is `handoff_fixture.rs`'s.)

use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use dataplane::handoff::new::hello;
use dataplane::handoff::stream::{
    Channel, FrameHeader, HEADER_LEN, MAX_FDS_PER_FRAME, MAX_FDS_PER_MESSAGE,
    MAX_FRAME_PAYLOAD_BYTES, MAX_MESSAGE_BYTES, Reassembler, StreamError, decode_stream,
    encode_message,
};
use dataplane::handoff::wire::{
    Answer, Decision, FORMAT_2, Hello, READS, Released, SessionBatch, State, Taken, VERSION,
    WireListener, WireListenerKind, WirePoolSocket, WireProxyState, WireSession, WireSessionKind,
    WireStats, WireTransport, WireWorker, accepts_version, decode_batch, encode_batch, limits,
};

const TIMEOUT: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(200);

fn pair(timeout: Duration) -> (Channel, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Channel::new(a, timeout).unwrap(),
        Channel::new(b, timeout).unwrap(),
    )
}

/// The old process's answer in format `version`: it runs `workers` workers.
fn accept(version: u32, workers: usize) -> Answer {
    Answer::Accept {
        version,
        release: "0.1.0".to_owned(),
        config: format!("workers: {workers}\n"),
        workers: workers as u32,
        pid: 4141,
    }
}

/// Moves `state`'s sessions out into batches of at most `per_batch` sessions of one worker
/// each, as the old process sends them, and announces them in the state.
fn into_batches(state: &mut State, per_batch: usize) -> Vec<SessionBatch> {
    let mut batches = Vec::new();
    for (worker, w) in state.workers.iter_mut().enumerate() {
        for chunk in std::mem::take(&mut w.sessions).chunks(per_batch) {
            batches.push(SessionBatch {
                worker: worker as u32,
                sessions: chunk.to_vec(),
            });
        }
    }
    state.session_batches = batches.len() as u32;
    batches
}

/// The old side of the exchange: answers the Hello, waits for the decision, sends `state` with
/// `fds` and then `batches`, waits for Taken and says Released.
fn hand_over(
    old: &mut Channel,
    workers: usize,
    state: &State,
    fds: &[BorrowedFd<'_>],
    batches: &[SessionBatch],
) {
    offer(old, VERSION, workers, state, fds, batches);
    let (Taken, taken_fds) = old.recv().unwrap();
    assert!(taken_fds.is_empty());
    old.send(&Released { gap_us: 1000 }, &[]).unwrap();
}

/// The old side up to the state: answers the Hello in format `version`, waits for the
/// decision, sends `state` with `fds` and then `batches` written in that format.
fn offer(
    old: &mut Channel,
    version: u32,
    workers: usize,
    state: &State,
    fds: &[BorrowedFd<'_>],
    batches: &[SessionBatch],
) {
    let (got, hello_fds): (Hello, _) = old.recv().unwrap();
    assert_eq!((&got, hello_fds.len()), (&hello(), 0));
    assert!(got.reads.contains(&version), "{got:?}");
    old.send(&accept(version, workers), &[]).unwrap();
    let (decision, _): (Decision, _) = old.recv().unwrap();
    assert_eq!(decision, Decision::Proceed);
    old.send(state, fds).unwrap();
    for batch in batches {
        let bytes = encode_batch(version, batch).unwrap();
        old.send_bytes(&bytes, &[]).unwrap();
    }
}

/// The new side of the exchange up to the state: says Hello, reads the Accept, proceeds, and
/// reads the state and its batches, the sessions put back into their workers. The state is
/// checked against the worker count of the Accept and the descriptors that came.
fn take_over(new: &mut Channel) -> (State, Vec<OwnedFd>) {
    new.send(&hello(), &[]).unwrap();
    let (answer, _): (Answer, _) = new.recv().unwrap();
    let Answer::Accept {
        version, workers, ..
    } = answer
    else {
        panic!("refused: {answer:?}");
    };
    assert!(accepts_version(version));
    let bounds = limits(version).unwrap();
    new.send(&Decision::Proceed, &[]).unwrap();
    let (mut state, fds): (State, Vec<OwnedFd>) = new.recv().unwrap();
    assert!(state.session_batches <= bounds.batches);
    for _ in 0..state.session_batches {
        let (bytes, extra) = new.recv_bytes().unwrap();
        let batch = decode_batch(version, &bytes).unwrap();
        assert!(extra.is_empty());
        assert!(batch.sessions.len() <= bounds.sessions_per_batch);
        state.workers[batch.worker as usize]
            .sessions
            .extend(batch.sessions);
    }
    state.check(workers as usize, fds.len()).unwrap();
    (state, fds)
}

/// The end of the exchange on the new side: Taken, then the old side's Released.
fn finish(new: &mut Channel) {
    new.send(&Taken, &[]).unwrap();
    let (Released { gap_us }, fds) = new.recv().unwrap();
    assert_eq!((gap_us, fds.len()), (1000, 0));
}

fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

/// `n` sessions spread over `workers` workers, on listeners `0..listeners` and pool numbers
/// `0, 2, ..` below `2 * pools`.
fn sessions(n: usize, workers: usize, listeners: u16, pools: u32) -> Vec<Vec<WireSession>> {
    let mut all = vec![Vec::new(); workers];
    for i in 0..n {
        let client: SocketAddr =
            format!("10.{}.{}.{}:{}", i % 200, (i / 200) % 200, i % 7, 1024 + i)
                .parse()
                .unwrap();
        all[i % workers].push(WireSession {
            listener: (i % usize::from(listeners)) as u16,
            client,
            reply_to: client,
            local: Some("127.0.0.1".parse().unwrap()),
            target: "10.200.0.1:7777".parse().unwrap(),
            backend: i as u64,
            kind: WireSessionKind::Token,
            pool: (i as u32 % pools) * 2,
            age_ms: 60_000,
            idle_ms: 5,
            idle_timeout_ms: 300_000,
            stats: WireStats {
                packets_upstream: 10,
                bytes_upstream: 1000,
                packets_downstream: 12,
                bytes_downstream: 1200,
            },
            proxy: None,
        });
    }
    all
}

/// The inode of the socket behind `fd`, as `/proc/self/fd` shows it.
fn socket_inode(fd: BorrowedFd<'_>) -> String {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    link.to_string_lossy().into_owned()
}

/// How many descriptors of this process refer to one of `sockets` (by inode, so descriptors
/// other tests open meanwhile do not count).
fn open_copies(sockets: &HashSet<String>) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| sockets.contains(link.to_string_lossy().as_ref()))
        .count()
}

/// Writes `bytes` with one `sendmsg`, `fds` attached: for peers that break the framing.
fn send_raw(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut control = [0u64; 64];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = (fds.len() * size_of::<libc::c_int>()) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: at most a few descriptors, far within `control` (512 bytes); the writes go
        // through CMSG_FIRSTHDR/CMSG_DATA of that buffer.
        unsafe {
            assert!(libc::CMSG_SPACE(len) as usize <= size_of_val(&control));
            msg.msg_controllen = libc::CMSG_SPACE(len) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov`, `bytes` and `control`, alive for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// A receiving channel and the raw stream of its peer.
fn raw_peer(timeout: Duration) -> (Channel, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Channel::new(a, timeout).unwrap(), b)
}

fn header(last: bool, fds: u16, payload_len: u32) -> [u8; HEADER_LEN] {
    FrameHeader {
        last,
        fds,
        payload_len,
    }
    .encode()
}

#[test]
fn full_state_with_real_descriptors_round_trips() {
    const WORKERS: usize = 4;
    const LISTENERS: u16 = 100;
    const POOLS: u32 = 48;
    // Index i of `sent` is descriptor i of the state.
    let mut sent: Vec<OwnedFd> = Vec::new();
    let mut listeners = Vec::new();
    for id in 0..LISTENERS {
        let fds = (0..WORKERS)
            .map(|_| {
                sent.push(udp().into());
                sent.len() as u32 - 1
            })
            .collect();
        listeners.push(WireListener {
            id,
            owner: format!("forwarder default/game-{id}"),
            transport: WireTransport::Udp,
            addr: "0.0.0.0:7000".parse().unwrap(),
            kind: WireListenerKind::TokenPort,
            idle_timeout_ms: 300_000,
            fds,
            closing: false,
        });
    }
    let workers = sessions(10_000, WORKERS, LISTENERS, POOLS)
        .into_iter()
        .map(|sessions| WireWorker {
            pools: (0..POOLS)
                .map(|n| {
                    let socket = udp();
                    let port = socket.local_addr().unwrap().port();
                    sent.push(socket.into());
                    WirePoolSocket {
                        number: n * 2,
                        port,
                        fd: sent.len() as u32 - 1,
                    }
                })
                .collect(),
            sessions,
        })
        .collect();
    let query = TcpListener::bind("127.0.0.1:0").unwrap();
    let query_addr = query.local_addr().unwrap();
    sent.push(query.into());
    let admin = udp();
    sent.push(admin.into());
    let state = State {
        release: "0.1.0".to_owned(),
        listeners,
        workers,
        query_fd: Some(sent.len() as u32 - 2),
        admin_fd: Some(sent.len() as u32 - 1),
        ..State::default()
    };
    assert!(
        sent.len() > 2 * MAX_FDS_PER_FRAME,
        "descriptors on three frames"
    );
    state.check(WORKERS, sent.len()).unwrap();
    let local_addrs: Vec<SocketAddr> = sent
        .iter()
        .map(|fd| {
            socket2::SockRef::from(fd)
                .local_addr()
                .unwrap()
                .as_socket()
                .unwrap()
        })
        .collect();
    let json_len = serde_json::to_vec(&state).unwrap().len();
    eprintln!("state of 10,000 sessions: {json_len} bytes of JSON");
    // Several batches per worker (smaller ones than the old process sends, so that a worker's
    // sessions span a few).
    let mut expected = state.clone();
    let mut on_the_wire = state;
    let batches = into_batches(&mut on_the_wire, 1_000);
    assert_eq!(batches.len(), 12);
    expected.session_batches = 12;

    let (mut old, mut new) = pair(TIMEOUT);
    let old_side = thread::spawn(move || {
        let borrowed: Vec<BorrowedFd<'_>> = sent.iter().map(AsFd::as_fd).collect();
        hand_over(&mut old, WORKERS, &on_the_wire, &borrowed, &batches);
    });
    let (got, fds) = take_over(&mut new);
    assert_eq!(got, expected);
    assert_eq!(fds.len(), local_addrs.len());
    for (i, (fd, addr)) in fds.iter().zip(&local_addrs).enumerate() {
        let local = socket2::SockRef::from(fd).local_addr().unwrap();
        assert_eq!(local.as_socket(), Some(*addr), "descriptor {i}");
    }
    // The query socket is still listening: a client gets through the received descriptor.
    let query = TcpListener::from(fds[got.query_fd.unwrap() as usize].try_clone().unwrap());
    let _client = std::net::TcpStream::connect(query_addr).unwrap();
    query.accept().unwrap();
    finish(&mut new);
    old_side.join().unwrap();
}

#[test]
fn a_full_batch_of_the_largest_sessions_fits_one_message() {
    // The flow label does not travel (an address is its text); the scope id does.
    let widest = SocketAddr::from(SocketAddrV6::new(
        Ipv6Addr::from(u128::MAX),
        u16::MAX,
        0,
        u32::MAX,
    ));
    let session = WireSession {
        listener: u16::MAX,
        client: widest,
        reply_to: widest,
        local: Some(widest.ip()),
        target: widest,
        backend: u64::MAX,
        kind: WireSessionKind::Forwarder,
        pool: u32::MAX,
        age_ms: u64::MAX,
        idle_ms: u64::MAX,
        idle_timeout_ms: u64::MAX,
        stats: WireStats {
            packets_upstream: u64::MAX,
            bytes_upstream: u64::MAX,
            packets_downstream: u64::MAX,
            bytes_downstream: u64::MAX,
        },
        proxy: Some(WireProxyState {
            every: false,
            pending: false,
        }),
    };
    for &version in READS {
        let bounds = limits(version).unwrap();
        let batch = SessionBatch {
            worker: u32::MAX,
            sessions: vec![session.clone(); bounds.sessions_per_batch],
        };
        let bytes = encode_batch(version, &batch).unwrap();
        eprintln!(
            "a batch of {} of the largest sessions: {} bytes in format {version}",
            bounds.sessions_per_batch,
            bytes.len()
        );
        // Within the format's bound with room to spare (the bound is twice a full batch), and
        // so within the framing's.
        assert!(bytes.len() * 2 <= bounds.batch_bytes, "{}", bytes.len());
        assert!(bytes.len() <= MAX_MESSAGE_BYTES);
        let frames = encode_message(&bytes, 0).unwrap();
        let back = decode_stream(&frames).unwrap();
        assert_eq!(back.len(), 1);
        // Not `assert_eq!`: a difference would print both batches.
        assert!(decode_batch(version, &back[0].bytes).unwrap() == batch);
    }
}

/// A fresh directory for a socket path.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("udp-director-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn exchange_over_a_socket_path() {
    let dir = temp_dir("handoff-stream");
    let path = dir.join("handoff.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let sockets: Vec<UdpSocket> = (0..3).map(|_| udp()).collect();
    let ports: Vec<u16> = sockets
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let old_side = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut old = Channel::new(stream, TIMEOUT).unwrap();
        let mut state = small_state();
        let batches = into_batches(&mut state, FORMAT_2.sessions_per_batch);
        assert_eq!(batches.len(), 1);
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
        hand_over(&mut old, 1, &state, &fds, &batches);
        // The new process is done with the channel: the old one sees it close.
        assert!(matches!(old.recv::<Taken>(), Err(StreamError::Closed)));
    });
    let mut new = Channel::new(connect(&path), TIMEOUT).unwrap();
    let (state, fds) = take_over(&mut new);
    assert_eq!(
        state,
        State {
            session_batches: 1,
            ..small_state()
        }
    );
    assert_eq!(fds.len(), 3);
    let got: Vec<u16> = fds
        .into_iter()
        .map(|fd| UdpSocket::from(fd).local_addr().unwrap().port())
        .collect();
    assert_eq!(got, ports);
    finish(&mut new);
    drop(new);
    old_side.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// This release's own `take_over` reads a predecessor writing each format it reads: the
/// previous release's (session batches as JSON) as well as its own.
#[test]
fn take_over_reads_each_format_a_predecessor_writes() {
    for &version in READS {
        let dir = temp_dir(&format!("handoff-format-{version}"));
        let path = dir.join("handoff.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let sockets: Vec<UdpSocket> = (0..3).map(|_| udp()).collect();
        let old_side = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut old = Channel::new(stream, TIMEOUT).unwrap();
            let mut state = small_state();
            let batches = into_batches(&mut state, FORMAT_2.sessions_per_batch);
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
            offer(&mut old, version, 1, &state, &fds, &batches);
            // Installing and committing need a data plane: the successor hangs up instead.
            assert!(matches!(old.recv::<Taken>(), Err(StreamError::Closed)));
        });
        let vet = |_: &str| Ok(());
        let inheritance = dataplane::handoff::new::take_over(&path, 1, &vet)
            .unwrap_or_else(|e| panic!("format {version}: {e}"))
            .expect("a predecessor on the socket");
        let sessions = small_state().workers[0].sessions.len();
        assert_eq!(inheritance.sessions(), sessions, "format {version}");
        drop(inheritance);
        old_side.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// One worker, one listener (descriptor 0) and two pool sockets (1, 2), a hundred sessions.
fn small_state() -> State {
    State {
        release: "0.1.0".to_owned(),
        listeners: vec![WireListener {
            id: 0,
            owner: "data port 7000".to_owned(),
            transport: WireTransport::Udp,
            addr: "0.0.0.0:7000".parse().unwrap(),
            kind: WireListenerKind::TokenPort,
            idle_timeout_ms: 300_000,
            fds: vec![0],
            closing: false,
        }],
        workers: sessions(100, 1, 1, 2)
            .into_iter()
            .map(|sessions| WireWorker {
                pools: (0..2)
                    .map(|n| WirePoolSocket {
                        number: n * 2,
                        port: 40_000,
                        fd: n + 1,
                    })
                    .collect(),
                sessions,
            })
            .collect(),
        ..State::default()
    }
}

fn connect(path: &Path) -> UnixStream {
    UnixStream::connect(path).unwrap()
}

#[test]
fn peer_closing_mid_message_is_an_error_and_leaks_nothing() {
    let sockets: Vec<UdpSocket> = (0..3).map(|_| udp()).collect();
    let inodes: HashSet<String> = sockets.iter().map(|s| socket_inode(s.as_fd())).collect();
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
    let json = br#"{"Refuse":{"reason":"x"}}"#;
    let cut_offs: [&dyn Fn(&UnixStream); 4] = [
        // A whole first frame with descriptors, then nothing.
        &|s| send_raw(s, &[&header(false, 3, 4)[..], b"{\"Re"].concat(), &fds),
        // Half a header.
        &|s| send_raw(s, &header(true, 0, 10)[..5], &[]),
        // A header and part of its payload, descriptors on the first byte.
        &|s| send_raw(s, &[&header(true, 3, 100)[..], &json[..10]].concat(), &fds),
        // A first frame, then half the next header.
        &|s| {
            send_raw(s, &[&header(false, 0, 4)[..], b"{\"Re"].concat(), &[]);
            send_raw(s, &header(true, 0, 4)[..7], &[]);
        },
    ];
    for (i, cut_off) in cut_offs.iter().enumerate() {
        let (mut channel, peer) = raw_peer(TIMEOUT);
        cut_off(&peer);
        drop(peer);
        let err = channel.recv::<Answer>().unwrap_err();
        assert!(
            matches!(err, StreamError::ClosedMidMessage),
            "case {i}: {err}"
        );
        assert!(matches!(
            channel.recv::<Answer>(),
            Err(StreamError::Unusable)
        ));
        drop(channel);
        assert_eq!(
            open_copies(&inodes),
            sockets.len(),
            "case {i}: a copy leaked"
        );
    }
    // Closed before a message began: a clean end.
    let (mut channel, peer) = raw_peer(TIMEOUT);
    drop(peer);
    assert!(matches!(channel.recv::<Answer>(), Err(StreamError::Closed)));
    // Sending to a closed peer is an error, not a SIGPIPE.
    let (mut channel, peer) = raw_peer(TIMEOUT);
    drop(peer);
    assert!(matches!(
        channel.send(&hello(), &[]),
        Err(StreamError::Closed)
    ));
}

#[test]
fn silent_or_stalled_peer_times_out() {
    let (mut channel, peer) = raw_peer(SHORT);
    let started = Instant::now();
    assert!(matches!(
        channel.recv::<Hello>(),
        Err(StreamError::TimedOut { .. })
    ));
    assert!(started.elapsed() < 10 * SHORT);
    // Nothing moved: the channel can still be used.
    send_raw(&peer, &encode_message(br#""Proceed""#, 0).unwrap(), &[]);
    assert_eq!(channel.recv::<Decision>().unwrap().0, Decision::Proceed);

    // Half a message, then a stall.
    send_raw(&peer, &header(true, 0, 100)[..], &[]);
    let started = Instant::now();
    assert!(matches!(
        channel.recv::<Hello>(),
        Err(StreamError::TimedOut { .. })
    ));
    assert!(started.elapsed() < 10 * SHORT);
    assert!(matches!(
        channel.recv::<Hello>(),
        Err(StreamError::Unusable)
    ));

    // A peer that trickles a byte at a time, each within the timeout, still fails within a
    // bound: the message must be complete within the timeout of its first byte.
    let (mut channel, peer) = raw_peer(SHORT);
    let trickle = thread::spawn(move || {
        for byte in header(true, 0, 1000) {
            // Fails once the receiver gave up and closed.
            if std::io::Write::write(&mut &peer, &[byte]).is_err() {
                return;
            }
            thread::sleep(SHORT / 2);
        }
    });
    let started = Instant::now();
    assert!(matches!(
        channel.recv::<Hello>(),
        Err(StreamError::TimedOut { .. })
    ));
    assert!(started.elapsed() < 10 * SHORT);
    drop(channel);
    trickle.join().unwrap();

    // A peer that does not read: the send fails once the socket buffer is full.
    let (mut channel, _peer) = raw_peer(SHORT);
    let big = "x".repeat(8 << 20);
    let started = Instant::now();
    assert!(matches!(
        channel.send(&big, &[]),
        Err(StreamError::TimedOut { .. })
    ));
    assert!(started.elapsed() < 10 * SHORT);
}

#[test]
fn oversized_announcements_are_refused() {
    for (bytes, what) in [
        (
            header(true, 0, MAX_FRAME_PAYLOAD_BYTES as u32 + 1),
            "payload",
        ),
        (header(true, 0, u32::MAX), "payload"),
        (header(true, MAX_FDS_PER_FRAME as u16 + 1, 0), "descriptors"),
        (header(true, u16::MAX, 0), "descriptors"),
    ] {
        let (mut channel, peer) = raw_peer(TIMEOUT);
        send_raw(&peer, &bytes, &[]);
        let err = channel.recv::<Hello>().unwrap_err();
        assert!(matches!(err, StreamError::TooLarge { .. }), "{what}: {err}");
        assert!(matches!(
            decode_stream(&bytes),
            Err(StreamError::TooLarge { .. })
        ));
    }

    // Frames each within bounds that add up past the message's.
    let mut reassembler = Reassembler::new();
    let chunk = vec![b' '; MAX_FRAME_PAYLOAD_BYTES];
    let full = FrameHeader {
        last: false,
        fds: 0,
        payload_len: chunk.len() as u32,
    };
    for _ in 0..MAX_MESSAGE_BYTES / MAX_FRAME_PAYLOAD_BYTES {
        assert_eq!(reassembler.push(&full, &chunk).unwrap(), None);
    }
    let one_more = FrameHeader {
        last: true,
        fds: 0,
        payload_len: 1,
    };
    assert!(matches!(
        reassembler.push(&one_more, b" "),
        Err(StreamError::TooLarge { .. })
    ));
    let mut reassembler = Reassembler::new();
    let descriptors = FrameHeader {
        last: false,
        fds: MAX_FDS_PER_FRAME as u16,
        payload_len: 0,
    };
    let err = loop {
        if let Err(err) = reassembler.push(&descriptors, &[]) {
            break err;
        }
    };
    assert!(matches!(err, StreamError::TooLarge { .. }));

    // Our own messages: refused before a byte leaves.
    let (mut channel, peer) = raw_peer(SHORT);
    let huge = "x".repeat(MAX_MESSAGE_BYTES);
    assert!(matches!(
        channel.send(&huge, &[]),
        Err(StreamError::TooLarge { .. })
    ));
    let socket = udp();
    let many = vec![socket.as_fd(); MAX_FDS_PER_MESSAGE + 1];
    assert!(matches!(
        channel.send(&(), &many),
        Err(StreamError::TooLarge { .. })
    ));
    peer.set_nonblocking(true).unwrap();
    let err = std::io::Read::read(&mut &peer, &mut [0; 16]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    channel.send(&(), &[]).unwrap();
}

#[test]
fn garbage_is_malformed_or_bad_json() {
    let mut unknown_flag = header(true, 0, 0);
    unknown_flag[4] |= 0x80;
    let mut reserved = header(true, 0, 0);
    reserved[5] = 1;
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0; HEADER_LEN],
        unknown_flag.to_vec(),
        reserved.to_vec(),
        // A non-last frame that carries nothing.
        header(false, 0, 0).to_vec(),
    ] {
        let (mut channel, peer) = raw_peer(TIMEOUT);
        send_raw(&peer, &bytes, &[]);
        let err = channel.recv::<Hello>().unwrap_err();
        assert!(matches!(err, StreamError::Malformed(_)), "{err}");
        assert!(matches!(
            decode_stream(&bytes),
            Err(StreamError::Malformed(_))
        ));
    }
    for json in [
        &b"not json"[..],
        b"{\"version\":1",
        br#"{"Accept":1}"#,
        // A Hello without the formats it reads.
        br#"{"version":1,"release":"0.1.0","pid":1}"#,
        b"\xff\xfe",
    ] {
        let (mut channel, peer) = raw_peer(TIMEOUT);
        send_raw(&peer, &encode_message(json, 0).unwrap(), &[]);
        assert!(matches!(channel.recv::<Hello>(), Err(StreamError::Json(_))));
        // The frame was whole: the next message reads.
        send_raw(&peer, &encode_message(br#""Proceed""#, 0).unwrap(), &[]);
        assert_eq!(channel.recv::<Decision>().unwrap().0, Decision::Proceed);
    }
    // The wrong message, with descriptors: refused, and they are closed.
    let sockets: Vec<UdpSocket> = (0..2).map(|_| udp()).collect();
    let inodes: HashSet<String> = sockets.iter().map(|s| socket_inode(s.as_fd())).collect();
    let (mut sender, mut receiver) = pair(TIMEOUT);
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
    sender.send(&hello(), &fds).unwrap();
    assert!(matches!(
        receiver.recv::<State>(),
        Err(StreamError::Json(_))
    ));
    assert_eq!(open_copies(&inodes), sockets.len());
}

#[test]
fn descriptor_count_must_match_its_header() {
    let sockets: Vec<UdpSocket> = (0..2).map(|_| udp()).collect();
    let inodes: HashSet<String> = sockets.iter().map(|s| socket_inode(s.as_fd())).collect();
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
    let json = br#""Proceed""#;
    for (announced, attached) in [(2u16, 1usize), (0, 1), (1, 2)] {
        let (mut channel, peer) = raw_peer(TIMEOUT);
        let mut bytes = header(true, announced, json.len() as u32).to_vec();
        bytes.extend_from_slice(json);
        send_raw(&peer, &bytes, &fds[..attached]);
        let err = channel.recv::<Decision>().unwrap_err();
        assert!(
            matches!(err, StreamError::DescriptorCount { .. }),
            "{announced} announced, {attached} attached: {err}"
        );
        drop(channel);
        assert_eq!(open_copies(&inodes), sockets.len());
    }
    // Descriptors that come with the second frame count for the second frame.
    let (mut channel, peer) = raw_peer(TIMEOUT);
    send_raw(&peer, &[&header(false, 0, 1)[..], b"\""].concat(), &[]);
    send_raw(
        &peer,
        &[&header(true, 2, 8)[..], b"Proceed\""].concat(),
        &fds,
    );
    let (decision, got) = channel.recv::<Decision>().unwrap();
    assert_eq!((decision, got.len()), (Decision::Proceed, 2));
}
