//! Child processes that do not outlive their parent.
//!
//! A child's process is not stopped when its parent dies without unwinding (SIGKILL, an abort,
//! the OOM killer): a host killed so would leave its process workers running, holding their GPU
//! while the restarted host starts new ones, and `shoal dev` or a test its nats-server, holding
//! the port and the store. Linux's `PR_SET_PDEATHSIG` would need unsafe code, which this
//! workspace forbids; a lifeline does the same with a pipe.
//!
//! [`command`] runs the program through `sh`: the shell gets the read end of a pipe as its
//! standard input (the write end, the [`Lifeline`], stays with the parent), starts a watcher that
//! reads it until end of file, then `exec`s the program in its place (same pid, standard input
//! `/dev/null`). The kernel closes the parent's end when the parent exits however it exits; the
//! watcher then sends the signal to the child's process group, its own included. The child leads
//! a process group of its own for that, so a terminal's Ctrl-C reaches the parent alone, which
//! stops its children in order.
//!
//! The pipe is the parent's own, blocking one: a `Stdio::piped()` stdin of `tokio::process` is
//! non-blocking at the child's end too, where the watcher's read would fail at once.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// What the watcher sends the group once the parent is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnParentExit {
    /// SIGTERM: the program stops cleanly (nats-server flushes its store).
    Terminate,
    /// SIGKILL: the whole group at once (workers and whatever they started).
    Kill,
}

impl OnParentExit {
    fn signal(self) -> &'static str {
        match self {
            OnParentExit::Terminate => "TERM",
            OnParentExit::Kill => "KILL",
        }
    }
}

/// The watcher: fd 3 is the pipe, read until end of file (nothing is ever written to it), then
/// the signal to process group 0 (the shell's, which the program inherits with its pid).
fn script(on_exit: OnParentExit) -> String {
    format!(
        "exec 3<&0 </dev/null; (while read -r _ <&3; do :; done; kill -s {} 0) & exec 3<&-; exec \"$@\"",
        on_exit.signal()
    )
}

/// The parent's end of a child's lifeline: the child is stopped once this is dropped (or this
/// process exits), so keep it as long as the child should run.
#[derive(Debug)]
pub struct Lifeline {
    _write: std::io::PipeWriter,
}

/// A command that runs `program` (add its arguments to the result) in a process group of its
/// own, stopped with `on_exit` when the returned [`Lifeline`] is dropped or this process exits.
/// Its standard input is the lifeline's pipe: do not replace it (the program itself reads
/// `/dev/null`). Convert it with `tokio::process::Command::from` for an async child.
pub fn command(program: impl AsRef<OsStr>, on_exit: OnParentExit) -> std::io::Result<(Command, Lifeline)> {
    let (read, write) = std::io::pipe()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script(on_exit)).arg("shoal-lifeline").arg(program);
    cmd.stdin(Stdio::from(read));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    Ok((cmd, Lifeline { _write: write }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether `pid` still runs (a zombie no longer does: nothing may reap an orphan's).
    fn running(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => false,
        }
    }

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cutting the lifeline, as the parent's death does, kills the program (which runs in the
    /// shell's place, with its pid) and what it started.
    #[test]
    fn a_child_and_its_group_stop_when_the_lifeline_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let (mut cmd, lifeline) = command("sh", OnParentExit::Kill).expect("pipe");
        cmd.arg("-c").arg(format!("sleep 600 & echo $$ $! > {}; read x; wait", pids.display()));
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        until("the child wrote its pids", || std::fs::read_to_string(&pids).is_ok_and(|s| s.ends_with('\n')));
        let text = std::fs::read_to_string(&pids).expect("pids");
        let ids: Vec<u32> = text.split_whitespace().map(|p| p.parse().expect("a pid")).collect();
        assert_eq!(ids[0], child.id(), "the program runs in the shell's place");
        std::thread::sleep(Duration::from_millis(200));
        assert!(running(ids[0]) && running(ids[1]), "alive while the lifeline holds");
        // the program reads /dev/null, not the lifeline: its `read` returned at once, and it
        // waits for its sleep
        drop(lifeline);
        until("the child is killed", || child.try_wait().expect("try_wait").is_some());
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
        until("the grandchild is gone too", || !running(ids[1]));
    }

    /// As a tokio child (the process runtime's workers, `shoal dev`'s nats-server).
    #[tokio::test]
    async fn terminate_lets_an_async_child_stop_cleanly() {
        let (cmd, lifeline) = command("sh", OnParentExit::Terminate).expect("pipe");
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.arg("-c").arg("trap 'exit 7' TERM; while :; do sleep 0.05; done");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(child.try_wait().expect("try_wait").is_none(), "runs while the lifeline holds");
        drop(lifeline);
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("stops").expect("wait");
        assert_eq!(status.code(), Some(7), "{status:?}");
    }
}
