//! `shoal` processes: the built binary run as `shoal control`, `shoal host` or `shoal gateway`
//! against a test's own nats-server, with the environment a test gives it. Each one logs to a
//! file of its own (shown when a test fails) and is killed on drop; [`ShoalProcess::stop`]
//! stops it as an operator would, with SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::NatsServer;

/// The `shoal` binary: `$SHOAL_BIN`, or built (when stale) into this test's profile directory.
pub fn shoal_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return Ok(PathBuf::from(p));
    }
    Ok(crate::docker::cargo_build(&["shoal"])?.join("shoal"))
}

/// A running `shoal` process.
pub struct ShoalProcess {
    child: Child,
    pub role: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ShoalProcess {
    /// Starts `shoal <args>` on `server` with `prefix`, plus `env` (`SHOAL_*` configuration,
    /// `OTEL_*`, ...). Its state (`host.state_dir`) and log live in a directory of its own.
    pub fn start(server: &NatsServer, prefix: &str, args: &[&str], env: &[(&str, String)]) -> Result<ShoalProcess> {
        let bin = shoal_bin()?;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("shoal.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .args(args)
            .env("SHOAL_NATS__URL", &server.url)
            .env("SHOAL_NATS__PREFIX", prefix)
            .env("SHOAL_HOST__STATE_DIR", dir.path().join("state"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,async_nats=warn".into()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {} {}", bin.display(), args.join(" ")))?;
        Ok(ShoalProcess { child, role: args.join(" "), log, _dir: dir })
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().context("run kill")?;
        if !sent.success() {
            bail!("cannot send SIG{signal} to shoal {} (pid {pid})", self.role);
        }
        Ok(())
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit (it stops in order and flushes what
    /// it buffered); kills it after `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().context("run kill")?;
        if !sent.success() {
            bail!("cannot signal shoal {} (pid {pid})", self.role);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    bail!("shoal {} exited with {status}:\n{}", self.role, self.log())
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        bail!("shoal {} did not stop within {timeout:?} of SIGTERM:\n{}", self.role, self.log())
    }
}

impl Drop for ShoalProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub use crate::free_port;
