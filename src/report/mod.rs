//! Showing a run. Renderers consume [`RunEvent`](crate::dispatch::RunEvent)s
//! and the final [`RunSummary`](crate::dispatch::RunSummary); they know nothing
//! of backends. [`terminal`] is for people at a terminal, [`github`] for the
//! GitHub Actions log viewer, job summary and outputs; [`junit`] reads the
//! JUnit reports shards send back and merges them.

pub mod github;
pub mod junit;
pub mod terminal;

pub use github::GithubReporter;
pub use terminal::TerminalReporter;

use crate::dispatch::{RunEvent, RunSummary};

/// What every renderer does.
pub trait Reporter: Send {
    /// Shows one event as it happens.
    fn handle(&mut self, event: &RunEvent) -> std::io::Result<()>;
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
