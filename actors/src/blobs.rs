//! Payloads above what a NATS message should carry, in the `shoal-blobs` JetStream object
//! store. A job record then holds a reference (`input_ref`, `output_ref`) instead of the value.
//!
//! Who stores what:
//! - **inputs** at submission: the gateway and the CLI store an input above the inline limit
//!   ([`Blobs::offload_input`]: `upload-<uuid>/input`, then send `input_ref`), so no request
//!   outgrows the server's `max_payload`; control stores an inline input above the inline limit
//!   (`<job id>/input`), so a record always fits in one message;
//! - **outputs** when a worker posts job-done (the worker actor, `<job id>/output`);
//! - the host resolves the input when a worker takes the job; the gateway, the CLI and the
//!   webhook dispatcher resolve the output when they return a status.
//!
//! Blobs live as long as the bucket's max age (the longest a job can exist, see
//! [`crate::nats`]); a retried job's output blob is overwritten by its next output.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::{self, ObjectStore};
use bytes::Bytes;
use serde_json::Value;
use shoal_protocol::api::{JobStatus, RunRequest};
use shoal_protocol::lifecycle::Outcome;
use shoal_protocol::names::Names;
use tokio::io::AsyncReadExt;

use crate::jobs::{JobStore, StoreError};

/// NATS' default `max_payload`, assumed until the server's is known.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// The largest value kept inline in a record or a request.
pub const MAX_INLINE: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    #[error("blob {0} does not exist (it expired, or was never stored)")]
    NotFound(String),
    #[error("blob {name} is not JSON: {reason}")]
    Corrupt { name: String, reason: String },
}

/// Values whose JSON is longer than this go to the object store, for a server whose
/// `max_payload` is `max_payload` (0: unknown, NATS' default assumed): a quarter of it (so a
/// record with an inline input and an inline output still fits in one message), and at most
/// [`MAX_INLINE`] (so a run request stays far below control's `max_input_bytes` whatever the
/// server allows).
pub fn inline_limit(max_payload: usize) -> usize {
    let max_payload = if max_payload == 0 { DEFAULT_MAX_PAYLOAD } else { max_payload };
    (max_payload / 4).min(MAX_INLINE)
}

/// An input [`Blobs::offload_input`] stored for a submission.
#[derive(Debug)]
pub struct Upload {
    blobs: Blobs,
    name: String,
}

impl Upload {
    /// Removes the input of a job that was not queued (a failure is only logged: the object
    /// expires with the store's max age).
    pub async fn forget(self) {
        if let Err(e) = self.blobs.delete(&self.name).await {
            tracing::debug!(blob = %self.name, error = %e, "cannot delete the input of a job that was not queued");
        }
    }
}

/// The object store of large payloads, cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    store: ObjectStore,
    client: async_nats::Client,
    /// The server's `max_payload` as last read, and when: reading it clones the server's whole
    /// INFO (a dozen strings), which every job's input and output would do otherwise.
    max_payload: Arc<Mutex<Option<(Instant, usize)>>>,
}

/// How long a read of the server's `max_payload` is used (a reconnect may reach a server
/// configured otherwise).
const MAX_PAYLOAD_FRESH: Duration = Duration::from_secs(5);

impl fmt::Debug for Blobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blobs").finish_non_exhaustive()
    }
}

impl Blobs {
    pub fn new(store: ObjectStore, client: async_nats::Client) -> Blobs {
        Blobs { store, client, max_payload: Arc::new(Mutex::new(None)) }
    }

    /// The object store a control plane created, for a client that creates nothing (the CLI).
    pub async fn open(client: async_nats::Client, names: &Names) -> Result<Blobs, BlobError> {
        let bucket = names.blobs_bucket();
        let store = async_nats::jetstream::new(client.clone()).get_object_store(&bucket).await.map_err(|e| {
            BlobError::Unavailable(format!(
                "cannot open the object store {bucket} of large payloads: {e} (a control plane creates it when it starts)"
            ))
        })?;
        Ok(Blobs::new(store, client))
    }

    fn max_payload(&self) -> usize {
        let mut cached = self.max_payload.lock().unwrap_or_else(PoisonError::into_inner);
        match *cached {
            Some((read_at, max_payload)) if read_at.elapsed() < MAX_PAYLOAD_FRESH => max_payload,
            _ => {
                let max_payload = self.client.server_info().max_payload;
                *cached = Some((Instant::now(), max_payload));
                max_payload
            }
        }
    }

    /// Values whose JSON is longer than this go to the object store (see [`inline_limit`]).
    pub fn inline_limit(&self) -> usize {
        inline_limit(self.max_payload())
    }

    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), BlobError> {
        let mut reader: &[u8] = &bytes;
        self.store
            .put(name, &mut reader)
            .await
            .map_err(|e| BlobError::Unavailable(format!("cannot store {name}: {e}")))?;
        Ok(())
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, BlobError> {
        let mut object = self.store.get(name).await.map_err(|e| match e.kind() {
            object_store::GetErrorKind::NotFound => BlobError::NotFound(name.to_string()),
            _ => BlobError::Unavailable(format!("cannot read {name}: {e}")),
        })?;
        let mut buf = Vec::with_capacity(object.info().size.min(64 * 1024 * 1024));
        object.read_to_end(&mut buf).await.map_err(|e| BlobError::Unavailable(format!("cannot read {name}: {e}")))?;
        Ok(Bytes::from(buf))
    }

    pub async fn delete(&self, name: &str) -> Result<(), BlobError> {
        self.store.delete(name).await.map_err(|e| BlobError::Unavailable(format!("cannot delete {name}: {e}")))
    }

    /// Whether `name` exists (and is not deleted).
    pub async fn exists(&self, name: &str) -> Result<bool, BlobError> {
        match self.store.info(name).await {
            Ok(info) => Ok(!info.deleted),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(BlobError::Unavailable(format!("cannot look up {name}: {e}"))),
        }
    }

    pub async fn put_json(&self, name: &str, json: Vec<u8>) -> Result<(), BlobError> {
        self.put(name, Bytes::from(json)).await
    }

    pub async fn get_json(&self, name: &str) -> Result<Value, BlobError> {
        let bytes = self.get(name).await?;
        serde_json::from_slice(&bytes).map_err(|e| BlobError::Corrupt { name: name.to_string(), reason: e.to_string() })
    }

    /// Stores `value` under `name` if its JSON is above the inline limit; returns whether it did.
    pub async fn offload(&self, name: &str, value: &Value) -> Result<bool, BlobError> {
        let json =
            serde_json::to_vec(value).map_err(|e| BlobError::Corrupt { name: name.into(), reason: e.to_string() })?;
        if json.len() <= self.inline_limit() {
            return Ok(false);
        }
        self.put_json(name, json).await?;
        Ok(true)
    }

    /// Moves a run request's input to the object store when it is above the inline limit, under
    /// a name of its own (`upload-<uuid>/input`: the job id is not known yet), and makes the
    /// request carry `input_ref` instead. Submit it with
    /// [`crate::client::ApiClient::run_uploaded`], which removes the upload again when the job
    /// was not queued.
    pub async fn offload_input(&self, names: &Names, req: &mut RunRequest) -> Result<Option<Upload>, BlobError> {
        let name = names.blob_input(&format!("upload-{}", uuid::Uuid::new_v4().simple()));
        if !self.offload(&name, &req.input).await? {
            return Ok(None);
        }
        req.input = Value::Null;
        req.input_ref = Some(name.clone());
        Ok(Some(Upload { blobs: self.clone(), name }))
    }

    /// Replaces a status's `output_ref` by the output it names.
    pub async fn resolve_output(&self, status: &mut JobStatus) -> Result<(), BlobError> {
        if let Some(name) = status.output_ref.take() {
            status.output = Some(self.get_json(&name).await?);
        }
        Ok(())
    }

    /// Moves a job-done output above the inline limit into the object store under `name`;
    /// returns the outcome to record (its output then null or absent) and the reference. A
    /// result for a job already terminal is left alone (it will be dropped), so a late result
    /// never overwrites the blob of the one that counted.
    pub async fn offload_outcome(
        &self,
        store: &JobStore,
        endpoint: &str,
        job_id: &str,
        name: &str,
        mut outcome: Outcome,
    ) -> Result<(Outcome, Option<String>), StoreError> {
        let output = match &mut outcome {
            Outcome::Progress(v) => Some(v),
            Outcome::Completed { output, .. } | Outcome::Failed { output, .. } => output.as_mut(),
        };
        let Some(output) = output else { return Ok((outcome, None)) };
        let json =
            serde_json::to_vec(output).map_err(|e| StoreError::Corrupt { key: name.into(), reason: e.to_string() })?;
        if json.len() <= self.inline_limit() {
            return Ok((outcome, None));
        }
        if store.get(endpoint, job_id).await?.is_none_or(|(r, _)| r.state.is_terminal()) {
            return Ok((outcome, None));
        }
        self.put_json(name, json).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        *output = Value::Null;
        if let Outcome::Completed { output, .. } | Outcome::Failed { output, .. } = &mut outcome {
            *output = None;
        }
        Ok((outcome, Some(name.to_string())))
    }
}
