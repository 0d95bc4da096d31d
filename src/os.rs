//! Process-tree control on Linux: find, signal and reap every process a command
//! started, including those that left its process group with `setsid`.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Makes this process the reaper of every orphan below it, so that a daemon
/// that double-forks or calls `setsid` stays in our tree and can be found.
pub fn become_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
}

/// Live (non-zombie) processes whose parent chain leads to `root`, excluding `root`.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((state, ppid)) = stat_state_and_parent(pid) {
            if state != 'Z' && state != 'X' {
                parents.push((pid, ppid));
            }
        }
    }
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
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && is_alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect();
    found.sort_unstable();
    found
}

/// Kills (SIGKILL) every process carrying the marker and everything below
/// them; returns how many there were.
pub fn kill_marked(name: &str, value: &str) -> u32 {
    let mut killed = HashSet::new();
    for _ in 0..10 {
        let mut targets = processes_marked(name, value);
        for pid in targets.clone() {
            targets.extend(descendants(pid));
        }
        targets.retain(|p| !killed.contains(p));
        if targets.is_empty() {
            break;
        }
        signal_all(&targets, Signal::SIGSTOP);
        signal_all(&targets, Signal::SIGKILL);
        killed.extend(targets);
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len() as u32
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
/// With `reap`, exited children of this process are reaped as they die (for a
/// subreaper whose orphans would otherwise stay zombies).
pub async fn end_descendants(root: u32, grace: Duration, reap: bool) -> u32 {
    let mut seen: HashSet<u32> = HashSet::new();
    let first = descendants(root);
    if first.is_empty() {
        return 0;
    }
    seen.extend(&first);
    signal_all(&first, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    // A process in uninterruptible sleep may outlive SIGKILL for a while; never hang on it.
    let give_up = deadline + Duration::from_secs(10);
    loop {
        if reap {
            reap_exited_children();
        }
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if reap {
        reap_exited_children();
    }
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
