//! Masking of inline secrets in config text, for anything that shows the file to a human (the
//! daemon logs a diff of each config reload).
//!
//! Matching lines cannot do this: YAML writes the same field as `api_key: v`, `"api_key": v`,
//! `{type: ngrok, api_key: v}`, a folded or literal block scalar over several lines, or an alias
//! to a value anchored elsewhere. So the text is read with the YAML event parser and the source
//! span of every secret value is replaced, wherever and however it is written. Text that does
//! not parse is not shown at all ([`mask_secrets`] returns `None`).

use std::collections::{BTreeMap, BTreeSet};

use serde_saphyr::granit_parser::{Event, Parser, Span};

/// What a masked value is shown as.
pub const MASK: &str = "***";

/// The config text with the value of every field that can hold a credential replaced by
/// [`MASK`]: `api_key` and `key_secret` (and any field named like a secret: `*secret*`,
/// `*password*`, `*token*`, `*private_key*`), in block or flow style, with quoted keys, as block
/// scalars or multi-line scalars; the value an alias in such a field points to is masked where
/// its anchor defines it. A value that is just a `${VAR}` reference is kept (it is not the
/// secret), and so are `*_file` paths. The password of a URL (`https://u:p@host`) is masked
/// wherever it appears. Returns `None` when the text is not valid YAML: nothing of it
/// can then be shown safely.
pub fn mask_secrets(text: &str) -> Option<String> {
    let tree = Tree::parse(text)?;
    let mut spans = BTreeSet::new();
    for root in &tree.roots {
        tree.walk(*root, &mut spans, &mut BTreeSet::new());
    }
    Some(replace(text, &spans))
}

/// Whether a mapping key names a field whose value may be a credential.
pub fn is_secret_field(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase().replace('-', "_");
    // A file's path, an environment variable's name, a kind: not the secret itself.
    if ["_file", "_path", "_env", "_kind", "_type"]
        .iter()
        .any(|s| n.ends_with(s))
    {
        return false;
    }
    [
        "api_key",
        "apikey",
        "key_secret",
        "secret",
        "password",
        "passwd",
        "passphrase",
        "token",
        "private_key",
        "bearer",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// One node of the document, by index into [`Tree::nodes`].
#[derive(Debug)]
enum Node {
    Scalar {
        value: String,
        span: Span,
    },
    Seq(Vec<usize>),
    Map(Vec<(usize, usize)>),
    /// An alias: the node its anchor was defined on, if known.
    Alias(Option<usize>),
}

struct Tree {
    nodes: Vec<Node>,
    roots: Vec<usize>,
    /// The text, by character (spans count characters).
    chars: Vec<char>,
}

impl Tree {
    /// Reads every document of the stream; `None` on any YAML error.
    fn parse(text: &str) -> Option<Tree> {
        let mut tree = Tree {
            nodes: Vec::new(),
            roots: Vec::new(),
            chars: text.chars().collect(),
        };
        let mut anchors: BTreeMap<usize, usize> = BTreeMap::new();
        // Open collections: their node index.
        let mut open: Vec<usize> = Vec::new();
        // A mapping's pending key, per open mapping (by node index).
        let mut pending_key: BTreeMap<usize, usize> = BTreeMap::new();
        for item in Parser::new_from_str(text) {
            let (event, span) = item.ok()?;
            let (node, anchor, opens) = match event {
                Event::Scalar(value, _, anchor, _) => (
                    Node::Scalar {
                        value: value.into_owned(),
                        span,
                    },
                    anchor,
                    false,
                ),
                Event::SequenceStart(_, anchor, _) => (Node::Seq(Vec::new()), anchor, true),
                Event::MappingStart(_, anchor, _) => (Node::Map(Vec::new()), anchor, true),
                Event::Alias(id) => (Node::Alias(anchors.get(&id).copied()), 0, false),
                // An alias to nothing: it cannot point at a secret, but be safe and refuse.
                Event::UnresolvedAlias(_) => return None,
                Event::SequenceEnd | Event::MappingEnd => {
                    open.pop()?;
                    continue;
                }
                _ => continue,
            };
            let index = tree.nodes.len();
            tree.nodes.push(node);
            if anchor != 0 {
                anchors.insert(anchor, index);
            }
            match open.last().copied() {
                None => tree.roots.push(index),
                Some(parent) => match tree.nodes.get_mut(parent)? {
                    Node::Seq(items) => items.push(index),
                    Node::Map(entries) => match pending_key.remove(&parent) {
                        None => {
                            pending_key.insert(parent, index);
                        }
                        Some(key) => entries.push((key, index)),
                    },
                    _ => return None,
                },
            }
            if opens {
                open.push(index);
            }
        }
        open.is_empty().then_some(tree)
    }

    /// The node an alias stands for (following aliases), or the node itself.
    fn resolve(&self, mut index: usize) -> Option<usize> {
        for _ in 0..=self.nodes.len() {
            match self.nodes.get(index)? {
                Node::Alias(target) => index = (*target)?,
                _ => return Some(index),
            }
        }
        None
    }

    fn key_name(&self, key: usize) -> Option<&str> {
        match self.nodes.get(self.resolve(key)?)? {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Collects the spans to mask in the node `index`, an ordinary (non-secret) position.
    fn walk(&self, index: usize, out: &mut BTreeSet<(usize, usize)>, seen: &mut BTreeSet<usize>) {
        let Some(index) = self.resolve(index) else {
            return;
        };
        if !seen.insert(index) {
            return;
        }
        match self.nodes.get(index) {
            Some(Node::Scalar { value, span }) => {
                if url_with_password(value) {
                    out.insert(self.password_range(range(span)));
                }
            }
            Some(Node::Seq(items)) => {
                for item in items {
                    self.walk(*item, out, seen);
                }
            }
            Some(Node::Map(entries)) => {
                for (key, value) in entries {
                    self.walk(*key, out, seen);
                    if self.key_name(*key).is_some_and(is_secret_field) {
                        self.secret(*value, out, &mut BTreeSet::new());
                    } else {
                        self.walk(*value, out, seen);
                    }
                }
            }
            Some(Node::Alias(_)) | None => {}
        }
    }

    /// The part of the URL written at `span` that holds its password (from the first `:` after
    /// `://` to the last `@`), so that a diff still shows which host, port or database changed;
    /// the whole span when the URL is not written on one line in that shape.
    fn password_range(&self, (start, end): (usize, usize)) -> (usize, usize) {
        let written = self.chars.get(start..end).unwrap_or_default();
        if written.contains(&'\n') {
            return (start, end);
        }
        let rest = written
            .windows(3)
            .position(|w| w == [':', '/', '/'])
            .map(|i| i + 3);
        let part = rest.and_then(|rest| {
            let at = rest + written[rest..].iter().rposition(|c| *c == '@')?;
            let colon = rest + written[rest..at].iter().position(|c| *c == ':')?;
            Some((start + colon + 1, start + at))
        });
        part.unwrap_or((start, end))
    }

    /// Collects the spans to mask in the node `index`, the value of a secret field: a scalar (or
    /// every scalar of a list) is masked where it is written, an alias where its anchor is.
    fn secret(&self, index: usize, out: &mut BTreeSet<(usize, usize)>, seen: &mut BTreeSet<usize>) {
        let Some(index) = self.resolve(index) else {
            return;
        };
        if !seen.insert(index) {
            return;
        }
        match self.nodes.get(index) {
            Some(Node::Scalar { value, span }) => {
                if !is_reference(value) {
                    out.insert(range(span));
                }
            }
            Some(Node::Seq(items)) => {
                for item in items {
                    self.secret(*item, out, seen);
                }
            }
            // A mapping is structure, not a value: its own keys say what is secret.
            Some(Node::Map(_)) => self.walk(index, out, &mut BTreeSet::new()),
            Some(Node::Alias(_)) | None => {}
        }
    }
}

fn range(span: &Span) -> (usize, usize) {
    (span.start.index(), span.end.index())
}

/// `${NAME}` and nothing else: the name of an environment variable, not a secret.
fn is_reference(value: &str) -> bool {
    value
        .trim()
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .is_some_and(|name| {
            name.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// `scheme://user:password@host...`: a URL [`crate::text::hide_url_password`] would hide a
/// password in.
fn url_with_password(value: &str) -> bool {
    matches!(
        crate::text::hide_url_password(value),
        std::borrow::Cow::Owned(_)
    )
}

/// `text` with each character range in `spans` replaced by [`MASK`]. Trailing line breaks and
/// blanks inside a span (a block scalar's span runs to the next key) are kept, so the lines
/// after it stay as they were.
fn replace(text: &str, spans: &BTreeSet<(usize, usize)>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for &(start, end) in spans {
        let (start, end) = (start.max(at), end.min(chars.len()));
        if start >= end {
            continue;
        }
        out.extend(chars.get(at..start).unwrap_or_default());
        let mut content_end = end;
        while content_end > start
            && chars
                .get(content_end - 1)
                .is_some_and(|c| c.is_whitespace())
        {
            content_end -= 1;
        }
        out.push_str(MASK);
        out.extend(chars.get(content_end..end).unwrap_or_default());
        at = end;
    }
    out.extend(chars.get(at..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> String {
        mask_secrets(text).expect("valid YAML")
    }

    /// Masks `text`, checks that none of `secrets` is left, and returns the result.
    fn hides(text: &str, secrets: &[&str]) -> String {
        let m = masked(text);
        for s in secrets {
            assert!(!m.contains(s), "`{s}` left in:\n{m}");
        }
        assert!(m.contains(MASK), "{m}");
        m
    }

    #[test]
    fn block_mapping() {
        let m = hides(
            "providers:\n  a:\n    type: ngrok\n    api_key: hunter2\n  b:\n    type: okta-asa\n    key_id: kid\n    key_secret: s3cr3t # inline\n",
            &["hunter2", "s3cr3t"],
        );
        assert!(m.contains("    api_key: ***\n"), "{m}");
        assert!(m.contains("    key_secret: *** # inline\n"), "{m}");
        assert!(m.contains("key_id: kid"), "{m}");
    }

    #[test]
    fn flow_mapping() {
        let m = hides(
            "providers:\n  a: {type: ngrok, api_key: hunter2, base_url: \"http://127.0.0.1:1\"}\n",
            &["hunter2"],
        );
        assert_eq!(
            m,
            "providers:\n  a: {type: ngrok, api_key: ***, base_url: \"http://127.0.0.1:1\"}\n"
        );
    }

    #[test]
    fn quoted_keys_and_values() {
        let m = hides(
            "providers:\n  a:\n    \"api_key\": 'hunter2'\n    'key_secret': \"s3\\u0063ret\"\n    \"api\\x5fkey\": escaped-key\n",
            &["hunter2", "s3\\u0063ret", "escaped-key"],
        );
        assert!(m.contains("\"api_key\": ***\n"), "{m}");
    }

    #[test]
    fn folded_and_literal_block_scalars() {
        let m = hides(
            "providers:\n  a:\n    api_key: >-\n      hunter2\n      more\n\n    type: ngrok\n  b:\n    key_secret: |\n      s3cr3t\n    type: okta-asa\n",
            &["hunter2", "more", "s3cr3t"],
        );
        assert!(m.contains("    type: ngrok\n"), "{m}");
        assert!(m.contains("    type: okta-asa\n"), "{m}");
        assert_eq!(m.lines().count(), "x\n".repeat(10).lines().count(), "{m}");
    }

    #[test]
    fn multi_line_plain_and_quoted_scalars() {
        hides(
            "a:\n  api_key: hunter2\n    continued\n  key_secret: \"first\n    second\"\n  type: ngrok\n",
            &["hunter2", "continued", "first", "second"],
        );
    }

    #[test]
    fn alias_to_an_anchored_secret_masks_the_anchor() {
        let m = hides(
            "notes: &k hunter2\nproviders:\n  a: {type: ngrok, api_key: *k}\n  b:\n    api_key: &shared s3cr3t\n  c:\n    api_key: *shared\n",
            &["hunter2", "s3cr3t"],
        );
        assert!(m.contains("notes: &k ***"), "{m}");
        assert!(m.contains("api_key: *k}"), "{m}");
    }

    #[test]
    fn merge_keys_and_anchored_mappings() {
        hides(
            "base: &base\n  type: ngrok\n  api_key: hunter2\nproviders:\n  a:\n    <<: *base\n",
            &["hunter2"],
        );
    }

    #[test]
    fn references_file_paths_and_other_fields_are_kept() {
        let text = "providers:\n  a:\n    type: ngrok\n    api_key: ${NGROK_API_KEY}\n  b:\n    type: okta-asa\n    key_secret_file: /run/credentials/keyward.service/asa\nusers:\n  - {provider: a, name: token-bot, keys: {token: {rotate_every: 30d}}}\n";
        assert_eq!(masked(text), text);
    }

    #[test]
    fn a_reference_mixed_with_text_is_masked() {
        hides("a:\n  api_key: pre${X}post\n", &["pre", "post"]);
    }

    #[test]
    fn urls_with_a_password_are_masked_anywhere() {
        let m = hides(
            "providers:\n  a:\n    base_url: https://bot:hunter2@api.example.com/\n    other: https://api.example.com/x@y\n",
            &["hunter2"],
        );
        assert!(m.contains("other: https://api.example.com/x@y"), "{m}");
        // Only the password: the host, port and database stay readable.
        assert!(
            m.contains("base_url: https://bot:***@api.example.com/"),
            "{m}"
        );
        let m = hides(
            "settings:\n  state_url: \"postgres://kw:pa/ss#w@db1.example:5432/keyward\"\n  block: >-\n    postgres://kw:folded@db\n",
            &["pa/ss", "ss#w", "folded"],
        );
        assert!(
            m.contains("\"postgres://kw:***@db1.example:5432/keyward\""),
            "{m}"
        );
    }

    #[test]
    fn a_diff_shows_a_changed_host_of_a_url_with_a_password() {
        let old = "settings:\n  state_url: postgres://kw:s3cret@db1.example/keyward\n";
        let new = "settings:\n  state_url: postgres://kw:s3cret@db2.example/keyward\n";
        let d = crate::daemon::watch::config_diff(old, new);
        assert!(!d.contains("s3cret"), "{d}");
        assert!(
            d.contains("-  state_url: postgres://kw:***@db1.example/keyward"),
            "{d}"
        );
        assert!(
            d.contains("+  state_url: postgres://kw:***@db2.example/keyward"),
            "{d}"
        );
    }

    #[test]
    fn lists_under_a_secret_field_and_sequences_of_providers() {
        hides(
            "- api_key: [hunter2, 's3cr3t']\n- {password: p4ss}\n",
            &["hunter2", "s3cr3t", "p4ss"],
        );
    }

    #[test]
    fn multibyte_text_before_a_secret() {
        let m = hides(
            "sinks:\n  lökal: {type: file, päth: ü}\nproviders:\n  ä: {api_key: hunter2}\n",
            &["hunter2"],
        );
        assert!(m.contains("ä: {api_key: ***}"), "{m}");
    }

    #[test]
    fn invalid_yaml_shows_nothing() {
        assert_eq!(mask_secrets("providers: {a: {api_key: hunter2\n"), None);
        assert_eq!(mask_secrets("a: *undefined\n"), None);
        assert_eq!(mask_secrets("a: b\n c: d: e\n  api_key: x\n"), None);
    }

    #[test]
    fn secret_field_names() {
        for n in [
            "api_key",
            "key_secret",
            "API-KEY",
            "client_secret",
            "password",
            "token",
        ] {
            assert!(is_secret_field(n), "{n}");
        }
        for n in [
            "api_key_file",
            "key_secret_file",
            "key_id",
            "type",
            "name",
            "team",
        ] {
            assert!(!is_secret_field(n), "{n}");
        }
    }
}
