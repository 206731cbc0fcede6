//! The actor that runs one pipeline stage of one campaign on this node: it binds the stage's
//! shared durable consumer and runs the consume loop as a task. If the loop ends on its own
//! (a panic, a lost consumer) the actor fails, and its campaign supervisor restarts it; the
//! message that was in flight is redelivered by JetStream.

use std::{marker::PhantomData, sync::Arc, time::Duration};

use async_trait::async_trait;
use herald_nats::{consume, Delivery, NatsError, Outcome};
use herald_schemas::Subjects;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    context::{Shared, StageSettings},
    store::Campaign,
};

/// One stage's logic: where it reads and what it does with a message.
#[async_trait]
pub trait Stage: Send + Sync + 'static {
    /// Stage name, used in consumer names and logs (`shard`, `expand`, `push`).
    const NAME: &'static str;

    /// The stage's settings.
    fn settings(shared: &Shared) -> &StageSettings;

    /// The stream the stage reads.
    fn stream(subjects: &Subjects) -> String;

    /// The subject filter for one campaign.
    fn filter(subjects: &Subjects, campaign_id: i64) -> String;

    /// Handles one delivery; the outcome decides ack, retry or dead letter.
    async fn handle(&self, delivery: Delivery) -> Outcome;
}

/// The durable consumer name of a stage of a campaign.
pub fn durable_name(prefix: &str, stage: &str, campaign_id: i64) -> String {
    format!("{prefix}_{stage}_{campaign_id}").replace(['.', '*', '>'], "_")
}

/// Runs a [`Stage`] for one campaign.
pub struct StageWorker<S>(PhantomData<fn() -> S>);

impl<S> Default for StageWorker<S> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// Start arguments of a stage worker.
pub struct StageArgs<S> {
    /// Node state.
    pub shared: Arc<Shared>,
    /// The campaign.
    pub campaign: Arc<Campaign>,
    /// The stage logic.
    pub stage: Arc<S>,
}

/// Messages a stage worker handles.
#[derive(Debug)]
pub enum StageMsg {
    /// The consume loop ended; unless we are stopping, that is a failure.
    LoopExited(String),
}

/// A running stage worker.
pub struct StageState {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    drain_timeout: Duration,
}

#[async_trait]
impl<S: Stage> Actor for StageWorker<S> {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = StageArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StageArgs<S>,
    ) -> Result<StageState, ActorProcessingErr> {
        let shared = args.shared;
        let subjects = shared.topology.subjects().clone();
        let settings = S::settings(&shared).clone();
        let spec = settings.consumer(
            durable_name(subjects.prefix(), S::NAME, args.campaign.id),
            S::stream(&subjects),
            S::filter(&subjects, args.campaign.id),
        );
        let consumer = shared.topology.stage_consumer(&spec).await?;
        let stop = CancellationToken::new();
        let js = shared.topology.js().clone();
        let stage = args.stage;
        let campaign_id = args.campaign.id;
        let loop_stop = stop.clone();
        let task = tokio::spawn(async move {
            let run = tokio::spawn(consume(
                js,
                subjects,
                consumer,
                settings.consume(),
                loop_stop.clone().cancelled_owned(),
                move |d| {
                    let stage = stage.clone();
                    async move { stage.handle(d).await }
                },
            ));
            let (reason, expected) = match run.await {
                Ok(Ok(())) if loop_stop.is_cancelled() => return,
                // Most likely another node finished the campaign and removed its consumers;
                // the supervisor checks, and restarts the stage if not.
                Ok(Err(e @ NatsError::ConsumerDeleted(_))) => (e.to_string(), true),
                Ok(Ok(())) => ("consume loop ended".to_string(), false),
                Ok(Err(e)) => (e.to_string(), false),
                Err(e) => (format!("consume loop panicked: {e}"), false),
            };
            if expected {
                tracing::info!(campaign_id, stage = S::NAME, reason = %reason, "stage loop exited");
            } else {
                tracing::warn!(campaign_id, stage = S::NAME, reason = %reason, "stage loop exited");
            }
            let _ = myself.send_message(StageMsg::LoopExited(reason));
        });
        Ok(StageState {
            stop,
            task: Some(task),
            drain_timeout: S::settings(&shared).ack_wait,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: StageMsg,
        state: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StageMsg::LoopExited(reason) if !state.stop.is_cancelled() => {
                Err(format!("{} stage failed: {reason}", S::NAME).into())
            }
            StageMsg::LoopExited(_) => Ok(()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop pulling, then let in-flight messages finish and settle, within a bound.
        state.stop.cancel();
        if let Some(mut task) = state.task.take() {
            if tokio::time::timeout(state.drain_timeout, &mut task)
                .await
                .is_err()
            {
                task.abort();
                tracing::warn!(
                    stage = S::NAME,
                    "stage did not drain in time; unacked work will be redelivered"
                );
            }
        }
        Ok(())
    }
}
