//! The journal: a write-ahead log in the state directory of every remote write keyward is about
//! to make and how far it got — intent (durable before the write), key created, secret delivered
//! (durable), done. It records, compacts and reads back; what to make of what a crash left
//! unfinished is [`crate::recovery`]'s to decide. Lines hold ids and names only, never a secret.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use jiff::Timestamp;

pub use crate::oplog::{Entry, Event, Unfinished, unfinished};

/// The open journal of a state directory.
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    seq: AtomicU64,
}

impl Journal {
    /// The journal file in a state directory: `journal.jsonl`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("journal.jsonl")
    }

    /// Opens (creating, mode 0600) the journal for appending; sequence numbers continue after
    /// the highest one already in it.
    pub fn open(state_dir: &Path) -> anyhow::Result<Journal> {
        crate::files::create_private_dir(state_dir, "state directory")?;
        let path = Self::path_in(state_dir);
        let parsed = parse(state_dir)?;
        let last = parsed.entries.iter().map(|e| e.seq).max().unwrap_or(0);
        let mut file = crate::files::open_private(&path, true)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        if parsed.unterminated {
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .with_context(|| format!("writing the journal {}", path.display()))?;
        }
        if let Some(good) = parsed.torn_at {
            // Cut the torn tail off, so the next line starts on a line of its own.
            file.set_len(good)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("trimming the torn last line of {}", path.display()))?;
        }
        Ok(Journal {
            path,
            file: Mutex::new(file),
            seq: AtomicU64::new(last),
        })
    }

    /// A new operation number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Appends a line; with `durable`, returns only once it is on disk.
    pub fn append(&self, seq: u64, event: Event, durable: bool) -> anyhow::Result<()> {
        let entry = Entry {
            seq,
            at: Timestamp::now(),
            event,
        };
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        file.write_all(&line)
            .with_context(|| format!("writing the journal {}", self.path.display()))?;
        if durable {
            file.sync_data()
                .with_context(|| format!("syncing the journal {}", self.path.display()))?;
        }
        Ok(())
    }

    /// Empties the journal once everything in it is finished and recorded in the state.
    pub fn clear(&self) -> anyhow::Result<()> {
        self.compact(&|_| false)
    }

    /// Rewrites the journal (atomically, durably) keeping only the unfinished operations for
    /// which `keep` is true — those of accounts this run could not reach, say.
    pub fn compact(&self, keep: &dyn Fn(&Unfinished) -> bool) -> anyhow::Result<()> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let entries = read(&dir)?;
        let kept: std::collections::HashSet<u64> = unfinished(&entries)
            .into_iter()
            .filter(|op| keep(op))
            .map(|op| op.seq)
            .collect();
        if kept.is_empty() {
            file.set_len(0)?;
            file.sync_all()?;
            return Ok(());
        }
        let mut bytes = Vec::new();
        for e in entries.iter().filter(|e| kept.contains(&e.seq)) {
            bytes.extend(serde_json::to_vec(e)?);
            bytes.push(b'\n');
        }
        crate::files::write_private_file(&self.path, &bytes)?;
        // The old handle points at the replaced file: append to the new one.
        *file = crate::files::open_private(&self.path, true)
            .with_context(|| format!("reopening the journal {}", self.path.display()))?;
        Ok(())
    }
}

/// Every entry of the journal in `state_dir` (none if there is no journal). A torn last line
/// (the process died mid-append) is ignored: its write never became durable, so the remote
/// write it announced never started. A line anywhere else that does not parse is corruption:
/// an error naming the file and line, and nothing is applied until an operator deals with it.
pub fn read(state_dir: &Path) -> anyhow::Result<Vec<Entry>> {
    Ok(parse(state_dir)?.entries)
}

/// The journal's entries, and where a torn last line starts (the length to cut it back to).
struct Parsed {
    entries: Vec<Entry>,
    torn_at: Option<u64>,
    /// The last entry is whole but lacks its newline.
    unterminated: bool,
}

fn parse(state_dir: &Path) -> anyhow::Result<Parsed> {
    let path = Journal::path_in(state_dir);
    let bytes = match crate::files::read_bounded(&path, crate::files::MAX_STATE_BYTES, false) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => {
            return Ok(Parsed {
                entries: Vec::new(),
                torn_at: None,
                unterminated: false,
            });
        }
        Err(e) => anyhow::bail!("cannot read the journal {}: {e}", path.display()),
    };
    parse_bytes(&bytes, &path)
}

fn parse_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<Parsed> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    let mut number = 0usize;
    while offset < bytes.len() {
        number += 1;
        let (line, next, terminated) = match bytes[offset..].iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[offset..offset + i], offset + i + 1, true),
            None => (&bytes[offset..], bytes.len(), false),
        };
        let last = next >= bytes.len();
        if line.iter().all(u8::is_ascii_whitespace) && !last {
            anyhow::bail!(
                "the journal {} is corrupt at line {number}: an empty line; keyward will not apply anything until it is repaired (move the file aside after checking the provider by hand)",
                path.display()
            );
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(entry) => entries.push(entry),
            // A crash mid-append leaves a partial last line: unterminated (keyward writes a
            // line and its newline in one write), or zeros the file system padded it with.
            // That one alone may be dropped.
            Err(_) if last && (!terminated || line.iter().all(|&b| b == 0)) => {
                return Ok(Parsed {
                    entries,
                    torn_at: Some(offset as u64),
                    unterminated: false,
                });
            }
            Err(e) => anyhow::bail!(
                "the journal {} is corrupt at line {number}: {e}; keyward will not apply anything until it is repaired (move the file aside after checking the provider by hand)",
                path.display()
            ),
        }
        if !terminated {
            // A whole entry without its newline: keep it; the next append starts a new line.
            return Ok(Parsed {
                entries,
                torn_at: None,
                unterminated: true,
            });
        }
        offset = next;
    }
    Ok(Parsed {
        entries,
        torn_at: None,
        unterminated: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, KeyKind};

    #[test]
    fn entries_round_trip_and_unfinished_tracks_progress() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = j.next_seq();
        let b = j.next_seq();
        let intent = |slot: &str| Event::Intent {
            action: Action::RotateKey,
            provider: "ng".into(),
            user: "u".into(),
            user_id: Some("bot_1".into()),
            slot: Some(slot.into()),
            key_id: Some("ak_old".into()),
            forced: true,
        };
        j.append(a, intent("x"), true).unwrap();
        j.append(b, intent("y"), true).unwrap();
        j.append(
            a,
            Event::Created {
                key_id: "ak_new".into(),
                kind: KeyKind::ApiKey,
                created_at: Timestamp::UNIX_EPOCH,
            },
            false,
        )
        .unwrap();
        j.append(b, Event::Done, false).unwrap();
        // A torn last line is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(Journal::path_in(dir.path()))
            .unwrap()
            .write_all(b"{\"seq\":9,\"at\":")
            .unwrap();
        let entries = read(dir.path()).unwrap();
        assert_eq!(entries.len(), 4);
        let open = unfinished(&entries);
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].slot.as_deref(), Some("x"));
        assert!(open[0].forced);
        assert_eq!(
            open[0].created.as_ref().map(|c| c.0.as_str()),
            Some("ak_new")
        );
        assert!(open[0].delivered.is_none());
        // Sequence numbers continue after a reopen.
        let j2 = Journal::open(dir.path()).unwrap();
        assert_eq!(j2.next_seq(), 3);
        j2.clear().unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
    }

    fn done_line(seq: u64) -> String {
        format!("{{\"seq\":{seq},\"at\":\"2026-01-01T00:00:00Z\",\"event\":\"done\"}}\n")
    }

    #[test]
    fn a_corrupt_line_before_the_last_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_in(dir.path());
        let text = format!("{}not json at all\n{}", done_line(1), done_line(2));
        // A whole garbage last line (newline and all) is no torn append either.
        std::fs::write(&path, format!("{}garbage\n", done_line(1))).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt at line 2"), "{err}");
        std::fs::write(&path, text).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt at line 2"), "{err}");
        assert!(err.contains("journal.jsonl"), "{err}");
        assert!(Journal::open(dir.path()).is_err());
        // A blank line in the middle is corruption too: keyward never writes one.
        std::fs::write(&path, format!("{}\n{}", done_line(1), done_line(2))).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt at line 2"), "{err}");
    }

    #[test]
    fn a_torn_last_line_is_cut_off_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_in(dir.path());
        std::fs::write(&path, format!("{}{{\"seq\":2,\"at", done_line(1))).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 1);
        let j = Journal::open(dir.path()).unwrap();
        let seq = j.next_seq();
        assert_eq!(seq, 2);
        j.append(seq, Event::Done, true).unwrap();
        // Without the cut, the new line would have been glued to the torn one, and the
        // journal would now be corrupt in the middle.
        assert_eq!(read(dir.path()).unwrap().len(), 2);
        // A whole last entry that lacks its newline is kept, and the next starts a new line.
        std::fs::write(&path, done_line(1).trim_end()).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(j.next_seq(), Event::Done, true).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_journal_that_is_a_link_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let state = dir.path().join("state");
        crate::files::create_private_dir(&state, "state directory").unwrap();
        std::os::unix::fs::symlink(&victim, Journal::path_in(&state)).unwrap();
        assert!(Journal::open(&state).is_err());
        assert!(read(&state).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
