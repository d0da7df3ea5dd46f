//! Logging for both binaries: the text or JSON log lines on stderr and, when
//! an endpoint is given (`--otlp-endpoint`), an OpenTelemetry exporter that
//! sends the same `tracing` spans (RPC handlers, rounds) to an OTLP collector
//! over gRPC.
//!
//! The exporter never stands in training's way: spans go through the SDK's
//! batch processor (a bounded queue drained by its own thread; when the queue
//! is full, spans are dropped), and the gRPC client runs on a small runtime
//! of its own, not on the binary's. An unreachable collector costs a warning
//! (one when exports start failing, one when they work again), never an
//! error. [`Telemetry::shutdown`] flushes what is queued, bounded in time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

/// What the log layer of a binary sits on: the `RUST_LOG` filter over the registry.
pub type Subscriber = Layered<EnvFilter, Registry>;

/// A binary's log layer (its own text or JSON format), boxed.
pub type LogLayer = Box<dyn Layer<Subscriber> + Send + Sync>;

/// How long one export may take, retries included; the gRPC channel's
/// request timeout (which also bounds connecting) is the same.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Telemetry::shutdown`] waits for the last batch.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Crates whose spans are never exported: the exporter's own transport, so
/// that `RUST_LOG=debug` cannot make it export its own exports.
const NEVER_EXPORTED: [&str; 7] = [
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
];

/// Checks an `--otlp-endpoint` value: an `http://` or `https://` URL with a
/// host, e.g. `http://otel-collector:4317` (OTLP over gRPC).
pub fn parse_endpoint(value: &str) -> Result<String, String> {
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| format!("{value:?} is not a URL such as http://127.0.0.1:4317"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{value:?}: the scheme must be http or https (OTLP over gRPC)"
        ));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{value:?} names no host"));
    }
    // The exporter's own check, so that a value accepted here is one it takes.
    tonic::transport::Endpoint::from_shared(value.to_string())
        .map_err(|e| format!("{value:?} is not a valid URL: {e}"))?;
    Ok(value.to_string())
}

/// The installed logging; keep it until the end of `main` and call
/// [`Telemetry::shutdown`] there (outside any async context).
#[must_use = "call shutdown() at the end of main so the last spans are sent"]
pub struct Telemetry {
    otlp: Option<Otlp>,
}

struct Otlp {
    provider: SdkTracerProvider,
    // The gRPC channel's background tasks run here.
    runtime: tokio::runtime::Runtime,
    endpoint: String,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otlp", &self.otlp.as_ref().map(|o| &o.endpoint))
            .finish()
    }
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), the binary's
/// `log_layer`, and with `otlp_endpoint` an OTLP span exporter whose
/// resource has `service.name` = `service_name` and `service.version` =
/// `version`. If the exporter cannot be set up, that is logged as a
/// warning and the binary runs on without it.
pub fn install(
    service_name: &'static str,
    version: &'static str,
    otlp_endpoint: Option<&str>,
    log_layer: LogLayer,
) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (otlp, failure) = match otlp_endpoint {
        Some(endpoint) => match Otlp::start(service_name, version, endpoint) {
            Ok(otlp) => (Some(otlp), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let mut layers: Vec<LogLayer> = vec![log_layer];
    if let Some(otlp) = &otlp {
        let never = NEVER_EXPORTED
            .iter()
            .fold(Targets::new().with_default(LevelFilter::TRACE), |t, c| {
                t.with_target(*c, LevelFilter::OFF)
            });
        layers.push(Box::new(
            tracing_opentelemetry::layer()
                .with_tracer(otlp.provider.tracer(service_name))
                .with_filter(never),
        ));
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .init();
    if let Some(otlp) = &otlp {
        info!(endpoint = %otlp.endpoint, service = service_name, "exporting spans over OTLP");
    }
    if let Some(e) = failure {
        warn!(error = format!("{e:#}"), "OTLP span export is off");
    }
    Telemetry { otlp }
}

impl Otlp {
    fn start(
        service_name: &'static str,
        version: &'static str,
        endpoint: &str,
    ) -> anyhow::Result<Otlp> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .context("cannot start the OTLP exporter's runtime")?;
        // The tonic channel spawns its connection task on the current runtime.
        let exporter = {
            let _entered = runtime.enter();
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT);
            if endpoint.starts_with("https://") {
                // The exporter's own default TLS has no trusted roots.
                builder = builder
                    .with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
            }
            builder
                .build()
                .with_context(|| format!("cannot set up the OTLP exporter for {endpoint}"))?
        };
        let resource = Resource::builder()
            .with_service_name(service_name)
            .with_attribute(opentelemetry::KeyValue::new("service.version", version))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(WarnOnFailure::new(exporter, endpoint))
            .with_resource(resource)
            .build();
        Ok(Otlp {
            provider,
            runtime,
            endpoint: endpoint.to_string(),
        })
    }
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.otlp.is_some()
    }

    /// Sends the spans still queued (waiting at most a few seconds) and stops
    /// the exporter. Call it from `main`, not from inside a runtime.
    pub fn shutdown(self) {
        let Some(otlp) = self.otlp else {
            return;
        };
        if let Err(e) = otlp.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            warn!(endpoint = %otlp.endpoint, error = %e, "the last spans were not exported");
        }
        otlp.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The OTLP exporter, logging a warning when exports start failing and an
/// info line when they work again (not one line per failed batch).
#[derive(Debug)]
struct WarnOnFailure<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> WarnOnFailure<E> {
    fn new(inner: E, endpoint: &str) -> Self {
        WarnOnFailure {
            inner,
            endpoint: endpoint.to_string(),
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnFailure<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => warn!(
                endpoint = %self.endpoint,
                spans,
                error = %e,
                "cannot export spans to the OTLP collector; dropping them until it answers"
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                info!(endpoint = %self.endpoint, "exporting spans to the OTLP collector again")
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_endpoint, Otlp};

    #[test]
    fn exporters_for_http_and_https_collectors_build_without_connecting() {
        for endpoint in ["http://127.0.0.1:4317", "https://localhost:4317"] {
            let otlp = Otlp::start("cohort-test", "0", endpoint).expect(endpoint);
            otlp.provider.shutdown().expect(endpoint);
        }
    }

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(parse_endpoint("https://collector.example:4317").is_ok());
        assert!(parse_endpoint("127.0.0.1:4317").is_err());
        assert!(parse_endpoint("grpc://127.0.0.1:4317").is_err());
        assert!(parse_endpoint("http://").is_err());
        assert!(parse_endpoint("http://bad host:4317").is_err());
    }
}
