//! Cedar policy store for per-task token exchange.
//!
//! Every token-exchange request is decided by [Cedar](https://www.cedarpolicy.com)
//! policies loaded from a directory (`policy_dir`). A request names one
//! audience and one or more scopes; **each scope is one Cedar authorization
//! request**, so one request can get some scopes and not others.
//!
//! # Cedar model
//!
//! Everything lives in the namespace `Tessera`:
//!
//! | Cedar | Tessera |
//! |---|---|
//! | principal `Tessera::Workload::"<SPIFFE ID>"` | the caller; attributes `spiffe_id: String`, `trust_domain: String`, `path: String` (`""` if the ID has none), `selectors: Set<String>` (attested selectors as `type:value`, e.g. `"unix:uid:1000"`, `"k8s:ns:prod"`) |
//! | action `Tessera::Action::"<scope>"` | one requested scope, e.g. `Tessera::Action::"notes:read"` |
//! | resource `Tessera::Audience::"<audience>"` | the target (RFC 8707 resource URI or logical audience); no attributes |
//! | `context.task: String` | the task id |
//! | `context.requested_ttl: Long` | requested token lifetime, seconds |
//! | `context.delegation_depth: Long` | 0 = direct exchange, 1 = on behalf of a parent token, ... |
//! | `context.delegator: String` | SPIFFE ID of the delegating party, `""` when direct |
//! | `context.approved: Bool` | a human approved this request |
//! | `context.scopes: Set<String>` | every scope of this request (to forbid combinations) |
//!
//! Operators do not write a schema: the built-in one declares the two entity
//! types and the context record, and one action per `Tessera::Action::"…"`
//! literal found in the policies (each applies to principal `Workload`,
//! resource `Audience` and the context above). A `*.cedarschema` file in the
//! directory replaces the built-in schema; it must declare the same entity
//! types, attributes and context record (it may add action groups). Policies
//! are validated in strict mode at load; any error rejects the whole load.
//!
//! Annotations: `@id("…")` names a policy (default `<file name>#<index>`, ids
//! unique across files), `@max_ttl("300s")` caps the token lifetime (humantime
//! syntax; the minimum over the determining permit policies wins),
//! `@require_approval` asks for a human approval (any value),
//! `@allow_delegation` lets the permit apply to delegated exchanges (the
//! subject token is an access token acted on); without it a permit only
//! serves direct ones.
//! `@bearer` lets the scope be issued in a bearer token (no `cnf`): a token
//! is issued unbound only when every determining permit of every granted
//! scope says so, and bound to the caller's certificate otherwise.
//!
//! Semantics are Cedar's: default deny, any satisfied `forbid` wins.
//! Files: every `*.cedar` (and `*.cedarschema`) directly in the directory,
//! in name order; hidden files and editor temporaries are ignored.
//! See `docs/policy.md` for examples.
//!
//! # Slicing
//!
//! Cedar's authorizer scans every policy of the set it is given (~1 µs per
//! policy), so at load every policy is indexed by its action scope constraint
//! and its resource scope constraint, and a ready [`PolicySet`] is built for
//! every (action, audience) key that can occur. A request evaluates only the
//! slice for its (scope, audience); a scope no policy can match is denied
//! without calling Cedar. Slicing never changes a decision (tested against the
//! full set).

mod index;
mod load;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sync::Mutex;
use std::time::Duration;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request,
    RestrictedExpression,
};

use index::{Index, Lookup};

/// Where a load error was found: a file and, when known, a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<u32>,
    pub col: Option<u32>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.col {
                write!(f, ":{col}")?;
            }
        }
        Ok(())
    }
}

/// Why a policy directory could not be loaded. The old policies stay active.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy directory {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Read { file: PathBuf, message: String },
    #[error("{location}: parse error: {message}")]
    Parse { location: Location, message: String },
    #[error("{location}: schema error: {message}")]
    Schema { location: Location, message: String },
    #[error("{location}: policy `{policy_id}` failed validation: {message}")]
    Validation {
        location: Location,
        policy_id: String,
        message: String,
    },
    #[error("{location}: policy `{policy_id}`: {message}")]
    Annotation {
        location: Location,
        policy_id: String,
        message: String,
    },
    #[error("duplicate policy id `{id}` ({first} and {second})")]
    DuplicateId {
        id: String,
        first: Location,
        second: Location,
    },
    #[error("{location}: policy templates (`?principal`, `?resource`) are not supported")]
    Template { location: Location },
    #[error("policy index: {0}")]
    Index(String),
}

/// Result of [`PolicyStore::reload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// No `*.cedar` / `*.cedarschema` file changed; nothing was re-parsed.
    Unchanged,
    /// The new policies are active.
    Reloaded { policies: usize },
}

/// One token-exchange request, as seen by the policies.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    /// Caller SPIFFE ID, e.g. `spiffe://example.org/agent/planner`.
    pub principal: &'a str,
    /// Attested selectors as `type:value` strings, e.g. `unix:uid:1000`, `k8s:ns:prod`.
    pub selectors: &'a [String],
    /// The one target (RFC 8707 resource URI or logical audience).
    pub audience: &'a str,
    /// Requested scopes; each is evaluated as one Cedar action.
    pub scopes: &'a [String],
    pub task_id: &'a str,
    pub requested_ttl_secs: i64,
    /// 0 = direct exchange, 1 = on behalf of a parent token, ...
    pub delegation_depth: i64,
    /// SPIFFE ID of the party whose token is being delegated (`None` when direct).
    pub delegator: Option<&'a str>,
    /// A human approved this request (second evaluation after approval).
    pub approved: bool,
}

/// The decision for every requested scope, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub scopes: Vec<ScopeDecision>,
}

impl PolicyDecision {
    /// True if every scope was allowed (and there was at least one).
    pub fn all_allowed(&self) -> bool {
        !self.scopes.is_empty() && self.scopes.iter().all(|s| s.allowed)
    }
}

/// The decision for one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeDecision {
    pub scope: String,
    pub allowed: bool,
    /// Determining policies (the satisfied permits when allowed, the satisfied
    /// forbids when denied by one), sorted.
    pub policy_ids: Vec<String>,
    /// Minimum `@max_ttl` over the determining permit policies.
    pub max_ttl: Option<Duration>,
    /// Some determining permit policy carries `@require_approval`.
    pub approval_required: bool,
    /// Some determining permit policy carries `@allow_delegation`: the scope
    /// may be granted to a workload acting on behalf of another (delegation
    /// is opt-in per policy, so a permit written for direct use never lets a
    /// parent token be passed around).
    pub delegation_allowed: bool,
    /// Every determining permit policy carries `@bearer`: the scope may be
    /// issued in a token not bound to the caller's certificate.
    pub bearer_allowed: bool,
    /// Evaluation errors (policy id and message); an erroring policy is skipped.
    pub errors: Vec<String>,
}

impl ScopeDecision {
    fn deny(scope: &str) -> Self {
        Self {
            scope: scope.to_owned(),
            allowed: false,
            policy_ids: Vec::new(),
            max_ttl: None,
            approval_required: false,
            delegation_allowed: false,
            bearer_allowed: false,
            errors: Vec::new(),
        }
    }
}

/// Obligations carried by one policy's annotations.
#[derive(Debug, Clone, Copy, Default)]
struct PolicyMeta {
    max_ttl: Option<Duration>,
    require_approval: bool,
    allow_delegation: bool,
    bearer: bool,
}

/// One loaded generation of policies; immutable, swapped whole on reload.
struct PolicySnapshot {
    fingerprint: u64,
    policy_count: usize,
    index: Index,
    meta: HashMap<String, PolicyMeta>,
    /// Action entities of a custom schema (for action groups); empty otherwise.
    base_entities: Entities,
    workload_type: EntityTypeName,
    audience_type: EntityTypeName,
    authorizer: Authorizer,
    /// Principal entities already built, by [`principal_key`]; they are
    /// valid for this snapshot only (its base entities and types), so a
    /// reload starts afresh.
    principals: Mutex<HashMap<String, Arc<PrincipalEntities>>>,
}

/// Most principal entities a snapshot keeps (one per caller identity and
/// selector set on the node); when full it starts over.
const PRINCIPAL_CACHE_LIMIT: usize = 1024;

/// A principal's entity (SPIFFE ID, trust domain, path, selectors) with the
/// snapshot's base entities: the same for every request of one caller, and
/// most of what a decision cost before it was kept (Cedar evaluates each
/// attribute and computes the entity graph's closure when it is built).
struct PrincipalEntities {
    principal: EntityUid,
    entities: Entities,
}

/// A key naming exactly one (principal, selectors) pair: every part is
/// prefixed with its length, so no two different lists share a key
/// whatever characters a selector holds.
fn principal_key(principal: &str, selectors: &[String]) -> String {
    use std::fmt::Write as _;
    let mut key = String::with_capacity(
        principal.len() + selectors.iter().map(|s| s.len() + 6).sum::<usize>() + 6,
    );
    for part in std::iter::once(principal).chain(selectors.iter().map(String::as_str)) {
        let _ = write!(key, "{}:", part.len());
        key.push_str(part);
    }
    key
}

/// The active Cedar policies, hot-swappable. `Send + Sync`; share it behind `Arc`.
pub struct PolicyStore {
    dir: Option<PathBuf>,
    current: ArcSwap<PolicySnapshot>,
    reload_lock: Mutex<()>,
}

impl fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyStore")
            .field("dir", &self.dir)
            .field("policies", &self.policy_count())
            .finish()
    }
}

impl PolicyStore {
    /// Load every policy in `dir`. `None` means no policies: everything is
    /// denied. Parse and validation errors name the file, line and column.
    pub fn load(dir: Option<&Path>) -> Result<Self, PolicyError> {
        let snapshot = match dir {
            None => load::empty_snapshot()?,
            Some(dir) => {
                let files = load::read_dir(dir)?;
                load::build_snapshot(&files)?
            }
        };
        Ok(Self {
            dir: dir.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(snapshot),
            reload_lock: Mutex::new(()),
        })
    }

    /// Re-read the directory. On any error the old policies stay active and
    /// the error is returned (for the caller to log).
    /// A store for `dir` that denies everything until [`Self::reload`] finds a
    /// valid set there: what an agent starts with when its policies are
    /// invalid, so one bad file cannot take the Workload API down with it.
    pub fn deny_all_until_valid(dir: &Path) -> Result<Self, PolicyError> {
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            current: ArcSwap::from_pointee(load::empty_snapshot()?),
            reload_lock: Mutex::new(()),
        })
    }

    pub fn reload(&self) -> Result<ReloadOutcome, PolicyError> {
        let Some(dir) = &self.dir else {
            return Ok(ReloadOutcome::Unchanged);
        };
        let _serialized = self.reload_lock.lock();
        let files = load::read_dir(dir)?;
        if files.fingerprint == self.current.load().fingerprint {
            return Ok(ReloadOutcome::Unchanged);
        }
        let snapshot = load::build_snapshot(&files)?;
        let policies = snapshot.policy_count;
        self.current.store(Arc::new(snapshot));
        Ok(ReloadOutcome::Reloaded { policies })
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Number of active policies.
    pub fn policy_count(&self) -> usize {
        self.current.load().policy_count
    }

    /// Decide every scope of `req`. Never panics; errors are reported in the
    /// decision and count as "policy not satisfied".
    pub fn evaluate(&self, req: &PolicyRequest<'_>) -> PolicyDecision {
        self.current.load().evaluate(req)
    }
}

/// Splits `spiffe://td/path` into (`td`, `/path`); anything else gives empty strings.
fn split_spiffe_id(id: &str) -> (&str, &str) {
    match id.strip_prefix("spiffe://") {
        Some(rest) => match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        },
        None => ("", ""),
    }
}

fn string_set<'s>(items: impl IntoIterator<Item = &'s String>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .into_iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

/// Per-request Cedar inputs shared by all its scopes, built on first need.
struct Prepared {
    principal: Arc<PrincipalEntities>,
    resource: EntityUid,
    context: Context,
}

impl PolicySnapshot {
    fn prepare(&self, req: &PolicyRequest<'_>) -> Result<Prepared, String> {
        let resource = EntityUid::from_type_name_and_id(
            self.audience_type.clone(),
            EntityId::new(req.audience),
        );
        let principal = self.principal_entities(req.principal, req.selectors)?;
        let context = Context::from_pairs([
            (
                "task".to_owned(),
                RestrictedExpression::new_string(req.task_id.to_owned()),
            ),
            (
                "requested_ttl".to_owned(),
                RestrictedExpression::new_long(req.requested_ttl_secs),
            ),
            (
                "delegation_depth".to_owned(),
                RestrictedExpression::new_long(req.delegation_depth),
            ),
            (
                "delegator".to_owned(),
                RestrictedExpression::new_string(req.delegator.unwrap_or("").to_owned()),
            ),
            (
                "approved".to_owned(),
                RestrictedExpression::new_bool(req.approved),
            ),
            ("scopes".to_owned(), string_set(req.scopes)),
        ])
        .map_err(|e| format!("context: {e}"))?;
        Ok(Prepared {
            principal,
            resource,
            context,
        })
    }

    /// The entities of `principal` with `selectors`: kept from an earlier
    /// request, or built (and kept) now.
    fn principal_entities(
        &self,
        principal: &str,
        selectors: &[String],
    ) -> Result<Arc<PrincipalEntities>, String> {
        let key = principal_key(principal, selectors);
        if let Some(known) = self.principals.lock().get(&key) {
            return Ok(known.clone());
        }
        let uid =
            EntityUid::from_type_name_and_id(self.workload_type.clone(), EntityId::new(principal));
        let (trust_domain, path) = split_spiffe_id(principal);
        let attrs = HashMap::from([
            (
                "spiffe_id".to_owned(),
                RestrictedExpression::new_string(principal.to_owned()),
            ),
            (
                "trust_domain".to_owned(),
                RestrictedExpression::new_string(trust_domain.to_owned()),
            ),
            (
                "path".to_owned(),
                RestrictedExpression::new_string(path.to_owned()),
            ),
            ("selectors".to_owned(), string_set(selectors)),
        ]);
        let entity = Entity::new(uid.clone(), attrs, HashSet::new())
            .map_err(|e| format!("principal entity: {e}"))?;
        let entities = if self.base_entities.is_empty() {
            Entities::from_entities([entity], None)
        } else {
            self.base_entities.clone().add_entities([entity], None)
        }
        .map_err(|e| format!("entities: {e}"))?;
        let built = Arc::new(PrincipalEntities {
            principal: uid,
            entities,
        });
        let mut principals = self.principals.lock();
        if principals.len() >= PRINCIPAL_CACHE_LIMIT {
            principals.clear();
        }
        principals.insert(key, built.clone());
        Ok(built)
    }

    fn evaluate(&self, req: &PolicyRequest<'_>) -> PolicyDecision {
        let mut prepared: Option<Result<Prepared, String>> = None;
        let scopes = req
            .scopes
            .iter()
            .map(|scope| {
                let lookup = self.index.lookup(scope, req.audience);
                if lookup.is_empty() {
                    return ScopeDecision::deny(scope);
                }
                let prepared = prepared.get_or_insert_with(|| self.prepare(req));
                match prepared {
                    Ok(p) => self.decide(scope, &lookup, p),
                    Err(e) => {
                        let mut d = ScopeDecision::deny(scope);
                        d.errors.push(e.clone());
                        d
                    }
                }
            })
            .collect();
        PolicyDecision { scopes }
    }

    /// Evaluates the (disjoint) slices for one scope and merges their
    /// responses exactly as Cedar would over their union.
    fn decide(&self, scope: &str, lookup: &Lookup<'_>, p: &Prepared) -> ScopeDecision {
        let mut decision = ScopeDecision::deny(scope);
        let action = lookup.action_uid(scope);
        let request = match Request::new(
            p.principal.principal.clone(),
            action,
            p.resource.clone(),
            p.context.clone(),
            None,
        ) {
            Ok(r) => r,
            Err(e) => {
                decision.errors.push(format!("request: {e}"));
                return decision;
            }
        };
        let mut permits = BTreeSet::new();
        let mut forbids = BTreeSet::new();
        for set in lookup.sets() {
            let response = self
                .authorizer
                .is_authorized(&request, set, &p.principal.entities);
            let reasons = response
                .diagnostics()
                .reason()
                .map(|id| AsRef::<str>::as_ref(id).to_owned());
            match response.decision() {
                Decision::Allow => permits.extend(reasons),
                Decision::Deny => forbids.extend(reasons),
            }
            decision
                .errors
                .extend(response.diagnostics().errors().map(|e| e.to_string()));
        }
        if !forbids.is_empty() {
            decision.policy_ids = forbids.into_iter().collect();
        } else if !permits.is_empty() {
            decision.allowed = true;
            decision.bearer_allowed = true;
            for id in &permits {
                if let Some(meta) = self.meta.get(id) {
                    decision.approval_required |= meta.require_approval;
                    decision.delegation_allowed |= meta.allow_delegation;
                    decision.bearer_allowed &= meta.bearer;
                    decision.max_ttl = match (decision.max_ttl, meta.max_ttl) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            decision.policy_ids = permits.into_iter().collect();
        }
        decision.errors.sort();
        decision
    }
}

/// Compile-time check: the store is shared across tasks.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<PolicyStore>();
};
