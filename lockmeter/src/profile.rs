//! Which code holds a lock, and which code waits for it: slow-lock events and the lock profile.
//!
//! Every acquire call of every lock type captures its caller's source location for free
//! (`#[track_caller]`). lockmeter uses it in two ways, both off the fast path:
//!
//! - **Slow-lock events** (the JFR model): an acquire that waited at least the lock's
//!   *slow-wait* threshold, or a timed hold of at least its *slow-hold* threshold, emits one
//!   `INFO` event on target `lockmeter` (`lock.slow_wait` / `lock.slow_hold`) with the schema's
//!   attributes, the OpenTelemetry semantic-convention code attributes of the call site
//!   (`code.file.path`, `code.line.number`, `code.column.number`), `thread.name`, the wait or
//!   hold time, and for in-process locks the call site of the holder whose release ended the
//!   wait (`lock.holder.code.file.path`, `lock.holder.code.line.number`). With
//!   `tracing-opentelemetry` they become span events of the surrounding span (the request).
//!   Defaults: 10 ms and 100 ms ([`DEFAULT_SLOW_WAIT`], [`DEFAULT_SLOW_HOLD`]), overridden for
//!   the process by `LOCKMETER_SLOW_WAIT_MS` / `LOCKMETER_SLOW_HOLD_MS` and per lock by the
//!   builders' `slow_wait` / `slow_hold`.
//! - **The lock profile** (the Go mutex and block profile model): per lock name and call site,
//!   the waits suffered there, the waits caused by holders that acquired there, and the holds,
//!   each as count, total and maximum. Memory is bounded: at most [`sites_per_lock`] sites per
//!   lock (default 16, `LOCKMETER_PROFILE_SITES`), the rest folded into one `(other sites)` row,
//!   and at most [`MAX_PROFILED_LOCKS`] lock names. Read it with [`snapshot`]; the `telemetry`
//!   feature serves it as JSON at `/debug/lockmeter/profile` beside `/metrics`.
//!
//! What is seen: for file locks, every wait of an acquire that found the lock taken (a clock
//! read costs nothing next to a system call); for `sync` and `tokio` locks,
//! every wait of 50 µs or more (one that parked), and of the shorter ones (a few spins, which a
//! profile entry would outweigh) the *timed* ones (1 in `sample_every`), each counted for the
//! `sample_every` waits it stands for, as Go's mutex profile weighs its samples; every wait is
//! checked against the slow-wait threshold and reported if slow; holds of
//! *timed* acquisitions (1 in `sample_every`, and every
//! acquisition of a lock taken less often than metrics are collected), because timing every
//! hold would cost more than an uncontended lock cycle. A long hold that makes anyone wait in
//! this process is reported anyway, by the waiter, as a slow wait naming the holder's site.
//! For file locks held by another process the holder's site is unknown here.
//!
//! The profile is not exported as metrics unless asked for ([`register_metrics`], or the
//! `telemetry` builder's `profile_metrics`): call sites as attributes multiply every lock's
//! series by its number of call sites (up to 17), and line numbers change with every release,
//! so dashboards and alerts keyed on them break on each deploy. When asked for, three
//! counters carry the totals per site: `lock.site.waited`, `lock.site.caused`,
//! `lock.site.held` (seconds, with `lock.name`, `lock.kind`, `code.file.path`,
//! `code.line.number`), bounded by the profile's own limits.
//!
//! ```
//! let m = lockmeter::sync::Mutex::named("profiled", 0u32);
//! *m.lock().unwrap() += 1;
//! for lock in lockmeter::profile::snapshot() {
//!     println!("{lock}");
//! }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::panic::Location;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::kind::LockMode;

/// Default slow-wait threshold: an acquire that waited this long emits `lock.slow_wait`.
pub const DEFAULT_SLOW_WAIT: Duration = Duration::from_millis(10);
/// Default slow-hold threshold: a timed hold this long emits `lock.slow_hold`.
pub const DEFAULT_SLOW_HOLD: Duration = Duration::from_millis(100);
/// Lock names profiled per process; further names are not profiled (their events still fire).
pub const MAX_PROFILED_LOCKS: usize = 256;
/// Default number of call sites kept per lock.
pub const DEFAULT_SITES_PER_LOCK: usize = 16;

/// A call site: where an acquire call was written.
pub type Site = &'static Location<'static>;

/// Process-wide defaults, read once from the environment.
struct Defaults {
    slow_wait: Duration,
    slow_hold: Duration,
    sites: usize,
}

static DEFAULTS: LazyLock<Defaults> = LazyLock::new(|| {
    let ms = |var: &str, default: Duration| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map_or(default, |v| Duration::from_secs_f64(v / 1000.0))
    };
    Defaults {
        slow_wait: ms("LOCKMETER_SLOW_WAIT_MS", DEFAULT_SLOW_WAIT),
        slow_hold: ms("LOCKMETER_SLOW_HOLD_MS", DEFAULT_SLOW_HOLD),
        sites: std::env::var("LOCKMETER_PROFILE_SITES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n: &usize| *n > 0)
            .unwrap_or(DEFAULT_SITES_PER_LOCK),
    }
});

/// The process-wide slow-wait threshold (`LOCKMETER_SLOW_WAIT_MS`, default 10 ms).
pub fn default_slow_wait() -> Duration {
    DEFAULTS.slow_wait
}

/// The process-wide slow-hold threshold (`LOCKMETER_SLOW_HOLD_MS`, default 100 ms).
pub fn default_slow_hold() -> Duration {
    DEFAULTS.slow_hold
}

/// Call sites kept per lock (`LOCKMETER_PROFILE_SITES`, default 16).
pub fn sites_per_lock() -> usize {
    DEFAULTS.sites
}

/// A lock's thresholds, in seconds (compared on cold paths only).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Thresholds {
    pub(crate) wait: f64,
    pub(crate) hold: f64,
}

impl Thresholds {
    pub(crate) fn new(wait: Option<Duration>, hold: Option<Duration>) -> Thresholds {
        Thresholds {
            wait: wait.unwrap_or_else(default_slow_wait).as_secs_f64(),
            hold: hold.unwrap_or_else(default_slow_hold).as_secs_f64(),
        }
    }
}

/// Count, total and maximum of one kind of time at one site.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Times {
    /// How many.
    pub count: u64,
    /// Their sum, seconds.
    pub total_seconds: f64,
    /// The longest, seconds.
    pub max_seconds: f64,
}

impl Times {
    /// Adds a time that stands for `weight` of them (a sampled wait stands for the waits it was
    /// sampled from).
    fn add(&mut self, secs: f64, weight: u64) {
        self.count += weight;
        self.total_seconds += secs * weight as f64;
        self.max_seconds = self.max_seconds.max(secs);
    }

    fn merge(&mut self, o: &Times) {
        self.count += o.count;
        self.total_seconds += o.total_seconds;
        self.max_seconds = self.max_seconds.max(o.max_seconds);
    }
}

/// What one call site did to one lock.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SiteProfile {
    /// Source file of the acquire call (`None`: the folded `(other sites)` row).
    pub file: Option<&'static str>,
    /// Its line.
    pub line: u32,
    /// Its column.
    pub column: u32,
    /// Waits of acquires made here that found the lock taken (the block profile).
    pub waited: Times,
    /// Waits of others ended by the release of a hold acquired here (the mutex profile: the
    /// contention this site caused). In-process holders only.
    pub caused: Times,
    /// Timed holds of acquisitions made here.
    pub held: Times,
}

impl SiteProfile {
    fn weight(&self) -> f64 {
        self.waited.total_seconds + self.caused.total_seconds + self.held.total_seconds
    }

    fn merge(&mut self, o: &SiteProfile) {
        self.waited.merge(&o.waited);
        self.caused.merge(&o.caused);
        self.held.merge(&o.held);
    }

    /// `file:line:column`, or `(other sites)`.
    pub fn location(&self) -> String {
        match self.file {
            Some(f) => format!("{f}:{}:{}", self.line, self.column),
            None => "(other sites)".to_owned(),
        }
    }
}

/// The profile of one lock name.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LockProfile {
    /// `lock.name`.
    pub name: String,
    /// `lock.kind`.
    pub kind: String,
    /// Sites, heaviest first (waited + caused + held seconds); the folded row last, if any.
    pub sites: Vec<SiteProfile>,
}

impl fmt::Display for LockProfile {
    /// A small table: one row per site.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({})", self.name, self.kind)?;
        writeln!(
            f,
            "  {:<44} {:>20} {:>20} {:>20}",
            "call site", "waited n/total/max", "caused n/total/max", "held n/total/max"
        )?;
        let t = |t: &Times| {
            format!(
                "{}/{}/{}",
                t.count,
                fmt_secs(t.total_seconds),
                fmt_secs(t.max_seconds)
            )
        };
        for s in &self.sites {
            let mut loc = s.location();
            if loc.len() > 44 {
                loc = format!("…{}", &loc[loc.len() - 43..]);
            }
            writeln!(
                f,
                "  {loc:<44} {:>20} {:>20} {:>20}",
                t(&s.waited),
                t(&s.caused),
                t(&s.held)
            )?;
        }
        Ok(())
    }
}

/// Seconds, short: `850µs`, `12.3ms`, `1.25s`.
fn fmt_secs(s: f64) -> String {
    if s == 0.0 {
        "0".to_owned()
    } else if s < 1e-3 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

/// The live table of one lock name: bounded to `sites_per_lock()` rows plus a folded row.
pub(crate) struct Table {
    name: String,
    kind: String,
    rows: Mutex<Rows>,
}

#[derive(Default)]
struct Rows {
    sites: Vec<(Site, SiteProfile)>,
    other: SiteProfile,
}

impl Rows {
    fn add(&mut self, site: Site, event: Event, weight: u64) {
        let apply = |p: &mut SiteProfile| match event {
            Event::Waited(s) => p.waited.add(s, weight),
            Event::Caused(s) => p.caused.add(s, weight),
            Event::Held(s) => p.held.add(s, weight),
        };
        if let Some((_, p)) = self.sites.iter_mut().find(|(s, _)| std::ptr::eq(*s, site)) {
            apply(p);
            return;
        }
        let mut fresh = SiteProfile {
            file: Some(site.file()),
            line: site.line(),
            column: site.column(),
            ..SiteProfile::default()
        };
        apply(&mut fresh);
        if self.sites.len() < sites_per_lock() {
            self.sites.push((site, fresh));
            return;
        }
        let lightest = self
            .sites
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.weight().total_cmp(&b.1 .1.weight()))
            .map(|(i, (_, p))| (i, p.weight()));
        match lightest {
            Some((i, w)) if fresh.weight() > w => {
                let (_, out) = std::mem::replace(&mut self.sites[i], (site, fresh));
                self.other.merge(&out);
            }
            _ => self.other.merge(&fresh),
        }
    }
}

/// What to add to a row.
#[derive(Clone, Copy)]
pub(crate) enum Event {
    Waited(f64),
    Caused(f64),
    Held(f64),
}

impl Table {
    /// Adds `event` to `site`'s row. When the table is full, a new site takes the place of the
    /// lightest row if it weighs more than that row; otherwise it goes into the folded row.
    pub(crate) fn add(&self, site: Site, event: Event) {
        let mut rows = self.rows.lock();
        rows.add(site, event, 1);
    }

    /// A wait of `secs` at `site`, caused by a hold acquired at `holder`, standing for
    /// `weight` waits: both rows under one take of the table's lock.
    pub(crate) fn add_wait(&self, site: Site, holder: Option<Site>, secs: f64, weight: u64) {
        let mut rows = self.rows.lock();
        rows.add(site, Event::Waited(secs), weight);
        if let Some(h) = holder {
            rows.add(h, Event::Caused(secs), weight);
        }
    }

    fn snapshot(&self) -> LockProfile {
        let rows = self.rows.lock();
        let mut sites: Vec<SiteProfile> = rows.sites.iter().map(|(_, p)| p.clone()).collect();
        sites.sort_by(|a, b| b.weight().total_cmp(&a.weight()));
        if rows.other != SiteProfile::default() {
            sites.push(rows.other.clone());
        }
        LockProfile {
            name: self.name.clone(),
            kind: self.kind.clone(),
            sites,
        }
    }
}

/// Profile tables by (kind, name).
type Tables = HashMap<(String, String), Arc<Table>>;

/// Every profiled lock name.
static TABLES: Mutex<Option<Tables>> = Mutex::new(None);

/// The table of lock `name` of `kind`, created on first use; `None` past
/// [`MAX_PROFILED_LOCKS`] names.
pub(crate) fn table(name: &str, kind: &str) -> Option<Arc<Table>> {
    let mut t = TABLES.lock();
    let map = t.get_or_insert_with(HashMap::new);
    let key = (kind.to_owned(), name.to_owned());
    if let Some(tab) = map.get(&key) {
        return Some(Arc::clone(tab));
    }
    if map.len() >= MAX_PROFILED_LOCKS {
        return None;
    }
    let tab = Arc::new(Table {
        name: name.to_owned(),
        kind: kind.to_owned(),
        rows: Mutex::new(Rows::default()),
    });
    map.insert(key, Arc::clone(&tab));
    Some(tab)
}

/// The profile of every lock that recorded any, heaviest lock first.
pub fn snapshot() -> Vec<LockProfile> {
    // Timed holds a thread has not recorded yet feed the profile too.
    crate::metrics::record_pending_everywhere();
    let tables: Vec<Arc<Table>> = TABLES
        .lock()
        .as_ref()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let mut out: Vec<LockProfile> = tables.iter().map(|t| t.snapshot()).collect();
    out.retain(|p| !p.sites.is_empty());
    let weight = |p: &LockProfile| p.sites.iter().map(SiteProfile::weight).sum::<f64>();
    out.sort_by(|a, b| weight(b).total_cmp(&weight(a)));
    out
}

/// Exports the profile's totals as three observable counters on `meter`, read whenever the
/// SDK collects: `lock.site.waited`, `lock.site.caused` and `lock.site.held` (seconds), with
/// `lock.name`, `lock.kind`, `code.file.path` and `code.line.number` (the folded row has no
/// code attributes). Call it once per meter provider. Off by default: see the module docs.
pub fn register_metrics(meter: &opentelemetry::metrics::Meter) {
    use opentelemetry::KeyValue;
    type Pick = fn(&SiteProfile) -> f64;
    let counters: [(&'static str, &'static str, Pick); 3] = [
        (
            "lock.site.waited",
            "Time spent waiting for a lock, by the call site that waited.",
            |s| s.waited.total_seconds,
        ),
        (
            "lock.site.caused",
            "Time others waited for a lock, by the call site that acquired the hold they waited for.",
            |s| s.caused.total_seconds,
        ),
        (
            "lock.site.held",
            "Time a lock was held (timed holds), by the call site that acquired it.",
            |s| s.held.total_seconds,
        ),
    ];
    for (name, description, pick) in counters {
        meter
            .f64_observable_counter(name)
            .with_unit("s")
            .with_description(description)
            .with_callback(move |obs| {
                for lock in snapshot() {
                    for site in &lock.sites {
                        let v = pick(site);
                        if v <= 0.0 {
                            continue;
                        }
                        let mut attrs = vec![
                            KeyValue::new(crate::metrics::keys::LOCK_NAME, lock.name.clone()),
                            KeyValue::new(crate::metrics::keys::LOCK_KIND, lock.kind.clone()),
                        ];
                        if let Some(file) = site.file {
                            attrs.push(KeyValue::new("code.file.path", file));
                            attrs.push(KeyValue::new("code.line.number", i64::from(site.line)));
                        }
                        obs.observe(v, &attrs);
                    }
                }
            })
            .build();
    }
}

/// A lock's profile table, found on first use (off the fast path).
#[derive(Default)]
pub(crate) struct ProfileSlot(OnceLock<Option<Arc<Table>>>);

impl ProfileSlot {
    pub(crate) fn get(&self, name: &str, kind: &str) -> Option<&Table> {
        self.0.get_or_init(|| table(name, kind)).as_deref()
    }
}

/// What a slow-lock event says about the lock.
pub(crate) struct EventAttrs<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) mode: LockMode,
    pub(crate) fs_type: Option<&'a str>,
}

/// Emits `lock.slow_wait`.
#[cold]
pub(crate) fn slow_wait(a: &EventAttrs<'_>, site: Site, holder: Option<Site>, secs: f64) {
    let thread = std::thread::current();
    tracing::event!(
        name: "lock.slow_wait",
        target: "lockmeter",
        tracing::Level::INFO,
        lock.name = a.name,
        lock.kind = a.kind,
        lock.mode = a.mode.as_str(),
        fs.type = a.fs_type,
        lock.wait.duration = secs,
        code.file.path = site.file(),
        code.line.number = site.line(),
        code.column.number = site.column(),
        thread.name = thread.name(),
        lock.holder.code.file.path = holder.map(|h| h.file()),
        lock.holder.code.line.number = holder.map(|h| h.line()),
        "slow lock wait: {} waited {} at {}:{}{}",
        a.name,
        fmt_secs(secs),
        site.file(),
        site.line(),
        match holder {
            Some(h) => format!(" (held by {}:{})", h.file(), h.line()),
            None => String::new(),
        },
    );
}

/// Emits `lock.slow_hold`.
#[cold]
pub(crate) fn slow_hold(a: &EventAttrs<'_>, site: Site, secs: f64) {
    let thread = std::thread::current();
    tracing::event!(
        name: "lock.slow_hold",
        target: "lockmeter",
        tracing::Level::INFO,
        lock.name = a.name,
        lock.kind = a.kind,
        lock.mode = a.mode.as_str(),
        fs.type = a.fs_type,
        lock.hold.duration = secs,
        code.file.path = site.file(),
        code.line.number = site.line(),
        code.column.number = site.column(),
        thread.name = thread.name(),
        "slow lock hold: {} held {} from {}:{}",
        a.name,
        fmt_secs(secs),
        site.file(),
        site.line(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn here() -> Site {
        Location::caller()
    }

    fn table() -> Table {
        Table {
            name: "t".into(),
            kind: "mutex".into(),
            rows: Mutex::new(Rows::default()),
        }
    }

    #[test]
    fn a_site_adds_up_its_waits_holds_and_caused_waits() {
        let t = table();
        let site = here();
        t.add(site, Event::Waited(1.0));
        t.add(site, Event::Waited(3.0));
        t.add(site, Event::Held(0.5));
        t.add(site, Event::Caused(2.0));
        let p = t.snapshot();
        assert_eq!(p.sites.len(), 1);
        let r = &p.sites[0];
        assert_eq!(
            (r.waited.count, r.waited.total_seconds, r.waited.max_seconds),
            (2, 4.0, 3.0)
        );
        assert_eq!((r.held.count, r.caused.count), (1, 1));
        assert_eq!(r.line, site.line());
    }

    #[test]
    fn a_full_table_keeps_the_heaviest_sites_and_folds_the_rest() {
        let t = table();
        #[rustfmt::skip]
        let sites = [here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here(), here()];
        assert!(sites.len() > sites_per_lock());
        for (i, s) in sites.iter().enumerate() {
            t.add(s, Event::Held(1.0 + i as f64));
        }
        let p = t.snapshot();
        assert_eq!(
            p.sites.len(),
            sites_per_lock() + 1,
            "bounded, plus the folded row"
        );
        let folded = p.sites.last().expect("folded row");
        assert_eq!(folded.file, None);
        assert_eq!(folded.held.count as usize, sites.len() - sites_per_lock());
        // The heaviest site (the last one, 20 s) is kept, first.
        assert_eq!(p.sites[0].column, sites[sites.len() - 1].column());
        let total: f64 = p.sites.iter().map(|s| s.held.total_seconds).sum();
        assert_eq!(
            total,
            (1..=sites.len()).sum::<usize>() as f64,
            "nothing lost"
        );
    }
}
