//! The guard in front of a test service, with a fake issuer (JWKS +
//! introspection) on a temporary Unix socket. Tokens are signed by
//! `jsonwebtoken`, an independent JOSE implementation, or crafted by hand for
//! the malformed cases.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tessera_token_guard::{
    GuardBody, IntrospectionSource, McpRequest, McpScopeSource, PeerCertificate, TokenGuardBuilder,
    TokenGuardLayer, VerifiedToken, x5t_s256,
};
use tower::{Layer, ServiceExt};

const ISSUER: &str = "spiffe://example.org/tessera";
const AUDIENCE: &str = "https://notes.example/mcp";

struct TestKey {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

impl TestKey {
    fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        TestKey {
            kid: kid.into(),
            pkcs8,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.kid.clone());
        self.sign_with(&header, claims)
    }

    fn sign_with(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "sub": "spiffe://example.org/user/alice",
        "aud": AUDIENCE,
        "client_id": "spiffe://example.org/agent",
        "scope": "notes:read notes:write",
        "iat": now, "nbf": now, "exp": now + 120,
        "jti": "jti-1",
        "txn": "task-1",
        "act": {"sub": "spiffe://example.org/planner"},
    })
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

/// The fake issuer: serves whatever JWKS `keys` holds, says tokens in
/// `revoked` are inactive, and counts calls.
#[derive(Clone, Default)]
struct Issuer {
    keys: Arc<Mutex<Vec<Value>>>,
    revoked: Arc<Mutex<HashSet<String>>>,
    jwks_calls: Arc<AtomicUsize>,
    introspect_calls: Arc<AtomicUsize>,
}

async fn jwks(State(issuer): State<Issuer>) -> axum::Json<Value> {
    issuer.jwks_calls.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({"keys": *issuer.keys.lock().unwrap()}))
}

async fn introspect(State(issuer): State<Issuer>, body: Bytes) -> axum::Json<Value> {
    issuer.introspect_calls.fetch_add(1, Ordering::SeqCst);
    let form = String::from_utf8(body.to_vec()).unwrap();
    let token = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .unwrap_or_default()
        .to_string();
    if issuer.revoked.lock().unwrap().contains(&token) {
        axum::Json(json!({"active": false}))
    } else {
        axum::Json(json!({"active": true, "iss": ISSUER}))
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    issuer: Issuer,
    key: TestKey,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("exchange.sock");
    let issuer = Issuer::default();
    let key = TestKey::new("key-1");
    issuer.keys.lock().unwrap().push(key.jwk.clone());
    let app = axum::Router::new()
        .route("/jwks", get(jwks))
        .route("/introspect", post(introspect))
        .with_state(issuer.clone());
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Harness {
        _dir: dir,
        socket,
        issuer,
        key,
    }
}

impl Harness {
    fn builder(&self) -> TokenGuardBuilder {
        TokenGuardLayer::builder()
            .issuer(ISSUER)
            .audience(AUDIENCE)
            .exchange_socket(&self.socket)
            .resource_metadata("https://notes.example/.well-known/oauth-protected-resource/mcp")
            .mcp_scope_rule(
                |r: &McpRequest| match (r.method.as_str(), r.name.as_deref()) {
                    ("tools/call", Some("list_notes")) => Some(vec!["notes:read".into()]),
                    ("tools/call", Some("add_note")) => Some(vec!["notes:write".into()]),
                    ("tools/call", _) => Some(vec!["notes:delete".into()]),
                    _ => None,
                },
            )
    }
}

/// What the protected service saw.
#[derive(Debug)]
struct Seen {
    status: StatusCode,
    www_authenticate: Option<String>,
    body: String,
}

/// Echoes the verified subject and the body it received.
async fn echo(
    request: Request<GuardBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let token = request.extensions().get::<VerifiedToken>().cloned();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let out = json!({
        "sub": token.as_ref().map(|t| t.sub.clone()),
        "client_id": token.as_ref().map(|t| t.client_id.clone()),
        "scopes": token.as_ref().map(|t| t.scopes.clone()),
        "txn": token.as_ref().and_then(|t| t.txn.clone()),
        "actors": token.as_ref().map(|t| t.actor_chain().iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        "body": String::from_utf8_lossy(&body),
    });
    Ok(Response::new(Full::new(Bytes::from(out.to_string()))))
}

async fn send(layer: &TokenGuardLayer, request: Request<Full<Bytes>>) -> Seen {
    let service = layer.layer(tower::service_fn(echo));
    let response = service.oneshot(request).await.unwrap();
    let status = response.status();
    let www_authenticate = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Seen {
        status,
        www_authenticate,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn get_with(token: &str) -> Request<Full<Bytes>> {
    Request::get("/mcp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn tool_call(token: &str, tool: &str) -> Request<Full<Bytes>> {
    let body =
        json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":tool,"arguments":{}}});
    Request::post("/mcp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn assert_invalid(seen: &Seen, description: &str) {
    assert_eq!(seen.status, StatusCode::UNAUTHORIZED, "{seen:?}");
    let challenge = seen.www_authenticate.as_deref().unwrap();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(description),
        "{challenge} lacks {description}"
    );
    assert!(
        challenge.contains("resource_metadata=\"https://notes.example/"),
        "{challenge}"
    );
}

#[tokio::test]
async fn valid_token_passes_with_claims_in_extensions() {
    let h = harness().await;
    let layer = h.builder().build().unwrap();
    let token = h.key.sign(&claims());
    let seen = send(&layer, get_with(&token)).await;
    assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
    let body: Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(body["sub"], "spiffe://example.org/user/alice");
    assert_eq!(body["client_id"], "spiffe://example.org/agent");
    assert_eq!(body["scopes"], json!(["notes:read", "notes:write"]));
    assert_eq!(body["txn"], "task-1");
    assert_eq!(body["actors"], json!(["spiffe://example.org/planner"]));

    // Keys are cached: a second request does not refetch them.
    let seen = send(&layer, get_with(&token)).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(h.issuer.jwks_calls.load(Ordering::SeqCst), 1);

    // verify() outside HTTP gives the same claims.
    let v = layer.verify(&token, None).await.unwrap();
    assert_eq!(v.jti, "jti-1");
    assert_eq!(v.kid, "key-1");
}

#[tokio::test]
async fn bad_claims_are_401_invalid_token() {
    let h = harness().await;
    let layer = h.builder().build().unwrap();
    let now = now();
    let cases = [
        (json!({"aud": "https://notes.example/"}), "audience"),
        (json!({"aud": ["https://other.example/mcp"]}), "audience"),
        (json!({"iss": "spiffe://evil.org/tessera"}), "issuer"),
        (json!({"exp": now - 120}), "expired"),
        (json!({"nbf": now + 300}), "not yet valid"),
        (json!({"iat": now + 300}), "issued in the future"),
        (json!({"exp": null}), "claim exp"),
        (json!({"jti": null}), "claim jti"),
    ];
    for (patch, description) in cases {
        let token = h.key.sign(&with(claims(), patch.clone()));
        let seen = send(&layer, get_with(&token)).await;
        assert_invalid(&seen, description);
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        assert_eq!(body["error"], "invalid_token", "{patch}");
    }
    // Within the 30 s skew is still fine.
    let token = h.key.sign(&with(claims(), json!({"exp": now - 10})));
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_headers_and_signatures_are_401() {
    let h = harness().await;
    let layer = h.builder().build().unwrap();

    let mut jwt = Header::new(Algorithm::ES256);
    jwt.kid = Some("key-1".into());
    jwt.typ = Some("JWT".into());
    assert_invalid(
        &send(&layer, get_with(&h.key.sign_with(&jwt, &claims()))).await,
        "token type",
    );

    // alg none, with and without a signature.
    let header = B64.encode(json!({"alg":"none","typ":"at+jwt","kid":"key-1"}).to_string());
    let payload = B64.encode(claims().to_string());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}.AAAA"),
    ] {
        assert_invalid(&send(&layer, get_with(&token)).await, "algorithm");
    }

    // HS256 keyed with the public key's coordinates (key confusion).
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("key-1".into());
    hs.typ = Some("at+jwt".into());
    let secret = h.key.jwk["x"].as_str().unwrap().as_bytes().to_vec();
    let token = jsonwebtoken::encode(&hs, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
    assert_invalid(&send(&layer, get_with(&token)).await, "algorithm");

    // Tampered payload, original signature.
    let token = h.key.sign(&claims());
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = B64.encode(
        with(
            claims(),
            json!({"scope": "notes:read notes:write notes:delete"}),
        )
        .to_string(),
    );
    assert_invalid(&send(&layer, get_with(&parts.join("."))).await, "signature");
    // Tampered signature.
    let mut sig = B64.decode(token.rsplit('.').next().unwrap()).unwrap();
    sig[10] ^= 1;
    let (rest, _) = token.rsplit_once('.').unwrap();
    assert_invalid(
        &send(&layer, get_with(&format!("{rest}.{}", B64.encode(&sig)))).await,
        "signature",
    );

    // Signed by a key the issuer never published.
    let stranger = TestKey::new("key-x");
    assert_invalid(
        &send(&layer, get_with(&stranger.sign(&claims()))).await,
        "unknown key",
    );
    // Same kid as the real key, different key.
    let impostor = TestKey::new("key-1");
    assert_invalid(
        &send(&layer, get_with(&impostor.sign(&claims()))).await,
        "signature",
    );

    assert_invalid(&send(&layer, get_with("not-a-jwt")).await, "malformed");
}

#[tokio::test]
async fn missing_token_gets_a_bare_challenge() {
    let h = harness().await;
    let layer = h.builder().build().unwrap();
    let request = Request::get("/mcp").body(Full::new(Bytes::new())).unwrap();
    let seen = send(&layer, request).await;
    assert_eq!(seen.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        seen.www_authenticate.as_deref(),
        Some(
            "Bearer resource_metadata=\"https://notes.example/.well-known/oauth-protected-resource/mcp\""
        )
    );
    let basic = Request::get("/mcp")
        .header(header::AUTHORIZATION, "Basic dXNlcjpwdw==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&layer, basic).await.status, StatusCode::UNAUTHORIZED);
    let twice = Request::get("/mcp")
        .header(header::AUTHORIZATION, "Bearer a")
        .header(header::AUTHORIZATION, "Bearer b")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&layer, twice).await.status, StatusCode::BAD_REQUEST);
}

/// With a challenge scope, a client without a valid token is told what to
/// ask for first (MCP clients take the 401's `scope` over the resource
/// metadata's full list); a 403 still names the scope the call needs.
#[tokio::test]
async fn the_challenge_scope_is_announced_on_401_only() {
    let h = harness().await;
    let layer = h.builder().challenge_scope("notes:read").build().unwrap();
    let missing = send(
        &layer,
        Request::get("/mcp").body(Full::new(Bytes::new())).unwrap(),
    )
    .await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.www_authenticate.as_deref(),
        Some(
            "Bearer scope=\"notes:read\", resource_metadata=\"https://notes.example/.well-known/oauth-protected-resource/mcp\""
        )
    );
    let invalid = send(&layer, get_with("not-a-jwt")).await;
    assert_eq!(invalid.status, StatusCode::UNAUTHORIZED);
    assert!(
        invalid
            .www_authenticate
            .as_deref()
            .is_some_and(|c| c.starts_with("Bearer error=\"invalid_token\"")
                && c.contains("scope=\"notes:read\"")),
        "{invalid:?}"
    );
    let token = h.key.sign(&claims());
    let forbidden = send(&layer, tool_call(&token, "delete_note")).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let challenge = forbidden.www_authenticate.unwrap();
    assert!(challenge.contains("scope=\"notes:delete\""), "{challenge}");
    assert!(!challenge.contains("notes:read"), "{challenge}");

    let unsafe_scope = h.builder().challenge_scope("a\"b").build();
    assert!(unsafe_scope.is_err());
}

#[tokio::test]
async fn tool_scopes_come_from_the_body() {
    let h = harness().await;
    let layer = h.builder().build().unwrap();
    let token = h.key.sign(&claims());

    let seen = send(&layer, tool_call(&token, "list_notes")).await;
    assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
    // The body reached the service intact.
    let body: Value = serde_json::from_str(&seen.body).unwrap();
    let inner: Value = serde_json::from_str(body["body"].as_str().unwrap()).unwrap();
    assert_eq!(inner["params"]["name"], "list_notes");

    let seen = send(&layer, tool_call(&token, "delete_note")).await;
    assert_eq!(seen.status, StatusCode::FORBIDDEN);
    assert_eq!(
        seen.www_authenticate.as_deref(),
        Some(
            "Bearer error=\"insufficient_scope\", error_description=\"the token does not grant the scope this request needs\", scope=\"notes:delete\", resource_metadata=\"https://notes.example/.well-known/oauth-protected-resource/mcp\""
        )
    );

    // Methods without a rule need only a valid token.
    let list = Request::post("/mcp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )))
        .unwrap();
    assert_eq!(send(&layer, list).await.status, StatusCode::OK);

    // Headers that disagree with the body are refused.
    let mut lying = tool_call(&token, "delete_note");
    lying
        .headers_mut()
        .insert("mcp-method", "tools/call".parse().unwrap());
    lying
        .headers_mut()
        .insert("mcp-name", "list_notes".parse().unwrap());
    assert_eq!(send(&layer, lying).await.status, StatusCode::BAD_REQUEST);
    let mut honest = tool_call(&token, "add_note");
    honest
        .headers_mut()
        .insert("mcp-method", "tools/call".parse().unwrap());
    honest
        .headers_mut()
        .insert("mcp-name", "add_note".parse().unwrap());
    assert_eq!(send(&layer, honest).await.status, StatusCode::OK);

    // A body that is not JSON-RPC is refused rather than guessed at.
    let junk = Request::post("/mcp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from("method=tools/call")))
        .unwrap();
    assert_eq!(send(&layer, junk).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let h = harness().await;
    let layer = h.builder().max_body_bytes(64).build().unwrap();
    let token = h.key.sign(&claims());
    let big = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add_note","arguments":{"text":"x".repeat(100)}}});
    let mut declared = tool_call_body(&token, big.to_string());
    let len = big.to_string().len().to_string();
    declared
        .headers_mut()
        .insert(header::CONTENT_LENGTH, len.parse().unwrap());
    let seen = send(&layer, declared).await;
    assert_eq!(seen.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Also without a Content-Length: a streamed body is cut at the limit.
    let seen = send(&layer, tool_call_body(&token, "x".repeat(65))).await;
    assert_eq!(seen.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Unauthenticated requests are refused before the body is read.
    let no_token = Request::post("/mcp")
        .body(Full::new(Bytes::from("x".repeat(100))))
        .unwrap();
    assert_eq!(
        send(&layer, no_token).await.status,
        StatusCode::UNAUTHORIZED
    );
}

fn tool_call_body(token: &str, body: String) -> Request<Full<Bytes>> {
    Request::post("/mcp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn headers_only_mode_trusts_mcp_headers() {
    let h = harness().await;
    let layer = h
        .builder()
        .mcp_scope_source(McpScopeSource::HeadersOnly)
        .build()
        .unwrap();
    let token = h.key.sign(&claims());
    let mut request = tool_call(&token, "delete_note");
    request
        .headers_mut()
        .insert("mcp-method", "tools/call".parse().unwrap());
    request
        .headers_mut()
        .insert("mcp-name", "=?base64?ZGVsZXRlX25vdGU=?=".parse().unwrap());
    assert_eq!(send(&layer, request).await.status, StatusCode::FORBIDDEN);
    let bare = tool_call(&token, "list_notes");
    assert_eq!(send(&layer, bare).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn route_scope_rule() {
    let h = harness().await;
    let layer = h
        .builder()
        .scope_rule(|parts| (parts.uri.path() == "/admin").then(|| vec!["notes:admin".into()]))
        .build()
        .unwrap();
    let token = h.key.sign(&claims());
    let admin = Request::get("/admin")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let seen = send(&layer, admin).await;
    assert_eq!(seen.status, StatusCode::FORBIDDEN);
    assert!(
        seen.www_authenticate
            .unwrap()
            .contains("scope=\"notes:admin\"")
    );
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn revoked_tokens_are_401_through_introspection() {
    let h = harness().await;
    let layer = h
        .builder()
        .introspection_cache_ttl(Duration::from_millis(200))
        .build()
        .unwrap();
    let token = h.key.sign(&claims());
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
    // The positive answer was cached.
    assert_eq!(h.issuer.introspect_calls.load(Ordering::SeqCst), 1);

    h.issuer.revoked.lock().unwrap().insert(token.clone());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_invalid(&send(&layer, get_with(&token)).await, "not active");
    // The negative answer sticks without asking again.
    assert_invalid(&send(&layer, get_with(&token)).await, "not active");
    assert_eq!(h.issuer.introspect_calls.load(Ordering::SeqCst), 2);

    // Without introspection the same token still passes (until it expires).
    let no_check = h
        .builder()
        .introspection(IntrospectionSource::Disabled)
        .build()
        .unwrap();
    assert_eq!(
        send(&no_check, get_with(&token)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unreachable_issuer_is_503_not_401() {
    let dir = tempfile::tempdir().unwrap();
    let layer = TokenGuardLayer::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .exchange_socket(dir.path().join("nobody.sock"))
        .build()
        .unwrap();
    let token = TestKey::new("key-1").sign(&claims());
    let seen = send(&layer, get_with(&token)).await;
    assert_eq!(seen.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn certificate_bound_tokens() {
    let h = harness().await;
    let cert = PeerCertificate(b"the caller's DER certificate".to_vec());
    let other = PeerCertificate(b"someone else's certificate".to_vec());
    let bound = h.key.sign(&with(
        claims(),
        json!({"cnf": {"x5t#S256": x5t_s256(&cert.0)}}),
    ));
    let unbound = h.key.sign(&claims());
    let layer = h.builder().build().unwrap();

    let with_peer = |token: &str, peer: &PeerCertificate| {
        let mut r = get_with(token);
        r.extensions_mut().insert(peer.clone());
        r
    };
    assert_eq!(
        send(&layer, with_peer(&bound, &cert)).await.status,
        StatusCode::OK
    );
    assert_invalid(
        &send(&layer, with_peer(&bound, &other)).await,
        "different client certificate",
    );
    // No peer certificate: a bound token is refused (RFC 8705 §3), whatever
    // the guard's configuration (before, the default accepted it).
    assert_invalid(&send(&layer, get_with(&bound)).await, "none was presented");
    // Unbound (bearer) tokens do not care about the connection.
    assert_eq!(
        send(&layer, with_peer(&unbound, &other)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&layer, get_with(&unbound)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn jwks_rotation_fetches_the_new_key() {
    let h = harness().await;
    let layer = h
        .builder()
        .jwks_min_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    assert_eq!(
        send(&layer, get_with(&h.key.sign(&claims()))).await.status,
        StatusCode::OK
    );
    assert_eq!(h.issuer.jwks_calls.load(Ordering::SeqCst), 1);

    // The issuer rotates: key-2 is added, later key-1 is retired.
    let new_key = TestKey::new("key-2");
    h.issuer.keys.lock().unwrap().push(new_key.jwk.clone());
    assert_eq!(
        send(&layer, get_with(&new_key.sign(&claims())))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(h.issuer.jwks_calls.load(Ordering::SeqCst), 2);
    h.issuer.keys.lock().unwrap().remove(0);
    // Still cached...
    assert_eq!(
        send(&layer, get_with(&h.key.sign(&claims()))).await.status,
        StatusCode::OK
    );
    // ...until the next refresh drops it.
    let fresh = h.builder().build().unwrap();
    assert_invalid(
        &send(&fresh, get_with(&h.key.sign(&claims()))).await,
        "unknown key",
    );
}

#[tokio::test]
async fn unknown_kid_refetches_are_rate_limited() {
    let h = harness().await;
    let layer = h
        .builder()
        .jwks_min_refresh_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(
        send(&layer, get_with(&h.key.sign(&claims()))).await.status,
        StatusCode::OK
    );
    for i in 0..5 {
        let forged = TestKey::new(&format!("forged-{i}"));
        assert_invalid(
            &send(&layer, get_with(&forged.sign(&claims()))).await,
            "unknown key",
        );
    }
    assert_eq!(h.issuer.jwks_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn periodic_refresh() {
    let h = harness().await;
    let layer = h
        .builder()
        .jwks_refresh_interval(Duration::from_millis(100))
        .jwks_min_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    let token = h.key.sign(&claims());
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(send(&layer, get_with(&token)).await.status, StatusCode::OK);
    assert_eq!(h.issuer.jwks_calls.load(Ordering::SeqCst), 2);
    // The issuer retires the key: the next periodic refresh stops trusting it.
    h.issuer.keys.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_invalid(&send(&layer, get_with(&token)).await, "unknown key");
}

#[test]
fn builder_requires_issuer_audience_and_keys() {
    use tessera_token_guard::ConfigError;
    assert_eq!(
        TokenGuardLayer::builder()
            .audience(AUDIENCE)
            .exchange_socket("/x")
            .build()
            .err(),
        Some(ConfigError::MissingIssuer)
    );
    assert_eq!(
        TokenGuardLayer::builder()
            .issuer(ISSUER)
            .exchange_socket("/x")
            .build()
            .err(),
        Some(ConfigError::MissingAudience)
    );
    assert_eq!(
        TokenGuardLayer::builder()
            .issuer(ISSUER)
            .audience(AUDIENCE)
            .build()
            .err(),
        Some(ConfigError::MissingJwks)
    );
    assert!(matches!(
        TokenGuardLayer::builder()
            .issuer(ISSUER)
            .audience(AUDIENCE)
            .jwks(tessera_token_guard::JwksSource::Url(
                "https://x/jwks".into()
            ))
            .build()
            .err(),
        Some(ConfigError::Url(_))
    ));
}
