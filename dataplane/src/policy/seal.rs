//! Sealed tokens (sans-io): a grant sealed with an AEAD into the token string itself, so any
//! replica holding the key redeems it and the client learns nothing of the backend.
//!
//! Wire form (printable, self-delimiting; [`SEALED_PREFIX`] cannot start a UUID):
//!
//! ```text
//! S 2 L L <body>
//! ```
//!
//! `S2` names the format, `LL` is the body's length in characters as two base64url digits
//! (so a reader knows the whole length from the first four characters), and the body is
//! base64url (no padding) of `key id (2) || nonce (24) || ciphertext || tag (16)`. The cipher
//! is XChaCha20-Poly1305: its 192-bit nonces are drawn at random with no coordination between
//! replicas, and the nonce doubles as the token's identity for replay checks. The first four
//! characters and the key id are the associated data, so a length, version or key id change
//! breaks the tag.
//!
//! The key id names the key that sealed the token (see [`key_id`]): a replica tries only the
//! keys with that id, so a forged token costs at most one AEAD open (two only for the rare
//! keys whose ids collide) however many keys the file holds, and none when no key has the id.
//! A key's id is derived from the key, not from its place in the file, so it survives a
//! rotation that reorders the keys.
//!
//! Plaintext: expiry (Unix ms, u64 BE), backend id (u64 BE), the backend's PROXY protocol mode
//! (`0` none, `1` v2, `2` v2-first), the bound client address
//! (`0`, or `4` + 4 bytes, or `6` + 16 bytes), the number of ports, then per port its data-port
//! index, family (`4`/`6`), address and port (u16 BE).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};

use crate::policy::grant::{Backend, BackendId, TokenId};
use crate::policy::proxy_protocol::ProxyMode;

/// The first two characters of every sealed token.
pub const SEALED_PREFIX: &[u8; 2] = b"S2";
/// Characters before the body: the prefix and the two length digits.
pub const HEADER_LEN: usize = 4;
/// Most data ports one sealed token can name.
pub const MAX_SEALED_PORTS: usize = 16;
/// Most keys a key file may hold: every key is a candidate for a token whose id it shares,
/// and rotation needs two.
pub const MAX_KEYS: usize = 16;
/// Bytes of a key id, at the start of a token's body.
pub const KEY_ID_LEN: usize = 2;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// One port entry: index, family, IPv6 address, port.
const PORT_ENTRY_MAX: usize = 1 + 1 + 16 + 2;
const PLAIN_MAX: usize = 8 + 8 + 1 + 17 + 1 + MAX_SEALED_PORTS * PORT_ENTRY_MAX;
const BODY_BYTES_MAX: usize = KEY_ID_LEN + NONCE_LEN + PLAIN_MAX + TAG_LEN;
/// Base64 characters of the largest body.
const BODY_CHARS_MAX: usize = (BODY_BYTES_MAX * 4).div_ceil(3);
/// Longest sealed token text.
pub const MAX_SEALED_LEN: usize = HEADER_LEN + BODY_CHARS_MAX;
/// The smallest body a token can have: a key id, a nonce, no plaintext beyond the fixed
/// fields, a tag.
const BODY_BYTES_MIN: usize = KEY_ID_LEN + NONCE_LEN + 8 + 8 + 1 + 1 + 1 + TAG_LEN;
/// Associated data of a key id's derivation (see [`key_id`]).
const KEY_ID_CONTEXT: &[u8] = b"udp-director sealed-token key id";

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The value of a base64url digit.
fn digit(b: u8) -> Option<usize> {
    Some(match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    } as usize)
}

/// Whether `b` is a base64url digit (the only characters of a sealed token after `S2`).
#[inline]
pub fn is_body_char(b: u8) -> bool {
    digit(b).is_some()
}

/// The whole length of the sealed token that `head` starts, from its first four characters:
/// `Some(Ok(len))`, `Some(Err(()))` when `head` cannot start a sealed token, `None` when it is
/// a sealed prefix too short to say.
pub fn sealed_len(head: &[u8]) -> Option<Result<usize, ()>> {
    for (i, &b) in head.iter().take(HEADER_LEN).enumerate() {
        let ok = match i {
            0 | 1 => b == SEALED_PREFIX[i],
            _ => is_body_char(b),
        };
        if !ok {
            return Some(Err(()));
        }
    }
    if head.len() < HEADER_LEN {
        return None;
    }
    let body = digit(head[2])? * 64 + digit(head[3])?;
    if !((BODY_BYTES_MIN * 4).div_ceil(3)..=BODY_CHARS_MAX).contains(&body) {
        return Some(Err(()));
    }
    Some(Ok(HEADER_LEN + body))
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error, Eq, PartialEq)]
pub enum KeyFileError {
    /// No key in the file.
    #[error("no key in the file (one base64 key of 32 bytes a line)")]
    Empty,
    /// A line is not base64 of 32 bytes.
    #[error("line {line}: {why}")]
    BadKey {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// More keys than [`MAX_KEYS`].
    #[error(
        "{count} keys, at most {MAX_KEYS}: keep the key that seals and those that sealed tokens \
         still unexpired, drop the rest"
    )]
    TooMany {
        /// Keys in the file.
        count: usize,
    },
}

/// A key's id: the first [`KEY_ID_LEN`] bytes of the XChaCha20-Poly1305 tag, under the key,
/// of nothing, with an all-zero nonce and a fixed context as associated data. A function of
/// the key only (its place in the file may change with a rotation) that tells nothing of it:
/// a one-time MAC under a key stream no token uses (token nonces are random, and never all
/// zero but with probability 2^-192).
pub fn key_id(key: &[u8; KEY_LEN]) -> [u8; KEY_ID_LEN] {
    id_of(&XChaCha20Poly1305::new(key.into()))
}

fn id_of(cipher: &XChaCha20Poly1305) -> [u8; KEY_ID_LEN] {
    let tag = cipher
        .encrypt_in_place_detached(&XNonce::default(), KEY_ID_CONTEXT, &mut [])
        // Encryption fails only for a plaintext over the cipher's limit: this one is empty.
        .unwrap_or_default();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&tag[..KEY_ID_LEN]);
    id
}

/// One key of a ring, with its id.
#[derive(Clone)]
struct Key {
    id: [u8; KEY_ID_LEN],
    cipher: XChaCha20Poly1305,
}

/// The keys of a replica: the first seals, every one opens (key rotation: add the new key
/// second, roll it out, move it first, roll out, then drop the old one).
#[derive(Clone)]
pub struct KeyRing {
    /// At least one, at most [`MAX_KEYS`], no two the same.
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Reads a key file: one standard-base64 key of 32 bytes a line, at most [`MAX_KEYS`];
    /// blank lines and lines starting with `#` are skipped, and a key given twice counts once.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut keys = Vec::new();
        let mut seen: Vec<[u8; KEY_LEN]> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| KeyFileError::BadKey { line: n + 1, why };
            let key = STANDARD
                .decode(line)
                .map_err(|e| bad(format!("not base64: {e}")))?;
            let Ok(key) = <[u8; KEY_LEN]>::try_from(key.as_slice()) else {
                return Err(bad(format!(
                    "a key is {KEY_LEN} bytes, this one is {}",
                    key.len()
                )));
            };
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            // Counted past the cap for the message only: the file is refused.
            if seen.len() > MAX_KEYS {
                continue;
            }
            let cipher = XChaCha20Poly1305::new(&key.into());
            keys.push(Key {
                id: id_of(&cipher),
                cipher,
            });
        }
        if seen.len() > MAX_KEYS {
            return Err(KeyFileError::TooMany { count: seen.len() });
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(Self { keys })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a ring has at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Seals a grant of `backend`, void from `expires_unix` (since the Unix epoch) on and,
    /// with `client`, redeemable by that address only; the first key and a fresh random nonce.
    pub fn seal(
        &self,
        backend: &Backend,
        expires_unix: Duration,
        client: Option<IpAddr>,
    ) -> Result<Sealed, SealError> {
        self.seal_with(&Nonce::fresh()?, backend, expires_unix, client)
    }

    /// [`Self::seal`] with a nonce drawn beforehand, so the token's id ([`Nonce::token_id`])
    /// is known before the backend is (an allocation writes it on the server it allocates).
    pub fn seal_with(
        &self,
        nonce: &Nonce,
        backend: &Backend,
        expires_unix: Duration,
        client: Option<IpAddr>,
    ) -> Result<Sealed, SealError> {
        let nonce = nonce.0;
        let key = &self.keys[0];
        let mut body = Vec::with_capacity(BODY_BYTES_MAX);
        body.extend_from_slice(&key.id);
        body.extend_from_slice(&nonce);
        encode_plain(backend, expires_unix, client, &mut body)?;
        let chars = ((body.len() + TAG_LEN) * 4).div_ceil(3);
        let aad = [
            SEALED_PREFIX[0],
            SEALED_PREFIX[1],
            B64URL[chars / 64],
            B64URL[chars % 64],
            key.id[0],
            key.id[1],
        ];
        let header = &aad[..HEADER_LEN];
        let tag = key
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut body[KEY_ID_LEN + NONCE_LEN..],
            )
            .map_err(|chacha20poly1305::aead::Error| SealError::TooLong)?;
        body.extend_from_slice(&tag);
        let mut text = String::with_capacity(HEADER_LEN + chars);
        text.extend(header.iter().map(|&b| char::from(b)));
        URL_SAFE_NO_PAD.encode_string(&body, &mut text);
        debug_assert_eq!(text.len(), HEADER_LEN + chars);
        Ok(Sealed {
            text,
            id: nonce_id(&nonce),
        })
    }

    /// Opens a sealed token (exactly the token's text), checking its tag against the key its
    /// key id names (every key with that id, should two ids collide) and its expiry against
    /// `now_unix` (time since the Unix epoch). Nothing is allocated before the tag verifies,
    /// so forged tokens cost no memory, and a key id no key has costs no AEAD open.
    pub fn open(&self, text: &[u8], now_unix: Duration) -> Result<Opened, OpenError> {
        if sealed_len(text) != Some(Ok(text.len())) {
            return Err(OpenError::Malformed);
        }
        let mut body = [0u8; BODY_BYTES_MAX];
        let n = URL_SAFE_NO_PAD
            .decode_slice(&text[HEADER_LEN..], &mut body)
            .ok()
            .ok_or(OpenError::Malformed)?;
        if n < BODY_BYTES_MIN {
            return Err(OpenError::Malformed);
        }
        let (id, rest) = body[..n].split_at_mut(KEY_ID_LEN);
        let (nonce, rest) = rest.split_at_mut(NONCE_LEN);
        let (plain, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let tag = Tag::clone_from_slice(tag);
        let nonce = XNonce::clone_from_slice(nonce);
        let mut aad = [0u8; HEADER_LEN + KEY_ID_LEN];
        aad[..HEADER_LEN].copy_from_slice(&text[..HEADER_LEN]);
        aad[HEADER_LEN..].copy_from_slice(id);
        let mut opened = false;
        for key in self.keys.iter().filter(|k| k.id[..] == *id) {
            let mut attempt = [0u8; PLAIN_MAX];
            let attempt = &mut attempt[..plain.len()];
            attempt.copy_from_slice(plain);
            #[cfg(test)]
            tests::OPENS.set(tests::OPENS.get() + 1);
            if key
                .cipher
                .decrypt_in_place_detached(&nonce, &aad, attempt, &tag)
                .is_ok()
            {
                plain.copy_from_slice(attempt);
                opened = true;
                break;
            }
        }
        if !opened {
            return Err(OpenError::Forged);
        }
        let grant = decode_plain(plain).ok_or(OpenError::Forged)?;
        let expires_ms = grant.0;
        let now_ms = u64::try_from(now_unix.as_millis()).unwrap_or(u64::MAX);
        if now_ms >= expires_ms {
            return Err(OpenError::Expired);
        }
        Ok(Opened {
            id: nonce_id(&nonce),
            remaining: Duration::from_millis(expires_ms - now_ms),
            backend: grant.1,
            client: grant.2,
        })
    }
}

/// A freshly sealed token.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Sealed {
    /// The token's text, as handed to the client.
    pub text: String,
    /// Its identity (from its nonce), as [`Opened::id`] will read it.
    pub id: TokenId,
}

/// A token that opened: what it grants, and for how much longer.
#[derive(Debug, Eq, PartialEq)]
pub struct Opened {
    /// The token's identity (from its nonce): one redemption per port per replica.
    pub id: TokenId,
    /// Time left until it expires.
    pub remaining: Duration,
    /// The backend and its addresses.
    pub backend: Backend,
    /// The client it is bound to, if any.
    pub client: Option<IpAddr>,
}

/// Why a grant could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// More ports than one token holds.
    #[error("a sealed token names at most {MAX_SEALED_PORTS} data ports")]
    TooLong,
    /// The system's random source failed.
    #[error("no random nonce: {0}")]
    Random(String),
}

/// Why a sealed token did not open.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum OpenError {
    /// Not the shape of a sealed token (truncated, bad length, bad characters).
    Malformed,
    /// The tag does not verify under the key its id names, or no key has that id (tampered,
    /// or sealed with a key not held).
    Forged,
    /// Past its expiry.
    Expired,
}

/// A token's identity: the first 128 bits of its nonce.
/// A sealed token's random nonce, which also makes its id.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// A fresh random nonce.
    pub fn fresh() -> Result<Self, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
        Ok(Self(nonce))
    }

    /// The id of the token sealed with it.
    pub fn token_id(&self) -> TokenId {
        nonce_id(&self.0)
    }
}

fn nonce_id(nonce: &[u8]) -> TokenId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&nonce[..16]);
    TokenId(u128::from_be_bytes(id))
}

fn encode_plain(
    backend: &Backend,
    expires_unix: Duration,
    client: Option<IpAddr>,
    out: &mut Vec<u8>,
) -> Result<(), SealError> {
    let expires = u64::try_from(expires_unix.as_millis()).unwrap_or(u64::MAX);
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(&backend.id.0.to_be_bytes());
    out.push(match backend.proxy {
        ProxyMode::None => 0,
        ProxyMode::V2 => 1,
        ProxyMode::V2First => 2,
    });
    push_ip(out, client);
    let ports: Vec<(usize, SocketAddr)> = backend
        .addrs
        .iter()
        .enumerate()
        .filter_map(|(i, a)| Some((i, (*a)?)))
        .collect();
    if ports.len() > MAX_SEALED_PORTS || ports.iter().any(|(i, _)| *i > usize::from(u8::MAX)) {
        return Err(SealError::TooLong);
    }
    out.push(ports.len() as u8);
    for (index, addr) in ports {
        out.push(index as u8);
        push_ip(out, Some(addr.ip()));
        out.extend_from_slice(&addr.port().to_be_bytes());
    }
    Ok(())
}

fn push_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => out.push(0),
        Some(IpAddr::V4(v4)) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// A reader over the plaintext that fails (never panics) on a short or odd field.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn ip(&mut self) -> Option<Option<IpAddr>> {
        Some(match self.u8()? {
            0 => None,
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.take(4)?).ok()?,
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(self.take(16)?).ok()?,
            ))),
            _ => return None,
        })
    }
}

type Plain = (u64, Backend, Option<IpAddr>);

fn decode_plain(plain: &[u8]) -> Option<Plain> {
    let mut r = Reader(plain);
    let expires = r.u64()?;
    let backend = BackendId(r.u64()?);
    let proxy = match r.u8()? {
        0 => ProxyMode::None,
        1 => ProxyMode::V2,
        2 => ProxyMode::V2First,
        _ => return None,
    };
    let client = r.ip()?;
    let count = usize::from(r.u8()?);
    if count == 0 || count > MAX_SEALED_PORTS {
        return None;
    }
    let mut addrs: Vec<Option<SocketAddr>> = Vec::new();
    for _ in 0..count {
        let index = usize::from(r.u8()?);
        let ip = r.ip()??;
        let port = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
        if addrs.len() <= index {
            addrs.resize(index + 1, None);
        }
        addrs[index] = Some(SocketAddr::new(ip, port));
    }
    if !r.0.is_empty() {
        return None;
    }
    Some((
        expires,
        Backend {
            id: backend,
            addrs: addrs.into(),
            proxy,
        },
        client,
    ))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// AEAD opens tried by [`KeyRing::open`] on this thread.
        pub(super) static OPENS: Cell<usize> = const { Cell::new(0) };
    }

    /// Opens `text` with `ring`, and how many AEAD opens it took.
    fn open_counted(ring: &KeyRing, text: &[u8]) -> (Result<Opened, OpenError>, usize) {
        OPENS.set(0);
        let result = ring.open(text, NOW);
        (result, OPENS.get())
    }

    /// A key file of `keys`, one a line.
    fn key_file(keys: &[[u8; KEY_LEN]]) -> String {
        keys.iter().map(|k| STANDARD.encode(k) + "\n").collect()
    }

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "HxwdHhscGRoXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    struct Grant {
        backend: Backend,
        client: Option<IpAddr>,
    }

    fn grant(client: Option<IpAddr>) -> Grant {
        Grant {
            backend: Backend {
                id: BackendId(0xDEAD_BEEF),
                addrs: vec![
                    Some("10.1.2.3:7000".parse().unwrap()),
                    None,
                    Some("[fd00::7]:7001".parse().unwrap()),
                ]
                .into(),
                proxy: ProxyMode::V2First,
            },
            client,
        }
    }

    const EXPIRES: Duration = Duration::from_secs(1_000_030);

    impl KeyRing {
        fn seal_text(&self, g: &Grant) -> String {
            self.seal(&g.backend, EXPIRES, g.client).unwrap().text
        }
    }

    const NOW: Duration = Duration::from_secs(1_000_000);

    #[test]
    fn seals_and_opens_with_the_client_bound_or_not() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        for client in [
            None,
            Some("203.0.113.9".parse().unwrap()),
            Some("2001:db8::1".parse().unwrap()),
        ] {
            let g = grant(client);
            let text = ring.seal_text(&g);
            assert!(text.len() <= MAX_SEALED_LEN);
            assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text}");
            assert_eq!(sealed_len(text.as_bytes()), Some(Ok(text.len())));
            let opened = ring.open(text.as_bytes(), NOW).unwrap();
            assert_eq!(opened.backend, g.backend);
            assert_eq!(opened.client, client);
            assert_eq!(opened.remaining, Duration::from_secs(30));
            // The backend's address is in neither the text nor the decoded bytes.
            assert!(!text.contains("10.1.2.3"));
            let body = URL_SAFE_NO_PAD.decode(&text[HEADER_LEN..]).unwrap();
            // (The IP alone, and with its port as the plaintext lays them out; a random 2-byte
            // match of the port alone would be a false alarm.)
            for needle in [&[10u8, 1, 2, 3][..], &[10, 1, 2, 3, 0x1b, 0x58]] {
                assert!(
                    !body.windows(needle.len()).any(|w| w == needle),
                    "{needle:?} readable in the token"
                );
            }
        }
    }

    #[test]
    fn two_seals_differ_and_have_distinct_ids() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        let g = grant(None);
        let a = ring.seal(&g.backend, EXPIRES, None).unwrap();
        let b = ring.seal(&g.backend, EXPIRES, None).unwrap();
        assert_ne!(a.text, b.text);
        assert_ne!(a.id, b.id);
        assert_eq!(ring.open(a.text.as_bytes(), NOW).unwrap().id, a.id);
    }

    #[test]
    fn rotation_first_key_seals_every_key_opens() {
        let old = KeyRing::parse(KEY_A).unwrap();
        let rotating = KeyRing::parse(&format!("# new key first\n{KEY_B}\n\n{KEY_A}\n")).unwrap();
        let rotated = KeyRing::parse(KEY_B).unwrap();
        assert_eq!(rotating.len(), 2);
        let from_old = old.seal_text(&grant(None));
        // The old key, second now, still opens its tokens, and at the cost of one open.
        let (opened, opens) = open_counted(&rotating, from_old.as_bytes());
        assert!(opened.is_ok());
        assert_eq!(opens, 1);
        assert_eq!(
            rotated.open(from_old.as_bytes(), NOW),
            Err(OpenError::Forged)
        );
        let from_rotating = rotating.seal_text(&grant(None));
        assert!(rotated.open(from_rotating.as_bytes(), NOW).is_ok());
    }

    #[test]
    fn expiry_is_checked() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        let text = ring.seal_text(&grant(None));
        assert_eq!(
            ring.open(text.as_bytes(), Duration::from_secs(1_000_030)),
            Err(OpenError::Expired)
        );
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        let text = ring.seal_text(&grant(None)).into_bytes();
        for i in 0..text.len() {
            for bit in 0..8 {
                let mut t = text.clone();
                t[i] ^= 1 << bit;
                assert!(ring.open(&t, NOW).is_err(), "byte {i} bit {bit}");
            }
        }
        for len in 0..text.len() {
            assert!(ring.open(&text[..len], NOW).is_err(), "truncated to {len}");
        }
        let mut longer = text.clone();
        longer.push(b'A');
        assert_eq!(ring.open(&longer, NOW), Err(OpenError::Malformed));
    }

    #[test]
    fn the_length_is_known_from_four_characters() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        let text = ring.seal_text(&grant(None));
        let b = text.as_bytes();
        assert_eq!(sealed_len(&b[..1]), None);
        assert_eq!(sealed_len(&b[..3]), None);
        assert_eq!(sealed_len(&b[..4]), Some(Ok(text.len())));
        assert_eq!(sealed_len(b"550e8400"), Some(Err(())));
        assert_eq!(
            sealed_len(b"S1BP"),
            Some(Err(())),
            "the format before key ids"
        );
        assert_eq!(sealed_len(b"S2A"), None);
        assert_eq!(sealed_len(b"S2AA"), Some(Err(())), "a body too short");
        assert_eq!(sealed_len(b"S2__"), Some(Err(())), "a body too long");
    }

    #[test]
    fn bad_key_files_name_the_line() {
        assert_eq!(
            KeyRing::parse("\n# only a comment\n").unwrap_err(),
            KeyFileError::Empty
        );
        let e = KeyRing::parse(&format!("{KEY_A}\nnot-base64!\n")).unwrap_err();
        assert!(matches!(e, KeyFileError::BadKey { line: 2, .. }), "{e}");
        let e = KeyRing::parse("AAAA").unwrap_err();
        assert!(e.to_string().contains("32 bytes"), "{e}");
    }

    #[test]
    fn a_token_opens_only_with_its_key_and_names_it() {
        let a = KeyRing::parse(KEY_A).unwrap();
        let b = KeyRing::parse(KEY_B).unwrap();
        let text = a.seal_text(&grant(None));
        let body = URL_SAFE_NO_PAD.decode(&text[HEADER_LEN..]).unwrap();
        assert_eq!(
            body[..KEY_ID_LEN],
            a.keys[0].id,
            "the body starts with the key id"
        );
        assert_ne!(a.keys[0].id, b.keys[0].id);
        let (opened, opens) = open_counted(&a, text.as_bytes());
        assert!(opened.is_ok());
        assert_eq!(opens, 1);
        // Another key has another id: refused without an open.
        assert_eq!(
            open_counted(&b, text.as_bytes()),
            (Err(OpenError::Forged), 0)
        );
    }

    #[test]
    fn a_key_id_is_a_function_of_the_key_alone() {
        let a: [u8; KEY_LEN] = STANDARD.decode(KEY_A).unwrap().try_into().unwrap();
        let b: [u8; KEY_LEN] = STANDARD.decode(KEY_B).unwrap().try_into().unwrap();
        let ring = KeyRing::parse(&key_file(&[b, a])).unwrap();
        assert_eq!(ring.keys[0].id, key_id(&b));
        assert_eq!(ring.keys[1].id, key_id(&a));
        assert_eq!(KeyRing::parse(KEY_A).unwrap().keys[0].id, key_id(&a));
    }

    #[test]
    fn a_forged_token_costs_at_most_one_open_whatever_the_number_of_keys() {
        let keys: Vec<[u8; KEY_LEN]> = (0..MAX_KEYS as u8).map(|i| [i; KEY_LEN]).collect();
        let ids: Vec<_> = keys.iter().map(key_id).collect();
        let ring = KeyRing::parse(&key_file(&keys)).unwrap();
        assert_eq!(ring.len(), MAX_KEYS);
        // Every key's tokens open with one AEAD open (the ring seals with its first key: one
        // ring per key, the same file reordered).
        for (i, key) in keys.iter().enumerate() {
            let mut rotated = keys.clone();
            rotated.swap(0, i);
            let sealer = KeyRing::parse(&key_file(&rotated)).unwrap();
            let text = sealer.seal_text(&grant(None)).into_bytes();
            let (opened, opens) = open_counted(&ring, &text);
            assert!(opened.is_ok(), "key {i}");
            let colliding = ids.iter().filter(|&&id| id == key_id(key)).count();
            assert!(opens <= colliding, "key {i}: {opens} opens");
            // Tampered after the key id (a character of the ciphertext): refused, at the
            // same cost.
            let mut forged = text.clone();
            let at = HEADER_LEN + 40;
            forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
            assert_eq!(
                open_counted(&ring, &forged),
                (Err(OpenError::Forged), colliding),
                "key {i}"
            );
        }
        // A key id no key has: no open at all, whatever the body.
        let text = KeyRing::parse(&key_file(&[[0xEE; KEY_LEN]]))
            .unwrap()
            .seal_text(&grant(None));
        assert!(!ids.contains(&key_id(&[0xEE; KEY_LEN])));
        assert_eq!(
            open_counted(&ring, text.as_bytes()),
            (Err(OpenError::Forged), 0)
        );
    }

    #[test]
    fn the_key_id_is_authenticated() {
        // Two keys whose ids collide, found by search (2-byte ids: a few hundred keys).
        let mut by_id = std::collections::HashMap::new();
        let (k1, k2) = (0u32..)
            .find_map(|i| {
                let mut key = [0u8; KEY_LEN];
                key[..4].copy_from_slice(&i.to_be_bytes());
                by_id.insert(key_id(&key), key).map(|other| (other, key))
            })
            .unwrap();
        let ring = KeyRing::parse(&key_file(&[k1, k2])).unwrap();
        let other = KeyRing::parse(&key_file(&[k2, k1])).unwrap();
        // Both open, each trying only the two keys of its id.
        for sealer in [&ring, &other] {
            let text = sealer.seal_text(&grant(None));
            let (opened, opens) = open_counted(&ring, text.as_bytes());
            assert!(opened.is_ok());
            assert!((1..=2).contains(&opens), "{opens}");
        }
        // A key id rewritten to another key's: the tag breaks (the id is associated data).
        let text = KeyRing::parse(KEY_A).unwrap().seal_text(&grant(None));
        let mut body = URL_SAFE_NO_PAD.decode(&text[HEADER_LEN..]).unwrap();
        let b = KeyRing::parse(KEY_B).unwrap();
        body[..KEY_ID_LEN].copy_from_slice(&b.keys[0].id);
        let both = KeyRing::parse(&format!("{KEY_A}\n{KEY_B}\n")).unwrap();
        let relabelled = format!("{}{}", &text[..HEADER_LEN], URL_SAFE_NO_PAD.encode(&body));
        assert_eq!(
            open_counted(&both, relabelled.as_bytes()),
            (Err(OpenError::Forged), 1)
        );
    }

    #[test]
    fn a_key_file_holds_at_most_max_keys() {
        let keys: Vec<[u8; KEY_LEN]> = (0..=MAX_KEYS as u8).map(|i| [i; KEY_LEN]).collect();
        let e = KeyRing::parse(&key_file(&keys)).unwrap_err();
        assert_eq!(
            e,
            KeyFileError::TooMany {
                count: MAX_KEYS + 1
            }
        );
        assert!(e.to_string().starts_with("17 keys, at most 16"), "{e}");
        assert_eq!(
            KeyRing::parse(&key_file(&keys[..MAX_KEYS])).unwrap().len(),
            MAX_KEYS
        );
        // A key given twice is one key (and costs one open), also against the cap.
        let twice = KeyRing::parse(&format!("{KEY_A}\n{KEY_A}\n")).unwrap();
        assert_eq!(twice.len(), 1);
        let mut repeated = keys[..MAX_KEYS].to_vec();
        repeated.push(keys[0]);
        assert_eq!(
            KeyRing::parse(&key_file(&repeated)).unwrap().len(),
            MAX_KEYS
        );
    }

    #[test]
    fn too_many_ports_is_an_error_not_a_panic() {
        let ring = KeyRing::parse(KEY_A).unwrap();
        let mut g = grant(None);
        g.backend.addrs = vec![Some("10.0.0.1:1".parse().unwrap()); MAX_SEALED_PORTS + 1].into();
        assert!(matches!(
            ring.seal(&g.backend, EXPIRES, None),
            Err(SealError::TooLong)
        ));
        g.backend.addrs = vec![Some("[fd00::1]:1".parse().unwrap()); MAX_SEALED_PORTS].into();
        let text = ring.seal_text(&g);
        assert!(text.len() <= MAX_SEALED_LEN);
        assert_eq!(ring.open(text.as_bytes(), NOW).unwrap().backend, g.backend);
    }
}
