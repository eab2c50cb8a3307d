//! The tracepoint source's events and what they become: exact wait and hold times, conflicts
//! and errors per lock call. This part is pure (no BPF): the loader in `ebpf` feeds it the
//! kernel's events; tests feed it made-up ones.
//!
//! The kernel side (`bpf/locks.bpf.c`) hooks three `filelock` tracepoints and makes one event
//! per lock call (its first attempt to its end), one per release (an explicit unlock, or the
//! kernel's at close and exit), and the path of each inode the first time it is locked. Call
//! and release events are staged per CPU and arrive in batches, each CPU's in order but the
//! CPUs' batches interleaved arbitrarily (a batch waits up to ~10 ms): [`Merge`] puts them
//! back in time order before the model sees them.
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
use rustc_hash::FxHashMap;

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
const OP_BATCH: u8 = 4;
/// Size of a batch's header; its events follow it.
pub const BATCH_HEADER_SIZE: usize = 64;
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
    /// The inode's generation: with `dev` and `ino`, one file (inode numbers are reused).
    pub gen: u32,
    /// Lock owner (kernel pointer, only compared).
    pub owner: u64,
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
    /// The inode's generation.
    pub gen: u32,
    /// Components, leaf first.
    pub components: Vec<String>,
    /// The walk stopped before the file system's root (deeper than 16 levels).
    pub truncated: bool,
    /// The process that locked it (its mount namespace names the path).
    pub tgid: u32,
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

impl CallEvent {
    /// The kernel's layout of this event (`struct event` in `bpf/locks.bpf.c`), as a call
    /// (`release` false) or a release: what [`parse_event`] reads. For tests and replay.
    pub fn encode(&self, release: bool) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        b[0..8].copy_from_slice(&self.ts_start.to_ne_bytes());
        b[8..16].copy_from_slice(&self.ts_end.to_ne_bytes());
        b[16..24].copy_from_slice(&self.ino.to_ne_bytes());
        b[24..32].copy_from_slice(&self.owner.to_ne_bytes());
        b[32..36].copy_from_slice(&self.dev.to_kernel().to_ne_bytes());
        b[36..40].copy_from_slice(&self.gen.to_ne_bytes());
        b[40..44].copy_from_slice(&self.ret.to_ne_bytes());
        b[44] = if release { OP_RELEASE } else { OP_CALL };
        b[45] = match self.kind {
            Kind::Flock => 1,
            Kind::Posix => 2,
            Kind::Ofd => 3,
            Kind::Lease => 0,
        };
        b[46] = self.lock_type;
        b[47] = self.flags;
        b[48..64].copy_from_slice(&self.comm);
        b
    }
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
            gen: u32_at(b, 36)?,
            tgid: u32_at(b, 40)?,
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
        gen: u32_at(b, 36)?,
        owner: u64_at(b, 24)?,
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

/// One ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A single event.
    Event(Event),
    /// Events of one CPU, in the order they happened there.
    Batch {
        /// The CPU.
        cpu: u32,
        /// The batch's number among that CPU's (from 1).
        gen: u64,
        /// `EVENT_SIZE` bytes per event.
        events: &'a [u8],
    },
}

/// Parses one ring-buffer record; `None` for anything malformed.
pub fn parse_record(b: &[u8]) -> Option<Record<'_>> {
    if b.len() >= BATCH_HEADER_SIZE && b[44] == OP_BATCH {
        let n = u32_at(b, 36)? as usize;
        let events = b.get(BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + n * EVENT_SIZE)?;
        return Some(Record::Batch {
            cpu: u32_at(b, 32)?,
            gen: u64_at(b, 0)?,
            events,
        });
    }
    parse_event(b).map(Record::Event)
}

/// Puts the kernel's events back in time order and feeds them to a model.
///
/// Each CPU's events arrive in order, but a CPU's batch can arrive after a later event of
/// another CPU (a thread that locked on one CPU and unlocked on another). Events are held
/// until they are older than a horizon the caller chooses (older than anything still staged
/// in the kernel), then applied sorted by time. Names are applied at once: they go to the
/// ring directly, before the events that need them.
#[derive(Debug, Default)]
pub struct Merge {
    pending: Vec<(u64, Event)>,
    gens: FxHashMap<u32, u64>,
    applied_to: u64,
    late: u64,
}

impl Merge {
    /// An empty merge.
    pub fn new() -> Merge {
        Merge::default()
    }

    /// Takes one ring-buffer record.
    pub fn record(&mut self, b: &[u8], model: &mut TraceModel) {
        match parse_record(b) {
            Some(Record::Event(Event::Name(n))) => model.apply(&Event::Name(n)),
            Some(Record::Event(e)) => self.push(e),
            Some(Record::Batch { cpu, gen, events }) => self.batch(cpu, gen, events),
            None => {}
        }
    }

    /// Takes a batch (from the ring, or read from a CPU's stage): ignored when that CPU's
    /// batch `gen` was taken before.
    pub fn batch(&mut self, cpu: u32, gen: u64, events: &[u8]) {
        let seen = self.gens.entry(cpu).or_insert(0);
        if gen <= *seen {
            return;
        }
        *seen = gen;
        for b in events.chunks_exact(EVENT_SIZE) {
            if let Some(e) = parse_event(b) {
                self.push(e);
            }
        }
    }

    fn push(&mut self, e: Event) {
        let ts = match &e {
            Event::Call(c) | Event::Release(c) => c.ts_end,
            Event::Name(_) => 0,
        };
        self.pending.push((ts, e));
    }

    /// Applies, in time order, the events that happened before `horizon` (monotonic ns).
    pub fn settle(&mut self, horizon: u64, model: &mut TraceModel) {
        // Stable: events of one time keep their arrival order (one CPU's order).
        self.pending.sort_by_key(|(ts, _)| *ts);
        let n = self.pending.partition_point(|(ts, _)| *ts <= horizon);
        for (ts, e) in self.pending.drain(..n) {
            if ts < self.applied_to {
                self.late += 1;
            }
            model.apply(&e);
        }
        self.applied_to = self.applied_to.max(horizon.min(u64::MAX - 1));
    }

    /// Applies everything held.
    pub fn finish(&mut self, model: &mut TraceModel) {
        self.settle(u64::MAX, model);
    }

    /// Events held, not yet applied.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Events that arrived after the horizon had passed them (applied out of order).
    pub fn late(&self) -> u64 {
        self.late
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

/// What an inode is exported as: an index into the label table, or excluded.
#[derive(Clone, Copy, Debug)]
struct Info {
    label: Option<u32>,
}

/// A `lock.name` with its `fs.type`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Label {
    name: Arc<str>,
    fs_type: Arc<str>,
}

#[derive(Clone, Copy, Debug)]
struct Hold {
    start_ns: u64,
    mode: LockMode,
    contended: bool,
    label: u32,
    exe: u32,
}

/// A series of one instrument: small and `Copy`, so the per-event lookups hash a few
/// integers instead of strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    label: u32,
    exe: u32,
    kind: Kind,
    mode: LockMode,
    extra: u8,
}

/// Distinct command names kept apart; later ones are exported as `other`.
const MAX_EXES: usize = 4096;

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
    paths: HashMap<(Dev, u64, u32), PathBuf>,
    infos: FxHashMap<(Dev, u64, u32), Info>,
    mounts: HashMap<Vec<u8>, Vec<MountInfo>>,
    fs_types: HashMap<Dev, Arc<str>>,
    proc_root: PathBuf,
    labels: Vec<Label>,
    label_ids: HashMap<Label, u32>,
    exes: FxHashMap<[u8; 16], u32>,
    exe_names: Vec<Arc<str>>,
    holds: FxHashMap<(Dev, u64, Kind, u64), Hold>,
    wait: FxHashMap<SeriesKey, BoundHistogram<f64>>,
    hold: FxHashMap<SeriesKey, BoundHistogram<f64>>,
    acq: FxHashMap<SeriesKey, BoundCounter<u64>>,
    conf: FxHashMap<SeriesKey, BoundCounter<u64>>,
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
    /// `proc_root` (`/proc`, or the host's) gives the mount tables that turn a file's path
    /// inside its file system into the path the locking process sees.
    pub fn new(
        metrics: Arc<AgentMetrics>,
        rules: LabelRules,
        top: usize,
        proc_root: impl Into<PathBuf>,
    ) -> TraceModel {
        TraceModel {
            metrics,
            rules,
            bound: NameBound::new(top),
            paths: HashMap::new(),
            infos: FxHashMap::default(),
            mounts: HashMap::new(),
            fs_types: HashMap::new(),
            proc_root: proc_root.into(),
            labels: Vec::new(),
            label_ids: HashMap::new(),
            exes: FxHashMap::default(),
            exe_names: vec![Arc::from("other")],
            holds: FxHashMap::default(),
            wait: FxHashMap::default(),
            hold: FxHashMap::default(),
            acq: FxHashMap::default(),
            conf: FxHashMap::default(),
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
        let mut rel = PathBuf::from("/");
        for c in n.components.iter().rev() {
            rel.push(c);
        }
        let mut path = match self.host_path(n.tgid, n.dev, &rel) {
            Some(p) => p,
            None => {
                tracing::debug!(
                    dev = %n.dev,
                    path = %rel.display(),
                    pid = n.tgid,
                    "no mount of this device found; naming the lock by its path inside the file system"
                );
                rel
            }
        };
        if n.truncated {
            path = Path::new("/…").join(path.strip_prefix("/").unwrap_or(&path));
        }
        if self.paths.len() > MAX_HOLDS {
            self.paths.clear();
        }
        self.paths.insert((n.dev, n.ino, n.gen), path);
        self.infos.remove(&(n.dev, n.ino, n.gen));
    }

    /// The mount table of `pid`'s mount namespace (pid 1's when `pid` is gone).
    fn mount_table(&mut self, pid: u32) -> Option<(Vec<u8>, &Vec<MountInfo>)> {
        use std::os::unix::ffi::OsStrExt as _;
        for p in [pid, 1] {
            let dir = self.proc_root.join(p.to_string());
            // The namespace names the cache entry. Pid 1's may be unreadable even to root (a
            // sandbox's init): its mount table is then cached under its pid.
            let ns = match std::fs::read_link(dir.join("ns/mnt")) {
                Ok(ns) => ns.as_os_str().as_bytes().to_vec(),
                Err(_) if p == 1 => b"pid 1".to_vec(),
                Err(_) => continue,
            };
            if !self.mounts.contains_key(&ns) {
                // An exiting process still has a namespace but shows no mounts: try the next.
                let table = std::fs::read_to_string(dir.join("mountinfo"))
                    .map(|t| parse_mountinfo(&t))
                    .unwrap_or_default();
                if table.is_empty() {
                    continue;
                }
                if self.mounts.len() > 64 {
                    self.mounts.clear();
                }
                self.mounts.insert(ns.clone(), table);
            }
            let t = self.mounts.get(&ns)?;
            return Some((ns, t));
        }
        None
    }

    /// Where a path inside a file system is, in `pid`'s view: under the mount of that device
    /// whose root is the longest prefix of the path.
    fn host_path(&mut self, pid: u32, dev: Dev, rel: &Path) -> Option<PathBuf> {
        let pick = |mounts: &[MountInfo]| {
            mounts
                .iter()
                .filter(|m| m.major == dev.major && m.minor == dev.minor)
                .filter(|m| rel.starts_with(&m.root))
                .max_by_key(|m| m.root.as_os_str().len())
                .cloned()
        };
        let (ns, table) = self.mount_table(pid)?;
        let mut m = pick(table);
        if m.is_none() {
            // Mounted since the table was read: read it again.
            self.mounts.remove(&ns);
            m = pick(self.mount_table(pid)?.1);
        }
        let m = m?;
        let inner = rel.strip_prefix(&m.root).ok()?;
        let fs_type = fold_fs_type(&m.fs_type).to_owned();
        self.fs_types.insert(dev, fs_type.into());
        Some(m.mount_point.join(inner))
    }

    fn info(&mut self, dev: Dev, ino: u64, gen: u32) -> Info {
        if let Some(i) = self.infos.get(&(dev, ino, gen)) {
            return *i;
        }
        let path = self.paths.get(&(dev, ino, gen)).cloned();
        if path.is_none() {
            self.stats.unnamed += 1;
        }
        let fs_type = self
            .fs_types
            .get(&dev)
            .cloned()
            .unwrap_or_else(|| Arc::from("unknown"));
        let label = if self.rules.admits(path.as_deref()) {
            let n = match &path {
                Some(p) => self.rules.name_for(p),
                None => format!("{dev}:{ino}"),
            };
            let label = Label {
                name: Arc::from(self.bound.bound(&n)),
                fs_type,
            };
            let next = u32::try_from(self.labels.len()).unwrap_or(u32::MAX);
            let id = *self.label_ids.entry(label.clone()).or_insert(next);
            if id == next {
                self.labels.push(label);
            }
            Some(id)
        } else {
            None
        };
        let info = Info { label };
        if self.infos.len() > MAX_HOLDS {
            self.infos.clear();
        }
        self.infos.insert((dev, ino, gen), info);
        info
    }

    fn exe(&mut self, comm: &[u8; 16]) -> u32 {
        if let Some(e) = self.exes.get(comm) {
            return *e;
        }
        if self.exe_names.len() >= MAX_EXES {
            return 0; // "other"
        }
        let id = u32::try_from(self.exe_names.len()).unwrap_or(0);
        self.exe_names.push(cstr(comm).into());
        self.exes.insert(*comm, id);
        id
    }

    fn kvs(&self, k: &SeriesKey, extra: Option<KeyValue>) -> Vec<KeyValue> {
        let l = &self.labels[k.label as usize];
        let mut v = vec![
            KeyValue::new(keys::LOCK_NAME, l.name.to_string()),
            KeyValue::new(keys::LOCK_KIND, k.kind.as_str()),
            KeyValue::new(keys::LOCK_MODE, k.mode.as_str()),
            KeyValue::new(keys::FS_TYPE, l.fs_type.to_string()),
            KeyValue::new(
                keys::PROCESS_EXECUTABLE_NAME,
                self.exe_names[k.exe as usize].to_string(),
            ),
        ];
        v.extend(extra);
        v
    }

    fn error(&self, label: u32, exe: u32, kind: Kind, op: &'static str, errno: i32) {
        let l = &self.labels[label as usize];
        self.metrics.errors.add(
            1,
            &[
                KeyValue::new(keys::LOCK_NAME, l.name.to_string()),
                KeyValue::new(keys::LOCK_KIND, kind.as_str()),
                KeyValue::new(keys::LOCK_OPERATION, op),
                KeyValue::new(keys::ERROR_TYPE, errno_name(errno)),
                KeyValue::new(keys::FS_TYPE, l.fs_type.to_string()),
                KeyValue::new(
                    keys::PROCESS_EXECUTABLE_NAME,
                    self.exe_names[exe as usize].to_string(),
                ),
            ],
        );
    }

    fn on_call(&mut self, c: &CallEvent) {
        self.stats.calls += 1;
        let Some(label) = self.info(c.dev, c.ino, c.gen).label else {
            return;
        };
        let exe = self.exe(&c.comm);
        let mode = match c.lock_type {
            F_WRLCK => LockMode::Exclusive,
            F_RDLCK => LockMode::Shared,
            F_UNLCK => {
                // A failed unlock (successful ones arrive as releases).
                if c.ret != 0 {
                    self.error(label, exe, c.kind, "unlock", -c.ret);
                }
                return;
            }
            _ => return,
        };
        let outcome = match -c.ret {
            0 => Outcome::Acquired,
            libc::EAGAIN | libc::EACCES => Outcome::WouldBlock,
            libc::EINTR | 512 => Outcome::Cancelled,
            _ => Outcome::Error,
        };
        // A conflict: the call waited (the kernel deferred it) or would have.
        let conflict = c.flags & FLAG_CONFLICT != 0 || outcome == Outcome::WouldBlock;
        let key = |extra: u8| SeriesKey {
            label,
            exe,
            kind: c.kind,
            mode,
            extra,
        };
        let wait_s = c.ts_end.saturating_sub(c.ts_start) as f64 * 1e-9;
        let k = key(outcome as u8);
        if !self.wait.contains_key(&k) {
            let b = self.metrics.wait.bind(&self.kvs(
                &k,
                Some(KeyValue::new(keys::LOCK_OUTCOME, outcome.as_str())),
            ));
            self.wait.insert(k, b);
        }
        if let Some(h) = self.wait.get(&k) {
            h.record(wait_s);
        }
        if conflict {
            let k = key(0);
            if !self.conf.contains_key(&k) {
                let b = self.metrics.conflicts.bind(&self.kvs(&k, None));
                self.conf.insert(k, b);
            }
            if let Some(cn) = self.conf.get(&k) {
                cn.add(1);
            }
        }
        match outcome {
            Outcome::Acquired => {
                let k = key(u8::from(conflict));
                if !self.acq.contains_key(&k) {
                    let b = self
                        .metrics
                        .acquisitions
                        .bind(&self.kvs(&k, Some(KeyValue::new(keys::LOCK_CONTENDED, conflict))));
                    self.acq.insert(k, b);
                }
                if let Some(a) = self.acq.get(&k) {
                    a.add(1);
                }
                let hk = (c.dev, c.ino, c.kind, c.owner);
                let hold = Hold {
                    start_ns: c.ts_end,
                    mode,
                    contended: conflict,
                    label,
                    exe,
                };
                match self.holds.get(&hk) {
                    Some(h) if h.mode == mode => {} // locked again by the same owner: one hold
                    Some(_) => {
                        // Converted (shared <-> exclusive): the old hold ends here.
                        self.end_hold(hk, c.ts_end);
                        self.start_hold(hk, hold);
                    }
                    None => self.start_hold(hk, hold),
                }
            }
            Outcome::Error => self.error(label, exe, c.kind, "lock", -c.ret),
            _ => {}
        }
    }

    fn start_hold(&mut self, hk: (Dev, u64, Kind, u64), hold: Hold) {
        if self.holds.len() >= MAX_HOLDS {
            // Releases were lost (a full ring buffer): start over rather than grow.
            tracing::warn!(
                holds = self.holds.len(),
                "too many holds in progress; forgetting them"
            );
            self.holds.clear();
        }
        self.holds.insert(hk, hold);
    }

    fn end_hold(&mut self, hk: (Dev, u64, Kind, u64), at: u64) -> bool {
        let Some(h) = self.holds.remove(&hk) else {
            return false;
        };
        self.stats.holds += 1;
        let k = SeriesKey {
            label: h.label,
            exe: h.exe,
            kind: hk.2,
            mode: h.mode,
            extra: u8::from(h.contended),
        };
        if !self.hold.contains_key(&k) {
            let b = self
                .metrics
                .duration
                .bind(&self.kvs(&k, Some(KeyValue::new(keys::LOCK_CONTENDED, h.contended))));
            self.hold.insert(k, b);
        }
        if let Some(b) = self.hold.get(&k) {
            b.record(at.saturating_sub(h.start_ns) as f64 * 1e-9);
        }
        true
    }

    fn on_release(&mut self, c: &CallEvent) {
        if !self.end_hold((c.dev, c.ino, c.kind, c.owner), c.ts_end) {
            self.stats.unmatched_releases += 1;
        }
    }
}
