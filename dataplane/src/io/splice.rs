//! The bidirectional copy between a client's TCP connection and its backend connection.
//!
//! Each direction is a [`Pipe`] with one fixed buffer: a pipe reads only while its buffer has
//! room and the buffer drains only as fast as the destination takes it, so a slow reader
//! stops the proxy reading from the writer (TCP backpressure) instead of growing memory. A FIN
//! in one direction is passed on as a `shutdown(Write)` once that direction's buffer is
//! empty; the other direction keeps flowing (half-close). Sockets are edge-triggered, so a
//! pump runs until it meets `WouldBlock` (a new edge will come) or its round bound (the
//! worker then comes back to it on the next loop turn).

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use crate::policy::prefix::{LineEnd, finish_line_end};

/// Buffer of one direction of one connection; allocated on the first byte that direction
/// carries.
pub(crate) const PIPE_BYTES: usize = 64 * 1024;
/// Reads per direction per readiness event before other sockets get a turn.
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
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The source sent its FIN.
    eof: bool,
    /// The FIN was passed on to the destination.
    shut: bool,
    /// A token's line ending the first bytes may still hold (client → backend only).
    line_end: LineEnd,
}

impl Pipe {
    /// A pipe that starts with `data` (bytes read before the splice began) to send.
    pub(crate) fn with_data(data: &[u8], line_end: LineEnd, eof: bool) -> Self {
        let mut pipe = Self {
            line_end,
            eof,
            ..Self::default()
        };
        if !data.is_empty() {
            pipe.buf = vec![0; PIPE_BYTES];
            pipe.buf[..data.len()].copy_from_slice(data);
            pipe.end = data.len();
        }
        pipe
    }

    /// Whether this direction is finished (FIN passed on).
    pub(crate) fn finished(&self) -> bool {
        self.shut
    }

    /// Moves bytes from `src` to `dst`; `dst_ready` is false while `dst` is still connecting
    /// (bytes are read and held, not written). Returns the bytes written to `dst`.
    pub(crate) fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        dst_ready: bool,
    ) -> io::Result<(usize, Flow)> {
        let mut written = 0;
        for _ in 0..PUMP_ROUNDS {
            if self.start < self.end {
                if !dst_ready {
                    return Ok((written, Flow::Waiting));
                }
                match (&*dst).write(&self.buf[self.start..self.end]) {
                    Ok(n) => {
                        self.start += n;
                        written += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok((written, Flow::Waiting));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.start = 0;
            self.end = 0;
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
            if self.buf.is_empty() {
                self.buf = vec![0; PIPE_BYTES];
            }
            // With a held-back `\r`, read one byte further in so it can be put back in front.
            let offset = usize::from(self.line_end == LineEnd::AfterCr);
            match (&*src).read(&mut self.buf[offset..]) {
                Ok(0) => {
                    if self.line_end == LineEnd::AfterCr {
                        // The stream ended right after `token\r`: the `\r` was data.
                        self.buf[0] = b'\r';
                        self.end = 1;
                    }
                    self.line_end = LineEnd::Done;
                    self.eof = true;
                }
                Ok(n) => {
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
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((written, Flow::Waiting));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((written, Flow::Again))
    }
}

/// A client connection spliced to its backend connection.
#[derive(Debug)]
pub(crate) struct Splice {
    /// The client's connection, accepted on a TCP listener.
    pub(crate) client: TcpStream,
    /// The connection to the backend (connecting until `connected`).
    pub(crate) upstream: TcpStream,
    /// The two connections' descriptors, from the data plane's budget.
    pub(crate) _lease: crate::io::fd_budget::FdLease,
    /// The backend connection is established.
    pub(crate) connected: bool,
    /// Client → backend.
    pub(crate) up: Pipe,
    /// Backend → client.
    pub(crate) down: Pipe,
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
    /// Moves whatever can move now, in both directions.
    pub(crate) fn drive(&mut self) -> Result<Driven, SpliceError> {
        if !self.connected {
            self.connected = self.check_connected().map_err(SpliceError::Connect)?;
        }
        let mut driven = Driven::default();
        let (up, flow_up) = self
            .up
            .pump(&self.client, &self.upstream, self.connected)
            .map_err(SpliceError::Io)?;
        driven.up = up;
        let mut flow_down = Flow::Waiting;
        if self.connected {
            let (down, flow) = self
                .down
                .pump(&self.upstream, &self.client, true)
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
