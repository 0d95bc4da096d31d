//! Dependency caches (`--cache PATH=KEYFILES`): the key of each, and where a
//! run's shards fetch or save it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{hex, ArtifactError};

/// One `--cache PATH=KEYFILES`: a folder and the files whose content decides
/// whether a saved copy of it still fits (lockfiles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheArg {
    /// The folder, relative to the working directory, or `~/…` under HOME.
    pub path: String,
    /// Key files, relative to the current directory.
    pub keyfiles: Vec<PathBuf>,
}

impl CacheArg {
    /// Parses `PATH=FILE[,FILE…]`.
    pub fn parse(given: &str) -> Result<Self, ArtifactError> {
        let err = |problem: &str| ArtifactError::Cache {
            given: given.to_string(),
            problem: problem.to_string(),
        };
        let (path, files) = given
            .split_once('=')
            .ok_or_else(|| err("expected PATH=KEYFILES, e.g. node_modules=package-lock.json"))?;
        let rel = path
            .strip_prefix("~/")
            .unwrap_or(path)
            .trim_end_matches('/');
        if rel.is_empty()
            || Path::new(rel)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(err(
                "PATH must be a folder relative to the working directory, or ~/… under HOME",
            ));
        }
        let keyfiles: Vec<PathBuf> = files
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .collect();
        if keyfiles.is_empty() {
            return Err(err("name at least one key file (a lockfile) after ="));
        }
        let path = match path.strip_prefix("~/") {
            Some(_) => format!("~/{rel}"),
            None => rel.to_string(),
        };
        Ok(CacheArg { path, keyfiles })
    }

    /// The cache's key: a hash of its path, the key files' names and
    /// content (read relative to `cwd`) and `identity` (what runs the shards).
    pub fn key(&self, cwd: &Path, identity: &str) -> Result<String, ArtifactError> {
        let mut hasher = Sha256::new();
        for part in ["mvm-shard cache 1", identity, &self.path] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        for file in &self.keyfiles {
            let content = std::fs::read(cwd.join(file)).map_err(|e| ArtifactError::Cache {
                given: format!("{}={}", self.path, file.display()),
                problem: format!("cannot read the key file: {e}"),
            })?;
            hasher.update(file.to_string_lossy().as_bytes());
            hasher.update([0]);
            hasher.update((content.len() as u64).to_le_bytes());
            hasher.update(&content);
        }
        Ok(hex(&hasher.finalize()))
    }
}

/// Where local runs keep their caches: `mvm-shard/caches` in the git
/// directory of `cwd`'s repository (never shipped, never committed), shared
/// by its worktrees: a cache's key is its key files' content, whichever
/// worktree saved it.
pub fn local_dir(cwd: &Path) -> Option<PathBuf> {
    let dir = crate::source::git_rev_parse(cwd, &["--path-format=absolute", "--git-common-dir"])?;
    Some(dir.join("mvm-shard/caches"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_args_parse_and_bad_ones_say_why() {
        let arg = CacheArg::parse("node_modules=package-lock.json").unwrap();
        assert_eq!(arg.path, "node_modules");
        assert_eq!(arg.keyfiles, [PathBuf::from("package-lock.json")]);
        let arg = CacheArg::parse("~/.cargo/registry/=Cargo.lock, rust-toolchain.toml").unwrap();
        assert_eq!(arg.path, "~/.cargo/registry");
        assert_eq!(arg.keyfiles.len(), 2);
        for bad in ["node_modules", "=a", "../x=a", "/abs=a", "x=", "~/=a"] {
            let e = CacheArg::parse(bad).unwrap_err();
            assert!(e.is_config(), "{bad}");
            assert!(e.to_string().starts_with("--cache"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_key_follows_the_key_files_and_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lock"), "a").unwrap();
        let arg = CacheArg::parse(".venv=lock").unwrap();
        let first = arg.key(dir.path(), "fn").unwrap();
        assert_eq!(first, arg.key(dir.path(), "fn").unwrap());
        assert_ne!(first, arg.key(dir.path(), "other-image").unwrap());
        std::fs::write(dir.path().join("lock"), "b").unwrap();
        assert_ne!(first, arg.key(dir.path(), "fn").unwrap());
        let missing = CacheArg::parse(".venv=nope").unwrap();
        assert!(missing.key(dir.path(), "fn").unwrap_err().is_config());
    }
}
