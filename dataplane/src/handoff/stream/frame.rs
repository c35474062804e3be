//! The hand-off framing without a socket: the frame header, how a message is cut into frames,
//! and frames reassembled into messages within the bounds. No syscalls: the fuzz target and the
//! recorded-format fixture drive these directly, and [`super::Channel`] around real I/O.

use std::mem;
use std::ops::Range;

use super::{
    FLAG_LAST, HEADER_LEN, MAGIC, MAX_FDS_PER_FRAME, MAX_FDS_PER_MESSAGE, MAX_FRAME_PAYLOAD_BYTES,
    MAX_MESSAGE_BYTES, StreamError,
};

/// A frame's header, as read and written.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct FrameHeader {
    /// The frame is its message's last.
    pub last: bool,
    /// Descriptors that came with the frame's bytes.
    pub fds: u16,
    /// Payload bytes after the header.
    pub payload_len: u32,
}

impl FrameHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0; HEADER_LEN];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4] = if self.last { FLAG_LAST } else { 0 };
        bytes[6..8].copy_from_slice(&self.fds.to_le_bytes());
        bytes[8..].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes
    }

    /// Reads a header, refusing unknown flags and a frame past the per-frame bounds.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, StreamError> {
        if bytes[..4] != MAGIC {
            return Err(StreamError::Malformed(format!(
                "magic {:02x?}, expected {MAGIC:02x?}",
                &bytes[..4]
            )));
        }
        if bytes[4] & !FLAG_LAST != 0 || bytes[5] != 0 {
            return Err(StreamError::Malformed(format!(
                "unknown flags {:#04x} {:#04x}",
                bytes[4], bytes[5]
            )));
        }
        let header = Self {
            last: bytes[4] & FLAG_LAST != 0,
            fds: u16::from_le_bytes([bytes[6], bytes[7]]),
            payload_len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        };
        header.check_frame_bounds()?;
        Ok(header)
    }

    fn check_frame_bounds(&self) -> Result<(), StreamError> {
        if self.payload_len as usize > MAX_FRAME_PAYLOAD_BYTES {
            return Err(StreamError::TooLarge {
                what: "frame payload bytes",
                limit: MAX_FRAME_PAYLOAD_BYTES,
            });
        }
        if usize::from(self.fds) > MAX_FDS_PER_FRAME {
            return Err(StreamError::TooLarge {
                what: "descriptors in one frame",
                limit: MAX_FDS_PER_FRAME,
            });
        }
        Ok(())
    }
}

/// One frame of a message as the sender cuts it: its header, and which of the message's
/// bytes and descriptors it carries.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct FrameCut {
    pub header: FrameHeader,
    pub payload: Range<usize>,
    pub fds: Range<usize>,
}

/// How a message of `len` bytes and `fd_count` descriptors travels: as few frames as
/// the per-frame bounds allow (at least one), descriptors on the first frames.
pub fn cut_message(len: usize, fd_count: usize) -> Result<Vec<FrameCut>, StreamError> {
    check_message_bounds(len, fd_count)?;
    let frames = len
        .div_ceil(MAX_FRAME_PAYLOAD_BYTES)
        .max(fd_count.div_ceil(MAX_FDS_PER_FRAME))
        .max(1);
    let cuts = (0..frames)
        .map(|i| {
            let payload = (i * MAX_FRAME_PAYLOAD_BYTES).min(len)
                ..((i + 1) * MAX_FRAME_PAYLOAD_BYTES).min(len);
            let fds =
                (i * MAX_FDS_PER_FRAME).min(fd_count)..((i + 1) * MAX_FDS_PER_FRAME).min(fd_count);
            FrameCut {
                header: FrameHeader {
                    last: i + 1 == frames,
                    // Both fit: the ranges are at most the per-frame bounds long.
                    fds: fds.len() as u16,
                    payload_len: payload.len() as u32,
                },
                payload,
                fds,
            }
        })
        .collect();
    Ok(cuts)
}

fn check_message_bounds(len: usize, fd_count: usize) -> Result<(), StreamError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(StreamError::TooLarge {
            what: "message bytes",
            limit: MAX_MESSAGE_BYTES,
        });
    }
    if fd_count > MAX_FDS_PER_MESSAGE {
        return Err(StreamError::TooLarge {
            what: "descriptors in one message",
            limit: MAX_FDS_PER_MESSAGE,
        });
    }
    Ok(())
}

/// The frames of a message as bytes, descriptors counted in the headers but not attached: what
/// the peer reads, less the `SCM_RIGHTS` (for fixtures and fuzz seeds).
pub fn encode_message(payload: &[u8], fd_count: usize) -> Result<Vec<u8>, StreamError> {
    let cuts = cut_message(payload.len(), fd_count)?;
    let mut bytes = Vec::with_capacity(payload.len() + cuts.len() * HEADER_LEN);
    for cut in cuts {
        bytes.extend_from_slice(&cut.header.encode());
        bytes.extend_from_slice(&payload[cut.payload]);
    }
    Ok(bytes)
}

/// A reassembled message: its bytes and how many descriptors came with it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RawMessage {
    pub bytes: Vec<u8>,
    pub fds: usize,
}

/// Frames in, messages out, within the message bounds.
#[derive(Debug, Default)]
pub struct Reassembler {
    bytes: Vec<u8>,
    fds: usize,
    frames: usize,
}

impl Reassembler {
    /// Between messages.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a frame; the message when it was the last. After an error the reassembler (and the
    /// stream it reads) is not to be used again.
    pub fn push(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<Option<RawMessage>, StreamError> {
        self.check(header)?;
        if payload.len() != header.payload_len as usize {
            return Err(StreamError::Malformed(format!(
                "frame announced {} payload bytes, {} given",
                header.payload_len,
                payload.len()
            )));
        }
        self.bytes.extend_from_slice(payload);
        self.fds += usize::from(header.fds);
        self.frames += 1;
        if !header.last {
            return Ok(None);
        }
        self.frames = 0;
        let message = RawMessage {
            bytes: mem::take(&mut self.bytes),
            fds: mem::take(&mut self.fds),
        };
        Ok(Some(message))
    }

    /// Whether `header`'s frame may follow what was pushed: called before its payload is read,
    /// so nothing is allocated for a frame that would pass a bound.
    pub fn check(&self, header: &FrameHeader) -> Result<(), StreamError> {
        header.check_frame_bounds()?;
        if !header.last && header.payload_len == 0 && header.fds == 0 {
            // Every frame but the last must make progress, so a message has a bounded
            // number of frames.
            return Err(StreamError::Malformed(
                "an empty frame that is not its message's last".to_owned(),
            ));
        }
        check_message_bounds(
            self.bytes.len() + header.payload_len as usize,
            self.fds + usize::from(header.fds),
        )
    }

    /// Whether part of a message was pushed: the end of the stream now cuts it.
    pub fn in_message(&self) -> bool {
        self.frames > 0
    }
}

/// The messages of a whole recorded stream, in order; an error at the first frame that is
/// not this framing, passes a bound, or is cut off by the end of the bytes.
pub fn decode_stream(mut bytes: &[u8]) -> Result<Vec<RawMessage>, StreamError> {
    let mut reassembler = Reassembler::new();
    let mut messages = Vec::new();
    while !bytes.is_empty() {
        let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(StreamError::ClosedMidMessage);
        };
        let header = FrameHeader::decode(head)?;
        reassembler.check(&header)?;
        let Some((payload, rest)) = rest.split_at_checked(header.payload_len as usize) else {
            return Err(StreamError::ClosedMidMessage);
        };
        messages.extend(reassembler.push(&header, payload)?);
        bytes = rest;
    }
    if reassembler.in_message() {
        return Err(StreamError::ClosedMidMessage);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for header in [
            FrameHeader {
                last: true,
                fds: 0,
                payload_len: 0,
            },
            FrameHeader {
                last: false,
                fds: 200,
                payload_len: 1 << 20,
            },
        ] {
            assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
        }
    }

    #[test]
    fn header_refuses_unknown_flags_and_large_frames() {
        let mut bytes = FrameHeader {
            last: true,
            fds: 1,
            payload_len: 3,
        }
        .encode();
        bytes[4] |= 2;
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(StreamError::Malformed(_))
        ));
        let big = FrameHeader {
            last: true,
            fds: 0,
            payload_len: (1 << 20) + 1,
        }
        .encode();
        assert!(matches!(
            FrameHeader::decode(&big),
            Err(StreamError::TooLarge { .. })
        ));
        let many = FrameHeader {
            last: true,
            fds: 201,
            payload_len: 0,
        }
        .encode();
        assert!(matches!(
            FrameHeader::decode(&many),
            Err(StreamError::TooLarge { .. })
        ));
    }

    #[test]
    fn cuts_cover_the_message_within_frame_bounds() {
        for (json, fds) in [
            (0, 0),
            (10, 0),
            (0, 600),
            (3 << 20, 5),
            ((1 << 20) + 1, 401),
        ] {
            let cuts = cut_message(json, fds).unwrap();
            assert!(cuts.last().unwrap().header.last);
            assert_eq!(cuts.iter().filter(|c| c.header.last).count(), 1);
            assert_eq!(cuts.iter().map(|c| c.payload.len()).sum::<usize>(), json);
            assert_eq!(cuts.iter().map(|c| c.fds.len()).sum::<usize>(), fds);
            assert!(cuts.iter().all(|c| c.fds.len() <= MAX_FDS_PER_FRAME));
            assert!(
                cuts.iter()
                    .all(|c| c.payload.len() <= MAX_FRAME_PAYLOAD_BYTES)
            );
        }
        assert!(matches!(
            cut_message(MAX_MESSAGE_BYTES + 1, 0),
            Err(StreamError::TooLarge { .. })
        ));
        assert!(matches!(
            cut_message(0, MAX_FDS_PER_MESSAGE + 1),
            Err(StreamError::TooLarge { .. })
        ));
    }

    #[test]
    fn stream_of_messages_decodes() {
        let mut bytes = encode_message(b"{\"a\":1}", 3).unwrap();
        bytes.extend(encode_message(&vec![b' '; (1 << 20) + 5], 450).unwrap());
        let messages = decode_stream(&bytes).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(
            messages[0],
            RawMessage {
                bytes: b"{\"a\":1}".to_vec(),
                fds: 3
            }
        );
        assert_eq!(
            (messages[1].bytes.len(), messages[1].fds),
            ((1 << 20) + 5, 450)
        );
        assert!(matches!(
            decode_stream(&bytes[..bytes.len() - 1]),
            Err(StreamError::ClosedMidMessage)
        ));
        assert!(matches!(
            decode_stream(&bytes[..5]),
            Err(StreamError::ClosedMidMessage)
        ));
    }

    #[test]
    fn empty_frame_before_the_last_is_malformed() {
        let empty = FrameHeader {
            last: false,
            fds: 0,
            payload_len: 0,
        };
        assert!(matches!(
            Reassembler::new().push(&empty, &[]),
            Err(StreamError::Malformed(_))
        ));
    }
}
