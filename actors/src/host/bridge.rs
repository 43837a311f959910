//! The worker bridge: RunPod's worker HTTP protocol, served by the host to the workers it runs
//! (see shared/reference/runpod.md §3). A worker needs no NATS credentials: it long-polls
//! job-take, posts job-done and job-stream, polls job-stop and pings; each request carries the
//! worker's own token and is routed to its worker actor.
//!
//! Replies follow what the runpod SDK accepts: 204 when there is nothing (it re-polls at once),
//! 200 `{}` for every well-formed post (results for finished or cancelled jobs are dropped
//! after a 200, never refused), 5xx only when nothing was stored (the SDK then retries), 413 for
//! a stream chunk too large to store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::worker_actor::{PostError, WorkerMsg};

/// A worker the bridge knows: its endpoint, its token and its actor.
#[derive(Clone)]
pub struct Registered {
    pub endpoint: String,
    pub token: String,
    pub actor: ActorRef<WorkerMsg>,
}

/// Worker id → registration, shared by the bridge and the worker actors (which register on
/// start and unregister on stop).
#[derive(Clone, Default)]
pub struct Registry(Arc<RwLock<HashMap<String, Registered>>>);

impl Registry {
    pub fn register(&self, worker_id: &str, reg: Registered) {
        if let Ok(mut m) = self.0.write() {
            m.insert(worker_id.to_string(), reg);
        }
    }
    pub fn unregister(&self, worker_id: &str, actor: &ActorRef<WorkerMsg>) {
        if let Ok(mut m) = self.0.write()
            && m.get(worker_id).is_some_and(|r| r.actor.get_id() == actor.get_id())
        {
            m.remove(worker_id);
        }
    }
    fn lookup(&self, worker_id: &str) -> Option<Registered> {
        self.0.read().ok().and_then(|m| m.get(worker_id).cloned())
    }
}

#[derive(Clone)]
struct Bridge {
    registry: Registry,
    hold: Duration,
}

pub struct BridgeServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl BridgeServer {
    pub async fn bind(addr: SocketAddr, registry: Registry, hold: Duration) -> std::io::Result<BridgeServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(Bridge { registry, hold });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, rx));
        Ok(BridgeServer { addr, shutdown: Some(tx), task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// Serves the bridge's connections until `shutdown`, then lets those open finish what they
/// are doing. hyper serves each connection; the bridge's own part is [`dispatch`].
async fn serve(listener: tokio::net::TcpListener, app: Router, mut shutdown: oneshot::Receiver<()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // out of file descriptors and the like: the listener itself is fine
                    tracing::warn!(error = %e, "worker bridge cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // small replies on a latency path (a job handed over, a job-done answered): no Nagle
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a worker connection");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| dispatch(&app, req));
        let connection =
            hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "worker bridge connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One request, handed to the router. A post (job-done, job-stream: what a worker reports) is
/// served in a task of its own, started the moment hyper has read the request, so what the
/// worker posted reaches its actor even if the worker hangs up before the answer: hyper drops a
/// request still being served when it reads the end of its connection, and may do so before
/// the request was first polled. Everything else is served as part of the connection, so a
/// job-take whose worker hung up is given up (its jobs go back to the queue).
fn dispatch(
    app: &Router,
    req: axum::http::Request<hyper::body::Incoming>,
) -> futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>> {
    use futures::FutureExt;
    use tower::ServiceExt;
    let posted = req.method() == axum::http::Method::POST;
    let served = app.clone().oneshot(req.map(axum::body::Body::new));
    if !posted {
        return served.boxed();
    }
    let task = tokio::spawn(served);
    async move {
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "worker bridge request failed");
            Ok(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        })
    }
    .boxed()
}

/// The largest job-done or job-stream body accepted.
const MAX_POST_BYTES: usize = 64 * 1024 * 1024;

fn router(state: Bridge) -> Router {
    Router::new()
        .route("/v2/{endpoint}/job-take/{worker}", get(job_take))
        .route("/v2/{endpoint}/job-take-batch/{worker}", get(job_take_batch))
        .route("/v2/{endpoint}/job-done/{worker}/{job}", post(job_done))
        .route("/v2/{endpoint}/job-stream/{worker}/{job}", post(job_stream))
        .route("/v2/{endpoint}/job-stop/{worker}", get(job_stop))
        .route("/v2/{endpoint}/ping/{worker}", get(ping))
        // results above NATS' message size go to the object store; RunPod accepts (and only
        // warns about) results above 20 MB
        .layer(axum::extract::DefaultBodyLimit::max(MAX_POST_BYTES))
        .layer(axum::middleware::from_fn(crate::metrics::track_bridge))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

impl Bridge {
    /// Checks the worker's token. Unknown workers and bad tokens are answered after a short
    /// hold, since the SDK re-polls at once on 401/404.
    async fn authorize(&self, endpoint: &str, worker: &str, headers: &HeaderMap) -> Result<Registered, Response> {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let given = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")).unwrap_or(given).trim();
        match self.registry.lookup(worker) {
            Some(reg) if reg.endpoint == endpoint && reg.token == given => Ok(reg),
            Some(reg) if reg.endpoint == endpoint => {
                tokio::time::sleep(self.hold.min(Duration::from_secs(5))).await;
                Err(error(StatusCode::UNAUTHORIZED, "invalid worker token"))
            }
            _ => {
                tokio::time::sleep(self.hold.min(Duration::from_secs(5))).await;
                Err(error(StatusCode::NOT_FOUND, format!("no worker {worker} of endpoint {endpoint} on this host")))
            }
        }
    }
}

#[derive(Deserialize, Default)]
struct TakeQuery {
    batch_size: Option<usize>,
}

async fn take(bridge: &Bridge, reg: &Registered, max: usize) -> Result<Vec<Value>, Response> {
    let hold = bridge.hold;
    let result =
        reg.actor.call(|reply| WorkerMsg::Take { max, hold, reply }, Some(hold + Duration::from_secs(10))).await;
    match result {
        Ok(CallResult::Success(jobs)) => Ok(jobs.into_iter().filter_map(|j| serde_json::to_value(j).ok()).collect()),
        Ok(CallResult::Timeout) => Ok(vec![]),
        _ => Err(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn job_take(
    State(bridge): State<Bridge>,
    Path((endpoint, worker)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let reg = match bridge.authorize(&endpoint, &worker, &headers).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match take(&bridge, &reg, 1).await {
        Ok(mut jobs) if !jobs.is_empty() => axum::Json(jobs.swap_remove(0)).into_response(),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(resp) => resp,
    }
}

async fn job_take_batch(
    State(bridge): State<Bridge>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(q): Query<TakeQuery>,
    headers: HeaderMap,
) -> Response {
    let reg = match bridge.authorize(&endpoint, &worker, &headers).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let max = q.batch_size.unwrap_or(1).clamp(1, 256);
    match take(&bridge, &reg, max).await {
        Ok(jobs) if !jobs.is_empty() => axum::Json(Value::Array(jobs)).into_response(),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(resp) => resp,
    }
}

/// The SDK posts JSON text whatever its content type says: parse the body as JSON.
#[allow(clippy::result_large_err)] // the error is the reply itself, built once per bad request
fn parse_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))
}

async fn post_to_actor<F, E>(reg: &Registered, make: F) -> Response
where
    F: FnOnce(RpcReplyPort<Result<(), E>>) -> WorkerMsg,
    E: Into<PostError> + Send + 'static,
{
    match reg.actor.call(make, Some(Duration::from_secs(30))).await {
        Ok(CallResult::Success(Ok(()))) => axum::Json(json!({})).into_response(),
        Ok(CallResult::Success(Err(e))) => match e.into() {
            PostError::Unavailable(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            PostError::TooLarge(e) => error(StatusCode::PAYLOAD_TOO_LARGE, e),
        },
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "worker is stopping; nothing was stored"),
    }
}

impl Bridge {
    /// A worker's post: its registration and its body, read as JSON.
    async fn authorize_post(
        &self,
        endpoint: &str,
        worker: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(Registered, Value), Response> {
        let reg = self.authorize(endpoint, worker, headers).await?;
        Ok((reg, parse_body(body)?))
    }
}

async fn job_done(
    State(bridge): State<Bridge>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (reg, body) = match bridge.authorize_post(&endpoint, &worker, &headers, &body).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    post_to_actor(&reg, |reply| WorkerMsg::Done { job_id: job, body, reply }).await
}

async fn job_stream(
    State(bridge): State<Bridge>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (reg, body) = match bridge.authorize_post(&endpoint, &worker, &headers, &body).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let chunk = match body {
        Value::Object(mut m) if m.contains_key("output") => m.remove("output").unwrap_or(Value::Null),
        other => other,
    };
    post_to_actor(&reg, |reply| WorkerMsg::Stream { job_id: job, chunk, reply }).await
}

async fn job_stop(
    State(bridge): State<Bridge>,
    Path((endpoint, worker)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let reg = match bridge.authorize(&endpoint, &worker, &headers).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let deadline = tokio::time::Instant::now() + bridge.hold;
    loop {
        match reg.actor.call(WorkerMsg::GetStops, Some(Duration::from_secs(5))).await {
            Ok(CallResult::Success(stops)) if !stops.is_empty() => {
                return axum::Json(json!({ "jobsToStop": stops })).into_response();
            }
            Ok(CallResult::Success(_)) => {}
            _ => return StatusCode::NO_CONTENT.into_response(),
        }
        if tokio::time::Instant::now() >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Deserialize, Default)]
struct PingQuery {
    job_id: Option<String>,
    status: Option<String>,
    check: Option<String>,
    reason: Option<String>,
}

async fn ping(
    State(bridge): State<Bridge>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(q): Query<PingQuery>,
    headers: HeaderMap,
) -> Response {
    let reg = match bridge.authorize(&endpoint, &worker, &headers).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let job_ids: Vec<String> =
        q.job_id.unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
    let unhealthy = (q.status.as_deref() == Some("unhealthy"))
        .then(|| format!("fitness check {} failed: {}", q.check.unwrap_or_default(), q.reason.unwrap_or_default()));
    let _ = reg.actor.cast(WorkerMsg::Ping { job_ids, unhealthy });
    axum::Json(json!({})).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Write;

    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::mpsc;

    use super::*;

    /// Stands in for a worker actor: says which jobs' results reached it, and answers them.
    struct Results;

    impl Actor for Results {
        type Msg = WorkerMsg;
        type State = mpsc::UnboundedSender<String>;
        type Arguments = mpsc::UnboundedSender<String>;

        async fn pre_start(
            &self,
            _: ActorRef<WorkerMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _: ActorRef<WorkerMsg>,
            msg: WorkerMsg,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let WorkerMsg::Done { job_id, reply, .. } = msg {
                let _ = tx.send(job_id);
                let _ = reply.send(Ok(()));
            }
            Ok(())
        }
    }

    /// Workers that post a result and hang up at once, before the bridge has read a byte of
    /// it (they connect, post and close before it accepts them): hyper reads each request and
    /// the end of its connection together, and every result still reaches its worker actor.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_posted_by_a_worker_that_hung_up_before_it_was_read_reaches_the_worker() {
        const POSTS: usize = 64;
        let (tx, mut results) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Results, tx).await.expect("actor");
        let registry = Registry::default();
        registry.register("w1", Registered { endpoint: "ep".into(), token: "secret".into(), actor: actor.clone() });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        for i in 0..POSTS {
            let body = r#"{"output": {"n": 1}}"#;
            let mut worker = std::net::TcpStream::connect(addr).expect("connect");
            write!(
                worker,
                "POST /v2/ep/job-done/w1/job-{i}?gpu=none HTTP/1.1\r\nHost: bridge\r\nAuthorization: secret\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .expect("post");
            // dropped: the worker hangs up
        }
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(serve(listener, router(Bridge { registry, hold: Duration::from_secs(1) }), stopped));
        let mut reached = BTreeSet::new();
        while reached.len() < POSTS {
            match tokio::time::timeout(Duration::from_secs(10), results.recv()).await {
                Ok(Some(job)) => reached.insert(job),
                _ => break,
            };
        }
        assert_eq!(reached.len(), POSTS, "the results that reached the worker: {reached:?}");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("the bridge stops").expect("joined");
        actor.stop(None);
    }
}
