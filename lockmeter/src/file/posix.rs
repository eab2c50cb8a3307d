//! Process-wide state for POSIX (`F_SETLK`) locks.
//!
//! POSIX record locks belong to the *process*: two threads never exclude each other, and
//! closing *any* descriptor of the file drops every lock the process holds on it. lockmeter
//! keeps its exclusion promise for [`LockKind::Posix`](crate::LockKind::Posix) like this:
//!
//! - one [`PosixFile`] per inode per process, holding the only descriptor lockmeter uses for
//!   locking that inode, found through a registry keyed by (dev, ino);
//! - an in-process reader-writer gate in front of the kernel lock, so threads (and several
//!   `FileLock`s on one path) exclude each other as other processes do;
//! - shared holders in one process share one kernel read lock (taken by the first, released
//!   by the last);
//! - descriptors of a registered inode are never closed while any handle to it exists; extra
//!   descriptors opened meanwhile are parked and closed together with the registered one,
//!   under the registry lock, when the last handle goes.
//!
//! What lockmeter cannot prevent: *other* code in the process opening and closing the lock
//! file drops the process's POSIX locks on it. Use `Flock` or `Ofd` when that can happen.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use lock_api::RawRwLock as _;
use parking_lot::Mutex;

use crate::kind::LockMode;
use crate::sys::FileId;

pub(crate) struct PosixFile {
    fd: OwnedFd,
    pub(crate) id: FileId,
    /// In-process exclusion in front of the kernel lock.
    pub(crate) gate: parking_lot::RawRwLock,
    /// Shared holders in this process; the kernel read lock is held while it is non-zero.
    pub(crate) readers: Mutex<u32>,
    /// Descriptors of this inode opened while it was registered; never closed before `fd`.
    parked: Mutex<Vec<OwnedFd>>,
}

impl PosixFile {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Unlocks the in-process gate.
    ///
    /// # Safety
    /// The caller holds one lock of the gate in `mode`.
    pub(crate) unsafe fn unlock_gate(&self, mode: LockMode) {
        // SAFETY: per the caller's contract.
        unsafe {
            match mode {
                LockMode::Exclusive => self.gate.unlock_exclusive(),
                LockMode::Shared => self.gate.unlock_shared(),
            }
        }
    }
}

struct Entry {
    file: Arc<PosixFile>,
    users: usize,
}

fn registry() -> &'static Mutex<HashMap<FileId, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<FileId, Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A counted reference to a registered inode. The inode's descriptors close, under the
/// registry lock, when the last handle drops.
pub(crate) struct PosixHandle {
    file: ManuallyDrop<Arc<PosixFile>>,
}

impl PosixHandle {
    /// Registers a freshly opened descriptor, or parks it if the inode is already registered.
    pub(crate) fn register(fd: OwnedFd, id: FileId) -> PosixHandle {
        let mut reg = registry().lock();
        let file = match reg.get_mut(&id) {
            Some(entry) => {
                // Closing it now could drop a lock another thread holds on this inode.
                entry.file.parked.lock().push(fd);
                entry.users += 1;
                Arc::clone(&entry.file)
            }
            None => {
                let file = Arc::new(PosixFile {
                    fd,
                    id,
                    gate: <parking_lot::RawRwLock as lock_api::RawRwLock>::INIT,
                    readers: Mutex::new(0),
                    parked: Mutex::new(Vec::new()),
                });
                reg.insert(
                    id,
                    Entry {
                        file: Arc::clone(&file),
                        users: 1,
                    },
                );
                file
            }
        };
        PosixHandle {
            file: ManuallyDrop::new(file),
        }
    }

    pub(crate) fn file(&self) -> &PosixFile {
        &self.file
    }
}

impl Clone for PosixHandle {
    fn clone(&self) -> Self {
        let mut reg = registry().lock();
        if let Some(e) = reg.get_mut(&self.file.id) {
            e.users += 1;
        }
        PosixHandle {
            file: ManuallyDrop::new(Arc::clone(&self.file)),
        }
    }
}

impl Drop for PosixHandle {
    fn drop(&mut self) {
        let mut reg = registry().lock();
        let last = match reg.get_mut(&self.file.id) {
            Some(e) => {
                e.users -= 1;
                e.users == 0
            }
            None => false,
        };
        let removed = if last {
            reg.remove(&self.file.id)
        } else {
            None
        };
        // SAFETY: `self.file` is not used after this point; dropping here (instead of after the
        // registry lock is released) makes the descriptors close while no other thread can
        // register the same inode and lock it.
        unsafe { ManuallyDrop::drop(&mut self.file) };
        drop(removed);
        drop(reg);
    }
}
