//! GitHub: turning the workflow's commit into a short-lived tarball link that
//! each VM downloads, so the GitHub token never leaves the runner.

mod tarball;

pub use tarball::{GithubError, TarballLinks};
