//! Classification of datagrams (sans-io): is this a token, a control packet, or payload?
//!
//! Only the first datagram of an unknown client is classified in full; on a live session the only
//! per-datagram check is a prefix compare against the control magic.

use crate::policy::grant::TokenId;
use crate::policy::seal;

/// Length of a UUID token on the wire: a hyphenated UUID in ASCII.
pub const TOKEN_LEN: usize = 36;

/// A token as presented by a client: a UUID naming a grant control published, or a sealed
/// token carrying its grant (opened only with the replica's keys).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Presented<'a> {
    /// A UUID token.
    Uuid(TokenId),
    /// A sealed token's text (header and base64url; not yet opened).
    Sealed(&'a [u8]),
}

impl std::fmt::Display for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uuid(id) => id.fmt(f),
            // Enough to tell two apart in a log, not the whole (client-chosen) text.
            Self::Sealed(text) => write!(
                f,
                "sealed {}…",
                String::from_utf8_lossy(&text[..text.len().min(16)])
            ),
        }
    }
}

/// What a datagram is, as far as session setup and control are concerned.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Classified<'a> {
    /// Exactly a token (one trailing `\n` or `\r\n` tolerated).
    Token(Presented<'a>),
    /// Control magic followed by a token.
    Control(Presented<'a>),
    /// Control magic followed by something that is not a token.
    BadControl,
    /// Anything else: ordinary payload.
    Payload,
}

/// Classifies a datagram given the configured control magic.
pub fn classify<'a>(datagram: &'a [u8], magic: &[u8]) -> Classified<'a> {
    if let Some(rest) = control_body(datagram, magic) {
        return match parse_token(rest) {
            Some(token) => Classified::Control(token),
            None => Classified::BadControl,
        };
    }
    match parse_token(datagram) {
        Some(token) => Classified::Token(token),
        None => Classified::Payload,
    }
}

/// The bytes after the control magic, if `datagram` starts with it. The magic must be non-empty.
#[inline]
pub fn control_body<'a>(datagram: &'a [u8], magic: &[u8]) -> Option<&'a [u8]> {
    if magic.is_empty() {
        return None;
    }
    datagram.strip_prefix(magic)
}

/// Parses a token with at most one trailing `\n` or `\r\n`: a 36-char hyphenated UUID, or a
/// sealed token (its length and seal are checked only on redemption).
pub fn parse_token(bytes: &[u8]) -> Option<Presented<'_>> {
    let bytes = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    if bytes.len() == TOKEN_LEN {
        return uuid::Uuid::try_parse_ascii(bytes)
            .ok()
            .map(|u| Presented::Uuid(TokenId(u.as_u128())));
    }
    // A sealed header and base64url after it: a sealed token, even at the wrong length, so
    // that a truncated or padded one is refused and counted as a token (its open fails).
    match seal::sealed_len(bytes) {
        Some(Ok(_))
            if bytes[seal::HEADER_LEN..]
                .iter()
                .all(|&b| seal::is_body_char(b)) =>
        {
            Some(Presented::Sealed(bytes))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";
    const TOKEN: &str = "550e8400-e29b-41d4-a716-446655440000";

    #[test]
    fn token_with_and_without_newlines() {
        let id = parse_token(TOKEN.as_bytes()).unwrap();
        assert!(matches!(id, Presented::Uuid(_)));
        assert_eq!(classify(TOKEN.as_bytes(), MAGIC), Classified::Token(id));
        assert_eq!(
            classify(format!("{TOKEN}\n").as_bytes(), MAGIC),
            Classified::Token(id)
        );
        assert_eq!(
            classify(format!("{TOKEN}\r\n").as_bytes(), MAGIC),
            Classified::Token(id)
        );
    }

    #[test]
    fn near_tokens_are_payload() {
        for bad in [
            format!("{TOKEN}\n\n"),
            format!(" {TOKEN}"),
            TOKEN[..35].to_string(),
            TOKEN.replace('5', "g"),
            format!("{TOKEN}x"),
            String::new(),
        ] {
            assert_eq!(
                classify(bad.as_bytes(), MAGIC),
                Classified::Payload,
                "{bad:?}"
            );
        }
        // 32 hex digits without hyphens is a UUID form, but not the token wire form.
        assert_eq!(
            classify(TOKEN.replace('-', "").as_bytes(), MAGIC),
            Classified::Payload
        );
    }

    #[test]
    fn control_packets() {
        let id = parse_token(TOKEN.as_bytes()).unwrap();
        let mut pkt = MAGIC.to_vec();
        pkt.extend_from_slice(TOKEN.as_bytes());
        assert_eq!(classify(&pkt, MAGIC), Classified::Control(id));
        pkt.push(b'\n');
        assert_eq!(classify(&pkt, MAGIC), Classified::Control(id));
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(b"not a token");
        assert_eq!(classify(&bad, MAGIC), Classified::BadControl);
        assert_eq!(classify(MAGIC, MAGIC), Classified::BadControl);
        // A custom magic replaces the default one.
        assert_eq!(classify(&pkt, b"\xDE\xAD"), Classified::Payload);
    }

    #[test]
    fn sealed_tokens_are_recognised_by_shape_with_or_without_a_line_end() {
        // The shape only: a header giving the length, base64url after it.
        let body = "A".repeat(100);
        let sealed = format!("S2Bk{body}");
        assert_eq!(seal::sealed_len(sealed.as_bytes()), Some(Ok(104)));
        let want = Classified::Token(Presented::Sealed(sealed.as_bytes()));
        assert_eq!(classify(sealed.as_bytes(), MAGIC), want);
        assert_eq!(
            classify(format!("{sealed}\r\n").as_bytes(), MAGIC),
            Classified::Token(Presented::Sealed(sealed.as_bytes()))
        );
        let mut pkt = MAGIC.to_vec();
        pkt.extend_from_slice(sealed.as_bytes());
        assert!(matches!(
            classify(&pkt, MAGIC),
            Classified::Control(Presented::Sealed(_))
        ));
        // Truncated or padded: still a (bad) sealed token, refused and counted when opened.
        for short in [sealed[..103].to_string(), format!("{sealed}A")] {
            assert_eq!(
                classify(short.as_bytes(), MAGIC),
                Classified::Token(Presented::Sealed(short.as_bytes()))
            );
        }
        for bad in [
            sealed.replace("S2", "S1"),
            sealed.replace("S2", "S3"),
            format!("{}!", &sealed[..103]),
            "S2".to_string(),
            "S2__".to_string(),
        ] {
            assert_eq!(
                classify(bad.as_bytes(), MAGIC),
                Classified::Payload,
                "{bad}"
            );
        }
    }

    #[test]
    fn classify_never_panics_on_arbitrary_bytes() {
        let mut rng = 0x1234_5678_u64;
        for len in 0..200 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = classify(&buf, MAGIC);
        }
    }
}
