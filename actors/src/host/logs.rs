//! Worker logs over NATS: the host answers [`GetWorkerLogs`] on its logs subject with a
//! worker's last lines (from its runtime: `docker logs`, or the process runtime's log file)
//! and, when asked to follow, sends each new batch of lines as a request to the asker's
//! subject until the log ends or nobody answers. [`get`] and [`follow`] are the asking side
//! (`shoal workers logs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::host::{GetWorkerLogs, WorkerLogs};
use shoal_protocol::ids::validate_id;
use shoal_protocol::names::Names;

use crate::nats::Nats;
use crate::runtime::{LogQuery, LogStream, Runtime};

/// Lines sent when the request asks for 0.
pub const DEFAULT_LINES: u32 = 100;
/// Most lines one request may ask for.
const MAX_LINES: u32 = 10_000;
/// Largest message of lines (NATS' default limit is 1 MiB).
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// How long the first answer waits for the log's first lines.
const FIRST_BATCH_WAIT: Duration = Duration::from_secs(2);
/// How long a follower has to acknowledge a batch before the host stops sending.
const FOLLOW_ACK: Duration = Duration::from_secs(10);

/// The log file of a process-runtime worker.
pub fn log_file(state_dir: &std::path::Path, endpoint: &str, worker_id: &str) -> PathBuf {
    state_dir.join("logs").join(endpoint).join(format!("{worker_id}.log"))
}

/// Serves this host's logs subject until the subscription ends.
pub async fn serve(
    nats: &Nats,
    host_id: &str,
    runtime: Arc<dyn Runtime>,
    state_dir: PathBuf,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = nats.client.subscribe(nats.names.host_worker_logs_subject(host_id)).await?;
    let client = nats.client.clone();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else { continue };
            let (client, runtime, state_dir) = (client.clone(), runtime.clone(), state_dir.clone());
            tokio::spawn(async move {
                let req = match from_msgpack::<GetWorkerLogs>(&msg.payload) {
                    Ok(req) => req,
                    Err(e) => {
                        let reply =
                            WorkerLogs { end: true, error: Some(format!("bad request: {e}")), ..Default::default() };
                        send(&client, reply_to.to_string(), &reply).await;
                        return;
                    }
                };
                answer(&client, reply_to.to_string(), req, runtime, &state_dir).await;
            });
        }
    }))
}

async fn send(client: &async_nats::Client, subject: String, logs: &WorkerLogs) {
    if let Ok(bytes) = to_msgpack(logs) {
        let _ = client.publish(subject, Bytes::from(bytes)).await;
    }
}

async fn answer(
    client: &async_nats::Client,
    reply_to: String,
    req: GetWorkerLogs,
    runtime: Arc<dyn Runtime>,
    state_dir: &std::path::Path,
) {
    let failed = |error: String| WorkerLogs { end: true, error: Some(error), ..Default::default() };
    if let Err(e) = validate_id("endpoint", &req.endpoint).and_then(|_| validate_id("worker id", &req.worker_id)) {
        return send(client, reply_to, &failed(e.message)).await;
    }
    let lines = if req.lines == 0 { DEFAULT_LINES } else { req.lines.min(MAX_LINES) } as usize;
    let query = LogQuery {
        endpoint: req.endpoint.clone(),
        worker_id: req.worker_id.clone(),
        log_file: log_file(state_dir, &req.endpoint, &req.worker_id),
        lines,
        follow: req.follow_to.is_some(),
    };
    let mut stream = match runtime.logs(query).await {
        Ok(s) => s,
        Err(e) => return send(client, reply_to, &failed(e)).await,
    };
    // a followed log may have nothing to say yet: answer with what came in time
    let (first, ended) = match tokio::time::timeout(FIRST_BATCH_WAIT, stream.next()).await {
        Ok(Some(lines)) => (lines, false),
        Ok(None) => (vec![], true),
        Err(_) => (vec![], false),
    };
    let first = WorkerLogs { lines: fit(first), end: req.follow_to.is_none() || ended, error: None };
    send(client, reply_to, &first).await;
    let Some(follow_to) = req.follow_to.filter(|_| !ended) else { return };
    while let Some(batch) = stream.next().await {
        for lines in split(batch) {
            if !deliver(client, &follow_to, &WorkerLogs { lines, end: false, error: None }).await {
                return; // the follower went away
            }
        }
    }
    deliver(client, &follow_to, &WorkerLogs { lines: vec![], end: true, error: None }).await;
}

/// Sends one batch to a follower; false when nobody acknowledges it.
async fn deliver(client: &async_nats::Client, subject: &str, logs: &WorkerLogs) -> bool {
    let Ok(bytes) = to_msgpack(logs) else { return false };
    matches!(tokio::time::timeout(FOLLOW_ACK, client.request(subject.to_string(), Bytes::from(bytes))).await, Ok(Ok(_)))
}

/// The last lines that fit one message.
fn fit(lines: Vec<String>) -> Vec<String> {
    let mut size = 0;
    let keep = lines
        .iter()
        .rev()
        .take_while(|l| {
            size += l.len() + 8;
            size <= MAX_BATCH_BYTES
        })
        .count();
    lines[lines.len() - keep..].to_vec()
}

/// Lines in batches that each fit one message (a single huge line is cut).
fn split(lines: Vec<String>) -> Vec<Vec<String>> {
    let mut batches = vec![];
    let mut batch: Vec<String> = vec![];
    let mut size = 0;
    for mut line in lines {
        if line.len() > MAX_BATCH_BYTES / 2 {
            let mut cut = MAX_BATCH_BYTES / 2;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        if size + line.len() + 8 > MAX_BATCH_BYTES && !batch.is_empty() {
            batches.push(std::mem::take(&mut batch));
            size = 0;
        }
        size += line.len() + 8;
        batch.push(line);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("host {0} does not answer (is it running?)")]
    NoHost(String),
    #[error("{0}")]
    Failed(String),
}

/// A worker's last lines, asked of the host that runs (or ran) it.
pub async fn get(
    client: &async_nats::Client,
    names: &Names,
    host: &str,
    endpoint: &str,
    worker_id: &str,
    lines: u32,
) -> Result<Vec<String>, LogsError> {
    let req = GetWorkerLogs { endpoint: endpoint.into(), worker_id: worker_id.into(), lines, follow_to: None };
    let reply = ask(client, names, host, &req).await?;
    Ok(reply.lines)
}

/// A worker's last lines, then its new lines as they come; the stream ends with the log.
pub async fn follow(
    client: &async_nats::Client,
    names: &Names,
    host: &str,
    endpoint: &str,
    worker_id: &str,
    lines: u32,
) -> Result<LogStream, LogsError> {
    let inbox = client.new_inbox();
    let sub = client.subscribe(inbox.clone()).await.map_err(|e| LogsError::Failed(e.to_string()))?;
    let req = GetWorkerLogs { endpoint: endpoint.into(), worker_id: worker_id.into(), lines, follow_to: Some(inbox) };
    let first = ask(client, names, host, &req).await?;
    if first.end {
        return Ok(Box::pin(futures::stream::once(async move { first.lines })));
    }
    let client = client.clone();
    let rest = sub
        .then(move |msg| {
            let client = client.clone();
            async move {
                if let Some(reply) = msg.reply.clone() {
                    let _ = client.publish(reply, Bytes::new()).await;
                }
                from_msgpack::<WorkerLogs>(&msg.payload).unwrap_or(WorkerLogs { end: true, ..Default::default() })
            }
        })
        .take_while(|logs| std::future::ready(!(logs.end && logs.lines.is_empty())))
        .map(|logs| logs.lines);
    Ok(Box::pin(futures::stream::once(async move { first.lines }).chain(rest)))
}

async fn ask(
    client: &async_nats::Client,
    names: &Names,
    host: &str,
    req: &GetWorkerLogs,
) -> Result<WorkerLogs, LogsError> {
    let bytes = to_msgpack(req).map_err(|e| LogsError::Failed(e.to_string()))?;
    let msg = client
        .request(names.host_worker_logs_subject(host), Bytes::from(bytes))
        .await
        .map_err(|_| LogsError::NoHost(host.to_string()))?;
    let reply: WorkerLogs = from_msgpack(&msg.payload).map_err(|e| LogsError::Failed(e.to_string()))?;
    match reply.error {
        Some(e) => Err(LogsError::Failed(e)),
        None => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_a_message() {
        let lines: Vec<String> = (0..20_000).map(|i| format!("line {i:>40}")).collect();
        let kept = fit(lines.clone());
        assert!(kept.len() < lines.len() && kept.last() == lines.last());
        let batches = split(lines.clone());
        assert!(batches.len() > 1);
        assert_eq!(batches.concat(), lines);
        let huge = split(vec!["x".repeat(MAX_BATCH_BYTES * 2)]);
        assert_eq!(huge.len(), 1);
        assert!(huge[0][0].len() <= MAX_BATCH_BYTES / 2);
    }
}
