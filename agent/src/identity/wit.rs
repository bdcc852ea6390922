//! WIT-SVIDs (SPIFFE WIT-SVID spec, incubating; the WIMSE Workload Identity
//! Token): a JWT (`typ` `wit+jwt`, with `kid`) binding a workload's public
//! key (`cnf.jwk`, with its `alg`) to its SPIFFE ID (`sub`), with `exp`,
//! `iat` and a random `jti`, and never an `aud`. It is not a bearer token:
//! whoever presents it proves possession of the key (a Workload Proof
//! Token). Signed by the trust domain's WIT-SVID keys, which are published
//! with `use` `wit-svid`, apart from the JWT-SVID keys.
//!
//! The workload's key is generated on the node that serves the WIT-SVID
//! (like an X509-SVID key) and handed to the workload as a private JWK.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::signer::SignError;

/// The only key type Tessera issues WIT-SVIDs for (and its JWS `alg`).
pub const CNF_ALG: &str = "ES256";
/// The JOSE `typ` of a WIT-SVID.
pub const TYP: &str = "wit+jwt";

/// A workload's WIT-SVID key pair: P-256, generated here, held in memory.
pub struct WorkloadKey {
    /// Uncompressed public point, 0x04 || x || y.
    point: Vec<u8>,
    /// The private scalar.
    d: Vec<u8>,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, SignError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| SignError::Crypto)?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| SignError::Crypto)?;
        let d = ec_private_scalar(pkcs8.as_ref()).ok_or(SignError::Crypto)?;
        Ok(Self {
            point: pair.public_key().as_ref().to_vec(),
            d,
        })
    }

    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// The public JWK for `cnf.jwk`.
    pub fn public_jwk(&self) -> Value {
        public_jwk(&self.point)
    }

    /// The private JWK a workload receives as `wit_svid_key`.
    pub fn private_jwk(&self) -> String {
        let mut jwk = self.public_jwk();
        jwk["d"] = B64.encode(&self.d).into();
        jwk.to_string()
    }
}

/// The public JWK of a P-256 point, with `alg` (the WIT-SVID spec requires
/// `cnf.jwk.alg`; go-spiffe refuses a WIT-SVID without it).
pub fn public_jwk(point: &[u8]) -> Value {
    json!({
        "kty": "EC",
        "crv": "P-256",
        "x": B64.encode(&point[1..33]),
        "y": B64.encode(&point[33..65]),
        "alg": CNF_ALG,
    })
}

/// The point of a `cnf.jwk` Tessera issues for: EC P-256 with `alg` ES256
/// and no private part. None for anything else.
pub fn cnf_point(jwk: &Value) -> Option<Vec<u8>> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    if s("kty")? != "EC" || s("crv")? != "P-256" || s("alg")? != CNF_ALG || jwk.get("d").is_some() {
        return None;
    }
    let (x, y) = (B64.decode(s("x")?).ok()?, B64.decode(s("y")?).ok()?);
    if x.len() != 32 || y.len() != 32 {
        return None;
    }
    let mut point = vec![4u8];
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    Some(point)
}

/// The claims of a WIT-SVID for `sub`, binding `cnf_jwk`.
pub fn claims(sub: &spiffe::SpiffeId, cnf_jwk: &Value, iat: u64, exp: u64) -> Value {
    json!({
        "sub": sub.to_string(),
        "cnf": { "jwk": cnf_jwk },
        "iat": iat,
        "exp": exp,
        "jti": super::jws::random_kid(),
    })
}

/// The private scalar of a P-256 PKCS#8 key as ring writes it:
/// `PrivateKeyInfo { version, algorithm, privateKey OCTET STRING
/// (ECPrivateKey { version 1, privateKey OCTET STRING (32 bytes), ... }) }`.
fn ec_private_scalar(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let (tag, info, _) = der(pkcs8)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = der(info)?; // version
    let (_, _, rest) = der(rest)?; // algorithm
    let (tag, private, _) = der(rest)?;
    if tag != 0x04 {
        return None;
    }
    let (tag, ec, _) = der(private)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = der(ec)?; // version 1
    let (tag, d, _) = der(rest)?;
    (tag == 0x04 && d.len() == 32).then(|| d.to_vec())
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 2 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_jwk_is_the_key_pair_ring_generated() {
        let key = WorkloadKey::generate().unwrap();
        let jwk: Value = serde_json::from_str(&key.private_jwk()).unwrap();
        let d = B64.decode(jwk["d"].as_str().unwrap()).unwrap();
        // ring accepts the scalar with the public point only if they match.
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &d,
            key.point(),
            &rng,
        )
        .expect("d and the public point belong together");
        let sig = pair.sign(&rng, b"proof").unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            cnf_point(&key.public_jwk()).unwrap(),
        )
        .verify(b"proof", sig.as_ref())
        .unwrap();
        assert_eq!(jwk["alg"], "ES256");
    }

    #[test]
    fn cnf_keys_other_than_public_p256_es256_are_refused() {
        let key = WorkloadKey::generate().unwrap();
        let good = key.public_jwk();
        assert!(cnf_point(&good).is_some());
        let private: Value = serde_json::from_str(&key.private_jwk()).unwrap();
        assert!(
            cnf_point(&private).is_none(),
            "a private key is never a cnf"
        );
        for (k, v) in [("alg", "ES384"), ("crv", "P-384"), ("kty", "RSA")] {
            let mut bad = good.clone();
            bad[k] = v.into();
            assert!(cnf_point(&bad).is_none(), "{k}={v}");
        }
        let mut short = good.clone();
        short["y"] = B64.encode([7u8; 31]).into();
        assert!(cnf_point(&short).is_none());
    }
}
