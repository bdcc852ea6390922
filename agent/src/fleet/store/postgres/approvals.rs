//! Nodes' pending approvals in PostgreSQL ([`ApprovalStore`]).
//!
//! One row of `tessera_approvals` per node and approval id (keyed by the
//! same name as an `ApprovalRequest` object). An operator's decision at the
//! authority is one `UPDATE ... WHERE decision IS NULL`: of two decisions,
//! on one replica or two, the database keeps the first and the second
//! updates nothing. The table is read whole at every notification and
//! every [`super::POLL`] (pending approvals are few), and handed to
//! [`FleetApprovals`] in the shape of `ApprovalRequest` objects, so both
//! stores are read by one function. Rows a minute past their deadline are
//! deleted.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Database, TableFollower, as_i64, timed};
use crate::fleet::approvals::{
    ApprovalFuture, ApprovalStore, DecideError, FleetApprovals, spec_of,
};
use crate::fleet::store::StoreError;
use crate::fleet::wire::PendingApproval;

/// The user decisions are written under in the rows' object shape: the
/// replicas themselves (only they decide; `decided_by` is the operator).
pub const AUTHORITY_USER: &str = "tessera-authority";

const COLUMNS: &str = "name, node, approval_id, deadline, request::text, decision, decided_by";

pub struct PgApprovals {
    db: Arc<Database>,
}

impl PgApprovals {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

/// A row in the shape of an `ApprovalRequest` object.
fn object_of(row: &tokio_postgres::Row) -> Value {
    let mut spec: Value = serde_json::from_str(row.get::<_, &str>(4)).unwrap_or_default();
    if !spec.is_object() {
        spec = json!({});
    }
    spec["node"] = json!(row.get::<_, String>(1));
    spec["approvalId"] = json!(row.get::<_, String>(2));
    spec["deadline"] = json!(u64::try_from(row.get::<_, i64>(3)).unwrap_or(0));
    if let (Some(decision), Some(by)) = (
        row.get::<_, Option<String>>(5),
        row.get::<_, Option<String>>(6),
    ) {
        spec["decision"] = json!(decision);
        spec["decidedBy"] = json!(AUTHORITY_USER);
        spec["operator"] = json!(by);
    }
    json!({"metadata": {"name": row.get::<_, String>(0)}, "spec": spec})
}

async fn read_all(client: &Client) -> Result<Vec<Value>, StoreError> {
    let rows = timed(
        "read approvals",
        client.query(&format!("SELECT {COLUMNS} FROM tessera_approvals"), &[]),
    )
    .await?;
    Ok(rows.iter().map(object_of).collect())
}

impl ApprovalStore for PgApprovals {
    fn create<'a>(
        &'a self,
        name: &'a str,
        node: &'a str,
        p: &'a PendingApproval,
    ) -> ApprovalFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let client = self.db.client().await.map_err(|e| e.to_string())?;
            let n = timed(
                "insert an approval",
                client.execute(
                    "INSERT INTO tessera_approvals (name, node, approval_id, deadline, request) \
                     VALUES ($1, $2, $3, $4, ($5::text)::jsonb) ON CONFLICT DO NOTHING",
                    &[
                        &name,
                        &node,
                        &p.id,
                        &as_i64(p.deadline),
                        &spec_of(node, p).to_string(),
                    ],
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(n == 1)
        })
    }

    fn decide<'a>(
        &'a self,
        name: &'a str,
        id: &'a str,
        approve: bool,
        operator: &'a spiffe::SpiffeId,
        _user: &'a str,
        now: u64,
    ) -> ApprovalFuture<'a, Result<Value, DecideError>> {
        Box::pin(async move {
            let store = |e: StoreError| DecideError::Store(e.to_string());
            let client = self.db.client().await.map_err(store)?;
            let decision = if approve { "approved" } else { "denied" };
            let row = timed(
                "decide an approval",
                client.query_opt(
                    &format!(
                        "UPDATE tessera_approvals SET decision = $2, decided_by = $3, decided_at = now() \
                         WHERE name = $1 AND decision IS NULL AND deadline > $4 RETURNING {COLUMNS}"
                    ),
                    &[&name, &decision, &operator.to_string(), &as_i64(now)],
                ),
            )
            .await
            .map_err(store)?;
            if let Some(row) = row {
                return Ok(crate::fleet::approvals::listed(&object_of(&row)));
            }
            // Not updated: say why (decided first by someone, or expired).
            let row = timed(
                "read an approval",
                client.query_opt(
                    "SELECT decision, decided_by FROM tessera_approvals WHERE name = $1",
                    &[&name],
                ),
            )
            .await
            .map_err(store)?;
            match row {
                None => Err(DecideError::NotFound(id.to_string())),
                Some(r) => match r.get::<_, Option<String>>(0) {
                    Some(decision) => Err(DecideError::AlreadyDecided {
                        id: id.to_string(),
                        decision,
                        by: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    }),
                    None => Err(DecideError::Expired(id.to_string())),
                },
            }
        })
    }

    fn collect_expired(&self, now: u64) -> ApprovalFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let client = self.db.client().await.map_err(|e| e.to_string())?;
            timed(
                "delete expired approvals",
                client.execute(
                    "DELETE FROM tessera_approvals WHERE deadline + 60 <= $1",
                    &[&as_i64(now)],
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    fn follow(
        self: Arc<Self>,
        view: Arc<FleetApprovals>,
        shutdown: CancellationToken,
    ) -> ApprovalFuture<'static, ()> {
        Box::pin(async move {
            view.set_user(AUTHORITY_USER.to_string());
            let mut table = TableFollower::new(self.db.clone(), "tessera_approvals", shutdown);
            while let Some(client) = table.next().await {
                match read_all(client).await {
                    Ok(items) => view.reset(&items),
                    Err(e) => table.failed(e).await,
                }
            }
        })
    }
}
