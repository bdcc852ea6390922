//! Fleet-wide approvals: a request waiting for a human on any node can be
//! decided from one place, the Kubernetes API, with kubectl under RBAC, or
//! at the authority by an operator. Where they are kept is an
//! [`ApprovalStore`]: [`KubeApprovals`] below, or rows in PostgreSQL
//! (`crate::fleet::store::postgres::approvals`); what follows describes the
//! Kubernetes store, which the PostgreSQL one mirrors with rows.
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
//! * **Operators at the authority** ([`super::operator`]): with an
//!   X.509-SVID whose SPIFFE ID `[server] operators` lists, an operator lists
//!   every pending approval and decides one over mTLS
//!   (`tessera approvals ... --authority`). The replica writes the decision
//!   into the object under its own Kubernetes user (which the admission
//!   policy checks as for anyone) with `spec.operator` naming the SVID; the
//!   write is conditional on the object's resource version, so of two
//!   decisions only the first is kept. A node takes `spec.operator` as the
//!   decider only when the object was decided by the authority's own user
//!   (and the admission policy lets no one else set it).
//!
//! RBAC: `create`, `list`, `watch`, `delete` on `approvalrequests` in the
//! authority's namespace, and `get`, `patch` when operators decide at the
//! authority; operators using kubectl need `get`, `list` and `patch`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::client::{Upstream, UpstreamError};
use super::feed::{HEARTBEAT, ndjson_stream};
use super::informer::{self, Change};
use super::kube::KubeClient;
use super::store::follow_and_collect;
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

/// A decision as an object carries it, for `node`. `authority_user` is the
/// replicas' own Kubernetes user: only a decision written by it may name an
/// operator SVID (`spec.operator`); anyone else is who the API server
/// authenticated.
fn decision_of(obj: &Value, authority_user: Option<&str>) -> Option<(String, ApprovalDecision)> {
    let spec = &obj["spec"];
    let approve = match spec["decision"].as_str()? {
        "approved" => true,
        "denied" => false,
        _ => return None,
    };
    let by = spec["decidedBy"].as_str().filter(|b| !b.is_empty())?;
    let by = match spec["operator"].as_str() {
        Some(op) if Some(by) == authority_user && op.starts_with("spiffe://") => op.to_string(),
        _ => format!("k8s:{by}"),
    };
    Some((
        spec["node"].as_str()?.to_string(),
        ApprovalDecision {
            id: spec["approvalId"].as_str()?.to_string(),
            approve,
            by,
        },
    ))
}

/// Why an operator's decision at the authority was not made.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no pending approval {0} is known to the fleet")]
    NotFound(String),
    #[error("approval id {0} is pending on several nodes; name one with --node")]
    Ambiguous(String),
    #[error("approval {id} is decided already ({decision} by {by})")]
    AlreadyDecided {
        id: String,
        decision: String,
        by: String,
    },
    #[error("approval {0} is past its deadline")]
    Expired(String),
    #[error("the Kubernetes API: {0}")]
    Kube(String),
    #[error("the fleet store: {0}")]
    Store(String),
}

/// An object as operators see it at the authority (the node's approval
/// fields, plus the node, the object name and the decision if any).
pub fn listed(obj: &Value) -> Value {
    let spec = &obj["spec"];
    let state = spec["decision"].as_str().unwrap_or("pending");
    json!({
        "name": obj["metadata"]["name"],
        "node": spec["node"],
        "id": spec["approvalId"],
        "state": state,
        "deadline": spec["deadline"],
        "caller": spec["caller"],
        "principal": spec["principal"],
        "audience": spec["audience"],
        "scopes": spec["scopes"],
        "ttl_seconds": spec["ttlSeconds"],
        "task_id": spec["taskId"],
        "delegation_chain": spec["delegationChain"],
        "may_act": spec["mayAct"],
        "policy_ids": spec["policyIds"],
        "decided_by": spec["decidedBy"],
        "operator": spec["operator"],
    })
}

/// The spec fields of `node`'s pending approval `p`, as an `ApprovalRequest`
/// object holds them (and a PostgreSQL row's `request` column).
pub fn spec_of(node: &str, p: &PendingApproval) -> Value {
    let r = &p.request;
    json!({
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
    })
}

pub type ApprovalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the fleet's pending approvals are kept: `ApprovalRequest` objects
/// ([`KubeApprovals`]) or rows of a PostgreSQL table
/// (`crate::fleet::store::postgres::approvals`). Every store hands what it
/// holds to [`FleetApprovals`] in the shape of an `ApprovalRequest` object.
pub trait ApprovalStore: Send + Sync + 'static {
    /// Keeps `node`'s pending approval `p` as `name`; `false` when it is
    /// there already.
    fn create<'a>(
        &'a self,
        name: &'a str,
        node: &'a str,
        p: &'a PendingApproval,
    ) -> ApprovalFuture<'a, Result<bool, String>>;
    /// An operator's decision on `name` (the node's approval `id`), kept
    /// only if `name` is still undecided and not past its deadline: of two
    /// decisions the first wins. `user` is the authority's own user.
    fn decide<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
        approve: bool,
        operator: &'a spiffe::SpiffeId,
        user: &'a str,
        now: u64,
    ) -> ApprovalFuture<'a, Result<Value, DecideError>>;
    /// Deletes what is past its deadline (by a minute).
    fn collect_expired(&self, now: u64) -> ApprovalFuture<'_, Result<(), String>>;
    /// Hands every change to `view` until `shutdown`; first sets
    /// `view`'s authority user.
    fn follow(
        self: Arc<Self>,
        view: Arc<FleetApprovals>,
        shutdown: CancellationToken,
    ) -> ApprovalFuture<'static, ()>;
}

/// One replica's view of the fleet's approvals, from its store.
pub struct FleetApprovals {
    store: Arc<dyn ApprovalStore>,
    /// Object name -> (node, decision), for decided ones.
    decided: RwLock<HashMap<String, (String, ApprovalDecision)>>,
    /// Objects this replica knows exist (created here or seen).
    known: Mutex<HashSet<String>>,
    /// Every object as the store last delivered it, by name.
    objects: RwLock<HashMap<String, Value>>,
    /// The user the replicas write decisions under (the Kubernetes user,
    /// from a SelfSubjectReview), once known.
    user: std::sync::OnceLock<String>,
    tx: broadcast::Sender<(String, ApprovalDecision)>,
}

impl FleetApprovals {
    pub fn start(
        store: Arc<dyn ApprovalStore>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            store: store.clone(),
            decided: RwLock::default(),
            known: Mutex::default(),
            objects: RwLock::default(),
            user: std::sync::OnceLock::new(),
            tx: broadcast::channel(1024).0,
        });
        let collector = this.clone();
        follow_and_collect(
            store.follow(this.clone(), shutdown.clone()),
            shutdown,
            move || {
                let (collector, now) = (collector.clone(), unix_seconds(clock.now()));
                async move {
                    if let Err(e) = collector.store.collect_expired(now).await {
                        tracing::warn!(error = %e, "could not delete expired approvals; retrying later");
                    }
                }
            },
        );
        this
    }

    /// The user decisions at the authority are written under; set once by
    /// the store before it delivers any object.
    pub fn set_user(&self, user: String) {
        let _ = self.user.set(user);
    }

    /// An object as the store holds it now.
    pub fn seen(&self, obj: &Value) {
        let Some(name) = obj["metadata"]["name"].as_str() else {
            return;
        };
        self.known.lock().insert(name.to_string());
        self.objects.write().insert(name.to_string(), obj.clone());
        if let Some((node, d)) = decision_of(obj, self.user.get().map(String::as_str)) {
            let new = self
                .decided
                .write()
                .insert(name.to_string(), (node.clone(), d.clone()))
                .is_none();
            if new {
                tracing::info!(node, approval_id = %d.id, by = %d.by, approved = d.approve, "approval decided in the fleet store");
                let _ = self.tx.send((node, d));
            }
        }
    }

    /// An object deleted from the store.
    pub fn forget(&self, name: &str) {
        self.decided.write().remove(name);
        self.known.lock().remove(name);
        self.objects.write().remove(name);
    }

    /// Everything the store holds now (what is not there was deleted).
    pub fn reset(&self, items: &[Value]) {
        let present: HashSet<&str> = items
            .iter()
            .filter_map(|o| o["metadata"]["name"].as_str())
            .collect();
        let gone: Vec<String> = self
            .objects
            .read()
            .keys()
            .filter(|n| !present.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name);
        }
        items.iter().for_each(|o| self.seen(o));
    }

    /// Keeps `node`'s pending approvals in the store (those not there yet).
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
            if self.store.create(&name, node, &p).await? {
                created += 1;
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
        ndjson_stream(16, not_after, clock, shutdown, move |mut out| async move {
            for d in known {
                if out
                    .send(&DecisionEvent {
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
                    _ = out.ended() => return,
                    next = rx.recv() => match next {
                        Ok((n, d)) if n == node => DecisionEvent { decision: Some(d), heartbeat: false },
                        Ok(_) => continue,
                        // Fell behind: end the stream; the node reconnects
                        // and gets every decision again.
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(HEARTBEAT) => DecisionEvent { decision: None, heartbeat: true },
                };
                if out.send(&event).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Every approval the fleet waits for or decided, not yet past its
    /// deadline, oldest deadline first (`GET /v1/operator/approvals`).
    pub fn list(&self, now: u64) -> Vec<Value> {
        let mut all: Vec<&Value> = Vec::new();
        let objects = self.objects.read();
        all.extend(
            objects
                .values()
                .filter(|o| o["spec"]["deadline"].as_u64().is_some_and(|d| d > now)),
        );
        all.sort_by_key(|o| {
            (
                o["spec"]["deadline"].as_u64().unwrap_or(0),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        all.into_iter().map(listed).collect()
    }

    /// An operator's decision at the authority: `id` is a node's approval id
    /// (with `node` where two nodes use one) or an object name. Kept by the
    /// store only if still undecided (a decision made meanwhile wins).
    pub async fn decide(
        &self,
        id: &str,
        node: Option<&str>,
        approve: bool,
        operator: &spiffe::SpiffeId,
        now: u64,
    ) -> Result<Value, DecideError> {
        let name = {
            let objects = self.objects.read();
            let matching: Vec<&String> = objects
                .iter()
                .filter(|(name, o)| {
                    (name.as_str() == id || o["spec"]["approvalId"] == id)
                        && node.is_none_or(|n| o["spec"]["node"] == n)
                })
                .map(|(name, _)| name)
                .collect();
            match matching.as_slice() {
                [] => return Err(DecideError::NotFound(id.to_string())),
                [one] => (*one).clone(),
                _ => return Err(DecideError::Ambiguous(id.to_string())),
            }
        };
        let user = self
            .user
            .get()
            .ok_or_else(|| {
                DecideError::Store("the authority's own user name is not known yet".into())
            })?
            .clone();
        self.store
            .decide(&name, id, approve, operator, &user, now)
            .await
    }
}

/// Pending approvals as `ApprovalRequest` objects in the Kubernetes API.
pub struct KubeApprovals {
    kube: Arc<KubeClient>,
    namespace: String,
}

impl KubeApprovals {
    /// `operators`: whether operators decide at the authority (the replica
    /// then also needs `get` and `patch`).
    pub fn new(kube: Arc<KubeClient>, namespace: String, operators: bool) -> Self {
        for verb in ["create", "list", "watch", "delete"] {
            kube.also_need(verb, GROUP, PLURAL, &namespace);
        }
        if operators {
            for verb in ["get", "patch"] {
                kube.also_need(verb, GROUP, PLURAL, &namespace);
            }
        }
        Self { kube, namespace }
    }

    fn collection(&self) -> String {
        format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{}/{PLURAL}",
            self.namespace
        )
    }
}

impl ApprovalStore for KubeApprovals {
    fn create<'a>(
        &'a self,
        name: &'a str,
        node: &'a str,
        p: &'a PendingApproval,
    ) -> ApprovalFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let body = json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "ApprovalRequest",
                "metadata": {"name": name},
                "spec": spec_of(node, p),
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
                Ok(_) => Ok(true),
                Err(e) if e.status == Some(409) => Ok(false),
                Err(e) => Err(e.message),
            }
        })
    }

    /// Written under the replica's own user with `spec.operator`, and only
    /// if the object is still undecided at the resource version read (a
    /// decision made meanwhile, here or with kubectl, wins).
    fn decide<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
        approve: bool,
        operator: &'a spiffe::SpiffeId,
        user: &'a str,
        now: u64,
    ) -> ApprovalFuture<'a, Result<Value, DecideError>> {
        Box::pin(async move {
            let path = format!("{}/{name}", self.collection());
            let current = self
                .kube
                .json(hyper::Method::GET, &path, "application/json", None)
                .await
                .map_err(|e| match e.status {
                    Some(404) => DecideError::NotFound(id.to_string()),
                    _ => DecideError::Kube(e.message),
                })?;
            let decided = |obj: &Value| {
                obj["spec"]["decision"]
                    .as_str()
                    .map(|d| DecideError::AlreadyDecided {
                        id: id.to_string(),
                        decision: d.to_string(),
                        by: decision_of(obj, Some(user))
                            .map(|(_, d)| d.by)
                            .unwrap_or_default(),
                    })
            };
            if let Some(e) = decided(&current) {
                return Err(e);
            }
            if current["spec"]["deadline"].as_u64().unwrap_or(0) <= now {
                return Err(DecideError::Expired(id.to_string()));
            }
            let patch = json!({
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "spec": {
                    "decision": if approve { "approved" } else { "denied" },
                    "decidedBy": user,
                    "operator": operator.to_string(),
                },
            });
            match self
                .kube
                .json(
                    hyper::Method::PATCH,
                    &path,
                    "application/merge-patch+json",
                    Some(&patch),
                )
                .await
            {
                Ok(obj) => Ok(listed(&obj)),
                // Changed since it was read (decided meanwhile), or refused by
                // the admission policy as decided already: say by whom.
                Err(e) if matches!(e.status, Some(409) | Some(403)) => {
                    let now_obj = self
                        .kube
                        .json(hyper::Method::GET, &path, "application/json", None)
                        .await
                        .map_err(|e| DecideError::Kube(e.message))?;
                    Err(decided(&now_obj).unwrap_or(DecideError::Kube(e.message)))
                }
                Err(e) => Err(DecideError::Kube(e.message)),
            }
        })
    }

    fn collect_expired(&self, now: u64) -> ApprovalFuture<'_, Result<(), String>> {
        Box::pin(async move {
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
        })
    }

    fn follow(
        self: Arc<Self>,
        view: Arc<FleetApprovals>,
        sd: CancellationToken,
    ) -> ApprovalFuture<'static, ()> {
        Box::pin(async move {
            // Who a decision written by a replica is from must be known
            // before any decision is read (see `decision_of`).
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.kube.own_user().await {
                    Ok(user) => {
                        view.set_user(user);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot learn the authority's own Kubernetes user name (SelfSubjectReview); fleet approvals wait for it");
                        tokio::select! {
                            _ = sd.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            let collection = self.collection();
            informer::run(
                &self.kube,
                &collection,
                PLURAL,
                &sd,
                |change| match change {
                    Change::Reset(items) => view.reset(&items),
                    Change::Upsert(obj) => view.seen(&obj),
                    Change::Delete(obj) => {
                        if let Some(name) = obj["metadata"]["name"].as_str() {
                            view.forget(name);
                        }
                    }
                    Change::Synced => {}
                },
            )
            .await;
        })
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
        super::subscribe::follow(
            &up,
            "the fleet's approval decisions",
            Decisions(local),
            shutdown,
        )
        .await
    });
}

/// Applies each decision made for this node's approvals.
struct Decisions(Arc<dyn LocalApprovals>);

impl super::subscribe::Handler for Decisions {
    type Event = DecisionEvent;

    fn path(&self) -> String {
        "/v1/approvals/decisions".into()
    }

    // Approvals not shared by this authority: they are decided on this
    // node's operator socket only.
    fn not_served(&mut self, _first: bool) {}

    async fn event(&mut self, event: DecisionEvent) {
        if let Some(d) = event.decision {
            self.0.decide(d).await;
        }
    }
}
