//! Times for people.

use std::time::Duration;

/// Seconds as flock(1) prints them (`2.000001`), for `--verbose`.
pub fn flock_seconds(d: Duration) -> String {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_as_flock_prints_them() {
        assert_eq!(flock_seconds(Duration::from_micros(2_000_001)), "2.000001");
    }
}
