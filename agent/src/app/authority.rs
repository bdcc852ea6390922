//! Starts a fleet authority replica from a `Config` (`tessera authority
//! run`): the signing service (`fleet::server`) and, with `[https]`, the
//! trust domain's HTTPS face. The face is the one issuer relying parties off
//! the nodes need: OpenID discovery and the JWT-SVID keys of the whole trust
//! domain (every node's JWT-SVIDs are signed here and carry its URL as
//! `iss`), and the task-token keys. The token service itself (policy,
//! approvals, introspection) stays on each node.
//!
//! Federation is the fleet's too: with `[bundle_endpoint]` the replica
//! serves the trust domain's bundle to other trust domains, and its
//! `[[federation]]` relationships fetch foreign bundles into the replica's
//! trust store, from where `GET /v1/bundle` relays them to every agent.
//! With live registration (`federation = true`) `FederationRelationship`
//! objects add relationships without a restart. Each replica fetches on
//! its own; with a fleet store the fetched bundles are kept there
//! (`FederatedBundle` objects), so a replica starting while a foreign
//! endpoint is down serves the last one.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;

/// A running authority replica and its HTTPS face.
pub struct RunningAuthority {
    pub server: crate::fleet::server::RunningAuthority,
    /// The face's issuer URL and address, when `[https]` is configured.
    pub https_issuer: Option<String>,
    pub https_addr: Option<SocketAddr>,
    /// The trust domain's bundle endpoint, when `[bundle_endpoint]` is
    /// configured.
    pub bundle_endpoint: Option<crate::federation::BundleEndpoint>,
    /// The relationships in force and their bundles.
    pub federation: Arc<crate::federation::Federation>,
    /// Where they come from: the config file's `[[federation]]` (SIGHUP
    /// replaces them) and `FederationRelationship` objects.
    pub relationships: Arc<crate::fleet::federation::Relationships>,
    https_shutdown: CancellationToken,
    https_task: Option<JoinHandle<()>>,
}

impl RunningAuthority {
    pub fn shutdown(&self) {
        self.https_shutdown.cancel();
        self.server.shutdown();
    }

    /// Returns once the face and every task of the replica have ended.
    pub async fn wait(self) {
        if let Some(task) = self.https_task {
            let _ = task.await;
        }
        self.server.wait().await;
    }
}

/// Starts the replica `config` describes (it must have a `[server]` table).
pub async fn start_authority(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningAuthority> {
    let mut server = config
        .server
        .clone()
        .context("`tessera authority run` needs a [server] table")?;
    // Bound first: with port 0 the port names the issuer, which every
    // JWT-SVID carries from the first one on.
    let https = match &config.https {
        None => None,
        Some(h) => Some(crate::https::bind(h).await?),
    };
    server.jwt_issuer = https.as_ref().map(|b| b.issuer.clone());
    let running = crate::fleet::server::start(
        config.trust_domain.clone(),
        config.entries.clone(),
        server,
        config.admin_listen,
        clock.clone(),
    )
    .await?;
    let server_config = config.server.as_ref();
    let kept: Option<Arc<dyn crate::federation::state::KeptBundles>> =
        match (&running.kube, server_config.and_then(|s| s.store.as_ref())) {
            (Some(kube), Some(store))
                if store.kind == crate::fleet::store::StoreKind::Kubernetes =>
            {
                Some(
                    crate::fleet::foreign_bundles::FederatedBundles::load(
                        kube.clone(),
                        store.namespace.clone(),
                    )
                    .await,
                )
            }
            (_, Some(store)) if store.kind == crate::fleet::store::StoreKind::Postgres => {
                match &running.database {
                    Some(db) => Some(
                        crate::fleet::store::postgres::foreign_bundles::PgKeptBundles::load(
                            db.clone(),
                        )
                        .await,
                    ),
                    None => None,
                }
            }
            _ => None,
        };
    let federation = crate::federation::Federation::new(
        running.authority.trust_store().clone(),
        kept,
        running.federation_metrics.clone(),
        clock.clone(),
        crate::federation::RefreshBounds::default(),
        running.stopping(),
    );
    let relationships =
        crate::fleet::federation::Relationships::new(federation.clone(), config.federation.clone());
    if let (Some(kube), Some(true)) = (
        &running.kube,
        server_config.and_then(|s| s.registration.as_ref().map(|r| r.federation)),
    ) {
        tracing::info!("live federation: FederationRelationship objects are watched");
        crate::fleet::federation::start(
            kube.clone(),
            relationships.clone(),
            config.trust_domain.clone(),
            clock.clone(),
            running.stopping(),
        );
    }
    let bundle_endpoint = match &config.bundle_endpoint {
        None => None,
        Some(b) => match crate::federation::endpoint::serve(
            b,
            running.authority.trust_store().clone(),
            running.authority.clone(),
            clock.clone(),
            running.stopping(),
        )
        .await
        {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                running.shutdown();
                running.wait().await;
                return Err(e.into());
            }
        },
    };
    let https_shutdown = CancellationToken::new();
    let (Some(h), Some(bound)) = (&config.https, https) else {
        return Ok(RunningAuthority {
            server: running,
            https_issuer: None,
            https_addr: None,
            bundle_endpoint,
            federation,
            relationships,
            https_shutdown,
            https_task: None,
        });
    };
    let (issuer, addr) = (bound.issuer.clone(), bound.addr);
    let trust = running.authority.trust_store().clone();
    let served = crate::https::serve(
        h,
        bound,
        Some(running.authority.clone()),
        trust.clone(),
        Some(crate::https::TokenService {
            routes: None,
            keys: crate::https::published_token_keys(trust),
        }),
        clock,
        https_shutdown.clone(),
    );
    match served {
        Ok(task) => Ok(RunningAuthority {
            server: running,
            https_issuer: Some(issuer),
            https_addr: Some(addr),
            bundle_endpoint,
            federation,
            relationships,
            https_shutdown,
            https_task: Some(task),
        }),
        Err(e) => {
            running.shutdown();
            running.wait().await;
            Err(e.into())
        }
    }
}
