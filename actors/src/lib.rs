//! shoal-actors: everything in shoal that runs.
//!
//! - [`control`]: the NATS API service, the endpoint manager and one endpoint actor per
//!   endpoint (deadlines, counters).
//! - [`host`]: the host actor (supervisor), worker actors (one per worker process or
//!   container), the worker bridge (RunPod's worker HTTP protocol) and the backoff policy.
//! - [`runtime`]: how a worker runs: a local process (and, later, Docker or nothing at all).
//! - [`nats`], [`jobs`]: the JetStream topology and the job store (compare-and-set on records).
//! - [`blobs`]: payloads too large for a NATS message, in the JetStream object store.
//! - [`webhook`]: the webhook dispatcher (one delivery per terminal state, across replicas).
//! - [`metrics`]: the process's Prometheus registry and its `/metrics` listener.
//! - [`trace_context`]: the W3C `traceparent` carried across NATS on the job path.
//! - [`random`]: random identifiers (job, trace and span ids) without a system call each.
//! - [`client`]: a typed client of the NATS API, used by the CLI and the tests.
//! - [`lifeline`]: child processes (workers, nats-server) that do not outlive their parent.
//!
//! Actors own their state and talk to other processes only through NATS. Decisions (the job
//! state machine, backoff) are pure functions, in `shoal-protocol` and [`host::backoff`].

pub mod blobs;
pub mod client;
pub mod clock;
pub mod control;
pub mod host;
pub mod jobs;
pub mod lifeline;
pub mod metrics;
pub mod nats;
pub mod random;
pub mod runtime;
pub mod spawn;
pub mod trace_context;
pub mod webhook;
