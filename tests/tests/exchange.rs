//! Token exchange end to end over the real exchange socket. Every issued
//! token is decoded and checked by `jsonwebtoken` (an independent JOSE
//! library) against the keys the agent publishes at `/jwks`, and its `cnf`
//! against the X509-SVID fetched with the `spiffe` crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;
use tessera_agent::cli::client::{form, http_unix};
use tessera_tests::{TestAgent, my_uid};

const MCP: &str = "https://notes.example/mcp";
const ISSUER: &str = "spiffe://example.org/tessera";
/// The test process's identity (its entry in `agent_body`).
const ME: &str = "spiffe://example.org/agent/planner";

fn policies(uid: u32) -> String {
    format!(
        r#"
@id("notes-read")
@max_ttl("60s")
@allow_delegation
permit(principal, action == Tessera::Action::"notes:read", resource == Tessera::Audience::"{MCP}")
when {{ principal.selectors.contains("unix:uid:{uid}") }};

@id("notes-write")
@allow_delegation
permit(principal, action == Tessera::Action::"notes:write", resource == Tessera::Audience::"{MCP}");

@id("no-writes-in-prod-tasks")
forbid(principal, action == Tessera::Action::"notes:write", resource)
when {{ context.task like "prod-*" }};

@id("notes-export-direct-only")
permit(principal, action == Tessera::Action::"notes:export", resource == Tessera::Audience::"{MCP}");

@id("no-long-lived-exports")
forbid(principal, action == Tessera::Action::"notes:export", resource)
when {{ context.requested_ttl > 3600 }};

@id("notes-secret")
permit(principal, action == Tessera::Action::"notes:secret", resource == Tessera::Audience::"{MCP}");

@id("notes-secret-only-once-approved")
forbid(principal, action == Tessera::Action::"notes:secret", resource)
unless {{ context.approved }};

@id("notes-share-bearer")
@bearer
permit(principal, action == Tessera::Action::"notes:share", resource == Tessera::Audience::"{MCP}");

@id("notes-delete-needs-approval")
@require_approval
permit(principal, action == Tessera::Action::"notes:delete", resource == Tessera::Audience::"{MCP}");
"#
    )
}

struct Setup {
    agent: TestAgent,
}

fn agent_body(dir: &Path, extra: &str) -> String {
    format!(
        "{}\n[admin]\nsocket_path = \"{d}/admin/admin.sock\"\n\n[exchange]\npolicy_dir = \"{d}/policies\"\nmax_ttl = \"10m\"\nmax_delegation_depth = 2\npolicy_reload_interval = \"100ms\"\napproval_poll_interval = \"1s\"\n{extra}",
        TestAgent::entry_for_me("agent/planner", "default"),
        d = dir.display()
    )
}

impl Setup {
    async fn start() -> Self {
        Self::start_with("").await
    }

    async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/notes.cedar"), policies(my_uid())).unwrap();
        let body = agent_body(dir.path(), extra);
        Self {
            agent: TestAgent::start_in(dir, &body).await,
        }
    }

    fn dir(&self) -> &Path {
        self.agent.dir.path()
    }

    fn exchange_socket(&self) -> PathBuf {
        self.dir().join("sock/exchange.sock")
    }

    async fn call(&self, socket: &Path, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
        let (status, body) = http_unix(socket, http::Method::POST, path, Some(form(pairs)))
            .await
            .unwrap();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
        (status.as_u16(), json)
    }

    async fn post(&self, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
        self.call(&self.exchange_socket(), path, pairs).await
    }

    async fn subject_token(&self) -> String {
        self.agent.jwt_svid(ISSUER).await
    }

    /// POST /token with the caller's JWT-SVID plus `extra`.
    async fn exchange(&self, extra: &[(&str, &str)]) -> (u16, Value) {
        let subject = self.subject_token().await;
        self.exchange_with_subject(&subject, extra).await
    }

    async fn exchange_with_subject(&self, subject: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        let mut pairs = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ];
        pairs.extend_from_slice(extra);
        self.post("/token", &pairs).await
    }

    /// POST /token acting on behalf of `parent` (RFC 8693 §2.1: the token
    /// acted for is the subject, the caller's JWT-SVID the actor).
    async fn exchange_on_behalf_of(&self, parent: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        let svid = self.subject_token().await;
        let mut pairs = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", parent),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("actor_token", svid.as_str()),
            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ];
        pairs.extend_from_slice(extra);
        self.post("/token", &pairs).await
    }

    async fn jwks(&self) -> JwkSet {
        let (status, body) = http_unix(&self.exchange_socket(), http::Method::GET, "/jwks", None)
            .await
            .unwrap();
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("JWKS parses as RFC 7517")
    }

    /// Decodes and checks `token` with jsonwebtoken; returns its claims.
    async fn verify(&self, token: &str, audience: &str) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.typ.as_deref(), Some("at+jwt"), "RFC 9068 typ");
        let kid = header.kid.expect("kid in header");
        let jwks = self.jwks().await;
        let jwk = jwks.find(&kid).expect("signing key is published at /jwks");
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[audience]);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "nbf", "iat", "aud", "iss", "sub"]);
        v.validate_nbf = true;
        v.leeway = 0;
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .expect("jsonwebtoken accepts the token")
            .claims
    }

    async fn introspect(&self, token: &str) -> Value {
        let (status, json) = self.post("/introspect", &[("token", token)]).await;
        assert_eq!(status, 200);
        json
    }
}

fn scopes(v: &Value) -> Vec<&str> {
    v.as_str().unwrap_or_default().split(' ').collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn allowed_exchange_issues_a_token_every_claim_checked_independently() {
    let s = Setup::start().await;
    let (status, resp) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read notes:write"),
            ("task_id", "task-1"),
            ("requested_ttl", "300"),
        ])
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["token_type"], "Bearer");
    assert_eq!(
        resp["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert!(resp.get("refresh_token").is_none(), "never a refresh token");
    // notes-read caps the lifetime at 60 s.
    assert_eq!(resp["expires_in"], 60);
    let token = resp["access_token"].as_str().unwrap();
    let claims = s.verify(token, MCP).await;
    assert_eq!(claims["sub"], "spiffe://example.org/agent/planner");
    assert_eq!(claims["client_id"], "spiffe://example.org/agent/planner");
    assert_eq!(claims["aud"], MCP, "a single audience, as a string");
    assert_eq!(scopes(&claims["scope"]), ["notes:read", "notes:write"]);
    assert_eq!(claims["txn"], "task-1");
    let (iat, nbf, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["nbf"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert!(iat.abs_diff(now()) <= 5 && nbf == iat && exp == iat + 60);
    assert!(claims["jti"].as_str().unwrap().len() >= 16);
    assert!(claims.get("act").is_none(), "no delegation, no act");

    // cnf binds the token to the caller's current X509-SVID.
    let svid = s
        .agent
        .spiffe_client()
        .await
        .fetch_x509_svid()
        .await
        .unwrap();
    let thumb = B64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        svid.leaf().as_ref(),
    ));
    assert_eq!(claims["cnf"]["x5t#S256"], thumb);

    // Introspection agrees, and a second token has a fresh jti.
    let intro = s.introspect(token).await;
    assert_eq!(intro["active"], true);
    assert_eq!(intro["jti"], claims["jti"]);
    let (_, again) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", "task-1"),
        ])
        .await;
    let again = s.verify(again["access_token"].as_str().unwrap(), MCP).await;
    assert_ne!(again["jti"], claims["jti"]);

    // RFC 8414 metadata names the issuer and endpoints.
    let (status, body) = http_unix(
        &s.exchange_socket(),
        http::Method::GET,
        "/.well-known/oauth-authorization-server",
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(meta["issuer"], ISSUER);
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "urn:ietf:params:oauth:grant-type:token-exchange")
    );
}

#[tokio::test]
async fn denials_partial_scopes_forbid_and_ttl_clamping() {
    let s = Setup::start().await;
    // No policy mentions this audience: deny.
    let (status, e) = s
        .exchange(&[
            ("audience", "billing"),
            ("scope", "notes:read"),
            ("task_id", "t"),
        ])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );

    // One permitted, one not: refused whole, unless a subset was asked for.
    let (status, e) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read notes:admin"),
            ("task_id", "t"),
        ])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_scope")),
        "{e}"
    );
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("notes:admin")
    );
    let (status, ok) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read notes:admin"),
            ("task_id", "t"),
            ("scope_mode", "subset"),
        ])
        .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["scope"], "notes:read", "granted scope is reported");
    let claims = s.verify(ok["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(claims["scope"], "notes:read");

    // forbid wins over permit.
    let (status, e) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:write"),
            ("task_id", "prod-7"),
        ])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );
    let (status, _) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:write"),
            ("task_id", "dev-7"),
        ])
        .await;
    assert_eq!(status, 200);

    // TTL: requested below every bound wins; above, the smallest bound wins.
    let (_, r) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:write"),
            ("task_id", "t"),
            ("requested_ttl", "42"),
        ])
        .await;
    assert_eq!(r["expires_in"], 42);
    let c = s.verify(r["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 42);
    let (_, r) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:write"),
            ("task_id", "t"),
            ("requested_ttl", "86400"),
        ])
        .await;
    assert_eq!(r["expires_in"], 600, "config max_ttl = 10m");

    // Policy sees the lifetime that was asked for, not the one max_ttl
    // would cut it to: a forbid on long requests fires even above max_ttl.
    let export = |ttl: &'static str| {
        [
            ("resource", MCP),
            ("scope", "notes:export"),
            ("task_id", "t"),
            ("requested_ttl", ttl),
        ]
    };
    let (_, e) = s.exchange(&export("7200")).await;
    assert_eq!(e["error"].as_str(), Some("access_denied"), "{e}");
    let (_, r) = s.exchange(&export("3600")).await;
    assert_eq!(r["expires_in"], 600, "{r}");

    // A request naming no task gets a token that is its own task: `txn`
    // and the answered `task_id` are its `jti`.
    let (status, r) = s
        .exchange(&[("resource", MCP), ("scope", "notes:read")])
        .await;
    assert_eq!(status, 200, "{r}");
    let own = s.verify(r["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(own["txn"], own["jti"]);
    assert_eq!(r["task_id"], own["jti"]);

    // Malformed requests name the problem with the OAuth code.
    let (status, e) = s
        .exchange(&[
            ("resource", MCP),
            ("audience", "x"),
            ("scope", "notes:read"),
            ("task_id", "t"),
        ])
        .await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_target")));
    // client_credentials without its client assertion: no client
    // authentication (RFC 6749 §5.2).
    let (status, e) = s
        .post("/token", &[("grant_type", "client_credentials")])
        .await;
    assert_eq!((status, e["error"].as_str()), (401, Some("invalid_client")));
    let (status, e) = s.post("/token", &[("grant_type", "password")]).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
}

#[tokio::test]
async fn subject_tokens_that_are_not_the_callers_are_refused() {
    let s = Setup::start().await;
    let signer = s.agent.running().cache.signer().clone();
    let ask = [("resource", MCP), ("scope", "notes:read"), ("task_id", "t")];

    // A valid JWT-SVID of this trust domain, but for another workload.
    let other = spiffe::SpiffeId::new("spiffe://example.org/someone-else").unwrap();
    let foreign_sub = signer
        .jwt_svid(&other, &[ISSUER.to_string()], Duration::from_secs(60))
        .await
        .unwrap();
    let (status, e) = s.exchange_with_subject(&foreign_sub.token, &ask).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("not an identity of the calling process")
    );

    // The caller's own SVID, but for another audience.
    let me = spiffe::SpiffeId::new("spiffe://example.org/agent/planner").unwrap();
    let wrong_aud = signer
        .jwt_svid(&me, &["some-service".to_string()], Duration::from_secs(60))
        .await
        .unwrap();
    let (status, e) = s.exchange_with_subject(&wrong_aud.token, &ask).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );

    // Signed by another trust domain's authority.
    let foreign = tessera_agent::identity::LocalAuthority::load(
        tessera_agent::identity::AuthoritySettings {
            trust_domain: spiffe::TrustDomain::new("other.org").unwrap(),
            ca_ttl: Duration::from_secs(3600),
            jwt_key_ttl: Duration::from_secs(3600),
            jwt_key_type: Default::default(),
            state_dir: None,
            ca_files: None,
        },
        std::sync::Arc::new(tessera_agent::clock::SystemClock),
    )
    .unwrap();
    let other_td = spiffe::SpiffeId::new("spiffe://other.org/agent/planner").unwrap();
    let t = foreign
        .mint_jwt(&other_td, &[ISSUER.to_string()], Duration::from_secs(60))
        .unwrap();
    let (status, e) = s.exchange_with_subject(&t.token, &ask).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );

    // Expired.
    let short = signer
        .jwt_svid(&me, &[ISSUER.to_string()], Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, e) = s.exchange_with_subject(&short.token, &ask).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    assert!(
        e["error_description"].as_str().unwrap().contains("expired"),
        "{e}"
    );

    // One of our own access tokens is not a subject token (typ at+jwt).
    let (_, ok) = s.exchange(&ask).await;
    let (status, e) = s
        .exchange_with_subject(ok["access_token"].as_str().unwrap(), &ask)
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
}

#[tokio::test]
async fn delegation_only_narrows_and_is_bounded_in_depth() {
    let s = Setup::start().await;
    // Every token that is delegated from consents to its actor (`may_act`);
    // here the one workload delegates to itself, hop by hop.
    let (_, parent) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read notes:write"),
            ("task_id", "deleg"),
            ("requested_ttl", "120"),
            ("may_act", ME),
        ])
        .await;
    let parent = parent["access_token"].as_str().unwrap().to_string();
    let parent_claims = s.verify(&parent, MCP).await;
    assert_eq!(parent_claims["may_act"]["sub"], ME);

    // Narrower scope: fine; act names the current actor; task inherited.
    let (status, child) = s
        .exchange_on_behalf_of(
            &parent,
            &[("resource", MCP), ("scope", "notes:read"), ("may_act", ME)],
        )
        .await;
    assert_eq!(status, 200, "{child}");
    let child = child["access_token"].as_str().unwrap().to_string();
    let c = s.verify(&child, MCP).await;
    assert_eq!(c["sub"], parent_claims["sub"]);
    assert_eq!(c["act"]["sub"], ME);
    assert_eq!(c["txn"], "deleg");
    assert!(c["exp"].as_u64() <= parent_claims["exp"].as_u64());

    // Delegation is opt-in per policy: the notes:export permit has no
    // @allow_delegation, so a parent holding that scope cannot pass it on.
    let (_, exporter) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read notes:export"),
            ("task_id", "deleg"),
            ("may_act", ME),
        ])
        .await;
    let exporter = exporter["access_token"].as_str().unwrap().to_string();
    let (status, e) = s
        .exchange_on_behalf_of(&exporter, &[("resource", MCP), ("scope", "notes:export")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("@allow_delegation"),
        "{e}"
    );
    let (status, narrowed) = s
        .exchange_on_behalf_of(
            &exporter,
            &[
                ("resource", MCP),
                ("scope", "notes:read notes:export"),
                ("scope_mode", "subset"),
            ],
        )
        .await;
    assert_eq!(
        (status, narrowed["scope"].as_str()),
        (200, Some("notes:read")),
        "{narrowed}"
    );

    // Widening the scope, changing the audience or the task is refused.
    let (status, e) = s
        .exchange_on_behalf_of(
            &parent,
            &[("resource", MCP), ("scope", "notes:read notes:delete")],
        )
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_scope")),
        "{e}"
    );
    let (status, e) = s
        .exchange_on_behalf_of(&parent, &[("audience", "billing"), ("scope", "notes:read")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_target")),
        "{e}"
    );
    let (status, e) = s
        .exchange_on_behalf_of(
            &parent,
            &[
                ("resource", MCP),
                ("scope", "notes:read"),
                ("task_id", "another-task"),
            ],
        )
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );

    // Depth 2 is the configured limit: the grandchild nests act; a third hop is refused.
    let (status, grandchild) = s
        .exchange_on_behalf_of(
            &child,
            &[("resource", MCP), ("scope", "notes:read"), ("may_act", ME)],
        )
        .await;
    assert_eq!(status, 200, "{grandchild}");
    let grandchild = grandchild["access_token"].as_str().unwrap().to_string();
    let g = s.verify(&grandchild, MCP).await;
    assert_eq!(g["act"]["act"]["sub"], ME);
    let (status, e) = s
        .exchange_on_behalf_of(&grandchild, &[("resource", MCP), ("scope", "notes:read")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );
    assert!(e["error_description"].as_str().unwrap().contains("depth"));

    // Ending the task kills the whole chain.
    let (status, _) = s.post("/revoke", &[("task_id", "deleg")]).await;
    assert_eq!(status, 200);
    for t in [&parent, &child, &grandchild] {
        assert_eq!(s.introspect(t).await, serde_json::json!({"active": false}));
    }
    let (status, e) = s
        .exchange_on_behalf_of(&child, &[("resource", MCP), ("scope", "notes:read")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
}

/// A token whose holder did not consent (no `may_act`) cannot be acted on,
/// and the pre-RFC order of the two tokens is refused with a message that
/// says which goes where.
#[tokio::test]
async fn delegation_needs_the_holders_consent_and_the_rfc_token_roles() {
    let s = Setup::start().await;
    let (_, plain) = s
        .exchange(&[("resource", MCP), ("scope", "notes:read"), ("task_id", "c")])
        .await;
    let plain = plain["access_token"].as_str().unwrap().to_string();
    let (status, e) = s
        .exchange_on_behalf_of(&plain, &[("resource", MCP), ("scope", "notes:read")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(
        e["error_description"].as_str().unwrap().contains("may_act"),
        "{e}"
    );

    let (status, e) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read"),
            ("actor_token", &plain),
            (
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
        ])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("reversed"),
        "{e}"
    );
}

/// A stolen access token cannot be laundered by delegation. The thief is
/// another user (uid 65534, with an identity of its own) holding the
/// victim's token, as if read from a log or a compromised resource server,
/// and its own JWT-SVID; it asks for a token on the victim's behalf bound
/// to its own certificate, in RFC 8693 order and in the order the agent
/// used to take. Both are refused. A token whose holder named the thief in
/// `may_act` can be acted on: the same attack path, consented, works.
#[tokio::test]
async fn a_stolen_token_cannot_be_laundered_by_delegation() {
    tessera_tests::require_root(
        "a_stolen_token_cannot_be_laundered_by_delegation",
        "the thief runs as another user",
    );
    const THIEF: &str = "spiffe://example.org/agent/thief";
    let entry = format!("[[entries]]\nspiffe_id = \"{THIEF}\"\nselectors = [\"unix:uid:65534\"]\n");
    let s = Setup::start_with(&entry).await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut victim_tokens = Vec::new();
    for may_act in [None, Some("spiffe://example.org/agent/helper"), Some(THIEF)] {
        let mut ask = vec![
            ("resource", MCP),
            ("scope", "notes:write"),
            ("task_id", "v"),
        ];
        ask.extend(may_act.map(|m| ("may_act", m)));
        let (status, r) = s.exchange(&ask).await;
        assert_eq!(status, 200, "{r}");
        victim_tokens.push(r["access_token"].as_str().unwrap().to_string());
    }
    let [stolen, for_someone_else, consented] = <[String; 3]>::try_from(victim_tokens).unwrap();

    // The thief's own connections, opened by its own process.
    let api = tessera_tests::connect_from(
        tessera_tests::as_nobody("/usr/bin/python3"),
        &s.agent.socket(),
        s.dir(),
    );
    api.stream.set_nonblocking(true).unwrap();
    let channel = tessera_agent::cli::client::channel_over(
        tokio::net::UnixStream::from_std(api.stream.try_clone().unwrap()).unwrap(),
    )
    .await
    .unwrap();
    let thief_svid = tessera_workload_api::client::SpiffeWorkloadApiClient::new(channel)
        .fetch_jwtsvid(tessera_workload_api::with_security_header(
            tessera_workload_api::JwtsvidRequest {
                audience: vec![ISSUER.into()],
                spiffe_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0);
    assert_eq!(thief_svid.spiffe_id, THIEF);
    let thief_exchange = |pairs| thief_exchange(&s, pairs);
    const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
    const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
    let on_behalf_of = |token: &str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
            ),
            ("subject_token", token.to_string()),
            ("subject_token_type", ACCESS.to_string()),
            ("actor_token", thief_svid.svid.clone()),
            ("actor_token_type", JWT.to_string()),
            ("resource", MCP.to_string()),
            ("scope", "notes:write".to_string()),
        ]
    };

    let (status, e) = thief_exchange(on_behalf_of(&stolen)).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    assert!(
        e["error_description"].as_str().unwrap().contains("may_act"),
        "{e}"
    );
    let (status, e) = thief_exchange(on_behalf_of(&for_someone_else)).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    // The order the agent took before: its own JWT-SVID as subject, the
    // victim's token as actor.
    let reversed = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
        ),
        ("subject_token", thief_svid.svid.clone()),
        ("subject_token_type", JWT.to_string()),
        ("actor_token", stolen.clone()),
        ("actor_token_type", ACCESS.to_string()),
        ("resource", MCP.to_string()),
        ("scope", "notes:write".to_string()),
    ];
    let (status, e) = thief_exchange(reversed).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );

    let (status, r) = thief_exchange(on_behalf_of(&consented)).await;
    assert_eq!(status, 200, "{r}");
    let c = s.verify(r["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(c["sub"], ME, "acts for the consenting holder");
    assert_eq!(c["act"]["sub"], THIEF);
    assert_eq!(c["client_id"], THIEF);
    drop(api);
}

/// POST /token from a process of uid 65534 (its own connection).
async fn thief_exchange(s: &Setup, pairs: Vec<(&'static str, String)>) -> (u16, Value) {
    let conn = tessera_tests::connect_from(
        tessera_tests::as_nobody("/usr/bin/python3"),
        &s.exchange_socket(),
        s.dir(),
    );
    conn.stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(conn.stream.try_clone().unwrap()).unwrap();
    let body: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, body) = tessera_agent::cli::client::http_over(
        stream,
        http::Method::POST,
        "/token",
        Some(form(&body)),
    )
    .await
    .unwrap();
    drop(conn);
    (status.as_u16(), serde_json::from_slice(&body).unwrap())
}

/// Durable state from a hostile workload is bounded per principal. Four
/// processes of uid 65534 (an identity of their own) end 600 random task ids
/// each and send 600 denied exchanges each, over the real socket. Before the
/// fix that was 2,400 fsynced revocation lines and 2,400 audit records. Now
/// ends of tasks that cannot have live tokens cost no disk (at most
/// `UNKNOWN_DURABLE_ENDS` in the window after start, where the agent cannot
/// know what an earlier run issued), denials are audited up to the
/// principal's budget and summarised beyond it, and an honest workload's
/// records and task ends are untouched.
#[tokio::test]
async fn a_flooding_workload_cannot_grow_durable_state_without_bound() {
    tessera_tests::require_root(
        "a_flooding_workload_cannot_grow_durable_state_without_bound",
        "the flood runs as another user",
    );
    const FLOODER: &str = "spiffe://example.org/agent/flooder";
    let entry = format!(
        "denial_records_per_minute = 100\n[[entries]]\nspiffe_id = \"{FLOODER}\"\nselectors = [\"unix:uid:65534\"]\n"
    );
    let s = Setup::start_with(&entry).await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // An honest task with a live token, ended before the flood.
    let (status, r) = s
        .exchange(&[
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", "honest"),
        ])
        .await;
    assert_eq!(status, 200, "{r}");
    let honest_token = r["access_token"].as_str().unwrap().to_string();

    const FLOOD: &str = r#"
import http.client, json, os, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
conn, codes = Unix("localhost"), {}
for i in range(int(sys.argv[3])):
    if sys.argv[2] == "end":
        path, body = "/revoke", "task_id=flood-%d-%d" % (os.getpid(), i)
    else:
        path, body = "/token", ("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
            "&subject_token=not.a.jwt&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt"
            "&audience=notes&scope=notes%3Aread&task_id=t")
    conn.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    codes[r.status] = codes.get(r.status, 0) + 1
print(json.dumps(codes))
"#;
    let socket = s.exchange_socket();
    let flood = tokio::task::spawn_blocking(move || {
        let children: Vec<_> = ["end", "end", "end", "end", "deny", "deny", "deny", "deny"]
            .iter()
            .map(|mode| {
                tessera_tests::python_as_nobody(FLOOD)
                    .arg(&socket)
                    .arg(mode)
                    .arg("600")
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("setpriv and /usr/bin/python3 are required")
            })
            .collect();
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success());
                serde_json::from_slice::<Value>(&out.stdout).unwrap()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // Every request was answered as before: ends acknowledged, denials 400.
    for (i, codes) in flood.iter().enumerate() {
        let expected = if i < 4 { "200" } else { "400" };
        assert_eq!(codes[expected], 600, "flooder {i}: {codes}");
    }

    let revocations = std::fs::read_to_string(s.dir().join("data/revocations.jsonl")).unwrap();
    let durable = revocations.lines().count();
    assert!(
        durable <= tessera_agent::exchange::tasks::UNKNOWN_DURABLE_ENDS as usize,
        "2,400 ends of random tasks wrote {durable} durable entries"
    );
    // The ended random tasks still cannot be used.
    let metrics = &s.agent.running().callers.metrics;
    assert!(metrics.task_ends_in_memory.get() >= 2400 - durable as u64);

    // Let the maintenance round write its summary.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let log = std::fs::read_to_string(s.dir().join("data/audit.jsonl")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let from_flooder = |r: &&Value| {
        r["caller"]["selectors"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "unix:uid:65534"))
    };
    let written = records.iter().filter(from_flooder).count() as u64;
    let durable_ends = records
        .iter()
        .filter(from_flooder)
        .filter(|r| r["event"] == "task.end" && r["durable"] == true)
        .count() as u64;
    let suppressed: u64 = records
        .iter()
        .filter(|r| r["event"] == "audit.suppressed" && r["principal"] == FLOODER)
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(durable_ends, durable as u64, "each durable end is audited");
    assert!(
        written - durable_ends < 300,
        "requests that changed nothing wrote {} audit records (budget: 100 a minute)",
        written - durable_ends
    );
    assert_eq!(
        written + suppressed,
        4800,
        "every request is either recorded or counted in a summary"
    );

    // The honest workload: its task end is durable, its denials recorded.
    let (status, _) = s.post("/revoke", &[("task_id", "honest")]).await;
    assert_eq!(status, 200);
    assert_eq!(s.introspect(&honest_token).await["active"], false);
    let (status, _) = s
        .exchange(&[("audience", "billing"), ("scope", "x"), ("task_id", "h")])
        .await;
    assert_eq!(status, 400);
    let revocations = std::fs::read_to_string(s.dir().join("data/revocations.jsonl")).unwrap();
    assert_eq!(
        revocations.lines().count(),
        durable + 1,
        "the honest end is durable"
    );
    let log = std::fs::read_to_string(s.dir().join("data/audit.jsonl")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["event"].as_str(), last["decision"].as_str()),
        (Some("token.exchange"), Some("denied")),
        "{last}"
    );
}

#[tokio::test]
async fn task_end_and_revocation_survive_a_restart() {
    let s = Setup::start().await;
    let ask = |task: &'static str| {
        [
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", task),
        ]
    };
    let (_, a1) = s.exchange(&ask("a")).await;
    let (_, a2) = s.exchange(&ask("a")).await;
    let (_, b1) = s.exchange(&ask("b")).await;
    let (_, c1) = s.exchange(&ask("c")).await;
    let tok = |v: &Value| v["access_token"].as_str().unwrap().to_string();
    let (a1, a2, b1, c1) = (tok(&a1), tok(&a2), tok(&b1), tok(&c1));

    // End task a; revoke one token of task b.
    let (status, _) = s.post("/revoke", &[("task_id", "a")]).await;
    assert_eq!(status, 200);
    let (status, _) = s.post("/revoke", &[("token", &b1)]).await;
    assert_eq!(status, 200);
    for t in [&a1, &a2, &b1] {
        assert_eq!(s.introspect(t).await["active"], false);
    }
    assert_eq!(s.introspect(&c1).await["active"], true);
    let (status, e) = s.exchange(&ask("a")).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(e["error_description"].as_str().unwrap().contains("ended"));

    // Restart on the same state directory.
    let mut s = s;
    s.agent.stop().await;
    let TestAgent { dir, .. } = s.agent;
    let body = agent_body(dir.path(), "");
    let s = Setup {
        agent: TestAgent::start_in(dir, &body).await,
    };
    for t in [&a1, &a2, &b1] {
        assert_eq!(
            s.introspect(t).await["active"],
            false,
            "revocation survived the restart"
        );
    }
    assert_eq!(s.introspect(&c1).await["active"], true, "keys survived too");
    let (status, _) = s.exchange(&ask("a")).await;
    assert_eq!(status, 400, "the ended task stays ended");

    // Revoked tokens fail at the resource server's introspection, but still
    // verify offline: revocation needs introspection (documented).
    s.verify(&b1, MCP).await;
}

#[tokio::test]
async fn approval_pending_then_approved_then_token_and_denied() {
    let s = Setup::start().await;
    let admin = s.dir().join("admin/admin.sock");
    let ask = [
        ("resource", MCP),
        ("scope", "notes:delete"),
        ("task_id", "cleanup"),
    ];
    let (status, p) = s.exchange(&ask).await;
    assert_eq!(
        (status, p["error"].as_str()),
        (400, Some("authorization_pending")),
        "{p}"
    );
    assert_eq!(p["interval"], 1);
    let id = p["approval_id"].as_str().unwrap().to_string();

    // Still pending on poll; no token exists yet.
    let mut with_id = ask.to_vec();
    with_id.push(("approval_id", &id));
    let (_, again) = s.exchange(&with_id).await;
    assert_eq!(again["error"], "authorization_pending");

    // The operator sees it and approves.
    let (status, body) = http_unix(&admin, http::Method::GET, "/approvals", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap();
    assert_eq!(entry["state"], "pending");
    assert_eq!(entry["scopes"], serde_json::json!(["notes:delete"]));
    let (status, _) = s
        .call(&admin, &format!("/approvals/{id}/approve"), &[])
        .await;
    assert_eq!(status, 200);
    let (status, _) = s.call(&admin, &format!("/approvals/{id}/deny"), &[]).await;
    assert_eq!(status, 409, "decided once");

    // A different request cannot use this approval.
    let mut other = vec![
        ("resource", MCP),
        ("scope", "notes:delete"),
        ("task_id", "other"),
    ];
    other.push(("approval_id", &id));
    let (_, e) = s.exchange(&other).await;
    assert_eq!(e["error"], "invalid_request");

    let (status, ok) = s.exchange(&with_id).await;
    assert_eq!(status, 200, "{ok}");
    let claims = s.verify(ok["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(claims["scope"], "notes:delete");
    let (_, reuse) = s.exchange(&with_id).await;
    assert_eq!(
        reuse["error"], "invalid_request",
        "an approval is redeemed once"
    );

    // Denied.
    let (_, p) = s.exchange(&ask).await;
    let id = p["approval_id"].as_str().unwrap().to_string();
    let (status, _) = s.call(&admin, &format!("/approvals/{id}/deny"), &[]).await;
    assert_eq!(status, 200);
    let mut with_id = ask.to_vec();
    with_id.push(("approval_id", &id));
    let (status, e) = s.exchange(&with_id).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("access_denied")));

    // Every decision is in the audit log, chained.
    let report = tessera_agent::audit::verify_file(
        &s.dir().join("data/audit.jsonl"),
        Some(&s.dir().join("data/audit.jsonl.anchor")),
    )
    .unwrap();
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
    let log = std::fs::read_to_string(s.dir().join("data/audit.jsonl")).unwrap();
    assert!(log.contains("\"approval.decision\""));
    assert!(log.contains("\"pending\""));
    assert!(
        !log.contains(ok["access_token"].as_str().unwrap()),
        "never the token itself"
    );
}

/// An operator approves what the pending approval showed, and the token
/// gets exactly that: a scope policy withholds until approval (`forbid ...
/// unless { context.approved }`) is not added at redemption, and the
/// lifetime is bounded by the one shown. Before the fix the token carried
/// `notes:delete notes:secret` although only `notes:delete` was approved.
#[tokio::test]
async fn an_approved_token_carries_no_more_than_the_operator_approved() {
    let s = Setup::start().await;
    let admin = s.dir().join("admin/admin.sock");
    let ask = [
        ("resource", MCP),
        ("scope", "notes:delete notes:secret"),
        ("scope_mode", "subset"),
        ("task_id", "cleanup"),
        ("requested_ttl", "120"),
    ];
    let (_, p) = s.exchange(&ask).await;
    assert_eq!(p["error"], "authorization_pending", "{p}");
    let id = p["approval_id"].as_str().unwrap().to_string();
    let (_, body) = http_unix(&admin, http::Method::GET, "/approvals", None)
        .await
        .unwrap();
    let list: Value = serde_json::from_slice(&body).unwrap();
    let shown = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(shown["scopes"], serde_json::json!(["notes:delete"]));
    assert_eq!(shown["ttl_seconds"], 120);
    assert_eq!(shown["audience"], MCP);
    assert_eq!(shown["task_id"], "cleanup");
    assert_eq!(shown["delegation_chain"], serde_json::json!([]));
    let (status, _) = s
        .call(&admin, &format!("/approvals/{id}/approve"), &[])
        .await;
    assert_eq!(status, 200);

    // Redeemed asking for longer: still the approved scope and lifetime.
    let mut redeem = ask.to_vec();
    redeem.retain(|(k, _)| *k != "requested_ttl");
    redeem.push(("requested_ttl", "600"));
    redeem.push(("approval_id", &id));
    let (status, ok) = s.exchange(&redeem).await;
    assert_eq!(status, 200, "{ok}");
    let claims = s.verify(ok["access_token"].as_str().unwrap(), MCP).await;
    assert_eq!(claims["scope"], "notes:delete", "{claims}");
    let life = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(life <= 120, "lifetime {life}s beyond the approved 120s");
    let log = std::fs::read_to_string(s.dir().join("data/audit.jsonl")).unwrap();
    assert!(
        log.contains("\"not_approved_scopes\":[\"notes:secret\"]"),
        "{log}"
    );
}

/// Revoking a token revokes every token derived from it by delegation, at
/// any depth, as ending its task would; an unrelated token of the same task
/// stays active. Before the fix the derived tokens stayed active.
#[tokio::test]
async fn revoking_a_token_revokes_the_tokens_delegated_from_it() {
    let s = Setup::start().await;
    let issue = |task: &'static str| {
        [
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", task),
            ("requested_ttl", "120"),
            ("may_act", ME),
        ]
    };
    let delegate = [("resource", MCP), ("scope", "notes:read"), ("may_act", ME)];
    let token = |v: &Value| v["access_token"].as_str().unwrap().to_string();
    let (_, parent) = s.exchange(&issue("tree")).await;
    let parent = token(&parent);
    let (_, sibling) = s.exchange(&issue("tree")).await;
    let sibling = token(&sibling);
    let (status, child) = s.exchange_on_behalf_of(&parent, &delegate).await;
    assert_eq!(status, 200, "{child}");
    let child = token(&child);
    let (status, grandchild) = s.exchange_on_behalf_of(&child, &delegate).await;
    assert_eq!(status, 200, "{grandchild}");
    let grandchild = token(&grandchild);
    for t in [&parent, &child, &grandchild, &sibling] {
        assert_eq!(s.introspect(t).await["active"], true);
    }

    let (status, r) = s.post("/revoke", &[("token", &parent)]).await;
    assert_eq!(status, 200, "{r}");
    for (name, t) in [
        ("parent", &parent),
        ("child", &child),
        ("grandchild", &grandchild),
    ] {
        assert_eq!(
            s.introspect(t).await["active"],
            false,
            "{name} still active"
        );
    }
    assert_eq!(
        s.introspect(&sibling).await["active"],
        true,
        "a token not derived from the revoked one stays active"
    );

    // Revoking a child leaves its parent alone.
    let (_, other) = s.exchange(&issue("tree2")).await;
    let other = token(&other);
    let (_, derived) = s.exchange_on_behalf_of(&other, &delegate).await;
    let derived = token(&derived);
    s.post("/revoke", &[("token", &derived)]).await;
    assert_eq!(s.introspect(&derived).await["active"], false);
    assert_eq!(s.introspect(&other).await["active"], true);
}

/// Bearer or bound is decided at issuance: a scope whose permit says
/// `@bearer` is issued without `cnf`; a token that also carries a scope
/// without it is bound to the caller's certificate.
#[tokio::test]
async fn bearer_scopes_are_issued_without_cnf() {
    let s = Setup::start().await;
    let ask = |scope: &'static str| [("resource", MCP), ("scope", scope), ("task_id", "b")];
    let (status, r) = s.exchange(&ask("notes:share")).await;
    assert_eq!(status, 200, "{r}");
    let c = s.verify(r["access_token"].as_str().unwrap(), MCP).await;
    assert!(c.get("cnf").is_none(), "{c}");
    let (status, r) = s.exchange(&ask("notes:share notes:write")).await;
    assert_eq!(status, 200, "{r}");
    let c = s.verify(r["access_token"].as_str().unwrap(), MCP).await;
    assert!(c["cnf"]["x5t#S256"].is_string(), "{c}");
}

/// Introspection shows a token's claims only to its parties: another
/// workload (a resource server checking a token it was shown; here uid
/// 65534 with an identity of its own) learns that it is active, its `jti`
/// and `exp`, not its subject, scopes or task.
#[tokio::test]
async fn introspection_shows_claims_only_to_the_tokens_parties() {
    tessera_tests::require_root(
        "introspection_shows_claims_only_to_the_tokens_parties",
        "the resource server runs as another user",
    );
    let other = "[[entries]]\nspiffe_id = \"spiffe://example.org/rs/other\"\nselectors = [\"unix:uid:65534\"]\n";
    let s = Setup::start_with(other).await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, r) = s
        .exchange(&[("resource", MCP), ("scope", "notes:read"), ("task_id", "i")])
        .await;
    let token = r["access_token"].as_str().unwrap().to_string();
    let mine = s.introspect(&token).await;
    assert_eq!(mine["sub"], "spiffe://example.org/agent/planner", "{mine}");
    assert_eq!(mine["scope"], "notes:read");

    const INTROSPECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = "token=" + sys.argv[2]
s.sendall(("POST /introspect HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)).encode())
print(s.makefile("rb").read().split(b"\r\n\r\n", 1)[1].decode())
"#;
    // Off the runtime: the agent under test answers on it meanwhile.
    let (socket, t) = (s.exchange_socket(), token.clone());
    let out = tokio::task::spawn_blocking(move || {
        tessera_tests::python_as_nobody(INTROSPECT)
            .arg(socket)
            .arg(t)
            .output()
            .expect("setpriv and /usr/bin/python3 are required")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(theirs["active"], true, "{theirs}");
    assert_eq!(theirs["jti"], mine["jti"]);
    assert_eq!(theirs["exp"], mine["exp"]);
    for hidden in ["sub", "client_id", "scope", "txn", "cnf", "aud"] {
        assert!(
            theirs.get(hidden).is_none(),
            "{hidden} shown to a non-party: {theirs}"
        );
    }
}

#[tokio::test]
async fn policy_hot_reload_valid_and_invalid() {
    let s = Setup::start().await;
    let ask = [
        ("audience", "reports"),
        ("scope", "reports:read"),
        ("task_id", "t"),
    ];
    let (_, e) = s.exchange(&ask).await;
    assert_eq!(e["error"], "access_denied");

    // A valid new file is picked up without a restart.
    let file = s.dir().join("policies/reports.cedar");
    std::fs::write(
        &file,
        "@id(\"reports\")\npermit(principal, action == Tessera::Action::\"reports:read\", resource == Tessera::Audience::\"reports\");\n",
    )
    .unwrap();
    let mut granted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.exchange(&ask).await.0 == 200 {
            granted = true;
            break;
        }
    }
    assert!(granted, "the new policy was not loaded within 5 s");

    // An invalid change is rejected; the previous set stays in force.
    std::fs::write(
        &file,
        "permit(principal, action == Tessera::Action::\"reports:read\" resource);\n",
    )
    .unwrap();
    let exchange = s.agent.running().exchange.clone().unwrap();
    let err = exchange.policy.reload().unwrap_err().to_string();
    assert!(
        err.contains("reports.cedar"),
        "the error names the file: {err}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.exchange(&ask).await.0, 200, "old policies still active");
}

#[tokio::test]
async fn audit_log_verifies_clean_and_finds_the_first_tampered_record() {
    let mut s = Setup::start().await;
    for task in ["t1", "t2", "t3"] {
        s.exchange(&[
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", task),
        ])
        .await;
    }
    s.exchange(&[("audience", "nope"), ("scope", "x"), ("task_id", "t4")])
        .await;
    let path = s.dir().join("data/audit.jsonl");
    let anchor = s.dir().join("data/audit.jsonl.anchor");
    let report = tessera_agent::audit::verify_file(&path, Some(&anchor)).unwrap();
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
    assert_eq!(report.records, 4);
    assert_eq!(
        report.anchor,
        Some(tessera_agent::audit::AnchorState::Holds { seq: 4, after: 0 })
    );
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["decision"], "issued");
    assert_eq!(
        lines[0]["caller"]["spiffe_ids"][0],
        "spiffe://example.org/agent/planner"
    );
    assert!(lines[0]["token_sha256"].as_str().unwrap().len() == 64);
    assert_eq!(lines[3]["decision"], "denied");

    // Flip the second record's decision: verify points at line 2.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out: Vec<String> = text.lines().map(str::to_string).collect();
    out[1] = out[1].replacen("\"task_id\":\"t2\"", "\"task_id\":\"tX\"", 1);
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
    let report = tessera_agent::audit::verify_file(&path, Some(&anchor)).unwrap();
    let problem = report.first_problem.expect("tampering is detected");
    assert_eq!(problem.line, 2, "{problem}");

    // With the agent stopped, remove the record of the denial cleanly (the
    // chain of the rest is intact): the anchor shows it, and the agent will
    // not start on, and append to, a log that lost acknowledged records.
    s.agent.stop().await;
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&path, lines[..3].join("\n") + "\n").unwrap();
    let chain_only = tessera_agent::audit::verify_file(&path, None).unwrap();
    assert_eq!(
        chain_only.first_problem, None,
        "the chain alone cannot tell"
    );
    let report = tessera_agent::audit::verify_file(&path, Some(&anchor)).unwrap();
    assert_eq!(
        report.first_problem.map(|p| p.kind),
        Some(tessera_agent::audit::ProblemKind::Truncated)
    );
    let text = TestAgent::config_text(s.dir(), &agent_body(s.dir(), ""));
    let config = tessera_agent::config::Config::parse(&text, "test.toml").unwrap();
    let err = tessera_agent::app::start(
        config,
        std::sync::Arc::new(tessera_agent::clock::SystemClock),
    )
    .await
    .err()
    .expect("the agent refuses a truncated audit log");
    let message = format!("{err:#}");
    assert!(
        message.contains("record 4 was acknowledged, but the last readable record is 3"),
        "{message}"
    );
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_clear_errors() {
    let s = Setup::start().await;
    // Not a form body.
    let (status, body) = http_unix(&s.exchange_socket(), http::Method::POST, "/token", None)
        .await
        .unwrap();
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status.as_u16(), e["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // Over the 64 KiB body limit: refused before it is parsed.
    let huge = "x".repeat(100 * 1024);
    let (status, _) = http_unix(
        &s.exchange_socket(),
        http::Method::POST,
        "/token",
        Some(form(&[("subject_token", huge.as_str())])),
    )
    .await
    .unwrap();
    assert_eq!(status, 413);
    // Garbage percent-encoding and repeated parameters.
    let (status, e) = s
        .post("/token", &[("grant_type", "a"), ("grant_type", "b")])
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // Unknown routes and methods.
    let (status, _) = http_unix(&s.exchange_socket(), http::Method::GET, "/token", None)
        .await
        .unwrap();
    assert_eq!(status, 405);
    // Introspection of garbage is simply inactive.
    assert_eq!(
        s.introspect("not-a-token").await,
        serde_json::json!({"active": false})
    );
}

#[tokio::test]
async fn an_agent_with_invalid_policies_still_serves_identities_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let file = dir.path().join("policies/notes.cedar");
    std::fs::write(&file, "permit(principal, action == oops").unwrap();
    let body = agent_body(dir.path(), "");
    let s = Setup {
        agent: TestAgent::start_in(dir, &body).await,
    };
    // SVIDs are served; exchanges are denied, not failed.
    s.agent
        .spiffe_client()
        .await
        .fetch_x509_svid()
        .await
        .unwrap();
    let ask = [("resource", MCP), ("scope", "notes:read"), ("task_id", "t")];
    let (status, e) = s.exchange(&ask).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );
    // Fixing the file is picked up by the periodic reload.
    std::fs::write(&file, policies(my_uid())).unwrap();
    let mut granted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.exchange(&ask).await.0 == 200 {
            granted = true;
            break;
        }
    }
    assert!(granted, "the repaired policies were not loaded within 5 s");
}
