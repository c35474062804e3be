//! Client and operator input quoted in error messages, cut to a readable length: an error
//! answer must never echo a 60 KB field back (SPEC section 2).

use std::borrow::Cow;

/// A user-given string for an error message, cut to a readable length.
pub fn quote(text: &str) -> Cow<'_, str> {
    cut(text, 64)
}

/// A message that may quote user input (a parser's), cut to a readable length.
pub fn quote_message(text: &str) -> Cow<'_, str> {
    cut(text, 300)
}

fn cut(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => text.into(),
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], text.len()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_user_strings_are_quoted_short() {
        let long = "x".repeat(60_000);
        let q = quote(&long);
        assert!(q.len() < 200 && q.contains("60000 bytes"), "{q}");
        assert_eq!(quote("short"), "short");
        assert!(quote_message(&long).len() < 1024);
        // Multi-byte characters are cut on a boundary.
        let accents = "é".repeat(100);
        assert!(quote(&accents).starts_with("éé"));
    }
}
