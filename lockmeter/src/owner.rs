//! Owner records, fencing tokens and exclusion-violation detection.
//!
//! With [`owner_record(true)`](crate::FileLockBuilder::owner_record), a holder that acquires
//! *exclusively* writes a small text record at the start of the lock file:
//!
//! ```text
//! lockmeter-owner v1
//! host=build-7
//! boot_id=6f1b0a0e-6f1d-4a55-9d4b-6c0c2f8f2a11
//! pid=4242
//! start_time=1234567
//! token=9f2c41d7a0b84e1c8d3f6a5b2e7c9d10
//! fence=17
//! acquired_at=1795461745.577026731
//! name=nightly-job
//! ```
//!
//! `start_time` is the process start time in clock ticks since boot (`/proc/PID/stat` field 22),
//! so (`boot_id`, `pid`, `start_time`) names one process even after pid reuse. `token` is 128
//! random bits for this acquisition. `fence` is one more than the previous holder's: hand it to
//! the storage you protect and have it refuse writes with a smaller fence (a fencing token).
//! `name` is the lock's `lock.name` (its [`name`](crate::FileLockBuilder::name), or the path as
//! given), on one line and at most [`MAX_NAME`] bytes; records written before it existed have
//! none, and readers that predate it skip it (unknown keys are ignored).
//!
//! Before releasing (and while holding, when watching), lockmeter re-reads the record, dropping
//! cached pages first (`posix_fadvise(DONTNEED)`) so another client's write is seen. A different
//! token means someone else acquired the "exclusive" lock while we held it: the lock does not
//! exclude (NFS `local_lock`, two FUSE mounts, ...). That is counted in `lock.violations` and
//! reported with an `error!` event. The record is written with `pwrite` + `ftruncate` +
//! `fdatasync`, which costs a disk (or server) round trip per acquisition: it is opt-in.

use std::fmt;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// Maximum size of a record lockmeter reads back.
const MAX_RECORD: usize = 4096;

/// Longest `name` a record carries, in bytes (longer names are cut at a character boundary).
pub const MAX_NAME: usize = 256;

/// The holder record written into a lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRecord {
    /// Host name of the holder.
    pub host: String,
    /// The holder's `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// Holder pid.
    pub pid: u32,
    /// Holder process start time, clock ticks since boot.
    pub start_time: u64,
    /// Random token of this acquisition (32 hex digits).
    pub token: String,
    /// Fencing number: one more than the previous holder's.
    pub fence: u64,
    /// When it was acquired, seconds since the Unix epoch.
    pub acquired_at: String,
    /// The lock's `lock.name`; `None` in records written by versions that did not record it.
    pub name: Option<String>,
}

impl OwnerRecord {
    /// Parses a record; `None` if the bytes are not one (an empty or foreign lock file).
    pub fn parse(bytes: &[u8]) -> Option<OwnerRecord> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "lockmeter-owner v1" {
            return None;
        }
        let mut r = OwnerRecord {
            host: String::new(),
            boot_id: String::new(),
            pid: 0,
            start_time: 0,
            token: String::new(),
            fence: 0,
            acquired_at: String::new(),
            name: None,
        };
        for line in lines {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "host" => r.host = v.to_owned(),
                "boot_id" => r.boot_id = v.to_owned(),
                "pid" => r.pid = v.parse().ok()?,
                "start_time" => r.start_time = v.parse().ok()?,
                "token" => r.token = v.to_owned(),
                "fence" => r.fence = v.parse().ok()?,
                "acquired_at" => r.acquired_at = v.to_owned(),
                "name" => r.name = Some(v.to_owned()),
                _ => {} // later versions may add fields
            }
        }
        (!r.token.is_empty()).then_some(r)
    }

    /// When it was acquired, as a time (`None` if `acquired_at` is not `SECONDS.NANOS`).
    pub fn acquired_time(&self) -> Option<std::time::SystemTime> {
        let (secs, nanos) = self
            .acquired_at
            .split_once('.')
            .unwrap_or((&self.acquired_at, "0"));
        let secs: u64 = secs.parse().ok()?;
        let nanos: u32 = format!("{nanos:0<9}").get(..9)?.parse().ok()?;
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
    }

    /// A record for this process with a fresh random token, the given fence and lock name.
    pub(crate) fn new_for_self(fence: u64, name: &str) -> Result<OwnerRecord, Errno> {
        let mut raw = [0u8; 16];
        let mut filled = 0;
        while filled < raw.len() {
            filled +=
                rustix::rand::getrandom(&mut raw[filled..], rustix::rand::GetRandomFlags::empty())?;
        }
        let token = raw.iter().map(|b| format!("{b:02x}")).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ident = self_identity();
        Ok(OwnerRecord {
            host: ident.host.clone(),
            boot_id: ident.boot_id.clone(),
            pid: std::process::id(),
            start_time: ident.start_time,
            token,
            fence,
            acquired_at: format!("{}.{:09}", now.as_secs(), now.subsec_nanos()),
            name: Some(one_line_name(name)),
        })
    }
}

impl fmt::Display for OwnerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lockmeter-owner v1")?;
        writeln!(f, "host={}", self.host)?;
        writeln!(f, "boot_id={}", self.boot_id)?;
        writeln!(f, "pid={}", self.pid)?;
        writeln!(f, "start_time={}", self.start_time)?;
        writeln!(f, "token={}", self.token)?;
        writeln!(f, "fence={}", self.fence)?;
        writeln!(f, "acquired_at={}", self.acquired_at)?;
        match &self.name {
            Some(name) => writeln!(f, "name={}", one_line_name(name)),
            None => Ok(()),
        }
    }
}

/// `name` as one record line: control characters (a newline would end the field) become
/// spaces, and it is cut to [`MAX_NAME`] bytes at a character boundary.
fn one_line_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_NAME));
    for c in name.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_NAME {
            break;
        }
        out.push(c);
    }
    out
}

struct Identity {
    host: String,
    boot_id: String,
    start_time: u64,
}

fn self_identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity {
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        start_time: process_start_time("self").unwrap_or(0),
    })
}

/// Start time of a process in clock ticks since boot (`/proc/PID/stat` field 22).
pub(crate) fn process_start_time(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Reads the record at the start of the file, bypassing cached pages.
pub(crate) fn read(fd: BorrowedFd<'_>) -> Result<Option<OwnerRecord>, Errno> {
    // Another client's write must be seen. Refresh the cached attributes first (FUSE and NFS
    // clamp reads to the cached file size: a longer record written elsewhere would read
    // truncated), then drop clean cached pages so the read reaches the server or daemon.
    // Not every file system supports these; the read happens regardless.
    let _ = rustix::fs::statx(
        fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_FORCE_SYNC,
        rustix::fs::StatxFlags::SIZE | rustix::fs::StatxFlags::MTIME,
    );
    let _ = rustix::fs::fadvise(fd, 0, None, rustix::fs::Advice::DontNeed);
    let mut buf = vec![0u8; MAX_RECORD];
    let mut len = 0;
    while len < buf.len() {
        match rustix::io::pread(fd, &mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(OwnerRecord::parse(&buf[..len]))
}

/// Replaces the file's content with `rec` and makes it durable (visible to other clients).
pub(crate) fn write(fd: BorrowedFd<'_>, rec: &OwnerRecord) -> Result<(), Errno> {
    let bytes = rec.to_string().into_bytes();
    let mut off = 0;
    while off < bytes.len() {
        match rustix::io::pwrite(fd, &bytes[off..], off as u64) {
            Ok(n) => off += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    rustix::fs::ftruncate(fd, bytes.len() as u64)?;
    rustix::fs::fdatasync(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const OLD: &str = "lockmeter-owner v1\nhost=h\nboot_id=b\npid=7\nstart_time=9\n\
                       token=00112233445566778899aabbccddeeff\nfence=3\n\
                       acquired_at=1795461745.5\n";

    #[test]
    fn a_record_without_a_name_still_parses() {
        let r = OwnerRecord::parse(OLD.as_bytes()).unwrap();
        assert_eq!((r.pid, r.fence, r.name.as_deref()), (7, 3, None));
        assert_eq!(
            r.acquired_time().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::new(1_795_461_745, 500_000_000)
        );
    }

    #[test]
    fn the_name_round_trips_on_one_line() {
        let mut r = OwnerRecord::parse(OLD.as_bytes()).unwrap();
        r.name = Some("nightly\njob=x".to_owned());
        let text = r.to_string();
        assert!(
            text.starts_with(OLD),
            "the v1 fields come first, unchanged: {text}"
        );
        let back = OwnerRecord::parse(text.as_bytes()).unwrap();
        assert_eq!(back.name.as_deref(), Some("nightly job=x"));
        assert_eq!(back.token, r.token);
        r.name = Some("é".repeat(MAX_NAME));
        let back = OwnerRecord::parse(r.to_string().as_bytes()).unwrap();
        assert_eq!(
            back.name.unwrap().len(),
            MAX_NAME,
            "cut at a character boundary"
        );
    }
}
