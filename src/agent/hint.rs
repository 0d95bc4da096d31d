//! What to tell the user when a shard's command could not find its tools: a
//! missing command (exit 127) or a toolchain manager that found no toolchain.
//! The shard's environment is deliberately small (the image's, or locally the
//! host's toolchain locations), so the usual fix is to forward a variable with
//! `--env NAME` or to put the tool in the image; the hint says which.

/// Most bytes of the end of the command's stderr kept to look for the cause.
pub const STDERR_TAIL: usize = 4096;

/// The hint for a command that ended with `exit_code` after writing
/// `stderr_tail` (the last [`STDERR_TAIL`] bytes of its stderr), if any.
pub fn for_failure(exit_code: i32, stderr_tail: &[u8]) -> Option<String> {
    let tail = String::from_utf8_lossy(stderr_tail);
    if let Some(tool) = manager_without_toolchain(&tail) {
        return Some(format!(
            "mvm-shard: {tool} found no toolchain in this shard (HOME is fresh here). \
             Forward where its toolchains live: --env RUSTUP_HOME (and --env RUSTUP_TOOLCHAIN), \
             or install a default toolchain in the image (lambda-image/)."
        ));
    }
    if exit_code != 127 {
        return None;
    }
    let what = missing_command(&tail).map_or_else(
        || "a command".to_string(),
        |name| format!("command `{name}`"),
    );
    Some(format!(
        "mvm-shard: {what} was not found in this shard (exit 127). A shard has the image's \
         tools (locally: this machine's PATH and toolchain locations, see the README), not \
         the project's git-ignored dependencies (node_modules/.bin, .venv) nor HOME. Install \
         those in the command (`npm ci && ...`, `uv sync && ...`) or restore them with --cache; \
         a tool found through another variable needs --env NAME; on Lambda a tool the image \
         lacks must be added to it."
    ))
}

/// rustup's refusal to pick a toolchain: "rustup could not choose a version of cargo to run".
fn manager_without_toolchain(tail: &str) -> Option<&'static str> {
    tail.contains("rustup could not choose a version")
        .then_some("rustup")
}

/// The name in a shell's "not found" line: bash's `bash: line 1: NAME: command
/// not found`, dash's `sh: 1: NAME: not found`, env's `env: 'NAME': No such file or directory`.
fn missing_command(tail: &str) -> Option<String> {
    tail.lines().rev().find_map(|line| {
        let line = line.trim_end();
        let head = line
            .strip_suffix(": command not found")
            .or_else(|| line.strip_suffix(": not found"))
            .or_else(|| line.strip_suffix(": No such file or directory"))?;
        let name = head
            .rsplit(": ")
            .next()?
            .trim_matches(['\'', '"', '\u{2018}', '\u{2019}']);
        (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_127_names_the_missing_command_from_bash_dash_or_env() {
        for (stderr, name) in [
            ("bash: line 1: jest: command not found\n", "jest"),
            ("sh: 1: pytest: not found\n", "pytest"),
            ("env: 'gotestsum': No such file or directory\n", "gotestsum"),
            (
                "env: \u{2018}vitest\u{2019}: No such file or directory\n",
                "vitest",
            ),
        ] {
            let hint = for_failure(127, stderr.as_bytes()).unwrap();
            assert!(hint.contains(&format!("`{name}`")), "{hint}");
            assert!(hint.contains("--env NAME"), "{hint}");
        }
        let hint = for_failure(127, b"").unwrap();
        assert!(hint.contains("a command was not found"), "{hint}");
    }

    #[test]
    fn rustup_refusal_says_what_to_forward_whatever_the_exit_code() {
        let stderr = b"error: rustup could not choose a version of cargo to run, because one \
                       wasn't specified explicitly, and no default is configured.\n";
        let hint = for_failure(1, stderr).unwrap();
        assert!(hint.contains("--env RUSTUP_HOME"), "{hint}");
    }

    #[test]
    fn an_ordinary_failure_gets_no_hint() {
        assert_eq!(
            for_failure(1, b"test result: FAILED. 1 passed; 1 failed"),
            None
        );
        assert_eq!(for_failure(0, b""), None);
    }
}
