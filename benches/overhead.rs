//! What users get, measured the way they run it: `cargo bench --bench overhead`
//! runs the release binary (`mvm-shard run --local ...`, or `run` against a
//! separate `mvm-shard emulate`) with its stdout going to /dev/null, a file or
//! a pipe, side by side in one run with the bare baselines of issue #8, and
//! prints the table with the ratios.
//!
//! Each figure is the median of `MVM_BENCH_REPEAT` runs (default 3). Wall
//! time and CPU (the invoker and every process it reaped: emulator
//! environments and agents) come from `wait4`; the invoker's own peak RSS is
//! its `VmHWM`, sampled until it exits. Each row also gives the machine's
//! load average when it was measured, as the figures depend on it.
//!
//! `MVM_BENCH_QUICK=1` runs smaller sizes, for CI: then the run fails when a
//! bound that is not about time breaks (memory, bytes on the wire), never on a
//! timing. `MVM_BENCH_ONLY=noop,log,memory,fanout,wire` runs only those rows.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BINARY: &str = env!("CARGO_BIN_EXE_mvm-shard");
/// A log line of 100 bytes, newline included.
const LINE: &str = "2026-11-30T05:00:00.000Z INFO tests/test_api.py::test_endpoint_returns_the_expected_document ok....\n";

/// Reads a measured command's piped stdout.
type Feed = Box<dyn FnOnce(std::process::ChildStdout) + Send>;

/// One measured process.
#[derive(Clone, Copy, Default)]
struct Measured {
    wall: Duration,
    cpu: Duration,
    /// The process's own peak RSS, in KiB.
    peak_rss_kb: u64,
    exit: i32,
}

/// Runs `cmd` to its end; `feed` reads its stdout when it is piped.
#[expect(
    clippy::zombie_processes,
    reason = "wait4 reaps the child, which Child::wait cannot do with its rusage"
)]
fn measure(cmd: &mut Command, feed: Option<Feed>) -> Measured {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("the command starts");
    let pid = child.id();
    let reader = match (feed, child.stdout.take()) {
        (Some(feed), Some(out)) => Some(std::thread::spawn(move || feed(out))),
        _ => None,
    };
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = vm_hwm(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data, and wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid as i32, "wait4 failed");
    let wall = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Measured {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak_rss_kb: peak.load(Ordering::Relaxed),
        exit: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
    }
}

/// The high-water mark of a process's resident set, in KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn repeat() -> usize {
    std::env::var("MVM_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn quick() -> bool {
    std::env::var("MVM_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The median run of `n`, by wall time.
fn median(n: usize, mut run: impl FnMut() -> Measured) -> Measured {
    let mut runs: Vec<Measured> = (0..n).map(|_| run()).collect();
    runs.sort_by_key(|m| m.wall);
    runs[runs.len() / 2]
}

/// A folder to run from: `run` ships the working tree, here one small file.
fn source_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "benchmark source\n").unwrap();
    dir
}

fn local_run(dir: &Path, args: &[&str], out: Stdio) -> Command {
    let mut cmd = Command::new(BINARY);
    cmd.arg("run")
        .arg("--local")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    cmd
}

fn shell(script: &str, out: Stdio) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    cmd
}

#[derive(Clone, Copy)]
enum Sink {
    DevNull,
    File,
    Pipe,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::DevNull => "/dev/null",
            Sink::File => "a file",
            Sink::Pipe => "a pipe",
        }
    }

    /// The stdout to give, and the reader of a pipe.
    fn open(self, file: &Path) -> (Stdio, Option<Feed>) {
        match self {
            Sink::DevNull => (Stdio::null(), None),
            Sink::File => (Stdio::from(std::fs::File::create(file).unwrap()), None),
            Sink::Pipe => (
                Stdio::piped(),
                Some(Box::new(|mut out| {
                    let mut buf = vec![0u8; 256 * 1024];
                    while matches!(out.read(&mut buf), Ok(n) if n > 0) {}
                })),
            ),
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn mb(kb: u64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

struct Row {
    measure: String,
    /// The one-minute load average before the row was measured.
    load: String,
    ours: String,
    baseline: String,
    ratio: String,
    required: &'static str,
    holds: bool,
    /// Whether the row's bound on memory or bytes (not on time) holds, for
    /// the rows that have one: a quick run fails when one does not.
    bound: Option<bool>,
}

/// The one-minute load average, as `uptime` shows it.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// Whether `MVM_BENCH_ONLY` (a comma list; unset means all) names `row`.
fn wanted(row: &str) -> bool {
    std::env::var("MVM_BENCH_ONLY").map_or(true, |only| only.split(',').any(|r| r.trim() == row))
}

fn main() {
    let n = repeat();
    let quick = quick();
    let log_mb: u64 = if quick { 20 } else { 200 };
    let big_mb: u64 = if quick { 50 } else { 500 };
    // A thousand `sleep 2` shards take seconds: quick runs keep them too.
    let fanout: u32 = 1000;
    let src = source_dir();
    let scratch = tempfile::tempdir().unwrap();
    let out_file = scratch.path().join("out");
    let mut rows = Vec::new();
    eprintln!(
        "mvm-shard benchmark: {} ({} CPUs), median of {n}{}",
        BINARY,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { ", quick sizes" } else { "" }
    );

    if wanted("noop") {
        rows.push(no_op_shards(n, src.path()));
    }
    if wanted("log") {
        for sink in [Sink::DevNull, Sink::File, Sink::Pipe] {
            rows.push(long_log(n, src.path(), sink, &out_file, log_mb));
        }
    }
    if wanted("memory") {
        rows.push(memory_flat(src.path(), big_mb));
    }
    if wanted("fanout") {
        rows.push(in_flight(n, src.path(), fanout));
    }
    if wanted("wire") {
        rows.push(wire(src.path(), if quick { 1000 } else { 5000 }));
    }

    let size = std::fs::metadata(BINARY).map_or(0, |m| m.len());
    println!();
    println!("| measure | mvm-shard | baseline | ratio | required | holds | load |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.measure,
            r.ours,
            r.baseline,
            r.ratio,
            r.required,
            if r.holds { "yes" } else { "NO" },
            r.load
        );
    }
    println!();
    println!("binary: {:.1} MB", size as f64 / 1e6);
    if quick {
        let broken: Vec<&str> = rows
            .iter()
            .filter(|r| r.bound == Some(false))
            .map(|r| r.measure.as_str())
            .collect();
        assert!(broken.is_empty(), "bounds broken: {broken:?}");
    }
}

/// `LINE`s for `megabytes` MB, from `yes`.
fn generate(megabytes: u64) -> String {
    format!(
        "yes '{}' | head -c {}",
        &LINE[..LINE.len() - 1],
        megabytes * 1_000_000
    )
}

/// 64 no-op shards, 4 at a time, against `xargs -P4` making a folder each.
fn no_op_shards(n: usize, src: &Path) -> Row {
    let load = load();
    let ours = median(n, || {
        let m = measure(
            &mut local_run(
                src,
                &["--shards", "64", "--max-parallel", "4", "--", "true"],
                Stdio::null(),
            ),
            None,
        );
        assert_eq!(m.exit, 0, "64 no-op shards failed");
        m
    });
    let base = median(n, || {
        measure(
            &mut shell(
                "seq 64 | xargs -P4 -I{} sh -c 'd=$(mktemp -d) && cd \"$d\" && true && cd / && rm -rf \"$d\"'",
                Stdio::null(),
            ),
            None,
        )
    });
    let ratio = ours.wall.as_secs_f64() / base.wall.as_secs_f64();
    let cpu_per_shard = ours.cpu / 64;
    Row {
        measure: "64 no-op shards, `--local --max-parallel 4`".into(),
        load,
        ours: format!(
            "{}, {:.1} ms CPU per shard, {}",
            secs(ours.wall),
            cpu_per_shard.as_secs_f64() * 1000.0,
            mb(ours.peak_rss_kb)
        ),
        baseline: format!("xargs -P4, fresh temp dir each: {}", secs(base.wall)),
        ratio: format!("{ratio:.1}x"),
        required: "≤ 2.5x, ≤ 8 ms CPU per shard",
        holds: ratio <= 2.5 && cpu_per_shard <= Duration::from_millis(8),
        bound: None,
    }
}

/// One shard printing a long log to `sink`, against `cat` of the same bytes.
fn long_log(n: usize, src: &Path, sink: Sink, out_file: &Path, log_mb: u64) -> Row {
    let load = load();
    let ours = median(n, || {
        let (out, feed) = sink.open(out_file);
        let gen = generate(log_mb);
        let m = measure(&mut local_run(src, &["--", "sh", "-c", &gen], out), feed);
        assert_eq!(m.exit, 0, "the log shard failed");
        m
    });
    let base = median(n, || {
        let (out, feed) = sink.open(out_file);
        measure(
            &mut shell(&format!("{} | cat", generate(log_mb)), out),
            feed,
        )
    });
    let share = base.wall.as_secs_f64() / ours.wall.as_secs_f64();
    Row {
        measure: format!(
            "one shard printing {log_mb} MB of 100-byte lines, to {}",
            sink.name()
        ),
        load,
        ours: format!(
            "{} ({:.0} MB/s), {} peak RSS",
            secs(ours.wall),
            log_mb as f64 / ours.wall.as_secs_f64(),
            mb(ours.peak_rss_kb)
        ),
        baseline: format!("the same bytes through `cat`: {}", secs(base.wall)),
        ratio: format!("{:.0}%", share * 100.0),
        required: "≥ 60% of the pipe",
        holds: share >= 0.6,
        bound: None,
    }
}

/// The invoker's peak memory for a log ten times longer than another.
fn memory_flat(src: &Path, big_mb: u64) -> Row {
    let load = load();
    let small = median(1, || {
        measure(
            &mut local_run(
                src,
                &["--", "sh", "-c", &generate(big_mb / 10)],
                Stdio::null(),
            ),
            None,
        )
    });
    let big = median(1, || {
        measure(
            &mut local_run(src, &["--", "sh", "-c", &generate(big_mb)], Stdio::null()),
            None,
        )
    });
    let flat = big.exit == 0
        && big.peak_rss_kb < 64 * 1024
        && big.peak_rss_kb < small.peak_rss_kb + 8 * 1024;
    Row {
        measure: format!("one shard printing {big_mb} MB of 100-byte lines"),
        load,
        ours: format!(
            "invoker peak RSS {} ({} for {} MB)",
            mb(big.peak_rss_kb),
            mb(small.peak_rss_kb),
            big_mb / 10
        ),
        baseline: String::new(),
        ratio: String::new(),
        required: "< 64 MB, flat in log size",
        holds: flat,
        bound: Some(flat),
    }
}

/// `fanout` shards of `sleep 2` all in flight, against one bare `sleep 2`.
fn in_flight(n: usize, src: &Path, fanout: u32) -> Row {
    let load = load();
    let one = median(n, || {
        measure(
            &mut local_run(src, &["--", "sleep", "2"], Stdio::null()),
            None,
        )
    });
    let count = fanout.to_string();
    let fan = median(1.max(n / 2), || {
        let m = measure(
            &mut local_run(
                src,
                &[
                    "--shards",
                    &count,
                    "--max-parallel",
                    &count,
                    "--",
                    "sleep",
                    "2",
                ],
                Stdio::null(),
            ),
            None,
        );
        if m.exit != 0 {
            eprintln!("{fanout} shards of sleep 2: exit {}", m.exit);
        }
        m
    });
    let bare = median(1, || measure(&mut shell("sleep 2", Stdio::null()), None));
    let ratio = fan.wall.as_secs_f64() / bare.wall.as_secs_f64();
    let within = fan.exit == 0 && fan.peak_rss_kb < 100 * 1024;
    Row {
        measure: format!(
            "{fanout} shards of `sleep 2` in flight (`--local --max-parallel {fanout}`)"
        ),
        load,
        ours: format!(
            "{}, {} peak RSS, {:.1} ms CPU per shard (one shard: {}, {})",
            secs(fan.wall),
            mb(fan.peak_rss_kb),
            fan.cpu.as_secs_f64() * 1000.0 / f64::from(fanout),
            secs(one.wall),
            mb(one.peak_rss_kb)
        ),
        baseline: format!("one bare `sleep 2`: {}", secs(bare.wall)),
        ratio: format!("{ratio:.1}x"),
        required: "≤ 3x one shard (≤ 6 s), < 100 MB",
        holds: within && ratio <= 3.0,
        // Memory and the exit, not the time: a quick run checks them.
        bound: Some(within),
    }
}

/// A live `pytest -v`-like log: bytes on the wire and line latency.
fn wire(src: &Path, lines: u32) -> Row {
    let load = load();
    let (wire, log, latencies) = live_log(src, lines);
    let factor = log as f64 / wire as f64;
    let smaller = log > 0 && factor >= 5.0;
    Row {
        measure: "bytes on the wire for a live `pytest -v`-like log (a write per ~34-byte line)"
            .into(),
        load,
        ours: format!(
            "{wire} bytes for a {log}-byte log; line latency median {:.0} ms, max {:.0} ms",
            latencies.0 * 1000.0,
            latencies.1 * 1000.0
        ),
        baseline: String::new(),
        ratio: format!("{factor:.1}x smaller"),
        required: "≥ 5x smaller than the log; live within 250 ms",
        holds: smaller && latencies.1 <= 0.25,
        bound: Some(smaller),
    }
}

/// Runs a pytest-like shard (a line a write, ~0.5 ms apart, each with the
/// time it was written) against `mvm-shard emulate` through a proxy that
/// counts what the emulator sends. Returns (bytes on the wire, bytes of
/// log, (median, max) seconds from a line's write to the invoker's stdout).
fn live_log(src: &Path, lines: u32) -> (u64, u64, (f64, f64)) {
    let mut emulator = Command::new(BINARY)
        .args(["emulate", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut endpoint = String::new();
    BufReader::new(emulator.stdout.take().unwrap())
        .read_line(&mut endpoint)
        .unwrap();
    let upstream = endpoint.trim().trim_start_matches("http://").to_string();
    let (proxy, wire) = counting_proxy(upstream);
    let script = format!(
        "import sys, time\n\
         for i in range({lines}):\n\
         \x20   sys.stdout.write('%.6f tests/t.py::test_%d PASSED\\n' % (time.time(), i))\n\
         \x20   sys.stdout.flush()\n\
         \x20   time.sleep(0.0005)\n"
    );
    let script_path: PathBuf = src.join("pytest_like.py");
    std::fs::write(&script_path, script).unwrap();
    let mut run = Command::new(BINARY)
        .args([
            "run",
            "--function",
            "mvm-shard",
            "--endpoint-url",
            &format!("http://{proxy}"),
        ])
        .args(["--region", "us-east-1", "--", "python3", "pytest_like.py"])
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .current_dir(src)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = 0u64;
    let mut latencies = Vec::new();
    for line in BufReader::new(run.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let Some(rest) = line.strip_prefix("[1/1] ") else {
            continue;
        };
        let Some(written) = rest.split(' ').next().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        log += rest.len() as u64 + 1;
        latencies.push(now - written);
    }
    let _ = run.wait();
    let _ = nix_kill(emulator.id());
    let _ = emulator.wait();
    let _ = std::fs::remove_file(&script_path);
    latencies.sort_by(f64::total_cmp);
    let median = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let max = latencies.last().copied().unwrap_or(f64::NAN);
    (wire.load(Ordering::Relaxed), log, (median, max))
}

fn nix_kill(pid: u32) -> i32 {
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) }
}

/// A loopback TCP proxy to `upstream`; counts the bytes coming back.
fn counting_proxy(upstream: String) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut c_in, mut c_out) = (client.try_clone().unwrap(), client);
            let (mut s_in, mut s_out) = (server.try_clone().unwrap(), server);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}
