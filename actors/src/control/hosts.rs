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

    /// Hosts heard from within the TTL.
    pub fn live(&self) -> Vec<HostRecord> {
        let now = now_ms();
        self.hosts
            .read()
            .map(|m| m.values().filter(|h| now.saturating_sub(h.heartbeat_at_ms) <= self.ttl_ms).cloned().collect())
            .unwrap_or_default()
    }
}
