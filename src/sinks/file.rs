//! The file sink: writes the sink document (json, env or raw) to a path with placeholders,
//! creating parent directories 0700 and replacing the file atomically and durably with mode 0600.

use std::path::PathBuf;

use anyhow::Context;

use super::{SinkDocument, SinkError};
use crate::config::SinkFormat;
use crate::files::{Fence, check_private_dir, create_private_dir, write_private_file_fenced};

/// Writes the document for `doc` to the path `template` names, if `fence` still passes right
/// before the file is replaced (see [`write_private_file_fenced`]). A path that cannot hold
/// the names, or a directory another user could write in, fails at once (retrying cannot
/// help); an I/O failure may pass and is worth retrying.
pub async fn deliver(
    template: &str,
    format: SinkFormat,
    doc: &SinkDocument,
    fence: &Fence,
) -> Result<(), SinkError> {
    let path = PathBuf::from(
        doc.fill(template)
            .map_err(|e| SinkError::permanent(anyhow::Error::msg(e)))?,
    );
    let bytes = match format {
        SinkFormat::Json => doc.to_json().map_err(SinkError::permanent)?,
        SinkFormat::Env => doc.to_env(),
        SinkFormat::Raw => doc.to_raw(),
    };
    let shown = path.display().to_string();
    let fence = std::sync::Arc::clone(fence);
    tokio::task::spawn_blocking(move || -> Result<(), SinkError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if parent.is_dir() {
                check_private_dir(parent, "sink directory").map_err(SinkError::permanent)?;
            } else {
                create_private_dir(parent, "sink directory").map_err(SinkError::transient)?;
            }
        }
        write_private_file_fenced(&path, bytes.as_bytes(), &fence).map_err(SinkError::transient)
    })
    .await
    .context("file sink task failed")
    .map_err(SinkError::transient)?
    .map_err(|e| SinkError {
        error: e.error.context(format!("file sink {shown}")),
        permanent: e.permanent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn writes_each_format_private_and_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = crate::sinks::tests::doc();
        let base = tmp.path().join("s/{provider}/{user}");
        for (fmt, name, expect) in [
            (
                SinkFormat::Json,
                "{slot}.json",
                "\"secret\": \"s3cr3t-value\"",
            ),
            (
                SinkFormat::Env,
                "{slot}.env",
                "KEYWARD_SECRET=s3cr3t-value\n",
            ),
            (SinkFormat::Raw, "{slot}.raw", "s3cr3t-value\n"),
        ] {
            let t = format!("{}/{name}", base.display());
            let open: Fence = std::sync::Arc::new(|| Ok(()));
            deliver(&t, fmt, &doc, &open).await.unwrap();
            let path = doc.fill(&t).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(expect), "{text}");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let parent = tmp.path().join("s/ngrok-prod/ci-deployer");
        let mode = std::fs::metadata(parent).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn a_fence_that_fails_replaces_nothing_and_a_held_lock_is_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = crate::sinks::tests::doc();
        let t = format!("{}/{{slot}}.json", tmp.path().display());
        let path = doc.fill(&t).unwrap();
        std::fs::write(&path, "the newer key").unwrap();
        // The lease is gone by the time the file would be replaced.
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&calls);
        let closing: Fence = std::sync::Arc::new(move || {
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Ok(())
            } else {
                anyhow::bail!("no word from the state database")
            }
        });
        let e = deliver(&t, SinkFormat::Json, &doc, &closing)
            .await
            .expect_err("a fence that fails");
        assert!(
            format!("{:#}", e.error).contains("no word"),
            "{:#}",
            e.error
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "the newer key");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".keyward-lock") && n != "deploy.json")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Another writer holds the file's lock: the write waits for it, then goes on.
        let lock = crate::files::open_private(&tmp.path().join(".deploy.json.keyward-lock"), false)
            .unwrap();
        lock.lock().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(lock);
        });
        let open: Fence = std::sync::Arc::new(|| Ok(()));
        deliver(&t, SinkFormat::Json, &doc, &open).await.unwrap();
        release.join().unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("s3cr3t-value")
        );
    }
}
