//! A fault-injecting FUSE file system: a pass-through to a backing directory whose open, stat,
//! lock, unlock, write and fsync calls can be told, per path and per call count, to fail with a
//! chosen errno, to be delayed, to write only part of the data, or (locks) to be granted
//! without being forwarded: a split brain on demand.
//!
//! ```ignore
//! let fs = FaultFs::mount();
//! let lock = FileLock::open(fs.path("job.lock"))?;
//! let id = fs.inject(Fault::fail(Op::Lock, libc::EIO).path("job.lock").times(1));
//! assert!(lock.lock().is_err());
//! assert_eq!(fs.fired(id), 1);
//! ```
//!
//! How it works: the daemon runs on threads of the test process ([`fuser`], mounted with
//! `mount(2)` as root on a temporary directory, unmounted on drop). It negotiates lock
//! forwarding (`FUSE_POSIX_LOCKS`, `FUSE_FLOCK_LOCKS`), so the kernel sends every `flock`, OFD and
//! POSIX lock request on the mount to the daemon (`FUSE_SETLK`/`FUSE_SETLKW`), which takes it as
//! an OFD lock on a backing descriptor of its own per lock owner: two owners exclude each other
//! as they would on a local file system, and [`FaultFs::held`] reads the truth from the backing
//! file. Entries and attributes are never cached (TTL 0) and files are opened `direct_io`, so
//! every `stat`, `read` and `write` reaches the daemon and can be faulted.
//!
//! Kernel facts seen through it (checked on 6.x): the kernel turns a daemon's `EINTR` answer to
//! a lock request into `ERESTARTSYS` ("locking is restartable"), which restarts the system call
//! when a signal is pending and otherwise reaches user space as errno 512. A signal to a
//! process waiting in `FUSE_SETLKW` ends its wait (the handler runs; without `SA_RESTART` the
//! call returns `EINTR`) only while the kernel believes the daemon handles `FUSE_INTERRUPT`;
//! fuser answers it with `ENOSYS`, after which the kernel keeps later signals pending until the
//! daemon answers. The daemon's own wait goes on either way, and the lock it gets belongs to the
//! same lock owner: a retried request is granted at once, and a caller that gave up holds the
//! lock until it closes the file. A real daemon that implements interrupts cancels its wait.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The calls a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `FUSE_OPEN` and `FUSE_CREATE`: opening (or creating) a file.
    Open,
    /// `FUSE_LOOKUP` and `FUSE_GETATTR`: `stat`, `lstat`, `fstat`, and every path walk.
    Stat,
    /// A lock request (`FUSE_SETLK`/`FUSE_SETLKW` with a read or write lock): `flock`, OFD and
    /// POSIX locks alike.
    Lock,
    /// An unlock request (`FUSE_SETLK` with `F_UNLCK`).
    Unlock,
    /// `FUSE_WRITE`.
    Write,
    /// `FUSE_FSYNC` (`fsync`, `fdatasync`).
    Fsync,
}

/// What a fault does to the call it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer with this errno (`libc::EIO`, ...); nothing is forwarded.
    Fail(i32),
    /// Wait this long, then forward the call as usual.
    Delay(Duration),
    /// Locks and unlocks: answer success without forwarding (the lock is "granted" but nobody
    /// else is excluded: a split brain). Other calls: forwarded as usual.
    Grant,
    /// Writes: write only the first N bytes and say so (a short write, as a disk filling up
    /// mid-write). Other calls: forwarded as usual.
    ShortWrite(usize),
}

/// One fault: which calls it hits and what it does to them.
#[derive(Clone, Debug)]
pub struct Fault {
    op: Op,
    path: Option<String>,
    action: Action,
    skip: u64,
    times: Option<u64>,
}

impl Fault {
    /// A fault on every `op` call to any path, forever (narrow it with the methods below).
    pub fn new(op: Op, action: Action) -> Fault {
        Fault {
            op,
            path: None,
            action,
            skip: 0,
            times: None,
        }
    }

    /// `op` calls fail with `errno`.
    pub fn fail(op: Op, errno: i32) -> Fault {
        Fault::new(op, Action::Fail(errno))
    }

    /// Only calls on this path, relative to the mount point (`"job.lock"`, `"dir/x.lock"`).
    pub fn path(mut self, rel: impl Into<String>) -> Fault {
        self.path = Some(rel.into());
        self
    }

    /// Let the first `n` matching calls through untouched.
    pub fn after(mut self, n: u64) -> Fault {
        self.skip = n;
        self
    }

    /// Hit at most `n` calls (default: every matching call from then on).
    pub fn times(mut self, n: u64) -> Fault {
        self.times = Some(n);
        self
    }
}

/// A fault that was injected, for [`FaultFs::fired`] and [`FaultFs::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

struct Rule {
    id: u64,
    fault: Fault,
    seen: u64,
    fired: u64,
}

#[derive(Default)]
struct Control {
    rules: Vec<Rule>,
    next_id: u64,
    /// Calls seen, by operation and path.
    calls: HashMap<(Op, String), u64>,
}

impl Control {
    /// Counts the call and returns what the first matching fault does to it, if any.
    fn decide(&mut self, op: Op, path: &str) -> Option<Action> {
        *self.calls.entry((op, path.to_owned())).or_default() += 1;
        for r in &mut self.rules {
            if r.fault.op != op || r.fault.path.as_deref().is_some_and(|p| p != path) {
                continue;
            }
            r.seen += 1;
            if r.seen <= r.fault.skip || r.fault.times.is_some_and(|t| r.fired >= t) {
                continue;
            }
            r.fired += 1;
            return Some(r.fault.action);
        }
        None
    }
}

/// The mounted file system; unmounted on drop. See the [module docs](self).
pub struct FaultFs {
    dir: tempfile::TempDir,
    mountpoint: PathBuf,
    backing: PathBuf,
    ctl: Arc<Mutex<Control>>,
    session: Option<fuser::BackgroundSession>,
}

impl FaultFs {
    /// Mounts a fresh, empty file system (backing directory and mount point in a temporary
    /// directory). Needs root and `/dev/fuse`.
    pub fn mount() -> FaultFs {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mountpoint).unwrap();
        let ctl = Arc::new(Mutex::new(Control::default()));
        let fs = Daemon {
            root: backing.clone(),
            ctl: Arc::clone(&ctl),
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            locks: Arc::new(Mutex::new(HashMap::new())),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lockmeter-faultfs".into()),
            MountOption::Subtype("faultfs".into()),
        ];
        // Processes of other users (tests that drop privileges) may use the mount too.
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, &mountpoint, &config).unwrap_or_else(|e| {
            panic!(
                "cannot mount the fault-injecting FUSE file system on {}: {e} (it needs root and \
                 /dev/fuse)",
                mountpoint.display()
            )
        });
        let me = FaultFs {
            dir,
            mountpoint,
            backing,
            ctl,
            session: Some(session),
        };
        // Mounted when the kernel's INIT went through: the root answers a stat.
        crate::proc::eventually("the FUSE mount to answer", || {
            std::fs::metadata(&me.mountpoint).is_ok_and(|m| m.dev() != me.dir_dev())
        });
        me
    }

    fn dir_dev(&self) -> u64 {
        std::fs::metadata(self.dir.path()).unwrap().dev()
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.mountpoint
    }

    /// `rel` under the mount point.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `rel` in the backing directory (what the daemon forwards to; bypasses the faults).
    pub fn backing(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    /// Injects a fault; it applies to calls from now on.
    pub fn inject(&self, fault: Fault) -> FaultId {
        let mut c = self.ctl.lock().unwrap();
        c.next_id += 1;
        let id = c.next_id;
        c.rules.push(Rule {
            id,
            fault,
            seen: 0,
            fired: 0,
        });
        FaultId(id)
    }

    /// How many calls the fault hit so far.
    pub fn fired(&self, id: FaultId) -> u64 {
        let c = self.ctl.lock().unwrap();
        c.rules.iter().find(|r| r.id == id.0).map_or(0, |r| r.fired)
    }

    /// Removes one fault.
    pub fn remove(&self, id: FaultId) {
        self.ctl.lock().unwrap().rules.retain(|r| r.id != id.0);
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.ctl.lock().unwrap().rules.clear();
    }

    /// How many `op` calls on `rel` the daemon has seen.
    pub fn calls(&self, op: Op, rel: &str) -> u64 {
        let c = self.ctl.lock().unwrap();
        c.calls.get(&(op, rel.to_owned())).copied().unwrap_or(0)
    }

    /// Whether any lock is held on `rel` right now, as the daemon forwarded it (read from the
    /// backing file with `F_OFD_GETLK`: the truth behind the mount, whatever the clients think).
    pub fn held(&self, rel: &str) -> bool {
        let f = File::open(self.backing(rel)).unwrap();
        let (typ, _) = ofd_getlk(f.as_fd(), libc::F_WRLCK, 0, u64::MAX).unwrap();
        typ != libc::F_UNLCK
    }

    /// Descriptors of this process open on files under the mount point (the daemon's own
    /// descriptors point into the backing directory and are not counted).
    pub fn open_fds(&self) -> usize {
        open_fds_under(&self.mountpoint)
    }
}

/// Descriptors of this process whose target lies under `dir`.
pub fn open_fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(dir))
        .count()
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Lazy unmount, then wait (bounded) for the daemon threads: a descriptor a test still
        // holds on the mount keeps them alive, and a test must not hang on that.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.umount_and_join());
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("faultfs: unmount {}: {e}", self.mountpoint.display()),
            Err(_) => eprintln!(
                "faultfs: {} still busy 10 s after unmounting; left detached",
                self.mountpoint.display()
            ),
        }
    }
}

// ---- the daemon ------------------------------------------------------------------------------

const TTL: Duration = Duration::ZERO;

struct Inodes {
    by_ino: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Inodes {
        let mut i = Inodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: 2,
        };
        i.by_ino.insert(1, PathBuf::new());
        i.by_path.insert(PathBuf::new(), 1);
        i
    }

    fn intern(&mut self, rel: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(rel) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(ino, rel.to_owned());
        self.by_path.insert(rel.to_owned(), ino);
        ino
    }

    fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.by_path.remove(rel) {
            self.by_ino.remove(&ino);
        }
    }
}

struct Handle {
    file: Arc<File>,
    /// Lock owners that locked through this open file (flock and OFD owners are the open file
    /// itself: their locks end when it is released).
    owners: HashSet<u64>,
}

type LockFds = Arc<Mutex<HashMap<(u64, u64), Arc<File>>>>;

struct Daemon {
    root: PathBuf,
    ctl: Arc<Mutex<Control>>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// One backing descriptor per (inode, lock owner), holding that owner's OFD locks.
    locks: LockFds,
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(md: &std::fs::Metadata) -> FileType {
    let ft = md.file_type();
    FileType::from_std(ft).unwrap_or(FileType::RegularFile)
}

fn attr_of(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.max(0) as u32);
    FileAttr {
        ino: INodeNo(ino),
        size: md.len(),
        blocks: md.blocks(),
        atime: t(md.atime(), md.atime_nsec()),
        mtime: t(md.mtime(), md.mtime_nsec()),
        ctime: t(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(md),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn ofd_fl(typ: i32, start: u64, end: u64) -> libc::flock {
    // SAFETY: an all-zero `flock` is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start.min(i64::MAX as u64) as libc::off_t;
    fl.l_len = if end >= i64::MAX as u64 {
        0
    } else {
        (end.saturating_sub(start) + 1) as libc::off_t
    };
    fl
}

/// An OFD lock request on `fd`; `Err(errno)`.
fn ofd_setlk(fd: impl AsFd, typ: i32, start: u64, end: u64, wait: bool) -> Result<(), i32> {
    let mut fl = ofd_fl(typ, start, end);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: a valid descriptor and an initialised `flock` that outlives the call.
        let r = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(e) => return Err(e),
            None => return Err(libc::EIO),
        }
    }
}

/// `F_OFD_GETLK`: the type of a conflicting lock (`F_UNLCK` if none) and its range.
fn ofd_getlk(fd: impl AsFd, typ: i32, start: u64, end: u64) -> Result<(i32, (u64, u64)), i32> {
    let mut fl = ofd_fl(typ, start, end);
    // SAFETY: as above.
    let r = unsafe {
        libc::fcntl(
            fd.as_fd().as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    let s = fl.l_start.max(0) as u64;
    let e = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        s + fl.l_len as u64 - 1
    };
    Ok((i32::from(fl.l_type), (s, e)))
}

/// Another open file description of the file behind `file` (read-write if possible).
fn reopen(file: &File) -> std::io::Result<File> {
    let p = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .or_else(|_| File::open(&p))
}

impl Daemon {
    fn rel(&self, ino: INodeNo) -> Option<PathBuf> {
        self.inodes.lock().unwrap().by_ino.get(&ino.0).cloned()
    }

    fn rel_str(rel: &Path) -> String {
        rel.to_string_lossy().into_owned()
    }

    fn decide(&self, op: Op, rel: &Path) -> Option<Action> {
        let a = self.ctl.lock().unwrap().decide(op, &Self::rel_str(rel));
        if let Some(Action::Delay(d)) = a {
            if !matches!(op, Op::Lock | Op::Unlock) {
                std::thread::sleep(d);
            }
        }
        a
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Option<PathBuf> {
        Some(self.rel(parent)?.join(name))
    }

    fn new_handle(&self, file: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(
            fh,
            Handle {
                file: Arc::new(file),
                owners: HashSet::new(),
            },
        );
        FileHandle(fh)
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<File>> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .map(|h| Arc::clone(&h.file))
    }

    fn open_backing(&self, rel: &Path, flags: i32, mode: Option<u32>) -> std::io::Result<File> {
        use rustix::fs::{Mode, OFlags};
        let mut f = OFlags::from_bits_retain(flags as u32)
            & !(OFlags::NOCTTY | OFlags::DIRECT | OFlags::TRUNC);
        f |= OFlags::CLOEXEC;
        if flags & libc::O_TRUNC != 0 {
            f |= OFlags::TRUNC;
        }
        let m = Mode::from_raw_mode(mode.unwrap_or(0));
        if mode.is_some() {
            f |= OFlags::CREATE;
        }
        let fd: OwnedFd = rustix::fs::open(self.root.join(rel), f, m)?;
        Ok(File::from(fd))
    }

    /// The backing descriptor holding `owner`'s locks on `ino` (created on first use unless
    /// `existing_only`).
    fn lock_fd(
        &self,
        ino: u64,
        fh: FileHandle,
        owner: u64,
        existing_only: bool,
    ) -> Option<Arc<File>> {
        let mut locks = self.locks.lock().unwrap();
        if let Some(f) = locks.get(&(ino, owner)) {
            return Some(Arc::clone(f));
        }
        if existing_only {
            return None;
        }
        let mut handles = self.handles.lock().unwrap();
        let h = handles.get_mut(&fh.0)?;
        let f = Arc::new(reopen(&h.file).ok()?);
        h.owners.insert(owner);
        locks.insert((ino, owner), Arc::clone(&f));
        Some(f)
    }
}

impl Filesystem for Daemon {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        config
            .add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS)
            .map_err(|_| std::io::Error::other("the kernel does not forward locks to FUSE"))?;
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(Action::Fail(e)) = self.decide(Op::Stat, &rel) {
            return reply.error(Errno::from_i32(e));
        }
        match std::fs::symlink_metadata(self.root.join(&rel)) {
            Ok(md) => {
                let ino = self.inodes.lock().unwrap().intern(&rel);
                reply.entry(&TTL, &attr_of(ino, &md), Generation(0));
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(Action::Fail(e)) = self.decide(Op::Stat, &rel) {
            return reply.error(Errno::from_i32(e));
        }
        let md = match fh.and_then(|fh| self.file(fh)) {
            Some(f) => f.metadata(),
            None => std::fs::symlink_metadata(self.root.join(&rel)),
        };
        match md {
            Ok(md) => reply.attr(&TTL, &attr_of(ino.0, &md)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let path = self.root.join(&rel);
        let r = (|| {
            if let Some(size) = size {
                match fh.and_then(|fh| self.file(fh)) {
                    Some(f) => f.set_len(size)?,
                    None => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(size)?,
                }
            }
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            std::fs::symlink_metadata(&path)
        })();
        match r {
            Ok(md) => reply.attr(&TTL, &attr_of(ino.0, &md)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let path = self.root.join(&rel);
        let r = std::fs::create_dir(&path).and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask))?;
            std::fs::symlink_metadata(&path)
        });
        match r {
            Ok(md) => {
                let ino = self.inodes.lock().unwrap().intern(&rel);
                reply.entry(&TTL, &attr_of(ino, &md), Generation(0));
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        match std::fs::remove_file(self.root.join(&rel)) {
            Ok(()) => {
                self.inodes.lock().unwrap().forget_path(&rel);
                reply.ok();
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        match std::fs::remove_dir(self.root.join(&rel)) {
            Ok(()) => {
                self.inodes.lock().unwrap().forget_path(&rel);
                reply.ok();
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(Errno::ENOENT);
        };
        match std::fs::rename(self.root.join(&from), self.root.join(&to)) {
            Ok(()) => {
                let mut i = self.inodes.lock().unwrap();
                i.forget_path(&to);
                if let Some(ino) = i.by_path.remove(&from) {
                    i.by_ino.insert(ino, to.clone());
                    i.by_path.insert(to, ino);
                }
                reply.ok();
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(Action::Fail(e)) = self.decide(Op::Open, &rel) {
            return reply.error(Errno::from_i32(e));
        }
        match self.open_backing(&rel, flags.0, None) {
            Ok(f) => reply.opened(self.new_handle(f), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(Action::Fail(e)) = self.decide(Op::Open, &rel) {
            return reply.error(Errno::from_i32(e));
        }
        let r = self
            .open_backing(&rel, flags, Some(mode & !umask))
            .and_then(|f| f.metadata().map(|md| (f, md)));
        match r {
            Ok((f, md)) => {
                let ino = self.inodes.lock().unwrap().intern(&rel);
                let fh = self.new_handle(f);
                reply.created(
                    &TTL,
                    &attr_of(ino, &md),
                    Generation(0),
                    fh,
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut len = 0;
        while len < buf.len() {
            match f.read_at(&mut buf[len..], offset + len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno_of(&e)),
            }
        }
        reply.data(&buf[..len]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let rel = self.rel(ino).unwrap_or_default();
        let data = match self.decide(Op::Write, &rel) {
            Some(Action::Fail(e)) => return reply.error(Errno::from_i32(e)),
            Some(Action::ShortWrite(n)) => &data[..n.min(data.len())],
            _ => data,
        };
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // POSIX semantics: closing any descriptor of a file drops its owner's locks on it.
        self.locks.lock().unwrap().remove(&(ino.0, lock_owner.0));
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let owners = self
            .handles
            .lock()
            .unwrap()
            .remove(&fh.0)
            .map(|h| h.owners)
            .unwrap_or_default();
        // flock and OFD locks belong to the open file: they end with it.
        let mut locks = self.locks.lock().unwrap();
        for o in owners.iter().chain(lock_owner.map(|o| o.0).as_ref()) {
            locks.remove(&(ino.0, *o));
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let rel = self.rel(ino).unwrap_or_default();
        if let Some(Action::Fail(e)) = self.decide(Op::Fsync, &rel) {
            return reply.error(Errno::from_i32(e));
        }
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let r = if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let entries = match std::fs::read_dir(self.root.join(&rel)) {
            Ok(rd) => rd.filter_map(Result::ok).collect::<Vec<_>>(),
            Err(e) => return reply.error(errno_of(&e)),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsStr::new(".").to_owned()),
            (1, FileType::Directory, OsStr::new("..").to_owned()),
        ];
        for e in entries {
            let child = rel.join(e.file_name());
            let kind = e
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            let ino = self.inodes.lock().unwrap().intern(&child);
            all.push((ino, kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let fd = self
            .lock_fd(ino.0, fh, lock_owner.0, true)
            .or_else(|| self.file(fh).and_then(|f| reopen(&f).ok().map(Arc::new)));
        let Some(fd) = fd else {
            return reply.error(Errno::EBADF);
        };
        match ofd_getlk(&*fd, typ, start, end) {
            Ok((t, (s, e))) => reply.locked(s, e, t, if t == libc::F_UNLCK { pid } else { 0 }),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let rel = self.rel(ino).unwrap_or_default();
        let unlock = typ == libc::F_UNLCK;
        let op = if unlock { Op::Unlock } else { Op::Lock };
        let delay = match self.decide(op, &rel) {
            Some(Action::Fail(e)) => return reply.error(Errno::from_i32(e)),
            Some(Action::Grant) => return reply.ok(),
            Some(Action::Delay(d)) => d,
            _ => Duration::ZERO,
        };
        let Some(fd) = self.lock_fd(ino.0, fh, lock_owner.0, unlock) else {
            // Unlocking what this owner never locked here.
            return if unlock {
                reply.ok()
            } else {
                reply.error(Errno::EBADF)
            };
        };
        let answer = move || match ofd_setlk(&*fd, typ, start, end, sleep) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        };
        if sleep || !delay.is_zero() {
            // A blocking wait (or a delayed answer) must not hold up the daemon's other calls.
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                answer();
            });
        } else {
            answer();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_hits_the_calls_it_names_and_counts_them() {
        let mut c = Control::default();
        c.rules.push(Rule {
            id: 1,
            fault: Fault::fail(Op::Lock, libc::EIO).path("a").after(1).times(2),
            seen: 0,
            fired: 0,
        });
        let hits: Vec<_> = (0..5).map(|_| c.decide(Op::Lock, "a").is_some()).collect();
        assert_eq!(hits, [false, true, true, false, false]);
        assert_eq!(c.decide(Op::Lock, "b"), None);
        assert_eq!(c.decide(Op::Unlock, "a"), None);
        assert_eq!(c.calls[&(Op::Lock, "a".to_owned())], 5);
        assert_eq!(c.rules[0].fired, 2);
    }
}
