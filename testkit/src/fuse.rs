//! FUSE mounts for lock-coherence tests: two bindfs mounts of one directory, which are two lock
//! domains (the seed's split brain on one machine) unless bindfs forwards locks.

use std::path::PathBuf;
use std::process::Command;

use crate::tools::{self, require_tools};

/// The tools a [`Bindfs`] needs: `bindfs` to mount, `fusermount3` (fuse3) to unmount.
pub const BINDFS_TOOLS: [&str; 2] = ["bindfs", "fusermount3"];

/// Two bindfs (FUSE) mounts `a` and `b` of one directory `src`, unmounted on drop. Plain mounts
/// are two lock domains; `--multithreaded --enable-lock-forwarding` makes them one.
pub struct Bindfs {
    /// Holds `src`, `a` and `b`.
    pub dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Bindfs {
    /// Mounts `src` twice with `extra` bindfs options. `None` when bindfs or fusermount3 is
    /// missing and the run allows that (the caller returns: the skip is recorded); a missing
    /// tool otherwise fails the test (see [`tools::require_tool`]).
    pub fn new(extra: &[&str]) -> Option<Bindfs> {
        if !require_tools(&BINDFS_TOOLS) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // Built up mount by mount, so a failed second mount still unmounts the first.
        let mut bf = Bindfs {
            dir,
            mounts: Vec::new(),
        };
        for name in ["a", "b"] {
            let mp = bf.dir.path().join(name);
            std::fs::create_dir(&mp).unwrap();
            let out = tools::command("bindfs")
                .args(extra)
                .arg(&src)
                .arg(&mp)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "bindfs {extra:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            bf.mounts.push(mp);
        }
        Some(bf)
    }

    /// The first mount.
    pub fn a(&self) -> PathBuf {
        self.mounts[0].clone()
    }

    /// The second mount.
    pub fn b(&self) -> PathBuf {
        self.mounts[1].clone()
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        for m in &self.mounts {
            let st =
                tools::locate("fusermount3").map(|f| Command::new(f).arg("-u").arg(m).status());
            if !matches!(st, Some(Ok(s)) if s.success()) {
                eprintln!("warning: could not unmount {} ({st:?})", m.display());
            }
        }
    }
}
