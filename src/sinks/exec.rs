//! The exec sink: runs a program with placeholders filled in its argv, writes the JSON sink
//! document to its stdin, and counts exit status 0 within the timeout as delivered. Its
//! stdout/stderr are kept for the error message, with the secret masked should the program
//! echo it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use jiff::SignedDuration;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SinkDocument;

/// At most this much of the program's output is quoted in an error.
const OUTPUT_LIMIT: usize = 2000;

pub async fn deliver(
    command: &[String],
    timeout: SignedDuration,
    doc: &SinkDocument,
) -> anyhow::Result<()> {
    let argv: Vec<String> = command
        .iter()
        .map(|a| doc.fill(a))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let (program, args) = argv
        .split_first()
        .context("exec sink has an empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("exec sink: starting {program}"))?;
    let input = doc.to_json();
    let mut stdin = child.stdin.take().context("exec sink: no stdin")?;
    let mut stdout = child.stdout.take().context("exec sink: no stdout")?;
    let mut stderr = child.stderr.take().context("exec sink: no stderr")?;
    let limit = Duration::from_millis(timeout.as_millis().max(0) as u64);
    let run = async {
        // A program that exits without reading stdin is not an error in itself: its exit
        // status decides.
        let _ = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (_, _, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        (status, out, err)
    };
    let (status, out, err) = match tokio::time::timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "exec sink {program}: did not finish within {}",
            crate::duration::format(timeout)
        ),
    };
    let status = status.with_context(|| format!("exec sink {program}: waiting for it"))?;
    if status.success() {
        return Ok(());
    }
    let mask = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes).replace(doc.secret.expose_secret(), "[REDACTED]");
        let text = text.trim();
        if text.len() > OUTPUT_LIMIT {
            let cut = (0..=OUTPUT_LIMIT)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            format!("{}…", &text[..cut])
        } else {
            text.to_string()
        }
    };
    let mut message = format!("exec sink {program}: {status}");
    let (o, e) = (mask(&out), mask(&err));
    if !e.is_empty() {
        message.push_str(&format!("; stderr: {e}"));
    }
    if !o.is_empty() {
        message.push_str(&format!("; stdout: {o}"));
    }
    anyhow::bail!(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sink".into(),
            "{user}".into(),
        ]
    }

    #[tokio::test]
    async fn exit_zero_is_delivered_and_gets_stdin_and_placeholders() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("got");
        let script = format!(
            "cat > {} && echo \"$1\" >> {}",
            out.display(),
            out.display()
        );
        deliver(
            &sh(&script),
            SignedDuration::from_secs(10),
            &crate::sinks::tests::doc(),
        )
        .await
        .unwrap();
        let got = std::fs::read_to_string(out).unwrap();
        assert!(got.contains("\"secret\": \"s3cr3t-value\""));
        assert!(got.trim_end().ends_with("ci-deployer"));
    }

    #[tokio::test]
    async fn failure_reports_output_without_secret() {
        let err = deliver(
            &sh("cat; echo boom >&2; exit 3"),
            SignedDuration::from_secs(10),
            &crate::sinks::tests::doc(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[tokio::test]
    async fn timeout_is_an_error() {
        let err = deliver(
            &sh("sleep 5"),
            SignedDuration::from_millis(200),
            &crate::sinks::tests::doc(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not finish"), "{err}");
    }
}
