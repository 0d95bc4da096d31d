//! Source archives: the invoker packs a working tree into tar.zst, the agent
//! unpacks it into a shard's fresh workspace.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::protocol::ArchiveFormat;

/// A packed source tree, ready to travel inside a request or over a link.
#[derive(Debug)]
pub struct SourceArchive {
    /// The tar.zst bytes.
    pub bytes: Vec<u8>,
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
            bytes: Vec::new(),
            entries: 0,
            unpacked_bytes: 0,
            root,
            workdir,
        }
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
}

/// Packs `dir` for shipping. Inside a git working tree this is the whole
/// repository's tracked files plus untracked files that are not ignored, as
/// they are on disk now (uncommitted changes included); elsewhere it is every
/// file under `dir`.
pub fn pack(dir: &Path) -> Result<SourceArchive, SourceError> {
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
    let workdir = dir
        .strip_prefix(&root)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();

    let (bytes, entries, unpacked_bytes) = archive(&root, files)?;
    Ok(SourceArchive {
        bytes,
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
    let (bytes, entries, unpacked_bytes) = archive(&root, files)?;
    Ok(SourceArchive {
        bytes,
        entries,
        unpacked_bytes,
        workdir: String::new(),
        root,
    })
}

/// tar.zst of `files` (relative to `root`), with how many entries and bytes went in.
fn archive(root: &Path, files: Vec<PathBuf>) -> Result<(Vec<u8>, usize, u64), SourceError> {
    let encoder = zstd::Encoder::new(Vec::new(), 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut entries = 0;
    let mut unpacked_bytes = 0;
    for rel in files {
        let path = root.join(&rel);
        // Tracked files deleted in the working tree, and submodule folders, are skipped.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !(meta.is_file() || meta.file_type().is_symlink()) {
            continue;
        }
        builder.append_path_with_name(&path, &rel)?;
        entries += 1;
        unpacked_bytes += meta.len();
    }
    Ok((builder.into_inner()?.finish()?, entries, unpacked_bytes))
}

fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-toplevel"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let top = String::from_utf8(out.stdout).ok()?;
    PathBuf::from(top.trim_end_matches('\n'))
        .canonicalize()
        .ok()
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
/// `strip_components` path components. Entries that would land outside
/// `dest` are refused.
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
    let mut count = 0;
    for entry in tar.entries()? {
        let mut entry = entry?;
        // GitHub's tarballs start with a pax global header that carries the commit.
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let path = entry.path()?.into_owned();
        let rel: PathBuf = path.components().skip(strip_components as usize).collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(escape(&rel));
        }
        let full = dest.join(&rel);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
            // A symlink unpacked earlier must not redirect later entries outside.
            if !parent.canonicalize()?.starts_with(&dest) {
                return Err(escape(&rel));
            }
        }
        entry.unpack(&full)?;
        count += 1;
    }
    Ok(count)
}

fn escape(rel: &Path) -> SourceError {
    SourceError::Archive(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "archive entry {} points outside the workspace",
            rel.display()
        ),
    ))
}

/// Serves one archive on a loopback port, so agents of a local run can fetch
/// sources larger than a request may carry.
pub struct ArchiveServer {
    /// The link agents download from.
    pub url: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ArchiveServer {
    /// Binds `127.0.0.1:0` and serves `archive` under an unguessable path.
    pub async fn start(archive: bytes::Bytes) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let path = format!("/source/{}.tar.zst", uuid::Uuid::new_v4().simple());
        let url = format!("http://{}{path}", listener.local_addr()?);
        let router = axum::Router::new().route(
            &path,
            axum::routing::get(move || {
                let archive = archive.clone();
                async move { archive }
            }),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { signal.cancelled().await })
                .await
        });
        Ok(ArchiveServer { url, stop, task })
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let n = unpack(&archive.bytes[..], ArchiveFormat::TarZst, dest.path(), 0).unwrap();
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
        unpack(&archive.bytes[..], ArchiveFormat::TarZst, dest.path(), 0).unwrap();
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
    fn strip_components_drops_the_top_folder() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("owner-repo-abc1234")).unwrap();
        std::fs::write(src.path().join("owner-repo-abc1234/f"), "x").unwrap();
        let archive = pack(src.path()).unwrap();
        let dest = tempfile::tempdir().unwrap();
        unpack(&archive.bytes[..], ArchiveFormat::TarZst, dest.path(), 1).unwrap();
        assert!(dest.path().join("f").exists());
    }
}
