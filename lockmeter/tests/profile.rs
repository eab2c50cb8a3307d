//! Which code holds a lock and which code waits: the lock profile and slow-lock events name the
//! right file and line for each call site.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex as StdMutex};
use std::time::Duration;

use lockmeter::profile::{self, LockProfile, SiteProfile};
use lockmeter::FileLock;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt as _;

/// An event's name and its fields as strings.
type Recorded = (String, BTreeMap<String, String>);

/// Every `lockmeter` event.
#[derive(Clone, Default)]
struct Events(Arc<StdMutex<Vec<Recorded>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_owned(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_owned(), v.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if e.metadata().target() == "lockmeter" {
            let mut f = Fields(BTreeMap::new());
            e.record(&mut f);
            self.0
                .lock()
                .unwrap()
                .push((e.metadata().name().to_owned(), f.0));
        }
    }
}

impl Events {
    fn dispatch(&self) -> tracing::Dispatch {
        tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()))
    }

    fn named(&self, name: &str, lock: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, f)| n == name && f.get("lock.name").map(String::as_str) == Some(lock))
            .map(|(_, f)| f.clone())
            .collect()
    }
}

fn profile_of(name: &str) -> LockProfile {
    profile::snapshot()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no profile for {name}"))
}

fn row(p: &LockProfile, line: u32) -> &SiteProfile {
    p.sites
        .iter()
        .find(|s| s.line == line && s.file == Some(file!()))
        .unwrap_or_else(|| panic!("no row for {}:{line} in {p}", file!()))
}

const LONG: Duration = Duration::from_millis(60);

#[test]
fn two_call_sites_of_a_mutex_are_told_apart() {
    let events = Events::default();
    let d = events.dispatch();
    let m = Arc::new(
        lockmeter::sync::Mutex::builder("profiled-mutex")
            .sample_every(1)
            .slow_wait(Duration::from_millis(20))
            .slow_hold(Duration::from_millis(30))
            .build(0u32),
    );
    let go = Arc::new(Barrier::new(2));
    // Site A holds long while site C waits; site B holds briefly.
    let (m2, go2, d2) = (Arc::clone(&m), Arc::clone(&go), d.clone());
    let holder = std::thread::Builder::new()
        .name("holder".into())
        .spawn(move || {
            tracing::dispatcher::with_default(&d2, || {
                let line_a = line!() + 1;
                let g = m2.lock().unwrap();
                go2.wait();
                std::thread::sleep(LONG); // the hold being measured, not synchronisation
                drop(g);
                line_a
            })
        })
        .unwrap();
    let (line_b, line_c) = tracing::dispatcher::with_default(&d, || {
        go.wait();
        let line_c = line!() + 1;
        let g = m.lock().unwrap(); // waits for A's release
        drop(g);
        let line_b = line!() + 1;
        let g = m.lock().unwrap();
        drop(g);
        (line_b, line_c)
    });
    let line_a = holder.join().unwrap();

    let p = profile_of("profiled-mutex");
    let a = row(&p, line_a);
    assert_eq!(a.held.count, 1, "{p}");
    assert!(a.held.max_seconds >= LONG.as_secs_f64(), "{p}");
    assert_eq!(a.caused.count, 1, "A's release ended C's wait: {p}");
    let b = row(&p, line_b);
    assert!(b.held.max_seconds < LONG.as_secs_f64(), "{p}");
    let c = row(&p, line_c);
    assert_eq!(c.waited.count, 1, "{p}");
    assert!(c.waited.max_seconds > 0.02, "{p}");
    assert_eq!(c.held.count, 1);

    let holds = events.named("lock.slow_hold", "profiled-mutex");
    assert_eq!(holds.len(), 1, "only A's hold was slow: {holds:?}");
    assert_eq!(holds[0]["code.line.number"], line_a.to_string());
    assert_eq!(holds[0]["code.file.path"], file!());
    assert_eq!(holds[0]["lock.kind"], "mutex");
    assert_eq!(holds[0]["thread.name"], "holder");
    let waits = events.named("lock.slow_wait", "profiled-mutex");
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(waits[0]["code.line.number"], line_c.to_string());
    assert_eq!(
        waits[0]["lock.holder.code.line.number"],
        line_a.to_string(),
        "the waiter names the holder's site"
    );
}

#[test]
fn two_call_sites_of_a_file_lock_are_told_apart() {
    let events = Events::default();
    let d = events.dispatch();
    let dir = tempfile::tempdir().unwrap();
    let lock = Arc::new(
        FileLock::builder(dir.path().join("profiled.lock"))
            .name("profiled-file")
            .sample_every(1)
            .slow_wait(Duration::from_millis(20))
            .slow_hold(Duration::from_millis(30))
            .open()
            .unwrap(),
    );
    let go = Arc::new(Barrier::new(2));
    let (l2, go2, d2) = (Arc::clone(&lock), Arc::clone(&go), d.clone());
    let holder = std::thread::Builder::new()
        .name("holder".into())
        .spawn(move || {
            tracing::dispatcher::with_default(&d2, || {
                let line_a = line!() + 1;
                let g = l2.lock().unwrap();
                go2.wait();
                std::thread::sleep(LONG); // the hold being measured, not synchronisation
                drop(g);
                line_a
            })
        })
        .unwrap();
    let (line_b, line_c) = tracing::dispatcher::with_default(&d, || {
        go.wait();
        let line_c = line!() + 1;
        let g = lock.lock().unwrap();
        drop(g);
        let line_b = line!() + 1;
        let g = lock.try_lock().unwrap().unwrap();
        drop(g);
        (line_b, line_c)
    });
    let line_a = holder.join().unwrap();

    let p = profile_of("profiled-file");
    assert_eq!(p.kind, "flock");
    let a = row(&p, line_a);
    assert!(a.held.max_seconds >= LONG.as_secs_f64(), "{p}");
    assert_eq!(a.caused.count, 1, "{p}");
    assert!(row(&p, line_b).held.max_seconds < LONG.as_secs_f64(), "{p}");
    assert_eq!(row(&p, line_c).waited.count, 1, "{p}");

    let holds = events.named("lock.slow_hold", "profiled-file");
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0]["code.line.number"], line_a.to_string());
    assert!(holds[0].contains_key("fs.type"));
    let waits = events.named("lock.slow_wait", "profiled-file");
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(waits[0]["code.line.number"], line_c.to_string());
    assert_eq!(waits[0]["lock.holder.code.line.number"], line_a.to_string());
}

#[test]
fn lock_meter_names_its_call_sites_too() {
    let meter = lockmeter::LockMeter::new("profiled-meter", "parking_lot_mutex");
    let inner = parking_lot::Mutex::new(());
    let line = line!() + 1;
    let g = meter.lock(
        lockmeter::LockMode::Exclusive,
        || inner.try_lock(),
        || inner.lock(),
    );
    drop(g);
    let p = profile_of("profiled-meter");
    assert_eq!(row(&p, line).held.count, 1, "{p}");
}

#[test]
fn the_profile_is_exported_as_metrics_only_when_asked() {
    let rec = lockmeter_testkit::Recorder::new();
    let m = lockmeter::sync::Mutex::builder("profiled-metrics")
        .sample_every(1)
        .build(());
    let line = line!() + 1;
    drop(m.lock().unwrap());
    assert_eq!(
        rec.snapshot().counter("lock.site.held", &[]),
        0,
        "nothing registered yet"
    );
    profile::register_metrics(&rec.meter());
    let s = rec.snapshot();
    let sets = s.attribute_sets("lock.site.held");
    assert!(
        sets.iter()
            .any(|a| a.contains(&"lock.name=profiled-metrics".to_owned())
                && a.contains(&format!("code.line.number={line}"))
                && a.contains(&format!("code.file.path={}", file!()))),
        "{sets:?}"
    );
}
