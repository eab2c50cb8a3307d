//! Migration watch during hold: inotify within 100 ms, polling within one interval (changes
//! made behind a FUSE mount, invisible to inotify), at release, counted once, and no false
//! positives.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use lockmeter::metrics::Sink;
use lockmeter::{FileLock, FsPolicy};
use lockmeter_testkit::{Bindfs, Recorder};

const LONG: Duration = Duration::from_secs(3600);

fn replace(path: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, b"").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn hold_migrations(rec: &Recorder, kind: &str, at: &str) -> u64 {
    rec.snapshot().counter(
        "lock.inode.migrations",
        &[("migration.kind", kind), ("migration.detected_at", at)],
    )
}

#[test]
fn inotify_sees_replace_unlink_and_rename_within_100ms_counted_once() {
    for (what, kind) in [
        ("replace", "replaced"),
        ("unlink", "unlinked"),
        ("rename", "unlinked"),
    ] {
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.lock");
        // A one-hour polling interval: only inotify can notice within the deadline.
        let lock = FileLock::builder(&path)
            .watch(LONG)
            .sink(sink.clone())
            .open()
            .unwrap();
        let g = lock.lock().unwrap();
        assert!(g.is_valid());
        assert!(
            !g.wait_invalidated(Duration::from_millis(20)),
            "{what}: nothing happened yet"
        );
        match what {
            "replace" => replace(&path),
            "unlink" => std::fs::remove_file(&path).unwrap(),
            _ => std::fs::rename(&path, dir.path().join("moved.lock")).unwrap(),
        }
        assert!(
            g.wait_invalidated(Duration::from_millis(100)),
            "{what}: not seen within 100 ms"
        );
        assert!(!g.is_valid());
        assert_eq!(hold_migrations(&rec, kind, "hold"), 1, "{what}");
        drop(g);
        // Not counted again at release.
        assert_eq!(
            rec.snapshot().counter("lock.inode.migrations", &[]),
            1,
            "{what}"
        );
    }
}

/// FUSE mounts without lookup/attribute caching: what the daemon reports is what `lstat` sees,
/// so these tests measure lockmeter's polling, not libfuse's 1 s entry cache (documented on
/// `FileLockBuilder::watch`).
fn uncached_bindfs() -> Option<Bindfs> {
    Bindfs::new(&["-o", "entry_timeout=0,attr_timeout=0,negative_timeout=0"])
}

#[test]
fn polling_sees_changes_inotify_cannot_within_one_interval() {
    let Some(bf) = uncached_bindfs() else { return };
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let interval = Duration::from_millis(200);
    let path = bf.a().join("polled.lock");
    let lock = FileLock::builder(&path)
        .watch(interval)
        .fs_policy(FsPolicy::Allow)
        .sink(sink.clone())
        .open()
        .unwrap();
    let g = lock.lock().unwrap();
    // Replace it in the backing directory: no inotify event reaches the FUSE mount.
    replace(&bf.dir.path().join("src/polled.lock"));
    let slack = Duration::from_millis(150);
    assert!(
        g.wait_invalidated(interval + slack),
        "not seen within one interval"
    );
    assert_eq!(hold_migrations(&rec, "replaced", "hold"), 1);
}

#[test]
fn a_change_nobody_saw_during_hold_is_caught_at_release() {
    let Some(bf) = uncached_bindfs() else { return };
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let path = bf.a().join("late.lock");
    let lock = FileLock::builder(&path)
        .watch(LONG)
        .fs_policy(FsPolicy::Allow)
        .sink(sink.clone())
        .open()
        .unwrap();
    let g = lock.lock().unwrap();
    std::fs::remove_file(bf.dir.path().join("src/late.lock")).unwrap();
    drop(g);
    assert_eq!(hold_migrations(&rec, "unlinked", "release"), 1);
    assert_eq!(rec.snapshot().counter("lock.inode.migrations", &[]), 1);
}

#[test]
fn ten_thousand_watched_acquisitions_without_replacement_report_nothing() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let lock = FileLock::builder(dir.path().join("quiet.lock"))
        .watch(Duration::from_millis(1))
        .owner_record(false)
        .sink(sink.clone())
        .open()
        .unwrap();
    // Neighbours in the same directory come and go: events for other names must not count.
    let neighbour = dir.path().join("neighbour");
    for i in 0..10_000 {
        let g = lock.lock().unwrap();
        if i % 100 == 0 {
            std::fs::write(&neighbour, b"x").unwrap();
            std::fs::remove_file(&neighbour).unwrap();
        }
        assert!(g.is_valid());
        drop(g);
    }
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &[]), 10_000);
    assert_eq!(s.counter("lock.inode.migrations", &[]), 0);
    assert_eq!(s.counter("lock.violations", &[]), 0);
    assert_eq!(s.counter("lock.errors", &[]), 0);
}

#[test]
fn the_watcher_catches_a_foreign_owner_record_during_hold() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned.lock");
    let lock = FileLock::builder(&path)
        .owner_record(true)
        .watch(Duration::from_millis(50))
        .sink(sink.clone())
        .open()
        .unwrap();
    let g = lock.lock().unwrap();
    // Rewrite the content in place (same inode): another holder's record.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        b"lockmeter-owner v1\nhost=other\nboot_id=b\npid=7\nstart_time=1\ntoken=00000000000000000000000000000001\nfence=9\nacquired_at=0\n",
        0,
    )
    .unwrap();
    f.set_len(120).unwrap();
    assert!(g.wait_invalidated(Duration::from_secs(2)));
    assert!(!g.is_valid());
    drop(g);
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.violations", &[]),
        1,
        "counted once, by watcher or release"
    );
    assert_eq!(s.counter("lock.inode.migrations", &[]), 0);
}

#[cfg(feature = "tokio")]
#[test]
fn async_holders_are_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("async.lock");
    let lock = FileLock::builder(&path).watch(LONG).open().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = lock.lock_async().await.unwrap();
        let work = async {
            std::future::pending::<()>().await; // a critical section that would run forever
        };
        let path2 = path.clone();
        tokio::spawn(async move { std::fs::remove_file(path2).unwrap() });
        tokio::select! {
            _ = work => unreachable!(),
            _ = g.invalidated() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("not told"),
        }
        assert!(!g.is_valid());
    });
}
