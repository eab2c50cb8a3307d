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
//! `start_time` is the process start time in clock ticks since boot (`/proc/PID/stat` field 22),
//! so (`boot_id`, `pid`, `start_time`) names one process even after pid reuse. `token` is 128
//! random bits for this acquisition. `fence` is one more than the previous holder's: hand it to
//! the storage you protect and have it refuse writes with a smaller fence (a fencing token).
//! `name` is the lock's `lock.name` (its [`name`](crate::FileLockBuilder::name), or the path as
//! given), on one line and at most [`MAX_NAME`] bytes; records written before it existed have
//! none, and readers that predate it skip it (unknown keys are ignored).
//!
//! sum=5d0f1a2b3c4d5e6f
//! ```
//!
//! The last line, `sum=`, is the FNV-1a 64 hash of every byte before it: a record that does not
//! end with a matching `sum=` line is not a record (a torn or foreign write), whatever it says.
//!
//! **Two slots, so that a failed write never costs the previous record.** A lock file holds up
//! to two records, at byte 0 and at byte [`SLOT`] (2048): both in the file's first 4 KiB block,
//! which the first record already allocated, so rewriting them needs no new space on a full
//! disk. A holder reads both, takes the valid one with the higher fence as the current record,
//! and writes its own into the *other* slot with `pwrite` + `fdatasync` (nothing is truncated).
//! If that write fails part-way (`ENOSPC`, `EIO`, a short write, a crash), the slot it tore has
//! no valid `sum=` and is ignored: the next holder still reads the previous holder's record and
//! its fence, so fencing tokens never go back and a torn record is never taken for a holder.
//! The failed holder does not get the lock (its acquire returns the write's error as a failed
//! `lock`).
//!
//! Before releasing (and while holding, when watching), lockmeter re-reads the record, dropping
//! cached pages first (`posix_fadvise(DONTNEED)`) so another client's write is seen. A different
//! token means someone else acquired the "exclusive" lock while we held it: the lock does not
//! exclude (NFS `local_lock`, two FUSE mounts, ...). That is counted in `lock.violations` and
//! reported with an `error!` event. The record is written with `pwrite` + `fdatasync`, which
//! costs a disk (or server) round trip per acquisition: it is opt-in.

use std::fmt;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// Size of one record slot: records live at byte 0 and at byte `SLOT` of the lock file.
pub const SLOT: usize = 2048;

/// What lockmeter reads back: both slots.
const MAX_RECORD: usize = 2 * SLOT;

/// Retries of a read or write that a signal (or a file system answering `EINTR`) interrupted,
/// before the `EINTR` is reported: a daemon that always answers `EINTR` must not hang a lock.
const MAX_EINTR: u32 = 8;

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
    /// Parses one record from the start of `bytes` (what follows its `sum=` line is ignored);
    /// `None` if they do not start with one: an empty or foreign lock file, or a torn record
    /// (no `sum=` line, or one that does not match the bytes before it).
    pub fn parse(bytes: &[u8]) -> Option<OwnerRecord> {
        let body = checked_body(bytes)?;
        let text = std::str::from_utf8(body).ok()?;
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

/// The bytes of a record that ends with a matching `sum=` line, without that line.
fn checked_body(bytes: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| start + i);
        let line = &bytes[start..end];
        if let Some(hex) = line.strip_prefix(b"sum=") {
            // Exactly as written (`{:016x}`): lowercase only, or a flipped case would pass.
            if !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            let want = u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            return (hex.len() == 16 && end < bytes.len() && fnv1a64(&bytes[..start]) == want)
                .then_some(&bytes[..start]);
        }
        start = end + 1;
    }
    None
}

/// FNV-1a, 64 bits: the record's checksum (catches torn and mixed writes, not forgeries).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl OwnerRecord {
    /// The record's fields, one per line, without the `sum=` line.
    fn body(&self) -> String {
        let mut s = String::with_capacity(256);
        let _ = self.write_body(&mut s);
        s
    }

    fn write_body(&self, f: &mut impl fmt::Write) -> fmt::Result {
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

/// The record as written to a slot: its fields, then the `sum=` line over them.
impl fmt::Display for OwnerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self.body();
        writeln!(f, "{body}sum={:016x}", fnv1a64(body.as_bytes()))
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
    start_time_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/PID/stat` line.
fn start_time_of(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    // `get`: a line cut right after the ')' (or anything else) is `None`, never a panic.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

/// The records of a lock file's two slots.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    records: [Option<OwnerRecord>; 2],
}

impl Slots {
    /// The slots of a lock file's first [`MAX_RECORD`] bytes.
    fn parse(bytes: &[u8]) -> Slots {
        let at = |o: usize| bytes.get(o..).and_then(OwnerRecord::parse);
        Slots {
            records: [at(0), at(SLOT)],
        }
    }

    /// Index of the current record: the valid one with the higher fence (slot 0 on a tie).
    fn current_slot(&self) -> Option<usize> {
        match &self.records {
            [Some(a), Some(b)] => Some(usize::from(b.fence > a.fence)),
            [Some(_), None] => Some(0),
            [None, Some(_)] => Some(1),
            [None, None] => None,
        }
    }

    /// The current record (see [`Self::current_slot`]).
    pub(crate) fn current(&self) -> Option<&OwnerRecord> {
        self.current_slot().and_then(|i| self.records[i].as_ref())
    }

    /// The slot the next record goes to: the one not holding the current record.
    pub(crate) fn next_slot(&self) -> usize {
        self.current_slot().map_or(0, |i| 1 - i)
    }
}

/// Reads the current record, bypassing cached pages.
pub(crate) fn read(fd: BorrowedFd<'_>) -> Result<Option<OwnerRecord>, Errno> {
    read_slots(fd).map(|s| s.records.into_iter().flatten().max_by_key(|r| r.fence))
}

/// Reads both slots, bypassing cached pages.
pub(crate) fn read_slots(fd: BorrowedFd<'_>) -> Result<Slots, Errno> {
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
    let mut interrupted = 0;
    while len < buf.len() {
        match rustix::io::pread(fd, &mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(Errno::INTR) if interrupted < MAX_EINTR => interrupted += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(Slots::parse(&buf[..len]))
}

/// Writes `rec` into `slot` (0 or 1; see [`Slots::next_slot`]) and makes it durable (visible to
/// other clients). Nothing else in the file changes: if this fails part-way, the other slot
/// still holds the previous record.
pub(crate) fn write(fd: BorrowedFd<'_>, rec: &OwnerRecord, slot: usize) -> Result<(), Errno> {
    let bytes = rec.to_string().into_bytes();
    if bytes.len() > SLOT {
        return Err(Errno::OVERFLOW);
    }
    let base = (slot.min(1) * SLOT) as u64;
    let mut off = 0;
    let mut interrupted = 0;
    while off < bytes.len() {
        match rustix::io::pwrite(fd, &bytes[off..], base + off as u64) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => off += n,
            Err(Errno::INTR) if interrupted < MAX_EINTR => interrupted += 1,
            Err(e) => return Err(e),
        }
    }
    rustix::fs::fdatasync(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const OLD: &str = "lockmeter-owner v1\nhost=h\nboot_id=b\npid=7\nstart_time=9\n\
                       token=00112233445566778899aabbccddeeff\nfence=3\n\
                       acquired_at=1795461745.5\n";

    /// `body` closed with its `sum=` line.
    fn sealed(body: &str) -> String {
        format!("{body}sum={:016x}\n", fnv1a64(body.as_bytes()))
    }

    #[test]
    fn a_record_without_a_name_still_parses() {
        let r = OwnerRecord::parse(sealed(OLD).as_bytes()).unwrap();
        assert_eq!((r.pid, r.fence, r.name.as_deref()), (7, 3, None));
        assert_eq!(
            r.acquired_time().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::new(1_795_461_745, 500_000_000)
        );
    }

    #[test]
    fn the_name_round_trips_on_one_line() {
        let mut r = OwnerRecord::parse(sealed(OLD).as_bytes()).unwrap();
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

    #[test]
    fn a_record_without_its_sum_or_with_a_wrong_one_is_no_record() {
        assert!(OwnerRecord::parse(OLD.as_bytes()).is_none(), "no sum= line");
        let good = sealed(OLD);
        let bad = good.replace("fence=3", "fence=4");
        assert!(OwnerRecord::parse(bad.as_bytes()).is_none(), "sum mismatch");
        let cut = &good[..good.len() - 1];
        assert!(OwnerRecord::parse(cut.as_bytes()).is_none(), "sum line cut");
    }

    /// Every way a write of a new record over an old one can stop part-way: the slot holds a
    /// prefix of the new record and the rest of the old. None of them reads as a record.
    #[test]
    fn no_prefix_of_a_new_record_over_an_old_one_is_a_record() {
        let old = OwnerRecord::parse(sealed(OLD).as_bytes()).unwrap();
        let mut new = old.clone();
        new.fence = 18;
        new.token = "ffeeddccbbaa99887766554433221100".into();
        new.host = "a-longer-host-name".into();
        let (old, new) = (old.to_string().into_bytes(), new.to_string().into_bytes());
        for cut in 0..new.len() {
            let mut slot = old.clone();
            slot.resize(slot.len().max(cut), 0);
            slot[..cut].copy_from_slice(&new[..cut]);
            let r = OwnerRecord::parse(&slot);
            assert!(
                r.is_none() || slot.starts_with(&old),
                "cut at {cut}: read {r:?} from {:?}",
                String::from_utf8_lossy(&slot)
            );
        }
    }

    #[test]
    fn the_current_record_is_the_higher_fence_and_the_next_goes_elsewhere() {
        let rec = |fence: u64| {
            let mut r = OwnerRecord::parse(sealed(OLD).as_bytes()).unwrap();
            r.fence = fence;
            r.to_string().into_bytes()
        };
        let file = |a: &[u8], b: &[u8]| {
            let mut f = a.to_vec();
            f.resize(SLOT, 0);
            f.extend_from_slice(b);
            f
        };
        let s = Slots::parse(&file(&rec(5), &rec(6)));
        assert_eq!((s.current().unwrap().fence, s.next_slot()), (6, 0));
        let s = Slots::parse(&file(&rec(7), &rec(6)));
        assert_eq!((s.current().unwrap().fence, s.next_slot()), (7, 1));
        let torn = &rec(8)[..40];
        let s = Slots::parse(&file(torn, &rec(6)));
        assert_eq!((s.current().unwrap().fence, s.next_slot()), (6, 0));
        let s = Slots::parse(&rec(1));
        assert_eq!((s.current().unwrap().fence, s.next_slot()), (1, 1));
        let s = Slots::parse(b"");
        assert_eq!((s.current().is_none(), s.next_slot()), (true, 0));
    }

    proptest! {
        /// Any bytes at all (every byte value, any length): parsing never panics, and what it
        /// accepts is a record whose own text reads back the same.
        #[test]
        fn parsing_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(r) = OwnerRecord::parse(&bytes) {
                let again = OwnerRecord::parse(r.to_string().as_bytes());
                prop_assert!(again.is_some());
            }
            let _ = Slots::parse(&bytes).current();
        }

        /// Bytes with a valid record's shape and a random byte flipped are refused, or are
        /// the same record (the flip landed after its sum line).
        #[test]
        fn a_flipped_byte_never_reads_as_another_record(at in 0usize..200, byte in any::<u8>()) {
            let good = sealed(OLD).into_bytes();
            let mut bytes = good.clone();
            let i = at % bytes.len();
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            let r = OwnerRecord::parse(&bytes);
            prop_assert!(r.is_none(), "flipped byte {} to {:#x}: {:?}", i, byte, r);
        }

        /// `/proc/PID/stat` lines: any bytes never panic; a well-formed line gives field 22
        /// whatever the command name holds (spaces, parentheses, any character).
        #[test]
        fn stat_lines(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                      comm in "\\PC{0,16}", start: u64) {
            let _ = start_time_of(&String::from_utf8_lossy(&bytes));
            let line = format!(
                "4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 10\n"
            );
            prop_assert_eq!(start_time_of(&line), Some(start));
        }

        /// Records with arbitrary field values (any string, names with any characters)
        /// round-trip through their text.
        #[test]
        fn records_round_trip(host in "[^\n=]{0,40}", token in "[0-9a-f]{32}", fence: u64,
                              pid: u32, name in proptest::option::of(any::<String>())) {
            let r = OwnerRecord {
                host: host.trim_end_matches('\r').to_owned(),
                boot_id: "b".into(),
                pid,
                start_time: 1,
                token,
                fence,
                acquired_at: "1.5".into(),
                name,
            };
            let back = OwnerRecord::parse(r.to_string().as_bytes()).unwrap();
            prop_assert_eq!(back.fence, r.fence);
            prop_assert_eq!(back.token, r.token);
            prop_assert_eq!(back.pid, r.pid);
            prop_assert_eq!(back.name, r.name.as_deref().map(one_line_name));
        }
    }
}
