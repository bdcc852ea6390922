//! Per-task token exchange (RFC 8693): a workload trades its JWT-SVID for a
//! short-lived access token (RFC 9068) that names one audience, exactly the
//! scopes policy grants for one task, the caller's certificate (`cnf`), and,
//! when delegated, the chain of actors (`act`). Ending the task revokes every
//! token issued for it.
//!
//! The flow of one exchange, in order:
//! 1. the caller is attested from its socket credentials (as on the Workload
//!    API) and must hold an identity;
//! 2. the caller's JWT-SVID (the subject token, or the actor token when
//!    delegating) must be valid for this trust domain, its `aud` must contain
//!    our issuer and its `sub` must be one of the caller's IDs;
//! 3. when delegating, the subject token is the access token acted for: it
//!    must be ours, live, for the same audience and task, not narrower than
//!    the request, and name the caller in `may_act` (the holder's consent);
//! 4. Cedar decides each scope ([`policy`]);
//! 5. approval, if a deciding policy requires it ([`approvals`]);
//! 6. TTL = min(requested, policy `@max_ttl`, `max_ttl`, parent token, the
//!    caller's X509-SVID, the signing key);
//! 7. the decision is written to the audit log and made durable, then the
//!    token is returned. Denials are audited too.
//!
//! Transport lives in [`server`]; error codes in [`oauth`]; parsing in
//! [`request`]; durable revocations in [`revocation`]; the operator's
//! approvals socket in [`operator`].

pub mod approvals;
pub mod client;
pub mod config;
pub mod oauth;
pub mod operator;
pub mod policy;
pub mod record;
pub mod remote;
pub mod replay;
pub mod request;
pub mod server;
pub mod tasks;

pub use client::{Caller, ClientCertificate, RemoteCaller};
pub use config::ExchangeConfig;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Map, Value, json};

use crate::audit::{AuditLog, sha256_hex};
use crate::clock::{Clock, unix_seconds};
use crate::entries::Identity;
use crate::identity::{SignError, Signer, SvidCache, TrustStore, jws};
use crate::metrics::{Metrics, ResultLabels};
use crate::revocation::{self, RevocationStore, task_key};
use crate::sync::Mutex;
use policy::{PolicyRequest, PolicyStore};
use tasks::{EndKind, TaskLedger};

use approvals::{ApprovalBook, ApprovalRequest, Poll};
use client::Holder;
use oauth::{ErrorCode, OAuthError};
use record::{AccessClaims, Act, Actor, Confirmation, ExchangeRecord, Granted, MayAct, Requested};
use replay::{ReplayLedger, Use};
use request::{TOKEN_TYPE_ACCESS_TOKEN, Target, TokenRequest};

/// The client of one token request, as its credential proved it: its
/// SPIFFE ID, and what a token for it can be bound to.
struct Client<'c> {
    id: String,
    proof: Proof<'c>,
}

enum Proof<'c> {
    /// An attested local process holding this identity: bound to its
    /// current X509-SVID.
    Local(&'c Identity),
    /// A remote client: bound to its TLS client certificate, if it
    /// presented one.
    Remote(Option<Arc<ClientCertificate>>),
}

/// A successful exchange (RFC 8693 §2.2.1).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: &'static str,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
    pub task_id: String,
}

/// Claim naming the `jti`s of the tokens a delegated token derives from,
/// nearest first: revoking any of them revokes it too (RFC 7009 §2.1 lets a
/// server revoke related tokens).
const DELEGATED_FROM: &str = "delegated_from";

/// A verified delegating token, presented as `subject_token` with the
/// caller's JWT-SVID as `actor_token`.
struct ParentToken {
    sub: String,
    client_id: String,
    aud: String,
    scopes: Vec<String>,
    exp: u64,
    txn: String,
    act: Option<Value>,
    jti: String,
    /// The parent's own `delegated_from`.
    delegated_from: Vec<String>,
    /// The one SPIFFE ID its holder consented to delegate to (`may_act.sub`).
    may_act: Option<String>,
}

/// Who a token is for and on whose behalf it is asked: the principal and
/// task, and the delegating token when there is one.
struct Chain {
    principal: String,
    task_id: String,
    /// No task was named: the token is its own task, named by its `jti`.
    own_task: bool,
    depth: u32,
    /// The delegating token's `client_id`.
    delegator: Option<String>,
    parent: Option<ParentToken>,
}

impl Chain {
    /// The task the request named; `""` for a token that is its own task
    /// (whose id is new at every request, so an approval cannot bind it).
    fn named_task(&self) -> &str {
        if self.own_task { "" } else { &self.task_id }
    }
}

/// What policy permits.
#[derive(Default)]
struct Grant {
    scopes: Vec<String>,
    policy_ids: Vec<String>,
    /// The smallest `@max_ttl` of the deciding policies.
    policy_ttl: Option<Duration>,
    needs_approval: bool,
    /// The lifetime an operator approved, in seconds.
    approved_ttl: Option<u64>,
    /// Every granted scope may go in a bearer token (`@bearer`).
    bearer: bool,
}

/// An approved request is issued no more than the operator saw: scopes
/// policy permits now but that were not approved are dropped (they may have
/// been withheld only until approval), and the lifetime is bounded by the
/// approved one.
fn within_approval(
    grant: &mut Grant,
    approved: &ApprovalRequest,
    record: &mut ExchangeRecord<'_>,
) -> Result<(), OAuthError> {
    let (within, beyond): (Vec<String>, Vec<String>) = grant
        .scopes
        .drain(..)
        .partition(|s| approved.scopes.contains(s));
    if !beyond.is_empty() {
        record.not_approved_scopes = Some(beyond);
    }
    if within.is_empty() {
        return Err(OAuthError::new(
            ErrorCode::AccessDenied,
            "policy no longer permits any scope the operator approved",
        ));
    }
    grant.scopes = within;
    grant.approved_ttl = Some(approved.ttl_seconds);
    Ok(())
}

/// Everything the exchange endpoint needs, shared by all connections.
pub struct Exchange {
    pub config: ExchangeConfig,
    signer: Arc<dyn Signer>,
    trust: Arc<TrustStore>,
    cache: Arc<SvidCache>,
    pub policy: Arc<PolicyStore>,
    revocations: Arc<RevocationStore>,
    audit: AuditLog,
    pub approvals: ApprovalBook,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// The last policy reload error, so a broken file is logged once, not
    /// at every poll.
    last_policy_error: Mutex<Option<String>>,
    /// Which tasks may have live tokens (what ending one must write).
    tasks: TaskLedger,
    /// Per-principal budget for records that change nothing.
    audit_budget: crate::rate_limit::RateLimiter<String>,
    /// Records left out per principal since the last summary.
    suppressed: Mutex<std::collections::HashMap<String, u64>>,
    /// Assertions already presented over HTTPS.
    replays: ReplayLedger,
}

impl Exchange {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ExchangeConfig,
        cache: Arc<SvidCache>,
        policy: Arc<PolicyStore>,
        revocations: Arc<RevocationStore>,
        audit: AuditLog,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.policies_loaded.set(policy.policy_count() as i64);
        let per_minute = f64::from(config.denial_records_per_minute);
        let tasks = TaskLedger::new(
            unix_seconds(clock.now()),
            (config.max_ttl + TASK_END_SLACK).as_secs(),
        );
        Self {
            tasks,
            audit_budget: crate::rate_limit::RateLimiter::new(crate::rate_limit::Budget {
                rate: per_minute / 60.0,
                burst: per_minute,
            }),
            suppressed: Default::default(),
            config,
            signer: cache.signer().clone(),
            trust: cache.trust_store().clone(),
            cache,
            policy,
            revocations,
            audit,
            approvals: ApprovalBook::default(),
            clock,
            metrics,
            last_policy_error: Default::default(),
            replays: ReplayLedger::default(),
        }
    }

    /// The token endpoint's URL under an `https://` issuer (the HTTPS face
    /// serves it), else the URL a Unix-socket HTTP client uses.
    pub fn token_endpoint(&self) -> String {
        self.endpoint(crate::identity::svid::TOKEN_ENDPOINT_PATH)
    }

    fn endpoint(&self, path: &str) -> String {
        if self.config.issuer.starts_with("https://") {
            format!("{}{path}", self.config.issuer)
        } else {
            format!("http://localhost{path}")
        }
    }

    /// What a JWT-SVID presented to the exchange must have in `aud`: the
    /// issuer, or the token endpoint's URL (RFC 7523 §3 allows either).
    fn audiences(&self) -> Vec<String> {
        let mut aud = vec![self.config.issuer.clone()];
        if self.config.issuer.starts_with("https://") {
            aud.push(self.token_endpoint());
        }
        aud
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// `POST /token`.
    pub async fn exchange(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        let started = tokio::time::Instant::now();
        // Announced now, so a commit delay can gather it with the records
        // of other exchanges in progress (`crate::audit`).
        let expected = self.audit.expect();
        let mut record = ExchangeRecord::new(
            req.grant.as_str(),
            caller,
            Requested {
                audience: req.target.as_str(),
                may_act: req.may_act.as_deref(),
                scope_mode: if req.allow_partial { "subset" } else { "exact" },
                scopes: &req.scopes,
                task_id: req.task_id.as_deref(),
                ttl: req.requested_ttl.map(|d| d.as_secs()),
            },
        );
        let outcome = self.decide_and_issue(caller, &req, &mut record).await;
        let (decision, label) = match &outcome {
            Ok(_) => ("issued", "issued"),
            Err(e) if e.code == ErrorCode::AuthorizationPending => ("pending", "pending"),
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::ServerError | ErrorCode::TemporarilyUnavailable
                ) =>
            {
                ("error", "error")
            }
            Err(_) => ("denied", "denied"),
        };
        record.decision = decision;
        if let Err(e) = &outcome {
            record.error = Some(e.code.as_str());
            record.error_description = Some(e.description.clone());
        }
        // The token is released only once its record is durable: an
        // unaudited token must not exist. A request that changed nothing is
        // audited within its principal's budget, and counted beyond it.
        // A remote client counts against the identity it proved, if any.
        let budget = match &record.subject {
            Some(subject) if caller.is_remote() => subject.clone(),
            _ => caller.budget_key(),
        };
        let audited = if outcome.is_ok() || self.may_audit_unchanged(budget) {
            self.audit
                .append_expected(&record, expected)
                .await
                .map(|_| ())
        } else {
            Ok(())
        };
        self.metrics
            .exchanges
            .get_or_create(&ResultLabels { result: label })
            .inc();
        self.metrics
            .exchange_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = audited {
            self.metrics.audit_write_errors.inc();
            tracing::error!(error = %e, "audit log write failed; refusing the exchange");
            return Err(OAuthError::new(
                ErrorCode::TemporarilyUnavailable,
                "the decision could not be recorded in the audit log; try again later",
            ));
        }
        outcome
    }

    /// One exchange, stage by stage (numbered as in the module doc). Each
    /// stage adds what it learnt to the audit `record`.
    async fn decide_and_issue<'r>(
        &self,
        caller: &Caller,
        req: &'r TokenRequest,
        record: &mut ExchangeRecord<'r>,
    ) -> Result<TokenResponse, OAuthError> {
        let now = self.now();
        let now_s = unix_seconds(now);
        let client = self.authenticate(caller, req, now_s, record)?;
        let caller_id = client.id.clone();
        // The token's id, known now: a token asked for without a task is
        // its own task, named by it.
        let jti = jws::random_kid();
        let chain = self.delegation_chain(req, &caller_id, &jti, now_s, record)?;
        if !chain.own_task && self.is_task_ended(&chain.principal, &chain.task_id, now) {
            return Err(OAuthError::invalid_request(format!(
                "task {:?} has ended; start a new task",
                chain.task_id
            )));
        }
        // What an approval is bound to: this very request. Hashed only when
        // an approval is involved, not on every exchange.
        let request_fingerprint = || {
            fingerprint(
                &caller_id,
                &chain.principal,
                req,
                chain.named_task(),
                chain.parent.as_ref(),
            )
        };
        let approval = req
            .approval_id
            .as_ref()
            .map(|id| (id.clone(), request_fingerprint()));
        let approved = self.approval_state(approval.as_ref(), now, record)?;
        // Policy sees what was asked; `max_ttl` bounds the token later, with
        // every other bound (`lifetime`).
        let requested_ttl = req.requested_ttl.unwrap_or(self.config.default_ttl);
        let mut grant = self.decide(
            caller,
            req,
            &caller_id,
            &chain,
            approved.is_some(),
            requested_ttl,
            record,
        )?;
        match &approved {
            Some(approved) => within_approval(&mut grant, approved, record)?,
            None if grant.needs_approval => {
                return Err(self.wait_for_approval(
                    req,
                    &caller_id,
                    &chain,
                    &grant,
                    requested_ttl,
                    request_fingerprint(),
                    now,
                    record,
                )?);
            }
            None => {}
        }
        let (bound_by, ttl, holder) = self
            .lifetime(&client.proof, requested_ttl, &grant, &chain, now)
            .await?;
        if let Some((id, fp)) = &approval
            && !self.approvals.redeem(id, fp, now)
        {
            return Err(OAuthError::invalid_request("approval_id was already used"));
        }
        self.sign(
            req,
            &caller_id,
            chain,
            grant,
            (bound_by, ttl),
            holder.as_ref(),
            jti,
            now_s,
            record,
        )
        .await
    }

    /// Stage 2: the caller's JWT-SVID (whatever parameter carries it)
    /// authenticates the client. A local caller is attested already: the
    /// token must name one of its identities. A remote caller is known only
    /// by it: the token is accepted once (`jti`), must not come from another
    /// issuer, and must name the TLS client certificate's identity if there
    /// is one.
    fn authenticate<'c>(
        &self,
        caller: &'c Caller,
        req: &TokenRequest,
        now_s: u64,
        record: &mut ExchangeRecord<'_>,
    ) -> Result<Client<'c>, OAuthError> {
        let param = req.grant.svid_param(req.delegating_token.is_some());
        let refuse = |why: String| req.grant.credential_error(why);
        let id = match caller {
            Caller::Local { .. } => self.validate_svid(&req.svid).map_err(|e| {
                refuse(format!(
                    "{param} is not a valid JWT-SVID for {}: {e}",
                    self.audiences().join(" or ")
                ))
            })?,
            Caller::Remote(_) => self.validate_remote_svid(req, param, now_s)?,
        };
        record.subject = Some(id.clone());
        if let Some(client_id) = &req.client_id
            && *client_id != id
        {
            return Err(refuse(format!(
                "client_id {client_id} is not the subject of {param} ({id})"
            )));
        }
        let proof = match caller {
            Caller::Local { .. } => Proof::Local(caller.local_identity(&id).ok_or_else(|| {
                refuse(format!(
                    "{param} names {id}, which is not an identity of the calling process"
                ))
            })?),
            Caller::Remote(remote) => match &remote.certificate {
                Some(cert) if cert.spiffe_id != id => {
                    return Err(refuse(format!(
                        "{param} names {id}, but the TLS client certificate is {}'s",
                        cert.spiffe_id
                    )));
                }
                cert => Proof::Remote(cert.clone()),
            },
        };
        Ok(Client { id, proof })
    }

    /// Stage 3: Delegation: the parent token bounds everything.
    fn delegation_chain(
        &self,
        req: &TokenRequest,
        caller_id: &str,
        jti: &str,
        now_s: u64,
        record: &mut ExchangeRecord<'_>,
    ) -> Result<Chain, OAuthError> {
        let parent = match &req.delegating_token {
            None => None,
            Some(t) => Some(self.verify_parent(t, now_s)?),
        };
        let chain = match parent {
            None => {
                let (task_id, own_task) = match &req.task_id {
                    Some(task) => (task.clone(), false),
                    None => (jti.to_string(), true),
                };
                Chain {
                    principal: caller_id.to_string(),
                    task_id,
                    own_task,
                    depth: 0,
                    delegator: None,
                    parent: None,
                }
            }
            Some(p) => {
                // RFC 8693 §4.4: the holder of the delegating token must have
                // named this actor. Without it, anyone who obtained the token
                // (from a log, a compromised resource server) could turn it
                // into a token bound to their own certificate.
                if p.may_act.as_deref() != Some(caller_id) {
                    return Err(OAuthError::invalid_request(match &p.may_act {
                        None => format!(
                            "the delegating token does not consent to delegation: its holder must exchange with may_act={caller_id} (RFC 8693 §4.4)"
                        ),
                        Some(other) => format!(
                            "the delegating token may be acted on only by {other}, not by {caller_id}"
                        ),
                    }));
                }
                if let Some(t) = &req.task_id
                    && *t != p.txn
                {
                    return Err(OAuthError::invalid_request(format!(
                        "task_id {t:?} differs from the delegating token's task {:?}",
                        p.txn
                    )));
                }
                if req.target.as_str() != p.aud {
                    return Err(OAuthError::new(
                        ErrorCode::InvalidTarget,
                        format!(
                            "delegation can only narrow: the delegating token is for {:?}",
                            p.aud
                        ),
                    ));
                }
                if let Some(wider) = req.scopes.iter().find(|s| !p.scopes.contains(s)) {
                    return Err(OAuthError::new(
                        ErrorCode::InvalidScope,
                        format!(
                            "delegation can only narrow: scope {wider:?} is not in the delegating token"
                        ),
                    ));
                }
                let depth = act_depth(p.act.as_ref()) + 1;
                if depth > self.config.max_delegation_depth {
                    return Err(OAuthError::new(
                        ErrorCode::AccessDenied,
                        format!(
                            "delegation depth {depth} exceeds the limit of {}",
                            self.config.max_delegation_depth
                        ),
                    ));
                }
                Chain {
                    principal: p.sub.clone(),
                    task_id: p.txn.clone(),
                    own_task: false,
                    depth,
                    delegator: Some(p.client_id.clone()),
                    parent: Some(p),
                }
            }
        };
        record.principal = Some(chain.principal.clone());
        record.task_id = Some(chain.task_id.clone());
        if let Some(p) = &chain.parent {
            record.actor = Some(Actor {
                delegator: p.client_id.clone(),
                depth: chain.depth,
                parent_jti: p.jti.clone(),
            });
        }
        Ok(chain)
    }

    /// Stage 5a: A request that names an approval: approved, or the answer to
    /// give while it is not.
    fn approval_state(
        &self,
        approval: Option<&(String, String)>,
        now: SystemTime,
        record: &mut ExchangeRecord<'_>,
    ) -> Result<Option<ApprovalRequest>, OAuthError> {
        let Some((id, fp)) = approval else {
            return Ok(None);
        };
        record.approval_id = Some(id.clone());
        match self.approvals.poll(id, fp, now) {
            Poll::Approved(approved) => Ok(Some(*approved)),
            Poll::Pending => Err(self.pending(id)),
            Poll::Denied => Err(OAuthError::new(
                ErrorCode::AccessDenied,
                "an operator denied this request",
            )),
            Poll::Expired => Err(OAuthError::new(
                ErrorCode::ExpiredToken,
                "the approval expired; send the request again without approval_id",
            )),
            Poll::Unknown => Err(OAuthError::invalid_request(
                "approval_id is unknown, already used, or was issued for a different request",
            )),
        }
    }

    /// Stage 4: Policy, one decision per scope.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        caller: &Caller,
        req: &TokenRequest,
        caller_id: &str,
        chain: &Chain,
        approved: bool,
        requested_ttl: Duration,
        record: &mut ExchangeRecord<'_>,
    ) -> Result<Grant, OAuthError> {
        let selectors = caller.selectors();
        let decision = self.policy.evaluate(&PolicyRequest {
            principal: caller_id,
            selectors,
            audience: req.target.as_str(),
            scopes: &req.scopes,
            task_id: &chain.task_id,
            requested_ttl_secs: requested_ttl.as_secs() as i64,
            delegation_depth: i64::from(chain.depth),
            delegator: chain.delegator.as_deref(),
            approved,
        });
        let mut grant = Grant {
            bearer: true,
            ..Grant::default()
        };
        let mut denied = Vec::new();
        let mut delegation_refused = false;
        for d in &decision.scopes {
            for e in &d.errors {
                tracing::warn!(scope = %d.scope, error = %e, "policy evaluation error (treated as not permitting)");
            }
            for id in &d.policy_ids {
                if !grant.policy_ids.contains(id) {
                    grant.policy_ids.push(id.clone());
                }
            }
            if d.allowed && chain.depth > 0 && !d.delegation_allowed {
                // Delegation is opt-in per policy (`@allow_delegation`).
                denied.push(d.scope.clone());
                delegation_refused = true;
            } else if d.allowed {
                grant.scopes.push(d.scope.clone());
                grant.bearer &= d.bearer_allowed;
                grant.needs_approval |= d.approval_required;
                if let Some(t) = d.max_ttl {
                    grant.policy_ttl = Some(grant.policy_ttl.map_or(t, |p| p.min(t)));
                }
            } else {
                denied.push(d.scope.clone());
            }
        }
        grant.policy_ids.sort();
        record.policies = Some(grant.policy_ids.clone());
        record.denied_scopes = Some(denied.clone());
        let why = if delegation_refused {
            " (a delegated exchange needs a permit marked @allow_delegation)"
        } else {
            ""
        };
        if grant.scopes.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::AccessDenied,
                format!(
                    "policy permits none of the requested scopes ({}) for {caller_id} on {:?}{why}",
                    denied.join(" "),
                    req.target.as_str()
                ),
            ));
        }
        if !denied.is_empty() && !req.allow_partial {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                format!(
                    "policy does not permit scope(s) {}{why}; request only permitted scopes, or send scope_mode=subset to accept a subset",
                    denied.join(" ")
                ),
            ));
        }
        Ok(grant)
    }

    /// Stage 5b: Policy wants an operator's approval: park the request and answer
    /// `authorization_pending` (the error to return).
    #[allow(clippy::too_many_arguments)]
    fn wait_for_approval(
        &self,
        req: &TokenRequest,
        caller_id: &str,
        chain: &Chain,
        grant: &Grant,
        requested_ttl: Duration,
        fp: String,
        now: SystemTime,
        record: &mut ExchangeRecord<'_>,
    ) -> Result<OAuthError, OAuthError> {
        // The operator is shown the longest lifetime the token could get;
        // the caller's certificate and the signing key may shorten it.
        let ttl_seconds = [
            Some(requested_ttl),
            Some(self.config.max_ttl),
            grant.policy_ttl,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.config.max_ttl)
        .as_secs();
        let mut delegation_chain = Vec::new();
        if let Some(p) = &chain.parent {
            delegation_chain.push(p.client_id.clone());
            let mut act = p.act.as_ref();
            while let Some(a) = act {
                if let Some(sub) = a.get("sub").and_then(Value::as_str) {
                    delegation_chain.push(sub.to_string());
                }
                act = a.get("act");
            }
        }
        let id = self
            .approvals
            .create(
                ApprovalRequest {
                    caller: caller_id.to_string(),
                    principal: chain.principal.clone(),
                    audience: req.target.as_str().to_string(),
                    scopes: grant.scopes.clone(),
                    ttl_seconds,
                    task_id: chain.task_id.clone(),
                    delegation_depth: chain.depth,
                    delegation_chain,
                    may_act: req.may_act.clone(),
                    policy_ids: grant.policy_ids.clone(),
                },
                fp,
                now,
                self.config.approval_timeout,
            )
            .map_err(|e| OAuthError::new(ErrorCode::AccessDenied, e.to_string()))?;
        self.metrics
            .approvals_pending
            .set(self.approvals.pending() as i64);
        record.approval_id = Some(id.clone());
        tracing::info!(approval_id = %id, principal = %chain.principal, task = %chain.task_id, "exchange waits for an operator's approval");
        Ok(self.pending(&id))
    }

    /// Stage 6: Lifetime: the smallest of every bound, and which one it was; also
    /// the caller's X509-SVID, whose certificate the token is bound to.
    async fn lifetime(
        &self,
        proof: &Proof<'_>,
        requested_ttl: Duration,
        grant: &Grant,
        chain: &Chain,
        now: SystemTime,
    ) -> Result<(&'static str, u64, Option<Holder>), OAuthError> {
        let holder = match proof {
            Proof::Local(identity) => Some(Holder::Svid(
                self.cache
                    .subscribe(&identity.spiffe_id, identity.x509_ttl)
                    .await
                    .map_err(|e| {
                        OAuthError::new(
                            ErrorCode::ServerError,
                            format!("could not get the caller's X509-SVID: {e}"),
                        )
                    })?
                    .rx
                    .borrow()
                    .clone()
                    .ok_or_else(|| {
                        OAuthError::new(ErrorCode::ServerError, "no X509-SVID for caller")
                    })?,
            )),
            Proof::Remote(cert) => cert.clone().map(Holder::Certificate),
        };
        // The binding rule holds whatever the grant: a scope policy did not
        // mark `@bearer` is issued only bound to a certificate.
        if holder.is_none() && !grant.bearer {
            return Err(OAuthError::new(
                ErrorCode::AccessDenied,
                "policy binds these scopes to the client's certificate (RFC 8705) and none was presented: connect with your X509-SVID as TLS client certificate, or ask for scopes policy marks @bearer",
            ));
        }
        let key_not_after = self
            .signer
            .access_token_not_after()
            .map_err(|e| OAuthError::new(ErrorCode::ServerError, format!("no signing key: {e}")))?;
        let mut limits: Vec<(&'static str, u64)> = vec![
            ("requested", requested_ttl.as_secs()),
            ("max_ttl", self.config.max_ttl.as_secs()),
            ("signing key", secs_until(key_not_after, now)),
        ];
        if let Some(h) = &holder {
            limits.push(("caller certificate", secs_until(h.not_after(), now)));
        }
        if let Some(t) = grant.policy_ttl {
            limits.push(("policy", t.as_secs()));
        }
        if let Some(t) = grant.approved_ttl {
            limits.push(("approval", t));
        }
        if let Some(p) = &chain.parent {
            limits.push(("delegating token", p.exp.saturating_sub(unix_seconds(now))));
        }
        let (bound_by, ttl) = limits
            .iter()
            .copied()
            .min_by_key(|(_, t)| *t)
            .unwrap_or(("max_ttl", 0));
        if ttl == 0 {
            return Err(OAuthError::invalid_request(format!(
                "no lifetime left for a token (bounded by the {bound_by})"
            )));
        }
        Ok((bound_by, ttl, holder))
    }

    /// Stage 7: Sign: the claims of RFC 9068 plus `txn` (the task), `cnf` (the
    /// caller's certificate) and `act` (the delegation chain).
    #[allow(clippy::too_many_arguments)]
    async fn sign<'r>(
        &self,
        req: &'r TokenRequest,
        caller_id: &str,
        chain: Chain,
        grant: Grant,
        (bound_by, ttl): (&'static str, u64),
        holder: Option<&Holder>,
        jti: String,
        now_s: u64,
        record: &mut ExchangeRecord<'r>,
    ) -> Result<TokenResponse, OAuthError> {
        let exp = now_s + ttl;
        let scope = grant.scopes.join(" ");
        let delegated_from = chain.parent.as_ref().map(|p| {
            std::iter::once(p.jti.as_str())
                .chain(p.delegated_from.iter().map(String::as_str))
                .collect()
        });
        let claims = AccessClaims {
            iss: &self.config.issuer,
            sub: &chain.principal,
            aud: req.target.as_str(),
            client_id: caller_id,
            scope: &scope,
            iat: now_s,
            nbf: now_s,
            exp,
            jti: &jti,
            txn: &chain.task_id,
            // Bound to the caller's certificate (RFC 8705) unless policy
            // made every granted scope a bearer scope; the token says which
            // it is.
            cnf: holder.filter(|_| !grant.bearer).map(|holder| Confirmation {
                x5t_s256: B64URL.encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    holder.leaf_der(),
                )),
            }),
            act: chain.parent.as_ref().map(|p| Act {
                sub: caller_id,
                act: p.act.as_ref(),
            }),
            delegated_from,
            may_act: req.may_act.as_deref().map(|sub| MayAct { sub }),
        };
        let claims = serde_json::to_string(&claims)
            .map_err(|e| OAuthError::new(ErrorCode::ServerError, format!("signing failed: {e}")))?;
        let token = self
            .signer
            .sign_access_token(&claims)
            .await
            .map_err(|e| match e {
                SignError::Remote(why) => OAuthError::new(
                    ErrorCode::TemporarilyUnavailable,
                    format!("the fleet authority could not sign: {why}"),
                ),
                SignError::Refused(why) => OAuthError::new(
                    ErrorCode::AccessDenied,
                    format!("the fleet authority refused to sign: {why}"),
                ),
                e => OAuthError::new(ErrorCode::ServerError, format!("signing failed: {e}")),
            })?;
        record.token_sha256 = Some(sha256_hex(token.as_bytes()));
        record.jti = Some(jti);
        record.granted = Some(Granted {
            audience: req.target.as_str(),
            bound_to_certificate: !grant.bearer,
            scopes: grant.scopes,
            ttl,
            ttl_bound_by: bound_by,
        });
        self.tasks
            .issued(&task_key(&chain.principal, &chain.task_id), exp, now_s);
        Ok(TokenResponse {
            access_token: token,
            issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
            token_type: "Bearer",
            expires_in: ttl,
            scope,
            task_id: chain.task_id,
        })
    }

    /// Validates a local caller's JWT-SVID and returns its SPIFFE ID.
    ///
    /// Workloads reuse one JWT-SVID for many exchanges (the Workload API
    /// caches them): the trust store remembers a token whose signature
    /// checked out against the current bundle, by its digest, so a repeated
    /// token costs a hash and the claim checks, not an ECDSA verification
    /// (the same cache serves ValidateJWTSVID).
    fn validate_svid(&self, token: &str) -> Result<String, jws::JwtError> {
        let audiences = self.audiences();
        let aud: Vec<&str> = audiences.iter().map(String::as_str).collect();
        let (id, _claims) = self.trust.validate_jwt_for(token, &aud)?;
        Ok(id.to_string())
    }

    /// Validates a remote client's JWT-SVID, its only credential: fully
    /// every time (nothing is remembered but its `jti`), and once.
    fn validate_remote_svid(
        &self,
        req: &TokenRequest,
        param: &str,
        now_s: u64,
    ) -> Result<String, OAuthError> {
        let refuse = |why: String| req.grant.credential_error(format!("{param} {why}"));
        let audiences = self.audiences();
        let aud: Vec<&str> = audiences.iter().map(String::as_str).collect();
        let (id, claims) = self.trust.validate_jwt_for(&req.svid, &aud).map_err(|e| {
            refuse(format!(
                "is not a valid JWT-SVID for {}: {e}",
                audiences.join(" or ")
            ))
        })?;
        let id = id.to_string();
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| {
                refuse("has no jti: over HTTPS a JWT-SVID is accepted once, by its jti".into())
            })?;
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now_s);
        match self.replays.first_use(&id, jti, exp, now_s) {
            Use::First => Ok(id),
            Use::Replayed => {
                self.metrics.assertion_replays.inc();
                Err(refuse(format!(
                    "was already used (jti {jti}): fetch a new JWT-SVID for every request"
                )))
            }
            Use::Full => Err(OAuthError::new(
                ErrorCode::TemporarilyUnavailable,
                "too many live assertions to check this one for replay; try again later",
            )),
        }
    }

    fn pending(&self, id: &str) -> OAuthError {
        OAuthError::new(
            ErrorCode::AuthorizationPending,
            "an operator must approve this request; poll again with approval_id",
        )
        .with("approval_id", id)
        .with(
            "interval",
            self.config.approval_poll_interval.as_secs().max(1),
        )
    }

    /// Checks a delegating token (sent as `subject_token`).
    fn verify_parent(&self, token: &str, now_s: u64) -> Result<ParentToken, OAuthError> {
        let claims = self
            .verify_access_token(token, now_s)
            .map_err(|why| OAuthError::invalid_request(format!("subject_token {why}")))?;
        let text = |k: &str| {
            claims
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(ParentToken {
            sub: text("sub"),
            client_id: text("client_id"),
            aud: text("aud"),
            scopes: text("scope")
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            exp: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
            txn: text("txn"),
            act: claims.get("act").cloned(),
            jti: text("jti"),
            delegated_from: ancestors(&claims),
            may_act: claims
                .get("may_act")
                .and_then(|m| m.get("sub"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Signature by one of our access-token keys, `typ: at+jwt`, our issuer,
    /// inside its validity window, and neither it nor its task revoked.
    /// Returns the claims, or why the token is not active.
    fn verify_access_token(&self, token: &str, now_s: u64) -> Result<Map<String, Value>, String> {
        let keys = self.trust.access_keys();
        let verified = jws::verify_access_token(token, keys.iter()).map_err(|e| e.to_string())?;
        let claims = verified.claims;
        let text = |k: &str| claims.get(k).and_then(Value::as_str);
        if text("iss") != Some(self.config.issuer.as_str()) {
            return Err("was not issued by this exchange".into());
        }
        let (Some(sub), Some(jti), Some(txn), Some(exp), Some(nbf)) = (
            text("sub"),
            text("jti"),
            text("txn"),
            claims.get("exp").and_then(Value::as_u64),
            claims.get("nbf").and_then(Value::as_u64),
        ) else {
            return Err("lacks required claims".into());
        };
        if now_s >= exp {
            return Err("has expired".into());
        }
        if now_s + 30 < nbf {
            return Err("is not valid yet".into());
        }
        // The same instant as the expiry check: a revocation lasts until the
        // token's `exp`, so a second clock read that crossed into the `exp`
        // second would find the revocation over while the expiry check
        // (made a moment earlier) still let the token through.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s);
        if self.revocations.is_token_revoked(jti, now) {
            return Err("has been revoked".into());
        }
        if ancestors(&claims)
            .iter()
            .any(|parent| self.revocations.is_token_revoked(parent, now))
        {
            return Err("derives by delegation from a token that has been revoked".into());
        }
        if self.is_task_ended(sub, txn, now) {
            return Err("belongs to a task that has ended".into());
        }
        Ok(claims)
    }

    /// The revocation state this exchange checks (the fleet client feeds
    /// other nodes' revocations into it and publishes this node's).
    pub fn revocation_store(&self) -> &Arc<RevocationStore> {
        &self.revocations
    }

    /// Authenticates a resource server at the HTTPS face's introspection
    /// and revocation endpoints, adding what it proved to `caller`: its TLS
    /// client certificate (an X509-SVID the handshake verified, still
    /// valid now), and/or `bearer`, a JWT-SVID for this issuer sent as
    /// `Authorization: Bearer`. Unlike an assertion at the token endpoint a
    /// bearer JWT-SVID may be reused until it expires: it obtains nothing,
    /// and resource servers keep one per audience.
    pub fn authenticate_resource_server(
        &self,
        caller: &mut RemoteCaller,
        bearer: Option<&str>,
    ) -> Result<(), OAuthError> {
        let now = self.now();
        caller.proven.clear();
        if let Some(cert) = &caller.certificate {
            if cert.not_after <= now {
                return Err(OAuthError::new(
                    ErrorCode::InvalidClient,
                    "the TLS client certificate has expired; reconnect with a current X509-SVID",
                ));
            }
            caller.proven.push(cert.spiffe_id.clone());
        }
        if let Some(token) = bearer {
            let issuer = [self.config.issuer.as_str()];
            let (id, _) = self.trust.validate_jwt_for(token, &issuer).map_err(|e| {
                OAuthError::new(
                    ErrorCode::InvalidToken,
                    format!(
                        "the bearer credential is not a valid JWT-SVID for {}: {e}",
                        self.config.issuer
                    ),
                )
            })?;
            let id = id.to_string();
            if !caller.proven.contains(&id) {
                caller.proven.push(id);
            }
        }
        if caller.proven.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::InvalidClient,
                format!(
                    "authenticate with an X509-SVID of this trust domain as TLS client certificate, or a JWT-SVID for audience {} as Authorization: Bearer",
                    self.config.issuer
                ),
            ));
        }
        Ok(())
    }

    /// `POST /introspect` (RFC 7662).
    ///
    /// Only the token's parties (a caller holding its `sub` or `client_id`)
    /// see its claims; anyone else, a resource server checking a token it
    /// was shown, learns only that it is active, its `jti` and `exp`.
    pub fn introspect(&self, caller: &Caller, token: &str) -> Value {
        let now_s = unix_seconds(self.now());
        match self.verify_access_token(token, now_s) {
            Ok(claims) => {
                self.metrics
                    .introspections
                    .get_or_create(&ResultLabels { result: "active" })
                    .inc();
                let party = ["sub", "client_id"].iter().any(|k| {
                    claims
                        .get(*k)
                        .and_then(Value::as_str)
                        .is_some_and(|id| caller.holds(id))
                });
                let mut out = Map::new();
                out.insert("active".into(), true.into());
                out.insert("token_type".into(), "Bearer".into());
                for (k, v) in claims {
                    if party || k == "jti" || k == "exp" {
                        out.insert(k, v);
                    }
                }
                Value::Object(out)
            }
            Err(_) => {
                self.metrics
                    .introspections
                    .get_or_create(&ResultLabels { result: "inactive" })
                    .inc();
                json!({"active": false})
            }
        }
    }

    /// `POST /revoke` with `token=` (RFC 7009). The caller must be the
    /// token's client or its principal. Tokens we cannot verify are answered
    /// with success, as RFC 7009 §2.2 asks.
    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> Result<(), OAuthError> {
        let keys = self.trust.access_keys();
        let Ok(verified) = jws::verify_access_token(token, keys.iter()) else {
            return Ok(());
        };
        let c = &verified.claims;
        let text = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default();
        let (jti, exp) = (
            text("jti").to_string(),
            c.get("exp").and_then(Value::as_u64).unwrap_or(0),
        );
        let allowed = caller.holds(text("client_id")) || caller.holds(text("sub"));
        let mut record = Map::new();
        record.insert("event".into(), "token.revoke".into());
        record.insert("caller".into(), caller.audit_json());
        record.insert("jti".into(), jti.clone().into());
        record.insert("task_id".into(), text("txn").into());
        record.insert("token_sha256".into(), sha256_hex(token.as_bytes()).into());
        if !allowed {
            record.insert("decision".into(), "refused".into());
            self.audit_best_effort(record).await;
            self.count_revocation("refused");
            return Err(OAuthError::new(
                ErrorCode::UnauthorizedClient,
                "only the token's client or principal may revoke it",
            ));
        }
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
        self.durable_revocation(move |r| r.revoke_token(&jti, until))
            .await?;
        record.insert("decision".into(), "revoked".into());
        self.audit_best_effort(record).await;
        self.count_revocation("token");
        Ok(())
    }

    /// `POST /revoke` with `task_id=`: the caller ends its task. Every token
    /// issued for it (directly or by delegation) is inactive from now on, and
    /// no new one can be issued. Tasks are keyed by principal, so a workload
    /// can only ever end its own tasks.
    pub async fn end_task(&self, caller: &Caller, task_id: &str) -> Result<(), OAuthError> {
        request::check_id("task_id", task_id)?;
        let now = self.now();
        let now_s = unix_seconds(now);
        // Any token of this task expires within max_ttl from now.
        let until = now + self.config.max_ttl + TASK_END_SLACK;
        for principal in caller.ids() {
            let key = task_key(&principal, task_id);
            // Durable only when a token of the task may be live: ending
            // random task ids must not fill the disk ([`tasks`]).
            let kind = self.tasks.end_kind(&principal, &key, now_s);
            match kind {
                EndKind::Durable => {
                    self.durable_revocation(move |r| r.end_task(&key, until))
                        .await?;
                }
                EndKind::Memory => {
                    self.tasks
                        .end_in_memory(&principal, &key, unix_seconds(until), now_s);
                    self.metrics.task_ends_in_memory.inc();
                }
            }
            self.approvals.cancel_task(&principal, task_id);
            let mut record = Map::new();
            record.insert("event".into(), "task.end".into());
            record.insert("caller".into(), caller.audit_json());
            record.insert("principal".into(), principal.clone().into());
            record.insert("task_id".into(), task_id.into());
            record.insert("decision".into(), "ended".into());
            record.insert("durable".into(), (kind == EndKind::Durable).into());
            if kind == EndKind::Durable || self.may_audit_unchanged(caller.budget_key()) {
                self.audit_best_effort(record).await;
            }
        }
        self.count_revocation("task");
        Ok(())
    }

    /// Whether `principal`'s task has ended (durably or in memory).
    fn is_task_ended(&self, principal: &str, task_id: &str, now: SystemTime) -> bool {
        let key = task_key(principal, task_id);
        self.revocations.is_task_ended(&key, now)
            || self
                .tasks
                .ended_in_memory(principal, &key, unix_seconds(now))
    }

    /// Whether a record that changes nothing (a denial, a pending poll, the
    /// end of a task without tokens) may be written for this caller: at most
    /// `denial_records_per_minute` per principal. Beyond it the record is
    /// counted, and the count written as one `audit.suppressed` record by
    /// [`Exchange::run_maintenance`], so a flooding workload costs one record
    /// per round instead of one fsync per request.
    fn may_audit_unchanged(&self, principal: String) -> bool {
        if self.audit_budget.allow(principal.clone()) {
            return true;
        }
        *self.suppressed.lock().entry(principal).or_default() += 1;
        self.metrics.audit_records_suppressed.inc();
        false
    }

    /// Writes one summary record per principal whose records were left out.
    async fn flush_suppressed(&self) {
        let counts = std::mem::take(&mut *self.suppressed.lock());
        for (principal, count) in counts {
            tracing::warn!(%principal, count, "audit records left out: the principal exceeded exchange.denial_records_per_minute");
            let mut record = Map::new();
            record.insert("event".into(), "audit.suppressed".into());
            record.insert("principal".into(), principal.into());
            record.insert("count".into(), count.into());
            self.audit_best_effort(record).await;
        }
    }

    async fn durable_revocation(
        &self,
        f: impl FnOnce(&RevocationStore) -> Result<(), revocation::RevocationError> + Send + 'static,
    ) -> Result<(), OAuthError> {
        let store = self.revocations.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "revocation could not be made durable");
                Err(OAuthError::new(
                    ErrorCode::TemporarilyUnavailable,
                    format!("revocation could not be recorded: {e}"),
                ))
            }
            Err(e) => Err(OAuthError::new(ErrorCode::ServerError, e.to_string())),
        }
    }

    fn count_revocation(&self, result: &'static str) {
        self.metrics
            .revocations
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records that follow an already-durable state change (revocation,
    /// operator decisions): a failure to audit is logged and counted, but
    /// does not undo the change.
    pub async fn audit_best_effort(&self, record: Map<String, Value>) {
        if let Err(e) = self.audit.append(record).await {
            self.metrics.audit_write_errors.inc();
            tracing::error!(error = %e, "audit log write failed");
        }
    }

    /// RFC 8414 metadata, with the fields the MCP SDKs' schemas require
    /// (`authorization_endpoint`, `response_types_supported`). Over HTTPS
    /// the endpoints are under the issuer URL; on the Unix socket they use
    /// the `http://localhost` authority a UDS HTTP client sends.
    pub fn metadata(&self, over_https: bool) -> Value {
        let url = |path: &str| {
            if over_https {
                format!("{}{path}", self.config.issuer)
            } else {
                format!("http://localhost{path}")
            }
        };
        let mut doc = json!({
            "issuer": self.config.issuer,
            "authorization_endpoint": url("/authorize"),
            "token_endpoint": url("/token"),
            "revocation_endpoint": url("/revoke"),
            "introspection_endpoint": url("/introspect"),
            "jwks_uri": if over_https { url("/token-keys") } else { url("/jwks") },
            "response_types_supported": [],
            "grant_types_supported": [
                request::GRANT_CLIENT_CREDENTIALS,
                request::GRANT_JWT_BEARER,
                request::GRANT_TOKEN_EXCHANGE,
            ],
            // client_credentials authenticates with a JWT-SVID assertion;
            // the jwt-bearer and token-exchange grants carry theirs in the
            // grant, so need no client authentication.
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
            "client_assertion_types_supported": [
                request::CLIENT_ASSERTION_JWT_BEARER,
                request::CLIENT_ASSERTION_JWT_SPIFFE,
            ],
            "tls_client_certificate_bound_access_tokens": true,
            "subject_token_types_supported": [request::TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN],
            "actor_token_types_supported": [request::TOKEN_TYPE_JWT],
            "tessera_task_parameter": "task_id",
        });
        if over_https {
            // Resource servers prove an X509-SVID (RFC 8705
            // tls_client_auth); a JWT-SVID as `Authorization: Bearer`
            // (RFC 7662 §2.1) has no registered method name.
            doc["introspection_endpoint_auth_methods_supported"] = json!(["tls_client_auth"]);
            doc["revocation_endpoint_auth_methods_supported"] = json!(["tls_client_auth"]);
        }
        doc
    }

    /// `GET /jwks`: every access-token key that may have signed a live token.
    pub fn jwks(&self) -> Value {
        let keys = self.trust.access_keys();
        json!({
            "keys": keys.iter().map(|k| {
                let mut j = k.to_json("sig");
                j["alg"] = "ES256".into();
                j
            }).collect::<Vec<_>>()
        })
    }

    /// Re-reads the policy directory (periodic and on SIGHUP); an invalid
    /// change is logged and the previous set stays active.
    pub fn reload_policies(&self) {
        let result = self.policy.reload();
        let mut last_error = self.last_policy_error.lock();
        match result {
            Ok(policy::ReloadOutcome::Unchanged) => {}
            Ok(outcome) => {
                *last_error = None;
                self.metrics
                    .policy_reloads
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                self.metrics
                    .policies_loaded
                    .set(self.policy.policy_count() as i64);
                tracing::info!(?outcome, "policies reloaded");
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    self.metrics
                        .policy_reloads
                        .get_or_create(&ResultLabels { result: "error" })
                        .inc();
                    tracing::error!(error = %message, "policy change rejected; the previous policies stay active");
                    *last_error = Some(message);
                }
            }
        }
    }

    /// Periodic upkeep: policy reload and pruning of expired revocations.
    pub async fn run_maintenance(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config.policy_reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                me.reload_policies();
                // Pruning rewrites a file: do it about once a minute.
                if rounds.is_multiple_of(30)
                    && let Err(e) = me.revocations.prune(me.now())
                {
                    tracing::warn!(error = %e, "could not compact the revocation file");
                }
            })
            .await;
            self.metrics
                .approvals_pending
                .set(self.approvals.pending() as i64);
            self.flush_suppressed().await;
            rounds += 1;
        }
    }
}

/// How long a task's end outlives the longest token it could have: clock
/// skew between the agent and resource servers.
const TASK_END_SLACK: Duration = Duration::from_secs(60);

/// Binds an approval to the exact request it was asked for.
fn fingerprint(
    caller: &str,
    principal: &str,
    req: &TokenRequest,
    task_id: &str,
    parent: Option<&ParentToken>,
) -> String {
    let mut scopes = req.scopes.clone();
    scopes.sort();
    let target = match &req.target {
        Target::Resource(r) => format!("resource={r}"),
        Target::Audience(a) => format!("audience={a}"),
    };
    sha256_hex(
        json!([
            caller,
            principal,
            target,
            scopes,
            task_id,
            req.allow_partial,
            parent.map(|p| &p.jti),
            req.may_act,
        ])
        .to_string()
        .as_bytes(),
    )
}

/// The `delegated_from` claim of a verified token (empty when absent).
fn ancestors(claims: &Map<String, Value>) -> Vec<String> {
    claims
        .get(DELEGATED_FROM)
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Number of actors in an `act` chain.
fn act_depth(act: Option<&Value>) -> u32 {
    let mut depth = 0;
    let mut cur = act;
    while let Some(a) = cur {
        depth += 1;
        cur = a.get("act");
    }
    depth
}

fn secs_until(t: SystemTime, now: SystemTime) -> u64 {
    t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_depth_counts_nested_actors() {
        assert_eq!(act_depth(None), 0);
        let chain = json!({"sub": "c", "act": {"sub": "b"}});
        assert_eq!(act_depth(Some(&chain)), 2);
    }

    #[test]
    fn task_keys_differ_by_principal() {
        assert_ne!(
            task_key("spiffe://td/a", "t"),
            task_key("spiffe://td/b", "t")
        );
        assert_eq!(task_key("spiffe://td/a", "t").len(), 64);
    }
}
