//! The configuration of a shoal process, in layers: built-in defaults, then a TOML file
//! (`--config`), then `SHOAL_<SECTION>__<KEY>` environment variables (`__` nests:
//! `SHOAL_HOST__BACKOFF__BASE_MS`), then command-line flags. Invalid configuration is refused
//! at start, naming the key and the reason.
//!
//! Only variables of a known section are read, so the other `SHOAL_*` variables of the tools
//! (`SHOAL_PYTHON`, `SHOAL_NATS_SERVER`, `SHOAL_TOOLS`, ...) never reach the configuration.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;
use shoal_actors::control::ControlConfig;
use shoal_actors::host::HostConfig;
use shoal_actors::nats::Topology;
use shoal_gateway::GatewayConfig;
use shoal_protocol::names::{DEFAULT_PREFIX, Names};

pub const ENV_PREFIX: &str = "SHOAL";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The sections of [`Settings`]; an environment variable is read only if it names one.
pub const SECTIONS: [&str; 5] = ["nats", "topology", "control", "host", "gateway"];

/// Everything a shoal process can be configured with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub topology: Topology,
    pub control: ControlConfig,
    pub host: HostConfig,
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// The URL of a NATS server (`nats://host:4222`; the client learns the other servers of a
    /// cluster from it).
    pub url: String,
    /// Prefix of every subject, stream and bucket name; installations with different
    /// prefixes share a NATS account without seeing each other.
    pub prefix: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings { url: DEFAULT_NATS_URL.to_string(), prefix: DEFAULT_PREFIX.to_string() }
    }
}

/// Configuration that cannot be used; the process exits with code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The layers, lowest priority first after the built-in defaults.
#[derive(Debug, Default)]
pub struct Layers<'a> {
    /// Defaults that depend on the command (e.g. `shoal dev` keeps worker logs in its data dir).
    pub defaults: Vec<(&'static str, String)>,
    pub file: Option<&'a Path>,
    /// The process environment (all of it; unrelated variables are skipped).
    pub env: Vec<(String, String)>,
    /// Values from command-line flags, as `section.key`.
    pub flags: Vec<(&'static str, String)>,
}

impl Settings {
    /// Reads the layers, then checks every value.
    pub fn load(layers: Layers<'_>) -> Result<Settings, ConfigError> {
        let mut builder = Config::builder();
        for (key, value) in layers.defaults {
            builder = builder.set_default(key, value).map_err(|e| ConfigError(e.to_string()))?;
        }
        if let Some(path) = layers.file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(section_env(layers.env))),
        );
        for (key, value) in layers.flags {
            builder = builder.set_override(key, value).map_err(|e| ConfigError(e.to_string()))?;
        }
        let settings: Settings =
            builder.build().and_then(|c| c.try_deserialize()).map_err(|e| ConfigError(e.to_string()))?;
        settings.validate().map_err(ConfigError)?;
        Ok(settings)
    }

    /// The checks serde cannot make; each error starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        self.names()?;
        if self.nats.url.trim().is_empty() {
            return Err("nats.url: must not be empty".into());
        }
        self.nats
            .url
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| format!("nats.url: {:?} is not a NATS server URL: {e}", self.nats.url))?;
        if !(1..=5).contains(&self.topology.replicas) {
            return Err(format!("topology.replicas: {} is outside 1..=5", self.topology.replicas));
        }
        if self.topology.host_ttl_s == 0 {
            return Err("topology.host_ttl_s: must be above 0".into());
        }
        if self.topology.events_max_msgs == 0 || self.topology.events_max_msgs < -1 {
            return Err(format!(
                "topology.events_max_msgs: {} must be at least 1, or -1 for no limit",
                self.topology.events_max_msgs
            ));
        }
        if self.host.heartbeat_ms >= self.topology.host_ttl_s.saturating_mul(1000) {
            return Err(format!(
                "host.heartbeat_ms: {} is not below topology.host_ttl_s ({} s); hosts would vanish between heartbeats",
                self.host.heartbeat_ms, self.topology.host_ttl_s
            ));
        }
        self.control.validate()?;
        self.host.validate()?;
        self.gateway.validate()?;
        Ok(())
    }

    /// The names of this installation (the prefix is validated by [`Settings::validate`]).
    pub fn names(&self) -> Result<Names, String> {
        Names::new(&self.nats.prefix).map_err(|e| format!("nats.prefix: {}", e.message))
    }
}

/// Keeps the `SHOAL_<SECTION>__...` variables of a known section and drops the others
/// (`SHOAL_PYTHON`, `SHOAL_NATS_SERVER`, ...): they belong to the scripts, not to us.
fn section_env(vars: Vec<(String, String)>) -> HashMap<String, String> {
    let prefix = format!("{ENV_PREFIX}_");
    vars.into_iter()
        .filter(|(key, _)| {
            let Some(rest) = key.strip_prefix(&prefix) else { return false };
            let Some((section, _)) = rest.split_once("__") else { return false };
            SECTIONS.contains(&section.to_ascii_lowercase().as_str())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f
    }

    fn refused(layers: Layers<'_>) -> String {
        Settings::load(layers).expect_err("must be refused").0
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load(Layers::default()).expect("defaults");
        assert_eq!(s.nats.url, DEFAULT_NATS_URL);
        assert_eq!(s.nats.prefix, "shoal");
        assert_eq!(s.host.hold_ms, HostConfig::default().hold_ms);
    }

    #[test]
    fn file_then_env_then_flags() {
        let f = toml_file(
            "[nats]\nurl = \"nats://file:4222\"\nprefix = \"fromfile\"\n[host]\nhold_ms = 1111\nstop_grace_ms = 2222\n[host.backoff]\nbase_ms = 50\n",
        );
        let s = Settings::load(Layers {
            defaults: vec![("host.heartbeat_ms", "777".into()), ("host.hold_ms", "1".into())],
            file: Some(f.path()),
            env: env(&[
                ("SHOAL_HOST__HOLD_MS", "5000"),
                ("SHOAL_NATS__URL", "nats://env:4222"),
                ("SHOAL_HOST__BACKOFF__CAP_MS", "9000"),
            ]),
            flags: vec![("nats.url", "nats://flag:4222".into())],
        })
        .expect("valid");
        assert_eq!(s.nats.url, "nats://flag:4222", "flags win");
        assert_eq!(s.nats.prefix, "fromfile", "the file beats the defaults");
        assert_eq!(s.host.hold_ms, 5000, "env beats the file");
        assert_eq!(s.host.stop_grace_ms, 2222);
        assert_eq!(s.host.heartbeat_ms, 777, "command defaults apply when nothing else sets the key");
        assert_eq!((s.host.backoff.base_ms, s.host.backoff.cap_ms), (50, 9000), "nested sections merge");
    }

    #[test]
    fn rate_limits_are_set_per_operation_from_the_file_and_env() {
        use shoal_gateway::limits::{Op, OpLimit};
        let f = toml_file(
            "[gateway.rate_limits]\nrun = { requests_per_10s = 5 }\n[gateway.rate_limits.cancel]\nconcurrent = 0\n",
        );
        let s = Settings::load(Layers {
            file: Some(f.path()),
            env: env(&[("SHOAL_GATEWAY__RATE_LIMITS__RUNSYNC__CONCURRENT", "7")]),
            ..Layers::default()
        })
        .expect("valid");
        let limits = &s.gateway.rate_limits;
        assert!(limits.enabled);
        assert_eq!(limits.of(Op::Run), OpLimit::new(5, 200), "a value left out is RunPod's");
        assert_eq!(limits.of(Op::Runsync), OpLimit::new(2_000, 7));
        assert_eq!(limits.of(Op::Cancel), OpLimit::new(100, 0), "0 is none");
        assert_eq!(limits.of(Op::PurgeQueue), OpLimit::runpod(Op::PurgeQueue));
        let off = Settings::load(Layers {
            env: env(&[("SHOAL_GATEWAY__RATE_LIMITS__ENABLED", "false")]),
            ..Layers::default()
        })
        .expect("valid");
        assert!(!off.gateway.rate_limits.enabled);
        let e = refused(Layers { env: env(&[("SHOAL_GATEWAY__RATE_LIMITS__RUN__PER_S", "5")]), ..Layers::default() });
        assert!(e.contains("per_s"), "{e}");
    }

    #[test]
    fn host_labels_and_cuda_version_come_from_the_file_or_env() {
        let f = toml_file("[host]\ncuda_version = \"12.4\"\n[host.labels]\ndatacenter = \"eu-1\"\n");
        let s = Settings::load(Layers {
            file: Some(f.path()),
            env: env(&[("SHOAL_HOST__LABELS__NETWORK", "ib")]),
            ..Layers::default()
        })
        .expect("valid");
        assert_eq!(s.host.cuda_version.as_deref(), Some("12.4"));
        assert_eq!(s.host.labels.get("datacenter").map(String::as_str), Some("eu-1"));
        assert_eq!(s.host.labels.get("network").map(String::as_str), Some("ib"));
    }

    #[test]
    fn unrelated_shoal_variables_are_ignored() {
        let s = Settings::load(Layers {
            env: env(&[
                ("SHOAL_PYTHON", "/x/venv/bin/python"),
                ("SHOAL_NATS_SERVER", "/x/nats-server"),
                ("SHOAL_NATS_VERSION", "2.11.11"),
                ("SHOAL_TOOLS", "/var/cache/shoal/tools"),
                ("SHOAL_API_KEY", "secret"),
                ("SHOAL_EXAMPLE_WORKER", "/x/shoal-example-worker"),
                ("SHOAL_EXAMPLE_HANDLER", "generator"),
                ("SHOAL_CONFIG", "/etc/shoal.toml"),
                ("SHOAL_", "x"),
                ("SHOAL_FOO__BAR", "1"),
                ("PATH", "/bin"),
                ("SHOAL_CONTROL__TICK_MS", "250"),
            ]),
            ..Layers::default()
        })
        .expect("unrelated variables must not break loading");
        assert_eq!(s.control.tick_ms, 250);
        assert_eq!(s.nats.url, DEFAULT_NATS_URL);
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = refused(Layers { env: env(&[("SHOAL_HOST__HOLD_MS", "soon")]), ..Layers::default() });
        assert!(e.contains("host.hold_ms"), "{e}");
        let f = toml_file("[control]\ntick_ms = \"often\"\n");
        let e = refused(Layers { file: Some(f.path()), ..Layers::default() });
        assert!(e.contains("control.tick_ms"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = refused(Layers { env: env(&[("SHOAL_HOST__HOLD", "5")]), ..Layers::default() });
        assert!(e.contains("hold") && e.contains("host"), "{e}");
        let f = toml_file("[nat]\nurl = \"nats://x\"\n");
        let e = refused(Layers { file: Some(f.path()), ..Layers::default() });
        assert!(e.contains("nat"), "{e}");
    }

    #[test]
    fn invalid_values_are_refused_with_key_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("SHOAL_NATS__PREFIX", "a.b", "nats.prefix"),
            ("SHOAL_NATS__URL", "", "nats.url"),
            ("SHOAL_CONTROL__TICK_MS", "0", "control.tick_ms"),
            ("SHOAL_HOST__PING_INTERVAL_MS", "10", "host.ping_interval_ms"),
            ("SHOAL_HOST__BACKOFF__FACTOR", "0.5", "host.backoff.factor"),
            ("SHOAL_HOST__ID", "my host", "host.id"),
            ("SHOAL_HOST__BRIDGE_LISTEN", "not-an-address", "host.bridge_listen"),
            ("SHOAL_TOPOLOGY__REPLICAS", "0", "topology.replicas"),
            ("SHOAL_TOPOLOGY__EVENTS_MAX_MSGS", "0", "topology.events_max_msgs"),
            ("SHOAL_TOPOLOGY__EVENTS_MAX_MSGS", "-2", "topology.events_max_msgs"),
            ("SHOAL_GATEWAY__MAX_RUN_BYTES", "0", "gateway.max_run_bytes"),
            ("SHOAL_CONTROL__SYNC_RETENTION_S", "0", "control.sync_retention_s"),
            ("SHOAL_CONTROL__WEBHOOK__TIMEOUT_MS", "0", "control.webhook.timeout_ms"),
            ("SHOAL_HOST__HEARTBEAT_MS", "60000", "host.heartbeat_ms"),
            ("SHOAL_HOST__START_RECORD_MS", "60000", "host.start_record_ms"),
            ("SHOAL_HOST__CUDA_VERSION", "twelve", "host.cuda_version"),
            ("SHOAL_HOST__LABELS__BAD KEY", "x", "host.labels"),
            ("SHOAL_CONTROL__REPLICA_ID", "replica.one", "control.replica_id"),
        ];
        for (key, value, named) in cases {
            let e = refused(Layers { env: env(&[(key, value)]), ..Layers::default() });
            assert!(e.contains(named), "{key}={value}: {e}");
        }
    }

    #[test]
    fn the_runtime_is_chosen_in_the_host_section() {
        use shoal_actors::runtime::RuntimeKind;
        let f = toml_file(
            "[host]\nbridge_listen = \"0.0.0.0:9000\"\ncontainer_bridge_url = \"http://host1:9000\"\n[host.runtime]\nkind = \"docker\"\n[host.runtime.docker]\nnetwork = \"shoal\"\nwarm_per_version = 1\n",
        );
        let s = Settings::load(Layers {
            file: Some(f.path()),
            env: env(&[("SHOAL_HOST__RUNTIME__DOCKER__STOP_TIMEOUT_S", "3")]),
            ..Layers::default()
        })
        .expect("valid");
        assert_eq!(s.host.runtime.kind, RuntimeKind::Docker);
        assert_eq!(s.host.runtime.docker.network.as_deref(), Some("shoal"));
        assert_eq!((s.host.runtime.docker.warm_per_version, s.host.runtime.docker.stop_timeout_s), (1, 3));
        assert_eq!(s.host.container_bridge_url.as_deref(), Some("http://host1:9000"));
        let s = Settings::load(Layers {
            env: env(&[("SHOAL_HOST__RUNTIME__KIND", "fake"), ("SHOAL_HOST__RUNTIME__FAKE__JOB_DURATION_MS", "5")]),
            ..Layers::default()
        })
        .expect("valid");
        assert_eq!((s.host.runtime.kind, s.host.runtime.fake.job_duration_ms), (RuntimeKind::Fake, 5));
        let e = refused(Layers { env: env(&[("SHOAL_HOST__RUNTIME__KIND", "podman")]), ..Layers::default() });
        assert!(e.contains("podman"), "{e}");
        let e =
            refused(Layers { env: env(&[("SHOAL_HOST__CONTAINER_BRIDGE_URL", "host1:9000")]), ..Layers::default() });
        assert!(e.contains("host.container_bridge_url"), "{e}");
    }

    #[test]
    fn a_missing_config_file_is_refused() {
        let e = refused(Layers { file: Some(Path::new("/nonexistent/shoal.toml")), ..Layers::default() });
        assert!(e.contains("/nonexistent/shoal.toml"), "{e}");
    }
}
