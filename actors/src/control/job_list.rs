//! `jobs.list`: an endpoint's recent jobs, newest first, for dashboards; and `hosts.list`.
//!
//! The jobs come from the endpoint's key range of `shoal-jobs` (`<endpoint>.>`), read once
//! through an ordered consumer that delivers the last revision of each key. That costs one
//! pass over the endpoint's retained records (kept `run_retention_s` after they end), which
//! is what a dashboard polling every second or two can afford; what comes back is bounded
//! by `limit`. Picking and ordering is the pure [`select`].

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::kv;
use futures::StreamExt;
use shoal_protocol::ApiError;
use shoal_protocol::api::{HostList, JobList, JobSummary, JobsRequest};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::host::HostRecord;
use shoal_protocol::job::{JobRecord, JobState, Priority};

use super::api::Ctx;
use super::waiting::Fleet;

/// The header of KV delete and purge markers.
const KV_OPERATION: &str = "KV-Operation";
/// A pause in delivery this long ends a listing pass.
const LIST_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("JetStream: {e}"))
}

pub(super) async fn list_jobs(ctx: &Ctx, r: JobsRequest) -> Result<JobList, ApiError> {
    if r.limit > JobsRequest::MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit {} is above the most a list returns ({})",
            r.limit,
            JobsRequest::MAX_LIMIT
        )));
    }
    let spec = ctx.spec(&r.endpoint).await?;
    let limit = if r.limit == 0 { JobsRequest::DEFAULT_LIMIT } else { r.limit };
    let records =
        latest_values(&ctx.nats.client, &ctx.nats.jobs, &ctx.nats.names.job_keys_of_endpoint(&r.endpoint)).await?;
    let mut summaries = Vec::with_capacity(records.len());
    for bytes in &records {
        match from_msgpack::<JobRecord>(bytes) {
            Ok(rec) => summaries.push(JobSummary::from(&rec)),
            Err(e) => tracing::debug!(endpoint_id = %r.endpoint, error = %e, "corrupt job record skipped in a list"),
        }
    }
    drop(records);
    // the jobs queued without a record yet, from their tokens (a record read above is newer)
    let queued = ctx.store.queued_tokens(&r.endpoint).await.map_err(unavailable)?;
    let listed: std::collections::HashSet<&str> = summaries.iter().map(|s| s.id.as_str()).collect();
    let unlisted: Vec<JobSummary> = queued
        .iter()
        .filter(|(rec, _)| !listed.contains(rec.id.as_str()))
        .map(|(rec, _)| JobSummary::from(rec))
        .collect();
    summaries.extend(unlisted);
    let mut list = select(summaries, &r.states, limit as usize);
    let queued = list.jobs.iter().any(|j| j.state == JobState::InQueue);
    if queued {
        // one question to the owner answers for every queued job of the page
        let fleet = ctx.ask_owner::<Fleet>(&r.endpoint, "waiting").await.ok();
        for job in &mut list.jobs {
            if job.state != JobState::InQueue {
                continue;
            }
            job.waiting_reason = Some(match &fleet {
                Some(fleet) => super::waiting::waiting_reason(&spec, fleet, job.priority == Priority::Low),
                None => "no control replica owns its endpoint yet (starting, or taking over after a failure)".into(),
            });
        }
    }
    Ok(list)
}

/// The jobs in `states` (all when empty), newest submission first (ties: id), at most `limit`,
/// and how many matched.
pub fn select(jobs: impl IntoIterator<Item = JobSummary>, states: &[JobState], limit: usize) -> JobList {
    let mut matching: Vec<JobSummary> =
        jobs.into_iter().filter(|j| states.is_empty() || states.contains(&j.state)).collect();
    let matched = matching.len() as u64;
    matching.sort_by(|a, b| b.submitted_at_ms.cmp(&a.submitted_at_ms).then_with(|| a.id.cmp(&b.id)));
    matching.truncate(limit);
    JobList { jobs: matching, matched }
}

pub(super) async fn list_hosts(ctx: &Ctx) -> Result<HostList, ApiError> {
    let records = latest_values(&ctx.nats.client, &ctx.nats.hosts, ">").await?;
    let mut hosts = Vec::with_capacity(records.len());
    for bytes in &records {
        if let Ok(host) = from_msgpack::<HostRecord>(bytes) {
            hosts.push(host);
        }
    }
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(HostList { hosts })
}

/// The current value of every live key of `store` matching `pattern` (a KV key pattern),
/// read in one pass: an ordered consumer delivering the last message of each subject.
async fn latest_values(
    client: &async_nats::Client,
    store: &kv::Store,
    pattern: &str,
) -> Result<Vec<bytes::Bytes>, ApiError> {
    let consumer = store
        .stream
        .create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            description: Some("shoal list".to_string()),
            filter_subject: format!("{}{pattern}", store.prefix),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..OrderedConfig::default()
        })
        .await
        .map_err(unavailable)?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(unavailable)?;
    // The last message says `pending == 0`; but a record that expires (per-key TTL) after the
    // consumer counted it never comes, so a pause in delivery also ends the pass.
    while let Ok(Some(message)) = tokio::time::timeout(LIST_IDLE, messages.next()).await {
        let message = message.map_err(unavailable)?;
        let pending = message.info().map_err(unavailable)?.pending;
        // deletes, purges and expiry markers carry a header and no record
        let removed = message.headers.as_ref().is_some_and(|h| h.get(KV_OPERATION).is_some());
        if !removed && !message.payload.is_empty() {
            out.push(message.payload.clone());
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: JobState, submitted_at_ms: u64) -> JobSummary {
        JobSummary::new(id, "e", state, submitted_at_ms)
    }

    #[test]
    fn newest_first_filtered_and_bounded() {
        let jobs = vec![
            job("a", JobState::Completed, 1),
            job("b", JobState::Failed, 3),
            job("c", JobState::TimedOut, 2),
            job("d", JobState::Failed, 5),
            job("e", JobState::InQueue, 4),
        ];
        let all = select(jobs.clone(), &[], 10);
        assert_eq!(all.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["d", "e", "b", "c", "a"]);
        assert_eq!(all.matched, 5);
        let dead = select(jobs.clone(), &[JobState::Failed, JobState::TimedOut], 2);
        assert_eq!(dead.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["d", "b"]);
        assert_eq!(dead.matched, 3, "counts every match, not just the page");
        assert!(select(jobs, &[JobState::Cancelled], 10).jobs.is_empty());
    }

    #[test]
    fn same_submission_time_orders_by_id() {
        let list = select(vec![job("y", JobState::Completed, 7), job("x", JobState::Completed, 7)], &[], 10);
        assert_eq!(list.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["x", "y"]);
    }
}
