//! What the identity layer hands out: issued SVIDs and the trust bundle.
//! Plain values, shared by `Arc`; nothing here signs or verifies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use prost::bytes::Bytes;

use super::jws::PublicJwk;
use super::spiffe_bundle::ForeignBundle;

/// An issued X509-SVID. The private key lives only in memory.
#[derive(Clone)]
pub struct X509Svid {
    pub spiffe_id: spiffe::SpiffeId,
    /// DER leaf (no intermediates: the CA signs directly).
    pub chain_der: Bytes,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Bytes,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate signed over a public key the signer never saw the private
/// half of.
#[derive(Debug, Clone)]
pub struct SignedCert {
    pub cert_der: Bytes,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

/// A signed JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    pub token: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// A credential for an OAuth authorization server
    /// ([`for_token_service`]): never handed out twice.
    pub single_use: bool,
}

/// The path of the token endpoint under the trust domain's issuer URL.
pub const TOKEN_ENDPOINT_PATH: &str = "/token";

/// Whether JWT-SVID `claims` make a credential for an OAuth authorization
/// server, which the SVID cache mints afresh for every fetch instead of
/// reusing: some `aud` is an `https://` URL.
///
/// An authorization server may accept each assertion's `jti` only once
/// (RFC 7523 §3; this trust domain's token endpoint on the HTTPS face does),
/// and RFC 7523bis and the MCP SDKs make its issuer URL the audience. The
/// agent cannot tell an authorization server's URL from any other https
/// URL, and must not hand the same assertion out twice for one: a rule
/// matching only the SVID's own `iss` missed another node's token
/// endpoint, and every token endpoint of a fleet, whose JWT-SVIDs the
/// authority signs without `iss`; the client then got a cached assertion
/// back and its second token request was refused as a replay. A fresh SVID
/// costs one signature. Other audiences (SPIFFE IDs, logical names, other
/// URI schemes) are reused from the cache as before.
pub fn for_token_service(claims: &serde_json::Value) -> bool {
    let url = |a: &serde_json::Value| {
        a.as_str().is_some_and(|a| {
            a.get(..8)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        })
    };
    match claims.get("aud") {
        Some(serde_json::Value::Array(list)) => list.iter().any(url),
        Some(a) => url(a),
        None => false,
    }
}

/// An issued WIT-SVID and the private key its `cnf` binds. The key lives
/// only in memory; `Debug` shows neither it nor the token.
#[derive(Clone)]
pub struct WitSvid {
    pub spiffe_id: spiffe::SpiffeId,
    /// JWS compact serialization (`typ` `wit+jwt`).
    pub token: String,
    /// The private JWK (`d` included) handed to the workload as
    /// `wit_svid_key`.
    pub key_jwk: String,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WitSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitSvid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A WIT-SVID signed over a public key whose private half the signer never
/// saw.
#[derive(Debug, Clone)]
pub struct SignedWit {
    pub token: String,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

/// Foreign trust domains' bundles, by trust domain name.
pub type FederatedBundles = BTreeMap<String, Arc<ForeignBundle>>;

/// What relying parties need: this trust domain's CA certificates and
/// signing keys, and the bundles of the trust domains it federates with.
/// Shared by every stream via `Arc`, rebuilt only when a bundle changes.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundle {
    /// Concatenated DER CA certificates.
    pub x509: Bytes,
    /// JWKS document with `use: jwt-svid` keys, each with a `kid`.
    pub jwks: Bytes,
    pub jwt_keys: Arc<[PublicJwk]>,
    /// WIT-SVID signing keys, and their JWKS document (`use: wit-svid`).
    pub wit_keys: Arc<[PublicJwk]>,
    pub wit_jwks: Bytes,
    /// This trust domain's bundle sequence (`spiffe_sequence`): changes with
    /// its own keys only, not with federated bundles.
    pub sequence: u64,
    pub federated: Arc<FederatedBundles>,
}

fn jwks(keys: &[PublicJwk], key_use: &str) -> Bytes {
    let doc = serde_json::json!({
        "keys": keys.iter().map(|k| k.to_json(key_use)).collect::<Vec<_>>(),
    });
    Bytes::from(doc.to_string())
}

impl TrustBundle {
    /// A bundle of `cas` (DER, concatenated), `jwt_keys` and `wit_keys`,
    /// federating with no one.
    pub fn new(
        x509: Vec<u8>,
        jwt_keys: Vec<PublicJwk>,
        wit_keys: Vec<PublicJwk>,
        sequence: u64,
    ) -> Self {
        Self {
            x509: Bytes::from(x509),
            jwks: jwks(&jwt_keys, "jwt-svid"),
            jwt_keys: jwt_keys.into(),
            wit_jwks: jwks(&wit_keys, "wit-svid"),
            wit_keys: wit_keys.into(),
            sequence,
            federated: Arc::default(),
        }
    }

    /// The bundles of `domains` (trust domain names) that are known, in
    /// name order, each once: what a workload whose entries federate with
    /// `domains` may trust.
    pub fn federated_for<'a>(
        &'a self,
        domains: impl IntoIterator<Item = &'a str>,
    ) -> Vec<&'a Arc<ForeignBundle>> {
        let mut names: Vec<&str> = domains.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| self.federated.get(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::for_token_service;
    use serde_json::json;

    #[test]
    fn every_https_audience_is_single_use_whatever_the_issuer() {
        // This agent's own issuer, and its token endpoint.
        let own = json!({"iss": "https://node-a:8443", "aud": ["https://node-a:8443"]});
        assert!(for_token_service(&own));
        let endpoint = json!({"iss": "https://node-a:8443", "aud": "https://node-a:8443/token"});
        assert!(for_token_service(&endpoint));
        // Another node's token service, and a fleet's JWT-SVID without iss:
        // both used to be cached, and a second token request was a replay.
        let other = json!({"iss": "https://node-a:8443", "aud": ["https://node-b:8443"]});
        assert!(for_token_service(&other));
        let fleet = json!({"aud": ["https://node-a:8443"]});
        assert!(for_token_service(&fleet));
        let upper = json!({"aud": ["HTTPS://AS.example"]});
        assert!(for_token_service(&upper));
        let mixed = json!({"aud": ["db", "https://as.example/tenant"]});
        assert!(for_token_service(&mixed));
        // Everything else is reused.
        for aud in [
            json!(["spiffe://example.org/db"]),
            json!(["db"]),
            json!("http://plain.example"),
            json!(["sts.amazonaws.com"]),
            json!([]),
        ] {
            assert!(
                !for_token_service(&json!({"iss": "https://node-a:8443", "aud": aud})),
                "{aud}"
            );
        }
        assert!(!for_token_service(&json!({"iss": "https://node-a:8443"})));
    }
}
