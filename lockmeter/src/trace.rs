//! `tracing` spans for acquires and holds.
//!
//! Each acquire is an INFO span `lock.acquire` and each hold an INFO span `lock.hold`, with the
//! metric schema's attributes as fields (dots kept, as OpenTelemetry attribute keys). With no
//! subscriber interested, creating one is a level check and returns a disabled span: the hot
//! path pays a relaxed load, nothing more. With `tracing-opentelemetry` installed (the
//! `telemetry` feature does it when traces are exported) they become OTel spans.

use tracing::field::Empty;
use tracing::Span;

use crate::metrics::{LockMode, Outcome};

/// Static attributes of a lock, for its spans.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpanAttrs<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) fs_type: Option<&'a str>,
}

#[inline]
pub(crate) fn acquire(a: SpanAttrs<'_>, mode: LockMode) -> Span {
    let span = tracing::info_span!(
        target: "lockmeter",
        "lock.acquire",
        lock.name = a.name,
        lock.kind = a.kind,
        lock.mode = mode.as_str(),
        fs.type = Empty,
        lock.outcome = Empty,
        lock.contended = Empty,
    );
    if let Some(fs) = a.fs_type {
        if !span.is_disabled() {
            span.record("fs.type", fs);
        }
    }
    span
}

/// Records how an acquire ended.
#[inline]
pub(crate) fn acquire_done(span: &Span, outcome: Outcome, contended: bool) {
    if !span.is_disabled() {
        span.record("lock.outcome", outcome.as_str());
        span.record("lock.contended", contended);
    }
}

#[inline]
pub(crate) fn hold(a: SpanAttrs<'_>, mode: LockMode, contended: bool) -> Span {
    let span = tracing::info_span!(
        target: "lockmeter",
        "lock.hold",
        lock.name = a.name,
        lock.kind = a.kind,
        lock.mode = mode.as_str(),
        lock.contended = contended,
        fs.type = Empty,
    );
    if let Some(fs) = a.fs_type {
        if !span.is_disabled() {
            span.record("fs.type", fs);
        }
    }
    span
}
