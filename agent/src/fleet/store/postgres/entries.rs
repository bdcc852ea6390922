//! Live registration entries in PostgreSQL (`[server.registration] kind =
//! "postgres"`): rows of `tessera_entries`, the same entries as
//! `ClusterWorkloadEntry` (`scope = 'cluster'`) and `WorkloadEntry`
//! (`scope = 'namespaced'`, with its `namespace`) objects, `spec` holding
//! the object's spec as JSON (`spiffeId`, `selectors`, `hint`, `x509Ttl`,
//! ...), checked by the very same function ([`entry_of`]).
//!
//! Every replica reads the whole table at each notification (an insert, a
//! change of `spec`, a delete) and writes each row's verdict to `status`
//! (`Accepted` or `Invalid`), `message` (naming the field at fault) and
//! `observed_generation` (a trigger bumps `generation` at each change of
//! `spec`), only when they differ. An invalid row changes nothing: a new
//! one is not in force, a changed one keeps its last accepted version in
//! force on the running replicas.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Database, TableFollower, timed};
use crate::fleet::registration::{Key, LiveEntries, RegistrationConfig, Scope, entry_of};
use crate::fleet::status::condition;
use crate::fleet::store::StoreError;

fn scope_of(text: &str) -> Option<Scope> {
    match text {
        "cluster" => Some(Scope::Cluster),
        "namespaced" => Some(Scope::Namespaced),
        _ => None,
    }
}

fn scope_text(scope: Scope) -> &'static str {
    match scope {
        Scope::Cluster => "cluster",
        Scope::Namespaced => "namespaced",
    }
}

/// Starts following `tessera_entries` into `live` until `shutdown`.
pub fn start(
    db: Arc<Database>,
    live: Arc<LiveEntries>,
    td: spiffe::TrustDomain,
    config: RegistrationConfig,
    shutdown: CancellationToken,
) {
    let mut scopes = vec![Scope::Cluster];
    if config.namespaced {
        scopes.push(Scope::Namespaced);
    }
    for scope in &scopes {
        live.watch(*scope);
    }
    tokio::spawn(async move {
        let mut table = TableFollower::new(db, "tessera_entries", shutdown);
        while let Some(client) = table.next().await {
            if let Err(e) = refresh(client, &live, &td, &config, &scopes).await {
                table.failed(e).await;
            }
        }
    });
}

/// Reads every row, puts the valid ones in force and records each verdict.
async fn refresh(
    client: &Client,
    live: &LiveEntries,
    td: &spiffe::TrustDomain,
    config: &RegistrationConfig,
    scopes: &[Scope],
) -> Result<(), StoreError> {
    let rows = timed(
        "read entries",
        client.query(
            "SELECT scope, namespace, name, spec::text, generation, status, message, observed_generation \
             FROM tessera_entries ORDER BY scope, namespace, name",
            &[],
        ),
    )
    .await?;
    let mut present: Vec<Vec<Key>> = vec![Vec::new(); 2];
    let mut accepted = vec![Vec::new(); 2];
    let mut verdicts = Vec::new();
    for row in rows {
        let Some(scope) = scope_of(row.get(0)) else {
            continue;
        };
        if !scopes.contains(&scope) {
            continue;
        }
        let key = Key {
            scope,
            namespace: row.get(1),
            name: row.get(2),
        };
        let spec: serde_json::Value =
            serde_json::from_str(row.get::<_, &str>(3)).unwrap_or(serde_json::Value::Null);
        let generation: i64 = row.get(4);
        let obj = json!({
            "metadata": {"name": key.name, "namespace": key.namespace},
            "spec": spec,
        });
        let verdict = entry_of(scope, &obj, td, config);
        let want = condition(
            generation,
            verdict.as_ref().map(|(_, doc)| doc.spiffe_id.as_str()),
        );
        let (status, message) = (
            want["reason"].as_str().unwrap_or_default().to_string(),
            want["message"].as_str().unwrap_or_default().to_string(),
        );
        let recorded = (
            row.get::<_, &str>(5),
            row.get::<_, &str>(6),
            row.get::<_, i64>(7),
        );
        if recorded != (status.as_str(), message.as_str(), generation) {
            if let Err(e) = &verdict {
                tracing::warn!(entry = %key.source(), error = %e, "registration entry refused");
            }
            verdicts.push((key.clone(), generation, status, message));
        }
        present[scope as usize].push(key.clone());
        if let Ok((e, d)) = verdict {
            accepted[scope as usize].push((key, e, d));
        }
    }
    for scope in scopes {
        live.apply(
            *scope,
            Some(&present[*scope as usize]),
            std::mem::take(&mut accepted[*scope as usize]),
            None,
        );
    }
    for (key, generation, status, message) in verdicts {
        // Only for the generation it judged: a newer spec gets its own.
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            client.execute(
                "UPDATE tessera_entries SET status = $1, message = $2, observed_generation = $3 \
                 WHERE scope = $4 AND namespace = $5 AND name = $6 AND generation = $3",
                &[
                    &status,
                    &message,
                    &generation,
                    &scope_text(key.scope),
                    &key.namespace,
                    &key.name,
                ],
            ),
        )
        .await;
        if !matches!(written, Ok(Ok(_))) {
            tracing::warn!(entry = %key.source(), "could not record a registration entry's status; retrying at the next read");
        }
    }
    Ok(())
}
