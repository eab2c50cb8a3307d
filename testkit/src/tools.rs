//! External tools the tests need (`flock`, `promtool`, `bindfs`, `rotel-agent`, ...): finding
//! them, and failing or (only when the run opts out) skipping a test whose tool is missing.
//!
//! A missing tool fails the test with a message naming the tool, the package that provides it
//! and whether `.ci/run` installs it. A run that sets [`ALLOW_MISSING_VAR`]`=1` skips those
//! tests instead, and every skip is appended as one line to [`skip_log_path`] (libtest hides the
//! output of passing tests), which `.ci/run` counts in its summary line.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Set to `1` to let tests whose tool is missing return early (counted as skipped) instead of
/// failing.
pub const ALLOW_MISSING_VAR: &str = "LOCKMETER_TEST_ALLOW_MISSING";

/// File name of the skip log inside the cargo target directory.
pub const SKIP_LOG_NAME: &str = "lockmeter-test-skips.log";

/// Where a tool comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Debian package (`apt-get install NAME`).
    Apt(&'static str),
    /// A Python package (`python3 -m pip install NAME`).
    Pip(&'static str),
}

impl Source {
    /// The package name.
    pub fn package(self) -> &'static str {
        match self {
            Source::Apt(p) | Source::Pip(p) => p,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Apt(p) => write!(f, "Debian package {p} (apt-get install {p})"),
            Source::Pip(p) => write!(f, "pip package {p} (python3 -m pip install {p})"),
        }
    }
}

/// Every tool a test may require, with the package that provides it. Keep `.ci/run` installing
/// each package listed here (a unit test checks it).
pub const TOOLS: &[(&str, Source)] = &[
    ("flock", Source::Apt("util-linux")),
    ("lslocks", Source::Apt("util-linux")),
    ("setpriv", Source::Apt("util-linux")),
    ("prometheus", Source::Apt("prometheus")),
    ("promtool", Source::Apt("prometheus")),
    ("bindfs", Source::Apt("bindfs")),
    ("fusermount3", Source::Apt("fuse3")),
    ("redis-server", Source::Apt("redis-server")),
    ("redis-cli", Source::Apt("redis-tools")),
    ("etcd", Source::Apt("etcd-server")),
    ("etcdctl", Source::Apt("etcd-client")),
    ("initdb", Source::Apt("postgresql")),
    ("postgres", Source::Apt("postgresql")),
    ("psql", Source::Apt("postgresql-client")),
    ("python3", Source::Apt("python3")),
    ("rotel-agent", Source::Pip("rotel")),
];

/// Tools found through another one: `rotel-agent` is located by asking `python3`.
const PREREQUISITES: &[(&str, &str)] = &[("rotel-agent", "python3")];

/// The package that provides `tool`, if this table knows it.
pub fn source_of(tool: &str) -> Option<Source> {
    TOOLS.iter().find(|(t, _)| *t == tool).map(|(_, s)| *s)
}

/// `.ci/run`, read at build time: the message says whether it installs a package.
const CI_RUN: &str = include_str!("../../.ci/run");

/// Whether `.ci/run` installs `source` (its name appears on an install line).
pub fn ci_installs(source: Source) -> bool {
    let (marker, pkg) = match source {
        Source::Apt(p) => ("apt-get install", p),
        Source::Pip(p) => ("pip install", p),
    };
    CI_RUN
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains(marker))
        .any(|l| l.split_whitespace().any(|w| w == pkg))
}

/// The message for a missing tool: the tool, its package, and what `.ci/run` does about it.
pub fn missing_message(tool: &str) -> String {
    let how = match source_of(tool) {
        Some(s) if ci_installs(s) => format!(
            "it comes from the {s}, which `.ci/run` installs (run `sudo .ci/run` for the \
             whole set-up)"
        ),
        Some(s) => {
            format!("it comes from the {s}, which `.ci/run` does not install yet: add it there")
        }
        None => format!(
            "no package is recorded for it in testkit/src/tools.rs: add `{tool}` to TOOLS \
             there and its package to `.ci/run`"
        ),
    };
    format!(
        "required tool `{tool}` is not installed: {how}. To skip the tests that need a missing \
         tool instead of failing them, set {ALLOW_MISSING_VAR}=1 (skips are listed in {})",
        skip_log_path().display()
    )
}

/// Whether `name` is an executable file in a `PATH` directory; returns its path.
fn in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Finds `tool`: a `PATH` lookup, except `rotel-agent`, which the `rotel` wheel ships inside its
/// package directory (no console script), found through `python3`.
pub fn locate(tool: &str) -> Option<PathBuf> {
    if let Some(p) = in_path(tool) {
        return Some(p);
    }
    if tool == "rotel-agent" {
        let python = in_path("python3")?;
        let out = std::process::Command::new(python)
            .args([
                "-c",
                "import rotel, os; print(os.path.dirname(rotel.__file__))",
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let p = Path::new(&dir).join("rotel-agent");
        return (out.status.success() && p.is_file()).then_some(p);
    }
    None
}

/// Like [`locate`], for a tool the test has already required: panics with the package message
/// when it is missing (a test that did not call [`require_tool`] first cannot skip).
pub fn path_of(tool: &str) -> PathBuf {
    locate(tool).unwrap_or_else(|| panic!("{}", missing_message(tool)))
}

/// A [`std::process::Command`] for a required tool (see [`path_of`]).
pub fn command(tool: &str) -> std::process::Command {
    std::process::Command::new(path_of(tool))
}

/// Whether the run opted out of failing on missing tools ([`ALLOW_MISSING_VAR`] is `1`, `true`
/// or `yes`).
pub fn missing_allowed() -> bool {
    std::env::var(ALLOW_MISSING_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// The skip log: `$CARGO_TARGET_DIR/lockmeter-test-skips.log`, by default
/// `target/lockmeter-test-skips.log` in the workspace. `.ci/run` truncates it before the run.
pub fn skip_log_path() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => workspace.join(d),
        None => workspace.join("target"),
    };
    target.join(SKIP_LOG_NAME)
}

/// `BINARY::TEST` for the running test (libtest names each test's thread after the test).
fn test_id() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            // cargo names test binaries NAME-HASH
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => s,
        })
        .unwrap_or_else(|| "?".to_owned());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    format!("{binary}::{test}")
}

/// Appends one skip line: `SKIP BINARY::TEST missing=TOOL package=PACKAGE`.
fn record_skip(tool: &str) {
    let package = source_of(tool).map_or("unknown", Source::package);
    let line = format!("SKIP {} missing={tool} package={package}\n", test_id());
    eprint!("{line}");
    let path = skip_log_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One write of one short line to an O_APPEND file: concurrent tests do not interleave.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open the skip log {}: {e}", path.display()));
    f.write_all(line.as_bytes())
        .unwrap_or_else(|e| panic!("write the skip log {}: {e}", path.display()));
}

/// Checks that `tool` is installed. Missing: fails the test with a message naming the tool, its
/// package and `.ci/run`; or, when the run opted out with [`ALLOW_MISSING_VAR`]`=1`, records the
/// skip in [`skip_log_path`] and returns false: the caller returns at once
/// (`if !require_tool("flock") { return; }`).
pub fn require_tool(tool: &str) -> bool {
    if locate(tool).is_some() {
        return true;
    }
    // Found through another tool: name the one that is missing.
    if let Some((_, needs)) = PREREQUISITES.iter().find(|(t, _)| *t == tool) {
        if locate(needs).is_none() {
            return require_tool(needs);
        }
    }
    if !missing_allowed() {
        panic!("{}", missing_message(tool));
    }
    record_skip(tool);
    false
}

/// [`require_tool`] for several tools; false (and one skip recorded) at the first missing one.
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_run_installs_every_package_of_the_table() {
        for (tool, source) in TOOLS {
            assert!(
                ci_installs(*source),
                "{tool}: .ci/run does not install {source}"
            );
        }
    }

    #[test]
    fn the_message_names_tool_package_and_ci_run() {
        let m = missing_message("promtool");
        assert!(m.contains("`promtool`"), "{m}");
        assert!(m.contains("Debian package prometheus"), "{m}");
        assert!(m.contains("`.ci/run` installs"), "{m}");
        assert!(m.contains(ALLOW_MISSING_VAR), "{m}");
        let m = missing_message("rotel-agent");
        assert!(m.contains("pip package rotel"), "{m}");
        let m = missing_message("no-such-tool");
        assert!(m.contains("testkit/src/tools.rs"), "{m}");
    }

    #[test]
    fn a_tool_is_found_on_path_only_when_executable() {
        assert!(locate("sh").is_some());
        assert!(locate("no-such-tool-lockmeter").is_none());
    }
}
