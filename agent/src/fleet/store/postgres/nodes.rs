//! Join tokens and node denials in PostgreSQL ([`NodeStore`]).
//!
//! A join token is a row of `tessera_join_tokens` keyed by the token's
//! SHA-256: redeeming deletes it and returns it in one statement, so of any
//! number of replicas racing for one token exactly one gets the row (the
//! database decides). Denials are rows of `tessera_node_denials`, read
//! whole at every notification (they are few) and enforced by
//! [`NodeControl`] exactly as `NodeDenial` objects are.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::json;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Database, TableFollower, as_i64, timed};
use crate::fleet::nodes::{NodeControl, NodeStore, denial_of};
use crate::fleet::store::{StoreError, StoreFuture};

pub struct PgNodes {
    db: Arc<Database>,
}

impl PgNodes {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

/// The SQL that stores a join token for `node` (what `tessera authority
/// join-token --sql` prints for `psql`): only the token's hash.
pub fn join_token_insert(token: &str, node: &str, expires: u64) -> String {
    format!(
        "INSERT INTO tessera_join_tokens (hash, node, expires) VALUES ('{}', '{}', {expires});\n",
        crate::audit::sha256_hex(token.as_bytes()),
        // Node names are checked (letters, digits, '-', '.', '_'): nothing
        // to quote, but never trust that here.
        node.replace('\'', "''"),
    )
}

async fn read_denials(
    client: &Client,
) -> Result<HashMap<String, crate::fleet::nodes::Denial>, StoreError> {
    let rows = timed(
        "read node denials",
        client.query(
            "SELECT name, node_name, node_kind, svid_serial, reason FROM tessera_node_denials",
            &[],
        ),
    )
    .await?;
    let mut out = HashMap::new();
    for row in rows {
        let name: String = row.get(0);
        // In the shape of a NodeDenial object, so both stores are read by
        // one function.
        let obj = json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": row.get::<_, Option<String>>(1),
                "nodeKind": row.get::<_, Option<String>>(2),
                "svidSerial": row.get::<_, Option<String>>(3),
                "reason": row.get::<_, String>(4),
            },
        });
        match denial_of(&obj) {
            Some(d) => {
                out.insert(name, d);
            }
            None => tracing::warn!(
                name,
                "ignoring a node denial row without a valid node_name, node_kind or svid_serial"
            ),
        }
    }
    Ok(out)
}

impl NodeStore for PgNodes {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn take_join_token<'a>(&'a self, hash: &'a str) -> StoreFuture<'a, Option<(String, u64)>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let row = timed(
                "redeem a join token",
                client.query_opt(
                    "DELETE FROM tessera_join_tokens WHERE hash = $1 RETURNING node, expires",
                    &[&hash],
                ),
            )
            .await?;
            Ok(row.map(|r| {
                let expires: i64 = r.get(1);
                (r.get::<_, String>(0), u64::try_from(expires).unwrap_or(0))
            }))
        })
    }

    fn collect_expired_tokens(&self, now: u64) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let n = timed(
                "delete expired join tokens",
                client.execute(
                    "DELETE FROM tessera_join_tokens WHERE expires <= $1",
                    &[&as_i64(now)],
                ),
            )
            .await?;
            Ok(n as usize)
        })
    }

    fn follow_denials(
        self: Arc<Self>,
        control: Arc<NodeControl>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut table = TableFollower::new(self.db.clone(), "tessera_node_denials", shutdown);
            while let Some(client) = table.next().await {
                match read_denials(client).await {
                    Ok(d) => control.reset_denials(d),
                    Err(e) => table.failed(e).await,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_holds_the_hash_only() {
        let sql = join_token_insert("secret-token", "vm-1", 99);
        assert!(sql.contains(&crate::audit::sha256_hex(b"secret-token")));
        assert!(!sql.contains("secret-token"));
        assert!(join_token_insert("t", "a'b", 1).contains("'a''b'"));
    }
}
