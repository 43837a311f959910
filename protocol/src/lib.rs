//! shoal-protocol: the wire contract every shoal process shares.
//!
//! Subjects and every stream, bucket and consumer name ([`names`]), id validation ([`ids`]),
//! the messages on the wire ([`api`], [`job`], [`endpoint`], [`worker`], [`host`], [`events`],
//! [`keys`]), RunPod's HTTP JSON shapes ([`runpod`]), the MessagePack/JSON codec ([`codec`]), the fixed error codes ([`error`]) and the job state
//! machine ([`lifecycle`]).
//!
//! This crate is pure data and pure functions: it must not depend on tokio, a NATS client or
//! anything that does I/O (CI checks it), so that every peer, tool and test can use it.

pub mod api;
pub mod codec;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod host;
pub mod ids;
pub mod job;
pub mod keys;
pub mod lease;
pub mod lifecycle;
pub mod names;
pub mod runpod;
pub mod worker;

pub use error::{ApiError, ErrorCode};
