//! Live registration: entries kept as custom resources in the Kubernetes
//! API, watched by the authority and handed to every node, so registering a
//! workload needs no restart.
//!
//! * `ClusterWorkloadEntry` (cluster-scoped, for platform teams): any
//!   selectors, any SPIFFE ID of the trust domain outside `/tessera/`.
//! * `WorkloadEntry` (namespaced, for the team that owns the namespace): the
//!   entry applies only to that namespace's pods (`k8s:ns:<namespace>` is
//!   added to its selectors) and its SPIFFE ID must be under
//!   `spiffe://<td>/ns/<namespace>/`, so RBAC on one namespace never buys an
//!   identity of another.
//!
//! Both have the fields of a config file's `[[entries]]` (`spiffeId` with
//! templates, `selectors`, `hint`, `x509Ttl`, `jwtTtl`, `witTtl`,
//! `federatesWith`). Each replica lists and watches both kinds
//! ([`super::informer`]: resumes after an API-server restart, lists again
//! on `410 Gone`), checks every object, and writes the verdict as the
//! object's `Ready` condition through the status subresource: `Accepted`,
//! or `Invalid` with a message naming the field. An invalid object changes
//! nothing: a new one is not in force, a changed one keeps its last accepted
//! version in force on the running replicas.
//!
//! The entries in force on the authority are its config file's (replaced on
//! SIGHUP) followed by the live ones (cluster-scoped by name, then
//! namespaced by namespace and name). Nodes get the live ones over
//! `GET /v1/entries` (the whole set at each change) and put them after their
//! own config file's ([`crate::entries::EntrySources`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::response::Response;
use serde_json::Value;
use tessera_attestor::Selector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::Upstream;
use super::feed::{HEARTBEAT, ndjson_stream};
use super::informer::{self, Change};
use super::kube::KubeClient;
use super::status::{Invalid, StatusWriter, invalid};
use super::wire::{EntriesEvent, EntryDoc};
use crate::clock::Clock;
use crate::entries::{Entry, EntrySet, EntrySources, IdTemplate};
use crate::sync::Mutex;

pub const GROUP: &str = "tessera.dev";
pub const VERSION: &str = "v1alpha1";

/// The `[server.registration]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Where the entries are kept.
    pub source: Source,
    /// Also watch `WorkloadEntry` objects in every namespace (teams' own).
    pub namespaced: bool,
    /// Also watch `FederationRelationship` objects ([`super::federation`]).
    pub federation: bool,
    /// Lifetimes of an entry that does not set them (the config's `[svid]`).
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    pub wit_ttl: Duration,
}

/// Where live entries are kept (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `ClusterWorkloadEntry` and `WorkloadEntry` objects.
    Kubernetes,
    /// Rows of `tessera_entries` in the `[server.store]` database
    /// ([`crate::fleet::store::postgres::entries`]).
    Postgres,
}

/// The two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Cluster,
    Namespaced,
}

impl Scope {
    pub fn kind(self) -> &'static str {
        match self {
            Scope::Cluster => "ClusterWorkloadEntry",
            Scope::Namespaced => "WorkloadEntry",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Scope::Cluster => "clusterworkloadentries",
            Scope::Namespaced => "workloadentries",
        }
    }

    /// Every object of the kind (all namespaces).
    fn collection(self) -> String {
        format!("/apis/{GROUP}/{VERSION}/{}", self.plural())
    }

    fn status_path(self, key: &Key) -> String {
        match self {
            Scope::Cluster => format!("{}/{}/status", self.collection(), key.name),
            Scope::Namespaced => format!(
                "/apis/{GROUP}/{VERSION}/namespaces/{}/{}/{}/status",
                key.namespace,
                self.plural(),
                key.name
            ),
        }
    }
}

/// One object: its kind, namespace (empty for cluster-scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub scope: Scope,
    pub namespace: String,
    pub name: String,
}

impl Key {
    fn of(scope: Scope, obj: &Value) -> Option<Self> {
        let meta = &obj["metadata"];
        Some(Self {
            scope,
            namespace: meta["namespace"].as_str().unwrap_or_default().to_string(),
            name: meta["name"].as_str()?.to_string(),
        })
    }

    /// `ClusterWorkloadEntry/<name>` or `WorkloadEntry/<namespace>/<name>`.
    pub fn source(&self) -> String {
        match self.scope {
            Scope::Cluster => format!("{}/{}", self.scope.kind(), self.name),
            Scope::Namespaced => format!("{}/{}/{}", self.scope.kind(), self.namespace, self.name),
        }
    }
}

/// Same bounds as a config file's TTLs.
const MIN_TTL: Duration = Duration::from_secs(2);
const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);

fn ttl(spec: &Value, field: &str, default: Duration) -> Result<Duration, Invalid> {
    let path = format!("spec.{field}");
    match &spec[field] {
        Value::Null => Ok(default),
        Value::String(text) => {
            let d = humantime::parse_duration(text).map_err(|e| {
                invalid(
                    &path,
                    format!("{text:?} is not a duration ({e}); use e.g. \"90s\", \"1h\""),
                )
            })?;
            if d < MIN_TTL || d > MAX_TTL {
                return Err(invalid(
                    &path,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(MIN_TTL),
                        humantime::format_duration(MAX_TTL)
                    ),
                ));
            }
            Ok(d)
        }
        _ => Err(invalid(path, "must be a string such as \"1h\"")),
    }
}

fn strings(spec: &Value, field: &str) -> Result<Vec<String>, Invalid> {
    match &spec[field] {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("spec.{field}[{i}]"), "must be a string"))
            })
            .collect(),
        _ => Err(invalid(
            format!("spec.{field}"),
            "must be a list of strings",
        )),
    }
}

/// Checks one object of `scope` and turns it into an entry (and the form
/// nodes receive). `td` is the authority's trust domain.
pub fn entry_of(
    scope: Scope,
    obj: &Value,
    td: &spiffe::TrustDomain,
    config: &RegistrationConfig,
) -> Verdict {
    let key = Key::of(scope, obj).ok_or_else(|| invalid("metadata.name", "missing"))?;
    let spec = &obj["spec"];
    if !spec.is_object() {
        return Err(invalid("spec", "missing; an entry needs spec.spiffeId"));
    }
    let id_text = spec["spiffeId"].as_str().ok_or_else(|| {
        invalid(
            "spec.spiffeId",
            "missing; e.g. \"spiffe://<trust domain>/ns/{k8s:ns}/sa/{k8s:sa}\"",
        )
    })?;
    let template = IdTemplate::parse(id_text).map_err(|m| invalid("spec.spiffeId", m))?;
    if template.trust_domain() != td.as_str() {
        return Err(invalid(
            "spec.spiffeId",
            format!(
                "trust domain {:?} is not the authority's {:?}",
                template.trust_domain(),
                td.as_str()
            ),
        ));
    }
    let reserved = format!("{}{}", td.id_string(), super::RESERVED_PATH);
    if id_text.starts_with(&reserved) {
        return Err(invalid(
            "spec.spiffeId",
            format!("{reserved} is reserved for the fleet's own identities"),
        ));
    }
    let mut selectors = Vec::new();
    if scope == Scope::Namespaced {
        let prefix = format!("{}/ns/{}/", td.id_string(), key.namespace);
        if !template.literal_prefix().starts_with(&prefix) {
            return Err(invalid(
                "spec.spiffeId",
                format!(
                    "a WorkloadEntry names identities of its own namespace only: the ID must start with {prefix:?} (placeholders may follow)"
                ),
            ));
        }
        selectors.push(Selector::new("k8s:ns", &key.namespace));
    }
    let selector_texts = strings(spec, "selectors")?;
    for (i, text) in selector_texts.iter().enumerate() {
        let field = format!("spec.selectors[{i}]");
        let s = Selector::parse(text).map_err(|e| invalid(&field, e.to_string()))?;
        if scope == Scope::Namespaced && s.kind() == "k8s:ns" && s.value() != key.namespace {
            return Err(invalid(
                field,
                format!(
                    "a WorkloadEntry applies to pods of its own namespace ({}) only",
                    key.namespace
                ),
            ));
        }
        if !selectors.contains(&s) {
            selectors.push(s);
        }
    }
    if selectors.is_empty() {
        return Err(invalid(
            "spec.selectors",
            "an entry needs at least one selector",
        ));
    }
    let hint = match &spec["hint"] {
        Value::Null => None,
        Value::String(h) if h.len() <= 1024 => Some(h.clone()),
        Value::String(_) => return Err(invalid("spec.hint", "hints are limited to 1024 bytes")),
        _ => return Err(invalid("spec.hint", "must be a string")),
    };
    let x509_ttl = ttl(spec, "x509Ttl", config.x509_ttl)?;
    let jwt_ttl = ttl(spec, "jwtTtl", config.jwt_ttl)?;
    let wit_ttl = ttl(spec, "witTtl", config.wit_ttl)?;
    let mut federates_with = Vec::new();
    for (i, d) in strings(spec, "federatesWith")?.iter().enumerate() {
        let field = format!("spec.federatesWith[{i}]");
        let other = spiffe::TrustDomain::new(d.strip_prefix("spiffe://").unwrap_or(d))
            .map_err(|e| invalid(&field, format!("{d:?} is not a trust domain: {e}")))?;
        if &other == td {
            return Err(invalid(field, "names the authority's own trust domain"));
        }
        if !federates_with.contains(&other.as_str().to_string()) {
            federates_with.push(other.as_str().to_string());
        }
    }
    let entry = Entry {
        template,
        selectors,
        hint,
        x509_ttl,
        jwt_ttl,
        wit_ttl,
        federates_with: federates_with.clone().into(),
    };
    if let Some(why) = super::entitlement::never_entitled(&entry, true) {
        let field = if entry
            .template
            .placeholders()
            .any(|p| !super::entitlement::verifiable(p))
        {
            "spec.spiffeId"
        } else {
            "spec.selectors"
        };
        return Err(invalid(field, format!("never in force: {why}")));
    }
    let doc = EntryDoc {
        source: key.source(),
        spiffe_id: entry.template.text(),
        selectors: entry.selectors.iter().map(|s| s.to_string()).collect(),
        hint: entry.hint.clone(),
        x509_ttl_seconds: x509_ttl.as_secs(),
        jwt_ttl_seconds: jwt_ttl.as_secs(),
        wit_ttl_seconds: wit_ttl.as_secs(),
        federates_with,
    };
    Ok((entry, doc))
}

/// An object's verdict: in force (with the form nodes receive), or why not.
pub type Verdict = Result<(Entry, EntryDoc), Invalid>;

/// A node's side: an entry as the authority sent it.
pub fn entry_from_doc(doc: &EntryDoc) -> Result<Entry, String> {
    let template = IdTemplate::parse(&doc.spiffe_id)?;
    let selectors = doc
        .selectors
        .iter()
        .map(|s| Selector::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if selectors.is_empty() {
        return Err("no selectors".into());
    }
    let secs = |s: u64| Duration::from_secs(s.clamp(MIN_TTL.as_secs(), MAX_TTL.as_secs()));
    Ok(Entry {
        template,
        selectors,
        hint: doc.hint.clone(),
        x509_ttl: secs(doc.x509_ttl_seconds),
        jwt_ttl: secs(doc.jwt_ttl_seconds),
        wit_ttl: secs(doc.wit_ttl_seconds),
        federates_with: doc.federates_with.clone().into(),
    })
}

/// The entries in force on one replica, as one consistent snapshot.
pub struct Snapshot {
    /// Changes with every update.
    pub version: u64,
    /// The config file's entries, then the live ones: what entitlement uses.
    pub all: EntrySet,
    /// The live ones, as nodes receive them.
    pub live: Arc<Vec<EntryDoc>>,
}

#[derive(Default)]
struct State {
    config: Vec<Entry>,
    live: BTreeMap<Key, (Entry, EntryDoc)>,
    version: u64,
    synced: [bool; 2],
}

/// The authority's entries: its config file's and the live ones.
pub struct LiveEntries {
    state: Mutex<State>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl LiveEntries {
    pub fn new(config: &EntrySet) -> Arc<Self> {
        let state = State {
            config: config.iter().cloned().collect(),
            synced: [true; 2],
            ..State::default()
        };
        let snapshot = Arc::new(Snapshot {
            version: 0,
            all: config.clone(),
            live: Arc::new(Vec::new()),
        });
        Arc::new(Self {
            state: Mutex::new(state),
            tx: watch::Sender::new(snapshot),
        })
    }

    /// The entries in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Replaces the config file's entries (SIGHUP).
    pub fn set_config(&self, config: &EntrySet) {
        let mut state = self.state.lock();
        state.config = config.iter().cloned().collect();
        self.publish(&mut state);
    }

    /// How many live entries are in force.
    pub fn live_count(&self) -> usize {
        self.state.lock().live.len()
    }

    /// Whether every watched kind has been listed once.
    pub fn is_synced(&self) -> bool {
        self.state.lock().synced.iter().all(|s| *s)
    }

    pub(crate) fn watch(&self, scope: Scope) {
        let mut state = self.state.lock();
        state.synced[scope as usize] = false;
    }

    fn publish(&self, state: &mut State) {
        state.version += 1;
        let entries: Vec<Entry> = state
            .config
            .iter()
            .chain(state.live.values().map(|(e, _)| e))
            .cloned()
            .collect();
        let live: Vec<EntryDoc> = state.live.values().map(|(_, d)| d.clone()).collect();
        self.tx.send_replace(Arc::new(Snapshot {
            version: state.version,
            all: EntrySet::new(entries),
            live: Arc::new(live),
        }));
    }

    /// Applies what one (re)list or watch event says. `present`: after a
    /// list, every object of `scope` that exists (others are gone).
    /// `accepted`: objects whose current spec is valid; an object that is
    /// present but not accepted keeps its last accepted version.
    pub(crate) fn apply(
        &self,
        scope: Scope,
        present: Option<&[Key]>,
        accepted: Vec<(Key, Entry, EntryDoc)>,
        removed: Option<&Key>,
    ) {
        let mut state = self.state.lock();
        let before: Vec<EntryDoc> = state.live.values().map(|(_, d)| d.clone()).collect();
        if let Some(present) = present {
            state
                .live
                .retain(|k, _| k.scope != scope || present.contains(k));
            state.synced[scope as usize] = true;
        }
        if let Some(k) = removed {
            state.live.remove(k);
        }
        for (k, e, d) in accepted {
            state.live.insert(k, (e, d));
        }
        let after: Vec<&EntryDoc> = state.live.values().map(|(_, d)| d).collect();
        if before.iter().ne(after.iter().copied()) {
            tracing::info!(live = after.len(), "live registration entries changed");
            self.publish(&mut state);
        }
    }
}

/// Starts watching the entry kinds (the namespaced one if configured) until
/// `shutdown`, writing each object's verdict to its status.
pub fn start(
    kube: Arc<KubeClient>,
    live: Arc<LiveEntries>,
    td: spiffe::TrustDomain,
    config: RegistrationConfig,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    let statuses = StatusWriter::start(kube.clone(), clock, shutdown.clone());
    let mut scopes = vec![Scope::Cluster];
    if config.namespaced {
        scopes.push(Scope::Namespaced);
    }
    for scope in scopes {
        for verb in ["list", "watch"] {
            kube.also_need(verb, GROUP, scope.plural(), "");
        }
        live.watch(scope);
        let (kube, live, td, config, shutdown, statuses) = (
            kube.clone(),
            live.clone(),
            td.clone(),
            config.clone(),
            shutdown.clone(),
            statuses.clone(),
        );
        tokio::spawn(async move {
            let check = |obj: &Value| -> Option<(Key, Verdict)> {
                let key = Key::of(scope, obj)?;
                let verdict = entry_of(scope, obj, &td, &config);
                if let Err(e) = &verdict {
                    tracing::warn!(object = %key.source(), error = %e, "registration entry refused");
                }
                statuses.report(
                    scope.status_path(&key),
                    obj,
                    verdict.as_ref().map(|(_, doc)| doc.spiffe_id.as_str()),
                );
                Some((key, verdict))
            };
            let collection = scope.collection();
            informer::run(
                &kube,
                &collection,
                scope.plural(),
                &shutdown,
                |change| match change {
                    Change::Reset(items) => {
                        let mut present = Vec::new();
                        let mut accepted = Vec::new();
                        for obj in &items {
                            if let Some((key, verdict)) = check(obj) {
                                present.push(key.clone());
                                if let Ok((e, d)) = verdict {
                                    accepted.push((key, e, d));
                                }
                            }
                        }
                        live.apply(scope, Some(&present), accepted, None);
                    }
                    Change::Upsert(obj) => {
                        if let Some((key, Ok((e, d)))) = check(&obj) {
                            live.apply(scope, None, vec![(key, e, d)], None);
                        }
                    }
                    Change::Delete(obj) => {
                        if let Some(key) = Key::of(scope, &obj) {
                            live.apply(scope, None, Vec::new(), Some(&key));
                        }
                    }
                    Change::Synced => {}
                },
            )
            .await;
        });
    }
}

/// `GET /v1/entries`: the live entries whole, again at each change, and a
/// heartbeat while idle; open until the node SVID expires (`not_after`), the
/// node leaves or the authority stops.
pub fn stream(
    live: &LiveEntries,
    node: String,
    not_after: SystemTime,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Response {
    let mut rx = live.subscribe();
    ndjson_stream(4, not_after, clock, shutdown, move |mut out| async move {
        loop {
            let event = {
                let snapshot = rx.borrow_and_update();
                EntriesEvent {
                    version: snapshot.version,
                    entries: Some(
                        snapshot
                            .live
                            .iter()
                            .filter(|d| applies_to(d, &node))
                            .cloned()
                            .collect(),
                    ),
                    heartbeat: false,
                }
            };
            if out.send(&event).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = out.ended() => return,
                    changed = rx.changed() => {
                        if changed.is_err() { return }
                        break;
                    }
                    _ = tokio::time::sleep(HEARTBEAT) => {
                        let version = rx.borrow().version;
                        if out.send(&EntriesEvent { version, heartbeat: true, ..EntriesEvent::default() }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
}

/// Whether a live entry can ever apply on `node`: an entry naming a node
/// (`tessera:node:<name>`, or `k8s:node-name:<name>` for a pod's node) can
/// only match callers there, every selector of an entry having to match, so
/// it is sent to that node alone. Any other entry may apply anywhere (a pod
/// can be scheduled on any node) and goes to every node.
pub fn applies_to(doc: &EntryDoc, node: &str) -> bool {
    doc.selectors.iter().all(|s| {
        let named = s
            .strip_prefix(super::NODE_SELECTOR)
            .or_else(|| s.strip_prefix("k8s:node-name"))
            .and_then(|rest| rest.strip_prefix(':'));
        named.is_none_or(|n| n == node)
    })
}

/// Puts each set of live entries the authority sends into this node's
/// sources (when it changed).
struct FleetEntries {
    sources: Arc<EntrySources>,
    loaded: watch::Sender<bool>,
    last: Option<Vec<EntryDoc>>,
}

impl super::subscribe::Handler for FleetEntries {
    type Event = EntriesEvent;

    fn path(&self) -> String {
        "/v1/entries".into()
    }

    // An authority without live registration: only the config file's
    // entries; asked again now and then.
    fn not_served(&mut self, first: bool) {
        if first {
            tracing::info!(
                "the fleet authority has no live registration ([server.registration]); using this node's config-file entries only"
            );
        }
        self.loaded.send_replace(true);
    }

    async fn event(&mut self, event: EntriesEvent) {
        let Some(docs) = event.entries else { return };
        if self.last.as_ref() != Some(&docs) {
            let mut entries = Vec::with_capacity(docs.len());
            for doc in &docs {
                match entry_from_doc(doc) {
                    Ok(e) => entries.push(e),
                    Err(why) => {
                        tracing::warn!(source = %doc.source, error = %why, "ignoring a live entry this agent cannot read")
                    }
                }
            }
            tracing::info!(
                live = entries.len(),
                "live registration entries from the fleet authority"
            );
            self.sources.set_fleet(entries);
            self.last = Some(docs);
        }
        self.loaded.send_replace(true);
    }
}

/// A node's side: follows the authority's live entries into `sources`
/// until `shutdown` (the last set received stays in force while no replica
/// answers). The receiver turns true once the first set arrived (or the
/// authority has none to give).
pub fn follow(
    up: Arc<Upstream>,
    sources: Arc<EntrySources>,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (loaded_tx, loaded) = watch::channel(false);
    let handler = FleetEntries {
        sources,
        loaded: loaded_tx,
        last: None,
    };
    tokio::spawn(async move {
        super::subscribe::follow(
            &up,
            "the fleet's live registration entries",
            handler,
            shutdown,
        )
        .await
    });
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_naming_a_node_go_to_that_node_only() {
        let doc = |selectors: &[&str]| EntryDoc {
            source: "ClusterWorkloadEntry/x".into(),
            spiffe_id: "spiffe://example.org/x".into(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            hint: None,
            x509_ttl_seconds: 1,
            jwt_ttl_seconds: 1,
            wit_ttl_seconds: 1,
            federates_with: Vec::new(),
        };
        let b_only = doc(&["tessera:node:node-b", "unix:uid:1"]);
        assert!(applies_to(&b_only, "node-b"));
        assert!(!applies_to(&b_only, "node-a"));
        assert!(!applies_to(&b_only, "node-bb"));
        let pod_on_b = doc(&["k8s:ns:web", "k8s:node-name:node-b"]);
        assert!(applies_to(&pod_on_b, "node-b"));
        assert!(!applies_to(&pod_on_b, "node-a"));
        for anywhere in [
            doc(&["k8s:ns:web", "k8s:sa:api"]),
            doc(&["tessera:node"]),
            doc(&["tessera:nodes:node-b"]),
        ] {
            assert!(applies_to(&anywhere, "node-a"), "{:?}", anywhere.selectors);
        }
    }

    fn config() -> RegistrationConfig {
        RegistrationConfig {
            source: Source::Kubernetes,
            namespaced: true,
            federation: false,
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            wit_ttl: Duration::from_secs(3600),
        }
    }

    fn td() -> spiffe::TrustDomain {
        spiffe::TrustDomain::new("example.org").unwrap()
    }

    fn object(ns: Option<&str>, spec: Value) -> Value {
        let mut meta = json!({"name": "e1", "generation": 3});
        if let Some(ns) = ns {
            meta["namespace"] = json!(ns);
        }
        json!({"metadata": meta, "spec": spec})
    }

    fn field(scope: Scope, ns: Option<&str>, spec: Value) -> String {
        entry_of(scope, &object(ns, spec), &td(), &config())
            .unwrap_err()
            .field
    }

    #[test]
    fn a_valid_cluster_entry_becomes_an_entry_and_round_trips_to_nodes() {
        let (entry, doc) = entry_of(
            Scope::Cluster,
            &object(
                None,
                json!({"spiffeId": "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
                       "selectors": ["k8s:ns:shop", "unix:uid:1000"], "hint": "web",
                       "x509Ttl": "10m", "federatesWith": ["spiffe://other.org"]}),
            ),
            &td(),
            &config(),
        )
        .unwrap();
        assert_eq!(doc.source, "ClusterWorkloadEntry/e1");
        assert_eq!(doc.x509_ttl_seconds, 600);
        assert_eq!(doc.jwt_ttl_seconds, 300, "the default");
        assert_eq!(doc.federates_with, ["other.org"]);
        let back = entry_from_doc(&doc).unwrap();
        assert_eq!(back.template, entry.template);
        assert_eq!(back.selectors, entry.selectors);
        assert_eq!(back.hint.as_deref(), Some("web"));
    }

    #[test]
    fn invalid_objects_name_the_field() {
        let c = Scope::Cluster;
        assert_eq!(field(c, None, json!({})), "spec.spiffeId");
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://other.org/x", "selectors": ["k8s:ns:a"]})
            ),
            "spec.spiffeId"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/tessera/node/k8s/x", "selectors": ["k8s:ns:a"]})
            ),
            "spec.spiffeId"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": ["k8s:ns:a", "bad"]})
            ),
            "spec.selectors[1]"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": []})
            ),
            "spec.selectors"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": ["unix:uid:1"]})
            ),
            "spec.selectors",
            "nothing the authority can verify"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/u/{unix:uid}", "selectors": ["k8s:ns:a"]})
            ),
            "spec.spiffeId",
            "a value only the node sees"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": ["k8s:ns:a"], "x509Ttl": "soon"})
            ),
            "spec.x509Ttl"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": ["k8s:ns:a"], "jwtTtl": "1s"})
            ),
            "spec.jwtTtl"
        );
        assert_eq!(
            field(
                c,
                None,
                json!({"spiffeId": "spiffe://example.org/x", "selectors": ["k8s:ns:a"], "federatesWith": ["example.org"]})
            ),
            "spec.federatesWith[0]"
        );
    }

    #[test]
    fn a_namespaced_entry_stays_in_its_namespace() {
        let n = Scope::Namespaced;
        let (entry, doc) = entry_of(
            n,
            &object(Some("team-a"), json!({"spiffeId": "spiffe://example.org/ns/team-a/sa/{k8s:sa}", "selectors": ["k8s:pod-label:app:web"]})),
            &td(),
            &config(),
        )
        .unwrap();
        assert_eq!(doc.source, "WorkloadEntry/team-a/e1");
        assert!(entry.selectors.contains(&Selector::new("k8s:ns", "team-a")));
        for id in [
            "spiffe://example.org/ns/team-b/sa/x",
            "spiffe://example.org/ns/team-a",
            "spiffe://example.org/ns/team-abc/x",
            "spiffe://example.org/ns/{k8s:ns}/sa/x",
            "spiffe://example.org/admin",
        ] {
            assert_eq!(
                field(n, Some("team-a"), json!({"spiffeId": id})),
                "spec.spiffeId",
                "{id}"
            );
        }
        assert_eq!(
            field(
                n,
                Some("team-a"),
                json!({"spiffeId": "spiffe://example.org/ns/team-a/x", "selectors": ["k8s:ns:team-b"]})
            ),
            "spec.selectors[0]"
        );
    }

    #[test]
    fn live_entries_keep_the_last_accepted_version_and_follow_deletes() {
        let live = LiveEntries::new(&EntrySet::default());
        let key = |n: &str| Key {
            scope: Scope::Cluster,
            namespace: String::new(),
            name: n.into(),
        };
        let parse = |id: &str| {
            entry_of(
                Scope::Cluster,
                &object(None, json!({"spiffeId": id, "selectors": ["k8s:ns:a"]})),
                &td(),
                &config(),
            )
            .unwrap()
        };
        let (e, d) = parse("spiffe://example.org/one");
        live.apply(
            Scope::Cluster,
            Some(&[key("e1")]),
            vec![(key("e1"), e, d)],
            None,
        );
        assert_eq!(live.current().live.len(), 1);
        let v = live.current().version;
        // Relisted with e1 present but now invalid (not accepted): kept.
        live.apply(Scope::Cluster, Some(&[key("e1")]), Vec::new(), None);
        assert_eq!(live.current().version, v, "nothing changed");
        assert_eq!(live.current().live[0].spiffe_id, "spiffe://example.org/one");
        // Gone from a relist: removed.
        live.apply(Scope::Cluster, Some(&[]), Vec::new(), None);
        assert!(live.current().live.is_empty());
        let (e, d) = parse("spiffe://example.org/two");
        live.apply(Scope::Cluster, None, vec![(key("e2"), e, d)], None);
        live.apply(Scope::Cluster, None, Vec::new(), Some(&key("e2")));
        assert!(live.current().live.is_empty());
    }
}
