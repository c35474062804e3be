//! The first datagram of an unknown client (dataplane/src/packet.rs): `classify` with the
//! default control magic, and again with a magic taken from the input (first byte: its length,
//! 0 to 32 bytes as the config allows, then the magic itself, then the datagram). A sealed
//! token it finds is opened with a key ring, as the worker does on redemption.
//!
//! Nothing may panic; the four outcomes must agree with `control_body`/`parse_token`; a UUID
//! token must print back as the text it was read from; a sealed token is the datagram's text
//! and never opens (a fuzzer cannot forge its tag).
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use dataplane::policy::packet::{
    Classified, Presented, TOKEN_LEN, classify, control_body, parse_token,
};
use dataplane::policy::seal::{HEADER_LEN, KeyRing, SEALED_PREFIX, is_body_char, sealed_len};
use libfuzzer_sys::fuzz_target;

const DEFAULT_MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";
/// Any 32-byte key: the fuzzer never sees it.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
static KEYS: LazyLock<KeyRing> = LazyLock::new(|| KeyRing::parse(KEY).expect("a valid key"));
const NOW: Duration = Duration::from_secs(1_700_000_000);

fuzz_target!(|data: &[u8]| {
    check(data, DEFAULT_MAGIC);
    if let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n % 33).min(rest.len());
        let (magic, datagram) = rest.split_at(n);
        check(datagram, magic);
    }
});

fn check(datagram: &[u8], magic: &[u8]) {
    let body = control_body(datagram, magic);
    match classify(datagram, magic) {
        Classified::Token(token) => {
            assert!(body.is_none(), "a token datagram starts with the magic");
            assert_eq!(parse_token(datagram), Some(token));
            same_text(token, datagram);
        }
        Classified::Control(token) => {
            let body = body.expect("a control packet starts with the magic");
            assert!(!magic.is_empty());
            assert_eq!(parse_token(body), Some(token));
            same_text(token, body);
        }
        Classified::BadControl => {
            let body = body.expect("a bad control packet starts with the magic");
            assert!(!magic.is_empty());
            assert_eq!(parse_token(body), None);
        }
        Classified::Payload => {
            assert!(body.is_none(), "payload does not start with the magic");
            assert_eq!(parse_token(datagram), None);
        }
    }
}

/// The token is the text (less one trailing `\n` or `\r\n`) it was read from.
fn same_text(token: Presented<'_>, bytes: &[u8]) {
    let text = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    match token {
        Presented::Uuid(id) => {
            assert_eq!(text.len(), TOKEN_LEN);
            let printed = id.to_string();
            assert!(
                printed.as_bytes().eq_ignore_ascii_case(text),
                "{printed} printed from {:?}",
                String::from_utf8_lossy(text)
            );
            assert_eq!(parse_token(printed.as_bytes()), Some(token), "round trip");
        }
        Presented::Sealed(sealed) => {
            assert_eq!(sealed, text, "a sealed token is the whole text");
            assert!(sealed.starts_with(SEALED_PREFIX));
            assert!(matches!(sealed_len(sealed), Some(Ok(_))));
            assert!(sealed[HEADER_LEN..].iter().all(|&b| is_body_char(b)));
            let _ = token.to_string();
            // Redemption opens it: a forged one must fail, and cheaply.
            assert!(
                KEYS.open(sealed, NOW).is_err(),
                "a fuzzer forged a sealed token"
            );
        }
    }
}
