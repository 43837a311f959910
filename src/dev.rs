//! `shoal dev`: everything on one machine. A child nats-server, then in this process a
//! control plane, a host with the process runtime and an HTTP gateway (RunPod's API, with an
//! API key given or generated); the endpoints of a file are applied, and Ctrl-C stops the
//! gateway, the host (and its workers), the control plane, then nats-server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shoal_actors::client::ApiClient;
use shoal_actors::nats::Nats;
use shoal_actors::{control, host};
use shoal_gateway::keys;
use shoal_protocol::ErrorCode;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::names::{DEFAULT_PREFIX, op};
use tracing::{info, warn};

use crate::cli::read_endpoints;
use crate::nats_server::{NatsServer, Search, find_in_path};
use crate::roles;
use crate::settings::Settings;
use crate::shutdown::Shutdown;

const DEFAULT_ENDPOINTS: &str = "examples/endpoints.toml";
const DEFAULT_NATS_PORT: u16 = 4222;

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Endpoints to create or update at start (TOML, `[[endpoint]]` tables)
    /// [default: examples/endpoints.toml].
    #[arg(long, value_name = "FILE")]
    pub endpoints: Option<PathBuf>,
    /// Port of the child nats-server (on 127.0.0.1).
    #[arg(long, default_value_t = DEFAULT_NATS_PORT)]
    pub nats_port: u16,
    /// Where nats-server keeps its JetStream store and the host its worker logs; jobs and
    /// endpoints survive a restart with the same directory [default: <tmp>/shoal-dev-<port>].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// API key of the HTTP gateway (`Authorization: Bearer <key>`) [default: a new key,
    /// printed at start]. The gateway listens on gateway.listen (127.0.0.1:8080).
    #[arg(long, env = "SHOAL_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl DevArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("shoal-dev-{}", self.nats_port)))
    }
}

/// Defaults of `shoal dev` below the configuration file: worker logs go to the data dir.
pub fn default_settings(args: &DevArgs) -> Vec<(&'static str, String)> {
    vec![("host.state_dir", args.data_dir().join("host").display().to_string())]
}

pub async fn run(settings: Settings, args: &DevArgs) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let endpoints_file = args.endpoints.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_ENDPOINTS));
    if args.endpoints.is_none() && !endpoints_file.exists() {
        anyhow::bail!(
            "{DEFAULT_ENDPOINTS} not found: run shoal dev from the root of the shoal clone, or pass --endpoints FILE"
        );
    }
    let endpoints = read_endpoints(&endpoints_file)?;
    let binary = Search::from_env().find()?;
    let data_dir = args.data_dir();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("create the data dir {}", data_dir.display()))?;

    info!(binary = %binary.display(), port = args.nats_port, "starting nats-server");
    let store_dir = data_dir.join("nats");
    let start = NatsServer::start(&binary, args.nats_port, &store_dir, data_dir.join("nats-server.log"));
    let server = tokio::select! {
        server = start => server?,
        signal = shutdown.wait() => {
            info!(signal, "stopped while nats-server was starting");
            return Ok(());
        }
    };
    let url = server.url.clone();
    let result = run_on(&settings, &url, &endpoints, &data_dir, args.api_key.as_deref(), &mut shutdown).await;
    info!("stopping nats-server");
    if let Err(e) = server.stop(Duration::from_secs(10)).await {
        warn!(error = %format!("{e:#}"), "cannot stop nats-server cleanly");
    }
    if result.is_ok() {
        info!("shoal dev stopped");
    }
    result
}

/// Everything that runs on the child nats-server; returns once all of it has stopped.
async fn run_on(
    settings: &Settings,
    url: &str,
    endpoints: &[EndpointSpec],
    data_dir: &Path,
    api_key: Option<&str>,
    shutdown: &mut Shutdown,
) -> Result<()> {
    let nats = tokio::select! {
        nats = roles::connect(settings, url) => nats?,
        signal = shutdown.wait() => {
            info!(signal, "stopped while connecting to nats-server");
            return Ok(());
        }
    };
    let control = control::start(nats.clone(), settings.control.clone()).await.context("start the control plane")?;
    let started = async {
        host::start(nats.clone(), settings.host.clone(), roles::runtime(settings).await?)
            .await
            .context("start the host")
    };
    let host = match started.await {
        Ok(host) => host,
        Err(e) => {
            control.stop().await;
            return Err(e);
        }
    };
    let gateway = async {
        let key = match api_key {
            Some(key) => keys::create_with_secret(&nats, "dev", &[], key).await,
            None => keys::create(&nats, "dev", &[]).await,
        }
        .context("create the gateway's API key (--api-key)")?;
        let handle = shoal_gateway::start(nats.clone(), settings.gateway.clone())
            .await
            .context("start the gateway (set gateway.listen, e.g. SHOAL_GATEWAY__LISTEN=127.0.0.1:8081)")?;
        anyhow::Ok((handle, key.secret))
    };
    let (gateway, key) = match gateway.await {
        Ok(started) => started,
        Err(e) => {
            host.stop().await;
            control.stop().await;
            return Err(e);
        }
    };
    let applied = tokio::select! {
        applied = apply_all(&nats, endpoints) => Some(applied),
        signal = shutdown.wait() => {
            info!(signal, "stopped while applying the endpoints");
            None
        }
    };
    let result = match applied {
        Some(Ok(all)) => {
            let banner = Banner {
                settings,
                url,
                data_dir,
                bridge_url: &host.bridge_url,
                host_id: &host.id,
                endpoints: &all,
                gateway_url: &gateway.base_url(),
                api_key: &key,
            };
            crate::output::line(banner.render())?;
            let signal = shutdown.wait().await;
            info!(signal, "stopping the gateway, the host and its workers, the control plane, then nats-server");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };
    gateway.stop().await;
    host.stop().await;
    control.stop().await;
    roles::close(&nats.client).await;
    result
}

/// Creates or updates every endpoint of the file; returns all endpoints now defined (those
/// of the file, and any left in the data dir by an earlier run).
async fn apply_all(nats: &Nats, endpoints: &[EndpointSpec]) -> Result<Vec<EndpointSpec>> {
    let api = ApiClient::new(nats.client.clone(), nats.names.clone());
    for spec in endpoints {
        // The API service answers as soon as control::start returns; the retry only covers
        // a slow start of its subscription.
        let deadline = Instant::now() + Duration::from_secs(10);
        let applied = loop {
            match api.apply_endpoint(spec).await {
                Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other,
            }
        };
        let applied = applied.with_context(|| format!("apply endpoint {}", spec.id))?;
        info!(endpoint_id = %applied.id, version = applied.version, "endpoint applied");
    }
    let mut all = api.list_endpoints().await.context("list endpoints")?.endpoints;
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(all)
}

/// What `shoal dev` prints once everything runs.
struct Banner<'a> {
    settings: &'a Settings,
    url: &'a str,
    data_dir: &'a Path,
    bridge_url: &'a str,
    host_id: &'a str,
    endpoints: &'a [EndpointSpec],
    /// RunPod's API base URL (`.../v2`) and its key.
    gateway_url: &'a str,
    api_key: &'a str,
}

impl Banner<'_> {
    fn render(&self) -> String {
        let names = self.settings.names().unwrap_or_default();
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(String::new());
        line("shoal dev is running".into());
        line(format!("  NATS         {}  (store: {})", self.url, self.data_dir.join("nats").display()));
        line(format!("  NATS API     {}  (ops: {})", names.api_subject("<op>"), op::ALL.join(", ")));
        line(format!("  host         {}, worker bridge {}", self.host_id, self.bridge_url));
        line(format!("  gateway      {}  (API key: {})", self.gateway_url, self.api_key));
        let base = self.gateway_url.trim_end_matches("/v2");
        line(format!("  dashboard    {base}/dashboard  (enter the API key)"));
        line(format!("  metrics      {base}/metrics  (Prometheus, no key)"));
        line(format!("  worker logs  {}/<endpoint>/<worker>.log", self.settings.host.state_dir.join("logs").display()));
        if self.endpoints.is_empty() {
            line("  endpoints    none (create one with `shoal endpoint apply -f FILE`)".into());
        }
        let width = self.endpoints.iter().map(|e| e.id.len()).max().unwrap_or(0);
        for (i, e) in self.endpoints.iter().enumerate() {
            let label = if i == 0 { "  endpoints    " } else { "               " };
            let what = e.command.as_deref().or(e.image.as_deref()).unwrap_or("");
            line(format!("{label}{:width$}  workers {}..{}  {what}", e.id, e.workers_min, e.workers_max));
        }
        let example = self.endpoints.iter().find(|e| e.id == "echo-py").or(self.endpoints.first());
        let example = example.map(|e| e.id.as_str()).unwrap_or("ENDPOINT");
        let shoal = self.shoal_command();
        let mut server = String::new();
        if self.url != crate::settings::DEFAULT_NATS_URL {
            server = format!(" -s {}", self.url);
        }
        line(String::new());
        line("Submit a job and wait for its result:".into());
        line(format!("  {shoal} job run {example} '{{\"hello\":\"world\"}}'"));
        line("or from any NATS client, in JSON:".into());
        line(format!(
            "  nats req{server} -H 'Content-Type: application/json' {} '{{\"endpoint\":\"{example}\",\"input\":{{\"hello\":\"world\"}},\"wait_ms\":30000}}'",
            names.api_subject(op::JOB_RUN)
        ));
        line("or over HTTP, as RunPod clients do (RUNPOD_ENDPOINT_BASE_URL for the runpod SDK):".into());
        line(format!(
            "  curl -s -X POST {}/{example}/runsync -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"input\":{{\"hello\":\"world\"}}}}'",
            self.gateway_url, self.api_key
        ));
        line("Watch the workers, and an endpoint's jobs (why a queued one waits):".into());
        line(format!("  {shoal} workers"));
        line(format!("  {shoal} job list {example}"));
        line(String::new());
        line("Ctrl-C stops everything.".into());
        out
    }

    /// `shoal` as the user can type it: the name if it is on PATH, otherwise this binary's
    /// path, with `--nats`/`--prefix` when they differ from the defaults.
    fn shoal_command(&self) -> String {
        let exe = std::env::current_exe().ok();
        let on_path = std::env::var_os("PATH").and_then(|p| find_in_path(&p, "shoal"));
        let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a));
        let mut cmd = match (&exe, &on_path) {
            (Some(exe), Some(found)) if same(exe, found) => "shoal".to_string(),
            (Some(exe), _) => {
                let cwd = std::env::current_dir().unwrap_or_default();
                match exe.strip_prefix(&cwd) {
                    Ok(rel) => format!("./{}", rel.display()),
                    Err(_) => exe.display().to_string(),
                }
            }
            (None, _) => "shoal".to_string(),
        };
        if self.url != crate::settings::DEFAULT_NATS_URL {
            cmd.push_str(&format!(" --nats {}", self.url));
        }
        if self.settings.nats.prefix != DEFAULT_PREFIX {
            cmd.push_str(&format!(" --prefix {}", self.settings.nats.prefix));
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_shows_how_to_submit() {
        let settings = Settings::default();
        let endpoints =
            vec![EndpointSpec::with_command("echo-rs", "w"), EndpointSpec::with_command("echo-py", "python3 h.py")];
        let banner = Banner {
            settings: &settings,
            url: "nats://127.0.0.1:4222",
            data_dir: Path::new("/tmp/d"),
            bridge_url: "http://127.0.0.1:9",
            host_id: "h1",
            endpoints: &endpoints,
            gateway_url: "http://127.0.0.1:8080/v2",
            api_key: "shoal_k",
        }
        .render();
        assert!(banner.contains("job run echo-py '{\"hello\":\"world\"}'"), "{banner}");
        assert!(
            banner.contains(
                "nats req -H 'Content-Type: application/json' shoal.v1.api.job.run '{\"endpoint\":\"echo-py\""
            ),
            "{banner}"
        );
        assert!(banner.contains("job list echo-py"), "{banner}");
        assert!(banner.contains("http://127.0.0.1:9"), "{banner}");
        assert!(banner.contains("http://127.0.0.1:8080/dashboard"), "{banner}");
        assert!(
            banner.contains(
                "curl -s -X POST http://127.0.0.1:8080/v2/echo-py/runsync -H 'Authorization: Bearer shoal_k'"
            ),
            "{banner}"
        );
        assert!(!banner.contains("--nats"), "default url needs no flag: {banner}");

        let banner = Banner {
            settings: &settings,
            url: "nats://127.0.0.1:5000",
            data_dir: Path::new("/tmp/d"),
            bridge_url: "http://127.0.0.1:9",
            host_id: "h1",
            endpoints: &endpoints,
            gateway_url: "http://127.0.0.1:8080/v2",
            api_key: "shoal_k",
        }
        .render();
        assert!(banner.contains("--nats nats://127.0.0.1:5000 job run"), "{banner}");
        assert!(banner.contains("nats req -s nats://127.0.0.1:5000 -H"), "{banner}");
    }
}
