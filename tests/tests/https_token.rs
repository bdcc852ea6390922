//! The token service on the HTTPS face: RFC 8414 metadata, the
//! `client_credentials` grant with a JWT-SVID client assertion (both
//! assertion types), the RFC 7523 `jwt-bearer` grant, and every error case
//! of RFC 6749 §5.2 and RFC 7523 §3.1 (bad signature, wrong `aud`,
//! expired, replayed `jti`, unknown issuer, missing assertion), over a real
//! TLS connection verified by rustls against the trust domain's CA. Issued
//! tokens are checked by jsonwebtoken against the keys the face publishes;
//! forged assertions are signed by jsonwebtoken with keys we never gave the
//! agent. The same grants on the node's exchange socket need an attested
//! caller.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tessera_agent::cli::client::{form, http_over, http_unix};
use tessera_tests::{TestAgent, my_uid};

const MCP: &str = "https://notes.example/mcp";
const ME: &str = "spiffe://example.org/agent/remote";
const CLIENT_CREDENTIALS: &str = "client_credentials";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ASSERTION_JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ASSERTION_JWT_SPIFFE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe";

/// Over HTTPS nothing is attested: policies name the principal. notes:read
/// is a bearer scope; notes:write must be bound to a certificate.
fn policies() -> String {
    format!(
        r#"
@id("remote-read")
@bearer
@max_ttl("120s")
permit(principal == Tessera::Workload::"{ME}", action == Tessera::Action::"notes:read", resource == Tessera::Audience::"{MCP}");

@id("remote-write-bound")
permit(principal == Tessera::Workload::"{ME}", action == Tessera::Action::"notes:write", resource == Tessera::Audience::"{MCP}");
"#
    )
}

struct Face {
    agent: TestAgent,
    issuer: String,
    roots: Vec<Vec<u8>>,
}

impl Face {
    /// An agent with the HTTPS face and the exchange; JWT-SVIDs live
    /// `jwt_ttl`.
    async fn start(jwt_ttl: &str) -> Self {
        Self::start_with(jwt_ttl, "").await
    }

    /// [`Face::start`] with more config appended (`extra`: whole tables).
    async fn start_with(jwt_ttl: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/p.cedar"), policies()).unwrap();
        let body = format!(
            "{}[svid]\njwt_ttl = \"{jwt_ttl}\"\n[https]\nlisten = \"127.0.0.1:0\"\n[exchange]\npolicy_dir = \"{}/policies\"\nmax_ttl = \"10m\"\n{extra}",
            TestAgent::entry_for_me("agent/remote", "default"),
            dir.path().display()
        );
        let agent = TestAgent::start_in(dir, &body).await;
        let issuer = agent.running().https_issuer.clone().expect("https issuer");
        let ctx = agent
            .spiffe_client()
            .await
            .fetch_x509_context()
            .await
            .unwrap();
        let roots = tessera_tests::example_org_cas(&ctx);
        Self {
            agent,
            issuer,
            roots,
        }
    }

    /// One request to the face over TLS (trusting the trust domain's CA,
    /// SNI localhost); the status and the body as JSON (or as a string).
    async fn call(&self, method: http::Method, path: &str, body: Option<String>) -> (u16, Value) {
        let mut store = rustls::RootCertStore::empty();
        for der in &self.roots {
            store.add(CertificateDer::from(der.clone())).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
        let addr = self.issuer.trim_start_matches("https://");
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (status, body) = http_over(tls, method, path, body).await.unwrap();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status.as_u16(), value)
    }

    async fn token(&self, pairs: &[(&str, &str)]) -> (u16, Value) {
        self.call(http::Method::POST, "/token", Some(form(pairs)))
            .await
    }

    async fn svid(&self, audience: &str) -> String {
        self.agent.jwt_svid(audience).await
    }

    /// The access token checked by jsonwebtoken against `jwks_uri` of the
    /// RFC 8414 metadata: signature, `typ`, `iss`, `aud`, `exp`.
    async fn verify(&self, token: &str) -> Value {
        let (_, meta) = self
            .call(
                http::Method::GET,
                "/.well-known/oauth-authorization-server",
                None,
            )
            .await;
        let jwks_path = meta["jwks_uri"]
            .as_str()
            .unwrap()
            .strip_prefix(self.issuer.as_str())
            .unwrap()
            .to_string();
        let (_, jwks) = self.call(http::Method::GET, &jwks_path, None).await;
        let jwks: JwkSet = serde_json::from_value(jwks).unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let key = DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[MCP]);
        v.set_issuer(&[self.issuer.as_str()]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .expect("the access token verifies with the published keys")
            .claims
    }
}

fn read_request(grant: &str) -> Vec<(&str, &str)> {
    vec![
        ("grant_type", grant),
        ("resource", MCP),
        ("scope", "notes:read"),
    ]
}

/// An ES256 JWT signed by a key the agent never published (an unknown
/// issuer, or a forger), with `claims`.
fn forged(claims: &Value) -> String {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("forged".into());
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap()
}

/// The same token with its signature's last byte changed.
fn tampered(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    let last = sig.last_mut().unwrap();
    *last = if *last == b'A' { b'B' } else { b'A' };
    format!("{head}.{}", String::from_utf8(sig).unwrap())
}

fn now() -> u64 {
    #[allow(clippy::disallowed_methods)] // the agent's clock in these tests is the system clock
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What an MCP SDK reads (RFC 8414, with the fields the Python and
/// TypeScript SDKs' schemas require), then each grant an MCP client sends,
/// each answered with a token jsonwebtoken verifies from the published keys.
#[tokio::test]
async fn mcp_client_grants_over_https_get_tokens_the_published_keys_verify() {
    let mut face = Face::start("5m").await;
    let issuer = face.issuer.clone();

    let (status, meta) = face
        .call(
            http::Method::GET,
            "/.well-known/oauth-authorization-server",
            None,
        )
        .await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["issuer"], issuer.as_str());
    assert_eq!(meta["token_endpoint"], format!("{issuer}/token"));
    assert_eq!(
        meta["authorization_endpoint"],
        format!("{issuer}/authorize")
    );
    assert!(meta["response_types_supported"].is_array(), "{meta}");
    for grant in [
        CLIENT_CREDENTIALS,
        JWT_BEARER,
        "urn:ietf:params:oauth:grant-type:token-exchange",
    ] {
        assert!(
            meta["grant_types_supported"]
                .as_array()
                .unwrap()
                .contains(&json!(grant)),
            "{grant}: {meta}"
        );
    }
    // OpenID discovery names the token endpoint too.
    let (_, oidc) = face
        .call(http::Method::GET, "/.well-known/openid-configuration", None)
        .await;
    assert_eq!(oidc["token_endpoint"], format!("{issuer}/token"));
    // There is no interactive authorization.
    let (status, _) = face.call(http::Method::GET, "/authorize", None).await;
    assert_eq!(status, 400);

    // client_credentials + a JWT-SVID client assertion (SEP-1046), audience
    // = the issuer; no task named, so the token is its own task.
    let assertion = face.svid(&issuer).await;
    let mut req = read_request(CLIENT_CREDENTIALS);
    req.extend([
        ("client_assertion_type", ASSERTION_JWT_BEARER),
        ("client_assertion", assertion.as_str()),
    ]);
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "notes:read");
    let claims = face.verify(body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["sub"], ME);
    assert_eq!(claims["client_id"], ME);
    assert_eq!(
        claims["txn"], claims["jti"],
        "a token without task is its own task"
    );
    assert_eq!(body["task_id"], claims["jti"]);
    assert!(claims.get("cnf").is_none(), "a @bearer scope: {claims}");
    assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 120);

    // The draft jwt-spiffe assertion type, audience = the token endpoint,
    // client_id = the SPIFFE ID, a named task.
    let assertion = face.svid(&format!("{issuer}/token")).await;
    let mut req = read_request(CLIENT_CREDENTIALS);
    req.extend([
        ("client_assertion_type", ASSERTION_JWT_SPIFFE),
        ("client_assertion", assertion.as_str()),
        ("client_id", ME),
        ("task_id", "sync-7"),
    ]);
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");
    let claims = face.verify(body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["txn"], "sync-7");

    // RFC 7523 jwt-bearer grant (SEP-1933): the JWT-SVID is the grant.
    let assertion = face.svid(&issuer).await;
    let mut req = read_request(JWT_BEARER);
    req.push(("assertion", assertion.as_str()));
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");
    let claims = face.verify(body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["sub"], ME);

    // Every fetch of a JWT-SVID for the token service is a new one (single
    // use), and so for any https:// audience, which may be another node's
    // token service (RFC 7523 §3 lets it accept each jti once), while other
    // audiences are reused from the cache.
    assert_ne!(face.svid(&issuer).await, face.svid(&issuer).await);
    let elsewhere_as = "https://node-b.example:8443";
    assert_ne!(face.svid(elsewhere_as).await, face.svid(elsewhere_as).await);
    assert_eq!(face.svid("elsewhere").await, face.svid("elsewhere").await);
    face.agent.stop().await;
}

/// `jwt_key_type = "rsa-2048"` (what Microsoft Entra workload identity
/// federation needs): JWT-SVIDs are RS256, discovery says so, the face's
/// `/keys` and `/bundle` publish RSA keys that jsonwebtoken and the spiffe
/// crate verify them with, the Workload API's ValidateJWTSVID accepts them,
/// and so does every grant of the token endpoint; a token signed by an RSA
/// key the agent never made is refused.
#[tokio::test]
async fn rsa_jwt_svids_are_rs256_published_and_accepted_everywhere() {
    let mut face = Face::start_with("5m", "[authority]\njwt_key_type = \"rsa-2048\"\n").await;
    let issuer = face.issuer.clone();

    let (_, oidc) = face
        .call(http::Method::GET, "/.well-known/openid-configuration", None)
        .await;
    assert_eq!(
        oidc["id_token_signing_alg_values_supported"],
        json!(["RS256"]),
        "{oidc}"
    );
    let token = face.svid("api://AzureADTokenExchange").await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    let (_, jwks) = face.call(http::Method::GET, "/keys", None).await;
    for key in jwks["keys"].as_array().unwrap() {
        assert_eq!(key["kty"], "RSA", "{key}");
        assert_eq!(key["alg"], "RS256", "{key}");
        let n = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            key["n"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(n.len() * 8, 2048, "{key}");
    }
    let set: JwkSet = serde_json::from_value(jwks).unwrap();
    let key = DecodingKey::from_jwk(set.find(header.kid.as_deref().unwrap()).unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&["api://AzureADTokenExchange"]);
    v.set_issuer(&[issuer.as_str()]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .expect("jsonwebtoken verifies the RS256 JWT-SVID from /keys")
        .claims;
    assert_eq!(claims["sub"], ME);

    // The SPIFFE bundle's jwt-svid keys, read by the spiffe crate.
    let (_, bundle) = face.call(http::Method::GET, "/bundle", None).await;
    let jwt_keys: Vec<&Value> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .collect();
    assert!(
        !jwt_keys.is_empty() && jwt_keys.iter().all(|k| k["kty"] == "RSA"),
        "{bundle}"
    );
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let jwt_bundle = spiffe::JwtBundle::from_jwt_authorities(
        td,
        json!({ "keys": jwt_keys }).to_string().as_bytes(),
    )
    .unwrap();
    let bundles: spiffe::JwtBundleSet = [jwt_bundle].into_iter().collect();
    let svid =
        spiffe::JwtSvid::parse_and_validate(&token, &bundles, &["api://AzureADTokenExchange"])
            .expect("the bundle's RSA JWT authorities verify the JWT-SVID");
    assert_eq!(svid.spiffe_id().to_string(), ME);

    // The Workload API: FetchJWTBundles hands out the RSA keys, and
    // ValidateJWTSVID accepts the token.
    let client = face.agent.spiffe_client().await;
    let fetched = client.fetch_jwt_bundles().await.unwrap();
    let ours = fetched
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .expect("our JWT bundle");
    assert!(
        ours.find_jwt_authority(header.kid.as_deref().unwrap())
            .is_some()
    );
    let validated = client
        .validate_jwt_token("api://AzureADTokenExchange", &token)
        .await
        .expect("ValidateJWTSVID accepts an RS256 JWT-SVID");
    assert_eq!(validated.spiffe_id().to_string(), ME);

    // The token endpoint: a client assertion, the jwt-bearer grant, and an
    // RFC 8693 subject token, each an RS256 JWT-SVID.
    let assertion = face.svid(&issuer).await;
    assert_eq!(
        jsonwebtoken::decode_header(&assertion).unwrap().alg,
        Algorithm::RS256
    );
    let mut req = read_request(CLIENT_CREDENTIALS);
    req.extend([
        ("client_assertion_type", ASSERTION_JWT_BEARER),
        ("client_assertion", assertion.as_str()),
    ]);
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        face.verify(body["access_token"].as_str().unwrap()).await["sub"],
        ME
    );
    let assertion = face.svid(&issuer).await;
    let mut req = read_request(JWT_BEARER);
    req.push(("assertion", assertion.as_str()));
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");
    let subject = face.svid(&issuer).await;
    let mut req = read_request("urn:ietf:params:oauth:grant-type:token-exchange");
    req.extend([
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
    ]);
    let (status, body) = face.token(&req).await;
    assert_eq!(status, 200, "{body}");

    // An RS256 assertion from an RSA key the agent never made (jsonwebtoken
    // signs it) is refused.
    let stranger = rsa_forged(&json!({"sub": ME, "aud": issuer, "exp": now() + 60, "jti": "x1"}));
    let mut req = read_request(JWT_BEARER);
    req.push(("assertion", stranger.as_str()));
    let (status, body) = face.token(&req).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    face.agent.stop().await;
}

/// An RS256 JWT signed by jsonwebtoken with an RSA key from openssl(1) that
/// the agent never published.
fn rsa_forged(claims: &Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = (dir.path().join("k.pem"), dir.path().join("k.der"));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl(1) is installed");
        assert!(out.status.success(), "{out:?}");
    };
    openssl(&[
        "genrsa".as_ref(),
        "-out".as_ref(),
        pem.as_os_str(),
        "2048".as_ref(),
    ]);
    // PKCS#1 DER, what jsonwebtoken's from_rsa_der reads.
    openssl(&[
        "rsa".as_ref(),
        "-in".as_ref(),
        pem.as_os_str(),
        "-traditional".as_ref(),
        "-outform".as_ref(),
        "DER".as_ref(),
        "-out".as_ref(),
        der.as_os_str(),
    ]);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("forged".into());
    header.typ = Some("JWT".into());
    let der = std::fs::read(&der).unwrap();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(&der)).unwrap()
}

/// RFC 6749 §5.2 / RFC 7523 §3.1: each bad credential gets its grant's
/// error code (`invalid_client` with 401 for a client assertion,
/// `invalid_grant` for the jwt-bearer grant), and none issues a token.
#[tokio::test]
async fn every_bad_assertion_gets_the_right_error_code_and_no_token() {
    let mut face = Face::start("2s").await;
    let issuer = face.issuer.clone();
    let td_sub = ME;

    // (name, assertion, expected by grant)
    let mut cases: Vec<(&str, String)> = Vec::new();
    let good = face.svid(&issuer).await;
    cases.push(("bad signature", tampered(&good)));
    cases.push(("wrong aud", face.svid("https://someone-else.example").await));
    cases.push((
        "unknown issuer",
        forged(&json!({
            "iss": "https://attacker.example", "sub": td_sub, "aud": issuer,
            "exp": now() + 60, "iat": now(), "jti": "forged-1",
        })),
    ));
    cases.push((
        "own issuer, foreign key",
        forged(&json!({
            "iss": issuer, "sub": td_sub, "aud": issuer,
            "exp": now() + 60, "iat": now(), "jti": "forged-2",
        })),
    ));
    cases.push(("not a JWT", "not-a-jwt".into()));
    let expiring = face.svid(&issuer).await;

    for (grant, code, status) in [
        (CLIENT_CREDENTIALS, "invalid_client", 401),
        (JWT_BEARER, "invalid_grant", 400),
    ] {
        let send = |assertion: String| {
            let face = &face;
            async move {
                let mut req = read_request(grant);
                if grant == CLIENT_CREDENTIALS {
                    req.push(("client_assertion_type", ASSERTION_JWT_BEARER));
                    req.push(("client_assertion", assertion.as_str()));
                } else {
                    req.push(("assertion", assertion.as_str()));
                }
                face.token(&req).await
            }
        };
        for (name, assertion) in &cases {
            let (s, body) = send(assertion.clone()).await;
            assert_eq!(
                (s, body["error"].as_str()),
                (status, Some(code)),
                "{grant} {name}: {body}"
            );
            assert!(body.get("access_token").is_none());
        }
        // Replayed jti: the first use succeeds, the second is refused.
        let once = face.svid(&issuer).await;
        let (s, body) = send(once.clone()).await;
        assert_eq!(s, 200, "{grant}: {body}");
        let (s, body) = send(once).await;
        assert_eq!(
            (s, body["error"].as_str()),
            (status, Some(code)),
            "{grant} replay: {body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("already used"),
            "{body}"
        );
        // client_id naming someone else.
        if grant == CLIENT_CREDENTIALS {
            let a = face.svid(&issuer).await;
            let mut req = read_request(grant);
            req.extend([
                ("client_assertion_type", ASSERTION_JWT_BEARER),
                ("client_assertion", a.as_str()),
                ("client_id", "spiffe://example.org/someone-else"),
            ]);
            let (s, body) = face.token(&req).await;
            assert_eq!(
                (s, body["error"].as_str()),
                (401, Some("invalid_client")),
                "{body}"
            );
        }
    }

    // Missing assertion: no client authentication at all is invalid_client
    // (RFC 6749 §5.2); a jwt-bearer grant without its assertion is a
    // malformed request.
    let (s, body) = face.token(&read_request(CLIENT_CREDENTIALS)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("invalid_client")),
        "{body}"
    );
    let (s, body) = face.token(&read_request(JWT_BEARER)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // An assertion type nobody defined.
    let a = face.svid(&issuer).await;
    let mut req = read_request(CLIENT_CREDENTIALS);
    req.extend([
        ("client_assertion_type", "urn:example:password"),
        ("client_assertion", a.as_str()),
    ]);
    let (s, body) = face.token(&req).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("invalid_client")),
        "{body}"
    );
    // A grant type we do not speak.
    let (s, body) = face.token(&read_request("password")).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("unsupported_grant_type")),
        "{body}"
    );
    // A scope policy binds to a certificate, asked without one.
    let a = face.svid(&issuer).await;
    let (s, body) = face
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", a.as_str()),
            ("resource", MCP),
            ("scope", "notes:write"),
        ])
        .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("access_denied")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{body}"
    );

    // Expired: the JWT-SVIDs of this agent live 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (s, body) = face
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", expiring.as_str()),
            ("resource", MCP),
            ("scope", "notes:read"),
        ])
        .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    face.agent.stop().await;
}

/// On the node's exchange socket the same grants need an attested caller
/// holding the asserted identity (the JWT-SVID of a process that is not the
/// caller is refused), a token without a task is its own task, and it is
/// revoked by its `jti` (as a token, or as the task it is).
#[tokio::test]
async fn socket_grants_need_the_attested_caller_and_tasks_are_optional() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let uid = my_uid();
    std::fs::write(
        dir.path().join("policies/p.cedar"),
        format!(
            r#"@id("local-read")
permit(principal, action == Tessera::Action::"notes:read", resource == Tessera::Audience::"{MCP}")
when {{ principal.selectors.contains("unix:uid:{uid}") }};"#
        ),
    )
    .unwrap();
    let body = format!(
        "{}[exchange]\npolicy_dir = \"{}/policies\"\n",
        TestAgent::entry_for_me("agent/local", "default"),
        dir.path().display()
    );
    let mut agent = TestAgent::start_in(dir, &body).await;
    let socket = agent.dir.path().join("sock/exchange.sock");
    let issuer = "spiffe://example.org/tessera";
    let post = |path: &'static str, pairs: Vec<(&'static str, String)>| {
        let socket = socket.clone();
        async move {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (s, b) = http_unix(&socket, http::Method::POST, path, Some(form(&pairs)))
                .await
                .unwrap();
            (s.as_u16(), serde_json::from_slice::<Value>(&b).unwrap())
        }
    };
    let svid = agent.jwt_svid(issuer).await;
    let base = |grant: &str| {
        vec![
            ("grant_type", grant.to_string()),
            ("resource", MCP.to_string()),
            ("scope", "notes:read".to_string()),
        ]
    };

    // client_credentials from the attested caller: bound to its X509-SVID.
    let mut req = base(CLIENT_CREDENTIALS);
    req.push(("client_assertion_type", ASSERTION_JWT_BEARER.into()));
    req.push(("client_assertion", svid.clone()));
    let (s, issued) = post("/token", req).await;
    assert_eq!(s, 200, "{issued}");
    let token = issued["access_token"].as_str().unwrap().to_string();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(claims["cnf"]["x5t#S256"].is_string(), "{claims}");
    assert_eq!(claims["txn"], claims["jti"]);

    // jwt-bearer, and the same JWT-SVID again: on the socket the caller is
    // attested, so reusing its cached JWT-SVID is fine.
    let mut req = base(JWT_BEARER);
    req.push(("assertion", svid.clone()));
    let (s, body) = post("/token", req).await;
    assert_eq!(s, 200, "{body}");

    // A JWT-SVID the caller does not hold (signed by a stranger's key
    // here; tests/tests/exchange.rs shows another uid's own SVID refused).
    let mut req = base(JWT_BEARER);
    req.push((
        "assertion",
        forged(
            &json!({"sub": "spiffe://example.org/agent/local", "aud": issuer, "exp": now() + 60}),
        ),
    ));
    let (s, body) = post("/token", req).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // The task-less token is revoked as the task it is, by its jti.
    let introspect = |t: String| post("/introspect", vec![("token", t)]);
    assert_eq!(introspect(token.clone()).await.1["active"], true);
    let (s, _) = post(
        "/revoke",
        vec![("task_id", claims["jti"].as_str().unwrap().into())],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(introspect(token).await.1["active"], false);
    agent.stop().await;
}
