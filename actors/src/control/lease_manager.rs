//! The lease manager: one per control replica. It announces the replica in `shoal-leases`,
//! takes and renews endpoint leases (compare-and-set, with a TTL) so that each endpoint is run
//! by exactly one replica, shares endpoints fairly among live replicas ([`super::lease`]),
//! takes over a dead replica's endpoints once their leases expire, and starts or stops the
//! endpoint actors of the endpoints it owns. It also keeps the [`Directory`] the API reads.
//!
//! It acts on its tick (`lease_ttl / 3`), and also as soon as its watch of `shoal-endpoints`
//! shows a new endpoint, so that an endpoint is owned (and can scale) right after it is
//! applied. Renewals of the owned leases are sent concurrently, so a replica owning a thousand
//! endpoints renews them all well within a tick.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::lease::{LeaseRecord, ReplicaRecord};

use super::ControlConfig;
use super::endpoint_actor::{EndpointActor, EndpointArgs, EndpointMsg};
use super::hosts::HostDirectory;
use super::lease;
use crate::clock::now_ms;
use crate::nats::Nats;

/// Known endpoints: spec and, where this replica owns it, its actor; and which replica owns
/// each endpoint, as the leases show. Shared with the API and the record feeds.
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<HashMap<String, Known>>>, Arc<RwLock<HashMap<String, String>>>);

/// An endpoint's spec and, when owned here, its actor.
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
    /// The actors of the endpoints owned here.
    pub fn owned_actors(&self) -> Vec<ActorRef<EndpointMsg>> {
        self.0.read().map(|m| m.values().filter_map(|(_, a)| a.clone()).collect()).unwrap_or_default()
    }
    /// The replica holding the endpoint's lease, as last seen (`None`: nobody, or not yet seen).
    pub fn owner(&self, id: &str) -> Option<String> {
        self.1.read().ok().and_then(|m| m.get(id).cloned())
    }
    fn set_owner(&self, id: &str, owner: Option<&str>) {
        if let Ok(mut m) = self.1.write() {
            match owner {
                Some(o) if m.get(id).map(String::as_str) != Some(o) => {
                    m.insert(id.to_string(), o.to_string());
                }
                Some(_) => {}
                None => {
                    m.remove(id);
                }
            }
        }
    }
    fn ids(&self) -> BTreeSet<String> {
        self.0.read().map(|m| m.keys().cloned().collect()).unwrap_or_default()
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

pub struct LeaseManager;

/// How often the manager renews its leases and shares endpoints.
fn tick_of(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_millis(100))
}

/// Lease renewals sent at once (each is one compare-and-set on `shoal-leases`).
const RENEWALS_IN_FLIGHT: usize = 256;

pub struct LeaseArgs {
    pub nats: Nats,
    pub config: ControlConfig,
    pub directory: Directory,
    pub hosts: HostDirectory,
    pub limits: Arc<super::Limits>,
    pub replica_id: String,
    pub lease_ttl: Duration,
}

pub enum LeaseMsg {
    SpecPut(Box<EndpointSpec>),
    SpecDeleted(String),
    /// A lease or replica key changed (`None`: deleted).
    KeySeen(String, Option<String>),
    Tick,
    /// A new endpoint was applied: take its lease now if it falls to this replica's share.
    Share,
}

struct Owned {
    /// The lease key's current revision (for the next renewal).
    revision: u64,
    epoch: u64,
}

pub struct LeaseState {
    args: LeaseArgs,
    /// The connection every endpoint actor of this replica shares.
    shared: Arc<Nats>,
    /// endpoint → (owner, last seen renewed).
    leases: HashMap<String, (String, Instant)>,
    /// replica → last seen.
    replicas: HashMap<String, Instant>,
    owned: HashMap<String, Owned>,
    started_at_ms: u64,
    /// The first tick is done: this replica has announced itself and knows the others.
    ticked: bool,
    /// A [`LeaseMsg::Share`] is in the mailbox.
    share_queued: bool,
    /// When the leases were last renewed.
    renewed_at: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for LeaseManager {
    type Msg = LeaseMsg;
    type State = LeaseState;
    type Arguments = LeaseArgs;

    async fn pre_start(&self, myself: ActorRef<LeaseMsg>, args: LeaseArgs) -> Result<LeaseState, ActorProcessingErr> {
        let mut specs = args.nats.endpoints.watch_with_history(">").await?;
        let me = myself.clone();
        let t1 = tokio::spawn(async move {
            while let Some(Ok(entry)) = specs.next().await {
                let msg = match entry.operation {
                    kv::Operation::Put => match from_msgpack::<EndpointSpec>(&entry.value) {
                        Ok(spec) => LeaseMsg::SpecPut(Box::new(spec)),
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "undecodable endpoint spec ignored");
                            continue;
                        }
                    },
                    _ => LeaseMsg::SpecDeleted(entry.key.clone()),
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        });
        let mut leases = args.nats.leases.watch_with_history(">").await?;
        // The first tick waits for what the leases say (who owns what, which replicas live),
        // not for a tick period: at once on an empty bucket, else after the last entry of the
        // history (none pending after it), whose keys reach the mailbox before the tick.
        let mut history_read = args.nats.leases.stream.clone().info().await.is_ok_and(|i| i.state.messages == 0);
        if history_read {
            myself.cast(LeaseMsg::Tick)?;
        }
        let me = myself.clone();
        let t2 = tokio::spawn(async move {
            while let Some(Ok(entry)) = leases.next().await {
                let pending = entry.delta;
                let owner = match entry.operation {
                    kv::Operation::Put => from_msgpack::<LeaseRecord>(&entry.value)
                        .map(|l| l.owner)
                        .or_else(|_| from_msgpack::<ReplicaRecord>(&entry.value).map(|r| r.id))
                        .ok(),
                    _ => None,
                };
                if me.cast(LeaseMsg::KeySeen(entry.key.clone(), owner)).is_err() {
                    break;
                }
                if !history_read && pending == 0 {
                    history_read = true;
                    if me.cast(LeaseMsg::Tick).is_err() {
                        break;
                    }
                }
            }
        });
        myself.send_interval(tick_of(args.lease_ttl), || LeaseMsg::Tick);
        tracing::info!(replica_id = %args.replica_id, "lease manager started");
        Ok(LeaseState {
            shared: Arc::new(args.nats.clone()),
            args,
            leases: HashMap::new(),
            replicas: HashMap::new(),
            owned: HashMap::new(),
            started_at_ms: now_ms(),
            ticked: false,
            share_queued: false,
            renewed_at: Instant::now(),
            tasks: vec![t1, t2],
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LeaseMsg>,
        msg: LeaseMsg,
        st: &mut LeaseState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LeaseMsg::SpecPut(spec) => st.on_spec_put(&myself, *spec),
            LeaseMsg::SpecDeleted(id) => st.on_spec_deleted(&id).await,
            LeaseMsg::KeySeen(key, owner) => st.on_key_seen(key, owner),
            LeaseMsg::Tick => {
                let span = tracing::debug_span!("lease", replica_id = %st.args.replica_id);
                tracing::Instrument::instrument(st.on_tick(&myself), span).await
            }
            LeaseMsg::Share => {
                st.share_queued = false;
                let span = tracing::debug_span!("lease", replica_id = %st.args.replica_id);
                tracing::Instrument::instrument(st.share(&myself), span).await
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<LeaseMsg>,
        evt: SupervisionEvent,
        st: &mut LeaseState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            // an endpoint actor failed: give the lease back; the next tick takes it again
            let failed: Vec<String> = st
                .owned
                .keys()
                .filter(|id| st.args.directory.actor(id).is_some_and(|a| a.get_id() == cell.get_id()))
                .cloned()
                .collect();
            for id in failed {
                tracing::warn!(endpoint_id = %id, error = %err, "endpoint actor failed; releasing its lease");
                st.release(&id).await;
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<LeaseMsg>, st: &mut LeaseState) -> Result<(), ActorProcessingErr> {
        for t in &st.tasks {
            t.abort();
        }
        // hand the endpoints over at once instead of letting the leases expire
        let ids: Vec<String> = st.owned.keys().cloned().collect();
        for id in ids {
            st.release(&id).await;
        }
        let _ = st.args.nats.leases.delete(st.args.nats.names.replica_key(&st.args.replica_id)).await;
        Ok(())
    }
}

impl LeaseState {
    fn on_spec_put(&mut self, myself: &ActorRef<LeaseMsg>, spec: EndpointSpec) {
        let id = spec.id.clone();
        let new = self.args.directory.spec(&id).is_none();
        self.args.directory.put_spec(spec.clone());
        // before the first tick this replica does not know its peers yet: the tick shares
        if new && self.ticked && !self.share_queued {
            self.share_queued = true;
            let _ = myself.cast(LeaseMsg::Share);
        }
        if let Some(actor) = self.args.directory.actor(&id) {
            let _ = actor.cast(EndpointMsg::SpecChanged(Box::new(spec)));
        }
    }

    async fn on_spec_deleted(&mut self, id: &str) {
        if self.owned.contains_key(id) {
            self.release(id).await;
        }
        if let Some(actor) = self.args.directory.remove(id) {
            actor.stop(None);
        }
    }

    fn on_key_seen(&mut self, key: String, owner: Option<String>) {
        let names = &self.args.nats.names;
        if let Some(endpoint) = key.strip_prefix(&names.lease_key("")) {
            self.args.directory.set_owner(endpoint, owner.as_deref());
            match owner {
                Some(o) => self.leases.insert(endpoint.to_string(), (o, Instant::now())),
                None => self.leases.remove(endpoint),
            };
        } else if let Some(replica) = key.strip_prefix(&names.replica_key("")) {
            match owner {
                Some(_) => self.replicas.insert(replica.to_string(), Instant::now()),
                None => self.replicas.remove(replica),
            };
        }
    }

    async fn on_tick(&mut self, myself: &ActorRef<LeaseMsg>) {
        self.renew().await;
        self.ticked = true;
        self.share(myself).await;
    }

    /// Announces this replica and renews every lease it holds.
    async fn renew(&mut self) {
        self.renewed_at = Instant::now();
        let names = self.args.nats.names.clone();
        // 1. presence
        let me = ReplicaRecord {
            id: self.args.replica_id.clone(),
            started_at_ms: self.started_at_ms,
            owned: self.owned.len() as u32,
        };
        if let Ok(bytes) = to_msgpack(&me) {
            let _ = self.args.nats.leases.put(names.replica_key(&me.id), Bytes::from(bytes)).await;
        }
        self.replicas.insert(me.id.clone(), Instant::now());
        // 2. renew what we own, all at once; a failed renewal means the lease is lost
        let leases = &self.args.nats.leases;
        let renewals: Vec<futures::future::BoxFuture<'_, (String, Result<u64, kv::UpdateError>)>> = self
            .owned
            .iter()
            .map(|(id, owned)| {
                let record = LeaseRecord { owner: me.id.clone(), epoch: owned.epoch, renewed_at_ms: now_ms() };
                let bytes = to_msgpack(&record).map(Bytes::from).unwrap_or_default();
                let (id, key, revision) = (id.clone(), names.lease_key(id), owned.revision);
                Box::pin(async move {
                    let result = leases.update(key, bytes, revision).await;
                    (id, result)
                }) as futures::future::BoxFuture<'_, _>
            })
            .collect();
        let renewed: Vec<_> = futures::stream::iter(renewals).buffer_unordered(RENEWALS_IN_FLIGHT).collect().await;
        for (id, result) in renewed {
            match result {
                Ok(rev) => {
                    if let Some(o) = self.owned.get_mut(&id) {
                        o.revision = rev;
                    }
                }
                Err(e) => {
                    tracing::warn!(endpoint_id = %id, error = %e, "lease lost");
                    self.stop_owned(&id);
                }
            }
        }
    }

    /// Releases the excess over this replica's share and takes free leases up to it.
    async fn share(&mut self, myself: &ActorRef<LeaseMsg>) {
        let ttl = self.args.lease_ttl;
        let me = self.args.replica_id.clone();
        self.replicas.retain(|_, seen| seen.elapsed() <= ttl);
        let directory = &self.args.directory;
        self.leases.retain(|id, (_, seen)| {
            let live = seen.elapsed() <= ttl;
            if !live {
                directory.set_owner(id, None);
            }
            live
        });
        let endpoints = self.args.directory.ids();
        let owned: BTreeSet<String> = self.owned.keys().cloned().collect();
        let free: BTreeSet<String> = endpoints.iter().filter(|e| !self.leases.contains_key(*e)).cloned().collect();
        let plan = lease::plan(&me, &owned, &free, endpoints.len(), self.replicas.len());
        for id in plan.release {
            self.release(&id).await;
        }
        for id in plan.acquire {
            // taking many (a replica starting next to a thousand endpoints) may outlast a tick:
            // keep the first ones renewed meanwhile
            if self.renewed_at.elapsed() >= tick_of(self.args.lease_ttl) {
                self.renew().await;
            }
            self.acquire(myself, &id).await;
        }
    }

    async fn acquire(&mut self, myself: &ActorRef<LeaseMsg>, id: &str) {
        let Some(spec) = self.args.directory.spec(id) else { return };
        let key = self.args.nats.names.lease_key(id);
        // the epoch is the revision of this creation, known only after it: write, then confirm
        let probe = LeaseRecord { owner: self.args.replica_id.clone(), epoch: 0, renewed_at_ms: now_ms() };
        let bytes = to_msgpack(&probe).map(Bytes::from).unwrap_or_default();
        let epoch = match self.args.nats.leases.create(&key, bytes).await {
            Ok(rev) => rev,
            Err(_) => return, // someone else holds it
        };
        let record = LeaseRecord { epoch, ..probe };
        let bytes = to_msgpack(&record).map(Bytes::from).unwrap_or_default();
        let Ok(revision) = self.args.nats.leases.update(&key, bytes, epoch).await else { return };
        self.leases.insert(id.to_string(), (self.args.replica_id.clone(), Instant::now()));
        self.args.directory.set_owner(id, Some(&self.args.replica_id));
        let args = EndpointArgs {
            nats: self.shared.clone(),
            spec,
            epoch,
            replica_id: self.args.replica_id.clone(),
            hosts: self.args.hosts.clone(),
            limits: self.args.limits.clone(),
            tick: Duration::from_millis(self.args.config.tick_ms),
            scaler_tick: self.args.config.scaler_tick(),
        };
        match crate::spawn::spawn_linked(EndpointActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                tracing::info!(endpoint_id = %id, epoch, replica_id = %self.args.replica_id, "endpoint acquired");
                crate::metrics::lease_acquired(id);
                self.args.directory.set_actor(id, Some(actor.clone()));
                self.owned.insert(id.to_string(), Owned { revision, epoch });
                // registered: the record feeds reach it now, so it may read its history
                let _ = actor.cast(EndpointMsg::Start);
            }
            Err(e) => {
                tracing::error!(endpoint_id = %id, error = %e, "cannot start endpoint actor");
                let _ = self.args.nats.leases.delete_expect_revision(&key, Some(revision)).await;
            }
        }
    }

    fn stop_owned(&mut self, id: &str) {
        if self.owned.remove(id).is_some() {
            crate::metrics::lease_released(id);
        }
        if let Some(actor) = self.args.directory.actor(id) {
            actor.stop(None);
        }
        self.args.directory.set_actor(id, None);
    }

    /// Gives a lease back: stops the endpoint actor, then deletes the lease if still ours.
    async fn release(&mut self, id: &str) {
        let revision = self.owned.get(id).map(|o| o.revision);
        if let Some(actor) = self.args.directory.actor(id) {
            let _ = actor.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
        self.stop_owned(id);
        if let Some(rev) = revision {
            let _ = self.args.nats.leases.delete_expect_revision(self.args.nats.names.lease_key(id), Some(rev)).await;
        }
        self.leases.remove(id);
        self.args.directory.set_owner(id, None);
        tracing::info!(endpoint_id = %id, replica_id = %self.args.replica_id, "endpoint released");
    }
}
