//! The GitHub Actions renderer: each shard's log in a collapsible group
//! (failed shards marked), `::error` annotations within GitHub's per-step
//! limit, a job summary table and step outputs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;

use super::junit::TestReport;
use super::terminal::secs;
use super::Reporter;
use crate::dispatch::{RunEvent, RunSummary, ShardRecord, ShardStatus};
use crate::protocol::ShardId;

/// GitHub shows at most 10 error annotations per step; the rest go to the summary.
pub const MAX_ERROR_ANNOTATIONS: usize = 10;
/// Failed tests listed in the job summary (it holds about 1 MiB).
const MAX_SUMMARY_FAILURES: usize = 200;

/// Where the renderer writes besides the log.
#[derive(Debug, Clone, Default)]
pub struct GithubFiles {
    /// `$GITHUB_STEP_SUMMARY`.
    pub step_summary: Option<PathBuf>,
    /// `$GITHUB_OUTPUT`.
    pub output: Option<PathBuf>,
    /// The merged JUnit report written, for the `report` output.
    pub report: Option<PathBuf>,
}

impl GithubFiles {
    /// The files GitHub Actions names in the environment.
    pub fn from_env() -> Self {
        GithubFiles {
            step_summary: std::env::var_os("GITHUB_STEP_SUMMARY").map(PathBuf::from),
            output: std::env::var_os("GITHUB_OUTPUT").map(PathBuf::from),
            report: None,
        }
    }
}

/// Renders a run for GitHub Actions. Concurrent shards cannot share an open
/// group, so each shard's log is kept in a temporary file and shown as one
/// group when the shard ends, after a one-line progress note when it starts.
pub struct GithubReporter<W: Write> {
    out: W,
    files: GithubFiles,
    logs: HashMap<ShardId, File>,
    annotations: usize,
}

impl<W: Write> GithubReporter<W> {
    /// A renderer writing the log to `out`.
    pub fn new(out: W, files: GithubFiles) -> Self {
        GithubReporter {
            out,
            files,
            logs: HashMap::new(),
            annotations: 0,
        }
    }

    /// Masks secret values in the log from here on (`::add-mask::`), one line at a time.
    pub fn mask(&mut self, secret: &str) -> std::io::Result<()> {
        for line in secret.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(self.out, "::add-mask::{}", escape_data(line))?;
        }
        Ok(())
    }

    fn annotate(&mut self, properties: &[(&str, String)], message: &str) -> std::io::Result<bool> {
        if self.annotations >= MAX_ERROR_ANNOTATIONS {
            return Ok(false);
        }
        self.annotations += 1;
        let props: Vec<String> = properties
            .iter()
            .map(|(k, v)| format!("{k}={}", escape_property(v)))
            .collect();
        writeln!(
            self.out,
            "::error {}::{}",
            props.join(","),
            escape_data(message)
        )?;
        Ok(true)
    }

    fn show_shard(&mut self, record: &ShardRecord) -> std::io::Result<()> {
        let mark = if record.status == ShardStatus::Passed {
            "✅"
        } else {
            "❌"
        };
        writeln!(
            self.out,
            "::group::{mark} shard {} {} in {}",
            record.shard,
            record.status.label(),
            secs(record.duration)
        )?;
        if let Some(mut log) = self.logs.remove(&record.shard) {
            // Nothing the tests print may act as a workflow command.
            let token = uuid::Uuid::new_v4().simple().to_string();
            writeln!(self.out, "::stop-commands::{token}")?;
            log.rewind()?;
            let mut last = [0u8; 1];
            std::io::copy(&mut log, &mut self.out)?;
            if log.stream_position()? > 0 {
                log.seek(std::io::SeekFrom::End(-1))?;
                std::io::Read::read_exact(&mut log, &mut last)?;
                if last[0] != b'\n' {
                    writeln!(self.out)?;
                }
            }
            writeln!(self.out, "::{token}::")?;
        }
        if let ShardStatus::InfraFailed { reason } = &record.status {
            writeln!(self.out, "{reason}")?;
        }
        writeln!(self.out, "::endgroup::")?;
        if record.status != ShardStatus::Passed {
            let message = record.status.describe();
            let title = format!("shard {} {}", record.shard, record.status.label());
            self.annotate(&[("title", title)], &message)?;
        }
        self.out.flush()
    }

    fn write_summary(&self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let Some(path) = &self.files.step_summary else {
            return Ok(());
        };
        let passed = summary.count(|s| *s == ShardStatus::Passed);
        let mut md = format!(
            "### mvm-shard: {passed} of {} shards passed\n\n| Shard | Status | Duration | Tests passed | Tests failed | Environment |\n|---|---|---|---|---|---|\n",
            summary.records.len()
        );
        for r in &summary.records {
            let counts = tests.counts.get(&r.shard);
            let (tp, tf) = counts.map_or(("-".to_string(), "-".to_string()), |c| {
                (c.passed.to_string(), c.failed.to_string())
            });
            let status = match &r.status {
                ShardStatus::Passed => "✅ passed".to_string(),
                ShardStatus::Failed {
                    exit_code: Some(c), ..
                } => format!("❌ failed (exit {c})"),
                ShardStatus::Failed { .. } => "❌ failed".to_string(),
                ShardStatus::TimedOut => "⏱️ timed out".to_string(),
                ShardStatus::InfraFailed { .. } => "⚠️ could not run".to_string(),
            };
            let env = match &r.result {
                Some(res) if res.fresh_environment => "fresh",
                Some(_) => "reused, wiped",
                None => "-",
            };
            md.push_str(&format!(
                "| {} | {status} | {} | {tp} | {tf} | {env} |\n",
                r.shard,
                secs(r.duration)
            ));
        }
        if !tests.failures.is_empty() {
            md.push_str(&format!(
                "\n<details open><summary>Failed tests ({})</summary>\n\n",
                tests.failures.len()
            ));
            for f in tests.failures.iter().take(MAX_SUMMARY_FAILURES) {
                let place = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!(" `{file}:{line}`"),
                    (Some(file), None) => format!(" `{file}`"),
                    _ => String::new(),
                };
                md.push_str(&format!(
                    "- shard {}: `{}`{place}: {}\n",
                    f.shard,
                    f.name.replace('`', "'"),
                    markdown_line(&f.message)
                ));
            }
            if tests.failures.len() > MAX_SUMMARY_FAILURES {
                md.push_str(&format!(
                    "- … and {} more\n",
                    tests.failures.len() - MAX_SUMMARY_FAILURES
                ));
            }
            md.push_str("\n</details>\n");
        }
        append(path, md.as_bytes())
    }

    fn write_outputs(&self, summary: &RunSummary) -> std::io::Result<()> {
        let Some(path) = &self.files.output else {
            return Ok(());
        };
        let result = match summary.exit_code() {
            0 => "passed",
            1 => "failed",
            _ => "infra-failed",
        };
        let mut lines = format!(
            "result={result}\npassed={}\nfailed={}\ntimed-out={}\ninfra-failed={}\n",
            summary.count(|s| *s == ShardStatus::Passed),
            summary.count(|s| matches!(s, ShardStatus::Failed { .. })),
            summary.count(|s| *s == ShardStatus::TimedOut),
            summary.count(|s| matches!(s, ShardStatus::InfraFailed { .. })),
        );
        if let Some(report) = &self.files.report {
            lines.push_str(&format!("report={}\n", report.display()));
        }
        append(path, lines.as_bytes())
    }
}

impl<W: Write + Send> Reporter for GithubReporter<W> {
    fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        match event {
            RunEvent::Started { shard, attempt } => {
                writeln!(self.out, "shard {shard} started (attempt {attempt})")
            }
            RunEvent::Output { shard, data, .. } => {
                let log = match self.logs.get_mut(shard) {
                    Some(log) => log,
                    None => self.logs.entry(*shard).or_insert(tempfile::tempfile()?),
                };
                log.write_all(data)
            }
            RunEvent::Retrying {
                shard,
                next_attempt,
                delay,
                reason,
            } => writeln!(
                self.out,
                "shard {shard} could not start ({}); attempt {next_attempt} in {}",
                escape_data(reason),
                secs(*delay)
            ),
            RunEvent::Finished(record) => self.show_shard(record),
            RunEvent::Secret(value) => self.mask(value),
        }
    }

    fn finish(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let mut unannotated = 0;
        for failure in &tests.failures {
            let mut props = vec![(
                "title",
                format!("{} (shard {})", failure.name, failure.shard),
            )];
            if let Some(file) = &failure.file {
                props.push(("file", file.clone()));
                if let Some(line) = failure.line {
                    props.push(("line", line.to_string()));
                }
            }
            if !self.annotate(&props, &failure.message)? {
                unannotated += 1;
            }
        }
        if unannotated > 0 {
            writeln!(
                self.out,
                "::notice title=More failures::{unannotated} more failed tests than GitHub shows as annotations; all are listed in the job summary"
            )?;
        }
        for (shard, path, error) in &tests.problems {
            writeln!(
                self.out,
                "::warning title=JUnit report lost::shard {shard}: {}: {}",
                escape_property(path),
                escape_data(error)
            )?;
        }
        let passed = summary.count(|s| *s == ShardStatus::Passed);
        writeln!(
            self.out,
            "mvm-shard: {passed} of {} shards passed",
            summary.records.len()
        )?;
        self.write_summary(summary, tests)?;
        self.write_outputs(summary)?;
        self.out.flush()
    }
}

fn append(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(bytes)
}

/// Escapes a workflow command's message.
pub fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a workflow command's property value.
pub fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

fn markdown_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("")
        .replace('|', "\\|")
        .replace('<', "&lt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::junit::TestFailure;
    use std::time::Duration;

    fn record(index: u32, status: ShardStatus) -> ShardRecord {
        ShardRecord {
            shard: ShardId { index, count: 2 },
            status,
            duration: Duration::from_millis(1200),
            attempts: 1,
            result: None,
            files: Vec::new(),
        }
    }

    #[test]
    fn shard_logs_are_grouped_and_cannot_issue_commands() {
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, GithubFiles::default());
        let shard = ShardId { index: 1, count: 2 };
        r.handle(&RunEvent::Output {
            shard,
            stream: crate::protocol::OutputStream::Stdout,
            data: bytes::Bytes::from_static(b"::add-mask::oops\nlast line"),
        })
        .unwrap();
        r.handle(&RunEvent::Finished(record(
            1,
            ShardStatus::Failed {
                exit_code: Some(2),
                signal: None,
            },
        )))
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("::group::❌ shard 1/2 FAILED"));
        assert!(lines[1].starts_with("::stop-commands::"));
        let token = lines[1].trim_start_matches("::stop-commands::");
        assert_eq!(&lines[2..4], &["::add-mask::oops", "last line"]);
        assert_eq!(lines[4], format!("::{token}::"));
        assert_eq!(lines[5], "::endgroup::");
        assert_eq!(
            lines[6],
            "::error title=shard 1/2 FAILED::exited with code 2"
        );
    }

    #[test]
    fn annotations_stay_within_the_limit_and_the_rest_is_counted() {
        let mut out = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let files = GithubFiles {
            step_summary: Some(dir.path().join("summary.md")),
            output: Some(dir.path().join("output")),
            report: Some(dir.path().join("junit.xml")),
        };
        let mut r = GithubReporter::new(&mut out, files.clone());
        let shard = ShardId { index: 2, count: 2 };
        let tests = TestReport {
            failures: (0..15)
                .map(|i| TestFailure {
                    shard,
                    name: format!("t{i}"),
                    file: Some("src/a,b.rs".into()),
                    line: Some(i),
                    message: "100% wrong\nsecond line".into(),
                })
                .collect(),
            ..TestReport::default()
        };
        let summary = RunSummary {
            records: vec![
                record(1, ShardStatus::Passed),
                record(
                    2,
                    ShardStatus::Failed {
                        exit_code: Some(1),
                        signal: None,
                    },
                ),
            ],
        };
        r.finish(&summary, &tests).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("::error ").count(), MAX_ERROR_ANNOTATIONS);
        assert!(text.contains(
            "::error title=t0 (shard 2/2),file=src/a%2Cb.rs,line=0::100%25 wrong%0Asecond line"
        ));
        assert!(text.contains("5 more failed tests"));
        let summary_md = std::fs::read_to_string(files.step_summary.unwrap()).unwrap();
        assert!(summary_md.contains("| 2/2 | ❌ failed (exit 1) |"));
        assert!(summary_md.contains("Failed tests (15)"));
        let outputs = std::fs::read_to_string(files.output.unwrap()).unwrap();
        assert!(outputs.contains("result=failed\npassed=1\nfailed=1\n"));
        assert!(outputs.contains("report="));
    }
}
