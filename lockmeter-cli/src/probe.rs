//! `lockmeter probe`: can locking on this path be trusted?

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use lockmeter::fs::Coherence;
use lockmeter::{FileLock, FileLockGuard, FsPolicy, LockKind};

use crate::locks::{self, Inode};
use crate::timefmt;

const KINDS: [LockKind; 3] = [LockKind::Flock, LockKind::Ofd, LockKind::Posix];

/// Arguments of `lockmeter probe`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 when locking on PATH can be trusted; 1 when it cannot \
(the reason is printed); 66 when PATH cannot be opened; 75 when someone else held PATH for \
longer than --timeout (the holder is named). PATH is created (mode 0644) if missing and never \
deleted. The probe locks PATH itself: when it is held, the probe says by whom (from \
/proc/locks) before it waits."
)]
pub struct ProbeArgs {
    /// The lock file to check.
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// The same file through another mount (or another client's view): check that a lock
    /// through PATH excludes one through PEER.
    #[arg(long, value_name = "PEER")]
    peer: Option<PathBuf>,
    /// Hold PATH exclusively for SECS seconds with an owner record, while the same probe runs
    /// on another host against the same shared file: a foreign record appearing during the hold
    /// is split brain.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    rendezvous: Option<Duration>,
    /// Lock kinds to check (repeatable; default: flock, ofd and posix). Some file systems
    /// make one kind coherent and not another: bindfs --enable-lock-forwarding forwards flock,
    /// but re-issues POSIX/OFD locks from its own process, so they exclude nobody.
    #[arg(long = "kind", value_name = "flock|ofd|posix")]
    kinds: Vec<LockKind>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// How long to wait for PATH when another process holds it.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "30",
        value_parser = parse_secs,
        allow_negative_numbers = true
    )]
    timeout: Duration,
}

/// sysexits `EX_TEMPFAIL`: PATH stayed locked by someone else; probe again later.
const EX_TEMPFAIL: u8 = 75;

/// Why the probe could not run to a verdict.
enum Stop {
    /// PATH (or the peer) cannot be used: exit 66.
    Open(String),
    /// Someone else held PATH for longer than `--timeout`: exit 75.
    Busy(String),
}

impl Stop {
    fn exit(self) -> ExitCode {
        let (msg, code) = match self {
            Stop::Open(m) => (m, 66),
            Stop::Busy(m) => (m, EX_TEMPFAIL),
        };
        eprintln!("lockmeter: {msg}");
        ExitCode::from(code)
    }
}

impl From<lockmeter::Error> for Stop {
    fn from(e: lockmeter::Error) -> Stop {
        Stop::Open(e.to_string())
    }
}

/// Who holds `path` now, from `/proc/locks` (`FLOCK WRITE held by pid 12 (flock): flock …`).
fn holders_of(path: &Path) -> String {
    let Ok(inode) = Inode::of(path) else {
        return "someone".into();
    };
    let held: Vec<_> = locks::on(inode)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !e.blocked)
        .collect();
    let lines = locks::describe(&held, inode);
    if lines.is_empty() {
        // Not a lock /proc/locks shows here: another host, or another mount's lock domain.
        "a holder not on this host (no entry in /proc/locks)".into()
    } else {
        lines.join("; ")
    }
}

/// Takes `lock` exclusively, waiting at most `timeout`; says first what it waits for.
fn lock_or_say<'a>(
    lock: &'a FileLock,
    path: &Path,
    timeout: Duration,
) -> Result<FileLockGuard<'a>, Stop> {
    if let Some(g) = lock.try_lock()? {
        return Ok(g);
    }
    let who = holders_of(path);
    eprintln!(
        "lockmeter: {} is locked ({who}); waiting up to {} for it (--timeout)",
        path.display(),
        timefmt::age(timeout)
    );
    lock.lock_timeout(timeout)?.ok_or_else(|| {
        Stop::Busy(format!(
            "{} stayed locked for {} ({}); probe again later, or raise --timeout",
            path.display(),
            timefmt::age(timeout),
            holders_of(path)
        ))
    })
}

/// Arguments of the hidden helper: try a lock from a second process.
#[derive(Args, Debug)]
pub struct HelperArgs {
    #[arg(long)]
    kind: LockKind,
    path: PathBuf,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The helper: exit 0 if a non-blocking exclusive lock was granted, 1 if refused, 2 on error.
pub fn helper(args: HelperArgs) -> ExitCode {
    let lock = FileLock::builder(&args.path)
        .kind(args.kind)
        .fs_policy(FsPolicy::Allow)
        .verify_inode(false)
        .open();
    match lock.and_then(|l| l.try_lock().map(|g| g.is_some())) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("lockmeter: {e}");
            ExitCode::from(2)
        }
    }
}

/// Holds `path` with `kind` and asks a second process to lock `other`: `Ok(true)` if it was
/// refused (the two exclude each other).
fn excludes(path: &Path, other: &Path, kind: LockKind, timeout: Duration) -> Result<bool, Stop> {
    let lock = FileLock::builder(path)
        .kind(kind)
        .fs_policy(FsPolicy::Allow)
        .open()?;
    // Someone (another probe in a rendezvous, a real holder) may have it: wait, bounded.
    let _g = lock_or_say(&lock, path, timeout)?;
    let exe = std::env::current_exe().map_err(|e| Stop::Open(e.to_string()))?;
    let st = Command::new(exe)
        .args(["probe-helper", "--kind", kind.as_str()])
        .arg(other)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| Stop::Open(e.to_string()))?;
    match st.code() {
        Some(1) => Ok(true),
        Some(0) => Ok(false),
        _ => Err(Stop::Open(format!(
            "the second process could not lock {}",
            other.display()
        ))),
    }
}

/// Runs `lockmeter probe`.
pub fn run(args: ProbeArgs) -> ExitCode {
    let lock = match FileLock::builder(&args.path)
        .fs_policy(FsPolicy::Allow)
        .open()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lockmeter: {e}");
            return ExitCode::from(66);
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let mut local = Vec::new();
    let mut across = Vec::new();
    let mut coherences = Vec::new();
    let kinds: Vec<LockKind> = if args.kinds.is_empty() {
        KINDS.to_vec()
    } else {
        args.kinds.clone()
    };
    for &kind in &kinds {
        let info = FileLock::builder(&args.path)
            .kind(kind)
            .fs_policy(FsPolicy::Allow)
            .open()
            .map(|l| l.fs_info().clone());
        if let Ok(i) = info {
            coherences.push((kind, i.coherence, i.reasons));
        }
        match excludes(&args.path, &args.path, kind, args.timeout) {
            Ok(true) => local.push((kind, true)),
            Ok(false) => {
                local.push((kind, false));
                problems.push(format!(
                    "{kind}: a lock on {} does not exclude another process taking it",
                    args.path.display()
                ));
            }
            Err(stop) => return stop.exit(),
        }
        if let Some(peer) = &args.peer {
            match excludes(&args.path, peer, kind, args.timeout) {
                Ok(x) => {
                    across.push((kind, x));
                    if !x {
                        problems.push(format!(
                            "{kind}: a lock through {} does not exclude one through {}: split brain",
                            args.path.display(),
                            peer.display()
                        ));
                    }
                }
                Err(stop) => return stop.exit(),
            }
        }
    }
    // The static classification matters where no experiment answered the question: a peer
    // check that passed settles "unknown", one that failed already explains itself.
    for (kind, c, reasons) in &coherences {
        match c {
            Coherence::LocalOnly => problems.push(format!("{kind}: {}", reasons.join("; "))),
            Coherence::Unknown if args.peer.is_none() => problems.push(format!(
                "{kind}: cannot tell whether locks here exclude other clients ({}); run with --peer PATH2 through another mount",
                reasons.join("; ")
            )),
            _ => {}
        }
    }
    let mut rendezvous_note = None;
    if let Some(hold) = args.rendezvous {
        match rendezvous(&args.path, hold, args.timeout.max(hold * 4)) {
            Ok(None) => {
                rendezvous_note = Some("no other holder appeared while we held the lock".to_owned())
            }
            Ok(Some(v)) => problems.push(v),
            Err(stop) => return stop.exit(),
        }
    }
    problems.dedup();

    let info = lock.fs_info();
    let trusted = problems.is_empty();
    if args.json {
        let kinds = |v: &[(LockKind, bool)]| -> serde_json::Value {
            v.iter()
                .map(|(k, x)| (k.as_str().to_owned(), serde_json::Value::Bool(*x)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let out = serde_json::json!({
            "path": args.path,
            "fs_type": info.fs_type,
            "mount": info.mount.as_ref().map(|m| serde_json::json!({
                "source": m.source,
                "mount_point": m.mount_point,
                "mount_options": m.mount_options,
                "super_options": m.super_options,
            })),
            "coherence": coherences.iter().map(|(k, c, r)| (k.as_str().to_owned(), serde_json::json!({"class": c.as_str(), "reasons": r}))).collect::<serde_json::Map<_, _>>(),
            "excludes_on_path": kinds(&local),
            "peer": args.peer,
            "excludes_across_peer": if args.peer.is_some() { kinds(&across) } else { serde_json::Value::Null },
            "rendezvous": rendezvous_note,
            "trusted": trusted,
            "problems": problems,
        });
        println!("{out:#}");
    } else {
        println!("path:         {}", args.path.display());
        match &info.mount {
            Some(m) => {
                println!(
                    "file system:  {} (source {}, mounted on {})",
                    info.fs_type,
                    m.source,
                    m.mount_point.display()
                );
                println!(
                    "options:      {} | {}",
                    m.mount_options.join(","),
                    m.super_options.join(",")
                );
            }
            None => println!(
                "file system:  {} (mount not found in /proc/self/mountinfo)",
                info.fs_type
            ),
        }
        // Group kinds that share a classification and reasons.
        let mut shown: Vec<(Vec<String>, Coherence, &Vec<String>)> = Vec::new();
        for (kind, c, reasons) in &coherences {
            match shown
                .iter_mut()
                .find(|(_, c2, r2)| c2 == c && *r2 == reasons)
            {
                Some(e) => e.0.push(kind.to_string()),
                None => shown.push((vec![kind.to_string()], *c, reasons)),
            }
        }
        for (ks, c, reasons) in shown {
            println!("locks:        {} -> {c}", ks.join(", "));
            for r in reasons {
                println!("                - {r}");
            }
        }
        let yn = |v: &[(LockKind, bool)]| {
            v.iter()
                .map(|(k, x)| format!("{k} {}", if *x { "yes" } else { "NO" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("excludes another process on this path: {}", yn(&local));
        if let Some(peer) = &args.peer {
            println!("excludes through {}: {}", peer.display(), yn(&across));
        }
        if let Some(n) = &rendezvous_note {
            println!("rendezvous:   {n}");
        }
        if trusted {
            println!("verdict:      locking on this path can be trusted");
        } else {
            println!("verdict:      NOT TRUSTED");
            for p in &problems {
                println!("                - {p}");
            }
        }
    }
    if trusted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Holds the lock with an owner record for `hold`, checking the record as it goes. Another
/// host running the same probe against the same file either waits for us (the lock excludes)
/// or writes its record while we hold (split brain).
fn rendezvous(path: &Path, hold: Duration, wait: Duration) -> Result<Option<String>, Stop> {
    let lock = FileLock::builder(path)
        .owner_record(true)
        .fs_policy(FsPolicy::Allow)
        .open()?;
    let mut g = lock_or_say(&lock, path, wait)?;
    let end = std::time::Instant::now() + hold;
    while std::time::Instant::now() < end {
        if !g.check_owner()? {
            let other = lock
                .holder()
                .ok()
                .flatten()
                .map(|h| format!("{} pid {}", h.host, h.pid))
                .unwrap_or_else(|| "another holder".into());
            return Ok(Some(format!(
                "split brain: {other} acquired {} while this probe held it exclusively",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}
