//! The hand-off stream a new proxy reads from the old one (dataplane/src/handoff/): the sans-io
//! framing (`FrameHeader::decode`, `Reassembler`, `decode_stream`) on arbitrary bytes as the
//! frames of a peer, then every reassembled message as each message of the exchange
//! (`Hello`, `Answer`, `Decision`, `State`, `Released`, and a session batch in each format
//! read), and `State::check` on a state that parses.
//!
//! The input is the byte stream itself (descriptors are only counted by the frame headers; the
//! seeds come from the recorded-format fixture). Checked besides "no panic": reading frame by
//! frame yields exactly what `decode_stream` yields (or both fail), a message re-encoded
//! decodes to itself, a parsed message prints back as JSON that parses to the same value, and
//! a state `check` accepts names only descriptors that came with it.
#![no_main]

use libfuzzer_sys::fuzz_target;

use dataplane::handoff::stream::{
    FrameHeader, HEADER_LEN, RawMessage, Reassembler, decode_stream, encode_message,
};
use dataplane::handoff::wire::{
    Answer, Decision, Hello, READS, Released, State, decode_batch, encode_batch,
};

fuzz_target!(|data: &[u8]| {
    let (messages, failed) = read_frames(data);
    match decode_stream(data) {
        Ok(all) => {
            assert!(
                !failed,
                "frame by frame failed where the whole stream did not"
            );
            assert_eq!(all, messages);
        }
        Err(_) => assert!(
            failed,
            "the whole stream failed where frame by frame did not"
        ),
    }
    for message in &messages {
        let encoded = encode_message(&message.bytes, message.fds).expect("within the bounds");
        let again = decode_stream(&encoded).expect("a re-encoded message decodes");
        assert_eq!(again.as_slice(), std::slice::from_ref(message));
        parse_as_every_message(message);
    }
});

/// The messages before the first frame that fails, and whether one did (or the bytes ended
/// in the middle of a message).
fn read_frames(mut bytes: &[u8]) -> (Vec<RawMessage>, bool) {
    let mut reassembler = Reassembler::new();
    let mut messages = Vec::new();
    while let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() {
        let Ok(header) = FrameHeader::decode(head) else {
            return (messages, true);
        };
        assert_eq!(&header.encode(), head, "a header that decodes encodes back");
        if reassembler.check(&header).is_err() {
            return (messages, true);
        }
        let Some((payload, rest)) = rest.split_at_checked(header.payload_len as usize) else {
            return (messages, true);
        };
        match reassembler.push(&header, payload) {
            Ok(message) => messages.extend(message),
            Err(_) => return (messages, true),
        }
        bytes = rest;
    }
    (messages, !bytes.is_empty() || reassembler.in_message())
}

fn parse_as_every_message(message: &RawMessage) {
    if let Ok(hello) = serde_json::from_slice::<Hello>(&message.bytes) {
        assert_eq!(reparse(&hello), hello);
    }
    if let Ok(answer) = serde_json::from_slice::<Answer>(&message.bytes) {
        assert_eq!(reparse(&answer), answer);
    }
    if let Ok(decision) = serde_json::from_slice::<Decision>(&message.bytes) {
        assert_eq!(reparse(&decision), decision);
    }
    if let Ok(released) = serde_json::from_slice::<Released>(&message.bytes) {
        assert_eq!(reparse(&released), released);
    }
    for &version in READS {
        if let Ok(batch) = decode_batch(version, &message.bytes) {
            let bytes = encode_batch(version, &batch).expect("a parsed batch writes");
            let again = decode_batch(version, &bytes).expect("a written batch reads");
            assert_eq!(again, batch, "format {version}");
        }
    }
    if let Ok(state) = serde_json::from_slice::<State>(&message.bytes) {
        assert_eq!(reparse(&state), state);
        let workers = state.workers.len();
        if state.check(workers, message.fds).is_ok() {
            let named = state.listeners.iter().flat_map(|l| l.fds.iter().copied());
            let named = named
                .chain(
                    state
                        .workers
                        .iter()
                        .flat_map(|w| w.pools.iter().map(|p| p.fd)),
                )
                .chain(state.query_fd)
                .chain(state.admin_fd);
            for fd in named {
                assert!(
                    (fd as usize) < message.fds,
                    "descriptor {fd} of {}",
                    message.fds
                );
            }
            assert!(state.listeners.iter().all(|l| l.fds.len() == workers));
        }
        // Another worker count is refused, never a panic.
        assert!(state.check(workers + 1, message.fds).is_err());
    }
}

/// The value printed as JSON and read back.
fn reparse<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let json = serde_json::to_vec(value).expect("a parsed message prints");
    serde_json::from_slice(&json).expect("a printed message parses")
}
