//! Why a run that passes with `--local` would be refused or fail on Lambda:
//! a source over what a request carries, a command the image does not have,
//! a file outside the source. A local shard runs on this machine, so these
//! would otherwise pass unnoticed until the first deployed run; `run --local`
//! reports each [`Concern`] as a warning before the shards start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::plan::human_bytes;

/// The image's commands by toolchain, one `group: command...` line each; the
/// image build checks the same file (lambda-image/toolchain.sh).
const IMAGE_COMMANDS: &str = include_str!("../lambda-image/commands.txt");

/// Shell words after which the next word is the program.
const PREFIX_WORDS: &[&str] = &[
    "!", "{", "(", "if", "then", "else", "elif", "do", "while", "until", "time", "exec", "command",
    "env", "nohup", "xargs",
];

/// Shell builtins: what follows them is not a program.
const BUILTINS: &[&str] = &[
    "[", "[[", ".", ":", "}", "alias", "break", "case", "cd", "continue", "done", "esac", "eval",
    "exit", "export", "fi", "for", "function", "local", "read", "return", "set", "shift", "source",
    "trap", "type", "ulimit", "umask", "unset", "wait",
];

/// Folders a deployed image has too, so a path under them is not "outside".
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr",
];

/// One reason the run would not go the same way on Lambda.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concern {
    /// The packed source is over what fits in an Invoke request.
    SourceTooLarge {
        /// Compressed size of the source.
        size: u64,
        /// What fits in a request with this run's other fields.
        limit: u64,
    },
    /// The `--include` archive is over what fits in an Invoke request.
    IncludesTooLarge {
        /// Compressed size of the includes.
        size: u64,
        /// What fits in a request.
        limit: u64,
    },
    /// A program the command starts is not in the default image.
    NotInImage {
        /// The program's name.
        program: String,
    },
    /// The command names a file of this machine outside the source.
    OutsideSource {
        /// The path as the command gives it.
        path: String,
    },
    /// A variable of `--env` names a file of this machine outside the source.
    EnvOutsideSource {
        /// The variable.
        name: String,
        /// Its value.
        path: String,
    },
}

impl std::fmt::Display for Concern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concern::SourceTooLarge { size, limit } => write!(
                f,
                "the source is {} compressed, over the {} a Lambda request carries: \
                 this run would be refused on Lambda without --artifacts (in GitHub \
                 Actions, the default `source: github` fetches it in each shard instead)",
                human_bytes(*size),
                human_bytes(*limit)
            ),
            Concern::IncludesTooLarge { size, limit } => write!(
                f,
                "the includes are {} compressed, over the {} a Lambda request carries: \
                 on Lambda this run needs --artifacts s3://BUCKET/PREFIX",
                human_bytes(*size),
                human_bytes(*limit)
            ),
            Concern::NotInImage { program } => write!(
                f,
                "`{program}` is not a command of the default Lambda image \
                 (lambda-image/commands.txt): it runs here because this machine's PATH \
                 travels into local shards, but on Lambda the shard would exit 127; add it \
                 to the image, or start it through the project's tools (npx, uv run, \
                 cargo, go run)"
            ),
            Concern::OutsideSource { path } => write!(
                f,
                "the command uses {path}, a file of this machine outside the source: \
                 local shards can reach it, shards on Lambda cannot"
            ),
            Concern::EnvOutsideSource { name, path } => write!(
                f,
                "--env {name}={path} names a file of this machine outside the source: \
                 local shards can reach it, shards on Lambda cannot"
            ),
        }
    }
}

/// What would not hold on Lambda for `command` with the variables `env`
/// (`--env`), run from `cwd` on a source rooted at `source_root` whose
/// archive is `source_size` bytes against a request budget of
/// `inline_budget` bytes.
pub fn concerns(
    command: &[String],
    env: &BTreeMap<String, String>,
    cwd: &Path,
    source_root: &Path,
    source_size: u64,
    inline_budget: u64,
) -> Vec<Concern> {
    let mut found = Vec::new();
    if source_size > inline_budget {
        found.push(Concern::SourceTooLarge {
            size: source_size,
            limit: inline_budget,
        });
    }
    let (programs, words) = programs_and_words(command);
    for program in programs {
        if !program.contains('/') && !in_image(&program) {
            let concern = Concern::NotInImage { program };
            if !found.contains(&concern) {
                found.push(concern);
            }
        }
    }
    let root = real(source_root);
    let outside = |word: &str| {
        host_path(word, cwd).map(|p| real(&p)).is_some_and(|path| {
            let system = SYSTEM_DIRS.iter().any(|d| path.starts_with(d));
            path.exists() && !system && !path.starts_with(&root)
        })
    };
    for word in words {
        if outside(&word) {
            let concern = Concern::OutsideSource { path: word };
            if !found.contains(&concern) {
                found.push(concern);
            }
        }
    }
    for (name, value) in env {
        if outside(value) {
            found.push(Concern::EnvOutsideSource {
                name: name.clone(),
                path: value.clone(),
            });
        }
    }
    found
}

/// The includes of `size` compressed bytes, if Lambda could not take them
/// in a request (with `--local` and no store they are served over loopback).
pub fn includes(size: u64) -> Option<Concern> {
    let limit = ((crate::protocol::MAX_REQUEST_BYTES - 64 * 1024) / 4 * 3) as u64;
    (size > limit).then_some(Concern::IncludesTooLarge { size, limit })
}

fn in_image(program: &str) -> bool {
    IMAGE_COMMANDS
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, commands)| commands.split_whitespace().any(|c| c == program))
}

/// The programs a command starts (looking into `sh -c SCRIPT` and
/// `bash -c SCRIPT`, and past `env`), and all of its words.
fn programs_and_words(command: &[String]) -> (Vec<String>, Vec<String>) {
    let mut programs = Vec::new();
    let mut words = Vec::new();
    let is_shell = command
        .first()
        .is_some_and(|c| matches!(c.rsplit('/').next(), Some("sh" | "bash")));
    let script = if is_shell {
        command
            .iter()
            .skip(1)
            .skip_while(|a| a.starts_with('-') && *a != "-c")
            .nth(1)
    } else {
        None
    };
    match script {
        Some(script) => {
            programs.push(command[0].clone());
            for segment in script.split(['\n', ';', '|', '&', '(', ')', '`']) {
                let segment: Vec<&str> = segment.split_whitespace().collect();
                words.extend(segment.iter().map(|w| unquote(w)));
                if let Some(program) = first_program(&segment) {
                    programs.push(program);
                }
            }
        }
        None => {
            let segment: Vec<&str> = command.iter().map(String::as_str).collect();
            words.extend(command.iter().cloned());
            programs.extend(first_program(&segment));
        }
    }
    (programs, words)
}

/// The first word of a simple command that is a program: past assignments,
/// `env` and its options, and shell keywords and builtins.
fn first_program(words: &[&str]) -> Option<String> {
    let mut rest = words.iter().map(|w| unquote(w));
    loop {
        let word = rest.next()?;
        let assignment = word.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if BUILTINS.contains(&word.as_str()) {
            return None;
        }
        let skip = assignment
            || (word.starts_with('-') && word.len() > 1)
            || PREFIX_WORDS.contains(&word.as_str());
        if skip {
            continue;
        }
        // Variables, substitutions and redirections are decided at run time.
        if word.is_empty() || word.contains(['$', '<', '>', '{', '*']) {
            return None;
        }
        return Some(word);
    }
}

fn unquote(word: &str) -> String {
    word.trim_matches(['\'', '"']).to_string()
}

/// The host path a command word names, if it is one: absolute, `~/...`, or
/// relative with `..` (which may climb out of the source).
fn host_path(word: &str, cwd: &Path) -> Option<PathBuf> {
    let word = word.split_once('=').map_or(word, |(_, value)| value);
    if word.starts_with('/') {
        Some(PathBuf::from(word))
    } else if let Some(rest) = word.strip_prefix("~/") {
        Some(PathBuf::from(std::env::var_os("HOME")?).join(rest))
    } else if word.split('/').any(|part| part == "..") {
        Some(cwd.join(word))
    } else {
        None
    }
}

fn real(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    fn check(command: &[&str], root: &Path) -> Vec<Concern> {
        concerns(&words(command), &BTreeMap::new(), root, root, 10, 100)
    }

    #[test]
    fn image_commands_pass_and_others_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(
            check(
                &[
                    "cargo",
                    "nextest",
                    "run",
                    "--partition",
                    "count:{index}/{count}"
                ],
                root
            ),
            vec![]
        );
        assert_eq!(
            check(
                &["sh", "-c", "npm ci && npx jest --shard={index}/{count}"],
                root
            ),
            vec![]
        );
        assert_eq!(
            check(&["pytest", "-q"], root),
            vec![Concern::NotInImage {
                program: "pytest".into()
            }]
        );
        assert_eq!(
            check(
                &[
                    "bash",
                    "-c",
                    "CI=1 uv sync && gotestsum ./... | tee log; cd x; jest"
                ],
                root
            ),
            vec![
                Concern::NotInImage {
                    program: "gotestsum".into()
                },
                Concern::NotInImage {
                    program: "jest".into()
                }
            ]
        );
        // A script of the source is the source's business.
        assert_eq!(check(&["./run-tests.sh"], root), vec![]);
    }

    #[test]
    fn files_of_this_machine_outside_the_source_are_named() {
        let outside = tempfile::tempdir().unwrap();
        let repo = tempfile::tempdir().unwrap();
        let tool = outside.path().join("tool");
        std::fs::write(&tool, "").unwrap();
        std::fs::write(repo.path().join("inside"), "").unwrap();
        let tool = tool.to_str().unwrap();
        let inside = repo.path().join("inside");
        let script = format!("{tool} --config {}", inside.display());
        let found = check(&["sh", "-c", &script], repo.path());
        assert_eq!(
            found,
            vec![Concern::OutsideSource {
                path: tool.to_string()
            }]
        );
        let env = BTreeMap::from([
            ("TOOL".to_string(), tool.to_string()),
            ("CONFIG".to_string(), inside.display().to_string()),
            ("MODE".to_string(), "fast".to_string()),
        ]);
        let found = concerns(&words(&["true"]), &env, repo.path(), repo.path(), 1, 1);
        assert_eq!(
            found,
            vec![Concern::EnvOutsideSource {
                name: "TOOL".into(),
                path: tool.to_string()
            }]
        );
        // System folders exist in the image as well.
        assert_eq!(
            check(&["cat", "/etc/hostname", "/usr/bin/env"], repo.path()),
            vec![]
        );
    }

    #[test]
    fn a_source_over_the_request_budget_is_a_concern() {
        let dir = tempfile::tempdir().unwrap();
        let no_env = BTreeMap::new();
        let found = concerns(&words(&["true"]), &no_env, dir.path(), dir.path(), 200, 100);
        assert_eq!(
            found,
            vec![Concern::SourceTooLarge {
                size: 200,
                limit: 100
            }]
        );
        assert!(found[0].to_string().contains("refused on Lambda"));
        assert_eq!(includes(1024), None);
        let big = includes(10 * 1024 * 1024).unwrap();
        assert!(big.to_string().contains("--artifacts"), "{big}");
    }

    #[test]
    fn every_image_command_line_names_a_toolchain_group() {
        let groups: Vec<&str> = IMAGE_COMMANDS
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split_once(':').expect("group: commands").0)
            .collect();
        assert_eq!(
            groups,
            ["os", "build", "python", "uv", "node", "rust", "go", "java"]
        );
    }
}
