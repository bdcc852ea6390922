//! JSON Web Signatures in compact form, for JWT-SVIDs, WIT-SVIDs and access
//! tokens.
//!
//! Tessera signs ES256 only ([`Es256Signer`], [`PublicJwk`]); ring signs
//! ECDSA in the fixed r||s form JWS needs (rcgen and most X.509 code use DER
//! signatures instead). A federated trust domain may sign with other keys,
//! so verification goes through [`JwsKey`]: our own [`PublicJwk`]s, or the
//! [`VerifyingKey`]s of a foreign bundle (P-256, P-384 and RSA keys).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Map, Value};

/// Algorithms the JWT-SVID spec allows. Tessera signs only ES256, and so can
/// only verify ES256 against its own bundle; the rest are recognised so the
/// error says "no key" rather than "forbidden algorithm".
const ALLOWED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("token is not a JWS compact serialization")]
    Malformed,
    #[error("token header is invalid: {0}")]
    Header(&'static str),
    #[error("token algorithm {0:?} is not allowed")]
    Algorithm(String),
    #[error("token header missing key id")]
    MissingKid,
    #[error("no key {0:?} in the trust bundle")]
    UnknownKey(String),
    #[error("token signature is invalid")]
    Signature,
    #[error("key {kid:?} cannot verify {alg} signatures")]
    KeyAlgorithm { kid: String, alg: String },
    #[error("token claims are invalid: {0}")]
    Claims(&'static str),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("expected audience {0:?} is not in the token's aud claim")]
    Audience(String),
    #[error(
        "no trusted bundle for trust domain {0:?} (the workload's entries do not federate with it, or its bundle was never fetched)"
    )]
    UntrustedDomain(String),
}

/// Public half of an ES256 key, as published in a JWKS.
#[derive(Debug, Clone)]
pub struct PublicJwk {
    pub kid: String,
    /// Uncompressed SEC1 point, 0x04 || x || y.
    pub point: Vec<u8>,
}

#[cfg(test)]
impl PublicJwk {
    /// A key whose point is `byte` repeated (not on the curve: for tests of
    /// bundles and wire formats, never for verification).
    pub(crate) fn for_tests(kid: &str, byte: u8) -> Self {
        let mut point = vec![4u8];
        point.extend(std::iter::repeat_n(byte, 64));
        Self {
            kid: kid.into(),
            point,
        }
    }
}

impl PartialEq for PublicJwk {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.point == other.point
    }
}

impl PublicJwk {
    pub fn to_json(&self, key_use: &str) -> Value {
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&self.point[1..33]),
            "y": B64.encode(&self.point[33..65]),
            "kid": self.kid,
            "use": key_use,
        })
    }
}

/// A key that verifies JWS signatures, found by its `kid`.
pub trait JwsKey {
    fn kid(&self) -> &str;
    /// Checks `signature` over `signed` for the header's `alg`.
    fn verify(&self, alg: &str, signed: &[u8], signature: &[u8]) -> Result<(), JwtError>;
}

fn ring_verify(
    algorithm: &'static dyn signature::VerificationAlgorithm,
    public_key: &[u8],
    signed: &[u8],
    sig: &[u8],
) -> Result<(), JwtError> {
    signature::UnparsedPublicKey::new(algorithm, public_key)
        .verify(signed, sig)
        .map_err(|_| JwtError::Signature)
}

impl JwsKey for PublicJwk {
    fn kid(&self) -> &str {
        &self.kid
    }

    fn verify(&self, alg: &str, signed: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        if alg != "ES256" {
            return Err(JwtError::KeyAlgorithm {
                kid: self.kid.clone(),
                alg: alg.into(),
            });
        }
        ring_verify(
            &signature::ECDSA_P256_SHA256_FIXED,
            &self.point,
            signed,
            sig,
        )
    }
}

/// The public material of a verification key from a JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// Uncompressed P-256 point.
    P256(Vec<u8>),
    /// Uncompressed P-384 point.
    P384(Vec<u8>),
    /// RSA modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// A key type Tessera cannot verify with (P-521, Ed25519, ...): kept so
    /// it is still handed to workloads, whose libraries may.
    Unsupported(String),
}

/// A verification key of any trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    pub kid: String,
    pub material: KeyMaterial,
}

/// Why a JWK could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("JWK has no {0:?}")]
    Missing(&'static str),
    #[error("JWK member {0:?} is not valid base64url")]
    Encoding(&'static str),
    #[error("JWK {0}")]
    Invalid(&'static str),
}

impl VerifyingKey {
    /// Reads the public key of an RFC 7517 JWK (`kid` required).
    pub fn from_jwk(jwk: &Value) -> Result<Self, JwkError> {
        let text = |k: &'static str| {
            jwk.get(k)
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing(k))
        };
        let bytes = |k: &'static str| B64.decode(text(k)?).map_err(|_| JwkError::Encoding(k));
        let kid = text("kid")?;
        if kid.is_empty() {
            return Err(JwkError::Missing("kid"));
        }
        let material = match text("kty")? {
            "EC" => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                let (len, wrap): (usize, fn(Vec<u8>) -> KeyMaterial) = match text("crv")? {
                    "P-256" => (32, KeyMaterial::P256),
                    "P-384" => (48, KeyMaterial::P384),
                    other => {
                        return Ok(Self {
                            kid: kid.into(),
                            material: KeyMaterial::Unsupported(format!("EC {other}")),
                        });
                    }
                };
                if x.len() != len || y.len() != len {
                    return Err(JwkError::Invalid(
                        "x or y has the wrong length for its curve",
                    ));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                wrap(point)
            }
            "RSA" => KeyMaterial::Rsa {
                n: bytes("n")?,
                e: bytes("e")?,
            },
            other => KeyMaterial::Unsupported(other.to_string()),
        };
        Ok(Self {
            kid: kid.into(),
            material,
        })
    }
}

impl From<&PublicJwk> for VerifyingKey {
    fn from(k: &PublicJwk) -> Self {
        Self {
            kid: k.kid.clone(),
            material: KeyMaterial::P256(k.point.clone()),
        }
    }
}

impl JwsKey for VerifyingKey {
    fn kid(&self) -> &str {
        &self.kid
    }

    fn verify(&self, alg: &str, signed: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        use signature as s;
        let mismatch = || JwtError::KeyAlgorithm {
            kid: self.kid.clone(),
            alg: alg.into(),
        };
        match (&self.material, alg) {
            (KeyMaterial::P256(p), "ES256") => {
                ring_verify(&s::ECDSA_P256_SHA256_FIXED, p, signed, sig)
            }
            (KeyMaterial::P384(p), "ES384") => {
                ring_verify(&s::ECDSA_P384_SHA384_FIXED, p, signed, sig)
            }
            (KeyMaterial::Rsa { n, e }, _) => {
                let params: &s::RsaParameters = match alg {
                    "RS256" => &s::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &s::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &s::RSA_PKCS1_2048_8192_SHA512,
                    "PS256" => &s::RSA_PSS_2048_8192_SHA256,
                    "PS384" => &s::RSA_PSS_2048_8192_SHA384,
                    "PS512" => &s::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(mismatch()),
                };
                s::RsaPublicKeyComponents { n, e }
                    .verify(params, signed, sig)
                    .map_err(|_| JwtError::Signature)
            }
            _ => Err(mismatch()),
        }
    }
}

/// A private ES256 key with its key id.
pub struct Es256Signer {
    kid: String,
    key: EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Es256Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Es256Signer {
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        let rng = ring::rand::SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)?;
        Ok(Self { kid, key, rng })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_jwk(&self) -> PublicJwk {
        PublicJwk {
            kid: self.kid.clone(),
            point: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `claims` with header `{"alg":"ES256","kid":..,"typ":typ}`.
    pub fn sign(&self, typ: &str, claims: &Value) -> Result<String, ring::error::Unspecified> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid, "typ": typ});
        let mut out = B64.encode(header.to_string());
        out.push('.');
        out.push_str(&B64.encode(claims.to_string()));
        let sig = self.key.sign(&self.rng, out.as_bytes())?;
        out.push('.');
        out.push_str(&B64.encode(sig.as_ref()));
        Ok(out)
    }
}

/// A token whose signature checked out, with its decoded parts.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

/// Verifies a JWT-SVID's compact JWS against `keys` (by `kid`): `typ`, when
/// present, must be `JWT` or `JOSE`. Claims are not checked here.
pub fn verify<'a, K: JwsKey + 'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a K>,
) -> Result<VerifiedJwt, JwtError> {
    verify_typed(token, keys, |typ| match typ {
        None | Some("JWT" | "JOSE") => Ok(()),
        Some(_) => Err(JwtError::Header("typ must be JWT or JOSE")),
    })
}

/// Verifies an RFC 9068 access token: `typ` must be `at+jwt`, so a JWT-SVID
/// (or any other JWT signed by a key we trust) never passes as one.
pub fn verify_access_token<'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a PublicJwk>,
) -> Result<VerifiedJwt, JwtError> {
    verify_typed(token, keys, |typ| match typ {
        Some("at+jwt" | "application/at+jwt") => Ok(()),
        _ => Err(JwtError::Header("typ must be at+jwt")),
    })
}

fn verify_typed<'a, K: JwsKey + 'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a K>,
    check_typ: impl FnOnce(Option<&str>) -> Result<(), JwtError>,
) -> Result<VerifiedJwt, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Map<String, Value> =
        decode_json(h).ok_or(JwtError::Header("not base64url JSON"))?;
    for name in header.keys() {
        if !matches!(name.as_str(), "alg" | "kid" | "typ") {
            return Err(JwtError::Header("only alg, kid and typ are allowed"));
        }
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Header("alg missing"))?;
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(JwtError::Algorithm(alg.to_string()));
    }
    match header.get("typ") {
        None => check_typ(None)?,
        Some(Value::String(t)) => check_typ(Some(t))?,
        Some(_) => return Err(JwtError::Header("typ must be a string")),
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingKid)?;
    let key = keys
        .into_iter()
        .find(|k| k.kid() == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.to_string()))?;
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let signed_len = h.len() + 1 + c.len();
    key.verify(alg, &token.as_bytes()[..signed_len], &sig)?;
    let claims = decode_json(c).ok_or(JwtError::Claims("not base64url JSON"))?;
    Ok(VerifiedJwt { header, claims })
}

/// The claims of a compact JWS, signature unchecked: only to find which
/// bundle verifies it.
pub fn unverified_claims(token: &str) -> Result<Map<String, Value>, JwtError> {
    let mut parts = token.split('.');
    let (Some(_), Some(c), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    decode_json(c).ok_or(JwtError::Claims("not base64url JSON"))
}

fn decode_json(part: &str) -> Option<Map<String, Value>> {
    let bytes = B64.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// RFC 7638 JWK thumbprint of a P-256 key (uncompressed point), base64url:
/// a key id every holder of the key derives alike.
pub fn thumbprint(point: &[u8]) -> String {
    let (x, y) = (&point[1..33], &point[33..65]);
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        B64.encode(x),
        B64.encode(y)
    );
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

impl PublicJwk {
    /// Parses an EC P-256 JWK (as made by [`PublicJwk::to_json`]).
    pub fn from_json(jwk: &Value) -> Option<Self> {
        let s = |k: &str| jwk.get(k).and_then(Value::as_str);
        if s("kty")? != "EC" || s("crv")? != "P-256" {
            return None;
        }
        let x = B64.decode(s("x")?).ok()?;
        let y = B64.decode(s("y")?).ok()?;
        if x.len() != 32 || y.len() != 32 {
            return None;
        }
        let mut point = vec![4u8];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        Some(Self {
            kid: s("kid")?.to_string(),
            point,
        })
    }
}

/// Random key id: 128 bits, base64url.
pub fn random_kid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    B64.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Es256Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        Es256Signer::from_pkcs8("k1".into(), pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let s = signer();
        let token = s
            .sign("JWT", &serde_json::json!({"sub": "spiffe://td/x"}))
            .unwrap();
        let jwk = s.public_jwk();
        let v = verify(&token, [&jwk]).unwrap();
        assert_eq!(v.claims["sub"], "spiffe://td/x");
        let mut bad = token.clone();
        bad.replace_range(bad.len() - 4.., "AAAA");
        assert_eq!(verify(&bad, [&jwk]).unwrap_err(), JwtError::Signature);
        assert_eq!(verify("a.b", [&jwk]).unwrap_err(), JwtError::Malformed);
        let other = signer();
        let other_jwk = PublicJwk {
            kid: "k1".into(),
            point: other.public_jwk().point,
        };
        assert_eq!(
            verify(&token, [&other_jwk]).unwrap_err(),
            JwtError::Signature
        );
    }

    #[test]
    fn rejects_forbidden_headers() {
        let jwk = signer().public_jwk();
        let tok = |h: &str| format!("{}.{}.AAAA", B64.encode(h), B64.encode("{}"));
        assert!(matches!(
            verify(&tok(r#"{"alg":"none","kid":"k1"}"#), [&jwk]),
            Err(JwtError::Algorithm(_))
        ));
        assert!(matches!(
            verify(&tok(r#"{"alg":"HS256","kid":"k1"}"#), [&jwk]),
            Err(JwtError::Algorithm(_))
        ));
        assert_eq!(
            verify(&tok(r#"{"alg":"ES256"}"#), [&jwk]).unwrap_err(),
            JwtError::MissingKid
        );
        assert!(matches!(
            verify(&tok(r#"{"alg":"ES256","kid":"k1","jku":"x"}"#), [&jwk]),
            Err(JwtError::Header(_))
        ));
        assert!(matches!(
            verify(&tok(r#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#), [&jwk]),
            Err(JwtError::Header(_))
        ));
        assert!(matches!(
            verify(&tok(r#"{"alg":"RS256","kid":"k1"}"#), [&jwk]),
            Err(JwtError::KeyAlgorithm { .. })
        ));
    }

    #[test]
    fn foreign_keys_verify_their_own_algorithms_only() {
        let s = signer();
        let token = s.sign("JWT", &serde_json::json!({"sub": "x"})).unwrap();
        let jwk = s.public_jwk().to_json("jwt-svid");
        let key = VerifyingKey::from_jwk(&jwk).unwrap();
        assert_eq!(key, VerifyingKey::from(&s.public_jwk()));
        assert!(verify(&token, [&key]).is_ok());
        let as_p384 = VerifyingKey {
            kid: "k1".into(),
            material: KeyMaterial::P384(vec![4; 97]),
        };
        assert!(matches!(
            verify(&token, [&as_p384]),
            Err(JwtError::KeyAlgorithm { .. })
        ));
        let rsa = VerifyingKey::from_jwk(
            &serde_json::json!({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}),
        )
        .unwrap();
        assert!(matches!(rsa.material, KeyMaterial::Rsa { .. }));
        let ed = VerifyingKey::from_jwk(
            &serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "e", "x": "AA"}),
        )
        .unwrap();
        assert_eq!(ed.material, KeyMaterial::Unsupported("OKP".into()));
        assert_eq!(
            VerifyingKey::from_jwk(&serde_json::json!({"kty": "EC", "crv": "P-256"})),
            Err(JwkError::Missing("kid"))
        );
        assert_eq!(
            VerifyingKey::from_jwk(
                &serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k", "x": "AA", "y": "AA"})
            ),
            Err(JwkError::Invalid(
                "x or y has the wrong length for its curve"
            ))
        );
    }
}
