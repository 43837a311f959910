//! What a host that restarts must not believe: the worker records an earlier run of it left.
//! The runtime deals with the workers themselves ([`crate::runtime::Runtime::recover`]: the
//! Docker runtime stops or removes its containers); their records, still Idle or Running in
//! `shoal-workers`, would make the scalers count workers that no longer exist, so they are
//! recorded Stopped, and the scalers start what their endpoints need.

use futures::StreamExt;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::worker::{WorkerRecord, WorkerState};

use super::worker_actor::put_worker_record;
use crate::clock::now_ms;
use crate::nats::Nats;

pub async fn forget_workers_left_behind(nats: &Nats, host_id: &str) {
    let keys: Vec<String> = match nats.workers.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(e) => {
            tracing::warn!(host_id, error = %e, "cannot list worker records");
            return;
        }
    };
    let mut forgotten = 0;
    for key in keys {
        let Ok(Some(bytes)) = nats.workers.get(&key).await else { continue };
        let Ok(mut rec) = from_msgpack::<WorkerRecord>(&bytes) else { continue };
        if rec.host != host_id || rec.state == WorkerState::Stopped {
            continue;
        }
        let now = now_ms();
        rec.state = WorkerState::Stopped;
        rec.reason = Some("its host restarted".into());
        rec.current_jobs.clear();
        rec.updated_at_ms = now;
        put_worker_record(nats, &rec).await;
        let event = WorkerEvent {
            worker_id: rec.id.clone(),
            endpoint: rec.endpoint.clone(),
            host: rec.host.clone(),
            state: rec.state,
            reason: rec.reason.clone(),
            restarts: rec.restarts,
            failures: rec.failures,
            backoff_ms: None,
            at_ms: now,
            start: None,
        };
        nats.publish_event(nats.names.worker_event_subject(&rec.endpoint, rec.state.as_str()), &event).await;
        forgotten += 1;
    }
    if forgotten > 0 {
        tracing::info!(host_id, workers = forgotten, "recorded the workers of an earlier run of this host stopped");
    }
}
