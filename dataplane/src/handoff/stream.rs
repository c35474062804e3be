//! Framing over the hand-off's Unix socket: a message is its bytes (JSON, or a session batch's
//! binary) cut into frames, and the descriptors it carries ride beside the frames as `SCM_RIGHTS`.
//! What the peer sends is bounded (message size, descriptor count, frame size) before anything is
//! allocated for it, every wait for the peer has a timeout so a stuck peer cannot wedge either
//! side, and received descriptors are owned at once so any error closes them.
//!
//! The frame format and the reassembly of frames into messages are sans-io ([`FrameHeader`],
//! [`cut_message`], [`Reassembler`], [`encode_message`], [`decode_stream`]): the fuzz target
//! and the recorded-format fixture drive them without a socket. [`Channel`] is the I/O shell.
//! This module never looks inside a message: what it says is `super::wire`'s business.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

mod frame;
mod scm;

pub use frame::{
    FrameCut, FrameHeader, RawMessage, Reassembler, cut_message, decode_stream, encode_message,
};
use scm::{recv_with_fds, send_with_fds};

/// First bytes of every frame: "udp-director hand-off", framing version 1. A stream of
/// anything else (another program on the socket path, a desynchronised reader) fails on its
/// first frame.
pub const MAGIC: [u8; 4] = *b"UDH1";

/// Bytes of a frame header: magic (4), flags (1), reserved (1, zero), descriptor count (u16
/// LE), payload length (u32 LE).
pub const HEADER_LEN: usize = 12;

/// Flag bit: the frame is its message's last.
const FLAG_LAST: u8 = 1;

/// Most payload bytes in one frame: the receiver allocates at most this much per frame before
/// the bytes are there.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = 1 << 20;

/// Most payload bytes in one message: far above a full state (10,000 sessions are about 3 MiB),
/// low enough that a hostile length cannot exhaust memory.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Most descriptors announced by one frame, and sent with one `sendmsg`: under the kernel's
/// `SCM_MAX_FD` (253), past which `sendmsg` fails.
pub const MAX_FDS_PER_FRAME: usize = 200;

/// Most descriptors in one message: a listener socket per worker and listener plus the
/// upstream pools stay far below it, and the receiving process needs room for them all.
pub const MAX_FDS_PER_MESSAGE: usize = 65_536;

/// The kernel's own limit of descriptors per `SCM_RIGHTS` message: the receive buffer has
/// room for this many, so a peer sending more than a frame may announce is caught by the
/// count check instead of losing descriptors to a truncated control buffer.
const SCM_MAX_FD: usize = 253;

/// What went wrong on the hand-off stream. After an error in the middle of a message the
/// channel refuses further use ([`StreamError::Unusable`]): the next bytes would be mid-frame.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A socket call failed.
    #[error("hand-off socket: {during}: {source}")]
    Io {
        during: &'static str,
        source: io::Error,
    },
    /// The peer closed the connection between messages (or before a send).
    #[error("the hand-off peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("the hand-off peer closed the connection in the middle of a message")]
    ClosedMidMessage,
    /// The peer sent or took nothing for the timeout, or a message took longer than it.
    #[error(
        "the hand-off peer stalled: nothing moved, or a message was not complete, within {after:?}"
    )]
    TimedOut { after: Duration },
    /// A size passed its bound (the peer's announcement or our own message).
    #[error("hand-off {what} over the limit of {limit}")]
    TooLarge { what: &'static str, limit: usize },
    /// Bytes that are not this framing.
    #[error("malformed hand-off frame: {0}")]
    Malformed(String),
    /// A message that is not the expected JSON (or could not be written as JSON).
    #[error("hand-off message JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The kernel dropped descriptors (`MSG_CTRUNC`: no room, or the descriptor limit).
    #[error(
        "descriptors were lost in transit (control data truncated; is the descriptor limit reached?)"
    )]
    DescriptorsLost,
    /// A frame came with a different number of descriptors than its header announced.
    #[error("a hand-off frame announced {announced} descriptors but {received} came with it")]
    DescriptorCount { announced: usize, received: usize },
    /// An earlier error left the stream in the middle of a message.
    #[error("the hand-off stream is unusable after an earlier error in the middle of a message")]
    Unusable,
}

/// Framed, bounded messages with descriptors over a connected Unix stream socket.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    timeout: Duration,
    /// Control-message buffer (`u64`s for `cmsghdr` alignment), room for [`SCM_MAX_FD`].
    control: Vec<u64>,
    /// A received frame's payload, reused.
    payload: Vec<u8>,
    /// Bytes of a message moved and the message not finished: the stream is mid-frame.
    mid_message: bool,
}

impl Channel {
    /// Wraps a connected stream. `timeout` bounds every wait for the peer (a send or receive
    /// syscall that moves nothing), and a message must be complete within `timeout` of its
    /// first byte (of the call, for a send): whatever the peer does, stalling or trickling, a
    /// call returns within three times `timeout`. A zero `timeout` is refused (`Io`).
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Self, StreamError> {
        let io = |during| move |source| StreamError::Io { during, source };
        stream
            .set_nonblocking(false)
            .map_err(io("making the socket blocking"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("setting the read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setting the write timeout"))?;
        let room = SCM_MAX_FD * mem::size_of::<libc::c_int>();
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(room as u32) } as usize;
        Ok(Self {
            stream,
            timeout,
            control: vec![0; space.div_ceil(mem::size_of::<u64>())],
            payload: Vec::new(),
            mid_message: false,
        })
    }

    /// Sends `msg` as JSON with `fds` beside it (the receiver gets them in this order). Nothing
    /// is sent when the message passes a bound.
    pub fn send<T: Serialize>(
        &mut self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), StreamError> {
        self.usable()?;
        let json = serde_json::to_vec(msg)?;
        self.send_bytes(&json, fds)
    }

    /// Sends a message's bytes as they are, with `fds` beside them.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), StreamError> {
        self.usable()?;
        let cuts = cut_message(bytes.len(), fds.len())?;
        let started = Instant::now();
        for cut in cuts {
            let header = cut.header.encode();
            self.send_frame(&header, &bytes[cut.payload], &fds[cut.fds], started)?;
        }
        self.mid_message = false;
        Ok(())
    }

    /// Receives one JSON message and the descriptors that came with it, in the sender's order.
    /// [`StreamError::Closed`] when the peer closed before a message began.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), StreamError> {
        let (bytes, fds) = self.recv_bytes()?;
        let value = serde_json::from_slice(&bytes)?;
        Ok((value, fds))
    }

    /// Receives one message's bytes as they came, and its descriptors.
    pub fn recv_bytes(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), StreamError> {
        self.usable()?;
        let mut reassembler = Reassembler::new();
        let mut fds = Vec::new();
        let mut started = None;
        let message = loop {
            let mut head = [0; HEADER_LEN];
            let mut frame_fds = Vec::new();
            let limit = MAX_FDS_PER_FRAME;
            self.recv_exact(&mut head, &mut frame_fds, limit, &mut started)?;
            let header = FrameHeader::decode(&head)?;
            reassembler.check(&header)?;
            let announced = usize::from(header.fds);
            // The scratch buffer is taken out for the read so `self` stays borrowable; it
            // grows to at most one frame's payload.
            let mut payload = mem::take(&mut self.payload);
            payload.clear();
            payload.resize(header.payload_len as usize, 0);
            let pushed = self
                .recv_exact(&mut payload, &mut frame_fds, announced, &mut started)
                .and_then(|()| match frame_fds.len() {
                    received if received == announced => reassembler.push(&header, &payload),
                    received => Err(StreamError::DescriptorCount {
                        announced,
                        received,
                    }),
                });
            self.payload = payload;
            fds.append(&mut frame_fds);
            if let Some(message) = pushed? {
                break message;
            }
        };
        self.mid_message = false;
        Ok((message.bytes, fds))
    }

    fn usable(&self) -> Result<(), StreamError> {
        if self.mid_message {
            return Err(StreamError::Unusable);
        }
        Ok(())
    }

    /// Writes one frame, its descriptors attached to its first byte(s).
    fn send_frame(
        &mut self,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        started: Instant,
    ) -> Result<(), StreamError> {
        let total = HEADER_LEN + payload.len();
        let mut sent = 0;
        let mut attach = fds;
        while sent < total {
            let parts: [&[u8]; 2] = if sent < HEADER_LEN {
                [&header[sent..], payload]
            } else {
                [&payload[sent - HEADER_LEN..], &[]]
            };
            match send_with_fds(self.stream.as_raw_fd(), parts, attach, &mut self.control) {
                Ok(0) => {
                    return Err(StreamError::Io {
                        during: "sendmsg",
                        source: io::ErrorKind::WriteZero.into(),
                    });
                }
                Ok(n) => {
                    sent += n;
                    attach = &[];
                    self.mid_message = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e, "sendmsg")),
            }
            if sent < total && started.elapsed() > self.timeout {
                return Err(StreamError::TimedOut {
                    after: self.timeout,
                });
            }
        }
        Ok(())
    }

    /// Fills `buf`, collecting descriptors into `fds` (at most `max_fds` of them in all).
    /// `started` is when the message's first byte came.
    fn recv_exact(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        max_fds: usize,
        started: &mut Option<Instant>,
    ) -> Result<(), StreamError> {
        let mut got = 0;
        while got < buf.len() {
            let received =
                match recv_with_fds(self.stream.as_raw_fd(), &mut buf[got..], &mut self.control) {
                    Ok(received) => received,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.io_error(e, "recvmsg")),
                };
            // Owned before any check, so every error path below closes them.
            fds.extend(received.fds);
            if received.truncated {
                return Err(StreamError::DescriptorsLost);
            }
            if received.bytes == 0 {
                return Err(if self.mid_message {
                    StreamError::ClosedMidMessage
                } else {
                    StreamError::Closed
                });
            }
            got += received.bytes;
            self.mid_message = true;
            let started = *started.get_or_insert_with(Instant::now);
            if fds.len() > max_fds {
                return Err(StreamError::DescriptorCount {
                    announced: max_fds,
                    received: fds.len(),
                });
            }
            if got < buf.len() && started.elapsed() > self.timeout {
                return Err(StreamError::TimedOut {
                    after: self.timeout,
                });
            }
        }
        Ok(())
    }

    fn io_error(&self, source: io::Error, during: &'static str) -> StreamError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamError::TimedOut {
                after: self.timeout,
            },
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset if self.mid_message => {
                StreamError::ClosedMidMessage
            }
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => StreamError::Closed,
            _ => StreamError::Io { during, source },
        }
    }
}
