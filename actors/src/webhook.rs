//! The webhook dispatcher: when a job with a `webhook` reaches a terminal state, POST the
//! status envelope (plus the job's `input` and `webhook`, as RunPod does) to that URL.
//!
//! - **Once per terminal state, across replicas.** Every control replica runs a dispatcher;
//!   all of them pull from one durable JetStream consumer of the "webhook due" events (the
//!   terminal job event, published again only for jobs that have a webhook, so jobs without
//!   one cost the dispatchers nothing; work queue semantics), so each event is handled by one
//!   replica. A replica that dies mid-call
//!   leaves the event unacknowledged and another replica takes it over after the ack wait;
//!   the outcome recorded on the job record keeps that redelivery from calling twice.
//! - **Retries.** Any 2xx is a success; otherwise (or on a connection error or timeout) the
//!   call is retried `retries` more times, `retry_delay_ms` apart (RunPod: 2 more, 10 s apart).
//! - **Signature.** With a `secret`, each call carries `X-Shoal-Timestamp: <unix seconds>` and
//!   `X-Shoal-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, so a receiver
//!   can check the body came from shoal and is fresh ([`verify`]). RunPod does not sign.
//! - **Outcome.** Recorded on the job record (`webhook_delivery`, shown by `status`) and as a
//!   `WebhookEvent` on `<prefix>.events.webhook.<endpoint>.<job id>.<delivered|failed>`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use shoal_protocol::api::JobStatus;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::events::{JobEvent, WebhookEvent};
use shoal_protocol::job::{JobRecord, WebhookDelivery};
use shoal_protocol::lifecycle::TransitionError;
use shoal_protocol::runpod::{Envelope, WebhookBody};
use tokio::task::JoinSet;

use crate::clock::now_ms;
use crate::jobs::JobStore;
use crate::nats::Nats;

pub const SIGNATURE_HEADER: &str = "X-Shoal-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Shoal-Timestamp";
/// 1 for the first call, 2 for the first retry…
pub const ATTEMPT_HEADER: &str = "X-Shoal-Attempt";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// HMAC-SHA256 key signing every call; none: calls are not signed.
    pub secret: Option<String>,
    /// Calls after the first failed one.
    pub retries: u32,
    pub retry_delay_ms: u64,
    /// Longest wait for a receiver's answer.
    pub timeout_ms: u64,
    /// Calls in flight at once, per replica.
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig { secret: None, retries: 2, retry_delay_ms: 10_000, timeout_ms: 10_000, concurrency: 64 }
    }
}

impl WebhookConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout_ms == 0 {
            return Err("control.webhook.timeout_ms: must be above 0".into());
        }
        if self.concurrency == 0 {
            return Err("control.webhook.concurrency: must be above 0".into());
        }
        if self.secret.as_deref().is_some_and(str::is_empty) {
            return Err("control.webhook.secret: must not be empty (leave it out to send unsigned calls)".into());
        }
        Ok(())
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn sign(secret: &[u8], timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// Checks a call's signature header against its timestamp header and body (constant time).
pub fn verify(secret: &[u8], timestamp_s: u64, body: &[u8], signature: &str) -> bool {
    let Some(given) = signature.strip_prefix("sha256=").and_then(unhex) else { return false };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// The running dispatcher; [`Dispatcher::stop`] ends it and the calls in flight.
pub struct Dispatcher {
    task: tokio::task::JoinHandle<()>,
}

impl Dispatcher {
    pub fn stop(self) {
        self.task.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartDispatcherError {
    #[error("invalid webhook config: {0}")]
    Config(String),
    #[error("cannot create the webhook consumer: {0}")]
    Consumer(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

struct Ctx {
    nats: Nats,
    store: JobStore,
    http: reqwest::Client,
    config: WebhookConfig,
}

/// Creates (or joins) the shared webhook consumer and starts pulling from it.
pub async fn start(nats: Nats, config: WebhookConfig) -> Result<Dispatcher, StartDispatcherError> {
    config.validate().map_err(StartDispatcherError::Config)?;
    let consumer = consumer(&nats).await.map_err(StartDispatcherError::Consumer)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms))
        .user_agent(concat!("shoal-webhook/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StartDispatcherError::Client(e.to_string()))?;
    let ctx = Arc::new(Ctx { store: JobStore::new(nats.clone()), nats, http, config });
    let task = tokio::spawn(run(ctx, consumer));
    Ok(Dispatcher { task })
}

async fn consumer(nats: &Nats) -> Result<async_nats::jetstream::consumer::PullConsumer, String> {
    let names = &nats.names;
    let stream = nats.js.get_stream(names.events_stream()).await.map_err(|e| e.to_string())?;
    let name = names.webhooks_consumer();
    // create or update: a consumer made by an older version (every terminal job event) is
    // narrowed to the "webhook due" events
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            description: Some("webhook due events, for the webhook dispatchers of all replicas".into()),
            filter_subjects: vec![names.webhooks_due()],
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            // extended by in-progress acks while a call and its retries go on
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

async fn run(ctx: Arc<Ctx>, consumer: async_nats::jetstream::consumer::PullConsumer) {
    // dropped (and its calls aborted) when the dispatcher is stopped
    let mut calls = JoinSet::new();
    loop {
        // pull no more than can be called at once, so an event never waits here past its ack wait
        let mut messages = match consumer.stream().max_messages_per_batch(ctx.config.concurrency).messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull webhook events; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let msg = match next {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::debug!(error = %e, "webhook event stream error");
                    continue;
                }
            };
            while calls.len() >= ctx.config.concurrency {
                calls.join_next().await;
            }
            while calls.try_join_next().is_some() {}
            calls.spawn(handle(ctx.clone(), msg));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn handle(ctx: Arc<Ctx>, msg: async_nats::jetstream::Message) {
    let event: JobEvent = match from_msgpack(&msg.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "undecodable job event; no webhook");
            let _ = msg.ack().await;
            return;
        }
    };
    match prepare(&ctx, &event).await {
        Ok(Some((url, body))) => {
            let delivery = with_progress(&msg, deliver(&ctx, &url, &body)).await;
            record(&ctx, &event, &url, delivery).await;
        }
        Ok(None) => {}
        Err(e) => {
            // the job store or the blobs are unavailable: let the event come back
            tracing::warn!(job_id = %event.job_id, error = %e, "cannot prepare webhook call; will retry");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
            return;
        }
    }
    let _ = msg.ack().await;
}

/// The URL and body of the call for this event, or none (no webhook, already called, expired).
async fn prepare(ctx: &Ctx, event: &JobEvent) -> Result<Option<(String, Vec<u8>)>, String> {
    let Some((rec, _)) = ctx.store.get(&event.endpoint, &event.job_id).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let Some(url) = rec.webhook.clone() else { return Ok(None) };
    let same_run = rec.state == event.state;
    if same_run && rec.webhook_delivery.is_some() {
        return Ok(None); // a redelivered event whose call was made
    }
    let envelope = if same_run {
        let mut status = JobStatus::from(&rec);
        ctx.nats.blobs.resolve_output(&mut status).await.map_err(|e| e.to_string())?;
        Envelope::from(&status)
    } else {
        // retried since: announce the state the event saw
        Envelope {
            id: rec.id.clone(),
            status: event.state,
            delay_time: None,
            execution_time: None,
            output: None,
            error: event.error.clone(),
            retries: 0,
            worker_id: event.worker_id.clone(),
        }
    };
    let input = match &rec.input_ref {
        Some(name) => ctx.nats.blobs.get_json(name).await.map_err(|e| e.to_string())?,
        None => rec.input.clone(),
    };
    let body = WebhookBody { envelope, input, webhook: url.clone() };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    Ok(Some((url, body)))
}

/// Runs `fut`, telling JetStream every few seconds that the event is still being handled.
async fn with_progress<T>(msg: &async_nats::jetstream::Message, fut: impl Future<Output = T>) -> T {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Calls the receiver, retrying on failure.
async fn deliver(ctx: &Ctx, url: &str, body: &[u8]) -> WebhookDelivery {
    let attempts = 1 + ctx.config.retries;
    let mut last = (None, None);
    for attempt in 1..=attempts {
        let mut request = ctx
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ATTEMPT_HEADER, attempt.to_string())
            .body(body.to_vec());
        if let Some(secret) = &ctx.config.secret {
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            request = request
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, sign(secret.as_bytes(), timestamp, body));
        }
        match request.send().await {
            Ok(resp) if resp.status().is_success() => {
                return WebhookDelivery {
                    delivered: true,
                    attempts: attempt,
                    status: Some(resp.status().as_u16()),
                    error: None,
                    at_ms: now_ms(),
                };
            }
            Ok(resp) => last = (Some(resp.status().as_u16()), Some(format!("the receiver answered {}", resp.status()))),
            Err(e) => last = (None, Some(format!("cannot reach the receiver: {e}"))),
        }
        if attempt < attempts {
            tokio::time::sleep(Duration::from_millis(ctx.config.retry_delay_ms)).await;
        }
    }
    WebhookDelivery { delivered: false, attempts, status: last.0, error: last.1, at_ms: now_ms() }
}

/// Records the outcome on the job (if it is still in the state announced) and as an event.
async fn record(ctx: &Ctx, event: &JobEvent, url: &str, delivery: WebhookDelivery) {
    if delivery.delivered {
        tracing::debug!(job_id = %event.job_id, url, attempts = delivery.attempts, "webhook delivered");
    } else {
        tracing::warn!(job_id = %event.job_id, url, attempts = delivery.attempts, error = ?delivery.error, "webhook not delivered");
    }
    let state = event.state;
    let written = ctx
        .store
        .transition(&event.endpoint, &event.job_id, |r: &JobRecord| {
            if r.state != state || r.webhook_delivery.is_some() {
                return Err(TransitionError::Terminal(r.state.as_str()));
            }
            let mut next = r.clone();
            next.webhook_delivery = Some(delivery.clone());
            Ok(next)
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(job_id = %event.job_id, error = %e, "cannot record the webhook outcome");
    }
    let outcome = if delivery.delivered { "delivered" } else { "failed" };
    crate::metrics::webhook_outcome(&event.endpoint, outcome);
    let webhook_event = WebhookEvent {
        job_id: event.job_id.clone(),
        endpoint: event.endpoint.clone(),
        state,
        url: url.to_string(),
        delivered: delivery.delivered,
        attempts: delivery.attempts,
        status: delivery.status,
        error: delivery.error,
        at_ms: delivery.at_ms,
    };
    let subject = ctx.nats.names.webhook_event_subject(&event.endpoint, &event.job_id, outcome);
    ctx.nats.publish_event(subject, &webhook_event).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // as any receiver computes it, e.g. Python's
        // hmac.new(b"Jefe", b"1700000000.what do ya want for nothing?", hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"Jefe", 1_700_000_000, b"what do ya want for nothing?"),
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
    }

    #[test]
    fn a_signature_verifies_only_for_its_secret_timestamp_and_body() {
        let sig = sign(b"s3cret", 1_700_000_000, b"{\"id\":\"j\"}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        assert!(verify(b"s3cret", 1_700_000_000, b"{\"id\":\"j\"}", &sig));
        assert!(!verify(b"other", 1_700_000_000, b"{\"id\":\"j\"}", &sig));
        assert!(!verify(b"s3cret", 1_700_000_001, b"{\"id\":\"j\"}", &sig));
        assert!(!verify(b"s3cret", 1_700_000_000, b"{\"id\":\"k\"}", &sig));
        assert!(!verify(b"s3cret", 1_700_000_000, b"{\"id\":\"j\"}", "sha256=zz"));
        assert!(!verify(b"s3cret", 1_700_000_000, b"{\"id\":\"j\"}", "md5=00"));
    }

    #[test]
    fn config_defaults_are_runpods_and_invalid_ones_are_named() {
        let c = WebhookConfig::default();
        assert_eq!((c.retries, c.retry_delay_ms), (2, 10_000));
        c.validate().expect("valid");
        let bad = WebhookConfig { timeout_ms: 0, ..WebhookConfig::default() };
        assert!(bad.validate().expect_err("zero timeout").contains("timeout_ms"));
    }
}
