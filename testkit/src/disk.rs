//! Disks that say no: a small tmpfs (to fill up, or to remount read-only) and a read-only bind
//! mount, each on a temporary directory and unmounted on drop. Root only (`mount(2)`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mount(src: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) {
    let (src_c, fs_c, data_c) = (
        CString::new(src).unwrap(),
        CString::new(fstype).unwrap(),
        CString::new(data).unwrap(),
    );
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src_c.as_ptr(),
            c(target).as_ptr(),
            fs_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount {src} on {} ({fstype}, {data}): {} (needs root)",
        target.display(),
        std::io::Error::last_os_error()
    );
}

/// A mounted file system on a temporary directory, lazily unmounted on drop.
pub struct Mounted {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Mounted {
    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` under the mount point.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c(&self.root).as_ptr(), libc::MNT_DETACH) };
    }
}

/// A tmpfs of `size` bytes (rounded up to pages) and at most `inodes` inodes.
pub fn tmpfs(size: usize, inodes: usize) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tmpfs");
    std::fs::create_dir(&root).unwrap();
    mount(
        "lockmeter-test",
        &root,
        "tmpfs",
        0,
        &format!("size={size},nr_inodes={inodes},mode=0755"),
    );
    Mounted { _dir: dir, root }
}

/// Remounts a mounted tmpfs read-only (fails with `EBUSY` while a file on it is open for
/// writing) or read-write again.
pub fn remount(m: &Mounted, read_only: bool) -> std::io::Result<()> {
    let flags = libc::MS_REMOUNT | if read_only { libc::MS_RDONLY } else { 0 };
    let none = CString::new("").unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            none.as_ptr(),
            c(m.root()).as_ptr(),
            none.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A read-only bind mount of `src`: the same files, and `EROFS` for anything that writes.
pub fn read_only_bind(src: &Path) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ro");
    std::fs::create_dir(&root).unwrap();
    mount(src.to_str().unwrap(), &root, "none", libc::MS_BIND, "");
    mount(
        "none",
        &root,
        "none",
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        "",
    );
    Mounted { _dir: dir, root }
}

/// Fills the file system holding `dir` until it says `ENOSPC`: returns the filler's path
/// (remove it to free the space).
pub fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0xa5u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    p
}
