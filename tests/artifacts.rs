//! The artifact channel end to end: `--include` archives of any size reach
//! every shard through a real third-party S3 server (moto, on loopback) and
//! presigned links, or over loopback with `--local`, with the invoker's
//! memory flat; the same content is uploaded once.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Moto, MOTO_SECRET_KEY};
use sha2::{Digest, Sha256};

/// The bucket of the 100 MB test, which keeps every version (one moto
/// serves the whole file, each test in its own bucket).
const BUCKET: &str = "mvm-artifacts";
/// Size of the include: random, so it does not compress.
const BIG: u64 = 100 * 1024 * 1024;
/// Peak resident memory allowed to the invoker while shipping [`BIG`] bytes.
const MAX_INVOKER_RSS_KB: i64 = 80 * 1024;

/// A bucket that keeps every version, so uploads can be counted.
async fn versioned_bucket(moto: &Moto) -> aws_sdk_s3::Client {
    let client = moto.bucket(BUCKET).await;
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

/// A git repository with a small tracked file and `big.bin` (ignored, so
/// it travels only as an include) of random bytes; returns its SHA-256.
fn project(dir: &Path) -> String {
    common::git(dir, &["init", "-q"]);
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
    let (code, usage) = common::wait4_within(&child, Duration::from_secs(300));
    Ran {
        code,
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
    let moto = Moto::shared();
    let s3 = versioned_bucket(moto).await;
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
        assert!(!out.contains(MOTO_SECRET_KEY), "{out}");
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
    let moto = Moto::shared();
    let s3 = moto.bucket("mvm-corrupted").await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("data.txt"), "the real content\n").unwrap();
    let args = [
        "run",
        "--local",
        "--artifacts",
        "s3://mvm-corrupted",
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
    let listed = s3
        .list_objects_v2()
        .bucket("mvm-corrupted")
        .send()
        .await
        .unwrap();
    let key = listed
        .contents()
        .iter()
        .filter_map(|o| o.key())
        .find(|k| k.starts_with("archives/"))
        .unwrap()
        .to_string();
    let size = s3
        .head_object()
        .bucket("mvm-corrupted")
        .key(&key)
        .send()
        .await
        .unwrap()
        .content_length()
        .unwrap();
    s3.put_object()
        .bucket("mvm-corrupted")
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
    common::git(dir, &["init", "-q"]);
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

    // No lockfile at all (not generated yet, a typo): the run goes on
    // uncached and says so; nothing is saved under a key of nothing.
    std::fs::remove_file(work.path().join("deps.lock")).unwrap();
    let keyless = run(work.path(), &[], &args);
    assert_eq!(keyless.code, 0, "{}{}", keyless.stdout, keyless.stderr);
    assert_eq!(
        keyless.stdout.matches("MISS").count(),
        2,
        "{}",
        keyless.stdout
    );
    assert!(
        keyless.stderr.contains("cache deps not used") && keyless.stderr.contains("deps.lock"),
        "{}",
        keyless.stderr
    );
    assert!(
        !keyless.stdout.contains("cache deps saved"),
        "{}",
        keyless.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_in_the_s3_store_is_saved_then_restored_with_no_credential_in_the_shards() {
    let moto = Moto::shared();
    moto.bucket("mvm-caches").await;
    let work = tempfile::tempdir().unwrap();
    git_project(work.path());
    let check = format!("{BUILD_DEPS}; {}", CHECK.split_once("; ").unwrap().1);
    let args = [
        "run",
        "--local",
        "--artifacts",
        "s3://mvm-caches/ci",
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

/// Prints CREDENTIAL-SEEN when a shard's environment holds an AWS credential
/// or a presigned link.
const NO_CREDENTIAL: &str = "if env | grep -qE '^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)=|X-Amz-'; then echo CREDENTIAL-SEEN; fi";

/// As on AWS (`run --function` on `mvm-shard emulate`, the store on moto): a
/// shard holds no AWS credential and no link, every link carries its expiry,
/// and a cache that breaks in the bucket (corrupted, or deleted while the run
/// goes on) never fails a run: the shards build it as on a miss.
#[tokio::test(flavor = "multi_thread")]
async fn through_a_function_a_broken_store_cache_never_fails_a_run_and_shards_hold_no_credential() {
    const BUCKET: &str = "mvm-broken-caches";
    let moto = Moto::shared();
    let s3 = moto.bucket(BUCKET).await;
    let emulator = common::Emulate::start();
    let work = tempfile::tempdir().unwrap();
    git_project(work.path());
    let gate = work.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // With `--max-parallel 1`, shard 2 starts once shard 1, held at the gate, ends.
    let script = format!(
        "if [ -n \"$HOLD\" ] && [ $MVM_SHARD_INDEX = 1 ]; then echo HELD; cat '{}' >/dev/null; fi; {BUILD_DEPS}; {NO_CREDENTIAL}",
        gate.display()
    );
    let mut env = moto.env();
    env.push(("AWS_ENDPOINT_URL_LAMBDA", emulator.endpoint.clone()));
    env.push(("MVM_SHARD_ARTIFACTS", format!("s3://{BUCKET}/ci")));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--function",
            "mvm-shard",
            "--shards",
            "2",
            "--timeout",
            "60s",
            "--cache",
            "deps=deps.lock",
        ];
        args.extend_from_slice(extra);
        args.extend(["--", "sh", "-c", &script]);
        let mut command = tokio::process::Command::new(common::binary());
        command
            .args(args)
            .current_dir(work.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command.spawn().unwrap()
    };
    let finish = |child: tokio::process::Child| async {
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("the run ends in time")
            .unwrap();
        let ran = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(ran.0, 0, "a cache never fails a run: {}{}", ran.1, ran.2);
        assert!(ran.2.contains("on function mvm-shard"), "{}", ran.2);
        for text in [&ran.1, &ran.2] {
            assert!(!text.contains("CREDENTIAL-SEEN"), "{text}");
            assert!(!text.contains("X-Amz-"), "{text}");
            assert!(!text.contains(MOTO_SECRET_KEY), "{text}");
        }
        ran.1
    };

    // A miss: both build, one saves through a presigned PUT that expires
    // (an hour plus the timeout per wave of shards and one more: 3,720 s).
    let miss = finish(run(&[])).await;
    assert_eq!(miss.matches("MISS").count(), 2, "{miss}");
    assert_eq!(miss.matches("cache deps saved").count(), 1, "{miss}");
    let requests = moto.requests_once(BUCKET, "PUT /");
    let links: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("X-Amz-Signature="))
        .collect();
    assert!(!links.is_empty(), "{requests:#?}");
    for link in links {
        assert!(link.contains("X-Amz-Expires=3720&"), "{link}");
        if link.starts_with("PUT ") {
            // A save link can only create the object: the condition is signed.
            assert!(
                link.contains("X-Amz-SignedHeaders=host%3Bif-none-match&")
                    || link.contains("X-Amz-SignedHeaders=host;if-none-match&"),
                "{link}"
            );
        }
    }
    let key = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("ci/caches/")
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .find_map(|o| o.key().map(str::to_string))
        .expect("the cache was saved");

    // Corrupted in the bucket: every shard ignores it, builds, passes.
    s3.put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(b"not a tar.zst at all".to_vec().into())
        .send()
        .await
        .unwrap();
    let corrupted = finish(run(&[])).await;
    assert_eq!(
        corrupted.matches("cache deps ignored").count(),
        2,
        "{corrupted}"
    );
    assert_eq!(corrupted.matches("MISS").count(), 2, "{corrupted}");

    // A good cache again (another key), then deleted while the run goes
    // on: shard 1 restored it, shard 2 finds it gone and builds it.
    std::fs::write(work.path().join("deps.lock"), "v2\n").unwrap();
    let rebuilt = finish(run(&[])).await;
    assert_eq!(rebuilt.matches("cache deps saved").count(), 1, "{rebuilt}");
    let mut held = run(&["--max-parallel", "1", "--env", "HOLD=1"]);
    let mut stdout = tokio::io::BufReader::new(held.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("HELD") {
        let mut line = String::new();
        let n = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
        )
        .await
        .expect("shard 1 reaches the gate")
        .unwrap();
        assert!(
            n > 0,
            "the run ended before shard 1 reached the gate: {seen}"
        );
        seen.push_str(&line);
    }
    let listed = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("ci/caches/")
        .send()
        .await
        .unwrap();
    for object in listed.contents() {
        s3.delete_object()
            .bucket(BUCKET)
            .key(object.key().unwrap())
            .send()
            .await
            .unwrap();
    }
    tokio::fs::write(&gate, b"go\n").await.unwrap();
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut rest)
        .await
        .unwrap();
    held.stdout = None;
    let _ = finish(held).await;
    let deleted = seen + &rest;
    assert_eq!(deleted.matches("HIT").count(), 1, "{deleted}");
    assert_eq!(
        deleted.matches("cache deps ignored").count(),
        1,
        "{deleted}"
    );
    assert_eq!(deleted.matches("MISS").count(), 1, "{deleted}");
}
