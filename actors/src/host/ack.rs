//! A JetStream delivery that is negatively acknowledged when dropped, so an early return, a
//! crash of its holder or a panic means redelivery, never loss.

use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::Acker;

pub struct AckGuard {
    acker: Option<Acker>,
}

impl AckGuard {
    pub fn new(acker: Acker) -> AckGuard {
        AckGuard { acker: Some(acker) }
    }

    /// The job is done (recorded, or nothing is left to do with it): remove the token. A plain
    /// ack, not awaited by the server: the record is the truth, so an ack that is lost only
    /// means a redelivery after the ack wait, which `lifecycle::take` skips.
    pub async fn ack(mut self) {
        if let Some(a) = self.acker.take()
            && let Err(e) = a.ack().await
        {
            tracing::warn!(error = %e, "ack failed; the token will be redelivered and skipped");
        }
    }

    /// Extends the ack wait while the job runs.
    pub async fn progress(&self) {
        if let Some(a) = &self.acker {
            let _ = a.ack_with(AckKind::Progress).await;
        }
    }

    /// Redeliver now.
    pub async fn nak(mut self) {
        if let Some(a) = self.acker.take() {
            let _ = a.ack_with(AckKind::Nak(None)).await;
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = a.ack_with(AckKind::Nak(None)).await;
            });
        }
    }
}
