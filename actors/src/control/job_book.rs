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
use std::hash::{DefaultHasher, Hash, Hasher};

use shoal_protocol::api::JobCounts;
use shoal_protocol::job::{JobState, JobView, Priority};
use shoal_protocol::lifecycle;

use super::feeds::{Entry, Feed};
use super::scaling::Demand;

#[derive(Debug, Default)]
pub struct JobBook {
    /// The history read merged with the live events (revisions of the open jobs).
    feed: Feed<JobView>,
    /// Non-terminal jobs, by id.
    open: HashMap<String, JobView>,
    /// Finished jobs whose records are still retained, by a hash of their id: a busy endpoint
    /// retains many more finished jobs than it has open ones (thousands a second for the
    /// retention's half hour), so each costs a few dozen bytes, not its id three times over.
    finished: HashMap<u64, Finished>,
    /// What `finished` counts, kept as it changes (a health query does not walk it).
    finished_counts: JobCounts,
    /// When each finished job's record expires (the earliest first), by id hash; an entry
    /// whose job changed since (retried, or finished again) is skipped when it comes up.
    expiries: BinaryHeap<Reverse<(u64, u64)>>,
    /// During a restart: the jobs known before it that the new history has not named yet.
    unconfirmed: Option<Unconfirmed>,
}

/// What the book keeps of a finished job.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Finished {
    state: JobState,
    retries: u32,
    expires_at_ms: u64,
    /// The record's revision: an older event of the job (its publishers are several
    /// processes, so events can overtake one another) is dropped.
    revision: u64,
}

#[derive(Debug, Default)]
struct Unconfirmed {
    open: HashSet<String>,
    finished: HashSet<u64>,
}

/// The key of a finished job: a fixed 64-bit hash of its id (ids are random UUIDs, so two
/// retained jobs sharing one is not a case to plan for).
fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
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
        let unconfirmed = self.unconfirmed.take().unwrap_or_default();
        for id in unconfirmed.open {
            self.open.remove(&id);
        }
        for hash in unconfirmed.finished {
            self.drop_finished(hash);
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
        self.unconfirmed = Some(Unconfirmed {
            open: self.open.keys().cloned().collect(),
            finished: self.finished.keys().copied().collect(),
        });
    }

    fn apply(&mut self, entry: Entry<JobView>) -> Noted {
        let hash = id_hash(&entry.id);
        if let Some(unconfirmed) = &mut self.unconfirmed {
            unconfirmed.open.remove(&entry.id);
            unconfirmed.finished.remove(&hash);
        }
        if self.finished.get(&hash).is_some_and(|f| f.revision >= entry.revision) {
            // an older event of a job that finished since (the feed holds no revision for
            // finished jobs, so it let this one in and noted it)
            self.feed.forget(&entry.id);
            return Noted::default();
        }
        let Some(view) = entry.value else {
            self.open.remove(&entry.id);
            self.drop_finished(hash);
            return Noted::default();
        };
        let before = match self.open.get(&entry.id) {
            Some(open) => Some(open.state),
            None => self.finished.get(&hash).map(|f| f.state),
        };
        let was_open = before.is_some_and(|state| !state.is_terminal());
        let noted = Noted {
            queued: view.state == JobState::InQueue
                && before != Some(JobState::InQueue)
                && view.policy.priority == Priority::Normal,
            ended: (was_open && view.state.is_terminal()).then(|| view.clone()),
        };
        match view.expires_at_ms() {
            Some(at) => {
                self.open.remove(&entry.id);
                self.feed.forget(&entry.id);
                let finished =
                    Finished { state: view.state, retries: view.retries, expires_at_ms: at, revision: entry.revision };
                self.drop_finished(hash);
                count(&mut self.finished_counts, &finished, 1);
                self.finished.insert(hash, finished);
                self.expiries.push(Reverse((at, hash)));
            }
            None => {
                self.drop_finished(hash);
                self.open.insert(entry.id, view);
            }
        }
        noted
    }

    fn drop_finished(&mut self, hash: u64) {
        if let Some(f) = self.finished.remove(&hash) {
            count(&mut self.finished_counts, &f, -1);
        }
    }

    /// Forgets the finished jobs whose records expired by `now` (their retention is over: the
    /// bucket dropped them, and `status` no longer finds them).
    pub fn forget_expired(&mut self, now: u64) {
        while let Some(Reverse((at, _))) = self.expiries.peek()
            && *at <= now
        {
            let Some(Reverse((at, hash))) = self.expiries.pop() else { break };
            // a job retried since, or finished again later, is not due yet
            if self.finished.get(&hash).is_some_and(|f| f.expires_at_ms == at) {
                self.drop_finished(hash);
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
        let mut c = self.finished_counts.clone();
        for v in self.open.values() {
            match v.state {
                JobState::InQueue => c.in_queue += 1,
                JobState::InProgress => c.in_progress += 1,
                // a terminal view without an end time (not written by shoal) stays open
                JobState::Completed => c.completed += 1,
                JobState::Failed => c.failed += 1,
                JobState::Cancelled => c.cancelled += 1,
                JobState::TimedOut => c.timed_out += 1,
            }
            c.retried += u64::from(v.retries);
        }
        c
    }

    /// The open jobs whose ttl or execution timeout passed by `now`.
    pub fn overdue(&self, now: u64) -> Vec<String> {
        self.open.iter().filter(|(_, v)| lifecycle::overdue_view(v, now).is_some()).map(|(id, _)| id.clone()).collect()
    }

    /// How many jobs the book holds anything of (open, finished, or a revision): what its
    /// memory grows with.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        (self.open.len() + self.finished.len()).max(self.feed.keys()).max(self.expiries.len())
    }

    /// Ids of the jobs waiting in the queue.
    pub fn queued(&self) -> Vec<String> {
        self.open.iter().filter(|(_, v)| v.state == JobState::InQueue).map(|(id, _)| id.clone()).collect()
    }
}

/// Adds (`by` 1) or takes away (`by` -1) a finished job in `c`.
fn count(c: &mut JobCounts, f: &Finished, by: i64) {
    let add = |n: &mut u64, k: u64| *n = n.saturating_add_signed(by * k as i64);
    match f.state {
        JobState::Completed => add(&mut c.completed, 1),
        JobState::Failed => add(&mut c.failed, 1),
        JobState::Cancelled => add(&mut c.cancelled, 1),
        JobState::TimedOut => add(&mut c.timed_out, 1),
        JobState::InQueue => add(&mut c.in_queue, 1),
        JobState::InProgress => add(&mut c.in_progress, 1),
    }
    add(&mut c.retried, u64::from(f.retries));
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
    fn a_finished_job_is_held_once_and_a_late_event_of_it_leaves_nothing_behind() {
        let mut b = caught_up_book();
        b.live(put("a", view(JobState::InQueue, 1)));
        b.live(put("a", view(JobState::InProgress, 2)));
        b.live(put("a", view(JobState::Completed, 3)));
        assert_eq!(b.held(), 1);
        // the started event again, late (another publisher's connection was slower)
        assert_eq!(b.live(put("a", view(JobState::InProgress, 2))), Noted::default());
        assert_eq!(b.held(), 1, "no revision is kept for it");
        assert_eq!((b.counts().completed, b.counts().in_progress), (1, 0));
        // a retry is newer: the job is open again, and counted so
        let mut retried = view(JobState::InQueue, 4);
        retried.retries = 1;
        assert!(b.live(put("a", retried)).queued);
        assert_eq!(b.counts(), JobCounts { in_queue: 1, retried: 1, ..JobCounts::default() });
        assert_eq!(b.held(), 1);
    }

    #[test]
    fn a_restart_forgets_finished_jobs_the_history_no_longer_holds() {
        let mut b = caught_up_book();
        b.live(put("kept", view(JobState::Completed, 1)));
        b.live(put("gone", view(JobState::Failed, 2)));
        b.restart();
        assert_eq!(b.counts().failed, 1, "kept while the history is read");
        b.history(put("kept", view(JobState::Completed, 1)));
        b.caught_up(5);
        assert_eq!(b.counts(), JobCounts { completed: 1, ..JobCounts::default() });
        assert_eq!(b.held(), 2, "the expiry of the job forgotten waits in the heap");
        b.forget_expired(u64::MAX);
        assert_eq!(b.held(), 0);
    }

    /// What the book holds per retained finished job, in bytes of resident memory (a
    /// benchmark, not a test: `cargo test --release -p shoal-actors --lib -- --ignored
    /// --nocapture bytes_held_per_finished_job`).
    #[test]
    #[ignore]
    fn bytes_held_per_finished_job() {
        fn rss() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
        }
        const JOBS: u64 = 1_000_000;
        let mut b = caught_up_book();
        let before = rss();
        for n in 0..JOBS {
            let id = format!("{:08x}-6b1c-4c5e-9a8f-{n:012x}-u1", n * 7919);
            b.live(put(&id, view(JobState::InQueue, 3 * n + 1)));
            b.live(put(&id, view(JobState::InProgress, 3 * n + 2)));
            b.live(put(&id, view(JobState::Completed, 3 * n + 3)));
        }
        let per_job = rss().saturating_sub(before) / JOBS;
        assert_eq!((b.counts().completed, b.counts().in_progress), (JOBS, 0));
        println!("{per_job} bytes per retained finished job ({JOBS} held)");
    }

    proptest::proptest! {
        /// Whatever the events, their order and copies, restarts and expiries: the counts the
        /// book keeps as it goes are what a count of what it holds gives, and a job is either
        /// open or finished, never both.
        #[test]
        fn the_counts_kept_as_jobs_change_are_the_counts_of_what_is_held(
            steps in proptest::collection::vec((0u8..5, 0u8..8, 1u64..40, 0u32..3, 0u8..20), 1..80),
        ) {
            let mut b = caught_up_book();
            let states = [JobState::InQueue, JobState::InProgress, JobState::Completed, JobState::Failed, JobState::Cancelled, JobState::TimedOut];
            for (id, state, revision, retries, op) in steps {
                let id = format!("j{id}");
                match op {
                    0 => b.restart(),
                    1 => { b.caught_up(revision); }
                    2 => b.forget_expired(revision * 5_000),
                    3 => { b.live(Entry { id, revision, value: None }); }
                    _ => {
                        let mut v = view(states[usize::from(state % 6)], revision);
                        v.retries = retries;
                        v.finished_at_ms = v.finished_at_ms.map(|_| revision * 2_000);
                        if op % 2 == 0 { b.live(put(&id, v)); } else { b.history(put(&id, v)); }
                    }
                }
                let mut recount = JobCounts::default();
                for f in b.finished.values() {
                    count(&mut recount, f, 1);
                }
                for (open_id, v) in &b.open {
                    match v.state {
                        JobState::InQueue => recount.in_queue += 1,
                        JobState::InProgress => recount.in_progress += 1,
                        _ => proptest::prop_assert!(false, "a finished job is open"),
                    }
                    recount.retried += u64::from(v.retries);
                    proptest::prop_assert!(!b.finished.contains_key(&id_hash(open_id)));
                }
                proptest::prop_assert_eq!(b.counts(), recount);
            }
        }
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
