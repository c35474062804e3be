//! The traffic of a `handoff` round: the backends, the client sockets (one session each) and
//! the threads that read their replies.
//!
//! Every datagram carries `kind | session | sequence` and room for the backend to write the
//! source port it saw: a session the proxy lost and opened again (a forwarder opens one for any
//! client) would reach the game server from another port, a new player to it, so a reply says
//! which port its datagram left from. Replies are read on a few threads over epoll (mio, edge
//! triggered), each owning a share of the sockets, and every reply is kept with the time it was
//! read; what they mean is worked out after the round (`figures`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::echo::MultiEcho;

/// A datagram's kind, its first byte.
pub(super) const SETUP: u8 = 0;
pub(super) const LOAD: u8 = 1;
pub(super) const CHECK: u8 = 2;
/// `kind (1) | session (4) | sequence (8) | source port the backend saw (2)`.
pub(super) const HEADER: usize = 15;
const PORT_AT: usize = 13;

/// The backends: echo sockets, each reply with the source port of its datagram written at
/// `PORT_AT`.
pub(super) fn backends(count: usize) -> anyhow::Result<MultiEcho> {
    MultiEcho::start(count, |reply, from| {
        if let Some(port) = reply.get_mut(PORT_AT..PORT_AT + 2) {
            port.copy_from_slice(&from.port().to_be_bytes());
        }
    })
}

/// A reply as a receiver read it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reply {
    pub(super) kind: u8,
    /// The socket it came in on.
    pub(super) session: u32,
    pub(super) seq: u64,
    /// The source port the backend saw.
    pub(super) port: u16,
    /// Nanoseconds since the round's origin.
    pub(super) at: u64,
}

/// What one receiver thread read.
#[derive(Debug, Default)]
pub(super) struct Received {
    pub(super) replies: Vec<Reply>,
    /// Replies on a socket other than their session's, or too short to be ours.
    pub(super) misdelivered: u64,
    /// Errors a socket reported (an ICMP error queued on it, say).
    pub(super) errors: u64,
}

/// A receiver's poll and the sessions registered with it.
pub(super) type Share = (mio::Poll, Vec<usize>);

/// The client sockets, one session each, connected to their forwarder.
#[derive(Debug)]
pub(super) struct Clients {
    sockets: Vec<mio::net::UdpSocket>,
    origin: Instant,
    size: usize,
    /// Per session: bit `1 << kind` once a reply of that kind came back (setup, check).
    answered: Vec<AtomicU8>,
    stop: AtomicBool,
    send_errors: AtomicU64,
}

impl Clients {
    /// Opens `count` sockets, socket `i` connected to `targets[i % targets.len()]`, spread over
    /// `threads` polls (one per receiver).
    pub(super) fn open(
        count: usize,
        targets: &[SocketAddr],
        threads: usize,
        size: usize,
        origin: Instant,
    ) -> anyhow::Result<(Self, Vec<Share>)> {
        let mut polls: Vec<Share> = (0..threads.max(1))
            .map(|_| Ok((mio::Poll::new()?, Vec::new())))
            .collect::<std::io::Result<_>>()?;
        let mut sockets = Vec::with_capacity(count);
        for i in 0..count {
            let mut s = mio::net::UdpSocket::bind("127.0.0.1:0".parse()?)
                .with_context(|| format!("client socket {i} of {count}"))?;
            s.connect(targets[i % targets.len()])?;
            let slot = i % polls.len();
            polls[slot]
                .0
                .registry()
                .register(&mut s, mio::Token(i), mio::Interest::READABLE)?;
            polls[slot].1.push(i);
            sockets.push(s);
        }
        let clients = Self {
            answered: (0..count).map(|_| AtomicU8::new(0)).collect(),
            sockets,
            origin,
            size: size.max(HEADER),
            stop: AtomicBool::new(false),
            send_errors: AtomicU64::new(0),
        };
        Ok((clients, polls))
    }

    pub(super) fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Nanoseconds from the round's origin to `t`.
    pub(super) fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sends that failed (counted as sent; their datagrams are lost).
    pub(super) fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    /// Ends the receivers' loops.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn send(&self, session: usize, kind: u8, seq: u64, buf: &mut [u8]) {
        buf[0] = kind;
        buf[1..5].copy_from_slice(&(session as u32).to_be_bytes());
        buf[5..13].copy_from_slice(&seq.to_be_bytes());
        buf[PORT_AT..PORT_AT + 2].fill(0);
        if self.sockets[session].send(buf).is_err() {
            self.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A receiver: reads the sockets of `poll` until [`Self::stop`], keeping every reply.
    pub(super) fn receive(&self, mut poll: mio::Poll, mine: &[usize]) -> Received {
        let mut out = Received {
            replies: Vec::with_capacity(mine.len() * 3),
            ..Received::default()
        };
        let mut events = mio::Events::with_capacity(1024);
        let mut buf = vec![0u8; 65536];
        while !self.stop.load(Ordering::Relaxed) {
            if poll
                .poll(&mut events, Some(Duration::from_millis(10)))
                .is_err()
            {
                continue;
            }
            for event in &events {
                let i = event.token().0;
                let mut errors = 0;
                // Edge triggered: read until the socket is empty. An error (a queued ICMP
                // error) is reported once and reading goes on; a few in a row end it.
                loop {
                    match self.sockets[i].recv(&mut buf) {
                        Ok(n) => self.note(i, &buf[..n], &mut out),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            out.errors += 1;
                            errors += 1;
                            if errors > 16 {
                                break;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn note(&self, socket: usize, reply: &[u8], out: &mut Received) {
        let at = self.ns(Instant::now());
        let session = reply
            .get(1..5)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes);
        if reply.len() < HEADER || session != Some(socket as u32) {
            out.misdelivered += 1;
            return;
        }
        let kind = reply[0];
        if kind == SETUP || kind == CHECK {
            self.answered[socket].fetch_or(1 << kind, Ordering::Relaxed);
        }
        out.replies.push(Reply {
            kind,
            session: socket as u32,
            seq: u64::from_be_bytes(reply[5..13].try_into().unwrap_or_default()),
            port: u16::from_be_bytes([reply[PORT_AT], reply[PORT_AT + 1]]),
            at,
        });
    }

    /// One datagram of `kind` per session, `batch` at a time, each batch's replies awaited
    /// (up to `wait`): the sessions are opened (setup) or checked at the pace the proxy
    /// answers, not all at once. Those unanswered get `retries` more tries, each awaited
    /// for a second. Returns the sessions answered at the first try and in all.
    pub(super) fn exchange_all(
        &self,
        kind: u8,
        batch: usize,
        wait: Duration,
        retries: u64,
    ) -> (usize, usize) {
        let bit = 1 << kind;
        let done = |i: usize| self.answered[i].load(Ordering::Relaxed) & bit != 0;
        let mut buf = vec![0u8; self.size];
        let all: Vec<usize> = (0..self.len()).collect();
        for chunk in all.chunks(batch.max(1)) {
            for &i in chunk {
                self.send(i, kind, 0, &mut buf);
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline && !chunk.iter().all(|&i| done(i)) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Late replies of the last batch.
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !all.iter().all(|&i| done(i)) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let first = all.iter().filter(|&&i| done(i)).count();
        for attempt in 1..=retries {
            let missing: Vec<usize> = all.iter().copied().filter(|&i| !done(i)).collect();
            if missing.is_empty() {
                break;
            }
            for chunk in missing.chunks(batch.max(1)) {
                for &i in chunk {
                    self.send(i, kind, attempt, &mut buf);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline && !missing.iter().all(|&i| done(i)) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        (first, all.iter().filter(|&&i| done(i)).count())
    }

    /// The load: `rate` datagrams per second in all from `start` until `end`, datagram `k` to
    /// session `k % sessions` with sequence `k`, each sent when due (late ones at once, so a
    /// stall of this thread shows as a burst, not as fewer datagrams). Returns each
    /// datagram's send time (ns since the origin), indexed by sequence.
    pub(super) fn load(&self, rate: f64, start: Instant, end: Instant) -> Vec<u64> {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let expected = (end.saturating_duration_since(start).as_secs_f64() * rate) as usize;
        let mut sent = Vec::with_capacity(expected + 1);
        let mut buf = vec![0u8; self.size];
        loop {
            let k = sent.len();
            let due = start + interval.mul_f64(k as f64);
            if due >= end {
                return sent;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            self.send(k % self.len(), LOAD, k as u64, &mut buf);
            sent.push(self.ns(Instant::now()));
        }
    }
}
