//! Human approval of exchanges that policy marks `@require_approval`.
//!
//! An exchange that needs approval creates a pending [`Approval`] bound to a
//! fingerprint of the request (caller, principal, audience, scopes, task,
//! delegating token), and the client polls with the returned `approval_id`.
//! An operator approves or denies it on the admin socket. An approval is
//! time-boxed twice: it must be decided within `approval_timeout`, and an
//! approved request must be redeemed within `approval_grant_ttl`; it is
//! redeemed at most once. No token exists before approval.

use crate::sync::Mutex;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock::unix_seconds;

/// At most this many undecided approvals per principal, so one workload
/// cannot flood operators (or memory).
const MAX_PENDING_PER_PRINCIPAL: usize = 16;
const MAX_APPROVALS: usize = 4096;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ApprovalState {
    Pending,
    Approved { by: String, at: u64 },
    Denied { by: String, at: u64 },
    Redeemed { at: u64 },
}

/// What an operator sees, and what the audit log records, about one
/// request: exactly what would be issued. An approved request is issued no
/// more than this (scopes, lifetime), whatever policy says at redemption.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub caller: String,
    pub principal: String,
    pub audience: String,
    pub scopes: Vec<String>,
    /// The longest lifetime the token could get, in seconds.
    pub ttl_seconds: u64,
    pub task_id: String,
    pub delegation_depth: u32,
    /// The delegating tokens' actors, nearest first (empty when not
    /// delegated).
    pub delegation_chain: Vec<String>,
    /// The workload the issued token will let act on its behalf (`may_act`).
    pub may_act: Option<String>,
    pub policy_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    pub id: String,
    #[serde(flatten)]
    pub request: ApprovalRequest,
    #[serde(flatten)]
    pub state: ApprovalState,
    pub created: u64,
    /// Pending: decide before this; approved: redeem before this.
    pub deadline: u64,
    #[serde(skip)]
    fingerprint: String,
}

/// What a poll with an `approval_id` finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    Pending,
    /// Approved: what the operator approved, the most that may be issued.
    Approved(Box<ApprovalRequest>),
    Denied,
    Expired,
    /// Unknown id, or an id issued for a different request.
    Unknown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no approval {0:?}")]
    NotFound(String),
    #[error("approval {0:?} was already decided")]
    AlreadyDecided(String),
    #[error("approval {0:?} expired before it was decided")]
    Expired(String),
    #[error("too many approvals are pending for {0}; decide or let them expire first")]
    TooMany(String),
}

#[derive(Default)]
pub struct ApprovalBook {
    approvals: Mutex<HashMap<String, Approval>>,
}

impl ApprovalBook {
    fn lock(&self) -> crate::sync::MutexGuard<'_, HashMap<String, Approval>> {
        self.approvals.lock()
    }

    /// Opens a pending approval and returns its id.
    pub fn create(
        &self,
        request: ApprovalRequest,
        fingerprint: String,
        now: SystemTime,
        timeout: Duration,
    ) -> Result<String, ApprovalError> {
        let mut book = self.lock();
        prune(&mut book, unix_seconds(now));
        let pending_for_principal = book
            .values()
            .filter(|a| {
                a.state == ApprovalState::Pending && a.request.principal == request.principal
            })
            .count();
        if pending_for_principal >= MAX_PENDING_PER_PRINCIPAL || book.len() >= MAX_APPROVALS {
            return Err(ApprovalError::TooMany(request.principal));
        }
        let id = format!("apr_{}", crate::identity::jws::random_kid());
        let created = unix_seconds(now);
        book.insert(
            id.clone(),
            Approval {
                id: id.clone(),
                request,
                state: ApprovalState::Pending,
                created,
                deadline: created + timeout.as_secs().max(1),
                fingerprint,
            },
        );
        Ok(id)
    }

    /// The state of `id` for a request with `fingerprint`.
    pub fn poll(&self, id: &str, fingerprint: &str, now: SystemTime) -> Poll {
        let now = unix_seconds(now);
        let book = self.lock();
        match book.get(id) {
            Some(a) if a.fingerprint != fingerprint => Poll::Unknown,
            None => Poll::Unknown,
            Some(a) => match &a.state {
                _ if now >= a.deadline => Poll::Expired,
                ApprovalState::Pending => Poll::Pending,
                ApprovalState::Approved { .. } => Poll::Approved(Box::new(a.request.clone())),
                ApprovalState::Denied { .. } => Poll::Denied,
                ApprovalState::Redeemed { .. } => Poll::Unknown,
            },
        }
    }

    /// Marks an approved request as used; true only the first time.
    pub fn redeem(&self, id: &str, fingerprint: &str, now: SystemTime) -> bool {
        let now = unix_seconds(now);
        let mut book = self.lock();
        match book.get_mut(id) {
            Some(a)
                if a.fingerprint == fingerprint
                    && now < a.deadline
                    && matches!(a.state, ApprovalState::Approved { .. }) =>
            {
                a.state = ApprovalState::Redeemed { at: now };
                true
            }
            _ => false,
        }
    }

    /// An operator's decision. Approval restarts the clock: the client then
    /// has `grant_ttl` to redeem it.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        operator: &str,
        now: SystemTime,
        grant_ttl: Duration,
    ) -> Result<Approval, ApprovalError> {
        let now = unix_seconds(now);
        let mut book = self.lock();
        let a = book
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound(id.to_string()))?;
        if a.state != ApprovalState::Pending {
            return Err(ApprovalError::AlreadyDecided(id.to_string()));
        }
        if now >= a.deadline {
            return Err(ApprovalError::Expired(id.to_string()));
        }
        if approve {
            a.state = ApprovalState::Approved {
                by: operator.to_string(),
                at: now,
            };
            a.deadline = now + grant_ttl.as_secs().max(1);
        } else {
            a.state = ApprovalState::Denied {
                by: operator.to_string(),
                at: now,
            };
        }
        Ok(a.clone())
    }

    /// Every approval not yet past its deadline, oldest first.
    pub fn list(&self, now: SystemTime) -> Vec<Approval> {
        let mut book = self.lock();
        prune(&mut book, unix_seconds(now));
        let mut all: Vec<Approval> = book.values().cloned().collect();
        all.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        all
    }

    pub fn pending(&self) -> usize {
        self.lock()
            .values()
            .filter(|a| a.state == ApprovalState::Pending)
            .count()
    }

    /// Drops every approval for a task that has ended.
    pub fn cancel_task(&self, principal: &str, task_id: &str) {
        self.lock()
            .retain(|_, a| !(a.request.principal == principal && a.request.task_id == task_id));
    }
}

/// Decided or expired approvals are kept a minute past their deadline so a
/// late poll still gets a precise answer, then forgotten.
fn prune(book: &mut HashMap<String, Approval>, now: u64) {
    book.retain(|_, a| now < a.deadline + 60);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(principal: &str) -> ApprovalRequest {
        ApprovalRequest {
            caller: principal.into(),
            principal: principal.into(),
            audience: "aud".into(),
            scopes: vec!["s".into()],
            ttl_seconds: 60,
            task_id: "t".into(),
            delegation_depth: 0,
            delegation_chain: vec![],
            may_act: None,
            policy_ids: vec![],
        }
    }

    #[test]
    fn lifecycle_pending_approved_redeemed_once() {
        let book = ApprovalBook::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let min = Duration::from_secs(60);
        let id = book.create(request("p"), "fp".into(), t0, min).unwrap();
        assert_eq!(book.poll(&id, "fp", t0), Poll::Pending);
        assert_eq!(book.poll(&id, "other request", t0), Poll::Unknown);
        assert!(!book.redeem(&id, "fp", t0), "not approved yet");
        book.decide(&id, true, "uid:0", t0, min).unwrap();
        assert_eq!(
            book.decide(&id, false, "uid:0", t0, min).unwrap_err(),
            ApprovalError::AlreadyDecided(id.clone())
        );
        assert_eq!(
            book.poll(&id, "fp", t0),
            Poll::Approved(Box::new(request("p")))
        );
        assert!(book.redeem(&id, "fp", t0));
        assert!(!book.redeem(&id, "fp", t0), "single use");
    }

    #[test]
    fn denial_expiry_and_limits() {
        let book = ApprovalBook::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let min = Duration::from_secs(60);
        let a = book.create(request("p"), "a".into(), t0, min).unwrap();
        book.decide(&a, false, "uid:0", t0, min).unwrap();
        assert_eq!(book.poll(&a, "a", t0), Poll::Denied);
        let b = book.create(request("p"), "b".into(), t0, min).unwrap();
        let late = t0 + Duration::from_secs(61);
        assert_eq!(book.poll(&b, "b", late), Poll::Expired);
        assert_eq!(
            book.decide(&b, true, "uid:0", late, min).unwrap_err(),
            ApprovalError::Expired(b.clone())
        );
        for i in 0..MAX_PENDING_PER_PRINCIPAL - 1 {
            book.create(request("q"), format!("q{i}"), t0, min).unwrap();
        }
        book.create(request("q"), "last".into(), t0, min).unwrap();
        assert!(matches!(
            book.create(request("q"), "one too many".into(), t0, min),
            Err(ApprovalError::TooMany(_))
        ));
        book.cancel_task("q", "t");
        assert!(book.list(t0).iter().all(|a| a.request.principal != "q"));
    }
}
