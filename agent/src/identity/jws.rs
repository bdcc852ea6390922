//! JSON Web Signatures in compact form, for JWT-SVIDs, WIT-SVIDs and access
//! tokens.
//!
//! Tessera signs ES256 (the default) or, for JWT-SVIDs, RS256 when
//! `jwt_key_type` asks for RSA ([`JwsSigner`], [`PublicJwk`]): some relying
//! parties (Microsoft Entra workload identity federation) accept only RSA.
//! Every private-key operation is ring's (constant-time); ring signs ECDSA in
//! the fixed r||s form JWS needs (rcgen and most X.509 code use DER
//! signatures instead). A federated trust domain may sign with other keys,
//! so verification goes through [`JwsKey`]: our own [`PublicJwk`]s, or the
//! [`VerifyingKey`]s of a foreign bundle (P-256, P-384 and RSA keys).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Map, Value};

/// Algorithms the JWT-SVID spec allows. Tessera signs ES256 or RS256, and
/// verifies against its own bundle only the algorithm each key signs with;
/// the rest are recognised so the error says "no key" rather than
/// "forbidden algorithm".
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

/// The kind of key that signs JWT-SVIDs (SPIRE's `jwt_key_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JwtKeyType {
    /// ECDSA P-256, signing ES256.
    #[default]
    EcP256,
    /// RSA 2048, signing RS256 (PKCS#1 v1.5).
    Rsa2048,
    /// RSA 4096, signing RS256.
    Rsa4096,
}

impl JwtKeyType {
    /// The names the config accepts, as SPIRE spells them.
    pub const NAMES: &'static [&'static str] = &["ec-p256", "rsa-2048", "rsa-4096"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "ec-p256" => Some(Self::EcP256),
            "rsa-2048" => Some(Self::Rsa2048),
            "rsa-4096" => Some(Self::Rsa4096),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// The JWS `alg` such a key signs with.
    pub fn alg(self) -> &'static str {
        match self {
            Self::EcP256 => "ES256",
            Self::Rsa2048 | Self::Rsa4096 => "RS256",
        }
    }
}

/// The public material of one of Tessera's own signing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnKeyMaterial {
    /// Uncompressed SEC1 P-256 point, 0x04 || x || y (signs ES256).
    P256(Vec<u8>),
    /// RSA modulus and public exponent, big-endian without leading zeros
    /// (signs RS256).
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// Public half of one of Tessera's signing keys, as published in a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicJwk {
    pub kid: String,
    pub material: OwnKeyMaterial,
}

#[cfg(test)]
impl PublicJwk {
    /// A key whose point is `byte` repeated (not on the curve: for tests of
    /// bundles and wire formats, never for verification).
    pub(crate) fn for_tests(kid: &str, byte: u8) -> Self {
        let mut point = vec![4u8];
        point.extend(std::iter::repeat_n(byte, 64));
        Self::p256(kid.into(), point)
    }
}

impl PublicJwk {
    pub fn p256(kid: String, point: Vec<u8>) -> Self {
        Self {
            kid,
            material: OwnKeyMaterial::P256(point),
        }
    }

    /// The one JWS `alg` this key signs (and so verifies) with.
    pub fn alg(&self) -> &'static str {
        match self.material {
            OwnKeyMaterial::P256(_) => "ES256",
            OwnKeyMaterial::Rsa { .. } => "RS256",
        }
    }

    pub fn to_json(&self, key_use: &str) -> Value {
        match &self.material {
            OwnKeyMaterial::P256(point) => serde_json::json!({
                "kty": "EC",
                "crv": "P-256",
                "x": B64.encode(&point[1..33]),
                "y": B64.encode(&point[33..65]),
                "kid": self.kid,
                "use": key_use,
            }),
            OwnKeyMaterial::Rsa { n, e } => serde_json::json!({
                "kty": "RSA",
                "n": B64.encode(n),
                "e": B64.encode(e),
                "kid": self.kid,
                "use": key_use,
            }),
        }
    }

    /// RFC 7638 JWK thumbprint, base64url: a key id every holder of the key
    /// derives alike.
    pub fn thumbprint(&self) -> String {
        match &self.material {
            OwnKeyMaterial::P256(point) => thumbprint(point),
            OwnKeyMaterial::Rsa { n, e } => {
                let canonical = format!(
                    r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                    B64.encode(e),
                    B64.encode(n)
                );
                B64.encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    canonical.as_bytes(),
                ))
            }
        }
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
        // Only the algorithm the key signs with: no other RSA padding or
        // hash is ever accepted under our own kid.
        if alg != self.alg() {
            return Err(JwtError::KeyAlgorithm {
                kid: self.kid.clone(),
                alg: alg.into(),
            });
        }
        match &self.material {
            OwnKeyMaterial::P256(point) => {
                ring_verify(&signature::ECDSA_P256_SHA256_FIXED, point, signed, sig)
            }
            OwnKeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
                .map_err(|_| JwtError::Signature),
        }
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
            material: match &k.material {
                OwnKeyMaterial::P256(point) => KeyMaterial::P256(point.clone()),
                OwnKeyMaterial::Rsa { n, e } => KeyMaterial::Rsa {
                    n: n.clone(),
                    e: e.clone(),
                },
            },
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

/// A private signing key with its key id: ES256 (P-256) or RS256 (RSA).
pub struct JwsSigner {
    kid: String,
    key: SigningKey,
    rng: ring::rand::SystemRandom,
}

enum SigningKey {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for JwsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwsSigner")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .finish_non_exhaustive()
    }
}

impl JwsSigner {
    /// A P-256 key (ES256) or, failing that, an RSA key of 2048 to 4096 bits
    /// (RS256), from PKCS#8 DER. The error is the P-256 one when the key is
    /// neither.
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        let rng = ring::rand::SystemRandom::new();
        let key = match EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        ) {
            Ok(k) => SigningKey::Ec(k),
            Err(ec) => SigningKey::Rsa(RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| ec)?),
        };
        Ok(Self { kid, key, rng })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Which `jwt_key_type` this key is (`None` for an RSA size the config
    /// cannot name, such as an operator's 3072-bit file key).
    pub fn key_type(&self) -> Option<JwtKeyType> {
        match &self.key {
            SigningKey::Ec(_) => Some(JwtKeyType::EcP256),
            SigningKey::Rsa(k) => match k.public().modulus_len() * 8 {
                2048 => Some(JwtKeyType::Rsa2048),
                4096 => Some(JwtKeyType::Rsa4096),
                _ => None,
            },
        }
    }

    /// The JWS `alg` this key signs with.
    pub fn alg(&self) -> &'static str {
        match self.key {
            SigningKey::Ec(_) => "ES256",
            SigningKey::Rsa(_) => "RS256",
        }
    }

    pub fn public_jwk(&self) -> PublicJwk {
        let material = match &self.key {
            SigningKey::Ec(k) => OwnKeyMaterial::P256(k.public_key().as_ref().to_vec()),
            SigningKey::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                OwnKeyMaterial::Rsa { n: c.n, e: c.e }
            }
        };
        PublicJwk {
            kid: self.kid.clone(),
            material,
        }
    }

    /// Signs `claims` with header `{"alg":..,"kid":..,"typ":typ}`.
    pub fn sign<C: serde::Serialize + ?Sized>(
        &self,
        typ: &str,
        claims: &C,
    ) -> Result<String, ring::error::Unspecified> {
        let claims = serde_json::to_vec(claims).map_err(|_| ring::error::Unspecified)?;
        self.sign_json(typ, &claims)
    }

    /// [`sign`](Self::sign) for claims already serialised as a JSON object.
    pub fn sign_json(&self, typ: &str, claims: &[u8]) -> Result<String, ring::error::Unspecified> {
        let header = serde_json::json!({"alg": self.alg(), "kid": self.kid, "typ": typ});
        let mut out = B64.encode(header.to_string());
        out.push('.');
        out.push_str(&B64.encode(claims));
        let sig = match &self.key {
            SigningKey::Ec(k) => k.sign(&self.rng, out.as_bytes())?.as_ref().to_vec(),
            SigningKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    out.as_bytes(),
                    &mut sig,
                )?;
                sig
            }
        };
        out.push('.');
        out.push_str(&B64.encode(sig));
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
    /// Parses an EC P-256 or RSA JWK (as made by [`PublicJwk::to_json`]).
    pub fn from_json(jwk: &Value) -> Option<Self> {
        let s = |k: &str| jwk.get(k).and_then(Value::as_str);
        let b = |k: &str| B64.decode(s(k)?).ok();
        let material = match s("kty")? {
            "EC" if s("crv")? == "P-256" => {
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                OwnKeyMaterial::P256(point)
            }
            "RSA" => OwnKeyMaterial::Rsa {
                n: b("n")?,
                e: b("e")?,
            },
            _ => return None,
        };
        Some(Self {
            kid: s("kid")?.to_string(),
            material,
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

    fn signer() -> JwsSigner {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        JwsSigner::from_pkcs8("k1".into(), pkcs8.as_ref()).unwrap()
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
            material: other.public_jwk().material,
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
