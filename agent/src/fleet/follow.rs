//! The node's side of fleet-wide revocation.
//!
//! * **Publishing.** Every revocation made here (already durable in the
//!   node's own file) is handed to the authority (`POST /v1/revocations`,
//!   batched for a few milliseconds) until a replica confirms the fleet's
//!   store holds it; while none can, it is retried. After a restart the
//!   node hands over again everything it revoked that is still live (the
//!   store ignores what it already has).
//! * **Following.** One stream (`GET /v1/stream`) to whichever replica
//!   answers delivers every revocation of the fleet into this node's
//!   [`RevocationStore`], in memory: the store keeps them durably, and a
//!   restarted node gets them all again before it reports ready. The stream
//!   resumes from the store's cursor on any replica.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::client::{Upstream, UpstreamError};
use super::subscribe::{self, Handler};
use super::wire::{RevocationsAccepted, RevocationsRequest, StreamEvent};
use crate::metrics::Metrics;
use crate::revocation::{Record, RevocationStore};

/// Revocations gathered into one request at most.
const MAX_PER_REQUEST: usize = 5_000;
/// How long the publisher waits for more before sending.
const GATHER: Duration = Duration::from_millis(10);
/// Revocations kept while no replica takes them; beyond it the oldest are
/// dropped from the queue (they stay in force on this node, and in its file).
const MAX_QUEUED: usize = 200_000;

/// Starts publishing and following; the receiver turns true once the first
/// stream has delivered everything the store held.
pub fn start(
    up: Arc<Upstream>,
    store: Arc<RevocationStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = store.set_outbox(tx, up.now());
    if !backlog.is_empty() {
        tracing::info!(
            revocations = backlog.len(),
            "handing this node's live revocations to the fleet again"
        );
    }
    let (synced_tx, synced_rx) = watch::channel(false);
    up.set_revocations_synced(false);
    tokio::spawn(publish(
        up.clone(),
        backlog,
        rx,
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(follow(up, store, synced_tx, metrics, shutdown));
    synced_rx
}

async fn publish(
    up: Arc<Upstream>,
    mut pending: Vec<Record>,
    mut rx: mpsc::UnboundedReceiver<Record>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut warned = false;
    loop {
        if pending.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => pending.push(r),
                    None => return,
                },
            }
            let deadline = tokio::time::Instant::now() + GATHER;
            while pending.len() < MAX_PER_REQUEST {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => pending.push(r),
                    _ => break,
                }
            }
        }
        let n = pending.len().min(MAX_PER_REQUEST);
        let request = RevocationsRequest {
            revocations: pending[..n].to_vec(),
        };
        let sent: Result<RevocationsAccepted, _> =
            up.call("/v1/revocations", Some(&request), true).await;
        match sent {
            Ok(_) => {
                metrics.fleet_revocations_published.inc_by(n as u64);
                pending.drain(..n);
                backoff = Duration::from_millis(200);
                if warned {
                    tracing::info!("revocations reach the fleet again");
                    warned = false;
                }
                continue;
            }
            // No fleet state on this authority (404), or records it will
            // never take (400): they hold on this node only; retrying
            // cannot change the answer.
            Err(UpstreamError::Refused {
                status: status @ (400 | 404),
                message,
            }) => {
                if status == 404 {
                    tracing::debug!(
                        dropped = n,
                        "the authority keeps no fleet state; revocations hold on this node only"
                    );
                } else {
                    tracing::error!(dropped = n, error = %message, "the authority refused revocations made here; they hold on this node only");
                }
                pending.drain(..n);
                continue;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, queued = pending.len(), "revocations made here have not reached the fleet yet; retrying (they are in force on this node)");
                    warned = true;
                }
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                while let Ok(r) = rx.try_recv() {
                    pending.push(r);
                }
                if pending.len() > MAX_QUEUED {
                    let drop = pending.len() - MAX_QUEUED;
                    tracing::error!(
                        dropped = drop,
                        "too many revocations waiting for the fleet; the oldest will only hold on this node"
                    );
                    pending.drain(..drop);
                }
            }
        }
    }
}

/// Applies the fleet's revocations to this node's store, resuming from the
/// cursor the stream last sent.
struct Revocations {
    up: Arc<Upstream>,
    store: Arc<RevocationStore>,
    synced: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    cursor: u64,
}

impl Handler for Revocations {
    type Event = StreamEvent;

    fn path(&self) -> String {
        format!("/v1/stream?cursor={}", self.cursor)
    }

    fn not_served(&mut self, first: bool) {
        if first {
            tracing::warn!(
                "the fleet authority keeps no fleet state ([server.store] is not set): revocations on other nodes are not seen here"
            );
        }
        // Nothing to wait for: report ready without it.
        self.up.set_revocations_synced(true);
        self.synced.send_replace(true);
    }

    fn connected(&mut self, open: bool) {
        self.metrics.fleet_stream_connected.set(i64::from(open));
    }

    async fn event(&mut self, event: StreamEvent) {
        if !event.revocations.is_empty() {
            let applied = self.store.apply_remote(&event.revocations, self.up.now());
            self.metrics
                .fleet_revocations_received
                .inc_by(event.revocations.len() as u64);
            tracing::debug!(
                received = event.revocations.len(),
                applied,
                "fleet revocations"
            );
        }
        self.cursor = self.cursor.max(event.cursor);
        if event.synced && !*self.synced.borrow() {
            tracing::info!(revocations = self.store.len(), "fleet revocations loaded");
            self.up.set_revocations_synced(true);
            self.synced.send_replace(true);
        }
    }
}

async fn follow(
    up: Arc<Upstream>,
    store: Arc<RevocationStore>,
    synced: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let handler = Revocations {
        up: up.clone(),
        store,
        synced,
        metrics,
        cursor: 0,
    };
    subscribe::follow(&up, "the fleet's revocations", handler, shutdown).await;
}
