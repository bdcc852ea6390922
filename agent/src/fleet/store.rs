//! The fleet's shared state: revocations (and, through the same backends,
//! the rest of what the replicas must agree on), kept in a distributed store
//! that already exists where the fleet runs. No replica talks to another;
//! each writes to the store and learns everything, its own writes included,
//! from the store's change feed.
//!
//! * [`crd`]: the Kubernetes API, custom resources in the authority's
//!   namespace, watched.
//! * [`postgres`]: a PostgreSQL database, polled and woken by
//!   `LISTEN`/`NOTIFY`, for fleets outside Kubernetes.
//!
//! Revocations are written in **batches**: a replica gathers what nodes hand
//! it for up to `batch_window` (or until a batch is full) and writes them as
//! one object or row, bounded in size ([`MAX_BATCH`] entries), carrying the
//! time its last entry stops mattering. Expired batches are deleted by every
//! replica's collector (deleting twice is harmless). The store's own order
//! (the Kubernetes resource version, the row's sequence number) is the
//! **cursor** a node resumes from on any replica.
//!
//! Each replica keeps a [`View`] of the live batches, fed by its backend, and
//! streams it to the nodes attached to it; the view also holds every live
//! revocation in a memory-only [`RevocationStore`], which the authority's own
//! introspection paths read.

pub mod crd;
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, unix_seconds};
use crate::revocation::{Record, RevocationStore};
use crate::sync::RwLock;

/// The `[server.store]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Where the fleet's state lives (`kind`).
    pub kind: StoreKind,
    /// `kubernetes`: the namespace of the custom resources (the authority's).
    pub namespace: String,
    /// `postgres`: how to reach the database.
    pub database: Option<postgres::DatabaseConfig>,
    /// How long a replica gathers revocations before writing them as one
    /// batch.
    pub batch_window: Duration,
    /// Keep nodes' pending approvals as `ApprovalRequest` objects operators
    /// decide (needs the chart's ValidatingAdmissionPolicy, which vouches
    /// for `decidedBy`).
    pub approvals: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Custom resources in the Kubernetes API ([`crd`]).
    Kubernetes,
    /// Tables in a PostgreSQL database ([`postgres`]).
    Postgres,
}

/// Most revocations in one stored batch (about 150 bytes each in JSON: a
/// batch stays far below etcd's 1.5 MiB object limit).
pub const MAX_BATCH: usize = 1000;

/// How long after its last entry expired a batch is deleted (clock skew
/// between replicas and nodes).
pub const EXPIRY_SLACK: Duration = Duration::from_secs(60);

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time: retry.
    #[error("the fleet store is unavailable: {0}")]
    Unavailable(String),
    /// The store answered and refused (a missing CRD, a permission).
    #[error("the fleet store refused: {0}")]
    Refused(String),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A distributed store the replicas share.
pub trait Backend: Send + Sync + 'static {
    /// `kubernetes` or `postgres`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Writes one batch (at most [`MAX_BATCH`] records) as one object or row.
    fn write_batch<'a>(&'a self, records: &'a [Record], expires: u64) -> StoreFuture<'a, ()>;

    /// Deletes the stored batches `view` knows to have expired before `now`
    /// (unix seconds, slack already applied); returns how many requests it
    /// made.
    fn collect_expired<'a>(&'a self, view: &'a View, now: u64) -> StoreFuture<'a, usize>;

    /// Feeds `view` with the store's content and every later change, until
    /// `shutdown`; reconnects by itself.
    fn run(
        self: Arc<Self>,
        view: Arc<View>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// One stored batch as a replica knows it.
#[derive(Debug)]
pub struct Batch {
    /// The store's order: the position a node resumes after.
    pub cursor: u64,
    /// The object's name or the row's key, to delete it.
    pub name: String,
    /// Unix seconds after which no entry matters.
    pub expires: u64,
    pub records: Vec<Record>,
}

/// What a replica knows of the fleet's revocations, kept current by its
/// backend; nodes' streams read it.
pub struct View {
    /// Every live revocation of the fleet (memory only): what the authority's
    /// introspection paths consult.
    pub revocations: Arc<RevocationStore>,
    batches: RwLock<Batches>,
    synced: AtomicBool,
    /// The highest cursor seen; streams wake when it moves.
    latest: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct Batches {
    by_cursor: BTreeMap<u64, Arc<Batch>>,
    by_name: HashMap<String, u64>,
}

impl View {
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            revocations: Arc::new(RevocationStore::memory()),
            batches: RwLock::default(),
            synced: AtomicBool::new(false),
            latest: watch::Sender::new(0),
            clock,
        })
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The store's whole content (after a list): anything else is gone.
    pub fn reset(&self, batches: Vec<Batch>) {
        let mut fresh = Batches::default();
        for b in batches {
            self.revocations.apply_remote(&b.records, self.now());
            fresh.by_name.insert(b.name.clone(), b.cursor);
            fresh.by_cursor.insert(b.cursor, Arc::new(b));
        }
        let top = fresh.by_cursor.keys().next_back().copied().unwrap_or(0);
        *self.batches.write() = fresh;
        self.advance(top);
    }

    /// A batch was written (by any replica).
    pub fn add(&self, batch: Batch) {
        self.revocations.apply_remote(&batch.records, self.now());
        let cursor = batch.cursor;
        {
            let mut b = self.batches.write();
            if let Some(old) = b.by_name.insert(batch.name.clone(), cursor) {
                b.by_cursor.remove(&old);
            }
            b.by_cursor.insert(cursor, Arc::new(batch));
        }
        self.advance(cursor);
    }

    /// A batch was deleted (it had expired).
    pub fn remove(&self, name: &str) {
        let mut b = self.batches.write();
        if let Some(c) = b.by_name.remove(name) {
            b.by_cursor.remove(&c);
        }
    }

    /// The backend has delivered everything the store held when it started.
    pub fn mark_synced(&self) {
        if !self.synced.swap(true, Ordering::AcqRel) {
            tracing::info!(
                batches = self.batches.read().by_cursor.len(),
                revocations = self.revocations.len(),
                "fleet revocations loaded from the store"
            );
        }
        self.latest.send_modify(|_| {});
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn advance(&self, cursor: u64) {
        self.latest.send_if_modified(|c| {
            if cursor > *c {
                *c = cursor;
                true
            } else {
                false
            }
        });
    }

    /// Wakes on every new batch (and on sync).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// The live batches after `cursor`, in order, up to about `max_records`
    /// records (always at least one batch if there is one).
    pub fn after(&self, cursor: u64, max_records: usize) -> Vec<Arc<Batch>> {
        let now = unix_seconds(self.now());
        let b = self.batches.read();
        let mut out = Vec::new();
        let mut n = 0;
        for (_, batch) in b.by_cursor.range(cursor.saturating_add(1)..) {
            if batch.expires <= now {
                continue;
            }
            if !out.is_empty() && n + batch.records.len() > max_records {
                break;
            }
            n += batch.records.len();
            out.push(batch.clone());
        }
        out
    }

    /// Names of the batches whose entries all expired before `before`.
    pub fn expired(&self, before: u64) -> Vec<(String, u64)> {
        self.batches
            .read()
            .by_cursor
            .values()
            .filter(|b| b.expires < before)
            .map(|b| (b.name.clone(), b.expires))
            .collect()
    }

    /// Batches known (live and not yet collected).
    pub fn batch_count(&self) -> usize {
        self.batches.read().by_cursor.len()
    }
}

/// A request to make revocations fleet-wide, answered once they are stored.
struct Pending {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Gathers revocations from every node attached to this replica and writes
/// them in batches.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Pending>,
}

/// Revocations waiting to be written, at most (beyond it nodes are told to
/// retry: the store is not keeping up).
const QUEUE: usize = 4096;

impl Writer {
    /// Starts the batching task.
    pub fn start(
        backend: Arc<dyn Backend>,
        view: Arc<View>,
        window: Duration,
        metrics: StoreMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(backend, view, window, metrics, rx, shutdown));
        Self { tx }
    }

    /// Makes `records` fleet-wide; returns once they are in the store.
    pub async fn revoke(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.try_send(Pending { records, done }).map_err(|_| {
            StoreError::Unavailable("too many revocations waiting to be stored; retry".into())
        })?;
        wait.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the authority is stopping".into())))
    }
}

/// Counters of what the store was asked (`op`: `write`, `collect`, `list`,
/// `watch`) and how it went.
#[derive(Clone, Default)]
pub struct StoreMetrics {
    pub requests: prometheus_client::metrics::family::Family<
        StoreLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub revocations_written: prometheus_client::metrics::counter::Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StoreLabels {
    pub op: &'static str,
    pub result: &'static str,
}

impl StoreMetrics {
    pub fn count(&self, op: &'static str, ok: bool) {
        self.requests
            .get_or_create(&StoreLabels {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}

async fn write_loop(
    backend: Arc<dyn Backend>,
    view: Arc<View>,
    window: Duration,
    metrics: StoreMetrics,
    mut rx: mpsc::Receiver<Pending>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = rx.recv() => match p { Some(p) => p, None => return },
        };
        let mut waiting = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        let mut count = waiting[0].records.len();
        while count < MAX_BATCH * 4 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => {
                    count += p.records.len();
                    waiting.push(p);
                }
                _ => break,
            }
        }
        // One entry per revocation, the longest `until` winning; what the
        // store already holds (another node said it first) is not written
        // again.
        let mut merged: HashMap<(crate::revocation::Kind, String), u64> = HashMap::new();
        for p in &waiting {
            for r in &p.records {
                let slot = merged.entry((r.k, r.id.clone())).or_insert(r.until);
                *slot = (*slot).max(r.until);
            }
        }
        let records: Vec<Record> = merged
            .into_iter()
            .map(|((k, id), until)| Record { k, id, until })
            .filter(|r| !view.revocations.covers(r))
            .collect();
        let mut result = Ok(());
        for chunk in records.chunks(MAX_BATCH) {
            let expires = chunk.iter().map(|r| r.until).max().unwrap_or(0);
            let written = backend.write_batch(chunk, expires).await;
            metrics.count("write", written.is_ok());
            match written {
                Ok(()) => {
                    metrics.revocations_written.inc_by(chunk.len() as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = chunk.len(), "could not store revocations; the nodes will retry");
                    result = Err(e);
                    break;
                }
            }
        }
        for p in waiting {
            let _ = p.done.send(result.clone());
        }
    }
}

/// How often every replica deletes what expired from the store (each does;
/// deleting twice is harmless).
const COLLECT_EVERY: Duration = Duration::from_secs(60);

/// Starts what a replica runs for one part of the fleet's state: `follow`,
/// which hands the store's content and changes to the replica's view, and
/// `collect`, which deletes what expired, about once a minute; both until
/// `shutdown`.
pub fn follow_and_collect<C, F>(
    follow: impl Future<Output = ()> + Send + 'static,
    shutdown: CancellationToken,
    mut collect: C,
) where
    C: FnMut() -> F + Send + 'static,
    F: Future<Output = ()> + Send,
{
    tokio::spawn(follow);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(COLLECT_EVERY) => {}
            }
            collect().await;
        }
    });
}

/// Deletes the batches expired by now (with [`EXPIRY_SLACK`]).
async fn collect_garbage(
    backend: Arc<dyn Backend>,
    view: Arc<View>,
    clock: Arc<dyn Clock>,
    metrics: StoreMetrics,
) {
    let now = unix_seconds(clock.now()).saturating_sub(EXPIRY_SLACK.as_secs());
    if view.expired(now).is_empty() {
        return;
    }
    match backend.collect_expired(&view, now).await {
        Ok(n) => {
            for _ in 0..n {
                metrics.count("collect", true);
            }
        }
        Err(e) => {
            metrics.count("collect", false);
            tracing::warn!(error = %e, "could not delete expired revocation batches; retrying later");
        }
    }
    view.revocations.prune(clock.now()).ok();
}

/// What one authority replica runs for the fleet's state: the view its
/// backend keeps current, the batching writer and the collector.
pub struct FleetState {
    pub view: Arc<View>,
    pub writer: Writer,
    pub backend: &'static str,
}

impl FleetState {
    /// Starts following `backend`, writing to it and collecting its expired
    /// batches, until `shutdown`.
    pub fn start(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        window: Duration,
        metrics: StoreMetrics,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let view = View::new(clock.clone());
        let (collector, collected, counted) = (backend.clone(), view.clone(), metrics.clone());
        follow_and_collect(
            backend.clone().run(view.clone(), shutdown.clone()),
            shutdown.clone(),
            move || {
                collect_garbage(
                    collector.clone(),
                    collected.clone(),
                    clock.clone(),
                    counted.clone(),
                )
            },
        );
        let writer = Writer::start(backend.clone(), view.clone(), window, metrics, shutdown);
        let kind = backend.kind();
        Arc::new(Self {
            view,
            writer,
            backend: kind,
        })
    }
}
