//! Wrap an existing file lock and watch it: `cargo run --example file_lock`.
//!
//! Before, the program took a bare `flock(2)`:
//!
//! ```text
//! let file = File::options().create(true).write(true).open("/run/job.lock")?;
//! rustix::fs::flock(&file, FlockOperation::LockExclusive)?;
//! do_the_job();
//! // unlocked when `file` is closed
//! ```
//!
//! After, the same lock through lockmeter: same kernel lock (`flock(1)` and `lslocks` see it),
//! plus hold/wait histograms, conflict counts and inode verification.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use lockmeter::telemetry::Telemetry;
use lockmeter::FileLock;

fn main() -> Result<(), Box<dyn Error>> {
    // Metrics on http://127.0.0.1:<port>/metrics (port 0: any free port); OTLP too when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set. Install telemetry before creating locks.
    let telemetry = Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse()?)
        .init()?;
    if let Some(addr) = telemetry.prometheus_addr() {
        println!("metrics on http://{addr}/metrics");
    }

    let dir = std::env::temp_dir().join(format!("lockmeter-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("job.lock");

    // Four workers, each with its own FileLock on the same file: real kernel contention.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || -> Result<(), lockmeter::Error> {
                let lock = Arc::new(FileLock::builder(&path).name("nightly-job").open()?);
                for _ in 0..25 {
                    let guard = lock.lock()?;
                    std::thread::sleep(Duration::from_millis(2)); // do_the_job()
                    guard.unlock()?; // or just drop it
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")??;
    }

    // What Prometheus would scrape now.
    lockmeter_examples::print_lock_counts(&telemetry)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
