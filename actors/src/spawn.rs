//! Spawning actors on a fresh task.
//!
//! An actor's spawn future holds its `pre_start`, which may spawn children in turn; in debug
//! builds these futures are large enough that a chain of them (lease manager → endpoint
//! actor → scaler) overflows a worker thread's stack. Spawning each on a task of its own starts
//! every level on a fresh stack.

use ractor::{Actor, ActorCell, ActorRef, SpawnErr};
use tokio::task::JoinHandle;

pub async fn spawn_linked<A: Actor>(
    actor: A,
    args: A::Arguments,
    supervisor: ActorCell,
) -> Result<(ActorRef<A::Msg>, JoinHandle<()>), SpawnErr> {
    tokio::spawn(async move { Actor::spawn_linked(None, actor, args, supervisor).await })
        .await
        .map_err(|e| SpawnErr::StartupFailed(format!("spawn task failed: {e}").into()))?
}

pub async fn spawn<A: Actor>(actor: A, args: A::Arguments) -> Result<(ActorRef<A::Msg>, JoinHandle<()>), SpawnErr> {
    tokio::spawn(async move { Actor::spawn(None, actor, args).await })
        .await
        .map_err(|e| SpawnErr::StartupFailed(format!("spawn task failed: {e}").into()))?
}
