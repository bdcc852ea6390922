//! List-then-watch of one Kubernetes collection, kept up for as long as the
//! authority runs: through watch timeouts, API-server restarts (the
//! connection drops; the watch resumes from the last resource version seen)
//! and compactions (`410 Gone`: list again). The handler sees every object
//! once per change, in the API server's order.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::kube::KubeClient;

/// What changed in the collection.
#[derive(Debug)]
pub enum Change {
    /// The whole collection, after a (re)list: anything not in it is gone.
    Reset(Vec<Value>),
    /// An object was added or modified.
    Upsert(Value),
    Delete(Value),
    /// The watch is established and everything before it was delivered.
    Synced,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    object: Value,
}

/// A watch that sends nothing for this long (not even a bookmark, which the
/// API server sends about once a minute) is taken for dead.
const IDLE: Duration = Duration::from_secs(150);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn resource_version(obj: &Value) -> Option<String> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Lists `collection` (an API path without query) and then watches it,
/// calling `handle` for every change, until `shutdown`. `what` names the
/// collection in logs.
pub async fn run(
    kube: &KubeClient,
    collection: &str,
    what: &str,
    shutdown: &CancellationToken,
    mut handle: impl FnMut(Change),
) {
    let mut rv: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let sep = if collection.contains('?') { '&' } else { '?' };
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let version = match &rv {
            Some(v) => v.clone(),
            None => match kube
                .json(hyper::Method::GET, collection, "application/json", None)
                .await
            {
                Ok(mut list) => {
                    let version = list["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("0")
                        .to_string();
                    let items = match list["items"].take() {
                        Value::Array(items) => items,
                        _ => Vec::new(),
                    };
                    handle(Change::Reset(items));
                    rv = Some(version.clone());
                    version
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(collection = what, error = %e, "cannot list; retrying");
                        failing = true;
                    }
                    pause(shutdown, &mut backoff).await;
                    continue;
                }
            },
        };
        let path = format!(
            "{collection}{sep}watch=1&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion={version}"
        );
        let mut stream = match kube.watch(&path).await {
            Ok(s) => s,
            Err(e) => {
                if e.status == Some(410) {
                    rv = None;
                } else {
                    // Includes 429 "storage is (re)initializing" right after
                    // a CRD is established, and the API server being away.
                    if !failing {
                        tracing::warn!(collection = what, error = %e, "cannot watch; retrying");
                        failing = true;
                    }
                    pause(shutdown, &mut backoff).await;
                }
                continue;
            }
        };
        if failing {
            tracing::info!(collection = what, "watching again");
            failing = false;
        }
        backoff = Duration::from_millis(100);
        handle(Change::Synced);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = tokio::time::timeout(IDLE, stream.next::<Event>()) => next,
            };
            let event = match next {
                Err(_) => {
                    tracing::debug!(collection = what, "watch idle too long; reconnecting");
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(collection = what, error = %e, "watch broke; reconnecting");
                    break;
                }
                Ok(Some(Ok(event))) => event,
            };
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    rv = resource_version(&event.object).or(rv);
                    handle(Change::Upsert(event.object));
                }
                "DELETED" => {
                    rv = resource_version(&event.object).or(rv);
                    handle(Change::Delete(event.object));
                }
                "BOOKMARK" => rv = resource_version(&event.object).or(rv),
                _ => {
                    // An `ERROR` event carries a Status; 410: the version we
                    // watch from was compacted away.
                    if event.object["code"].as_u64() == Some(410) {
                        rv = None;
                    } else {
                        tracing::debug!(collection = what, status = %event.object, "watch error; reconnecting");
                    }
                    break;
                }
            }
        }
    }
}

async fn pause(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}
