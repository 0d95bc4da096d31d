//! The artifact channel end to end: `--include` archives of any size reach
//! every shard through a real third-party S3 server (moto, on loopback) and
//! presigned links, or over loopback with `--local`, with the invoker's
//! memory flat; the same content is uploaded once.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

const BUCKET: &str = "mvm-artifacts";
/// The invoker's own secret: it must never reach a shard or a log.
const SECRET_KEY: &str = "invoker-secret-key-5f2c";
/// Size of the include: random, so it does not compress.
const BIG: u64 = 100 * 1024 * 1024;
/// Peak resident memory allowed to the invoker while shipping [`BIG`] bytes.
const MAX_INVOKER_RSS_KB: i64 = 80 * 1024;

/// moto's standalone S3 server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
        let mut child = Command::new("python3")
            .args(["-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with moto[server] is installed (.ci/run installs it)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://127.0.0.1:") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("moto says where it listens");
        Moto { child, endpoint }
    }

    async fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", SECRET_KEY, None, None, "test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// A bucket that keeps every version, so uploads can be counted.
    async fn versioned_bucket(&self) -> aws_sdk_s3::Client {
        let client = self.client().await;
        client.create_bucket().bucket(BUCKET).send().await.unwrap();
        client
            .put_bucket_versioning()
            .bucket(BUCKET)
            .versioning_configuration(
                aws_sdk_s3::types::VersioningConfiguration::builder()
                    .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        client
    }

    /// Environment for the invoker: the SDK finds moto through its own setting.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_S3", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A git repository with a small tracked file and `big.bin` (ignored, so
/// it travels only as an include) of random bytes; returns its SHA-256.
fn project(dir: &Path) -> String {
    let git = |args: &[&str]| {
        assert!(Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap()
            .status
            .success());
    };
    git(&["init", "-q"]);
    std::fs::write(dir.join(".gitignore"), "big.bin\n").unwrap();
    std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
    let mut big = std::fs::File::create(dir.join("big.bin")).unwrap();
    let mut random = std::fs::File::open("/dev/urandom").unwrap().take(BIG);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = random.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        big.write_all(&buf[..n]).unwrap();
    }
    mvm_shard::artifacts::hex(&hasher.finalize())
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    /// Peak resident set of the invoker process, in KiB.
    max_rss_kb: i64,
}

/// Runs the binary in `dir` and waits for it with `wait4`, which gives its
/// own peak memory (not that of its children). Killed after five minutes.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4 below, which also reports its peak memory"
)]
fn run(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Ran {
    let mut child = Command::new(common::binary())
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watchdog.recv_timeout(Duration::from_secs(300))
        {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which std has not reaped.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let _ = done.send(());
    Ran {
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        max_rss_kb: usage.ru_maxrss,
    }
}

/// Each shard prints the SHA-256 of what it got and whether it can see the
/// invoker's AWS secret.
const CHECK: &str =
    "sha256sum big.bin; if env | grep -q invoker-secret-key; then echo SECRET-LEAKED; fi";

fn assert_every_shard_got(ran: &Ran, shards: usize, hash: &str) {
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(
        ran.stdout.matches(&format!("{hash}  big.bin")).count(),
        shards,
        "every shard has the exact bytes: {}",
        ran.stdout
    );
    assert!(!ran.stdout.contains("SECRET-LEAKED"), "{}", ran.stdout);
    assert!(
        ran.max_rss_kb < MAX_INVOKER_RSS_KB,
        "the invoker's peak memory was {} KiB while shipping {} MiB",
        ran.max_rss_kb,
        BIG >> 20
    );
    eprintln!(
        "invoker peak RSS: {} MiB for a {} MiB include",
        ran.max_rss_kb / 1024,
        BIG >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_include_reaches_every_shard_through_s3_and_is_uploaded_once() {
    let moto = Moto::start();
    let s3 = moto.versioned_bucket().await;
    let work = tempfile::tempdir().unwrap();
    let hash = project(work.path());
    let args = [
        "run",
        "--local",
        "--artifacts",
        "s3://mvm-artifacts/ci/runs",
        "--shards",
        "2",
        "--timeout",
        "120s",
        "--include",
        "big.bin",
        "--",
        "sh",
        "-c",
        CHECK,
    ];
    let env = moto.env();
    let first = tokio::task::spawn_blocking({
        let (dir, env) = (work.path().to_path_buf(), env.clone());
        move || run(&dir, &env, &args)
    })
    .await
    .unwrap();
    assert_every_shard_got(&first, 2, &hash);
    assert!(
        first.stderr.contains("uploaded to the artifact store"),
        "{}",
        first.stderr
    );

    // The same content again, now in GitHub Actions: no second upload, and the link is masked.
    let output = work.path().join("gh-output");
    let mut env = env;
    env.push(("GITHUB_ACTIONS", "true".into()));
    env.push(("GITHUB_OUTPUT", output.display().to_string()));
    let second = tokio::task::spawn_blocking({
        let dir = work.path().to_path_buf();
        move || run(&dir, &env, &args)
    })
    .await
    .unwrap();
    assert_every_shard_got(&second, 2, &hash);
    assert!(
        second.stderr.contains("already in the artifact store"),
        "{}",
        second.stderr
    );
    let versions = s3
        .list_object_versions()
        .bucket(BUCKET)
        .prefix("ci/runs/")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = versions.versions().iter().filter_map(|v| v.key()).collect();
    assert_eq!(keys.len(), 1, "one object, written once: {keys:?}");
    assert!(
        keys[0].starts_with("ci/runs/archives/") && keys[0].ends_with(".tar.zst"),
        "{keys:?}"
    );
    let masks: Vec<&str> = second
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("::add-mask::"))
        .collect();
    assert!(
        masks.iter().any(|m| m.contains("X-Amz-Signature=")),
        "the presigned query is masked: {}",
        second.stdout
    );
    for (out, what) in [(&second.stdout, "stdout"), (&second.stderr, "stderr")] {
        let unmasked = out
            .lines()
            .filter(|l| !l.starts_with("::add-mask::"))
            .any(|l| l.contains("X-Amz-Signature"));
        assert!(!unmasked, "no presigned link in the {what}: {out}");
        assert!(!out.contains(SECRET_KEY), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_include_reaches_every_shard_over_loopback_with_local() {
    let work = tempfile::tempdir().unwrap();
    let hash = project(work.path());
    let ran = tokio::task::spawn_blocking({
        let dir = work.path().to_path_buf();
        move || {
            run(
                &dir,
                &[],
                &[
                    "run",
                    "--local",
                    "--shards",
                    "2",
                    "--timeout",
                    "120s",
                    "--include",
                    "big.bin",
                    "--",
                    "sh",
                    "-c",
                    CHECK,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_every_shard_got(&ran, 2, &hash);
    assert!(
        ran.stderr.contains("served over loopback"),
        "{}",
        ran.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_store_object_is_refused_by_every_shard() {
    let moto = Moto::start();
    let s3 = moto.versioned_bucket().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("data.txt"), "the real content\n").unwrap();
    let args = [
        "run",
        "--local",
        "--artifacts",
        "s3://mvm-artifacts",
        "--shards",
        "2",
        "--timeout",
        "60s",
        "--include",
        "data.txt",
        "--",
        "cat",
        "data.txt",
    ];
    let env = moto.env();
    let first = run(work.path(), &env, &args);
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    assert_eq!(first.stdout.matches("the real content").count(), 2);

    // Someone with write access to the bucket swaps the bytes (same size).
    let listed = s3.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    let key = listed
        .contents()
        .iter()
        .filter_map(|o| o.key())
        .find(|k| k.starts_with("archives/"))
        .unwrap()
        .to_string();
    let size = s3
        .head_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap()
        .content_length()
        .unwrap();
    s3.put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(vec![b'x'; size as usize].into())
        .send()
        .await
        .unwrap();

    let second = run(work.path(), &env, &args);
    assert_eq!(second.code, 3, "{}{}", second.stdout, second.stderr);
    assert!(!second.stdout.contains("the real content"));
    assert!(
        second.stdout.contains("SHA-256"),
        "the shards say why: {}",
        second.stdout
    );
}

#[test]
fn without_a_store_an_include_too_large_for_a_request_says_to_use_artifacts() {
    let work = tempfile::tempdir().unwrap();
    let mut big = std::fs::File::create(work.path().join("big.bin")).unwrap();
    std::io::copy(
        &mut std::fs::File::open("/dev/urandom").unwrap().take(6 << 20),
        &mut big,
    )
    .unwrap();
    let (code, _, stderr) = common::cli(
        work.path(),
        &[
            "run",
            "--function",
            "f",
            "--include",
            "big.bin",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--artifacts s3://"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn a_bad_artifacts_location_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let (code, _, stderr) = common::cli(
        work.path(),
        &["run", "--local", "--artifacts", "my-bucket/x", "--", "true"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("expected s3://BUCKET"), "{stderr}");
}

/// A shard that finds `deps` says HIT; otherwise it builds it and says MISS.
const BUILD_DEPS: &str = "if [ -f deps/built ]; then echo HIT; else mkdir -p deps && echo yes > deps/built && echo MISS; fi";

fn git_project(dir: &Path) {
    assert!(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["init", "-q"])
        .status()
        .unwrap()
        .success());
    std::fs::write(dir.join(".gitignore"), "deps/\n").unwrap();
    std::fs::write(dir.join("deps.lock"), "v1\n").unwrap();
}

#[test]
fn a_local_cache_is_saved_once_restored_and_a_broken_one_is_ignored() {
    let work = tempfile::tempdir().unwrap();
    git_project(work.path());
    let args = [
        "run",
        "--local",
        "--shards",
        "2",
        "--timeout",
        "60s",
        "--cache",
        "deps=deps.lock",
        "--",
        "sh",
        "-c",
        BUILD_DEPS,
    ];
    let miss = run(work.path(), &[], &args);
    assert_eq!(miss.code, 0, "{}{}", miss.stdout, miss.stderr);
    assert_eq!(miss.stdout.matches("MISS").count(), 2, "{}", miss.stdout);
    let saved = miss.stdout.matches("cache deps saved").count();
    let refused = miss
        .stdout
        .matches("cache deps already saved by another shard")
        .count();
    assert_eq!((saved, refused), (1, 1), "one upload wins: {}", miss.stdout);
    let cached: Vec<_> = std::fs::read_dir(work.path().join(".git/mvm-shard/caches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");

    let hit = run(work.path(), &[], &args);
    assert_eq!(hit.code, 0, "{}{}", hit.stdout, hit.stderr);
    assert_eq!(hit.stdout.matches("HIT").count(), 2, "{}", hit.stdout);
    assert_eq!(hit.stdout.matches("cache deps restored").count(), 2);

    // A corrupted cache: the run still passes, rebuilds, and says why.
    std::fs::write(&cached[0], b"not a tar.zst at all").unwrap();
    let broken = run(work.path(), &[], &args);
    assert_eq!(broken.code, 0, "{}{}", broken.stdout, broken.stderr);
    assert_eq!(
        broken.stdout.matches("MISS").count(),
        2,
        "{}",
        broken.stdout
    );
    assert_eq!(
        broken.stdout.matches("cache deps ignored").count(),
        2,
        "{}",
        broken.stdout
    );

    // Another lockfile is another key: a miss again.
    std::fs::write(work.path().join("deps.lock"), "v2\n").unwrap();
    let changed = run(work.path(), &[], &args);
    assert_eq!(
        changed.stdout.matches("MISS").count(),
        2,
        "{}",
        changed.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_in_the_s3_store_is_saved_then_restored_with_no_credential_in_the_shards() {
    let moto = Moto::start();
    moto.client()
        .await
        .create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    git_project(work.path());
    let check = format!("{BUILD_DEPS}; {}", CHECK.split_once("; ").unwrap().1);
    let args = [
        "run",
        "--local",
        "--artifacts",
        "s3://mvm-artifacts/ci",
        "--shards",
        "2",
        "--timeout",
        "60s",
        "--cache",
        "deps=deps.lock",
        "--",
        "sh",
        "-c",
        &check,
    ];
    let env = moto.env();
    let first = run(work.path(), &env, &args);
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    assert_eq!(first.stdout.matches("MISS").count(), 2, "{}", first.stdout);
    assert!(
        first.stdout.contains("cache deps saved"),
        "{}",
        first.stdout
    );
    let second = run(work.path(), &env, &args);
    assert_eq!(second.code, 0, "{}{}", second.stdout, second.stderr);
    assert_eq!(second.stdout.matches("HIT").count(), 2, "{}", second.stdout);
    for ran in [&first, &second] {
        assert!(!ran.stdout.contains("SECRET-LEAKED"), "{}", ran.stdout);
        assert!(!ran.stdout.contains("X-Amz-Signature"), "{}", ran.stdout);
    }
}

#[test]
fn a_cache_without_a_store_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    git_project(work.path());
    let (code, _, stderr) = common::cli(
        work.path(),
        &[
            "run",
            "--function",
            "f",
            "--cache",
            "deps=deps.lock",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cache \"deps=deps.lock\""), "{stderr}");
    assert!(stderr.contains("--artifacts"), "{stderr}");
}
