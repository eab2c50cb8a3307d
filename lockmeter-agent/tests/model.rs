//! The agent's models without a kernel: made-up snapshots and tracepoint events, recorded
//! through an in-memory SDK pipeline.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockmeter::metrics::LockMode;
use lockmeter_agent::labels::{LabelRules, OTHER};
use lockmeter_agent::metrics::AgentMetrics;
use lockmeter_agent::model::Tracker;
use lockmeter_agent::proclocks::{Dev, Kind, RawLock};
use lockmeter_agent::scan::{HostLock, Proc, Snapshot, Waiter};
use lockmeter_agent::tracepoints::{
    parse_event, parse_record, CallEvent, Event, Merge, NameEvent, Record, TraceModel,
    BATCH_HEADER_SIZE, EVENT_SIZE,
};
use lockmeter_testkit::Recorder;

const DEV: Dev = Dev {
    major: 0xfe,
    minor: 0,
};

fn lock(ino: u64, pid: u32, comm: &str, path: &str, waiters: &[(u32, &str, LockMode)]) -> HostLock {
    HostLock {
        raw: RawLock {
            ordinal: 1,
            blocked: false,
            kind: Kind::Flock,
            mode: LockMode::Exclusive,
            pid: Some(pid),
            dev: DEV,
            ino,
            start: 0,
            end: None,
        },
        holders: vec![Proc {
            pid,
            comm: comm.into(),
        }],
        waiters: waiters
            .iter()
            .map(|(p, c, m)| Waiter {
                proc: Some(Proc {
                    pid: *p,
                    comm: (*c).into(),
                }),
                mode: *m,
            })
            .collect(),
        path: Some(PathBuf::from(path)),
        deleted: false,
        fs: None,
        holder_age: None,
    }
}

fn snap(at: Instant, locks: Vec<HostLock>) -> Snapshot {
    Snapshot {
        taken: at,
        locks,
        orphan_waiters: 0,
        skipped_lines: 0,
    }
}

#[test]
fn sampled_holds_ages_waiters_and_top_n() {
    let rules = LabelRules::new(&["/var/lock/job-*=jobs".into()], &[], &[]).unwrap();
    let mut t = Tracker::new(rules, 2, "/proc").check_paths(false);
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    // Held from before the agent started: never recorded as a hold (start unknown).
    let up = t.update(&snap(t0, vec![lock(1, 10, "cron", "/var/lock/a", &[])]));
    assert!(up.ended.is_empty());
    // A hold appears at t0+1 (with a waiter that later holds it), seen until t0+3.
    let w = [
        (11, "flock", LockMode::Exclusive),
        (12, "flock", LockMode::Shared),
    ];
    for i in 1..=3 {
        let up = t.update(&snap(
            t0 + s * i,
            vec![
                lock(1, 10, "cron", "/var/lock/a", &[]),
                lock(2, 20, "flock", "/var/lock/b", &w),
            ],
        ));
        let waiters: i64 = up.gauges.waiters.iter().map(|(_, v)| v).sum();
        assert_eq!(waiters, 2);
        assert_eq!(
            up.gauges
                .waiters
                .iter()
                .filter(|(a, _)| a.mode == LockMode::Shared)
                .count(),
            1
        );
        let age = up
            .gauges
            .age
            .iter()
            .find(|(a, _)| &*a.name == "/var/lock/b")
            .unwrap()
            .1;
        assert_eq!(
            age,
            (i - 1) as f64,
            "age counted from the first sample that saw it"
        );
        // Also for a hold older than the agent: a lower bound, from the agent's first sample.
        let age_a = up
            .gauges
            .age
            .iter()
            .find(|(a, _)| &*a.name == "/var/lock/a")
            .unwrap()
            .1;
        assert_eq!(age_a, i as f64, "a pre-existing hold's age grows too");
    }
    // At t0+4 the holder is gone and waiter 11 holds it: the first hold ended (appeared in
    // (t0, t0+1], last seen t0+3, gone by t0+4: estimated 0.5 + 2 + 0.5 = 3 s), and the new
    // hold is contended (its holder was seen waiting).
    let up = t.update(&snap(
        t0 + s * 4,
        vec![
            lock(1, 10, "cron", "/var/lock/a", &[]),
            lock(2, 11, "flock", "/var/lock/b", &[]),
        ],
    ));
    assert_eq!(up.ended.len(), 1);
    assert!(
        (up.ended[0].seconds - 3.0).abs() < 1e-6,
        "{}",
        up.ended[0].seconds
    );
    assert!(!up.ended[0].contended);
    let up = t.update(&snap(t0 + s * 5, vec![]));
    assert_eq!(
        up.ended.len(),
        1,
        "the pre-existing hold on /var/lock/a is not recorded"
    );
    assert!(up.ended[0].contended);
    // --name-map folds, --top 2 bounds: three names, the two busiest keep theirs.
    let up = t.update(&snap(
        t0 + s * 6,
        vec![
            lock(3, 30, "a", "/var/lock/job-1", &[]),
            lock(4, 31, "a", "/var/lock/job-2", &[]),
            lock(5, 32, "a", "/x/busy", &[(33, "b", LockMode::Exclusive)]),
            lock(6, 34, "a", "/x/quiet", &[]),
        ],
    ));
    let names: Vec<_> = up.gauges.held.iter().map(|(a, v)| (&*a.name, *v)).collect();
    assert!(names.contains(&("jobs", 2)), "{names:?}");
    assert!(names.contains(&("/x/busy", 1)), "{names:?}");
    assert!(names.contains(&(OTHER, 1)), "{names:?}");
}

fn call(kind: Kind, ty: u8, owner: u64, start: u64, end: u64, ret: i32, flags: u8) -> Event {
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"flock");
    Event::Call(CallEvent {
        ts_start: start,
        ts_end: end,
        dev: DEV,
        ino: 7,
        owner,
        gen: 0,
        ret,
        kind,
        lock_type: ty,
        flags,
        comm,
    })
}

fn release(kind: Kind, owner: u64, at: u64) -> Event {
    match call(kind, 2, owner, at, at, 0, 0) {
        Event::Call(c) => Event::Release(c),
        e => e,
    }
}

/// A tracepoint model recording into `rec` that knows inode 7 as `/tmp/x.lock`.
fn model_with_x_lock(rec: &Recorder) -> TraceModel {
    let metrics = Arc::new(AgentMetrics::new(&rec.meter()));
    let mut m = TraceModel::new(metrics, LabelRules::default(), 100, "/proc");
    m.apply(&Event::Name(NameEvent {
        dev: DEV,
        ino: 7,
        components: vec!["x.lock".into(), "tmp".into()],
        truncated: false,
        gen: 0,
        tgid: u32::MAX,
    }));
    m
}

#[test]
fn tracepoint_events_become_exact_waits_holds_and_conflicts() {
    let rec = Recorder::new();
    let mut m = model_with_x_lock(&rec);
    let ms = 1_000_000;
    // Two uncontended cycles by owner A; a would-block attempt by B; B waits 5 ms and gets it.
    m.apply(&call(Kind::Flock, 1, 0xA, 0, 1000, 0, 0));
    m.apply(&call(Kind::Flock, 1, 0xA, 2000, 2000, 0, 0)); // locked again: same hold
    m.apply(&call(Kind::Flock, 1, 0xB, 3000, 3500, -libc::EAGAIN, 0));
    m.apply(&release(Kind::Flock, 0xA, 2 * ms));
    m.apply(&call(Kind::Flock, 1, 0xB, ms, 6 * ms, 0, 1));
    m.apply(&release(Kind::Flock, 0xB, 10 * ms));
    m.apply(&release(Kind::Flock, 0xC, 11 * ms)); // never seen acquiring
    m.apply(&call(Kind::Posix, 1, 0xD, 0, 10, -libc::EDEADLK, 0));
    let s = rec.snapshot();
    let name = ("lock.name", "/tmp/x.lock");
    assert_eq!(
        s.hist_count("lock.wait.duration", &[name, ("lock.outcome", "acquired")]),
        3
    );
    assert_eq!(
        s.hist_count(
            "lock.wait.duration",
            &[name, ("lock.outcome", "would_block")]
        ),
        1
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[name, ("lock.outcome", "error")]),
        1
    );
    assert_eq!(s.hist_count("lock.duration", &[name]), 2);
    assert_eq!(
        s.hist_count("lock.duration", &[name, ("lock.contended", "true")]),
        1
    );
    assert_eq!(s.counter("lock.conflicts", &[name]), 2);
    assert_eq!(
        s.counter("lock.acquisitions", &[name, ("lock.contended", "true")]),
        1
    );
    assert_eq!(
        s.counter(
            "lock.errors",
            &[name, ("error.type", "EDEADLK"), ("lock.kind", "posix")]
        ),
        1
    );
    assert_eq!(
        s.hist_bounds("lock.duration"),
        lockmeter::metrics::DEFAULT_BOUNDARIES
    );
    let st = m.stats();
    assert_eq!((st.holds, st.unmatched_releases), (2, 1));
}

/// A batch record as the kernel sends it: header, then the events.
fn batch(cpu: u32, gen: u64, events: &[Event]) -> Vec<u8> {
    let mut b = vec![0u8; BATCH_HEADER_SIZE];
    b[0..8].copy_from_slice(&gen.to_ne_bytes());
    b[32..36].copy_from_slice(&cpu.to_ne_bytes());
    b[36..40].copy_from_slice(&(events.len() as u32).to_ne_bytes());
    b[44] = 4;
    for e in events {
        match e {
            Event::Call(c) => b.extend(c.encode(false)),
            Event::Release(c) => b.extend(c.encode(true)),
            Event::Name(_) => unreachable!(),
        }
    }
    b
}

/// The kernel stages events per CPU: a thread that locked on CPU 0 and unlocked on CPU 1 can
/// have its release arrive first. The merge applies them in time order, once each.
#[test]
fn batches_from_several_cpus_are_merged_in_time_order_once() {
    let rec = Recorder::new();
    let mut m = model_with_x_lock(&rec);
    let ms = 1_000_000;
    let mut merge = Merge::new();
    let cpu1 = batch(1, 1, &[release(Kind::Flock, 0xA, 5 * ms)]);
    let cpu0 = batch(0, 1, &[call(Kind::Flock, 1, 0xA, ms, ms, 0, 0)]);
    assert!(matches!(
        parse_record(&cpu0),
        Some(Record::Batch { cpu: 0, gen: 1, .. })
    ));
    merge.record(&cpu1, &mut m);
    merge.record(&cpu0, &mut m);
    merge.record(&cpu0, &mut m); // the same batch again (read from the stage, then the ring)
    let later = batch(1, 2, &[call(Kind::Flock, 1, 0xB, 20 * ms, 20 * ms, 0, 0)]);
    merge.record(&later, &mut m);
    merge.settle(10 * ms, &mut m);
    assert_eq!(merge.held(), 1, "the event after the horizon waits");
    let st = m.stats();
    assert_eq!((st.calls, st.holds, st.unmatched_releases), (1, 1, 0));
    merge.finish(&mut m);
    assert_eq!(m.stats().calls, 2);
    assert_eq!(merge.late(), 0);
    let s = rec.snapshot();
    let name = ("lock.name", "/tmp/x.lock");
    assert_eq!(s.counter("lock.acquisitions", &[name]), 2);
    assert_eq!(s.hist_count("lock.duration", &[name]), 1);
    // A truncated batch is not one.
    assert_eq!(parse_record(&cpu1[..cpu1.len() - 1]), None);
}

#[test]
fn malformed_ring_buffer_records_are_ignored() {
    assert_eq!(parse_event(&[]), None);
    assert_eq!(parse_event(&[0u8; EVENT_SIZE - 1]), None);
    let mut b = [0u8; EVENT_SIZE];
    b[44] = 9; // unknown op
    assert_eq!(parse_event(&b), None);
    b[44] = 3; // a name event, too short
    assert_eq!(parse_event(&b), None);
    b[44] = 1;
    b[45] = 1;
    assert!(matches!(parse_event(&b), Some(Event::Call(_))));
}

/// A `/proc/locks` read that printed an entry twice (the list shifted between two reads),
/// through a made-up proc root: the repeat and its waiters are dropped; OFD lines (no pid)
/// that look alike are distinct locks and kept.
#[test]
fn scan_drops_a_repeated_entry_and_survives_a_bare_proc() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("locks"),
        "1: FLOCK  ADVISORY  WRITE 77 fe:00:5 0 EOF\n\
         1: -> FLOCK  ADVISORY  WRITE 78 fe:00:5 0 EOF\n\
         2: FLOCK  ADVISORY  WRITE 77 fe:00:5 0 EOF\n\
         2: -> FLOCK  ADVISORY  WRITE 78 fe:00:5 0 EOF\n\
         3: OFDLCK ADVISORY  READ  -1 fe:00:6 0 EOF\n\
         4: OFDLCK ADVISORY  READ  -1 fe:00:6 0 EOF\n\
         5: POSIX  ADVISORY  WRITE 79 fe:00:7 0 EOF\n\
         not a lock line\n",
    )
    .unwrap();
    let mut s = lockmeter_agent::scan::Scanner::new(root.path());
    let snap = s.scan().unwrap();
    assert_eq!(snap.skipped_lines, 1);
    let inodes: Vec<u64> = snap.locks.iter().map(|l| l.raw.ino).collect();
    assert_eq!(inodes, [5, 6, 6, 7]);
    assert_eq!(snap.locks[0].waiters.len(), 1);
    // Processes that do not exist leave holders, paths and file systems unknown.
    assert!(snap.locks[0].holders.is_empty() && snap.locks[0].path.is_none());
    let missing = lockmeter_agent::scan::Scanner::new(root.path().join("nope")).scan();
    let err = missing.unwrap_err().to_string();
    assert!(err.contains("nope/locks"), "{err}");
}

/// An inode number reused by a new file (the old one deleted) is a new lock file: the
/// generation tells them apart, so the new file gets its own name and rules.
#[test]
fn reused_inode_numbers_are_new_files() {
    let rec = Recorder::new();
    let metrics = Arc::new(AgentMetrics::new(&rec.meter()));
    let rules = LabelRules::new(&[], &["/keep/**".into()], &[]).unwrap();
    let mut m = TraceModel::new(metrics, rules, 100, "/nonexistent-proc");
    let name = |gen, dir: &str| {
        Event::Name(NameEvent {
            dev: DEV,
            ino: 7,
            gen,
            components: vec!["x.lock".into(), dir.into()],
            truncated: false,
            tgid: 1,
        })
    };
    let with_gen = |e: Event, gen| match e {
        Event::Call(mut c) => {
            c.gen = gen;
            Event::Call(c)
        }
        e => e,
    };
    m.apply(&name(1, "drop"));
    m.apply(&with_gen(call(Kind::Flock, 1, 0xA, 0, 10, 0, 0), 1));
    m.apply(&name(2, "keep"));
    m.apply(&with_gen(call(Kind::Flock, 1, 0xB, 0, 10, 0, 0), 2));
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.name", "/keep/x.lock")]),
        1
    );
    assert_eq!(
        s.counter("lock.acquisitions", &[]),
        1,
        "the excluded file's lock is not exported"
    );
}
