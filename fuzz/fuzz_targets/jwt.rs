//! Subject and actor JWTs: `jws::verify` (JWT-SVIDs) and
//! `jws::verify_access_token` (Tessera access tokens) against a fixed key set.
//!
//! Input: byte 0 picks the mode.
//! * even: the rest, as text, is the compact token. Random bytes almost never
//!   carry a valid signature, so this mode exercises everything up to the
//!   signature check (splitting, base64url, header JSON, alg/typ/kid rules).
//! * odd: the rest is `header-JSON \n claims-JSON`; the harness base64url-encodes
//!   both and signs them with the key set's key `k1`, so the header rules and
//!   the claims decoding after a valid signature are reached too.
//!
//! Properties beyond "no panic": a token can only verify with a kid from the
//! key set, an allowed `typ` and alg `ES256`; the claims returned are exactly
//! the signed claims; the same token never verifies both as a JWT-SVID and as
//! an access token (the `typ` rules are disjoint); flipping the last
//! signature character makes a verified token fail.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Map, Value};
use tessera_agent::identity::jws::{self, PublicJwk};

struct Keys {
    signer: EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    set: Vec<PublicJwk>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let rng = ring::rand::SystemRandom::new();
    let pair = |rng: &ring::rand::SystemRandom| {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), rng).unwrap()
    };
    let signer = pair(&rng);
    let other = pair(&rng);
    let set = vec![
        PublicJwk::p256("k1".into(), signer.public_key().as_ref().to_vec()),
        PublicJwk::p256("k2".into(), other.public_key().as_ref().to_vec()),
    ];
    Keys { signer, rng, set }
});

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let keys = &*KEYS;
    if mode % 2 == 0 {
        let token = String::from_utf8_lossy(rest);
        check(&token, keys, None);
    } else {
        let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let (header, claims) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
        let mut token = B64.encode(header);
        token.push('.');
        token.push_str(&B64.encode(claims));
        let sig = keys.signer.sign(&keys.rng, token.as_bytes()).expect("sign");
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        check(&token, keys, Some(claims));
    }
});

fn check(token: &str, keys: &Keys, signed_claims: Option<&[u8]>) {
    let svid = jws::verify(token, keys.set.iter());
    let access = jws::verify_access_token(token, keys.set.iter());
    assert!(
        !(svid.is_ok() && access.is_ok()),
        "one token verified as both kinds"
    );
    for verified in [&svid, &access].into_iter().flatten() {
        let header = &verified.header;
        assert_eq!(header.get("alg").and_then(Value::as_str), Some("ES256"));
        let kid = header.get("kid").and_then(Value::as_str);
        assert!(
            keys.set.iter().any(|k| Some(k.kid.as_str()) == kid),
            "{kid:?}"
        );
        if let Some(claims) = signed_claims {
            let expected: Map<String, Value> =
                serde_json::from_slice(claims).expect("verified claims are JSON");
            assert_eq!(verified.claims, expected);
        }
        // Tampering with the signature must break it.
        let mut bad = token.to_string();
        let last = bad.pop().expect("non-empty");
        bad.push(if last == 'A' { 'B' } else { 'A' });
        assert!(jws::verify(&bad, keys.set.iter()).is_err());
        assert!(jws::verify_access_token(&bad, keys.set.iter()).is_err());
    }
}
