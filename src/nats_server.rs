//! The child nats-server of `shoal dev`: finding the binary, starting it with JetStream on a
//! local port, waiting until it accepts connections, and stopping it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_actors::lifeline::{self, Lifeline, OnParentExit};
use tokio::process::{Child, Command};

const INSTALL_HINT: &str = "run ./scripts/setup.sh in the shoal clone (it installs the pinned nats-server under .tools/), \
     or put nats-server on PATH, or set SHOAL_NATS_SERVER to its path";

/// Where nats-server may be, in order: `$SHOAL_NATS_SERVER`, `PATH`, then the versions
/// `scripts/setup.sh` installed (`$SHOAL_TOOLS/nats-*/bin/nats-server`, `.tools/...`).
pub struct Search {
    pub explicit: Option<PathBuf>,
    pub path_var: Option<std::ffi::OsString>,
    pub tools_dirs: Vec<PathBuf>,
}

impl Search {
    pub fn from_env() -> Search {
        let mut tools_dirs = Vec::new();
        if let Some(dir) = std::env::var_os("SHOAL_TOOLS").filter(|d| !d.is_empty()) {
            tools_dirs.push(PathBuf::from(dir));
        }
        tools_dirs.push(PathBuf::from(".tools"));
        Search {
            explicit: std::env::var_os("SHOAL_NATS_SERVER").filter(|p| !p.is_empty()).map(PathBuf::from),
            path_var: std::env::var_os("PATH"),
            tools_dirs,
        }
    }

    pub fn find(&self) -> Result<PathBuf> {
        if let Some(path) = &self.explicit {
            if is_executable(path) {
                return Ok(path.clone());
            }
            bail!("SHOAL_NATS_SERVER is {} but that is not an executable file; {INSTALL_HINT}", path.display());
        }
        if let Some(found) = self.path_var.as_deref().and_then(|p| find_in_path(p, "nats-server")) {
            return Ok(found);
        }
        for dir in &self.tools_dirs {
            if let Some(found) = newest_installed(dir) {
                return Ok(found);
            }
        }
        bail!(
            "nats-server not found (looked at $SHOAL_NATS_SERVER, PATH and .tools/nats-*/bin/nats-server); {INSTALL_HINT}"
        )
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

pub fn find_in_path(path_var: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path_var).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// The highest version among `<dir>/nats-<version>/bin/nats-server`.
fn newest_installed(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix("nats-")?;
            let bin = entry.path().join("bin").join("nats-server");
            is_executable(&bin).then(|| (version.split('.').map(|n| n.parse().unwrap_or(0)).collect(), bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A running child nats-server, killed if dropped, stopped if this process dies.
pub struct NatsServer {
    child: Child,
    _lifeline: Lifeline,
    pub url: String,
    pub log_file: PathBuf,
}

impl NatsServer {
    /// Starts `nats-server -js` on 127.0.0.1:`port` with its store in `store_dir`, and waits
    /// until it accepts connections.
    pub async fn start(binary: &Path, port: u16, store_dir: &Path, log_file: PathBuf) -> Result<NatsServer> {
        // Refuse a port in use: otherwise we would talk to whatever holds it.
        std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
            format!("port {port} is in use (another nats-server or shoal dev?); stop it or pass --nats-port")
        })?;
        std::fs::create_dir_all(store_dir).with_context(|| format!("create {}", store_dir.display()))?;
        let log = std::fs::File::create(&log_file).with_context(|| format!("create {}", log_file.display()))?;
        // On a lifeline, in a process group of its own: Ctrl-C in the terminal reaches shoal
        // only, which stops the host and the control plane first and the server last; if shoal
        // dies without that (SIGKILL, an abort), the server gets SIGTERM instead of holding on
        // to the port and the store.
        let (cmd, lifeline) = lifeline::command(binary, OnParentExit::Terminate).context("create a pipe")?;
        let mut cmd = Command::from(cmd);
        cmd.arg("-js").arg("-a").arg("127.0.0.1").arg("-p").arg(port.to_string()).arg("-sd").arg(store_dir);
        cmd.stdout(log.try_clone()?).stderr(log);
        cmd.kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("start {}", binary.display()))?;
        let mut server = NatsServer { child, _lifeline: lifeline, url: format!("nats://127.0.0.1:{port}"), log_file };
        server.wait_ready(port, Duration::from_secs(15)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}); its log, {}:\n{}",
                    self.log_file.display(),
                    self.log_tail()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server did not accept connections on port {port} within {timeout:?}; its log, {}:\n{}",
                    self.log_file.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// SIGTERM (the server flushes JetStream and exits), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            // `kill` the command: this crate forbids unsafe code, so no libc::kill.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                status.context("wait for nats-server")?;
            }
            Err(_) => {
                tracing::warn!(?grace, "nats-server did not stop in time; killing it");
                self.child.kill().await.context("kill nats-server")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_binary(path: &Path) {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(path, "#!/bin/sh\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn explicit_then_path_then_the_newest_installed_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tools = tmp.path().join("tools");
        fake_binary(&tools.join("nats-2.9.25/bin/nats-server"));
        fake_binary(&tools.join("nats-2.11.11/bin/nats-server"));
        fake_binary(&tools.join("nats-2.15.1/bin/nats-server"));
        let mut search =
            Search { explicit: None, path_var: Some("/nonexistent".into()), tools_dirs: vec![tools.clone()] };
        assert_eq!(search.find().expect("found"), tools.join("nats-2.15.1/bin/nats-server"));

        let bin = tmp.path().join("bin");
        fake_binary(&bin.join("nats-server"));
        search.path_var = Some(bin.clone().into_os_string());
        assert_eq!(search.find().expect("found"), bin.join("nats-server"));

        let explicit = tmp.path().join("elsewhere/nats-server");
        fake_binary(&explicit);
        search.explicit = Some(explicit.clone());
        assert_eq!(search.find().expect("found"), explicit);
    }

    #[test]
    fn none_found_says_how_to_install() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let search =
            Search { explicit: None, path_var: Some("/nonexistent".into()), tools_dirs: vec![tmp.path().into()] };
        let e = search.find().expect_err("nothing there").to_string();
        assert!(e.contains("./scripts/setup.sh"), "{e}");
        let search = Search { explicit: Some(tmp.path().join("nope")), path_var: None, tools_dirs: vec![] };
        let e = search.find().expect_err("not executable").to_string();
        assert!(e.contains("SHOAL_NATS_SERVER") && e.contains("./scripts/setup.sh"), "{e}");
    }
}
