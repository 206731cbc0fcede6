//! One campaign on one node: once a sharder has found the campaign's audience not empty
//! (status `running`, and no bucket count of 0), spawns the push sender (or, for an eager coupon, the coupon issuer) and the bucket
//! expander (downstream first), restarts a failed child up to a limit, and checks the
//! campaign's records for completion. Every node runs a supervisor per active campaign; their
//! workers share the stage consumers, and whichever node sees completion first records it.
//!
//! The stages start only when there is work for them: a campaign whose audience is empty is
//! completed without a consumer ever being created for it, which is what lets a node keep up
//! with a burst of creates (a file-stored consumer costs the server about 1 ms of CPU to
//! create and delete; BENCHMARKS.md, "Campaign startup").

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use herald_schemas::{CampaignKind, CampaignState};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::{sync::broadcast, task::JoinHandle};

use crate::{
    bucket_expander::BucketExpander,
    context::Shared,
    coupons::issuer_stage::CouponIssuer,
    push_sender::PushSender,
    stage::{durable_name, Stage, StageArgs, StageWorker},
    store::Campaign,
};

/// How long a campaign may stay pending before its supervisors announce it again. The API
/// announces each new campaign within milliseconds of its reply; announcing every campaign
/// again at once cost a JetStream publish per campaign per node for nothing.
pub const ANNOUNCE_AFTER: Duration = Duration::from_secs(5);

/// The campaign supervisor actor.
pub struct CampaignSupervisor;

/// Start arguments.
pub struct SupervisorArgs {
    /// Node state.
    pub shared: Arc<Shared>,
    /// The campaign to run.
    pub campaign_id: i64,
}

/// Messages the supervisor handles.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Check progress and respawn missing children.
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Child {
    Sender,
    Expander,
}

/// Supervisor state.
pub struct SupervisorState {
    shared: Arc<Shared>,
    campaign: Arc<Campaign>,
    children: HashMap<ActorId, Child>,
    restarts: HashMap<Child, u32>,
    missing: Vec<Child>,
    /// The stages have been spawned (once the campaign had buckets).
    started: bool,
    /// When this supervisor last announced the campaign again.
    announced: Option<Instant>,
    ticker: Option<JoinHandle<()>>,
    listener: Option<JoinHandle<()>>,
    stopping: bool,
    delete_consumers: bool,
}

impl CampaignSupervisor {
    async fn spawn_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let shared = state.shared.clone();
        let campaign = state.campaign.clone();
        let cell = myself.get_cell();
        let actor: ActorCell = match child {
            Child::Sender if campaign.kind == CampaignKind::CouponEager.as_str() => {
                let stage = CouponIssuer::new(shared.clone(), campaign.clone())?;
                spawn_stage(stage, shared, campaign, cell).await?
            }
            Child::Sender => {
                let stage = PushSender::new(shared.clone(), campaign.clone())?;
                spawn_stage(stage, shared, campaign, cell).await?
            }
            Child::Expander => {
                let stage = BucketExpander::new(shared.clone(), campaign.clone());
                spawn_stage(stage, shared, campaign, cell).await?
            }
        };
        state.children.insert(actor.get_id(), child);
        Ok(())
    }

    /// Spawns the missing children, downstream first; a failure leaves them for the next tick.
    async fn spawn_missing(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
        let mut missing = std::mem::take(&mut state.missing);
        missing.sort_by_key(|c| *c as u8);
        for child in missing {
            if let Err(e) = Self::spawn_child(myself, state, child).await {
                tracing::warn!(campaign_id = state.campaign.id, ?child, error = %e, "starting stage failed, will retry");
                state.missing.push(child);
            }
        }
    }

    /// Announces a campaign again when it has been pending longer than the API takes to
    /// announce it, in case that publish was lost (the API's node stopped first, or NATS
    /// refused it), and then every [`ANNOUNCE_AFTER`] while it stays pending. A repeat is
    /// harmless: the server drops it inside its dedupe window and the sharder after it.
    async fn announce_if_lost(state: &mut SupervisorState, status: CampaignState) {
        let c = &state.campaign;
        let age = chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(c.epoch);
        let due = state
            .announced
            .is_none_or(|at| at.elapsed() >= ANNOUNCE_AFTER);
        if status != CampaignState::Pending || age < ANNOUNCE_AFTER.as_millis() as i64 || !due {
            return;
        }
        let topo = &state.shared.topology;
        crate::sharder::announce(topo.js(), topo.subjects(), c.id, c.epoch).await;
        state.announced = Some(Instant::now());
    }

    /// Spawns the stages once the campaign has buckets to expand. The sharder marks a
    /// campaign running before it publishes buckets, except when it has none.
    async fn start_stages(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        status: CampaignState,
        buckets_total: Option<i64>,
    ) {
        if state.started || status != CampaignState::Running || buckets_total == Some(0) {
            return;
        }
        state.started = true;
        state.missing.extend([Child::Sender, Child::Expander]);
        Self::spawn_missing(myself, state).await;
    }

    async fn check_progress(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let id = state.campaign.id;
        let Some(campaign) = state.shared.store.campaign(id).await? else {
            myself.stop(Some("campaign deleted".into()));
            return Ok(());
        };
        if campaign.status.is_final() {
            state.delete_consumers = state.started;
            myself.stop(Some(format!("campaign {}", campaign.status.as_str())));
            return Ok(());
        }
        Self::start_stages(myself, state, campaign.status, campaign.buckets_total).await;
        Self::announce_if_lost(state, campaign.status).await;
        let Some(total) = campaign.buckets_total else {
            return Ok(());
        };
        let store = &state.shared.store;
        let p = store.progress(id).await?;
        if !p.is_complete(total) {
            return Ok(());
        }
        let won = store
            .finish(id, CampaignState::Completed, &p, None, chrono::Utc::now())
            .await?;
        if won {
            tracing::info!(
                campaign_id = id,
                recipients = p.recipients,
                sent = p.sent,
                skipped = p.skipped,
                failed = p.failed,
                "campaign completed"
            );
        }
        // Deleted once the children have stopped pulling from them (post_stop), by every
        // node that created them: one that started late may have re-created them.
        state.delete_consumers = state.started;
        myself.stop(Some("campaign completed".into()));
        Ok(())
    }

    async fn delete_consumers(state: &SupervisorState) {
        let topo = &state.shared.topology;
        let s = topo.subjects();
        let id = state.campaign.id;
        let last = if state.campaign.kind == CampaignKind::CouponEager.as_str() {
            CouponIssuer::NAME
        } else {
            PushSender::NAME
        };
        for (stream, name) in [
            (s.buckets_stream(), BucketExpander::NAME),
            (s.push_stream(), last),
        ] {
            let durable = durable_name(s.prefix(), name, id);
            if let Err(e) = topo.delete_consumer(&stream, &durable).await {
                tracing::warn!(campaign_id = id, consumer = %durable, error = %e, "deleting consumer failed");
            }
        }
    }

    async fn fail_campaign(state: &SupervisorState, reason: &str) {
        let store = &state.shared.store;
        let id = state.campaign.id;
        let progress = store.progress(id).await.unwrap_or_default();
        match store
            .finish(
                id,
                CampaignState::Failed,
                &progress,
                Some(reason),
                chrono::Utc::now(),
            )
            .await
        {
            Ok(_) => tracing::error!(campaign_id = id, reason, "campaign failed"),
            Err(e) => {
                tracing::error!(campaign_id = id, reason, error = %e, "recording campaign failure failed")
            }
        }
    }
}

/// Turns this node's completion notices for campaign `id` into immediate progress checks;
/// the periodic check still covers completions recorded on other nodes.
fn listen_for_completion(
    myself: &ActorRef<SupervisorMsg>,
    mut completed: broadcast::Receiver<i64>,
    id: i64,
) -> JoinHandle<()> {
    let myself = myself.clone();
    tokio::spawn(async move {
        loop {
            let ours = match completed.recv().await {
                Ok(done) => done == id,
                // Notices were dropped while this listener lagged: one may have been ours.
                Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if ours && myself.send_message(SupervisorMsg::Tick).is_err() {
                return;
            }
        }
    })
}

async fn spawn_stage<S: Stage>(
    stage: S,
    shared: Arc<Shared>,
    campaign: Arc<Campaign>,
    supervisor: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        None,
        StageWorker::<S>::default(),
        StageArgs {
            shared,
            campaign,
            stage: Arc::new(stage),
        },
        supervisor,
    )
    .await?;
    Ok(actor.get_cell())
}

#[async_trait]
impl Actor for CampaignSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        // Listening before the campaign is read, so a notice that it was sharded meanwhile
        // is not missed.
        let listener = listen_for_completion(
            &myself,
            args.shared.maybe_complete.subscribe(),
            args.campaign_id,
        );
        let campaign = match args.shared.store.campaign(args.campaign_id).await {
            Ok(Some(c)) if !c.status.is_final() => c,
            found => {
                listener.abort();
                return Err(match found {
                    Ok(Some(c)) => format!("campaign {} is {}", c.id, c.status.as_str()),
                    Ok(None) => format!("campaign {} not found", args.campaign_id),
                    Err(e) => e.to_string(),
                }
                .into());
            }
        };
        let (status, buckets_total) = (campaign.status, campaign.buckets_total);
        let mut state = SupervisorState {
            shared: args.shared.clone(),
            campaign: Arc::new(campaign),
            children: HashMap::new(),
            restarts: HashMap::new(),
            missing: Vec::new(),
            started: false,
            announced: None,
            ticker: None,
            listener: Some(listener),
            stopping: false,
            delete_consumers: false,
        };
        Self::start_stages(&myself, &mut state, status, buckets_total).await;
        Self::announce_if_lost(&mut state, status).await;
        let period = args.shared.settings.progress_interval;
        state.ticker = Some(myself.send_interval(period, || SupervisorMsg::Tick));
        // A small campaign may have had every record in before this supervisor listened.
        myself.send_message(SupervisorMsg::Tick)?;
        tracing::info!(campaign_id = state.campaign.id, node = %args.shared.node_id, "campaign supervisor started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Tick if !state.stopping => {
                if !state.missing.is_empty() {
                    Self::spawn_missing(&myself, state).await;
                }
                if let Err(e) = Self::check_progress(&myself, state).await {
                    tracing::warn!(campaign_id = state.campaign.id, error = %e, "progress check failed");
                }
            }
            SupervisorMsg::Tick => {}
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        // A stage also ends when another node finished the campaign and deleted its
        // consumers: then stop, rather than re-create a consumer nobody will clean up.
        match state.shared.store.campaign(state.campaign.id).await {
            Ok(Some(c)) if c.status.is_final() => {
                state.delete_consumers = true;
                myself.stop(Some(format!("campaign {}", c.status.as_str())));
                return Ok(());
            }
            Ok(None) => {
                myself.stop(Some("campaign deleted".into()));
                return Ok(());
            }
            _ => {}
        }
        let n = state.restarts.entry(child).or_insert(0);
        *n += 1;
        if *n > state.shared.settings.max_restarts {
            let why = format!("{child:?} failed {} times, last: {reason}", *n);
            Self::fail_campaign(state, &why).await;
            myself.stop(Some(why));
            return Ok(());
        }
        tracing::warn!(campaign_id = state.campaign.id, ?child, restart = *n, reason = %reason, "restarting stage");
        state.missing.push(child);
        Self::spawn_missing(&myself, state).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        for task in [state.ticker.take(), state.listener.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        myself
            .stop_children_and_wait(
                Some("supervisor stopping".into()),
                Some(state.shared.settings.push.ack_wait * 2),
            )
            .await;
        if state.delete_consumers {
            Self::delete_consumers(state).await;
        }
        Ok(())
    }
}
