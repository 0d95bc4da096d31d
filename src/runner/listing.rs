//! Reading a listing command's output: each runner's own listing format,
//! strictly. A line that is not a test id is an error naming it, never a
//! test that then fails its shard, and an id that cannot travel to the
//! shards as it is (a line break, bytes that are not UTF-8) is refused.

use serde::Deserialize;

use super::RunnerKind;

/// How many offending lines an error shows.
const SHOWN: usize = 5;

/// Why a listing's output gave no usable test ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    /// Lines that are not test ids where ids were expected.
    #[error("{}", not_ids(lines, *more))]
    NotIds {
        /// The first few offending lines, escaped.
        lines: Vec<String>,
        /// How many more there were.
        more: usize,
    },
    /// The output is not the JSON the runner prints.
    #[error("it is not that JSON ({error}); it begins: {begins:?}")]
    NotJson {
        /// What the JSON parser said.
        error: String,
        /// The first characters of the output.
        begins: String,
    },
    /// A test id that cannot be handed to the shards as it is.
    #[error("it names the test {id:?}, which {why}: rename it, or leave it out of the listing")]
    Unusable {
        /// The id as listed.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

fn not_ids(lines: &[String], more: usize) -> String {
    let mut out = String::from("these lines are not test ids:");
    for line in lines {
        out.push_str("\n  ");
        out.push_str(line);
    }
    if more > 0 {
        out.push_str(&format!("\n  … and {more} more"));
    }
    out
}

impl RunnerKind {
    /// The listing format this runner's ids are read from, in words (for
    /// errors and `--list-command`).
    pub fn listing_format(self) -> &'static str {
        match self {
            RunnerKind::Pytest => {
                "pytest node ids (path::name), one a line, then pytest's summary after a blank line, \
                 as `pytest --collect-only --verbosity=-1` prints them"
            }
            RunnerKind::CargoNextest => "the JSON of `cargo nextest list --message-format json`",
            RunnerKind::Go => "Go import paths, one a line, as `go list ./...` prints them",
            RunnerKind::Jest => "the JSON array of `jest --listTests --json`",
            RunnerKind::Vitest => "the JSON of `vitest list --filesOnly --json`",
            RunnerKind::Files => {
                "file paths, one a line, or each ended by a NUL byte (as `find -print0` prints them)"
            }
        }
    }
}

/// The test ids in a listing's output (`root`: the folder it ran in, which
/// the JavaScript runners' absolute paths are made relative to), sorted and
/// without duplicates.
pub fn parse(kind: RunnerKind, output: &[u8], root: &str) -> Result<Vec<String>, ListingError> {
    let text = String::from_utf8_lossy(output);
    let mut ids = match kind {
        RunnerKind::Pytest => pytest(&text)?,
        RunnerKind::CargoNextest => nextest(&text)?,
        RunnerKind::Go => lines_checked(&text, is_import_path)?,
        RunnerKind::Jest => json::<Vec<String>>(&text)?
            .into_iter()
            .map(|path| relative(&path, root))
            .collect(),
        RunnerKind::Vitest => json::<Vec<VitestEntry>>(&text)?
            .into_iter()
            .map(|entry| relative(&entry.file, root))
            .collect(),
        RunnerKind::Files => {
            let paths: Vec<&str> = if text.contains('\0') {
                text.split_terminator('\0').collect()
            } else {
                text.lines().filter(|l| !l.trim().is_empty()).collect()
            };
            paths.into_iter().map(|path| relative(path, root)).collect()
        }
    };
    for id in &ids {
        check_usable(id)?;
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Refuses an id that the shards could not be handed as it is: one line of
/// `{tests_file}` each, and the name of a real file or test.
fn check_usable(id: &str) -> Result<(), ListingError> {
    match unusable(id) {
        Some(why) => Err(ListingError::Unusable {
            id: id.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Why a test id cannot be handed to a shard as it is (one line of
/// `{tests_file}`), in words; `None` when it can. Listings and replayed
/// plans are held to it alike.
pub fn unusable(id: &str) -> Option<&'static str> {
    if id.contains(['\n', '\r']) {
        Some("contains a line break (ids travel one a line in {tests_file})")
    } else if id.contains('\0') {
        Some("contains a NUL byte")
    } else if id.contains('\u{FFFD}') {
        Some("is not valid UTF-8 (shown as \u{FFFD})")
    } else {
        None
    }
}

/// pytest's `--collect-only -q`: the node ids, then, after a blank line (or
/// a `===` heading), its warnings and summary, which are not read.
fn pytest(text: &str) -> Result<Vec<String>, ListingError> {
    let block = text
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with('='));
    let block: Vec<&str> = block.collect();
    check_lines(&block, |l| {
        l.split_once("::")
            .is_some_and(|(file, name)| !file.trim().is_empty() && !name.is_empty())
            && !l.starts_with(char::is_whitespace)
    })?;
    Ok(block.into_iter().map(str::to_string).collect())
}

/// The non-blank lines of `text`, each of which must satisfy `is_id`.
fn lines_checked(text: &str, is_id: fn(&str) -> bool) -> Result<Vec<String>, ListingError> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    check_lines(&lines, is_id)?;
    Ok(lines.into_iter().map(str::to_string).collect())
}

fn check_lines(lines: &[&str], is_id: impl Fn(&str) -> bool) -> Result<(), ListingError> {
    let bad: Vec<&str> = lines.iter().copied().filter(|l| !is_id(l)).collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(ListingError::NotIds {
        lines: bad.iter().take(SHOWN).map(|l| format!("{:?}", l)).collect(),
        more: bad.len().saturating_sub(SHOWN),
    })
}

/// A Go import path as `go list` prints one: no spaces, no quotes, no
/// control characters, not an option.
fn is_import_path(line: &str) -> bool {
    !line.starts_with('-')
        && !line.ends_with(':')
        && !line
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '`' | '\\'))
}

fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ListingError> {
    serde_json::from_str(text.trim()).map_err(|e| ListingError::NotJson {
        error: e.to_string(),
        begins: text.trim().chars().take(200).collect(),
    })
}

/// One file of `vitest list --json` (with `--filesOnly`, or one entry a test).
#[derive(Deserialize)]
struct VitestEntry {
    file: String,
}

/// What `cargo nextest list --message-format json` says, as far as ids go.
#[derive(Deserialize)]
struct NextestList {
    #[serde(rename = "rust-suites")]
    suites: std::collections::BTreeMap<String, NextestSuite>,
}

#[derive(Deserialize)]
struct NextestSuite {
    #[serde(rename = "binary-id")]
    binary_id: String,
    #[serde(default)]
    testcases: std::collections::BTreeMap<String, NextestCase>,
}

#[derive(Deserialize)]
struct NextestCase {
    #[serde(rename = "filter-match")]
    filter_match: NextestMatch,
}

#[derive(Deserialize)]
struct NextestMatch {
    status: String,
}

/// nextest's ids, `binary-id test-name`, of the tests its filters select
/// (those `cargo nextest run` runs: not the ignored ones).
fn nextest(text: &str) -> Result<Vec<String>, ListingError> {
    let list: NextestList = json(text)?;
    let mut ids = Vec::new();
    for suite in list.suites.values() {
        for (name, case) in &suite.testcases {
            if case.filter_match.status == "matches" {
                ids.push(format!("{} {name}", suite.binary_id));
            }
        }
    }
    Ok(ids)
}

/// `path` relative to `root` (the folder the listing ran in): an absolute
/// path under it loses the prefix, one elsewhere is reached with `..`; a
/// relative one loses a leading `./`, unless it would then start with `-`
/// and be taken for an option by the command it is given to.
fn relative(path: &str, root: &str) -> String {
    let out = relative_path(path, root);
    if out.starts_with('-') {
        format!("./{out}")
    } else {
        out
    }
}

fn relative_path(path: &str, root: &str) -> String {
    let root = root.trim_end_matches('/');
    if !path.starts_with('/') || !root.starts_with('/') {
        return path.trim_start_matches("./").to_string();
    }
    let parts = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect()
    };
    let (path_parts, root_parts) = (parts(path), parts(root));
    let common = path_parts
        .iter()
        .zip(&root_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out: Vec<&str> = vec![".."; root_parts.len() - common];
    out.extend(path_parts[common..].iter().map(String::as_str));
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(kind: RunnerKind, output: &str) -> Result<Vec<String>, ListingError> {
        parse(kind, output.as_bytes(), "/src/app")
    }

    /// What pytest 9.2 printed for a file whose tests have spaces, quotes,
    /// non-ASCII and `::` in their parameters, and a warning at import.
    const PYTEST: &str = "test_a.py::test_p[a b]\ntest_a.py::test_p[\\xe9]\ntest_a.py::test_p[q'uote]\n\
        test_a.py::test_p[dq\"]\ntest_a.py::test_p[c::d]\ntest_a.py::TestK::test_m\n\n\
        =============================== warnings summary ===============================\n\
        test_a.py:9\n  /tmp/py/test_a.py:9: UserWarning: at import\n    warnings.warn(\"at import\")\n\n\
        -- Docs: https://docs.pytest.org/en/stable/how-to/capture-warnings.html\n\
        7 tests collected in 0.02s\n";

    #[test]
    fn pytest_ids_are_every_line_before_the_summary_spaces_and_all() {
        assert_eq!(
            ids(RunnerKind::Pytest, PYTEST).unwrap(),
            vec![
                "test_a.py::TestK::test_m",
                "test_a.py::test_p[\\xe9]",
                "test_a.py::test_p[a b]",
                "test_a.py::test_p[c::d]",
                "test_a.py::test_p[dq\"]",
                "test_a.py::test_p[q'uote]",
            ]
        );
    }

    #[test]
    fn a_line_that_is_not_an_id_is_refused_and_shown() {
        // A print at import, pytest's counts per file (`-qq`), its tree (`-v`).
        for stray in ["hello from conftest", "test_a.py: 7", "<Module test_a.py>"] {
            let output = format!("{stray}\ntest_a.py::test_x\n\n1 test collected\n");
            let error = ids(RunnerKind::Pytest, &output).unwrap_err();
            assert_eq!(
                error,
                ListingError::NotIds {
                    lines: vec![format!("{stray:?}")],
                    more: 0
                }
            );
        }
        let many: String = (0..8).map(|i| format!("go: downloading m{i}\n")).collect();
        let error = ids(RunnerKind::Go, &format!("example.com/m/a\n{many}")).unwrap_err();
        let said = error.to_string();
        assert!(said.contains("\"go: downloading m0\""), "{said}");
        assert!(said.contains("… and 3 more"), "{said}");
        assert!(!said.contains("example.com/m/a"), "{said}");
    }

    #[test]
    fn nextest_ids_are_the_tests_its_json_says_it_would_run() {
        // What cargo-nextest 0.9.143 printed (trimmed to the fields read and a few others).
        let json = r#"{"rust-build-meta":{"target-directory":"/t"},"test-count":4,"rust-suites":{
            "nx":{"package-name":"nx","binary-id":"nx","kind":"lib","status":"listed","testcases":{
              "tests::ign":{"kind":"test","ignored":true,"filter-match":{"status":"mismatch","reason":"ignored"}},
              "tests::ok":{"kind":"test","ignored":false,"filter-match":{"status":"matches"}},
              "tests::unicode_\u00e9":{"kind":"test","ignored":false,"filter-match":{"status":"matches"}}}},
            "nx::integ":{"package-name":"nx","binary-id":"nx::integ","kind":"test","status":"listed","testcases":{
              "it":{"kind":"test","ignored":false,"filter-match":{"status":"matches"}}}}}}"#;
        assert_eq!(
            ids(RunnerKind::CargoNextest, json).unwrap(),
            vec!["nx tests::ok", "nx tests::unicode_é", "nx::integ it"]
        );
        // Its oneline format (or anything else) is not that JSON.
        let error = ids(RunnerKind::CargoNextest, "nx tests::ok\n").unwrap_err();
        assert!(
            matches!(&error, ListingError::NotJson { begins, .. } if begins == "nx tests::ok"),
            "{error:?}"
        );
    }

    #[test]
    fn jest_and_vitest_files_are_relative_to_where_the_listing_ran() {
        let jest =
            r#"["/src/app/web/sp ace.test.js","/src/app/web/a.test.js","/src/lib/b.test.js"]"#;
        assert_eq!(
            ids(RunnerKind::Jest, jest).unwrap(),
            vec!["../lib/b.test.js", "web/a.test.js", "web/sp ace.test.js"]
        );
        let vitest = "[\n  {\n    \"file\": \"/src/app/web/a.test.js\"\n  },\n  {\"name\": \"t\", \"file\": \"/src/app/web/a.test.js\"}\n]\n";
        assert_eq!(
            ids(RunnerKind::Vitest, vitest).unwrap(),
            vec!["web/a.test.js"]
        );
        // A plain list of paths is not jest's JSON.
        assert!(matches!(
            ids(RunnerKind::Jest, "/src/app/web/a.test.js\n"),
            Err(ListingError::NotJson { .. })
        ));
    }

    #[test]
    fn a_file_name_with_a_line_break_is_refused_never_split() {
        // jest 30 and vitest 3 listing a file named "new\nline.test.js".
        let jest = r#"["/src/app/web/new\nline.test.js","/src/app/web/a.test.js"]"#;
        let vitest = r#"[{"file": "/src/app/web/new\nline.test.js"}]"#;
        let files = "web/a.sh\0web/new\nline.sh\0";
        for (kind, output, name) in [
            (RunnerKind::Jest, jest, "web/new\nline.test.js"),
            (RunnerKind::Vitest, vitest, "web/new\nline.test.js"),
            (RunnerKind::Files, files, "web/new\nline.sh"),
        ] {
            let error = ids(kind, output).unwrap_err();
            assert!(
                matches!(&error, ListingError::Unusable { id, .. } if id == name),
                "{kind:?}: {error:?}"
            );
            let said = error.to_string();
            assert!(
                said.contains("\"web/new\\nline."),
                "quoted with escapes: {said}"
            );
        }
        // NUL-ended paths keep their spaces; no NUL: one path a line.
        assert_eq!(
            ids(RunnerKind::Files, "./t/c d.sh\0t/a.sh\0").unwrap(),
            vec!["t/a.sh", "t/c d.sh"]
        );
        assert_eq!(
            ids(RunnerKind::Files, "t/b.sh\n\nt/a.sh\n").unwrap(),
            vec!["t/a.sh", "t/b.sh"]
        );
        // A name that starts with `-` is never taken for an option.
        assert_eq!(
            ids(RunnerKind::Files, "./-rf.sh\0-x.sh\0").unwrap(),
            vec!["./-rf.sh", "./-x.sh"]
        );
        assert_eq!(
            ids(RunnerKind::Jest, r#"["/src/app/-a.test.js"]"#).unwrap(),
            vec!["./-a.test.js"]
        );
        let not_utf8 = parse(RunnerKind::Files, b"t/a\xff.sh\0", "/src").unwrap_err();
        assert!(matches!(not_utf8, ListingError::Unusable { why, .. } if why.contains("UTF-8")),);
    }

    #[test]
    fn go_import_paths() {
        assert_eq!(
            ids(RunnerKind::Go, "example.com/m/b\nexample.com/m/a\n").unwrap(),
            vec!["example.com/m/a", "example.com/m/b"]
        );
    }
}
