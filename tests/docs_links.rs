//! Every relative link in the documentation resolves: for `README.md` and each `docs/*.md`,
//! every `[text](path)` or `[text](path#anchor)` outside code (fenced blocks and inline code
//! spans) names a file or folder that exists, relative to the linking file, and an `#anchor`
//! into a Markdown file names one of its headings by GitHub's slug rule. Links to other sites
//! (`http:`, `https:`, `mailto:`) are not followed. A failure lists every broken link at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("a docs/ folder")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);

    let mut headings = Headings::default();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a readable Markdown file");
        let shown = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        for link in links(&text) {
            checked += 1;
            if let Err(why) = resolve(file, &link.target, &mut headings) {
                // Paths in the message as from the repository root.
                let why = why.replace(&format!("{}/", root.display()), "");
                broken.push(format!("{shown}:{}: ({}): {why}", link.line, link.target));
            }
        }
    }
    assert!(
        checked > 0,
        "no relative link found at all: is the scanner broken?"
    );
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the docs:\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
}

#[test]
fn a_broken_link_is_reported_and_code_is_not_read() {
    let dir = std::env::temp_dir().join(format!("docs-links-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("page.md");
    std::fs::write(
        &page,
        "# A page\n\n## The `setup` step, again!\n\n\
         [ok](page.md#the-setup-step-again) [self](#a-page) [site](https://example.com/x)\n\
         [gone](missing.md) [no heading](page.md#nowhere)\n\
         `[in code](nope.md)`\n\n```text\n[in a fence](nope.md)\n```\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&page).unwrap();
    let mut headings = Headings::default();
    let results: Vec<(String, bool)> = links(&text)
        .into_iter()
        .map(|link| {
            let ok = resolve(&page, &link.target, &mut headings).is_ok();
            (link.target, ok)
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        results,
        [
            ("page.md#the-setup-step-again".to_string(), true),
            ("#a-page".to_string(), true),
            ("missing.md".to_string(), false),
            ("page.md#nowhere".to_string(), false),
        ]
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(
        slug("Sealed tokens (many replicas)"),
        "sealed-tokens-many-replicas"
    );
    assert_eq!(
        slug("When something runs out: what the proxy does"),
        "when-something-runs-out-what-the-proxy-does"
    );
    assert_eq!(
        slug("`GET /sessions` and snake_case"),
        "get-sessions-and-snake_case"
    );
    assert_eq!(slug("Data ports: UDP and TCP"), "data-ports-udp-and-tcp");
}

/// One relative link: its target (path and optional `#anchor`) and the line it is on.
struct Link {
    target: String,
    line: usize,
}

/// The relative links of a Markdown text, in order, leaving out code and other sites.
fn links(text: &str) -> Vec<Link> {
    let prose = without_code(text);
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = prose[from..].find("](") {
        let start = from + at + 2;
        let rest = &prose[start..];
        let end = rest
            .find(|c: char| c == ')' || c.is_whitespace())
            .unwrap_or(rest.len());
        let target = rest[..end].trim_start_matches('<').trim_end_matches('>');
        let external = ["http://", "https://", "mailto:"]
            .iter()
            .any(|scheme| target.starts_with(scheme));
        if !target.is_empty() && !external {
            found.push(Link {
                target: target.to_string(),
                line: prose[..start].matches('\n').count() + 1,
            });
        }
        from = start;
    }
    found
}

/// The text with fenced code blocks and inline code spans blanked out (newlines kept, so line
/// numbers stay true).
fn without_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<String> = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let opens = marker.len() >= 3 && marker.chars().all(|c| c == marker.as_bytes()[0] as char);
        match &fence {
            Some(open) if opens && marker.starts_with(open.as_str()) => {
                fence = None;
                out.push('\n');
            }
            Some(_) => out.push_str(&blank(line)),
            None if opens => {
                fence = Some(marker);
                out.push('\n');
            }
            None => out.push_str(line),
        }
    }
    without_code_spans(&out)
}

/// The text with each inline code span (a run of backticks up to the next run of the same
/// length) blanked out; a run with no closing one is kept as it is.
fn without_code_spans(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('`') {
        out.push_str(&rest[..at]);
        let run = rest[at..].chars().take_while(|&c| c == '`').count();
        let after = &rest[at + run..];
        match closing_run(after, run) {
            Some(close) => {
                out.push_str(&blank(&rest[at..at + run + close + run]));
                rest = &after[close + run..];
            }
            None => {
                out.push_str(&rest[at..at + run]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where in `text` the next run of exactly `run` backticks starts.
fn closing_run(text: &str, run: usize) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = text[from..].find('`') {
        let start = from + at;
        let len = text[start..].chars().take_while(|&c| c == '`').count();
        if len == run {
            return Some(start);
        }
        from = start + len;
    }
    None
}

/// `text` with every character but newlines turned into a space.
fn blank(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' { '\n' } else { ' ' })
        .collect()
}

/// The heading slugs of each Markdown file read so far.
#[derive(Default)]
struct Headings(HashMap<PathBuf, Vec<String>>);

impl Headings {
    /// The slugs of `file`'s headings, read once.
    fn of(&mut self, file: &Path) -> Result<&[String], String> {
        if !self.0.contains_key(file) {
            let text = std::fs::read_to_string(file)
                .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
            self.0.insert(file.to_path_buf(), slugs(&text));
        }
        Ok(&self.0[file])
    }
}

/// Checks one link target from `file`: the path exists, and an anchor into a Markdown file is
/// one of its headings.
fn resolve(file: &Path, target: &str, headings: &mut Headings) -> Result<(), String> {
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let dir = file.parent().expect("a file in a folder");
    let linked = if path.is_empty() {
        file.to_path_buf()
    } else {
        dir.join(path)
    };
    if !linked.exists() {
        return Err(format!("no such file: {}", linked.display()));
    }
    let is_markdown = linked.extension().is_some_and(|ext| ext == "md");
    match anchor {
        Some(anchor) if is_markdown => {
            let known = headings.of(&linked)?;
            if known.iter().any(|slug| slug == anchor) {
                Ok(())
            } else {
                Err(format!(
                    "no heading #{anchor} in {} (its headings: {})",
                    linked.display(),
                    known.join(", ")
                ))
            }
        }
        _ => Ok(()),
    }
}

/// The anchors GitHub gives a Markdown text's headings, in order (a repeated one gets `-1`,
/// `-2`, …).
fn slugs(text: &str) -> Vec<String> {
    let prose = without_fences(text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut found = Vec::new();
    for line in prose.lines() {
        let level = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&level) || !line[level..].starts_with(' ') {
            continue;
        }
        let base = slug(line[level..].trim().trim_end_matches('#').trim());
        let count = seen.entry(base.clone()).or_insert(0);
        found.push(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    found
}

/// `text` with fenced code blocks blanked, inline code kept (a heading's code is part of its
/// slug).
fn without_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_fence = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            out.push('\n');
        } else if in_fence {
            out.push('\n');
        } else {
            out.push_str(line);
        }
    }
    out
}

/// GitHub's anchor for a heading's text: lowercase, characters other than letters, digits,
/// spaces, hyphens and underscores dropped, spaces turned into hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}
