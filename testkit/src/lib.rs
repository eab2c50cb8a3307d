//! Helpers shared by lockmeter's test suites, one module per concern:
//!
//! - [`tools`]: external tools; a missing one fails the test (naming its package and
//!   `.ci/run`) unless the run sets `LOCKMETER_TEST_ALLOW_MISSING=1`, which skips and logs it.
//! - [`metrics`]: an in-memory OpenTelemetry pipeline ([`Recorder`], [`Snapshot`]).
//! - [`proc`]: child processes, ready lines, `flock(1)` holders, [`eventually`], helper
//!   processes ([`helper_roles!`]).
//! - [`cli`]: launching the `lockmeter` binary ([`Cli`], [`Demo`]).
//! - [`prometheus`]: a real Prometheus, PromQL queries, `promtool`.
//! - [`fuse`]: bindfs mounts ([`Bindfs`]).
//! - [`disk`]: a small tmpfs to fill or remount read-only, read-only bind mounts.
//! - [`faultfs`]: a fault-injecting FUSE file system ([`FaultFs`], [`Fault`]).
//! - [`otlp`]: a third-party OTLP receiver ([`Rotel`]) and its debug-dump parser.
//! - [`http`]: HTTP GET and free ports.
//!
//! Everything is also reachable from the crate root (`lockmeter_testkit::flock_holder`).
#![allow(missing_docs, clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod cli;
pub mod disk;
pub mod faultfs;
pub mod fuse;
pub mod http;
pub mod metrics;
pub mod otlp;
pub mod proc;
pub mod prometheus;
pub mod servers;
pub mod tools;

pub use cli::*;
pub use faultfs::{Action, Fault, FaultFs, FaultId, Op};
pub use fuse::*;
pub use http::*;
pub use metrics::*;
pub use otlp::*;
pub use proc::*;
pub use prometheus::*;
pub use tools::*;

/// Names other branches and older tests use from the crate root: they must keep compiling.
#[cfg(test)]
#[allow(unused_imports)]
mod root_names {
    use crate::{
        eventually, flock_cli_can_lock, flock_holder, free_port, http_get, http_get_eventually,
        parse_debug_dump, prom_query, read_line_starting, release_flock_holder, require_tool,
        Bindfs, DebugMetric, DebugPoint, DebugSpan, Recorder, Snapshot,
    };
}
