//! SPIFFE federation (SPIFFE Federation spec): trusting other trust
//! domains, and letting them trust this one.
//!
//! * [`endpoint`]: the bundle endpoint, serving this trust domain's SPIFFE
//!   bundle over HTTPS in the `https_web` or `https_spiffe` profile. The
//!   fleet authority serves it for a fleet; a single-node agent can too.
//! * [`refresh`]: for each foreign trust domain (`[[federation]]`), fetch
//!   its bundle from its endpoint ([`fetch`]), install it in the
//!   [`crate::identity::TrustStore`] (workloads whose entries list it in
//!   `federates_with` then receive and trust it), keep it in `data_dir`
//!   ([`state`]) so a restart starts from it, and poll again at its
//!   `spiffe_refresh_hint`.
//! * [`url`]: the endpoint URLs.
//!
//! In fleet mode the authority fetches; agents receive the foreign bundles
//! with the trust domain's own (`fleet::wire::BundleDoc::federated`).
//! Relationships come from the config file today; [`refresh::Federation::update`]
//! is where the fleet-state custom resources will feed them.

pub mod endpoint;
pub mod fetch;
pub mod refresh;
pub mod state;
pub mod url;

use std::path::PathBuf;
use std::time::Duration;

pub use endpoint::{BundleEndpoint, EndpointConfig, EndpointProfile};
pub use refresh::Federation;

/// The SPIFFE ID a bundle endpoint presents in the `https_spiffe` profile:
/// the reserved path, so no workload can be issued it.
pub fn endpoint_spiffe_id(td: &spiffe::TrustDomain) -> spiffe::SpiffeId {
    spiffe::SpiffeId::new(format!("{}/tessera/bundle-endpoint", td.id_string()))
        .expect("a trust domain and a fixed path make a SPIFFE ID")
}

/// How a foreign bundle endpoint authenticates itself (Federation spec §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// A Web PKI server certificate for the URL's host, checked against
    /// `ca_file` or the system's CA certificates.
    HttpsWeb { ca_file: Option<PathBuf> },
    /// An X509-SVID with `endpoint_id`, checked against the latest bundle
    /// of that ID's trust domain: the one fetched last, or at first the
    /// `bootstrap_bundle` (a SPIFFE bundle or PEM certificates).
    HttpsSpiffe {
        endpoint_id: spiffe::SpiffeId,
        bootstrap_bundle: Option<PathBuf>,
    },
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Profile::HttpsWeb { .. } => "https_web",
            Profile::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// One federation relationship: whose bundle, from where, and how the
/// endpoint is authenticated. Each is named explicitly (spec §4.1: the
/// trust domain is never inferred from the URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    pub trust_domain: spiffe::TrustDomain,
    pub url: url::EndpointUrl,
    pub profile: Profile,
}

/// Bounds on how often a foreign bundle is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshBounds {
    /// Used when a bundle has no `spiffe_refresh_hint` (spec: "low,
    /// e.g. 5 minutes").
    pub default: Duration,
    /// A hint below this is raised to it, so a foreign endpoint cannot
    /// make us poll it in a tight loop.
    pub min: Duration,
    /// A hint above this is lowered to it, so a key rotation is never
    /// missed for long.
    pub max: Duration,
}

impl Default for RefreshBounds {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(300),
            min: Duration::from_secs(5),
            max: Duration::from_secs(3600),
        }
    }
}

impl RefreshBounds {
    /// When to fetch next after a success with `hint`.
    pub fn interval(&self, hint: Option<Duration>) -> Duration {
        hint.unwrap_or(self.default).clamp(self.min, self.max)
    }
}
