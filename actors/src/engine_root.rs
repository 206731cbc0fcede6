//! The root actor of a node: runs one campaign supervisor per active campaign, and the
//! node-level workers on shared consumers (the sharder, the login coupon issuer, the coupon
//! releaser). It learns of campaigns to run from the sharders' `campaign.running` notices (a
//! plain subscription: every node must hear every campaign; a campaign whose audience is
//! empty is completed by its sharder and never needs a supervisor) and, so nothing is missed
//! while it was down or disconnected, from a periodic scan of the database for campaigns
//! that are running, or pending for longer than the API takes to announce them.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::StreamExt;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;

use crate::{
    campaign_supervisor::{CampaignSupervisor, SupervisorArgs, SupervisorMsg, ANNOUNCE_AFTER},
    context::Shared,
    coupons::{login_issuer::LoginIssuer, releaser::CouponReleaser},
    event_worker::{EventHandler, EventWorker},
    sharder::Sharder,
};

/// How often the root looks for campaigns it is not running yet.
const SCAN_INTERVAL: Duration = Duration::from_secs(3);

/// The engine root actor.
pub struct EngineRoot;

/// Messages the root handles.
#[derive(Debug)]
pub enum RootMsg {
    /// Make sure a supervisor runs for this campaign.
    Ensure(i64),
    /// Look for active campaigns in the database.
    Scan,
    /// The campaigns this node is running.
    Running(RpcReplyPort<Vec<i64>>),
}

/// Root state.
pub struct RootState {
    shared: Arc<Shared>,
    running: HashMap<i64, ActorRef<SupervisorMsg>>,
    by_actor: HashMap<ActorId, i64>,
    events: HashMap<&'static str, ActorId>,
    tasks: Vec<JoinHandle<()>>,
}

impl EngineRoot {
    /// Starts the node-level workers that are not running; a failure is retried on the next
    /// scan.
    async fn ensure_events(myself: &ActorRef<RootMsg>, state: &mut RootState) {
        let shared = state.shared.clone();
        Self::ensure_event(myself, state, Arc::new(Sharder::new(shared.clone()))).await;
        Self::ensure_event(myself, state, Arc::new(LoginIssuer::new(shared.clone()))).await;
        Self::ensure_event(myself, state, Arc::new(CouponReleaser::new(shared))).await;
    }

    async fn ensure_event<H: EventHandler>(
        myself: &ActorRef<RootMsg>,
        state: &mut RootState,
        handler: Arc<H>,
    ) {
        if state.events.contains_key(H::NAME) {
            return;
        }
        let args = (state.shared.clone(), handler);
        match Actor::spawn_linked(None, EventWorker::<H>::default(), args, myself.get_cell()).await
        {
            Ok((actor, _)) => {
                state.events.insert(H::NAME, actor.get_id());
            }
            Err(e) => tracing::warn!(handler = H::NAME, error = %e, "event worker not started"),
        }
    }

    async fn ensure(myself: &ActorRef<RootMsg>, state: &mut RootState, campaign_id: i64) {
        if state.running.contains_key(&campaign_id) {
            return;
        }
        let args = SupervisorArgs {
            shared: state.shared.clone(),
            campaign_id,
        };
        match Actor::spawn_linked(None, CampaignSupervisor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                state.by_actor.insert(actor.get_id(), campaign_id);
                state.running.insert(campaign_id, actor);
            }
            Err(e) => tracing::debug!(campaign_id, error = %e, "campaign supervisor not started"),
        }
    }
}

#[async_trait]
impl Actor for EngineRoot {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<Shared>,
    ) -> Result<RootState, ActorProcessingErr> {
        let subject = shared.topology.subjects().campaign_running_all();
        let mut sub = shared.nats.subscribe(subject).await?;
        herald_nats::sync_with_server(&shared.nats).await;
        let me = myself.clone();
        let listener = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let id = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<i64>().ok());
                if let Some(id) = id {
                    if me.send_message(RootMsg::Ensure(id)).is_err() {
                        break;
                    }
                }
            }
        });
        let scanner = myself.send_interval(SCAN_INTERVAL, || RootMsg::Scan);
        myself.send_message(RootMsg::Scan)?;
        Ok(RootState {
            shared,
            running: HashMap::new(),
            by_actor: HashMap::new(),
            events: HashMap::new(),
            tasks: vec![listener, scanner],
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Ensure(id) => Self::ensure(&myself, state, id).await,
            RootMsg::Scan => {
                Self::ensure_events(&myself, state).await;
                let pending_before = chrono::Utc::now()
                    - chrono::Duration::from_std(ANNOUNCE_AFTER).unwrap_or_default();
                match state
                    .shared
                    .store
                    .campaigns_to_supervise(pending_before)
                    .await
                {
                    Ok(ids) => {
                        for id in ids {
                            Self::ensure(&myself, state, id).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "scanning for active campaigns failed"),
                }
            }
            RootMsg::Running(reply) => {
                let mut ids: Vec<i64> = state.running.keys().copied().collect();
                ids.sort_unstable();
                let _ = reply.send(ids);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match &event {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::warn!(error = %err, "campaign supervisor failed");
                cell
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => cell,
            _ => return Ok(()),
        };
        // The next scan starts it again (an event worker, or a campaign still active).
        let id = cell.get_id();
        state.events.retain(|_, a| *a != id);
        if let Some(id) = state.by_actor.remove(&cell.get_id()) {
            state.running.remove(&id);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.tasks.drain(..) {
            t.abort();
        }
        myself
            .stop_children_and_wait(
                Some("node stopping".into()),
                Some(state.shared.settings.push.ack_wait * 3),
            )
            .await;
        Ok(())
    }
}
