//! The tracepoint source's events and what they become: exact wait and hold times, conflicts
//! and errors per lock call. This part is pure (no BPF): the loader in `ebpf` feeds it the
//! kernel's events; tests feed it made-up ones.
//!
//! The kernel side (`bpf/locks.bpf.c`) hooks three `filelock` tracepoints and sends one event
//! per lock call (its first attempt to its end), one per release (an explicit unlock, or the
//! kernel's at close and exit), and the path of each inode the first time it is locked.
//! Holds are paired here by (device, inode, kind, owner): the owner is the open file
//! description for `flock` and OFD locks and the process's file table for POSIX locks, exactly
//! as the kernel decides what a release releases. A POSIX lock released in part (a sub-range)
//! ends the hold: holds are per file, not per byte range.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockmeter::fs::{parse_mountinfo, MountInfo};
use lockmeter::metrics::{keys, LockMode, Outcome};
use opentelemetry::metrics::{BoundCounter, BoundHistogram};
use opentelemetry::KeyValue;

use crate::labels::{LabelRules, NameBound};
use crate::metrics::AgentMetrics;
use crate::proclocks::{Dev, Kind};
use crate::scan::fold_fs_type;

/// Size of a call or release event.
pub const EVENT_SIZE: usize = 64;
/// Path components in a name event.
pub const MAX_DEPTH: usize = 16;
/// Bytes per path component.
pub const NAME_LEN: usize = 64;
/// Size of a name event.
pub const NAME_EVENT_SIZE: usize = EVENT_SIZE + MAX_DEPTH * NAME_LEN;

const OP_CALL: u8 = 1;
const OP_RELEASE: u8 = 2;
const OP_NAME: u8 = 3;
const FLAG_CONFLICT: u8 = 1;
const F_RDLCK: u8 = 0;
const F_WRLCK: u8 = 1;
const F_UNLCK: u8 = 2;

/// A lock call or a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallEvent {
    /// First attempt (monotonic ns).
    pub ts_start: u64,
    /// End of the call, or the release.
    pub ts_end: u64,
    /// Device.
    pub dev: Dev,
    /// Inode.
    pub ino: u64,
    /// Lock owner (kernel pointer, only compared).
    pub owner: u64,
    /// Calling process.
    pub tgid: u32,
    /// Result: 0 or a negative errno.
    pub ret: i32,
    /// Kind.
    pub kind: Kind,
    /// `F_RDLCK` 0, `F_WRLCK` 1, `F_UNLCK` 2.
    pub lock_type: u8,
    /// Conflict (bit 0), blocking request (bit 1).
    pub flags: u8,
    /// Command name, NUL-padded.
    pub comm: [u8; 16],
}

/// An inode's path inside its file system, leaf first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameEvent {
    /// Device.
    pub dev: Dev,
    /// Inode.
    pub ino: u64,
    /// Components, leaf first.
    pub components: Vec<String>,
    /// The walk stopped before the file system's root (deeper than 16 levels).
    pub truncated: bool,
}

/// One event from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A lock or unlock call ended.
    Call(CallEvent),
    /// A lock was released outside a call (or by an unlock call).
    Release(CallEvent),
    /// The path of an inode.
    Name(NameEvent),
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses one ring-buffer record; `None` for anything malformed.
pub fn parse_event(b: &[u8]) -> Option<Event> {
    if b.len() < EVENT_SIZE {
        return None;
    }
    let op = b[44];
    let dev = Dev::from_kernel(u32_at(b, 32)?);
    let ino = u64_at(b, 16)?;
    if op == OP_NAME {
        if b.len() < NAME_EVENT_SIZE {
            return None;
        }
        let depth = usize::from(b[45]).min(MAX_DEPTH);
        let components = (0..depth)
            .map(|i| cstr(&b[EVENT_SIZE + i * NAME_LEN..EVENT_SIZE + (i + 1) * NAME_LEN]))
            .collect();
        return Some(Event::Name(NameEvent {
            dev,
            ino,
            components,
            truncated: b[46] != 0,
        }));
    }
    let kind = match b[45] {
        1 => Kind::Flock,
        2 => Kind::Posix,
        3 => Kind::Ofd,
        _ => return None,
    };
    let mut comm = [0u8; 16];
    comm.copy_from_slice(b.get(48..64)?);
    let e = CallEvent {
        ts_start: u64_at(b, 0)?,
        ts_end: u64_at(b, 8)?,
        dev,
        ino,
        owner: u64_at(b, 24)?,
        tgid: u32_at(b, 36)?,
        ret: i32::from_ne_bytes(b.get(40..44)?.try_into().ok()?),
        kind,
        lock_type: b[46],
        flags: b[47],
        comm,
    };
    match op {
        OP_CALL => Some(Event::Call(e)),
        OP_RELEASE => Some(Event::Release(e)),
        _ => None,
    }
}

/// The errno name for `error.type`.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EINVAL => "EINVAL",
        libc::EDEADLK => "EDEADLK",
        libc::ENOLCK => "ENOLCK",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        512 => "ERESTARTSYS",
        _ => "other",
    }
}

#[derive(Clone, Debug)]
struct Info {
    /// `None`: excluded by the rules.
    name: Option<Arc<str>>,
    fs_type: Arc<str>,
}

#[derive(Clone, Debug)]
struct Hold {
    start_ns: u64,
    mode: LockMode,
    contended: bool,
    name: Arc<str>,
    fs_type: Arc<str>,
    exe: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    name: Arc<str>,
    kind: Kind,
    mode: LockMode,
    extra: u8,
    fs_type: Arc<str>,
    exe: Arc<str>,
}

/// Counts of what the model saw (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Lock calls.
    pub calls: u64,
    /// Releases that ended a known hold.
    pub holds: u64,
    /// Releases for holds the agent never saw start (taken before it started, or not a lock
    /// of that owner).
    pub unmatched_releases: u64,
    /// Locks whose path was not known when their event arrived.
    pub unnamed: u64,
}

/// Turns events into the schema's measurements.
pub struct TraceModel {
    metrics: Arc<AgentMetrics>,
    rules: LabelRules,
    bound: NameBound,
    rel_paths: HashMap<(Dev, u64), PathBuf>,
    infos: HashMap<(Dev, u64), Info>,
    mounts: Vec<MountInfo>,
    mountinfo: PathBuf,
    exes: HashMap<[u8; 16], Arc<str>>,
    holds: HashMap<(Dev, u64, Kind, u64), Hold>,
    wait: HashMap<SeriesKey, BoundHistogram<f64>>,
    hold: HashMap<SeriesKey, BoundHistogram<f64>>,
    acq: HashMap<SeriesKey, BoundCounter<u64>>,
    conf: HashMap<SeriesKey, BoundCounter<u64>>,
    stats: TraceStats,
}

impl std::fmt::Debug for TraceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceModel")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

const MAX_HOLDS: usize = 1 << 20;

impl TraceModel {
    /// A model recording into `metrics`, naming locks by `rules`, at most `top` names.
    /// `mountinfo` maps a file's path inside its file system to where it is mounted
    /// (`/proc/self/mountinfo`, or the host's through its `/proc`).
    pub fn new(
        metrics: Arc<AgentMetrics>,
        rules: LabelRules,
        top: usize,
        mountinfo: impl Into<PathBuf>,
    ) -> TraceModel {
        let mountinfo = mountinfo.into();
        let mounts = std::fs::read_to_string(&mountinfo)
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default();
        TraceModel {
            metrics,
            rules,
            bound: NameBound::new(top),
            rel_paths: HashMap::new(),
            infos: HashMap::new(),
            mounts,
            mountinfo,
            exes: HashMap::new(),
            holds: HashMap::new(),
            wait: HashMap::new(),
            hold: HashMap::new(),
            acq: HashMap::new(),
            conf: HashMap::new(),
            stats: TraceStats::default(),
        }
    }

    /// What was seen so far.
    pub fn stats(&self) -> TraceStats {
        self.stats
    }

    /// Holds in progress.
    pub fn holds_in_progress(&self) -> usize {
        self.holds.len()
    }

    /// Applies one event.
    pub fn apply(&mut self, e: &Event) {
        match e {
            Event::Name(n) => self.on_name(n),
            Event::Call(c) => self.on_call(c),
            Event::Release(c) => self.on_release(c),
        }
    }

    fn on_name(&mut self, n: &NameEvent) {
        let mut p = PathBuf::from("/");
        for c in n.components.iter().rev() {
            p.push(c);
        }
        if n.truncated {
            p = Path::new("/…").join(p.strip_prefix("/").unwrap_or(&p));
        }
        if self.rel_paths.len() > MAX_HOLDS {
            self.rel_paths.clear();
        }
        self.rel_paths.insert((n.dev, n.ino), p);
        self.infos.remove(&(n.dev, n.ino));
    }

    /// Where an inode's path inside its file system is mounted.
    fn host_path(&mut self, dev: Dev, rel: &Path) -> Option<(PathBuf, Option<MountInfo>)> {
        let pick = |mounts: &[MountInfo]| {
            mounts
                .iter()
                .filter(|m| m.major == dev.major && m.minor == dev.minor)
                .filter(|m| rel.starts_with(&m.root))
                .max_by_key(|m| m.root.as_os_str().len())
                .cloned()
        };
        let mut m = pick(&self.mounts);
        if m.is_none() {
            // A file system mounted since the last read.
            self.mounts = std::fs::read_to_string(&self.mountinfo)
                .map(|t| parse_mountinfo(&t))
                .unwrap_or_default();
            m = pick(&self.mounts);
        }
        let m = m?;
        let inner = rel.strip_prefix(&m.root).ok()?;
        Some((m.mount_point.join(inner), Some(m)))
    }

    fn info(&mut self, dev: Dev, ino: u64) -> Info {
        if let Some(i) = self.infos.get(&(dev, ino)) {
            return i.clone();
        }
        let rel = self.rel_paths.get(&(dev, ino)).cloned();
        let resolved = rel.as_ref().and_then(|r| self.host_path(dev, r));
        let (path, mount) = match resolved {
            Some((p, m)) => (Some(p), m),
            None => (rel, None),
        };
        if path.is_none() {
            self.stats.unnamed += 1;
        }
        let fs_type: Arc<str> = match &mount {
            Some(m) => fold_fs_type(&m.fs_type).into(),
            None => "unknown".into(),
        };
        let name = if self.rules.admits(path.as_deref()) {
            let n = match &path {
                Some(p) => self.rules.name_for(p),
                None => format!("{dev}:{ino}"),
            };
            Some(Arc::from(self.bound.bound(&n)))
        } else {
            None
        };
        let info = Info { name, fs_type };
        if self.infos.len() > MAX_HOLDS {
            self.infos.clear();
        }
        self.infos.insert((dev, ino), info.clone());
        info
    }

    fn exe(&mut self, comm: &[u8; 16]) -> Arc<str> {
        if let Some(e) = self.exes.get(comm) {
            return e.clone();
        }
        let e: Arc<str> = cstr(comm).into();
        if self.exes.len() > 4096 {
            self.exes.clear();
        }
        self.exes.insert(*comm, e.clone());
        e
    }

    fn kvs(k: &SeriesKey, extra: KeyValue) -> Vec<KeyValue> {
        vec![
            KeyValue::new(keys::LOCK_NAME, k.name.to_string()),
            KeyValue::new(keys::LOCK_KIND, k.kind.as_str()),
            KeyValue::new(keys::LOCK_MODE, k.mode.as_str()),
            extra,
            KeyValue::new(keys::FS_TYPE, k.fs_type.to_string()),
            KeyValue::new(keys::PROCESS_EXECUTABLE_NAME, k.exe.to_string()),
        ]
    }

    fn on_call(&mut self, c: &CallEvent) {
        self.stats.calls += 1;
        let info = self.info(c.dev, c.ino);
        let Some(name) = info.name else {
            return;
        };
        let exe = self.exe(&c.comm);
        let mode = match c.lock_type {
            F_WRLCK => LockMode::Exclusive,
            F_RDLCK => LockMode::Shared,
            F_UNLCK => {
                // A failed unlock (successful ones arrive as releases).
                if c.ret != 0 {
                    self.metrics.errors.add(
                        1,
                        &[
                            KeyValue::new(keys::LOCK_NAME, name.to_string()),
                            KeyValue::new(keys::LOCK_KIND, c.kind.as_str()),
                            KeyValue::new(keys::LOCK_OPERATION, "unlock"),
                            KeyValue::new(keys::ERROR_TYPE, errno_name(-c.ret)),
                            KeyValue::new(keys::FS_TYPE, info.fs_type.to_string()),
                            KeyValue::new(keys::PROCESS_EXECUTABLE_NAME, exe.to_string()),
                        ],
                    );
                }
                return;
            }
            _ => return,
        };
        let conflict = c.flags & FLAG_CONFLICT != 0;
        let outcome = match -c.ret {
            0 => Outcome::Acquired,
            libc::EAGAIN | libc::EACCES => Outcome::WouldBlock,
            libc::EINTR | 512 => Outcome::Cancelled,
            _ => Outcome::Error,
        };
        let key = |extra: u8| SeriesKey {
            name: name.clone(),
            kind: c.kind,
            mode,
            extra,
            fs_type: info.fs_type.clone(),
            exe: exe.clone(),
        };
        let wait_s = c.ts_end.saturating_sub(c.ts_start) as f64 * 1e-9;
        let k = key(outcome as u8);
        let metrics = &self.metrics;
        self.wait
            .entry(k)
            .or_insert_with_key(|k| {
                metrics.wait.bind(&Self::kvs(
                    k,
                    KeyValue::new(keys::LOCK_OUTCOME, outcome.as_str()),
                ))
            })
            .record(wait_s);
        if conflict {
            self.conf
                .entry(key(0))
                .or_insert_with_key(|k| {
                    let mut kv = Self::kvs(k, KeyValue::new(keys::LOCK_CONTENDED, true));
                    kv.remove(3);
                    metrics.conflicts.bind(&kv)
                })
                .add(1);
        }
        match outcome {
            Outcome::Acquired => {
                self.acq
                    .entry(key(u8::from(conflict)))
                    .or_insert_with_key(|k| {
                        metrics
                            .acquisitions
                            .bind(&Self::kvs(k, KeyValue::new(keys::LOCK_CONTENDED, conflict)))
                    })
                    .add(1);
                let hk = (c.dev, c.ino, c.kind, c.owner);
                match self.holds.get(&hk) {
                    Some(h) if h.mode == mode => {} // locked again by the same owner: one hold
                    Some(_) => {
                        // Converted (shared <-> exclusive): the old hold ends here.
                        self.end_hold(hk, c.ts_end);
                        self.start_hold(hk, c, mode, conflict, name, info.fs_type, exe);
                    }
                    None => self.start_hold(hk, c, mode, conflict, name, info.fs_type, exe),
                }
            }
            Outcome::Error => {
                self.metrics.errors.add(
                    1,
                    &[
                        KeyValue::new(keys::LOCK_NAME, name.to_string()),
                        KeyValue::new(keys::LOCK_KIND, c.kind.as_str()),
                        KeyValue::new(keys::LOCK_OPERATION, "lock"),
                        KeyValue::new(keys::ERROR_TYPE, errno_name(-c.ret)),
                        KeyValue::new(keys::FS_TYPE, info.fs_type.to_string()),
                        KeyValue::new(keys::PROCESS_EXECUTABLE_NAME, exe.to_string()),
                    ],
                );
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_hold(
        &mut self,
        hk: (Dev, u64, Kind, u64),
        c: &CallEvent,
        mode: LockMode,
        contended: bool,
        name: Arc<str>,
        fs_type: Arc<str>,
        exe: Arc<str>,
    ) {
        if self.holds.len() >= MAX_HOLDS {
            // Releases were lost (a full ring buffer): start over rather than grow.
            tracing::warn!(
                holds = self.holds.len(),
                "too many holds in progress; forgetting them"
            );
            self.holds.clear();
        }
        self.holds.insert(
            hk,
            Hold {
                start_ns: c.ts_end,
                mode,
                contended,
                name,
                fs_type,
                exe,
            },
        );
    }

    fn end_hold(&mut self, hk: (Dev, u64, Kind, u64), at: u64) -> bool {
        let Some(h) = self.holds.remove(&hk) else {
            return false;
        };
        self.stats.holds += 1;
        let k = SeriesKey {
            name: h.name,
            kind: hk.2,
            mode: h.mode,
            extra: u8::from(h.contended),
            fs_type: h.fs_type,
            exe: h.exe,
        };
        let metrics = &self.metrics;
        let contended = h.contended;
        self.hold
            .entry(k)
            .or_insert_with_key(|k| {
                metrics.duration.bind(&Self::kvs(
                    k,
                    KeyValue::new(keys::LOCK_CONTENDED, contended),
                ))
            })
            .record(at.saturating_sub(h.start_ns) as f64 * 1e-9);
        true
    }

    fn on_release(&mut self, c: &CallEvent) {
        if !self.end_hold((c.dev, c.ino, c.kind, c.owner), c.ts_end) {
            self.stats.unmatched_releases += 1;
        }
    }
}
