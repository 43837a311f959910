use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::job::{Policy, Priority};

fn queued(now: u64) -> JobRecord {
    let policy = Policy { execution_timeout_ms: 10_000, ttl_ms: 60_000, priority: Priority::Normal };
    JobRecord::queued("j1-u1", "ep", json!({"x": 1}), policy, 2, now)
}

fn run(rec: &JobRecord, now: u64) -> JobRecord {
    match take(rec, "w1", "h1", now) {
        Take::Run(r) => r,
        other => panic!("expected Run, got {other:?}"),
    }
}

#[test]
fn take_then_complete_records_times_and_worker() {
    let r = run(&queued(1_000), 1_500);
    assert_eq!(r.state, JobState::InProgress);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.worker_id.as_deref(), Some("w1"));
    assert_eq!(r.delay_time_ms(), Some(500));
    let done = finish(&r, Outcome::Completed { output: Some(json!(7)), stop_pod: false }, 2_000).expect("finish");
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.execution_time_ms(), Some(500));
    assert_eq!(done.output, Some(json!(7)));
}

#[test]
fn late_result_after_cancel_is_refused() {
    let r = run(&queued(0), 1);
    let c = cancel(&r, "cancelled by request", 2).expect("cancel");
    assert_eq!(c.state, JobState::Cancelled);
    let late = finish(&c, Outcome::Completed { output: None, stop_pod: false }, 3);
    assert_eq!(late, Err(TransitionError::Terminal("CANCELLED")));
}

#[test]
fn queued_job_past_ttl_is_timed_out_at_take_and_by_deadline_check() {
    let q = queued(0);
    assert_eq!(overdue(&q, 59_999), None);
    assert!(overdue(&q, 60_000).is_some());
    match take(&q, "w", "h", 60_000) {
        Take::Expired(r) => assert_eq!(r.state, JobState::TimedOut),
        other => panic!("{other:?}"),
    }
}

#[test]
fn running_job_past_execution_timeout_is_overdue() {
    let r = run(&queued(0), 100);
    assert_eq!(overdue(&r, 10_099), None);
    assert_eq!(overdue(&r, 10_100), Some("execution timeout exceeded"));
    let t = time_out(&r, "execution timeout exceeded", 10_100).expect("time out");
    assert_eq!(t.state, JobState::TimedOut);
}

#[test]
fn lost_worker_requeues_then_fails_past_max_attempts() {
    let r = run(&queued(0), 1);
    let q = worker_lost(&r, 2).expect("requeue");
    assert_eq!((q.state, q.retries), (JobState::InQueue, 1));
    let r2 = run(&q, 3);
    assert_eq!(r2.attempts, 2);
    let f = worker_lost(&r2, 4).expect("fail");
    assert_eq!(f.state, JobState::Failed);
    assert!(f.error.as_deref().unwrap_or_default().contains("job lost"));
}

#[test]
fn redelivery_of_a_silently_lost_job_counts_attempts() {
    let r = run(&queued(0), 1);
    // its worker's host died: the token comes back while the record still says IN_PROGRESS
    let r2 = run(&r, 5);
    assert_eq!((r2.attempts, r2.retries), (2, 1));
    match take(&r2, "w3", "h3", 9) {
        Take::Exhausted(f) => assert_eq!(f.state, JobState::Failed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn retry_only_from_failed_or_timed_out() {
    let q = queued(0);
    assert!(matches!(retry(&q, 1), Err(TransitionError::NotRetryable("IN_QUEUE"))));
    let r = run(&q, 1);
    let f = finish(&r, Outcome::Failed { error: "boom".into(), output: None, stop_pod: false }, 2).expect("fail");
    let again = retry(&f, 3).expect("retry");
    assert_eq!(again.state, JobState::InQueue);
    assert_eq!(again.id, q.id);
    assert_eq!(again.input, q.input);
    assert_eq!((again.attempts, again.output.clone(), again.error.clone()), (0, None, None));
    let c = cancel(&q, "x", 1).expect("cancel");
    assert!(retry(&c, 2).is_err());
}

#[test]
fn blob_outputs_and_webhook_outcomes_belong_to_one_run() {
    let mut r = run(&queued(0), 1);
    r.output_ref = Some("output/j1-u1".into());
    // a later result replaces the blob reference (the caller sets a new one if it stores one)
    let done = finish(&r, Outcome::Completed { output: Some(json!(1)), stop_pod: false }, 2).expect("done");
    assert_eq!((done.output.clone(), done.output_ref.clone()), (Some(json!(1)), None));
    let mut failed = finish(&r, Outcome::Failed { error: "x".into(), output: None, stop_pod: false }, 2).expect("f");
    failed.output_ref = Some("output/j1-u1".into());
    failed.webhook_delivery =
        Some(crate::job::WebhookDelivery { delivered: true, attempts: 1, status: Some(200), error: None, at_ms: 3 });
    let again = retry(&failed, 4).expect("retry");
    assert_eq!((again.output_ref, again.webhook_delivery), (None, None), "a retry starts clean");
    let mut lost = r.clone();
    lost.output_ref = Some("output/j1-u1".into());
    let Take::Run(retaken) = take(&lost, "w2", "h1", 5) else { panic!("expected a take") };
    assert_eq!(retaken.output_ref, None, "a new attempt drops the progress output");
}

#[test]
fn release_undoes_a_take_without_counting_it() {
    let q = queued(0);
    let r = run(&q, 1);
    let back = release(&r, "w1").expect("release");
    assert_eq!((back.state, back.attempts, back.worker_id.clone()), (JobState::InQueue, 0, None));
    assert!(release(&r, "other").is_err());
}

#[test]
fn progress_keeps_the_job_running() {
    let r = run(&queued(0), 1);
    let p = finish(&r, Outcome::Progress(json!("half")), 2).expect("progress");
    assert_eq!((p.state, p.output.clone()), (JobState::InProgress, Some(json!("half"))));
    assert!(finish(&queued(0), Outcome::Progress(json!(1)), 2).is_err());
}

#[test]
fn a_start_recorded_late_adopts_its_own_run_stops_for_an_end_and_leaves_anything_else() {
    let q = queued(0);
    let taken = run(&q, 1);
    // the job was cancelled (or timed out, or purged) in the queue while it was starting
    let cancelled = cancel(&q, "cancelled by request", 2).expect("cancel");
    assert_eq!(found_at_start(&cancelled, &taken), StartFound::Stop("cancelled by request".into()));
    // its result was recorded first (the late start lost the race): stop is a no-op then
    let done = finish(&taken, Outcome::Completed { output: None, stop_pod: false }, 3).expect("finish");
    assert_eq!(found_at_start(&done, &taken), StartFound::Stop("job is COMPLETED".into()));
    // a progress update of this very run created the record first
    let progressed = finish(&taken, Outcome::Progress(json!("half")), 2).expect("progress");
    assert_eq!(found_at_start(&progressed, &taken), StartFound::Adopt);
    // another worker's run (a redelivery after this one's ack wait ran out)
    let Take::Run(other) = take(&q, "w2", "h2", 5) else { panic!("expected a take") };
    assert_eq!(found_at_start(&other, &taken), StartFound::Leave);
    // a record still queued (written by someone else without ending it)
    assert_eq!(found_at_start(&q, &taken), StartFound::Leave);
}

#[derive(Debug, Clone)]
enum Ev {
    Take,
    Complete,
    Fail,
    Progress,
    Cancel,
    TimeOut,
    Lost,
    Retry,
    Tick(u64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        Just(Ev::Take),
        Just(Ev::Complete),
        Just(Ev::Fail),
        Just(Ev::Progress),
        Just(Ev::Cancel),
        Just(Ev::TimeOut),
        Just(Ev::Lost),
        Just(Ev::Retry),
        (0u64..30_000).prop_map(Ev::Tick),
    ]
}

/// What event `e` does to `rec` at `now` (a tick moves `now` on): the next record, if any.
fn step(rec: &JobRecord, e: Ev, now: &mut u64) -> Option<JobRecord> {
    let now_ms = *now;
    match e {
        Ev::Take => match take(rec, "w", "h", now_ms) {
            Take::Run(r) | Take::Expired(r) | Take::Exhausted(r) => Some(r),
            Take::Skip => None,
        },
        Ev::Complete => finish(rec, Outcome::Completed { output: Some(json!(1)), stop_pod: false }, now_ms).ok(),
        Ev::Fail => finish(rec, Outcome::Failed { error: "e".into(), output: None, stop_pod: false }, now_ms).ok(),
        Ev::Progress => finish(rec, Outcome::Progress(json!(0)), now_ms).ok(),
        Ev::Cancel => cancel(rec, "c", now_ms).ok(),
        Ev::TimeOut => time_out(rec, "t", now_ms).ok(),
        Ev::Lost => worker_lost(rec, now_ms).ok(),
        Ev::Retry => retry(rec, now_ms).ok(),
        Ev::Tick(d) => {
            *now += d;
            None
        }
    }
}

proptest! {
    /// Whatever order events arrive in: terminal states only change through retry, attempts
    /// never exceed the maximum, a running job always names its worker, and times are ordered.
    #[test]
    fn invariants_hold_for_any_event_sequence(events in prop::collection::vec(ev(), 0..60)) {
        let mut rec = queued(0);
        let mut now = 0u64;
        for e in events {
            now += 1;
            let before = rec.clone();
            let next = step(&rec, e, &mut now);
            if let Some(n) = next {
                if before.state.is_terminal() {
                    prop_assert_eq!(n.state, JobState::InQueue, "only retry leaves a terminal state");
                    prop_assert!(matches!(before.state, JobState::Failed | JobState::TimedOut));
                }
                rec = n;
            }
            prop_assert!(rec.attempts <= rec.max_attempts);
            if rec.state == JobState::InProgress {
                prop_assert!(rec.worker_id.is_some() && rec.started_at_ms.is_some());
            }
            if rec.state.is_terminal() {
                prop_assert!(rec.finished_at_ms.is_some());
            }
            if let (Some(s), Some(f)) = (rec.started_at_ms, rec.finished_at_ms) {
                prop_assert!(s <= f);
            }
            prop_assert_eq!(&rec.id, "j1-u1");
        }
    }
}

proptest! {
    /// What the owning endpoint actor keeps of a job ([`JobView`]) has the record's deadlines,
    /// times and retention, whatever happened to the job and whenever the actor looks.
    #[test]
    fn the_owners_view_has_the_records_deadlines(
        events in prop::collection::vec(ev(), 0..40),
        look in prop::collection::vec(0u64..200_000, 1..8),
        retention in prop::option::of(0u64..4_000),
    ) {
        let mut rec = JobRecord { retention_s: retention, ..queued(0) };
        let mut now = 0u64;
        for e in events {
            now += 1;
            let next = step(&rec, e, &mut now);
            let Some(next) = next else { continue };
            let view = JobView::of(&next, 7);
            prop_assert_eq!(view.revision, 7);
            prop_assert_eq!(view.state, next.state);
            prop_assert_eq!(view.delay_time_ms(), next.delay_time_ms());
            prop_assert_eq!(view.execution_time_ms(), next.execution_time_ms());
            for at in &look {
                prop_assert_eq!(overdue_view(&view, now + at), overdue(&next, now + at));
            }
            match view.expires_at_ms() {
                Some(at) => prop_assert_eq!(at, next.finished_at_ms.unwrap_or_default() + next.retention_s() * 1000),
                None => prop_assert!(!next.state.is_terminal()),
            }
            prop_assert!(view.same_as(&JobView::of(&next, 8)), "the revision aside, the same");
            prop_assert_eq!(view.same_as(&JobView::of(&rec, 7)), JobView::of(&rec, 7) == view);
            rec = next;
        }
    }
}
