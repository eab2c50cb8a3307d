//! Where measurements go: a [`Sink`] is the schema's instruments on one meter, and the
//! registry of locks whose counts that meter's provider reads at collection time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use opentelemetry::metrics::{Counter, Histogram, Meter};
use parking_lot::Mutex;

use super::schema::{instruments, names, DEFAULT_BOUNDARIES, SCOPE};
use super::series::Registry;

/// Where locks record: the global meter provider (the default) or one meter of your own.
///
/// Locks created with [`Sink::global`] record into whatever provider
/// `opentelemetry::global::set_meter_provider` installed, *including one installed after the
/// lock was created*: counts are read from the locks when the SDK collects, so they are
/// complete from the lock's creation; wait and hold times start at the lock's next timed
/// acquisition after the provider appears (see the crate docs on set-up order).
///
/// For a provider that is not global (tests, several pipelines in one process), create one
/// `Sink` per provider with [`Sink::new`] and pass clones of it to every lock builder. Two
/// sinks on one provider each register the count callbacks, and locks of the same name in
/// both would overwrite each other's counts (the SDK keeps one observation per series).
///
/// ```
/// use opentelemetry::metrics::MeterProvider as _;
/// use opentelemetry_sdk::metrics::SdkMeterProvider;
///
/// let provider = SdkMeterProvider::builder().build();
/// let sink = lockmeter::metrics::Sink::new(provider.meter(lockmeter::metrics::SCOPE));
/// let cache = lockmeter::sync::Mutex::builder("cache").sink(sink.clone()).build(0u32);
/// *cache.lock().unwrap() += 1;
/// ```
#[derive(Clone)]
pub struct Sink(Target);

#[derive(Clone)]
enum Target {
    Global,
    Meter(Arc<Instruments>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Target::Global => f.write_str("Sink(global)"),
            Target::Meter(_) => f.write_str("Sink(meter)"),
        }
    }
}

impl Default for Sink {
    fn default() -> Self {
        Sink::global()
    }
}

impl Sink {
    /// The global meter provider, followed as it changes.
    pub fn global() -> Sink {
        Sink(Target::Global)
    }

    /// One meter (normally `provider.meter(lockmeter::metrics::SCOPE)`): registers the count
    /// callbacks on its provider. Create one per provider and share clones.
    pub fn new(meter: Meter) -> Sink {
        Sink(Target::Meter(Arc::new(Instruments::new(
            &meter,
            Registry::shared(),
            false,
        ))))
    }

    /// Whether this sink follows the global provider.
    pub(crate) fn is_global(&self) -> bool {
        matches!(self.0, Target::Global)
    }

    /// The instruments to record into now (for the global sink: those of the provider
    /// installed now, created on first use).
    pub(crate) fn instruments(&self) -> Arc<Instruments> {
        match &self.0 {
            Target::Global => global_instruments(),
            Target::Meter(i) => Arc::clone(i),
        }
    }

    /// The registry whose counts this sink's provider reads.
    pub(crate) fn registry(&self) -> Arc<Registry> {
        match &self.0 {
            Target::Global => Arc::clone(&GLOBAL_REGISTRY),
            Target::Meter(i) => Arc::clone(&i.registry),
        }
    }
}

/// The schema's instruments on one meter. The counts (`lock.acquisitions`, `lock.conflicts`,
/// `lock.held`) are observable instruments reading `registry`; the rest are recorded as they
/// happen.
pub(crate) struct Instruments {
    pub(crate) duration: Histogram<f64>,
    pub(crate) wait: Histogram<f64>,
    pub(crate) errors: Counter<u64>,
    pub(crate) migrations: Counter<u64>,
    pub(crate) violations: Counter<u64>,
    pub(crate) lost: Counter<u64>,
    registry: Arc<Registry>,
    /// Built on a provider that keeps no state (the global no-op before one is installed):
    /// nothing recorded here goes anywhere.
    pub(crate) noop: bool,
}

impl Instruments {
    fn new(meter: &Meter, registry: Arc<Registry>, noop: bool) -> Instruments {
        let r = Arc::clone(&registry);
        meter
            .u64_observable_counter(names::ACQUISITIONS)
            .with_unit(instruments::ACQUISITIONS.unit)
            .with_description(instruments::ACQUISITIONS.description)
            .with_callback(move |obs| r.observe_acquisitions(obs))
            .build();
        let r = Arc::clone(&registry);
        meter
            .u64_observable_counter(names::CONFLICTS)
            .with_unit(instruments::CONFLICTS.unit)
            .with_description(instruments::CONFLICTS.description)
            .with_callback(move |obs| r.observe_conflicts(obs))
            .build();
        let r = Arc::clone(&registry);
        meter
            .i64_observable_up_down_counter(names::HELD)
            .with_unit(instruments::HELD.unit)
            .with_description(instruments::HELD.description)
            .with_callback(move |obs| r.observe_held(obs))
            .build();
        Instruments {
            duration: meter
                .f64_histogram(names::DURATION)
                .with_unit(instruments::DURATION.unit)
                .with_description(instruments::DURATION.description)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            wait: meter
                .f64_histogram(names::WAIT_DURATION)
                .with_unit(instruments::WAIT_DURATION.unit)
                .with_description(instruments::WAIT_DURATION.description)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            errors: meter
                .u64_counter(names::ERRORS)
                .with_unit(instruments::ERRORS.unit)
                .with_description(instruments::ERRORS.description)
                .build(),
            migrations: meter
                .u64_counter(names::INODE_MIGRATIONS)
                .with_unit(instruments::INODE_MIGRATIONS.unit)
                .with_description(instruments::INODE_MIGRATIONS.description)
                .build(),
            violations: meter
                .u64_counter(names::VIOLATIONS)
                .with_unit(instruments::VIOLATIONS.unit)
                .with_description(instruments::VIOLATIONS.description)
                .build(),
            lost: meter
                .u64_counter(names::LOST)
                .with_unit(instruments::LOST.unit)
                .with_description(instruments::LOST.description)
                .build(),
            registry,
            noop,
        }
    }
}

/// Locks recording into the global provider, whichever it is.
static GLOBAL_REGISTRY: LazyLock<Arc<Registry>> = LazyLock::new(Registry::shared);

/// Whether any lock recording into the global provider has counted anything.
#[cfg(feature = "telemetry")]
pub(crate) fn global_has_counts() -> bool {
    GLOBAL_REGISTRY.has_counts()
}

/// The global provider lockmeter last saw, and the instruments created on it. The provider is
/// kept alive here so that a new one cannot reuse its address unnoticed.
struct Global {
    provider: Arc<dyn opentelemetry::metrics::MeterProvider + Send + Sync>,
    instruments: Arc<Instruments>,
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);

/// The instruments of the global provider installed now; if it changed since last asked,
/// creates them on the new provider (which registers the count callbacks there).
pub(crate) fn global_instruments() -> Arc<Instruments> {
    let provider = opentelemetry::global::meter_provider();
    let mut g = GLOBAL.lock();
    if let Some(cur) = &*g {
        if Arc::ptr_eq(&cur.provider, &provider) {
            return Arc::clone(&cur.instruments);
        }
    }
    // A provider that keeps no state cannot export anything: the API's no-op provider.
    let noop = std::mem::size_of_val(&*provider) == 0;
    let instruments = Arc::new(Instruments::new(
        &provider.meter(SCOPE),
        Arc::clone(&GLOBAL_REGISTRY),
        noop,
    ));
    let replaced_noop = g.as_ref().is_some_and(|old| old.instruments.noop);
    *g = Some(Global {
        provider,
        instruments: Arc::clone(&instruments),
    });
    drop(g);
    if replaced_noop && !noop {
        late_provider_notice();
    }
    instruments
}

/// The instruments of the global provider installed now if lockmeter has already made them,
/// without making any and without waiting: safe from inside a collection, where making
/// instruments (or waiting for a thread that is making them, [`global_instruments`] holds
/// the lock meanwhile) would wait for the collection itself. `None` when unknown or busy.
pub(crate) fn known_global_instruments() -> Option<Arc<Instruments>> {
    let provider = opentelemetry::global::meter_provider();
    let g = GLOBAL.try_lock()?;
    g.as_ref()
        .filter(|cur| Arc::ptr_eq(&cur.provider, &provider))
        .map(|cur| Arc::clone(&cur.instruments))
}

/// Said once: a provider was installed after locks had already counted.
#[cold]
fn late_provider_notice() {
    static SAID: AtomicBool = AtomicBool::new(false);
    if GLOBAL_REGISTRY.has_counts() && !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "lockmeter: a meter provider was installed after locks had been used; their counts \
             are complete, but the wait and hold times of acquisitions made before it were not \
             recorded. Install it (lockmeter::telemetry::init() does) before the first lock is \
             taken; a provider of your own wants lockmeter::metrics::refresh() right after it."
        );
    }
}
