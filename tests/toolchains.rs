//! The README's usage examples and recipes, run as written through `--local`
//! on the toy projects in `tests/fixtures/`, and again as on AWS (`--local`
//! replaced by `--function mvm-shard`, as the README says) against
//! `mvm-shard emulate` with the artifact store on moto's S3 server: every
//! test runs exactly once across the shards, and a failing test fails the run.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The longest a recipe may take, its builds on the host included.
const RECIPE_LIMIT: Duration = Duration::from_secs(240);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(manifest_dir().join("README.md")).unwrap()
}

/// A recipe script of `examples/recipes/`, which the README includes verbatim.
fn recipe(name: &str) -> String {
    let script = std::fs::read_to_string(manifest_dir().join("examples/recipes").join(name))
        .unwrap_or_else(|e| panic!("recipe {name}: {e}"));
    let body = script
        .split_once("\n\n")
        .map_or(script.as_str(), |(_, body)| body);
    assert!(
        readme().contains(body.trim_end()),
        "the README must show examples/recipes/{name} as it is:\n{body}"
    );
    script
}

/// A copy of `tests/fixtures/NAME` as a fresh git repository (so that
/// `.gitignore` applies as in a real project).
fn project(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(
        &manifest_dir().join("tests/fixtures").join(name),
        dir.path(),
    );
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        // Whatever a developer built in the fixture is not part of it.
        if ["target", "node_modules", ".venv", "__pycache__"].contains(&name.to_str().unwrap_or(""))
        {
            continue;
        }
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// Outcome of a recipe or a command line.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `argv` in `dir` as a user would from a shell: `mvm-shard` on PATH,
/// none of the variables cargo sets for this test (CARGO_TARGET_DIR...), and
/// killed with its whole process group after [`RECIPE_LIMIT`].
async fn run_in(dir: &Path, argv: &[&str]) -> Ran {
    run_in_with(dir, argv, &[]).await
}

/// [`run_in`] with `env` set, and no AWS, GitHub or mvm-shard setting of
/// this process.
async fn run_in_with(dir: &Path, argv: &[&str], env: &[(&str, String)]) -> Ran {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_mvm-shard")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new(argv[0]);
    cmd.args(&argv[1..]).current_dir(dir).env("PATH", path);
    for (name, _) in std::env::vars() {
        let setting = ["AWS_", "GITHUB_", "MVM_SHARD_", "RUNNER_"]
            .iter()
            .any(|p| name.starts_with(p));
        if setting || (name.starts_with("CARGO") && name != "CARGO_HOME") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = common::output_within(cmd, RECIPE_LIMIT, &format!("{argv:?}")).await;
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs recipe `name` in `dir`: as written, or as on AWS (see [`Via`]).
async fn run_recipe(dir: &Path, name: &str, via: &Target) -> Ran {
    let mut text = recipe(name);
    if let Target::Emulator { .. } = via {
        let local = "mvm-shard run --local ";
        assert_eq!(text.matches(local).count(), 1, "{name}: {text}");
        text = text.replace(local, "mvm-shard run --function mvm-shard ");
    }
    let script = dir.join(".recipe.sh");
    std::fs::write(&script, text).unwrap();
    run_in_with(dir, &["bash", script.to_str().unwrap()], via.env()).await
}

/// Where a recipe test runs its recipe.
enum Via {
    /// As written: `--local`.
    Local,
    /// As a user with AWS would: `--function mvm-shard`, with
    /// `MVM_SHARD_ARTIFACTS` naming a bucket of its own on the file's moto
    /// and the SDK's endpoint settings pointing at `mvm-shard emulate` and moto.
    Emulator,
}

/// The emulated `mvm-shard` function's bootstrap: our agent, in an
/// environment that has this machine's toolchains and way to the network
/// (proxy, CA bundle), as the Lambda image has its own. The emulator gives a
/// function the host's PATH and nothing else of it.
fn agent_bootstrap() -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
    let mut line = "exec env".to_string();
    for name in mvm_shard::local_env::names().filter(|n| *n != "PATH") {
        if let Ok(value) = std::env::var(name) {
            line.push_str(&format!(" {name}={}", quote(&value)));
        }
    }
    format!("{line} {} agent", quote(common::binary()))
}

/// A started [`Via`]: what runs the shards, and the invoker's environment.
enum Target {
    Local,
    Emulator {
        _emulator: common::Emulate,
        env: Vec<(&'static str, String)>,
    },
}

impl Target {
    async fn start(via: Via, fixture: &str) -> Target {
        match via {
            Via::Local => Target::Local,
            Via::Emulator => {
                let moto = common::Moto::shared();
                let bucket = format!(
                    "recipe-{fixture}-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                );
                moto.bucket(&bucket).await;
                let emulator = common::Emulate::start_with(&[
                    "--function",
                    &format!("mvm-shard={}", agent_bootstrap()),
                    "--tenant-isolated",
                    "mvm-shard",
                ]);
                let mut env = moto.env();
                env.push(("AWS_ENDPOINT_URL_LAMBDA", emulator.endpoint.clone()));
                env.push(("MVM_SHARD_ARTIFACTS", format!("s3://{bucket}/ci")));
                Target::Emulator {
                    _emulator: emulator,
                    env,
                }
            }
        }
    }

    fn env(&self) -> &[(&'static str, String)] {
        match self {
            Target::Local => &[],
            Target::Emulator { env, .. } => env,
        }
    }
}

/// How often each test passed and failed, by name, from the shards' logs
/// (`[i/n] ...` lines): `parse` reads one line's words after the prefix and
/// returns (test, passed); a shard's lines after its `Summary` (nextest's
/// repeat of the failures) are not counted.
fn tally(
    stdout: &str,
    parse: impl Fn(&[&str]) -> Option<(String, bool)>,
) -> BTreeMap<String, (u32, u32)> {
    let mut seen = BTreeMap::new();
    let mut summarised = std::collections::HashSet::new();
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((shard, rest)) = words.split_first() else {
            continue;
        };
        if !shard.starts_with('[') || summarised.contains(shard) {
            continue;
        }
        if rest.first() == Some(&"Summary") {
            summarised.insert(*shard);
            continue;
        }
        if let Some((name, passed)) = parse(rest) {
            let entry = seen.entry(name).or_insert((0, 0));
            if passed {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    seen
}

/// nextest's `PASS [   0.003s] (1/2) toy tests::adds_small` (and `FAIL`).
fn nextest_line(words: &[&str]) -> Option<(String, bool)> {
    let passed = match *words.first()? {
        "PASS" => true,
        "FAIL" => false,
        _ => return None,
    };
    Some((words.last()?.to_string(), passed))
}

const RUST_TESTS: &[&str] = &[
    "tests::adds_large",
    "tests::adds_small",
    "tests::adds_zero",
    "tests::associates",
    "tests::commutes",
    "tests::fails_on_request",
];

fn assert_each_once(
    seen: &BTreeMap<String, (u32, u32)>,
    expected: &[&str],
    failed: &[&str],
    out: &Ran,
) {
    let names: Vec<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, expected, "{}\n{}", out.stdout, out.stderr);
    for (name, &(passed, failed_n)) in seen {
        let want = if failed.contains(&name.as_str()) {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!((passed, failed_n), want, "{name}: {}", out.stdout);
    }
}

/// The README's first example, exactly as written, on a Rust project: the
/// host's rustup toolchain is found with a fresh HOME and CARGO_HOME.
#[tokio::test]
async fn cargo_nextest_partition_passes_locally_as_written() {
    let readme_line =
        "mvm-shard run --local --shards 4 -- cargo nextest run --partition count:{index}/{count}";
    assert!(
        readme().contains(readme_line),
        "README must show {readme_line}"
    );
    check_recipe(
        "rust",
        Recipe::Line(readme_line),
        nextest_line,
        RUST_TESTS,
        "tests::fails_on_request",
        None,
        Via::Local,
    )
    .await;
}

/// The Rust recipe: a nextest archive built here, run in the shards (the
/// archive's test binary looks for fail-me in the shard's copy of the source).
#[tokio::test]
async fn rust_recipe_runs_a_nextest_archive_in_the_shards() {
    rust_recipe(Via::Local).await;
}

/// The Rust recipe as on AWS: the archive travels through the S3 store.
#[tokio::test]
async fn rust_recipe_through_the_emulator_and_the_artifact_store() {
    rust_recipe(Via::Emulator).await;
}

async fn rust_recipe(via: Via) {
    check_recipe(
        "rust",
        Recipe::Script("rust-nextest-archive.sh"),
        nextest_line,
        RUST_TESTS,
        "tests::fails_on_request",
        None,
        via,
    )
    .await;
}

/// A local shard gets PATH and the toolchain locations of this machine, a
/// fresh HOME and TMPDIR, and none of its caches, state or other variables.
#[tokio::test]
async fn a_local_shard_inherits_toolchain_locations_and_nothing_else() {
    let dir = project("rust");
    let venv = tempfile::tempdir().unwrap();
    let venv_bin = venv.path().join("bin");
    let in_source = dir.path().join("node_modules/.bin");
    let path = format!(
        "{}:{}:/usr/bin:/bin",
        venv_bin.display(),
        in_source.display()
    );
    let script = "env | sort; echo home=$HOME tmp=$TMPDIR";
    let out = run_in(
        dir.path(),
        &[
            "env",
            &format!("PATH={path}"),
            &format!("VIRTUAL_ENV={}", venv.path().display()),
            "RUSTUP_HOME=/opt/rustup-here",
            "GOROOT=/opt/go-here",
            "CARGO_HOME=/home/me/.cargo",
            "GOPATH=/home/me/go",
            "NPM_CONFIG_CACHE=/home/me/.npm",
            "HOST_ONLY_SECRET=hunter2",
            "HOME=/home/me",
            env!("CARGO_BIN_EXE_mvm-shard"),
            "run",
            "--local",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let shard: BTreeMap<&str, &str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[1/1] "))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(shard.get("PATH"), Some(&"/usr/bin:/bin"), "{}", out.stdout);
    assert_eq!(shard.get("RUSTUP_HOME"), Some(&"/opt/rustup-here"));
    assert_eq!(shard.get("GOROOT"), Some(&"/opt/go-here"));
    for held in [
        "CARGO_HOME",
        "GOPATH",
        "NPM_CONFIG_CACHE",
        "HOST_ONLY_SECRET",
        "VIRTUAL_ENV",
    ] {
        assert!(
            !shard.contains_key(held),
            "{held} reached the shard: {}",
            out.stdout
        );
    }
    let home = shard.get("HOME").unwrap();
    assert!(*home != "/home/me" && !home.is_empty(), "{home}");
    assert!(!out.stdout.contains("hunter2"), "{}", out.stdout);
    for dropped in [&venv_bin, &in_source] {
        assert!(
            out.stderr
                .contains(&format!("PATH entry {} is not passed", dropped.display())),
            "{}",
            out.stderr
        );
    }
}

/// A missing command says what to do about it, in the shard's log.
#[tokio::test]
async fn a_command_not_found_says_what_to_forward() {
    let dir = project("rust");
    let out = run_in(
        dir.path(),
        &[
            "mvm-shard",
            "run",
            "--local",
            "--",
            "sh",
            "-c",
            "no-such-tool-xyz --version",
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("command `no-such-tool-xyz` was not found in this shard (exit 127)")
            && out.stdout.contains("--env NAME"),
        "{}",
        out.stdout
    );
}

/// A local run warns of what would not hold on Lambda, and still runs.
#[tokio::test]
async fn a_local_run_warns_of_what_lambda_would_not_have() {
    use std::os::unix::fs::PermissionsExt;
    let dir = project("rust");
    let outside = tempfile::tempdir().unwrap();
    let tool = outside.path().join("helper.sh");
    std::fs::write(&tool, "#!/bin/sh\necho helped\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = format!("{} && whoami", tool.display());
    let out = run_in(
        dir.path(),
        &["mvm-shard", "run", "--local", "--", "sh", "-c", &script],
    )
    .await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("helped"), "{}", out.stdout);
    for warning in [
        "warning: `whoami` is not a command of the default Lambda image".to_string(),
        format!(
            "warning: the command uses {}, a file of this machine outside the source",
            tool.display()
        ),
    ] {
        assert!(out.stderr.contains(&warning), "{warning}:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("`sh`"), "{}", out.stderr);
}

/// Whether recipe `name` ships files with `--include`.
fn recipe_includes(name: &str) -> bool {
    recipe(name).contains(" --include ")
}

/// What a recipe test runs: a command line as the README writes it, or a
/// script of `examples/recipes/`.
enum Recipe<'a> {
    Line(&'a str),
    Script(&'a str),
}

/// Runs a recipe on a fixture, `via` the emulator or not: once as it is
/// (every test passes, exactly once); then with `fail-me` in place
/// (`failing` fails, the others pass, each exactly once, and the run exits 1).
async fn check_recipe(
    fixture: &str,
    recipe: Recipe<'_>,
    parse: impl Fn(&[&str]) -> Option<(String, bool)> + Copy,
    tests: &[&str],
    failing: &str,
    cache: Option<&str>,
    via: Via,
) {
    let dir = project(fixture);
    let target = Target::start(via, fixture).await;
    let run = || async {
        let out = match recipe {
            Recipe::Line(line) => {
                let argv: Vec<&str> = line.split(' ').collect();
                run_in_with(dir.path(), &argv, target.env()).await
            }
            Recipe::Script(name) => run_recipe(dir.path(), name, &target).await,
        };
        if let Target::Emulator { .. } = target {
            assert!(
                out.stderr.contains("on function mvm-shard"),
                "{}",
                out.stderr
            );
        }
        // The store's links are secrets, and the invoker's key stays with it.
        for text in [&out.stdout, &out.stderr] {
            assert!(!text.contains("X-Amz-Signature"), "{text}");
            assert!(!text.contains(common::MOTO_SECRET_KEY), "{text}");
        }
        out
    };
    let out = run().await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_each_once(&tally(&out.stdout, parse), tests, &[], &out);
    if let (Target::Emulator { .. }, Recipe::Script(name)) = (&target, &recipe) {
        if recipe_includes(name) {
            assert!(
                out.stderr.contains("uploaded to the artifact store"),
                "the include travels through the store: {}",
                out.stderr
            );
        }
    }
    std::fs::write(dir.path().join("fail-me"), "").unwrap();
    let out = run().await;
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert_each_once(&tally(&out.stdout, parse), tests, &[failing], &out);
    if let Some(path) = cache {
        // The first run saved the dependency cache; every shard of this one restored it.
        let restored = format!("cache {path} restored");
        // Live lines only: a failing shard's last lines are repeated, marked, at the end.
        let live = out
            .stdout
            .lines()
            .filter(|l| l.starts_with('[') && l.contains(&restored))
            .count();
        assert_eq!(live, 2, "{}", out.stdout);
    }
}

/// `go test -v`'s `--- PASS: TestName (0.00s)` (and `FAIL:`).
fn go_line(words: &[&str]) -> Option<(String, bool)> {
    let passed = match words {
        ["---", "PASS:", ..] => true,
        ["---", "FAIL:", ..] => false,
        _ => return None,
    };
    Some((words.get(2)?.to_string(), passed))
}

/// `pytest -v`'s `tests/test_x.py::test_name PASSED [ 50%]` (and `FAILED`).
fn pytest_line(words: &[&str]) -> Option<(String, bool)> {
    let name = words.first().filter(|w| w.contains("::"))?;
    let passed = match *words.get(1)? {
        "PASSED" => true,
        "FAILED" => false,
        _ => return None,
    };
    Some((name.to_string(), passed))
}

/// `jest --verbose`'s `✓ test name (3 ms)` (and `✕`).
fn jest_line(words: &[&str]) -> Option<(String, bool)> {
    let passed = match *words.first()? {
        "✓" => true,
        "✕" => false,
        _ => return None,
    };
    let mut name: Vec<&str> = words[1..].to_vec();
    if name.last().is_some_and(|w| w.ends_with("ms)")) {
        name.truncate(name.len().saturating_sub(2));
    }
    Some((name.join(" "), passed))
}

#[tokio::test]
async fn go_recipe_deals_packages_out_and_a_failing_test_fails_the_run() {
    go_recipe(Via::Local).await;
}

#[tokio::test]
async fn go_recipe_through_the_emulator_and_the_artifact_store() {
    go_recipe(Via::Emulator).await;
}

async fn go_recipe(via: Via) {
    check_recipe(
        "go",
        Recipe::Script("go.sh"),
        go_line,
        &[
            "TestAddSmall",
            "TestAddZero",
            "TestAlwaysPasses",
            "TestFailsOnRequest",
            "TestShout",
            "TestShoutEmpty",
        ],
        "TestFailsOnRequest",
        None,
        via,
    )
    .await;
}

#[tokio::test]
async fn python_recipe_runs_pytest_with_uv_and_a_failing_test_fails_the_run() {
    python_recipe(Via::Local).await;
}

/// The Python recipe as on AWS: the virtualenv is cached in the S3 store.
#[tokio::test]
async fn python_recipe_through_the_emulator_and_the_artifact_store() {
    python_recipe(Via::Emulator).await;
}

async fn python_recipe(via: Via) {
    check_recipe(
        "python",
        Recipe::Script("python-uv.sh"),
        pytest_line,
        &[
            "tests/test_math.py::test_adds",
            "tests/test_math.py::test_divides",
            "tests/test_math.py::test_multiplies",
            "tests/test_request.py::test_fails_on_request",
            "tests/test_request.py::test_joins",
        ],
        "tests/test_request.py::test_fails_on_request",
        Some(".venv"),
        via,
    )
    .await;
}

#[tokio::test]
async fn javascript_recipe_runs_jest_shards_and_a_failing_test_fails_the_run() {
    javascript_recipe(Via::Local).await;
}

/// The JavaScript recipe as on AWS: node_modules is cached in the S3 store.
#[tokio::test]
async fn javascript_recipe_through_the_emulator_and_the_artifact_store() {
    javascript_recipe(Via::Emulator).await;
}

async fn javascript_recipe(via: Via) {
    check_recipe(
        "js",
        Recipe::Script("javascript-jest.sh"),
        jest_line,
        &[
            "arrays sort",
            "fails on request",
            "math adds",
            "math multiplies",
            "strings join",
            "strings upper",
        ],
        "fails on request",
        Some("node_modules"),
        via,
    )
    .await;
}

/// The shell command after ` -- ` of a `mvm-shard run` line (continuations joined).
fn shard_commands(text: &str) -> Vec<String> {
    text.replace("\\\n", " ")
        .lines()
        .filter(|l| l.trim_start().starts_with("mvm-shard run"))
        .filter_map(|l| {
            l.split_once(" -- ")
                .map(|(_, c)| c.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect()
}

/// The README's "Using it" examples run commands that the recipe tests run.
#[test]
fn the_readme_usage_examples_run_tested_commands() {
    let readme = readme();
    let (_, using) = readme.split_once("## Using it").unwrap();
    let block = using.split("```").nth(1).unwrap();
    let examples = shard_commands(block);
    assert_eq!(examples.len(), 3, "{block}");
    let recipes_dir = manifest_dir().join("examples/recipes");
    let mut tested: Vec<String> = std::fs::read_dir(&recipes_dir)
        .unwrap()
        .flat_map(|e| shard_commands(&std::fs::read_to_string(e.unwrap().path()).unwrap()))
        .collect();
    tested.push("cargo nextest run --partition count:{index}/{count}".into());
    for example in examples {
        assert!(
            tested.contains(&example),
            "untested example command: {example}\ntested: {tested:#?}"
        );
    }
}
