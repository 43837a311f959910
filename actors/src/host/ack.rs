//! A JetStream delivery that is negatively acknowledged when dropped, so an early return, a
//! crash of its holder or a panic means redelivery, never loss.
//!
//! A job handed to its worker before its start was recorded (see `take::record_start`) carries
//! that start with its delivery: giving the job back for a retry (a nak, or the guard dropped
//! with the worker that held it) records the start first, so the redelivery counts the attempt
//! as it would have had the start been written at the take; only [`AckGuard::release`] gives a
//! job back as never started.

use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::Acker;
use shoal_protocol::job::JobRecord;

use crate::jobs::JobStore;

pub struct AckGuard {
    acker: Option<Acker>,
    /// A start handed over but not recorded yet: the store, and the record as taken.
    start: Option<Box<(JobStore, JobRecord)>>,
}

impl AckGuard {
    pub fn new(acker: Acker) -> AckGuard {
        AckGuard { acker: Some(acker), start: None }
    }

    /// The job went to its worker before its start (`record`, IN_PROGRESS on that worker) was
    /// written: a nak or a drop writes it first.
    pub fn defer_start(&mut self, store: &JobStore, record: JobRecord) {
        self.start = Some(Box::new((store.clone(), record)));
    }

    /// The start is in the record now (or the job's record says otherwise): nothing to write.
    pub fn start_recorded(&mut self) {
        self.start = None;
    }

    /// Whether the job's start is still to be recorded.
    pub fn start_pending(&self) -> bool {
        self.start.is_some()
    }

    /// The job is done (recorded, or nothing is left to do with it): remove the token. A plain
    /// ack, not awaited by the server: the record is the truth, so an ack that is lost only
    /// means a redelivery after the ack wait, which `lifecycle::take` skips.
    pub async fn ack(mut self) {
        self.start = None;
        if let Some(a) = self.acker.take()
            && let Err(e) = a.ack().await
        {
            tracing::warn!(error = %e, "ack failed; the token will be redelivered and skipped");
        }
    }

    /// Extends the ack wait while the job runs.
    pub async fn progress(&self) {
        if let Some(a) = &self.acker {
            let _ = a.ack_with(AckKind::Progress).await;
        }
    }

    /// Redeliver now; a started job's start is recorded first, so the next take counts it.
    pub async fn nak(mut self) {
        let start = self.start.take();
        if let Some(a) = self.acker.take() {
            give_back(a, start).await;
        }
    }

    /// Redeliver now, as never started: no attempt is counted (a take undone before the worker
    /// had the job, or a worker stopped on purpose).
    pub async fn release(mut self) {
        self.start = None;
        if let Some(a) = self.acker.take() {
            let _ = a.ack_with(AckKind::Nak(None)).await;
        }
    }
}

async fn give_back(acker: Acker, start: Option<Box<(JobStore, JobRecord)>>) {
    if let Some(start) = start {
        let (store, record) = *start;
        if let Err(e) = super::take::record_start(&store, &record).await {
            tracing::warn!(job_id = %record.id, error = %e, "cannot record the start of a job given back");
        }
    }
    let _ = acker.ack_with(AckKind::Nak(None)).await;
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(give_back(a, self.start.take()));
        }
    }
}
