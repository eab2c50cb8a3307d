//! `tracing` spans for file lock acquires and holds.
//!
//! Per-acquisition spans (`lock.acquire`, `lock.hold`, with the metric schema's attributes as
//! fields) cost more than the lock itself once a subscriber listens, and most services run one
//! at `INFO`. So they are `TRACE` spans, created only when `TRACE` is enabled for target
//! `lockmeter` or when a lock asks for them ([`FileLockBuilder::spans`]), in which case they
//! are `INFO` spans. With `tracing-opentelemetry` installed they become OTel spans. No other
//! log level changes which path a lock takes.
//!
//! [`FileLockBuilder::spans`]: crate::FileLockBuilder::spans

use tracing::field::Empty;
use tracing::{Level, Span};

use crate::kind::LockMode;
use crate::metrics::Outcome;

/// Static attributes of a lock, for its spans.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpanAttrs<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) fs_type: Option<&'a str>,
}

/// Whether acquisitions of a lock create spans: asked for (`forced`), or `TRACE` enabled for
/// target `lockmeter`. With `TRACE` statically or dynamically off this is a load and a compare.
#[inline(always)]
pub(crate) fn per_acquisition(forced: bool) -> bool {
    forced || tracing::enabled!(target: "lockmeter", Level::TRACE)
}

/// The `lock.acquire` span (disabled unless [`per_acquisition`]).
#[inline]
pub(crate) fn acquire(a: SpanAttrs<'_>, mode: LockMode, forced: bool) -> Span {
    let span = if forced {
        tracing::info_span!(
            target: "lockmeter",
            "lock.acquire",
            lock.name = a.name,
            lock.kind = a.kind,
            lock.mode = mode.as_str(),
            fs.type = Empty,
            lock.outcome = Empty,
            lock.contended = Empty,
        )
    } else {
        tracing::trace_span!(
            target: "lockmeter",
            "lock.acquire",
            lock.name = a.name,
            lock.kind = a.kind,
            lock.mode = mode.as_str(),
            fs.type = Empty,
            lock.outcome = Empty,
            lock.contended = Empty,
        )
    };
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

/// The `lock.hold` span (disabled unless [`per_acquisition`]).
#[inline]
pub(crate) fn hold(a: SpanAttrs<'_>, mode: LockMode, contended: bool, forced: bool) -> Span {
    let span = if forced {
        tracing::info_span!(
            target: "lockmeter",
            "lock.hold",
            lock.name = a.name,
            lock.kind = a.kind,
            lock.mode = mode.as_str(),
            lock.contended = contended,
            fs.type = Empty,
        )
    } else {
        tracing::trace_span!(
            target: "lockmeter",
            "lock.hold",
            lock.name = a.name,
            lock.kind = a.kind,
            lock.mode = mode.as_str(),
            lock.contended = contended,
            fs.type = Empty,
        )
    };
    if let Some(fs) = a.fs_type {
        if !span.is_disabled() {
            span.record("fs.type", fs);
        }
    }
    span
}
