//! What a shard of `run --local` inherits from this machine: where the
//! toolchains live, so that `cargo`, `node`, `python3` or `go` resolve as they
//! do here, and how this machine reaches the network (a proxy, a CA bundle);
//! nothing else: no cache, no state, no credential. The main type is
//! [`LocalEnvironment`].
//!
//! A deployed image puts its toolchains on `PATH` and sets their location
//! variables (`RUSTUP_HOME`, `GOROOT`...) in its own environment; locally the
//! host's toolchains play that part. Their caches and state (`CARGO_HOME`'s
//! registry, `~/.npm`, uv's cache, `GOPATH`'s module cache, an activated
//! virtualenv) stay on the host: a shard starts as empty as it would on
//! Lambda, with a fresh `HOME` and `TMPDIR` set by the agent.

use std::path::{Path, PathBuf};

/// A variable that says where a toolchain lives (or which one to use), and
/// its default under `HOME` when unset: the shard's `HOME` is fresh, so a
/// default that exists here is resolved and passed explicitly.
struct Location {
    name: &'static str,
    home_default: Option<&'static str>,
}

const fn var(name: &'static str) -> Location {
    Location {
        name,
        home_default: None,
    }
}

const fn under_home(name: &'static str, default: &'static str) -> Location {
    Location {
        name,
        home_default: Some(default),
    }
}

/// The toolchain variables that travel into local shards, besides `PATH`.
/// Everything else of this environment stays here (`--env NAME` forwards more).
const LOCATIONS: &[Location] = &[
    // rustup's proxies (`cargo`, `rustc` on PATH) find their toolchains here;
    // CARGO_HOME does not travel: its registry, git checkouts and credentials
    // are state, and its `bin` is on PATH already.
    under_home("RUSTUP_HOME", ".rustup"),
    var("RUSTUP_TOOLCHAIN"),
    // nvm: its folder, and the active Node's bin and headers.
    under_home("NVM_DIR", ".nvm"),
    var("NVM_BIN"),
    var("NVM_INC"),
    // pyenv's shims need the root to find the versions.
    under_home("PYENV_ROOT", ".pyenv"),
    var("PYENV_VERSION"),
    // Pythons that uv installed (its cache, UV_CACHE_DIR, does not travel).
    under_home("UV_PYTHON_INSTALL_DIR", ".local/share/uv/python"),
    under_home("VOLTA_HOME", ".volta"),
    under_home("ASDF_DATA_DIR", ".asdf"),
    // Go: the toolchain and its selection; GOPATH (module cache) does not travel.
    var("GOROOT"),
    var("GOTOOLCHAIN"),
    var("JAVA_HOME"),
    var("LD_LIBRARY_PATH"),
    // How this machine reaches the network (a proxy, a private CA): without
    // them a shard here could not fetch what a shard on Lambda fetches.
    var("HTTP_PROXY"),
    var("HTTPS_PROXY"),
    var("NO_PROXY"),
    var("http_proxy"),
    var("https_proxy"),
    var("no_proxy"),
    var("SSL_CERT_FILE"),
    var("SSL_CERT_DIR"),
    var("NODE_EXTRA_CA_CERTS"),
    var("REQUESTS_CA_BUNDLE"),
    var("CURL_CA_BUNDLE"),
    var("PIP_CERT"),
    var("GIT_SSL_CAINFO"),
    var("CARGO_HTTP_CAINFO"),
];

/// The variables a local shard's environment gets from this machine, and
/// what was held back from `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEnvironment {
    /// `PATH` and the toolchain location variables, in the order of [`names`].
    pub vars: Vec<(String, String)>,
    /// `PATH` entries not passed: inside the source (a shard has its own copy,
    /// without what git ignores) or the activated virtualenv (dependencies are
    /// state: a shard builds or restores its own).
    pub dropped_path: Vec<String>,
}

/// Names of the variables that may travel, for the README and the messages.
pub fn names() -> impl Iterator<Item = &'static str> {
    std::iter::once("PATH").chain(LOCATIONS.iter().map(|l| l.name))
}

impl LocalEnvironment {
    /// What travels from an environment read through `host` (`std::env::var`
    /// in production) for a source rooted at `source_root`.
    pub fn from_host(source_root: &Path, host: impl Fn(&str) -> Option<String>) -> Self {
        let home = host("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let mut vars = Vec::new();
        let mut dropped_path = Vec::new();
        if let Some(path) = host("PATH") {
            let virtualenv = host("VIRTUAL_ENV").map(PathBuf::from);
            let mut kept: Vec<&str> = Vec::new();
            for entry in path.split(':') {
                let p = Path::new(entry);
                let held_back = p.is_absolute()
                    && (within(p, source_root)
                        || virtualenv.as_deref().is_some_and(|venv| within(p, venv)));
                if held_back {
                    dropped_path.push(entry.to_string());
                } else if !kept.contains(&entry) {
                    kept.push(entry);
                }
            }
            vars.push(("PATH".to_string(), kept.join(":")));
        }
        for location in LOCATIONS {
            let value = host(location.name).or_else(|| {
                let default = home.as_ref()?.join(home_default(location, &host)?);
                default
                    .is_dir()
                    .then(|| default.to_string_lossy().into_owned())
            });
            if let Some(value) = value {
                vars.push((location.name.to_string(), value));
            }
        }
        LocalEnvironment { vars, dropped_path }
    }
}

/// The default of `location` relative to `HOME`; uv's follows `XDG_DATA_HOME`.
fn home_default(location: &Location, host: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if location.name == "UV_PYTHON_INSTALL_DIR" {
        if let Some(data) = host("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Some(Path::new(&data).join("uv/python"));
        }
    }
    location.home_default.map(PathBuf::from)
}

/// Whether `path` is `dir` or below it, comparing real paths where they exist.
fn within(path: &Path, dir: &Path) -> bool {
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    real(path).starts_with(real(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(source: &Path, vars: &[(&str, &str)]) -> LocalEnvironment {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LocalEnvironment::from_host(source, |name| map.get(name).cloned())
    }

    fn value<'a>(env: &'a LocalEnvironment, name: &str) -> Option<&'a str> {
        env.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn locations_travel_state_and_everything_else_does_not() {
        let repo = tempfile::tempdir().unwrap();
        let env = from(
            repo.path(),
            &[
                ("PATH", "/usr/bin:/bin"),
                ("RUSTUP_HOME", "/opt/rustup"),
                ("GOROOT", "/opt/go"),
                ("CARGO_HOME", "/home/me/.cargo"),
                ("GOPATH", "/home/me/go"),
                ("UV_CACHE_DIR", "/home/me/.cache/uv"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("CARGO_TARGET_DIR", "/work/target"),
            ],
        );
        assert_eq!(value(&env, "RUSTUP_HOME"), Some("/opt/rustup"));
        assert_eq!(value(&env, "GOROOT"), Some("/opt/go"));
        assert_eq!(value(&env, "PATH"), Some("/usr/bin:/bin"));
        for held in [
            "CARGO_HOME",
            "GOPATH",
            "UV_CACHE_DIR",
            "AWS_SECRET_ACCESS_KEY",
            "CARGO_TARGET_DIR",
        ] {
            assert_eq!(value(&env, held), None, "{held} must not travel");
        }
        assert!(env.vars.iter().all(|(k, _)| names().any(|n| n == k)));
    }

    #[test]
    fn defaults_under_home_are_resolved_because_the_shard_home_is_fresh() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".rustup")).unwrap();
        std::fs::create_dir_all(home.path().join(".local/share/uv/python")).unwrap();
        let repo = tempfile::tempdir().unwrap();
        let home_str = home.path().to_str().unwrap();
        let env = from(repo.path(), &[("HOME", home_str), ("PATH", "/bin")]);
        let rustup = home.path().join(".rustup");
        assert_eq!(value(&env, "RUSTUP_HOME"), rustup.to_str());
        let uv = home.path().join(".local/share/uv/python");
        assert_eq!(value(&env, "UV_PYTHON_INSTALL_DIR"), uv.to_str());
        // No such folder here: nothing to resolve.
        assert_eq!(value(&env, "PYENV_ROOT"), None);
        assert_eq!(value(&env, "HOME"), None);
    }

    #[test]
    fn path_entries_inside_the_source_or_the_virtualenv_are_held_back() {
        let repo = tempfile::tempdir().unwrap();
        let venv = tempfile::tempdir().unwrap();
        let in_repo = repo.path().join("node_modules/.bin");
        let venv_bin = venv.path().join("bin");
        let path = format!(
            "{}:/usr/local/bin:{}:/usr/bin:/usr/local/bin",
            venv_bin.display(),
            in_repo.display()
        );
        let env = from(
            repo.path(),
            &[
                ("PATH", &path),
                ("VIRTUAL_ENV", venv.path().to_str().unwrap()),
            ],
        );
        assert_eq!(value(&env, "PATH"), Some("/usr/local/bin:/usr/bin"));
        assert_eq!(
            env.dropped_path,
            vec![
                venv_bin.display().to_string(),
                in_repo.display().to_string()
            ]
        );
    }
}
