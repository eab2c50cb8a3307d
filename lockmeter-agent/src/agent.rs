//! The agent's main loop: sample `/proc/locks` every interval, run the tracepoint source
//! beside it when it can, and publish both through the agent's instruments.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::Meter;

use crate::labels::LabelRules;
use crate::metrics::AgentMetrics;
use crate::model::Tracker;
use crate::scan::Scanner;
use crate::AgentError;

/// Which sources to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceChoice {
    /// Tracepoints when they can be attached, else sampling alone (with one log line).
    Auto,
    /// `/proc/locks` sampling only.
    Sampling,
    /// Tracepoints required: fail when they cannot be attached.
    Tracepoints,
}

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Sampling interval (default 1 s).
    pub interval: Duration,
    /// Sources.
    pub source: SourceChoice,
    /// Names and path selection.
    pub rules: LabelRules,
    /// At most this many lock names get series of their own (default 500).
    pub top: usize,
    /// The proc file system (`/proc`; the host's when run in a container).
    pub proc_root: PathBuf,
    /// The tracepoint source's ring buffer, bytes (a power of two; default 8 MiB).
    pub ring_bytes: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interval: Duration::from_secs(1),
            source: SourceChoice::Auto,
            rules: LabelRules::default(),
            top: 500,
            proc_root: PathBuf::from("/proc"),
            ring_bytes: 8 << 20,
        }
    }
}

/// What is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActiveSource {
    /// Sampling only.
    Sampling,
    /// Sampling for state (held, waiters, ages, migrations) plus tracepoints for exact times.
    SamplingAndTracepoints,
}

/// Tries to start the tracepoint source.
#[cfg(feature = "ebpf")]
fn start_tracepoints(
    config: &AgentConfig,
    metrics: &Arc<AgentMetrics>,
) -> Result<crate::ebpf::TracepointSource, AgentError> {
    let model = crate::tracepoints::TraceModel::new(
        metrics.clone(),
        config.rules.clone(),
        config.top,
        config.proc_root.clone(),
    );
    crate::ebpf::TracepointSource::start(model, config.ring_bytes)
}

/// Stands for the tracepoint source in a build without it.
#[cfg(not(feature = "ebpf"))]
#[derive(Debug)]
struct NoTracepoints;

#[cfg(not(feature = "ebpf"))]
fn start_tracepoints(
    _config: &AgentConfig,
    _metrics: &Arc<AgentMetrics>,
) -> Result<NoTracepoints, AgentError> {
    Err(AgentError::Tracepoints(
        "this lockmeter was built without the `ebpf` feature".to_owned(),
    ))
}

/// Runs the agent until `stop` receives a message or is dropped. `on_start` is called once
/// the sources run, with what is active (the CLI prints its ready line there).
pub fn run(
    config: AgentConfig,
    meter: &Meter,
    stop: &mpsc::Receiver<()>,
    on_start: impl FnOnce(ActiveSource),
) -> Result<(), AgentError> {
    let metrics = Arc::new(AgentMetrics::new(meter));
    let mut scanner = Scanner::new(&config.proc_root);
    // Fail early, with the path, when /proc/locks cannot be read at all.
    let first = scanner.scan()?;
    let mut tracker = Tracker::new(config.rules.clone(), config.top, &config.proc_root).rows(false);

    let tracepoints = match config.source {
        SourceChoice::Sampling => None,
        SourceChoice::Tracepoints => Some(start_tracepoints(&config, &metrics)?),
        SourceChoice::Auto => match start_tracepoints(&config, &metrics) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "kernel tracepoints unavailable ({e}); falling back to /proc/locks sampling \
                     every {:?}: no wait times, conflicts or errors, hold times at interval resolution",
                    config.interval
                );
                None
            }
        },
    };
    let active = if tracepoints.is_some() {
        ActiveSource::SamplingAndTracepoints
    } else {
        ActiveSource::Sampling
    };
    let record_sampled_holds = tracepoints.is_none();
    let up = tracker.update(&first);
    report(&up);
    metrics.apply(&up, record_sampled_holds);
    on_start(active);

    let mut next = Instant::now() + config.interval;
    while let Err(mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(next.saturating_duration_since(Instant::now()))
    {
        #[cfg(feature = "ebpf")]
        if tracepoints.as_ref().is_some_and(|t| !t.is_running()) {
            return Err(AgentError::Tracepoints(
                "the reader thread stopped unexpectedly (see the panic above)".to_owned(),
            ));
        }
        next += config.interval;
        if next < Instant::now() {
            next = Instant::now() + config.interval; // fell behind: do not burst
        }
        let t0 = Instant::now();
        match scanner.scan() {
            Ok(snap) => {
                let t1 = Instant::now();
                let up = tracker.update(&snap);
                let t2 = Instant::now();
                report(&up);
                metrics.apply(&up, record_sampled_holds);
                let locks = snap.locks.len();
                drop(up);
                drop(snap);
                release_free_heap();
                tracing::debug!(
                    locks,
                    scan_ms = (t1 - t0).as_secs_f64() * 1e3,
                    update_ms = (t2 - t1).as_secs_f64() * 1e3,
                    publish_ms = t2.elapsed().as_secs_f64() * 1e3,
                    "sampled"
                );
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    // The tracepoint source (if any) detaches as it goes out of scope here.
    Ok(())
}

/// Gives free heap memory back to the system. glibc keeps what a thread's arena freed
/// resident (the per-pass maps of a 10,000-lock table, the BTF parsed to load the BPF
/// program): measured, ~30 MiB of an agent's 54 MiB with 10,000 locks held was free heap.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it takes the allocator's
    // locks itself and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn report(up: &crate::model::Update) {
    for m in &up.migrations {
        tracing::warn!(
            path = %m.path.display(),
            lock.name = %m.attrs.name,
            lock.kind = m.attrs.kind.as_str(),
            migration.kind = m.kind.as_str(),
            holder = %m.attrs.exe,
            "a held lock's file was {} : the lock no longer guards what the path names",
            match m.kind {
                lockmeter::metrics::MigrationKind::Replaced => "replaced",
                lockmeter::metrics::MigrationKind::Unlinked => "unlinked",
                lockmeter::metrics::MigrationKind::DeviceChanged => "moved to another device",
            }
        );
    }
    for u in &up.newly_untrusted {
        tracing::warn!(
            path = %u.path.display(),
            fs.type = %u.fs_type,
            coherence = u.coherence.as_str(),
            "lock file on a file system whose locks may not exclude everyone: {}",
            u.reason
        );
    }
}
