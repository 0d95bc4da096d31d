//! `scripts/install.sh`, the GitHub Action's installer, against fake release
//! assets served on loopback: checksum verification, the source-build
//! fallback on a missing release (HTTP 404) and nothing else, and how the
//! version is chosen.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Router;
use bytes::Bytes;
use tokio::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh");
const VERSION: &str = "v9.9.9";
const FAKE_VERSION_LINE: &str = "mvm-shard 9.9.9-fake";

/// The release target the script picks on this machine.
fn target() -> &'static str {
    match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => "x86_64-unknown-linux-gnu",
        ("linux", "aarch64") => "aarch64-unknown-linux-gnu",
        ("macos", "x86_64") => "x86_64-apple-darwin",
        ("macos", "aarch64") => "aarch64-apple-darwin",
        other => panic!("no release target for {other:?}"),
    }
}

fn archive_name() -> String {
    format!("mvm-shard-{}.tar.gz", target())
}

// ---- the fake release server ------------------------------------------------

#[derive(Clone, Default)]
struct Assets {
    files: Arc<Mutex<HashMap<String, (StatusCode, Bytes)>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Assets {
    fn put(&self, path: &str, status: StatusCode, body: impl Into<Bytes>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), (status, body.into()));
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_asset(State(assets): State<Assets>, uri: Uri) -> (StatusCode, Bytes) {
    let path = uri.path().to_string();
    assets.requests.lock().unwrap().push(path.clone());
    let found = assets.files.lock().unwrap().get(&path).cloned();
    found.unwrap_or((StatusCode::NOT_FOUND, Bytes::from_static(b"Not Found")))
}

/// Serves `assets` on 127.0.0.1; returns the release base URL.
async fn start_server(assets: Assets) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(serve_asset).with_state(assets);
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}/releases/download")
}

fn asset_path(version: &str, file: &str) -> String {
    format!("/releases/download/{version}/{file}")
}

// ---- fixtures ---------------------------------------------------------------

fn write_executable(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn sha256_hex(path: &Path) -> String {
    let out = StdCommand::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.split_whitespace().next().unwrap().to_string();
    assert_eq!(hex.len(), 64, "{text}");
    hex
}

/// A release archive holding a tiny `mvm-shard` script; its bytes and SHA-256.
fn release_archive(dir: &Path) -> (Bytes, String) {
    let pkg = dir.join("pkg");
    write_executable(
        &pkg.join("mvm-shard"),
        &format!("#!/bin/sh\necho '{FAKE_VERSION_LINE}'\n"),
    );
    let archive = dir.join(archive_name());
    let status = StdCommand::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(&pkg)
        .arg("mvm-shard")
        .status()
        .expect("tar runs");
    assert!(status.success());
    let hash = sha256_hex(&archive);
    (Bytes::from(std::fs::read(&archive).unwrap()), hash)
}

struct Fixture {
    dir: tempfile::TempDir,
    base: String,
    assets: Assets,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("runner-temp")).unwrap();
        // The action's own checkout, as the runner lays it out.
        let action = dir.path().join("_actions/org/mvm-shard/main");
        std::fs::create_dir_all(&action).unwrap();
        std::fs::write(
            action.join("Cargo.toml"),
            "[package]\nname = \"mvm-shard\"\nversion = \"9.9.9\"\n\n[dependencies]\nfoo = { version = \"1.0.0\" }\n",
        )
        .unwrap();
        let assets = Assets::default();
        let base = start_server(assets.clone()).await;
        Fixture { dir, base, assets }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn action_path(&self) -> PathBuf {
        self.path("_actions/org/mvm-shard/main")
    }

    fn installed(&self) -> PathBuf {
        self.path("bin/mvm-shard")
    }

    fn cargo_marker(&self) -> PathBuf {
        self.path("cargo-was-run")
    }

    /// Publishes a good release: the archive and a SHA256SUMS listing it.
    fn publish_good_release(&self, version: &str) -> String {
        let (archive, hash) = release_archive(self.dir.path());
        self.assets.put(
            &asset_path(version, &archive_name()),
            StatusCode::OK,
            archive,
        );
        let sums = format!(
            "{}  mvm-shard-some-other-target.tar.gz\n{hash}  {}\n",
            "0".repeat(64),
            archive_name()
        );
        self.assets
            .put(&asset_path(version, "SHA256SUMS"), StatusCode::OK, sums);
        hash
    }

    /// A stand-in for cargo that records its arguments and "builds" a binary
    /// into the `--target-dir` it is given.
    fn fake_cargo(&self) -> PathBuf {
        let cargo = self.path("fake-cargo/cargo");
        let script = format!(
            r#"#!/bin/sh
printf '%s\n' "$*" > '{marker}'
while [ $# -gt 0 ]; do
  if [ "$1" = --target-dir ]; then target_dir=$2; fi
  shift
done
mkdir -p "$target_dir/release"
printf '#!/bin/sh\necho mvm-shard built-from-source\n' > "$target_dir/release/mvm-shard"
chmod 755 "$target_dir/release/mvm-shard"
"#,
            marker = self.cargo_marker().display()
        );
        write_executable(&cargo, &script);
        cargo
    }

    /// Runs the install script with a hermetic environment plus `extra`.
    /// Cargo defaults to a path that does not exist, so no test can start a
    /// real build by accident.
    async fn install(&self, extra: &[(&str, String)]) -> Outcome {
        let mut cmd = Command::new("bash");
        cmd.arg(SCRIPT)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.dir.path())
            .env("RUNNER_TEMP", self.path("runner-temp"))
            .env("MVM_SHARD_INSTALL_DIR", self.path("bin"))
            .env("GITHUB_PATH", self.path("github_path"))
            .env("GITHUB_OUTPUT", self.path("github_output"))
            .env("MVM_SHARD_RELEASE_BASE_URL", &self.base)
            .env("MVM_SHARD_CARGO", self.path("no-cargo-here/cargo"))
            .kill_on_drop(true);
        for (name, value) in extra {
            cmd.env(name, value);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("install.sh finishes within 2 minutes")
            .expect("bash runs");
        Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn assert_nothing_installed(&self, outcome: &Outcome) {
        assert!(
            !self.installed().exists(),
            "a binary was installed:\n{}",
            outcome.stderr
        );
        let github_path = std::fs::read_to_string(self.path("github_path")).unwrap_or_default();
        assert!(
            github_path.is_empty(),
            "GITHUB_PATH was written: {github_path}"
        );
        // No download or build leftovers in the runner's temp folder.
        let leftovers: Vec<_> = std::fs::read_dir(self.path("runner-temp"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
    }
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn run_installed(path: &Path) -> String {
    let out = StdCommand::new(path)
        .arg("--version")
        .output()
        .expect("the installed binary runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

// ---- tests ------------------------------------------------------------------

#[tokio::test]
async fn good_checksum_installs_a_binary_that_runs() {
    let fx = Fixture::new().await;
    let hash = fx.publish_good_release(VERSION);

    // "9.9.9" without the v is taken as the tag v9.9.9.
    let outcome = fx.install(&[("MVM_SHARD_VERSION", "9.9.9".into())]).await;
    assert!(outcome.success, "{}", outcome.stderr);

    assert_eq!(run_installed(&fx.installed()).trim(), FAKE_VERSION_LINE);
    let mode = std::fs::metadata(fx.installed())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(outcome.stderr.contains(&hash), "{}", outcome.stderr);

    let github_path = std::fs::read_to_string(fx.path("github_path")).unwrap();
    assert_eq!(github_path, format!("{}\n", fx.path("bin").display()));
    let output = std::fs::read_to_string(fx.path("github_output")).unwrap();
    assert!(
        output.contains(&format!("path={}\n", fx.installed().display())),
        "{output}"
    );
    assert!(output.contains("version=v9.9.9\n"), "{output}");

    assert_eq!(
        fx.assets.requests(),
        vec![
            asset_path(VERSION, &archive_name()),
            asset_path(VERSION, "SHA256SUMS")
        ]
    );
    assert!(
        !fx.cargo_marker().exists(),
        "cargo ran although the release exists"
    );
    let leftovers: Vec<_> = std::fs::read_dir(fx.path("runner-temp")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "the download folder was not removed: {leftovers:?}"
    );
}

#[tokio::test]
async fn wrong_checksum_fails_and_installs_nothing() {
    let fx = Fixture::new().await;
    let actual = fx.publish_good_release(VERSION);
    let expected = "ab".repeat(32);
    fx.assets.put(
        &asset_path(VERSION, "SHA256SUMS"),
        StatusCode::OK,
        format!("{expected}  {}\n", archive_name()),
    );
    let cargo = fx.fake_cargo();

    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            ("MVM_SHARD_CARGO", cargo.display().to_string()),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("checksum"), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&expected),
        "names the expected hash: {}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(&actual),
        "names the actual hash: {}",
        outcome.stderr
    );
    fx.assert_nothing_installed(&outcome);
    assert!(
        !fx.cargo_marker().exists(),
        "a bad checksum must not fall back to a build"
    );
}

#[tokio::test]
async fn archive_missing_from_sha256sums_fails() {
    let fx = Fixture::new().await;
    fx.publish_good_release(VERSION);
    fx.assets.put(
        &asset_path(VERSION, "SHA256SUMS"),
        StatusCode::OK,
        format!("{}  mvm-shard-some-other-target.tar.gz\n", "0".repeat(64)),
    );

    let outcome = fx.install(&[("MVM_SHARD_VERSION", VERSION.into())]).await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("checksum"), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("not listed in SHA256SUMS"),
        "{}",
        outcome.stderr
    );
    fx.assert_nothing_installed(&outcome);
}

#[tokio::test]
async fn missing_sha256sums_fails() {
    let fx = Fixture::new().await;
    let (archive, _) = release_archive(fx.dir.path());
    fx.assets.put(
        &asset_path(VERSION, &archive_name()),
        StatusCode::OK,
        archive,
    );

    let outcome = fx.install(&[("MVM_SHARD_VERSION", VERSION.into())]).await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("SHA256SUMS"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("HTTP 404"), "{}", outcome.stderr);
    fx.assert_nothing_installed(&outcome);
}

#[tokio::test]
async fn a_binary_that_does_not_run_here_is_not_left_installed() {
    let fx = Fixture::new().await;
    let pkg = fx.path("broken");
    write_executable(
        &pkg.join("mvm-shard"),
        "#!/bin/sh\necho 'GLIBC_2.99 not found' >&2\nexit 1\n",
    );
    let archive = fx.path(&archive_name());
    let status = StdCommand::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(&pkg)
        .arg("mvm-shard")
        .status()
        .unwrap();
    assert!(status.success());
    let hash = sha256_hex(&archive);
    fx.assets.put(
        &asset_path(VERSION, &archive_name()),
        StatusCode::OK,
        std::fs::read(&archive).unwrap(),
    );
    fx.assets.put(
        &asset_path(VERSION, "SHA256SUMS"),
        StatusCode::OK,
        format!("{hash}  {}\n", archive_name()),
    );

    let outcome = fx.install(&[("MVM_SHARD_VERSION", VERSION.into())]).await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("does not run on this machine"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("GLIBC_2.99 not found"),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("'source'"), "{}", outcome.stderr);
    fx.assert_nothing_installed(&outcome);
}

#[tokio::test]
async fn missing_release_without_cargo_fails_clearly() {
    let fx = Fixture::new().await;

    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("HTTP 404"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("cargo"), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("not installed"),
        "{}",
        outcome.stderr
    );
    fx.assert_nothing_installed(&outcome);
    assert_eq!(
        fx.assets.requests(),
        vec![asset_path(VERSION, &archive_name())]
    );
}

#[tokio::test]
async fn missing_release_builds_the_action_source_with_cargo() {
    let fx = Fixture::new().await;
    let cargo = fx.fake_cargo();

    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
            ("MVM_SHARD_CARGO", cargo.display().to_string()),
            ("GITHUB_ACTIONS", "true".into()),
        ])
        .await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("building mvm-shard from the action's source"),
        "{}",
        outcome.stderr
    );

    let args = std::fs::read_to_string(fx.cargo_marker()).expect("cargo was run");
    let manifest = fx.action_path().join("Cargo.toml");
    assert!(
        args.starts_with(&format!(
            "build --release --locked --manifest-path {} ",
            manifest.display()
        )),
        "{args}"
    );
    assert_eq!(
        run_installed(&fx.installed()).trim(),
        "mvm-shard built-from-source"
    );
}

#[tokio::test]
async fn other_download_errors_do_not_fall_back_to_a_build() {
    let fx = Fixture::new().await;
    fx.assets.put(
        &asset_path(VERSION, &archive_name()),
        StatusCode::FORBIDDEN,
        "rate limited",
    );
    let cargo = fx.fake_cargo();

    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
            ("MVM_SHARD_CARGO", cargo.display().to_string()),
            ("GITHUB_ACTIONS", "true".into()),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("HTTP 403"), "{}", outcome.stderr);
    // In Actions the error is also an annotation, a workflow command on stdout.
    assert!(
        outcome
            .stdout
            .starts_with("::error title=mvm-shard install::downloading "),
        "{}",
        outcome.stdout
    );
    assert!(
        !fx.cargo_marker().exists(),
        "a 403 must not fall back to a build"
    );
    fx.assert_nothing_installed(&outcome);
}

#[tokio::test]
async fn plain_http_is_refused_except_on_loopback() {
    let fx = Fixture::new().await;

    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            (
                "MVM_SHARD_RELEASE_BASE_URL",
                "http://example.invalid/releases/download".into(),
            ),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("https://"), "{}", outcome.stderr);
    fx.assert_nothing_installed(&outcome);

    // Nor does a look-alike host that merely starts with the loopback address.
    let outcome = fx
        .install(&[
            ("MVM_SHARD_VERSION", VERSION.into()),
            (
                "MVM_SHARD_RELEASE_BASE_URL",
                "http://127.0.0.1.example.invalid/dl".into(),
            ),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("must be https://"),
        "{}",
        outcome.stderr
    );
    assert!(fx.assets.requests().is_empty());
}

#[tokio::test]
async fn the_version_comes_from_the_action_ref_or_the_action_cargo_toml() {
    let fx = Fixture::new().await;
    fx.publish_good_release(VERSION);
    fx.publish_good_release("v2.0.0");

    // A full release tag as the action's ref is taken as it is.
    let outcome = fx
        .install(&[
            ("ACTION_REF", "v2.0.0".into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
        ])
        .await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert_eq!(
        fx.assets.requests()[0],
        asset_path("v2.0.0", &archive_name())
    );

    // A major tag (or a SHA, or a branch) is not a release: the version in the
    // action's own Cargo.toml (9.9.9) is, not the dependency's 1.0.0.
    fx.assets.requests.lock().unwrap().clear();
    let outcome = fx
        .install(&[
            ("ACTION_REF", "v9".into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
        ])
        .await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert_eq!(
        fx.assets.requests()[0],
        asset_path(VERSION, &archive_name())
    );

    // Composite actions may see no github.action_ref: the ref is read from
    // the action's path, .../_actions/OWNER/REPO/REF.
    fx.assets.requests.lock().unwrap().clear();
    let tagged = fx.path("_actions/org/mvm-shard/v2.0.0");
    std::fs::create_dir_all(&tagged).unwrap();
    let outcome = fx
        .install(&[("ACTION_PATH", tagged.display().to_string())])
        .await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert_eq!(
        fx.assets.requests()[0],
        asset_path("v2.0.0", &archive_name())
    );

    // With no version, no release ref and no Cargo.toml, it says what to set.
    let bare = fx.path("elsewhere");
    std::fs::create_dir_all(&bare).unwrap();
    let outcome = fx
        .install(&[
            ("ACTION_REF", "main".into()),
            ("ACTION_PATH", bare.display().to_string()),
        ])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("'version' input"),
        "{}",
        outcome.stderr
    );
}

#[tokio::test]
async fn a_prebuilt_binary_is_installed_without_any_download() {
    let fx = Fixture::new().await;
    let cargo = fx.fake_cargo();
    let prebuilt = fx.path("prebuilt/mvm-shard");
    write_executable(&prebuilt, "#!/bin/sh\necho 'mvm-shard 7.7.7'\n");

    // MVM_SHARD_PREBUILT wins over a version, even one with no release.
    let outcome = fx
        .install(&[
            ("MVM_SHARD_PREBUILT", prebuilt.display().to_string()),
            ("MVM_SHARD_VERSION", "v2.0.0".into()),
            ("ACTION_PATH", fx.action_path().display().to_string()),
            ("MVM_SHARD_CARGO", cargo.display().to_string()),
        ])
        .await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("MVM_SHARD_PREBUILT"),
        "{}",
        outcome.stderr
    );
    assert_eq!(run_installed(&fx.installed()).trim(), "mvm-shard 7.7.7");
    let github_path = std::fs::read_to_string(fx.path("github_path")).unwrap();
    assert_eq!(github_path, format!("{}\n", fx.path("bin").display()));
    let output = std::fs::read_to_string(fx.path("github_output")).unwrap();
    assert_eq!(
        output,
        format!("path={}\nversion=v7.7.7\n", fx.installed().display())
    );
    assert!(
        fx.assets.requests().is_empty(),
        "{:?}",
        fx.assets.requests()
    );
    assert!(
        !fx.cargo_marker().exists(),
        "no build with a prebuilt binary"
    );
    // The prebuilt file itself is left as it was.
    assert!(prebuilt.exists());

    // A path that is not an executable file is an error, not a fallback.
    for (bad, complaint) in [
        (fx.path("prebuilt/missing"), "not a file"),
        (fx.path("prebuilt"), "not a file"),
    ] {
        let fx = Fixture::new().await;
        let outcome = fx
            .install(&[("MVM_SHARD_PREBUILT", bad.display().to_string())])
            .await;
        assert!(!outcome.success, "{}", outcome.stderr);
        assert!(outcome.stderr.contains(complaint), "{}", outcome.stderr);
        assert!(fx.assets.requests().is_empty());
        fx.assert_nothing_installed(&outcome);
    }
    let not_executable = fx.path("prebuilt/not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\necho 'mvm-shard 7.7.7'\n").unwrap();
    let fx2 = Fixture::new().await;
    let outcome = fx2
        .install(&[("MVM_SHARD_PREBUILT", not_executable.display().to_string())])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("not executable"),
        "{}",
        outcome.stderr
    );
    fx2.assert_nothing_installed(&outcome);

    // One that does not run is not left installed.
    let broken = fx.path("prebuilt/broken");
    write_executable(
        &broken,
        "#!/bin/sh\necho 'GLIBC_2.99 not found' >&2\nexit 1\n",
    );
    let fx3 = Fixture::new().await;
    let outcome = fx3
        .install(&[("MVM_SHARD_PREBUILT", broken.display().to_string())])
        .await;
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("prebuilt mvm-shard") && outcome.stderr.contains("does not run"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("GLIBC_2.99 not found"),
        "{}",
        outcome.stderr
    );
    fx3.assert_nothing_installed(&outcome);
}
