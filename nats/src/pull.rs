//! herald's pull stream: a continuous pull from a durable consumer, as NATS ADR-37 specifies
//! `consume()`, with one difference from async-nats 0.51's own: a missed heartbeat is
//! recovered from at once.
//!
//! The stream counts the messages it has asked for and not yet received (`pending`) and asks
//! for another batch whenever that count falls to half a batch. The server answers a waiting
//! request with messages, or with an idle heartbeat when it has none. When neither comes for
//! two heartbeat intervals while the count says a request is waiting, the server holds no
//! request the count knows of: async-nats then reports the error and asks again only when its
//! own timer runs out, `expires` + 5 s after its last request, which stalled the bench's
//! baseline and once a herald stage for up to 10 s. Here the count is reset and a new request
//! goes out on the next poll, so such a stall lasts two heartbeats.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use async_nats::{
    client::PublishError, connection::State, jetstream, StatusCode, Subject, Subscriber,
};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::NatsError;

/// How long a pull request waits at the server before it expires (408) and is asked again.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on a waiting pull request (at most half of `PULL_EXPIRES`).
/// Two of them missed reset the count.
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// The wait before asking again after a request could not be sent or had no responder.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// herald's JetStream API prefix: the default, no domain.
const API_PREFIX: &str = "$JS.API";

/// What the pull stream yields besides messages. Only [`PullError::ConsumerDeleted`] and
/// [`PullError::Ended`] end the stream; after any other it goes on pulling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PullError {
    /// Nothing came from the server for two heartbeat intervals while a request should have
    /// been waiting there; the count was reset and the next poll asks again.
    #[error("missed idle heartbeats: the server held no pull request, asking again")]
    MissedHeartbeat,
    /// The consumer was deleted; the stream ends.
    #[error("consumer deleted")]
    ConsumerDeleted,
    /// The server refused the consumer for good (push based, bad request); the stream ends.
    #[error("pull ended: {0}")]
    Ended(String),
    /// A request was not sent, or the server turned one down; the stream asks again.
    #[error("pull request: {0}")]
    Request(String),
}

type Sending = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// A continuous pull from one consumer. Dropping it unsubscribes; messages the server still
/// sends to a request of a dropped stream come back to another after the ack wait.
pub struct PullStream {
    context: jetstream::Context,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    next_subject: Subject,
    inbox: Subject,
    /// The request body, the same for every request.
    request: Bytes,
    batch: usize,
    subscriber: Subscriber,
    /// Messages asked for and neither received nor given up by the server.
    pending: usize,
    sending: Option<Sending>,
    /// Two heartbeat intervals.
    watchdog_period: Duration,
    /// When the last request went out or the last thing came in.
    heard: Instant,
    /// Fires at or before `heard` + `watchdog_period`; moved only when it fires early.
    watchdog: Pin<Box<Sleep>>,
    /// Set after a request failed: no request before it fires.
    retry: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

/// Opens the pull stream every consume loop here uses (and the bench's scratch consumers):
/// `batch` messages per pull request, 5 s requests, 2 s idle heartbeats.
pub async fn pull_messages(
    js: &jetstream::Context,
    consumer: &jetstream::consumer::PullConsumer,
    batch: usize,
) -> Result<PullStream, NatsError> {
    let info = consumer.cached_info();
    PullStream::open(js, &info.stream_name, &info.name, batch, PULL_HEARTBEAT)
        .await
        .map_err(|e| NatsError::Topology(format!("consumer {}: {e}", info.name)))
}

impl PullStream {
    /// Subscribes to a new inbox for `consumer` of `stream`; the first poll sends the first
    /// request. `heartbeat` sets the server's idle heartbeat; requests expire after
    /// [`PULL_EXPIRES`] or five heartbeats, whichever is longer.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        consumer: &str,
        batch: usize,
        heartbeat: Duration,
    ) -> Result<Self, async_nats::SubscribeError> {
        let client = js.client();
        let inbox: Subject = client.new_inbox().into();
        let subscriber = client.subscribe(inbox.clone()).await?;
        let batch = batch.max(1);
        let expires = PULL_EXPIRES.max(heartbeat * 5);
        let request = format!(
            r#"{{"batch":{batch},"expires":{},"idle_heartbeat":{}}}"#,
            expires.as_nanos(),
            heartbeat.as_nanos()
        );
        Ok(Self {
            context: js.clone(),
            next_subject: format!("{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}").into(),
            inbox,
            request: Bytes::from(request),
            batch,
            subscriber,
            pending: 0,
            sending: None,
            watchdog_period: heartbeat * 2,
            heard: Instant::now(),
            watchdog: Box::pin(tokio::time::sleep(heartbeat * 2)),
            retry: None,
            ended: false,
        })
    }

    /// Messages asked for and not yet received, as the stream counts them.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether nothing was heard for two heartbeats. Hearing something only notes the time;
    /// the timer is moved on when it fires and something was heard since, so a busy stream
    /// touches its timer once per two heartbeats, not at every message.
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.watchdog.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.heard + self.watchdog_period;
            if Instant::now() >= due {
                return true;
            }
            self.watchdog.as_mut().reset(due);
        }
    }

    /// Starts a new silence: the next check fires two heartbeats from now.
    fn restart_silence(&mut self, cx: &mut Context<'_>) {
        self.heard = Instant::now();
        self.watchdog
            .as_mut()
            .reset(self.heard + self.watchdog_period);
        let _ = self.watchdog.as_mut().poll(cx);
    }

    /// Sends a request for a batch when half a batch or less is outstanding.
    fn ask_if_low(&mut self) {
        if self.sending.is_some() || self.retry.is_some() || self.pending > self.batch / 2 {
            return;
        }
        // Counted before it is sent, so that no message of it can arrive uncounted.
        self.pending += self.batch;
        let (client, subject, inbox, body) = (
            self.context.client(),
            self.next_subject.clone(),
            self.inbox.clone(),
            self.request.clone(),
        );
        self.sending =
            Some(async move { client.publish_with_reply(subject, inbox, body).await }.boxed());
        self.heard = Instant::now();
    }

    /// A request that was not sent, or that the server turned down whole: forget its count and
    /// wait a little before asking again.
    fn request_failed(&mut self) {
        self.pending = self.pending.saturating_sub(self.batch);
        self.retry = Some(Box::pin(tokio::time::sleep(RETRY_DELAY)));
    }

    /// What a status message from the server means. `None`: nothing to tell the caller.
    fn on_status(
        &mut self,
        message: &async_nats::Message,
        status: StatusCode,
    ) -> Option<PullError> {
        let description = message.description.as_deref().unwrap_or_default();
        match status {
            StatusCode::IDLE_HEARTBEAT => None,
            StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED => {
                if description.eq_ignore_ascii_case("consumer deleted") {
                    self.ended = true;
                    return Some(PullError::ConsumerDeleted);
                }
                if description.eq_ignore_ascii_case("consumer is push based") {
                    self.ended = true;
                    return Some(PullError::Ended(description.to_string()));
                }
                // The request ended with this many of its messages undelivered; a status
                // without the header (exceeded max waiting, for one) turned the whole request
                // down.
                match pending_header(message) {
                    Some(left) => {
                        self.pending = self.pending.saturating_sub(left);
                        None
                    }
                    None if status == StatusCode::TIMEOUT => {
                        self.pending = self.pending.saturating_sub(self.batch);
                        None
                    }
                    None => {
                        self.request_failed();
                        Some(PullError::Request(format!("{status}: {description}")))
                    }
                }
            }
            StatusCode::NO_RESPONDERS => {
                self.request_failed();
                Some(PullError::Request(
                    "no responders: JetStream is not answering".to_string(),
                ))
            }
            _ if status.as_u16() == 400 => {
                self.ended = true;
                Some(PullError::Ended(format!("{status}: {description}")))
            }
            _ => Some(PullError::Request(format!("{status}: {description}"))),
        }
    }
}

/// The `Nats-Pending-Messages` header of a status that ends a request.
fn pending_header(message: &async_nats::Message) -> Option<usize> {
    message
        .headers
        .as_ref()?
        .get("Nats-Pending-Messages")?
        .as_str()
        .parse()
        .ok()
}

impl Stream for PullStream {
    type Item = Result<jetstream::Message, PullError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(retry) = this.retry.as_mut() {
                if retry.as_mut().poll(cx).is_ready() {
                    this.retry = None;
                }
            }
            this.ask_if_low();
            if let Some(sending) = this.sending.as_mut() {
                if let Poll::Ready(sent) = sending.as_mut().poll(cx) {
                    this.sending = None;
                    if let Err(e) = sent {
                        this.request_failed();
                        return Poll::Ready(Some(Err(PullError::Request(e.to_string()))));
                    }
                }
            }
            match this.subscriber.poll_next_unpin(cx) {
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(message)) => {
                    this.heard = Instant::now();
                    match message.status {
                        None | Some(StatusCode::OK) => {
                            this.pending = this.pending.saturating_sub(1);
                            return Poll::Ready(Some(Ok(jetstream::Message {
                                message,
                                context: this.context.clone(),
                            })));
                        }
                        Some(status) => {
                            if let Some(e) = this.on_status(&message, status) {
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                }
                Poll::Pending => break,
            }
        }
        // Waiting for messages the count says a request is waiting for.
        if this.pending > 0 && this.sending.is_none() && this.silent_too_long(cx) {
            this.restart_silence(cx);
            if this.context.client().connection_state() != State::Connected {
                // Requests made while disconnected go out on reconnect; the server's lost
                // ones are caught two heartbeats after.
                return Poll::Pending;
            }
            this.pending = 0;
            return Poll::Ready(Some(Err(PullError::MissedHeartbeat)));
        }
        Poll::Pending
    }
}
