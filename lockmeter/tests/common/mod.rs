//! Re-executes this test binary as a helper process.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::Command;

/// Arguments that make this test binary run only the ignored `child_entry` helper.
pub const CHILD_ARGS: [&str; 6] = [
    "child_entry",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
    "-q",
];

/// Re-executes this test binary as a helper process running the ignored `child` test, with
/// `LOCKMETER_TEST_ROLE=role` and the given environment.
pub fn child(role: &str, env: &[(&str, &str)]) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe);
    c.args(CHILD_ARGS).env("LOCKMETER_TEST_ROLE", role);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}
