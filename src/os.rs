//! Process-tree control on Linux: find, signal and reap every process a command
//! started, including those that left its process group with `setsid`.
//!
//! Finding a tree walks only that tree (`/proc/<pid>/task/*/children`), never
//! all of `/proc`: with a thousand shards in flight, whole-`/proc` scans made
//! every teardown quadratic. The one scan that must look at every process
//! (a marker variable, for processes that left the tree) runs on one thread
//! for the whole process and serves every teardown waiting at that moment.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// Caps glibc's malloc arenas at two. By default every thread that meets a
/// locked arena gets one of its own (up to eight per core), and memory freed
/// in one is never reused by another: with a thousand shards in flight the
/// invoker's peak resident memory was 10-20 % higher from that alone. Call
/// it before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Makes this process the reaper of every orphan below it, so that a daemon
/// that double-forks or calls `setsid` stays in our tree and can be found.
pub fn become_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
}

/// Whether this process is a subreaper: then nothing it starts can leave its
/// tree, and a marker scan for escaped processes cannot find any.
pub fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
}

/// Live (non-zombie) processes whose parent chain leads to `root`, excluding `root`.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut found: HashSet<u32> = HashSet::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let Some(children) = children_of(pid) else {
            if pid == root && std::path::Path::new(&format!("/proc/{root}")).exists() {
                // A kernel without /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN).
                return descendants_by_scan(root);
            }
            continue;
        };
        for child in children {
            if found.insert(child) {
                queue.push(child);
            }
        }
    }
    let mut list: Vec<u32> = found.into_iter().filter(|&p| is_alive(p)).collect();
    list.sort_unstable();
    list
}

/// Direct children of `pid` (zombies included), from every thread's
/// `children` file; `None` when they cannot be read.
fn children_of(pid: u32) -> Option<Vec<u32>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut children = Vec::new();
    let mut readable = false;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        readable = true;
        children.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    readable.then_some(children)
}

/// [`descendants`] for kernels without `children` files: one pass over `/proc`.
fn descendants_by_scan(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .filter_map(|pid| match stat_state_and_parent(pid) {
            Some((state, ppid)) if state != 'Z' && state != 'X' => Some((pid, ppid)),
            _ => None,
        })
        .collect();
    let mut found: HashSet<u32> = HashSet::from([root]);
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid) in &parents {
            if found.contains(&ppid) && found.insert(pid) {
                grew = true;
            }
        }
    }
    found.remove(&root);
    let mut list: Vec<u32> = found.into_iter().collect();
    list.sort_unstable();
    list
}

fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
}

fn stat_state_and_parent(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Live processes (other than this one) whose environment holds `name=value`.
/// A marker variable follows a command's processes wherever they reparent,
/// the way Jenkins' process-tree killer finds a build's leftovers.
pub fn processes_marked(name: &str, value: &str) -> Vec<u32> {
    let needle = format!("{name}={value}");
    let mut found = scan_marked(&[needle.as_bytes()]).remove(0);
    found.sort_unstable();
    found
}

/// For each needle (`name=value`), the live processes other than this one
/// whose environment holds it: one pass over `/proc` for all of them.
fn scan_marked(needles: &[&[u8]]) -> Vec<Vec<u32>> {
    let me = std::process::id();
    // A thousand environments ending together make a batch of a thousand
    // needles, checked against every variable of every process.
    let index: HashMap<&[u8], usize> = needles.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut found = vec![Vec::new(); needles.len()];
    let mut env = Vec::with_capacity(64 * 1024);
    let candidates = escape_candidates().unwrap_or_else(|| all_pids().collect());
    for pid in candidates.into_iter().filter(|&pid| pid != me) {
        if read_environ(pid, &mut env).is_err() {
            continue;
        }
        let mut marked = false;
        for var in env.split(|b| *b == 0) {
            if let Some(&i) = index.get(var) {
                found[i].push(pid);
                marked = true;
            }
        }
        if marked && !is_alive(pid) {
            for list in &mut found {
                list.retain(|p| *p != pid);
            }
        }
    }
    found
}

/// Where a process that left one of our trees can be: orphans go to the
/// nearest living subreaper above their dead parent, or to init. Above a
/// process of ours that is this process or one of its ancestors, so an
/// escaped process is a direct child of one of them (or of this process
/// when it is a subreaper); it stays there until it dies, and what it starts
/// is below it. Reading only those children keeps a sweep from reading
/// every process's environment, with a thousand shards in flight most of
/// them ours. `None` when the kernel cannot list children.
fn escape_candidates() -> Option<Vec<u32>> {
    let me = std::process::id();
    let mut candidates = Vec::new();
    if is_subreaper() {
        candidates.extend(children_of(me)?);
    }
    let (mut below, mut pid) = (me, stat_state_and_parent(me)?.1);
    // Parent 0: the top of this pid namespace (or the kernel's own threads).
    while pid != 0 {
        candidates.extend(children_of(pid)?.into_iter().filter(|&c| c != below));
        (below, pid) = (pid, stat_state_and_parent(pid)?.1);
    }
    Some(candidates)
}

/// Reads `/proc/<pid>/environ` into `buf`, reused from process to process.
fn read_environ(pid: u32, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/environ"))?.read_to_end(buf)?;
    Ok(())
}

/// Kills (SIGKILL) every process carrying the marker and everything below
/// them; returns how many there were.
pub fn kill_marked(name: &str, value: &str) -> u32 {
    kill_marked_all(&[format!("{name}={value}")])[0]
}

/// [`kill_marked`] for many markers (`name=value`) at once, with one scan
/// per round; returns how many processes each marker had.
fn kill_marked_all(needles: &[String]) -> Vec<u32> {
    let needles: Vec<&[u8]> = needles.iter().map(|n| n.as_bytes()).collect();
    let mut killed: Vec<HashSet<u32>> = vec![HashSet::new(); needles.len()];
    let mut pause = Duration::from_millis(1);
    for _ in 0..10 {
        let mut any = false;
        for (i, marked) in scan_marked(&needles).into_iter().enumerate() {
            let mut targets = marked.clone();
            for pid in marked {
                targets.extend(descendants(pid));
            }
            targets.retain(|p| !killed[i].contains(p));
            if targets.is_empty() {
                continue;
            }
            any = true;
            signal_all(&targets, Signal::SIGSTOP);
            signal_all(&targets, Signal::SIGKILL);
            killed[i].extend(targets);
        }
        if !any {
            break;
        }
        // Give the kills a moment to land before looking for what forked meanwhile.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    killed.iter().map(|k| k.len() as u32).collect()
}

struct MarkerSweep {
    needle: String,
    done: oneshot::Sender<u32>,
}

/// Kills every process carrying `name=value` and everything below them, as
/// [`kill_marked`] does, but shares the `/proc` scan with every other sweep
/// waiting at the same moment: one thread serves them all in batches, so a
/// thousand teardowns cost a few scans, not a thousand.
pub async fn kill_marked_shared(name: &str, value: &str) -> u32 {
    static SWEEPER: OnceLock<std::sync::Mutex<std_mpsc::Sender<MarkerSweep>>> = OnceLock::new();
    let sweeper = SWEEPER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<MarkerSweep>();
        // Should the thread not start, sends fail and each sweep runs on its own below.
        let _ = std::thread::Builder::new()
            .name("marker-sweeper".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let batch: Vec<MarkerSweep> =
                        std::iter::once(first).chain(rx.try_iter()).collect();
                    let mut unique: Vec<String> = batch.iter().map(|s| s.needle.clone()).collect();
                    unique.sort();
                    unique.dedup();
                    let counts: HashMap<String, u32> = unique
                        .iter()
                        .cloned()
                        .zip(kill_marked_all(&unique))
                        .collect();
                    for sweep in batch {
                        let _ = sweep
                            .done
                            .send(counts.get(&sweep.needle).copied().unwrap_or(0));
                    }
                }
            });
        std::sync::Mutex::new(tx)
    });
    let (done, answer) = oneshot::channel();
    let needle = format!("{name}={value}");
    let sent = sweeper
        .lock()
        .map(|tx| tx.send(MarkerSweep { needle, done }).is_ok())
        .unwrap_or(false);
    if !sent {
        // No sweeper thread: do it here.
        let (name, value) = (name.to_string(), value.to_string());
        return tokio::task::spawn_blocking(move || kill_marked(&name, &value))
            .await
            .unwrap_or(0);
    }
    answer.await.unwrap_or(0)
}

/// `remove_dir_all` that first makes read-only folders writable, as test
/// suites (Go's module cache, for one) like to leave them. Links are
/// removed, never followed.
pub fn remove_dir_all_writable(path: &Path) -> std::io::Result<()> {
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
    }
    std::fs::remove_dir_all(path)
}

/// When process `pid` started (clock ticks after boot, `/proc/PID/stat`
/// field 22): with its id, what tells it from a later process given the
/// same id. `None` when it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 22; the state was field 3.
    fields.nth(22 - 4)?.parse().ok()
}

/// Whether a process with this id is alive (a zombie counts as gone).
pub fn is_alive(pid: u32) -> bool {
    matches!(stat_state_and_parent(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Sends `signal` to a whole process group; a group already gone is not an error.
pub fn signal_group(pgid: u32, signal: Signal) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pgid as i32), signal);
}

fn signal_all(pids: &[u32], signal: Signal) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

/// Reaps every exited child of this process. Only call it when no child is
/// awaited elsewhere (tokio's own `Child::wait` would lose its status).
pub fn reap_exited_children() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

/// Ends every descendant of `root`: SIGTERM, up to `grace` to exit, then SIGKILL
/// until none is left. Returns how many distinct processes were found.
/// With `reap`, exited children of this process are reaped as they die and
/// before it returns, even when nothing was left to kill: a daemon the
/// subreaper adopted and an earlier call killed (at a timeout, while the
/// command's own status was still awaited) must not stay a zombie.
pub async fn end_descendants(root: u32, grace: Duration, reap: bool) -> u32 {
    let reap = || {
        if reap {
            reap_exited_children();
        }
    };
    let mut seen: HashSet<u32> = HashSet::new();
    let first = descendants(root);
    if first.is_empty() {
        reap();
        return 0;
    }
    seen.extend(&first);
    signal_all(&first, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    // A process in uninterruptible sleep may outlive SIGKILL for a while; never hang on it.
    let give_up = deadline + Duration::from_secs(10);
    // Exits are looked for soon, then less often: most processes die at once.
    let mut pause = Duration::from_millis(1);
    loop {
        reap();
        let left = descendants(root);
        seen.extend(&left);
        if left.is_empty() {
            break;
        }
        let now = tokio::time::Instant::now();
        if now >= give_up {
            tracing::warn!(?left, "processes survived SIGKILL");
            break;
        }
        if now >= deadline {
            // Stop them first so none can fork a replacement while we kill the rest.
            signal_all(&left, Signal::SIGSTOP);
            let left = descendants(root);
            seen.extend(&left);
            signal_all(&left, Signal::SIGKILL);
        }
        let wake = (now + pause).min(if now < deadline { deadline } else { give_up });
        tokio::time::sleep_until(wake).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    reap();
    seen.len() as u32
}

/// Makes this process's memory, environment and open files unreadable to
/// other processes of the same user (`/proc/PID/environ`, `mem`, `fd`, ptrace).
/// The commands mvm-shard starts run as that user and must not reach the
/// credentials in its environment; their own programs get the default back
/// when they `exec`. Only root (or CAP_SYS_PTRACE) still sees through.
pub fn hide_from_same_user() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

/// Asks the kernel for a pipe buffer of `bytes` (Linux's default is 64 KiB),
/// so that a writer in a burst fills it while its reader is busy instead of
/// blocking and being woken every 64 KiB. Best effort: past the system's
/// limits (`/proc/sys/fs/pipe-max-size`, a user's pipe pages) the pipe keeps
/// its size. Returns the size the pipe has now.
pub fn grow_pipe(pipe: &impl std::os::fd::AsRawFd, bytes: usize) -> Option<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    let wanted = i32::try_from(bytes).unwrap_or(i32::MAX);
    let _ = fcntl(pipe.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(wanted));
    pipe_size(pipe)
}

/// This process's stdout, written with a `write(2)` per call: for a writer
/// that buffers whole lines itself (std's own stdout would write the end of
/// each buffer, a line's start, in a second tiny write after the next one).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawStdout;

impl std::io::Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        nix::unistd::write(std::io::stdout(), buf).map_err(std::io::Error::from)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of a pipe's buffer, or `None` when `pipe` is not a pipe.
pub fn pipe_size(pipe: &impl std::os::fd::AsRawFd) -> Option<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    fcntl(pipe.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
}

/// Marks every descriptor above 2 that this process inherited close-on-exec,
/// so none reaches the commands it starts (a socket, a pipe to a parent, a
/// jobserver). Descriptors opened from here on are close-on-exec already.
pub fn close_inherited_descriptors_on_exec() -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let inherited: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in inherited {
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            // The listing's own descriptor is closed by now.
            Ok(_) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Rewrites this process's command line in place, as `/proc/PID/cmdline`
/// shows it to every process on the machine; `edit` gets the NUL-separated
/// arguments and must keep their length. Call it only after the arguments
/// have been parsed: `std::env::args` reads the same memory.
pub fn rewrite_command_line(edit: impl FnOnce(&mut [u8])) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let malformed = || std::io::Error::other("unexpected /proc/self/stat");
    // Fields resume after the command name's last ')' at field 3; arg_start is field 48.
    let fields: Vec<u64> = stat[stat.rfind(')').ok_or_else(malformed)? + 1..]
        .split_whitespace()
        .skip(45)
        .take(2)
        .map(|f| f.parse().map_err(|_| malformed()))
        .collect::<Result<_, _>>()?;
    let [start, end] = fields[..] else {
        return Err(malformed());
    };
    let mut mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    let mut args = vec![0; end.saturating_sub(start) as usize];
    mem.seek(SeekFrom::Start(start))?;
    mem.read_exact(&mut args)?;
    let before = args.len();
    edit(&mut args);
    if args.len() != before {
        return Err(std::io::Error::other(
            "a rewritten command line must keep its length",
        ));
    }
    mem.seek(SeekFrom::Start(start))?;
    mem.write_all(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_walk_finds_grandchildren_and_skips_zombies() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut below = descendants(pid);
        while (below.len() < 2 || is_alive(zombie.id())) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            below = descendants(pid);
        }
        assert_eq!(below.len(), 2, "{below:?}");
        assert_eq!(below, descendants_by_scan(pid));
        let mine = descendants(std::process::id());
        assert!(mine.contains(&pid), "{mine:?}");
        assert!(below.iter().all(|p| mine.contains(p)), "{mine:?}");
        assert!(
            !mine.contains(&zombie.id()),
            "a zombie is no live descendant"
        );
        signal_all(&below, Signal::SIGKILL);
        child.kill().unwrap();
        let _ = child.wait();
        let _ = zombie.wait();
    }

    #[test]
    fn a_marked_process_that_left_the_tree_is_found_and_killed() {
        let marker = format!("escaped-{}", std::process::id());
        // setsid and a parent that exits at once: the sleep is reparented to
        // a subreaper above this process, or to init.
        let out = std::process::Command::new("sh")
            .args(["-c", "setsid sh -c 'sleep 300 >/dev/null 2>&1 & echo $!'"])
            .env("MVM_SHARD_TEST_MARKER", &marker)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while descendants(std::process::id()).contains(&pid) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_alive(pid), "the escaped sleep {pid} runs");
        assert!(
            !descendants(std::process::id()).contains(&pid),
            "{pid} left this process's tree"
        );
        assert_eq!(
            processes_marked("MVM_SHARD_TEST_MARKER", &marker),
            vec![pid]
        );
        assert_eq!(kill_marked("MVM_SHARD_TEST_MARKER", &marker), 1);
        while is_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_alive(pid), "the escaped sleep {pid} was killed");
    }
}
