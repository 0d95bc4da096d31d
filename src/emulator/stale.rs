//! Emulator folders (`$TMPDIR/mvm-shard-emulator-*`) left behind by a
//! process that was killed outright (SIGKILL: nothing could clean up then).
//! Each folder names its owner, a process id and that process's start time,
//! and an emulator that starts removes the folders whose owner is gone.
//! Only folders of this user that name an owner are touched; links are
//! never followed.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// How every emulator folder's name starts.
pub const PREFIX: &str = "mvm-shard-emulator-";
/// The file in an emulator folder that names its owner: `PID START`.
const OWNER_FILE: &str = "owner";

/// Records this process as the owner of `dir`, its emulator folder.
pub fn claim(dir: &Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let start = crate::os::start_time(pid)
        .ok_or_else(|| std::io::Error::other("cannot read this process's start time"))?;
    std::fs::write(dir.join(OWNER_FILE), format!("{pid} {start}\n"))
}

/// Removes the emulator folders next to `mine` (this emulator's, claimed)
/// whose owner process is gone, of the user who owns `mine`; returns how
/// many. A folder that cannot be removed is left, with a warning.
pub fn sweep(mine: &Path) -> usize {
    let (Some(tmp), Ok(meta)) = (mine.parent(), std::fs::symlink_metadata(mine)) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let me = meta.uid();
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        // A folder of this user, not a link to one.
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours || owner_alive(&path, me) != Some(false) {
            continue;
        }
        match crate::os::remove_dir_all_writable(&path) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot remove the folder of an emulator that is gone"
            ),
        }
    }
    removed
}

/// Whether the owner `dir` names is alive; `None` when it names none this
/// user wrote (no file, a link, another user's, or not `PID START`).
fn owner_alive(dir: &Path, me: u32) -> Option<bool> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(dir.join(OWNER_FILE))
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.uid() != me {
        return None;
    }
    let mut text = String::new();
    file.by_ref().take(64).read_to_string(&mut text).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    let (pid, start): (u32, u64) = (pid.parse().ok()?, start.parse().ok()?);
    Some(crate::os::start_time(pid) == Some(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An emulator folder in `tmp` named `name` whose owner file says `owner`.
    fn folder(tmp: &Path, name: &str, owner: Option<&str>) -> std::path::PathBuf {
        let dir = tmp.join(format!("{PREFIX}{name}"));
        std::fs::create_dir_all(dir.join("env/shard")).unwrap();
        std::fs::write(dir.join("env/shard/out.log"), "x").unwrap();
        if let Some(owner) = owner {
            std::fs::write(dir.join(OWNER_FILE), owner).unwrap();
        }
        dir
    }

    /// The id of a process that has ended and been reaped.
    fn gone_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn only_folders_of_owners_that_are_gone_are_removed_and_links_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let tmp = tmp.path();
        let me = std::process::id();
        let my_start = crate::os::start_time(me).unwrap();
        let dead = folder(tmp, "dead", Some(&format!("{} 1\n", gone_pid())));
        // Read-only inside, as a Go module cache leaves it.
        use std::os::unix::fs::PermissionsExt;
        let read_only = std::fs::Permissions::from_mode(0o555);
        std::fs::set_permissions(dead.join("env/shard"), read_only).unwrap();
        // This process's id, but another start: the id was reused.
        let reused = folder(tmp, "reused", Some(&format!("{me} {}\n", my_start + 1)));
        let alive = folder(tmp, "alive", Some(&format!("{me} {my_start}\n")));
        let unnamed = folder(tmp, "unnamed", None);
        let garbled = folder(tmp, "garbled", Some("not an owner"));
        // A link to a dead emulator's folder, and a folder whose owner file
        // is a link to a dead owner's file: neither is followed.
        let elsewhere = tempfile::tempdir().unwrap();
        let target = folder(
            elsewhere.path(),
            "target",
            Some(&format!("{} 1\n", gone_pid())),
        );
        let link = tmp.join(format!("{PREFIX}link"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let linked_owner = folder(tmp, "linked-owner", None);
        std::os::unix::fs::symlink(target.join(OWNER_FILE), linked_owner.join(OWNER_FILE)).unwrap();
        let other_name = tmp.join("not-an-emulator");
        std::fs::create_dir(&other_name).unwrap();
        std::fs::write(other_name.join(OWNER_FILE), format!("{} 1\n", gone_pid())).unwrap();

        let mine = folder(tmp, "mine", None);
        claim(&mine).unwrap();
        assert_eq!(sweep(&mine), 2);
        assert!(!dead.exists() && !reused.exists());
        for kept in [
            &mine,
            &alive,
            &unnamed,
            &garbled,
            &linked_owner,
            &other_name,
        ] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(std::fs::symlink_metadata(&link).is_ok(), "the link is left");
        assert!(
            target.join("env/shard/out.log").exists(),
            "its target untouched"
        );
    }
}
