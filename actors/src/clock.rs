//! Wall-clock time in milliseconds since the Unix epoch, the unit of every timestamp on the wire.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How long from `now_ms` to the next multiple of `period_ms` (a full period when `now_ms` is
/// one), so that timers of the same period fire together.
pub fn until_boundary_ms(now_ms: u64, period_ms: u64) -> u64 {
    let period = period_ms.max(1);
    period - now_ms % period
}

/// Sends `msg()` to `actor` every `period`, on the period's wall-clock boundaries (1 s ticks at
/// every whole second), until the actor is gone. A thousand actors ticking this way wake the
/// process once per period instead of a thousand times at scattered instants (which is what
/// an idle control replica owning a thousand endpoints spent most of its time on). Abort the
/// returned task to stop early.
pub fn tick_aligned<M: ractor::Message>(
    actor: ractor::ActorRef<M>,
    period: std::time::Duration,
    msg: fn() -> M,
) -> tokio::task::JoinHandle<()> {
    let period_ms = (period.as_millis() as u64).max(1);
    let first = tokio::time::Instant::now() + std::time::Duration::from_millis(until_boundary_ms(now_ms(), period_ms));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(first, std::time::Duration::from_millis(period_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            if actor.cast(msg()).is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_boundary_is_never_now_and_never_past_a_period() {
        assert_eq!(until_boundary_ms(10_000, 1_000), 1_000);
        assert_eq!(until_boundary_ms(10_001, 1_000), 999);
        assert_eq!(until_boundary_ms(10_999, 1_000), 1);
        assert_eq!(until_boundary_ms(5, 0), 1);
        for now in [0u64, 1, 99, 100, 12_345_678] {
            for period in [1u64, 7, 100, 1_000] {
                let d = until_boundary_ms(now, period);
                assert!((1..=period).contains(&d));
                assert_eq!((now + d) % period, 0);
            }
        }
    }
}
