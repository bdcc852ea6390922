//! Foreign bundles kept in PostgreSQL ([`KeptBundles`]), the counterpart of
//! the `FederatedBundle` objects on Kubernetes: one row of
//! `tessera_foreign_bundles` per foreign trust domain, holding the document
//! exactly as its endpoint served it (public keys only). Every replica reads
//! the table once at start, so a replica starting while an endpoint is down
//! serves the bundle the fleet last fetched rather than only the bootstrap
//! one; what a replica fetches is written when the document changes, and a
//! relationship that ends deletes its row.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Database, timed};
use crate::federation::state::{KeptBundles, SaveFuture};
use crate::identity::ForeignBundle;
use crate::sync::Mutex;

pub struct PgKeptBundles {
    db: Arc<Database>,
    /// What was read at start, and what this replica wrote since.
    kept: Mutex<HashMap<String, ForeignBundle>>,
}

impl PgKeptBundles {
    /// Reads the kept bundles. The database unreachable or refusing: logged,
    /// and the replica starts from bootstrap bundles.
    pub async fn load(db: Arc<Database>) -> Arc<Self> {
        let mut kept = HashMap::new();
        match read(&db).await {
            Ok(rows) => {
                for (name, document) in rows {
                    match bundle_of(&name, &document) {
                        Ok(b) => {
                            kept.insert(name, b);
                        }
                        Err(why) => tracing::warn!(
                            trust_domain = %name,
                            error = %why,
                            "ignoring a row of tessera_foreign_bundles"
                        ),
                    }
                }
                tracing::info!(
                    bundles = kept.len(),
                    "foreign bundles kept in the fleet store read"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read the foreign bundles kept in the fleet store (tessera_foreign_bundles); starting from bootstrap bundles"
            ),
        }
        Arc::new(Self {
            db,
            kept: Mutex::new(kept),
        })
    }
}

async fn read(db: &Database) -> Result<Vec<(String, String)>, crate::fleet::store::StoreError> {
    let client = db.client().await?;
    let rows = timed(
        "read kept foreign bundles",
        client.query(
            "SELECT trust_domain, bundle FROM tessera_foreign_bundles",
            &[],
        ),
    )
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The bundle a row holds, checked against the trust domain it names.
fn bundle_of(name: &str, document: &str) -> Result<ForeignBundle, String> {
    let td = spiffe::TrustDomain::new(name).map_err(|e| format!("trust_domain: {e}"))?;
    ForeignBundle::parse(td, document.as_bytes()).map_err(|e| format!("bundle: {e}"))
}

impl KeptBundles for PgKeptBundles {
    fn load(&self, td: &spiffe::TrustDomain) -> Option<ForeignBundle> {
        self.kept.lock().get(td.as_str()).cloned()
    }

    fn save(&self, bundle: Arc<ForeignBundle>) -> SaveFuture {
        self.kept.lock().insert(
            bundle.trust_domain.as_str().to_string(),
            bundle.as_ref().clone(),
        );
        let db = self.db.clone();
        Box::pin(async move {
            let document = std::str::from_utf8(&bundle.document)
                .map_err(|_| "the bundle is not UTF-8 text".to_string())?;
            let client = db.client().await.map_err(|e| e.to_string())?;
            timed(
                "keep a foreign bundle",
                client.execute(
                    "INSERT INTO tessera_foreign_bundles (trust_domain, bundle) VALUES ($1, $2) \
                     ON CONFLICT (trust_domain) DO UPDATE SET bundle = EXCLUDED.bundle, updated_at = now()",
                    &[&bundle.trust_domain.as_str(), &document],
                ),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("writing tessera_foreign_bundles: {e}"))
        })
    }

    fn remove(&self, td: &spiffe::TrustDomain) {
        self.kept.lock().remove(td.as_str());
        let (db, name) = (self.db.clone(), td.as_str().to_string());
        tokio::spawn(async move {
            let deleted = match db.client().await {
                Ok(client) => timed(
                    "delete a kept foreign bundle",
                    client.execute(
                        "DELETE FROM tessera_foreign_bundles WHERE trust_domain = $1",
                        &[&name],
                    ),
                )
                .await
                .map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                tracing::warn!(trust_domain = %name, error = %e, "cannot delete the kept bundle of an ended federation");
            }
        });
    }
}
