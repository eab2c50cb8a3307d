//! The kernel tracepoint source (feature `ebpf`): loads `bpf/locks.bpf.c` (compiled by clang
//! in `build.rs`) with aya, attaches it to the `filelock` BTF tracepoints, and feeds the ring
//! buffer's events to a [`TraceModel`] on a thread of its own.
//!
//! Needs root (or `CAP_BPF` + `CAP_PERFMON`), a kernel with BTF (`/sys/kernel/btf/vmlinux`)
//! and BTF-typed tracepoints (5.5+). No tracefs mount is needed. Kernel structure offsets are
//! relocated against the running kernel's BTF at load time (CO-RE).

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};

use crate::tracepoints::{parse_event, TraceModel, TraceStats};
use crate::AgentError;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/locks.bpf.o"));

/// The tracepoints hooked, by program name (the same as the tracepoint's).
pub const TRACEPOINTS: [&str; 3] = ["flock_lock_inode", "posix_lock_inode", "fcntl_setlk"];

/// Default ring buffer size: 8 MiB, drained every 50 ms (the kernel never wakes the reader).
/// Draining in rare large batches keeps the reader off the ring's cache lines while lock
/// calls write them (see `bpf/locks.bpf.c`); the ring holds what arrives in between. It is
/// mapped into the agent, so it counts in its resident memory.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// How often a ring of `bytes` is drained: often enough that ~2 million lock calls a second
/// (72 bytes each) fit, between 10 and 100 ms.
pub fn drain_every(bytes: u32) -> Duration {
    let ms = u64::from(bytes) / (72 * 2_000_000 / 1000);
    Duration::from_millis(ms.clamp(10, 100))
}

fn bpf_err(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Tracepoints(format!("{what}: {e}"))
}

/// The attached programs and their reader thread. Dropping it (or [`stop`](Self::stop))
/// detaches them.
#[derive(Debug)]
pub struct TracepointSource {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<TraceStats>>,
}

impl TracepointSource {
    /// Loads and attaches the programs, then starts reading. Errors (no BTF, no permission,
    /// a kernel without these tracepoints) come back here, before anything runs.
    ///
    /// `ring_bytes`: the ring buffer's size, a power of two of at least a page
    /// ([`DEFAULT_RING_BYTES`]).
    pub fn start(mut model: TraceModel, ring_bytes: u32) -> Result<TracepointSource, AgentError> {
        if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
            return Err(AgentError::Config(format!(
                "ring buffer size {ring_bytes}: expected a power of two of at least 4096 bytes"
            )));
        }
        let drain = drain_every(ring_bytes);
        let btf = Btf::from_sys_fs().map_err(|e| bpf_err("reading /sys/kernel/btf/vmlinux", e))?;
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            .set_max_entries("events", ring_bytes)
            .load(OBJECT)
            .map_err(|e| bpf_err("loading the BPF object", e))?;
        for name in TRACEPOINTS {
            let prog: &mut BtfTracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| bpf_err(name, "program missing from the object"))?
                .try_into()
                .map_err(|e| bpf_err(name, e))?;
            prog.load(name, &btf)
                .map_err(|e| bpf_err(&format!("loading tp_btf/{name}"), e))?;
            prog.attach()
                .map_err(|e| bpf_err(&format!("attaching tp_btf/{name}"), e))?;
        }
        let ring = RingBuf::try_from(
            bpf.take_map("events")
                .ok_or_else(|| bpf_err("events", "map missing"))?,
        )
        .map_err(|e| bpf_err("events ring buffer", e))?;
        let counters: Array<MapData, u64> = Array::try_from(
            bpf.take_map("counters")
                .ok_or_else(|| bpf_err("counters", "map missing"))?,
        )
        .map_err(|e| bpf_err("counters", e))?;
        drop(btf);
        // Parsing the kernel's BTF (needed only to load) left ~15 MiB of free heap behind.
        crate::agent::release_free_heap();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let stats = Arc::new(Mutex::new(TraceStats::default()));
        let stats2 = stats.clone();
        let thread = std::thread::Builder::new()
            .name("lockmeter-tracepoints".into())
            .spawn(move || {
                reader(bpf, ring, counters, &mut model, &stop_rx, &stats2, drain);
            })
            .map_err(|e| bpf_err("starting the reader thread", e))?;
        Ok(TracepointSource {
            stop: Some(stop_tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Whether the reader is still running (it stops only when told to, or if it panicked).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// What the model has seen so far (updated at each drain).
    pub fn stats(&self) -> TraceStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Detaches the programs after draining what the kernel already sent.
    pub fn stop(mut self) -> TraceStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("tracepoint reader thread panicked");
            }
        }
    }
}

impl Drop for TracepointSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn reader(
    bpf: Ebpf,
    mut ring: RingBuf<MapData>,
    counters: Array<MapData, u64>,
    model: &mut TraceModel,
    stop: &mpsc::Receiver<()>,
    stats: &Mutex<TraceStats>,
    drain: Duration,
) {
    let mut last_dropped = 0u64;
    let mut last_check = Instant::now();
    loop {
        while let Some(item) = ring.next() {
            if let Some(e) = parse_event(&item) {
                model.apply(&e);
            }
        }
        *stats.lock().unwrap_or_else(PoisonError::into_inner) = model.stats();
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            // counters[1]: events the kernel could not queue (ring buffer full).
            if let Ok(total) = counters.get(&1, 0) {
                if total > last_dropped {
                    tracing::warn!(
                        lost = total - last_dropped,
                        "tracepoint events lost: the ring buffer was full (some waits and holds were not recorded)"
                    );
                    last_dropped = total;
                }
            }
        }
        match stop.recv_timeout(drain) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Stopped: detach first, then take what was already sent.
            _ => {
                drop(bpf);
                while let Some(item) = ring.next() {
                    if let Some(e) = parse_event(&item) {
                        model.apply(&e);
                    }
                }
                *stats.lock().unwrap_or_else(PoisonError::into_inner) = model.stats();
                return;
            }
        }
    }
}
