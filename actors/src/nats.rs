//! The connection to NATS and the JetStream topology (streams and buckets) every process
//! ensures at start. Names come from [`shoal_protocol::names::Names`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::Serialize;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::job::MAX_TTL_MS;
use shoal_protocol::names::{EventLimits, Names, Retention};

use crate::blobs::Blobs;

/// Consumers a stream may have. nats-server 2.15 allows 1000 per stream unless the stream sets
/// its own limit; shoal has two durable consumers per endpoint on `SHOAL_JOBS`, and a watch of
/// the jobs and of the workers bucket per endpoint a control replica owns.
const MAX_CONSUMERS: i32 = 100_000;

/// Sizes of the topology: how long results live, how fast a silent host disappears.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
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
    /// How long `SHOAL_EVENTS` keeps an event (worker and host changes, a job's end).
    pub events_max_age_s: u64,
    /// The most events `SHOAL_EVENTS` keeps (the oldest go first; -1: no limit but the age).
    /// A job's end is one event: at 1,000 jobs a second a million is about 17 minutes.
    pub events_max_msgs: i64,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            retention_s: 1800,
            host_ttl_s: 30,
            replicas: 1,
            lease_ttl_s: 10,
            events_max_age_s: 24 * 3600,
            events_max_msgs: 1_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("cannot create stream {name}: {source}")]
    Stream { name: String, source: async_nats::jetstream::context::CreateStreamError },
    #[error("cannot change the subjects or limits of stream {name}: {reason}")]
    StreamUpdate { name: String, reason: String },
    #[error("cannot create bucket {name}: {source}")]
    Bucket { name: String, source: async_nats::jetstream::context::CreateKeyValueError },
    #[error("cannot create object store {name}: {source}")]
    ObjectStore { name: String, source: async_nats::jetstream::context::CreateObjectStoreError },
}

/// Everything a shoal process needs to talk to NATS, cheap to clone.
#[derive(Clone, Debug)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub topology: Topology,
    pub jobs: kv::Store,
    pub endpoints: kv::Store,
    pub workers: kv::Store,
    pub hosts: kv::Store,
    pub leases: kv::Store,
    pub idempotency: kv::Store,
    /// API keys of the HTTP gateway (`shoal-keys`).
    pub keys: kv::Store,
    /// Payloads above what a NATS message carries (`shoal-blobs`).
    pub blobs: Blobs,
    /// Whether terminal job records carry a per-key TTL (NATS >= 2.11); without it they live
    /// as long as the jobs bucket's max age.
    pub job_ttl: bool,
}

/// Subscriptions that fell behind in this process (async-nats dropped messages for them).
static SLOW_CONSUMERS: AtomicU64 = AtomicU64::new(0);

/// Connection options that count the subscriptions falling behind ([`feed_gaps`]) and log the
/// connection's changes. Every client of a control plane should be made with them.
pub fn counting_gaps(options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    options.event_callback(|event| async move {
        match event {
            async_nats::Event::SlowConsumer(sid) => {
                SLOW_CONSUMERS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sid, "a NATS subscription fell behind; messages were dropped");
            }
            async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
            async_nats::Event::Connected => tracing::info!("connected to NATS"),
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    })
}

/// A number that changes whenever messages for core subscriptions on `client` may have been
/// lost: the connection was made again (what was published meanwhile never came), or a
/// subscription of this process fell behind (with [`counting_gaps`]).
pub fn feed_gaps(client: &async_nats::Client) -> u64 {
    client.statistics().connects.load(Ordering::Relaxed).wrapping_add(SLOW_CONSUMERS.load(Ordering::Relaxed))
}

impl Nats {
    /// Connects and makes sure every stream and bucket exists (idempotent).
    pub async fn connect(url: &str, names: Names, topology: &Topology) -> Result<Nats, ConnectError> {
        let client = counting_gaps(async_nats::ConnectOptions::new())
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
        let events = EventLimits { max_age_s: topology.events_max_age_s, max_msgs: topology.events_max_msgs };
        for def in names.streams(topology.retention_s, events) {
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
                max_consumers: MAX_CONSUMERS,
                allow_direct: def.allow_direct,
                ..Default::default()
            };
            let stream = js
                .get_or_create_stream(config)
                .await
                .map_err(|source| ConnectError::Stream { name: def.name.clone(), source })?;
            let mut existing = stream.cached_info().config.clone();
            let max_age = Duration::from_secs(def.max_age_s);
            if !same_subjects(&existing.subjects, &def.subjects)
                || existing.max_age != max_age
                || existing.max_messages != def.max_msgs
                || existing.allow_direct != def.allow_direct
            {
                // made by another version of shoal (SHOAL_EVENTS kept every job event before),
                // or with other limits in its topology settings
                tracing::info!(
                    stream = %def.name,
                    subjects = ?def.subjects,
                    max_age_s = def.max_age_s,
                    max_msgs = def.max_msgs,
                    "changing the stream's subjects or limits"
                );
                existing = js
                    .update_stream(stream::Config {
                        subjects: def.subjects.clone(),
                        max_age,
                        max_messages: def.max_msgs,
                        allow_direct: def.allow_direct,
                        ..existing
                    })
                    .await
                    .map_err(|e| ConnectError::StreamUpdate { name: def.name.clone(), reason: e.to_string() })?
                    .config;
            }
            raise_consumer_limit(&js, existing).await;
        }
        let mut stores = Vec::new();
        for def in names.buckets(topology.retention_s, topology.host_ttl_s, topology.lease_ttl_s) {
            let store = match js.get_key_value(&def.bucket).await {
                Ok(store) => store,
                Err(_) => match js
                    .create_key_value(kv::Config {
                        bucket: def.bucket.clone(),
                        description: def.description.to_string(),
                        history: def.history,
                        max_age: Duration::from_secs(def.max_age_s),
                        num_replicas: topology.replicas,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(store) => store,
                    // another process created it meanwhile (and may have raised its consumer limit)
                    Err(source) => js
                        .get_key_value(&def.bucket)
                        .await
                        .map_err(|_| ConnectError::Bucket { name: def.bucket.clone(), source })?,
                },
            };
            raise_consumer_limit(&js, store.stream.cached_info().config.clone()).await;
            stores.push(store);
        }
        let keys = match js.get_key_value(names.keys_bucket()).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: names.keys_bucket(),
                    description: "API keys of the HTTP gateway, by the SHA-256 of the key".into(),
                    history: 1,
                    num_replicas: topology.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|source| ConnectError::Bucket { name: names.keys_bucket(), source })?,
        };
        let blobs = match js.get_object_store(names.blobs_bucket()).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(async_nats::jetstream::object_store::Config {
                    bucket: names.blobs_bucket(),
                    description: Some("job inputs and outputs above the NATS message size".into()),
                    max_age: longest_job_life(topology),
                    num_replicas: topology.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|source| ConnectError::ObjectStore { name: names.blobs_bucket(), source })?,
        };
        let blobs = Blobs::new(blobs, client.clone());
        let mut it = stores.into_iter();
        let mut next = || it.next().unwrap_or_else(|| unreachable!("one store per bucket definition"));
        let jobs = next();
        let job_ttl = enable_job_ttl(&js, &jobs.stream_name, topology).await;
        Ok(Nats {
            jobs,
            endpoints: next(),
            workers: next(),
            hosts: next(),
            leases: next(),
            idempotency: next(),
            keys,
            blobs,
            job_ttl,
            client,
            js,
            names,
            topology: topology.clone(),
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

fn same_subjects(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// Gives a stream room for [`MAX_CONSUMERS`] consumers (buckets cannot be created with a limit).
async fn raise_consumer_limit(js: &jetstream::Context, config: stream::Config) {
    if config.max_consumers == MAX_CONSUMERS {
        return;
    }
    let name = config.name.clone();
    if let Err(e) = js.update_stream(stream::Config { max_consumers: MAX_CONSUMERS, ..config }).await {
        // servers before 2.12 cannot change the limit, and have no default one to raise
        tracing::debug!(stream = %name, error = %e, "cannot raise the stream's consumer limit");
    }
}

/// The longest a job record can stay non-terminal (the ttl cap) plus its retention: the jobs
/// bucket's max age (a safety net; terminal records expire by their own TTL) and the blobs'.
fn longest_job_life(topology: &Topology) -> Duration {
    Duration::from_millis(MAX_TTL_MS) + Duration::from_secs(topology.retention_s)
}

/// Lets the jobs bucket take per-key TTLs (terminal records expire after their retention).
/// Needs NATS >= 2.11; without it, records live as long as the bucket's max age. No delete
/// marker is placed when a record expires (a bucket made by an older shoal had them): nothing
/// watches the bucket for expiries, and each marker was one more stored write per job, and
/// one more removal when it expired in turn.
async fn enable_job_ttl(js: &jetstream::Context, stream_name: &str, topology: &Topology) -> bool {
    let max_age = longest_job_life(topology);
    let mut stream = match js.get_stream(stream_name).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(stream = stream_name, error = %e, "cannot read the jobs bucket; results keep the bucket's max age");
            return false;
        }
    };
    let config = match stream.info().await {
        Ok(info) => info.config.clone(),
        Err(e) => {
            tracing::warn!(stream = stream_name, error = %e, "cannot read the jobs bucket; results keep the bucket's max age");
            return false;
        }
    };
    if config.allow_message_ttl && config.subject_delete_marker_ttl.is_none() && config.max_age == max_age {
        return true;
    }
    let had_ttl = config.allow_message_ttl;
    let wanted = stream::Config { allow_message_ttl: true, subject_delete_marker_ttl: None, max_age, ..config };
    match js.update_stream(wanted).await {
        Ok(info) if info.config.allow_message_ttl => true,
        Ok(_) => {
            tracing::warn!(
                "this NATS server ignores per-message TTLs (< 2.11); results keep the jobs bucket's max age"
            );
            false
        }
        // TTLs were on already; only the update (of the markers or the max age) was refused
        Err(e) if had_ttl => {
            tracing::info!(error = %e, "cannot update the jobs bucket; it keeps its settings");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot enable per-message TTLs on the jobs bucket (NATS < 2.11?); results keep its max age");
            false
        }
    }
}
