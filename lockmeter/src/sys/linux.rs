//! Linux implementation of the lock-file system calls.
//!
//! `flock(2)` and process-associated POSIX locks go through rustix; OFD locks
//! (`F_OFD_SETLK`/`F_OFD_SETLKW`) through `libc`, which rustix does not wrap.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::kind::{LockKind, LockMode};

/// Identity of an inode: what a path named when it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:x}:{:x}:{}",
            rustix::fs::major(self.dev),
            rustix::fs::minor(self.dev),
            self.ino
        )
    }
}

/// What `open_lock_file` failed on, beyond a plain errno.
#[derive(Debug)]
pub(crate) enum OpenError {
    Errno(Errno),
    NotRegular(FileType),
}

/// Opens (and optionally creates) a lock file with `O_CLOEXEC | O_NOFOLLOW | O_NOCTTY`.
///
/// Read-write first, as exclusive locks need on NFS and POSIX/OFD write locks need everywhere;
/// for `flock` a read-only fallback is tried when write access is refused (`EACCES`, `EROFS`),
/// which is what `flock(1)` does. With `allow_directory`, a directory (which cannot be opened
/// for writing: `EISDIR`) is opened read-only with `O_DIRECTORY`, as `flock(1)` opens one.
pub(crate) fn open_lock_file(
    path: &Path,
    create: bool,
    mode: u32,
    kind: LockKind,
    allow_directory: bool,
) -> Result<(OwnedFd, FileId), OpenError> {
    let base = OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY;
    let create_flag = if create {
        OFlags::CREATE
    } else {
        OFlags::empty()
    };
    let perm = Mode::from_raw_mode(mode);
    let fd = match rustix::fs::open(path, base | OFlags::RDWR | create_flag, perm) {
        Ok(fd) => fd,
        Err(Errno::ISDIR) if allow_directory => rustix::fs::open(
            path,
            base | OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map_err(OpenError::Errno)?,
        Err(e @ (Errno::ACCESS | Errno::ROFS)) if kind == LockKind::Flock => {
            // The file may exist and be readable: flock works on a read-only descriptor locally.
            rustix::fs::open(path, base | OFlags::RDONLY, Mode::empty())
                .map_err(|e2| OpenError::Errno(if e2 == Errno::NOENT { e } else { e2 }))?
        }
        Err(e) => return Err(OpenError::Errno(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(OpenError::Errno)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::RegularFile && !(allow_directory && ft == FileType::Directory) {
        return Err(OpenError::NotRegular(ft));
    }
    Ok((fd, id_of(&st)))
}

fn id_of(st: &rustix::fs::Stat) -> FileId {
    FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// Identity of the inode a path names now, without following a final symlink.
#[inline(always)]
pub(crate) fn path_id<P: rustix::path::Arg>(path: P) -> Result<FileId, Errno> {
    rustix::fs::lstat(path).map(|st| id_of(&st))
}

/// `ERESTARTSYS`: the kernel's "restart this system call", which should never reach user space
/// but does when a FUSE daemon answers a lock request with `EINTR` and no signal is pending
/// (fuse turns `EINTR` from a lock request into it: "locking is restartable").
const RESTARTSYS: i32 = 512;

/// Retries of a lock call interrupted while no signal handler had to run (a non-blocking call,
/// or a daemon's `EINTR` answer) before `EINTR` is reported: a daemon that always answers
/// `EINTR` must not make a lock call spin forever.
const MAX_RESTARTS: u32 = 8;

/// Takes a lock. Returns `Ok(false)` when `blocking` is false and the lock is held elsewhere.
///
/// `EINTR` during a blocking wait (a signal handler ran) is retried for as long as it happens:
/// a signal does not abandon the acquire. Any other interruption (a non-blocking call
/// interrupted, a FUSE daemon answering `EINTR`, which arrives as errno 512) is retried up to
/// [`MAX_RESTARTS`] times, then reported as `EINTR`.
#[inline(always)]
pub(crate) fn lock(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    mode: LockMode,
    blocking: bool,
) -> Result<bool, Errno> {
    let mut restarts = 0;
    loop {
        let r = match kind {
            LockKind::Flock => rustix::fs::flock(fd, flock_op(mode, blocking)),
            LockKind::Posix => rustix::fs::fcntl_lock(fd, flock_op(mode, blocking)),
            LockKind::Ofd => ofd(fd, Some(mode), blocking),
        };
        match r {
            Ok(()) => return Ok(true),
            // flock: EWOULDBLOCK; fcntl: EAGAIN or EACCES for a conflicting lock.
            Err(Errno::WOULDBLOCK) if !blocking => return Ok(false),
            Err(Errno::ACCESS) if !blocking && kind != LockKind::Flock => return Ok(false),
            Err(Errno::INTR) if blocking => continue,
            Err(e) if interrupted(e) && restarts < MAX_RESTARTS => restarts += 1,
            Err(e) => return Err(normalize(e)),
        }
    }
}

#[inline(always)]
fn interrupted(e: Errno) -> bool {
    e == Errno::INTR || e.raw_os_error() == RESTARTSYS
}

/// The errno to report: `ERESTARTSYS` leaked from the kernel is an `EINTR`.
#[inline]
pub(crate) fn normalize(e: Errno) -> Errno {
    if e.raw_os_error() == RESTARTSYS {
        Errno::INTR
    } else {
        e
    }
}

/// Releases a lock explicitly (`LOCK_UN` / `F_UNLCK`).
#[inline(always)]
pub(crate) fn unlock(fd: BorrowedFd<'_>, kind: LockKind) -> Result<(), Errno> {
    match kind {
        LockKind::Flock => rustix::fs::flock(fd, FlockOperation::Unlock),
        LockKind::Posix => rustix::fs::fcntl_lock(fd, FlockOperation::Unlock),
        LockKind::Ofd => ofd(fd, None, false),
    }
    .map_err(normalize)
}

#[inline(always)]
fn flock_op(mode: LockMode, blocking: bool) -> FlockOperation {
    match (mode, blocking) {
        (LockMode::Exclusive, true) => FlockOperation::LockExclusive,
        (LockMode::Exclusive, false) => FlockOperation::NonBlockingLockExclusive,
        (LockMode::Shared, true) => FlockOperation::LockShared,
        (LockMode::Shared, false) => FlockOperation::NonBlockingLockShared,
    }
}

/// Whole-file OFD lock (`F_OFD_SETLK[W]`); `mode == None` unlocks.
fn ofd(fd: BorrowedFd<'_>, mode: Option<LockMode>, blocking: bool) -> Result<(), Errno> {
    let l_type = match mode {
        Some(LockMode::Exclusive) => libc::F_WRLCK,
        Some(LockMode::Shared) => libc::F_RDLCK,
        None => libc::F_UNLCK,
    };
    // SAFETY: an all-zero `flock` is a valid value; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // whole file, including bytes appended later
    fl.l_pid = 0; // required to be 0 for OFD locks
    let cmd = if blocking {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: `fd` is a valid open descriptor for the duration of the borrow and `fl` is a
    // properly initialised `struct flock` that outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r == -1 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else {
        Ok(())
    }
}

/// Name of the file system a descriptor lives on, from the `statfs(2)` magic number.
pub(crate) fn fs_type(fd: BorrowedFd<'_>) -> &'static str {
    match rustix::fs::fstatfs(fd) {
        Ok(st) => fs_type_name(st.f_type as u32),
        Err(_) => "unknown",
    }
}

/// File-system type of the directory a (possibly missing) path would live in.
pub(crate) fn fs_type_of_parent(path: &Path) -> &'static str {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match rustix::fs::statfs(parent) {
        Ok(st) => fs_type_name(st.f_type as u32),
        Err(_) => "unknown",
    }
}

/// Maps a `statfs` `f_type` magic number (see `statfs(2)`, `linux/magic.h`) to a name.
pub(crate) fn fs_type_name(magic: u32) -> &'static str {
    match magic {
        0xEF53 => "ext4", // ext2/3/4 share the magic
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x794c_7630 => "overlay",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x2fc1_2fc1 => "zfs",
        0x0102_1997 => "9p",
        0x00c3_6400 => "ceph",
        0x7371_7368 => "squashfs",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x4d44 => "vfat",
        0x5346_544e => "ntfs",
        0x2011_BAB0 => "exfat",
        0xF2F5_2010 => "f2fs",
        0x0BD0_0BD0 => "lustre",
        0x4750_4653 => "gpfs",
        0x6a65_6a65 => "gfs2",
        0x7461_636f => "ocfs2",
        0x5346_414F => "afs",
        _ => "unknown",
    }
}

/// Symbolic name of an errno (`EACCES`, `ENOLCK`, ...), for the `error.type` attribute.
pub(crate) fn errno_name(e: Errno) -> &'static str {
    match e {
        Errno::PERM => "EPERM",
        Errno::NOENT => "ENOENT",
        Errno::INTR => "EINTR",
        Errno::IO => "EIO",
        Errno::NXIO => "ENXIO",
        Errno::BADF => "EBADF",
        Errno::AGAIN => "EAGAIN",
        Errno::NOMEM => "ENOMEM",
        Errno::ACCESS => "EACCES",
        Errno::FAULT => "EFAULT",
        Errno::BUSY => "EBUSY",
        Errno::EXIST => "EEXIST",
        Errno::XDEV => "EXDEV",
        Errno::NODEV => "ENODEV",
        Errno::NOTDIR => "ENOTDIR",
        Errno::ISDIR => "EISDIR",
        Errno::INVAL => "EINVAL",
        Errno::NFILE => "ENFILE",
        Errno::MFILE => "EMFILE",
        Errno::TXTBSY => "ETXTBSY",
        Errno::FBIG => "EFBIG",
        Errno::NOSPC => "ENOSPC",
        Errno::ROFS => "EROFS",
        Errno::DEADLK => "EDEADLK",
        Errno::NAMETOOLONG => "ENAMETOOLONG",
        Errno::NOLCK => "ENOLCK",
        Errno::NOSYS => "ENOSYS",
        Errno::LOOP => "ELOOP",
        Errno::OVERFLOW => "EOVERFLOW",
        Errno::OPNOTSUPP => "EOPNOTSUPP",
        Errno::TIMEDOUT => "ETIMEDOUT",
        Errno::STALE => "ESTALE",
        Errno::DQUOT => "EDQUOT",
        Errno::NOTCONN => "ENOTCONN",
        Errno::CONNREFUSED => "ECONNREFUSED",
        Errno::HOSTUNREACH => "EHOSTUNREACH",
        Errno::NOLINK => "ENOLINK",
        Errno::COMM => "ECOMM",
        Errno::REMOTEIO => "EREMOTEIO",
        _ => "EUNKNOWN",
    }
}
