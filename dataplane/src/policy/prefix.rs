//! The token at the start of a TCP connection (sans-io): is what the client sent so far a
//! token, not one, or too short to say?
//!
//! A client on a TCP data port sends the token first (a 36-char UUID, or a sealed token whose
//! first four characters give its length), optionally followed by `\n` or `\r\n`; everything
//! after it is stream data. A byte that cannot be part of a token at its position decides "not
//! a token" at once, so a token-less protocol whose client speaks first reaches the default
//! backend without waiting for `tcpTokenTimeoutSeconds`.

use crate::policy::grant::TokenId;
use crate::policy::packet::{Presented, TOKEN_LEN};
use crate::policy::seal::{self, HEADER_LEN, MAX_SEALED_LEN, SEALED_PREFIX};

/// Most bytes the token reader needs: the longest token and `\r\n`.
pub const MAX_PREFIX: usize = MAX_SEALED_LEN + 2;

/// Where a token's optional line ending may still be, when the bytes so far end right after
/// the token (or after its `\r`): the stream's next bytes decide.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum LineEnd {
    /// Decided: the stream data starts with the next byte.
    #[default]
    Done,
    /// The token ended the bytes so far: a `\n` or `\r\n` next is dropped.
    Maybe,
    /// A `\r` followed the token and ended the bytes so far (it was not forwarded): a `\n`
    /// next is dropped; anything else means the `\r` was data and is forwarded first.
    AfterCr,
}

/// What the first bytes of a connection are.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Prefix<'a> {
    /// Too few bytes to decide.
    NeedMore,
    /// A well-formed token; stream data starts at `data_from` of the bytes so far, and
    /// `line_end` says whether the next bytes may still hold its line ending.
    Token {
        /// The token.
        token: Presented<'a>,
        /// Index of the first data byte in the bytes read so far.
        data_from: usize,
        /// A line ending the next read may still hold.
        line_end: LineEnd,
    },
    /// Not a token: every byte so far is stream data.
    NotToken,
}

/// Reads the bytes a connection has sent so far (at most [`MAX_PREFIX`] are looked at).
pub fn read_prefix(bytes: &[u8]) -> Prefix<'_> {
    let token = match bytes.first() {
        None => return Prefix::NeedMore,
        Some(&b) if b == SEALED_PREFIX[0] => read_sealed(bytes),
        Some(_) => read_uuid(bytes),
    };
    let token = match token {
        Ok(token) => token,
        Err(undecided) => return undecided,
    };
    let len = match token {
        Presented::Uuid(_) => TOKEN_LEN,
        Presented::Sealed(text) => text.len(),
    };
    let (data_from, line_end) = match &bytes[len..] {
        [] => (len, LineEnd::Maybe),
        [b'\n', ..] => (len + 1, LineEnd::Done),
        [b'\r'] => (len + 1, LineEnd::AfterCr),
        [b'\r', b'\n', ..] => (len + 2, LineEnd::Done),
        _ => (len, LineEnd::Done),
    };
    Prefix::Token {
        token,
        data_from,
        line_end,
    }
}

/// A UUID token at the start of `bytes`, or what to say if there is none (yet).
fn read_uuid(bytes: &[u8]) -> Result<Presented<'_>, Prefix<'_>> {
    let head = &bytes[..bytes.len().min(TOKEN_LEN)];
    if !head.iter().enumerate().all(|(i, &b)| uuid_byte(i, b)) {
        return Err(Prefix::NotToken);
    }
    if bytes.len() < TOKEN_LEN {
        return Err(Prefix::NeedMore);
    }
    let Ok(uuid) = uuid::Uuid::try_parse_ascii(head) else {
        return Err(Prefix::NotToken);
    };
    Ok(Presented::Uuid(TokenId(uuid.as_u128())))
}

/// A sealed token at the start of `bytes`, or what to say if there is none (yet).
fn read_sealed(bytes: &[u8]) -> Result<Presented<'_>, Prefix<'_>> {
    let len = match seal::sealed_len(bytes) {
        None => return Err(Prefix::NeedMore),
        Some(Err(())) => return Err(Prefix::NotToken),
        Some(Ok(len)) => len,
    };
    let head = &bytes[..bytes.len().min(len)];
    if !head[HEADER_LEN..].iter().all(|&b| seal::is_body_char(b)) {
        return Err(Prefix::NotToken);
    }
    if bytes.len() < len {
        return Err(Prefix::NeedMore);
    }
    Ok(Presented::Sealed(head))
}

/// Whether `b` can stand at position `i` of a hyphenated UUID.
fn uuid_byte(i: usize, b: u8) -> bool {
    if matches!(i, 8 | 13 | 18 | 23) {
        b == b'-'
    } else {
        b.is_ascii_hexdigit()
    }
}

/// Applies a pending [`LineEnd`] to the first bytes read after the token: returns how many
/// bytes to drop from the front of `data`, and whether a held-back `\r` must be forwarded
/// before them. `data` is not empty.
pub fn finish_line_end(line_end: LineEnd, data: &[u8]) -> (usize, bool, LineEnd) {
    match (line_end, data) {
        (LineEnd::Done, _) => (0, false, LineEnd::Done),
        (LineEnd::Maybe, [b'\n', ..]) | (LineEnd::AfterCr, [b'\n', ..]) => {
            (1, false, LineEnd::Done)
        }
        (LineEnd::Maybe, [b'\r', b'\n', ..]) => (2, false, LineEnd::Done),
        (LineEnd::Maybe, [b'\r']) => (1, false, LineEnd::AfterCr),
        (LineEnd::Maybe, _) => (0, false, LineEnd::Done),
        (LineEnd::AfterCr, _) => (0, true, LineEnd::Done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "550e8400-e29b-41d4-a716-446655440000";

    fn token() -> Presented<'static> {
        Presented::Uuid(TokenId(uuid::Uuid::parse_str(TOKEN).unwrap().as_u128()))
    }

    #[test]
    fn a_token_is_read_with_or_without_a_line_ending() {
        let t = token();
        let cases: [(&str, usize, LineEnd); 6] = [
            ("", 36, LineEnd::Maybe),
            ("\n", 37, LineEnd::Done),
            ("\r\n", 38, LineEnd::Done),
            ("\r", 37, LineEnd::AfterCr),
            ("\nGET", 37, LineEnd::Done),
            ("hello", 36, LineEnd::Done),
        ];
        for (after, data_from, line_end) in cases {
            let bytes = format!("{TOKEN}{after}");
            let bytes = &bytes.as_bytes()[..bytes.len().min(MAX_PREFIX)];
            assert_eq!(
                read_prefix(bytes),
                Prefix::Token {
                    token: t,
                    data_from,
                    line_end
                },
                "{after:?}"
            );
        }
        assert_eq!(
            read_prefix(TOKEN.to_uppercase().as_bytes()),
            Prefix::Token {
                token: t,
                data_from: 36,
                line_end: LineEnd::Maybe
            },
            "hex digits in either case"
        );
    }

    #[test]
    fn a_prefix_of_a_token_needs_more_and_anything_else_is_decided_at_once() {
        for n in 0..TOKEN_LEN {
            assert_eq!(read_prefix(&TOKEN.as_bytes()[..n]), Prefix::NeedMore, "{n}");
        }
        assert_eq!(read_prefix(b"H"), Prefix::NotToken, "first byte decides");
        assert_eq!(read_prefix(b"550e8400_"), Prefix::NotToken, "no hyphen");
        assert_eq!(
            read_prefix(b"550e84000"),
            Prefix::NotToken,
            "digit for hyphen"
        );
        assert_eq!(read_prefix(b"\x16\x03\x01"), Prefix::NotToken, "TLS hello");
        let mut bad = TOKEN.as_bytes().to_vec();
        bad[35] = b'g';
        assert_eq!(read_prefix(&bad), Prefix::NotToken, "last byte");
    }

    #[test]
    fn a_sealed_token_is_read_by_its_header_length_newline_or_not() {
        let sealed = format!("S2Bk{}", "x".repeat(100));
        for n in 0..sealed.len() {
            assert_eq!(
                read_prefix(&sealed.as_bytes()[..n]),
                Prefix::NeedMore,
                "{n}"
            );
        }
        for (after, data_from, line_end) in [
            ("", 104, LineEnd::Maybe),
            ("\r\nGET /", 106, LineEnd::Done),
            ("GET /", 104, LineEnd::Done),
        ] {
            let bytes = format!("{sealed}{after}");
            assert_eq!(
                read_prefix(bytes.as_bytes()),
                Prefix::Token {
                    token: Presented::Sealed(sealed.as_bytes()),
                    data_from,
                    line_end
                },
                "{after:?}"
            );
        }
        assert_eq!(read_prefix(b"S2Bk!"), Prefix::NotToken, "a non-base64 byte");
        assert_eq!(read_prefix(b"S1"), Prefix::NotToken, "another version");
        assert_eq!(read_prefix(b"SSH-2.0-OpenSSH"), Prefix::NotToken);
    }

    #[test]
    fn a_pending_line_ending_is_dropped_from_the_next_bytes_only() {
        use LineEnd::{AfterCr, Done, Maybe};
        assert_eq!(finish_line_end(Maybe, b"\nabc"), (1, false, Done));
        assert_eq!(finish_line_end(Maybe, b"\r\nabc"), (2, false, Done));
        assert_eq!(finish_line_end(Maybe, b"\r"), (1, false, AfterCr));
        assert_eq!(finish_line_end(AfterCr, b"\nabc"), (1, false, Done));
        assert_eq!(
            finish_line_end(AfterCr, b"abc"),
            (0, true, Done),
            "a lone \\r was data"
        );
        assert_eq!(finish_line_end(Maybe, b"abc"), (0, false, Done));
        assert_eq!(finish_line_end(Maybe, b"\rabc"), (0, false, Done));
        assert_eq!(finish_line_end(Done, b"\nabc"), (0, false, Done));
    }
}
