//! The file sink: writes the sink document (json, env or raw) to a path with placeholders,
//! creating parent directories 0700 and replacing the file atomically and durably with mode 0600.

use std::path::PathBuf;

use anyhow::Context;

use super::{SinkDocument, SinkError};
use crate::config::SinkFormat;
use crate::files::{check_private_dir, create_private_dir, write_private_file};

/// Writes the document for `doc` to the path `template` names. A path that cannot hold the
/// names, or a directory another user could write in, fails at once (retrying cannot help);
/// an I/O failure may pass and is worth retrying.
pub async fn deliver(
    template: &str,
    format: SinkFormat,
    doc: &SinkDocument,
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
    tokio::task::spawn_blocking(move || -> Result<(), SinkError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if parent.is_dir() {
                check_private_dir(parent, "sink directory").map_err(SinkError::permanent)?;
            } else {
                create_private_dir(parent, "sink directory").map_err(SinkError::transient)?;
            }
        }
        write_private_file(&path, bytes.as_bytes()).map_err(SinkError::transient)
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
            deliver(&t, fmt, &doc).await.unwrap();
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
}
