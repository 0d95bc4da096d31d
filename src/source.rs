//! Source archives: the invoker packs a working tree into tar.zst, the agent
//! unpacks it into a shard's fresh workspace.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::artifacts::{PackedArchive, PackedWriter};
use crate::protocol::ArchiveFormat;

/// A packed source tree, ready to travel inside a request or over a link.
#[derive(Debug)]
pub struct SourceArchive {
    /// The tar.zst on disk (none when the source comes from elsewhere).
    pub packed: Option<PackedArchive>,
    /// How many files and links it holds.
    pub entries: usize,
    /// Bytes before compression.
    pub unpacked_bytes: u64,
    /// The directory the archive's root stands for.
    pub root: PathBuf,
    /// Where the command runs, relative to `root` (the invoker's cwd inside a repository).
    pub workdir: String,
}

impl SourceArchive {
    /// No archive: the source comes from elsewhere. The working directory is
    /// still `dir` relative to its repository, as it would be in the checkout.
    pub fn nothing(dir: &Path) -> Self {
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let root = git_toplevel(&dir).unwrap_or_else(|| dir.clone());
        let workdir = dir
            .strip_prefix(&root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        SourceArchive {
            packed: None,
            entries: 0,
            unpacked_bytes: 0,
            root,
            workdir,
        }
    }

    /// Compressed size in bytes (0 without an archive).
    pub fn size(&self) -> u64 {
        self.packed.as_ref().map_or(0, |p| p.size)
    }
}

/// Why a source tree could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory does not exist or cannot be read.
    #[error("cannot read source directory {path}: {source}")]
    Unreadable {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `git ls-files` failed inside a repository.
    #[error("cannot list the files of the git working tree at {path}: {message}")]
    Git {
        /// The repository.
        path: PathBuf,
        /// git's complaint.
        message: String,
    },
    /// Writing or reading the archive failed.
    #[error("source archive: {0}")]
    Archive(#[from] std::io::Error),
    /// An archive entry would create, change or link something outside the
    /// workspace: the archive is hostile (or broken) and is refused.
    #[error(
        "archive entry {entry} {reason}: refused, nothing may be unpacked outside the workspace"
    )]
    Escapes {
        /// The entry's name as the archive gives it.
        entry: String,
        /// What it tried.
        reason: &'static str,
    },
    /// The compressed archive grew past its budget; packing stopped there.
    #[error("the source archive is over {limit} bytes compressed")]
    TooLarge {
        /// The budget, in compressed bytes.
        limit: u64,
    },
    /// The directory the command would start in holds nothing that is
    /// shipped, so it would not exist in the shards.
    #[error("the current directory {workdir} holds no file the shards receive (it is empty, or git ignores everything in it), so it would not exist in the shards: run from a directory with files the repository at {root} ships, or pass --source DIR")]
    WorkdirNotShipped {
        /// The directory, relative to `root`.
        workdir: String,
        /// The root of what is shipped.
        root: PathBuf,
    },
}

impl SourceError {
    fn escapes(entry: &Path, reason: &'static str) -> Self {
        SourceError::Escapes {
            entry: format!("{:?}", entry.display().to_string()),
            reason,
        }
    }
}

/// Packs `dir` for shipping, with no budget; see [`pack_within`].
pub fn pack(dir: &Path) -> Result<SourceArchive, SourceError> {
    pack_within(dir, u64::MAX, &[])
}

/// Packs `dir` for shipping. Inside a git working tree this is the whole
/// repository's tracked files plus untracked files that are not ignored, as
/// they are on disk now (uncommitted changes included); elsewhere it is every
/// file under `dir`. The archive goes to a temporary file as it is made, and
/// packing stops as soon as it passes `limit` bytes compressed
/// ([`SourceError::TooLarge`]), so a tree too large to ship costs no time
/// reading it all. `dir` must hold a file
/// that is shipped, or the shards would have no such directory to start in.
/// Files at `leave_out` (the run's own outputs, such as the merged report
/// and its plan a previous run wrote here) are never shipped.
pub fn pack_within(
    dir: &Path,
    limit: u64,
    leave_out: &[PathBuf],
) -> Result<SourceArchive, SourceError> {
    let dir = dir
        .canonicalize()
        .map_err(|source| SourceError::Unreadable {
            path: dir.to_path_buf(),
            source,
        })?;
    let (root, files) = match git_toplevel(&dir) {
        Some(root) => {
            let files = git_files(&root)?;
            (root, files)
        }
        None => (dir.clone(), walk_files(&dir)?),
    };
    let leave_out: Vec<PathBuf> = leave_out
        .iter()
        .filter_map(|path| {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            Some(parent.canonicalize().ok()?.join(path.file_name()?))
        })
        .collect();
    let files = files
        .into_iter()
        .filter(|file| !leave_out.contains(&root.join(file)))
        .collect();
    let workdir = dir
        .strip_prefix(&root)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();

    let packed = archive(&root, files, Path::new(&workdir), limit)?;
    if packed.in_workdir == 0 && !workdir.is_empty() {
        return Err(SourceError::WorkdirNotShipped { workdir, root });
    }
    let Packed {
        packed,
        entries,
        unpacked_bytes,
        ..
    } = packed;
    Ok(SourceArchive {
        packed: Some(packed),
        entries,
        unpacked_bytes,
        root,
        workdir,
    })
}

/// Packs chosen files and folders (`--include`) into an archive that is laid
/// over the source: paths are taken relative to the repository root of `cwd`
/// (or `cwd` outside a repository), so a file lands where it is here, ignored
/// or not (build outputs, a `cargo nextest archive`).
pub fn pack_extra(cwd: &Path, paths: &[PathBuf]) -> Result<SourceArchive, SourceError> {
    let cwd = cwd
        .canonicalize()
        .map_err(|source| SourceError::Unreadable {
            path: cwd.to_path_buf(),
            source,
        })?;
    let root = git_toplevel(&cwd).unwrap_or_else(|| cwd.clone());
    let mut files = Vec::new();
    for given in paths {
        let full = cwd
            .join(given)
            .canonicalize()
            .map_err(|source| SourceError::Unreadable {
                path: given.clone(),
                source,
            })?;
        let rel = full
            .strip_prefix(&root)
            .map_err(|_| SourceError::Unreadable {
                path: given.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "it is outside {}, the root the shards' source is laid out from",
                        root.display()
                    ),
                ),
            })?;
        if full.is_dir() {
            files.extend(walk_files(&full)?.into_iter().map(|f| rel.join(f)));
        } else {
            files.push(rel.to_path_buf());
        }
    }
    files.sort();
    files.dedup();
    let Packed {
        packed,
        entries,
        unpacked_bytes,
        ..
    } = archive(&root, files, Path::new(""), u64::MAX)?;
    Ok(SourceArchive {
        packed: Some(packed),
        entries,
        unpacked_bytes,
        workdir: String::new(),
        root,
    })
}

/// Packs every file under `dir` (a dependency folder to cache), links kept as links.
pub fn pack_tree(dir: &Path) -> Result<PackedArchive, SourceError> {
    Ok(archive(dir, walk_files(dir)?, Path::new(""), u64::MAX)?.packed)
}

/// What [`archive`] made.
struct Packed {
    /// The tar.zst, on disk.
    packed: PackedArchive,
    /// Files and links in it.
    entries: usize,
    /// Their size before compression.
    unpacked_bytes: u64,
    /// How many of them are under the working directory.
    in_workdir: usize,
}

/// An archive file that refuses to grow past `limit`, so packing stops there.
struct Bounded {
    out: PackedWriter,
    written: u64,
    limit: u64,
    over: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.over.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::other("over the source budget"));
        }
        let n = std::io::Write::write(&mut self.out, buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut self.out)
    }
}

/// tar.zst of `files` (relative to `root`), at most `limit` bytes, counting
/// what went in and how much of it lies under `workdir`.
fn archive(
    root: &Path,
    files: Vec<PathBuf>,
    workdir: &Path,
    limit: u64,
) -> Result<Packed, SourceError> {
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let too_large = |e: std::io::Error| {
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            SourceError::TooLarge { limit }
        } else {
            SourceError::Archive(e)
        }
    };
    let sink = Bounded {
        out: PackedArchive::writer()?,
        written: 0,
        limit,
        over: over.clone(),
    };
    let encoder = zstd::Encoder::new(sink, 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut entries = 0;
    let mut unpacked_bytes = 0;
    let mut in_workdir = 0;
    for rel in files {
        let path = root.join(&rel);
        // Tracked files deleted in the working tree, and submodule folders, are skipped.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !(meta.is_file() || meta.file_type().is_symlink()) {
            continue;
        }
        builder
            .append_path_with_name(&path, &rel)
            .map_err(too_large)?;
        entries += 1;
        unpacked_bytes += meta.len();
        if rel.starts_with(workdir) {
            in_workdir += 1;
        }
    }
    let packed = builder
        .into_inner()
        .and_then(|encoder| encoder.finish())
        .map_err(too_large)?
        .out
        .finish()?;
    Ok(Packed {
        packed,
        entries,
        unpacked_bytes,
        in_workdir,
    })
}

fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    git_rev_parse(dir, &["--show-toplevel"])?
        .canonicalize()
        .ok()
}

/// The path `git rev-parse ARGS` prints in `dir`; `None` outside a repository.
pub fn git_rev_parse(dir: &Path, args: &[&str]) -> Option<PathBuf> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .arg("rev-parse")
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(path.trim_end_matches('\n')))
}

fn git_files(root: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .map_err(|e| SourceError::Git {
            path: root.to_path_buf(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SourceError::Git {
            path: root.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let mut files: Vec<PathBuf> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(String::from_utf8_lossy(s).into_owned()))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let read = std::fs::read_dir(dir.join(&rel)).map_err(|source| SourceError::Unreadable {
            path: dir.join(&rel),
            source,
        })?;
        for entry in read {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                if entry.file_name() != ".git" {
                    stack.push(child);
                }
            } else {
                files.push(child);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Unpacks a compressed tar stream into `dest`, dropping the first
/// `strip_components` path components (of entry names and hard-link targets
/// alike).
///
/// The workspace is closed: nothing outside `dest` is ever created, changed or
/// linked to. Entry names must be relative and free of `..`; no entry may go
/// through a symbolic link (the archive's own included) or replace a folder;
/// hard links must name an entry already unpacked inside `dest`, never a
/// symbolic link; devices and FIFOs are refused; set-id and sticky bits are
/// dropped. An archive that breaks any of these is refused with
/// [`SourceError::Escapes`] at its first such entry. Symbolic links themselves
/// may point anywhere: unpacking never follows them.
pub fn unpack(
    archive: impl Read,
    format: ArchiveFormat,
    dest: &Path,
    strip_components: u8,
) -> Result<usize, SourceError> {
    let dest = dest.canonicalize()?;
    let decoder: Box<dyn Read> = match format {
        ArchiveFormat::TarZst => Box::new(zstd::Decoder::new(archive)?),
        ArchiveFormat::TarGz => Box::new(flate2::read::GzDecoder::new(archive)),
    };
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    tar.set_mask(0o7000);
    let mut count = 0;
    for entry in tar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        // GitHub's tarballs start with a pax global header that carries the commit.
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let name = entry.path()?.into_owned();
        let Some(rel) = contained(&name, strip_components)? else {
            continue;
        };
        if matches!(
            kind,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
        ) {
            return Err(SourceError::escapes(&name, "is a device or a FIFO"));
        }
        let full = dest.join(&rel);
        make_parents(&dest, &rel, &name)?;
        let existing = std::fs::symlink_metadata(&full).ok();
        if kind.is_dir() {
            if existing.is_some_and(|m| !m.is_dir()) {
                return Err(SourceError::escapes(
                    &name,
                    "is a folder where a file or symbolic link already is",
                ));
            }
        } else if let Some(meta) = existing {
            if meta.is_dir() {
                return Err(SourceError::escapes(&name, "would replace a folder"));
            }
            // Replaced, never written through (it may be a symbolic link).
            std::fs::remove_file(&full)?;
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name()?
                .ok_or_else(|| SourceError::escapes(&name, "is a hard link without a target"))?
                .into_owned();
            let Some(target_rel) = contained(&target, strip_components)? else {
                return Err(SourceError::escapes(
                    &name,
                    "is a hard link to the workspace itself",
                ));
            };
            if through_symlink(&dest, &target_rel) {
                return Err(SourceError::escapes(
                    &name,
                    "is a hard link through a symbolic link",
                ));
            }
            let target_full = dest.join(&target_rel);
            match std::fs::symlink_metadata(&target_full) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(SourceError::escapes(
                        &name,
                        "is a hard link to something other than a regular file",
                    ))
                }
                Err(_) => {
                    return Err(SourceError::escapes(
                        &name,
                        "is a hard link to no entry unpacked before it",
                    ))
                }
            }
            std::fs::hard_link(&target_full, &full)?;
        } else {
            entry.unpack(&full)?;
        }
        count += 1;
    }
    Ok(count)
}

/// `name` less its first `strip` components, as plain names only; `None` when
/// nothing is left. An absolute name or one with `..` is refused.
fn contained(name: &Path, strip: u8) -> Result<Option<PathBuf>, SourceError> {
    let mut rel = PathBuf::new();
    for component in name.components().skip(strip as usize) {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(SourceError::escapes(name, "climbs out with `..`"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(SourceError::escapes(name, "is an absolute path"));
            }
        }
    }
    // A stripped component may itself be absolute or `..`.
    if name
        .components()
        .take(strip as usize)
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(SourceError::escapes(name, "climbs out of the workspace"));
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Creates the folders above `rel` one at a time, refusing to go through
/// anything that is not a real folder (a symbolic link above all).
fn make_parents(dest: &Path, rel: &Path, name: &Path) -> Result<(), SourceError> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut dir = dest.to_path_buf();
    for part in parent.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(SourceError::escapes(name, "goes through a symbolic link"));
            }
            Ok(_) => {
                return Err(SourceError::escapes(name, "goes through a file"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&dir)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether any folder above `rel` (inside `dest`) is not a real folder.
fn through_symlink(dest: &Path, rel: &Path) -> bool {
    let mut dir = dest.to_path_buf();
    rel.parent()
        .into_iter()
        .flat_map(Path::components)
        .any(|part| {
            dir.push(part);
            !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SourceArchive {
        fn reader(&self) -> std::fs::File {
            std::fs::File::open(self.packed.as_ref().unwrap().path()).unwrap()
        }
    }

    #[test]
    fn pack_and_unpack_keep_files_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/file.txt"), "content").unwrap();
        std::fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("a/b/file.txt", src.path().join("link")).unwrap();

        let archive = pack(src.path()).unwrap();
        assert_eq!(archive.entries, 3);
        let dest = tempfile::tempdir().unwrap();
        let n = unpack(archive.reader(), ArchiveFormat::TarZst, dest.path(), 0).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("link")).unwrap(),
            "content"
        );
        let mode = std::fs::metadata(dest.path().join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn git_tree_ships_untracked_but_not_ignored_files() {
        let repo = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            assert!(Command::new("git")
                .arg("-C")
                .arg(repo.path())
                .args(args)
                .output()
                .unwrap()
                .status
                .success());
        };
        git(&["init", "-q"]);
        std::fs::write(repo.path().join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(repo.path().join("tracked.txt"), "v1").unwrap();
        git(&["add", "."]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ]);
        std::fs::write(repo.path().join("tracked.txt"), "v2 uncommitted").unwrap();
        std::fs::write(repo.path().join("new.txt"), "untracked").unwrap();
        std::fs::write(repo.path().join("ignored.txt"), "secret").unwrap();
        std::fs::create_dir(repo.path().join("sub")).unwrap();
        std::fs::write(repo.path().join("sub/x"), "x").unwrap();

        let archive = pack(&repo.path().join("sub")).unwrap();
        assert_eq!(archive.workdir, "sub");
        let dest = tempfile::tempdir().unwrap();
        unpack(archive.reader(), ArchiveFormat::TarZst, dest.path(), 0).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.path().join("tracked.txt")).unwrap(),
            "v2 uncommitted"
        );
        assert!(dest.path().join("new.txt").exists());
        assert!(dest.path().join("sub/x").exists());
        assert!(!dest.path().join("ignored.txt").exists());
        assert!(!dest.path().join(".git").exists());
    }

    #[test]
    fn packing_stops_at_the_budget() {
        let src = tempfile::tempdir().unwrap();
        // Incompressible bytes, three files of 1 MB.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for name in ["a", "b", "c"] {
            let mut noise = Vec::with_capacity(1 << 20);
            while noise.len() < 1 << 20 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                noise.extend_from_slice(&state.to_le_bytes());
            }
            std::fs::write(src.path().join(name), noise).unwrap();
        }
        match pack_within(src.path(), 1 << 20, &[]) {
            Err(SourceError::TooLarge { limit }) => assert_eq!(limit, 1 << 20),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let whole = pack_within(src.path(), 4 << 20, &[]).unwrap();
        assert_eq!(whole.entries, 3);
    }

    #[test]
    fn a_workdir_with_nothing_shipped_is_refused() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("top"), "x").unwrap();
        std::fs::create_dir(src.path().join("empty")).unwrap();
        // Outside git, the walked folder is the root: its own files count.
        assert!(pack(&src.path().join("empty")).is_ok_and(|a| a.workdir.is_empty()));
        let repo = tempfile::tempdir().unwrap();
        assert!(Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(["init", "-q"])
            .status()
            .unwrap()
            .success());
        std::fs::write(repo.path().join("top"), "x").unwrap();
        std::fs::create_dir(repo.path().join("empty")).unwrap();
        match pack(&repo.path().join("empty")) {
            Err(SourceError::WorkdirNotShipped { workdir, .. }) => assert_eq!(workdir, "empty"),
            other => panic!("expected WorkdirNotShipped, got {other:?}"),
        }
        std::fs::write(repo.path().join("empty/new"), "untracked").unwrap();
        assert_eq!(pack(&repo.path().join("empty")).unwrap().workdir, "empty");
    }

    #[test]
    fn strip_components_drops_the_top_folder() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("owner-repo-abc1234")).unwrap();
        std::fs::write(src.path().join("owner-repo-abc1234/f"), "x").unwrap();
        let archive = pack(src.path()).unwrap();
        let dest = tempfile::tempdir().unwrap();
        unpack(archive.reader(), ArchiveFormat::TarZst, dest.path(), 1).unwrap();
        assert!(dest.path().join("f").exists());
    }

    /// One entry of a hand-made archive; names are written raw, as an
    /// attacker would, past the checks of the tar crate's path setters.
    enum Raw<'a> {
        File(&'a str),
        Dir(&'a str, u32),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
    }

    fn hostile(entries: &[Raw]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_old();
            let (name, kind, link, mode) = match entry {
                Raw::File(name) => (*name, tar::EntryType::Regular, "", 0o644),
                Raw::Dir(name, mode) => (*name, tar::EntryType::Directory, "", *mode),
                Raw::Symlink(name, to) => (*name, tar::EntryType::Symlink, *to, 0o777),
                Raw::HardLink(name, to) => (*name, tar::EntryType::Link, *to, 0o644),
            };
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(kind);
            header.set_mode(mode);
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"planted"
            } else {
                b""
            };
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
    }

    /// A workspace and an outside folder next to it, holding `secret`.
    struct Scene {
        _root: tempfile::TempDir,
        ws: PathBuf,
        outside: PathBuf,
    }

    fn scene() -> Scene {
        let root = tempfile::tempdir().unwrap();
        let ws = root.path().join("ws");
        let outside = root.path().join("outside");
        std::fs::create_dir(&ws).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "outside").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        Scene {
            _root: root,
            ws,
            outside,
        }
    }

    impl Scene {
        /// Unpacks `entries`, expects a refusal, and checks the outside
        /// folder still holds exactly `secret`, unchanged.
        fn refuses(&self, entries: &[Raw]) -> String {
            let archive = hostile(entries);
            let err = unpack(&archive[..], ArchiveFormat::TarZst, &self.ws, 0)
                .expect_err("a hostile archive is refused");
            assert!(matches!(err, SourceError::Escapes { .. }), "{err:?}");
            let left: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["secret"], "something was created outside");
            let secret = std::fs::symlink_metadata(self.outside.join("secret")).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(secret.nlink(), 1, "the outside file was hard-linked");
            assert_eq!(
                std::fs::read_to_string(self.outside.join("secret")).unwrap(),
                "outside"
            );
            assert_eq!(secret.mode() & 0o7777, 0o644);
            assert_eq!(
                std::fs::metadata(&self.outside).unwrap().mode() & 0o7777,
                0o700,
                "the outside folder's mode changed"
            );
            err.to_string()
        }

        fn outside(&self, rest: &str) -> String {
            format!("{}{rest}", self.outside.display())
        }
    }

    #[test]
    fn unpack_refuses_parent_components() {
        let s = scene();
        let reason = s.refuses(&[Raw::File("../outside/planted")]);
        assert!(reason.contains("`..`"), "{reason}");
        s.refuses(&[Raw::File("a/../../outside/planted")]);
    }

    #[test]
    fn unpack_refuses_absolute_paths() {
        let s = scene();
        let name = s.outside("/planted");
        let reason = s.refuses(&[Raw::File(&name)]);
        assert!(reason.contains("absolute"), "{reason}");
    }

    #[test]
    fn unpack_refuses_a_file_through_its_own_symlink() {
        let s = scene();
        let to = s.outside("");
        let reason = s.refuses(&[Raw::Symlink("lnk", &to), Raw::File("lnk/planted")]);
        assert!(reason.contains("symbolic link"), "{reason}");
        // A relative link climbing out is the same.
        let s = scene();
        s.refuses(&[Raw::Symlink("up", "../outside"), Raw::File("up/planted")]);
    }

    #[test]
    fn unpack_creates_no_folder_through_a_symlink() {
        let s = scene();
        let to = s.outside("");
        s.refuses(&[
            Raw::Symlink("lnk", &to),
            Raw::File("lnk/newdir/sub/planted"),
        ]);
        let s = scene();
        s.refuses(&[Raw::Symlink("lnk", &to), Raw::Dir("lnk/newdir", 0o755)]);
    }

    #[test]
    fn unpack_changes_no_mode_through_a_symlink() {
        for name in ["lnk", "lnk/", "lnk/."] {
            let s = scene();
            let to = s.outside("");
            s.refuses(&[Raw::Symlink("lnk", &to), Raw::Dir(name, 0o777)]);
        }
    }

    #[test]
    fn unpack_refuses_hard_links_outside() {
        let s = scene();
        let abs = s.outside("/secret");
        s.refuses(&[Raw::HardLink("h", &abs)]);
        let s = scene();
        s.refuses(&[Raw::HardLink("h", "../outside/secret")]);
    }

    #[test]
    fn unpack_refuses_hard_links_through_or_to_a_symlink() {
        let s = scene();
        let to = s.outside("");
        let reason = s.refuses(&[Raw::Symlink("lnk", &to), Raw::HardLink("h", "lnk/secret")]);
        assert!(reason.contains("symbolic link"), "{reason}");
        let s = scene();
        let to = s.outside("/secret");
        s.refuses(&[Raw::Symlink("lnk", &to), Raw::HardLink("h", "lnk")]);
    }

    #[test]
    fn unpack_keeps_links_that_stay_inside() {
        let s = scene();
        let to = s.outside("/secret");
        let archive = hostile(&[
            Raw::File("dir/a"),
            Raw::HardLink("dir/b", "dir/a"),
            // A link may point anywhere; unpacking never follows it.
            Raw::Symlink("abs", &to),
            // A later file replaces the link instead of writing through it.
            Raw::File("abs"),
        ]);
        assert_eq!(
            unpack(&archive[..], ArchiveFormat::TarZst, &s.ws, 0).unwrap(),
            4
        );
        assert_eq!(
            std::fs::read_to_string(s.ws.join("dir/b")).unwrap(),
            "planted"
        );
        assert_eq!(
            std::fs::read_to_string(s.ws.join("abs")).unwrap(),
            "planted"
        );
        assert_eq!(
            std::fs::read_to_string(s.outside.join("secret")).unwrap(),
            "outside"
        );
    }
}
