//! The kernel's view of a lock file, for `who` and `probe`: `/proc/locks` entries on one
//! inode, the processes behind them (command line, age), and the holders `/proc/locks` does not
//! name (OFD locks; `flock` locks whose taker is gone) found through `/proc/PID/fdinfo`.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use lockmeter_agent::proclocks::Kind;

use crate::timefmt;

/// One `/proc/locks` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// A waiter (`->` line) rather than a holder.
    pub blocked: bool,
    /// `FLOCK`, `POSIX`, `OFDLCK`, `LEASE`, `DELEG`.
    pub kind: String,
    /// `READ` or `WRITE`.
    pub mode: String,
    /// The process; -1 for OFD locks (see [`Finder::holders`]).
    pub pid: i64,
    /// `START-END` bytes.
    pub range: String,
}

/// An inode as `/proc/locks` names it: major and minor device numbers and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inode {
    /// Device major, minor.
    pub dev: (u32, u32),
    /// Inode number.
    pub ino: u64,
}

impl Inode {
    /// The inode `path` names (not following a final symlink).
    pub fn of(path: &Path) -> std::io::Result<Inode> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Inode {
            dev: (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev())),
            ino: meta.ino(),
        })
    }
}

impl Inode {
    /// Whether a lock the kernel lists is on this inode.
    fn has(&self, l: &lockmeter_agent::proclocks::RawLock) -> bool {
        (l.dev.major, l.dev.minor) == self.dev && l.ino == self.ino
    }
}

impl std::fmt::Display for Inode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.dev.0, self.dev.1, self.ino)
    }
}

/// Parses `/proc/locks` lines for one inode (`MAJ:MIN:INO`, hex major/minor), with the
/// agent's parser (lines it cannot read are left out); kinds and modes as the kernel names them.
pub fn parse(text: &str, inode: Inode) -> Vec<Entry> {
    lockmeter_agent::proclocks::parse(text)
        .locks
        .into_iter()
        .filter(|l| inode.has(l))
        .map(|l| Entry {
            blocked: l.blocked,
            kind: match l.kind {
                Kind::Flock => "FLOCK",
                Kind::Posix => "POSIX",
                Kind::Ofd => "OFDLCK",
                Kind::Lease => "LEASE",
            }
            .to_owned(),
            mode: match l.mode {
                lockmeter::metrics::LockMode::Exclusive => "WRITE",
                lockmeter::metrics::LockMode::Shared => "READ",
            }
            .to_owned(),
            pid: l.pid.map_or(-1, i64::from),
            range: match l.end {
                Some(end) => format!("{}-{end}", l.start),
                None => format!("{}-EOF", l.start),
            },
        })
        .collect()
}

/// The `/proc/locks` entries on `inode` now.
pub fn on(inode: Inode) -> std::io::Result<Vec<Entry>> {
    Ok(parse(&std::fs::read_to_string("/proc/locks")?, inode))
}

/// The processes with an open descriptor whose fdinfo lists a lock on one inode, by kind.
#[derive(Debug, Default)]
pub struct FdHolders {
    /// Holders of an OFD lock (which `/proc/locks` gives no pid for).
    pub ofd: Vec<i64>,
    /// Every process that shares an open file a `flock` lock was taken on.
    pub flock: Vec<i64>,
}

/// One pass over `/proc/*/fdinfo` for the locks on `inode`. Not this process (run with the
/// descriptor inherited, as `lockmeter who 9>F` in a script that holds it, it is only
/// looking).
pub fn fd_holders(inode: Inode) -> FdHolders {
    let mut found = FdHolders::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = i64::from(std::process::id());
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let (mut ofd, mut flock) = (false, false);
        for fd in fds.flatten() {
            let Ok(t) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            for l in lockmeter_agent::proclocks::parse_fdinfo(&t).filter(|l| inode.has(l)) {
                ofd |= l.kind == Kind::Ofd;
                flock |= l.kind == Kind::Flock;
            }
            if ofd && flock {
                break;
            }
        }
        if ofd {
            found.ofd.push(pid);
        }
        if flock {
            found.flock.push(pid);
        }
    }
    found
}

/// Who to name for one `/proc/locks` entry.
#[derive(Debug, Default)]
pub struct Holders {
    /// The processes.
    pub pids: Vec<i64>,
    /// The pid `/proc/locks` gives when it is not among them: it took a `flock` lock whose
    /// open file other processes still have (an inherited descriptor), and has exited or
    /// closed it since.
    pub taken_by: Option<i64>,
}

/// Finds the processes behind `/proc/locks` entries on one inode (scanning fdinfo at most
/// once, when an entry needs it).
#[derive(Debug)]
pub struct Finder {
    inode: Inode,
    fds: Option<FdHolders>,
}

impl Finder {
    /// A finder for the entries on `inode`.
    pub fn new(inode: Inode) -> Finder {
        Finder { inode, fds: None }
    }

    /// The processes behind `e`: for an OFD lock (no pid in `/proc/locks`) those whose
    /// descriptors list it; for a held `flock` lock the pid `/proc/locks` gives (the process
    /// that took it) unless it no longer has the lock's open file while others do, then
    /// those; otherwise the pid `/proc/locks` gives.
    pub fn holders(&mut self, e: &Entry) -> Holders {
        let inode = self.inode;
        if e.pid <= 0 {
            let fds = self.fds.get_or_insert_with(|| fd_holders(inode));
            return Holders {
                pids: fds.ofd.clone(),
                taken_by: None,
            };
        }
        if e.kind == "FLOCK" && !e.blocked {
            let sharers = &self.fds.get_or_insert_with(|| fd_holders(inode)).flock;
            if !sharers.is_empty() && !sharers.contains(&e.pid) {
                return Holders {
                    pids: sharers.clone(),
                    taken_by: Some(e.pid),
                };
            }
        }
        Holders {
            pids: vec![e.pid],
            taken_by: None,
        }
    }
}

/// What follows a holder taken over from `taken_by` ([`Holders::taken_by`]): ` (taken by pid
/// 123, which has exited)`, or `which no longer has it open`; empty when `None`.
pub fn taken_by_text(taken_by: Option<i64>) -> String {
    let Some(pid) = taken_by else {
        return String::new();
    };
    let gone = if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        "which no longer has it open"
    } else {
        "which has exited"
    };
    format!(" (taken by pid {pid}, {gone})")
}

/// What `/proc` says about a process.
#[derive(Debug, Clone)]
pub struct Process {
    /// Its pid.
    pub pid: i64,
    /// `comm`: the executable's name, 15 bytes at most (`?` if it is gone).
    pub comm: String,
    /// The command line, arguments separated by spaces (`None` if unreadable or a kernel
    /// thread).
    pub cmdline: Option<String>,
    /// How long ago it started.
    pub age: Option<Duration>,
}

impl Process {
    /// Reads `/proc/PID/{comm,cmdline,stat}`.
    pub fn read(pid: i64) -> Process {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .filter(|b| !b.is_empty())
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| quote(&String::from_utf8_lossy(a)))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        Process {
            pid,
            comm,
            cmdline,
            age: process_age(pid),
        }
    }

    /// `pid 123 (flock)`.
    pub fn short(&self) -> String {
        format!("pid {} ({})", self.pid, self.comm)
    }

    /// Whether it takes its lock as it starts, so that its age is its wait or hold time to
    /// within milliseconds: `flock(1)` and `lockmeter exec`.
    pub fn locks_at_start(&self) -> bool {
        self.comm == "flock" || self.comm == "lockmeter"
    }
}

/// An argument as a shell would need it: bare when it is plain, else in single quotes.
fn quote(a: &str) -> String {
    let plain = a
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Time since a process started: `/proc/PID/stat` field 22 (clock ticks after boot) against
/// `/proc/uptime`.
pub fn process_age(pid: i64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let start_ticks: u64 = rest.split(' ').nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let started = Duration::from_secs(start_ticks / hz)
        + Duration::from_nanos((start_ticks % hz) * 1_000_000_000 / hz);
    Duration::try_from_secs_f64(uptime)
        .ok()?
        .checked_sub(started)
}

/// One line per kernel entry, for people: `FLOCK WRITE held by pid 123 (flock): flock …`.
pub fn describe(entries: &[Entry], inode: Inode) -> Vec<String> {
    let mut out = Vec::new();
    let mut finder = Finder::new(inode);
    for e in entries {
        let h = finder.holders(e);
        let state = if e.blocked { "waiting" } else { "held" };
        if h.pids.is_empty() {
            out.push(format!(
                "{} {} {state}, owner unknown (OFD lock)",
                e.kind, e.mode
            ));
        }
        for pid in h.pids {
            let p = Process::read(pid);
            let mut line = format!(
                "{} {} {state} by {}{}",
                e.kind,
                e.mode,
                p.short(),
                taken_by_text(h.taken_by)
            );
            if let Some(c) = &p.cmdline {
                line.push_str(": ");
                line.push_str(c);
            }
            out.push(line);
        }
    }
    out
}

/// `waiting 12s` for a process that locks as it starts, else `running for 12s`.
pub fn wait_text(p: &Process) -> Option<String> {
    let age = timefmt::age(p.age?);
    Some(if p.locks_at_start() {
        format!("waiting {age}")
    } else {
        format!("running for {age}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A `/proc/locks` line as the kernel prints it (`fs/locks.c`, `lock_get_status`).
    fn line(
        n: u32,
        blocked: bool,
        kind: &str,
        mode: &str,
        pid: i64,
        inode: Inode,
        end: &str,
    ) -> String {
        let arrow = if blocked { "-> " } else { "" };
        format!(
            "{n}: {arrow}{kind}  ADVISORY  {mode} {pid} {:02x}:{:02x}:{} 0 {end}",
            inode.dev.0, inode.dev.1, inode.ino
        )
    }

    proptest! {
        /// Any bytes at all, as `read_to_string` of a strange file would give them (lossily):
        /// never a panic, and nothing found on an inode the text does not name.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                         ino in any::<u64>()) {
            let text = String::from_utf8_lossy(&bytes);
            let found = parse(&text, Inode { dev: (0xfe, 0), ino });
            for e in found {
                prop_assert!(text.contains(&ino.to_string()), "{:?}", e);
            }
        }

        /// Kernel lines for several inodes, shuffled with lines of any other bytes (no ':',
        /// so never a lock line): exactly the entries of the asked inode come back, in order.
        #[test]
        fn the_entries_of_one_inode_come_back(
            entries in proptest::collection::vec(
                (any::<bool>(), 0usize..4, any::<bool>(), -1i64..5_000_000, 0usize..3,
                 proptest::option::of(any::<u64>())),
                0..12),
            noise in proptest::collection::vec(
                proptest::collection::vec(any::<u8>().prop_filter("no newline or colon", |b| *b != b'\n' && *b != b':'), 0..40),
                0..6),
        ) {
            let want = Inode { dev: (0xfd, 3), ino: 4_242 };
            let others = [Inode { dev: (0xfd, 3), ino: 4_243 }, Inode { dev: (8, 1), ino: 4_242 }];
            let kinds = ["FLOCK", "POSIX", "OFDLCK", "LEASE"];
            let mut text = String::new();
            let mut expected = Vec::new();
            for (i, (blocked, kind, write, pid, which, end)) in entries.iter().enumerate() {
                let inode = if *which == 0 { want } else { others[which - 1] };
                let mode = if *write { "WRITE" } else { "READ" };
                let end = end.map_or("EOF".to_owned(), |e| e.to_string());
                text.push_str(&line(i as u32 + 1, *blocked, kinds[*kind], mode, *pid, inode, &end));
                text.push('\n');
                if let Some(n) = noise.get(i) {
                    text.push_str(&String::from_utf8_lossy(n).replace(':', " "));
                    text.push('\n');
                }
                if *which == 0 {
                    expected.push(Entry {
                        blocked: *blocked,
                        kind: kinds[*kind].to_owned(),
                        mode: mode.to_owned(),
                        pid: *pid,
                        range: format!("0-{end}"),
                    });
                }
            }
            prop_assert_eq!(parse(&text, want), expected);
        }
    }

    #[test]
    fn parses_held_and_blocked_entries() {
        let text = "1: FLOCK  ADVISORY  WRITE 8969 fe:00:10010789 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 9000 fe:00:10010789 0 EOF\n\
                    2: OFDLCK ADVISORY  READ -1 fe:00:10010789 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 77 08:01:5 0 EOF\n";
        let e = parse(
            text,
            Inode {
                dev: (0xfe, 0),
                ino: 10010789,
            },
        );
        assert_eq!(e.len(), 3);
        assert!(!e[0].blocked && e[1].blocked);
        assert_eq!(
            (e[0].kind.as_str(), e[0].mode.as_str(), e[0].pid),
            ("FLOCK", "WRITE", 8969)
        );
        assert_eq!((e[2].kind.as_str(), e[2].pid), ("OFDLCK", -1));
    }

    #[test]
    fn this_process_has_an_age_and_a_command_line() {
        let me = Process::read(i64::from(std::process::id()));
        assert!(me.age.is_some_and(|a| a < Duration::from_secs(3600)));
        assert!(me.cmdline.is_some_and(|c| !c.is_empty()));
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("/tmp/x.lock"), "/tmp/x.lock");
    }
}
