//! Config-file watching. Editors save by renaming a new file over the old one and Kubernetes
//! swaps a `..data` symlink, so watching the file itself loses track after the first save:
//! keyward watches the file's directory instead and treats any event there as "maybe changed".
//! The daemon then re-reads and hashes the file and acts only when the content changed.

use std::path::Path;

use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::mask::mask_secrets;

/// How long a burst of events (an editor's write, rename and chmod) is left to settle before the
/// file is re-read.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Events from the config directory; keep the watcher alive (dropping it stops watching).
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    pub events: mpsc::UnboundedReceiver<()>,
}

/// Watches the directory holding `config`. Reads are not changes: keyward's own re-reading of
/// the file would otherwise wake it again, forever. No timer runs while nothing happens.
pub fn watch(config: &Path) -> anyhow::Result<Watch> {
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (tx, rx) = mpsc::unbounded_channel();
    // The callback runs on notify's own thread: a non-blocking send, nothing else.
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                if !matches!(event.kind, EventKind::Access(_)) {
                    let _ = tx.send(());
                }
            }
            Err(e) => {
                tracing::warn!("watching the config directory: {e}");
                // Something happened that we could not see: re-read to be safe.
                let _ = tx.send(());
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| {
        anyhow::anyhow!(
            "cannot watch {} for config edits: {e} (inotify limits: fs.inotify.max_user_watches / max_user_instances)",
            dir.display()
        )
    })?;
    Ok(Watch {
        _watcher: watcher,
        events: rx,
    })
}

#[cfg(test)]
impl Watch {
    /// Waits for the next change, then lets the burst settle and swallows the rest of it.
    async fn changed(&mut self) -> Option<()> {
        self.events.recv().await?;
        tokio::time::sleep(SETTLE).await;
        while self.events.try_recv().is_ok() {}
        Some(())
    }
}

/// SHA-256 of the file's bytes (following symlinks), or `None` if it cannot be read now.
pub fn file_hash(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(hex::encode(Sha256::digest(&bytes)))
}

/// A short unified diff of two config texts, with the value of every secret field masked (see
/// [`mask_secrets`]). When either text is not valid YAML nothing of it is shown: the secrets'
/// places cannot be known.
pub fn config_diff(old: &str, new: &str) -> String {
    let (Some(old), Some(new)) = (mask_secrets(old), mask_secrets(new)) else {
        return "config changed (diff not shown: not valid YAML)".to_string();
    };
    if old == new {
        return "only masked (secret) values changed".to_string();
    }
    similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(1)
        .header("previous", "current")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn diff_masks_inline_secrets_but_not_references() {
        let old = "providers:\n  a:\n    api_key: hunter2-very-secret\nusers: []\n";
        let new =
            "providers:\n  a:\n    api_key: ${NGROK_API_KEY}\nusers:\n  - {provider: a, name: x}\n";
        let d = config_diff(old, new);
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("-    api_key: ***"), "{d}");
        assert!(d.contains("+    api_key: ${NGROK_API_KEY}"), "{d}");
        assert!(d.contains("+  - {provider: a, name: x}"), "{d}");
    }

    #[test]
    fn diff_masks_secrets_in_flow_quoted_and_block_forms() {
        let old = "providers:\n  a: {type: ngrok, api_key: flow-secret-1}\n  b:\n    \"api_key\": quoted-secret-1\n  c:\n    key_secret: >-\n      folded-secret-1\n    type: okta-asa\nusers: []\n";
        let new = old.replace("-1", "-2") + "# edited\n";
        let d = config_diff(old, &new);
        for s in ["flow-secret", "quoted-secret", "folded-secret"] {
            assert!(!d.contains(s), "`{s}` shown in the diff:\n{d}");
        }
        assert!(d.contains("+# edited"), "{d}");
    }

    #[test]
    fn diff_of_text_that_is_not_yaml_shows_nothing_of_it() {
        let d = config_diff("a: 1\n", "providers: {a: {api_key: hunter2\n");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("not valid YAML"), "{d}");
    }

    #[tokio::test]
    async fn rename_over_and_in_place_writes_are_both_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyward.yaml");
        std::fs::write(&path, "a\n").unwrap();
        let mut w = watch(&path).unwrap();
        // Reading the file is not a change (keyward's own re-read must not wake it again).
        let _ = std::fs::read(&path).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), w.changed())
                .await
                .is_err(),
            "a read woke the watcher"
        );
        // In place.
        std::fs::write(&path, "b\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap()
            .unwrap();
        // By rename, as editors save; twice, since a file watch would be lost after the first.
        for text in ["c\n", "d\n"] {
            let tmp = dir.path().join(".keyward.yaml.swp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            tokio::time::timeout(Duration::from_secs(5), w.changed())
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(file_hash(&path), Some(hex::encode(Sha256::digest(b"d\n"))));
    }
}
