//! Page marks: where the pages of each list began in an account's last complete listing, kept
//! in `listing-marks.json` in the state directory. With them the next listing reads a long list
//! in several stretches at once, each from a remembered page on, instead of one page after the
//! other: at fleet size one list is thousands of pages, and its length times the provider's
//! answer time was the listing's wall time. The requests stay the same (one per page); only
//! their order changes. A cache, not state: a mark that no longer fits the account costs a
//! request or a stretch read twice (never an item lost or counted twice), and a missing or
//! unreadable file costs only speed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE_NAME: &str = "listing-marks.json";

/// The most marks kept per list: enough for a stretch per request in flight at any
/// `settings.concurrency` worth using against a 120-requests-a-minute budget.
const MAX_MARKS: usize = 64;

/// The largest file read back (bytes); anything larger is ignored.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Where one page of a list began: its number in the listing (the first page is 0), its URI as
/// the provider gave it (the page before's `next_page_uri`, followed verbatim as ngrok-api.md
/// §0.1 asks), and the id of the last item of the page before: the item where the stretch
/// before this page ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The page's number in the listing it was read in (0-based).
    pub page: u64,
    /// The page's URI.
    pub uri: String,
    /// The id of the item just before the page.
    pub after: String,
}

/// One list's marks from a complete listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMarks {
    /// How many pages the listing read of the list.
    pub pages: u64,
    /// Marks of some of its pages (at most 64, spread evenly), in page order.
    pub marks: Vec<Mark>,
}

impl ListMarks {
    /// Keeps at most [`MAX_MARKS`] of `marks` (in page order), spread evenly over the list.
    pub fn thinned(pages: u64, marks: Vec<Mark>) -> ListMarks {
        if marks.len() <= MAX_MARKS {
            return ListMarks { pages, marks };
        }
        let n = marks.len();
        let keep: Vec<Mark> = marks
            .into_iter()
            .enumerate()
            // The i-th of n is kept when it starts a new one of MAX_MARKS equal shares.
            .filter(|(i, _)| (i * MAX_MARKS) / n != ((i + 1) * MAX_MARKS) / n)
            .map(|(_, m)| m)
            .collect();
        ListMarks { pages, marks: keep }
    }

    /// The marks at which to begin the 2nd to `stretches`-th stretches of the list, as evenly
    /// apart as the kept marks allow (fewer when there are fewer marks).
    pub fn starts(&self, stretches: usize) -> Vec<&Mark> {
        let mut chosen: Vec<&Mark> = Vec::new();
        if stretches < 2 || self.marks.is_empty() {
            return chosen;
        }
        let pages = self.pages.max(1);
        for k in 1..stretches as u64 {
            let target = k * pages / stretches as u64;
            // The first kept mark at or after the target page, past the one chosen before.
            let next = self
                .marks
                .iter()
                .find(|m| m.page >= target && chosen.last().is_none_or(|c| m.page > c.page));
            if let Some(m) = next {
                chosen.push(m);
            }
        }
        chosen
    }
}

/// The marks of one account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AccountMarks {
    /// The API the marks were read from; marks of another are not used.
    base_url: String,
    /// Per list (the provider's collection name).
    lists: BTreeMap<String, ListMarks>,
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct MarksFile {
    version: u32,
    accounts: BTreeMap<String, AccountMarks>,
}

/// The marks of every account, read from the state directory on first use and written back
/// after each complete listing.
#[derive(Debug)]
pub struct PageMarks {
    path: PathBuf,
    file: Mutex<Option<MarksFile>>,
}

impl PageMarks {
    /// The marks kept in `state_dir` (nothing is read until first used).
    pub fn new(state_dir: impl Into<PathBuf>) -> PageMarks {
        PageMarks {
            path: state_dir.into().join(FILE_NAME),
            file: Mutex::new(None),
        }
    }

    fn with_file<R>(&self, f: impl FnOnce(&mut MarksFile) -> R) -> R {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let file = guard.get_or_insert_with(|| {
            crate::files::read_bounded(&self.path, MAX_FILE_BYTES, false)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<MarksFile>(&bytes).ok())
                .filter(|f| f.version == 1)
                .unwrap_or_default()
        });
        f(file)
    }

    /// The marks of `account`'s lists, if the last complete listing of it was of `base_url`.
    pub fn get(&self, account: &str, base_url: &str) -> BTreeMap<String, ListMarks> {
        self.with_file(|f| match f.accounts.get(account) {
            Some(a) if a.base_url == base_url => a.lists.clone(),
            _ => BTreeMap::new(),
        })
    }

    /// Replaces `account`'s marks with those of a listing just completed and writes the file
    /// (atomically, 0600). Best effort: a state directory that does not exist yet is not
    /// created, and a write that fails is logged and forgotten.
    pub fn put(&self, account: &str, base_url: &str, lists: BTreeMap<String, ListMarks>) {
        let bytes = self.with_file(|f| {
            f.version = 1;
            f.accounts.insert(
                account.to_string(),
                AccountMarks {
                    base_url: base_url.to_string(),
                    lists,
                },
            );
            serde_json::to_vec(f)
        });
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_dir()) {
            tracing::debug!(
                "page marks not kept: {} is a directory",
                self.path.display()
            );
            return;
        }
        let written = match (self.path.parent(), bytes) {
            (Some(dir), Ok(bytes)) if dir.is_dir() => {
                crate::files::write_private_file(&self.path, &bytes)
            }
            (_, Ok(_)) => Ok(()),
            (_, Err(e)) => Err(e.into()),
        };
        if let Err(e) = written {
            tracing::debug!("page marks not kept: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(n: u64) -> Vec<Mark> {
        (1..=n)
            .map(|page| Mark {
                page,
                uri: format!("u{page}"),
                after: format!("a{page}"),
            })
            .collect()
    }

    #[test]
    fn thinning_keeps_an_even_spread_in_page_order() {
        let t = ListMarks::thinned(1001, marks(1000));
        assert_eq!(t.marks.len(), MAX_MARKS);
        assert!(t.marks.windows(2).all(|w| w[0].page < w[1].page));
        let gaps: Vec<u64> = t.marks.windows(2).map(|w| w[1].page - w[0].page).collect();
        assert!(gaps.iter().all(|g| (15..=16).contains(g)), "{gaps:?}");
        assert_eq!(ListMarks::thinned(11, marks(10)).marks.len(), 10);
    }

    #[test]
    fn starts_are_spread_and_never_repeat() {
        let l = ListMarks {
            pages: 201,
            marks: marks(200),
        };
        let pages: Vec<u64> = l.starts(4).iter().map(|m| m.page).collect();
        assert_eq!(pages, vec![50, 100, 150]);
        let few = ListMarks {
            pages: 3,
            marks: marks(2),
        };
        let pages: Vec<u64> = few.starts(8).iter().map(|m| m.page).collect();
        assert_eq!(pages, vec![1, 2]);
        assert!(l.starts(1).is_empty());
    }

    #[test]
    fn marks_round_trip_through_the_file_and_another_api_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let lists = BTreeMap::from([("keys".to_string(), ListMarks::thinned(3, marks(2)))]);
        PageMarks::new(dir.path()).put("ng", "http://a", lists.clone());
        let again = PageMarks::new(dir.path());
        assert_eq!(again.get("ng", "http://a"), lists);
        assert!(again.get("ng", "http://b").is_empty());
        assert!(again.get("other", "http://a").is_empty());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(FILE_NAME))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn no_state_directory_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        PageMarks::new(&missing).put("ng", "http://a", BTreeMap::new());
        assert!(!missing.exists());
    }
}
