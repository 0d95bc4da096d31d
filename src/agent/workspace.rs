//! The agent's scratch area: detecting and wiping what earlier invocations left,
//! and making each shard a fresh workspace with its own TMPDIR and HOME.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::os;

/// Variable every shard command carries, naming the scratch root it belongs to.
pub const SANDBOX_MARKER: &str = "MVM_SHARD_SANDBOX";

/// What a previous invocation left in this environment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    /// Entries removed from the scratch root.
    pub paths: u32,
    /// Processes killed.
    pub processes: u32,
}

impl Leftovers {
    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.paths == 0 && self.processes == 0
    }
}

/// The folder the agent owns: Lambda's /tmp, or what `MVM_SHARD_SCRATCH`
/// or `TMPDIR` names (the emulator gives each environment its own).
pub fn scratch_root() -> PathBuf {
    std::env::var_os("MVM_SHARD_SCRATCH")
        .or_else(|| std::env::var_os("TMPDIR"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Kills every process below the agent and empties the scratch root, so a
/// shard never sees what an earlier one left, even after Lambda reset a
/// crashed runtime but kept /tmp.
pub async fn sweep(root: &Path) -> Leftovers {
    let mut processes =
        os::end_descendants(std::process::id(), Duration::from_millis(500), true).await;
    // Commands of an earlier agent process (Lambda restarted a crashed runtime
    // but kept the sandbox) are no descendants of ours; the marker finds them.
    // A shard's processes are all dead before its workspace is removed, so
    // with nothing left in the scratch root there is nothing to find, unless
    // we are no subreaper and orphans could have left our tree.
    let anything_left = std::fs::read_dir(root).is_ok_and(|mut d| d.next().is_some());
    if anything_left || !os::is_subreaper() {
        let marker = root.display().to_string();
        processes += os::kill_marked_shared(SANDBOX_MARKER, &marker).await;
    }
    let root = root.to_path_buf();
    let paths = tokio::task::spawn_blocking(move || empty_dir(&root))
        .await
        .unwrap_or(0);
    Leftovers { paths, processes }
}

fn empty_dir(root: &Path) -> u32 {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => crate::os::remove_dir_all_writable(&path),
            _ => std::fs::remove_file(&path),
        };
        match gone {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover"),
        }
    }
    removed
}

/// One shard's private folders, removed when the shard ends.
#[derive(Debug)]
pub struct Workspace {
    /// Top folder of the workspace.
    pub dir: PathBuf,
    /// Where the source is unpacked.
    pub src: PathBuf,
    /// The command's TMPDIR.
    pub tmp: PathBuf,
    /// The command's HOME.
    pub home: PathBuf,
}

impl Workspace {
    /// Makes `root/shard-<uuid>/{src,tmp,home}`.
    pub fn create(root: &Path) -> std::io::Result<Self> {
        // Canonical from the start: what is checked against these paths later
        // (collected files, caches) is resolved, so a symbolic link the
        // command plants, even in place of these folders, cannot pass for them.
        let root = root.canonicalize()?;
        let dir = root.join(format!("shard-{}", uuid::Uuid::new_v4().simple()));
        let ws = Workspace {
            src: dir.join("src"),
            tmp: dir.join("tmp"),
            home: dir.join("home"),
            dir,
        };
        for d in [&ws.src, &ws.tmp, &ws.home] {
            std::fs::create_dir_all(d)?;
        }
        Ok(ws)
    }

    /// Removes the workspace and everything the shard wrote into it.
    pub async fn remove(self) {
        let dir = self.dir;
        let _ = tokio::task::spawn_blocking(move || crate::os::remove_dir_all_writable(&dir)).await;
    }
}
