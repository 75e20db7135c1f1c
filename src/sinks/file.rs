//! The file sink: writes the sink document (json, env or raw) to a path with placeholders,
//! creating parent directories 0700 and replacing the file atomically and durably with mode 0600.

use std::path::PathBuf;

use anyhow::Context;
use secrecy::ExposeSecret;

use super::SinkDocument;
use crate::config::SinkFormat;
use crate::state::{create_private_dir, write_private_file};

pub async fn deliver(template: &str, format: SinkFormat, doc: &SinkDocument) -> anyhow::Result<()> {
    let path = PathBuf::from(doc.fill(template).map_err(anyhow::Error::msg)?);
    let bytes = match format {
        SinkFormat::Json => doc.to_json().into_bytes(),
        SinkFormat::Env => doc.to_env().into_bytes(),
        SinkFormat::Raw => {
            let mut s = doc.secret.expose_secret().to_string();
            s.push('\n');
            s.into_bytes()
        }
    };
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(parent)?;
        }
        write_private_file(&path, &bytes)
    })
    .await
    .context("file sink task failed")?
    .with_context(|| format!("file sink {shown}"))
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
