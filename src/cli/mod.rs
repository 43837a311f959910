//! The client commands: `shoal job ...`, `shoal workers`, `shoal hosts`, `shoal endpoint ...`,
//! `shoal keys ...`.
//! Each speaks the NATS API through [`ApiClient`] (keys: the `shoal-keys` bucket) and prints a
//! result a person (or `jq`) can read.

mod endpoint;
mod hosts;
mod job;
mod keys;
mod table;
mod workers;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use shoal_actors::client::ApiClient;
use shoal_protocol::endpoint::{EndpointSpec, EndpointsFile};

pub use endpoint::{EndpointCommand, endpoint};
pub use hosts::{HostsArgs, hosts_command};
pub use job::{JobCommand, job};
pub use keys::{KeysCommand, keys_command};
pub use workers::{WorkersArgs, workers_command};

use crate::roles;
use crate::settings::{ConfigError, Settings};

/// A client of the NATS API of the installation the settings name.
async fn api(settings: &Settings) -> Result<ApiClient> {
    let names = settings.names().map_err(ConfigError)?;
    Ok(ApiClient::new(roles::client(settings).await?, names))
}

/// Reads a file, or stdin when the path is `-`.
fn read_text(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("read stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// Reads and checks an endpoints file (`[[endpoint]]` tables), so that a mistake is reported
/// with the file's name before anything is sent.
pub fn read_endpoints(path: &Path) -> Result<Vec<EndpointSpec>> {
    let text = read_text(path)?;
    parse_endpoints(&text).with_context(|| format!("endpoints file {}", path.display()))
}

fn parse_endpoints(text: &str) -> Result<Vec<EndpointSpec>> {
    let file: EndpointsFile = toml::from_str(text)?;
    let mut seen = std::collections::BTreeSet::new();
    for spec in &file.endpoints {
        spec.validate().map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if !seen.insert(spec.id.as_str()) {
            bail!("endpoint {} is defined twice", spec.id);
        }
    }
    Ok(file.endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_endpoints_file_is_valid() {
        let specs = parse_endpoints(include_str!("../../examples/endpoints.toml")).expect("valid");
        let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["echo-py", "echo-rs"]);
        assert!(
            specs.iter().all(|s| s.workers_min >= 1),
            "shoal dev keeps a worker of each warm: the first job does not wait for a cold start"
        );
        let py = &specs[0];
        assert!(py.command.as_deref().is_some_and(|c| c.contains("${SHOAL_PYTHON:-python3}")));
        assert_eq!((py.workers_min, py.workers_max), (1, 1));
    }

    #[test]
    fn endpoint_file_mistakes_are_named() {
        let e = parse_endpoints("[[endpoint]]\nid = \"a\"\ncommand = \"x\"\nworkers = 3\n").expect_err("unknown field");
        assert!(format!("{e:#}").contains("workers"), "{e:#}");
        let e = parse_endpoints("[[endpoint]]\nid = \"a\"\ncommand = \"x\"\nworkers_min = 5\nworkers_max = 1\n")
            .expect_err("min > max");
        assert!(format!("{e:#}").contains("workers_min"), "{e:#}");
        let e =
            parse_endpoints("[[endpoint]]\nid = \"a\"\ncommand = \"x\"\n[[endpoint]]\nid = \"a\"\ncommand = \"y\"\n")
                .expect_err("twice");
        assert!(format!("{e:#}").contains("twice"), "{e:#}");
        assert!(parse_endpoints("").expect("empty is fine").is_empty());
    }
}
