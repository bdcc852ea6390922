//! A node following one of the authority's long-lived streams (revocations,
//! live entries, approval decisions): open it on whichever replica answers,
//! hand each event to a [`Handler`], and reconnect when it breaks or goes
//! silent (no heartbeat for three periods), backing off from 200 ms to 10 s.
//! A 404 means the authority does not serve the stream: the handler is told
//! and it is asked again a minute later. Failures are logged once until the
//! stream is back.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::client::{Upstream, UpstreamError};
use super::feed::HEARTBEAT;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long before a stream the authority does not serve is asked for again.
const NOT_SERVED_RETRY: Duration = Duration::from_secs(60);

/// What a follower does with one stream.
pub trait Handler: Send {
    type Event: DeserializeOwned + Send;
    /// The path to open now (it may carry a cursor the events moved).
    fn path(&self) -> String;
    /// The authority answered 404; `first` for the first refusal in a row.
    fn not_served(&mut self, first: bool);
    /// A stream opened (`true`) or ended (`false`).
    fn connected(&mut self, _open: bool) {}
    fn event(&mut self, event: Self::Event) -> impl Future<Output = ()> + Send;
}

/// Follows the stream until `shutdown`; `what` names it in logs.
pub async fn follow<H: Handler>(
    up: &Upstream,
    what: &str,
    mut handler: H,
    shutdown: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut warned = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let mut stream = match up.open_stream(&handler.path()).await {
            Ok(s) => s,
            Err(e) => {
                let wait = match &e {
                    UpstreamError::Refused { status: 404, .. } => {
                        handler.not_served(!warned);
                        NOT_SERVED_RETRY
                    }
                    _ => {
                        if !warned {
                            tracing::warn!(error = %e, "cannot follow {what}; retrying");
                        }
                        backoff
                    }
                };
                warned = true;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        if warned {
            tracing::info!("following {what} again");
            warned = false;
        }
        backoff = FIRST_BACKOFF;
        handler.connected(true);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = tokio::time::timeout(HEARTBEAT * 3, stream.next::<H::Event>()) => n,
            };
            match next {
                Ok(Some(Ok(event))) => handler.event(event).await,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "the {what} stream broke; reconnecting");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!("the {what} stream went silent; reconnecting");
                    break;
                }
            }
        }
        handler.connected(false);
    }
}
