//! `lockmeter locks`: the lock table for people (like `lslocks`, plus hold age, waiters, kind
//! and file-system trust) and for scripts (`--json`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::model::Row;

/// A duration as `750ms`, `12s`, `5m03s`, `2h10m`, `3d4h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    }
}

/// The hold-age cell: `≥12s` once seen by two samples (watch mode), otherwise `≤5m03s` (the
/// holder process's age: `/proc/locks` has no timestamps), or `?`.
pub fn age_cell(r: &Row) -> String {
    match (r.hold_age_min_s, r.hold_age_max_s) {
        (Some(min), _) => format!("≥{}", human(Duration::from_secs_f64(min))),
        (None, Some(max)) => format!("≤{}", human(Duration::from_secs_f64(max))),
        _ => "?".to_owned(),
    }
}

/// Renders rows as a table with a header; waiters are listed under their lock.
pub fn render(rows: &[Row]) -> String {
    let mut cells: Vec<[String; 9]> = vec![[
        "COMMAND".into(),
        "PID".into(),
        "KIND".into(),
        "MODE".into(),
        "HELD FOR".into(),
        "WAITERS".into(),
        "FS".into(),
        "TRUST".into(),
        "PATH".into(),
    ]];
    let mut waiter_lines: Vec<(usize, String)> = Vec::new();
    for r in rows {
        let (cmd, pid) = match r.holders.as_slice() {
            [] => ("?".to_owned(), "-".to_owned()),
            [h] => (h.command.clone(), h.pid.to_string()),
            [h, rest @ ..] => (h.command.clone(), format!("{}+{}", h.pid, rest.len())),
        };
        let mut path = r
            .path
            .clone()
            .unwrap_or_else(|| format!("(unknown: inode {}:{})", r.dev, r.inode));
        if r.range != "0-EOF" {
            let _ = write!(path, " [bytes {}]", r.range);
        }
        if let Some(m) = r.migrated {
            let _ = write!(path, " (MIGRATED: {m})");
        }
        cells.push([
            cmd,
            pid,
            r.kind.as_str().to_owned(),
            r.mode.to_owned(),
            age_cell(r),
            r.waiters.len().to_string(),
            r.fs_type.clone().unwrap_or_else(|| "?".into()),
            r.fs_trust.unwrap_or("?").to_owned(),
            path,
        ]);
        let row_index = cells.len() - 1;
        for w in &r.waiters {
            waiter_lines.push((
                row_index,
                format!(
                    "  └ waiting: {} pid {} wants {}",
                    w.command.as_deref().unwrap_or("?"),
                    w.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    w.mode
                ),
            ));
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in cells.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 8 {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        for (_, w) in waiter_lines.iter().filter(|(ri, _)| *ri == i) {
            out.push_str(w);
            out.push('\n');
        }
    }
    if rows.is_empty() {
        out.push_str("(no file locks on this host, or none matching --include/--exclude)\n");
    }
    out
}
