//! Showing a run. Renderers consume [`RunEvent`](crate::dispatch::RunEvent)s
//! and the final [`RunSummary`](crate::dispatch::RunSummary); they know nothing
//! of backends. [`terminal`] is for people at a terminal, [`github`] for the
//! GitHub Actions log viewer, job summary and outputs; [`junit`] reads the
//! JUnit reports shards send back and merges them.

pub mod color;
pub mod cost;
pub mod github;
pub mod junit;
pub mod terminal;

pub use github::GithubReporter;
pub use terminal::TerminalReporter;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::dispatch::{RunEvent, RunSummary};
use crate::protocol::ShardId;

/// What every renderer does.
pub trait Reporter: Send {
    /// Shows one event as it happens.
    fn handle(&mut self, event: &RunEvent) -> std::io::Result<()>;
    /// Writes out what the renderer buffered; called whenever no event waits.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// How long each shard was expected to take (with `--runner`, from the
    /// learned durations), shown next to how long it took; called before
    /// [`Reporter::finish`].
    fn expect(&mut self, _expected: &BTreeMap<ShardId, Duration>) {}
    /// Shows the end of the run: summary, annotations, outputs.
    fn finish(&mut self, summary: &RunSummary, tests: &junit::TestReport) -> std::io::Result<()>;
}

/// "1 shard", "3 shards": counts in words, for every renderer.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How long the run took and which shards took longest: a run lasts as long
/// as its slowest shard, so these are the ones to split or balance.
pub fn timing_line(summary: &RunSummary, wall: std::time::Duration) -> String {
    let mut records: Vec<_> = summary.records.iter().collect();
    records.sort_by(|a, b| b.duration.cmp(&a.duration).then(a.shard.cmp(&b.shard)));
    let slowest: Vec<String> = records
        .iter()
        .take(3)
        .map(|r| format!("{} {}", r.shard, terminal::secs(r.duration)))
        .collect();
    let mut line = format!("wall time {}", terminal::secs(wall));
    if records.len() > 1 {
        line.push_str(&format!("; slowest: {}", slowest.join(", ")));
    }
    line
}
