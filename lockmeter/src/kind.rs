//! What a lock is: the kernel lock a [`FileLock`](crate::FileLock) takes ([`LockKind`]) and
//! the mode it is held in ([`LockMode`]).
//!
//! A leaf module: the platform layer (`sys`), the file-system classification ([`crate::fs`])
//! and the metric schema all use these types without depending on each other.

use std::fmt;

/// Which kernel lock a [`FileLock`](crate::FileLock) takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// `flock(2)`: whole-file lock owned by the open file description. Shown as `FLOCK` in
    /// `/proc/locks`. On NFS (since Linux 2.6.12) emulated with a byte-range lock on the server.
    #[default]
    Flock,
    /// Open-file-description lock (`F_OFD_SETLK`, Linux 3.15+) over the whole file: owned by the
    /// open file description like `flock`, byte-range like POSIX. Shown as `OFDLCK`.
    Ofd,
    /// Process-associated POSIX record lock (`F_SETLK`) over the whole file. Shown as `POSIX`.
    /// See the crate docs for how lockmeter makes it exclude threads too.
    Posix,
}

impl LockKind {
    /// The `lock.kind` attribute value: `flock`, `ofd` or `posix`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Flock => "flock",
            LockKind::Ofd => "ofd",
            LockKind::Posix => "posix",
        }
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LockKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flock" => Ok(LockKind::Flock),
            "ofd" => Ok(LockKind::Ofd),
            "posix" | "fcntl" => Ok(LockKind::Posix),
            other => Err(format!(
                "unknown lock kind {other:?} (expected flock, ofd or posix)"
            )),
        }
    }
}

/// Lock mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// One holder at a time (`LOCK_EX`, `F_WRLCK`, a mutex, a write lock).
    Exclusive,
    /// Many holders at once, none exclusive (`LOCK_SH`, `F_RDLCK`, a read lock).
    Shared,
}

impl LockMode {
    /// Both modes, in index order.
    pub(crate) const ALL: [LockMode; 2] = [LockMode::Exclusive, LockMode::Shared];

    /// The attribute value: `exclusive` or `shared`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }

    /// Index into per-mode tables.
    #[inline(always)]
    pub(crate) fn idx(self) -> usize {
        self as usize
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
