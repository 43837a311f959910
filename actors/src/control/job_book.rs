//! The endpoint actor's book of its jobs (pure; unit tested): what it keeps of each job of its
//! endpoint ([`JobView`]: state, deadlines, priority, retries, retention; never input or
//! output), from the history read when it starts and the job events after. It answers the
//! scaler's demand, the health counts and which jobs are overdue, and forgets a finished job
//! when its record expires.
//!
//! The events reach the owner by a core subscription ([`super::feeds::route_job_events`]):
//! cheaper than a JetStream delivery of every record change, but not gap-free. After a gap
//! (a reconnect, a subscriber that fell behind) the book is [restarted](JobBook::restart):
//! the history is read again, and the jobs it no longer holds are forgotten.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use shoal_protocol::api::JobCounts;
use shoal_protocol::job::{JobState, JobView, Priority};
use shoal_protocol::lifecycle;

use super::feeds::{Entry, Feed};
use super::scaling::Demand;

#[derive(Debug, Default)]
pub struct JobBook {
    /// The history read merged with the live events.
    feed: Feed<JobView>,
    /// Non-terminal jobs, by id.
    open: HashMap<String, JobView>,
    /// Last known state, retries and (once finished) record expiry of every retained job.
    seen: HashMap<String, (JobState, u32, Option<u64>)>,
    /// When each finished job's record expires (the earliest first); an entry whose job
    /// changed since (retried, or finished again) is skipped when it comes up.
    expiries: BinaryHeap<Reverse<(u64, String)>>,
    /// During a restart: the jobs known before it that the new history has not named yet.
    unconfirmed: Option<HashSet<String>>,
}

/// What applying a change means to the actor.
#[derive(Debug, Default, PartialEq)]
pub struct Noted {
    /// A normal-priority job entered the queue (the scaler starts a worker at once if none).
    pub queued: bool,
    /// An open job ended: its last view (for the metrics).
    pub ended: Option<JobView>,
}

impl JobBook {
    /// A change from the live events; applied now unless the history is being read.
    pub fn live(&mut self, entry: Entry<JobView>) -> Noted {
        match self.feed.live(entry) {
            Some(entry) => self.apply(entry),
            None => Noted::default(),
        }
    }

    /// A value from the history read.
    pub fn history(&mut self, entry: Entry<JobView>) -> Noted {
        match self.feed.history(entry) {
            Some(entry) => self.apply(entry),
            None => Noted::default(),
        }
    }

    /// The history read is done (`since`: the bucket's revision before it began): applies the
    /// changes held meanwhile, and after a restart forgets the jobs the history did not name.
    pub fn caught_up(&mut self, since: u64) -> Vec<Noted> {
        let noted = self.feed.caught_up(since).into_iter().map(|e| self.apply(e)).collect();
        for id in self.unconfirmed.take().unwrap_or_default() {
            self.forget(&id);
        }
        noted
    }

    #[cfg(test)]
    pub fn is_caught_up(&self) -> bool {
        self.feed.is_caught_up()
    }

    /// Events may have been missed: hold live changes until the history is read again (the
    /// caller starts that read), keeping what is known meanwhile.
    pub fn restart(&mut self) {
        self.feed = Feed::default();
        let known = self.seen.keys().chain(self.open.keys()).cloned().collect();
        self.unconfirmed = Some(known);
    }

    fn apply(&mut self, entry: Entry<JobView>) -> Noted {
        if let Some(unconfirmed) = &mut self.unconfirmed {
            unconfirmed.remove(&entry.id);
        }
        let Some(view) = entry.value else {
            self.forget(&entry.id);
            return Noted::default();
        };
        let before = self.seen.get(&entry.id).map(|(state, _, _)| *state);
        let was_open = before.is_some_and(|state| !state.is_terminal());
        let noted = Noted {
            queued: view.state == JobState::InQueue
                && before != Some(JobState::InQueue)
                && view.policy.priority == Priority::Normal,
            ended: (was_open && view.state.is_terminal()).then(|| view.clone()),
        };
        let expires = view.expires_at_ms();
        self.seen.insert(entry.id.clone(), (view.state, view.retries, expires));
        match expires {
            Some(at) => {
                self.open.remove(&entry.id);
                self.expiries.push(Reverse((at, entry.id)));
            }
            None => {
                self.open.insert(entry.id, view);
            }
        }
        noted
    }

    fn forget(&mut self, id: &str) {
        self.open.remove(id);
        self.seen.remove(id);
    }

    /// Forgets the finished jobs whose records expired by `now` (their retention is over: the
    /// bucket dropped them, and `status` no longer finds them).
    pub fn forget_expired(&mut self, now: u64) {
        while let Some(Reverse((at, _))) = self.expiries.peek()
            && *at <= now
        {
            let Some(Reverse((at, id))) = self.expiries.pop() else { break };
            // a job retried since, or finished again later, is not due yet
            if self.seen.get(&id).is_some_and(|(_, _, expires)| *expires == Some(at)) {
                self.seen.remove(&id);
                self.feed.forget(&id);
            }
        }
    }

    /// What the scaler needs: normal-priority queued and running jobs, and the oldest wait.
    pub fn demand(&self, now: u64) -> Demand {
        let mut d = Demand::default();
        for v in self.open.values() {
            match (v.state, v.policy.priority) {
                (JobState::InQueue, Priority::Normal) => {
                    d.queued += 1;
                    let waited = now.saturating_sub(v.queued_at_ms);
                    d.oldest_wait_ms = Some(d.oldest_wait_ms.map_or(waited, |w| w.max(waited)));
                }
                // low-priority jobs already running keep their workers busy: count them
                (JobState::InProgress, _) => d.in_progress += 1,
                _ => {}
            }
        }
        d
    }

    pub fn counts(&self) -> JobCounts {
        let mut c = JobCounts::default();
        for (state, retries, _) in self.seen.values() {
            match state {
                JobState::InQueue => c.in_queue += 1,
                JobState::InProgress => c.in_progress += 1,
                JobState::Completed => c.completed += 1,
                JobState::Failed => c.failed += 1,
                JobState::Cancelled => c.cancelled += 1,
                JobState::TimedOut => c.timed_out += 1,
            }
            c.retried += u64::from(*retries);
        }
        c
    }

    /// The open jobs whose ttl or execution timeout passed by `now`.
    pub fn overdue(&self, now: u64) -> Vec<String> {
        self.open.iter().filter(|(_, v)| lifecycle::overdue_view(v, now).is_some()).map(|(id, _)| id.clone()).collect()
    }

    /// How many jobs the book holds anything of (open, counted, or a revision): what its memory
    /// grows with.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.seen.len().max(self.open.len()).max(self.feed.keys()).max(self.expiries.len())
    }

    /// Ids of the jobs waiting in the queue.
    pub fn queued(&self) -> Vec<String> {
        self.open.iter().filter(|(_, v)| v.state == JobState::InQueue).map(|(id, _)| id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::job::Policy;

    fn view(state: JobState, revision: u64) -> JobView {
        JobView {
            state,
            policy: Policy { execution_timeout_ms: 1_000, ttl_ms: 10_000, priority: Priority::Normal },
            retries: 0,
            submitted_at_ms: 100,
            queued_at_ms: 100,
            started_at_ms: (state != JobState::InQueue).then_some(150),
            finished_at_ms: state.is_terminal().then_some(200),
            retention_s: Some(60),
            revision,
        }
    }
    fn put(id: &str, v: JobView) -> Entry<JobView> {
        Entry { id: id.into(), revision: v.revision, value: Some(v) }
    }
    fn caught_up_book() -> JobBook {
        let mut b = JobBook::default();
        assert!(b.caught_up(0).is_empty());
        b
    }

    #[test]
    fn a_job_is_queued_runs_and_ends_once_whatever_order_its_events_come_in() {
        let mut b = caught_up_book();
        let n = b.live(put("a", view(JobState::InQueue, 1)));
        assert!(n.queued, "a new normal-priority job wakes the scaler");
        assert_eq!(b.demand(600), Demand { queued: 1, in_progress: 0, oldest_wait_ms: Some(500), warm_slots: 0 });
        // the started event overtook nothing here; the completed one comes before a late copy of it
        assert_eq!(b.live(put("a", view(JobState::InProgress, 2))), Noted::default());
        assert_eq!(b.demand(600).in_progress, 1);
        let done = b.live(put("a", view(JobState::Completed, 3)));
        assert_eq!(done.ended.map(|v| v.state), Some(JobState::Completed));
        assert_eq!(b.live(put("a", view(JobState::InProgress, 2))), Noted::default(), "an older event is dropped");
        assert_eq!(b.demand(600), Demand::default());
        assert_eq!((b.counts().completed, b.counts().in_progress), (1, 0));
        // a started event that arrives before the queued one (two publishers): no wake-up later
        assert_eq!(b.live(put("b", view(JobState::InProgress, 5))), Noted::default());
        assert!(!b.live(put("b", view(JobState::InQueue, 4))).queued);
        assert_eq!(b.demand(600).in_progress, 1);
    }

    #[test]
    fn overdue_jobs_are_named_and_low_priority_ones_do_not_count_as_queued() {
        let mut b = caught_up_book();
        b.live(put("q", view(JobState::InQueue, 1)));
        b.live(put("r", view(JobState::InProgress, 2)));
        let mut low = view(JobState::InQueue, 3);
        low.policy.priority = Priority::Low;
        assert!(!b.live(put("low", low)).queued, "low priority does not scale up");
        assert_eq!(b.demand(120).queued, 1);
        assert_eq!(b.queued().len(), 2);
        assert!(b.overdue(1_149).is_empty());
        assert_eq!(b.overdue(1_150), vec!["r".to_string()], "execution timeout: started 150 + 1000");
        let mut all = b.overdue(10_100);
        all.sort();
        assert_eq!(all, ["low", "q", "r"], "the ttl: submitted 100 + 10000");
    }

    #[test]
    fn a_finished_job_is_forgotten_when_its_record_expires_unless_it_was_retried() {
        let mut b = caught_up_book();
        b.live(put("a", view(JobState::Completed, 1)));
        b.live(put("f", view(JobState::Failed, 2)));
        assert_eq!(b.counts().completed, 1);
        // retried: queued again at revision 3, and fails again later
        b.live(put("f", view(JobState::InQueue, 3)));
        b.forget_expired(200 + 60_000);
        assert_eq!((b.counts().completed, b.counts().in_queue), (0, 1), "a's record expired; f is queued");
        let mut again = view(JobState::Failed, 4);
        again.finished_at_ms = Some(90_000);
        b.live(put("f", again));
        b.forget_expired(90_000 + 59_999);
        assert_eq!(b.counts().failed, 1, "f's second ending is not due yet");
        b.forget_expired(90_000 + 60_000);
        assert_eq!(b.counts(), JobCounts::default());
        assert_eq!(b.held(), 0, "nothing is held for a job whose record expired");
    }

    #[test]
    fn a_removed_job_is_forgotten_for_good() {
        let mut b = caught_up_book();
        b.live(put("a", view(JobState::InQueue, 1)));
        b.live(Entry { id: "a".into(), revision: u64::MAX, value: None });
        assert_eq!((b.demand(0), b.counts()), (Demand::default(), JobCounts::default()));
    }

    #[test]
    fn a_restart_keeps_what_is_known_until_the_history_says_otherwise() {
        let mut b = caught_up_book();
        b.live(put("gone", view(JobState::InQueue, 1)));
        b.live(put("runs", view(JobState::InQueue, 2)));
        b.live(put("kept", view(JobState::InQueue, 3)));
        b.restart();
        assert!(!b.is_caught_up());
        assert_eq!(b.demand(100).queued, 3, "what was known stays while the history is read");
        // a live event during the read waits for it
        assert_eq!(b.live(put("new", view(JobState::InQueue, 9))), Noted::default());
        // the history: "runs" started and "kept" is as it was (events were missed); "gone" is not in it
        b.history(put("runs", view(JobState::InProgress, 5)));
        b.history(put("kept", view(JobState::InQueue, 3)));
        let held = b.caught_up(8);
        assert_eq!(held.len(), 1);
        assert!(held[0].queued);
        let mut queued = b.queued();
        queued.sort();
        assert_eq!(queued, ["kept", "new"]);
        assert_eq!(b.demand(100).in_progress, 1);
        assert_eq!(b.counts().in_queue, 2, "the job the history does not hold is forgotten");
    }
}
