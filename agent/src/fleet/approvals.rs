//! Fleet-wide approvals: a request waiting for a human on any node can be
//! decided from one place, the Kubernetes API, with kubectl under RBAC.
//!
//! * **Nodes** hand their pending approvals to the authority
//!   (`POST /v1/approvals`, whenever the set changes) and follow the
//!   decisions made for them (`GET /v1/approvals/decisions`, one stream to
//!   whichever replica answers); a decision is applied as the operator
//!   socket applies one, and audited once on the node with the operator's
//!   identity. The node-local operator socket keeps working; whichever
//!   decides first wins.
//! * **Replicas** keep each pending approval as an `ApprovalRequest` object
//!   (`tessera.dev/v1alpha1`, in the authority's namespace, named by a hash
//!   of node and approval id) holding what would be issued, and watch them.
//!   An operator decides by setting `spec.decision` (`approved` or `denied`)
//!   and `spec.decidedBy` to their own user name; the chart's
//!   ValidatingAdmissionPolicy makes the API server refuse a `decidedBy` that
//!   is not the requesting user, a second decision, or a change of the
//!   request. The decision reaches the node's stream as soon as a replica's
//!   watch delivers it. Objects past their deadline are deleted.
//!
//! RBAC: `create`, `list`, `watch`, `delete` on `approvalrequests` in the
//! authority's namespace; operators need `get`, `list` and `patch`.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::client::{Upstream, UpstreamError};
use super::feed::HEARTBEAT;
use super::informer::{self, Change};
use super::kube::KubeClient;
use super::wire::{ApprovalDecision, ApprovalsRequest, DecisionEvent, PendingApproval};
use crate::clock::{Clock, unix_seconds};
use crate::sync::{Mutex, RwLock};

const GROUP: &str = "tessera.dev";
const VERSION: &str = "v1alpha1";
const PLURAL: &str = "approvalrequests";
/// Most pending approvals one node hands over at once.
pub const MAX_PENDING: usize = 4096;

/// The object name for `node`'s approval `id`.
pub fn object_name(node: &str, id: &str) -> String {
    let h = crate::audit::sha256_hex(format!("{node}/{id}").as_bytes());
    format!("apr-{}", &h[..32])
}

/// A decision as an object carries it, for `node`.
fn decision_of(obj: &Value) -> Option<(String, ApprovalDecision)> {
    let spec = &obj["spec"];
    let approve = match spec["decision"].as_str()? {
        "approved" => true,
        "denied" => false,
        _ => return None,
    };
    let by = spec["decidedBy"].as_str().filter(|b| !b.is_empty())?;
    Some((
        spec["node"].as_str()?.to_string(),
        ApprovalDecision {
            id: spec["approvalId"].as_str()?.to_string(),
            approve,
            by: format!("k8s:{by}"),
        },
    ))
}

/// One replica's view of the approvals kept in the API.
pub struct FleetApprovals {
    kube: Arc<KubeClient>,
    namespace: String,
    /// Object name -> (node, decision), for decided ones.
    decided: RwLock<HashMap<String, (String, ApprovalDecision)>>,
    /// Objects this replica knows exist (created here or seen).
    known: Mutex<HashSet<String>>,
    tx: broadcast::Sender<(String, ApprovalDecision)>,
}

impl FleetApprovals {
    pub fn start(
        kube: Arc<KubeClient>,
        namespace: String,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        for verb in ["create", "list", "watch", "delete"] {
            kube.also_need(verb, GROUP, PLURAL, &namespace);
        }
        let this = Arc::new(Self {
            kube,
            namespace,
            decided: RwLock::default(),
            known: Mutex::default(),
            tx: broadcast::channel(1024).0,
        });
        let watcher = this.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let collection = watcher.collection();
            informer::run(&watcher.kube, &collection, PLURAL, &sd, |change| {
                let seen = |obj: &Value| {
                    let Some(name) = obj["metadata"]["name"].as_str() else {
                        return;
                    };
                    watcher.known.lock().insert(name.to_string());
                    if let Some((node, d)) = decision_of(obj) {
                        let new = watcher
                            .decided
                            .write()
                            .insert(name.to_string(), (node.clone(), d.clone()))
                            .is_none();
                        if new {
                            tracing::info!(node, approval_id = %d.id, by = %d.by, approved = d.approve, "approval decided in the Kubernetes API");
                            let _ = watcher.tx.send((node, d));
                        }
                    }
                };
                match change {
                    Change::Reset(items) => items.iter().for_each(seen),
                    Change::Upsert(obj) => seen(&obj),
                    Change::Delete(obj) => {
                        if let Some(name) = obj["metadata"]["name"].as_str() {
                            watcher.decided.write().remove(name);
                            watcher.known.lock().remove(name);
                        }
                    }
                    Change::Synced => {}
                }
            })
            .await;
        });
        let collector = this.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                if let Err(e) = collector.collect_expired(unix_seconds(clock.now())).await {
                    tracing::warn!(error = %e, "could not delete expired ApprovalRequests; retrying later");
                }
            }
        });
        this
    }

    fn collection(&self) -> String {
        format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{}/{PLURAL}",
            self.namespace
        )
    }

    /// Keeps `node`'s pending approvals as objects (those not there yet).
    pub async fn publish(
        &self,
        node: &str,
        pending: Vec<PendingApproval>,
    ) -> Result<usize, String> {
        let mut created = 0;
        for p in pending {
            let name = object_name(node, &p.id);
            if self.known.lock().contains(&name) {
                continue;
            }
            let r = &p.request;
            let body = json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "ApprovalRequest",
                "metadata": {"name": name},
                "spec": {
                    "node": node,
                    "approvalId": p.id,
                    "deadline": p.deadline,
                    "caller": r["caller"],
                    "principal": r["principal"],
                    "audience": r["audience"],
                    "scopes": r["scopes"],
                    "ttlSeconds": r["ttl_seconds"],
                    "taskId": r["task_id"],
                    "delegationChain": r["delegation_chain"],
                    "mayAct": r["may_act"],
                    "policyIds": r["policy_ids"],
                },
            });
            match self
                .kube
                .json(
                    hyper::Method::POST,
                    &self.collection(),
                    "application/json",
                    Some(&body),
                )
                .await
            {
                Ok(_) => created += 1,
                Err(e) if e.status == Some(409) => {}
                Err(e) => return Err(e.message),
            }
            self.known.lock().insert(name);
        }
        Ok(created)
    }

    /// `GET /v1/approvals/decisions`: every decision for `node` the replica
    /// knows, then each new one, with heartbeats; open until the node SVID
    /// expires (`not_after`), the node leaves or the authority stops.
    pub fn stream(
        &self,
        node: String,
        not_after: SystemTime,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Response {
        let mut rx = self.tx.subscribe();
        let known: Vec<ApprovalDecision> = self
            .decided
            .read()
            .values()
            .filter(|(n, _)| *n == node)
            .map(|(_, d)| d.clone())
            .collect();
        let (tx, out) = mpsc::channel::<Result<Bytes, Infallible>>(16);
        tokio::spawn(async move {
            // The token is the stream's own: ending here releases what waits on it.
            let _ended = shutdown.clone().drop_guard();
            let expired = tokio::time::sleep(
                not_after
                    .duration_since(clock.now())
                    .unwrap_or(Duration::ZERO),
            );
            tokio::pin!(expired);
            let send = |event: &DecisionEvent| {
                let mut line = serde_json::to_vec(event).unwrap_or_default();
                line.push(b'\n');
                tx.send(Ok(Bytes::from(line)))
            };
            for d in known {
                if send(&DecisionEvent {
                    decision: Some(d),
                    heartbeat: false,
                })
                .await
                .is_err()
                {
                    return;
                }
            }
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut expired => return,
                    _ = tx.closed() => return,
                    next = rx.recv() => match next {
                        Ok((n, d)) if n == node => DecisionEvent { decision: Some(d), heartbeat: false },
                        Ok(_) => continue,
                        // Fell behind: end the stream; the node reconnects
                        // and gets every decision again.
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(HEARTBEAT) => DecisionEvent { decision: None, heartbeat: true },
                };
                if send(&event).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(out),
            ))
            .unwrap_or_default()
    }

    async fn collect_expired(&self, now: u64) -> Result<(), String> {
        let list = self
            .kube
            .json(
                hyper::Method::GET,
                &self.collection(),
                "application/json",
                None,
            )
            .await
            .map_err(|e| e.message)?;
        for obj in list["items"].as_array().into_iter().flatten() {
            if obj["spec"]["deadline"].as_u64().unwrap_or(0) + 60 > now {
                continue;
            }
            let Some(name) = obj["metadata"]["name"].as_str() else {
                continue;
            };
            match self
                .kube
                .json(
                    hyper::Method::DELETE,
                    &format!("{}/{name}", self.collection()),
                    "application/json",
                    None,
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.status == Some(404) => {}
                Err(e) => return Err(e.message),
            }
        }
        Ok(())
    }
}

/// What a node's exchange offers the fleet: its pending approvals, and a
/// way to apply a decision (audited there, once).
pub trait LocalApprovals: Send + Sync + 'static {
    fn pending(&self) -> Vec<PendingApproval>;
    fn decide(&self, decision: ApprovalDecision) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// How often a node looks for new pending approvals to hand over.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// A node's side: hands its pending approvals to the authority and applies
/// the decisions made for them, until `shutdown`.
pub fn follow(up: Arc<Upstream>, local: Arc<dyn LocalApprovals>, shutdown: CancellationToken) {
    let (pup, plocal, psd) = (up.clone(), local.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut handed: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                _ = psd.cancelled() => return,
                _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            }
            let mut pending = plocal.pending();
            pending.truncate(MAX_PENDING);
            let ids: Vec<String> = pending.iter().map(|p| p.id.clone()).collect();
            if ids.is_empty() || ids == handed {
                handed = ids;
                continue;
            }
            let sent: Result<Value, _> = pup
                .call("/v1/approvals", Some(&ApprovalsRequest { pending }), true)
                .await;
            match sent {
                Ok(_) => handed = ids,
                Err(UpstreamError::Refused { status: 404, .. }) => {
                    tokio::select! {
                        _ = psd.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pending approvals not handed to the fleet yet; retrying")
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let mut stream = match up.open_stream("/v1/approvals/decisions").await {
                Ok(s) => s,
                Err(e) => {
                    let wait = match e {
                        UpstreamError::Refused { status: 404, .. } => Duration::from_secs(60),
                        _ => backoff,
                    };
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = tokio::time::timeout(HEARTBEAT * 3, stream.next::<DecisionEvent>()) => n,
                };
                match next {
                    Ok(Some(Ok(DecisionEvent {
                        decision: Some(d), ..
                    }))) => local.decide(d).await,
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
        }
    });
}
