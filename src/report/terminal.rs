//! The terminal renderer: each shard's output line by line with a shard
//! prefix as it arrives, then a summary table and the failed tests.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::junit::TestReport;
use super::Reporter;
use crate::dispatch::{RunEvent, RunSummary, ShardStatus};
use crate::protocol::{OutputStream, ShardId};

/// A line longer than this is shown in pieces rather than held back.
const MAX_HELD_LINE: usize = 64 * 1024;

/// Writes shard output with `[i/n] ` prefixes, whole lines at a time, so
/// lines of concurrent shards never interleave mid-line.
pub struct TerminalReporter<W: Write> {
    out: W,
    partial: HashMap<(ShardId, OutputStream), Vec<u8>>,
    progress: Option<ProgressBar>,
    not_passed: usize,
}

impl<W: Write> TerminalReporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Self {
        TerminalReporter {
            out,
            partial: HashMap::new(),
            progress: None,
            not_passed: 0,
        }
    }

    /// Adds a progress line below the output (for a terminal): shards done,
    /// how many did not pass, time so far. Output is printed above it.
    pub fn with_progress(mut self, bar: ProgressBar) -> Self {
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {elapsed_precise} {pos}/{len} shards done{msg}")
        {
            bar.set_style(style);
        }
        self.progress = Some(bar);
        self
    }

    /// Shows one event.
    pub fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        match event {
            RunEvent::Started { .. } | RunEvent::Secret(_) => Ok(()),
            RunEvent::Output {
                shard,
                stream,
                data,
            } => {
                let held = self.partial.entry((*shard, *stream)).or_default();
                held.extend_from_slice(data);
                let mut lines = Vec::new();
                while let Some(pos) = held.iter().position(|b| *b == b'\n') {
                    lines.push(held.drain(..=pos).collect::<Vec<u8>>());
                }
                if held.len() > MAX_HELD_LINE {
                    let mut rest = std::mem::take(held);
                    rest.push(b'\n');
                    lines.push(rest);
                }
                for line in lines {
                    self.line(*shard, &line)?;
                }
                Ok(())
            }
            RunEvent::Retrying {
                shard,
                next_attempt,
                delay,
                reason,
            } => writeln!(
                self.out,
                "[{shard}] could not start ({reason}); attempt {next_attempt} in {}",
                secs(*delay)
            ),
            RunEvent::Finished(record) => {
                for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                    if let Some(mut rest) = self.partial.remove(&(record.shard, stream)) {
                        if !rest.is_empty() {
                            rest.push(b'\n');
                            self.line(record.shard, &rest)?;
                        }
                    }
                }
                let detail = match &record.status {
                    ShardStatus::Passed => String::new(),
                    other => format!(" ({})", other.describe()),
                };
                writeln!(
                    self.out,
                    "[{}] {}{detail} in {}",
                    record.shard,
                    record.status.label(),
                    secs(record.duration)
                )?;
                self.out.flush()
            }
        }
    }

    fn line(&mut self, shard: ShardId, line: &[u8]) -> std::io::Result<()> {
        write!(self.out, "[{shard}] ")?;
        self.out.write_all(line)
    }

    /// Writes the summary table, the failed tests and the closing count line.
    pub fn summary(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        writeln!(self.out)?;
        writeln!(
            self.out,
            "{:<8} {:<10} {:>9} {:>5}  environment",
            "shard", "status", "duration", "exit"
        )?;
        for r in &summary.records {
            let exit = match (&r.status, &r.result) {
                (
                    ShardStatus::Failed {
                        exit_code: Some(c), ..
                    },
                    _,
                ) => c.to_string(),
                (ShardStatus::Passed, _) => "0".into(),
                (
                    ShardStatus::Failed {
                        signal: Some(s), ..
                    },
                    _,
                ) => format!("sig{s}"),
                _ => "-".into(),
            };
            let environment = match &r.result {
                Some(res) if res.fresh_environment => "fresh",
                Some(_) => "reused, wiped",
                None => "-",
            };
            writeln!(
                self.out,
                "{:<8} {:<10} {:>9} {:>5}  {}",
                r.shard.to_string(),
                r.status.label(),
                secs(r.duration),
                exit,
                environment
            )?;
        }
        for (shard, path, error) in &tests.problems {
            writeln!(self.out, "[{shard}] {path}: {error}")?;
        }
        if !tests.failures.is_empty() {
            writeln!(self.out, "\nfailed tests:")?;
            for f in tests.failures.iter().take(MAX_LISTED_FAILURES) {
                let place = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!(" ({file}:{line})"),
                    (Some(file), None) => format!(" ({file})"),
                    _ => String::new(),
                };
                writeln!(self.out, "  [{}] {}{place}: {}", f.shard, f.name, f.message)?;
            }
            if tests.failures.len() > MAX_LISTED_FAILURES {
                writeln!(
                    self.out,
                    "  ... and {} more",
                    tests.failures.len() - MAX_LISTED_FAILURES
                )?;
            }
        }
        let failed: Vec<String> = summary
            .records
            .iter()
            .filter(|r| r.status != ShardStatus::Passed)
            .map(|r| r.shard.index.to_string())
            .collect();
        writeln!(
            self.out,
            "{} shards: {} passed, {} failed, {} timed out, {} could not run{}{}",
            summary.records.len(),
            summary.count(|s| *s == ShardStatus::Passed),
            summary.count(|s| matches!(s, ShardStatus::Failed { .. })),
            summary.count(|s| *s == ShardStatus::TimedOut),
            summary.count(|s| matches!(s, ShardStatus::InfraFailed { .. })),
            match summary.count(|s| matches!(s, ShardStatus::Interrupted { .. })) {
                0 => String::new(),
                n => format!(", {n} interrupted"),
            },
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (not passed: {})", failed.join(", "))
            }
        )?;
        self.out.flush()
    }
}

impl<W: Write + Send> Reporter for TerminalReporter<W> {
    fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        let Some(bar) = self.progress.clone() else {
            return TerminalReporter::handle(self, event);
        };
        // The bar steps aside while lines are written above it.
        let written = bar.suspend(|| {
            let written = TerminalReporter::handle(self, event);
            self.out.flush().and(written)
        });
        if let RunEvent::Finished(record) = event {
            if record.status != ShardStatus::Passed {
                self.not_passed += 1;
                bar.set_message(format!(", {} not passed", self.not_passed));
            }
            bar.inc(1);
        }
        written
    }

    fn finish(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        self.summary(summary, tests)
    }
}

/// Failed tests listed at the end before the rest is counted.
const MAX_LISTED_FAILURES: usize = 50;

/// Seconds with two decimals, as durations are shown everywhere.
pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::ShardRecord;
    use bytes::Bytes;

    fn shard(index: u32) -> ShardId {
        ShardId { index, count: 2 }
    }

    fn output(index: u32, data: &'static [u8]) -> RunEvent {
        RunEvent::Output {
            shard: shard(index),
            stream: OutputStream::Stdout,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn the_progress_line_counts_finished_shards_and_leaves_the_output_alone() {
        let mut out = Vec::new();
        let bar = ProgressBar::hidden();
        bar.set_length(2);
        let mut r = TerminalReporter::new(&mut out).with_progress(bar.clone());
        Reporter::handle(&mut r, &output(1, b"line\n")).unwrap();
        Reporter::handle(
            &mut r,
            &RunEvent::Finished(ShardRecord {
                shard: shard(1),
                status: ShardStatus::TimedOut,
                duration: Duration::from_millis(10),
                attempts: 1,
                result: None,
                files: Vec::new(),
            }),
        )
        .unwrap();
        assert_eq!(bar.position(), 1);
        assert_eq!(bar.message(), ", 1 not passed");
        drop(r);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[1/2] line\n[1/2] TIMED OUT (ran out of time) in 0.01s\n"
        );
    }

    #[test]
    fn lines_from_concurrent_shards_never_mix() {
        let mut out = Vec::new();
        let mut r = TerminalReporter::new(&mut out);
        for e in [
            output(1, b"hel"),
            output(2, b"other\nsec"),
            output(1, b"lo\n"),
            output(2, b"ond"),
        ] {
            r.handle(&e).unwrap();
        }
        r.handle(&RunEvent::Finished(ShardRecord {
            shard: shard(2),
            status: ShardStatus::Failed {
                exit_code: Some(1),
                signal: None,
            },
            duration: Duration::from_millis(1500),
            attempts: 1,
            result: None,
            files: Vec::new(),
        }))
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "[2/2] other\n[1/2] hello\n[2/2] second\n[2/2] FAILED (exited with code 1) in 1.50s\n"
        );
    }
}
