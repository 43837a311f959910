//! W3C trace context across NATS: the `traceparent` of the request being served travels in
//! a task-local, so the NATS API client, the API service and the job queue carry it in their
//! message headers without threading it through every signature. One job is one trace id,
//! from the submitter (gateway, or any NATS client that sets the header) to the host that
//! takes it. No exporter yet: the trace id is a field of the spans and logs on the way.

use std::future::Future;

/// The header name, on HTTP and on NATS.
pub const TRACEPARENT: &str = "traceparent";

tokio::task_local! {
    static CURRENT: String;
}

/// A new root: `00-<32 hex trace id>-<16 hex span id>-01`.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", span_id())
}

fn span_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
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
    trace_id(traceparent).map(|trace| format!("00-{trace}-{}-01", span_id()))
}

/// The `traceparent` of the task being served, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `fut` inside the trace `traceparent` (a new one when absent or malformed).
pub async fn scope<F: Future>(traceparent: Option<&str>, fut: F) -> F::Output {
    let tp = traceparent.and_then(child).unwrap_or_else(new_traceparent);
    CURRENT.scope(tp, fut).await
}

/// `traceparent` of incoming NATS headers.
pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers?.get(TRACEPARENT).map(|v| v.as_str().to_string())
}

/// The trace id of the current trace ("" outside one), for span fields.
pub fn current_trace_id() -> String {
    current().as_deref().and_then(trace_id).unwrap_or_default().to_string()
}

/// The trace id of incoming NATS headers ("" without one), for span fields.
pub fn trace_id_of(headers: Option<&async_nats::HeaderMap>) -> String {
    from_headers(headers).as_deref().and_then(trace_id).unwrap_or_default().to_string()
}

/// Adds the current trace (a child span of it) to outgoing NATS headers.
pub fn inject(headers: &mut async_nats::HeaderMap) {
    if let Some(tp) = current().as_deref().and_then(child) {
        headers.insert(TRACEPARENT, tp.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn the_scope_carries_the_trace_into_outgoing_headers() {
        assert_eq!(current(), None);
        let root = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = scope(Some(root), async {
            let mut h = async_nats::HeaderMap::new();
            inject(&mut h);
            from_headers(Some(&h))
        })
        .await
        .expect("injected");
        assert_eq!(trace_id(&tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }
}
