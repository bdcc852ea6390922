//! The authority's side of fleet-wide revocation: nodes hand it what they
//! revoked (`POST /v1/revocations`, answered once the store holds it), and
//! each node keeps one stream open (`GET /v1/stream?cursor=N`) on which the
//! replica sends, as newline-delimited JSON, every stored batch after the
//! node's cursor, then a `synced` marker, then each new batch as its
//! backend's watch delivers it, and a heartbeat when idle.
//!
//! Streams read the replica's [`View`]; nothing here talks to the store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use hyper::body::Bytes;
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
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(8);
    tokio::spawn(async move {
        // The token is the stream's own: ending here releases what waits on it.
        let _ended = shutdown.clone().drop_guard();
        let mut cursor = cursor;
        let mut latest = view.subscribe();
        let mut synced_sent = false;
        let until_expiry = not_after
            .duration_since(clock.now())
            .unwrap_or(Duration::ZERO);
        let expired = tokio::time::sleep(until_expiry);
        tokio::pin!(expired);
        let send = |event: &StreamEvent| {
            let mut line = serde_json::to_vec(event).unwrap_or_default();
            line.push(b'\n');
            tx.send(Ok(Bytes::from(line)))
        };
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
                if send(&event).await.is_err() {
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
                if send(&event).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut expired => return,
                _ = tx.closed() => return,
                changed = latest.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(HEARTBEAT) => {
                    let event = StreamEvent { cursor, heartbeat: true, ..StreamEvent::default() };
                    if send(&event).await.is_err() {
                        return;
                    }
                }
            }
        }
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
