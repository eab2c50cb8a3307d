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

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};

use crate::tracepoints::{parse_event, TraceModel, TraceStats};
use crate::AgentError;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/locks.bpf.o"));

/// The tracepoints hooked, by program name (the same as the tracepoint's).
pub const TRACEPOINTS: [&str; 3] = ["flock_lock_inode", "posix_lock_inode", "fcntl_setlk"];

/// How often the reader drains the ring buffer when the kernel does not wake it (it wakes it
/// only when more than 1 MiB is waiting).
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

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
    pub fn start(mut model: TraceModel) -> Result<TracepointSource, AgentError> {
        let btf = Btf::from_sys_fs().map_err(|e| bpf_err("reading /sys/kernel/btf/vmlinux", e))?;
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
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
        let dropped: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            bpf.take_map("dropped")
                .ok_or_else(|| bpf_err("dropped", "map missing"))?,
        )
        .map_err(|e| bpf_err("dropped counter", e))?;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let stats = Arc::new(Mutex::new(TraceStats::default()));
        let stats2 = stats.clone();
        let thread = std::thread::Builder::new()
            .name("lockmeter-tracepoints".into())
            .spawn(move || {
                reader(bpf, ring, dropped, &mut model, &stop_rx, &stats2);
            })
            .map_err(|e| bpf_err("starting the reader thread", e))?;
        Ok(TracepointSource {
            stop: Some(stop_tx),
            thread: Some(thread),
            stats,
        })
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
    dropped: PerCpuArray<MapData, u64>,
    model: &mut TraceModel,
    stop: &mpsc::Receiver<()>,
    stats: &Mutex<TraceStats>,
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
            if let Ok(v) = dropped.get(&0, 0) {
                let total: u64 = v.iter().sum();
                if total > last_dropped {
                    tracing::warn!(
                        lost = total - last_dropped,
                        "tracepoint events lost: the ring buffer was full (some waits and holds were not recorded)"
                    );
                    last_dropped = total;
                }
            }
        }
        match stop.recv_timeout(DRAIN_EVERY) {
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
