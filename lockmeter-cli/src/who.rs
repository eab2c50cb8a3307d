//! `lockmeter who`: who holds a lock file, from its owner record and `/proc/locks`.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lockmeter::{FileLock, FsPolicy};

/// Arguments of `lockmeter who`.
#[derive(Args, Debug)]
#[command(
    after_help = "Shows the owner record lockmeter holders write (--owner-record) and \
every kernel lock on the file from /proc/locks (this host only): type, mode, pid and command, \
and processes blocked waiting ('waiting'). OFD locks carry no pid in /proc/locks; their holders \
are found through /proc/PID/fdinfo."
)]
pub struct WhoArgs {
    /// The lock file.
    #[arg(value_name = "PATH")]
    path: PathBuf,
}

/// One `/proc/locks` entry.
#[derive(Debug)]
struct Entry {
    blocked: bool,
    kind: String,
    mode: String,
    pid: i64,
    range: String,
}

/// Parses `/proc/locks` lines for one inode (`MAJ:MIN:INO`, hex major/minor).
fn proc_locks(text: &str, dev: (u32, u32), ino: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        f.remove(0); // "N:"
        let blocked = f.first() == Some(&"->");
        if blocked {
            f.remove(0);
        }
        // TYPE ADVISORY|MANDATORY MODE PID MAJ:MIN:INO START END
        if f.len() < 7 {
            continue;
        }
        let mut id = f[4].split(':');
        let (Some(maj), Some(min), Some(i)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let same = u32::from_str_radix(maj, 16).ok() == Some(dev.0)
            && u32::from_str_radix(min, 16).ok() == Some(dev.1)
            && i.parse::<u64>().ok() == Some(ino);
        if same {
            out.push(Entry {
                blocked,
                kind: f[0].to_owned(),
                mode: f[2].to_owned(),
                pid: f[3].parse().unwrap_or(-1),
                range: format!("{}-{}", f[5], f[6]),
            });
        }
    }
    out
}

fn comm(pid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Processes with an open descriptor whose fdinfo lists an OFD lock on the inode.
fn ofd_holders(dev: (u32, u32), ino: u64) -> Vec<i64> {
    let needle = format!("{:02x}:{:02x}:{ino} ", dev.0, dev.1);
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let hit = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&needle))
            })
        });
        if hit {
            pids.push(pid);
        }
    }
    pids
}

/// Runs `lockmeter who`.
pub fn run(args: WhoArgs) -> ExitCode {
    let meta = match std::fs::symlink_metadata(&args.path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("lockmeter: cannot stat {}: {e}", args.path.display());
            return ExitCode::from(66);
        }
    };
    let dev = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
    println!(
        "lock file:  {} (inode {}:{}:{})",
        args.path.display(),
        dev.0,
        dev.1,
        meta.ino()
    );
    let holder = FileLock::builder(&args.path)
        .create(false)
        .fs_policy(FsPolicy::Allow)
        .open()
        .and_then(|l| l.holder());
    match holder {
        Ok(Some(h)) => {
            let here = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|b| b.trim() == h.boot_id)
                .unwrap_or(false);
            let alive = if here {
                let start = std::fs::read_to_string(format!("/proc/{}/stat", h.pid))
                    .ok()
                    .and_then(|s| s.rfind(')').map(|i| s[i + 2..].to_owned()))
                    .and_then(|r| r.split(' ').nth(19).and_then(|v| v.parse::<u64>().ok()));
                if start == Some(h.start_time) {
                    "running"
                } else {
                    "exited"
                }
            } else {
                "on another host or boot"
            };
            println!(
                "owner:      {} pid {} ({alive}), fence {}, token {}, acquired at {}",
                h.host, h.pid, h.fence, h.token, h.acquired_at
            );
        }
        Ok(None) => println!("owner:      no owner record (holders did not use --owner-record)"),
        Err(e) => println!("owner:      cannot read: {e}"),
    }
    let text = match std::fs::read_to_string("/proc/locks") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lockmeter: cannot read /proc/locks: {e}");
            return ExitCode::from(71);
        }
    };
    let entries = proc_locks(&text, dev, meta.ino());
    if entries.is_empty() {
        println!("kernel:     no locks on this file on this host");
    }
    let mut ofd = None;
    for e in &entries {
        let who = if e.pid > 0 {
            format!("pid {} ({})", e.pid, comm(e.pid))
        } else {
            let pids = ofd.get_or_insert_with(|| ofd_holders(dev, meta.ino()));
            if pids.is_empty() {
                "owner unknown (OFD lock)".to_owned()
            } else {
                pids.iter()
                    .map(|p| format!("pid {p} ({})", comm(*p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        println!(
            "kernel:     {:<7} {:<5} {:<8} {who} bytes {}",
            e.kind,
            e.mode,
            if e.blocked { "waiting" } else { "held" },
            e.range
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_held_and_blocked_entries() {
        let text = "1: FLOCK  ADVISORY  WRITE 8969 fe:00:10010789 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 9000 fe:00:10010789 0 EOF\n\
                    2: OFDLCK ADVISORY  READ -1 fe:00:10010789 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 77 08:01:5 0 EOF\n";
        let e = proc_locks(text, (0xfe, 0), 10010789);
        assert_eq!(e.len(), 3);
        assert!(!e[0].blocked && e[1].blocked);
        assert_eq!(
            (e[0].kind.as_str(), e[0].mode.as_str(), e[0].pid),
            ("FLOCK", "WRITE", 8969)
        );
        assert_eq!((e[2].kind.as_str(), e[2].pid), ("OFDLCK", -1));
    }
}
