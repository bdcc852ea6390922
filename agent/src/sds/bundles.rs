//! The X.509 bundles an SDS caller may see, and the signal that they changed.
//!
//! This is the one place SDS learns about trust domains: a validation
//! context by trust-domain ID, `ROOTCA`, `ALL` and the unnamed "everything"
//! request all resolve against [`VisibleBundles`]. Today that is this trust
//! domain's bundle. Foreign bundles (federation) belong here too: the
//! bundles of the trust domains the caller's identities federate with, after
//! this one, sorted by name, with their change signal joined into
//! [`BundleWatch::changed`]; nothing else in SDS needs to change for them.

use std::sync::Arc;

use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::entries::Identity;
use crate::identity::{TrustBundle, TrustStore};

/// Trust domains and their CA certificates (concatenated DER), this trust
/// domain first.
#[derive(Debug, Clone, PartialEq)]
pub struct VisibleBundles {
    domains: Vec<(spiffe::TrustDomain, Bytes)>,
}

impl VisibleBundles {
    /// This trust domain's bundle, then `foreign` ones sorted by name
    /// (duplicates of this domain are ignored: a foreign source can never
    /// replace our own CAs).
    pub fn new(
        own: spiffe::TrustDomain,
        own_cas: Bytes,
        foreign: impl IntoIterator<Item = (spiffe::TrustDomain, Bytes)>,
    ) -> Self {
        let mut others: Vec<_> = foreign.into_iter().filter(|(td, _)| *td != own).collect();
        others.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        others.dedup_by(|a, b| a.0 == b.0);
        let mut domains = Vec::with_capacity(others.len() + 1);
        domains.push((own, own_cas));
        domains.extend(others);
        Self { domains }
    }

    /// This trust domain.
    pub fn own(&self) -> &spiffe::TrustDomain {
        &self.domains[0].0
    }

    /// The CAs of `domain`, if the caller may see its bundle.
    pub fn cas(&self, domain: &spiffe::TrustDomain) -> Option<&Bytes> {
        self.domains
            .iter()
            .find(|(td, _)| td == domain)
            .map(|(_, cas)| cas)
    }

    /// Every visible domain, this one first.
    pub fn iter(&self) -> impl Iterator<Item = (&spiffe::TrustDomain, &Bytes)> {
        self.domains.iter().map(|(td, cas)| (td, cas))
    }
}

/// A stream's view of the bundles: what it may see now, and when that
/// changes. One `watch` receiver per source, so an idle stream holds a few
/// pointers.
pub struct BundleWatch {
    trust: Arc<TrustStore>,
    own: watch::Receiver<Arc<TrustBundle>>,
}

impl BundleWatch {
    pub fn new(trust: &Arc<TrustStore>) -> Self {
        Self {
            trust: trust.clone(),
            own: trust.subscribe(),
        }
    }

    /// Resolves when any visible bundle may have changed; false when the
    /// source is gone (the agent is stopping).
    pub async fn changed(&mut self) -> bool {
        self.own.changed().await.is_ok()
    }

    /// The bundles a caller holding `identities` may see, marking the
    /// current versions seen.
    pub fn visible(&mut self, _identities: &[Identity]) -> VisibleBundles {
        let own = self.own.borrow_and_update().x509.clone();
        VisibleBundles::new(self.trust.trust_domain().clone(), own, [])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str) -> spiffe::TrustDomain {
        spiffe::TrustDomain::new(name).unwrap()
    }

    #[test]
    fn own_domain_first_then_foreign_sorted_and_never_replaced() {
        let v = VisibleBundles::new(
            td("example.org"),
            Bytes::from_static(b"own"),
            [
                (td("zeta.test"), Bytes::from_static(b"z")),
                (td("example.org"), Bytes::from_static(b"impostor")),
                (td("alpha.test"), Bytes::from_static(b"a")),
                (td("alpha.test"), Bytes::from_static(b"a-again")),
            ],
        );
        let order: Vec<_> = v.iter().map(|(td, cas)| (td.as_str(), &cas[..])).collect();
        assert_eq!(
            order,
            [
                ("example.org", &b"own"[..]),
                ("alpha.test", b"a"),
                ("zeta.test", b"z")
            ]
        );
        assert_eq!(v.own().as_str(), "example.org");
        assert_eq!(&v.cas(&td("example.org")).unwrap()[..], b"own");
        assert!(v.cas(&td("other.test")).is_none());
    }
}
