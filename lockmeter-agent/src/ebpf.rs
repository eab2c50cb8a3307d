//! The kernel tracepoint source (feature `ebpf`): loads `bpf/locks.bpf.c` (compiled by clang
//! in `build.rs`) with aya, attaches it to the `filelock` BTF tracepoints, and feeds the ring
//! buffer's events, merged back into time order ([`Merge`]), to a [`TraceModel`] on a thread
//! of its own.
//!
//! Needs root (or `CAP_BPF` + `CAP_PERFMON`), a kernel with BTF (`/sys/kernel/btf/vmlinux`),
//! BTF-typed tracepoints (5.5+) and BPF timers in tracing programs (5.15+); events are sent
//! in per-CPU batches where timers can be pinned to a CPU (6.7+), one by one elsewhere. No
//! tracefs mount is needed. Kernel structure offsets are relocated against the running
//! kernel's BTF at load time (CO-RE).

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};

use crate::tracepoints::{Merge, TraceModel, TraceStats, BATCH_HEADER_SIZE, EVENT_SIZE};
use crate::AgentError;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/locks.bpf.o"));

/// The tracepoints hooked, by program name (the same as the tracepoint's).
pub const TRACEPOINTS: [&str; 3] = ["flock_lock_inode", "posix_lock_inode", "fcntl_setlk"];

/// Events per CPU staged in the kernel before they go to the ring as one record.
const BATCH: usize = 32;
/// How old an event may be before it is applied: older than anything still staged in the
/// kernel (a stage is sent within ~10 ms by a timer; a busy softirq can delay it).
const HORIZON: Duration = Duration::from_millis(100);

/// A CPU's stage as the kernel keeps it (`struct stage` in `bpf/locks.bpf.c`): a batch
/// header, `BATCH` events, then fields that are not sent.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Stage([u8; BATCH_HEADER_SIZE + BATCH * EVENT_SIZE + 8]);

// SAFETY: plain bytes, any bit pattern is valid.
unsafe impl aya::Pod for Stage {}

impl Stage {
    fn gen(&self) -> u64 {
        u64::from_ne_bytes(self.0[0..8].try_into().unwrap_or_default())
    }
    fn staged(&self) -> usize {
        (u32::from_ne_bytes(self.0[36..40].try_into().unwrap_or_default()) as usize).min(BATCH)
    }
    fn events(&self) -> &[u8] {
        &self.0[BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + self.staged() * EVENT_SIZE]
    }
}

/// Monotonic nanoseconds, the clock of the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Default ring buffer size: 8 MiB, drained every ~30 ms ([`drain_every`]; the kernel never
/// wakes the reader).
/// Draining in rare large batches keeps the reader off the ring's cache lines while lock
/// calls write them (see `bpf/locks.bpf.c`); the ring holds what arrives in between. It is
/// mapped into the agent, so it counts in its resident memory.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// How often a ring of `bytes` is drained: often enough that 4 million events a second (lock
/// calls and releases, 64 bytes each, and a 72-byte header per batch of 32) fit, between 10
/// and 100 ms.
pub fn drain_every(bytes: u32) -> Duration {
    let ms = u64::from(bytes) / (68 * 4_000_000 / 1000);
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
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| bpf_err(what, e))?;
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            .set_max_entries("events", ring_bytes)
            .set_max_entries("flushers", u32::try_from(cpus).unwrap_or(u32::MAX))
            .load(OBJECT)
            .map_err(|e| {
                bpf_err(
                    "loading the BPF object (needs root, or CAP_BPF and CAP_PERFMON, and a \
                     kernel with BTF and BPF timers, 5.15 or later)",
                    e,
                )
            })?;
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
        let stage: PerCpuArray<MapData, Stage> = PerCpuArray::try_from(
            bpf.take_map("stage")
                .ok_or_else(|| bpf_err("stage", "map missing"))?,
        )
        .map_err(|e| bpf_err("stage", e))?;
        drop(btf);
        // Parsing the kernel's BTF (needed only to load) left ~15 MiB of free heap behind.
        crate::agent::release_free_heap();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let stats = Arc::new(Mutex::new(TraceStats::default()));
        let stats2 = stats.clone();
        let thread = std::thread::Builder::new()
            .name("lockmeter-tracepoints".into())
            .spawn(move || {
                let maps = Maps {
                    ring,
                    counters,
                    stage,
                };
                reader(bpf, maps, &mut model, &stop_rx, &stats2, drain);
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

struct Maps {
    ring: RingBuf<MapData>,
    counters: Array<MapData, u64>,
    stage: PerCpuArray<MapData, Stage>,
}

fn drain_ring(ring: &mut RingBuf<MapData>, merge: &mut Merge, model: &mut TraceModel) {
    while let Some(item) = ring.next() {
        merge.record(&item, model);
    }
}

fn reader(
    mut bpf: Ebpf,
    mut maps: Maps,
    model: &mut TraceModel,
    stop: &mpsc::Receiver<()>,
    stats: &Mutex<TraceStats>,
    drain: Duration,
) {
    let mut merge = Merge::new();
    let mut last_dropped = 0u64;
    let mut last_check = Instant::now();
    loop {
        // Everything that happened before the horizon is in the ring by now.
        let horizon = monotonic_ns().saturating_sub(HORIZON.as_nanos() as u64);
        drain_ring(&mut maps.ring, &mut merge, model);
        merge.settle(horizon, model);
        *stats.lock().unwrap_or_else(PoisonError::into_inner) = model.stats();
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            // counters[1]: events the kernel could not queue (ring buffer full).
            if let Ok(total) = maps.counters.get(&1, 0) {
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
            // Stopped: detach, take what was sent and what is still staged, then free.
            _ => {
                for name in TRACEPOINTS {
                    if let Some(p) = bpf.program_mut(name) {
                        let p: Result<&mut BtfTracePoint, _> = p.try_into();
                        if let Ok(p) = p {
                            if let Err(e) = p.unload() {
                                tracing::warn!(program = name, error = %e, "detaching");
                            }
                        }
                    }
                }
                take_staged(&mut maps, &mut merge, model);
                drop(bpf);
                drain_ring(&mut maps.ring, &mut merge, model);
                merge.finish(model);
                if merge.late() > 0 {
                    tracing::debug!(late = merge.late(), "events applied out of time order");
                }
                *stats.lock().unwrap_or_else(PoisonError::into_inner) = model.stats();
                return;
            }
        }
    }
}

/// With the programs detached, the CPUs' flush timers send what is staged within ~10 ms:
/// drain until every stage is empty; past a deadline, read the stages directly (each batch
/// is taken once, by its number, whichever way it comes).
fn take_staged(maps: &mut Maps, merge: &mut Merge, model: &mut TraceModel) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        drain_ring(&mut maps.ring, merge, model);
        let Ok(stages) = maps.stage.get(&0, 0) else {
            return;
        };
        if stages.iter().all(|s| s.staged() == 0) {
            return;
        }
        if Instant::now() >= deadline {
            for (cpu, s) in stages.iter().enumerate() {
                if s.staged() > 0 {
                    let cpu = u32::try_from(cpu).unwrap_or(u32::MAX);
                    merge.batch(cpu, s.gen() + 1, s.events());
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
