//! The hosts a control replica knows: every host record of `shoal-hosts`, kept current by one
//! watch and shared by all the replica's scalers. A host whose heartbeat is older than the
//! host TTL is lost: nothing is placed on it and its workers are replaced.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use futures::StreamExt;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::host::HostRecord;

use crate::clock::now_ms;
use crate::nats::Nats;

#[derive(Clone, Default)]
pub struct HostDirectory {
    hosts: Arc<RwLock<HashMap<String, HostRecord>>>,
    ttl_ms: u64,
}

impl HostDirectory {
    /// Starts the watch; the task ends when the connection does.
    pub async fn watch(
        nats: &Nats,
        ttl_ms: u64,
    ) -> Result<(HostDirectory, tokio::task::JoinHandle<()>), kv::WatchError> {
        let dir = HostDirectory { hosts: Arc::default(), ttl_ms };
        let mut watch = nats.hosts.watch_with_history(">").await?;
        let hosts = dir.hosts.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let Ok(mut map) = hosts.write() else { break };
                match entry.operation {
                    kv::Operation::Put => {
                        if let Ok(rec) = from_msgpack::<HostRecord>(&entry.value) {
                            map.insert(entry.key.clone(), rec);
                        }
                    }
                    _ => {
                        map.remove(&entry.key);
                    }
                }
            }
        });
        Ok((dir, task))
    }

    /// Whether the host was heard from within the TTL.
    pub fn is_live(&self, id: &str) -> bool {
        let now = now_ms();
        self.hosts
            .read()
            .map(|m| m.get(id).is_some_and(|h| now.saturating_sub(h.heartbeat_at_ms) <= self.ttl_ms))
            .unwrap_or(false)
    }

    /// Warm containers of `warm_key` (`<endpoint>@<version>`) on live hosts that take workers.
    pub fn warm_slots(&self, warm_key: &str) -> u32 {
        let now = now_ms();
        self.hosts
            .read()
            .map(|m| {
                m.values()
                    .filter(|h| !h.draining && now.saturating_sub(h.heartbeat_at_ms) <= self.ttl_ms)
                    .map(|h| h.warm.iter().filter(|w| *w == warm_key).count() as u32)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Hosts heard from within the TTL.
    pub fn live(&self) -> Vec<HostRecord> {
        let now = now_ms();
        self.hosts
            .read()
            .map(|m| m.values().filter(|h| now.saturating_sub(h.heartbeat_at_ms) <= self.ttl_ms).cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, heartbeat_at_ms: u64, warm: &[&str]) -> HostRecord {
        HostRecord {
            id: id.into(),
            runtime: "fake".into(),
            labels: Default::default(),
            gpus: vec![],
            bridge_url: String::new(),
            workers: 0,
            max_workers: 0,
            warm: warm.iter().map(|w| w.to_string()).collect(),
            started_at_ms: 0,
            heartbeat_at_ms,
            draining: false,
            cuda_version: None,
        }
    }

    #[test]
    fn a_silent_host_is_not_live_and_its_warm_slots_do_not_count() {
        let now = now_ms();
        let dir = HostDirectory { hosts: Arc::default(), ttl_ms: 3_000 };
        if let Ok(mut m) = dir.hosts.write() {
            m.insert("fresh".into(), host("fresh", now, &["ep@2", "ep@2", "ep@1"]));
            m.insert("silent".into(), host("silent", now.saturating_sub(60_000), &["ep@2"]));
        }
        assert!(dir.is_live("fresh"));
        assert!(!dir.is_live("silent"), "heard from a minute ago, past the 3 s TTL");
        assert!(!dir.is_live("unknown"));
        assert_eq!(dir.warm_slots("ep@2"), 2, "the silent host's warm container is not counted");
        assert_eq!(dir.warm_slots("ep@3"), 0);
        assert_eq!(dir.live().len(), 1);
        // a draining host's warm containers will not be started: not counted either
        if let Ok(mut m) = dir.hosts.write() {
            let mut draining = host("draining", now, &["ep@2"]);
            draining.draining = true;
            m.insert("draining".into(), draining);
        }
        assert_eq!(dir.warm_slots("ep@2"), 2);
        assert_eq!(dir.live().len(), 2, "still live: its workers finish their jobs");
    }
}
