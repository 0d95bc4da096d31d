//! Replaying a run's plan: every run records what each shard was given (its
//! tests with `--runner`, the command and the runner), and `--replay-plan
//! FILE --only K` runs exactly shard K's part again, here with `--local` or
//! on the configured backend, without listing or planning anew.
//!
//! A plan also records what it was made from (the source's commit, the
//! command, the runner and its listing, the shard count, the learned
//! timings it planned with), so that the matrix jobs of a workflow run can
//! each run their share of one published plan (`--plan-only`, then
//! `--replay-plan FILE --only K`) and a job whose inputs differ refuses.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::Share;
use crate::runner::RunnerKind;

/// The plan file's format; a file of another format is refused (exit 2).
pub const FORMAT: u32 = 2;

/// The largest plan file read: a plan of a million test ids is well under
/// it, and what is larger is not a plan.
const MAX_PLAN_BYTES: u64 = 256 << 20;

/// Where a run's plan goes next to its report: `junit.xml` → `junit.plan.json`.
pub fn next_to_report(report: &Path) -> PathBuf {
    report.with_extension("plan.json")
}

/// Where a run's plan goes by default: `mvm-shard/plan.json` in the git
/// directory of the worktree, next to the learned timings; `None` outside
/// a git repository.
pub fn default_path(source_root: &Path) -> Option<PathBuf> {
    crate::runner::timings::default_path(source_root).map(|p| p.with_file_name("plan.json"))
}

/// A bad `--replay-plan` (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file cannot be read.
    #[error("--replay-plan {path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a plan.
    #[error("--replay-plan {path}: not a plan mvm-shard wrote ({problem})")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The plan was written by an incompatible version.
    #[error("--replay-plan {path}: a plan of format {found}, written by another version of mvm-shard; this one reads format {FORMAT}: replay it with the version that ran it")]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
    /// The replay's own inputs differ from what the plan was made from.
    #[error(
        "--replay-plan {path}: {what}: run it with the inputs it was made from, or plan again"
    )]
    Differs {
        /// The file.
        path: PathBuf,
        /// What differs, in words.
        what: String,
    },
    /// A plan whose command held a masked value, replayed without a command.
    #[error("--replay-plan {path}: its command held a value asked to be masked (--mask), so the plan does not have it: give the command again after --")]
    MaskedCommand {
        /// The file.
        path: PathBuf,
    },
}

/// What stands for a masked value in a recorded command.
pub const MASKED: &str = "***";

/// What a run planned, as recorded for a replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedPlan {
    /// [`FORMAT`].
    pub format: u32,
    /// The run that planned it.
    pub run_id: String,
    /// How many shards.
    pub shards: u32,
    /// The command template, `{tests}` and `{index}` not yet replaced, with
    /// each masked value (`--mask`) written as [`MASKED`].
    pub command: Vec<String>,
    /// Whether the command held a masked value: then a replay takes the
    /// command again after `--`, and refuses to run without it.
    #[serde(default)]
    pub masked: bool,
    /// The runner (`--runner`), by its command-line name.
    pub runner: Option<String>,
    /// With `--runner`: each shard's tests and expected seconds, by index - 1.
    pub shares: Option<Vec<RecordedShare>>,
    /// The commit the tests were listed at (`GITHUB_SHA` with `--source-from
    /// github`, else the source's `HEAD`); `None` outside a git repository.
    #[serde(default)]
    pub commit: Option<String>,
    /// With `--runner`: the shell command that listed the tests.
    #[serde(default)]
    pub list_command: Option<String>,
    /// With `--runner`: the learned seconds per test it was planned with.
    /// Every job that replays the plan learns as from this snapshot, so
    /// that their timings files merge (`merge-timings`).
    #[serde(default)]
    pub planned_with: Option<BTreeMap<String, f64>>,
}

/// What a replay was given, to be checked against what its plan was made from.
#[derive(Debug, Default)]
pub struct ReplayInputs<'a> {
    /// The command after `--`, masked as the plan records it (empty: none given).
    pub command: Vec<String>,
    /// `--shards`, when given.
    pub shards: Option<u32>,
    /// `--runner`, when given.
    pub runner: Option<RunnerKind>,
    /// With `--runner`: the command that would list the tests.
    pub list_command: Option<&'a str>,
    /// The commit of the source here.
    pub commit: Option<&'a str>,
}

/// One shard's part of a recorded plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedShare {
    /// Its test ids.
    pub tests: Vec<String>,
    /// Expected seconds.
    pub expected: f64,
}

impl RecordedPlan {
    /// The plan of a run; `secrets` are the values asked to be masked, kept
    /// out of the recorded command.
    pub fn new(
        run_id: &str,
        shards: u32,
        command: &[String],
        secrets: &[&str],
        runner: Option<RunnerKind>,
        shares: Option<&[Share]>,
    ) -> Self {
        use clap::ValueEnum;
        // Line by line, as GitHub masks them, the longest first.
        let mut secrets: Vec<&str> = secrets
            .iter()
            .flat_map(|s| s.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let recorded: Vec<String> = command
            .iter()
            .map(|arg| {
                secrets
                    .iter()
                    .fold(arg.clone(), |arg, secret| arg.replace(secret, MASKED))
            })
            .collect();
        RecordedPlan {
            format: FORMAT,
            run_id: run_id.to_string(),
            shards,
            masked: recorded != command,
            command: recorded,
            runner: runner
                .and_then(|r| r.to_possible_value())
                .map(|v| v.get_name().to_string()),
            shares: shares.map(|shares| {
                shares
                    .iter()
                    .map(|s| RecordedShare {
                        tests: s.tests.clone(),
                        expected: s.expected,
                    })
                    .collect()
            }),
            commit: None,
            list_command: None,
            planned_with: None,
        }
    }

    /// The command as this plan would record it, each masked value (`secrets`) as [`MASKED`].
    pub fn masked_command(command: &[String], secrets: &[&str]) -> Vec<String> {
        RecordedPlan::new("", 1, command, secrets, None, None).command
    }

    /// Every test of the plan, sorted: the listing it was made from.
    pub fn tests(&self) -> Vec<String> {
        let mut tests: Vec<String> = self
            .shares
            .iter()
            .flatten()
            .flat_map(|s| s.tests.iter().cloned())
            .collect();
        tests.sort();
        tests.dedup();
        tests
    }

    /// Checks a replay's own inputs against what the plan was made from:
    /// the first that differs, in words (one line), when one does.
    pub fn differs(&self, given: &ReplayInputs<'_>) -> Option<String> {
        let short = |commit: &str| commit.chars().take(12).collect::<String>();
        if let Some(shards) = given.shards.filter(|s| *s != self.shards) {
            return Some(format!(
                "it was made for {}, not {shards}",
                crate::report::plural(self.shards as usize, "shard")
            ));
        }
        if !given.command.is_empty() && given.command != self.command {
            return Some(format!(
                "it was made for the command {:?}, not {:?}",
                self.command.join(" "),
                given.command.join(" ")
            ));
        }
        if let Some(runner) = given.runner {
            if self.runner_kind() != Some(runner) {
                use clap::ValueEnum;
                let name = runner
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                return Some(match &self.runner {
                    Some(made) => format!("it was made with --runner {made}, not {name}"),
                    None => format!("it was made without --runner, not with --runner {name}"),
                });
            }
        }
        if let (Some(made), Some(given)) = (&self.list_command, given.list_command) {
            if made != given {
                return Some(format!(
                    "its tests were listed with {made:?}, not {given:?} (--files or --list-command)"
                ));
            }
        }
        match (&self.commit, given.commit) {
            (Some(made), Some(here)) if made != here => Some(format!(
                "it was made at commit {}, this source is at {}",
                short(made),
                short(here)
            )),
            (Some(made), None) => Some(format!(
                "it was made at commit {}, this source has no commit",
                short(made)
            )),
            _ => None,
        }
    }

    /// Reads a plan, refusing one of another format.
    pub fn load(path: &Path) -> Result<Self, ReplayError> {
        Self::load_at_most(path, MAX_PLAN_BYTES)
    }

    /// [`RecordedPlan::load`] of a file of at most `limit` bytes: a file
    /// no run wrote (a log, a disk image given by mistake) is refused
    /// before it is read whole.
    fn load_at_most(path: &Path, limit: u64) -> Result<Self, ReplayError> {
        use std::io::Read;
        let read = |source| ReplayError::Read {
            path: path.to_path_buf(),
            source,
        };
        let parse = |problem: String| ReplayError::Parse {
            path: path.to_path_buf(),
            problem,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
            .map_err(read)?;
        if text.len() as u64 > limit {
            return Err(parse(format!("it is larger than {} MiB", limit >> 20)));
        }
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        match value.get("format").and_then(serde_json::Value::as_u64) {
            Some(found) if found == u64::from(FORMAT) => {}
            Some(found) => {
                return Err(ReplayError::Format {
                    path: path.to_path_buf(),
                    found: u32::try_from(found).unwrap_or(u32::MAX),
                })
            }
            None => return Err(parse("it has no format number".into())),
        }
        let mut plan: RecordedPlan =
            serde_json::from_value(value).map_err(|e| parse(e.to_string()))?;
        if let Some(planned_with) = &mut plan.planned_with {
            crate::runner::timings::forget_impossible(planned_with);
        }
        let consistent = plan.shards >= 1
            && plan
                .shares
                .as_ref()
                .is_none_or(|s| s.len() == plan.shards as usize)
            && !plan.command.is_empty();
        if !consistent {
            return Err(parse("its shards do not add up".into()));
        }
        if plan.runner.is_some() && plan.shares.is_none() {
            return Err(parse("a runner without the shards' tests".into()));
        }
        if plan.runner.is_none() && plan.shares.is_some() {
            return Err(parse("the shards' tests without a runner".into()));
        }
        if let (Some(name), None) = (&plan.runner, plan.runner_kind()) {
            return Err(parse(format!("an unknown runner {name:?}")));
        }
        if plan.shares.is_some() {
            crate::runner::check_command(&plan.command).map_err(|e| parse(e.to_string()))?;
        }
        plan.check_partition().map_err(parse)?;
        Ok(plan)
    }

    /// Each test in one shard only, once, with an id a shard can be handed:
    /// else (a plan edited by hand) a test would run twice, or not as listed.
    fn check_partition(&self) -> Result<(), String> {
        let mut shard_of: HashMap<&str, usize> = HashMap::new();
        for (i, share) in self.shares.iter().flatten().enumerate() {
            for id in &share.tests {
                if id.is_empty() {
                    return Err(format!("an empty test id in shard {}", i + 1));
                }
                if let Some(why) = crate::runner::listing::unusable(id) {
                    return Err(format!("test {id:?} {why}"));
                }
                if let Some(first) = shard_of.insert(id, i) {
                    return Err(if first == i {
                        format!("test {id:?} is in shard {} twice", i + 1)
                    } else {
                        format!("test {id:?} is in shards {} and {}", first + 1, i + 1)
                    });
                }
            }
        }
        Ok(())
    }

    /// The runner the plan was made with.
    pub fn runner_kind(&self) -> Option<RunnerKind> {
        use clap::ValueEnum;
        self.runner
            .as_deref()
            .and_then(|name| RunnerKind::from_str(name, false).ok())
    }

    /// The shards' parts, as the planner hands them out.
    pub fn shares(&self) -> Option<Vec<Share>> {
        self.shares.as_ref().map(|shares| {
            shares
                .iter()
                .map(|s| Share {
                    tests: s.tests.clone(),
                    expected: s.expected,
                })
                .collect()
        })
    }

    /// Writes the plan (through a temporary file, so a reader never sees half of it).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // This process's own temporary: concurrent runs record side by side.
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::runner::timings::write_replacing(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RecordedPlan {
        let shares = vec![
            Share {
                tests: vec!["a".into()],
                expected: 1.0,
            },
            Share {
                tests: vec!["b".into(), "c".into()],
                expected: 2.0,
            },
        ];
        RecordedPlan::new(
            "r1",
            2,
            &["pytest".into(), "{tests}".into()],
            &[],
            Some(RunnerKind::CargoNextest),
            Some(&shares),
        )
    }

    #[test]
    fn a_plan_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p/plan.json");
        plan().save(&path).unwrap();
        let read = RecordedPlan::load(&path).unwrap();
        assert_eq!(read, plan());
        assert_eq!(read.runner.as_deref(), Some("cargo-nextest"));
        assert_eq!(read.runner_kind(), Some(RunnerKind::CargoNextest));
        assert_eq!(read.shares().unwrap()[1].tests, ["b", "c"]);
    }

    #[test]
    fn a_plan_that_cannot_be_written_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        // `--plan-only /tmp`: a folder, so the rename onto it fails.
        let path = dir.path().join("plans");
        std::fs::create_dir(&path).unwrap();
        assert!(plan().save(&path).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("plans")]);
    }

    #[test]
    fn a_file_larger_than_a_plan_can_be_is_refused_before_it_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        plan().save(&path).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(RecordedPlan::load_at_most(&path, size).is_ok());
        let large = RecordedPlan::load_at_most(&path, size - 1)
            .unwrap_err()
            .to_string();
        assert!(large.contains("it is larger than"), "{large}");
    }

    #[test]
    fn bad_plans_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        let missing = RecordedPlan::load(&path).unwrap_err().to_string();
        assert!(missing.contains("cannot read it"), "{missing}");
        let mut other = serde_json::to_value(plan()).unwrap();
        other["format"] = 99.into();
        std::fs::write(&path, other.to_string()).unwrap();
        let format = RecordedPlan::load(&path).unwrap_err().to_string();
        assert!(format.contains("format 99") && format.contains("reads format 2"));
        std::fs::write(&path, "{\"timings\": 1}").unwrap();
        let junk = RecordedPlan::load(&path).unwrap_err().to_string();
        assert!(junk.contains("not a plan"), "{junk}");
        let mut short = serde_json::to_value(plan()).unwrap();
        short["shards"] = 3.into();
        std::fs::write(&path, short.to_string()).unwrap();
        assert!(RecordedPlan::load(&path).is_err());
        let mut unknown = serde_json::to_value(plan()).unwrap();
        unknown["runner"] = "rspec".into();
        std::fs::write(&path, unknown.to_string()).unwrap();
        let runner = RecordedPlan::load(&path).unwrap_err().to_string();
        assert!(runner.contains("unknown runner \"rspec\""), "{runner}");
        for e in [missing, format, junk, runner] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn an_edited_plan_that_is_not_a_partition_or_cannot_select_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut plan = serde_json::to_value(plan()).unwrap();
            edit(&mut plan);
            std::fs::write(&path, plan.to_string()).unwrap();
            RecordedPlan::load(&path)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // A test in two shards would run twice.
        let twice = refused(&|p| p["shares"][1]["tests"][1] = "a".into());
        assert!(twice.contains("\"a\" is in shards 1 and 2"), "{twice}");
        let twice_in_one = refused(&|p| p["shares"][1]["tests"][1] = "b".into());
        assert!(
            twice_in_one.contains("\"b\" is in shard 2 twice"),
            "{twice_in_one}"
        );
        // An id a listing would refuse cannot be handed to a shard either.
        let line_break = refused(&|p| p["shares"][0]["tests"][0] = "a\nb".into());
        assert!(line_break.contains("contains a line break"), "{line_break}");
        let empty = refused(&|p| p["shares"][0]["tests"][0] = "".into());
        assert!(empty.contains("an empty test id"), "{empty}");
        // With a runner, a command without {tests} would run every test in every shard.
        let all = refused(&|p| p["command"] = serde_json::json!(["pytest"]));
        assert!(all.contains("{tests}"), "{all}");
        // Shards' tests without a runner have no way into the command.
        let no_runner = refused(&|p| p["runner"] = serde_json::Value::Null);
        assert!(no_runner.contains("without a runner"), "{no_runner}");
        for e in [twice, twice_in_one, line_break, empty, all, no_runner] {
            assert!(e.starts_with("--replay-plan ") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_replay_whose_inputs_differ_is_told_what_differs_in_one_line() {
        let mut made = plan();
        made.commit = Some("a".repeat(40));
        made.list_command = Some("cargo nextest list".into());
        let same = ReplayInputs {
            command: made.command.clone(),
            shards: Some(2),
            runner: Some(RunnerKind::CargoNextest),
            list_command: Some("cargo nextest list"),
            commit: Some(&made.commit.clone().unwrap()),
        };
        assert_eq!(made.differs(&same), None);
        // Nothing given but the plan: nothing to differ (a laptop's replay).
        let commit = made.commit.clone().unwrap();
        let bare = ReplayInputs {
            commit: Some(&commit),
            ..ReplayInputs::default()
        };
        assert_eq!(made.differs(&bare), None);
        let other_commit = "b".repeat(40);
        let cases = [
            (
                ReplayInputs {
                    shards: Some(3),
                    ..ReplayInputs::default()
                },
                "it was made for 2 shards, not 3",
            ),
            (
                ReplayInputs {
                    command: vec!["pytest".into(), "-x\n{tests}".into()],
                    ..ReplayInputs::default()
                },
                "it was made for the command \"pytest {tests}\", not \"pytest -x\\n{tests}\"",
            ),
            (
                ReplayInputs {
                    runner: Some(RunnerKind::Pytest),
                    ..ReplayInputs::default()
                },
                "it was made with --runner cargo-nextest, not pytest",
            ),
            (
                ReplayInputs {
                    list_command: Some("ls"),
                    ..ReplayInputs::default()
                },
                "its tests were listed with \"cargo nextest list\", not \"ls\" (--files or --list-command)",
            ),
            (
                ReplayInputs {
                    commit: Some(&other_commit),
                    ..ReplayInputs::default()
                },
                "it was made at commit aaaaaaaaaaaa, this source is at bbbbbbbbbbbb",
            ),
            (
                ReplayInputs::default(),
                "it was made at commit aaaaaaaaaaaa, this source has no commit",
            ),
        ];
        for (given, says) in cases {
            let what = made.differs(&given);
            assert_eq!(what.as_deref(), Some(says));
            assert!(!says.contains('\n'));
        }
    }
}
