//! The endpoint manager: watches `shoal-endpoints` and runs one endpoint actor per endpoint,
//! stopping it when the endpoint is deleted. It also keeps the [`Directory`] the API reads:
//! every known spec and its actor. (Leases, which split endpoints between control replicas,
//! come with the scaler.)

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::endpoint::EndpointSpec;

use super::ControlConfig;
use super::endpoint_actor::{EndpointActor, EndpointArgs, EndpointMsg};
use crate::nats::Nats;

/// Known endpoints: spec and endpoint actor, shared with the API.
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<HashMap<String, Known>>>);

/// An endpoint's spec and, once started, its actor.
type Known = (EndpointSpec, Option<ActorRef<EndpointMsg>>);

impl Directory {
    pub fn spec(&self, id: &str) -> Option<EndpointSpec> {
        self.0.read().ok().and_then(|m| m.get(id).map(|(s, _)| s.clone()))
    }
    pub fn actor(&self, id: &str) -> Option<ActorRef<EndpointMsg>> {
        self.0.read().ok().and_then(|m| m.get(id).and_then(|(_, a)| a.clone()))
    }
    pub fn put_spec(&self, spec: EndpointSpec) {
        if let Ok(mut m) = self.0.write() {
            let actor = m.remove(&spec.id).and_then(|(_, a)| a);
            m.insert(spec.id.clone(), (spec, actor));
        }
    }
    fn set_actor(&self, id: &str, actor: Option<ActorRef<EndpointMsg>>) {
        if let Ok(mut m) = self.0.write()
            && let Some(entry) = m.get_mut(id)
        {
            entry.1 = actor;
        }
    }
    fn remove(&self, id: &str) -> Option<ActorRef<EndpointMsg>> {
        self.0.write().ok().and_then(|mut m| m.remove(id)).and_then(|(_, a)| a)
    }
}

pub struct Manager;

pub struct ManagerArgs {
    pub nats: Nats,
    pub config: ControlConfig,
    pub directory: Directory,
}

pub enum ManagerMsg {
    Put(Box<EndpointSpec>),
    Deleted(String),
}

pub struct ManagerState {
    nats: Nats,
    config: ControlConfig,
    directory: Directory,
    watch: tokio::task::JoinHandle<()>,
}

impl Actor for Manager {
    type Msg = ManagerMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ManagerMsg>,
        args: ManagerArgs,
    ) -> Result<ManagerState, ActorProcessingErr> {
        let mut watch = args.nats.endpoints.watch_with_history(">").await?;
        let me = myself.clone();
        let watch = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let msg = match entry.operation {
                    kv::Operation::Put => match from_msgpack::<EndpointSpec>(&entry.value) {
                        Ok(spec) => ManagerMsg::Put(Box::new(spec)),
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "undecodable endpoint spec ignored");
                            continue;
                        }
                    },
                    _ => ManagerMsg::Deleted(entry.key.clone()),
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        });
        Ok(ManagerState { nats: args.nats, config: args.config, directory: args.directory, watch })
    }

    async fn handle(
        &self,
        myself: ActorRef<ManagerMsg>,
        msg: ManagerMsg,
        st: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ManagerMsg::Put(spec) => st.on_put(&myself, *spec).await,
            ManagerMsg::Deleted(id) => st.on_deleted(&id),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ManagerMsg>,
        evt: SupervisionEvent,
        st: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            // an endpoint actor failed (its watch broke): start it again from its spec
            let id = st.directory.0.read().ok().and_then(|m| {
                m.iter()
                    .find(|(_, (_, a))| a.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
                    .map(|(k, _)| k.clone())
            });
            if let Some(id) = id {
                tracing::warn!(endpoint_id = %id, error = %err, "endpoint actor failed; restarting");
                st.directory.set_actor(&id, None);
                if let Some(spec) = st.directory.spec(&id) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    st.on_put(&myself, spec).await;
                }
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<ManagerMsg>, st: &mut ManagerState) -> Result<(), ActorProcessingErr> {
        st.watch.abort();
        Ok(())
    }
}

impl ManagerState {
    async fn on_put(&mut self, myself: &ActorRef<ManagerMsg>, spec: EndpointSpec) {
        let id = spec.id.clone();
        let existing = self.directory.actor(&id);
        self.directory.put_spec(spec.clone());
        match existing {
            Some(actor) => {
                self.directory.set_actor(&id, Some(actor.clone()));
                let _ = actor.cast(EndpointMsg::SpecChanged(Box::new(spec)));
            }
            None => {
                let args =
                    EndpointArgs { nats: self.nats.clone(), spec, tick: Duration::from_millis(self.config.tick_ms) };
                match Actor::spawn_linked(None, EndpointActor, args, myself.get_cell()).await {
                    Ok((actor, _)) => self.directory.set_actor(&id, Some(actor)),
                    Err(e) => tracing::error!(endpoint_id = %id, error = %e, "cannot start endpoint actor"),
                }
            }
        }
    }

    fn on_deleted(&mut self, id: &str) {
        if let Some(actor) = self.directory.remove(id) {
            actor.stop(None);
        }
    }
}
