//! Platform layer: every system call lockmeter makes on a lock file lives here.
//!
//! Only Linux is supported for now (OFD locks, `/proc/locks`, `statfs` magic numbers).

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!("lockmeter currently supports Linux only");
