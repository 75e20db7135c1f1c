//! Config-file watching. Editors save by renaming a new file over the old one and Kubernetes
//! swaps a `..data` symlink, so watching the file itself loses track after the first save:
//! keyward watches the file's directory instead and treats any event there as "maybe changed".
//! When the config path is a symlink, the file really lives (and is edited) elsewhere: every
//! directory along the chain of links is watched, down to the one holding the real file, and
//! the chain is resolved again after each event, so a link that is re-pointed is followed.
//! The daemon then re-reads and hashes the file and acts only when the content changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::mask::mask_secrets;

/// How long a burst of events (an editor's write, rename and chmod) is left to settle before the
/// file is re-read.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Longest chain of symlinks followed (the kernel's own limit is 40).
const MAX_LINKS: usize = 40;

/// Events from the directories that hold the config file (and the links to it); keep the
/// watcher alive (dropping it stops watching).
pub struct Watch {
    watcher: notify::RecommendedWatcher,
    config: PathBuf,
    dirs: BTreeSet<PathBuf>,
    /// The directories of the config's `include:` patterns.
    include_dirs: BTreeSet<PathBuf>,
    /// One `()` per event that may have changed the file.
    pub events: mpsc::UnboundedReceiver<()>,
}

/// Watches the directories holding `config` (see [`dirs_of`]). Reads are not changes: keyward's
/// own re-reading of the file would otherwise wake it again, forever. No timer runs while
/// nothing happens.
pub fn watch(config: &Path) -> anyhow::Result<Watch> {
    let config = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    let (tx, rx) = mpsc::unbounded_channel();
    // The callback runs on notify's own thread: a non-blocking send, nothing else.
    let watcher =
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
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", config.display()))?;
    let mut w = Watch {
        watcher,
        dirs: BTreeSet::new(),
        include_dirs: BTreeSet::new(),
        events: rx,
        config,
    };
    // The directory the daemon was pointed at must be watchable; the others are followed as
    // well as they can be.
    let own = w.config.parent().map(Path::to_path_buf).unwrap_or_default();
    let own = std::fs::canonicalize(&own).unwrap_or(own);
    w.add(&own).map_err(|e| {
        anyhow::anyhow!(
            "cannot watch {} for config edits: {e} (inotify limits: fs.inotify.max_user_watches / max_user_instances)",
            own.display()
        )
    })?;
    w.refresh();
    Ok(w)
}

impl Watch {
    /// Resolves the config path's links again and moves the watches to where they lead now:
    /// call it after events (a link may have been re-pointed) and before re-reading the file.
    pub fn refresh(&mut self) {
        let mut want = dirs_of(&self.config);
        want.extend(self.include_dirs.iter().cloned());
        let stale: Vec<PathBuf> = self.dirs.difference(&want).cloned().collect();
        for dir in stale {
            // A directory that is gone (an old Kubernetes `..2024_…` dir) has lost its watch.
            let _ = self.watcher.unwatch(&dir);
            self.dirs.remove(&dir);
        }
        let new: Vec<PathBuf> = want.difference(&self.dirs).cloned().collect();
        for dir in &new {
            match self.add(dir) {
                Ok(()) => tracing::debug!("watching {} for config edits", dir.display()),
                Err(e) => tracing::warn!(
                    "cannot watch {} for config edits: {e}; edits there need SIGHUP",
                    dir.display()
                ),
            }
        }
    }

    fn add(&mut self, dir: &Path) -> notify::Result<()> {
        self.watcher.watch(dir, RecursiveMode::NonRecursive)?;
        self.dirs.insert(dir.to_path_buf());
        Ok(())
    }

    /// Also watches the directories the config's `include:` patterns (absolute) read from, so
    /// that a new, edited or removed included file is noticed; applied by the next
    /// [`Watch::refresh`], which this calls.
    pub fn include(&mut self, patterns: &[String]) {
        self.include_dirs = patterns.iter().map(|p| include_dir(p)).collect();
        self.refresh();
    }

    /// The directories watched now.
    pub fn dirs(&self) -> &BTreeSet<PathBuf> {
        &self.dirs
    }
}

/// The directory an `include:` pattern reads from: its longest leading part without a glob
/// character (`*`, `?`, `[`), canonical when it exists.
pub fn include_dir(pattern: &str) -> PathBuf {
    let path = Path::new(pattern);
    let mut dir = PathBuf::new();
    for part in path.parent().into_iter().flat_map(|p| p.components()) {
        let text = part.as_os_str().to_string_lossy();
        if text.contains(['*', '?', '[']) {
            break;
        }
        dir.push(part);
    }
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// The directories where an event can change what `config` reads: the one holding the path
/// itself, the one holding each symlink it leads through, and the one holding the real file,
/// each in its canonical form (one watch per directory).
pub fn dirs_of(config: &Path) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut path = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    for _ in 0..MAX_LINKS {
        let Some(dir) = path.parent().map(Path::to_path_buf) else {
            break;
        };
        dirs.insert(canonical(&dir));
        let is_link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        let Some(target) = is_link.then(|| std::fs::read_link(&path).ok()).flatten() else {
            break;
        };
        path = dir.join(target);
    }
    if let Some(dir) = std::fs::canonicalize(config)
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
    {
        dirs.insert(dir);
    }
    dirs
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
    let bytes = crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, true).ok()?;
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

    #[test]
    fn dirs_of_follows_every_link_to_the_real_file() {
        let root = tempfile::tempdir().unwrap();
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        let (a, b, c) = (
            root.path().join("a"),
            root.path().join("b"),
            root.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(c.join("real.yaml"), "x\n").unwrap();
        // a/keyward.yaml -> ../b/hop.yaml (relative) -> c/real.yaml (absolute)
        std::os::unix::fs::symlink("../b/hop.yaml", a.join("keyward.yaml")).unwrap();
        std::os::unix::fs::symlink(c.join("real.yaml"), b.join("hop.yaml")).unwrap();
        let dirs = dirs_of(&a.join("keyward.yaml"));
        assert_eq!(dirs, BTreeSet::from([real(&a), real(&b), real(&c)]));
        // A plain file: its directory only.
        assert_eq!(dirs_of(&c.join("real.yaml")), BTreeSet::from([real(&c)]));
        // A dangling link: the directories it names so far.
        std::fs::remove_file(c.join("real.yaml")).unwrap();
        assert_eq!(
            dirs_of(&a.join("keyward.yaml")),
            BTreeSet::from([real(&a), real(&b), real(&c)])
        );
    }

    #[test]
    fn dirs_of_a_kubernetes_configmap_mount() {
        // keyward.yaml -> ..data/keyward.yaml; ..data -> ..2024_01 (swapped on update)
        let root = tempfile::tempdir().unwrap();
        let mount = root.path();
        let first = mount.join("..2024_01");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("keyward.yaml"), "x\n").unwrap();
        std::os::unix::fs::symlink("..2024_01", mount.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/keyward.yaml", mount.join("keyward.yaml")).unwrap();
        let dirs = dirs_of(&mount.join("keyward.yaml"));
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(dirs, BTreeSet::from([real(mount), real(&first)]));
    }

    #[tokio::test]
    async fn edits_where_a_symlinked_config_lives_are_seen_and_a_repointed_link_is_followed() {
        let (link_dir, first, second) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let link = link_dir.path().join("keyward.yaml");
        std::fs::write(first.path().join("k.yaml"), "a\n").unwrap();
        std::os::unix::fs::symlink(first.path().join("k.yaml"), &link).unwrap();
        let mut w = watch(&link).unwrap();
        std::fs::write(first.path().join("k.yaml"), "b\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("an edit of the link's target is seen")
            .unwrap();
        // Re-point the link by rename, as `ln -sfn` does.
        std::fs::write(second.path().join("k.yaml"), "c\n").unwrap();
        let tmp = link_dir.path().join(".new");
        std::os::unix::fs::symlink(second.path().join("k.yaml"), &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("the re-pointed link is seen")
            .unwrap();
        w.refresh();
        let real_second = std::fs::canonicalize(second.path()).unwrap();
        assert!(w.dirs().contains(&real_second), "{:?}", w.dirs());
        assert!(
            !w.dirs()
                .contains(&std::fs::canonicalize(first.path()).unwrap()),
            "the old target's directory is no longer watched: {:?}",
            w.dirs()
        );
        std::fs::write(second.path().join("k.yaml"), "d\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("an edit of the new target is seen")
            .unwrap();
        assert_eq!(file_hash(&link), Some(hex::encode(Sha256::digest(b"d\n"))));
    }
}
