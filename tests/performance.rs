//! The parts of issue #8's performance promises that can be checked without
//! a clock: memory bounds through the real CLI, and how the binary is linked.
//! Timings live in `cargo bench --bench overhead`.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A log line of 100 bytes, newline included.
const LINE: &str = "2026-11-30T05:00:00.000Z INFO tests/test_api.py::test_endpoint_returns_the_expected_document ok....\n";

/// `mvm-shard run --local -- COMMAND` in `dir`, its stdout piped.
fn spawn_local(dir: &std::path::Path, command: &[&str]) -> std::process::Child {
    Command::new(common::binary())
        .args(["run", "--local", "--timeout", "120s", "--"])
        .args(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A shard printing 60 MB to an invoker whose stdout is read slowly: the
/// bounded stages between the agent and stdout make the shard wait, so the
/// invoker holds a few buffers, not the log (which would need over 60 MB).
#[test]
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4 below, which also reports its peak memory"
)]
fn a_slow_reader_slows_a_long_log_down_instead_of_growing_the_invokers_memory() {
    const LOG_BYTES: usize = 60_000_000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "memory\n").unwrap();
    let script = format!("yes '{}' | head -c {LOG_BYTES}", &LINE[..LINE.len() - 1]);
    let mut child = spawn_local(dir.path(), &["sh", "-c", &script]);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        // About 2.5 s at least: a 64 KiB read every 2 ms.
        let (mut lines, mut others, mut buf) = (0usize, Vec::new(), vec![0u8; 64 * 1024]);
        let mut pending = Vec::new();
        loop {
            let n = stdout.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            let end = pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            for line in pending[..end].split_inclusive(|b| *b == b'\n') {
                match line.strip_prefix(b"[1/1] ") {
                    Some(rest) if rest == LINE.as_bytes() => lines += 1,
                    Some(rest) => others.push(String::from_utf8_lossy(rest).into_owned()),
                    None => {}
                }
            }
            pending.drain(..end);
            std::thread::sleep(Duration::from_millis(2));
        }
        (lines, others)
    });
    let (code, usage) = common::wait4_within(&child, Duration::from_secs(180));
    let (lines, others) = reader.join().unwrap();
    assert_eq!(code, 0);
    assert_eq!(lines, LOG_BYTES / LINE.len(), "every line once");
    // The shard's own line, and nothing else: no line came out changed.
    assert!(
        others.len() == 1 && others[0].starts_with("passed in"),
        "{others:?}"
    );
    eprintln!("invoker peak RSS: {} MiB", usage.ru_maxrss / 1024);
    assert!(
        usage.ru_maxrss < 64 * 1024,
        "the invoker's peak memory was {} KiB for a {LOG_BYTES}-byte log read slowly",
        usage.ru_maxrss
    );
}

/// Every shard starts the binary afresh as its agent: linked at a fixed
/// address, the loader has no relocations to apply and its pages stay shared.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_binary_is_linked_position_dependent_so_agents_start_without_relocating_it() {
    let mut header = [0u8; 18];
    std::fs::File::open(common::binary())
        .unwrap()
        .read_exact(&mut header)
        .unwrap();
    assert_eq!(&header[..4], b"\x7fELF");
    // e_type, little-endian on the targets we ship: 2 is ET_EXEC, 3 ET_DYN (a PIE).
    let e_type = u16::from_le_bytes([header[16], header[17]]);
    assert_eq!(e_type, 2, "the binary is a position-independent executable");
}

/// A command that prints fast gets 1 MiB pipes (Linux's default is 64 KiB):
/// it goes on while the agent compresses. A quiet one keeps the default, as
/// every byte of pipe size counts against the user's pipe pages.
#[test]
fn a_command_that_fills_its_pipes_gets_them_grown_to_a_mebibyte() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "pipes\n").unwrap();
    // F_GETPIPE_SZ is 1032 on Linux. A 64 KiB write fills an empty default
    // pipe at once; the next, of 128 KiB, does not fit in what the agent's
    // first (full) read frees, so it ends only after the agent grew the pipe.
    let script = "import fcntl, os\n\
                  quiet = (fcntl.fcntl(1, 1032), fcntl.fcntl(2, 1032))\n\
                  for fd in (2, 1):\n\
                  \x20   os.write(fd, b'.' * 65535 + b'\\n')\n\
                  \x20   os.write(fd, b'.' * 131071 + b'\\n')\n\
                  print('quiet', *quiet, 'busy', fcntl.fcntl(1, 1032), fcntl.fcntl(2, 1032))\n";
    let (code, stdout, stderr) = common::cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--timeout",
            "60s",
            "--",
            "python3",
            "-c",
            script,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let sizes = stdout
        .lines()
        .find(|l| l.starts_with("[1/1] quiet"))
        .unwrap_or_default();
    assert_eq!(sizes, "[1/1] quiet 65536 65536 busy 1048576 1048576");
}

/// The invoker's own stdout, when it is a pipe, is grown to 1 MiB as well:
/// a long log piped on goes out in fewer, larger writes.
#[test]
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4_within, which bounds the wait"
)]
fn the_invokers_stdout_pipe_is_grown_to_a_mebibyte() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "pipes\n").unwrap();
    let mut child = spawn_local(dir.path(), &["echo", "hello"]);
    let mut stdout = child.stdout.take().unwrap();
    let (code, _) = common::wait4_within(&child, Duration::from_secs(120));
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l == "[1/1] hello"), "{out}");
    // SAFETY: a plain query of a descriptor we own.
    let size = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert_eq!(size, 1024 * 1024);
}
