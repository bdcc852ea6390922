//! The one seam between "who may have which identity" and "who holds the
//! keys": every consumer (SVID cache, token exchange, readiness) signs
//! through [`Signer`], whether the keys are local ([`super::LocalAuthority`])
//! or at the fleet authority (`fleet::client::Upstream`). A signing method is
//! added here once, and the compiler makes both sides implement it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use super::svid::{JwtSvid, X509Svid};

/// A boxed future: signing through the fleet client is kilobytes of state,
/// and callers (every Workload API stream) must not be sized for it.
pub type SignFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("key generation or signing failed")]
    Crypto,
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no signing key is available")]
    NoKey,
    /// The remote signer (the fleet authority) failed, or could not be asked.
    #[error("the fleet authority: {0}")]
    Remote(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The fleet authority answered and refused: this node is not entitled to
    /// the identity. Permanent until the entries or the node's pods change,
    /// so callers must not be told to retry.
    #[error("the fleet authority refused: {0}")]
    Refused(String),
}

impl SignError {
    pub(crate) fn file(
        path: &std::path::Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::File {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }
}

/// Signs SVIDs and access tokens for this trust domain.
pub trait Signer: Send + Sync + std::fmt::Debug + 'static {
    /// X509-SVIDs for a batch of identities, each with a key generated on
    /// this node; one answer per request, in order.
    fn issue_x509_batch<'a>(
        &'a self,
        batch: &'a [(spiffe::SpiffeId, Duration)],
    ) -> SignFuture<'a, Vec<Result<X509Svid, SignError>>>;

    /// A JWT-SVID for `id` and `audience` (non-empty).
    fn jwt_svid<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        audience: &'a [String],
        ttl: Duration,
    ) -> SignFuture<'a, Result<JwtSvid, SignError>>;

    /// Signs task access-token claims (`typ: at+jwt`); `exp` must already
    /// respect [`Self::access_token_not_after`].
    fn sign_access_token<'a>(
        &'a self,
        claims: &'a serde_json::Value,
    ) -> SignFuture<'a, Result<String, SignError>>;

    /// No access token may expire after this (the signing key's end).
    fn access_token_not_after(&self) -> Result<SystemTime, SignError>;

    /// Expiry of the CA that signs now (None: no CA can sign).
    fn active_ca_expiry(&self) -> Option<SystemTime>;

    /// Key rollover, where keys roll over here; returns when it next needs
    /// to run.
    fn rotate(&self) -> Result<Option<SystemTime>, SignError> {
        Ok(None)
    }

    /// False while a remote signer cannot be reached (SVIDs are then served
    /// from cache); a local signer is always reachable.
    fn reachable(&self) -> bool {
        true
    }

    /// Why this signer cannot serve at all any more (a remote signer whose
    /// node credential expired while renewals failed); `None` while it can.
    fn not_ready(&self) -> Option<String> {
        None
    }
}
