//! The honesty checks: lock-then-verify (is the locked inode still the one the path names?)
//! and owner records (did anyone else get this "exclusive" lock while we held it?).

use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;

use super::acquire::{Acquired, Wait};
use super::watch::{self, WatchHandle, WatchSpec};
use super::{count_error, Backend, FileLock, Held, PosixHandle};
use crate::error::{Error, Operation, Result};
use crate::kind::LockMode;
use crate::metrics::{DetectedAt, MigrationKind};
use crate::owner;
use crate::sys::{self, FileId};

/// How many times one acquire re-locks after finding the lock file replaced before it gives up
/// with [`Error::Unstable`].
const MAX_MIGRATIONS: u32 = 16;

/// This holder's owner record: its token and fence, and whether a violation was counted.
pub(super) struct OwnerState {
    pub(super) token: String,
    pub(super) fence: u64,
    /// Shared with the watcher: a violation is counted once per guard, by whoever sees it.
    pub(super) violated: Arc<AtomicBool>,
}

impl FileLock {
    /// Takes the lock, then (unless verification is off) checks that the path still names the
    /// locked inode; on a migration counts it, lets go of the orphaned inode and locks what the
    /// path names now, up to [`MAX_MIGRATIONS`] times.
    #[inline]
    pub(super) fn lock_verified(
        &self,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let mut migrations = 0;
        loop {
            let Some(held) = self.lock_once(mode, wait, contended)? else {
                return Ok(None);
            };
            if !self.verify {
                return Ok(Some(held));
            }
            match sys::path_id(self.c_path.as_c_str()) {
                Ok(id) if id == held.id() => return Ok(Some(held)),
                Ok(id) => {
                    let kind = if id.dev != held.id().dev {
                        MigrationKind::DeviceChanged
                    } else {
                        MigrationKind::Replaced
                    };
                    self.migrated(kind, held.id(), Some(id));
                }
                Err(Errno::NOENT) => self.migrated(MigrationKind::Unlinked, held.id(), None),
                Err(errno) => {
                    // The path could not be checked (not found to name another file): let go
                    // of the lock, keep the descriptors. Discarding them would re-open the file
                    // (a POSIX lock parks one more descriptor per failure until the lock goes)
                    // through the very file system that is failing.
                    let e = self.err(Operation::Verify, errno);
                    if let Err(errno) = self.unlock(held, mode) {
                        self.err(Operation::Unlock, errno);
                    }
                    return Err(e);
                }
            }
            self.discard(held, mode);
            migrations += 1;
            if migrations >= MAX_MIGRATIONS {
                return Err(self.count(Error::Unstable {
                    path: self.path.clone(),
                    attempts: migrations,
                }));
            }
        }
    }

    #[cold]
    fn migrated(&self, kind: MigrationKind, old: FileId, new: Option<FileId>) {
        self.recorder.migration(kind, DetectedAt::Acquire);
        tracing::warn!(
            lock.name = %self.name,
            lock.path = %self.path.display(),
            migration.kind = kind.as_str(),
            migration.detected_at = "acquire",
            old_inode = %old,
            new_inode = %new.map(|n| n.to_string()).unwrap_or_else(|| "none".into()),
            "lock file changed under the lock: it was {} after this process opened it; re-locking the file the path names now",
            match kind { MigrationKind::Unlinked => "unlinked", MigrationKind::Replaced => "replaced", MigrationKind::DeviceChanged => "moved to another device" },
        );
    }

    /// Lets go of a lock on an inode the path no longer names, and of every descriptor of it.
    #[cold]
    fn discard(&self, held: Held, mode: LockMode) {
        let old = held.id();
        if let Err(errno) = self.unlock(held, mode) {
            // Counted, not returned: the descriptors of the orphaned inode are closed below,
            // which releases a flock/OFD lock; the caller goes on to lock the new file.
            self.err(Operation::Unlock, errno);
        }
        match &self.backend {
            Backend::Fds(pool) => pool.retain(|fd| fd.id != old),
            Backend::Posix(current) => {
                let mut cur = current.lock();
                if cur.file().id == old {
                    match self.open_again() {
                        Ok(fd) => *cur = PosixHandle::register(fd.fd, fd.id),
                        // Counted now; the next attempt re-opens through the old handle, finds
                        // the same mismatch and reports through `Unstable` or the open error.
                        Err(e) => {
                            count_error(&self.recorder, e);
                        }
                    }
                }
            }
        }
    }

    /// Writes this acquisition's owner record (fence = previous + 1).
    #[cold]
    pub(super) fn stamp(&self, fd: BorrowedFd<'_>) -> std::result::Result<Box<OwnerState>, Errno> {
        let slots = owner::read_slots(fd)?;
        let fence = slots.current().map_or(1, |p| p.fence.wrapping_add(1));
        let rec = owner::OwnerRecord::new_for_self(fence, &self.name)?;
        // Into the slot not holding the previous record: a torn write cannot cost it.
        owner::write(fd, &rec, slots.next_slot())?;
        Ok(Box::new(OwnerState {
            token: rec.token,
            fence,
            violated: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Counts an exclusion violation and says so loudly.
    #[cold]
    pub(super) fn violation(&self, ours: &str, fence: u64, theirs: Option<&owner::OwnerRecord>) {
        self.recorder.violation();
        match theirs {
            Some(t) => tracing::error!(
                lock.name = %self.name,
                lock.path = %self.path.display(),
                our.token = ours,
                our.fence = fence,
                other.host = %t.host,
                other.pid = t.pid,
                other.token = %t.token,
                other.fence = t.fence,
                "exclusion violation: {}:{} acquired this lock while we held it exclusively; the lock does not exclude here (check the file system with `lockmeter probe`)",
                t.host, t.pid,
            ),
            None => tracing::error!(
                lock.name = %self.name,
                lock.path = %self.path.display(),
                our.token = ours,
                our.fence = fence,
                "exclusion violation: our owner record in the lock file was overwritten or removed while we held the lock exclusively",
            ),
        }
    }

    /// Starts watching a held lock ([`super::FileLockBuilder::watch`]).
    #[cold]
    pub(super) fn start_watch(&self, acquired: &Acquired, interval: Duration) -> WatchHandle {
        // The watcher re-reads the owner record through its own duplicate of the locked
        // descriptor. Not for POSIX locks: closing any descriptor of the file would drop them.
        let owner = match (&acquired.owner, &acquired.held) {
            (Some(o), Held::Fd(fd)) => match fd.fd.try_clone() {
                Ok(dup) => Some((dup, o.token.clone(), Arc::clone(&o.violated))),
                Err(e) => {
                    let errno = Errno::from_io_error(&e).unwrap_or(Errno::MFILE);
                    self.recorder
                        .error(Operation::Verify.as_str(), sys::errno_name(errno));
                    None
                }
            },
            _ => None,
        };
        watch::register(WatchSpec {
            path: self.path.clone(),
            id: acquired.held.id(),
            lock_name: self.name.clone(),
            recorder: Arc::clone(&self.recorder),
            interval,
            owner,
        })
    }
}
