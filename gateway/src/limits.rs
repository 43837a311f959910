//! Rate limits per endpoint and operation, RunPod's (shared/reference/runpod.md §1.9): so many
//! requests per 10 s and so many at once, per endpoint, for each of `/run`, `/runsync`,
//! `/status` and `/stream`, `/cancel`, `/purge-queue` and `/requests`; over a limit the request
//! is answered 429 with `Retry-After` before it reaches the control plane.
//!
//! Each gateway counts its own requests (it stays stateless towards the cluster: no NATS round
//! trip on the request path), so with N gateways behind a balancer an endpoint may receive up to
//! N times the configured numbers; set them per gateway accordingly.
//!
//! The decision ([`Slot::admit`]) is a pure function of the slot and the time; [`Limiter`] holds
//! the slots and the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Deserialize;

/// The span the request counts cover, ms (RunPod's "requests / 10 s").
pub const WINDOW_MS: u64 = 10_000;
/// The window is counted in this many buckets: a request leaves the count 9.9 to 10 s after it
/// was made, so no span of 9.9 s admits more than the limit, nor does any 10 s on average.
const BUCKETS: u64 = 100;
const BUCKET_MS: u64 = WINDOW_MS / BUCKETS;

/// One operation's limits; 0 means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpLimit {
    /// Requests admitted per endpoint in any 10 s.
    pub requests_per_10s: u32,
    /// Requests of the endpoint being answered at once.
    pub concurrent: u32,
}

impl OpLimit {
    pub const NONE: OpLimit = OpLimit { requests_per_10s: 0, concurrent: 0 };

    pub const fn new(requests_per_10s: u32, concurrent: u32) -> OpLimit {
        OpLimit { requests_per_10s, concurrent }
    }

    /// RunPod's base table (shared/reference/runpod.md §1.9).
    pub const fn runpod(op: Op) -> OpLimit {
        match op {
            Op::Run => OpLimit::new(1_000, 200),
            Op::Runsync => OpLimit::new(2_000, 400),
            Op::Status => OpLimit::new(2_000, 400),
            Op::Cancel => OpLimit::new(100, 20),
            Op::PurgeQueue => OpLimit::new(2, 0),
            Op::Requests => OpLimit::new(10, 2),
        }
    }
}

/// One operation's limits as configured: a value left out is RunPod's, 0 is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpLimitConfig {
    pub requests_per_10s: Option<u32>,
    pub concurrent: Option<u32>,
}

impl OpLimitConfig {
    /// Both values set.
    pub const fn set(requests_per_10s: u32, concurrent: u32) -> OpLimitConfig {
        OpLimitConfig { requests_per_10s: Some(requests_per_10s), concurrent: Some(concurrent) }
    }
}

/// `[gateway.rate_limits]`: per operation, RunPod's base table unless set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Off: no request is refused for its rate (the queue limit still applies).
    pub enabled: bool,
    pub run: OpLimitConfig,
    pub runsync: OpLimitConfig,
    /// `/status` and `/stream`.
    pub status: OpLimitConfig,
    /// `/cancel` and `/retry`.
    pub cancel: OpLimitConfig,
    pub purge_queue: OpLimitConfig,
    pub requests: OpLimitConfig,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: true,
            run: OpLimitConfig::default(),
            runsync: OpLimitConfig::default(),
            status: OpLimitConfig::default(),
            cancel: OpLimitConfig::default(),
            purge_queue: OpLimitConfig::default(),
            requests: OpLimitConfig::default(),
        }
    }
}

impl RateLimits {
    /// No limits at all (the load tester's embedded gateway measures shoal, not its limits).
    pub fn off() -> RateLimits {
        RateLimits { enabled: false, ..RateLimits::default() }
    }

    /// The limits `op` is held to.
    pub fn of(&self, op: Op) -> OpLimit {
        if !self.enabled {
            return OpLimit::NONE;
        }
        let set = match op {
            Op::Run => self.run,
            Op::Runsync => self.runsync,
            Op::Status => self.status,
            Op::Cancel => self.cancel,
            Op::PurgeQueue => self.purge_queue,
            Op::Requests => self.requests,
        };
        let runpod = OpLimit::runpod(op);
        OpLimit {
            requests_per_10s: set.requests_per_10s.unwrap_or(runpod.requests_per_10s),
            concurrent: set.concurrent.unwrap_or(runpod.concurrent),
        }
    }
}

/// The operations that are limited, each with its own counts per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Run,
    Runsync,
    Status,
    Cancel,
    PurgeQueue,
    Requests,
}

impl Op {
    /// The operation of a `/v2/{endpoint}/{operation}/...` request, with its endpoint; `None`
    /// for what is not limited (`/health`, other paths, a method the route does not serve).
    pub fn of_request<'a>(method: &axum::http::Method, path: &'a str) -> Option<(&'a str, Op)> {
        use axum::http::Method;
        let mut parts = path.strip_prefix("/v2/")?.split('/');
        let endpoint = parts.next().filter(|s| !s.is_empty())?;
        let name = parts.next()?;
        let with_id = parts.next().is_some_and(|id| !id.is_empty());
        if parts.next().is_some() {
            return None;
        }
        let (get, post) = (method == Method::GET, method == Method::POST);
        let op = match name {
            "run" if post && !with_id => Op::Run,
            "runsync" if post && !with_id => Op::Runsync,
            "status" | "stream" if (get || post) && with_id => Op::Status,
            "cancel" | "retry" if post && with_id => Op::Cancel,
            "purge-queue" if post && !with_id => Op::PurgeQueue,
            "requests" if get && !with_id => Op::Requests,
            _ => return None,
        };
        Some((endpoint, op))
    }

    /// The config key of the operation's limits.
    pub fn key(self) -> &'static str {
        match self {
            Op::Run => "run",
            Op::Runsync => "runsync",
            Op::Status => "status",
            Op::Cancel => "cancel",
            Op::PurgeQueue => "purge_queue",
            Op::Requests => "requests",
        }
    }

    /// How a user names it: the path's operation.
    pub fn path(self) -> &'static str {
        match self {
            Op::Run => "/run",
            Op::Runsync => "/runsync",
            Op::Status => "/status and /stream",
            Op::Cancel => "/cancel and /retry",
            Op::PurgeQueue => "/purge-queue",
            Op::Requests => "/requests",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limit` requests were admitted in the last 10 s; one more fits in `retry_after_ms`.
    Rate { limit: u32, retry_after_ms: u64 },
    /// `limit` requests are being answered.
    Concurrent { limit: u32 },
}

/// The requests admitted in the trailing window, by bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    counts: Vec<u32>,
    /// The sum of `counts`.
    total: u32,
    /// The bucket (`ms / BUCKET_MS`) counts were last added to.
    newest: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window { counts: vec![0; BUCKETS as usize], total: 0, newest: 0 }
    }
}

impl Window {
    fn advance(&mut self, now_ms: u64) {
        let bucket = now_ms / BUCKET_MS;
        if bucket <= self.newest {
            return;
        }
        if bucket - self.newest >= BUCKETS {
            self.counts.fill(0);
            self.total = 0;
        } else {
            for b in self.newest + 1..=bucket {
                let count = &mut self.counts[(b % BUCKETS) as usize];
                self.total -= *count;
                *count = 0;
            }
        }
        self.newest = bucket;
    }

    /// Requests admitted in the window ending at the newest bucket.
    pub fn count(&self) -> u32 {
        self.total
    }

    fn add(&mut self) {
        self.counts[(self.newest % BUCKETS) as usize] += 1;
        self.total += 1;
    }

    /// When (ms) the oldest bucket holding requests leaves the window.
    fn frees_at(&self) -> u64 {
        let first = (self.newest + 1).saturating_sub(BUCKETS);
        let oldest = (first..=self.newest).find(|b| self.counts[(b % BUCKETS) as usize] > 0).unwrap_or(self.newest);
        (oldest + BUCKETS) * BUCKET_MS
    }
}

/// One endpoint's counts for one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub window: Window,
    pub in_flight: u32,
    /// When it last admitted a request (ms).
    pub used_ms: u64,
}

impl Slot {
    /// Admits one request at `now_ms` under `limit`, counting it (the caller ends it with
    /// [`Slot::finish`] when `limit.concurrent` is set), or says why not. A time earlier than one
    /// seen before counts as that one.
    pub fn admit(&mut self, now_ms: u64, limit: OpLimit) -> Result<(), Refusal> {
        self.window.advance(now_ms);
        let now_ms = now_ms.max(self.window.newest * BUCKET_MS);
        if limit.concurrent > 0 && self.in_flight >= limit.concurrent {
            return Err(Refusal::Concurrent { limit: limit.concurrent });
        }
        if limit.requests_per_10s > 0 && self.window.count() >= limit.requests_per_10s {
            let retry_after_ms = self.window.frees_at().saturating_sub(now_ms).max(1);
            return Err(Refusal::Rate { limit: limit.requests_per_10s, retry_after_ms });
        }
        if limit.requests_per_10s > 0 {
            self.window.add();
        }
        if limit.concurrent > 0 {
            self.in_flight += 1;
        }
        self.used_ms = now_ms;
        Ok(())
    }

    /// A request admitted under a concurrency limit was answered.
    pub fn finish(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Whether forgetting it changes nothing: nothing in flight, nothing left in its window.
    fn idle(&self, now_ms: u64) -> bool {
        self.in_flight == 0 && now_ms.saturating_sub(self.used_ms) >= WINDOW_MS
    }
}

type Key = (String, Op);

#[derive(Default)]
struct Slots {
    map: HashMap<Key, Slot>,
    swept_ms: u64,
}

/// The gateway's counts: a slot per endpoint and operation, made on first use and forgotten
/// once idle for a window.
pub struct Limiter {
    limits: RateLimits,
    start: Instant,
    slots: Mutex<Slots>,
}

/// An admitted request; dropping it (when the response is made) ends its concurrency count.
pub struct Permit {
    held: Option<(Arc<Limiter>, Key)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((limiter, key)) = self.held.take()
            && let Some(slot) = limiter.lock().map.get_mut(&key)
        {
            slot.finish();
        }
    }
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Arc<Limiter> {
        Arc::new(Limiter { limits, start: Instant::now(), slots: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // a panic while holding the lock leaves only counts behind: keep using them
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        // from 10 s on, so that the first window starts empty in bucket terms
        WINDOW_MS + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - WINDOW_MS)
    }

    /// Admits a request of `op` for `endpoint`, or says why not.
    pub fn acquire(self: &Arc<Self>, endpoint: &str, op: Op) -> Result<Permit, Refusal> {
        let limit = self.limits.of(op);
        if limit == OpLimit::NONE {
            return Ok(Permit { held: None });
        }
        let now_ms = self.now_ms();
        let mut slots = self.lock();
        if now_ms.saturating_sub(slots.swept_ms) >= WINDOW_MS {
            slots.map.retain(|_, slot| !slot.idle(now_ms));
            slots.swept_ms = now_ms;
        }
        let key = (endpoint.to_string(), op);
        slots.map.entry(key.clone()).or_default().admit(now_ms, limit)?;
        let held = (limit.concurrent > 0).then(|| (Arc::clone(self), key));
        Ok(Permit { held })
    }

    /// Slots held now (for tests: idle ones are forgotten).
    pub fn slots(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Method;
    use proptest::prelude::*;

    use super::*;

    const RATE_3: OpLimit = OpLimit::new(3, 0);

    #[test]
    fn requests_over_the_rate_are_refused_until_the_oldest_leaves_the_window() {
        let mut slot = Slot::default();
        let t0 = 100_000;
        for t in [t0, t0 + 1_500, t0 + 2_500] {
            assert_eq!(slot.admit(t, RATE_3), Ok(()));
        }
        // the first was made in the bucket 100.0–100.1 s: it leaves the window at 110 s
        assert_eq!(slot.admit(t0 + 3_000, RATE_3), Err(Refusal::Rate { limit: 3, retry_after_ms: 7_000 }));
        assert_eq!(slot.admit(t0 + 9_999, RATE_3), Err(Refusal::Rate { limit: 3, retry_after_ms: 1 }));
        assert_eq!(slot.admit(t0 + 10_000, RATE_3), Ok(()));
        assert_eq!(slot.admit(t0 + 10_000, RATE_3), Err(Refusal::Rate { limit: 3, retry_after_ms: 1_500 }));
        // after a quiet window everything is forgotten
        for t in [t0 + 60_000, t0 + 60_000, t0 + 60_000] {
            assert_eq!(slot.admit(t, RATE_3), Ok(()));
        }
    }

    #[test]
    fn concurrency_counts_requests_until_they_finish() {
        let limit = OpLimit::new(0, 2);
        let mut slot = Slot::default();
        assert_eq!(slot.admit(1_000, limit), Ok(()));
        assert_eq!(slot.admit(1_000, limit), Ok(()));
        assert_eq!(slot.admit(1_000, limit), Err(Refusal::Concurrent { limit: 2 }));
        slot.finish();
        assert_eq!(slot.admit(1_000, limit), Ok(()));
        assert_eq!(slot.in_flight, 2);
    }

    #[test]
    fn a_request_refused_for_concurrency_does_not_use_the_rate() {
        let limit = OpLimit::new(2, 1);
        let mut slot = Slot::default();
        assert_eq!(slot.admit(20_000, limit), Ok(()));
        assert_eq!(slot.admit(20_000, limit), Err(Refusal::Concurrent { limit: 1 }));
        slot.finish();
        assert_eq!(slot.admit(20_000, limit), Ok(()), "the refused request was not counted");
        slot.finish();
        assert!(matches!(slot.admit(20_000, limit), Err(Refusal::Rate { limit: 2, .. })));
    }

    #[test]
    fn no_limit_admits_everything_and_counts_nothing() {
        let mut slot = Slot::default();
        for _ in 0..10_000 {
            assert_eq!(slot.admit(5_000, OpLimit::NONE), Ok(()));
        }
        assert_eq!((slot.window.count(), slot.in_flight), (0, 0));
    }

    #[test]
    fn the_defaults_are_runpods_and_each_value_can_be_set_or_turned_off() {
        let on = RateLimits::default();
        assert_eq!(on.of(Op::Run), OpLimit::new(1_000, 200));
        assert_eq!(on.of(Op::Runsync), OpLimit::new(2_000, 400));
        assert_eq!(on.of(Op::Status), OpLimit::new(2_000, 400));
        assert_eq!(on.of(Op::Cancel), OpLimit::new(100, 20));
        assert_eq!(on.of(Op::PurgeQueue), OpLimit::new(2, 0));
        assert_eq!(on.of(Op::Requests), OpLimit::new(10, 2));
        assert_eq!(RateLimits::off().of(Op::PurgeQueue), OpLimit::NONE);
        let some = RateLimits { run: OpLimitConfig { requests_per_10s: Some(5), concurrent: None }, ..on };
        assert_eq!(some.of(Op::Run), OpLimit::new(5, 200), "a value left out is RunPod's");
        let none = RateLimits { cancel: OpLimitConfig::set(0, 0), ..RateLimits::default() };
        assert_eq!(none.of(Op::Cancel), OpLimit::NONE);
    }

    #[test]
    fn operations_come_from_the_path_and_method() {
        let (get, post, put) = (Method::GET, Method::POST, Method::PUT);
        assert_eq!(Op::of_request(&post, "/v2/echo/run"), Some(("echo", Op::Run)));
        assert_eq!(Op::of_request(&post, "/v2/echo/runsync"), Some(("echo", Op::Runsync)));
        assert_eq!(Op::of_request(&get, "/v2/echo/status/j1"), Some(("echo", Op::Status)));
        assert_eq!(Op::of_request(&post, "/v2/echo/stream/j1"), Some(("echo", Op::Status)));
        assert_eq!(Op::of_request(&post, "/v2/echo/retry/j1"), Some(("echo", Op::Cancel)));
        assert_eq!(Op::of_request(&post, "/v2/echo/purge-queue"), Some(("echo", Op::PurgeQueue)));
        assert_eq!(Op::of_request(&get, "/v2/echo/requests"), Some(("echo", Op::Requests)));
        // not limited: health, unknown routes, methods the route refuses, malformed paths
        for (m, p) in [
            (&get, "/v2/echo/health"),
            (&get, "/v2/echo/run"),
            (&put, "/v2/echo/status/j1"),
            (&post, "/v2/echo/status"),
            (&post, "/v2/echo/run/extra"),
            (&get, "/v2/echo/status/j1/more"),
            (&post, "/v2//run"),
            (&get, "/healthz"),
            (&get, "/dashboard/api/endpoints"),
        ] {
            assert_eq!(Op::of_request(m, p), None, "{m} {p}");
        }
    }

    #[test]
    fn the_limiter_releases_concurrency_when_a_permit_drops_and_forgets_idle_slots() {
        let limits = RateLimits { cancel: OpLimitConfig::set(0, 1), ..RateLimits::default() };
        let limiter = Limiter::new(limits);
        let permit = limiter.acquire("echo", Op::Cancel);
        assert!(permit.is_ok());
        assert_eq!(limiter.acquire("echo", Op::Cancel).err(), Some(Refusal::Concurrent { limit: 1 }));
        assert!(limiter.acquire("other", Op::Cancel).is_ok(), "each endpoint has its own counts");
        drop(permit);
        assert!(limiter.acquire("echo", Op::Cancel).is_ok());
        assert_eq!(limiter.slots(), 2);
        // a slot idle for a window is dropped at the next sweep
        {
            let mut slots = limiter.lock();
            slots.swept_ms = 0;
            for slot in slots.map.values_mut() {
                slot.used_ms = 0;
            }
        }
        assert!(limiter.acquire("third", Op::Run).is_ok());
        assert_eq!(limiter.slots(), 1);
    }

    proptest! {
        /// No window of buckets ever admits more than the limit (nor, so, any 9.9 s), and a
        /// request is refused only when the trailing window is full.
        #[test]
        fn never_more_than_the_limit_in_any_window(
            limit in 1u32..20,
            steps in proptest::collection::vec(0u64..1_500, 1..400),
        ) {
            let limit = OpLimit::new(limit, 0);
            let mut slot = Slot::default();
            let mut now = 50_000u64;
            let mut admitted: Vec<u64> = Vec::new();
            for step in steps {
                now += step;
                let in_window = |t: &&u64| now / BUCKET_MS - *t / BUCKET_MS < BUCKETS;
                match slot.admit(now, limit) {
                    Ok(()) => admitted.push(now),
                    Err(Refusal::Rate { retry_after_ms, .. }) => {
                        prop_assert_eq!(admitted.iter().filter(in_window).count(), limit.requests_per_10s as usize);
                        prop_assert!((1..=WINDOW_MS).contains(&retry_after_ms));
                    }
                    Err(other) => prop_assert!(false, "unexpected refusal {:?}", other),
                }
                prop_assert!(admitted.iter().filter(in_window).count() <= limit.requests_per_10s as usize);
            }
        }
    }
}
