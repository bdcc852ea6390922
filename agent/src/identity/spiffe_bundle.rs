//! The SPIFFE bundle document (SPIFFE Trust Domain and Bundle spec §4): a
//! JWK Set whose keys carry a `use` of `x509-svid` (a CA certificate in
//! `x5c`), `jwt-svid` or `wit-svid` (a signing key with its `kid`), plus
//! `spiffe_sequence` and `spiffe_refresh_hint`.
//!
//! [`document`] writes this trust domain's bundle (what the bundle endpoint
//! serves); [`ForeignBundle::parse`] reads another trust domain's, as a
//! bundle endpoint served it, so that workloads can trust it.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64URL};
use prost::bytes::Bytes;
use serde_json::{Map, Value, json};

use super::jws::{JwkError, VerifyingKey};
use super::pem;
use super::svid::TrustBundle;

/// `use` of CA certificates in a SPIFFE bundle.
pub const X509_SVID_USE: &str = "x509-svid";
/// `use` of JWT-SVID signing keys.
pub const JWT_SVID_USE: &str = "jwt-svid";
/// `use` of WIT-SVID signing keys (WIT-SVID spec §6.1).
pub const WIT_SVID_USE: &str = "wit-svid";

/// Why a bundle document was refused. The whole document is refused: a
/// bundle is trusted as a unit, and half of one could drop a key in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("no \"keys\" member (a SPIFFE bundle must have one, possibly empty)")]
    NoKeys,
    #[error("key {index}: {message}")]
    Key { index: usize, message: String },
    #[error("two {key_use} keys share the kid {kid:?}")]
    DuplicateKid { key_use: &'static str, kid: String },
    #[error("{0} is not a valid spiffe_sequence (an unsigned integer)")]
    Sequence(String),
    #[error("{0} is not a valid spiffe_refresh_hint (a number of seconds)")]
    RefreshHint(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("no CA certificate in the bundle")]
    Empty,
}

/// A foreign trust domain's bundle: what its workloads' SVIDs are verified
/// with. Shared by `Arc`; replaced whole when the domain publishes a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignBundle {
    pub trust_domain: spiffe::TrustDomain,
    /// Concatenated DER CA certificates (`x509-svid` keys).
    pub x509: Bytes,
    /// `jwt-svid` keys Tessera can verify with (others are still in `jwt_jwks`).
    pub jwt_keys: Arc<[VerifyingKey]>,
    /// JWKS document of the `jwt-svid` keys, as the domain published them.
    pub jwt_jwks: Bytes,
    pub wit_keys: Arc<[VerifyingKey]>,
    /// JWKS document of the `wit-svid` keys.
    pub wit_jwks: Bytes,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
    /// The document as received (persisted, and relayed to fleet agents).
    pub document: Bytes,
}

impl ForeignBundle {
    /// Parses a SPIFFE bundle document of `trust_domain`. JWKs of unknown or
    /// missing `use` are ignored (spec §4.2.2); `x509-svid` keys need exactly
    /// one certificate in `x5c`, signing keys a unique `kid`.
    pub fn parse(trust_domain: spiffe::TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let doc: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = match doc.get("keys") {
            Some(Value::Array(keys)) => keys,
            _ => return Err(BundleError::NoKeys),
        };
        let sequence = match doc.get("spiffe_sequence") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| BundleError::Sequence(v.to_string()))?,
            ),
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None | Some(Value::Null) => None,
            Some(v) => Some(Duration::from_secs(
                v.as_u64()
                    .ok_or_else(|| BundleError::RefreshHint(v.to_string()))?,
            )),
        };
        let mut x509 = Vec::new();
        let (mut jwt, mut wit) = (Signing::new(JWT_SVID_USE), Signing::new(WIT_SVID_USE));
        for (index, key) in keys.iter().enumerate() {
            let bad = |message: String| BundleError::Key { index, message };
            let Some(key_use) = key.get("use").and_then(Value::as_str) else {
                continue;
            };
            match key_use {
                X509_SVID_USE => {
                    let certs = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or_else(|| bad("an x509-svid key needs x5c".into()))?;
                    let [cert] = certs.as_slice() else {
                        return Err(bad(format!(
                            "an x509-svid key needs exactly one certificate in x5c, not {}",
                            certs.len()
                        )));
                    };
                    let der = cert
                        .as_str()
                        .and_then(|c| STANDARD.decode(c).ok())
                        .ok_or_else(|| bad("x5c is not base64 DER".into()))?;
                    x509_parser::parse_x509_certificate(&der)
                        .map_err(|e| bad(format!("x5c is not an X.509 certificate: {e}")))?;
                    x509.extend_from_slice(&der);
                }
                JWT_SVID_USE => jwt.add(index, key)?,
                WIT_SVID_USE => wit.add(index, key)?,
                _ => {}
            }
        }
        Ok(Self {
            trust_domain,
            x509: Bytes::from(x509),
            jwt_jwks: jwt.jwks(),
            jwt_keys: jwt.keys.into(),
            wit_jwks: wit.jwks(),
            wit_keys: wit.keys.into(),
            sequence,
            refresh_hint,
            document: Bytes::copy_from_slice(bytes),
        })
    }

    /// A bundle of CA certificates only, from PEM (a bootstrap bundle given
    /// as certificates instead of a SPIFFE bundle).
    pub fn from_pem(trust_domain: spiffe::TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let certs = pem::decode_certs(pem).map_err(|e| BundleError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(BundleError::Empty);
        }
        let keys: Vec<Value> = certs
            .iter()
            .map(|der| ca_jwk(der).map_err(BundleError::Pem))
            .collect::<Result<_, _>>()?;
        let doc = json!({ "keys": keys }).to_string();
        Self::parse(trust_domain, doc.as_bytes())
    }

    /// A bootstrap bundle file: a SPIFFE bundle (JSON) or PEM certificates.
    pub fn from_file_contents(
        trust_domain: spiffe::TrustDomain,
        contents: &[u8],
    ) -> Result<Self, BundleError> {
        if contents.trim_ascii_start().starts_with(b"{") {
            Self::parse(trust_domain, contents)
        } else {
            Self::from_pem(trust_domain, contents)
        }
    }

    /// Whether `other` carries the same keys (sequence and hint aside).
    pub fn same_keys(&self, other: &Self) -> bool {
        self.x509 == other.x509
            && self.jwt_jwks == other.jwt_jwks
            && self.wit_jwks == other.wit_jwks
    }
}

/// The signing keys of one `use`, in document order.
struct Signing {
    key_use: &'static str,
    keys: Vec<VerifyingKey>,
    json: Vec<Value>,
}

impl Signing {
    fn new(key_use: &'static str) -> Self {
        Self {
            key_use,
            keys: Vec::new(),
            json: Vec::new(),
        }
    }

    fn add(&mut self, index: usize, jwk: &Value) -> Result<(), BundleError> {
        let key = VerifyingKey::from_jwk(jwk).map_err(|e: JwkError| BundleError::Key {
            index,
            message: e.to_string(),
        })?;
        if self.keys.iter().any(|k| k.kid == key.kid) {
            return Err(BundleError::DuplicateKid {
                key_use: self.key_use,
                kid: key.kid,
            });
        }
        self.keys.push(key);
        self.json.push(jwk.clone());
        Ok(())
    }

    fn jwks(&self) -> Bytes {
        Bytes::from(json!({ "keys": self.json }).to_string())
    }
}

/// The JWK of a CA certificate: its public key, `x5c` holding the
/// certificate, `use` x509-svid (and no `kid`, spec §4.2.1).
fn ca_jwk(der: &[u8]) -> Result<Value, String> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut jwk = match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let point = point.data();
            let (crv, len) = match point.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                133 => ("P-521", 66),
                n => return Err(format!("unsupported EC point of {n} bytes")),
            };
            if point[0] != 4 {
                return Err("compressed EC points are not supported".into());
            }
            json!({
                "kty": "EC",
                "crv": crv,
                "x": B64URL.encode(&point[1..1 + len]),
                "y": B64URL.encode(&point[1 + len..]),
            })
        }
        Ok(PublicKey::RSA(rsa)) => json!({
            "kty": "RSA",
            "n": B64URL.encode(trim_zeros(rsa.modulus)),
            "e": B64URL.encode(trim_zeros(rsa.exponent)),
        }),
        Ok(_) => return Err("unsupported CA key type".into()),
        Err(e) => return Err(format!("CA public key: {e}")),
    };
    jwk["use"] = X509_SVID_USE.into();
    jwk["x5c"] = json!([STANDARD.encode(der)]);
    Ok(jwk)
}

/// DER integers carry a leading zero byte when the high bit is set; JWK
/// integers do not.
fn trim_zeros(mut bytes: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = bytes {
        if rest.is_empty() {
            break;
        }
        bytes = rest;
    }
    bytes
}

/// This trust domain's bundle as a SPIFFE bundle document: every published
/// CA, JWT-SVID key and WIT-SVID key, the sequence number and
/// `refresh_hint`.
pub fn document(bundle: &TrustBundle, refresh_hint: Duration) -> Result<Vec<u8>, String> {
    let mut keys = Vec::new();
    for der in pem::split_der_certs(&bundle.x509).map_err(|e| e.to_string())? {
        keys.push(ca_jwk(der)?);
    }
    keys.extend(bundle.jwt_keys.iter().map(|k| k.to_json(JWT_SVID_USE)));
    keys.extend(bundle.wit_keys.iter().map(|k| k.to_json(WIT_SVID_USE)));
    let doc = json!({
        "keys": keys,
        "spiffe_sequence": bundle.sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs().max(1),
    });
    Ok(serde_json::to_vec(&doc).expect("a JSON value serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::jws::{KeyMaterial, PublicJwk};

    fn td(name: &str) -> spiffe::TrustDomain {
        spiffe::TrustDomain::new(name).unwrap()
    }

    fn ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn our_document_parses_back_with_every_key_and_its_use() {
        let (ca1, ca2) = (ca_der(), ca_der());
        let bundle = TrustBundle::new(
            [ca1.clone(), ca2.clone()].concat(),
            vec![PublicJwk::for_tests("j1", 1)],
            vec![PublicJwk::for_tests("w1", 2)],
            7,
        );
        let doc = document(&bundle, Duration::from_secs(300)).unwrap();
        let value: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(value["spiffe_sequence"], 7);
        assert_eq!(value["spiffe_refresh_hint"], 300);
        let uses: Vec<&str> = value["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["use"].as_str().unwrap())
            .collect();
        assert_eq!(uses, ["x509-svid", "x509-svid", "jwt-svid", "wit-svid"]);
        assert!(
            value["keys"][0].get("kid").is_none(),
            "CA keys carry no kid"
        );

        let back = ForeignBundle::parse(td("example.org"), &doc).unwrap();
        assert_eq!(back.x509.as_ref(), [ca1, ca2].concat().as_slice());
        assert_eq!(back.jwt_keys[0].kid, "j1");
        assert_eq!(back.wit_keys[0].kid, "w1");
        assert!(matches!(back.jwt_keys[0].material, KeyMaterial::P256(_)));
        assert_eq!(back.sequence, Some(7));
        assert_eq!(back.refresh_hint, Some(Duration::from_secs(300)));
        let jwks: Value = serde_json::from_slice(&back.jwt_jwks).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_ca_jwk_matches_the_certificate_key() {
        let der = ca_der();
        let jwk = ca_jwk(&der).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        let key = VerifyingKey::from_jwk(&{
            let mut j = jwk.clone();
            j["kid"] = "x".into();
            j
        })
        .unwrap();
        assert_eq!(key.material, KeyMaterial::P256(point));
    }

    #[test]
    fn malformed_documents_are_refused_whole() {
        let parse = |v: Value| ForeignBundle::parse(td("other.org"), v.to_string().as_bytes());
        assert_eq!(parse(json!({})).unwrap_err(), BundleError::NoKeys);
        assert!(matches!(
            parse(json!({"keys": [{"use": "x509-svid", "x5c": []}]})),
            Err(BundleError::Key { index: 0, .. })
        ));
        assert!(matches!(
            parse(json!({"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]})),
            Err(BundleError::Key { index: 0, .. })
        ));
        let jwk = PublicJwk::for_tests("k", 1).to_json("jwt-svid");
        assert!(matches!(
            parse(json!({"keys": [jwk, jwk]})),
            Err(BundleError::DuplicateKid { .. })
        ));
        let mut no_kid = jwk.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        assert!(matches!(
            parse(json!({"keys": [no_kid]})),
            Err(BundleError::Key { index: 0, .. })
        ));
        assert!(matches!(
            parse(json!({"keys": [], "spiffe_sequence": -1})),
            Err(BundleError::Sequence(_))
        ));
        assert!(ForeignBundle::parse(td("other.org"), b"[1]").is_err());
    }

    #[test]
    fn keys_of_unknown_or_missing_use_are_ignored() {
        let mut other = PublicJwk::for_tests("k", 1).to_json("enc");
        let mut none = PublicJwk::for_tests("k2", 1).to_json("x");
        none.as_object_mut().unwrap().remove("use");
        other["x"] = "not even base64!".into();
        let b = ForeignBundle::parse(
            td("other.org"),
            json!({"keys": [other, none]}).to_string().as_bytes(),
        )
        .unwrap();
        assert!(b.x509.is_empty() && b.jwt_keys.is_empty() && b.wit_keys.is_empty());
        assert_eq!(b.sequence, None);
    }

    #[test]
    fn a_pem_bootstrap_bundle_becomes_ca_keys() {
        let der = ca_der();
        let pem = pem::encode("CERTIFICATE", &der);
        let b = ForeignBundle::from_file_contents(td("other.org"), pem.as_bytes()).unwrap();
        assert_eq!(b.x509.as_ref(), der.as_slice());
        assert_eq!(
            ForeignBundle::from_pem(td("other.org"), b"").unwrap_err(),
            BundleError::Empty
        );
    }
}
