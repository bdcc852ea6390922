//! The WIT guard against WIT-SVIDs and Workload Proof Tokens signed by
//! `jsonwebtoken`, an independent JOSE implementation: what the draft
//! requires to be refused is refused, with the right status. (The go-spiffe
//! interop suite checks the same guard with WIT-SVIDs from a running agent
//! and proofs from go-jose.)

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tessera_token_guard::{VerifiedWorkload, WitError, WitGuardLayer};
use tower::{Layer, ServiceExt};

const BASE: &str = "https://api.example";
const PATH: &str = "/orders/42";
const ID: &str = "spiffe://example.org/billing";
const T0: u64 = 1_800_000_000;
static NEXT_JTI: AtomicU64 = AtomicU64::new(1);

struct Key {
    pkcs8: Vec<u8>,
    point: Vec<u8>,
}

impl Key {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            pkcs8: pkcs8.as_ref().to_vec(),
            point: pair.public_key().as_ref().to_vec(),
        }
    }

    fn jwk(&self) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256",
            "x": B64.encode(&self.point[1..33]), "y": B64.encode(&self.point[33..65]),
        })
    }

    fn sign(&self, typ: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some(typ.into());
        h.kid = kid.map(Into::into);
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

fn hash(s: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// The trust domain's WIT key, the workload's key, and a WIT-SVID binding it.
struct World {
    issuer: Key,
    workload: Key,
    wit: String,
    now: Arc<AtomicU64>,
}

impl World {
    fn new() -> Self {
        let issuer = Key::new();
        let workload = Key::new();
        let wit = issuer.sign(
            "wit+jwt",
            Some("wk1"),
            &json!({"sub": ID, "exp": T0 + 3600, "iat": T0, "jti": "w1", "cnf": {"jwk": workload.jwk()}}),
        );
        Self {
            issuer,
            workload,
            wit,
            now: Arc::new(AtomicU64::new(T0)),
        }
    }

    fn bundle(&self, key_use: &str) -> Vec<u8> {
        let mut jwk = self.issuer.jwk();
        jwk["kid"] = "wk1".into();
        jwk["use"] = key_use.into();
        json!({ "keys": [jwk] }).to_string().into_bytes()
    }

    fn guard(&self) -> WitGuardLayer {
        let now = self.now.clone();
        WitGuardLayer::builder()
            .target_uri_base(BASE)
            .wit_bundle("example.org", self.bundle("wit-svid"))
            .clock(move || UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst)))
            .build()
            .unwrap()
    }

    fn claims(&self) -> Value {
        json!({
            "aud": format!("{BASE}{PATH}"),
            "exp": T0 + 60,
            "jti": format!("jti-{}", NEXT_JTI.fetch_add(1, Ordering::SeqCst)),
            "wth": hash(&self.wit),
        })
    }

    fn wpt(&self, claims: &Value) -> String {
        self.workload.sign("wpt+jwt", None, claims)
    }

    fn headers(&self, wit: &str, wpt: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "workload-identity-token",
            HeaderValue::from_str(wit).unwrap(),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("WPT {wpt}")).unwrap(),
        );
        h
    }
}

#[test]
fn a_proof_is_accepted_once() {
    let w = World::new();
    let guard = w.guard();
    let headers = w.headers(&w.wit, &w.wpt(&w.claims()));
    let ok = guard.verify(&headers, PATH).unwrap();
    assert_eq!(ok.spiffe_id, ID);
    assert_eq!(ok.trust_domain, "example.org");
    assert_eq!(ok.wit_kid, "wk1");
    assert_eq!(guard.verify(&headers, PATH), Err(WitError::Replayed));
    // The scheme name is case-insensitive.
    let mut lower = w.headers(&w.wit, &w.wpt(&w.claims()));
    let value = lower[header::AUTHORIZATION]
        .to_str()
        .unwrap()
        .replace("WPT", "wpt");
    lower.insert(header::AUTHORIZATION, value.parse().unwrap());
    guard.verify(&lower, PATH).unwrap();
}

#[test]
fn the_wit_is_checked_before_the_proof() {
    let w = World::new();
    let guard = w.guard();
    let wpt = |wit: &str| {
        let mut c = w.claims();
        c["wth"] = hash(wit).into();
        w.wpt(&c)
    };
    let signed = |claims: Value| w.issuer.sign("wit+jwt", Some("wk1"), &claims);
    let cases: Vec<(&str, String, WitError)> = vec![
        (
            "JWT-SVID typ",
            w.issuer.sign(
                "JWT",
                Some("wk1"),
                &json!({"sub": ID, "exp": T0 + 60, "cnf": {"jwk": w.workload.jwk()}}),
            ),
            WitError::Type("WIT", "wit+jwt"),
        ),
        (
            "no kid",
            w.issuer.sign(
                "wit+jwt",
                None,
                &json!({"sub": ID, "exp": T0 + 60, "cnf": {"jwk": w.workload.jwk()}}),
            ),
            WitError::MissingKid,
        ),
        (
            "another trust domain",
            signed(
                json!({"sub": "spiffe://evil.example/x", "exp": T0 + 60, "cnf": {"jwk": w.workload.jwk()}}),
            ),
            WitError::UntrustedDomain,
        ),
        (
            "signed by the workload itself",
            w.workload.sign(
                "wit+jwt",
                Some("wk1"),
                &json!({"sub": ID, "exp": T0 + 60, "cnf": {"jwk": w.workload.jwk()}}),
            ),
            WitError::Signature("WIT"),
        ),
        (
            "expired",
            signed(json!({"sub": ID, "exp": T0 - 60, "cnf": {"jwk": w.workload.jwk()}})),
            WitError::Expired("WIT"),
        ),
        (
            "with an audience",
            signed(
                json!({"sub": ID, "exp": T0 + 60, "aud": "x", "cnf": {"jwk": w.workload.jwk()}}),
            ),
            WitError::WitAudience,
        ),
        (
            "no cnf",
            signed(json!({"sub": ID, "exp": T0 + 60})),
            WitError::Claim("WIT", "cnf.jwk"),
        ),
        (
            "cnf without alg",
            signed(
                json!({"sub": ID, "exp": T0 + 60, "cnf": {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}}}),
            ),
            WitError::Claim("WIT", "cnf.jwk.alg"),
        ),
        (
            "no exp",
            signed(json!({"sub": ID, "cnf": {"jwk": w.workload.jwk()}})),
            WitError::Claim("WIT", "exp"),
        ),
    ];
    for (name, wit, want) in cases {
        assert_eq!(
            guard.verify(&w.headers(&wit, &wpt(&wit)), PATH),
            Err(want),
            "{name}"
        );
    }
    // A private key in cnf is refused.
    let mut private = w.workload.jwk();
    private["d"] = "AAAA".into();
    let wit = signed(json!({"sub": ID, "exp": T0 + 60, "cnf": {"jwk": private}}));
    assert_eq!(
        guard.verify(&w.headers(&wit, &wpt(&wit)), PATH),
        Err(WitError::Claim("WIT", "cnf.jwk"))
    );
}

#[test]
fn jwt_svid_keys_never_verify_a_wit() {
    let w = World::new();
    let now = w.now.clone();
    let guard = WitGuardLayer::builder()
        .target_uri_base(BASE)
        .wit_bundle("example.org", w.bundle("jwt-svid"))
        .clock(move || UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst)))
        .build()
        .unwrap();
    let headers = w.headers(&w.wit, &w.wpt(&w.claims()));
    assert_eq!(guard.verify(&headers, PATH), Err(WitError::UnknownKey));
    // Publishing the WIT key (a FetchWITBundles update) makes it pass.
    guard
        .set_wit_bundle("spiffe://example.org", &w.bundle("wit-svid"))
        .unwrap();
    guard.verify(&headers, PATH).unwrap();
}

#[test]
fn the_proof_binds_the_request_the_wit_and_the_tokens_beside_it() {
    let w = World::new();
    let guard = w.guard();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = w.claims();
        f(&mut c);
        w.headers(&w.wit, &w.wpt(&c))
    };
    let refused = |headers: HeaderMap, path: &str, want: WitError| {
        assert_eq!(guard.verify(&headers, path), Err(want));
    };
    refused(with(&|_| {}), "/orders/43", WitError::Audience);
    refused(
        with(&|c| c["aud"] = "http://api.example/orders/42".into()),
        PATH,
        WitError::Audience,
    );
    refused(
        with(&|c| c["exp"] = (T0 - 30).into()),
        PATH,
        WitError::Expired("WPT"),
    );
    refused(
        with(&|c| c["exp"] = (T0 + 3600).into()),
        PATH,
        WitError::ExpiresTooLate,
    );
    refused(
        with(&|c| c["wth"] = hash("another").into()),
        PATH,
        WitError::WitHash,
    );
    refused(
        with(&|c| {
            c.as_object_mut().unwrap().remove("jti");
        }),
        PATH,
        WitError::Claim("WPT", "jti"),
    );
    refused(
        with(&|c| c["tth"] = hash("t").into()),
        PATH,
        WitError::TokenHash("tth"),
    );
    // aud as a list holding the target is fine.
    guard
        .verify(
            &with(&|c| c["aud"] = json!(["x", format!("{BASE}{PATH}")])),
            PATH,
        )
        .unwrap();

    // oth: each named header, present once, hashed after trimming.
    let mut headers = with(&|c| c["oth"] = json!({"x-user-context": hash("alice")}));
    headers.insert("x-user-context", HeaderValue::from_static(" alice "));
    guard.verify(&headers, PATH).unwrap();
    let mut headers = with(&|c| c["oth"] = json!({"x-user-context": hash("alice")}));
    headers.insert("x-user-context", HeaderValue::from_static("mallory"));
    refused(headers, PATH, WitError::OtherToken("x-user-context".into()));
    refused(
        with(&|c| c["oth"] = json!({"x-user-context": hash("alice")})),
        PATH,
        WitError::OtherToken("x-user-context".into()),
    );
    let mut headers = with(&|c| c["oth"] = json!({"X-User-Context": hash("alice")}));
    headers.insert("x-user-context", HeaderValue::from_static("alice"));
    refused(headers, PATH, WitError::OtherToken("X-User-Context".into()));

    // A proof signed by another key, or with another typ.
    let stranger = Key::new();
    refused(
        w.headers(&w.wit, &stranger.sign("wpt+jwt", None, &w.claims())),
        PATH,
        WitError::Signature("WPT"),
    );
    refused(
        w.headers(&w.wit, &w.workload.sign("JWT", None, &w.claims())),
        PATH,
        WitError::Type("WPT", "wpt+jwt"),
    );
    // Two WITs, or a WPT in both places.
    let mut headers = with(&|_| {});
    headers.append(
        "workload-identity-token",
        HeaderValue::from_str(&w.wit).unwrap(),
    );
    refused(headers, PATH, WitError::Repeated("workload-identity-token"));
    let mut headers = with(&|_| {});
    headers.insert("workload-proof-token", HeaderValue::from_static("x.y.z"));
    refused(headers, PATH, WitError::Ambiguous);
}

#[test]
fn time_moves_the_proof_out_of_its_window() {
    let w = World::new();
    let guard = w.guard();
    let headers = w.headers(&w.wit, &w.wpt(&w.claims()));
    // Within the skew after exp: still good; past it: expired.
    w.now.store(T0 + 65, Ordering::SeqCst);
    guard.verify(&headers, PATH).unwrap();
    let headers = w.headers(&w.wit, &w.wpt(&w.claims()));
    w.now.store(T0 + 71, Ordering::SeqCst);
    assert_eq!(guard.verify(&headers, PATH), Err(WitError::Expired("WPT")));
}

async fn status_of(guard: &WitGuardLayer, headers: HeaderMap) -> (StatusCode, HeaderMap, String) {
    let inner = tower::service_fn(|r: Request<Full<Bytes>>| async move {
        let who = r
            .extensions()
            .get::<VerifiedWorkload>()
            .unwrap()
            .spiffe_id
            .clone();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who))))
    });
    let mut request = Request::get(format!("{BASE}{PATH}?q=1"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    *request.headers_mut() = headers;
    let response = guard.layer(inner).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn http_answers_follow_the_draft() {
    let w = World::new();
    let guard = w.guard();
    let good = w.headers(&w.wit, &w.wpt(&w.claims()));
    let (status, _, body) = status_of(&guard, good.clone()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ID));
    // Replayed: 401 with the WPT challenge, and the reason without a token.
    let (status, headers, body) = status_of(&guard, good).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "WPT");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("replayed")
    );
    assert!(!body.to_string().contains(&w.wit));
    // Nothing at all: a bare challenge.
    let (status, headers, body) = status_of(&guard, HeaderMap::new()).await;
    assert_eq!((status, body.as_str()), (StatusCode::UNAUTHORIZED, ""));
    assert_eq!(headers[header::WWW_AUTHENTICATE], "WPT");
    // The WIT-SVID as a bearer token authenticates nothing.
    let mut bearer = HeaderMap::new();
    bearer.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", w.wit)).unwrap(),
    );
    assert_eq!(status_of(&guard, bearer).await.0, StatusCode::UNAUTHORIZED);

    // A full replay check answers 503 rather than checking less.
    let now = w.now.clone();
    let small = WitGuardLayer::builder()
        .target_uri_base(BASE)
        .wit_bundle("example.org", w.bundle("wit-svid"))
        .replay_capacity(1)
        .clock(move || UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst)))
        .build()
        .unwrap();
    let first = w.headers(&w.wit, &w.wpt(&w.claims()));
    assert_eq!(status_of(&small, first).await.0, StatusCode::OK);
    let second = w.headers(&w.wit, &w.wpt(&w.claims()));
    let (status, headers, _) = status_of(&small, second.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER));
    // Once the first proof's window is over, its slot is free again.
    w.now.store(T0 + 75, Ordering::SeqCst);
    let third = w.headers(
        &w.wit,
        &w.wpt(&{
            let mut c = w.claims();
            c["exp"] = (T0 + 120).into();
            c
        }),
    );
    assert_eq!(status_of(&small, third).await.0, StatusCode::OK);
}

#[test]
fn settings_are_checked_at_build() {
    let w = World::new();
    let err = |b: tessera_token_guard::WitGuardBuilder| b.build().err().unwrap().to_string();
    assert!(
        err(WitGuardLayer::builder().wit_bundle("example.org", w.bundle("wit-svid")))
            .contains("target URI base")
    );
    assert!(
        err(WitGuardLayer::builder()
            .target_uri_base("https://api.example/mcp")
            .wit_bundle("example.org", w.bundle("wit-svid")))
        .contains("no path")
    );
    assert!(err(WitGuardLayer::builder().target_uri_base(BASE)).contains("no WIT bundle"));
    assert!(
        err(WitGuardLayer::builder()
            .target_uri_base(BASE)
            .wit_bundle("Example.ORG", w.bundle("wit-svid")))
        .contains("not a valid trust domain")
    );
    assert!(
        err(WitGuardLayer::builder()
            .target_uri_base(BASE)
            .wit_bundle("example.org", b"{".to_vec()))
        .contains("WIT bundle of example.org")
    );
}

/// A trust domain's WIT keys fetched by the guard itself from a JWKS
/// endpoint (a real HTTP server): fetched at the first WIT, cached, fetched
/// again for a `kid` it has not seen (a new key works from its first WIT),
/// only `wit-svid` keys taken; no keys at all is 503, not 401.
#[tokio::test]
async fn wit_keys_are_fetched_cached_and_fetched_again_for_a_new_key() {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use tessera_token_guard::JwksSource;

    let w = World::new();
    let jwt_svid_key = Key::new();
    let next = Key::new();
    let jwk = |k: &Key, kid: &str, key_use: &str| {
        let mut j = k.jwk();
        j["kid"] = kid.into();
        j["use"] = key_use.into();
        j
    };
    let served = Arc::new(Mutex::new(json!({"keys": [
        jwk(&w.issuer, "wk1", "wit-svid"),
        jwk(&jwt_svid_key, "jk1", "jwt-svid"),
    ]})));
    let hits = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/bundle",
        axum::routing::get({
            let (served, hits) = (served.clone(), hits.clone());
            move || {
                hits.fetch_add(1, Ordering::SeqCst);
                let doc = served.lock().unwrap().to_string();
                async move { doc }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let now = w.now.clone();
    let guard = |url: String| {
        let now = now.clone();
        WitGuardLayer::builder()
            .target_uri_base(BASE)
            .wit_bundle_source("spiffe://example.org", JwksSource::Url(url))
            .wit_bundle_refresh_interval(Duration::from_secs(3600))
            .wit_bundle_min_refresh_interval(Duration::ZERO)
            .clock(move || UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst)))
            .build()
            .unwrap()
    };
    let fetching = guard(format!("http://{addr}/bundle"));
    // A WIT of `signer` under `kid`, and a fresh proof for it.
    let request = |signer: &Key, kid: &str| {
        let wit = signer.sign(
            "wit+jwt",
            Some(kid),
            &json!({"sub": ID, "exp": T0 + 3600, "iat": T0, "jti": format!("w-{kid}"),
                    "cnf": {"jwk": w.workload.jwk()}}),
        );
        let mut claims = w.claims();
        claims["wth"] = hash(&wit).into();
        w.headers(&wit, &w.wpt(&claims))
    };

    let (status, _, body) = status_of(&fetching, request(&w.issuer, "wk1")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ID));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "fetched at the first WIT");
    let (status, _, _) = status_of(&fetching, request(&w.issuer, "wk1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "then cached");

    // A JWT-SVID key of the same document never verifies a WIT.
    let (status, _, body) = status_of(&fetching, request(&jwt_svid_key, "jk1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("unknown key"), "{body}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "an unknown kid fetches again"
    );

    // The domain publishes a new key: its first WIT is accepted.
    served.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(jwk(&next, "wk2", "wit-svid"));
    let (status, _, body) = status_of(&fetching, request(&next, "wk2")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ID));
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // Keys that cannot be fetched (nothing listens): retry later, 503.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, _, _) = status_of(
        &guard(format!("http://{closed}/bundle")),
        request(&w.issuer, "wk1"),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// A signing key of one JWS algorithm, made by ring (EC, Ed25519) or read
/// from a fixture (RSA 2048, made with openssl), signing with jsonwebtoken.
struct AlgKey {
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl AlgKey {
    fn new(alg: &str) -> Self {
        use ring::signature::{
            ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaSigningAlgorithm, Ed25519KeyPair,
        };
        let rng = SystemRandom::new();
        let ec = |signing: &'static EcdsaSigningAlgorithm, crv: &str, len: usize| {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
            let point = pair.public_key().as_ref();
            (
                EncodingKey::from_ec_der(pkcs8.as_ref()),
                json!({"kty": "EC", "crv": crv, "x": B64.encode(&point[1..1 + len]),
                       "y": B64.encode(&point[1 + len..])}),
            )
        };
        let rsa = || {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
            let der = std::fs::read(format!("{dir}/rsa-2048.pkcs1.der")).unwrap();
            let jwk: Value = serde_json::from_slice(
                &std::fs::read(format!("{dir}/rsa-2048.public.jwk.json")).unwrap(),
            )
            .unwrap();
            (EncodingKey::from_rsa_der(&der), jwk)
        };
        let (algorithm, (encoding, mut jwk)) = match alg {
            "ES256" => (
                Algorithm::ES256,
                ec(&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
            ),
            "ES384" => (
                Algorithm::ES384,
                ec(&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
            ),
            "EdDSA" => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
                (
                    Algorithm::EdDSA,
                    (
                        EncodingKey::from_ed_der(pkcs8.as_ref()),
                        json!({"kty": "OKP", "crv": "Ed25519",
                               "x": B64.encode(pair.public_key().as_ref())}),
                    ),
                )
            }
            "RS256" => (Algorithm::RS256, rsa()),
            "PS256" => (Algorithm::PS256, rsa()),
            other => panic!("{other}"),
        };
        jwk["alg"] = alg.into();
        Self {
            alg: algorithm,
            encoding,
            jwk,
        }
    }

    fn sign_as(&self, alg: Algorithm, typ: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.typ = Some(typ.into());
        h.kid = kid.map(Into::into);
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }
}

/// WIT-SVIDs and proofs of every algorithm the WIT-SVID spec allows
/// (ES256, ES384, RS256, PS256, EdDSA), signed by jsonwebtoken, verify, in
/// any mix of the trust domain's key and the workload's; the key decides
/// the algorithm (a header naming another is refused) and the proof's `alg`
/// must be the `cnf` key's.
#[test]
fn every_algorithm_the_spec_allows_verifies_and_the_key_decides_it() {
    const ALGS: [&str; 5] = ["ES256", "ES384", "RS256", "PS256", "EdDSA"];
    let now = T0;
    // The WIT key of `wit_alg`, a workload key of `cnf_alg`, the guard
    // trusting the former, and a request signed by both.
    let case = |wit_alg: &str, cnf_alg: &str| {
        let issuer = AlgKey::new(wit_alg);
        let workload = AlgKey::new(cnf_alg);
        let mut wit_jwk = issuer.jwk.clone();
        wit_jwk["kid"] = "wk".into();
        wit_jwk["use"] = "wit-svid".into();
        let guard = WitGuardLayer::builder()
            .target_uri_base(BASE)
            .wit_bundle("example.org", json!({"keys": [wit_jwk]}).to_string())
            .clock(move || UNIX_EPOCH + Duration::from_secs(now))
            .build()
            .unwrap();
        (guard, issuer, workload)
    };
    let request = |issuer: &AlgKey, wit_alg: Algorithm, workload: &AlgKey, wpt_alg: Algorithm| {
        let wit = issuer.sign_as(
            wit_alg,
            "wit+jwt",
            Some("wk"),
            &json!({"sub": ID, "exp": T0 + 3600, "iat": T0, "jti": "w",
                    "cnf": {"jwk": workload.jwk}}),
        );
        let wpt = workload.sign_as(
            wpt_alg,
            "wpt+jwt",
            None,
            &json!({"aud": format!("{BASE}{PATH}"), "exp": T0 + 60, "wth": hash(&wit),
                    "jti": format!("jti-{}", NEXT_JTI.fetch_add(1, Ordering::SeqCst))}),
        );
        let mut h = HeaderMap::new();
        h.insert("workload-identity-token", wit.parse().unwrap());
        h.insert(header::AUTHORIZATION, format!("WPT {wpt}").parse().unwrap());
        h
    };
    for wit_alg in ALGS {
        for cnf_alg in ALGS {
            let (guard, issuer, workload) = case(wit_alg, cnf_alg);
            let ok = guard
                .verify(&request(&issuer, issuer.alg, &workload, workload.alg), PATH)
                .unwrap_or_else(|e| panic!("WIT {wit_alg}, cnf {cnf_alg}: {e}"));
            assert_eq!(ok.spiffe_id, ID);
        }
    }
    // One RSA key, two algorithms: the trust domain's key is RS256, so a
    // WIT whose header says PS256 is refused; the cnf key is RS256, so a
    // proof signed PS256 with it is refused.
    let (guard, issuer, workload) = case("RS256", "RS256");
    assert_eq!(
        guard.verify(
            &request(&issuer, Algorithm::PS256, &workload, Algorithm::RS256),
            PATH
        ),
        Err(WitError::Algorithm("WIT"))
    );
    assert_eq!(
        guard.verify(
            &request(&issuer, Algorithm::RS256, &workload, Algorithm::PS256),
            PATH
        ),
        Err(WitError::AlgMismatch)
    );
    // A cnf key whose alg does not fit its type, or an HMAC alg.
    let (guard, issuer, mut workload) = case("ES256", "ES384");
    workload.jwk["alg"] = "ES256".into();
    assert_eq!(
        guard.verify(
            &request(&issuer, Algorithm::ES256, &workload, Algorithm::ES384),
            PATH
        ),
        Err(WitError::Claim("WIT", "cnf.jwk"))
    );
    workload.jwk["alg"] = "HS256".into();
    assert_eq!(
        guard.verify(
            &request(&issuer, Algorithm::ES256, &workload, Algorithm::ES384),
            PATH
        ),
        Err(WitError::Algorithm("WIT cnf.jwk"))
    );
}
