//! A job that must run on one machine at a time: it takes an etcd lock (the same lock as
//! `etcdctl lock nightly-report`), passes the lock's fencing token with every write to its
//! storage (which refuses tokens older than the newest it has seen), and stops as soon as the
//! lock is lost.
//!
//! `cargo run --example distributed_lock --features etcd -- [ENDPOINT] [STEPS] [STORE]`
//! (defaults `http://127.0.0.1:2379`, 20 steps, `./report.store`). Exit status 0 when the job
//! finished, 75 when it stopped because the lock was lost.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockmeter::lease::EtcdLock;

/// Storage that enforces fencing: a write carrying a token lower than the highest one it has
/// accepted comes from a holder whose lock has since passed to someone else, and is refused.
struct FencedStore {
    path: PathBuf,
}

impl FencedStore {
    fn highest_token(&self) -> Result<u64, Box<dyn Error>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => Ok(s.lines().next().and_then(|l| l.parse().ok()).unwrap_or(0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&self, token: u64, record: &str) -> Result<(), Box<dyn Error>> {
        let highest = self.highest_token()?;
        if token < highest {
            return Err(format!("stale fencing token {token} (store has seen {highest})").into());
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{token}\n{record}\n"))?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    // Metrics on a Prometheus endpoint (OTEL_* variables apply); lock.kind = etcd.
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse()?)
        .init()?;
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let steps: u32 = args.next().map_or(Ok(20), |s| s.parse())?;
    let store = FencedStore {
        path: args
            .next()
            .map_or_else(|| Path::new("report.store").to_owned(), PathBuf::from),
    };

    let lock = EtcdLock::builder(&endpoint, "nightly-report")
        .ttl(Duration::from_secs(5))
        .connect()
        .await?;
    let guard = lock.lock().await?;
    let token = guard.fencing_token();
    println!("holding {} with fencing token {token}", guard.key());

    let work = async {
        for step in 1..=steps {
            // Check before every side effect; the storage checks the token again.
            if !guard.is_valid() {
                break;
            }
            store.write(token, &format!("report step {step}"))?;
            println!("wrote step {step} with fencing token {token}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<(), Box<dyn Error>>(())
    };
    let outcome = tokio::select! {
        r = work => Ok(r),
        reason = guard.invalidated() => Err(reason),
    };
    let code = match outcome {
        Ok(r) => {
            r?;
            guard.release().await?;
            println!("done; lock released");
            0
        }
        Err(reason) => {
            println!(
                "lock lost ({}): stopping before the next write",
                reason.as_str()
            );
            75
        }
    };
    telemetry.shutdown()?;
    std::process::exit(code);
}
