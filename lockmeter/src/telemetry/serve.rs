//! Serving: the background runtime that runs the Prometheus endpoint and OTLP's gRPC client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use super::TelemetryError;

/// A current-thread tokio runtime on a thread of its own.
pub(super) struct BackgroundRuntime {
    pub(super) handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundRuntime {
    pub(super) fn start() -> Result<Self, TelemetryError> {
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lockmeter-telemetry".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        // Runs the server and gRPC connections until told to stop.
                        let _ = rt.block_on(stop_rx);
                        // Without waiting for what is left (a connection to a collector that
                        // never answered): stopping must not hang.
                        rt.shutdown_background();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(TelemetryError::Runtime)?;
        let handle = rx
            .recv()
            .map_err(|_| {
                TelemetryError::Runtime(std::io::Error::other("telemetry thread died at start"))
            })?
            .map_err(TelemetryError::Runtime)?;
        Ok(BackgroundRuntime {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub(super) fn serve_prometheus(
        &self,
        listener: std::net::TcpListener,
        registry: prometheus::Registry,
        scrapes: Arc<AtomicU64>,
    ) -> Result<(), TelemetryError> {
        let _enter = self.handle.enter();
        let addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    scrapes.fetch_add(1, Ordering::Relaxed);
                    async move { render_metrics(&registry) }
                }),
            )
            .route(
                "/debug/lockmeter/profile",
                axum::routing::get(|| async { render_profile() }),
            )
            .route(
                "/",
                axum::routing::get(|| async {
                    "lockmeter: metrics at /metrics, the lock profile at /debug/lockmeter/profile\n"
                }),
            );
        self.handle.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, %addr, "Prometheus endpoint stopped");
            }
        });
        Ok(())
    }
}

/// The lock profile ([`crate::profile::snapshot`]) as JSON.
fn render_profile() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match serde_json::to_vec_pretty(&crate::profile::snapshot()) {
        Ok(body) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the profile failed: {e}\n"),
        )
            .into_response(),
    }
}

fn render_metrics(registry: &prometheus::Registry) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use prometheus::Encoder as _;
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("lockmeter: telemetry thread panicked");
            }
        }
    }
}
