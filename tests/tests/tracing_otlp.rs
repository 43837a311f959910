//! OpenTelemetry end to end: the gateway, the control plane and the host run as separate
//! `shoal` processes exporting over OTLP/HTTP to a receiver in this test, and one job
//! submitted over HTTP is one trace across all three, from the caller's `traceparent` to the
//! worker's result.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use prost::Message;
use serde_json::{Value, json};
use shoal_actors::client::ApiClient;
use shoal_protocol::names::Names;
use shoal_tests::process::{ShoalProcess, free_port};
use shoal_tests::{NatsServer, eventually, rust_endpoint, test_prefix};

/// One span as the receiver got it, ids in lowercase hex.
#[derive(Clone, Debug)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Exported>>>;

/// An OTLP/HTTP receiver: `POST /v1/traces` with an `ExportTraceServiceRequest` in protobuf.
async fn start_receiver() -> Result<(SocketAddr, Spans)> {
    let spans = Spans::default();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(collect)).with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, spans))
}

async fn collect(State(spans): State<Spans>, body: Bytes) -> Response {
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an OTLP trace export: {e}")).into_response(),
    };
    let mut got = spans.lock().unwrap_or_else(|e| e.into_inner());
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Exported {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: attributes(&span.attributes),
            });
        }
    }
    ([(header::CONTENT_TYPE, "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
        .into_response()
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find<'a>(spans: &'a [Exported], service: &str, name: &str) -> Option<&'a Exported> {
    spans.iter().find(|s| s.service == service && s.name == name)
}

/// The control plane's span of the `job.run` request.
fn find_run(spans: &[Exported]) -> Option<&Exported> {
    spans.iter().find(|s| {
        s.service == "shoal-control"
            && s.name == "request"
            && s.attributes.get("op").map(String::as_str) == Some("job.run")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_one_trace_across_gateway_control_and_host() -> Result<()> {
    let server = NatsServer::start()?;
    let prefix = test_prefix();
    let (receiver, spans) = start_receiver().await?;
    let otel = |delay_ms: u64| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{receiver}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY", delay_ms.to_string()),
        ]
    };
    let mut control = ShoalProcess::start(&server, &prefix, &["control"], &otel(100))?;
    let api = ApiClient::new(async_nats::connect(&server.url).await?, Names::new(&prefix)?);
    let spec = rust_endpoint("echo-rs")?;
    eventually(Duration::from_secs(30), "the control plane answers", || async {
        api.create_endpoint(&spec).await.ok()
    })
    .await
    .with_context(|| control.log())?;
    // the others once the streams and buckets are set up (concurrent first starts on an empty
    // server race to create them)
    let mut host_env = otel(100);
    host_env.extend([("SHOAL_HOST__HOLD_MS", "2000".to_string()), ("SHOAL_HOST__PING_INTERVAL_MS", "1000".into())]);
    let mut host = ShoalProcess::start(&server, &prefix, &["host"], &host_env)?;
    // the gateway exports nothing until it stops: its spans arrive only if shutdown flushes
    let mut gateway_env = otel(600_000);
    gateway_env.push(("SHOAL_GATEWAY__REQUIRE_API_KEY", "false".into()));
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut gateway = ShoalProcess::start(&server, &prefix, &["gateway", "--listen", &listen], &gateway_env)?;

    // the caller's trace: every span of the job must be in it
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let http = reqwest::Client::new();
    let reply = eventually(Duration::from_secs(30), "the gateway answers", || async {
        http.post(format!("http://{listen}/v2/echo-rs/runsync?wait=60000"))
            .header("traceparent", format!("00-{trace}-{caller_span}-01"))
            .json(&json!({"input": {"x": 1}}))
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .ok()
    })
    .await
    .with_context(|| gateway.log())?;
    let echoed = reply.headers().get("traceparent").context("traceparent in the reply")?.to_str()?.to_string();
    let body: Value = reply.json().await?;
    assert_eq!(body["status"], "COMPLETED", "{body}\n{}", host.log());
    assert_eq!(body["output"], json!({"x": 1}));
    assert!(echoed.starts_with(&format!("00-{trace}-")), "{echoed}");

    // control and host export on their short schedule (the control's span ends with its reply)
    let of_trace = || -> Vec<Exported> {
        spans.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|s| s.trace_id == trace).cloned().collect()
    };
    eventually(
        Duration::from_secs(30),
        "the control's job.run span, the host's job, worker and result spans",
        || async {
            let all = of_trace();
            let host = ["job", "worker", "result"].iter().all(|name| find(&all, "shoal-host", name).is_some());
            (host && find_run(&all).is_some()).then_some(())
        },
    )
    .await
    .with_context(|| format!("spans: {:#?}\n{}", of_trace(), host.log()))?;
    assert!(find(&of_trace(), "shoal-gateway", "request").is_none(), "the gateway's batch is not due yet");

    // the gateway's spans come with its shutdown
    gateway.stop(Duration::from_secs(20))?;
    let spans_of_trace = eventually(Duration::from_secs(10), "the gateway's request span", || async {
        let all = of_trace();
        find(&all, "shoal-gateway", "request").is_some().then_some(all)
    })
    .await
    .with_context(|| format!("spans: {:#?}", of_trace()))?;

    // one tree: caller -> gateway request -> control's job.run -> host job -> worker -> result
    let show = || format!("{spans_of_trace:#?}");
    let gateway_request = find(&spans_of_trace, "shoal-gateway", "request").context("gateway request")?;
    assert_eq!(gateway_request.parent_span_id, caller_span, "{}", show());
    assert_eq!(echoed, format!("00-{trace}-{}-01", gateway_request.span_id), "the reply names the gateway's span");
    let run = find_run(&spans_of_trace).with_context(show)?;
    assert_eq!(run.parent_span_id, gateway_request.span_id, "{}", show());
    let job = find(&spans_of_trace, "shoal-host", "job").with_context(show)?;
    assert_eq!(job.parent_span_id, run.span_id, "the job span continues the API request's trace: {}", show());
    assert_eq!(job.attributes.get("endpoint_id").map(String::as_str), Some("echo-rs"), "{job:?}");
    let job_id = job.attributes.get("job_id").context("job_id on the job span")?;
    assert_eq!(body["id"].as_str(), Some(job_id.as_str()));
    assert!(job.attributes.get("worker_id").is_some_and(|w| !w.is_empty()), "{job:?}");
    let worker = find(&spans_of_trace, "shoal-host", "worker").with_context(show)?;
    assert_eq!(worker.parent_span_id, job.span_id, "{}", show());
    assert_eq!(worker.attributes.get("job_id"), Some(job_id));
    let result = find(&spans_of_trace, "shoal-host", "result").with_context(show)?;
    assert_eq!(result.parent_span_id, worker.span_id, "{}", show());

    host.stop(Duration::from_secs(30))?;
    control.stop(Duration::from_secs(30))?;
    Ok(())
}
