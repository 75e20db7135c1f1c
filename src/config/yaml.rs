//! From the file's text to a [`RawConfig`], with structural errors (unknown fields, wrong
//! types, bad YAML) located at a line and column.
//!
//! serde stops at the first error, but `keyward validate` should report every problem it can.
//! So when the whole document does not deserialize, the text is outlined with the YAML event
//! parser and each piece — every top-level section, every entry of `providers` and `sinks`,
//! every element of `users` — is deserialized again on its own, from a copy of the text in
//! which everything else is blanked out. Blanking (rather than slicing) keeps every line and
//! column where it was, so the pieces' errors are exactly located too, and the pieces that do
//! parse are assembled into a partial config that the semantic checks still run on.

use std::collections::BTreeSet;

use serde_saphyr::granit_parser::{Event, Parser, StructureStyle};
use serde_saphyr::{Error as YamlError, MessageFormatter, UserMessageFormatter};

use super::raw::{Pos, RawConfig};

/// A structural problem: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub pos: Pos,
    pub message: String,
}

/// What the semantic checks must know about pieces that failed to parse, so that they do not
/// report follow-on errors (a user's provider is not "undefined" when its entry merely has a
/// typo).
#[derive(Debug, Default)]
pub struct Broken {
    /// The whole `providers` section failed: skip every provider-name check.
    pub all_providers: bool,
    pub providers: BTreeSet<String>,
    pub all_sinks: bool,
    pub sinks: BTreeSet<String>,
    /// `defaults` failed: a slot without a sink may have been meant to inherit one.
    pub defaults: bool,
    /// Some part failed: the config is incomplete, so checks that need the whole picture
    /// (duplicates across users) still run, but nothing is resolved.
    pub any: bool,
}

pub struct Parsed {
    pub raw: RawConfig,
    pub broken: Broken,
}

/// Parses `text`. Returns the (possibly partial) raw config when the YAML itself could be read,
/// and every structural problem found.
pub fn parse(text: &str) -> (Option<Parsed>, Vec<Problem>) {
    match deserialize(text) {
        Ok(raw) => (
            Some(Parsed {
                raw,
                broken: Broken::default(),
            }),
            Vec::new(),
        ),
        Err(e) => {
            let first = problem_of(&e);
            match recover(text) {
                Some((mut parsed, pieces)) => {
                    parsed.broken.any = true;
                    let mut problems = vec![first.clone()];
                    // The piece that failed the whole document fails again on its own, at the
                    // same place: report it once.
                    problems.extend(pieces.into_iter().filter(|p| p.pos != first.pos));
                    (Some(parsed), problems)
                }
                None => (None, vec![first]),
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Characters handed to the YAML parser on this thread (tests check the total stays linear).
    static PARSED_CHARS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The most aliases (`*name`) a config may hold: two per user of a 100,000-user fleet that
/// shares its key layouts through anchors.
const MAX_ALIASES: usize = 200_000;

/// The parser's budget: room for a fleet's config (100,000 users take about 1.2 million
/// nodes, and as many aliases as [`MAX_ALIASES`]) while what only an attack needs stays
/// refused: nesting deeper than any config needs (32 levels), and an alias bomb, which
/// expands into millions of events from a few lines (the event and replayed-event limits).
fn budget() -> serde_saphyr::Budget {
    let mut b = serde_saphyr::Budget::default();
    b.max_nodes = 4_000_000;
    b.max_events = 10_000_000;
    b.max_depth = 32;
    b.max_aliases = MAX_ALIASES;
    b.max_recorded_anchor_events = 4_000_000;
    // One anchor used by every user of a fleet is the point of anchors, not an attack: what an
    // alias bomb needs (millions of events, replayed) stays refused by the limits above.
    b.enforce_alias_anchor_ratio = false;
    b
}

/// Deserializes a whole text (the document, or one piece of it).
fn deserialize(text: &str) -> Result<RawConfig, YamlError> {
    #[cfg(test)]
    PARSED_CHARS.with(|n| n.set(n.get() + text.len()));
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget());
    serde_saphyr::from_str_with_options::<RawConfig>(text, options)
}

/// The location and user-facing text of a serde-saphyr error, without its source snippet
/// (the diagnostic format is one line).
fn problem_of(e: &YamlError) -> Problem {
    let pos = e.location().map(|l| Pos::of(&l)).unwrap_or(Pos::new(1, 1));
    let mut inner = e;
    while let YamlError::AliasError { error, .. } | YamlError::WithSnippet { error, .. } = inner {
        inner = error;
    }
    if let YamlError::Budget { breach, .. } = inner {
        return Problem {
            pos,
            message: budget_message(breach),
        };
    }
    let raw = UserMessageFormatter.format_message(inner);
    Problem {
        pos,
        message: humanize(&raw),
    }
}

/// serde-saphyr's terse messages for scalar type errors, in words a config author knows.
fn humanize(msg: &str) -> String {
    let clean: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let m = clean.trim();
    match m {
        "invalid u8" | "invalid u16" | "invalid u32" | "invalid u64" | "invalid usize" => {
            "expected a whole number (0 or more)".to_string()
        }
        "invalid i8" | "invalid i16" | "invalid i32" | "invalid i64" | "invalid isize" => {
            "expected a whole number".to_string()
        }
        "invalid bool" | "invalid boolean" => "expected true or false".to_string(),
        "expected string scalar" => "expected a string".to_string(),
        "expected mapping start" => "expected a mapping (`key: value` lines)".to_string(),
        "expected sequence start" => "expected a list".to_string(),
        _ => m.to_string(),
    }
}

/// A breach of the parser's budget, in words: which limit, and where the count stood.
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    let (what, count) = match breach {
        B::Aliases { aliases } => (
            format!(
                "more than {MAX_ALIASES} aliases (`*name`); declare many users with one layout with `names:`"
            ),
            *aliases,
        ),
        B::Anchors { anchors } => ("too many anchors (`&name`)".to_string(), *anchors),
        B::Depth { depth } => ("nested deeper than 32 levels".to_string(), *depth),
        B::Nodes { nodes } => ("more than 4,000,000 nodes".to_string(), *nodes),
        B::Events { events: n }
        | B::RecordedAnchorEvents {
            recorded_anchor_events: n,
        }
        | B::RecordedAnchorBytes {
            recorded_anchor_bytes: n,
        } => (
            "aliases that expand into too much (an alias bomb?)".to_string(),
            *n,
        ),
        other => (format!("limits breached: {other:?}"), 0),
    };
    let head = "YAML document too large or too complex";
    if count == 0 {
        format!("{head}: {what}")
    } else {
        format!("{head}: {what} (at {count})")
    }
}

/// A node of the outline: its extent in characters, and its children.
#[derive(Debug)]
struct Node {
    start: usize,
    end: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Scalar,
    Seq {
        flow: bool,
        items: Vec<Node>,
    },
    Map {
        flow: bool,
        entries: Vec<(Node, Node)>,
    },
}

type Ev<'a> = (Event<'a>, serde_saphyr::granit_parser::Span);

/// The next event that matters for the outline (comments and anchor metadata are skipped).
fn next_event<'a>(
    it: &mut Parser<'a, serde_saphyr::granit_parser::StrInput<'a>>,
) -> Option<Ev<'a>> {
    loop {
        let (ev, span) = it.next()?.ok()?;
        match ev {
            Event::Scalar(..)
            | Event::SequenceStart(..)
            | Event::SequenceEnd
            | Event::MappingStart(..)
            | Event::MappingEnd
            | Event::Alias(..)
            | Event::UnresolvedAlias(..)
            | Event::DocumentEnd
            | Event::StreamEnd => return Some((ev, span)),
            _ => continue,
        }
    }
}

/// Builds the node that starts with `first`. `None` for aliases (a piece holding one cannot be
/// parsed apart from its anchor) and anything unexpected: recovery is then skipped.
fn node<'a>(
    first: Ev<'a>,
    it: &mut Parser<'a, serde_saphyr::granit_parser::StrInput<'a>>,
) -> Option<Node> {
    let (ev, span) = first;
    let start = span.start.index();
    match ev {
        Event::Scalar(..) => Some(Node {
            start,
            end: span.end.index(),
            kind: Kind::Scalar,
        }),
        Event::SequenceStart(style, ..) => {
            let mut items = Vec::new();
            loop {
                let ev = next_event(it)?;
                if matches!(ev.0, Event::SequenceEnd) {
                    return Some(Node {
                        start,
                        end: ev.1.end.index(),
                        kind: Kind::Seq {
                            flow: style == StructureStyle::Flow,
                            items,
                        },
                    });
                }
                items.push(node(ev, it)?);
            }
        }
        Event::MappingStart(style, ..) => {
            let mut entries = Vec::new();
            loop {
                let ev = next_event(it)?;
                if matches!(ev.0, Event::MappingEnd) {
                    return Some(Node {
                        start,
                        end: ev.1.end.index(),
                        kind: Kind::Map {
                            flow: style == StructureStyle::Flow,
                            entries,
                        },
                    });
                }
                let key = node(ev, it)?;
                let value = node(next_event(it)?, it)?;
                entries.push((key, value));
            }
        }
        _ => None,
    }
}

/// Where each line starts (character indices), for turning positions into lines and columns.
struct Lines(Vec<usize>);

impl Lines {
    fn of(chars: &[char]) -> Lines {
        let mut starts = vec![0];
        starts.extend(
            chars
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == '\n')
                .map(|(i, _)| i + 1),
        );
        Lines(starts)
    }

    /// The 1-based line and column of character index `i`.
    fn pos(&self, i: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&s| s <= i).max(1);
        (line, i - self.0[line - 1] + 1)
    }
}

/// A piece of the document on its own: the kept ranges, each starting at its own column, with
/// the lines between ranges dropped (so building and parsing a piece costs its own size, not
/// the document's), and how its lines map back to the document's.
struct PieceText {
    text: String,
    /// (first line in `text`, the document's line for it), ascending; 1-based.
    segments: Vec<(usize, usize)>,
}

impl PieceText {
    fn new(chars: &[char], lines: &Lines, keep: &[(usize, usize)]) -> PieceText {
        let mut ranges = keep.to_vec();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut text = String::new();
        let mut segments = Vec::new();
        let (mut line, mut col) = (1usize, 1usize);
        let mut prev_end_line = None;
        for (s, e) in merged {
            let (orig_line, orig_col) = lines.pos(s);
            match prev_end_line {
                Some(l) if l == orig_line => {}
                Some(_) => {
                    text.push('\n');
                    line += 1;
                    col = 1;
                    segments.push((line, orig_line));
                }
                None => segments.push((line, orig_line)),
            }
            while col < orig_col {
                text.push(' ');
                col += 1;
            }
            for &c in chars.get(s..e).unwrap_or(&[]) {
                text.push(c);
                if c == '\n' {
                    line += 1;
                    col = 1;
                } else {
                    col += 1;
                }
            }
            prev_end_line = Some(lines.pos(e).0);
        }
        PieceText { text, segments }
    }

    /// The document's position for a position in this piece.
    fn locate(&self, pos: Pos) -> Pos {
        let seg = self
            .segments
            .iter()
            .rev()
            .find(|(first, _)| *first <= pos.line)
            .or(self.segments.first());
        match seg {
            Some((first, orig)) => Pos::new(orig + pos.line.saturating_sub(*first), pos.column),
            None => pos,
        }
    }
}

/// The text with the `blank` ranges (character indices) replaced by spaces, line breaks kept:
/// lines and columns stay where they were.
fn blanked(chars: &[char], blank: &[(usize, usize)]) -> String {
    let mut out: Vec<char> = chars.to_vec();
    for &(s, e) in blank {
        for c in out.get_mut(s..e).unwrap_or(&mut []) {
            if *c != '\n' && *c != '\r' {
                *c = ' ';
            }
        }
    }
    out.into_iter().collect()
}

/// The position of the `-` that introduces a block sequence item starting at `start`.
fn dash_before(chars: &[char], start: usize) -> Option<usize> {
    let mut i = start;
    while i > 0 {
        i -= 1;
        match *chars.get(i)? {
            ' ' | '\t' | '\n' | '\r' => continue,
            '-' => return Some(i),
            _ => return None,
        }
    }
    None
}

/// A piece to parse on its own, and what its failure means.
enum Piece {
    Section(String),
    Provider(String),
    Sink(String),
    User,
}

fn recover(text: &str) -> Option<(Parsed, Vec<Problem>)> {
    let mut it = Parser::new_from_str(text);
    let root = node(next_event(&mut it)?, &mut it)?;
    let Kind::Map {
        flow: false,
        entries,
    } = &root.kind
    else {
        return None;
    };
    let chars: Vec<char> = text.chars().collect();
    let scalar_text = |n: &Node| -> String {
        chars
            .get(n.start..n.end)
            .map(|c| c.iter().collect())
            .unwrap_or_default()
    };

    // Each piece: the character ranges to keep (its own last), and its meaning.
    let mut pieces: Vec<(Vec<(usize, usize)>, Piece)> = Vec::new();
    for (key, value) in entries {
        let name = scalar_text(key);
        let head = (key.start, value.start.max(key.end));
        match (name.as_str(), &value.kind) {
            (
                "providers" | "sinks",
                Kind::Map {
                    flow: false,
                    entries: inner,
                },
            ) if !inner.is_empty() => {
                for (k, v) in inner {
                    let entry = scalar_text(k);
                    let piece = if name == "providers" {
                        Piece::Provider(entry)
                    } else {
                        Piece::Sink(entry)
                    };
                    pieces.push((vec![head, (k.start, v.end)], piece));
                }
            }
            ("users", Kind::Seq { flow: false, items }) if !items.is_empty() => {
                let mut dashes = Vec::new();
                for item in items {
                    dashes.push((dash_before(&chars, item.start)?, item.end));
                }
                let head = (key.start, dashes[0].0);
                for d in dashes {
                    pieces.push((vec![head, d], Piece::User));
                }
            }
            _ => pieces.push((vec![(key.start, value.end)], Piece::Section(name))),
        }
    }

    // Each piece parsed on its own finds its errors; then the document with the failed pieces
    // blanked out is parsed once, so that the good pieces keep their exact positions.
    let lines = Lines::of(&chars);
    let mut broken = Broken::default();
    let mut problems = Vec::new();
    let mut blank = Vec::new();
    for (keep, piece) in pieces {
        let part = PieceText::new(&chars, &lines, &keep);
        let Err(e) = deserialize(&part.text) else {
            continue;
        };
        let mut problem = problem_of(&e);
        problem.pos = part.locate(problem.pos);
        problems.push(problem);
        blank.extend(keep.last().copied());
        match piece {
            Piece::Provider(name) => {
                broken.providers.insert(name);
            }
            Piece::Sink(name) => {
                broken.sinks.insert(name);
            }
            Piece::User => {}
            Piece::Section(name) => match name.as_str() {
                "providers" => broken.all_providers = true,
                "sinks" => broken.all_sinks = true,
                "defaults" => broken.defaults = true,
                _ => {}
            },
        }
    }
    let raw = deserialize(&blanked(&chars, &blank)).ok()?;
    Some((Parsed { raw, broken }, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_sharing_its_key_layout_through_an_anchor_fits_the_budget() {
        let mut text = String::from(
            "version: 1\nusers:\n  - {provider: p, name: d, keys: &k {agent: {kind: credential}}}\n",
        );
        for i in 0..100_000 {
            text.push_str(&format!("  - {{provider: p, name: d{i}, keys: *k}}\n"));
        }
        assert_eq!(problems(&text), vec![]);
    }

    #[test]
    fn budget_breaches_are_told_in_words() {
        use serde_saphyr::budget::BudgetBreach;
        let m = budget_message(&BudgetBreach::Aliases { aliases: 200_001 });
        assert_eq!(
            m,
            "YAML document too large or too complex: more than 200000 aliases (`*name`); declare many users with one layout with `names:` (at 200001)"
        );
        let m = budget_message(&BudgetBreach::Depth { depth: 33 });
        assert!(m.ends_with("nested deeper than 32 levels (at 33)"), "{m}");
    }

    fn problems(text: &str) -> Vec<(usize, usize, String)> {
        parse(text)
            .1
            .into_iter()
            .map(|p| (p.pos.line, p.pos.column, p.message))
            .collect()
    }

    #[test]
    fn valid_document_has_no_problems() {
        let (parsed, problems) = parse("version: 1\nusers: []\n");
        assert!(problems.is_empty());
        assert!(parsed.is_some());
    }

    #[test]
    fn reports_errors_from_several_entries() {
        let text = "version: 1\nproviders:\n  a:\n    type: ngrok\n    bogus: 1\n  b:\n    type: ngrok\n    also: 2\nusers:\n  - provider: a\n    name: x\n    extra: 1\n  - provider: a\n    name: y\n    active: maybe\n";
        let got = problems(text);
        let at: Vec<(usize, usize)> = got.iter().map(|p| (p.0, p.1)).collect();
        assert!(at.contains(&(5, 5)), "{got:?}");
        assert!(at.contains(&(8, 5)), "{got:?}");
        assert!(at.contains(&(12, 5)), "{got:?}");
        assert!(at.contains(&(15, 13)), "{got:?}");
        assert_eq!(got.len(), 4, "{got:?}");
    }

    #[test]
    fn partial_config_keeps_the_good_pieces() {
        let text = "version: 1\nproviders:\n  a:\n    type: ngrok\n  b:\n    type: nope\nusers:\n  - provider: a\n    name: x\n";
        let (parsed, problems) = parse(text);
        assert_eq!(problems.len(), 1);
        let parsed = parsed.expect("partial");
        assert_eq!(parsed.raw.providers.as_ref().map(|p| p.0.len()), Some(1));
        assert!(parsed.broken.providers.contains("b"));
        assert_eq!(parsed.raw.users.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn syntax_errors_are_reported_once() {
        let got = problems("version: 1\nusers: [\n");
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn reporting_errors_reads_the_text_a_bounded_number_of_times() {
        // 2,000 users, every tenth with a typo: the pieces cost their own size, not the
        // document's (formerly each of the 2,001 pieces re-read the whole text).
        let mut text = String::from("version: 1\nusers:\n");
        for i in 0..2000 {
            let field = if i % 10 == 0 { "activ" } else { "active" };
            text.push_str(&format!(
                "  - provider: p\n    name: u{i}\n    {field}: true\n"
            ));
        }
        PARSED_CHARS.with(|n| n.set(0));
        let (parsed, problems) = parse(&text);
        let read = PARSED_CHARS.with(|n| n.get());
        assert_eq!(problems.len(), 200, "{:?}", &problems[..3]);
        assert!(
            read <= 4 * text.len(),
            "parsed {read} characters for a text of {}",
            text.len()
        );
        // Each error is where the typo is, and the good users keep their exact positions.
        assert_eq!((problems[0].pos.line, problems[0].pos.column), (5, 5));
        assert_eq!(
            (problems[199].pos.line, problems[199].pos.column),
            (5 + 3 * 1990, 5)
        );
        let raw = parsed.expect("the good users parse").raw;
        let users = raw.users.expect("users");
        assert_eq!(users.len(), 1800);
        assert_eq!(users[0].v().name.as_ref().unwrap().pos().line, 7);
    }

    #[test]
    fn errors_in_later_providers_are_located_exactly() {
        let text = "version: 1\nproviders:\n  a:\n    type: ngrok\n\n\n  b:\n    type: ngrok\n    nope: 1\n";
        let got = problems(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1), (9, 5), "{got:?}");
    }

    #[test]
    fn multibyte_text_keeps_columns() {
        let text = "version: 1\nsinks:\n  lökal:\n    type: file\n    päth: x\n";
        let got = problems(text);
        assert_eq!((got[0].0, got[0].1), (5, 5), "{got:?}");
    }
}
