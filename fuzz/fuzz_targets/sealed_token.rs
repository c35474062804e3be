//! Sealed tokens (dataplane/src/seal.rs): what `KeyRing::open` makes of a token and
//! `KeyRing::parse` of a key file. The first input byte picks the mode:
//!
//! * 0: the rest is `nonce (24) || plaintext`, sealed here with the ring's key in the wire
//!   form (so the fuzzer reaches the plaintext decoder behind the tag): it must classify as a
//!   sealed token, `open` must not panic, an opened grant must seal and open back to the same
//!   grant, and the token with one character changed, or under another key, must not open;
//! * 1: the rest is a key file (UTF-8): `parse` must not panic, and a ring it gives must open
//!   what it seals;
//! * 2: the rest is a client's token text: `open` must not panic and must not open it.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use dataplane::policy::grant::{Backend, BackendId, TokenId};
use dataplane::policy::packet::{Classified, Presented, classify};
use dataplane::policy::proxy_protocol::ProxyMode;
use dataplane::policy::seal::{
    HEADER_LEN, KEY_ID_LEN, KeyRing, MAX_SEALED_LEN, SEALED_PREFIX, is_body_char, key_id,
};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\
                        \x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f";
const OTHER_KEY: [u8; 32] = [0x5a; 32];
const NONCE_LEN: usize = 24;
const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";
/// Expiries in the plaintext are Unix ms: a fixed "now" keeps runs reproducible.
const NOW: Duration = Duration::from_secs(1_700_000_000);

static KEYS: LazyLock<KeyRing> =
    LazyLock::new(|| KeyRing::parse(&STANDARD.encode(KEY)).expect("a valid key"));
static OTHER: LazyLock<KeyRing> =
    LazyLock::new(|| KeyRing::parse(&STANDARD.encode(OTHER_KEY)).expect("a valid key"));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => sealed_here(rest),
        1 => key_file(rest),
        _ => {
            assert!(
                KEYS.open(rest, NOW).is_err(),
                "a fuzzer forged a sealed token"
            );
        }
    }
});

/// Seals `nonce || plaintext` in the wire form of seal.rs: `S2`, the body length in two
/// base64url digits, then base64url of the key's id, nonce, ciphertext and tag, the header and
/// the key id as associated data.
fn seal_raw(nonce: &[u8], plain: &[u8]) -> Option<String> {
    let chars = ((KEY_ID_LEN + NONCE_LEN + plain.len() + 16) * 4).div_ceil(3);
    if chars >= 64 * 64 {
        return None;
    }
    let id = key_id(&KEY);
    let mut aad = vec![
        SEALED_PREFIX[0],
        SEALED_PREFIX[1],
        B64URL[chars / 64],
        B64URL[chars % 64],
    ];
    aad.extend_from_slice(&id);
    let mut body = id.to_vec();
    body.extend_from_slice(nonce);
    body.extend_from_slice(plain);
    let cipher = XChaCha20Poly1305::new_from_slice(&KEY).expect("a 32-byte key");
    let tag = cipher
        .encrypt_in_place_detached(
            XNonce::from_slice(nonce),
            &aad,
            &mut body[KEY_ID_LEN + NONCE_LEN..],
        )
        .ok()?;
    body.extend_from_slice(&tag);
    let mut text: String = aad[..HEADER_LEN].iter().map(|&b| char::from(b)).collect();
    URL_SAFE_NO_PAD.encode_string(&body, &mut text);
    Some(text)
}

fn sealed_here(rest: &[u8]) {
    if rest.len() < NONCE_LEN + 1 {
        return;
    }
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    // The last byte picks which character of the token is changed for the tamper check.
    let (&tamper_at, plain) = rest.split_last().expect("not empty");
    let Some(text) = seal_raw(nonce, plain) else {
        return;
    };
    let bytes = text.as_bytes();
    let fits = bytes.len() <= MAX_SEALED_LEN;
    let opened = KEYS.open(bytes, NOW);
    match classify(bytes, MAGIC) {
        Classified::Token(Presented::Sealed(t)) => assert_eq!(t, bytes),
        other if fits && opened.is_ok() => panic!("an openable token classifies as {other:?}"),
        _ => {}
    }
    let Ok(opened) = opened else {
        return;
    };
    assert!(fits, "a token longer than MAX_SEALED_LEN opened");
    let id = TokenId(u128::from_be_bytes(
        nonce[..16].try_into().expect("16 bytes"),
    ));
    assert_eq!(opened.id, id, "the id is the nonce's first 128 bits");
    assert!(opened.remaining > Duration::ZERO);
    assert!(opened.backend.addrs.len() <= 256);
    assert!(opened.backend.addrs.last().is_some_and(Option::is_some));
    // Sealed again by the real sealer, the grant opens the same.
    let expires = NOW + opened.remaining;
    let again = KEYS
        .seal(&opened.backend, expires, opened.client)
        .expect("an opened grant seals again");
    let reopened = KEYS.open(again.text.as_bytes(), NOW).expect("it opens");
    assert_eq!(reopened.id, again.id);
    assert_eq!(
        (&reopened.backend, reopened.client, reopened.remaining),
        (&opened.backend, opened.client, opened.remaining)
    );
    // Another key does not open it, and neither does any one-character change.
    assert!(OTHER.open(bytes, NOW).is_err(), "opened under another key");
    let mut tampered = bytes.to_vec();
    let at = HEADER_LEN + usize::from(tamper_at) % (tampered.len() - HEADER_LEN);
    let old = tampered[at];
    tampered[at] = B64URL[(B64URL.iter().position(|&b| b == old).expect("base64url") + 1) % 64];
    assert!(is_body_char(tampered[at]));
    assert!(
        KEYS.open(&tampered, NOW).is_err(),
        "a tampered token opened"
    );
}

fn key_file(rest: &[u8]) {
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(ring) = KeyRing::parse(text) else {
        return;
    };
    assert!(!ring.is_empty() && ring.len() >= 1);
    let backend = Backend {
        id: BackendId(7),
        addrs: vec![Some("10.0.0.1:7777".parse().expect("an address")), None].into(),
        proxy: ProxyMode::V2,
    };
    let sealed = ring
        .seal(&backend, NOW + Duration::from_secs(30), None)
        .expect("seals");
    let opened = ring
        .open(sealed.text.as_bytes(), NOW)
        .expect("opens what it sealed");
    // The wire form names the ports served only: a trailing unserved port comes back absent.
    assert_eq!(opened.backend.id, backend.id);
    assert_eq!(opened.backend.proxy, backend.proxy);
    for port in 0..backend.addrs.len().max(opened.backend.addrs.len()) {
        assert_eq!(
            opened.backend.addr_for(port),
            backend.addr_for(port),
            "port {port}"
        );
    }
    assert_eq!(opened.id, sealed.id);
}
