//! One pass over the host's lock table: every held lock and blocked waiter from `/proc/locks`,
//! with holders' process names, the locked file's path and its file system's lock coherence.
//!
//! Paths come from the holders' `/proc/PID/fd` links (the path the holder opened, in its own
//! mount namespace). OFD locks carry no pid in `/proc/locks`, and a `flock` lock's pid may be
//! gone while a child that inherited the descriptor still holds it: those holders are found
//! through the `lock:` lines of `/proc/*/fdinfo/*`, read only when such a lock is new.
//! Processes that exit mid-read, and files that cannot be read, leave a field unknown; they
//! never fail the scan. Only `/proc/locks` itself is required.

use rustc_hash::FxHashMap as HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockmeter::fs::{classify, find_mount, parse_mountinfo, Coherence, MountInfo};
use lockmeter::metrics::LockMode;

use crate::proclocks::{self, Dev, Kind, RawLock};
use crate::AgentError;

/// A process that holds or waits for a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    /// Process id (never a metric attribute).
    pub pid: u32,
    /// Command name (`/proc/PID/comm`): the `process.executable.name` attribute.
    pub comm: Arc<str>,
}

/// A blocked waiter (a `->` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The waiting process, when the kernel names it (not for OFD requests).
    pub proc: Option<Proc>,
    /// The mode it asked for.
    pub mode: LockMode,
}

/// What the agent knows about a lock file's file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsView {
    /// `fs.type`, FUSE subtypes folded into `fuse`.
    pub fs_type: Arc<str>,
    /// How far locks there exclude, as `lockmeter probe` classifies it.
    pub coherence: Coherence,
    /// Why, in words.
    pub reason: String,
}

/// One held lock (a `/proc/locks` line without `->`) and the waiters queued behind it.
#[derive(Clone, Debug)]
pub struct HostLock {
    /// The table line.
    pub raw: RawLock,
    /// Holders: the pid the table names, or for OFD locks (and flock locks whose named pid is
    /// gone) every process with a descriptor of the locked open file description.
    pub holders: Vec<Proc>,
    /// Blocked waiters.
    pub waiters: Vec<Waiter>,
    /// The path the holder opened, when found.
    pub path: Option<PathBuf>,
    /// The holder's descriptor names a file that has been unlinked (`... (deleted)`).
    pub deleted: bool,
    /// The file system, when the path was found.
    pub fs: Option<Arc<FsView>>,
    /// The oldest holder process's age: an upper bound on the hold's age.
    pub holder_age: Option<Duration>,
}

/// The host's locks at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// When `/proc/locks` was read.
    pub taken: Instant,
    /// Held locks with their waiters.
    pub locks: Vec<HostLock>,
    /// Waiters whose blocker line was not found (the table changed mid-read).
    pub orphan_waiters: usize,
    /// `/proc/locks` lines that did not parse.
    pub skipped_lines: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LineKey {
    kind: Kind,
    mode: LockMode,
    dev: Dev,
    ino: u64,
    start: u64,
    end: Option<u64>,
}

impl LineKey {
    fn of(l: &RawLock) -> LineKey {
        LineKey {
            kind: l.kind,
            mode: l.mode,
            dev: l.dev,
            ino: l.ino,
            start: l.start,
            end: l.end,
        }
    }
}

/// Reads the host's lock table, caching what is expensive to find (paths, OFD holders, mount
/// tables) across passes.
#[derive(Debug)]
pub struct Scanner {
    proc_root: PathBuf,
    /// (dev, ino) -> (holder pid the path was read from, path, deleted).
    paths: HashMap<(Dev, u64), (u32, PathBuf, bool)>,
    /// Holders found through fdinfo, by table line.
    fdinfo_holders: HashMap<LineKey, Vec<u32>>,
    /// Mount tables by mount namespace.
    mounts: HashMap<Vec<u8>, Vec<MountInfo>>,
    fs_views: HashMap<(Vec<u8>, Dev, Kind), Arc<FsView>>,
    ticks: u64,
    buf: Vec<u8>,
    buf_hint: usize,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new("/proc")
    }
}

impl Scanner {
    /// A scanner reading the proc file system at `proc_root` (`/proc`; a container given the
    /// host's `/proc` elsewhere passes that path).
    pub fn new(proc_root: impl Into<PathBuf>) -> Scanner {
        Scanner {
            proc_root: proc_root.into(),
            paths: HashMap::default(),
            fdinfo_holders: HashMap::default(),
            mounts: HashMap::default(),
            fs_views: HashMap::default(),
            ticks: procfs::ticks_per_second().max(1),
            buf: Vec::new(),
            buf_hint: 64 * 1024,
        }
    }

    /// The proc root in use.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// One pass. Fails only when `/proc/locks` cannot be read.
    pub fn scan(&mut self) -> Result<Snapshot, AgentError> {
        let locks_path = self.proc_root.join("locks");
        // One read() call per pass: /proc/locks is a seq_file whose every read() walks the
        // host's lock list from its start, so reading it in small pieces is quadratic
        // (10,000 locks: 40 ms read in pieces; a few ms in one call).
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(self.buf_hint);
        let read = std::fs::File::open(&locks_path).and_then(|mut f| {
            use std::io::Read as _;
            f.read_to_end(&mut buf)
        });
        if let Err(source) = read {
            self.buf = buf;
            return Err(AgentError::Read {
                path: locks_path,
                source,
            });
        }
        self.buf_hint = (buf.len() * 2).max(64 * 1024);
        let taken = Instant::now();
        let table = proclocks::parse(&String::from_utf8_lossy(&buf));
        self.buf = buf;
        let uptime = self.uptime();
        let mut comms: ProcCache = HashMap::default();
        let mut fd_indexes: HashMap<u32, FdIndex> = HashMap::default();
        let mut fdinfo: Option<HashMap<LineKey, Vec<u32>>> = None;
        let mut namespaces: HashMap<u32, Vec<u8>> = HashMap::default();

        let mut out: Vec<HostLock> = Vec::new();
        let mut orphan_waiters = 0;
        let mut live_keys: Vec<LineKey> = Vec::new();
        // /proc/locks is read a page per read(), and each read() finds its place again by
        // counting entries: a lock taken or released between two reads shifts the list and
        // the same entry can be printed twice. A second identical pid-bearing line is taken
        // as such a repeat and dropped with its waiters (a process holding the same shared
        // flock through two descriptions is then counted once).
        let mut seen_lines: rustc_hash::FxHashSet<(LineKey, u32)> = Default::default();
        let mut skip_ordinal: Option<u32> = None;
        for raw in table.locks {
            if raw.blocked && skip_ordinal == Some(raw.ordinal) {
                continue;
            }
            if !raw.blocked {
                skip_ordinal = None;
                if let (Some(pid), false) = (raw.pid, raw.kind == Kind::Ofd) {
                    if !seen_lines.insert((LineKey::of(&raw), pid)) {
                        skip_ordinal = Some(raw.ordinal);
                        continue;
                    }
                }
            }
            if raw.blocked {
                let blocker = out
                    .last_mut()
                    .filter(|h| h.raw.ordinal == raw.ordinal && !h.raw.blocked);
                let proc = raw
                    .pid
                    .and_then(|pid| self.proc_of(pid, &mut comms, uptime).map(|(p, _)| p));
                match blocker {
                    Some(h) => h.waiters.push(Waiter {
                        proc,
                        mode: raw.mode,
                    }),
                    None => orphan_waiters += 1,
                }
                continue;
            }
            let key = LineKey::of(&raw);
            // Holders: the named pid if it still has the file open; otherwise fdinfo.
            let mut holder_pids: Vec<u32> = Vec::new();
            let mut path = None;
            if let Some(pid) = raw.pid {
                // A path found before through this holder is reused: reading a process's
                // descriptors costs a readlink and a stat each (10,000 for a holder of 10,000
                // locks). A replaced or unlinked file is caught by `check_path` instead.
                match self.paths.get(&(raw.dev, raw.ino)) {
                    Some(p) if p.0 == pid => path = Some(p.clone()),
                    _ => {
                        let index = fd_indexes
                            .entry(pid)
                            .or_insert_with(|| fd_index(&self.proc_root, pid));
                        if let Some((p, deleted)) = index.get(&(raw.dev, raw.ino)) {
                            path = Some((pid, p.clone(), *deleted));
                        }
                    }
                }
                holder_pids.push(pid);
            }
            let needs_fdinfo = path.is_none() && raw.kind != Kind::Lease;
            if needs_fdinfo {
                let pids = match self.fdinfo_holders.get(&key) {
                    Some(p) => p.clone(),
                    None => {
                        let all = fdinfo.get_or_insert_with(|| fdinfo_scan(&self.proc_root));
                        let p = all.get(&key).cloned().unwrap_or_default();
                        self.fdinfo_holders.insert(key.clone(), p.clone());
                        p
                    }
                };
                for pid in pids {
                    if !holder_pids.contains(&pid) {
                        holder_pids.push(pid);
                    }
                    if path.is_none() {
                        let index = fd_indexes
                            .entry(pid)
                            .or_insert_with(|| fd_index(&self.proc_root, pid));
                        if let Some((p, deleted)) = index.get(&(raw.dev, raw.ino)) {
                            path = Some((pid, p.clone(), *deleted));
                        }
                    }
                }
            }
            match &path {
                Some(p) => {
                    if self.paths.get(&(raw.dev, raw.ino)) != Some(p) {
                        self.paths.insert((raw.dev, raw.ino), p.clone());
                    }
                }
                None => path = self.paths.get(&(raw.dev, raw.ino)).cloned(),
            }
            let mut holders = Vec::new();
            let mut holder_age: Option<Duration> = None;
            for pid in holder_pids {
                if let Some((p, age)) = self.proc_of(pid, &mut comms, uptime) {
                    holder_age = match (holder_age, age) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                    holders.push(p);
                }
            }
            let fs = path
                .as_ref()
                .and_then(|(pid, p, _)| self.fs_view(*pid, p, raw.dev, raw.kind, &mut namespaces));
            live_keys.push(key);
            out.push(HostLock {
                raw,
                holders,
                waiters: Vec::new(),
                deleted: path.as_ref().is_some_and(|p| p.2),
                path: path.map(|p| p.1),
                fs,
                holder_age,
            });
        }
        // Forget what no longer exists, so caches stay as large as the table.
        if self.fdinfo_holders.len() > live_keys.len() {
            let live: rustc_hash::FxHashSet<&LineKey> = live_keys.iter().collect();
            self.fdinfo_holders.retain(|k, _| live.contains(k));
        }
        if self.paths.len() > 2 * out.len() + 1024 {
            let live: rustc_hash::FxHashSet<(Dev, u64)> =
                out.iter().map(|h| (h.raw.dev, h.raw.ino)).collect();
            self.paths.retain(|k, _| live.contains(k));
        }
        Ok(Snapshot {
            taken,
            locks: out,
            orphan_waiters,
            skipped_lines: table.skipped,
        })
    }

    fn uptime(&self) -> Option<f64> {
        std::fs::read_to_string(self.proc_root.join("uptime"))
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|u| u.parse().ok()))
    }

    /// Name and age of a process; `None` when it is gone.
    fn proc_of(
        &self,
        pid: u32,
        cache: &mut ProcCache,
        uptime: Option<f64>,
    ) -> Option<(Proc, Option<Duration>)> {
        let entry = cache.entry(pid).or_insert_with(|| {
            let stat =
                procfs::process::Process::new_with_root(self.proc_root.join(pid.to_string()))
                    .and_then(|p| p.stat())
                    .ok()?;
            let age = uptime.map(|up| {
                let started = stat.starttime as f64 / self.ticks as f64;
                Duration::from_secs_f64((up - started).max(0.0))
            });
            Some((Arc::from(stat.comm), age))
        });
        entry.as_ref().map(|(comm, age)| {
            (
                Proc {
                    pid,
                    comm: comm.clone(),
                },
                *age,
            )
        })
    }

    fn fs_view(
        &mut self,
        pid: u32,
        path: &Path,
        dev: Dev,
        kind: Kind,
        namespaces: &mut HashMap<u32, Vec<u8>>,
    ) -> Option<Arc<FsView>> {
        let pdir = self.proc_root.join(pid.to_string());
        let ns = namespaces
            .entry(pid)
            .or_insert_with(|| {
                std::fs::read_link(pdir.join("ns/mnt"))
                    .map(|l| l.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default()
            })
            .clone();
        if let Some(v) = self.fs_views.get(&(ns.clone(), dev, kind)) {
            return Some(Arc::clone(v));
        }
        if !self.mounts.contains_key(&ns) {
            let text = std::fs::read_to_string(pdir.join("mountinfo")).ok()?;
            let table = parse_mountinfo(&text);
            if table.is_empty() {
                return None; // an exiting process: no mounts to see; do not cache that
            }
            if self.mounts.len() > 64 {
                self.mounts.clear();
            }
            self.mounts.insert(ns.clone(), table);
        }
        let mounts = self.mounts.get(&ns)?;
        let view = Arc::new(
            match find_mount(mounts, path, Some((dev.major, dev.minor))) {
                Some(m) => {
                    let (coherence, reasons) = classify(m, kind.fs_kind());
                    FsView {
                        fs_type: Arc::from(fold_fs_type(&m.fs_type)),
                        coherence,
                        reason: reasons.join("; "),
                    }
                }
                None => FsView {
                    fs_type: Arc::from("unknown"),
                    coherence: Coherence::Unknown,
                    reason: format!("no mount of device {dev} found for {}", path.display()),
                },
            },
        );
        if self.fs_views.len() > 4096 {
            self.fs_views.clear();
        }
        self.fs_views.insert((ns, dev, kind), Arc::clone(&view));
        Some(view)
    }
}

/// `fs.type` as lockmeter exports it: FUSE subtypes folded into `fuse`.
pub fn fold_fs_type(t: &str) -> &str {
    if t == "fuse" || t == "fuseblk" || t.starts_with("fuse.") || t.starts_with("fuseblk.") {
        "fuse"
    } else {
        t
    }
}

const DELETED: &[u8] = b" (deleted)";

/// pid -> (command name, process age), `None` when the process is gone.
type ProcCache = HashMap<u32, Option<(Arc<str>, Option<Duration>)>>;

/// (dev, ino) -> (path, deleted) for every regular file a process has open.
type FdIndex = HashMap<(Dev, u64), (PathBuf, bool)>;

fn fd_index(proc_root: &Path, pid: u32) -> FdIndex {
    let mut out = HashMap::default();
    let dir = proc_root.join(pid.to_string()).join("fd");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in entries.flatten() {
        let link = e.path();
        let Ok(st) = rustix::fs::stat(&link) else {
            continue;
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            continue;
        }
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        let bytes = target.as_os_str().as_bytes();
        let (path, deleted) = match bytes.strip_suffix(DELETED) {
            Some(p) => (
                PathBuf::from(std::ffi::OsStr::from_bytes(p)),
                // A file whose name really ends in " (deleted)" still exists: check.
                std::fs::symlink_metadata(
                    proc_root.join(pid.to_string()).join("root").join(
                        Path::new(std::ffi::OsStr::from_bytes(p))
                            .strip_prefix("/")
                            .unwrap_or(Path::new(std::ffi::OsStr::from_bytes(p))),
                    ),
                )
                .is_err(),
            ),
            None => (target.clone(), false),
        };
        out.entry((Dev::from_st_dev(st.st_dev), st.st_ino))
            .or_insert((path, deleted));
    }
    out
}

/// Every process's fdinfo `lock:` lines: table line -> pids holding it through a descriptor.
fn fdinfo_scan(proc_root: &Path) -> HashMap<LineKey, Vec<u32>> {
    let mut out: HashMap<LineKey, Vec<u32>> = HashMap::default();
    let Ok(procs) = std::fs::read_dir(proc_root) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if !text.contains("lock:") {
                continue;
            }
            for l in proclocks::parse_fdinfo(&text) {
                let pids = out.entry(LineKey::of(&l)).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    out
}

/// Where a held lock's path points now, seen from the holder's mount namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// The path still names the locked inode.
    Same,
    /// The path names another inode on the same device.
    Replaced,
    /// The path names a file on another device.
    DeviceChanged,
    /// The path is gone (or the holder's descriptor says the file was deleted).
    Unlinked,
    /// Could not tell (the holder exited, permission denied).
    Unknown,
}

/// Checks a held lock's path against its inode.
pub fn check_path(proc_root: &Path, lock: &HostLock) -> PathState {
    if lock.deleted {
        return PathState::Unlinked;
    }
    let Some(path) = &lock.path else {
        return PathState::Unknown;
    };
    let rel = path.strip_prefix("/").unwrap_or(path);
    let full = match lock.holders.first() {
        Some(h) => proc_root.join(h.pid.to_string()).join("root").join(rel),
        None => path.clone(),
    };
    match rustix::fs::stat(&full) {
        Ok(st) => {
            let dev = Dev::from_st_dev(st.st_dev);
            if dev != lock.raw.dev {
                PathState::DeviceChanged
            } else if st.st_ino != lock.raw.ino {
                PathState::Replaced
            } else {
                PathState::Same
            }
        }
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => {
            // Only trust ENOENT if the holder's root is still there.
            if lock
                .holders
                .first()
                .map(|h| proc_root.join(h.pid.to_string()).join("root").exists())
                .unwrap_or(true)
            {
                PathState::Unlinked
            } else {
                PathState::Unknown
            }
        }
        Err(_) => PathState::Unknown,
    }
}
