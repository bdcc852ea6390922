//! The one seam between "who may have which identity" and "who holds the
//! keys": every consumer (SVID cache, token exchange, readiness) signs
//! through [`Signer`], whether the keys are local ([`super::LocalAuthority`])
//! or at the fleet authority (`fleet::client::Upstream`). A signing method is
//! added here once, and the compiler makes both sides implement it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use super::svid::{JwtSvid, SignedWit, X509Svid};

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
    /// This signer does not offer the credential at all (a WIT-SVID asked
    /// of a signer without WIT-SVID keys): the Workload API answers
    /// Unimplemented.
    #[error("{0}")]
    Unsupported(&'static str),
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

/// Why a signer without WIT-SVID keys does not serve the WIT profile.
pub const WIT_UNSUPPORTED: &str = "this agent does not serve the WIT-SVID profile: its signer (the fleet authority) has no WIT-SVID keys (wit.key in its key directory)";

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

    /// A WIT-SVID for `id` binding `cnf_jwk`, a public JWK whose private
    /// half was generated on this node and never leaves it.
    fn sign_wit<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        cnf_jwk: &'a serde_json::Value,
        ttl: Duration,
    ) -> SignFuture<'a, Result<SignedWit, SignError>> {
        let _ = (id, cnf_jwk, ttl);
        Box::pin(std::future::ready(Err(SignError::Unsupported(
            WIT_UNSUPPORTED,
        ))))
    }

    /// Whether [`Self::sign_wit`] can sign: the WIT-SVID profile is served.
    fn serves_wit(&self) -> bool {
        false
    }

    /// Signs task access-token claims (`typ: at+jwt`), serialised as a JSON
    /// object (the exchange serialises its typed claims once, straight into
    /// the token); `exp` must already respect
    /// [`Self::access_token_not_after`].
    fn sign_access_token<'a>(
        &'a self,
        claims: &'a str,
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
