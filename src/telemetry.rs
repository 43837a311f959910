//! Logs and traces of the process: log lines (or JSON lines) on stderr, filtered by
//! `RUST_LOG`, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, the spans exported as OpenTelemetry traces over OTLP/HTTP by a batch exporter.
//!
//! The exporter reads the standard variables: `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`,
//! the default, or `http/json`; gRPC is not built in), `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`,
//! `OTEL_BSP_*` (batching), `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES` and
//! `OTEL_SERVICE_NAME` (by default the role: `shoal-control`, `shoal-host`, `shoal-gateway`,
//! `shoal-dev`, or `shoal-cli`). `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it
//! off. Without it no OpenTelemetry layer is installed, so spans cost what they cost before.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{EnvFilter, FilterFn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// What must outlive the process's work: the tracer provider, flushed by [`Telemetry::shutdown`].
#[must_use = "call shutdown() at the end, or spans still buffered are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber: the log layer, and the OpenTelemetry layer when an
    /// OTLP endpoint is configured. `service` is the default `service.name`.
    pub fn init(json: bool, default_filter: &str, service: &'static str) -> Telemetry {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
            vec![if json { fmt.json().with_filter(filter).boxed() } else { fmt.with_filter(filter).boxed() }];
        let (provider, error) = match exporter_wanted().then(|| provider(service)) {
            None => (None, None),
            Some(Ok(provider)) => (Some(provider), None),
            Some(Err(e)) => (None, Some(e)),
        };
        if let Some(provider) = &provider {
            let otel = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("shoal"))
                .with_filter(FilterFn::new(exported));
            layers.push(otel.boxed());
            shoal_actors::trace_context::enable_otel();
        }
        tracing_subscriber::registry().with(layers).init();
        if let Some(e) = error {
            tracing::warn!(error = %e, "cannot set up the OTLP exporter; traces are not exported");
        } else if provider.is_some() {
            tracing::debug!(service, "exporting traces over OTLP");
        }
        Telemetry { provider }
    }

    /// Exports what is still buffered and stops the exporter, waiting at most a few seconds
    /// for an unreachable collector. Call it outside the async runtime (the exporter's HTTP
    /// client blocks).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("warning: cannot flush the last traces: {e}");
        }
    }
}

/// An OTLP endpoint is set and the SDK is not disabled.
fn exporter_wanted() -> bool {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty());
    let endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
    endpoint.is_some()
        && var("OTEL_SDK_DISABLED").as_deref() != Some("true")
        && var("OTEL_TRACES_EXPORTER").as_deref() != Some("none")
}

/// A tracer provider with a batch OTLP exporter, configured by the `OTEL_*` variables.
fn provider(service: &'static str) -> Result<SdkTracerProvider, String> {
    if std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p.trim().eq_ignore_ascii_case("grpc")) {
        return Err("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not built in: use http/protobuf (port 4318)".into());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().build().map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// What the OpenTelemetry layer sees: shoal's spans down to debug (the API service's request
/// span is one) and no other crate's (ractor's lifelong `Actor` spans would make every span
/// of an actor one trace), events from info up as span events, and nothing of the exporter's
/// own stack (its HTTP client logging into the spans it exports would feed back).
fn exported(meta: &Metadata<'_>) -> bool {
    exported_kind(meta.target(), meta.is_span(), *meta.level())
}

fn exported_kind(target: &str, span: bool, level: Level) -> bool {
    let quiet = ["opentelemetry", "hyper", "reqwest", "h2", "tower", "async_nats"];
    if quiet.iter().any(|q| target.starts_with(q)) {
        return false;
    }
    match span {
        true => target.starts_with("shoal") && level <= Level::DEBUG,
        false => level <= Level::INFO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_takes_shoal_spans_and_leaves_the_exporter_alone() {
        assert!(exported_kind("shoal_actors::control::api", true, Level::DEBUG));
        assert!(!exported_kind("shoal_actors::control::api", true, Level::TRACE));
        assert!(!exported_kind("shoal_actors::control::api", false, Level::DEBUG), "debug events stay out");
        assert!(exported_kind("shoal_actors::host::take", false, Level::INFO));
        assert!(!exported_kind("ractor::actor", true, Level::INFO), "no one else's spans");
        assert!(exported_kind("ractor::actor", false, Level::WARN), "events in shoal's spans");
        assert!(!exported_kind("hyper_util::client", true, Level::INFO));
        assert!(!exported_kind("opentelemetry_sdk", false, Level::WARN));
    }
}
