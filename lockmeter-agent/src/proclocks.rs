//! Parsers for the kernel's lock tables: `/proc/locks` and the `lock:` lines of
//! `/proc/PID/fdinfo/FD`.
//!
//! `procfs` parses `/proc/locks` too, but its parser drops the `->` marker that tells a blocked
//! waiter from a holder (the agent's `lock.waiters` is built on it) and fails the whole table
//! on one line it does not understand. These parsers keep the marker and skip (and count)
//! lines they cannot read: the format has changed over kernel versions (`DELEG`, `LEASE`
//! states) and will again.

use std::fmt;

use lockmeter::metrics::LockMode;
use serde::Serialize;

/// What kind of lock a table line describes (`lock.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `flock(2)` (`FLOCK`).
    Flock,
    /// Process-associated `fcntl` record lock (`POSIX`).
    Posix,
    /// Open-file-description lock (`OFDLCK`).
    Ofd,
    /// File lease or NFS delegation (`LEASE`, `DELEG`).
    Lease,
}

impl Kind {
    /// The `lock.kind` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Flock => "flock",
            Kind::Posix => "posix",
            Kind::Ofd => "ofd",
            Kind::Lease => "lease",
        }
    }

    /// The lockmeter lock kind used to classify the file system for this kind of lock.
    pub fn fs_kind(self) -> lockmeter::LockKind {
        match self {
            Kind::Flock | Kind::Lease => lockmeter::LockKind::Flock,
            Kind::Posix => lockmeter::LockKind::Posix,
            Kind::Ofd => lockmeter::LockKind::Ofd,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device number as `/proc/locks` prints it (`MAJ:MIN`, hex).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Dev {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl Dev {
    /// From a `stat` `st_dev`.
    pub fn from_st_dev(dev: u64) -> Dev {
        Dev {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
        }
    }

    /// From a kernel-internal `dev_t` (`MKDEV`: 12-bit major above a 20-bit minor), as the
    /// tracepoint source reads `inode->i_sb->s_dev`.
    pub fn from_kernel(dev: u32) -> Dev {
        Dev {
            major: dev >> 20,
            minor: dev & 0xf_ffff,
        }
    }

    /// The kernel's internal `dev_t` (the inverse of [`from_kernel`](Self::from_kernel)).
    pub fn to_kernel(self) -> u32 {
        (self.major << 20) | (self.minor & 0xf_ffff)
    }
}

impl fmt::Display for Dev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}", self.major, self.minor)
    }
}

/// One line of `/proc/locks` (or of an fdinfo `lock:` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawLock {
    /// The table's ordinal (`N:`): a blocked waiter carries its blocker's number.
    pub ordinal: u32,
    /// A `->` line: this process is blocked waiting for the lock above it.
    pub blocked: bool,
    /// Lock kind.
    pub kind: Kind,
    /// `WRITE` is exclusive, `READ` shared.
    pub mode: LockMode,
    /// The owning process; `None` for `-1` (OFD locks, and some leases).
    pub pid: Option<u32>,
    /// Device of the locked file.
    pub dev: Dev,
    /// Inode of the locked file.
    pub ino: u64,
    /// First byte.
    pub start: u64,
    /// Last byte; `None` for `EOF`.
    pub end: Option<u64>,
}

/// The parsed table plus how many lines were skipped.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The lines that parsed, in table order.
    pub locks: Vec<RawLock>,
    /// Lines that did not (unknown kind or mode, a truncated line, a future format).
    pub skipped: usize,
}

/// Parses one line; `None` when it is not a lock line this parser understands. Never panics.
pub fn parse_line(line: &str) -> Option<RawLock> {
    let mut f = line.split_ascii_whitespace();
    let ordinal = f.next()?.strip_suffix(':')?.parse().ok()?;
    let mut kind = f.next()?;
    let blocked = kind == "->";
    if blocked {
        kind = f.next()?;
    }
    let kind = match kind {
        "FLOCK" => Kind::Flock,
        "POSIX" => Kind::Posix,
        "OFDLCK" => Kind::Ofd,
        "LEASE" | "DELEG" => Kind::Lease,
        _ => return None,
    };
    let _advisory_or_state = f.next()?;
    let mode = match f.next()? {
        "WRITE" => LockMode::Exclusive,
        "READ" => LockMode::Shared,
        _ => return None, // UNLCK: a lease being broken
    };
    let pid = match f.next()? {
        "-1" => None,
        p => Some(p.parse().ok()?),
    };
    let mut id = f.next()?.split(':');
    let major = u32::from_str_radix(id.next()?, 16).ok()?;
    let minor = u32::from_str_radix(id.next()?, 16).ok()?;
    let ino = id.next()?.parse().ok()?;
    let start = f.next()?.parse().ok()?;
    let end = match f.next()? {
        "EOF" => None,
        e => Some(e.parse().ok()?),
    };
    Some(RawLock {
        ordinal,
        blocked,
        kind,
        mode,
        pid,
        dev: Dev { major, minor },
        ino,
        start,
        end,
    })
}

/// Parses the whole of `/proc/locks`.
pub fn parse(text: &str) -> Table {
    let mut t = Table::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_line(line) {
            Some(l) => t.locks.push(l),
            None => t.skipped += 1,
        }
    }
    t
}

/// The `lock:` lines of one fdinfo file (`lock:\t1: OFDLCK ADVISORY WRITE -1 fe:00:12 0 EOF`):
/// the locks held through that descriptor's open file description.
pub fn parse_fdinfo(text: &str) -> impl Iterator<Item = RawLock> + '_ {
    text.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(parse_line)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn holders_waiters_and_odd_lines() {
        let text = "1: FLOCK  ADVISORY  WRITE 8969 fe:00:10010789 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 9000 fe:00:10010789 0 EOF\n\
                    2: OFDLCK ADVISORY  READ -1 00:2f:77 0 9\n\
                    3: LEASE  BREAKING  UNLCK 5 08:01:5 0 EOF\n\
                    4: POSIX  ADVISORY  WRITE 77 08:01\n\
                    5: WHATEVER ADVISORY WRITE 1 08:01:5 0 EOF\n\
                    garbage\n\
                    6: DELEG  ACTIVE    READ 12 08:01:6 0 EOF\n";
        let t = parse(text);
        assert_eq!(t.locks.len(), 4);
        assert_eq!(t.skipped, 4);
        assert!(!t.locks[0].blocked && t.locks[1].blocked);
        assert_eq!(t.locks[1].ordinal, 1);
        assert_eq!(t.locks[0].pid, Some(8969));
        assert_eq!(
            t.locks[0].dev,
            Dev {
                major: 0xfe,
                minor: 0
            }
        );
        assert_eq!(t.locks[2].kind, Kind::Ofd);
        assert_eq!(t.locks[2].pid, None);
        assert_eq!(t.locks[2].mode, LockMode::Shared);
        assert_eq!(t.locks[2].end, Some(9));
        assert_eq!(t.locks[3].kind, Kind::Lease);
    }

    #[test]
    fn fdinfo_lock_lines() {
        let text = "pos:\t0\nflags:\t02100002\nmnt_id:\t30\nino:\t77\n\
                    lock:\t1: OFDLCK ADVISORY  WRITE -1 00:2f:77 0 EOF\n";
        let l: Vec<_> = parse_fdinfo(text).collect();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].kind, l[0].ino), (Kind::Ofd, 77));
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(
            Dev::from_kernel((0xfe << 20) | 3),
            Dev {
                major: 0xfe,
                minor: 3
            }
        );
    }

    #[test]
    fn never_panics_on_prefixes_of_valid_lines() {
        let line = "12: -> POSIX  ADVISORY  WRITE 8969 fe:00:10010789 100 EOF";
        for i in 0..line.len() {
            let _ = parse_line(&line[..i]);
        }
    }
}
