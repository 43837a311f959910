//! Webhooks: a receiver gets the signed status envelope on every terminal state; a failing
//! receiver gets the retries; the outcome is recorded on the job and as an event; with two
//! control replicas each terminal state is delivered once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use shoal_actors::control::{self, ControlConfig};
use shoal_actors::nats::Nats;
use shoal_actors::webhook::WebhookConfig;
use shoal_protocol::api::{JobRef, JobStatus};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::events::WebhookEvent;
use shoal_tests::{Http, Shoal, eventually, fast_topology, free_port, rust_endpoint};

const SECRET: &str = "whsec_test_secret";

/// One call a receiver got.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// An HTTP receiver: `/ok` answers 200, `/fail` 500; every call is kept.
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Receiver {
    async fn start() -> Result<Receiver> {
        async fn receive(
            State(calls): State<Arc<Mutex<Vec<Call>>>>,
            Path(path): Path<String>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let ok = path == "ok";
            calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call { path, headers, body });
            if ok { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR }
        }
        let calls = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route("/{path}", axum::routing::post(receive)).with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Receiver { url, calls })
    }

    /// The calls about job `id`.
    fn calls_for(&self, id: &str) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|c| c.json()["id"] == id).cloned().collect()
    }
}

fn fast_webhooks() -> ControlConfig {
    ControlConfig {
        tick_ms: 100,
        webhook: WebhookConfig {
            secret: Some(SECRET.into()),
            retries: 2,
            retry_delay_ms: 300,
            timeout_ms: 2_000,
            ..WebhookConfig::default()
        },
        ..ControlConfig::default()
    }
}

/// Checks the signature as a receiver would: HMAC-SHA256 of "<timestamp>.<body>".
fn assert_signed(call: &Call) {
    let timestamp: u64 = call.header("X-Shoal-Timestamp").parse().expect("a numeric timestamp header");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    assert!(timestamp.abs_diff(now) < 300, "fresh timestamp {timestamp} (now {now})");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&call.body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(call.header("X-Shoal-Signature"), format!("sha256={expected}"));
    assert!(call.header("Content-Type").starts_with("application/json"));
}

async fn status(shoal: &Shoal, endpoint: &str, id: &str) -> Option<JobStatus> {
    shoal.api.status(&JobRef { endpoint: Some(endpoint.into()), id: id.into(), wait_ms: 0 }).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_carry_the_signed_envelope_and_failing_receivers_get_the_retries() -> Result<()> {
    let shoal = Shoal::start_with(fast_webhooks(), |_| {}).await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let mut idle = rust_endpoint("idle")?;
    (idle.workers_min, idle.workers_max) = (0, 0);
    shoal.api.create_endpoint(&idle).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));
    let receiver = Receiver::start().await?;
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("webhook")).await?;

    // a completed job: one signed call with the envelope, the input and the webhook
    let ok_url = format!("{}/ok", receiver.url);
    let (_, run) = http.post("/echo/run", &json!({"input": {"x": 1}, "webhook": ok_url})).await?;
    let id = run["id"].as_str().expect("id").to_string();
    let calls = eventually(Duration::from_secs(30), "the webhook call", || async {
        Some(receiver.calls_for(&id)).filter(|c| !c.is_empty())
    })
    .await?;
    let body = calls[0].json();
    assert_eq!(
        (&body["status"], &body["output"], &body["input"]),
        (&json!("COMPLETED"), &json!({"x": 1}), &json!({"x": 1}))
    );
    assert_eq!(body["webhook"], ok_url);
    assert!(body["delayTime"].is_u64() && body["executionTime"].is_u64() && body["workerId"].is_string(), "{body}");
    assert_eq!(calls[0].header("X-Shoal-Attempt"), "1");
    assert_signed(&calls[0]);
    let delivered = eventually(Duration::from_secs(10), "the outcome on the record", || async {
        status(&shoal, "echo", &id).await?.webhook_delivery
    })
    .await?;
    assert_eq!((delivered.delivered, delivered.attempts, delivered.status), (true, 1, Some(200)));

    // a failing receiver: 1 call + 2 retries, then recorded as failed
    let fail_url = format!("{}/fail", receiver.url);
    let (_, run) = http.post("/echo/run", &json!({"input": {"fail": "bad input"}, "webhook": fail_url})).await?;
    let failed_id = run["id"].as_str().expect("id").to_string();
    let outcome = eventually(Duration::from_secs(30), "the failed webhook outcome", || async {
        status(&shoal, "echo", &failed_id).await?.webhook_delivery
    })
    .await?;
    assert_eq!((outcome.delivered, outcome.attempts, outcome.status), (false, 3, Some(500)));
    let calls = receiver.calls_for(&failed_id);
    let attempts: Vec<&str> = calls.iter().map(|c| c.header("X-Shoal-Attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(calls.iter().all(|c| c.path == "fail"));
    let body = calls[0].json();
    assert_eq!((&body["status"], &body["error"]), (&json!("FAILED"), &json!("bad input")));
    calls.iter().for_each(assert_signed);

    // every end state gets its call: a cancelled job too, and an unreachable receiver is recorded
    let (_, queued) = http.post("/idle/run", &json!({"input": "never runs", "webhook": ok_url})).await?;
    let cancelled_id = queued["id"].as_str().expect("id").to_string();
    http.send(reqwest::Method::POST, &format!("/idle/cancel/{cancelled_id}"), None).await?;
    let calls = eventually(Duration::from_secs(30), "the cancel webhook", || async {
        Some(receiver.calls_for(&cancelled_id)).filter(|c| !c.is_empty())
    })
    .await?;
    assert_eq!((&calls[0].json()["status"], &calls[0].json()["input"]), (&json!("CANCELLED"), &json!("never runs")));
    // a port nobody listens on (below the ephemeral range: no client socket takes it meanwhile)
    let closed = free_port()?;
    let (_, run) =
        http.post("/echo/run", &json!({"input": 2, "webhook": format!("http://127.0.0.1:{closed}/x")})).await?;
    let unreachable_id = run["id"].as_str().expect("id").to_string();
    let outcome = eventually(Duration::from_secs(30), "the unreachable outcome", || async {
        status(&shoal, "echo", &unreachable_id).await?.webhook_delivery
    })
    .await?;
    assert_eq!((outcome.delivered, outcome.attempts, outcome.status), (false, 3, None));
    assert!(outcome.error.unwrap_or_default().contains("cannot reach"));

    // each outcome is an event on SHOAL_EVENTS
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next()).await?.expect("events");
        let event: WebhookEvent = from_msgpack(&msg.payload)?;
        assert!(msg.subject.ends_with(if event.delivered { ".delivered" } else { ".failed" }), "{}", msg.subject);
        seen.push((event.job_id, event.delivered, event.attempts));
    }
    seen.sort();
    let mut expected = vec![(id, true, 1), (failed_id, false, 3), (cancelled_id, true, 1), (unreachable_id, false, 3)];
    expected.sort();
    assert_eq!(seen, expected);
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_control_replicas_each_terminal_state_is_delivered_once() -> Result<()> {
    let shoal = Shoal::start_with(fast_webhooks(), |_| {}).await?;
    let second_nats = Nats::connect(&shoal.server.url, shoal.nats.names.clone(), &fast_topology()).await?;
    let second = Box::pin(control::start(second_nats, fast_webhooks())).await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));
    let receiver = Receiver::start().await?;

    let mut ids = Vec::new();
    for n in 0..8 {
        let (code, run) =
            http.post("/echo/run", &json!({"input": {"n": n}, "webhook": format!("{}/ok", receiver.url)})).await?;
        assert_eq!(code, 200, "{run}");
        ids.push(run["id"].as_str().expect("id").to_string());
    }
    // once every job records its outcome, every dispatcher is done with it
    for id in &ids {
        let outcome = eventually(Duration::from_secs(60), "every webhook outcome", || async {
            status(&shoal, "echo", id).await?.webhook_delivery
        })
        .await?;
        assert_eq!((outcome.delivered, outcome.attempts), (true, 1), "{id}");
    }
    for id in &ids {
        assert_eq!(receiver.calls_for(id).len(), 1, "job {id} was announced once");
    }
    assert_eq!(receiver.calls.lock().unwrap_or_else(|e| e.into_inner()).len(), ids.len());
    gateway.stop().await;
    second.stop().await;
    shoal.stop().await;
    Ok(())
}

/// The dispatchers read "webhook due" events, published only for jobs that have a webhook;
/// a dispatcher consumer made by an older version (every terminal job event) is narrowed to
/// them when a replica starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_jobs_with_a_webhook_are_due_and_an_old_dispatcher_consumer_is_narrowed() -> Result<()> {
    use async_nats::jetstream::consumer::pull;
    let shoal = Shoal::start_with(fast_webhooks(), |_| {}).await?;
    let names = shoal.nats.names.clone();
    // the consumer as the previous version made it
    let events = shoal.nats.js.get_stream(names.events_stream()).await?;
    let old_filters: Vec<String> =
        ["completed", "failed", "cancelled", "timed_out"].iter().map(|s| names.job_events_in_state(s)).collect();
    events
        .update_consumer(pull::Config {
            durable_name: Some(names.webhooks_consumer()),
            filter_subjects: old_filters,
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let second_nats = Nats::connect(&shoal.server.url, names.clone(), &fast_topology()).await?;
    let second = Box::pin(control::start(second_nats, fast_webhooks())).await?;
    let mut consumer =
        events.get_consumer::<pull::Config>(&names.webhooks_consumer()).await.map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(consumer.info().await?.config.filter_subjects, vec![names.webhooks_due()]);

    let mut due = shoal.nats.client.subscribe(names.webhooks_due()).await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));
    let receiver = Receiver::start().await?;
    let (code, plain) = http.post("/echo/runsync", &json!({"input": {"n": 1}})).await?;
    assert_eq!((code, plain["status"].as_str()), (200, Some("COMPLETED")), "{plain}");
    let (code, hooked) =
        http.post("/echo/runsync", &json!({"input": {"n": 2}, "webhook": format!("{}/ok", receiver.url)})).await?;
    assert_eq!((code, hooked["status"].as_str()), (200, Some("COMPLETED")), "{hooked}");
    let hooked_id = hooked["id"].as_str().unwrap_or_default().to_string();
    let first = tokio::time::timeout(Duration::from_secs(10), due.next()).await?.expect("a due event");
    assert!(first.subject.as_str().contains(&hooked_id), "due for the job with a webhook: {}", first.subject);
    eventually(Duration::from_secs(30), "the webhook called", || async {
        (receiver.calls_for(&hooked_id).len() == 1).then_some(())
    })
    .await?;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), due.next()).await.is_err(),
        "no due event for the job without a webhook"
    );
    gateway.stop().await;
    second.stop().await;
    shoal.stop().await;
    Ok(())
}
