//! The record feeds of a control replica: what its endpoint actors and scalers know of the
//! job records (`shoal-jobs`) and worker records (`shoal-workers`) of the endpoints it owns.
//!
//! A replica owning a thousand endpoints must not hold two thousand watches (each is a
//! JetStream consumer and a subscription, ~10 KiB of buffers in the process and a consumer in
//! the server). So it holds one live feed per kind of record, started before it owns anything,
//! that hands each change to the endpoint actor it concerns, when this replica owns it;
//! changes of other endpoints are dropped before they are decoded:
//!
//! - worker records: a live watch of the bucket ([`route`]; keys `<endpoint>.<id>`);
//! - job records: the job events ([`route_job_events`]), which carry what the endpoint actor
//!   keeps of each job ([`JobView`]) and the record's revision. A job changes three times or
//!   more, at the full rate of the job path: a core subscription to the events costs the
//!   server and this process far less than a JetStream delivery of every record change (the
//!   watch this replaced; BENCHMARKS.md series 13). It is not gap-free, so after a reconnect or
//!   a subscription that fell behind every owned endpoint actor reads its records again.
//!
//! An actor that starts (a new endpoint, a takeover) still needs what was written before:
//! it reads its endpoint's history once ([`read_history`]: the last value per key, then the
//! watch is dropped), while the live feed already delivers. [`Feed`] merges the two: live
//! changes are held until the history is read, then those newer than the history's start are
//! applied; a per-key revision keeps an older value from ever overwriting a newer one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::job::JobView;

use super::Limits;
use super::endpoint_actor::EndpointMsg;
use super::lease_manager::Directory;
use crate::nats::Nats;

/// One change to a record: its id (the key's last token), the bucket's revision of the
/// change, and the new value (`None`: deleted or purged).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    pub id: String,
    pub revision: u64,
    pub value: Option<T>,
}

/// How long a history read waits for an entry before it takes the endpoint as having none
/// (its keys vanished, by expiry, between the check and the read).
const HISTORY_QUIET: Duration = Duration::from_secs(5);
/// How long the live watch waits before it is made again after it ended.
const REWATCH_AFTER: Duration = Duration::from_secs(1);
/// How long a failed history read waits before it tries again.
const HISTORY_RETRY: Duration = Duration::from_secs(1);

/// The merge of one endpoint's history read with the live changes (pure; unit tested).
#[derive(Debug)]
pub struct Feed<T> {
    /// Live changes held back while the history is read; `None` once it is.
    held: Option<Vec<Entry<T>>>,
    /// The revision of the value applied for each live key.
    revisions: HashMap<String, u64>,
}

impl<T> Default for Feed<T> {
    fn default() -> Self {
        Feed { held: Some(Vec::new()), revisions: HashMap::new() }
    }
}

impl<T> Feed<T> {
    /// The history has been read: live changes are applied as they come.
    pub fn is_caught_up(&self) -> bool {
        self.held.is_none()
    }

    /// A change from the live watch: returned when it is to be applied now.
    pub fn live(&mut self, entry: Entry<T>) -> Option<Entry<T>> {
        match &mut self.held {
            Some(held) => {
                held.push(entry);
                None
            }
            None => self.admit(entry),
        }
    }

    /// A value from the history read: returned when it is to be applied.
    pub fn history(&mut self, entry: Entry<T>) -> Option<Entry<T>> {
        self.admit(entry)
    }

    /// The history is read; `since` is the bucket's last revision before the read began, so
    /// every change up to it is in the history. Returns the held changes to apply, in order.
    pub fn caught_up(&mut self, since: u64) -> Vec<Entry<T>> {
        let held = self.held.take().unwrap_or_default();
        // revision 0: a job queued without a record, in no bucket's history (admitted unless
        // a record of it was seen)
        held.into_iter().filter(|e| e.revision > since || e.revision == 0).filter_map(|e| self.admit(e)).collect()
    }

    /// Forgets a key whose record is gone without a deletion being seen (a finished job's
    /// record expires by its TTL): nothing is held for it any more.
    pub fn forget(&mut self, id: &str) {
        self.revisions.remove(id);
    }

    /// How many keys the merge holds a revision for.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.revisions.len()
    }

    fn admit(&mut self, entry: Entry<T>) -> Option<Entry<T>> {
        if self.revisions.get(&entry.id).is_some_and(|seen| *seen >= entry.revision) {
            return None;
        }
        match entry.value {
            Some(_) => self.revisions.insert(entry.id.clone(), entry.revision),
            None => self.revisions.remove(&entry.id),
        };
        Some(entry)
    }
}

fn to_entry<T: DeserializeOwned>(entry: &kv::Entry) -> Option<Entry<T>> {
    let id = entry.key.rsplit('.').next().unwrap_or_default().to_string();
    let value = match entry.operation {
        kv::Operation::Put => match from_msgpack::<T>(&entry.value) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "undecodable record ignored");
                return None;
            }
        },
        _ => None,
    };
    Some(Entry { id, revision: entry.revision, value })
}

/// Why an endpoint's history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot read the stream: {0}")]
    Info(#[from] async_nats::jetstream::context::RequestError),
    #[error("cannot watch: {0}")]
    Watch(#[from] async_nats::jetstream::kv::WatchError),
    #[error("watch failed: {0}")]
    Watcher(#[from] async_nats::jetstream::kv::WatcherError),
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Reads the last value of every key matching `filter` (`<endpoint>.>`), handing each to
/// `emit` (which returns false to stop), and returns the bucket's last revision before the
/// read began (for [`Feed::caught_up`]).
pub async fn read_history<T: DeserializeOwned>(
    store: &kv::Store,
    filter: &str,
    mut emit: impl FnMut(Entry<T>) -> bool,
) -> Result<u64, HistoryError> {
    let since = store.stream.get_info().await?.state.last_sequence;
    // a watch of keys that have no value delivers nothing, not even "caught up": ask first
    let stream_filter = format!("{}{filter}", store.prefix);
    if store.stream.info_with_subjects(&stream_filter).await?.next().await.is_none() {
        return Ok(since);
    }
    let mut watch = store.watch_with_history(filter).await?;
    // the last values come in revision order, then the live ones: stop at the end of the
    // history (nothing pending) or at the first change made after the read began (live
    // changes reach the actor through the replica's feed)
    while let Ok(Some(entry)) = tokio::time::timeout(HISTORY_QUIET, watch.next()).await {
        let entry = entry?;
        let last = entry.delta == 0 || entry.revision > since;
        if let Some(e) = to_entry(&entry)
            && !emit(e)
        {
            break;
        }
        if last {
            break;
        }
    }
    Ok(since)
}

/// Reads the history of `filter` in the bucket `bucket` picks into `actor` (each value as
/// `entry(e)`, then `done(since)`), within the replica's [`Limits`], retrying until it succeeds
/// or the actor is gone. Abort the returned task to stop it.
/// `more`, when given, reads what the bucket does not hold after it (the jobs queued without
/// a record: [`queued_jobs`]).
#[allow(clippy::too_many_arguments)]
pub fn spawn_history_read<T: DeserializeOwned + Send + 'static, M: ractor::Message>(
    nats: Arc<Nats>,
    bucket: fn(&Nats) -> &kv::Store,
    filter: String,
    more: Option<MoreHistory<T>>,
    limits: Arc<Limits>,
    actor: ractor::ActorRef<M>,
    entry: impl Fn(Entry<T>) -> M + Send + Sync + 'static,
    done: impl Fn(u64) -> M + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok(permit) = limits.history_reads.acquire().await else { return };
            let read = match read_history(bucket(&nats), &filter, |e| actor.cast(entry(e)).is_ok()).await {
                Ok(since) => match &more {
                    Some(more) => more(nats.clone()).await.map(|entries| {
                        for e in entries {
                            if actor.cast(entry(e)).is_err() {
                                break;
                            }
                        }
                        since
                    }),
                    None => Ok(since),
                },
                Err(e) => Err(e.to_string()),
            };
            match read {
                Ok(since) => {
                    let _ = actor.cast(done(since));
                    return;
                }
                Err(e) => {
                    drop(permit);
                    tracing::warn!(filter = %filter, error = %e, "cannot read the records; trying again");
                    tokio::time::sleep(HISTORY_RETRY).await;
                }
            }
        }
    })
}

/// A read that follows a history read: what it found, as entries.
pub type MoreHistory<T> =
    Box<dyn Fn(Arc<Nats>) -> futures::future::BoxFuture<'static, Result<Vec<Entry<T>>, String>> + Send + Sync>;

/// The jobs of `endpoint` queued without a record yet, from their tokens, as entries at
/// revision 0 (a record of the same job, at any revision, is newer).
pub fn queued_jobs(endpoint: String) -> MoreHistory<shoal_protocol::job::JobRecord> {
    Box::new(move |nats| {
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let store = crate::jobs::JobStore::new(Nats::clone(&nats));
            let tokens = store.queued_tokens(&endpoint).await.map_err(|e| e.to_string())?;
            Ok(tokens.into_iter().map(|(rec, _)| Entry { id: rec.id.clone(), revision: 0, value: Some(rec) }).collect())
        })
    })
}

/// Starts the live watch of `store` (changes from now on) and the task that hands each change
/// to the owning endpoint actor as `wrap(entry)`. The watch exists when this returns, so no
/// change made after it is missed; if it ends, it is made again from the last revision seen.
pub async fn route<T: DeserializeOwned + Send + 'static>(
    store: kv::Store,
    directory: Directory,
    wrap: fn(Entry<T>) -> EndpointMsg,
) -> Result<tokio::task::JoinHandle<()>, HistoryError> {
    let mut last = store.stream.get_info().await?.state.last_sequence;
    let mut watch = store.watch_all_from_revision(last + 1).await?;
    Ok(tokio::spawn(async move {
        loop {
            while let Some(next) = watch.next().await {
                let entry = match next {
                    Ok(entry) => entry,
                    Err(e) => {
                        tracing::warn!(bucket = %store.name, error = %e, "record feed error");
                        continue;
                    }
                };
                last = last.max(entry.revision);
                let Some((endpoint, _)) = entry.key.split_once('.') else { continue };
                let Some(actor) = directory.actor(endpoint) else { continue };
                if let Some(e) = to_entry::<T>(&entry) {
                    let _ = actor.cast(wrap(e));
                }
            }
            tracing::warn!(bucket = %store.name, revision = last, "record feed ended; watching again");
            loop {
                tokio::time::sleep(REWATCH_AFTER).await;
                match store.watch_all_from_revision(last + 1).await {
                    Ok(w) => {
                        watch = w;
                        break;
                    }
                    Err(e) => tracing::warn!(bucket = %store.name, error = %e, "cannot watch again"),
                }
            }
        }
    }))
}

/// How often the job-event feed looks for a gap when no event comes.
const GAP_CHECK: Duration = Duration::from_secs(1);

/// Starts the live feed of job events (`<prefix>.events.job.>`, a core subscription) and the
/// task that hands each one to the owning endpoint actor as [`EndpointMsg::JobLive`]. The
/// subscription exists when this returns. When events may have been missed (the connection
/// was made again, or the subscription fell behind: [`crate::nats::feed_gaps`]), every owned
/// actor is told to read its records again ([`EndpointMsg::Resync`]), once the subscription is
/// known to be live again. An event without the view (from an older process) is looked up in
/// the record.
pub async fn route_job_events(
    nats: Arc<Nats>,
    directory: Directory,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let subject = nats.names.job_events_all();
    // `<prefix>.events.job.<endpoint>.<job id>.<state>`: the endpoint follows this
    let before_endpoint = subject.trim_end_matches('>').to_string();
    let mut sub = nats.client.subscribe(subject.clone()).await?;
    let mut gaps = crate::nats::feed_gaps(&nats.client);
    Ok(tokio::spawn(async move {
        let mut check = tokio::time::interval(GAP_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(msg) => {
                        let endpoint = msg.subject.strip_prefix(before_endpoint.as_str()).and_then(|s| s.split('.').next());
                        if let Some(actor) = endpoint.and_then(|e| directory.actor(e)) {
                            route_event(&nats, actor, &msg.payload);
                        }
                    }
                    None => {
                        tracing::warn!(subject = %subject, "job event feed ended; subscribing again");
                        tokio::time::sleep(REWATCH_AFTER).await;
                        match nats.client.subscribe(subject.clone()).await {
                            Ok(s) => sub = s,
                            Err(e) => tracing::warn!(error = %e, "cannot subscribe to the job events"),
                        }
                        gaps = gaps.wrapping_add(1); // resync below
                    }
                },
                _ = check.tick() => {}
            }
            let now = crate::nats::feed_gaps(&nats.client);
            if now != gaps {
                // the server has our subscription again once it answered a flush made after it
                if let Err(e) = nats.client.flush().await {
                    tracing::warn!(error = %e, "cannot flush before reading the job records again");
                    continue;
                }
                gaps = now;
                for actor in directory.owned_actors() {
                    let _ = actor.cast(EndpointMsg::Resync);
                }
            }
        }
    }))
}

/// What the feed reads of a [`JobEvent`](shoal_protocol::events::JobEvent) (the rest, a
/// terminal event's output among it, is skipped, not decoded).
#[derive(serde::Deserialize)]
struct Routed {
    job_id: String,
    endpoint: String,
    #[serde(default)]
    removed: bool,
    #[serde(default)]
    view: Option<JobView>,
}

/// Hands one job event to the actor owning its endpoint (events of endpoints owned elsewhere
/// are dropped before they are decoded).
fn route_event(nats: &Arc<Nats>, actor: ractor::ActorRef<EndpointMsg>, payload: &[u8]) {
    let event = match from_msgpack::<Routed>(payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::debug!(error = %e, "undecodable job event ignored");
            return;
        }
    };
    let entry = match (event.removed, event.view) {
        // a removal is final: no later change of that record can exist
        (true, _) => Entry { id: event.job_id, revision: u64::MAX, value: None },
        (false, Some(view)) => Entry { id: event.job_id, revision: view.revision, value: Some(view) },
        (false, None) => {
            // from a process older than the view: read the record (rare)
            let store = crate::jobs::JobStore::new(Nats::clone(nats));
            tokio::spawn(async move { read_job(&store, &actor, &event.endpoint, event.job_id).await });
            return;
        }
    };
    let _ = actor.cast(EndpointMsg::JobLive(entry));
}

/// Reads one job's record and hands it to `actor` as a live change: its view, or its removal
/// when the record is gone. For when the events did not say (an event from an older process,
/// a book found behind its record).
pub async fn read_job(
    store: &crate::jobs::JobStore,
    actor: &ractor::ActorRef<EndpointMsg>,
    endpoint: &str,
    id: String,
) {
    let entry = match store.get(endpoint, &id).await {
        Ok(Some((rec, revision))) => Entry { id, revision, value: Some(JobView::of(&rec, revision)) },
        // a removal is final: no later change of that record can exist
        Ok(None) => Entry { id, revision: u64::MAX, value: None },
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "cannot read a job record");
            return;
        }
    };
    let _ = actor.cast(EndpointMsg::JobLive(entry));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(id: &str, revision: u64, v: u32) -> Entry<u32> {
        Entry { id: id.into(), revision, value: Some(v) }
    }
    fn del(id: &str, revision: u64) -> Entry<u32> {
        Entry { id: id.into(), revision, value: None }
    }

    #[test]
    fn the_feed_reads_the_view_and_removal_of_a_job_event() {
        use shoal_protocol::events::JobEvent;
        let with_view = include_bytes!("../../../protocol/tests/samples/job_event_with_view.msgpack");
        let (read, full): (Routed, JobEvent) =
            (from_msgpack(with_view).expect("decodes"), from_msgpack(with_view).expect("decodes"));
        assert!(full.view.is_some());
        assert_eq!(
            (read.job_id, read.endpoint, read.removed, read.view),
            (full.job_id, full.endpoint, false, full.view)
        );
        let removed = include_bytes!("../../../protocol/tests/samples/job_event_removed.msgpack");
        let read: Routed = from_msgpack(removed).expect("decodes");
        assert!(read.removed && read.view.is_none());
        // an event from before the view: no view, not removed (the feed reads the record)
        let old = include_bytes!("../../../protocol/tests/samples/job_event_with_status.msgpack");
        let read: Routed = from_msgpack(old).expect("decodes");
        assert!(!read.removed && read.view.is_none());
    }

    #[test]
    fn live_changes_wait_for_the_history_and_older_ones_are_dropped() {
        let mut f = Feed::default();
        assert!(!f.is_caught_up());
        // before the read began (revision <= 10): already in the history
        assert_eq!(f.live(put("a", 9, 1)), None);
        assert_eq!(f.live(put("b", 12, 2)), None);
        assert_eq!(f.history(put("a", 9, 1)), Some(put("a", 9, 1)));
        // the history's read saw b at 13 already; the held 12 must not overwrite it
        assert_eq!(f.history(put("b", 13, 3)), Some(put("b", 13, 3)));
        assert_eq!(f.caught_up(10), vec![]);
        assert!(f.is_caught_up());
        assert_eq!(f.live(put("b", 14, 4)), Some(put("b", 14, 4)));
        assert_eq!(f.live(put("b", 14, 4)), None, "a change is applied once");
    }

    #[test]
    fn a_job_queued_without_a_record_during_the_read_is_applied_after_it_unless_its_record_was_seen() {
        // revision 0: a job queued as its token alone (the record is written at its take)
        let mut f = Feed::default();
        assert_eq!(f.live(put("q", 0, 1)), None);
        assert_eq!(f.live(put("taken", 0, 1)), None);
        // the history saw the other job's record: it was taken in the meantime
        assert_eq!(f.history(put("taken", 12, 2)), Some(put("taken", 12, 2)));
        assert_eq!(f.caught_up(10), vec![put("q", 0, 1)], "a queued job is in no bucket's history");
        // a token read after the records, and a late queued event: older than any record
        assert_eq!(f.history(put("taken", 0, 1)), None);
        assert_eq!(f.live(put("q", 0, 1)), None, "applied once");
        assert_eq!(f.live(put("q", 3, 2)), Some(put("q", 3, 2)), "its take is newer");
    }

    #[test]
    fn a_deletion_held_during_the_read_is_applied_after_it() {
        let mut f = Feed::default();
        assert_eq!(f.live(del("a", 11)), None);
        assert_eq!(f.history(put("a", 5, 1)), Some(put("a", 5, 1)));
        assert_eq!(f.caught_up(10), vec![del("a", 11)]);
        // a stale put of a deleted key from before the read never comes back
        let mut g = Feed::default();
        assert_eq!(g.live(put("a", 5, 1)), None);
        assert_eq!(g.history(del("a", 8)), Some(del("a", 8)));
        assert_eq!(g.caught_up(10), vec![]);
    }

    proptest! {
        /// Whatever the interleaving of the history read and the live watch, the values
        /// applied end where the bucket ends: the last value of each key.
        #[test]
        fn the_merge_ends_on_the_last_value_of_every_key(
            writes in proptest::collection::vec((0u8..4, proptest::option::of(0u32..100)), 1..40),
            read_at in 0usize..40,
            snapshot_extra in 0usize..5,
            live_from in 0usize..40,
            interleave in proptest::collection::vec(any::<bool>(), 80),
        ) {
            // the bucket: revisions 1..=n
            let changes: Vec<Entry<u32>> = writes
                .iter()
                .enumerate()
                .map(|(i, (k, v))| Entry { id: format!("k{k}"), revision: i as u64 + 1, value: *v })
                .collect();
            let since = read_at.min(changes.len()) as u64;
            // the history: last value per key (deletions as markers), in revision order, as of
            // the watch's creation (a little after `since`), cut after its first value newer
            // than `since` (as read_history stops there)
            let snapshot = (since as usize + snapshot_extra).min(changes.len());
            let mut last: HashMap<String, Entry<u32>> = HashMap::new();
            for c in changes.iter().take(snapshot) {
                last.insert(c.id.clone(), c.clone());
            }
            let mut history: Vec<Entry<u32>> = last.into_values().collect();
            history.sort_by_key(|e| e.revision);
            if let Some(cut) = history.iter().position(|e| e.revision > since) {
                history.truncate(cut + 1);
            }
            // the live feed: every change from some point up to `since` on (the actor was
            // registered before the read began), some arriving while the history is read
            let live_from = live_from.min(since as usize);
            let mut f = Feed::default();
            let mut state: HashMap<String, u32> = HashMap::new();
            let apply = |state: &mut HashMap<String, u32>, e: Entry<u32>| match e.value {
                Some(v) => { state.insert(e.id, v); }
                None => { state.remove(&e.id); }
            };
            let (mut h, mut l) = (history.into_iter(), changes.clone().into_iter().skip(live_from));
            let mut flips = interleave.into_iter();
            let mut history_done = false;
            loop {
                let take_live = flips.next().unwrap_or(true) || history_done;
                if !take_live {
                    match h.next() {
                        Some(e) => { if let Some(e) = f.history(e) { apply(&mut state, e); } }
                        None => {
                            history_done = true;
                            for e in f.caught_up(since) { apply(&mut state, e); }
                        }
                    }
                    continue;
                }
                match l.next() {
                    Some(e) => { if let Some(e) = f.live(e) { apply(&mut state, e); } }
                    None if history_done => break,
                    None => {
                        for e in h.by_ref() { if let Some(e) = f.history(e) { apply(&mut state, e); } }
                        history_done = true;
                        for e in f.caught_up(since) { apply(&mut state, e); }
                    }
                }
            }
            let mut expected: HashMap<String, u32> = HashMap::new();
            for c in &changes {
                apply(&mut expected, c.clone());
            }
            prop_assert_eq!(state, expected);
        }
    }
}
