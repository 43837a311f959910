//! W3C trace context across NATS: the one place that reads and writes `traceparent` headers.
//!
//! One job is one trace, from the submitter (the gateway, or any NATS client that sets the
//! header) through the API service, the job's delivery token on the queue and the host's
//! `job` span to the worker's result.
//!
//! With an OpenTelemetry layer installed (the `shoal` binary installs one when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set), the spans are OpenTelemetry spans: an incoming
//! `traceparent` becomes the parent of the span that serves it ([`within`], [`set_parent`],
//! extracted by the W3C [`TraceContextPropagator`]), and [`inject`] writes the current span's
//! context into outgoing headers. Without one nothing is exported, and the `traceparent`
//! travels on in a task-local instead (a child span id per hop), so the trace id still follows
//! the job in the `trace_id` fields of spans and logs.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header name, on HTTP and on NATS.
pub const TRACEPARENT: &str = "traceparent";

tokio::task_local! {
    static CURRENT: String;
}

/// Whether an OpenTelemetry layer is installed: until [`enable_otel`] says so, nothing here
/// parses a header for it or asks a span for its context.
static OTEL: AtomicBool = AtomicBool::new(false);

/// Says the process installed the OpenTelemetry layer (the `shoal` binary does, when it
/// exports traces): spans follow incoming `traceparent`s, and [`inject`] sends theirs.
pub fn enable_otel() {
    OTEL.store(true, Ordering::Relaxed);
}

/// A new root: `00-<32 hex trace id>-<16 hex span id>-01`.
pub fn new_traceparent() -> String {
    format!("00-{}-{}-01", crate::random::trace_id(), crate::random::span_id())
}

/// The trace id of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && parts.next().is_none();
    (ok && trace.bytes().any(|b| b != b'0')).then_some(trace)
}

/// The same trace, a new span: what a hop sends on.
pub fn child(traceparent: &str) -> Option<String> {
    trace_id(traceparent).map(|trace| format!("00-{trace}-{}-01", crate::random::span_id()))
}

/// The `traceparent` of the task being served, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Serves `fut` in `span`, a child of the remote span `traceparent` (a new trace when absent
/// or malformed). The span's `trace_id` field, if it declares one, gets the trace id, and
/// [`current`] names the trace (what the gateway sends back): the span's own `traceparent`
/// with the OpenTelemetry layer, a child span id of the incoming one without.
pub async fn within<F: Future>(span: tracing::Span, traceparent: Option<&str>, fut: F) -> F::Output {
    let tp = match otel_follow(&span, traceparent.map(One)) {
        Some(own) => own,
        None => traceparent.and_then(child).unwrap_or_else(new_traceparent),
    };
    if let Some(trace) = trace_id(&tp) {
        span.record("trace_id", trace);
    }
    CURRENT.scope(tp, fut.instrument(span)).await
}

/// Makes `span` a child of the span in incoming NATS headers (when they carry one and the
/// OpenTelemetry layer is installed). Call it before the span is first entered.
pub fn set_parent(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(h) = headers {
        otel_follow(span, Some(NatsHeaders(h)));
    }
}

/// `traceparent` of incoming NATS headers.
pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers?.get(TRACEPARENT).map(|v| v.as_str().to_string())
}

/// The trace id of incoming NATS headers ("" without one), for span fields.
pub fn trace_id_of(headers: Option<&async_nats::HeaderMap>) -> String {
    from_headers(headers).as_deref().and_then(trace_id).unwrap_or_default().to_string()
}

/// Adds the current trace to outgoing NATS headers: the current OpenTelemetry span's context
/// when there is one, else a child span of the task's `traceparent`, else nothing.
pub fn inject(headers: &mut async_nats::HeaderMap) {
    if OTEL.load(Ordering::Relaxed) {
        let cx = tracing::Span::current().context();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&cx, &mut NatsHeadersMut(headers));
            return;
        }
    }
    if let Some(tp) = current().as_deref().and_then(child) {
        headers.insert(TRACEPARENT, tp.as_str());
    }
}

/// Sets the parent of an enabled `span` from `carrier` and returns the span's own
/// `traceparent`; `None` when the OpenTelemetry layer is not installed (or the span is off).
fn otel_follow(span: &tracing::Span, carrier: Option<impl Extractor>) -> Option<String> {
    if !OTEL.load(Ordering::Relaxed) || span.is_disabled() {
        return None;
    }
    if let Some(carrier) = carrier {
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            // fails only without the layer, and then the next line says so
            let _ = span.set_parent(parent);
        }
    }
    let cx = span.context();
    let own = cx.span();
    own.span_context().is_valid().then(|| format_traceparent(own.span_context()))
}

fn format_traceparent(cx: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", cx.trace_id(), cx.span_id(), cx.trace_flags().to_u8())
}

/// A carrier holding just a `traceparent` value (from an HTTP header).
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

struct NatsHeadersMut<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn traceparents_are_checked_and_children_keep_the_trace() {
        let root = new_traceparent();
        let trace = trace_id(&root).expect("well formed").to_string();
        let kid = child(&root).expect("child");
        assert_eq!(trace_id(&kid), Some(trace.as_str()));
        assert_ne!(kid, root, "a new span id");
        for bad in ["", "00-abc-def-01", "00-00000000000000000000000000000000-0000000000000001-01", "x"] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn without_opentelemetry_the_task_carries_the_trace_into_outgoing_headers() {
        assert_eq!(current(), None);
        let root = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = within(tracing::Span::none(), Some(root), async {
            let mut h = async_nats::HeaderMap::new();
            inject(&mut h);
            from_headers(Some(&h))
        })
        .await
        .expect("injected");
        assert_eq!(trace_id(&tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    /// A subscriber with the OpenTelemetry layer, its spans recorded by an SDK provider with
    /// no exporter.
    fn otel_subscriber() -> impl tracing::Subscriber + Send + Sync {
        enable_otel();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
    }

    #[test]
    fn a_span_follows_the_traceparent_of_nats_headers_and_injects_its_own() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TRACEPARENT, incoming);
        let sent = tracing::subscriber::with_default(otel_subscriber(), || {
            let span = tracing::info_span!("job");
            set_parent(&span, Some(&headers));
            let own = span.context().span().span_context().clone();
            let mut out = async_nats::HeaderMap::new();
            span.in_scope(|| inject(&mut out));
            (from_headers(Some(&out)).expect("injected"), format_traceparent(&own))
        });
        let (sent, own) = sent;
        assert_eq!(trace_id(&sent), Some("4bf92f3577b34da6a3ce929d0e0e4736"), "same trace: {sent}");
        assert_eq!(sent, own, "the span's own context goes out");
        assert!(!sent.contains("00f067aa0ba902b7"), "a new span id, not the parent's: {sent}");
    }

    #[tokio::test]
    async fn within_starts_a_trace_or_continues_one_and_names_it() {
        let _guard = tracing::subscriber::set_default(otel_subscriber());
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (tp, mut out) = within(tracing::info_span!("request"), Some(incoming), async {
            let mut out = async_nats::HeaderMap::new();
            inject(&mut out);
            (current().expect("in a trace"), out)
        })
        .await;
        assert_eq!(trace_id(&tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(from_headers(Some(&out)).as_deref(), Some(tp.as_str()), "the request span is what goes out");
        // no (or a malformed) traceparent: a new trace, still one the span and headers agree on
        for bad in [None, Some("00-zz-01")] {
            (_, out) = within(tracing::info_span!("request"), bad, async {
                let mut out = async_nats::HeaderMap::new();
                inject(&mut out);
                (current().expect("in a trace"), out)
            })
            .await;
            let sent = from_headers(Some(&out)).expect("injected");
            assert!(trace_id(&sent).is_some_and(|t| t != "4bf92f3577b34da6a3ce929d0e0e4736"), "{sent}");
        }
    }
}
