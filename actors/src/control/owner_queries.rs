//! Owner queries: what only the replica owning an endpoint knows (its job counts, its queued
//! ids, its view of the workers for "why is my job waiting"). The API of any replica asks the
//! owner named by the endpoint's lease ([`ask`]) on the owner's own subjects
//! (`owner.<replica>.<endpoint>.<query>`); each replica answers its subjects with one
//! subscription ([`serve`]), not one per endpoint.
//!
//! A replica asked about an endpoint it does not own (its lease moved on meanwhile) answers
//! with an empty payload, which the asker reports as "no owner" instead of waiting out the
//! timeout.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::error::ApiError;

use super::endpoint_actor::EndpointMsg;
use super::lease_manager::Directory;
use crate::nats::Nats;

/// How long the asker waits for the owner.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the replica owning `endpoint` the query (`health`, `queued`, `waiting`).
pub async fn ask<T: DeserializeOwned>(
    nats: &Nats,
    directory: &Directory,
    endpoint: &str,
    query: &str,
) -> Result<T, ApiError> {
    let no_owner = || ApiError::unavailable(format!("no control replica owns endpoint {endpoint} yet"));
    let owner = directory.owner(endpoint).ok_or_else(no_owner)?;
    let subject = nats.names.owner_subject(&owner, endpoint, query);
    let reply = tokio::time::timeout(ASK_TIMEOUT, nats.client.request(subject, Bytes::new()))
        .await
        .map_err(|_| ApiError::unavailable(format!("the owner of endpoint {endpoint} ({owner}) did not answer")))?
        .map_err(|e| ApiError::unavailable(format!("the owner of endpoint {endpoint} ({owner}) is gone: {e}")))?;
    if reply.payload.is_empty() {
        return Err(no_owner());
    }
    from_msgpack(&reply.payload).map_err(|e| ApiError::internal(format!("bad answer from the owner: {e}")))
}

/// Answers this replica's owner queries until the connection ends. Each query is answered in
/// its own task, so a busy endpoint actor does not hold up the others.
pub async fn serve(
    nats: &Nats,
    replica_id: &str,
    directory: Directory,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let prefix = nats.names.owner_prefix(replica_id);
    let mut sub = nats.client.subscribe(format!("{prefix}>")).await?;
    let client = nats.client.clone();
    let replica_id = replica_id.to_string();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let Some((endpoint, query)) = msg.subject.as_str().strip_prefix(&prefix).and_then(|r| r.split_once('.'))
            else {
                continue;
            };
            let (actor, query) = (directory.actor(endpoint), query.to_string());
            let (client, replica_id) = (client.clone(), replica_id.clone());
            tokio::spawn(async move {
                let bytes = match actor {
                    None => Ok(Vec::new()), // not ours (any more)
                    Some(actor) => match query.as_str() {
                        "health" => match ractor::call!(actor, EndpointMsg::GetCounts) {
                            Ok(counts) => to_msgpack(&(counts, replica_id)),
                            Err(_) => Ok(Vec::new()),
                        },
                        "waiting" => match ractor::call!(actor, EndpointMsg::GetFleet) {
                            Ok(fleet) => to_msgpack(&fleet),
                            Err(_) => Ok(Vec::new()),
                        },
                        "queued" => match ractor::call!(actor, EndpointMsg::GetQueued) {
                            Ok(ids) => to_msgpack(&ids),
                            Err(_) => Ok(Vec::new()),
                        },
                        _ => return,
                    },
                };
                if let Ok(bytes) = bytes {
                    let _ = client.publish(reply, Bytes::from(bytes)).await;
                }
            });
        }
    }))
}
