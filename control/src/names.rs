//! Kubernetes' own limits on object names and labels, checked on every object an inventory
//! takes in: a file inventory is written by hand or by a script, and nothing else stops a
//! 10,000-character name from becoming a metrics label or a log line.
//!
//! Sans-io and allocation-free on success: a check only looks at the strings. The rules are
//! the API server's (`k8s.io/apimachinery/pkg/util/validation`): `metadata.name` a DNS-1123
//! subdomain (the general rule; some kinds are stricter), `metadata.namespace` a DNS-1123
//! label, label keys an optional DNS-1123 subdomain prefix and a qualified name, label values
//! empty or a qualified name of at most 63 characters.

use std::collections::BTreeMap;

/// The longest DNS-1123 subdomain: `metadata.name`, a label key's prefix.
pub const MAX_SUBDOMAIN_CHARS: usize = 253;
/// The longest DNS-1123 label: `metadata.namespace`.
pub const MAX_LABEL_CHARS: usize = 63;
/// The longest label key name (after the prefix) and label value.
pub const MAX_QUALIFIED_NAME_CHARS: usize = 63;
/// How much of an offending string a message quotes.
const QUOTE_CHARS: usize = 40;

/// What is wrong with a name, a label key or a label value.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum NameError {
    /// Nothing at all.
    #[error("empty")]
    Empty,
    /// Over its limit.
    #[error("{len} characters, over the limit of {max}")]
    TooLong {
        /// Its length, in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a DNS-1123 subdomain.
    #[error(
        "not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting and ending \
         with a letter or digit)"
    )]
    NotSubdomain,
    /// Not a DNS-1123 label.
    #[error(
        "not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a \
         letter or digit)"
    )]
    NotLabel,
    /// Not a qualified name.
    #[error(
        "not a qualified name (letters, digits, '-', '_' and '.', starting and ending with a \
         letter or digit)"
    )]
    NotQualified,
    /// A label key with a prefix and no name.
    #[error("empty name")]
    EmptyName,
    /// A label key whose prefix is not a DNS-1123 subdomain.
    #[error("prefix {0}")]
    Prefix(Box<Self>),
}

/// A metadata field of an object that breaks Kubernetes' rules: which field, its value
/// (quoted short) and what is wrong.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("{field} {value}: {why}")]
pub struct MetadataError {
    /// `metadata.name`, `metadata.namespace`, `metadata.labels key …`.
    pub field: String,
    /// The value, quoted and cut short.
    pub value: String,
    /// What is wrong with it.
    pub why: NameError,
}

/// An object's name, namespace and labels, against Kubernetes' rules.
pub fn check_metadata(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), MetadataError> {
    let error = |field: String, value: &str, why| MetadataError {
        field,
        value: quote(value),
        why,
    };
    dns_subdomain(name).map_err(|why| error("metadata.name".into(), name, why))?;
    // Empty: cluster-scoped, or unset (the file inventory's default namespace).
    if !namespace.is_empty() {
        dns_label(namespace).map_err(|why| error("metadata.namespace".into(), namespace, why))?;
    }
    for (key, value) in labels {
        label_key(key).map_err(|why| error("metadata.labels key".into(), key, why))?;
        label_value(value)
            .map_err(|why| error(format!("metadata.labels[{}] value", quote(key)), value, why))?;
    }
    Ok(())
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels (each lowercase
/// alphanumerics and '-', starting and ending alphanumeric).
pub fn dns_subdomain(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_SUBDOMAIN_CHARS {
        return Err(too_long(s, MAX_SUBDOMAIN_CHARS));
    }
    if s.split('.').all(is_label_shape) {
        Ok(())
    } else {
        Err(NameError::NotSubdomain)
    }
}

/// A DNS-1123 label: at most 63 lowercase alphanumerics and '-', starting and ending
/// alphanumeric.
pub fn dns_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_LABEL_CHARS {
        return Err(too_long(s, MAX_LABEL_CHARS));
    }
    if is_label_shape(s) {
        Ok(())
    } else {
        Err(NameError::NotLabel)
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS-1123 subdomain, the name a qualified name.
pub fn label_key(s: &str) -> Result<(), NameError> {
    let name = match s.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(|why| NameError::Prefix(Box::new(why)))?;
            name
        }
        None => s,
    };
    if name.is_empty() {
        return Err(NameError::EmptyName);
    }
    qualified_name(name)
}

/// A label value: empty, or a qualified name.
pub fn label_value(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        Ok(())
    } else {
        qualified_name(s)
    }
}

/// At most 63 characters of `[A-Za-z0-9_.-]`, starting and ending alphanumeric.
fn qualified_name(s: &str) -> Result<(), NameError> {
    if s.len() > MAX_QUALIFIED_NAME_CHARS {
        return Err(too_long(s, MAX_QUALIFIED_NAME_CHARS));
    }
    let b = s.as_bytes();
    let inner_ok = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    let ends_ok = b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric);
    if inner_ok && ends_ok {
        Ok(())
    } else {
        Err(NameError::NotQualified)
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, any length.
fn is_label_shape(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

fn too_long(s: &str, max: usize) -> NameError {
    NameError::TooLong {
        len: s.chars().count(),
        max,
    }
}

/// `s` in backquotes, cut to [`QUOTE_CHARS`] characters and escaped for one log line.
pub fn quote(s: &str) -> String {
    let mut out = String::from("`");
    for c in s.chars().take(QUOTE_CHARS) {
        out.extend(c.escape_debug());
    }
    if s.chars().nth(QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out.push('`');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains() {
        for ok in ["a", "gs-1", "m-tutorial.v2", "0abc", &"a".repeat(253)] {
            assert_eq!(dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Gs",
            "gs_1",
            "-gs",
            "gs-",
            "a..b",
            ".a",
            "a.",
            "a.-b",
            "gs 1",
            "gś",
            &"a".repeat(254),
        ] {
            assert!(dns_subdomain(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            dns_subdomain(&"a".repeat(10_000)).unwrap_err().to_string(),
            "10000 characters, over the limit of 253"
        );
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert_eq!(dns_label("starx"), Ok(()));
        assert_eq!(dns_label(&"a".repeat(63)), Ok(()));
        for bad in ["", "a.b", "Starx", "-a", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_keys_have_an_optional_subdomain_prefix() {
        for ok in [
            "map",
            "agones.dev/fleet",
            "kubernetes.io/service-name",
            "A_b.c-D",
            &format!("{}/{}", "p".repeat(253), "n".repeat(63)),
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "agones.dev/",
            "Agones.dev/fleet",
            "a/b/c",
            "_x",
            "x_",
            "with space",
            &"n".repeat(64),
            &format!("{}/n", "p".repeat(254)),
        ] {
            assert!(label_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_values_are_empty_or_qualified_names() {
        for ok in [
            "",
            "f1",
            "de_dust2",
            "3",
            "true",
            "A.b-c_D",
            &"v".repeat(63),
        ] {
            assert_eq!(label_value(ok), Ok(()), "{ok:?}");
        }
        for bad in ["-x", "x.", "a b", "a/b", &"v".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_field_and_quote_short() {
        let labels = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let none = BTreeMap::new();
        assert_eq!(check_metadata("gs-1", "", &none), Ok(()));
        assert_eq!(
            check_metadata("gs-1", "starx", &labels("agones.dev/fleet", "f1")),
            Ok(())
        );
        let text = |e: MetadataError| e.to_string();
        let e = text(check_metadata(&"x".repeat(10_000), "", &none).unwrap_err());
        assert!(e.starts_with("metadata.name `xxxx"), "{e}");
        assert!(e.len() < 200, "{} characters: {e}", e.len());
        let e = text(check_metadata("gs", "Bad_NS", &none).unwrap_err());
        assert!(e.starts_with("metadata.namespace `Bad_NS`"), "{e}");
        let e = text(check_metadata("gs", "a", &labels("bad key", "v")).unwrap_err());
        assert!(e.starts_with("metadata.labels key `bad key`"), "{e}");
        let e = text(check_metadata("gs", "a", &labels("k", "a\nb")).unwrap_err());
        assert!(e.starts_with("metadata.labels[`k`] value `a\\nb`"), "{e}");
    }
}
