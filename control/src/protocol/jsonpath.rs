//! Dot paths with `[n]` indexes (`status.ports[0].port`), parsed once and evaluated against
//! `serde_json::Value`s.

use serde_json::Value;

/// One step of a path.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub enum Step {
    /// An object key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// Why a dot path does not parse. The path is quoted cut to a readable length: paths come
/// from clients' queries.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum PathError {
    /// Nothing, or only a dot.
    #[error("empty path")]
    Empty,
    /// `a..b`.
    #[error("empty segment in `{path}`")]
    EmptySegment {
        /// The path, quoted short.
        path: String,
    },
    /// `a[1`.
    #[error("unclosed `[` in `{path}`")]
    Unclosed {
        /// The path, quoted short.
        path: String,
    },
    /// `a[x]`.
    #[error("`{index}` is not an array index in `{path}`: {source}")]
    NotAnIndex {
        /// What stood between the brackets, quoted short.
        index: String,
        /// The path, quoted short.
        path: String,
        /// Why it is no number.
        source: std::num::ParseIntError,
    },
    /// `a[1]b`.
    #[error("unexpected `{rest}` in `{path}`")]
    Unexpected {
        /// What followed the index, quoted short.
        rest: String,
        /// The path, quoted short.
        path: String,
    },
}

/// A parsed dot path.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Path(Vec<Step>);

impl Path {
    /// Parses `a.b[2].c`; keys may contain any character but `.` and `[`.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let short = |s: &str| crate::quote::quote(s).into_owned();
        let text = text.strip_prefix('.').unwrap_or(text);
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        let mut steps = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && rest.is_empty() {
                return Err(PathError::EmptySegment { path: short(text) });
            }
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while !rest.is_empty() {
                let close = rest
                    .find(']')
                    .ok_or_else(|| PathError::Unclosed { path: short(text) })?;
                let index = rest[1..close]
                    .parse()
                    .map_err(|source| PathError::NotAnIndex {
                        index: short(&rest[1..close]),
                        path: short(text),
                        source,
                    })?;
                steps.push(Step::Index(index));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(PathError::Unexpected {
                        rest: short(rest),
                        path: short(text),
                    });
                }
            }
        }
        Ok(Self(steps))
    }

    /// The value at this path, if every step exists.
    pub fn get<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(root, |v, step| match step {
            Step::Key(k) => v.get(k.as_str()),
            Step::Index(i) => v.get(*i),
        })
    }

    /// The value as a comparison string: strings as they are, numbers and booleans printed.
    pub fn get_string(&self, root: &Value) -> Option<String> {
        match self.get(root)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_with_indexes() {
        let v = json!({"status": {"state": "Ready", "ports": [{"name": "a", "port": 7001},
                                                             {"name": "b", "port": 7002}],
                                  "n": 3, "ok": true, "grid": [[1, 2], [3, 4]]}});
        let get = |p: &str| Path::parse(p).unwrap().get_string(&v);
        assert_eq!(get("status.state").as_deref(), Some("Ready"));
        assert_eq!(get(".status.state").as_deref(), Some("Ready"));
        assert_eq!(get("status.ports[1].port").as_deref(), Some("7002"));
        assert_eq!(get("status.ports[0].name").as_deref(), Some("a"));
        assert_eq!(get("status.n").as_deref(), Some("3"));
        assert_eq!(get("status.ok").as_deref(), Some("true"));
        assert_eq!(get("status.grid[1][0]").as_deref(), Some("3"));
        assert_eq!(get("status.ports[5].port"), None);
        assert_eq!(get("status.missing"), None);
        assert_eq!(get("status.ports"), None, "arrays are not scalars");
    }

    #[test]
    fn bad_paths() {
        for bad in ["", "a..b", "a[", "a[x]", "a[1]b", "."] {
            assert!(Path::parse(bad).is_err(), "{bad:?}");
        }
    }
}
