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

/// A duration for a person, as shoal prints them (worker start phases, the CLI's tables):
/// `850ms`, `12.3s` (cut to a tenth, never rounded up to the next unit), `5m 04s`, `3h 20m`,
/// `2d 4h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{s}.{}s", ms % 1000 / 100),
        60_000..3_600_000 => format!("{}m {:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h {:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::human_ms;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_ms(0), "0ms");
        assert_eq!(human_ms(999), "999ms");
        assert_eq!(human_ms(12_345), "12.3s");
        assert_eq!(human_ms(59_999), "59.9s", "cut, not rounded up to a minute");
        assert_eq!(human_ms(304_000), "5m 04s");
        assert_eq!(human_ms(3 * 3_600_000 + 20 * 60_000 + 5_000), "3h 20m");
        assert_eq!(human_ms(2 * 86_400_000 + 4 * 3_600_000), "2d 4h");
    }
}
