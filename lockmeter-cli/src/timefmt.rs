//! Times for people: local timestamps and short ages ("3m12s").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `2026-12-01 14:07:17 +0100`: `t` in the local time zone (`TZ`, else `/etc/localtime`).
/// Falls back to UTC seconds since the epoch if the C library cannot convert it.
pub fn local_timestamp(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs(),
        Err(_) => return format!("{t:?}"),
    };
    let Ok(time) = libc::time_t::try_from(secs) else {
        return format!("{secs} s after the epoch");
    };
    // SAFETY: an all-zero `tm` is a valid value for `localtime_r` to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `time` and `tm` are valid for the call; `localtime_r` is thread-safe and reads
    // the time zone (`TZ`) itself.
    let r = unsafe { libc::localtime_r(&time, &mut tm) };
    if r.is_null() {
        return format!("{secs} s after the epoch (UTC)");
    }
    let off = tm.tm_gmtoff;
    let sign = if off < 0 { '-' } else { '+' };
    let off = off.unsigned_abs();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        off / 3600,
        (off % 3600) / 60,
    )
}

/// `850ms`, `12s`, `3m12s`, `2h05m`, `3d04h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Seconds as flock(1) prints them (`2.000001`), for `--verbose`.
pub fn flock_seconds(d: Duration) -> String {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(Duration::from_millis(850)), "850ms");
        assert_eq!(age(Duration::from_secs(12)), "12s");
        assert_eq!(age(Duration::from_secs(192)), "3m12s");
        assert_eq!(age(Duration::from_secs(2 * 3600 + 5 * 60 + 7)), "2h05m");
        assert_eq!(age(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d04h");
        assert_eq!(flock_seconds(Duration::from_micros(2_000_001)), "2.000001");
    }
}
