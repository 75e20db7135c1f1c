//! Text from outside keyward (names in the config, names, ids and error bodies from a provider,
//! a sink program's output) made safe to print: control characters are escaped so that a user
//! named with a newline and terminal escape codes cannot forge lines in a plan, a status table,
//! an error or a log line, nor drive the terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every control character written as an escape (`\n`, `\r`, `\t`, `\u{1b}`, …)
/// and everything else as it is. Borrowed when there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Control characters (C0, DEL, C1) and the Unicode line and paragraph separators and
/// direction overrides, which can make a line read differently from what it holds.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// A URL as it may be shown: a password in its user information (`https://u:PASS@host`) is
/// replaced by `***`, even when the rest does not parse as a URL.
pub fn hide_url_password(text: &str) -> Cow<'_, str> {
    let Some(scheme_end) = text.find("://") else {
        return Cow::Borrowed(text);
    };
    let rest = &text[scheme_end + 3..];
    // The last `@`, not the last before the first `/`, `?` or `#`: a password holding one of
    // those (not percent-encoded, as it should be) is still hidden. A URL with a port and an
    // `@` further on loses a little more than its password; none of a password shows.
    let Some(at) = rest.rfind('@') else {
        return Cow::Borrowed(text);
    };
    let Some(colon) = rest[..at].find(':') else {
        return Cow::Borrowed(text);
    };
    let start = scheme_end + 3 + colon + 1;
    let end = scheme_end + 3 + at;
    Cow::Owned(format!("{}***{}", &text[..start], &text[end..]))
}

/// Whether a name can stand in for a placeholder of a sink's path or command: not empty, not
/// `.` or `..`, no `/` and no control character.
pub fn fits_placeholder(value: &str) -> bool {
    !(value.is_empty()
        || value == "."
        || value == ".."
        || value.contains('/')
        || has_control(value))
}

/// Abbreviates a key id for people: `ak_2abc…ghij`. The tail is kept because ids are
/// time-ordered, so keys minted close together share their first characters.
pub fn short_id(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 14 {
        return id.to_string();
    }
    let head: String = chars[..7].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Whether `text` holds a character [`escape`] would change (config names are checked with it).
pub fn has_control(text: &str) -> bool {
    text.chars().any(needs_escape)
}

/// `head`, then the messages of the errors beneath `e`, each after `: ` (a driver's or
/// transport's error reads as one line with its causes).
pub fn with_sources(mut head: String, e: &dyn std::error::Error) -> String {
    let mut source = e.source();
    while let Some(s) = source {
        head.push_str(": ");
        head.push_str(&s.to_string());
        source = s.source();
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden() {
        assert_eq!(
            hide_url_password("https://u:PASSW0RD@exa mple.com/x"),
            "https://u:***@exa mple.com/x"
        );
        assert_eq!(hide_url_password("https://host/a@b"), "https://host/a@b");
        // A password holding `/`, `?` or `#` (not percent-encoded) is hidden all the same.
        assert_eq!(
            hide_url_password("postgres://kw:pa/s?s#w@db/k"),
            "postgres://kw:***@db/k"
        );
        assert_eq!(hide_url_password("no url"), "no url");
    }

    #[test]
    fn escapes_controls_and_keeps_the_rest() {
        assert!(matches!(escape("ci-deployer ✓"), Cow::Borrowed(_)));
        assert_eq!(
            escape("bot\n  + create key x\u{1b}[31m"),
            "bot\\n  + create key x\\u{1b}[31m"
        );
        assert_eq!(escape("a\rb\tc\u{7f}"), "a\\rb\\tc\\u{7f}");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert!(has_control("a\u{85}"));
        assert!(!has_control("plain/name"));
    }
}
