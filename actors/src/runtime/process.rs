//! The process runtime: a worker is a local command run by `sh -c` in its own process group,
//! so that killing it also kills whatever it started (the runpod SDK's ping process), and on a
//! [`lifeline`]: the group is killed when this process dies, however it dies, so a host killed
//! hard leaves no worker holding its GPU.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::lifeline::{self, OnParentExit};

use super::{BoxFuture, Exit, Launch, Runtime, StartWorkerError, WorkerHandle};

#[derive(Debug, Clone, Default)]
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<WorkerHandle, StartWorkerError>> {
        Box::pin(async move {
            let command = launch.spec.command.clone().ok_or(StartWorkerError::NothingToRun("command"))?;
            if let Some(dir) = launch.log_file.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&launch.log_file)?;
            let (cmd, lifeline) = lifeline::command("sh", OnParentExit::Kill)?;
            let mut cmd = Command::from(cmd);
            cmd.arg("-c").arg(&command);
            cmd.envs(&launch.spec.env).envs(&launch.env);
            if let Some(dir) = launch.spec.workdir.as_ref().map(std::path::PathBuf::from).or(launch.workdir.clone()) {
                cmd.current_dir(dir);
            }
            // stdin is the lifeline: the group is killed if this process dies without stopping it
            cmd.stdout(log.try_clone()?).stderr(log);
            cmd.kill_on_drop(true);
            let mut child = cmd.spawn()?;
            let pid = child.id().unwrap_or(0);
            let (kill_tx, kill_rx) = oneshot::channel::<()>();
            let (exit_tx, exit_rx) = oneshot::channel::<Exit>();
            let log_file = launch.log_file.clone();
            tokio::spawn(async move {
                let _lifeline = lifeline;
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = kill_rx => {
                        kill_group(pid).await;
                        child.wait().await
                    }
                };
                // whatever the leader did, take its group down with it
                kill_group(pid).await;
                let (code, description) = match status {
                    Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                        (Some(c), _) => (Some(c), format!("exited with code {c}")),
                        (None, Some(sig)) => (None, format!("killed by signal {sig}")),
                        _ => (None, "exited".to_string()),
                    },
                    Err(e) => (None, format!("cannot wait for the process: {e}")),
                };
                let log_tail = tail(&log_file, 5).await;
                let _ = exit_tx.send(Exit { code, description, log_tail });
            });
            Ok(WorkerHandle::new(format!("pid:{pid}"), kill_tx, exit_rx))
        })
    }
}

/// SIGKILL to the whole process group (`kill -KILL -<pgid>`; this crate has no unsafe code).
async fn kill_group(pid: u32) {
    if pid == 0 {
        return;
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{pid}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status(),
    )
    .await;
}

/// The last `lines` lines of a log file (reading at most its last 8 KiB).
pub async fn tail(path: &std::path::Path, lines: usize) -> String {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(8192);
    if f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).await.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
