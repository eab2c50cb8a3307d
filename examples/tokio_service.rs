//! An HTTP service whose handler takes a tokio lock, exporting through lockmeter's telemetry
//! set-up: `cargo run --example tokio_service` serves until Ctrl-C (metrics on
//! 127.0.0.1:9464/metrics or OTEL_EXPORTER_PROMETHEUS_*, OTLP when OTEL_EXPORTER_OTLP_ENDPOINT
//! is set); `cargo run --example tokio_service -- --self-test 200` sends itself 200 concurrent
//! requests, prints the lock's metrics and exits.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use lockmeter::tokio::Mutex;

#[derive(Default)]
struct Inventory {
    reserved: u64,
}

async fn reserve(State(inv): State<Arc<Mutex<Inventory>>>) -> String {
    let mut inv = inv.lock().await; // lock.kind = tokio_mutex, lock.name = inventory
    inv.reserved += 1;
    // Work done while holding the lock (a database round trip, say).
    tokio::time::sleep(Duration::from_millis(1)).await;
    format!("reserved {}\n", inv.reserved)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let self_test: Option<usize> = std::env::args()
        .skip_while(|a| a != "--self-test")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?;
    let mut builder = lockmeter::telemetry::Telemetry::builder().service_name("tokio-service");
    if self_test.is_some() {
        builder = builder.prometheus_addr("127.0.0.1:0".parse()?);
    }
    let telemetry = builder.init()?;

    let inventory = Arc::new(Mutex::named("inventory", Inventory::default()));
    let app = axum::Router::new()
        .route("/reserve", get(reserve))
        .with_state(inventory);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("serving http://{addr}/reserve");
    if let Some(addr) = telemetry.prometheus_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    match self_test {
        None => {
            tokio::signal::ctrl_c().await?;
        }
        Some(n) => {
            let client = reqwest::Client::new();
            let url = format!("http://{addr}/reserve");
            let requests: Vec<_> = (0..n)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move { client.get(&url).send().await?.text().await })
                })
                .collect();
            for r in requests {
                r.await??;
            }
            telemetry.flush()?;
            let metrics_url = telemetry
                .prometheus_addr()
                .map(|a| format!("http://{a}/metrics"))
                .ok_or("no metrics endpoint")?;
            let body = client.get(&metrics_url).send().await?.text().await?;
            for line in body.lines().filter(|l| {
                l.contains("lock_name=\"inventory\"")
                    && (l.starts_with("lock_acquisitions_total")
                        || l.starts_with("lock_conflicts_total"))
            }) {
                println!("{line}");
            }
        }
    }
    server.abort();
    Ok(())
}
