//! The Workload API's response messages, built from the caller's identities,
//! their SVIDs and the trust bundle the agent holds.

use std::collections::HashMap;
use std::sync::Arc;

use tessera_workload_api as pb;

use crate::entries::{Identity, federated_domains};
use crate::identity::{ForeignBundle, TrustBundle, WitSvid, X509Svid};

/// The own trust domain's bundle (keyed by its SPIFFE ID) and those of the
/// foreign domains `identities` federate with, by `pick`.
pub(super) fn bundle_map<V>(
    td: &str,
    identities: &[Identity],
    bundle: &TrustBundle,
    own: impl FnOnce(&TrustBundle) -> V,
    foreign: impl Fn(&ForeignBundle) -> V,
) -> HashMap<String, V> {
    let mut map = federated_map(identities, bundle, foreign);
    map.insert(td.to_string(), own(bundle));
    map
}

/// The bundles of the foreign domains `identities` federate with, keyed by
/// their trust domain's SPIFFE ID (`spiffe://<name>`, as SPIRE keys them).
fn federated_map<V>(
    identities: &[Identity],
    bundle: &TrustBundle,
    pick: impl Fn(&ForeignBundle) -> V,
) -> HashMap<String, V> {
    bundle
        .federated_for(federated_domains(identities))
        .into_iter()
        .map(|b| (b.trust_domain.id_string(), pick(b)))
        .collect()
}

pub(super) fn x509_response(
    identities: &[Identity],
    svids: &[Arc<X509Svid>],
    bundle: &TrustBundle,
) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: identities
            .iter()
            .zip(svids)
            .map(|(ident, svid)| pb::X509svid {
                spiffe_id: ident.spiffe_id.to_string(),
                x509_svid: svid.chain_der.clone(),
                x509_svid_key: svid.key_pkcs8.clone(),
                bundle: bundle.x509.clone(),
                hint: ident.hint.clone().unwrap_or_default(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: federated_map(identities, bundle, |b| b.x509.clone()),
    }
}

/// The WIT-SVID signing keys (`use` `wit-svid`) by trust domain SPIFFE ID:
/// this trust domain's, and those of the foreign domains `identities`
/// federate with that publish any.
pub(super) fn wit_bundles_response(
    td: &str,
    identities: &[Identity],
    bundle: &TrustBundle,
) -> pb::WitBundlesResponse {
    let text = |jwks: &prost::bytes::Bytes| String::from_utf8_lossy(jwks).into_owned();
    let mut bundles: HashMap<String, String> = bundle
        .federated_for(federated_domains(identities))
        .into_iter()
        .filter(|b| !b.wit_keys.is_empty())
        .map(|b| (b.trust_domain.id_string(), text(&b.wit_jwks)))
        .collect();
    bundles.insert(td.to_string(), text(&bundle.wit_jwks));
    pb::WitBundlesResponse { bundles }
}

pub(super) fn wit_response(identities: &[Identity], wits: &[Arc<WitSvid>]) -> pb::WitsvidResponse {
    pb::WitsvidResponse {
        svids: identities
            .iter()
            .zip(wits)
            .map(|(ident, wit)| pb::Witsvid {
                spiffe_id: ident.spiffe_id.to_string(),
                wit_svid: wit.token.clone(),
                wit_svid_key: wit.key_jwk.clone(),
                hint: ident.hint.clone().unwrap_or_default(),
            })
            .collect(),
    }
}
