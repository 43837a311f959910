//! Prometheus metrics: one registry per process, a named function per event the actors
//! record (each call site is one line), and the `/metrics` HTTP endpoint.
//!
//! Where each metric comes from, so a reader knows which process to scrape:
//! - control (endpoint actor, on the replica owning the endpoint): `shoal_jobs_total`,
//!   `shoal_queue_depth`, `shoal_queue_oldest_wait_seconds`, `shoal_job_delay_seconds`,
//!   `shoal_job_execution_seconds`;
//! - control (scaler): `shoal_workers`, `shoal_scaler_decisions_total`;
//! - control (lease manager): `shoal_lease_owned`, `shoal_lease_acquisitions_total`;
//! - control (webhook dispatcher): `shoal_webhook_calls_total`;
//! - host (worker bridge): `shoal_bridge_requests_total`;
//! - host (worker actors): `shoal_worker_starts_total`, `shoal_worker_start_seconds`;
//! - gateway: `shoal_gateway_rate_limited_total`.
//!
//! Gauges of an endpoint are removed when this process stops owning it, so only the owner
//! reports them (sum over replicas gives the truth).

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_protocol::job::JobView;

use crate::control::scaling::Demand;
use crate::control::waiting::Fleet;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The worker states `shoal_workers` reports (those the scaler's fleet counts).
const WORKER_STATES: [&str; 5] = ["idle", "running", "initializing", "throttled", "unhealthy"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    endpoint: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    endpoint: String,
    decision: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabels {
    endpoint: String,
    /// `cold` or `warm` (a kept container started again).
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    endpoint: String,
    operation: String,
    limit: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    status: String,
}

type SecondsGauge = Gauge<f64, AtomicU64>;
type Seconds = Family<EndpointLabels, Histogram, fn() -> Histogram>;

/// 5 ms to about 164 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Worker starts: 10 ms to about 11 minutes (past RunPod's 7-minute init timeout), doubling.
fn start_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

struct Metrics {
    registry: Registry,
    jobs: Family<StateLabels, Counter>,
    queue_depth: Family<EndpointLabels, Gauge>,
    oldest_wait: Family<EndpointLabels, SecondsGauge>,
    delay: Seconds,
    execution: Seconds,
    workers: Family<StateLabels, Gauge>,
    scaler: Family<DecisionLabels, Counter>,
    lease_owned: Family<EndpointLabels, Gauge>,
    lease_acquisitions: Family<EndpointLabels, Counter>,
    webhooks: Family<OutcomeLabels, Counter>,
    bridge: Family<RouteLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    starts: Family<StartLabels, Counter>,
    start_seconds: Family<StartLabels, Histogram, fn() -> Histogram>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            jobs: Family::default(),
            queue_depth: Family::default(),
            oldest_wait: Family::default(),
            delay: Family::new_with_constructor(seconds_histogram),
            execution: Family::new_with_constructor(seconds_histogram),
            workers: Family::default(),
            scaler: Family::default(),
            lease_owned: Family::default(),
            lease_acquisitions: Family::default(),
            webhooks: Family::default(),
            bridge: Family::default(),
            rate_limited: Family::default(),
            starts: Family::default(),
            start_seconds: Family::new_with_constructor(start_histogram),
        };
        let mut r = m.registry;
        r.register("shoal_jobs", "Jobs that reached a terminal state, by state", m.jobs.clone());
        r.register("shoal_queue_depth", "Normal-priority jobs waiting in the queue", m.queue_depth.clone());
        r.register(
            "shoal_queue_oldest_wait_seconds",
            "How long the oldest queued normal-priority job has waited",
            m.oldest_wait.clone(),
        );
        r.register("shoal_job_delay_seconds", "Time from submission to a worker taking the job", m.delay.clone());
        r.register("shoal_job_execution_seconds", "Time a worker spent running the job", m.execution.clone());
        r.register("shoal_workers", "Workers by state, as the scaler saw them on its last tick", m.workers.clone());
        r.register("shoal_scaler_decisions", "Workers the scaler started, stopped or drained", m.scaler.clone());
        r.register("shoal_lease_owned", "1 while this replica owns the endpoint's lease", m.lease_owned.clone());
        r.register(
            "shoal_lease_acquisitions",
            "Endpoint leases this replica acquired (a failover is an acquisition after another owner)",
            m.lease_acquisitions.clone(),
        );
        r.register("shoal_webhook_calls", "Webhook calls by outcome (delivered, failed)", m.webhooks.clone());
        r.register("shoal_bridge_requests", "Worker bridge requests by route and status", m.bridge.clone());
        r.register(
            "shoal_worker_starts",
            "Workers that became ready (made their first job-take), by kind (cold, warm)",
            m.starts.clone(),
        );
        r.register(
            "shoal_worker_start_seconds",
            "Time from a worker's launch (image pull included) to its first job-take, by kind (cold, warm)",
            m.start_seconds.clone(),
        );
        r.register(
            "shoal_gateway_rate_limited",
            "Requests this gateway refused with 429 for an endpoint's rate limits, by operation and limit (rate, concurrent)",
            m.rate_limited.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

fn endpoint(id: &str) -> EndpointLabels {
    EndpointLabels { endpoint: id.to_string() }
}

/// A job reached a terminal state (counted once, by the endpoint's owner).
pub fn job_ended(endpoint_id: &str, job: &JobView) {
    let m = &*METRICS;
    m.jobs.get_or_create(&StateLabels { endpoint: endpoint_id.to_string(), state: job.state.as_str().into() }).inc();
    if let Some(ms) = job.delay_time_ms() {
        m.delay.get_or_create(&endpoint(endpoint_id)).observe(ms as f64 / 1000.0);
    }
    if let Some(ms) = job.execution_time_ms() {
        m.execution.get_or_create(&endpoint(endpoint_id)).observe(ms as f64 / 1000.0);
    }
}

/// The endpoint actor's view of its queue, each tick.
pub fn set_demand(endpoint_id: &str, demand: &Demand) {
    let m = &*METRICS;
    m.queue_depth.get_or_create(&endpoint(endpoint_id)).set(demand.queued as i64);
    let wait_s = demand.oldest_wait_ms.unwrap_or(0) as f64 / 1000.0;
    m.oldest_wait.get_or_create(&endpoint(endpoint_id)).set(wait_s);
}

/// The scaler's fleet, each tick.
pub fn set_fleet(endpoint_id: &str, fleet: &Fleet) {
    let counts = [fleet.idle, fleet.running, fleet.initializing, fleet.throttled, fleet.unhealthy];
    for (state, n) in WORKER_STATES.iter().zip(counts) {
        let labels = StateLabels { endpoint: endpoint_id.to_string(), state: (*state).to_string() };
        METRICS.workers.get_or_create(&labels).set(i64::from(n));
    }
}

/// This process stopped owning the endpoint: its gauges go, the new owner reports them.
pub fn forget_endpoint(endpoint_id: &str) {
    let m = &*METRICS;
    m.queue_depth.remove(&endpoint(endpoint_id));
    m.oldest_wait.remove(&endpoint(endpoint_id));
    for state in WORKER_STATES {
        m.workers.remove(&StateLabels { endpoint: endpoint_id.to_string(), state: state.to_string() });
    }
}

/// `decision`: `started`, `stopped` or `drained`.
pub fn scaler_decision(endpoint_id: &str, decision: &str) {
    let labels = DecisionLabels { endpoint: endpoint_id.to_string(), decision: decision.to_string() };
    METRICS.scaler.get_or_create(&labels).inc();
}

pub fn lease_acquired(endpoint_id: &str) {
    METRICS.lease_acquisitions.get_or_create(&endpoint(endpoint_id)).inc();
    METRICS.lease_owned.get_or_create(&endpoint(endpoint_id)).set(1);
}

pub fn lease_released(endpoint_id: &str) {
    METRICS.lease_owned.get_or_create(&endpoint(endpoint_id)).set(0);
}

/// `outcome`: `delivered` or `failed`.
pub fn webhook_outcome(endpoint_id: &str, outcome: &str) {
    let labels = OutcomeLabels { endpoint: endpoint_id.to_string(), outcome: outcome.to_string() };
    METRICS.webhooks.get_or_create(&labels).inc();
}

/// A worker of `endpoint_id` made its first job-take `seconds` after its launch began.
pub fn worker_ready(endpoint_id: &str, warm: bool, seconds: f64) {
    let labels =
        StartLabels { endpoint: endpoint_id.to_string(), kind: if warm { "warm" } else { "cold" }.to_string() };
    METRICS.starts.get_or_create(&labels).inc();
    METRICS.start_seconds.get_or_create(&labels).observe(seconds);
}

/// A gateway refused a request over `endpoint`'s `operation` limit (`limit`: `rate` or
/// `concurrent`).
pub fn gateway_rate_limited(endpoint_id: &str, operation: &str, limit: &str) {
    let labels =
        LimitLabels { endpoint: endpoint_id.to_string(), operation: operation.to_string(), limit: limit.to_string() };
    METRICS.rate_limited.get_or_create(&labels).inc();
}

pub fn bridge_request(route: &str, status: u16) {
    METRICS.bridge.get_or_create(&RouteLabels { route: route.to_string(), status: status.to_string() }).inc();
}

/// Axum middleware for the worker bridge: counts each request by route (the operation in
/// `/v2/{endpoint}/{operation}/...`) and status.
pub async fn track_bridge(req: Request, next: Next) -> Response {
    let route = req.uri().path().split('/').nth(3).unwrap_or("other").to_string();
    let response = next.run(req).await;
    bridge_request(&route, response.status().as_u16());
    response
}

/// Every metric of this process in the OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The `/metrics` handler.
pub async fn serve_metrics() -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()).into_response()
}

/// A listener serving only `/metrics` (control and host; the gateway serves it on its own
/// router). Stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MetricsServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route("/metrics", axum::routing::get(serve_metrics));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "metrics listener stopped");
            }
        });
        Ok(MetricsServer { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>/metrics`
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_events_show_up_in_the_text_format() {
        let fleet = Fleet { idle: 2, unhealthy: 1, ..Fleet::default() };
        set_fleet("metrics-unit", &fleet);
        scaler_decision("metrics-unit", "started");
        bridge_request("job-take", 204);
        let text = render();
        assert!(text.contains(r#"shoal_workers{endpoint="metrics-unit",state="idle"} 2"#), "{text}");
        assert!(text.contains(r#"shoal_workers{endpoint="metrics-unit",state="unhealthy"} 1"#), "{text}");
        assert!(text.contains(r#"shoal_scaler_decisions_total{endpoint="metrics-unit",decision="started"} 1"#));
        assert!(text.contains(r#"shoal_bridge_requests_total{route="job-take",status="204"}"#));
        forget_endpoint("metrics-unit");
        assert!(!render().contains(r#"endpoint="metrics-unit",state="idle""#));
        assert!(render().ends_with("# EOF\n"));
    }
}
