//! Keeping foreign bundles fresh: one task per federation relationship
//! fetches the foreign trust domain's bundle, installs it in the trust
//! store (open streams of workloads that federate with it get it at once),
//! keeps it on disk, and fetches again at its `spiffe_refresh_hint`
//! (bounded by [`RefreshBounds`]). A failed fetch keeps the bundle in use
//! and is retried with backoff (5 s, doubling, never later than the next
//! regular fetch), logged with the endpoint and the reason, and counted.
//!
//! A bundle whose `spiffe_sequence` is lower than the one in use is refused:
//! the spec makes the sequence increase with every change, and an older
//! bundle may bring back a key the domain removed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::fetch::{self, FetchError};
use super::state::KeptBundles;
use super::{Bootstrap, Profile, RefreshBounds, Relationship};
use crate::clock::{Clock, unix_seconds};
use crate::identity::spiffe_bundle::BundleError;
use crate::identity::{ForeignBundle, TrustStore};
use crate::metrics::{FederationLabels, FederationMetrics, TrustDomainLabels};
use crate::sync::Mutex;

/// First retry after a failed fetch; doubled each time.
const FIRST_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("fetching {url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: FetchError,
    },
    #[error("the bundle served by {url} is invalid: {source}")]
    Invalid {
        url: String,
        #[source]
        source: BundleError,
    },
    #[error(
        "{url} served sequence {got}, older than the {have} in use; refused (if the trust domain was re-created, remove its kept bundle, the file under data_dir/federation or the authority's FederatedBundle object, and restart)"
    )]
    Stale { url: String, got: u64, have: u64 },
    #[error("the bootstrap bundle {}: {message}", path.display())]
    Bootstrap { path: PathBuf, message: String },
}

impl RefreshError {
    fn result(&self) -> &'static str {
        match self {
            RefreshError::Fetch { .. } | RefreshError::Bootstrap { .. } => "fetch_error",
            RefreshError::Invalid { .. } => "invalid",
            RefreshError::Stale { .. } => "stale",
        }
    }
}

/// What one successful fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// The keys changed (streams were woken).
    pub changed: bool,
    pub refresh_hint: Option<Duration>,
}

struct Running {
    relationship: Relationship,
    stop: CancellationToken,
}

/// The federation relationships in force and their refresh tasks.
pub struct Federation {
    trust: Arc<TrustStore>,
    state: Option<Arc<dyn KeptBundles>>,
    metrics: FederationMetrics,
    clock: Arc<dyn Clock>,
    bounds: RefreshBounds,
    running: Mutex<HashMap<String, Running>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("relationships", &self.running.lock().len())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Federation into `trust`; fetched bundles are kept in `state` when
    /// given (and the kept ones trusted before the first fetch).
    pub fn new(
        trust: Arc<TrustStore>,
        state: Option<Arc<dyn KeptBundles>>,
        metrics: FederationMetrics,
        clock: Arc<dyn Clock>,
        bounds: RefreshBounds,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust,
            state,
            metrics,
            clock,
            bounds,
            running: Mutex::default(),
            shutdown,
        })
    }

    /// Puts `relationships` in force: new ones start (from their kept
    /// bundle, else their bootstrap bundle, then a fetch at once), changed
    /// ones restart keeping their bundle, and ended ones stop and their
    /// bundle is no longer trusted. The config file gives the set at start
    /// and on SIGHUP; at the authority, with the `FederationRelationship`
    /// objects in force (`fleet::federation`).
    pub fn update(self: &Arc<Self>, relationships: Vec<Relationship>) {
        let mut running = self.running.lock();
        let wanted: HashMap<String, Relationship> = relationships
            .into_iter()
            .map(|r| (r.trust_domain.as_str().to_string(), r))
            .collect();
        running.retain(|name, r| {
            if wanted.get(name) == Some(&r.relationship) {
                return true;
            }
            r.stop.cancel();
            if !wanted.contains_key(name) {
                tracing::info!(trust_domain = %name, "federation ended; its bundle is no longer trusted");
                self.trust.remove_federated(name);
                if let Some(state) = &self.state {
                    state.remove(&r.relationship.trust_domain);
                }
            }
            false
        });
        for (name, relationship) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            self.install_initial(&relationship);
            let stop = self.shutdown.child_token();
            tracing::info!(
                trust_domain = %name,
                url = %relationship.url,
                profile = relationship.profile.name(),
                "federating: fetching the trust domain's bundle from its endpoint"
            );
            tokio::spawn(self.clone().run(relationship.clone(), stop.clone()));
            running.insert(name, Running { relationship, stop });
        }
    }

    /// Trust domains with a relationship in force.
    pub fn trust_domains(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// Before the first fetch: the kept bundle, else the bootstrap bundle.
    fn install_initial(&self, r: &Relationship) {
        if self
            .trust
            .current()
            .federated
            .contains_key(r.trust_domain.as_str())
        {
            return;
        }
        let kept = self.state.as_ref().and_then(|s| s.load(&r.trust_domain));
        let from = match kept {
            Some(b) => Some((b, "kept from an earlier fetch")),
            None => match bootstrap(r) {
                Ok(b) => b.map(|b| (b, "bootstrap bundle")),
                Err(e) => {
                    tracing::error!(trust_domain = %r.trust_domain.as_str(), error = %e, "cannot read the bootstrap bundle");
                    None
                }
            },
        };
        if let Some((bundle, source)) = from {
            tracing::info!(trust_domain = %r.trust_domain.as_str(), source, "foreign bundle installed before the first fetch");
            self.record_sequence(&bundle);
            self.trust.set_federated(Arc::new(bundle));
        }
    }

    async fn run(self: Arc<Self>, relationship: Relationship, stop: CancellationToken) {
        let name = relationship.trust_domain.as_str().to_string();
        let mut retry = FIRST_RETRY;
        let mut hint = None;
        loop {
            let wait = match self.refresh(&relationship).await {
                Ok(done) => {
                    retry = FIRST_RETRY;
                    hint = done.refresh_hint;
                    self.bounds.interval(hint)
                }
                Err(e) => {
                    let wait = retry.min(self.bounds.interval(hint));
                    retry = (retry * 2).min(self.bounds.max);
                    tracing::warn!(
                        trust_domain = %name,
                        error = %e,
                        retry_in = ?wait,
                        "foreign bundle refresh failed; workloads keep the bundle they have"
                    );
                    wait
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One fetch of `r`'s bundle, installed if valid and not older than
    /// the one in use.
    pub async fn refresh(&self, r: &Relationship) -> Result<Refreshed, RefreshError> {
        let result = self.fetch_and_install(r).await;
        let outcome = match &result {
            Ok(done) if done.changed => "updated",
            Ok(_) => "unchanged",
            Err(e) => e.result(),
        };
        self.metrics
            .refreshes
            .get_or_create(&FederationLabels {
                trust_domain: r.trust_domain.as_str().to_string(),
                result: outcome,
            })
            .inc();
        if result.is_ok() {
            self.metrics
                .last_success
                .get_or_create(&TrustDomainLabels {
                    trust_domain: r.trust_domain.as_str().to_string(),
                })
                .set(unix_seconds(self.clock.now()) as i64);
        }
        result
    }

    async fn fetch_and_install(&self, r: &Relationship) -> Result<Refreshed, RefreshError> {
        let url = r.url.to_string();
        let fetch_err = |source| RefreshError::Fetch {
            url: url.clone(),
            source,
        };
        let roots = match &r.profile {
            Profile::HttpsWeb { ca_file } => {
                let ca_file = ca_file.clone();
                tokio::task::spawn_blocking(move || fetch::web_roots(ca_file.as_deref()))
                    .await
                    .unwrap_or(Err(FetchError::NoSystemRoots))
                    .map_err(fetch_err)?
            }
            Profile::HttpsSpiffe { endpoint_id, .. } => {
                let current = self.trust.current();
                let td = endpoint_id.trust_domain_name();
                let x509 = if endpoint_id.is_member_of(self.trust.trust_domain()) {
                    Some(current.x509.clone())
                } else {
                    current.federated.get(td).map(|b| b.x509.clone())
                };
                let x509 =
                    x509.ok_or_else(|| fetch_err(FetchError::NoEndpointBundle(td.into())))?;
                fetch::spiffe_roots(td, &x509).map_err(fetch_err)?
            }
        };
        let tls = fetch::client_config(&r.profile, roots).map_err(fetch_err)?;
        let body = fetch::fetch(&r.url, tls).await.map_err(fetch_err)?;
        let bundle = ForeignBundle::parse(r.trust_domain.clone(), &body).map_err(|source| {
            RefreshError::Invalid {
                url: url.clone(),
                source,
            }
        })?;
        let current = self.trust.current();
        let previous = current.federated.get(r.trust_domain.as_str());
        if let (Some(got), Some(have)) = (bundle.sequence, previous.and_then(|p| p.sequence))
            && got < have
        {
            return Err(RefreshError::Stale { url, got, have });
        }
        let same_document = previous.is_some_and(|p| p.document == bundle.document);
        let refresh_hint = bundle.refresh_hint;
        self.record_sequence(&bundle);
        let bundle = Arc::new(bundle);
        let changed = self.trust.set_federated(bundle.clone());
        if changed {
            tracing::info!(
                trust_domain = %r.trust_domain.as_str(),
                sequence = ?bundle.sequence,
                authorities = crate::identity::pem::split_der_certs(&bundle.x509).map_or(0, |c| c.len()),
                jwt_keys = bundle.jwt_keys.len(),
                "foreign bundle updated; pushed to the workloads that federate with it"
            );
        }
        if !same_document
            && let Some(state) = &self.state
            && let Err(e) = state.save(bundle.clone()).await
        {
            tracing::error!(trust_domain = %r.trust_domain.as_str(), error = %e, "cannot keep the foreign bundle; a restart will start from the bootstrap bundle and fetch it again");
        }
        Ok(Refreshed {
            changed,
            refresh_hint,
        })
    }

    fn record_sequence(&self, bundle: &ForeignBundle) {
        self.metrics
            .sequence
            .get_or_create(&TrustDomainLabels {
                trust_domain: bundle.trust_domain.as_str().to_string(),
            })
            .set(bundle.sequence.unwrap_or(0) as i64);
    }
}

/// `r`'s bootstrap bundle, when its profile has one.
fn bootstrap(r: &Relationship) -> Result<Option<ForeignBundle>, RefreshError> {
    let Profile::HttpsSpiffe {
        bootstrap_bundle: Some(from),
        ..
    } = &r.profile
    else {
        return Ok(None);
    };
    let path = match from {
        Bootstrap::Inline(bundle) => return Ok(Some(bundle.as_ref().clone())),
        Bootstrap::File(path) => path,
    };
    let err = |message: String| RefreshError::Bootstrap {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    ForeignBundle::from_file_contents(r.trust_domain.clone(), &bytes)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}
