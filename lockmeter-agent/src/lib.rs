//! # lockmeter-agent: every file lock on the host
//!
//! The library behind `lockmeter agent` and `lockmeter locks`: it turns the kernel's own
//! records of file locks into lockmeter's metric schema, for programs that do not link
//! lockmeter (Go, Python, Java, shell scripts with `flock(1)`).
//!
//! Two sources:
//!
//! - **Sampling** ([`scan`], [`model`]): `/proc/locks` every interval (1 s by default): held
//!   locks and blocked waiters, holders' command names, the lock file's path (from the
//!   holders' `/proc/PID/fd`, and `/proc/*/fdinfo` for OFD locks), its file system's lock
//!   coherence, and migrations (the path now names another inode). No privileges needed for
//!   the table; paths of other users' processes need root (or `CAP_SYS_PTRACE`).
//! - **Tracepoints** (feature `ebpf`, [`tracepoints`]): a BPF program on the `filelock`
//!   tracepoints reports every lock call and release with nanosecond times: exact
//!   `lock.wait.duration`, `lock.duration`, `lock.acquisitions`, `lock.conflicts`,
//!   `lock.errors`. Root only; the agent falls back to sampling alone when it cannot attach.
//!
//! [`metrics`] lists the instruments; [`labels`] the naming and cardinality rules.
#![deny(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod agent;
#[cfg(feature = "ebpf")]
pub mod ebpf;
pub mod labels;
pub mod metrics;
pub mod model;
pub mod proclocks;
pub mod scan;
pub mod table;
pub mod tracepoints;

pub use agent::{run, ActiveSource, AgentConfig, SourceChoice};
pub use labels::LabelRules;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file the agent needs could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The error (its errno: `ENOENT`, `EACCES`, ...).
        source: std::io::Error,
    },
    /// A bad setting (a glob, a `--name-map` rule).
    #[error("{0}")]
    Config(String),
    /// The tracepoint source could not be started.
    #[error("tracepoint source: {0}")]
    Tracepoints(String),
}
