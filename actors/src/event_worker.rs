//! The actor that runs one node-level handler: it binds the handler's durable consumer
//! (shared by every node, so each message is handled once; on the events stream unless the
//! handler names another, as the sharder does with the campaigns stream) and runs the batch
//! consume loop as a task, plus the handler's periodic `tick`. If the loop ends on its own
//! the actor fails; the engine root starts it again on its next scan.

use std::{marker::PhantomData, sync::Arc};

use async_trait::async_trait;
use herald_nats::{consume_batches, BatchSettings, Delivery, Outcome};
use herald_schemas::Subjects;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::context::{Shared, StageSettings};

/// One kind of event and what to do with a batch of them.
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Name, used in the consumer name and logs.
    const NAME: &'static str;

    /// The event subject.
    fn subject(subjects: &Subjects) -> String;

    /// The stream the subject is on.
    fn stream(subjects: &Subjects) -> String {
        subjects.events_stream()
    }

    /// How the consumer retries and how many batches run at once.
    fn settings(shared: &Shared) -> &StageSettings {
        &shared.settings.events
    }

    /// Most messages per batch.
    fn batch_size(shared: &Shared) -> usize {
        shared.settings.event_batch_size
    }

    /// Handles a batch; one outcome per delivery, in order.
    async fn handle(&self, batch: Vec<Delivery>) -> Vec<Outcome>;

    /// Runs once at start and then every `coupon_sync_interval`.
    async fn tick(&self) {}
}

/// The durable consumer name of an event handler.
pub fn event_durable(prefix: &str, name: &str) -> String {
    format!("{prefix}_{name}").replace(['.', '*', '>'], "_")
}

/// Runs an [`EventHandler`].
pub struct EventWorker<H>(PhantomData<fn() -> H>);

impl<H> Default for EventWorker<H> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// Messages an event worker handles.
#[derive(Debug)]
pub enum EventMsg {
    /// The consume loop ended; unless we are stopping, that is a failure.
    LoopExited(String),
}

/// A running event worker.
pub struct EventState {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: std::time::Duration,
}

#[async_trait]
impl<H: EventHandler> Actor for EventWorker<H> {
    type Msg = EventMsg;
    type State = EventState;
    type Arguments = (Arc<Shared>, Arc<H>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (shared, handler): (Arc<Shared>, Arc<H>),
    ) -> Result<EventState, ActorProcessingErr> {
        let subjects = shared.topology.subjects().clone();
        let settings = H::settings(&shared).clone();
        let spec = settings.consumer(
            event_durable(subjects.prefix(), H::NAME),
            H::stream(&subjects),
            H::subject(&subjects),
        );
        let consumer = shared.topology.stage_consumer(&spec).await?;
        handler.tick().await;
        let stop = CancellationToken::new();
        let ticker = {
            let (handler, stop) = (handler.clone(), stop.clone());
            let period = shared.settings.coupon_sync_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => handler.tick().await,
                    }
                }
            })
        };
        let batch = BatchSettings {
            consume: settings.consume(),
            batch_size: H::batch_size(&shared),
        };
        let js = shared.topology.js().clone();
        let loop_stop = stop.clone();
        let task = tokio::spawn(async move {
            let run = tokio::spawn(consume_batches(
                js,
                subjects,
                consumer,
                batch,
                loop_stop.clone().cancelled_owned(),
                move |b| {
                    let handler = handler.clone();
                    async move { handler.handle(b).await }
                },
            ));
            let reason = match run.await {
                Ok(Ok(())) if loop_stop.is_cancelled() => return,
                Ok(Ok(())) => "consume loop ended".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("consume loop panicked: {e}"),
            };
            tracing::warn!(handler = H::NAME, reason = %reason, "event loop exited");
            let _ = myself.send_message(EventMsg::LoopExited(reason));
        });
        Ok(EventState {
            stop,
            tasks: vec![task, ticker],
            drain_timeout: settings.ack_wait,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: EventMsg,
        state: &mut EventState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EventMsg::LoopExited(reason) if !state.stop.is_cancelled() => {
                Err(format!("{} failed: {reason}", H::NAME).into())
            }
            EventMsg::LoopExited(_) => Ok(()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut EventState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop pulling, then let in-flight batches finish and settle, within a bound.
        state.stop.cancel();
        for mut task in state.tasks.drain(..) {
            if tokio::time::timeout(state.drain_timeout, &mut task)
                .await
                .is_err()
            {
                task.abort();
                tracing::warn!(
                    handler = H::NAME,
                    "event worker did not drain in time; unacked events will be redelivered"
                );
            }
        }
        Ok(())
    }
}
