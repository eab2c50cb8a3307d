//! File-system awareness: which mount a lock file lives on, and whether locks taken there
//! exclude other processes on this host only, across machines, or only within one mount.
//!
//! The facts behind the classification (see also the crate docs):
//!
//! - Local file systems (ext4, xfs, btrfs, tmpfs, ...) keep locks in this host's kernel: they
//!   exclude every process of this host, and nothing on any other host.
//! - NFS: since Linux 2.6.12 the client emulates `flock` with a whole-file byte-range lock sent
//!   to the server, so `flock`, POSIX and OFD locks are coherent across clients, unless the
//!   mount uses `nolock` (all locks local) or `local_lock=flock|posix|all` (that kind local).
//!   NFSv4 locks are leases: a client that loses its lease loses the lock.
//! - CIFS/SMB (5.5+) emulates `flock` with mandatory byte-range locks on the server, unless
//!   mounted `nobrl`.
//! - FUSE: unless the daemon negotiates lock forwarding, the kernel grants locks locally, per
//!   mount: two FUSE mounts of one directory are two lock domains. Forwarding cannot be seen in
//!   the mount table; `lockmeter probe --peer` tests it.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

use crate::kind::LockKind;

/// One line of `/proc/self/mountinfo` (see `proc(5)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique mount id.
    pub mount_id: u64,
    /// Parent mount id.
    pub parent_id: u64,
    /// Device major number (`st_dev` of files on it, except for some btrfs subvolumes).
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Root of the mount within its file system.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// Optional fields (`shared:1`, `master:2`, ...).
    pub optional_fields: Vec<String>,
    /// File-system type (`ext4`, `nfs4`, `fuse.sshfs`, ...).
    pub fs_type: String,
    /// Mount source (`/dev/sda1`, `server:/export`, ...).
    pub source: String,
    /// Per-superblock options (`vers=4.2`, `local_lock=none`, ...).
    pub super_options: Vec<String>,
}

/// Why a mountinfo line could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed mountinfo line: {0}")]
pub struct ParseError(&'static str);

/// Decodes the octal escapes `proc(5)` uses for space, tab, newline and backslash (`\040`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = (digits[0] - b'0') as u32 * 64
                    + (digits[1] - b'0') as u32 * 8
                    + (digits[2] - b'0') as u32;
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn path_field(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn text_field(field: &str) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

fn options(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter(|o| !o.is_empty())
        .map(text_field)
        .collect()
}

/// Parses one mountinfo line. Never panics, whatever the input.
pub fn parse_mountinfo_line(line: &str) -> Result<MountInfo, ParseError> {
    let mut fields = line.split(' ').filter(|f| !f.is_empty());
    let mut next = |what: &'static str| fields.next().ok_or(ParseError(what));
    let mount_id = next("mount id")?
        .parse()
        .map_err(|_| ParseError("mount id is not a number"))?;
    let parent_id = next("parent id")?
        .parse()
        .map_err(|_| ParseError("parent id is not a number"))?;
    let (major, minor) = next("major:minor")?
        .split_once(':')
        .ok_or(ParseError("major:minor has no colon"))?;
    let major = major
        .parse()
        .map_err(|_| ParseError("major is not a number"))?;
    let minor = minor
        .parse()
        .map_err(|_| ParseError("minor is not a number"))?;
    let root = path_field(next("root")?);
    let mount_point = path_field(next("mount point")?);
    let mount_options = options(next("mount options")?);
    let mut optional_fields = Vec::new();
    loop {
        let f = next("separator")?;
        if f == "-" {
            break;
        }
        optional_fields.push(text_field(f));
    }
    let fs_type = text_field(next("fs type")?);
    let source = text_field(next("source")?);
    // Some kernels print an empty super-options field; treat it as none.
    let super_options = fields.next().map(options).unwrap_or_default();
    Ok(MountInfo {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        optional_fields,
        fs_type,
        source,
        super_options,
    })
}

/// Parses a whole mountinfo file, skipping lines that do not parse.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| parse_mountinfo_line(l).ok())
        .collect()
}

impl MountInfo {
    /// Whether `opt` (or `opt=...`) is among the mount or super options.
    pub fn has_option(&self, opt: &str) -> bool {
        self.option(opt).is_some()
    }

    /// The value of `key=value` in the mount or super options (`Some("")` for a bare flag).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.super_options
            .iter()
            .chain(&self.mount_options)
            .find_map(|o| match o.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if o == key => Some(""),
                _ => None,
            })
    }
}

/// How far locks on a file system exclude.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coherence {
    /// Locks exclude every process of this host (a local file system), and only this host.
    HostWide,
    /// Locks are sent to a server and exclude clients on other machines too.
    AcrossClients,
    /// A shared or network file system whose locks stay local to this client or this mount:
    /// another machine (or another mount) takes the "same" lock at the same time.
    LocalOnly,
    /// Not known; verify with `lockmeter probe`.
    Unknown,
}

impl Coherence {
    /// A short name: `host-wide`, `across-clients`, `local-only`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Coherence::HostWide => "host-wide",
            Coherence::AcrossClients => "across-clients",
            Coherence::LocalOnly => "local-only",
            Coherence::Unknown => "unknown",
        }
    }

    /// Whether locks here can be trusted to exclude what they are expected to (host-wide or
    /// across clients).
    pub fn is_trustworthy(self) -> bool {
        matches!(self, Coherence::HostWide | Coherence::AcrossClients)
    }
}

impl fmt::Display for Coherence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What lockmeter knows about the file system a lock file lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    /// File-system type as the mount table names it (`nfs4`, `fuse.sshfs`, `ext4`), or from
    /// `statfs` when the mount was not found.
    pub fs_type: String,
    /// The mount the lock file is on, when found in `/proc/self/mountinfo`.
    pub mount: Option<MountInfo>,
    /// The classification for the lock kind in use.
    pub coherence: Coherence,
    /// Why, in words an operator can act on.
    pub reasons: Vec<String>,
}

impl FsInfo {
    /// The `fs.type` metric attribute: the mount table's type, with FUSE subtypes folded into
    /// `fuse` to keep the label's values few.
    pub fn metric_fs_type(&self) -> &str {
        metric_fs_type(&self.fs_type)
    }
}

pub(crate) fn metric_fs_type(t: &str) -> &str {
    if t == "fuse" || t == "fuseblk" || t.starts_with("fuse.") || t.starts_with("fuseblk.") {
        "fuse"
    } else {
        t
    }
}

const LOCAL: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "zfs", "f2fs", "vfat", "msdos",
    "exfat", "ntfs", "ntfs3", "jfs", "reiserfs", "bcachefs", "squashfs", "iso9660", "erofs",
    "hfsplus", "nilfs2", "devtmpfs", "udf",
];

/// Classifies a mount for locks of `kind`. Pure: it reads only the mount entry.
pub fn classify(m: &MountInfo, kind: LockKind) -> (Coherence, Vec<String>) {
    let t = m.fs_type.as_str();
    let kind_word = match kind {
        LockKind::Flock => "flock",
        LockKind::Ofd | LockKind::Posix => "posix",
    };
    if LOCAL.contains(&t) {
        return (
            Coherence::HostWide,
            vec![format!(
                "{t} is a local file system: locks exclude every process on this host, and nothing on other hosts"
            )],
        );
    }
    match t {
        "nfs" | "nfs4" => {
            if m.has_option("nolock") {
                return (
                    Coherence::LocalOnly,
                    vec![format!("NFS mounted with nolock ({}): locks are granted by this client alone; other clients take the same lock at the same time", m.source)],
                );
            }
            match m.option("local_lock") {
                Some(v) if v == "all" || v == kind_word => (
                    Coherence::LocalOnly,
                    vec![format!("NFS mounted with local_lock={v} ({}): {kind_word} locks stay on this client; other clients take the same lock at the same time", m.source)],
                ),
                _ => {
                    let mut r = vec![format!(
                        "NFS ({}): locks go to the server (flock is emulated with a whole-file byte-range lock since Linux 2.6.12), so they exclude other clients",
                        m.source
                    )];
                    if t == "nfs4" || m.option("vers").is_some_and(|v| v.starts_with('4')) {
                        r.push("NFSv4 locks are leases: a client that loses its lease (network partition, suspended VM) loses the lock, and later I/O fails with EIO".into());
                    }
                    if kind == LockKind::Flock {
                        r.push("exclusive flock on NFS needs the file open for writing; flock and fcntl locks conflict there".into());
                    }
                    (Coherence::AcrossClients, r)
                }
            }
        }
        "cifs" | "smb3" | "smbfs" => {
            if m.has_option("nobrl") {
                (
                    Coherence::LocalOnly,
                    vec![format!("CIFS mounted with nobrl ({}): byte-range locks are not sent to the server", m.source)],
                )
            } else {
                (
                    Coherence::AcrossClients,
                    vec![format!("CIFS/SMB ({}): locks are sent to the server as mandatory byte-range locks (flock emulated since Linux 5.5)", m.source)],
                )
            }
        }
        "ceph" | "gfs2" | "ocfs2" | "fuse.glusterfs" | "glusterfs" => (
            Coherence::AcrossClients,
            vec![format!("{t} is a cluster file system that coordinates locks between its clients")],
        ),
        "lustre" => {
            if m.has_option("localflock") {
                (Coherence::LocalOnly, vec!["Lustre mounted with localflock: locks are local to this client".into()])
            } else if m.has_option("flock") {
                (Coherence::AcrossClients, vec!["Lustre mounted with flock: locks are coherent across clients".into()])
            } else {
                (Coherence::Unknown, vec!["Lustre without flock or localflock: lock calls may fail with ENOSYS".into()])
            }
        }
        "overlay" => (
            Coherence::HostWide,
            vec!["overlay: locks are taken on the overlay's inode and exclude processes on this host; containers sharing only the lower or upper directory through separate overlays do not exclude each other".into()],
        ),
        "fuse.sshfs" => (
            Coherence::LocalOnly,
            vec![format!("sshfs ({}): locks are not forwarded over SFTP; they are local to this mount", m.source)],
        ),
        "9p" => (
            Coherence::LocalOnly,
            vec![format!("9p ({}): locks are kept by this client's kernel; the host and other guests do not see them", m.source)],
        ),
        "autofs" => (
            Coherence::Unknown,
            vec!["autofs trigger: the real file system is not mounted yet".into()],
        ),
        _ if metric_fs_type(t) == "fuse" => (
            Coherence::Unknown,
            vec![format!(
                "FUSE ({t}, source {}): the kernel keeps locks per mount unless the daemon forwards them, and the mount table cannot tell; two mounts of one directory may be two lock domains (check with lockmeter probe --peer)",
                m.source
            )],
        ),
        _ => (
            Coherence::Unknown,
            vec![format!("{t}: lockmeter does not know how this file system handles locks")],
        ),
    }
}

/// Finds the mount `path` lives on: entries whose mount point is a prefix of the canonical
/// path, preferring those with the file's device number, the longest mount point, and among
/// equals the one mounted last (on top).
pub fn find_mount<'a>(
    mounts: &'a [MountInfo],
    canonical: &Path,
    dev: Option<(u32, u32)>,
) -> Option<&'a MountInfo> {
    let covering = mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| canonical.starts_with(&m.mount_point));
    let best = |want_dev: bool| {
        covering
            .clone()
            .filter(|(_, m)| !want_dev || dev == Some((m.major, m.minor)))
            .max_by_key(|(i, m)| (m.mount_point.as_os_str().len(), *i))
            .map(|(_, m)| m)
    };
    best(true).or_else(|| best(false))
}

/// Works out the file system of `path` (whose descriptor is `fd`) for locks of `kind`: what
/// [`FileLock::fs_info`](crate::FileLock::fs_info) reports, for a descriptor opened elsewhere
/// (one inherited from a shell, as `lockmeter exec NUMBER` locks). `path` finds the mount in
/// `/proc/self/mountinfo`; `fd` gives the device and `statfs` type when it is not found.
pub fn fs_info(path: &Path, fd: std::os::fd::BorrowedFd<'_>, kind: LockKind) -> FsInfo {
    let statfs_type = crate::sys::fs_type(fd);
    let dev = rustix::fs::fstat(fd)
        .ok()
        .map(|st| (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)));
    let canonical = canonical_path(path);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    match canonical
        .as_deref()
        .and_then(|c| find_mount(&mounts, c, dev))
    {
        Some(m) => {
            let (coherence, reasons) = classify(m, kind);
            FsInfo {
                fs_type: m.fs_type.clone(),
                mount: Some(m.clone()),
                coherence,
                reasons,
            }
        }
        None => FsInfo {
            fs_type: statfs_type.to_owned(),
            mount: None,
            coherence: Coherence::Unknown,
            reasons: vec![format!(
                "the mount of {} was not found in /proc/self/mountinfo (statfs says {statfs_type})",
                path.display()
            )],
        },
    }
}

/// The canonical path of a lock file: its directory resolved, its own name kept (it is never
/// followed: lock files are opened `O_NOFOLLOW`).
fn canonical_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).ok().map(|d| d.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_handles_octal_and_stray_backslashes() {
        assert_eq!(unescape(r"/mnt/my\040disk"), b"/mnt/my disk");
        assert_eq!(unescape(r"a\011b\012c\134d"), b"a\tb\nc\\d");
        assert_eq!(unescape(r"trailing\"), b"trailing\\");
        assert_eq!(unescape(r"short\04"), b"short\\04");
        assert_eq!(unescape(r"\999"), b"\\999");
        assert_eq!(unescape(r"\777"), b"\\777"); // > 255: kept literally
    }
}
