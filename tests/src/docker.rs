//! Docker for the tests: the engine must answer (a test that needs it fails with a clear
//! message otherwise, never passes silently); images are built by `deploy/build-images.sh`
//! once per content (the script skips an image whose content hash exists); hosts with the
//! Docker runtime; and a sweeper that removes the containers a test's hosts made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use shoal_actors::host::{HostConfig, HostHandle};
use shoal_actors::nats::Nats;
use shoal_actors::runtime::docker::{DockerConfig, DockerRuntime, LABEL_HOST};

use crate::{cluster, repo_root};

/// Fails unless the Docker engine answers.
pub fn require_docker() -> Result<()> {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("these tests need the Docker engine, and `docker` is not installed")?;
    if !out.status.success() {
        bail!(
            "these tests need the Docker engine, and `docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cargo profile directory this test binary was built in (`target/debug`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().and_then(Path::parent).context("no target dir")?.to_path_buf())
}

/// Builds binaries of this workspace into the test's own profile directory (fast when they
/// are fresh; cargo holds no lock while tests run).
pub fn cargo_build(packages: &[&str]) -> Result<PathBuf> {
    let dir = profile_dir()?;
    let target = dir.parent().context("no target dir")?;
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).arg("build").arg("--target-dir").arg(target);
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    run(&mut cmd).context("build the binaries the images are made of")?;
    Ok(dir)
}

/// Builds (when their content changed) the images named (`shoal`, `nats`, `worker`) from the
/// binaries in `bin_dir`; returns `name -> image` (`example-worker -> shoal/example-worker:h-…`).
pub fn build_images(bin_dir: &Path, which: &[&str]) -> Result<HashMap<String, String>> {
    let script = repo_root().join("deploy/build-images.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg("--bin-dir").arg(bin_dir).args(["--tag", "test"]).args(which);
    if std::env::var_os("SHOAL_NATS_SERVER").is_none() {
        cmd.env("SHOAL_NATS_SERVER", crate::nats_server_bin());
    }
    let out = run(&mut cmd)?;
    let images: HashMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, image)| (name.to_string(), image.trim().to_string()))
        .collect();
    ensure!(images.len() == which.len(), "build-images.sh printed {out:?}");
    Ok(images)
}

/// The Rust example worker's image (its binary as `scripts/test` builds it).
pub fn worker_image() -> Result<String> {
    let bin = crate::example_worker_bin()?;
    let dir = bin.parent().context("worker binary dir")?;
    let images = build_images(dir, &["worker"])?;
    images.get("example-worker").cloned().context("no worker image")
}

/// Docker settings for tests: short stops, two warm containers per version.
pub fn test_docker_config() -> DockerConfig {
    DockerConfig { stop_timeout_s: 2, warm_per_version: 2, ..DockerConfig::default() }
}

/// A host with the Docker runtime; its bridge listens where containers reach it.
pub async fn start_docker_host(
    nats: &Nats,
    state_dir: &Path,
    id: &str,
    tweak: impl FnOnce(&mut HostConfig),
) -> Result<(HostHandle, DockerRuntime)> {
    let runtime = DockerRuntime::connect(test_docker_config()).await?;
    let host = cluster::start_host_with(nats, state_dir, id, Arc::new(runtime.clone()), |c| {
        c.bridge_listen = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        tweak(c);
    })
    .await?;
    Ok((host, runtime))
}

/// A container as `docker ps` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub state: String,
    pub labels: String,
}

impl Container {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// Every container (any state) with all of these labels (`key=value`).
pub fn containers(labels: &[String]) -> Result<Vec<Container>> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-a", "--no-trunc", "--format", "{{.ID}}\t{{.State}}\t{{.Labels}}"]);
    for l in labels {
        cmd.args(["--filter", &format!("label={l}")]);
    }
    Ok(run(&mut cmd)?
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '\t');
            Some(Container {
                id: parts.next()?.to_string(),
                state: parts.next()?.to_string(),
                labels: parts.next().unwrap_or_default().to_string(),
            })
        })
        .collect())
}

/// The containers of one host.
pub fn host_containers(host_id: &str) -> Result<Vec<Container>> {
    containers(&[format!("{LABEL_HOST}={host_id}")])
}

/// Removes the containers of the hosts it names when dropped, so a failed test leaves none.
pub struct Sweeper {
    pub host_ids: Vec<String>,
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        for host in &self.host_ids {
            if let Ok(found) = host_containers(host) {
                for c in found {
                    let _ = Command::new("docker").args(["rm", "-f", "-v", &c.id]).output();
                }
            }
        }
    }
}

/// `docker compose` (v2) when there, else `docker-compose` (v1).
pub fn compose_command() -> Result<Vec<String>> {
    if Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success()) {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!("neither `docker compose` nor `docker-compose` is installed")
}
