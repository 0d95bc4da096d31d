//! Learned test durations (`--timings PATH`): what the planner expects each
//! test to take, updated from what every run reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Weight of the newest observation in the moving average: recent runs weigh more.
const NEWEST_WEIGHT: f64 = 0.5;

/// The longest duration a timings file may hold: a year.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// How long a run waits for another process's lock on the timings file.
/// Another run holds it for the milliseconds its save takes; a lock held
/// longer is stuck (a hung process, a lock on a network file system), and
/// this run gives its learning up rather than hang at its end.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Writes a JSON file (timings, a plan) whole: through a temporary of this
/// process's own next to it (`name.json.PID.tmp`: two runs sharing the
/// file never write into each other's) and a rename, so that a reader never
/// sees half of it. A temporary left by a failure is removed.
/// A path that is a symbolic link is written through: its target is
/// replaced and the link stays (a user's link to a shared file keeps
/// pointing at it).
pub fn write_replacing(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let target = if is_link {
        let link = std::fs::read_link(path)?;
        match path.parent() {
            Some(dir) if link.is_relative() => dir.join(link),
            _ => link,
        }
    } else {
        path.to_path_buf()
    };
    let path = target.as_path();
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written
}

/// Forgets the durations no run could have taken (negative, over a year,
/// not a number), read from a file someone may have edited: such tests
/// count as never seen.
pub fn forget_impossible(seconds: &mut BTreeMap<String, f64>) {
    seconds.retain(|_, s| s.is_finite() && (0.0..=MAX_SECONDS).contains(s));
}

/// The timings file's format version this build writes and reads. A file
/// without one is version 1 (what builds before the field wrote).
pub const VERSION: u64 = 1;

fn version_one() -> u64 {
    1
}

/// Expected seconds per test id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// The file's format version ([`VERSION`]).
    #[serde(default = "version_one")]
    pub version: u64,
    /// Seconds per test id, an exponential moving average of the runs seen.
    pub tests: BTreeMap<String, f64>,
    /// The workflow run (`GITHUB_RUN_ID`) that last updated these timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The timings as they were before that run began: what every job of
    /// that run plans with, so that matrix jobs (`--only K`) that each
    /// restored the file at another moment still reach the same plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<BTreeMap<String, f64>>,
    /// The tests whose durations that run reported (so far, over its jobs):
    /// what one job adds when it takes in another's file ([`Timings::merge_run`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub observed: BTreeSet<String>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            version: VERSION,
            tests: BTreeMap::new(),
            run: None,
            before: None,
            observed: BTreeSet::new(),
        }
    }
}

/// Why the timings file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TimingsError {
    /// Reading or writing the file failed.
    #[error("timings file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a timings file.
    #[error("timings file {path} is not valid ({source}): delete it to learn afresh, or name another with --timings")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// Another process held the file's lock longer than a save takes.
    #[error("timings file {path}: another process has held its lock for {}s: this run's learning is not saved (is a run stuck? end it)", waited.as_secs_f64())]
    LockHeld {
        /// The lock file.
        path: PathBuf,
        /// How long this run waited.
        waited: Duration,
    },
    /// The file was written by a newer mvm-shard, in a format this one does
    /// not know.
    #[error(
        "timings file {path} has format version {version}, newer than this mvm-shard's ({VERSION})"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u64,
    },
}

/// Just the version of a timings file, read before the rest.
#[derive(Deserialize)]
struct Versioned {
    #[serde(default = "version_one")]
    version: u64,
}

impl Timings {
    /// Reads `path`; a file that does not exist yet is empty timings.
    pub fn load(path: &Path) -> Result<Self, TimingsError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let format = |source| TimingsError::Format {
                    path: path.to_path_buf(),
                    source,
                };
                let Versioned { version } = serde_json::from_slice(&bytes).map_err(format)?;
                if version > VERSION {
                    return Err(TimingsError::Newer {
                        path: path.to_path_buf(),
                        version,
                    });
                }
                let mut timings: Timings = serde_json::from_slice(&bytes).map_err(format)?;
                timings.version = VERSION;
                // Durations no run could have taken (an edited or foreign
                // file) are forgotten: such tests count as never seen.
                forget_impossible(&mut timings.tests);
                if let Some(before) = &mut timings.before {
                    forget_impossible(before);
                }
                Ok(timings)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Timings::default()),
            Err(source) => Err(TimingsError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes `path` (its folder created), replacing it whole.
    pub fn save(&self, path: &Path) -> Result<(), TimingsError> {
        let io = |source| TimingsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(|source| TimingsError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        write_replacing(path, &json).map_err(io)
    }

    /// The timings the jobs of workflow run `run` plan with: the ones from
    /// before it when one of its jobs already updated the file.
    pub fn for_run(&self, run: Option<&str>) -> Timings {
        let tests = match (&self.before, run) {
            (Some(before), Some(run)) if self.run.as_deref() == Some(run) => before.clone(),
            _ => self.tests.clone(),
        };
        Timings {
            tests,
            ..Timings::default()
        }
    }

    /// Starts an update by workflow run `run`: the first one of that run
    /// keeps what the run planned with in `before`.
    pub fn begin_update(&mut self, run: Option<&str>) {
        match run {
            Some(run) if self.run.as_deref() != Some(run) => {
                self.before = Some(self.tests.clone());
                self.run = Some(run.to_string());
                self.observed.clear();
            }
            Some(_) => {}
            None => {
                self.before = None;
                self.run = None;
                self.observed.clear();
            }
        }
    }

    /// Expected seconds for each of `tests`: what was learned, else the
    /// median of what was learned, else one second (all equal).
    pub fn expected(&self, tests: &[String]) -> Vec<f64> {
        let median = self.median().unwrap_or(1.0);
        tests
            .iter()
            .map(|t| self.tests.get(t).copied().unwrap_or(median))
            .collect()
    }

    fn median(&self) -> Option<f64> {
        let mut all: Vec<f64> = self.tests.values().copied().collect();
        if all.is_empty() {
            return None;
        }
        all.sort_by(f64::total_cmp);
        Some(all[all.len() / 2])
    }

    /// Learns from one run: `listed` is every test the run knew of (others
    /// vanished and are dropped); `observed` what the shards reported.
    pub fn learn(&mut self, listed: &[String], observed: &BTreeMap<String, Duration>) {
        self.tests.retain(|t, _| listed.binary_search(t).is_ok());
        for (test, took) in observed {
            if listed.binary_search(test).is_err() {
                continue;
            }
            self.observed.insert(test.clone());
            let took = took.as_secs_f64();
            let entry = self.tests.entry(test.clone()).or_insert(took);
            *entry = NEWEST_WEIGHT * took + (1.0 - NEWEST_WEIGHT) * *entry;
        }
    }
}

/// What [`Timings::merge_run`] found in another job's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// A file of the same workflow run, planned with the same timings: this
    /// many tests it observed were added.
    Added(usize),
    /// A file of another workflow run (or none): nothing to add.
    OtherRun,
    /// A job of the same workflow run that planned with other timings (it
    /// restored another file as it started): the two jobs' shards may not
    /// partition the tests. Nothing was added.
    OtherSnapshot,
}

impl Timings {
    /// Takes in what another job of the same workflow run learned: the
    /// durations of the tests it observed and this one did not. Matrix jobs
    /// each run some of the shards; each saves its own file, and a job that
    /// merges the newest one of the run before saving carries every earlier
    /// job's learning forward.
    pub fn merge_run(&mut self, other: &Timings) -> Merge {
        if self.run.is_none() || other.run != self.run {
            return Merge::OtherRun;
        }
        if other.before != self.before {
            return Merge::OtherSnapshot;
        }
        let mut added = 0;
        for test in &other.observed {
            if self.observed.contains(test) {
                continue;
            }
            if let Some(seconds) = other.tests.get(test) {
                self.tests.insert(test.clone(), *seconds);
                self.observed.insert(test.clone());
                added += 1;
            }
        }
        Merge::Added(added)
    }
}

/// A run's timings file: read as the run starts, updated as it ends under
/// an advisory lock, so that runs sharing it (two on one laptop, in the
/// worktree's git directory) each add their learning to the newest file
/// rather than the last to finish replacing the other's.
#[derive(Debug, Clone)]
pub struct TimingsFile {
    path: PathBuf,
    /// How long to wait for another process's lock ([`LOCK_WAIT`]).
    lock_wait: Duration,
}

/// What a run found in its timings file.
#[derive(Debug)]
pub struct Opened {
    /// What the run plans with (nothing learned when the file was unusable).
    pub timings: Timings,
    /// Where to learn into; `None` when the file is a newer version's,
    /// which is left as it is.
    pub file: Option<TimingsFile>,
    /// What the run should say once about the file, when it could not use it.
    pub note: Option<String>,
}

impl TimingsFile {
    /// Reads `path` for a run. A file of a newer version is not used, nor
    /// ever written; a file that does not parse is set aside (renamed, kept)
    /// and learning starts afresh. Both are said in the note.
    pub fn open(path: &Path) -> Result<Opened, TimingsError> {
        let file = TimingsFile {
            path: path.to_path_buf(),
            lock_wait: LOCK_WAIT,
        };
        match Timings::load(path) {
            Ok(timings) => Ok(Opened {
                timings,
                file: Some(file),
                note: None,
            }),
            Err(e @ TimingsError::Newer { .. }) => Ok(Opened {
                timings: Timings::default(),
                file: None,
                note: Some(format!(
                    "{e}: planning without learned timings, and leaving the file as it is"
                )),
            }),
            Err(TimingsError::Format { source, .. }) => {
                // Another run may have set it aside (and saved) meanwhile.
                match file.lock().and_then(|_lock| file.load_or_set_aside()) {
                    Ok((timings, note)) => Ok(Opened {
                        timings: timings.unwrap_or_default(),
                        file: Some(file),
                        note,
                    }),
                    // Where it cannot be set aside, it is left as it is.
                    Err(e) => Ok(Opened {
                        timings: Timings::default(),
                        file: None,
                        note: Some(format!(
                            "timings file {} is not valid ({source}), and cannot be set aside ({e}): \
                             planning without learned timings, and leaving the file as it is",
                            path.display()
                        )),
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Applies `change` (this run's learning) to the file as it is now,
    /// under its lock, and writes the result through a temporary file.
    /// Returns what to say when the file could not be used: a newer
    /// version's is left untouched; one that does not parse is set aside.
    pub fn update(
        &self,
        change: impl FnOnce(&mut Timings),
    ) -> Result<Option<String>, TimingsError> {
        let _lock = self.lock()?;
        let (latest, note) = self.load_or_set_aside()?;
        let Some(mut latest) = latest else {
            return Ok(note);
        };
        change(&mut latest);
        latest.save(&self.path)?;
        Ok(note)
    }

    /// The file's timings (`None` for a newer version's), a file that does
    /// not parse renamed aside first (empty timings then); with what to say.
    fn load_or_set_aside(&self) -> Result<(Option<Timings>, Option<String>), TimingsError> {
        match Timings::load(&self.path) {
            Ok(timings) => Ok((Some(timings), None)),
            Err(e @ TimingsError::Newer { .. }) => Ok((
                None,
                Some(format!("{e}: leaving it as it is; nothing learned")),
            )),
            Err(TimingsError::Format { source, .. }) => {
                // A name not taken yet (this runs under the lock): a file set
                // aside earlier in the same second is never replaced.
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = (0..1000u32)
                    .map(|n| match n {
                        0 => self.beside(&format!("unreadable-{secs}")),
                        n => self.beside(&format!("unreadable-{secs}-{n}")),
                    })
                    .find(|p| std::fs::symlink_metadata(p).is_err())
                    .unwrap_or_else(|| self.beside("unreadable"));
                std::fs::rename(&self.path, &aside).map_err(|source| TimingsError::Io {
                    path: self.path.clone(),
                    source,
                })?;
                let note = format!(
                    "timings file {} is not valid ({source}): kept as {}; learning afresh",
                    self.path.display(),
                    aside.display()
                );
                Ok((Some(Timings::default()), Some(note)))
            }
            Err(e) => Err(e),
        }
    }

    /// `name.SUFFIX` next to the file.
    fn beside(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".");
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Takes the advisory lock (`flock` on `name.lock` next to the file,
    /// which stays), waiting for another run's to be released, at most
    /// [`LOCK_WAIT`].
    fn lock(&self) -> Result<std::fs::File, TimingsError> {
        let lock_path = self.beside("lock");
        let io = |source| TimingsError::Io {
            path: lock_path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        // Waited for on a thread of its own, so that the wait is bounded: a
        // lock given up on is released as that thread gets it and ends.
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("timings-lock".into())
            .spawn(move || {
                let locked = lock.lock().map(|()| lock);
                // Nobody waits any more: dropped, so released.
                sender.send(locked).ok();
            })
            .map_err(io)?;
        match receiver.recv_timeout(self.lock_wait) {
            Ok(locked) => locked.map_err(io),
            Err(_) => Err(TimingsError::LockHeld {
                path: lock_path.clone(),
                waited: self.lock_wait,
            }),
        }
    }
}

/// The default timings file: under the git directory of `dir`'s worktree,
/// so a laptop learns without touching the work tree. Each worktree has its
/// own (`--git-dir`, not the common one): worktrees at other commits list
/// other tests, and a run drops the tests its listing no longer has.
pub fn default_path(dir: &Path) -> Option<PathBuf> {
    let git_dir = crate::source::git_rev_parse(dir, &["--path-format=absolute", "--git-dir"])?;
    Some(git_dir.join("mvm-shard/timings.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn learning_weighs_recent_runs_and_drops_vanished_tests() {
        let mut t = Timings::default();
        let listed = ids(&["a", "b", "c"]);
        let obs = |v: &[(&str, f64)]| {
            v.iter()
                .map(|(k, s)| (k.to_string(), Duration::from_secs_f64(*s)))
                .collect::<BTreeMap<_, _>>()
        };
        t.learn(&listed, &obs(&[("a", 4.0), ("b", 1.0), ("zz", 9.0)]));
        assert_eq!(t.tests["a"], 4.0);
        assert!(
            !t.tests.contains_key("zz"),
            "unlisted tests are not learned"
        );
        t.learn(&listed, &obs(&[("a", 2.0)]));
        assert_eq!(t.tests["a"], 3.0);
        // c was never seen: it gets the median of the known ones.
        assert_eq!(t.expected(&ids(&["a", "c"])), vec![3.0, 3.0]);
        t.learn(&ids(&["b"]), &BTreeMap::new());
        assert_eq!(t.tests.keys().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn jobs_of_one_workflow_run_plan_with_the_timings_from_before_it() {
        let mut t = Timings::default();
        t.tests.insert("a".into(), 1.0);
        t.begin_update(Some("7"));
        t.tests.insert("a".into(), 5.0);
        assert_eq!(t.for_run(Some("7")).tests["a"], 1.0, "same run: before");
        assert_eq!(t.for_run(Some("8")).tests["a"], 5.0, "next run: newest");
        assert_eq!(t.for_run(None).tests["a"], 5.0);
        t.begin_update(Some("7"));
        assert_eq!(t.before.as_ref().unwrap()["a"], 1.0, "kept across its jobs");
    }

    #[test]
    fn a_job_takes_in_what_another_job_of_the_same_run_learned_and_nothing_else() {
        let listed = ids(&["a", "b", "c"]);
        let obs =
            |test: &str, s: f64| BTreeMap::from([(test.to_string(), Duration::from_secs_f64(s))]);
        let mut old = Timings::default();
        old.learn(&listed, &obs("c", 1.0));
        // Two matrix jobs of run 7 restored the same file; each ran one test.
        let (mut one, mut two) = (old.clone(), old.clone());
        for (job, test, s) in [(&mut one, "a", 4.0), (&mut two, "b", 2.0)] {
            job.begin_update(Some("7"));
            job.learn(&listed, &obs(test, s));
        }
        assert_eq!(two.merge_run(&one), Merge::Added(1));
        assert_eq!(two.tests["a"], 4.0);
        assert_eq!(two.tests["b"], 2.0);
        assert_eq!(two.tests["c"], 1.0, "what neither observed stays");
        assert_eq!(
            two.for_run(Some("7")).tests,
            old.tests,
            "the run's snapshot is kept"
        );
        assert_eq!(two.merge_run(&one), Merge::Added(0), "taken in once");
        // A job of the next run restored the merged file: a file of run 7
        // (older, or what it restored itself) adds nothing.
        let mut next = two.clone();
        next.begin_update(Some("8"));
        next.learn(&listed, &obs("a", 8.0));
        assert_eq!(next.merge_run(&one), Merge::OtherRun);
        assert_eq!(next.tests["a"], 6.0);
        // Nor does a job of the same run that planned with other timings:
        // that is told apart.
        let mut other = Timings::default();
        other.begin_update(Some("8"));
        other.learn(&listed, &obs("b", 9.0));
        assert_eq!(next.merge_run(&other), Merge::OtherSnapshot);
        assert_eq!(next.tests["b"], 2.0);
    }

    #[test]
    fn a_missing_file_is_empty_and_a_saved_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/timings.json");
        assert_eq!(Timings::load(&path).unwrap(), Timings::default());
        let mut t = Timings::default();
        t.tests.insert("a".into(), 1.5);
        t.save(&path).unwrap();
        assert_eq!(Timings::load(&path).unwrap(), t);
        std::fs::write(&path, "nope").unwrap();
        let error = Timings::load(&path).unwrap_err().to_string();
        assert!(error.contains("delete it to learn afresh"), "{error}");
    }

    #[test]
    fn the_file_says_its_version_and_an_unversioned_one_is_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        let mut t = Timings::default();
        t.tests.insert("a".into(), 1.5);
        t.save(&path).unwrap();
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved["version"], 1);
        std::fs::write(&path, r#"{"tests": {"a": 1.5}}"#).unwrap();
        assert_eq!(Timings::load(&path).unwrap(), t);
    }

    #[test]
    fn a_newer_versions_file_is_not_used_nor_ever_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        let newer = r#"{"version": 2, "tests": {"a": {"mean": 1.5}}}"#;
        std::fs::write(&path, newer).unwrap();
        let opened = TimingsFile::open(&path).unwrap();
        assert_eq!(opened.timings, Timings::default());
        assert!(opened.file.is_none(), "nothing to learn into");
        let note = opened.note.unwrap();
        assert!(note.contains("format version 2, newer"), "{note}");
        // Made newer by another run while this one ran: still untouched.
        std::fs::write(&path, "{}").unwrap();
        let file = TimingsFile::open(&path).unwrap().file.unwrap();
        std::fs::write(&path, newer).unwrap();
        let note = file.update(|t| t.tests.clear()).unwrap().unwrap();
        assert!(note.contains("leaving it as it is"), "{note}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), newer);
    }

    #[test]
    fn a_file_written_through_a_symbolic_link_keeps_the_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        let target = dir.path().join("shared/timings.json");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("timings.json");
        std::os::unix::fs::symlink("shared/timings.json", &link).unwrap();
        write_replacing(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
    }

    #[test]
    fn files_set_aside_one_after_the_other_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        // Within one second (as a rule): the same name would replace the first.
        for broken in ["broken one", "broken two", "broken three"] {
            std::fs::write(&path, broken).unwrap();
            TimingsFile::open(&path).unwrap();
        }
        let mut kept: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".unreadable-"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, ["broken one", "broken three", "broken two"]);
    }

    #[test]
    fn a_file_that_does_not_parse_is_kept_aside_and_learning_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        std::fs::write(&path, "{\"tests\": {\"a\": 1").unwrap();
        let opened = TimingsFile::open(&path).unwrap();
        assert_eq!(opened.timings, Timings::default());
        let note = opened.note.unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "{note}");
        assert_eq!(
            std::fs::read_to_string(&aside[0]).unwrap(),
            "{\"tests\": {\"a\": 1"
        );
        assert!(note.contains(&aside[0].display().to_string()), "{note}");
        opened
            .file
            .unwrap()
            .update(|t| {
                t.tests.insert("b".into(), 2.0);
            })
            .unwrap();
        assert_eq!(Timings::load(&path).unwrap().tests["b"], 2.0);
    }

    #[test]
    fn a_file_that_does_not_parse_and_cannot_be_set_aside_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        std::fs::write(&path, "nope").unwrap();
        // The lock cannot be taken (as in a folder this user cannot write).
        std::fs::create_dir(dir.path().join("timings.json.lock")).unwrap();
        let opened = TimingsFile::open(&path).unwrap();
        assert_eq!(opened.timings, Timings::default());
        assert!(opened.file.is_none(), "nothing to learn into");
        let note = opened.note.unwrap();
        assert!(note.contains("cannot be set aside"), "{note}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nope");
    }

    #[test]
    fn runs_sharing_the_file_each_add_their_learning_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        let listed: Vec<String> = (0..64).map(|i| format!("t{i:02}")).collect();
        // Each "run" read the file before any saved, then learns its own tests.
        let runs: Vec<TimingsFile> = (0..8)
            .map(|_| TimingsFile::open(&path).unwrap().file.unwrap())
            .collect();
        std::thread::scope(|scope| {
            for (n, run) in runs.iter().enumerate() {
                let listed = &listed;
                scope.spawn(move || {
                    for test in listed.iter().skip(n).step_by(8) {
                        let observed = BTreeMap::from([(test.clone(), Duration::from_secs(1))]);
                        run.update(|t| t.learn(listed, &observed)).unwrap();
                    }
                });
            }
        });
        let learned = Timings::load(&path).unwrap();
        assert_eq!(
            learned.tests.keys().collect::<Vec<_>>(),
            listed.iter().collect::<Vec<_>>(),
            "every run's learning is kept"
        );
    }

    #[test]
    fn a_lock_held_elsewhere_gives_the_save_up_in_bounded_time_and_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        let listed = vec!["a".to_string()];
        let observed = BTreeMap::from([("a".to_string(), Duration::from_secs(1))]);
        let mut run = TimingsFile::open(&path).unwrap().file.unwrap();
        run.update(|t| t.learn(&listed, &observed)).unwrap();
        let before = std::fs::read(&path).unwrap();
        // A stuck run (or anyone) holding the lock and never letting go.
        let stuck = std::fs::OpenOptions::new()
            .write(true)
            .open(path.with_extension("json.lock"))
            .unwrap();
        stuck.lock().unwrap();
        run.lock_wait = Duration::from_millis(200);
        let held = run.update(|t| t.tests.clear()).unwrap_err().to_string();
        assert!(held.contains("held its lock"), "{held}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "left as it was");
        // Once it lets go, saving works again.
        drop(stuck);
        run.update(|t| t.tests.clear()).unwrap();
        assert!(Timings::load(&path).unwrap().tests.is_empty());
    }

    #[test]
    fn a_save_that_fails_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A path that is a folder: the rename onto it fails.
        let path = dir.path().join("timings.json");
        std::fs::create_dir(&path).unwrap();
        assert!(Timings::default().save(&path).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("timings.json")]);
    }

    #[test]
    fn another_writers_temporary_file_does_not_stop_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        // What a concurrent run may hold at the moment this one saves.
        std::fs::create_dir(path.with_extension("json.tmp")).unwrap();
        let mut t = Timings::default();
        t.tests.insert("a".into(), 1.0);
        t.save(&path).unwrap();
        assert_eq!(Timings::load(&path).unwrap(), t);
    }

    #[test]
    fn durations_no_run_could_take_are_forgotten_on_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.json");
        std::fs::write(
            &path,
            r#"{"tests": {"a": -5, "b": 1e308, "c": 2.5}, "run": "1", "before": {"a": -1, "c": 1}}"#,
        )
        .unwrap();
        let t = Timings::load(&path).unwrap();
        assert_eq!(t.tests, BTreeMap::from([("c".to_string(), 2.5)]));
        assert_eq!(t.before, Some(BTreeMap::from([("c".to_string(), 1.0)])));
    }
}
