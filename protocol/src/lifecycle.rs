//! The job state machine: pure functions from a record and an event to the next record.
//!
//! ```text
//! IN_QUEUE ──take──> IN_PROGRESS ──finish──> COMPLETED | FAILED
//!    │                 │  ├──cancel / ttl / execution timeout──> CANCELLED | TIMED_OUT
//!    │                 └──worker lost──> IN_QUEUE (retries+1) | FAILED (past max attempts)
//!    └──cancel / purge / ttl──> CANCELLED | TIMED_OUT
//! FAILED | TIMED_OUT ──retry──> IN_QUEUE (same id, output dropped)
//! ```
//!
//! Actors read a record, call one of these, and write the result with compare-and-set on the
//! revision they read; on a conflict they read again and re-apply. So two actors that race (a
//! late result after a timeout, a redelivery beside a slow worker) resolve deterministically:
//! the first terminal write wins, and every later event on a terminal record is a no-op.

use serde_json::Value;

use crate::job::{JobRecord, JobState, JobView};

/// Why a transition was refused. The caller decides whether that is an error for its client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("job is already {0}")]
    Terminal(&'static str),
    #[error("job is {0}; only FAILED or TIMED_OUT jobs can be retried")]
    NotRetryable(&'static str),
    #[error("job is {0}, not running")]
    NotRunning(&'static str),
}

/// The outcome of a worker taking a job's delivery token.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// Run it: the record is now IN_PROGRESS on this worker.
    Run(JobRecord),
    /// The ttl passed while it waited: TIMED_OUT without running.
    Expired(JobRecord),
    /// Taken too often (its workers kept vanishing): FAILED.
    Exhausted(JobRecord),
    /// Already terminal (cancelled, purged, timed out): drop the token.
    Skip,
}

/// A worker takes the job. A job found IN_PROGRESS was held by a worker that vanished without
/// a word (its delivery expired): that counts as a redelivery.
pub fn take(rec: &JobRecord, worker_id: &str, host_id: &str, now_ms: u64) -> Take {
    if rec.state.is_terminal() {
        return Take::Skip;
    }
    let mut next = rec.clone();
    if now_ms >= rec.ttl_deadline_ms() {
        next.state = JobState::TimedOut;
        next.error = Some("job ttl expired before a worker took it".into());
        next.finished_at_ms = Some(now_ms);
        return Take::Expired(next);
    }
    if rec.state == JobState::InProgress {
        next.retries += 1;
        next.queued_at_ms = rec.started_at_ms.unwrap_or(rec.queued_at_ms);
    }
    if rec.attempts >= rec.max_attempts {
        next.state = JobState::Failed;
        next.error = Some(lost_error(rec.attempts));
        next.finished_at_ms = Some(now_ms);
        return Take::Exhausted(next);
    }
    next.state = JobState::InProgress;
    next.attempts += 1;
    next.started_at_ms = Some(now_ms);
    next.worker_id = Some(worker_id.to_string());
    next.host_id = Some(host_id.to_string());
    next.output = None;
    next.output_ref = None;
    Take::Run(next)
}

fn lost_error(attempts: u32) -> String {
    format!(
        "job lost: its worker vanished on each of {attempts} attempts (job timed out after {} retries)",
        attempts.saturating_sub(1)
    )
}

/// The worker running the job vanished (process exit, container gone). Back to the queue, or
/// FAILED once it used its attempts.
pub fn worker_lost(rec: &JobRecord, now_ms: u64) -> Result<JobRecord, TransitionError> {
    if rec.state != JobState::InProgress {
        return Err(not_running(rec));
    }
    let mut next = rec.clone();
    if rec.attempts >= rec.max_attempts {
        next.state = JobState::Failed;
        next.error = Some(lost_error(rec.attempts));
        next.finished_at_ms = Some(now_ms);
    } else {
        next.state = JobState::InQueue;
        next.retries += 1;
        next.queued_at_ms = now_ms;
    }
    Ok(next)
}

/// A worker took the job but could not hand it over (its take request was abandoned): undo
/// the take without counting an attempt.
pub fn release(rec: &JobRecord, worker_id: &str) -> Result<JobRecord, TransitionError> {
    if rec.state != JobState::InProgress || rec.worker_id.as_deref() != Some(worker_id) {
        return Err(not_running(rec));
    }
    let mut next = rec.clone();
    next.state = JobState::InQueue;
    next.attempts = rec.attempts.saturating_sub(1);
    next.started_at_ms = None;
    next.worker_id = None;
    next.host_id = None;
    Ok(next)
}

/// What a worker that took a job from its token's snapshot (revision 0, no record yet) and
/// handed it over before recording the start does when that late write finds a record there
/// (someone wrote the job since): see [`found_at_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFound {
    /// The record already says this very run is IN_PROGRESS on this worker (a progress update,
    /// or this write's own earlier try whose answer was lost): keep it as the record.
    Adopt,
    /// The job ended meanwhile (cancelled, purged, timed out in the queue, or its result was
    /// recorded first): the worker stops it if it still runs, for this reason.
    Stop(String),
    /// Anything else (another worker holds it after a redelivery): leave the record alone; the
    /// result's compare-and-set settles the job.
    Leave,
}

/// The decision of [`StartFound`]: `current` is the record found, `taken` the record this
/// worker's take made from the token's snapshot (not written yet).
pub fn found_at_start(current: &JobRecord, taken: &JobRecord) -> StartFound {
    if current.state.is_terminal() {
        let why = current.error.clone().unwrap_or_else(|| format!("job is {}", current.state.as_str()));
        return StartFound::Stop(why);
    }
    let same_run = current.state == JobState::InProgress
        && current.worker_id == taken.worker_id
        && current.attempts == taken.attempts
        && current.started_at_ms == taken.started_at_ms;
    if same_run { StartFound::Adopt } else { StartFound::Leave }
}

/// What a handler reported on job-done (RunPod's reading of the body).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `{"status": "IN_PROGRESS", "output": v}`: a progress update.
    Progress(Value),
    Completed {
        output: Option<Value>,
        stop_pod: bool,
    },
    Failed {
        error: String,
        output: Option<Value>,
        stop_pod: bool,
    },
}

/// Records a result. A result counts while the job is not terminal, from whichever attempt
/// reports first; on a terminal job it is refused (and dropped by the caller).
pub fn finish(rec: &JobRecord, outcome: Outcome, now_ms: u64) -> Result<JobRecord, TransitionError> {
    if rec.state.is_terminal() {
        return Err(TransitionError::Terminal(rec.state.as_str()));
    }
    let mut next = rec.clone();
    // an output stored as a blob is referenced by the caller after this transition
    next.output_ref = None;
    match outcome {
        Outcome::Progress(v) => {
            if rec.state != JobState::InProgress {
                return Err(not_running(rec));
            }
            next.output = Some(v);
            return Ok(next);
        }
        Outcome::Completed { output, stop_pod } => {
            next.state = JobState::Completed;
            next.output = output;
            next.error = None;
            next.stop_pod = stop_pod;
        }
        Outcome::Failed { error, output, stop_pod } => {
            next.state = JobState::Failed;
            next.output = output;
            next.error = Some(error);
            next.stop_pod = stop_pod;
        }
    }
    if next.started_at_ms.is_none() {
        next.started_at_ms = Some(now_ms);
    }
    next.finished_at_ms = Some(now_ms);
    Ok(next)
}

/// Cancel (or purge) a queued or running job.
pub fn cancel(rec: &JobRecord, reason: &str, now_ms: u64) -> Result<JobRecord, TransitionError> {
    end(rec, JobState::Cancelled, reason, now_ms)
}

/// The ttl passed (queued or running) or the execution timeout passed (running).
pub fn time_out(rec: &JobRecord, reason: &str, now_ms: u64) -> Result<JobRecord, TransitionError> {
    end(rec, JobState::TimedOut, reason, now_ms)
}

fn end(rec: &JobRecord, state: JobState, reason: &str, now_ms: u64) -> Result<JobRecord, TransitionError> {
    if rec.state.is_terminal() {
        return Err(TransitionError::Terminal(rec.state.as_str()));
    }
    let mut next = rec.clone();
    next.state = state;
    next.error = Some(reason.to_string());
    next.finished_at_ms = Some(now_ms);
    Ok(next)
}

/// Why a non-terminal job should end now, if it should: the deadline check the endpoint actor
/// runs on every tick.
pub fn overdue(rec: &JobRecord, now_ms: u64) -> Option<&'static str> {
    overdue_by(rec.state, rec.ttl_deadline_ms(), rec.execution_deadline_ms(), now_ms)
}

/// [`overdue`] of what the owning endpoint actor keeps of a job (the same deadlines).
pub fn overdue_view(view: &JobView, now_ms: u64) -> Option<&'static str> {
    overdue_by(view.state, view.ttl_deadline_ms(), view.execution_deadline_ms(), now_ms)
}

fn overdue_by(
    state: JobState,
    ttl_deadline: u64,
    execution_deadline: Option<u64>,
    now_ms: u64,
) -> Option<&'static str> {
    if state.is_terminal() {
        return None;
    }
    if now_ms >= ttl_deadline {
        return Some(if state == JobState::InQueue {
            "job ttl expired before a worker took it"
        } else {
            "job ttl expired while it ran"
        });
    }
    if state == JobState::InProgress && execution_deadline.is_some_and(|d| now_ms >= d) {
        return Some("execution timeout exceeded");
    }
    None
}

/// Re-queue a FAILED or TIMED_OUT job under the same id and input.
pub fn retry(rec: &JobRecord, now_ms: u64) -> Result<JobRecord, TransitionError> {
    if !matches!(rec.state, JobState::Failed | JobState::TimedOut) {
        return Err(TransitionError::NotRetryable(rec.state.as_str()));
    }
    let mut next = rec.clone();
    next.state = JobState::InQueue;
    next.attempts = 0;
    next.retries = 0;
    next.submitted_at_ms = now_ms;
    next.queued_at_ms = now_ms;
    next.started_at_ms = None;
    next.finished_at_ms = None;
    next.worker_id = None;
    next.host_id = None;
    next.output = None;
    next.output_ref = None;
    next.error = None;
    next.stop_pod = false;
    next.webhook_delivery = None;
    Ok(next)
}

fn not_running(rec: &JobRecord) -> TransitionError {
    if rec.state.is_terminal() {
        TransitionError::Terminal(rec.state.as_str())
    } else {
        TransitionError::NotRunning(rec.state.as_str())
    }
}

#[cfg(test)]
mod tests;
