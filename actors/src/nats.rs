//! The connection to NATS and the JetStream topology (streams and buckets) every process
//! ensures at start. Names come from [`shoal_protocol::names::Names`].

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::Serialize;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::names::{Names, Retention};

/// Sizes of the topology: how long results live, how fast a silent host disappears.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topology {
    /// How long job records (and their results) are kept after the last change.
    pub retention_s: u64,
    /// A host whose heartbeat is older than this vanishes from `shoal-hosts`.
    pub host_ttl_s: u64,
    /// Replicas of every stream and bucket (3 on a NATS cluster).
    pub replicas: usize,
    /// An endpoint lease not renewed for this long expires and another replica takes over.
    pub lease_ttl_s: u64,
}

impl Default for Topology {
    fn default() -> Self {
        Topology { retention_s: 1800, host_ttl_s: 30, replicas: 1, lease_ttl_s: 10 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("cannot create stream {name}: {source}")]
    Stream { name: String, source: async_nats::jetstream::context::CreateStreamError },
    #[error("cannot create bucket {name}: {source}")]
    Bucket { name: String, source: async_nats::jetstream::context::CreateKeyValueError },
}

/// Everything a shoal process needs to talk to NATS, cheap to clone.
#[derive(Clone, Debug)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub jobs: kv::Store,
    pub endpoints: kv::Store,
    pub workers: kv::Store,
    pub hosts: kv::Store,
    pub leases: kv::Store,
    pub idempotency: kv::Store,
}

impl Nats {
    /// Connects and makes sure every stream and bucket exists (idempotent).
    pub async fn connect(url: &str, names: Names, topology: &Topology) -> Result<Nats, ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .name("shoal")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|source| ConnectError::Connect { url: url.to_string(), source })?;
        Self::with_client(client, names, topology).await
    }

    pub async fn with_client(
        client: async_nats::Client,
        names: Names,
        topology: &Topology,
    ) -> Result<Nats, ConnectError> {
        let js = jetstream::new(client.clone());
        for def in names.streams(topology.retention_s) {
            let config = stream::Config {
                name: def.name.clone(),
                subjects: def.subjects.clone(),
                description: Some(def.description.to_string()),
                retention: match def.retention {
                    Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
                    Retention::Limits => stream::RetentionPolicy::Limits,
                },
                max_age: Duration::from_secs(def.max_age_s),
                max_messages: def.max_msgs,
                num_replicas: topology.replicas,
                ..Default::default()
            };
            js.get_or_create_stream(config).await.map_err(|source| ConnectError::Stream { name: def.name, source })?;
        }
        let mut stores = Vec::new();
        for def in names.buckets(topology.retention_s, topology.host_ttl_s, topology.lease_ttl_s) {
            let store = match js.get_key_value(&def.bucket).await {
                Ok(store) => store,
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: def.bucket.clone(),
                        description: def.description.to_string(),
                        history: def.history,
                        max_age: Duration::from_secs(def.max_age_s),
                        num_replicas: topology.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| ConnectError::Bucket { name: def.bucket, source })?,
            };
            stores.push(store);
        }
        let mut it = stores.into_iter();
        let mut next = || it.next().unwrap_or_else(|| unreachable!("one store per bucket definition"));
        Ok(Nats {
            jobs: next(),
            endpoints: next(),
            workers: next(),
            hosts: next(),
            leases: next(),
            idempotency: next(),
            client,
            js,
            names,
        })
    }

    /// Publishes an event (core publish into `SHOAL_EVENTS`: observational, never awaited).
    pub async fn publish_event<T: Serialize>(&self, subject: String, event: &T) {
        match to_msgpack(event) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, Bytes::from(bytes)).await {
                    tracing::debug!(error = %e, "event publish failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode event"),
        }
    }
}
