//! Child processes in tests: waiting for a ready line (with a deadline, losing no output),
//! retrying until a condition holds, killing servers on drop, `flock(1)` holders, and helper
//! processes (the test binary re-executed in a role, see [`helper_roles!`](crate::helper_roles)).

use std::io::{Read, Write as _};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::tools;

/// How long a child may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`eventually`] retries.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `r` one byte at a time (so nothing after the line is buffered away) on a thread,
/// until a line satisfies `pred`; gives `r` back. `Err` carries everything read when the
/// stream ended, or `None` when `timeout` passed first (the thread is then left blocked; the
/// caller kills the child, which ends it).
fn read_line_where<R: Read + Send + 'static>(
    mut r: R,
    timeout: Duration,
    pred: impl Fn(&str) -> bool + Send + 'static,
) -> Result<(R, String), Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut line, mut all) = (Vec::new(), String::new());
        let mut byte = [0u8; 1];
        let found = loop {
            match r.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => break false,
                Ok(_) if byte[0] == b'\n' => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    all.push_str(&text);
                    all.push('\n');
                    line.clear();
                    if pred(&text) {
                        break true;
                    }
                }
                Ok(_) => line.push(byte[0]),
            }
        };
        let _ = if found {
            let last = all.lines().last().unwrap_or("").to_owned();
            tx.send(Ok((r, last)))
        } else {
            all.push_str(&String::from_utf8_lossy(&line));
            tx.send(Err(all))
        };
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(all)) => Err(Some(all)),
        Err(_) => Err(None),
    }
}

fn child_line_where(
    child: &mut Child,
    stderr: bool,
    what: &str,
    pred: impl Fn(&str) -> bool + Send + 'static,
) -> String {
    let stream = if stderr { "stderr" } else { "stdout" };
    let result = if stderr {
        let r = child.stderr.take().expect("piped stderr");
        read_line_where(r, READY_TIMEOUT, pred).map(|(r, line)| {
            child.stderr = Some(r);
            line
        })
    } else {
        let r = child.stdout.take().expect("piped stdout");
        read_line_where(r, READY_TIMEOUT, pred).map(|(r, line)| {
            child.stdout = Some(r);
            line
        })
    };
    match result {
        Ok(line) => line,
        Err(Some(all)) => {
            let status = match child.try_wait() {
                Ok(Some(st)) => st.to_string(),
                _ => "still running".to_owned(),
            };
            panic!("child closed {stream} ({status}) before printing {what}; it printed:\n{all}")
        }
        Err(None) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child printed no {what} on {stream} within {READY_TIMEOUT:?}; killed it")
        }
    }
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns it (trimmed).
/// Nothing after that line is consumed. Fails if the child closes stdout first or prints no
/// such line within [`READY_TIMEOUT`] (the child is then killed).
pub fn read_line_starting(child: &mut Child, prefix: &str) -> String {
    let p = prefix.to_owned();
    child_line_where(
        child,
        false,
        &format!("a line starting with {prefix:?}"),
        move |l| l.starts_with(&p),
    )
    .trim_end()
    .to_owned()
}

/// Reads lines from a child's stderr until one contains `needle`; returns it (trimmed).
/// Same deadline and failure as [`read_line_starting`].
pub fn read_stderr_line_containing(child: &mut Child, needle: &str) -> String {
    let n = needle.to_owned();
    child_line_where(
        child,
        true,
        &format!("a line containing {needle:?}"),
        move |l| l.contains(&n),
    )
    .trim_end()
    .to_owned()
}

/// Spawns `cmd` with stdin and stdout piped (stderr as the caller set it) and returns once
/// it printed a line starting with `prefix`, with that line.
pub fn spawn_ready(cmd: &mut Command, prefix: &str) -> (Child, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let line = read_line_starting(&mut child, prefix);
    (child, line)
}

/// Writes `line` and a newline to a child's stdin, then closes it.
pub fn send_line(child: &mut Child, line: &str) {
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .expect("write to the child's stdin");
}

/// Retries `f` until it returns true or [`EVENTUALLY_TIMEOUT`] passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Retries `f` until it returns true, failing at once (with `log`'s content, if given) when
/// `child` exits first, or after `timeout` (a server starting: listening, answering).
pub fn until_up(
    child: &mut Child,
    what: &str,
    timeout: Duration,
    log: Option<&Path>,
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    let log_text = || {
        log.map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    };
    while !f() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "{what}: the process exited ({st}) before it was up\n{}",
                log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child process killed (and reaped) on drop: servers a test starts.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `flock -n PATH true` (util-linux) and returns whether it got the lock.
pub fn flock_cli_can_lock(path: &Path) -> bool {
    let st = tools::command("flock")
        .arg("-n")
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock(1)");
    match st.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("flock(1) exited with {other:?}"),
    }
}

/// Starts `flock [-s] PATH sh -c 'echo locked; read _'` (util-linux) and returns once it holds
/// the lock; [`release_flock_holder`] lets it go.
pub fn flock_holder(path: &Path, shared: bool) -> Child {
    let mut c = tools::command("flock");
    if shared {
        c.arg("-s");
    }
    c.arg(path).args(["sh", "-c", "echo locked; read _"]);
    spawn_ready(&mut c, "locked").0
}

/// Lets a [`flock_holder`] go (a line on its stdin) and checks that it exited cleanly.
pub fn release_flock_holder(mut c: Child) {
    send_line(&mut c, "");
    let st = c.wait().expect("wait for flock(1)");
    assert!(st.success(), "flock(1) holder exited with {st}");
}

/// The environment variable naming a helper process's role.
pub const ROLE_VAR: &str = "LOCKMETER_TEST_ROLE";

/// Arguments that make a test binary run only its ignored `child_entry` test (the one
/// [`helper_roles!`](crate::helper_roles) defines).
pub const HELPER_ARGS: [&str; 6] = [
    "child_entry",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
    "-q",
];

/// This test binary re-executed as a helper process in `role` (see
/// [`helper_roles!`](crate::helper_roles)), with the given environment.
pub fn helper(role: &str, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(HELPER_ARGS)
        .env(ROLE_VAR, role)
        .envs(env.iter().copied());
    c
}

/// Like [`helper`], run under a wrapper command (`setpriv --reuid=… EXE ARGS`): appends this
/// test binary and its helper arguments to `wrapper`'s arguments.
pub fn helper_under(mut wrapper: Command, role: &str, env: &[(&str, &str)]) -> Command {
    wrapper
        .arg(std::env::current_exe().unwrap())
        .args(HELPER_ARGS)
        .env(ROLE_VAR, role)
        .envs(env.iter().copied());
    wrapper
}

/// Runs the role named by [`ROLE_VAR`]; does nothing when it is unset (the `child_entry` test
/// run directly). Panics on an unknown role.
pub fn run_helper_role(roles: &[(&str, fn())]) {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let Some((_, f)) = roles.iter().find(|(r, _)| *r == role) else {
        let known: Vec<_> = roles.iter().map(|(r, _)| *r).collect();
        panic!("unknown helper role {role:?} (known: {known:?})");
    };
    f();
}

/// An environment variable a helper role reads; panics naming it when unset.
pub fn role_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("helper process: {name} is not set"))
}

/// Defines the ignored `child_entry` test that runs a helper role in a re-executed test
/// binary ([`helper`](crate::proc::helper) starts it):
///
/// ```ignore
/// lockmeter_testkit::helper_roles! {
///     "counter" => role_counter,
///     "try" => role_try,
/// }
/// ```
#[macro_export]
macro_rules! helper_roles {
    ($($role:literal => $f:path),+ $(,)?) => {
        /// Helper-process entry point: does nothing unless started by
        /// `lockmeter_testkit::proc::helper`.
        #[test]
        #[ignore = "helper process entry point, started by other tests"]
        fn child_entry() {
            $crate::proc::run_helper_role(&[$(($role, $f as fn())),+]);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_consumes_nothing_after_it() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo one; echo ready now; echo after; read _"]);
        let (mut child, line) = spawn_ready(&mut c, "ready");
        assert_eq!(line, "ready now");
        assert_eq!(read_line_starting(&mut child, ""), "after");
        send_line(&mut child, "");
        assert!(child.wait().unwrap().success());
    }

    #[test]
    #[should_panic(expected = "before printing a line starting with \"ready\"")]
    fn a_child_that_exits_without_its_ready_line_fails_the_test() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo something else"]);
        spawn_ready(&mut c, "ready");
    }
}
