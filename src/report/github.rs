//! The GitHub Actions renderer: each shard's log in a collapsible group
//! (failed shards marked), `::error` annotations within GitHub's per-step
//! limit, a job summary table and step outputs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;

use super::junit::{TestFailure, TestReport};
use super::terminal::secs;
use super::Reporter;
use crate::dispatch::{RunEvent, RunSummary, ShardRecord, ShardStatus};
use crate::protocol::ShardId;

/// GitHub shows at most 10 error annotations per step; the rest go to the summary.
pub const MAX_ERROR_ANNOTATIONS: usize = 10;
/// Likewise for warnings.
pub const MAX_WARNING_ANNOTATIONS: usize = 10;
/// Failed tests listed in the job summary (it holds about 1 MiB).
const MAX_SUMMARY_FAILURES: usize = 200;

/// Where the renderer writes besides the log.
#[derive(Debug, Clone, Default)]
pub struct GithubFiles {
    /// `$GITHUB_STEP_SUMMARY`.
    pub step_summary: Option<PathBuf>,
    /// `$GITHUB_OUTPUT`.
    pub output: Option<PathBuf>,
    /// Where the merged JUnit report goes, for the `report` output (set only
    /// when a report was written).
    pub report: Option<PathBuf>,
    /// The `--junit` globs, to warn when no shard sent a report back.
    pub junit: Vec<String>,
}

impl GithubFiles {
    /// The files GitHub Actions names in the environment.
    pub fn from_env() -> Self {
        GithubFiles {
            step_summary: std::env::var_os("GITHUB_STEP_SUMMARY").map(PathBuf::from),
            output: std::env::var_os("GITHUB_OUTPUT").map(PathBuf::from),
            report: None,
            junit: Vec::new(),
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
    warnings: usize,
    failed_shards: Vec<(ShardId, ShardStatus)>,
    started: std::time::Instant,
    /// Each shard's expected duration, when the tests were planned.
    expected: std::collections::BTreeMap<ShardId, std::time::Duration>,
}

impl<W: Write> GithubReporter<W> {
    /// A renderer writing the log to `out`.
    pub fn new(out: W, files: GithubFiles) -> Self {
        GithubReporter {
            out,
            files,
            logs: HashMap::new(),
            annotations: 0,
            warnings: 0,
            failed_shards: Vec::new(),
            started: std::time::Instant::now(),
            expected: Default::default(),
        }
    }

    /// Masks a secret in the log from here on (`::add-mask::`), one line at
    /// a time. A line that could not be a secret (see [`maskable`]) is left
    /// alone, with a warning: masking "false" would hide every "false" in
    /// the rest of the job.
    pub fn mask(&mut self, secret: &str) -> std::io::Result<()> {
        for line in secret.lines().filter(|l| !l.trim().is_empty()) {
            if maskable(line) {
                writeln!(self.out, "::add-mask::{}", escape_data(line))?;
            } else {
                let title = ("title", "Not masked".to_string());
                let why = "a value asked to be masked is too short or too common to mask without hiding ordinary log text (fewer than 6 characters, a number, a yes/no word, or one word of letters)";
                self.warn(&[title], why)?;
            }
        }
        Ok(())
    }

    fn annotate(&mut self, properties: &[(&str, String)], message: &str) -> std::io::Result<bool> {
        if self.annotations >= MAX_ERROR_ANNOTATIONS {
            return Ok(false);
        }
        self.annotations += 1;
        self.command("error", properties, message)?;
        Ok(true)
    }

    /// A `::warning`, within GitHub's 10 per step; returns whether it was shown.
    fn warn(&mut self, properties: &[(&str, String)], message: &str) -> std::io::Result<bool> {
        if self.warnings >= MAX_WARNING_ANNOTATIONS {
            return Ok(false);
        }
        self.warnings += 1;
        self.command("warning", properties, message)?;
        Ok(true)
    }

    fn command(
        &mut self,
        name: &str,
        properties: &[(&str, String)],
        message: &str,
    ) -> std::io::Result<()> {
        let props: Vec<String> = properties
            .iter()
            .map(|(k, v)| format!("{k}={}", escape_property(v)))
            .collect();
        writeln!(
            self.out,
            "::{name} {}::{}",
            props.join(","),
            escape_data(message)
        )
    }

    /// Annotations for failed tests first, each at its file and line, then
    /// the shards that failed for another reason (timed out, could not run,
    /// failed without a failed test in their report), folded into one when
    /// they would not all fit. Returns how many were left unannotated
    /// (tests, shards).
    fn annotate_failures(&mut self, tests: &TestReport) -> std::io::Result<(usize, usize)> {
        let explained: HashSet<ShardId> = tests.failures.iter().map(|f| f.shard).collect();
        let shards: Vec<(ShardId, ShardStatus)> = std::mem::take(&mut self.failed_shards)
            .into_iter()
            .filter(|(shard, status)| {
                !(matches!(status, ShardStatus::Failed { .. }) && explained.contains(shard))
            })
            .collect();
        let room = MAX_ERROR_ANNOTATIONS.saturating_sub(self.annotations);
        let fold = tests.failures.len() + shards.len() > room && shards.len() > 1;
        let shard_slots = match (shards.is_empty(), fold) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => shards.len().min(room),
        };
        let mut tests_left = 0;
        for (shown, failure) in tests.failures.iter().enumerate() {
            if shown >= room.saturating_sub(shard_slots) {
                tests_left += 1;
                continue;
            }
            let title = format!("{} (shard {})", failure.name, failure.shard);
            if !self.annotate(&failure_properties(title, failure), &failure.message)? {
                tests_left += 1;
            }
        }
        let mut shards_left = 0;
        if fold {
            let title = format!("{} did not pass", super::plural(shards.len(), "shard"));
            let lines: Vec<String> = shards
                .iter()
                .map(|(shard, status)| format!("shard {shard}: {}", status.describe()))
                .collect();
            if !self.annotate(&[("title", title)], &lines.join("\n"))? {
                shards_left = shards.len();
            }
        } else {
            for (shard, status) in &shards {
                let title = format!("shard {shard} {}", status.label());
                if !self.annotate(&[("title", title)], &status.describe())? {
                    shards_left += 1;
                }
            }
        }
        Ok((tests_left, shards_left))
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
        // A rerun's end replaces the shard's earlier one.
        self.failed_shards
            .retain(|(shard, _)| *shard != record.shard);
        if record.status != ShardStatus::Passed {
            // Annotated at the end, after the failed tests, which say more.
            self.failed_shards
                .push((record.shard, record.status.clone()));
        }
        self.out.flush()
    }

    fn write_summary(&self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let Some(path) = &self.files.step_summary else {
            return Ok(());
        };
        let passed = summary.count(|s| *s == ShardStatus::Passed);
        let expected_column = !self.expected.is_empty();
        let (head, rule) = match expected_column {
            true => (" Expected |", "---|"),
            false => ("", ""),
        };
        let mut md = format!(
            "### mvm-shard: {passed} of {} passed\n\n| Shard | Status | Duration |{head} Tests passed | Tests failed | Environment |\n|---|---|---|{rule}---|---|---|\n",
            super::plural(summary.records.len(), "shard")
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
                ShardStatus::Interrupted { .. } => "⏹️ interrupted".to_string(),
            };
            let env = match &r.result {
                Some(res) if res.fresh_environment => "fresh",
                Some(_) => "reused, wiped",
                None => "-",
            };
            let expected = match expected_column {
                true => {
                    let e = self.expected.get(&r.shard).map_or("-".into(), |d| secs(*d));
                    format!(" {e} |")
                }
                false => String::new(),
            };
            md.push_str(&format!(
                "| {} | {status} | {} |{expected} {tp} | {tf} | {env} |\n",
                r.shard,
                secs(r.duration)
            ));
        }
        md.push_str(&format!(
            "\n{}\n",
            super::timing_line(summary, self.started.elapsed())
        ));
        if let Some(cost) = super::cost::estimate(summary) {
            md.push_str(&format!("\n{}\n", cost.describe()));
        }
        push_tests(&mut md, "Failed tests", &tests.failures);
        push_tests(
            &mut md,
            "Flaky: failed, then passed on a rerun",
            &tests.flaky,
        );
        append(path, md.as_bytes())
    }

    fn write_outputs(&self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let result = match summary.exit_code() {
            0 => "passed",
            1 => "failed",
            2 => USAGE_ERROR,
            _ => "infra-failed",
        };
        write_outputs(&self.files, result, Some(summary), tests.merged.is_some())
    }
}

/// A folded list of tests in the job summary (at most
/// [`MAX_SUMMARY_FAILURES`], then how many more), each with its shard and
/// place; nothing when there are none.
fn push_tests(md: &mut String, title: &str, tests: &[TestFailure]) {
    if tests.is_empty() {
        return;
    }
    md.push_str(&format!(
        "\n<details open><summary>{title} ({})</summary>\n\n",
        tests.len()
    ));
    for f in tests.iter().take(MAX_SUMMARY_FAILURES) {
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
    if tests.len() > MAX_SUMMARY_FAILURES {
        md.push_str(&format!(
            "- … and {} more\n",
            tests.len() - MAX_SUMMARY_FAILURES
        ));
    }
    md.push_str("\n</details>\n");
}

/// The `result` output of a run stopped by a usage or configuration error (exit 2).
pub const USAGE_ERROR: &str = "usage-error";

/// Appends the step outputs: `result`, the shard counts (all 0 without a
/// summary: nothing ran) and the report's path (empty unless `merged`).
fn write_outputs(
    files: &GithubFiles,
    result: &str,
    summary: Option<&RunSummary>,
    merged: bool,
) -> std::io::Result<()> {
    let Some(path) = &files.output else {
        return Ok(());
    };
    let count = |pred: &dyn Fn(&ShardStatus) -> bool| summary.map_or(0, |s| s.count(pred));
    let mut lines = format!(
        "result={result}\npassed={}\nfailed={}\ntimed-out={}\ninfra-failed={}\n",
        count(&|s| *s == ShardStatus::Passed),
        count(&|s| matches!(s, ShardStatus::Failed { .. })),
        count(&|s| *s == ShardStatus::TimedOut),
        count(&|s| matches!(s, ShardStatus::InfraFailed { .. })),
    );
    match &files.report {
        Some(report) if merged => lines.push_str(&format!("report={}\n", report.display())),
        _ => lines.push_str("report=\n"),
    }
    append(path, lines.as_bytes())
}

/// Tells GitHub Actions about a usage or configuration error (exit 2): an
/// `::error` annotation with the one-line message, and the step outputs with
/// `result=usage-error` and the counts of whatever ran by then.
pub fn usage_error(
    out: &mut impl Write,
    files: &GithubFiles,
    message: &str,
    summary: Option<&RunSummary>,
) -> std::io::Result<()> {
    writeln!(out, "::error title=mvm-shard::{}", escape_data(message))?;
    out.flush()?;
    write_outputs(files, USAGE_ERROR, summary, false)
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
            RunEvent::Rerunning {
                shard,
                round,
                of,
                what,
            } => writeln!(
                self.out,
                "shard {shard}: {}",
                super::terminal::rerun_line(*round, *of, what)
            ),
            RunEvent::Finished(record) => self.show_shard(record),
            RunEvent::Secret(value) => self.mask(value),
        }
    }

    fn expect(&mut self, expected: &std::collections::BTreeMap<ShardId, std::time::Duration>) {
        self.expected = expected.clone();
    }

    fn finish(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let (tests_left, shards_left) = self.annotate_failures(tests)?;
        if tests_left + shards_left > 0 {
            writeln!(
                self.out,
                "::notice title=More failures::{}; GitHub shows {MAX_ERROR_ANNOTATIONS} error annotations per step, and the job summary lists them all",
                unshown(tests_left, shards_left)
            )?;
        }
        let mut warnings_left = 0;
        for (shard, path, error) in &tests.problems {
            let title = ("title", "JUnit report lost".to_string());
            if !self.warn(&[title], &format!("shard {shard}: {path}: {error}"))? {
                warnings_left += 1;
            }
        }
        if warnings_left > 0 {
            writeln!(
                self.out,
                "::notice title=More warnings::{}; see the log above",
                super::plural(warnings_left, "more lost JUnit report")
            )?;
        }
        let mut flaky_left = 0;
        for f in &tests.flaky {
            let props = failure_properties(format!("Flaky: {} (shard {})", f.name, f.shard), f);
            let message = format!(
                "failed, then passed on a rerun; it failed with: {}",
                f.message
            );
            if !self.warn(&props, &message)? {
                flaky_left += 1;
            }
        }
        if flaky_left > 0 {
            writeln!(
                self.out,
                "::notice title=More flaky tests::{}; the job summary lists them all",
                super::plural(flaky_left, "more flaky test")
            )?;
        }
        if tests.merged.is_none() && !self.files.junit.is_empty() {
            let globs = self.files.junit.join(", ");
            let title = ("title", "No JUnit report".to_string());
            self.warn(
                &[title],
                &format!("no shard sent back a JUnit report matching {globs}"),
            )?;
        }
        let passed = summary.count(|s| *s == ShardStatus::Passed);
        writeln!(
            self.out,
            "mvm-shard: {passed} of {} passed",
            super::plural(summary.records.len(), "shard")
        )?;
        self.write_summary(summary, tests)?;
        self.write_outputs(summary, tests)?;
        self.out.flush()
    }
}

/// Whether a value can be masked without hiding ordinary log text: not
/// shorter than 6 characters, not a number, not a yes/no word, and not a
/// single word of letters (`shard`, `production`). Real secrets (tokens,
/// passwords, keys) mix digits, cases or symbols.
pub fn maskable(value: &str) -> bool {
    let v = value.trim();
    let yes_no = [
        "true", "false", "yes", "no", "on", "off", "enabled", "disabled", "null", "none",
    ];
    let one_word = v.chars().all(|c| c.is_ascii_alphabetic())
        && (v.chars().all(|c| c.is_ascii_lowercase())
            || v.chars().all(|c| c.is_ascii_uppercase())
            || v[1..].chars().all(|c| c.is_ascii_lowercase()));
    v.chars().count() >= 6
        && v.parse::<f64>().is_err()
        && !yes_no.iter().any(|w| v.eq_ignore_ascii_case(w))
        && !one_word
}

/// An annotation's title and the place of a test's failure, when known.
fn failure_properties(title: String, failure: &TestFailure) -> Vec<(&'static str, String)> {
    let mut props = vec![("title", title)];
    if let Some(file) = &failure.file {
        props.push(("file", file.clone()));
        if let Some(line) = failure.line {
            props.push(("line", line.to_string()));
        }
    }
    props
}

/// "3 failed tests and 2 failed shards are not annotated", in words.
fn unshown(tests: usize, shards: usize) -> String {
    let parts: Vec<String> = [
        (tests > 0).then(|| super::plural(tests, "failed test")),
        (shards > 0).then(|| super::plural(shards, "failed shard")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let verb = if tests + shards == 1 { "is" } else { "are" };
    format!("{} {verb} not annotated", parts.join(" and "))
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
        let summary = RunSummary {
            stopped_by: None,
            records: vec![record(
                1,
                ShardStatus::Failed {
                    exit_code: Some(2),
                    signal: None,
                },
            )],
        };
        r.finish(&summary, &TestReport::default()).unwrap();
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
            junit: vec!["junit.xml".into()],
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
            stopped_by: None,
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
        assert!(text.contains("::notice title=More failures::5 failed tests are not annotated"));
        // Shard 2's failure is explained by its failed tests: no annotation of its own.
        assert!(!text.contains("title=shard 2/2"));
        let summary_md = std::fs::read_to_string(files.step_summary.unwrap()).unwrap();
        assert!(summary_md.contains("| 2/2 | ❌ failed (exit 1) |"));
        assert!(summary_md.contains("Failed tests (15)"));
        // Both shards took 1.2 s; the slowest are listed in shard order.
        assert!(
            summary_md.contains("; slowest: 1/2 1.20s, 2/2 1.20s\n"),
            "{summary_md}"
        );
        let outputs = std::fs::read_to_string(files.output.unwrap()).unwrap();
        assert!(outputs.contains("result=failed\npassed=1\nfailed=1\n"));
        // No shard sent a report back: the output is empty, and a warning says so.
        assert!(outputs.ends_with("report=\n"), "{outputs}");
        assert!(text.contains(
            "::warning title=No JUnit report::no shard sent back a JUnit report matching junit.xml"
        ));
    }

    fn failing_shards_and_tests(shards: u32, tests: u32) -> (String, TestReport) {
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, GithubFiles::default());
        let count = shards + 1;
        let mut records = Vec::new();
        for index in 1..=shards {
            let mut rec = record(index, ShardStatus::TimedOut);
            rec.shard.count = count;
            r.handle(&RunEvent::Finished(rec.clone())).unwrap();
            records.push(rec);
        }
        let tested = ShardId {
            index: count,
            count,
        };
        let mut rec = record(
            count,
            ShardStatus::Failed {
                exit_code: Some(1),
                signal: None,
            },
        );
        rec.shard = tested;
        r.handle(&RunEvent::Finished(rec.clone())).unwrap();
        records.push(rec);
        let report = TestReport {
            failures: (0..tests)
                .map(|i| TestFailure {
                    shard: tested,
                    name: format!("test_{i}"),
                    file: Some("tests/test_a.py".into()),
                    line: Some(i + 1),
                    message: "assert 1 == 2".into(),
                })
                .collect(),
            ..TestReport::default()
        };
        r.finish(
            &RunSummary {
                records,
                stopped_by: None,
            },
            &report,
        )
        .unwrap();
        (String::from_utf8(out).unwrap(), report)
    }

    #[test]
    fn many_failing_shards_fold_into_one_annotation_and_leave_room_for_tests() {
        let (text, _) = failing_shards_and_tests(12, 3);
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("::error ")).collect();
        assert_eq!(errors.len(), 4, "{text}");
        assert!(errors[..3]
            .iter()
            .all(|e| e.contains("file=tests/test_a.py")));
        assert!(errors[3].starts_with(
            "::error title=12 shards did not pass::shard 1/13: ran out of time%0Ashard 2/13"
        ));
        assert!(!text.contains("::notice"));

        let (text, _) = failing_shards_and_tests(12, 20);
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("::error ")).collect();
        assert_eq!(errors.len(), MAX_ERROR_ANNOTATIONS);
        assert_eq!(errors.iter().filter(|e| e.contains("file=")).count(), 9);
        assert!(text.contains("::notice title=More failures::11 failed tests are not annotated"));
    }

    #[test]
    fn a_few_failing_shards_are_annotated_one_by_one() {
        let (text, _) = failing_shards_and_tests(2, 3);
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("::error ")).collect();
        assert_eq!(errors.len(), 5, "{text}");
        assert_eq!(
            errors[3],
            "::error title=shard 1/3 TIMED OUT::ran out of time"
        );
    }

    #[test]
    fn flaky_tests_are_warnings_within_the_limit_and_all_in_the_job_summary() {
        let dir = tempfile::tempdir().unwrap();
        let files = GithubFiles {
            step_summary: Some(dir.path().join("summary.md")),
            ..GithubFiles::default()
        };
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, files);
        let shard = ShardId { index: 1, count: 1 };
        let report = TestReport {
            flaky: (0..11)
                .map(|i| TestFailure {
                    shard,
                    name: format!("t.py::test_{i}"),
                    file: Some("t.py".into()),
                    line: (i == 0).then_some(7),
                    message: "assert 1 == 2".into(),
                })
                .collect(),
            ..TestReport::default()
        };
        let summary = RunSummary {
            stopped_by: None,
            records: vec![record(1, ShardStatus::Passed)],
        };
        r.finish(&summary, &report).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("::warning ").count(), MAX_WARNING_ANNOTATIONS);
        assert!(text.contains("::warning title=Flaky%3A t.py%3A%3Atest_0 (shard 1/1),file=t.py,line=7::failed, then passed on a rerun; it failed with: assert 1 == 2"), "{text}");
        assert!(
            text.contains("::warning title=Flaky%3A t.py%3A%3Atest_1 (shard 1/1),file=t.py::"),
            "no line, none given: {text}"
        );
        assert!(
            text.contains("::notice title=More flaky tests::1 more flaky test;"),
            "{text}"
        );
        assert!(text.contains("mvm-shard: 1 of 1 shard passed\n"), "{text}");
        let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(
            md.starts_with("### mvm-shard: 1 of 1 shard passed\n"),
            "{md}"
        );
        assert!(
            md.contains("Flaky: failed, then passed on a rerun (11)"),
            "{md}"
        );
        assert_eq!(md.matches("- shard 1/1: `t.py::test_").count(), 11, "{md}");
        assert!(!md.contains("Expected"), "no plan, no such column: {md}");
    }

    #[test]
    fn the_job_summary_shows_expected_next_to_actual_for_planned_shards() {
        let dir = tempfile::tempdir().unwrap();
        let files = GithubFiles {
            step_summary: Some(dir.path().join("summary.md")),
            ..GithubFiles::default()
        };
        let mut r = GithubReporter::new(Vec::new(), files);
        let shard = ShardId { index: 1, count: 2 };
        r.expect(&[(shard, Duration::from_millis(3250))].into_iter().collect());
        let summary = RunSummary {
            stopped_by: None,
            records: vec![record(1, ShardStatus::Passed)],
        };
        r.finish(&summary, &TestReport::default()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(
            md.contains("| Shard | Status | Duration | Expected | Tests passed | Tests failed | Environment |\n|---|---|---|---|---|---|---|\n"),
            "{md}"
        );
        assert!(md.contains(" | 1.20s | 3.25s | - | - | "), "{md}");
    }

    #[test]
    fn lost_reports_are_warnings_within_their_own_limit() {
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, GithubFiles::default());
        let shard = ShardId { index: 1, count: 1 };
        let report = TestReport {
            problems: (0..12)
                .map(|i| (shard, format!("r{i}.xml"), "not a JUnit report".into()))
                .collect(),
            ..TestReport::default()
        };
        let summary = RunSummary {
            stopped_by: None,
            records: vec![record(1, ShardStatus::Passed)],
        };
        r.finish(&summary, &report).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("::warning ").count(), MAX_WARNING_ANNOTATIONS);
        assert!(text.contains("2 more lost JUnit reports"));
    }

    #[test]
    fn the_report_output_names_the_report_only_when_one_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = GithubFiles {
            output: Some(dir.path().join("output")),
            report: Some(dir.path().join("merged.xml")),
            junit: vec!["junit.xml".into()],
            ..GithubFiles::default()
        };
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, files.clone());
        let report = TestReport {
            merged: Some(quick_junit::Report::new("mvm-shard")),
            ..TestReport::default()
        };
        let summary = RunSummary {
            stopped_by: None,
            records: vec![record(1, ShardStatus::Passed)],
        };
        r.finish(&summary, &report).unwrap();
        let outputs = std::fs::read_to_string(files.output.unwrap()).unwrap();
        let expected = format!("report={}\n", dir.path().join("merged.xml").display());
        assert!(outputs.ends_with(&expected), "{outputs}");
        assert!(!String::from_utf8(out).unwrap().contains("::warning"));
    }

    #[test]
    fn only_values_that_could_be_secrets_are_masked() {
        for plain in [
            "false",
            "TRUE",
            "shard",
            "production",
            "Production",
            "12345678",
            "3.14159",
            "abc",
            "disabled",
        ] {
            assert!(!maskable(plain), "{plain}");
        }
        for secret in [
            "hunter2!",
            "ghp_0123456789abcdef",
            "s3cr3t-pw",
            "dGhpcyBpcyBh",
            "CamelCaseKey",
        ] {
            assert!(maskable(secret), "{secret}");
        }
        let mut out = Vec::new();
        let mut r = GithubReporter::new(&mut out, GithubFiles::default());
        r.mask("ghp_0123456789abcdef\nfalse").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("::add-mask::ghp_0123456789abcdef\n"),
            "{text}"
        );
        assert!(!text.contains("::add-mask::false"), "{text}");
        assert!(text.contains("::warning title=Not masked::"), "{text}");
    }
}
