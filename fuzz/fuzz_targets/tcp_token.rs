//! The token at the start of a TCP data-port connection (dataplane/src/policy/prefix.rs, sans-io):
//! `read_prefix` on the bytes read so far, then `finish_line_end` on the first bytes the splice
//! reads after it.
//!
//! The input is `[cuts] [stream…]`: the first byte says how many cut points follow (0 to 15),
//! each one byte, the size of one `read()` (0 reads all that is left); the rest is what the
//! client sends. The harness replays what `worker/pending.rs` (`PendingConnections::read`),
//! `worker/tcp.rs` (`Tcp::decide`) and `io/splice.rs` (`Pipe::pump`) do with those reads, and
//! checks the outcome against reading the whole stream at once: the same token (or none), and
//! exactly the same bytes forwarded to the backend, however the stream was cut. The whole-stream reference is independent of
//! prefix.rs: the UDP token parser (`packet::parse_token`) on the first 36 bytes, or on the
//! first `seal::sealed_len` bytes for a sealed token, so a TCP token is exactly a UDP one.
//! A UUID token must also print back as its text.
//!
//! `dataplane::policy::prefix` is crate-private; the reader is re-exported for this target as
//! `dataplane::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

use dataplane::fuzzing::{LineEnd, MAX_PREFIX, Prefix, finish_line_end, read_prefix};
use dataplane::policy::grant::TokenId;
use dataplane::policy::packet::{Presented, TOKEN_LEN, parse_token};
use dataplane::policy::seal;

/// The splice's buffer size is far above anything here; reads are bounded by the cuts only.
const PIPE_BYTES: usize = 64 * 1024;

/// A client stream handed out in reads of the given sizes (then the rest in one read).
struct Client<'a> {
    rest: &'a [u8],
    cuts: std::slice::Iter<'a, u8>,
}

impl Client<'_> {
    /// One `read()` into a buffer of `room` bytes: `None` at EOF.
    fn read(&mut self, room: usize) -> Option<&[u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let want = match self.cuts.next() {
            Some(&0) | None => self.rest.len(),
            Some(&n) => usize::from(n),
        };
        let n = want.min(room).min(self.rest.len()).max(1);
        let (now, later) = self.rest.split_at(n);
        self.rest = later;
        Some(now)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ncuts, rest)) = data.split_first() else {
        return;
    };
    let ncuts = usize::from(ncuts % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(ncuts);
    let chunked = replay(Client {
        rest: stream,
        cuts: cuts.iter(),
    });
    let whole = reference(stream);
    assert_eq!(chunked, whole, "cuts {cuts:?}");
    // A lone read of exactly the first MAX_PREFIX bytes decides like the worker's last read.
    if stream.len() >= MAX_PREFIX {
        assert_ne!(read_prefix(&stream[..MAX_PREFIX]), Prefix::NeedMore);
    }
});

/// A token, owned.
#[derive(Clone, Debug, Eq, PartialEq)]
enum Token {
    Uuid(TokenId),
    Sealed(Vec<u8>),
}

impl From<Presented<'_>> for Token {
    fn from(p: Presented<'_>) -> Self {
        match p {
            Presented::Uuid(id) => Self::Uuid(id),
            Presented::Sealed(text) => Self::Sealed(text.to_vec()),
        }
    }
}

/// The token a connection redeems (None: default backend) and the bytes its backend gets;
/// `None` overall when the client closed without a byte (no backend connection at all).
type Outcome = Option<(Option<Token>, Vec<u8>)>;

/// The worker's view: read at most MAX_PREFIX bytes until `read_prefix` decides or EOF, then
/// the splice's view of the rest of the stream.
fn replay(mut client: Client<'_>) -> Outcome {
    let mut prefix = [0u8; MAX_PREFIX];
    let mut len = 0;
    let mut eof = false;
    // on_pending
    loop {
        if len == MAX_PREFIX {
            break;
        }
        match client.read(MAX_PREFIX - len) {
            None => {
                eof = true;
                break;
            }
            Some(bytes) => {
                prefix[len..len + bytes.len()].copy_from_slice(bytes);
                len += bytes.len();
                if read_prefix(&prefix[..len]) != Prefix::NeedMore {
                    break;
                }
            }
        }
    }
    // decide
    if eof && len == 0 {
        return None;
    }
    let bytes = &prefix[..len];
    let (token, data_from, mut line_end) = match read_prefix(bytes) {
        Prefix::Token {
            token,
            data_from,
            line_end,
        } => {
            let token_len = match token {
                Presented::Uuid(id) => {
                    same_text(id, &bytes[..TOKEN_LEN]);
                    TOKEN_LEN
                }
                Presented::Sealed(text) => {
                    assert_eq!(text, &bytes[..text.len()], "the token is the first bytes");
                    text.len()
                }
            };
            assert!(
                (token_len..=token_len + 2).contains(&data_from) && data_from <= len,
                "data from {data_from} of {len} after a {token_len}-byte token"
            );
            (Some(Token::from(token)), data_from, line_end)
        }
        Prefix::NotToken | Prefix::NeedMore => (None, 0, LineEnd::Done),
    };
    let mut out = bytes[data_from..].to_vec();
    // Pipe::pump, client → backend: the pending line ending is settled on the next read.
    let mut buf = vec![0u8; PIPE_BYTES];
    loop {
        let offset = usize::from(line_end == LineEnd::AfterCr);
        let Some(read) = client.read(PIPE_BYTES - offset) else {
            if line_end == LineEnd::AfterCr {
                out.push(b'\r'); // the stream ended right after `token\r`: it was data
            }
            break;
        };
        let n = read.len();
        buf[offset..offset + n].copy_from_slice(read);
        let (skip, put_back_cr, next) = finish_line_end(line_end, &buf[offset..offset + n]);
        assert!(skip <= n, "skips {skip} of {n}");
        line_end = next;
        let mut start = offset + skip;
        if put_back_cr {
            buf[0] = b'\r';
            start = 0;
        }
        out.extend_from_slice(&buf[start..offset + n]);
    }
    Some((token, out))
}

/// The whole stream at once: a token is the first 36 bytes (a UUID) or the first
/// `sealed_len` bytes (a sealed token, starting `S1`) when the UDP parser takes them for one,
/// and one `\n` or `\r\n` right after it is dropped; anything else goes through untouched.
fn reference(stream: &[u8]) -> Outcome {
    if stream.is_empty() {
        return None;
    }
    let len = if stream.starts_with(b"S") {
        match seal::sealed_len(stream) {
            Some(Ok(len)) => len,
            _ => 0,
        }
    } else {
        TOKEN_LEN
    };
    let token = stream
        .get(..len)
        .filter(|head| !head.is_empty() && !head.ends_with(b"\n"))
        .and_then(parse_token);
    Some(match token {
        None => (None, stream.to_vec()),
        Some(t) => {
            let rest = &stream[len..];
            let rest = rest
                .strip_prefix(b"\r\n")
                .or_else(|| rest.strip_prefix(b"\n"))
                .unwrap_or(rest);
            (Some(Token::from(t)), rest.to_vec())
        }
    })
}

fn same_text(id: TokenId, text: &[u8]) {
    let printed = id.to_string();
    assert!(
        printed.as_bytes().eq_ignore_ascii_case(text),
        "{printed} read from {:?}",
        String::from_utf8_lossy(text)
    );
}
