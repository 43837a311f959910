//! The warm pool (FlashBoot): stopped containers kept per endpoint version, so the next
//! worker of that version starts one instead of creating a container. Pure bookkeeping; the
//! runtime removes the containers this pool gives back.
//!
//! A container is reused only for the same endpoint version, on the same GPUs (its device
//! request cannot change) and the same bridge URL (its environment cannot change); it keeps
//! the worker id and token it was created with, which the bridge then maps to the new worker.

use std::collections::HashMap;
use std::time::Instant;

/// One stopped container kept for reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warm {
    pub container_id: String,
    pub endpoint: String,
    pub version: u64,
    /// Sorted GPU UUIDs it was created with.
    pub gpus: Vec<String>,
    /// The bridge base URL in its environment.
    pub bridge: String,
    /// The worker id and token in its environment.
    pub worker_id: String,
    pub token: String,
    pub since: Instant,
}

/// What a new worker needs of a warm container to reuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want<'a> {
    pub endpoint: &'a str,
    pub version: u64,
    pub gpus: &'a [String],
    pub bridge: &'a str,
}

#[derive(Debug, Default)]
pub struct WarmPool {
    entries: Vec<Warm>,
    /// Most containers kept per endpoint version.
    per_version: usize,
    /// The oldest version of each endpoint still worth keeping (`u64::MAX`: none, the
    /// endpoint is deleted), so a container that stops after its version was replaced is
    /// not kept.
    floor: HashMap<String, u64>,
}

impl WarmPool {
    pub fn new(per_version: usize) -> WarmPool {
        WarmPool { entries: Vec::new(), per_version, floor: HashMap::new() }
    }

    /// The most recently stopped container that fits, taken out of the pool.
    pub fn take(&mut self, want: &Want<'_>) -> Option<Warm> {
        let i = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.endpoint == want.endpoint
                    && w.version == want.version
                    && w.gpus == want.gpus
                    && w.bridge == want.bridge
            })
            .max_by_key(|(_, w)| w.since)
            .map(|(i, _)| i)?;
        Some(self.entries.remove(i))
    }

    /// Keeps a stopped container; returns the ids of containers to remove: this one when the
    /// pool keeps none or a newer version of its endpoint is known, the entries of older
    /// versions it replaces, and the oldest of its version beyond the bound.
    pub fn offer(&mut self, warm: Warm) -> Vec<String> {
        let newer = self.entries.iter().any(|w| w.endpoint == warm.endpoint && w.version > warm.version);
        let retired = self.floor.get(&warm.endpoint).is_some_and(|floor| warm.version < *floor);
        if self.per_version == 0 || newer || retired {
            return vec![warm.container_id];
        }
        let mut removed = self.discard(&warm.endpoint, Some(warm.version));
        self.entries.retain(|w| w.container_id != warm.container_id);
        self.entries.push(warm.clone());
        let mut same: Vec<&Warm> =
            self.entries.iter().filter(|w| w.endpoint == warm.endpoint && w.version == warm.version).collect();
        if same.len() > self.per_version {
            same.sort_by_key(|w| w.since);
            let evict: Vec<String> =
                same[..same.len() - self.per_version].iter().map(|w| w.container_id.clone()).collect();
            self.entries.retain(|w| !evict.contains(&w.container_id));
            removed.extend(evict);
        }
        removed
    }

    /// Drops an endpoint's containers, except those of `keep_version` (none: the endpoint is
    /// gone), now and when they stop later; returns their ids.
    pub fn discard(&mut self, endpoint: &str, keep_version: Option<u64>) -> Vec<String> {
        self.floor.insert(endpoint.to_string(), keep_version.unwrap_or(u64::MAX));
        let (gone, kept): (Vec<Warm>, Vec<Warm>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|w| w.endpoint == endpoint && Some(w.version) != keep_version);
        self.entries = kept;
        gone.into_iter().map(|w| w.container_id).collect()
    }

    /// A worker of `version` starts: drops the endpoint's containers of older versions (now
    /// and when they stop later); returns their ids.
    pub fn discard_older(&mut self, endpoint: &str, version: u64) -> Vec<String> {
        self.floor.insert(endpoint.to_string(), version);
        let (gone, kept): (Vec<Warm>, Vec<Warm>) =
            std::mem::take(&mut self.entries).into_iter().partition(|w| w.endpoint == endpoint && w.version < version);
        self.entries = kept;
        gone.into_iter().map(|w| w.container_id).collect()
    }

    /// Empties the pool; returns every container id.
    pub fn drain(&mut self) -> Vec<String> {
        self.entries.drain(..).map(|w| w.container_id).collect()
    }

    pub fn entries(&self) -> &[Warm] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn warm(id: &str, endpoint: &str, version: u64, gpus: &[&str], at: Instant) -> Warm {
        Warm {
            container_id: id.into(),
            endpoint: endpoint.into(),
            version,
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            bridge: "http://b:1".into(),
            worker_id: format!("w-{id}"),
            token: "t".into(),
            since: at,
        }
    }

    fn want<'a>(endpoint: &'a str, version: u64, gpus: &'a [String]) -> Want<'a> {
        Want { endpoint, version, gpus, bridge: "http://b:1" }
    }

    #[test]
    fn reuse_needs_the_same_version_gpus_and_bridge_and_takes_the_newest() {
        let t0 = Instant::now();
        let mut pool = WarmPool::new(2);
        assert!(pool.offer(warm("a", "ep", 1, &["G1"], t0)).is_empty());
        assert!(pool.offer(warm("b", "ep", 1, &["G1"], t0 + Duration::from_secs(1))).is_empty());
        let g1 = vec!["G1".to_string()];
        let g2 = vec!["G2".to_string()];
        assert!(pool.take(&want("ep", 2, &g1)).is_none(), "another version");
        assert!(pool.take(&want("ep", 1, &g2)).is_none(), "other GPUs");
        assert!(pool.take(&Want { bridge: "http://elsewhere:1", ..want("ep", 1, &g1) }).is_none(), "other bridge");
        assert_eq!(pool.take(&want("ep", 1, &g1)).map(|w| w.container_id), Some("b".into()));
        assert_eq!(pool.take(&want("ep", 1, &g1)).map(|w| w.container_id), Some("a".into()));
        assert!(pool.take(&want("ep", 1, &g1)).is_none());
    }

    #[test]
    fn the_bound_evicts_the_oldest_and_a_new_version_discards_the_old() {
        let t0 = Instant::now();
        let mut pool = WarmPool::new(2);
        pool.offer(warm("a", "ep", 1, &[], t0));
        pool.offer(warm("b", "ep", 1, &[], t0 + Duration::from_secs(1)));
        assert_eq!(pool.offer(warm("c", "ep", 1, &[], t0 + Duration::from_secs(2))), vec!["a".to_string()]);
        pool.offer(warm("x", "other", 7, &[], t0));
        let mut gone = pool.offer(warm("d", "ep", 2, &[], t0 + Duration::from_secs(3)));
        gone.sort();
        assert_eq!(gone, vec!["b".to_string(), "c".to_string()]);
        // an old version coming back late is not kept
        assert_eq!(pool.offer(warm("e", "ep", 1, &[], t0 + Duration::from_secs(4))), vec!["e".to_string()]);
        let ids: Vec<&str> = pool.entries().iter().map(|w| w.container_id.as_str()).collect();
        assert_eq!(ids, vec!["x", "d"]);
        assert!(pool.discard_older("ep", 2).is_empty());
        assert_eq!(pool.discard_older("ep", 3), vec!["d".to_string()]);
        assert_eq!(pool.drain(), vec!["x".to_string()]);
    }

    #[test]
    fn a_container_stopping_after_its_version_was_replaced_or_deleted_is_not_kept() {
        let t0 = Instant::now();
        let mut pool = WarmPool::new(2);
        pool.discard("ep", Some(2));
        assert_eq!(pool.offer(warm("old", "ep", 1, &[], t0)), vec!["old".to_string()]);
        assert!(pool.offer(warm("cur", "ep", 2, &[], t0)).is_empty());
        pool.discard("ep", None);
        assert_eq!(pool.offer(warm("late", "ep", 2, &[], t0)), vec!["late".to_string()], "deleted");
        pool.discard_older("ep", 1); // created again
        assert!(pool.offer(warm("new", "ep", 1, &[], t0)).is_empty());
    }

    #[test]
    fn a_pool_of_zero_keeps_nothing() {
        let mut pool = WarmPool::new(0);
        assert_eq!(pool.offer(warm("a", "ep", 1, &[], Instant::now())), vec!["a".to_string()]);
        assert!(pool.entries().is_empty());
    }
}
