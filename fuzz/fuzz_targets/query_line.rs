//! The query port's request lines (control/src/server.rs): the input is what a client sends on
//! one connection. It is cut into lines like the server does (`\n`, each line trimmed, empty
//! lines skipped, lines over `MAX_REQUEST_BYTES` refused), and each line goes through the same
//! steps as a request: `serde_json::from_slice::<Query>`, then `Query::validate` (what
//! `Director::query` runs first), or on a parse error the quoted error message the client gets.
//! Nothing may panic, and an error message must stay short whatever the input.
#![no_main]

use control::query::jsonpath::Path;
use control::query::server::MAX_REQUEST_BYTES;
use control::query::{ErrorCode, Query, QueryError};
use libfuzzer_sys::fuzz_target;

/// `quote` keeps 64 characters, `quote_message` 300, each plus a short `… (N bytes)` suffix.
const QUOTE_MAX_CHARS: usize = 64 + 32;
const MESSAGE_MAX_CHARS: usize = 300 + 32;

fuzz_target!(|data: &[u8]| {
    for line in data.split_inclusive(|&b| b == b'\n') {
        // The server reads at most MAX_REQUEST_BYTES + 1 bytes for one line and refuses a line
        // without its newline that is longer than the limit.
        if line.len() > MAX_REQUEST_BYTES && line.last() != Some(&b'\n') {
            continue;
        }
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        request(line);
    }
});

fn request(line: &[u8]) {
    let query = match serde_json::from_slice::<Query>(line) {
        Ok(q) => q,
        Err(e) => {
            let shown = control::quote::quote_message(&e.to_string()).into_owned();
            assert!(shown.chars().count() <= MESSAGE_MAX_CHARS, "{shown}");
            // The answer line the client gets must serialize.
            let err = QueryError::new(ErrorCode::BadRequest, format!("invalid request: {shown}"));
            serde_json::to_vec(&err).expect("an error answer serializes");
            return;
        }
    };
    match query.validate() {
        Ok(()) => {
            assert!(!query.resource_type.is_empty());
            assert!(query.kind.is_none() || query.kind.as_deref() == Some("query"));
            if let Some(sq) = &query.status_query {
                // What `select::matching` does with a valid query's status query.
                let path = Path::parse(&sq.json_path).expect("validate checked the path");
                assert!(
                    !sq.expected().is_empty(),
                    "a valid statusQuery expects a value"
                );
                // Evaluate the path against the request itself: any JSON value will do.
                if let Ok(root) = serde_json::from_slice::<serde_json::Value>(line) {
                    let _ = path.get_string(&root);
                }
            }
        }
        Err(reason) => {
            // The reason quotes client input (a request type, a path): it must stay short.
            let reason = reason.to_string();
            assert!(
                reason.chars().count() <= MESSAGE_MAX_CHARS + QUOTE_MAX_CHARS + 64,
                "{} chars: {reason}",
                reason.chars().count()
            );
        }
    }
}
