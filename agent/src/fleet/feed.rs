//! The authority's side of fleet-wide revocation: nodes hand it what they
//! revoked (`POST /v1/revocations`, answered once the store holds it), and
//! each node keeps one stream open (`GET /v1/stream?cursor=N`) on which the
//! replica sends, as newline-delimited JSON, every stored batch after the
//! node's cursor, then a `synced` marker, then each new batch as its
//! backend's watch delivers it, and a heartbeat when idle.
//!
//! Streams read the replica's [`View`]; nothing here talks to the store.
//! [`ndjson_stream`] is every node stream's body (this one, decisions,
//! live entries): how it is written and when it ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use hyper::body::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::store::View;
use super::wire::StreamEvent;
use crate::clock::{Clock, unix_seconds};
use crate::revocation::Record;

/// Most revocations one node may hand over in one request.
pub const MAX_REVOCATIONS_PER_REQUEST: usize = 10_000;
/// Most records in one stream message.
const MAX_PER_MESSAGE: usize = 5_000;
/// A stream with nothing to say sends a heartbeat this often, so a node
/// notices a dead connection.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Checks what a node hands over: ids as a local revocation checks them, and
/// no entry kept longer than any token the authority signs can live (a
/// longer `until` is cut to that: the entry can matter no longer).
pub fn admit(
    records: Vec<Record>,
    now: SystemTime,
    max_token_ttl: Duration,
) -> Result<Vec<Record>, String> {
    if records.len() > MAX_REVOCATIONS_PER_REQUEST {
        return Err(format!(
            "at most {MAX_REVOCATIONS_PER_REQUEST} revocations per request"
        ));
    }
    let now = unix_seconds(now);
    let cap = now + max_token_ttl.as_secs() + 120;
    let mut out = Vec::with_capacity(records.len());
    for (i, mut r) in records.into_iter().enumerate() {
        r.validate().map_err(|e| format!("revocations[{i}]: {e}"))?;
        if r.until <= now {
            continue;
        }
        r.until = r.until.min(cap);
        out.push(r);
    }
    Ok(out)
}

/// The node stream, open until the node leaves, its certificate expires
/// (`not_after`) or the authority stops.
pub fn stream(
    view: Arc<View>,
    cursor: u64,
    not_after: SystemTime,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Response {
    ndjson_stream(8, not_after, clock, shutdown, move |mut out| async move {
        let mut cursor = cursor;
        let mut latest = view.subscribe();
        let mut synced_sent = false;
        loop {
            latest.borrow_and_update();
            loop {
                let batches = view.after(cursor, MAX_PER_MESSAGE);
                let Some(last) = batches.last() else { break };
                cursor = last.cursor;
                let event = StreamEvent {
                    cursor,
                    revocations: batches
                        .iter()
                        .flat_map(|b| b.records.iter().cloned())
                        .collect(),
                    ..StreamEvent::default()
                };
                if out.send(&event).await.is_err() {
                    return;
                }
            }
            if !synced_sent && view.is_synced() {
                synced_sent = true;
                let event = StreamEvent {
                    cursor,
                    synced: true,
                    ..StreamEvent::default()
                };
                if out.send(&event).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = out.ended() => return,
                changed = latest.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(HEARTBEAT) => {
                    let event = StreamEvent { cursor, heartbeat: true, ..StreamEvent::default() };
                    if out.send(&event).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// The node hung up: its stream's body has nowhere to write.
#[derive(Debug)]
pub struct Gone;

/// The writing end of a node's stream ([`ndjson_stream`]): one JSON
/// document a line, and the events that end the stream.
pub struct Ndjson {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    expired: Pin<Box<tokio::time::Sleep>>,
    shutdown: CancellationToken,
}

impl Ndjson {
    /// Writes `event` as one line; waits while the node is behind.
    pub async fn send<T: Serialize>(&self, event: &T) -> Result<(), Gone> {
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        self.tx.send(Ok(Bytes::from(line))).await.map_err(|_| Gone)
    }

    /// Resolves once the stream is to end: the authority stops or the node
    /// leaves (the stream's token), the node's certificate expires, or the
    /// node hangs up. Meant as a branch of the body's `select!` while it
    /// waits for something to send.
    pub async fn ended(&mut self) {
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = self.expired.as_mut() => {}
            _ = self.tx.closed() => {}
        }
    }
}

/// A streaming `application/x-ndjson` answer to a node, written by `body`
/// on its own task, open until the body returns. A stream ends when
/// `shutdown` is cancelled (the authority stops or the node leaves) or when
/// the node's certificate expires (`not_after`): a node must come back with
/// a fresh one. `shutdown` is the stream's own token: it is cancelled when
/// the body returns, which releases whatever waits on it. `capacity` is how
/// many lines may wait for a slow node.
pub fn ndjson_stream<F, Fut>(
    capacity: usize,
    not_after: SystemTime,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    body: F,
) -> Response
where
    F: FnOnce(Ndjson) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(capacity);
    tokio::spawn(async move {
        let _ended = shutdown.clone().drop_guard();
        let until_expiry = not_after
            .duration_since(clock.now())
            .unwrap_or(Duration::ZERO);
        let out = Ndjson {
            tx,
            expired: Box::pin(tokio::time::sleep(until_expiry)),
            shutdown,
        };
        body(out).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::Kind;

    #[test]
    fn what_a_node_hands_over_is_checked_and_bounded() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let rec = |id: &str, until: u64| Record {
            k: Kind::Jti,
            id: id.into(),
            until,
        };
        let ttl = Duration::from_secs(3600);
        let out = admit(
            vec![rec("a", 11_000), rec("old", 9_000), rec("far", 99_999)],
            now,
            ttl,
        )
        .unwrap();
        assert_eq!(out.len(), 2, "expired ones are dropped");
        assert_eq!(
            out[1].until,
            10_000 + 3600 + 120,
            "cut to the longest token"
        );
        let err = admit(vec![rec("", 11_000)], now, ttl).unwrap_err();
        assert!(err.contains("revocations[0]"), "{err}");
        let many = vec![rec("x", 11_000); MAX_REVOCATIONS_PER_REQUEST + 1];
        assert!(admit(many, now, ttl).is_err());
    }
}
