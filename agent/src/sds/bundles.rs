//! The X.509 bundles an SDS caller may see, and the signal that they changed.
//!
//! This is the one place SDS learns about trust domains: a validation
//! context by trust-domain ID, `ROOTCA`, `ALL` and the unnamed "everything"
//! request all resolve against [`VisibleBundles`]: this trust domain's
//! bundle, then the bundles of the foreign trust domains the caller's
//! identities federate with (`federates_with`), sorted by name. A foreign
//! domain nobody's entry names stays invisible, as in the Workload API.
//! Foreign bundles live in the same [`TrustBundle`] as ours (the federation
//! refresher replaces them there), so one `watch` signals both.

use std::sync::Arc;

use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::entries::{Identity, federated_domains};
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

    /// Resolves when any visible bundle may have changed (ours, or a
    /// foreign one refreshed); false when the source is gone (the agent is
    /// stopping). A change the caller cannot see wakes it too; the xDS
    /// layer then finds nothing new to send.
    pub async fn changed(&mut self) -> bool {
        self.own.changed().await.is_ok()
    }

    /// The bundles a caller holding `identities` may see, marking the
    /// current versions seen.
    pub fn visible(&mut self, identities: &[Identity]) -> VisibleBundles {
        let bundle = self.own.borrow_and_update();
        let foreign = bundle
            .federated_for(federated_domains(identities))
            .into_iter()
            .map(|f| (f.trust_domain.clone(), f.x509.clone()));
        VisibleBundles::new(
            self.trust.trust_domain().clone(),
            bundle.x509.clone(),
            foreign,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthoritySettings, ForeignBundle, LocalAuthority, spiffe_bundle};
    use std::time::Duration;

    fn authority(name: &str) -> Arc<LocalAuthority> {
        LocalAuthority::load(
            AuthoritySettings {
                trust_domain: td(name),
                ca_ttl: Duration::from_secs(3600),
                jwt_key_ttl: Duration::from_secs(3600),
                jwt_key_type: Default::default(),
                state_dir: None,
                ca_files: None,
            },
            Arc::new(crate::clock::SystemClock),
        )
        .unwrap()
    }

    /// `theirs`'s bundle as a federation fetch installs it.
    fn foreign(theirs: &LocalAuthority) -> Arc<ForeignBundle> {
        let doc = spiffe_bundle::document(&theirs.trust_store().current(), Duration::from_secs(60))
            .unwrap();
        Arc::new(ForeignBundle::parse(theirs.trust_domain().clone(), &doc).unwrap())
    }

    fn identity(federates_with: &[&str]) -> Identity {
        Identity {
            spiffe_id: spiffe::SpiffeId::new("spiffe://example.org/envoy").unwrap(),
            hint: None,
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            wit_ttl: Duration::from_secs(3600),
            federates_with: federates_with.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn federated_bundles_are_visible_to_the_entries_that_name_them_and_signal_refreshes() {
        let ours = authority("example.org");
        let (partner, stranger) = (authority("partner.test"), authority("stranger.test"));
        let store = ours.trust_store();
        let mut watch = BundleWatch::new(store);
        let trusting = [identity(&["partner.test"])];
        let v = watch.visible(&trusting);
        assert_eq!(v.iter().count(), 1, "nothing fetched yet");

        // A fetched bundle wakes the stream and appears for the entry that
        // federates with it, after ours; another foreign domain does not.
        store.set_federated(foreign(&partner));
        store.set_federated(foreign(&stranger));
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("a refresh wakes the stream");
        let v = watch.visible(&trusting);
        let names: Vec<_> = v.iter().map(|(td, _)| td.as_str()).collect();
        assert_eq!(names, ["example.org", "partner.test"]);
        assert_eq!(
            v.cas(&td("partner.test")).unwrap(),
            &partner.trust_store().current().x509
        );
        assert!(v.cas(&td("stranger.test")).is_none());
        let v = watch.visible(&[identity(&[])]);
        assert_eq!(v.iter().count(), 1, "not federating: not visible");

        // A refresh with new CAs (the partner rotated) is signalled and seen.
        let rotated = authority("partner.test");
        store.set_federated(foreign(&rotated));
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("a refreshed bundle wakes the stream");
        let v = watch.visible(&trusting);
        assert_eq!(
            v.cas(&td("partner.test")).unwrap(),
            &rotated.trust_store().current().x509
        );
    }

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
