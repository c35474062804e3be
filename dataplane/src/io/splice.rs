//! The bidirectional splice between a client's TCP connection and its backend connection.
//!
//! Each direction is a [`Pipe`]: bytes move socket → kernel pipe → socket with `splice(2)`,
//! never entering user space, once what was read before the splice began (a token-first
//! connection's prefix, a PROXY header) and the token's line ending on the first bytes are
//! dealt with in user space. A direction holds a kernel pipe (from its worker's pool, see
//! [`super::pipe`]) only while bytes are in it, so an idle connection costs two descriptors, not
//! six; when the pool has none to give, that read copies through a user-space buffer instead,
//! with the same behaviour.
//!
//! A direction reads only while its pipe (or buffer) is empty and drains only as fast as the
//! destination takes it, so a slow reader stops the proxy reading from the writer (TCP
//! backpressure) instead of growing memory. A FIN in one direction is passed on as a
//! `shutdown(Write)` once that direction holds nothing more; the other direction keeps
//! flowing (half-close). Sockets are edge-triggered, so a pump runs until it meets
//! `WouldBlock` (a new edge will come) or its round bound (the worker then comes back to it
//! on the next loop turn).

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use super::pipe::{KernelPipe, PipePool};
use crate::policy::prefix::{LineEnd, finish_line_end};

/// Buffer of one direction of one connection when it copies through user space; allocated on
/// its first copy.
pub(crate) const PIPE_BYTES: usize = 64 * 1024;
/// Syscalls per direction per readiness event before other sockets get a turn.
const PUMP_ROUNDS: usize = 16;

/// How a pump ended.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Flow {
    /// Waiting on the source (nothing to read) or the destination (full): an event will come.
    Waiting,
    /// Hit the round bound with work left: call again on the next loop turn.
    Again,
    /// The source ended and its FIN was passed on: this direction is finished.
    Finished,
}

/// One direction of a splice.
#[derive(Debug, Default)]
pub(crate) struct Pipe {
    /// Bytes to send before any from the kernel pipe (read before the splice began, while the
    /// token's line ending was looked for, or when no pipe could be had).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The kernel pipe bytes are spliced through, held while it holds bytes.
    kernel: Option<KernelPipe>,
    /// The kernel will not splice these sockets: this direction copies.
    copies: bool,
    /// The source sent its FIN.
    eof: bool,
    /// The FIN was passed on to the destination.
    shut: bool,
    /// A token's line ending the first bytes may still hold (client → backend only).
    line_end: LineEnd,
    /// The source said `EAGAIN` and no readable edge came since.
    src_idle: bool,
    /// The destination said `EAGAIN` and no writable edge came since.
    dst_full: bool,
}

impl Pipe {
    /// A direction that starts with `data` (bytes read before the splice began) to send.
    pub(crate) fn with_data(data: &[u8], line_end: LineEnd, eof: bool) -> Self {
        Self {
            buf: data.to_vec(),
            end: data.len(),
            line_end,
            eof,
            ..Self::default()
        }
    }

    /// Whether this direction is finished (FIN passed on).
    pub(crate) fn finished(&self) -> bool {
        self.shut
    }

    /// Moves bytes from `src` to `dst` through a kernel pipe from `pipes`; `dst_ready` is
    /// false while `dst` is still connecting (bytes are read and held, not written); `edges`
    /// are what happened to `src` and `dst` since the last pump. Returns the bytes written to
    /// `dst`.
    pub(crate) fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        dst_ready: bool,
        edges: Edges,
        pipes: &PipePool,
    ) -> io::Result<(usize, Flow)> {
        self.src_idle &= !edges.from;
        self.dst_full &= !edges.to;
        let mut written = 0;
        for _ in 0..PUMP_ROUNDS {
            // What user space holds goes first, then what the kernel pipe holds: at most one
            // of them holds anything, and only once both are empty is the source read.
            if self.start < self.end {
                if !dst_ready || self.dst_full {
                    return Ok((written, Flow::Waiting));
                }
                match (&*dst).write(&self.buf[self.start..self.end]) {
                    Ok(n) => {
                        self.start += n;
                        written += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.dst_full = true;
                        return Ok((written, Flow::Waiting));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.start = 0;
            self.end = 0;
            if let Some(kernel) = self.kernel.as_mut().filter(|k| k.held() > 0) {
                if !dst_ready || self.dst_full {
                    return Ok((written, Flow::Waiting));
                }
                match kernel.drain_to(dst) {
                    Ok(n) => {
                        written += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.dst_full = true;
                        return Ok((written, Flow::Waiting));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if self.eof {
                if !self.shut && dst_ready {
                    match dst.shutdown(Shutdown::Write) {
                        // The peer is gone already: nothing left to tell it.
                        Ok(()) | Err(_) => self.shut = true,
                    }
                    // This direction carries nothing more.
                    self.buf = Vec::new();
                }
                return Ok((
                    written,
                    if self.shut {
                        Flow::Finished
                    } else {
                        Flow::Waiting
                    },
                ));
            }
            if self.src_idle {
                return Ok((written, Flow::Waiting));
            }
            let read = if self.line_end != LineEnd::Done || self.copies {
                self.read_to_buf(src)
            } else {
                match self.kernel.take().or_else(|| pipes.take()) {
                    Some(kernel) => self.fill(kernel, src, pipes),
                    // No pipe to be had now: this read copies.
                    None => self.read_to_buf(src),
                }
            };
            match read {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.src_idle = true;
                    return Ok((written, Flow::Waiting));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((written, Flow::Again))
    }

    /// Splices from `src` into the (empty) kernel pipe `kernel`, which this direction keeps
    /// while it holds bytes and gives back to `pipes` otherwise.
    fn fill(
        &mut self,
        mut kernel: KernelPipe,
        src: &TcpStream,
        pipes: &PipePool,
    ) -> io::Result<()> {
        let filled = kernel.fill_from(src);
        if kernel.held() > 0 {
            self.kernel = Some(kernel);
        } else {
            pipes.put(kernel);
        }
        match filled {
            Ok(0) => self.eof = true,
            Ok(_) => {
                if !self.buf.is_empty() {
                    // What user space held is sent: the kernel pipe carries the rest.
                    self.buf = Vec::new();
                }
            }
            // This kernel will not splice these sockets: copy instead.
            Err(e) if is_unspliceable(&e) => self.copies = true,
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Reads from `src` into the (empty) user-space buffer, dropping a token's line ending
    /// from the first bytes.
    fn read_to_buf(&mut self, src: &TcpStream) -> io::Result<()> {
        if self.buf.len() < PIPE_BYTES {
            self.buf.resize(PIPE_BYTES, 0);
        }
        // With a held-back `\r`, read one byte further in so it can be put back in front.
        let offset = usize::from(self.line_end == LineEnd::AfterCr);
        match (&*src).read(&mut self.buf[offset..])? {
            0 => {
                if self.line_end == LineEnd::AfterCr {
                    // The stream ended right after `token\r`: the `\r` was data.
                    self.buf[0] = b'\r';
                    self.end = 1;
                }
                self.line_end = LineEnd::Done;
                self.eof = true;
            }
            n => {
                let (skip, put_back_cr, line_end) =
                    finish_line_end(self.line_end, &self.buf[offset..offset + n]);
                self.line_end = line_end;
                self.start = offset + skip;
                self.end = offset + n;
                if put_back_cr {
                    self.buf[0] = b'\r';
                    self.start = 0;
                }
            }
        }
        Ok(())
    }

    /// Gives this direction's kernel pipe back to `pipes` (closed instead if bytes are left
    /// in it).
    fn return_pipe(&mut self, pipes: &PipePool) {
        if let Some(kernel) = self.kernel.take() {
            pipes.put(kernel);
        }
    }
}

/// `splice(2)` errors that say these descriptors cannot be spliced at all (not that this
/// connection failed): the direction then copies.
fn is_unspliceable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// A client connection spliced to its backend connection.
#[derive(Debug)]
pub(crate) struct Splice {
    /// The client's connection, accepted on a TCP listener.
    pub(crate) client: TcpStream,
    /// The connection to the backend (connecting until `connected`).
    pub(crate) upstream: TcpStream,
    /// The two connections' descriptors, from the data plane's budget.
    _lease: crate::io::fd_budget::FdLease,
    /// The backend connection is established.
    pub(crate) connected: bool,
    /// Client → backend.
    up: Pipe,
    /// Backend → client.
    down: Pipe,
    /// Where the two directions take kernel pipes from and give them back to.
    pipes: PipePool,
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.up.return_pipe(&self.pipes);
        self.down.return_pipe(&self.pipes);
    }
}

/// The edges an event brought to one direction of a splice: its source became readable, or
/// its destination writable.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Edges {
    /// The source has something new (bytes, FIN, an error).
    pub(crate) from: bool,
    /// The destination has room again.
    pub(crate) to: bool,
}

/// The edges an event brought to a splice, by direction. A direction remembers that its source
/// said `EAGAIN` (or its destination did) and skips that `splice` until an edge says it could
/// go: sockets are edge-triggered, so no edge means it would only say `EAGAIN` again.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Ready {
    /// Client → backend.
    pub(crate) up: Edges,
    /// Backend → client.
    pub(crate) down: Edges,
}

impl Ready {
    /// No new edge: a new splice (nothing is known blocked yet) or one back for another turn
    /// after its work bound.
    pub(crate) const NO_EDGE: Self = Self {
        up: Edges {
            from: false,
            to: false,
        },
        down: Edges {
            from: false,
            to: false,
        },
    };
    /// Every edge: try everything once more.
    pub(crate) const EVERY_EDGE: Self = Self {
        up: Edges {
            from: true,
            to: true,
        },
        down: Edges {
            from: true,
            to: true,
        },
    };

    /// The edges `event` brings, on the client's connection (`on_client`) or the backend's.
    /// An error counts as every edge: the `splice` that meets it reports it.
    pub(crate) fn of(event: &mio::event::Event, on_client: bool) -> Self {
        if event.is_error() {
            return Self::EVERY_EDGE;
        }
        let readable = event.is_readable() || event.is_read_closed();
        let writable = event.is_writable() || event.is_write_closed();
        let (mut ready, (source_of, destination_of)) = (Self::NO_EDGE, (readable, writable));
        if on_client {
            ready.up.from = source_of;
            ready.down.to = destination_of;
        } else {
            ready.down.from = source_of;
            ready.up.to = destination_of;
        }
        ready
    }

    /// Both events' edges.
    #[cfg(test)]
    fn and(self, other: Self) -> Self {
        let or = |a: Edges, b: Edges| Edges {
            from: a.from || b.from,
            to: a.to || b.to,
        };
        Self {
            up: or(self.up, other.up),
            down: or(self.down, other.down),
        }
    }
}

/// What a splice did on one drive.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Driven {
    /// Bytes written to the backend.
    pub(crate) up: usize,
    /// Bytes written to the client.
    pub(crate) down: usize,
    /// Some direction hit its round bound: drive again next turn.
    pub(crate) again: bool,
    /// Both directions are finished: the connection is over.
    pub(crate) finished: bool,
}

/// Why a splice ended early.
#[derive(Debug)]
pub(crate) enum SpliceError {
    /// The backend connection could not be established.
    Connect(io::Error),
    /// A read or write failed (reset by either peer, broken pipe).
    Io(io::Error),
}

impl Splice {
    /// `client` spliced to `upstream` (still connecting), through kernel pipes from `pipes`;
    /// `up` starts with `first` (bytes read before the splice began, minus what `line_end`
    /// says is still to drop).
    ///
    /// Both connections are registered for readable edges (before or after this): a
    /// registration reports what a socket holds already as an edge, so neither is read before
    /// its first edge, which spares a `splice` that would mostly say `EAGAIN`.
    pub(crate) fn new(
        client: TcpStream,
        upstream: TcpStream,
        lease: crate::io::fd_budget::FdLease,
        first: &[u8],
        line_end: LineEnd,
        eof: bool,
        pipes: &PipePool,
    ) -> Self {
        let mut up = Pipe::with_data(first, line_end, eof);
        let mut down = Pipe::default();
        up.src_idle = true;
        down.src_idle = true;
        Self {
            client,
            upstream,
            _lease: lease,
            connected: false,
            up,
            down,
            pipes: pipes.clone(),
        }
    }

    /// Moves whatever can move now, in both directions, given the edges `ready` brings.
    pub(crate) fn drive(&mut self, ready: Ready) -> Result<Driven, SpliceError> {
        if !self.connected {
            self.connected = self.check_connected().map_err(SpliceError::Connect)?;
        }
        let mut driven = Driven::default();
        let (up, flow_up) = self
            .up
            .pump(
                &self.client,
                &self.upstream,
                self.connected,
                ready.up,
                &self.pipes,
            )
            .map_err(SpliceError::Io)?;
        driven.up = up;
        let mut flow_down = Flow::Waiting;
        if self.connected {
            let (down, flow) = self
                .down
                .pump(&self.upstream, &self.client, true, ready.down, &self.pipes)
                .map_err(SpliceError::Io)?;
            driven.down = down;
            flow_down = flow;
        }
        driven.again = flow_up == Flow::Again || flow_down == Flow::Again;
        driven.finished = self.up.finished() && self.down.finished();
        Ok(driven)
    }

    /// Whether the non-blocking connect has completed (mio: on a writable event, `take_error`
    /// then `peer_addr`; `NotConnected` means still in progress).
    fn check_connected(&self) -> io::Result<bool> {
        if let Some(e) = self.upstream.take_error()? {
            return Err(e);
        }
        match self.upstream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use mio::{Events, Interest, Poll, Token};

    use super::*;
    use crate::io::fd_budget::FdBudget;

    const WAIT: Duration = Duration::from_secs(10);

    fn budget() -> Arc<FdBudget> {
        FdBudget::with_limit(0, Box::new(|| 10_000))
    }

    /// A test's two ends of a splice: the client's socket and the backend's.
    struct Ends {
        client: std::net::TcpStream,
        backend: std::net::TcpStream,
        /// The splice, driven on its own thread until both directions finish; then its
        /// bytes up and down.
        driver: JoinHandle<(usize, usize)>,
    }

    /// A client connection spliced to a backend connection over loopback, the splice driven
    /// by its own poll on a thread, as a worker does.
    fn splice(pool: &PipePool, first: &[u8], line_end: LineEnd) -> Ends {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let back = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (accepted, _) = front.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let upstream = TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (backend, _) = back.accept().unwrap();
        for s in [&client, &backend] {
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.set_write_timeout(Some(WAIT)).unwrap();
        }
        let lease = budget().try_take(2).unwrap();
        let mut splice = Splice::new(
            TcpStream::from_std(accepted),
            upstream,
            lease,
            first,
            line_end,
            false,
            pool,
        );
        let driver = std::thread::spawn(move || {
            let mut poll = Poll::new().unwrap();
            let both = Interest::READABLE | Interest::WRITABLE;
            let registry = poll.registry();
            registry
                .register(&mut splice.client, Token(0), both)
                .unwrap();
            registry
                .register(&mut splice.upstream, Token(1), both)
                .unwrap();
            let mut events = Events::with_capacity(8);
            let (mut up, mut down) = (0, 0);
            let deadline = Instant::now() + 6 * WAIT;
            // As a worker drives it: with the edges its events bring, and with none at first
            // and after a work bound (a missed edge would hang here).
            let mut ready = Ready::NO_EDGE;
            loop {
                let driven = splice.drive(ready).expect("the splice runs");
                up += driven.up;
                down += driven.down;
                if driven.finished {
                    return (up, down);
                }
                assert!(Instant::now() < deadline, "the splice never finished");
                ready = Ready::NO_EDGE;
                if driven.again {
                    continue;
                }
                poll.poll(&mut events, Some(Duration::from_millis(100)))
                    .unwrap();
                for event in &events {
                    ready = ready.and(Ready::of(event, event.token() == Token(0)));
                }
            }
        });
        Ends {
            client,
            backend,
            driver,
        }
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

    /// Writes `data` then closes its side, on a thread.
    fn send_all(mut s: std::net::TcpStream, data: Vec<u8>) -> JoinHandle<std::net::TcpStream> {
        std::thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            s
        })
    }

    /// Reads to the end of the stream, pausing after every 64 KiB (a slow reader).
    fn read_slowly(s: &mut std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).unwrap() {
                0 => return got,
                n => got.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    }

    fn large_transfers_both_ways(pool: &PipePool) {
        const BYTES: usize = 8 << 20;
        let ends = splice(pool, b"", LineEnd::Done);
        let (up, down) = (pattern(1, BYTES), pattern(2, BYTES));
        let client_writes = send_all(ends.client.try_clone().unwrap(), up.clone());
        let backend_writes = send_all(ends.backend.try_clone().unwrap(), down.clone());
        let mut backend = ends.backend;
        let backend_reads = std::thread::spawn(move || read_slowly(&mut backend));
        let mut client = ends.client;
        let at_client = read_slowly(&mut client);
        let at_backend = backend_reads.join().unwrap();
        client_writes.join().unwrap();
        backend_writes.join().unwrap();
        assert!(at_backend == up, "client → backend intact");
        assert!(at_client == down, "backend → client intact");
        assert_eq!(ends.driver.join().unwrap(), (BYTES, BYTES), "bytes counted");
    }

    #[test]
    fn large_transfers_both_ways_arrive_intact_through_slow_readers() {
        let pool = PipePool::new(budget());
        large_transfers_both_ways(&pool);
        assert!(pool.opened() >= 1, "spliced");
        assert_eq!(
            pool.idle() as u64,
            pool.opened(),
            "every pipe back in the pool"
        );
    }

    #[test]
    fn without_pipes_a_connection_copies_through_user_space() {
        let pool = PipePool::copy_only(budget());
        large_transfers_both_ways(&pool);
        assert_eq!(pool.opened(), 0, "copied");
        // A descriptor budget with no room for a pipe: the same, not a failed connection.
        let spent = PipePool::new(FdBudget::with_limit(0, Box::new(|| 0)));
        large_transfers_both_ways(&spent);
        assert_eq!(spent.opened(), 0, "copied");
    }

    #[test]
    fn reads_that_copy_and_reads_that_splice_mix_in_order() {
        // The budget lets pipes be opened, then not, over and over, and the idle ones are
        // closed: each direction's reads alternate between a pipe and the user-space buffer.
        let limit = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&limit);
        let pool = PipePool::new(FdBudget::with_limit(
            0,
            Box::new(move || seen.load(Ordering::Relaxed)),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (pool, stop) = (pool.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for room in [0, 1000] {
                        limit.store(room, Ordering::Relaxed);
                        pool.clear();
                        std::thread::sleep(Duration::from_micros(300));
                    }
                }
            })
        };
        large_transfers_both_ways(&pool);
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(pool.opened() > 1, "pipes came and went: {}", pool.opened());
    }

    #[test]
    fn a_stalled_reader_stops_the_writer() {
        let pool = PipePool::new(budget());
        let ends = splice(&pool, b"", LineEnd::Done);
        // The backend reads nothing: what the client can write is bounded by the socket
        // buffers and one pipe, not by what it wants to send.
        let mut client = ends.client.try_clone().unwrap();
        client.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let mut stuck_since = Instant::now();
        while stuck_since.elapsed() < Duration::from_millis(300) && sent < 256 << 20 {
            match client.write(&chunk) {
                Ok(n) => {
                    sent += n;
                    stuck_since = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent < 64 << 20, "{sent} bytes taken with nobody reading");
        // Now read it all: nothing was lost while the writer waited.
        client.set_nonblocking(false).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut backend = ends.backend;
        let mut got = Vec::new();
        backend.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), sent);
        backend.shutdown(Shutdown::Write).unwrap();
        assert_eq!(ends.driver.join().unwrap(), (sent, 0));
    }

    #[test]
    fn a_half_closed_client_still_gets_its_reply() {
        let pool = PipePool::new(budget());
        let mut ends = splice(&pool, b"", LineEnd::Done);
        ends.client.write_all(b"request").unwrap();
        ends.client.shutdown(Shutdown::Write).unwrap();
        let mut request = Vec::new();
        ends.backend.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"request", "the FIN came after the bytes");
        ends.backend.write_all(b"reply").unwrap();
        ends.backend.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        ends.client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"reply");
        assert_eq!(ends.driver.join().unwrap(), (7, 5));
    }

    #[test]
    fn the_first_bytes_go_first_and_a_token_line_ending_is_dropped() {
        /// The bytes read before the splice, how the token line ended there, what the
        /// client sends next (segment by segment), and what the backend must get first.
        type Case<'a> = (&'a [u8], LineEnd, &'a [&'a [u8]], &'a [u8]);
        let cases: [Case<'_>; 5] = [
            // A PROXY header (or the token's data) read before the splice began.
            (b"HEADER ", LineEnd::Done, &[b"stream"], b"HEADER stream"),
            (b"", LineEnd::Maybe, &[b"\r\nstream"], b"stream"),
            (b"", LineEnd::Maybe, &[b"\r", b"\nstream"], b"stream"),
            (b"", LineEnd::AfterCr, &[b"stream"], b"\rstream"),
            (b"", LineEnd::Maybe, &[b"stream\r\n"], b"stream\r\n"),
        ];
        for (first, line_end, sends, want) in cases {
            let pool = PipePool::new(budget());
            let mut ends = splice(&pool, first, line_end);
            for part in sends {
                ends.client.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            // Then a large stream, spliced, behind it.
            let tail = pattern(3, 1 << 20);
            ends.client.write_all(&tail).unwrap();
            ends.client.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            ends.backend.read_to_end(&mut got).unwrap();
            assert_eq!(&got[..want.len()], want, "{line_end:?} {sends:?}");
            assert!(
                got[want.len()..] == tail[..],
                "{line_end:?}: the rest intact"
            );
            ends.backend.shutdown(Shutdown::Write).unwrap();
            ends.driver.join().unwrap();
        }
    }

    #[test]
    fn connections_reuse_the_pools_pipes_and_an_idle_one_holds_none() {
        let pool = PipePool::new(budget());
        for i in 0..5 {
            let mut ends = splice(&pool, b"", LineEnd::Done);
            let mut got = [0u8; 1];
            ends.client.write_all(b"x").unwrap();
            ends.backend.read_exact(&mut got).unwrap();
            ends.backend.write_all(b"!").unwrap();
            ends.client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"!", "connection {i}");
            // Open and idle: its pipes went back as they emptied.
            let deadline = Instant::now() + WAIT;
            while pool.idle() as u64 != pool.opened() {
                assert!(Instant::now() < deadline, "an idle connection holds a pipe");
                std::thread::sleep(Duration::from_millis(1));
            }
            ends.client.shutdown(Shutdown::Write).unwrap();
            ends.backend.shutdown(Shutdown::Write).unwrap();
            ends.driver.join().unwrap();
        }
        assert!(pool.opened() <= 2, "opened once, then reused");
        assert_eq!(pool.idle() as u64, pool.opened());
    }
}
