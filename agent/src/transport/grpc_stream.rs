//! A gRPC response stream (SDS's) as an async body that sends its
//! messages, run inside the response stream itself; and every stream's
//! outcome metric ([`FirstOutcome`]).
//!
//! `body` runs inside the stream (see [`Generated`]), polled by the HTTP/2
//! stream that carries it, not as a task of its own feeding a channel: an
//! idle stream is then one boxed future, which is most of what an SDS
//! stream costs in memory. When the client resets the stream, the transport
//! drops it, and `body` with it. (The Workload API's streams are smaller
//! still: structs polled by hand, `workload_api/svid_stream.rs`.)

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::metrics::{Metrics, OpenStream};
use crate::sync::Mutex;

/// Records a streaming RPC's outcome once, when it is known: the code of
/// the first message the stream yields (OK for an answer, else the error's
/// status), or Cancelled when the client leaves before any.
pub struct Outcome {
    pub metrics: Arc<Metrics>,
    pub method: &'static str,
    pub started: tokio::time::Instant,
}

impl Outcome {
    fn record(self, code: tonic::Code) {
        self.metrics.record_rpc(self.method, code, self.started);
    }
}

/// A stream's [`Outcome`] until its first message: recorded then, or as
/// Cancelled if the stream is dropped before it has any (boxed: an idle
/// stream keeps a pointer).
pub struct FirstOutcome(Option<Box<Outcome>>);

impl FirstOutcome {
    pub fn new(outcome: Outcome) -> Self {
        Self(Some(Box::new(outcome)))
    }

    /// Records `item`'s code if it is the stream's first message, and then
    /// returns when the stream started.
    pub fn first<M>(&mut self, item: &Result<M, Status>) -> Option<tokio::time::Instant> {
        let outcome = self.0.take()?;
        let started = outcome.started;
        outcome.record(match item {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        });
        Some(started)
    }
}

impl Drop for FirstOutcome {
    fn drop(&mut self) {
        if let Some(outcome) = self.0.take() {
            outcome.record(tonic::Code::Cancelled);
        }
    }
}

/// Runs `body` as a stream: it gets a sender and must send the first
/// message as soon as it can. The stream ends only with an error status
/// (client gone aside): PermissionDenied when identities vanish,
/// Unavailable on shutdown.
pub fn generated<M, F, Fut>(
    body: F,
    shutdown: CancellationToken,
    open: OpenStream,
    outcome: Outcome,
) -> impl Stream<Item = Result<M, Status>> + Send + 'static
where
    M: Send + 'static,
    F: FnOnce(StreamSender<M>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slot = Arc::new(Mutex::new(None));
    let body = body(StreamSender {
        slot: slot.clone(),
        shutdown,
    });
    Generated {
        slot,
        body: Some(Box::pin(body)),
        _open: open,
        outcome: FirstOutcome::new(outcome),
    }
}

/// The hand-over between a stream body and its consumer: one message at a
/// time, boxed so the slot stays pointer-sized while the stream idles.
type Slot<M> = Arc<Mutex<Option<Box<Result<M, Status>>>>>;

fn take<M>(slot: &Slot<M>) -> Option<Result<M, Status>> {
    slot.lock().take().map(|b| *b)
}

/// A stream produced by an async body that hands each message over through
/// a one-message [`Slot`]: `poll_next` polls the body until it has put a
/// message there (then returns it) or is waiting for something else (then
/// the body's wakers are the transport's). Backpressure is the transport's:
/// the body's `send` completes only once the message has been taken, which
/// is when the transport asks for the next one.
struct Generated<M, Fut> {
    slot: Slot<M>,
    /// None once the body has returned.
    body: Option<Pin<Box<Fut>>>,
    _open: OpenStream,
    outcome: FirstOutcome,
}

impl<M, Fut> Generated<M, Fut> {
    fn yielded(&mut self, item: Option<Result<M, Status>>) -> Option<Result<M, Status>> {
        if let Some(item) = item.as_ref() {
            self.outcome.first(item);
        }
        item
    }
}

impl<M, Fut: std::future::Future<Output = ()>> Stream for Generated<M, Fut> {
    type Item = Result<M, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        // Every field is Unpin (the body is boxed), so the pin can be dropped.
        let this = self.get_mut();
        if let Some(item) = take(&this.slot) {
            return Poll::Ready(this.yielded(Some(item)));
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if body.as_mut().poll(cx).is_ready() {
            this.body = None;
            let item = take(&this.slot);
            return Poll::Ready(this.yielded(item));
        }
        match take(&this.slot) {
            Some(item) => Poll::Ready(this.yielded(Some(item))),
            None => Poll::Pending,
        }
    }
}

/// Sends stream messages, giving up when the agent stops. (A client that
/// leaves drops the stream, and the sender's body with it.)
pub struct StreamSender<M> {
    slot: Slot<M>,
    shutdown: CancellationToken,
}

impl<M> StreamSender<M> {
    fn put(&self, item: Result<M, Status>) {
        *self.slot.lock() = Some(Box::new(item));
    }

    /// Hands `item` to the stream and waits until it is taken; false when
    /// the agent is stopping instead. Not an `async fn`: the item goes into
    /// the slot at once, so it is not also carried in the future (whose
    /// size every idle stream would pay).
    pub fn send(&self, item: Result<M, Status>) -> impl std::future::Future<Output = bool> + '_ {
        self.put(item);
        self.taken()
    }

    async fn taken(&self) -> bool {
        let taken = std::future::poll_fn(|_| {
            // No waker needed: only the consumer empties the slot, and it
            // polls the body again right after.
            if self.slot.lock().is_some() {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        });
        tokio::select! {
            biased;
            _ = taken => true,
            _ = self.shutdown.cancelled() => {
                self.put(Err(Status::unavailable("agent is shutting down")));
                false
            }
        }
    }

    /// Waits until the agent stops, then queues the final shutdown status.
    pub async fn ended(&self) {
        self.shutdown.cancelled().await;
        self.put(Err(Status::unavailable("agent is shutting down")));
    }
}

pub type BoxStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn outcome(metrics: &Arc<Metrics>, method: &'static str) -> Outcome {
        Outcome {
            metrics: metrics.clone(),
            method,
            started: tokio::time::Instant::now(),
        }
    }

    fn count(metrics: &Metrics, method: &str, code: &str) -> usize {
        let line =
            format!("tessera_workload_api_requests_total{{method=\"{method}\",code=\"{code}\"}} 1");
        metrics.encode().lines().filter(|l| *l == line).count()
    }

    #[tokio::test]
    async fn the_outcome_is_the_first_message_or_cancelled() {
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let ok = generated(
            |out: StreamSender<u32>| async move {
                out.send(Ok(1)).await;
                out.send(Err(Status::unavailable("later"))).await;
            },
            shutdown.clone(),
            OpenStream::new(&metrics, "Ok"),
            outcome(&metrics, "Ok"),
        );
        let items: Vec<_> = ok.collect().await;
        assert_eq!(items.len(), 2);
        assert_eq!(count(&metrics, "Ok", "OK"), 1);
        assert_eq!(
            count(&metrics, "Ok", "Unavailable"),
            0,
            "only the first counts"
        );

        let failed = generated(
            |out: StreamSender<u32>| async move {
                out.send(Err(Status::unavailable("could not issue"))).await;
            },
            shutdown.clone(),
            OpenStream::new(&metrics, "Failed"),
            outcome(&metrics, "Failed"),
        );
        let _: Vec<_> = failed.collect().await;
        assert_eq!(count(&metrics, "Failed", "Unavailable"), 1);
        assert_eq!(count(&metrics, "Failed", "OK"), 0);

        let left = generated(
            |_out: StreamSender<u32>| std::future::pending::<()>(),
            shutdown,
            OpenStream::new(&metrics, "Left"),
            outcome(&metrics, "Left"),
        );
        drop(left);
        assert_eq!(count(&metrics, "Left", "Canceled"), 1);
    }
}
