//! From successive snapshots to what the agent exports: hold ages, observed hold times,
//! migrations seen from outside, untrusted file systems, and the gauge series.
//!
//! `/proc/locks` has no timestamps, so everything here has the sampling interval's resolution:
//! a hold's age is counted from the first snapshot that showed it (a lower bound), and a hold
//! that disappeared is recorded as lasting from the middle of the interval in which it appeared
//! to the middle of the interval in which it went. Holds already present at the first snapshot
//! have no known start and are not recorded.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockmeter::fs::Coherence;
use lockmeter::metrics::{LockMode, MigrationKind};
use serde::Serialize;

use crate::labels::{LabelRules, OTHER};
use crate::proclocks::{Dev, Kind};
use crate::scan::{check_path, HostLock, PathState, Snapshot};

/// Identity of a held lock across snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Identity {
    kind: Kind,
    mode: LockMode,
    pid: Option<u32>,
    dev: Dev,
    ino: u64,
    start: u64,
    end: Option<u64>,
    dup: u32,
}

#[derive(Clone, Debug)]
struct Seen {
    /// The snapshot before the first one that showed it (`None`: held when the agent started).
    before_first: Option<Instant>,
    first: Instant,
    last: Instant,
    contended: bool,
    migrated: bool,
    attrs: HoldAttrs,
}

/// The attributes of a hold (`lock.duration`, `lock.held`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HoldAttrs {
    /// `lock.name`.
    pub name: Arc<str>,
    /// `lock.kind`.
    pub kind: Kind,
    /// `lock.mode`.
    pub mode: LockMode,
    /// `fs.type`.
    pub fs_type: Arc<str>,
    /// `process.executable.name` of the (first) holder.
    pub exe: Arc<str>,
}

impl HoldAttrs {
    fn sort_key(&self) -> (&str, Kind, &str, &str, &str) {
        (
            &self.name,
            self.kind,
            self.mode.as_str(),
            &self.fs_type,
            &self.exe,
        )
    }
}

/// A hold that ended between two snapshots.
#[derive(Clone, Debug)]
pub struct EndedHold {
    /// Its attributes.
    pub attrs: HoldAttrs,
    /// Whether its holder was seen waiting for the lock before holding it.
    pub contended: bool,
    /// Estimated hold time, seconds (resolution: the sampling interval).
    pub seconds: f64,
}

/// A lock file found replaced or unlinked while a lock on it was held.
#[derive(Clone, Debug)]
pub struct Migration {
    /// `lock.name`, `lock.kind`, `fs.type`.
    pub attrs: HoldAttrs,
    /// How.
    pub kind: MigrationKind,
    /// The path.
    pub path: PathBuf,
}

/// A lock file on a file system whose locks cannot be trusted to exclude.
#[derive(Clone, Debug)]
pub struct Untrusted {
    /// The path.
    pub path: PathBuf,
    /// `lock.name`.
    pub name: String,
    /// `lock.kind`.
    pub kind: Kind,
    /// `fs.type`.
    pub fs_type: String,
    /// `local-only` or `unknown`.
    pub coherence: Coherence,
    /// Why.
    pub reason: String,
}

/// One row of the lock table (`lockmeter locks`), JSON-serialisable.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The lock file, when found.
    pub path: Option<String>,
    /// `lock.name` after `--name-map`.
    pub name: String,
    /// Lock kind.
    pub kind: Kind,
    /// `exclusive` or `shared`.
    pub mode: &'static str,
    /// Holder processes.
    pub holders: Vec<RowProc>,
    /// Blocked waiters.
    pub waiters: Vec<RowWaiter>,
    /// Held at least this long (since the first sample that showed it); `None` for a hold
    /// already there at the agent's first sample, on that sample.
    pub hold_age_min_s: Option<f64>,
    /// Held at most this long (the holder process's age).
    pub hold_age_max_s: Option<f64>,
    /// `MAJ:MIN` (hex).
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// Byte range (`0-EOF`).
    pub range: String,
    /// File system type.
    pub fs_type: Option<String>,
    /// `host-wide`, `across-clients`, `local-only`, `unknown`.
    pub fs_trust: Option<&'static str>,
    /// The path now names another inode, or is gone.
    pub migrated: Option<&'static str>,
}

/// A holder in a [`Row`].
#[derive(Clone, Debug, Serialize)]
pub struct RowProc {
    /// Pid.
    pub pid: u32,
    /// Command name.
    pub command: String,
}

/// A waiter in a [`Row`].
#[derive(Clone, Debug, Serialize)]
pub struct RowWaiter {
    /// Pid (absent for OFD requests).
    pub pid: Option<u32>,
    /// Command name.
    pub command: Option<String>,
    /// Requested mode.
    pub mode: &'static str,
}

/// Gauge series for one collection.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// `lock.held`: (attrs, count).
    pub held: Vec<(HoldAttrs, i64)>,
    /// `lock.waiters`: (attrs with the waiter's mode and name, count).
    pub waiters: Vec<(HoldAttrs, i64)>,
    /// `lock.hold.age`: (attrs, oldest age in seconds).
    pub age: Vec<(HoldAttrs, f64)>,
    /// `lock.untrusted`: one series per untrusted lock name.
    pub untrusted: Vec<(String, Kind, String, Coherence)>,
}

/// What one snapshot changed.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Holds that ended.
    pub ended: Vec<EndedHold>,
    /// Migrations noticed now (each held lock counts once).
    pub migrations: Vec<Migration>,
    /// Lock files flagged untrusted for the first time.
    pub newly_untrusted: Vec<Untrusted>,
    /// The table.
    pub rows: Vec<Row>,
    /// The gauges.
    pub gauges: Gauges,
}

/// Follows holds across snapshots.
#[derive(Debug)]
pub struct Tracker {
    rules: LabelRules,
    top: usize,
    proc_root: PathBuf,
    prev: Option<Instant>,
    live: HashMap<Identity, Seen>,
    waiting: HashSet<(u32, Dev, u64)>,
    untrusted: HashMap<PathBuf, Untrusted>,
    check_paths: bool,
    rows: bool,
    /// Where the next pass starts checking paths (they are checked in turns on big tables).
    check_cursor: usize,
}

/// Paths checked for migrations per snapshot: all of them on tables up to this size, in
/// turns beyond it (a host holding 10,000 locks has each path checked every 5 samples).
pub const PATH_CHECKS_PER_SAMPLE: usize = 2000;

impl Tracker {
    /// A tracker applying `rules`, with at most `top` lock names in the gauges.
    pub fn new(rules: LabelRules, top: usize, proc_root: impl Into<PathBuf>) -> Tracker {
        Tracker {
            rules,
            top: top.max(1),
            proc_root: proc_root.into(),
            prev: None,
            live: HashMap::default(),
            waiting: HashSet::default(),
            untrusted: HashMap::default(),
            check_paths: true,
            rows: true,
            check_cursor: 0,
        }
    }

    /// Whether [`Update::rows`] is filled (default on; the agent does not need it).
    pub fn rows(mut self, on: bool) -> Tracker {
        self.rows = on;
        self
    }

    /// Whether to stat each held lock's path for migrations (default on).
    pub fn check_paths(mut self, on: bool) -> Tracker {
        self.check_paths = on;
        self
    }

    fn attrs(&self, l: &HostLock, name: &Arc<str>) -> HoldAttrs {
        HoldAttrs {
            name: Arc::clone(name),
            kind: l.raw.kind,
            mode: l.raw.mode,
            fs_type: l
                .fs
                .as_ref()
                .map(|f| Arc::clone(&f.fs_type))
                .unwrap_or_else(|| Arc::from("unknown")),
            exe: l
                .holders
                .first()
                .map(|p| Arc::clone(&p.comm))
                .unwrap_or_else(|| Arc::from("unknown")),
        }
    }

    /// The `lock.name` of a held lock, or `None` when the rules exclude it.
    pub fn name_of(&self, l: &HostLock) -> Option<String> {
        if !self.rules.admits(l.path.as_deref()) {
            return None;
        }
        Some(match &l.path {
            Some(p) => self.rules.name_for(p),
            None => format!("{}:{}", l.raw.dev, l.raw.ino),
        })
    }

    /// Folds a snapshot in.
    pub fn update(&mut self, snap: &Snapshot) -> Update {
        let now = snap.taken;
        let mut up = Update::default();
        let mut dups: HashMap<Identity, u32> = HashMap::default();
        let mut next: HashMap<Identity, Seen> =
            HashMap::with_capacity_and_hasher(snap.locks.len(), Default::default());
        let mut waiting = HashSet::default();
        // name -> activity, for the top-N gauges.
        let mut held: HashMap<HoldAttrs, (i64, f64)> = HashMap::default();
        let mut waiters: HashMap<HoldAttrs, i64> = HashMap::default();
        let mut activity: HashMap<Arc<str>, usize> = HashMap::default();
        let n_locks = snap.locks.len();
        let cursor = if n_locks > PATH_CHECKS_PER_SAMPLE {
            self.check_cursor % n_locks
        } else {
            0
        };
        self.check_cursor = cursor + PATH_CHECKS_PER_SAMPLE;
        for (i, l) in snap.locks.iter().enumerate() {
            let Some(name) = self.name_of(l) else {
                continue;
            };
            let name: Arc<str> = Arc::from(name);
            // Is this lock's path checked this time? (All of them, unless the table is big.)
            let check_now = (i + n_locks - cursor) % n_locks.max(1) < PATH_CHECKS_PER_SAMPLE;
            let mut id = Identity {
                kind: l.raw.kind,
                mode: l.raw.mode,
                pid: l.raw.pid,
                dev: l.raw.dev,
                ino: l.raw.ino,
                start: l.raw.start,
                end: l.raw.end,
                dup: 0,
            };
            let d = dups.entry(id.clone()).or_insert(0);
            id.dup = *d;
            *d += 1;
            let attrs = self.attrs(l, &name);
            let mut seen = match self.live.remove(&id) {
                Some(mut s) => {
                    s.last = now;
                    s
                }
                None => Seen {
                    before_first: self.prev,
                    first: now,
                    last: now,
                    contended: l
                        .raw
                        .pid
                        .is_some_and(|p| self.waiting.contains(&(p, l.raw.dev, l.raw.ino))),
                    migrated: false,
                    attrs: attrs.clone(),
                },
            };
            let mut migrated = None;
            if self.check_paths && check_now && !seen.migrated {
                let kind = match check_path(&self.proc_root, l) {
                    PathState::Replaced => Some(MigrationKind::Replaced),
                    PathState::DeviceChanged => Some(MigrationKind::DeviceChanged),
                    PathState::Unlinked => Some(MigrationKind::Unlinked),
                    PathState::Same | PathState::Unknown => None,
                };
                if let (Some(kind), Some(path)) = (kind, &l.path) {
                    seen.migrated = true;
                    up.migrations.push(Migration {
                        attrs: attrs.clone(),
                        kind,
                        path: path.clone(),
                    });
                    migrated = Some(kind.as_str());
                }
            } else if seen.migrated {
                migrated = Some("yes");
            }
            if let (Some(path), Some(fs)) = (&l.path, &l.fs) {
                if !fs.coherence.is_trustworthy() && !self.untrusted.contains_key(path) {
                    let u = Untrusted {
                        path: path.clone(),
                        name: name.to_string(),
                        kind: l.raw.kind,
                        fs_type: fs.fs_type.to_string(),
                        coherence: fs.coherence,
                        reason: fs.reason.clone(),
                    };
                    self.untrusted.insert(path.clone(), u.clone());
                    up.newly_untrusted.push(u);
                }
            }
            // Held at least since the first snapshot that showed it, also when that was the
            // agent's first (a hold older than the agent); on that first snapshot itself such
            // a hold's age is unknown (the table then shows the holder process's age).
            let seen_for = now.saturating_duration_since(seen.first);
            let age_min = (seen.before_first.is_some() || !seen_for.is_zero()).then_some(seen_for);
            let e = held.entry(attrs.clone()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 = e.1.max(seen_for.as_secs_f64());
            *activity.entry(name.clone()).or_default() += 1 + l.waiters.len();
            for w in &l.waiters {
                let wa = HoldAttrs {
                    mode: w.mode,
                    exe: w
                        .proc
                        .as_ref()
                        .map(|p| Arc::clone(&p.comm))
                        .unwrap_or_else(|| Arc::from("unknown")),
                    ..attrs.clone()
                };
                *waiters.entry(wa).or_default() += 1;
                if let Some(p) = &w.proc {
                    waiting.insert((p.pid, l.raw.dev, l.raw.ino));
                }
            }
            if self.rows {
                up.rows.push(row(l, &name, age_min, migrated));
            }
            next.insert(id, seen);
        }
        // Whatever is left in `live` ended since the last snapshot.
        for (_, s) in self.live.drain() {
            let (Some(before), Some(prev)) = (s.before_first, self.prev) else {
                continue; // held when the agent started: start unknown
            };
            let start = before + s.first.saturating_duration_since(before) / 2;
            let end = s.last + now.saturating_duration_since(s.last) / 2;
            let _ = prev;
            up.ended.push(EndedHold {
                attrs: s.attrs,
                contended: s.contended,
                seconds: end.saturating_duration_since(start).as_secs_f64(),
            });
        }
        self.live = next;
        self.waiting = waiting;
        self.prev = Some(now);

        // Top-N names by activity for the gauges.
        let mut names: Vec<(&Arc<str>, &usize)> = activity.iter().collect();
        names.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top: HashSet<&str> = names
            .iter()
            .take(self.top)
            .map(|(n, _)| -> &str { n })
            .collect();
        let fold = |mut a: HoldAttrs| {
            if !top.contains(&*a.name) {
                a.name = Arc::from(OTHER);
            }
            a
        };
        let mut g_held: HashMap<HoldAttrs, (i64, f64)> = HashMap::default();
        for (a, (n, age)) in held {
            let e = g_held.entry(fold(a)).or_insert((0, 0.0));
            e.0 += n;
            e.1 = e.1.max(age);
        }
        let mut g_wait: HashMap<HoldAttrs, i64> = HashMap::default();
        for (a, n) in waiters {
            *g_wait.entry(fold(a)).or_default() += n;
        }
        up.gauges.held = g_held.iter().map(|(a, v)| (a.clone(), v.0)).collect();
        up.gauges.age = g_held.into_iter().map(|(a, v)| (a, v.1)).collect();
        up.gauges.waiters = g_wait.into_iter().collect();
        up.gauges
            .held
            .sort_by(|a, b| a.0.sort_key().cmp(&b.0.sort_key()));
        up.gauges
            .waiters
            .sort_by(|a, b| a.0.sort_key().cmp(&b.0.sort_key()));
        let mut untrusted: Vec<_> = self
            .untrusted
            .values()
            .filter(|u| top.contains(u.name.as_str()))
            .map(|u| (u.name.clone(), u.kind, u.fs_type.clone(), u.coherence))
            .collect();
        untrusted.sort_by(|a, b| (&a.0, a.1, &a.2).cmp(&(&b.0, b.1, &b.2)));
        untrusted.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
        up.gauges.untrusted = untrusted;
        // Untrusted paths are remembered while locks on them exist, then forgotten (so a path
        // flagged once is flagged again only if it is locked again after a quiet spell).
        if self.untrusted.len() > self.top.saturating_mul(4) {
            let live_paths: HashSet<&Path> = snap
                .locks
                .iter()
                .filter_map(|l| l.path.as_deref())
                .collect();
            self.untrusted
                .retain(|p, _| live_paths.contains(p.as_path()));
        }
        up
    }
}

fn mode_str(m: LockMode) -> &'static str {
    m.as_str()
}

fn row(l: &HostLock, name: &str, age_min: Option<Duration>, migrated: Option<&'static str>) -> Row {
    Row {
        path: l.path.as_ref().map(|p| p.to_string_lossy().into_owned()),
        name: name.to_owned(),
        kind: l.raw.kind,
        mode: mode_str(l.raw.mode),
        holders: l
            .holders
            .iter()
            .map(|p| RowProc {
                pid: p.pid,
                command: p.comm.to_string(),
            })
            .collect(),
        waiters: l
            .waiters
            .iter()
            .map(|w| RowWaiter {
                pid: w.proc.as_ref().map(|p| p.pid),
                command: w.proc.as_ref().map(|p| p.comm.to_string()),
                mode: mode_str(w.mode),
            })
            .collect(),
        hold_age_min_s: age_min.map(|d| d.as_secs_f64()),
        hold_age_max_s: l.holder_age.map(|d| d.as_secs_f64()),
        dev: l.raw.dev.to_string(),
        inode: l.raw.ino,
        range: format!(
            "{}-{}",
            l.raw.start,
            l.raw
                .end
                .map(|e| e.to_string())
                .unwrap_or_else(|| "EOF".to_owned())
        ),
        fs_type: l.fs.as_ref().map(|f| f.fs_type.to_string()),
        fs_trust: l.fs.as_ref().map(|f| f.coherence.as_str()),
        migrated,
    }
}
