//! `lockmeter who`: who holds a lock file and who waits, from its owner record and
//! `/proc/locks`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;
use lockmeter::{FileLock, FsPolicy};

use crate::locks::{self, Inode, Process};
use crate::timefmt;

/// Arguments of `lockmeter who`.
#[derive(Args, Debug)]
#[command(
    after_help = "Shows the owner record lockmeter holders write (--owner-record): lock name, \
host, pid, fencing token, when it was acquired (local time) and for how long it has been held; \
then every kernel lock on the file from /proc/locks (this host only): type, mode, holder or \
waiter, its command line, and how long it has been there. /proc/locks keeps no times: hold and \
wait times there are the processes' ages, which for flock(1) and lockmeter (they lock as they \
start) are the lock's to within milliseconds. OFD locks carry no pid in /proc/locks, and the pid \
of a flock lock is the process that took it, which may have exited while a process that \
inherited the descriptor holds on: those holders are found through /proc/PID/fdinfo."
)]
pub struct WhoArgs {
    /// The lock file.
    #[arg(value_name = "PATH")]
    path: PathBuf,
}

/// Runs `lockmeter who`.
pub fn run(args: WhoArgs) -> ExitCode {
    let inode = match Inode::of(&args.path) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("lockmeter: cannot stat {}: {e}", args.path.display());
            return ExitCode::from(66);
        }
    };
    println!("lock file:  {} (inode {inode})", args.path.display());
    // The owner record's holder, if it is running here, and how long it has held the lock.
    let mut owner: Option<(i64, Option<String>)> = None;
    let holder = if args.path.is_dir() {
        Ok(None)
    } else {
        FileLock::builder(&args.path)
            .create(false)
            .fs_policy(FsPolicy::Allow)
            .open()
            .and_then(|l| l.holder())
    };
    match holder {
        Ok(Some(h)) => {
            if let Some(name) = &h.name {
                println!("name:       {name}");
            }
            let here = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|b| b.trim() == h.boot_id)
                .unwrap_or(false);
            let running = here
                && std::fs::read_to_string(format!("/proc/{}/stat", h.pid))
                    .ok()
                    .and_then(|s| s.rfind(')').and_then(|i| s.get(i + 2..)).map(str::to_owned))
                    .and_then(|r| r.split(' ').nth(19).and_then(|v| v.parse::<u64>().ok()))
                    == Some(h.start_time);
            let alive = match (here, running) {
                (false, _) => "on another host or boot",
                (true, true) => "running",
                (true, false) => "exited",
            };
            let ago = h.acquired_time().map(|t| {
                let ago = SystemTime::now()
                    .duration_since(t)
                    .map(timefmt::age)
                    .unwrap_or_else(|_| "0ms".into());
                (t, ago)
            });
            let when = match &ago {
                Some((t, ago)) if running => {
                    format!("acquired {} (held for {ago})", timefmt::local_timestamp(*t))
                }
                Some((t, ago)) => format!("acquired {} ({ago} ago)", timefmt::local_timestamp(*t)),
                None => format!("acquired at {}", h.acquired_at),
            };
            println!(
                "owner:      {} pid {} ({alive}), fence {}, token {}, {when}",
                h.host, h.pid, h.fence, h.token
            );
            if running {
                owner = Some((i64::from(h.pid), ago.map(|(_, a)| format!("held for {a}"))));
                if let Some(c) = Process::read(i64::from(h.pid)).cmdline {
                    println!("            command: {c}");
                }
            }
        }
        Ok(None) if args.path.is_dir() => {
            println!("owner:      none (a directory cannot hold an owner record)")
        }
        Ok(None) => println!("owner:      no owner record (holders did not use --owner-record)"),
        Err(e) => println!("owner:      cannot read: {e}"),
    }
    let entries = match locks::on(inode) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("lockmeter: cannot read /proc/locks: {e}");
            return ExitCode::from(71);
        }
    };
    if entries.is_empty() {
        println!("kernel:     no locks on this file on this host");
    }
    let mut finder = locks::Finder::new(inode);
    for e in &entries {
        let h = finder.holders(e);
        let state = if e.blocked { "waiting" } else { "held" };
        let head = format!("kernel:     {:<7} {:<5} {state:<8}", e.kind, e.mode);
        if h.pids.is_empty() {
            println!("{head}owner unknown (OFD lock) bytes {}", e.range);
        }
        for pid in h.pids {
            let p = Process::read(pid);
            let time = if e.blocked {
                locks::wait_text(&p)
            } else if let Some((_, held)) = owner.as_ref().filter(|(o, _)| *o == pid) {
                held.clone()
            } else {
                p.age.map(|a| format!("running for {}", timefmt::age(a)))
            };
            let time = time.map(|t| format!(", {t}")).unwrap_or_default();
            let taken = locks::taken_by_text(h.taken_by);
            println!("{head}{}{taken}{time}, bytes {}", p.short(), e.range);
            if let Some(c) = &p.cmdline {
                println!("            command: {c}");
            }
        }
    }
    ExitCode::SUCCESS
}
