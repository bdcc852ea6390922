//! The fleet store on the Kubernetes API: `RevocationBatch` custom resources
//! (`tessera.dev/v1alpha1`, namespaced) in the authority's namespace.
//!
//! One object per batch (`generateName: rev-`), immutable once written:
//! `spec.expires` (unix seconds after which no entry matters) and
//! `spec.entries` (at most [`MAX_BATCH`](super::MAX_BATCH) of `{k, id,
//! until}`). The label `tessera.dev/expiry-bucket` (`expires` rounded up to
//! five minutes) lets the collector delete a whole bucket in one request once
//! its time has passed. The object's resource version is the cursor nodes
//! resume from: the API server's watch delivers them in that order, and
//! resource versions are comparable integers (Kubernetes 1.35 and later
//! guarantee it; etcd's revision before that).
//!
//! Writes need `create` and `deletecollection` on `revocationbatches`, reads
//! `list` and `watch`: nothing else (the chart's Role).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Backend, Batch, StoreError, StoreFuture, StoreMetrics, View};
use crate::fleet::informer::{self, Change};
use crate::fleet::kube::{CallError, KubeClient};
use crate::revocation::Record;

pub const GROUP: &str = "tessera.dev";
pub const VERSION: &str = "v1alpha1";
/// Width of an expiry bucket, in seconds.
const BUCKET: u64 = 300;
const BUCKET_LABEL: &str = "tessera.dev/expiry-bucket";

pub struct CrdBackend {
    kube: Arc<KubeClient>,
    namespace: String,
    metrics: StoreMetrics,
    /// This replica (the pod's name), recorded in what it writes.
    writer: String,
}

impl CrdBackend {
    pub fn new(kube: Arc<KubeClient>, namespace: String, metrics: StoreMetrics) -> Self {
        let writer: String = std::env::var("HOSTNAME")
            .unwrap_or_default()
            .chars()
            .take(253)
            .collect();
        Self {
            kube,
            namespace,
            metrics,
            writer,
        }
    }

    fn collection(&self) -> String {
        format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{}/revocationbatches",
            self.namespace
        )
    }
}

fn store_error(e: CallError) -> StoreError {
    match e.status {
        Some(400..=499) if e.status != Some(429) && e.status != Some(408) => {
            StoreError::Refused(e.message)
        }
        _ => StoreError::Unavailable(e.message),
    }
}

fn bucket(expires: u64) -> u64 {
    expires.div_ceil(BUCKET)
}

/// A stored object as a batch, if it is one we can read.
fn batch_of(obj: &Value) -> Option<Batch> {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str()?.to_string();
    let cursor = meta["resourceVersion"].as_str()?.parse::<u64>().ok()?;
    let expires = obj["spec"]["expires"].as_u64()?;
    let records: Vec<Record> = serde_json::from_value(obj["spec"]["entries"].clone()).ok()?;
    Some(Batch {
        cursor,
        name,
        expires,
        records: records
            .into_iter()
            .filter(|r| r.validate().is_ok())
            .collect(),
    })
}

fn read(obj: &Value) -> Option<Batch> {
    let b = batch_of(obj);
    if b.is_none() {
        tracing::warn!(
            name = obj["metadata"]["name"].as_str().unwrap_or_default(),
            "ignoring a RevocationBatch that is not well-formed"
        );
    }
    b
}

impl Backend for CrdBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn write_batch<'a>(&'a self, records: &'a [Record], expires: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let body = json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "RevocationBatch",
                "metadata": {
                    "generateName": "rev-",
                    "labels": {BUCKET_LABEL: bucket(expires).to_string()},
                },
                "spec": {
                    "expires": expires,
                    "count": records.len(),
                    "writer": self.writer,
                    "entries": records,
                },
            });
            self.kube
                .json(
                    hyper::Method::POST,
                    &self.collection(),
                    "application/json",
                    Some(&body),
                )
                .await
                .map(|_| ())
                .map_err(store_error)
        })
    }

    fn collect_expired<'a>(&'a self, view: &'a View, now: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            // Whole buckets whose end has passed: one request each.
            let buckets: BTreeSet<u64> = view
                .expired(now)
                .into_iter()
                .map(|(_, expires)| bucket(expires))
                .filter(|b| b * BUCKET <= now)
                .collect();
            let mut requests = 0;
            for b in buckets {
                let path = format!("{}?labelSelector={BUCKET_LABEL}%3D{b}", self.collection());
                requests += 1;
                self.kube
                    .json(hyper::Method::DELETE, &path, "application/json", None)
                    .await
                    .map_err(store_error)?;
            }
            Ok(requests)
        })
    }

    fn run(
        self: Arc<Self>,
        view: Arc<View>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let collection = self.collection();
            let metrics = self.metrics.clone();
            informer::run(
                &self.kube,
                &collection,
                "revocationbatches",
                &shutdown,
                |change| match change {
                    Change::Reset(items) => {
                        metrics.count("list", true);
                        view.reset(items.iter().filter_map(read).collect());
                    }
                    Change::Upsert(obj) => {
                        if let Some(b) = read(&obj) {
                            view.add(b);
                        }
                    }
                    Change::Delete(obj) => {
                        if let Some(name) = obj["metadata"]["name"].as_str() {
                            view.remove(name);
                        }
                    }
                    Change::Synced => {
                        metrics.count("watch", true);
                        view.mark_synced();
                    }
                },
            )
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_read_as_batches_and_buckets_round_up() {
        let obj = json!({
            "metadata": {"name": "rev-abc", "resourceVersion": "42"},
            "spec": {"expires": 1000, "entries": [
                {"k": "jti", "id": "a", "until": 900},
                {"k": "task", "id": "", "until": 1000},
            ]},
        });
        let b = batch_of(&obj).unwrap();
        assert_eq!(
            (b.cursor, b.name.as_str(), b.expires),
            (42, "rev-abc", 1000)
        );
        assert_eq!(b.records.len(), 1, "an empty id is dropped");
        assert!(batch_of(&json!({"metadata": {"name": "x"}})).is_none());
        assert_eq!(bucket(600), 2);
        assert_eq!(bucket(601), 3);
    }
}
