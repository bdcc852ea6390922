//! Node control kept in the fleet's store, beside its revocations: join
//! tokens redeemed once across replicas, and denials every replica enforces.
//! [`NodeControl`] holds what every store shares (the denials in force, the
//! guards of long-lived streams, the redemption rules); a [`NodeStore`]
//! keeps the state: [`KubeNodes`] here, or
//! [`PgNodes`](super::store::postgres::PgNodes).
//!
//! In the Kubernetes API (`[server.store] kind = "kubernetes"`, the
//! authority's namespace):
//!
//! * **Join tokens** as `JoinToken` objects (`tessera.dev/v1alpha1`). The
//!   object's name is the SHA-256 of the token (hex), its spec the node name
//!   and the expiry: the API never holds the token itself. Redeeming reads
//!   the object and deletes it with preconditions on its UID and resource
//!   version, so of any number of replicas racing for one token exactly one
//!   delete succeeds (the API server decides; no replica talks to another).
//!   An expired token is deleted and refused. Every replica deletes expired
//!   tokens about once a minute.
//! * **Denials** as `NodeDenial` objects: `spec.nodeName` (with an optional
//!   `spec.nodeKind`, `k8s` or `join`) evicts a node (every request from any
//!   of its node SVIDs, and any new attestation under that name, is
//!   refused); `spec.svidSerial` denies one node SVID (a stolen certificate)
//!   while the node may attest afresh. Each replica watches them, so every
//!   replica enforces a denial as soon as the API server's watch delivers it
//!   (milliseconds), until the object is deleted.
//!
//! RBAC: `get`, `list`, `delete` on `jointokens` and `list`, `watch` on
//! `nodedenials`, in the authority's namespace only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::informer::{self, Change};
use super::join::JoinError;
use super::kube::KubeClient;
use super::store::{StoreError, StoreFuture, follow_and_collect};
use super::{Node, NodeKind};
use crate::clock::{Clock, unix_seconds};
use crate::sync::RwLock;

/// Where join tokens and denials are kept.
pub trait NodeStore: Send + Sync + 'static {
    /// `kubernetes` or `postgres`, for logs.
    fn kind(&self) -> &'static str;

    /// Takes the join token whose SHA-256 (hex) is `hash` out of the store:
    /// its node name and expiry (unix seconds). Of any number of replicas
    /// asking at once, exactly one gets it; `None` for the others and for
    /// a token that never existed.
    fn take_join_token<'a>(&'a self, hash: &'a str) -> StoreFuture<'a, Option<(String, u64)>>;

    /// Deletes every join token expired by `now` (unix seconds); how many.
    fn collect_expired_tokens(&self, now: u64) -> StoreFuture<'_, usize>;

    /// Feeds `control` the denials, and every later change, until
    /// `shutdown`; reconnects by itself.
    fn follow_denials(
        self: Arc<Self>,
        control: Arc<NodeControl>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

const GROUP: &str = "tessera.dev";
const VERSION: &str = "v1alpha1";

/// The `JoinToken` object for `token` (what `tessera authority join-token
/// --manifest` writes for `kubectl apply`): named by the token's hash.
pub fn join_token_object(token: &str, node: &str, expires: u64) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "JoinToken",
        "metadata": {"name": crate::audit::sha256_hex(token.as_bytes())},
        "spec": {"node": node, "expires": expires},
    })
}

/// Why a node is denied: which object (or row) says so, and its reason.
fn describe(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["spec"]["reason"].as_str().filter(|r| !r.is_empty()) {
        Some(r) => format!("NodeDenial {name}: {r}"),
        None => format!("NodeDenial {name}"),
    }
}

#[derive(Default)]
struct DenySet {
    /// Object name -> what it denies.
    objects: HashMap<String, Denial>,
}

/// One denial: a node (by name, of one kind or any) or one node SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    node: Option<(Option<NodeKind>, String)>,
    serial: Option<String>,
    why: String,
}

/// A `NodeDenial` object (or a row in that shape: `metadata.name`,
/// `spec.nodeName`, `spec.nodeKind`, `spec.svidSerial`, `spec.reason`) as a
/// denial, if it denies anything.
pub fn denial_of(obj: &Value) -> Option<Denial> {
    let spec = &obj["spec"];
    let kind = match spec["nodeKind"].as_str() {
        None | Some("") => None,
        Some("k8s") => Some(NodeKind::Kubernetes),
        Some("join") => Some(NodeKind::Joined),
        Some(_) => return None,
    };
    let node = spec["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(|n| (kind, n.to_string()));
    let serial = spec["svidSerial"]
        .as_str()
        .map(|s| {
            s.trim_start_matches("0x")
                .replace(':', "")
                .to_ascii_lowercase()
        })
        // As `identity::certs::serial_hex` spells it: a number, no leading zeros.
        .map(|s| {
            let t = s.trim_start_matches('0');
            if t.is_empty() {
                "0".to_string()
            } else {
                t.to_string()
            }
        })
        .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()));
    if node.is_none() && serial.is_none() {
        return None;
    }
    Some(Denial {
        node,
        serial,
        why: describe(obj),
    })
}

/// Node control on one replica: the denials it enforces and the join tokens
/// it redeems.
pub struct NodeControl {
    store: Arc<dyn NodeStore>,
    denials: RwLock<DenySet>,
    synced: AtomicBool,
    /// Bumped at every change of the denials: long-lived streams re-check
    /// their node.
    changed: tokio::sync::watch::Sender<u64>,
}

impl NodeControl {
    /// Node control in the Kubernetes API (`namespace`), until `shutdown`.
    pub fn start(
        kube: Arc<KubeClient>,
        namespace: String,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Self::start_with(Arc::new(KubeNodes::new(kube, namespace)), clock, shutdown)
    }

    /// Starts following `store`'s denials and collecting its expired join
    /// tokens, until `shutdown`.
    pub fn start_with(
        store: Arc<dyn NodeStore>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            store: store.clone(),
            denials: RwLock::default(),
            synced: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(0),
        });
        let collector = this.clone();
        follow_and_collect(
            store.follow_denials(this.clone(), shutdown.clone()),
            shutdown,
            move || {
                let (collector, now) = (collector.clone(), unix_seconds(clock.now()));
                async move {
                    match collector.collect_expired(now).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "expired join tokens deleted"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not delete expired join tokens; retrying later")
                        }
                    }
                }
            },
        );
        this
    }

    /// The whole set of denials (after a list): anything else is lifted.
    pub fn reset_denials(&self, denials: HashMap<String, Denial>) {
        let mut set = self.denials.write();
        if set.objects == denials && self.is_synced() {
            return;
        }
        for (name, d) in &denials {
            if set.objects.get(name) != Some(d) {
                tracing::warn!(denial = %d.why, node = ?d.node, serial = ?d.serial, "node denied");
            }
        }
        for name in set.objects.keys() {
            if !denials.contains_key(name) {
                tracing::info!(name, "node denial lifted");
            }
        }
        set.objects = denials;
        drop(set);
        if !self.synced.swap(true, Ordering::AcqRel) {
            tracing::info!(
                denials = self.denials.read().objects.len(),
                "node denials loaded"
            );
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// One denial added or changed (`None`: `name` no longer denies
    /// anything).
    fn upsert_denial(&self, name: &str, denial: Option<Denial>) {
        {
            let mut set = self.denials.write();
            match denial {
                Some(d) => {
                    tracing::warn!(denial = %d.why, node = ?d.node, serial = ?d.serial, "node denied");
                    set.objects.insert(name.to_string(), d);
                }
                None => {
                    tracing::warn!(
                        name,
                        "ignoring a NodeDenial without a valid nodeName, nodeKind or svidSerial"
                    );
                    set.objects.remove(name);
                }
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// One denial deleted.
    fn remove_denial(&self, name: &str) {
        if self.denials.write().objects.remove(name).is_some() {
            tracing::info!(name, "node denial lifted");
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Cancelled once `node` (with the node SVID `serial`) is denied, or
    /// when `parent` is: what a node's long-lived stream runs under, so an
    /// evicted node's streams end at once.
    pub fn guard(
        self: &Arc<Self>,
        node: &Node,
        serial: Option<String>,
        parent: &CancellationToken,
    ) -> CancellationToken {
        let token = parent.child_token();
        let (this, node, out) = (self.clone(), node.clone(), token.clone());
        let mut changes = self.changed.subscribe();
        tokio::spawn(async move {
            loop {
                if this.denied(&node, serial.as_deref()).is_some() {
                    tracing::info!(node = %node.name, "a denied node's stream ends");
                    out.cancel();
                    return;
                }
                tokio::select! {
                    _ = out.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
        token
    }

    /// Whether the denials have been listed once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Why `node` (presenting the node SVID with serial `serial`, if any) is
    /// refused, if it is.
    pub fn denied(&self, node: &Node, serial: Option<&str>) -> Option<String> {
        let set = self.denials.read();
        set.objects.values().find_map(|d| {
            let by_node = d.node.as_ref().is_some_and(|(kind, name)| {
                name == &node.name && kind.is_none_or(|k| k == node.kind)
            });
            let by_serial = matches!((&d.serial, serial), (Some(a), Some(b)) if a == b);
            (by_node || by_serial).then(|| d.why.clone())
        })
    }

    /// Redeems a join token kept in the store: the node name, once.
    pub async fn redeem(&self, token: &str, now: SystemTime) -> Result<String, JoinError> {
        let hash = crate::audit::sha256_hex(token.as_bytes());
        let (node, expires) = self
            .store
            .take_join_token(&hash)
            .await
            .map_err(|e| JoinError::Api(e.to_string()))?
            .ok_or(JoinError::Unknown)?;
        if unix_seconds(now) >= expires {
            return Err(JoinError::Expired);
        }
        super::join::check_node_name(&node)?;
        Ok(node)
    }

    /// Deletes every join token that has expired by `now` (unix seconds);
    /// how many. Every replica runs it about once a minute.
    pub async fn collect_expired(&self, now: u64) -> Result<usize, String> {
        self.store
            .collect_expired_tokens(now)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Join tokens and denials as `JoinToken` and `NodeDenial` objects in the
/// Kubernetes API.
pub struct KubeNodes {
    kube: Arc<KubeClient>,
    namespace: String,
}

impl KubeNodes {
    pub fn new(kube: Arc<KubeClient>, namespace: String) -> Self {
        for verb in ["list", "watch"] {
            kube.also_need(verb, GROUP, "nodedenials", &namespace);
        }
        for verb in ["get", "list", "delete"] {
            kube.also_need(verb, GROUP, "jointokens", &namespace);
        }
        Self { kube, namespace }
    }

    fn collection(&self, plural: &str) -> String {
        format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{}/{plural}",
            self.namespace
        )
    }

    async fn take(&self, hash: &str) -> Result<Option<(String, u64)>, StoreError> {
        let path = format!("{}/{hash}", self.collection("jointokens"));
        let obj = match self
            .kube
            .json(hyper::Method::GET, &path, "application/json", None)
            .await
        {
            Ok(o) => o,
            Err(e) if e.status == Some(404) => return Ok(None),
            Err(e) => return Err(StoreError::Unavailable(e.message)),
        };
        let (Some(uid), Some(rv)) = (
            obj["metadata"]["uid"].as_str(),
            obj["metadata"]["resourceVersion"].as_str(),
        ) else {
            return Ok(None);
        };
        // Exactly one delete of this very object succeeds, whichever replica
        // sends it; the others get 404 or 409.
        let body = json!({
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid, "resourceVersion": rv},
        });
        match self
            .kube
            .json(
                hyper::Method::DELETE,
                &path,
                "application/json",
                Some(&body),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.status, Some(404 | 409)) => return Ok(None),
            Err(e) => return Err(StoreError::Unavailable(e.message)),
        }
        let node = obj["spec"]["node"].as_str().unwrap_or_default().to_string();
        let expires = obj["spec"]["expires"].as_u64().unwrap_or(0);
        Ok(Some((node, expires)))
    }

    async fn collect(&self, now: u64) -> Result<usize, StoreError> {
        let list = self
            .kube
            .json(
                hyper::Method::GET,
                &self.collection("jointokens"),
                "application/json",
                None,
            )
            .await
            .map_err(|e| StoreError::Unavailable(e.message))?;
        let mut deleted = 0;
        for obj in list["items"].as_array().into_iter().flatten() {
            if obj["spec"]["expires"].as_u64().unwrap_or(0) > now {
                continue;
            }
            let (Some(name), Some(uid)) = (
                obj["metadata"]["name"].as_str(),
                obj["metadata"]["uid"].as_str(),
            ) else {
                continue;
            };
            let body =
                json!({"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}});
            match self
                .kube
                .json(
                    hyper::Method::DELETE,
                    &format!("{}/{name}", self.collection("jointokens")),
                    "application/json",
                    Some(&body),
                )
                .await
            {
                Ok(_) => deleted += 1,
                Err(e) if matches!(e.status, Some(404 | 409)) => {}
                Err(e) => return Err(StoreError::Unavailable(e.message)),
            }
        }
        Ok(deleted)
    }
}

impl NodeStore for KubeNodes {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn take_join_token<'a>(&'a self, hash: &'a str) -> StoreFuture<'a, Option<(String, u64)>> {
        Box::pin(self.take(hash))
    }

    fn collect_expired_tokens(&self, now: u64) -> StoreFuture<'_, usize> {
        Box::pin(self.collect(now))
    }

    fn follow_denials(
        self: Arc<Self>,
        control: Arc<NodeControl>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let collection = self.collection("nodedenials");
            informer::run(
                &self.kube,
                &collection,
                "nodedenials",
                &shutdown,
                |change| match change {
                    Change::Reset(items) => control.reset_denials(
                        items
                            .iter()
                            .filter_map(|o| {
                                Some((o["metadata"]["name"].as_str()?.to_string(), denial_of(o)?))
                            })
                            .collect(),
                    ),
                    Change::Upsert(o) => {
                        if let Some(name) = o["metadata"]["name"].as_str() {
                            control.upsert_denial(name, denial_of(&o));
                        }
                    }
                    Change::Delete(o) => {
                        if let Some(name) = o["metadata"]["name"].as_str() {
                            control.remove_denial(name);
                        }
                    }
                    Change::Synced => {}
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
    fn denials_read_names_kinds_and_serials() {
        let d = denial_of(&json!({"metadata": {"name": "x"},
            "spec": {"nodeName": "n1", "nodeKind": "join", "reason": "stolen"}}))
        .unwrap();
        assert_eq!(d.node, Some((Some(NodeKind::Joined), "n1".into())));
        assert_eq!(d.why, "NodeDenial x: stolen");
        let d = denial_of(&json!({"metadata": {"name": "y"}, "spec": {"svidSerial": "00:1A:2b"}}))
            .unwrap();
        assert_eq!(d.serial.as_deref(), Some("1a2b"));
        assert!(denial_of(&json!({"metadata": {"name": "z"}, "spec": {}})).is_none());
        assert!(
            denial_of(
                &json!({"metadata": {"name": "z"}, "spec": {"nodeName": "n", "nodeKind": "vm"}})
            )
            .is_none()
        );
        let obj = join_token_object("tok", "vm-1", 99);
        assert_eq!(obj["metadata"]["name"], crate::audit::sha256_hex(b"tok"));
        assert!(!obj.to_string().contains("\"tok\""));
    }
}
