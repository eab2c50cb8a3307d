//! Typed errors: every failure names the lock file, the operation and the errno.

use std::fmt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

/// The lock operation that failed; recorded as the `lock.operation` attribute of `lock.errors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Opening (or creating) the lock file.
    Open,
    /// Taking the lock.
    Lock,
    /// Releasing the lock.
    Unlock,
    /// Checking that the locked descriptor is still the file the path names.
    Verify,
}

impl Operation {
    /// The attribute value: `open`, `lock`, `unlock` or `verify`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Lock => "lock",
            Operation::Unlock => "unlock",
            Operation::Verify => "verify",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors from lock files. Each one carries the path, the operation and the errno, and is also
/// counted in `lock.errors` with `error.type` set to the errno name.
///
/// `Debug` prints the same sentence as `Display` (what `fn main() -> Result<…>` shows for an
/// error returned with `?`); match on the variants for the fields.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on the lock file failed.
    #[error("cannot {operation} lock file {}: {} ({})", path.display(), crate::sys::errno_name(*errno), std::io::Error::from(*errno))]
    Os {
        /// The lock file as given.
        path: PathBuf,
        /// What was being done.
        operation: Operation,
        /// The error number.
        errno: Errno,
    },
    /// The path names a directory; lockmeter locks regular files only.
    #[error("cannot open lock file {}: it is a directory (give a file path inside it)", path.display())]
    IsDirectory {
        /// The lock file as given.
        path: PathBuf,
    },
    /// The path is a symbolic link. Lock files are opened with `O_NOFOLLOW`: a link could point
    /// the lock anywhere, and replacing the link silently changes which file is locked.
    #[error("refusing lock file {}: it is a symbolic link (lock files are opened with O_NOFOLLOW)", path.display())]
    Symlink {
        /// The lock file as given.
        path: PathBuf,
    },
    /// The path names something other than a regular file (a FIFO, a device, a socket).
    #[error("cannot use {} as a lock file: it is not a regular file", path.display())]
    NotRegularFile {
        /// The lock file as given.
        path: PathBuf,
    },
    /// The lock file's file system cannot be trusted to make locks exclude, and the builder's
    /// policy is [`FsPolicy::Refuse`](crate::FsPolicy::Refuse).
    #[error("refusing lock file {}: locks on this {fs_type} file system are {coherence}: {reasons}", path.display())]
    UntrustedFileSystem {
        /// The lock file as given.
        path: PathBuf,
        /// File-system type from the mount table.
        fs_type: String,
        /// The classification.
        coherence: crate::fs::Coherence,
        /// Why.
        reasons: String,
    },
    /// The lock file kept being replaced between locking and verifying.
    #[error("lock file {} was replaced {attempts} times in a row while locking; giving up", path.display())]
    Unstable {
        /// The lock file as given.
        path: PathBuf,
        /// How many times the lock was taken on an inode that the path no longer named.
        attempts: u32,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_sentence(self, f)
    }
}

/// An error and its sources as one sentence: the `Display` text, then each source whose text
/// the sentence does not already contain, after a colon. For `Debug` impls, so that `?` in
/// `main` prints what a person can read.
pub(crate) fn fmt_sentence(e: &dyn std::error::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    f.write_str(&text)
}

impl Error {
    /// The lock file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Error::Os { path, .. }
            | Error::IsDirectory { path }
            | Error::Symlink { path }
            | Error::NotRegularFile { path }
            | Error::UntrustedFileSystem { path, .. }
            | Error::Unstable { path, .. } => path,
        }
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        match self {
            Error::Os { operation, .. } => *operation,
            Error::IsDirectory { .. }
            | Error::Symlink { .. }
            | Error::NotRegularFile { .. }
            | Error::UntrustedFileSystem { .. } => Operation::Open,
            Error::Unstable { .. } => Operation::Verify,
        }
    }

    /// The errno behind the error (`EISDIR` for a directory, `ELOOP` for a symlink, `ENOLCK`
    /// for a refused file system, `ESTALE` for a lock file that kept being replaced).
    pub fn errno(&self) -> Errno {
        match self {
            Error::Os { errno, .. } => *errno,
            Error::IsDirectory { .. } => Errno::ISDIR,
            Error::Symlink { .. } => Errno::LOOP,
            Error::NotRegularFile { .. } => Errno::INVAL,
            Error::UntrustedFileSystem { .. } => Errno::NOLCK,
            Error::Unstable { .. } => Errno::STALE,
        }
    }

    /// The errno's symbolic name, as recorded in the `error.type` attribute.
    pub fn errno_name(&self) -> &'static str {
        crate::sys::errno_name(self.errno())
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let errno = e.errno();
        std::io::Error::new(std::io::Error::from(errno).kind(), e)
    }
}

/// Result alias for lockmeter's file-lock operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
