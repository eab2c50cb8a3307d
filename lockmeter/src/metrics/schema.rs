//! The metric schema, a contract shared with the dashboards, alert rules and tests: instrument
//! names, attribute keys and values, and histogram boundaries.

/// Instrumentation scope name of every lockmeter instrument.
pub const SCOPE: &str = "lockmeter";

/// Instrument names, as exported over OTLP. Prometheus names are derived by the exporter
/// (`lock.duration` with unit `s` becomes `lock_duration_seconds`, counters gain `_total`).
pub mod names {
    /// Hold time histogram (seconds): from acquired to released.
    pub const DURATION: &str = "lock.duration";
    /// Wait time histogram (seconds): time spent in an acquire call, whatever its outcome.
    pub const WAIT_DURATION: &str = "lock.wait.duration";
    /// Successful acquisitions.
    pub const ACQUISITIONS: &str = "lock.acquisitions";
    /// Acquires that found the lock taken.
    pub const CONFLICTS: &str = "lock.conflicts";
    /// Failed lock operations.
    pub const ERRORS: &str = "lock.errors";
    /// Lock files found replaced, unlinked or moved to another device.
    pub const INODE_MIGRATIONS: &str = "lock.inode.migrations";
    /// Exclusion violations: someone else acquired a lock we held.
    pub const VIOLATIONS: &str = "lock.violations";
    /// Locks held now.
    pub const HELD: &str = "lock.held";
    /// Holds that ended without the holder releasing them (a distributed lock's lease expired,
    /// was revoked, its key was deleted or overwritten, its connection dropped).
    pub const LOST: &str = "lock.lost";
    /// Processes (or tasks) blocked on a lock right now.
    pub const WAITERS: &str = "lock.waiters";
}

/// One instrument of the schema as every producer creates it (the library, the host agent):
/// name, unit and description, so that all of them export identical metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstrumentSpec {
    /// The OTel instrument name ([`names`]).
    pub name: &'static str,
    /// Its UCUM unit.
    pub unit: &'static str,
    /// Its description (Prometheus `# HELP`).
    pub description: &'static str,
}

/// Name, unit and description of each instrument of the schema.
pub mod instruments {
    use super::{names, InstrumentSpec};

    /// `lock.duration`.
    pub const DURATION: InstrumentSpec = InstrumentSpec {
        name: names::DURATION,
        unit: "s",
        description: "Time a lock was held, from acquired to released.",
    };
    /// `lock.wait.duration`.
    pub const WAIT_DURATION: InstrumentSpec = InstrumentSpec {
        name: names::WAIT_DURATION,
        unit: "s",
        description: "Time spent in a lock acquire call, whatever its outcome.",
    };
    /// `lock.acquisitions`.
    pub const ACQUISITIONS: InstrumentSpec = InstrumentSpec {
        name: names::ACQUISITIONS,
        unit: "{acquisition}",
        description: "Successful lock acquisitions.",
    };
    /// `lock.conflicts`.
    pub const CONFLICTS: InstrumentSpec = InstrumentSpec {
        name: names::CONFLICTS,
        unit: "{conflict}",
        description: "Lock acquires that found the lock taken.",
    };
    /// `lock.errors`.
    pub const ERRORS: InstrumentSpec = InstrumentSpec {
        name: names::ERRORS,
        unit: "{error}",
        description: "Failed lock operations.",
    };
    /// `lock.inode.migrations`.
    pub const INODE_MIGRATIONS: InstrumentSpec = InstrumentSpec {
        name: names::INODE_MIGRATIONS,
        unit: "{migration}",
        description: "Lock files found replaced, unlinked or on another device.",
    };
    /// `lock.violations`.
    pub const VIOLATIONS: InstrumentSpec = InstrumentSpec {
        name: names::VIOLATIONS,
        unit: "{violation}",
        description: "Exclusion violations: another holder acquired a lock we held.",
    };
    /// `lock.held`.
    pub const HELD: InstrumentSpec = InstrumentSpec {
        name: names::HELD,
        unit: "{lock}",
        description: "Locks held now.",
    };
    /// `lock.lost`.
    pub const LOST: InstrumentSpec = InstrumentSpec {
        name: names::LOST,
        unit: "{loss}",
        description: "Holds that ended without the holder releasing the lock.",
    };
    /// `lock.waiters`.
    pub const WAITERS: InstrumentSpec = InstrumentSpec {
        name: names::WAITERS,
        unit: "{waiter}",
        description: "Processes or threads waiting for a lock now.",
    };
}

/// Attribute keys.
pub mod keys {
    /// Stable lock name (defaults to the path as given).
    pub const LOCK_NAME: &str = "lock.name";
    /// `flock`, `ofd`, `posix`, `mutex`, ...
    pub const LOCK_KIND: &str = "lock.kind";
    /// `exclusive` or `shared`.
    pub const LOCK_MODE: &str = "lock.mode";
    /// `true` when the acquire found the lock taken.
    pub const LOCK_CONTENDED: &str = "lock.contended";
    /// Outcome of an acquire call.
    pub const LOCK_OUTCOME: &str = "lock.outcome";
    /// `open`, `lock`, `unlock` or `verify`.
    pub const LOCK_OPERATION: &str = "lock.operation";
    /// Errno name.
    pub const ERROR_TYPE: &str = "error.type";
    /// `replaced`, `unlinked` or `device_changed`.
    pub const MIGRATION_KIND: &str = "migration.kind";
    /// `acquire`, `hold`, `release` or `agent`.
    pub const MIGRATION_DETECTED_AT: &str = "migration.detected_at";
    /// File-system type of a lock file (`ext4`, `tmpfs`, `nfs`, `fuse`, ...).
    pub const FS_TYPE: &str = "fs.type";
    /// Why a hold was lost: `expired`, `revoked`, `overwritten` or `connection`.
    pub const LOCK_LOST_REASON: &str = "lock.lost.reason";
    /// The holder's or waiter's command name (OpenTelemetry semantic convention); the host
    /// agent sets it. Pids never become attributes.
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
}

/// Histogram boundaries in seconds, from 1 µs to 5 min. Set explicitly on `lock.duration` and
/// `lock.wait.duration` because the SDK defaults are meant for milliseconds. Override with an
/// SDK view (the `telemetry` builder has `histogram_boundaries`).
pub const DEFAULT_BOUNDARIES: &[f64] = &[
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Outcome of an acquire call (`lock.outcome` on `lock.wait.duration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The lock was acquired.
    Acquired,
    /// A non-blocking attempt found the lock taken.
    WouldBlock,
    /// The deadline passed before the lock was free.
    Timeout,
    /// The caller gave up (an async acquire was dropped).
    Cancelled,
    /// The acquire failed with an error.
    Error,
}

impl Outcome {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acquired => "acquired",
            Outcome::WouldBlock => "would_block",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

/// How an inode migration showed itself (`migration.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationKind {
    /// The path now names another inode on the same device (renamed over, recreated).
    Replaced,
    /// The path no longer exists.
    Unlinked,
    /// The path now names a file on another device (remounted, another mount on top).
    DeviceChanged,
}

impl MigrationKind {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Replaced => "replaced",
            MigrationKind::Unlinked => "unlinked",
            MigrationKind::DeviceChanged => "device_changed",
        }
    }
}

/// When an inode migration was noticed (`migration.detected_at`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetectedAt {
    /// Right after acquiring (lock-then-verify).
    Acquire,
    /// While the lock was held.
    Hold,
    /// At release.
    Release,
    /// By the host agent, from outside the holding process.
    Agent,
}

impl DetectedAt {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectedAt::Acquire => "acquire",
            DetectedAt::Hold => "hold",
            DetectedAt::Release => "release",
            DetectedAt::Agent => "agent",
        }
    }
}

/// Why a hold ended without its holder releasing it (`lock.lost.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// The lease or TTL ran out before it was renewed.
    Expired,
    /// The lease was revoked or the lock taken away by the service or an operator.
    Revoked,
    /// The lock's key was deleted or now holds another holder's token.
    Overwritten,
    /// The session or connection that held the lock was lost.
    Connection,
}

impl LostReason {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::Revoked => "revoked",
            LostReason::Overwritten => "overwritten",
            LostReason::Connection => "connection",
        }
    }
}
