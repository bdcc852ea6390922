//! The operator socket (`admin.socket_path`): decisions only people make.
//! Today that is approving or denying exchanges that policy marked
//! `@require_approval`.
//!
//! The socket is created mode 0600 in a directory of its own (never the
//! workload socket directory, which config validation enforces), and every
//! request is checked again from its kernel credentials: only root or the
//! agent's own user may talk to it.
//!
//! | route | what |
//! |---|---|
//! | `GET /approvals` | pending and recently decided approvals (JSON array) |
//! | `POST /approvals/{id}/approve` | approve; the client can then redeem it |
//! | `POST /approvals/{id}/deny` | deny; the client's next poll gets `access_denied` |

use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, json};
use tokio_util::sync::CancellationToken;

use super::Exchange;
use super::approvals::ApprovalError;
use crate::clock::Clock;
use crate::transport::http::Limits;
use crate::transport::{Acceptor, PeerConnection};

/// The connection's peer credentials, as the accept loop read them.
type Conn = ConnectInfo<Option<PeerConnection>>;

#[derive(Clone)]
struct OperatorState {
    exchange: Arc<Exchange>,
    clock: Arc<dyn Clock>,
    agent_uid: u32,
}

pub async fn serve(
    acceptor: Acceptor,
    exchange: Arc<Exchange>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/approvals", get(list))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/deny", post(deny))
        .with_state(OperatorState {
            exchange,
            clock,
            agent_uid: nix::unistd::geteuid().as_raw(),
        });
    crate::transport::http::serve(acceptor, app, limits, shutdown).await
}

/// The operator's name for the audit log, if they may use this socket.
fn operator(s: &OperatorState, conn: &Option<PeerConnection>) -> Result<String, Box<Response>> {
    match conn.as_ref().map(|c| &c.peer) {
        Some(p) if p.uid == 0 || p.uid == s.agent_uid => Ok(format!("uid:{}", p.uid)),
        _ => Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                axum::Json(
                    json!({"error": "only root or the agent's user may use the operator socket"}),
                ),
            )
                .into_response(),
        )),
    }
}

async fn list(State(s): State<OperatorState>, ConnectInfo(conn): Conn) -> Response {
    if let Err(r) = operator(&s, &conn) {
        return *r;
    }
    axum::Json(s.exchange.approvals.list(s.clock.now())).into_response()
}

async fn approve(state: State<OperatorState>, conn: Conn, Path(id): Path<String>) -> Response {
    decide(state, conn, id, true).await
}

async fn deny(state: State<OperatorState>, conn: Conn, Path(id): Path<String>) -> Response {
    decide(state, conn, id, false).await
}

async fn decide(
    State(s): State<OperatorState>,
    ConnectInfo(conn): Conn,
    id: String,
    approve: bool,
) -> Response {
    let operator = match operator(&s, &conn) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    match decide_and_audit(&s.exchange, &id, approve, &operator, s.clock.now()).await {
        Ok(approval) => axum::Json(approval).into_response(),
        Err(e) => {
            let status = match e {
                ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            (status, axum::Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

/// Applies an operator's decision and writes its one audit record
/// (`approval.decision`, with the operator). Used by the operator socket
/// and by decisions that come from the fleet (the operator is then the
/// Kubernetes user the API server authenticated, `k8s:<user>`); an approval
/// already decided is not decided or audited again.
pub async fn decide_and_audit(
    exchange: &Exchange,
    id: &str,
    approve: bool,
    operator: &str,
    now: std::time::SystemTime,
) -> Result<super::approvals::Approval, ApprovalError> {
    let approval = exchange.approvals.decide(
        id,
        approve,
        operator,
        now,
        exchange.config.approval_grant_ttl,
    )?;
    let mut record = Map::new();
    record.insert("event".into(), "approval.decision".into());
    record.insert("approval_id".into(), id.into());
    record.insert(
        "decision".into(),
        if approve { "approved" } else { "denied" }.into(),
    );
    record.insert("operator".into(), operator.into());
    record.insert(
        "principal".into(),
        approval.request.principal.clone().into(),
    );
    record.insert("task_id".into(), approval.request.task_id.clone().into());
    record.insert("scopes".into(), json!(approval.request.scopes));
    record.insert("audience".into(), approval.request.audience.clone().into());
    record.insert("ttl_seconds".into(), approval.request.ttl_seconds.into());
    record.insert(
        "delegation_chain".into(),
        json!(approval.request.delegation_chain),
    );
    record.insert("may_act".into(), json!(approval.request.may_act));
    exchange.audit_best_effort(record).await;
    tracing::info!(approval_id = %id, %operator, approved = approve, "approval decided");
    Ok(approval)
}
