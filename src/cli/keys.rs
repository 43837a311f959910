//! `shoal keys create|list|revoke`: the API keys of the HTTP gateway (`shoal-keys` bucket).

use std::process::ExitCode;

use anyhow::{Context, Result};
use shoal_actors::clock::now_ms;
use shoal_actors::nats::Nats;
use shoal_gateway::keys;

use super::table;
use crate::output::line;
use crate::roles;
use crate::settings::{ConfigError, Settings};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (shown this once; only its hash is stored).
    Create {
        /// A label for people (`ci`, `alice`).
        #[arg(long, default_value = "")]
        name: String,
        /// Endpoints the key may use (repeat the flag); none: every endpoint.
        #[arg(long = "endpoint", value_name = "ENDPOINT")]
        endpoints: Vec<String>,
    },
    /// List the keys: id, name, endpoints, creation time (never the keys themselves).
    List,
    /// Revoke a key by its id (as `keys list` shows it); gateways refuse it at once.
    Revoke {
        /// The key's id.
        id: String,
    },
}

/// The buckets, over a connection that fails at once when no server answers.
async fn nats(settings: &Settings) -> Result<Nats> {
    let names = settings.names().map_err(ConfigError)?;
    let client = roles::client(settings).await?;
    Nats::with_client(client, names, &settings.topology).await.context("set up JetStream")
}

pub async fn keys_command(settings: &Settings, cmd: &KeysCommand) -> Result<ExitCode> {
    let nats = nats(settings).await?;
    let code = match cmd {
        KeysCommand::Create { name, endpoints } => {
            let created = keys::create(&nats, name, endpoints).await?;
            line(&created.secret)?;
            eprintln!(
                "key {} created{}; use it as `Authorization: Bearer <key>`; it is not shown again",
                created.record.id,
                if endpoints.is_empty() { String::new() } else { format!(" for {}", endpoints.join(", ")) }
            );
            ExitCode::SUCCESS
        }
        KeysCommand::List => {
            let rows: Vec<Vec<String>> = keys::list(&nats)
                .await?
                .into_iter()
                .map(|k| {
                    let scope = if k.endpoints.is_empty() { "all".to_string() } else { k.endpoints.join(",") };
                    vec![k.id, k.name, scope, table::ago(now_ms(), k.created_at_ms)]
                })
                .collect();
            line(table::render(&["ID", "NAME", "ENDPOINTS", "CREATED"], &rows).trim_end())?;
            ExitCode::SUCCESS
        }
        KeysCommand::Revoke { id } => {
            if keys::revoke(&nats, id).await? {
                line(format!("key {id} revoked"))?;
                ExitCode::SUCCESS
            } else {
                eprintln!("error: no key {id} (`shoal keys list` shows them)");
                ExitCode::FAILURE
            }
        }
    };
    roles::close(&nats.client).await;
    Ok(code)
}
