//! A Redis lock (`SET key token NX PX ttl`, released with a compare-and-delete script), taken
//! through the real `redis` client crate and measured with [`lockmeter::LockMeter`].

use std::time::{Duration, Instant};

use lockmeter::{Hold, LockMeter, LockMode};

/// Compare-and-delete: release only if the key still holds our token.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// A Redis lock on one key, with lockmeter measuring every acquire and hold.
pub struct RedisLock {
    conn: std::sync::Mutex<redis::Connection>,
    key: String,
    ttl: Duration,
    meter: LockMeter,
}

/// A held Redis lock; [`RedisGuard::release`] deletes the key if it is still ours.
pub struct RedisGuard<'a> {
    lock: &'a RedisLock,
    token: String,
    hold: Option<Hold<'a>>,
}

impl RedisLock {
    /// Connects to `url` for the lock `key` (TTL `ttl`); metrics go to `meter`.
    pub fn new(url: &str, key: &str, ttl: Duration, meter: LockMeter) -> redis::RedisResult<Self> {
        let conn = redis::Client::open(url)?.get_connection()?;
        Ok(RedisLock {
            conn: std::sync::Mutex::new(conn),
            key: key.to_owned(),
            ttl,
            meter,
        })
    }

    fn set_nx(&self, token: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let r: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query(&mut *conn)?;
        Ok(r.is_some())
    }

    /// One `SET NX` attempt: `Ok(None)` when another client holds the key.
    pub fn try_lock(&self) -> redis::RedisResult<Option<RedisGuard<'_>>> {
        let attempt = self.meter.start(LockMode::Exclusive);
        let token = new_token();
        match self.set_nx(&token) {
            Ok(true) => Ok(Some(self.guard(token, attempt.acquired(false)))),
            Ok(false) => {
                attempt.would_block();
                Ok(None)
            }
            Err(e) => {
                attempt.failed(&format!("{:?}", e.kind()));
                Err(e)
            }
        }
    }

    /// Retries `SET NX` every `poll` until acquired or `timeout` passes (`Ok(None)`).
    pub fn lock_timeout(
        &self,
        timeout: Duration,
        poll: Duration,
    ) -> redis::RedisResult<Option<RedisGuard<'_>>> {
        let attempt = self.meter.start(LockMode::Exclusive);
        let deadline = Instant::now() + timeout;
        let token = new_token();
        let mut contended = false;
        loop {
            match self.set_nx(&token) {
                Ok(true) => return Ok(Some(self.guard(token, attempt.acquired(contended)))),
                Ok(false) => {
                    if !contended {
                        contended = true;
                        attempt.conflict();
                    }
                }
                Err(e) => {
                    attempt.failed(&format!("{:?}", e.kind()));
                    return Err(e);
                }
            }
            if Instant::now() >= deadline {
                attempt.timed_out();
                return Ok(None);
            }
            std::thread::sleep(poll);
        }
    }

    fn guard<'a>(&'a self, token: String, hold: Hold<'a>) -> RedisGuard<'a> {
        RedisGuard {
            lock: self,
            token,
            hold: Some(hold),
        }
    }
}

impl RedisGuard<'_> {
    /// Releases the lock; `Ok(false)` if the key had expired or belonged to someone else by
    /// then (the TTL ran out while we held it), which is counted as a failed release.
    pub fn release(mut self) -> redis::RedisResult<bool> {
        let hold = self.hold.take();
        let mut conn = self.lock.conn.lock().unwrap_or_else(|p| p.into_inner());
        let r: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.lock.key)
            .arg(&self.token)
            .query(&mut *conn);
        match (r, hold) {
            (Ok(1), Some(h)) => {
                h.released();
                Ok(true)
            }
            (Ok(_), Some(h)) => {
                h.release_failed("NotOwner");
                Ok(false)
            }
            (Err(e), Some(h)) => {
                h.release_failed(&format!("{:?}", e.kind()));
                Err(e)
            }
            (r, None) => r.map(|n| n == 1),
        }
    }
}

fn new_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
