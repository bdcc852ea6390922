//! Many nodes, one trust domain: two `tessera authority` replicas sharing one
//! key directory, and agents in upstream mode acting as separate nodes (each
//! with its own socket and data dir), all in this process over loopback.
//!
//! Judges: the `spiffe` crate fetches every SVID and `spiffe-rustls` (rustls +
//! webpki) runs the mTLS handshake between nodes; `jsonwebtoken` verifies a
//! task token from node A against node B's JWKS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;
use tessera_agent::app::authority::{RunningAuthority, start_authority as start};
use tessera_agent::cli::client::{form, http_unix};
use tessera_agent::config::Config;
use tessera_agent::fleet::operator::{OperatorCallError, OperatorClient};
use tessera_tests::kube::{KubeApi, SA_ISSUER};
use tessera_tests::{TestAgent, my_uid};

const ISSUER: &str = "spiffe://example.org/tessera";
const NOTES: &str = "https://notes.example";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One entry per node: the workload on node `n` runs as this user there.
/// `extra` is added to each entry.
fn entries_with(extra: &str) -> String {
    ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| {
            format!(
                "[[entries]]\nspiffe_id = \"spiffe://example.org/{n}/svc\"\nselectors = [\"tessera:node:{n}\", \"unix:uid:{}\"]\n{extra}",
                my_uid()
            )
        })
        .collect()
}

/// An authority replica from a config file's text (with a `[server]` table).
async fn start_authority(text: &str) -> RunningAuthority {
    let cfg = Config::parse(text, "authority.toml").unwrap();
    start(&cfg, Arc::new(tessera_agent::clock::SystemClock))
        .await
        .unwrap()
}

struct Fleet {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    replicas: Vec<Option<RunningAuthority>>,
    /// Added to `[server]` of every replica.
    server_extra: String,
    /// Added to every entry (authority and agents).
    entry_extra: String,
    node_svid_ttl: &'static str,
    /// Each replica's `[https]` port, when the fleet serves the HTTPS face;
    /// the issuer is the first one's URL.
    https_ports: Option<Vec<u16>>,
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with("", "").await
    }

    async fn start_with(server_extra: &str, entry_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        // `rsa-jwt-key`: jwt.key is RSA 2048, as `tessera authority init
        // --jwt-key-type rsa-2048` writes it.
        let jwt_key_type = if server_extra.contains("rsa-jwt-key") {
            tessera_agent::identity::jws::JwtKeyType::Rsa2048
        } else {
            tessera_agent::identity::jws::JwtKeyType::EcP256
        };
        tessera_agent::identity::key_files::init_key_dir_of(
            &td,
            &dir.path().join("keys"),
            Duration::from_secs(30 * 24 * 3600),
            SystemTime::now(),
            jwt_key_type,
        )
        .unwrap();
        let mut fleet = Self {
            dir,
            ports: vec![free_port(), free_port()],
            replicas: Vec::new(),
            server_extra: server_extra.into(),
            entry_extra: entry_extra.into(),
            node_svid_ttl: if server_extra.contains("short-node-svids") {
                "4s"
            } else {
                "1h"
            },
            https_ports: server_extra
                .contains("https-face")
                .then(|| vec![free_port(), free_port()]),
        };
        for i in 0..2 {
            let r = fleet.start_replica(i).await;
            fleet.replicas.push(Some(r));
        }
        fleet
    }

    async fn start_replica(&self, i: usize) -> RunningAuthority {
        let d = self.dir.path().display();
        let https = match &self.https_ports {
            Some(ports) => format!(
                "[https]\nlisten = \"127.0.0.1:{}\"\nissuer = \"https://localhost:{}\"\n",
                ports[i], ports[0]
            ),
            None => String::new(),
        };
        let text = format!(
            "trust_domain = \"example.org\"\n{}\n{https}[server]\nlisten = \"127.0.0.1:{}\"\nkeys_dir = \"{d}/keys\"\njoin_token_dir = \"{d}/join\"\naudit_log = \"{d}/authority-{i}.jsonl\"\nnode_svid_ttl = \"{}\"\n{}",
            entries_with(&self.entry_extra),
            self.ports[i],
            self.node_svid_ttl,
            self.server_extra
                .replace("short-node-svids", "")
                .replace("https-face", "")
                .replace("rsa-jwt-key", ""),
        );
        start_authority(&text).await
    }

    async fn stop_replica(&mut self, i: usize) {
        if let Some(r) = self.replicas[i].take() {
            r.shutdown();
            r.wait().await;
        }
    }

    /// An agent for `node`, attested with a fresh join token. `local_entries`
    /// replaces the shared entries (to play a compromised node).
    async fn agent(&self, node: &str, local_entries: Option<String>) -> TestAgent {
        self.agent_with_policy(node, local_entries, "").await
    }

    /// [`Self::agent`] with `policy` (Cedar) added to its exchange policies.
    async fn agent_with_policy(
        &self,
        node: &str,
        local_entries: Option<String>,
        policy: &str,
    ) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let token = tessera_agent::fleet::join::create(
            &self.dir.path().join("join"),
            node,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
        std::fs::write(dir.path().join("join-token"), token).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/notes.cedar"),
            format!(
                "@id(\"notes-read\")\n@allow_delegation\npermit(principal, action == Tessera::Action::\"notes:read\", resource == Tessera::Audience::\"{NOTES}\");\n"
            ),
        )
        .unwrap();
        if !policy.is_empty() {
            std::fs::write(dir.path().join("policies/extra.cedar"), policy).unwrap();
        }
        let addrs: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let body = format!(
            "{}\n[upstream]\naddresses = [{}]\nbundle_file = \"{k}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{a}/join-token\"\nbundle_refresh = \"200ms\"\nrequest_timeout = \"2s\"\n\n[exchange]\npolicy_dir = \"{a}/policies\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            local_entries.unwrap_or_else(|| entries_with(&self.entry_extra)),
            addrs.join(", "),
            k = self.dir.path().display(),
            a = dir.path().display(),
        );
        TestAgent::start_in(dir, &body).await
    }

    fn audit_records(&self) -> Vec<Value> {
        (0..2)
            .flat_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("authority-{i}.jsonl")))
                    .unwrap_or_default()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

async fn mtls_ping(server: &TestAgent, client: &TestAgent, server_id: &str, client_id: &str) {
    let source = |a: &TestAgent| {
        let endpoint = a.endpoint();
        async move {
            spiffe::X509Source::builder()
                .endpoint(endpoint)
                .build()
                .await
                .expect("X509Source from the node's own agent")
        }
    };
    let server_cfg = spiffe_rustls::mtls_server(source(server).await)
        .authorize(spiffe_rustls::authorizer::exact([client_id]).unwrap())
        .build()
        .unwrap();
    let client_cfg = spiffe_rustls::mtls_client(source(client).await)
        .authorize(spiffe_rustls::authorizer::exact([server_id]).unwrap())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .expect("server side of the handshake");
        use tokio::io::AsyncWriteExt;
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("peer").unwrap(),
            tcp,
        )
        .await
        .expect("client side of the handshake");
    let mut reply = String::new();
    use tokio::io::AsyncReadExt;
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "pong");
    srv.await.unwrap();
}

async fn exchange_token(agent: &TestAgent) -> String {
    exchange(agent, &[("task_id", "t-1")]).await
}

/// A task token for `notes:read` at NOTES on `agent`'s exchange socket, with
/// `extra` form fields.
async fn exchange(agent: &TestAgent, extra: &[(&str, &str)]) -> String {
    let subject = agent.jwt_svid(ISSUER).await;
    let mut fields = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", NOTES),
        ("scope", "notes:read"),
    ];
    fields.extend_from_slice(extra);
    exchange_post(agent, "/token", &fields).await
}

/// `POST path` on `agent`'s exchange socket; the access token of a 200.
async fn exchange_post(agent: &TestAgent, path: &str, fields: &[(&str, &str)]) -> String {
    let (status, json) = exchange_call(agent, path, fields).await;
    assert_eq!(status, 200, "{json}");
    json["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn exchange_call(agent: &TestAgent, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    let socket = agent.dir.path().join("sock/exchange.sock");
    let (status, body) = http_unix(&socket, http::Method::POST, path, Some(form(fields)))
        .await
        .unwrap();
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Whether `agent`'s `/introspect` says `token` is active.
async fn active_at(agent: &TestAgent, token: &str) -> bool {
    let (status, json) = exchange_call(agent, "/introspect", &[("token", token)]).await;
    assert_eq!(status, 200, "{json}");
    json["active"]
        .as_bool()
        .expect("RFC 7662 answers carry active")
}

/// Whether webpki (through rustls) accepts `leaf` as a client certificate
/// issued by `ca` alone.
fn signed_by(leaf: &[u8], ca: &[u8]) -> bool {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&CertificateDer::from(leaf.to_vec()), &[], UnixTime::now())
        .is_ok()
}

/// `GET /readyz` on the agent's admin listener: status line and body.
async fn readyz(agent: &TestAgent) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = agent.running().admin_addr.expect("admin listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

async fn jwks(agent: &TestAgent) -> JwkSet {
    let socket = agent.dir.path().join("sock/exchange.sock");
    let (status, body) = http_unix(&socket, http::Method::GET, "/jwks", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Verifies `token` as a relying party off the nodes would, knowing nothing
/// but the token and the CAs it trusts: OpenID discovery at its `iss`, then
/// the keys at `jwks_uri` (rustls for TLS, jsonwebtoken for the JWS).
async fn verify_by_discovery(token: &str, roots: &[Vec<u8>], audience: &str) -> Value {
    verify_by_discovery_as(token, roots, audience, Algorithm::ES256).await
}

/// [`verify_by_discovery`], accepting only `alg`.
async fn verify_by_discovery_as(
    token: &str,
    roots: &[Vec<u8>],
    audience: &str,
    alg: Algorithm,
) -> Value {
    let unverified = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
        .unwrap()
        .claims;
    let iss = unverified["iss"]
        .as_str()
        .expect("the JWT-SVID carries iss");
    let host = iss.trim_start_matches("https://");
    let (meta, _) = tessera_tests::https_get(host, roots, "/.well-known/openid-configuration")
        .await
        .unwrap();
    assert_eq!(meta["issuer"], iss);
    let jwks_uri = meta["jwks_uri"].as_str().unwrap();
    let path = jwks_uri
        .strip_prefix(iss)
        .expect("jwks_uri under the issuer");
    let (set, _) = tessera_tests::https_get(host, roots, path).await.unwrap();
    let set: JwkSet = serde_json::from_value(set).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = DecodingKey::from_jwk(set.find(&kid).expect("kid published")).unwrap();
    let mut v = Validation::new(alg);
    v.set_audience(&[audience]);
    v.set_issuer(&[iss]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

/// A key directory whose jwt.key is RSA (`tessera authority init
/// --jwt-key-type rsa-2048`, for Microsoft Entra): the authority signs RS256
/// JWT-SVIDs for every node, its HTTPS face publishes the RSA key and lists
/// RS256 in discovery (jsonwebtoken verifies from `iss` alone), and another
/// node's agent, which got the RSA key in its bundle from the authority,
/// validates the token (ValidateJWTSVID, read by the spiffe crate's client).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_rsa_jwt_key_at_the_authority_signs_rs256_jwt_svids_every_node_accepts() {
    let fleet = Fleet::start_with("https-face rsa-jwt-key", "").await;
    let ports = fleet.https_ports.clone().unwrap();
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let ctx = a.spiffe_client().await.fetch_x509_context().await.unwrap();
    let roots = tessera_tests::example_org_cas(&ctx);
    let audience = "api://AzureADTokenExchange";
    let token = a.jwt_svid(audience).await;
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().alg,
        Algorithm::RS256
    );
    let claims = verify_by_discovery_as(&token, &roots, audience, Algorithm::RS256).await;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
    let (meta, _) = tessera_tests::https_get(
        &format!("localhost:{}", ports[0]),
        &roots,
        "/.well-known/openid-configuration",
    )
    .await
    .unwrap();
    assert_eq!(
        meta["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    let validated = b
        .spiffe_client()
        .await
        .validate_jwt_token(audience, &token)
        .await
        .expect("node b validates node a's RS256 JWT-SVID");
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/node-a/svc"
    );
}

/// The fleet authority's HTTPS face is the one issuer of the trust domain:
/// JWT-SVIDs from agents on two nodes carry its URL and verify from `iss`
/// alone; every replica serves the same keys (a Service may send a relying
/// party to either); a task token from a node verifies against the face's
/// task-token keys; no token endpoint is advertised, since the token
/// service stays on the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authority_serves_one_issuer_for_every_nodes_jwt_svids() {
    let fleet = Fleet::start_with("https-face", "").await;
    let ports = fleet.https_ports.clone().unwrap();
    let issuer = format!("https://localhost:{}", ports[0]);
    let replica = fleet.replicas[0].as_ref().unwrap();
    assert_eq!(replica.https_issuer.as_deref(), Some(issuer.as_str()));
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let ctx = a.spiffe_client().await.fetch_x509_context().await.unwrap();
    // The face's certificate comes from the trust domain's CA.
    let roots = tessera_tests::example_org_cas(&ctx);

    for (agent, id) in [
        (&a, "spiffe://example.org/node-a/svc"),
        (&b, "spiffe://example.org/node-b/svc"),
    ] {
        let token = agent.jwt_svid("sts.example.com").await;
        let claims = verify_by_discovery(&token, &roots, "sts.example.com").await;
        assert_eq!(claims["iss"], issuer.as_str());
        assert_eq!(claims["sub"], id);
    }

    let (meta, _) = tessera_tests::https_get(
        &format!("localhost:{}", ports[0]),
        &roots,
        "/.well-known/openid-configuration",
    )
    .await
    .unwrap();
    assert!(meta.get("token_endpoint").is_none(), "{meta}");
    let keys = |port: u16, path: &'static str| {
        let roots = roots.clone();
        async move {
            tessera_tests::https_get(&format!("localhost:{port}"), &roots, path)
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(keys(ports[0], "/keys").await, keys(ports[1], "/keys").await);

    let token = exchange_token(&a).await;
    let set: JwkSet = serde_json::from_value(keys(ports[1], "/token-keys").await).unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let key = DecodingKey::from_jwk(set.find(&kid).expect("task-token kid published")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[NOTES]);
    v.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_share_one_trust_domain_and_only_get_their_own_workloads() {
    let fleet = Fleet::start().await;
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let _c = fleet.agent("node-c", None).await;

    // Each node's workload gets its own identity from its own agent.
    let svid_a = a.spiffe_client().await.fetch_x509_svid().await.unwrap();
    let svid_b = b.spiffe_client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid_a.spiffe_id().to_string(),
        "spiffe://example.org/node-a/svc"
    );
    assert_eq!(
        svid_b.spiffe_id().to_string(),
        "spiffe://example.org/node-b/svc"
    );

    // A workload on A and one on B complete mTLS, each trusting only the
    // bundle from its own agent.
    mtls_ping(
        &b,
        &a,
        "spiffe://example.org/node-b/svc",
        "spiffe://example.org/node-a/svc",
    )
    .await;

    // A JWT-SVID minted for A validates with B's bundle (the spiffe crate).
    let jwt = a
        .spiffe_client()
        .await
        .fetch_jwt_svid(["db"], None)
        .await
        .unwrap();
    let bundles_b = b.spiffe_client().await.fetch_jwt_bundles().await.unwrap();
    let parsed = spiffe::JwtSvid::parse_and_validate(jwt.token(), &bundles_b, &["db"])
        .expect("B's JWT bundle verifies A's JWT-SVID");
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/node-a/svc"
    );

    // WIT-SVIDs (the key directory has wit.key): A's agent generates the
    // workload key, the authority signs over its public half, and B's WIT
    // bundle verifies the result (jsonwebtoken), cnf naming A's key.
    {
        use tessera_workload_api as pb;
        let wit_svid = |agent: &TestAgent| {
            let socket = agent.socket();
            async move {
                let mut c = pb::client::SpiffeWorkloadApiClient::new(
                    tessera_tests::raw_channel(&socket).await,
                );
                let r = c
                    .fetch_witsvid(pb::with_security_header(pb::WitsvidRequest::default()))
                    .await
                    .unwrap()
                    .into_inner()
                    .message()
                    .await
                    .unwrap()
                    .unwrap();
                let bundles = c
                    .fetch_wit_bundles(pb::with_security_header(pb::WitBundlesRequest {}))
                    .await
                    .unwrap()
                    .into_inner()
                    .message()
                    .await
                    .unwrap()
                    .unwrap();
                (r.svids.into_iter().next().unwrap(), bundles)
            }
        };
        let (wit_a, _) = wit_svid(&a).await;
        let (_, bundles_b) = wit_svid(&b).await;
        assert_eq!(wit_a.spiffe_id, "spiffe://example.org/node-a/svc");
        let set: JwkSet = serde_json::from_str(&bundles_b.bundles["spiffe://example.org"]).unwrap();
        let header = jsonwebtoken::decode_header(&wit_a.wit_svid).unwrap();
        assert_eq!(header.typ.as_deref(), Some("wit+jwt"));
        let key =
            DecodingKey::from_jwk(set.find(&header.kid.unwrap()).expect("WIT kid on B")).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.validate_aud = false;
        let claims = jsonwebtoken::decode::<Value>(&wit_a.wit_svid, &key, &v)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
        let mut private: Value = serde_json::from_str(&wit_a.wit_svid_key).unwrap();
        private.as_object_mut().unwrap().remove("d");
        assert_eq!(claims["cnf"]["jwk"], private);
        // B may not have A's identity as a WIT-SVID either.
        let mut c =
            pb::client::SpiffeWorkloadApiClient::new(tessera_tests::raw_channel(&b.socket()).await);
        let e = c
            .fetch_witsvid(pb::with_security_header(pb::WitsvidRequest {
                spiffe_id: "spiffe://example.org/node-a/svc".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    }

    // A task token exchanged on A verifies with B's JWKS (jsonwebtoken).
    let token = exchange_token(&a).await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let set = jwks(&b).await;
    let key =
        DecodingKey::from_jwk(set.find(&header.kid.unwrap()).expect("kid published on B")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[NOTES]);
    v.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
    assert_eq!(claims["scope"], "notes:read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_asking_for_another_nodes_workload_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    // Node D claims, in its own config, the workload of node B.
    let rogue = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/node-b/svc\"\nselectors = [\"unix:uid:{}\"]\n",
        my_uid()
    );
    let d = fleet.agent("node-d", Some(rogue)).await;
    let err = d
        .spiffe_client()
        .await
        .fetch_jwt_svid(["db"], None)
        .await
        .expect_err("the authority must refuse node-b's identity to node-d");
    // A decision, not an outage: the spiffe crate sees "no identity issued"
    // (PermissionDenied), not a reason to retry.
    assert!(
        matches!(
            err,
            spiffe::workload_api::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );
    let x509 = d.spiffe_client().await.fetch_x509_svid().await;
    assert!(
        matches!(
            x509,
            Err(spiffe::workload_api::WorkloadApiError::NoIdentityIssued)
        ),
        "no X509-SVID either: {x509:?}"
    );
    let refusals: Vec<Value> = fleet
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "refused" && r["node"] == "node-d")
        .collect();
    assert!(
        refusals
            .iter()
            .any(|r| r["subject"] == "spiffe://example.org/node-b/svc"),
        "refusal audited: {refusals:?}"
    );
    // A join token works once: a second agent cannot reuse node-d's.
    let reused = std::fs::read_to_string(d.dir.path().join("join-token")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), reused).unwrap();
    let text = TestAgent::config_text(
        dir.path(),
        &format!(
            "[upstream]\naddresses = [\"127.0.0.1:{}\"]\nbundle_file = \"{}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{}/token\"\n",
            fleet.ports[0],
            fleet.dir.path().display(),
            dir.path().display()
        ),
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let err = tessera_agent::app::start(cfg, Arc::new(tessera_agent::clock::SystemClock))
        .await
        .err()
        .expect("a used join token is refused");
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_fail_over_ride_out_an_outage_and_recover() {
    let mut fleet = Fleet::start().await;
    let a = fleet.agent("node-a", None).await;
    let first = a.spiffe_client().await.fetch_x509_svid().await.unwrap();
    let reachable = |a: &TestAgent| a.running().callers.metrics.upstream_reachable.get();
    assert_eq!(reachable(&a), 1);

    // One replica gone: new signing requests go to the other.
    fleet.stop_replica(0).await;
    let jwt = a
        .spiffe_client()
        .await
        .fetch_jwt_svid(["after-failover"], None)
        .await;
    assert!(jwt.is_ok(), "served by the remaining replica: {jwt:?}");

    // Every replica gone: cached SVIDs keep being served, new ones fail, the
    // outage shows in metrics.
    fleet.stop_replica(1).await;
    let cached = a.spiffe_client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(cached.spiffe_id(), first.spiffe_id());
    let err = a
        .spiffe_client()
        .await
        .fetch_jwt_svid(["during-outage"], None)
        .await
        .expect_err("nothing can sign a new JWT-SVID");
    assert!(
        format!("{err:?}").contains("no authority replica answered"),
        "{err:?}"
    );
    assert_eq!(reachable(&a), 0);

    // One replica back: the agent recovers without a restart.
    fleet.replicas[1] = Some(fleet.start_replica(1).await);
    let mut recovered = false;
    for _ in 0..50 {
        if a.spiffe_client()
            .await
            .fetch_jwt_svid(["after-outage"], None)
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the agent signs again once a replica is back");
    assert_eq!(reachable(&a), 1);
    let ready = readyz(&a).await;
    assert!(
        ready.starts_with("HTTP/1.0 200") && ready.ends_with("ready\n"),
        "{ready}"
    );
}

/// The fake API server with one agent pod (node-b) and tokens bound to it
/// the way Kubernetes before 1.30 bound them (no node claim).
async fn api_server(dir: &Path) -> tessera_tests::fake_apiserver::FakeApiServer {
    use tessera_tests::fake_apiserver::{ApiState, bound_user, fake_apiserver};
    use tessera_tests::fake_kubelet::make_pki;
    make_pki(dir, "ca.pem");
    std::fs::write(dir.join("authority-token"), "authority-sa-token\n").unwrap();
    let pods = vec![serde_json::json!({
        "metadata": {"name": "tessera-agent-x2", "namespace": "tessera", "uid": "uid-x2"},
        "spec": {"serviceAccountName": "tessera-agent", "nodeName": "node-b"},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": "agent", "image": "tessera:1", "imageID": "sha256:aa", "containerID": "containerd://x2"}]}
    })];
    let agent_sa = "tessera:tessera-agent";
    let tokens = [
        (
            "agent-token-b",
            bound_user(agent_sa, "tessera-agent-x2", "uid-x2", None),
        ),
        // The pod was replaced since its token was issued.
        (
            "agent-token-stale",
            bound_user(agent_sa, "tessera-agent-x2", "uid-old", None),
        ),
    ]
    .into_iter()
    .map(|(t, u)| (t.to_string(), u))
    .collect();
    fake_apiserver(
        dir,
        ApiState {
            authority_token: "authority-sa-token".into(),
            tokens,
            pods,
            requests: Vec::new(),
        },
    )
    .await
}

fn kube_config(dir: &Path, port: u16, audience: &str) -> tessera_agent::fleet::kube::KubeConfig {
    tessera_agent::fleet::kube::KubeConfig {
        api_server: format!("https://127.0.0.1:{port}"),
        ca_file: dir.join("ca.pem"),
        token_file: dir.join("authority-token"),
        audience: audience.into(),
        allowed_service_accounts: vec!["tessera:tessera-agent".into()],
        pod_cache_ttl: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_node_svid_expired_is_not_ready() {
    let mut fleet = Fleet::start_with("short-node-svids", "").await;
    let a = fleet.agent("node-a", None).await;
    a.spiffe_client().await.fetch_x509_svid().await.unwrap();
    let ready = readyz(&a).await;
    assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
    // No replica answers: the node SVID (4 s) cannot be renewed. Cached
    // workload SVIDs are still valid, but nothing new can be signed for
    // this node: probes must take it out of rotation.
    fleet.stop_replica(0).await;
    fleet.stop_replica(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        last = readyz(&a).await;
        if last.starts_with("HTTP/1.0 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        last.starts_with("HTTP/1.0 503") && last.contains("node SVID expired"),
        "{last}"
    );
}

/// Kubernetes before 1.30 put no node name in a bound token's TokenReview
/// `extra`: the authority then reads the pod and checks its UID. The real
/// API server these tests run (1.37, `tests/tests/kube.rs`) always names
/// the node, so this one fault is played by the fake API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_a_node_claim_are_resolved_through_the_pod() {
    use tessera_agent::fleet::kube::{KubeClient, ReviewError};
    let dir = tempfile::tempdir().unwrap();
    let api = api_server(dir.path()).await;
    let kube = KubeClient::new(kube_config(dir.path(), api.port, "tessera-authority")).unwrap();
    let b = kube.review_token("agent-token-b").await.unwrap();
    assert_eq!(b.node_name, "node-b", "node read from the bound pod");
    let err = kube.review_token("agent-token-stale").await.unwrap_err();
    assert!(
        matches!(&err, ReviewError::Rejected(m) if m.contains("replaced")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_ca_reaches_every_open_stream_before_it_signs() {
    use tokio_stream::StreamExt;
    let fleet = Fleet::start_with(
        "key_reload_interval = \"200ms\"\nca_publish_lead = \"3s\"\n",
        "x509_ttl = \"4s\"\n",
    )
    .await;
    let a = fleet.agent("node-a", None).await;
    let client = a.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let old_cas = tessera_tests::example_org_cas(&first);
    assert_eq!(old_cas.len(), 1);

    let name = tessera_agent::identity::key_files::add_ca(
        &td,
        &fleet.dir.path().join("keys"),
        Duration::from_secs(30 * 24 * 3600),
        SystemTime::now(),
    )
    .unwrap();
    let pem = std::fs::read(fleet.dir.path().join("keys").join(name)).unwrap();
    let new_ca = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&pem)
            .unwrap()
            .to_vec()
    };

    // Every update on the open stream: the SVID verifies (webpki) against a CA
    // of the bundle in the same update, and the new CA is in the bundle before
    // any SVID it signed arrives. Within the bound, one does.
    let mut new_ca_published = false;
    let mut signed_by_new = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !signed_by_new {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the new CA signs within lead + one renewal")
            .unwrap()
            .unwrap();
        let cas = tessera_tests::example_org_cas(&ctx);
        let leaf = ctx.default_svid().unwrap().cert_chain()[0]
            .as_ref()
            .to_vec();
        assert!(
            cas.iter().any(|ca| signed_by(&leaf, ca)),
            "an SVID arrived without its CA"
        );
        new_ca_published |= cas.contains(&new_ca);
        if signed_by(&leaf, &new_ca) {
            assert!(
                new_ca_published,
                "the new CA signed before it was published"
            );
            signed_by_new = true;
        }
    }
    assert!(
        cas_contains_old(&a, &old_cas[0]).await,
        "the old CA stays published"
    );
}

/// Whether the agent's current bundle still holds `ca`.
async fn cas_contains_old(agent: &TestAgent, ca: &[u8]) -> bool {
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let cas = ctx.bundle_set().get(&td).unwrap();
    cas.authorities().iter().any(|c| c.as_ref() == ca)
}

/// The fleet's store in the genuine kube-apiserver: the chart's
/// RevocationBatch CRD, a namespace with the authority's service account,
/// the chart's RBAC for it, and a token. Returns the `[server]` sub-tables.
async fn kube_store(dir: &Path) -> (String, String) {
    kube_store_on(KubeApi::shared(), dir).await
}

/// [`kube_store`] in `api` (a private server a test may restart).
async fn kube_store_on(api: &KubeApi, dir: &Path) -> (String, String) {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/tessera/crds/");
    let (ok, out, err) = api.kubectl(&["apply", "--server-side", "-f", crds], None);
    assert!(ok, "the chart's CRDs are refused: {out}{err}");
    let (ok, out, err) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/revocationbatches.tessera.dev",
            "crd/jointokens.tessera.dev",
            "crd/nodedenials.tessera.dev",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let ns = api.namespace("fleet", serde_json::json!({})).await;
    api.service_account(&ns, "tessera-authority").await;
    let rbac = [
        (
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "tessera-authority-store"},
              "rules": [{"apiGroups": ["tessera.dev"], "resources": ["revocationbatches"],
                         "verbs": ["create", "list", "watch", "deletecollection"]},
                        {"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"],
                         "verbs": ["create", "list", "watch", "delete"]},
                        {"apiGroups": ["tessera.dev"], "resources": ["jointokens"],
                         "verbs": ["get", "list", "delete"]},
                        {"apiGroups": ["tessera.dev"], "resources": ["nodedenials"],
                         "verbs": ["list", "watch"]}]}),
        ),
        (
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "tessera-authority-store"},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tessera-authority-store"},
              "subjects": [{"kind": "ServiceAccount", "name": "tessera-authority", "namespace": ns}]}),
        ),
    ];
    for (path, body) in rbac {
        api.create(&path, body).await;
    }
    // The API server's first write of a kind it has just established takes
    // about 2 s (measured: 2.01 s, then 5-10 ms); a cluster's CRD is there
    // long before its first revocation, so pay it here, not in the figures.
    let (status, answer) = api
        .request(
            http::Method::POST,
            &format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/revocationbatches"),
            Some(
                &serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "RevocationBatch",
              "metadata": {"generateName": "warm-up-"}, "spec": {"expires": 1, "entries": []}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let token = api.token(&ns, "tessera-authority", SA_ISSUER, None).await;
    let token_file = KubeApi::token_file(dir, "authority-token", &token);
    let tables = format!(
        "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{ns}:tessera-agent\"]\n\n[server.store]\nkind = \"kubernetes\"\nnamespace = \"{ns}\"\nbatch_window = \"20ms\"\n",
        api.url,
        api.ca_file.display(),
        token_file.display(),
    );
    (tables, ns)
}

/// Polls `refused` every 10 ms until it holds; how long that took.
async fn time_until(start: std::time::Instant, mut refused: impl AsyncFnMut() -> bool) -> Duration {
    loop {
        if refused().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still accepted 30 s after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Fleet-wide revocation with two authority replicas sharing their state
/// through RevocationBatch objects in the genuine kube-apiserver: a token
/// revoked on node A (or a task ended there) is refused by node B's
/// `/introspect` and by a token-guard pointed at node B; a token delegated
/// from it on node B follows its parent; nodes that start later (a
/// restarted one is the same: remote revocations live in memory) and both
/// replicas restarted still refuse them. The judge of what is stored is the
/// API server (what the objects hold, listed as an operator would).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_node_is_refused_on_every_node_through_the_kubernetes_api() {
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns) = kube_store(store_dir.path()).await;
    let mut fleet = Fleet::start_with(&tables, "").await;
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let guard = tessera_token_guard::TokenGuardLayer::builder()
        .issuer(ISSUER)
        .audience(NOTES)
        .exchange_socket(b.dir.path().join("sock/exchange.sock"))
        .introspection_cache_ttl(Duration::from_millis(500))
        .build()
        .unwrap();

    // Tokens are bound to the caller's X509-SVID: the guard sees it as the
    // client certificate of the connection (mTLS at the resource server).
    let svid_a = a.spiffe_client().await.fetch_x509_svid().await.unwrap();
    let peer = tessera_token_guard::PeerCertificate(svid_a.leaf().as_ref().to_vec());

    // Revoked on A, refused at B: timed from the end of A's answer.
    const SAMPLES: usize = 20;
    let (mut at_b, mut at_guard) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let token = exchange_token(&a).await;
        assert!(active_at(&b, &token).await, "A's token is active at B");
        guard
            .verify(&token, Some(&peer))
            .await
            .expect("the guard in front of B lets it through before");
        exchange_post(&a, "/revoke", &[("token", &token)]).await;
        let start = std::time::Instant::now();
        at_b.push(time_until(start, async || !active_at(&b, &token).await).await);
        at_guard.push(
            time_until(start, async || {
                guard.verify(&token, Some(&peer)).await.is_err()
            })
            .await,
        );
        assert!(!active_at(&a, &token).await);
    }
    at_b.sort();
    at_guard.sort();
    eprintln!(
        "revoked on A, refused by B's /introspect after: p50 {:?}, p99 {:?} (max of {SAMPLES}); \
         by a token-guard at B (introspection cache 500 ms): p50 {:?}, p99 {:?}",
        percentile(&at_b, 0.5),
        percentile(&at_b, 0.99),
        percentile(&at_guard, 0.5),
        percentile(&at_guard, 0.99),
    );

    // A task ended on A: every token of it is refused at B.
    let task_token = exchange(&a, &[("task_id", "report-42")]).await;
    assert!(active_at(&b, &task_token).await);
    exchange_post(&a, "/revoke", &[("task_id", "report-42")]).await;
    time_until(std::time::Instant::now(), async || {
        !active_at(&b, &task_token).await
    })
    .await;

    // A token delegated from another (here A's workload acts for itself:
    // the authority signs only subjects that run on the asking node) dies
    // with its parent everywhere, the parent revoked on A.
    let parent = exchange(
        &a,
        &[
            ("task_id", "deleg"),
            ("may_act", "spiffe://example.org/node-a/svc"),
        ],
    )
    .await;
    let actor = a.jwt_svid(ISSUER).await;
    let child = exchange_post(
        &a,
        "/token",
        &[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", &parent),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("actor_token", &actor),
            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", NOTES),
            ("scope", "notes:read"),
        ],
    )
    .await;
    assert!(
        active_at(&b, &child).await,
        "the delegated token is active at B"
    );
    exchange_post(&a, "/revoke", &[("token", &parent)]).await;
    time_until(std::time::Instant::now(), async || {
        !active_at(&b, &child).await
    })
    .await;

    // What the API server holds: batches, not one object per revocation.
    let (status, list) = KubeApi::shared()
        .request(
            http::Method::GET,
            &format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/revocationbatches"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let items = list["items"].as_array().unwrap();
    let entries: usize = items
        .iter()
        .map(|o| o["spec"]["entries"].as_array().unwrap().len())
        .sum();
    assert!(entries >= SAMPLES + 2, "{entries} stored: {list}");
    assert!(
        items
            .iter()
            .all(|o| o["spec"]["expires"].as_u64().unwrap() > 0)
    );

    // Both replicas restart (their memory is gone) and a node that joins
    // afterwards (what a restarted node is: remote revocations are kept in
    // memory) refuses everything before it reports ready.
    fleet.stop_replica(0).await;
    fleet.stop_replica(1).await;
    for i in 0..2 {
        let r = fleet.start_replica(i).await;
        fleet.replicas[i] = Some(r);
    }
    let c = fleet.agent("node-c", None).await;
    assert!(readyz(&c).await.contains("200 OK"), "{}", readyz(&c).await);
    assert!(!active_at(&c, &task_token).await, "the ended task");
    assert!(!active_at(&c, &child).await, "the delegated token");
    assert!(!active_at(&c, &parent).await, "the revoked parent");
    let live = exchange_token(&a).await;
    assert!(active_at(&c, &live).await, "a live token stays active");

    // The authorities audited who handed the revocations over.
    let audit = fleet.audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "fleet.revocations" && r["node"] == "node-a"),
        "no fleet.revocations record from node-a"
    );
}

/// The revocation watch and writes across an API-server outage, in a
/// private genuine kube-apiserver that is stopped and started again: a token
/// revoked on node A while the API server is down is refused at A at once
/// and at node B once it is back (A kept handing it over, a replica stored
/// it: nothing is lost); one revoked after the restart reaches B too (the
/// replicas' watches resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_survive_an_api_server_restart() {
    let api = Arc::new(tokio::task::spawn_blocking(KubeApi::start).await.unwrap());
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, _ns) = kube_store_on(&api, store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let before = exchange_token(&a).await;
    exchange_post(&a, "/revoke", &[("token", &before)]).await;
    time_until(std::time::Instant::now(), async || {
        !active_at(&b, &before).await
    })
    .await;

    let during = exchange_token(&a).await;
    assert!(active_at(&b, &during).await);
    let down = api.clone();
    tokio::task::spawn_blocking(move || down.stop_apiserver())
        .await
        .unwrap();
    exchange_post(&a, "/revoke", &[("token", &during)]).await;
    assert!(!active_at(&a, &during).await, "refused on A at once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let up = api.clone();
    tokio::task::spawn_blocking(move || up.start_apiserver())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let took = time_until(start, async || !active_at(&b, &during).await).await;
    eprintln!(
        "revoked on A while the API server was down: refused at B {took:?} after it was back"
    );

    let after = exchange_token(&a).await;
    assert!(active_at(&b, &after).await);
    exchange_post(&a, "/revoke", &[("token", &after)]).await;
    let took = time_until(std::time::Instant::now(), async || {
        !active_at(&b, &after).await
    })
    .await;
    eprintln!("revoked on A after the restart: refused at B after {took:?}");
    assert!(!active_at(&b, &before).await, "still refused");
    drop(fleet);
}

/// Requests the API server has answered for `revocationbatches`, by verb,
/// from its own `apiserver_request_total`.
async fn apiserver_requests(api: &KubeApi) -> std::collections::BTreeMap<String, f64> {
    let (ok, text, err) = api.kubectl(&["get", "--raw", "/metrics"], None);
    assert!(ok, "{err}");
    let mut by_verb = std::collections::BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with("apiserver_request_total{")
            || !line.contains("resource=\"revocationbatches\"")
        {
            continue;
        }
        let verb = line
            .split("verb=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_string();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(verb).or_insert(0.0) += value;
    }
    by_verb
}

/// A node without a Workload API: attested with a join token, publishing
/// what its revocation state revokes and following the fleet's, in memory.
struct SimulatedNode {
    store: Arc<tessera_agent::revocation::RevocationStore>,
    metrics: Arc<tessera_agent::metrics::Metrics>,
    _dir: tempfile::TempDir,
}

async fn simulated_node(
    fleet: &Fleet,
    name: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> SimulatedNode {
    use tessera_agent::fleet::client::{NodeAttestation, Upstream, UpstreamConfig};
    let dir = tempfile::tempdir().unwrap();
    let token = tessera_agent::fleet::join::create(
        &fleet.dir.path().join("join"),
        name,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    std::fs::write(dir.path().join("join-token"), token).unwrap();
    let config = UpstreamConfig {
        addresses: fleet
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect(),
        server_name: "tessera-authority".into(),
        bundle_file: fleet.dir.path().join("keys/ca.crt"),
        attestation: NodeAttestation::JoinToken,
        token_file: dir.path().join("join-token"),
        bundle_refresh: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        state_dir: dir.path().to_path_buf(),
    };
    let metrics = Arc::new(tessera_agent::metrics::Metrics::new());
    let up = Upstream::connect(
        config,
        spiffe::TrustDomain::new("example.org").unwrap(),
        Arc::new(tessera_agent::clock::SystemClock),
        metrics.clone(),
        shutdown,
    )
    .await
    .unwrap();
    let store = Arc::new(
        tessera_agent::revocation::RevocationStore::open(None, SystemTime::now()).unwrap(),
    );
    let mut synced =
        tessera_agent::fleet::follow::start(up, store.clone(), metrics.clone(), shutdown.clone());
    synced.wait_for(|s| *s).await.unwrap();
    SimulatedNode {
        store,
        metrics,
        _dir: dir,
    }
}

/// Time from a revocation on `nodes[from]` until every node has it.
async fn until_everywhere(
    nodes: Arc<Vec<Arc<SimulatedNode>>>,
    from: usize,
    jti: String,
) -> Duration {
    let until = SystemTime::now() + Duration::from_secs(600);
    let start = std::time::Instant::now();
    nodes[from].store.revoke_token(&jti, until).unwrap();
    loop {
        let now = SystemTime::now();
        if nodes.iter().all(|n| n.store.is_token_revoked(&jti, now)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{jti} never reached every node"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// BENCHMARKS.md, "Fleet-wide revocation": propagation from one node to
/// every node at 10 and 100 simulated nodes (idle, and under 1,000
/// revocations per second), and what that load costs the API server, as
/// counted by the API server itself (`apiserver_request_total`).
///
/// `cargo test -p tessera-tests --test fleet -- --ignored --nocapture fleet_revocation_bench`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark (figures in BENCHMARKS.md); run with --ignored"]
async fn fleet_revocation_bench() {
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, _ns) = kube_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let api = KubeApi::shared();
    revocation_bench(
        &fleet,
        "API server requests for revocationbatches",
        async || apiserver_requests(api).await,
    )
    .await;
}

/// Propagation at 10 and 100 simulated nodes, idle and under 1,000
/// revocations per second, and what the store was asked per 1,000
/// revocations per second (`requests`: the store's own counts, by kind).
async fn revocation_bench(
    fleet: &Fleet,
    what: &str,
    requests: impl AsyncFn() -> std::collections::BTreeMap<String, f64>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut nodes = Vec::new();
    println!("| nodes | load | samples | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for target in [10usize, 100] {
        while nodes.len() < target {
            let name = format!("sim-{}", nodes.len());
            nodes.push(Arc::new(simulated_node(fleet, &name, &shutdown).await));
        }
        let current = Arc::new(nodes.clone());
        // Idle: one revocation at a time.
        let mut idle = Vec::new();
        for s in 0..50 {
            idle.push(
                until_everywhere(current.clone(), s % target, format!("idle-{target}-{s}")).await,
            );
        }
        report(target, "idle", &mut idle);

        // Under load: 1,000 revocations per second for 5 s, spread over the
        // nodes; every 50th is timed until it is everywhere.
        let before = requests().await;
        let started = std::time::Instant::now();
        let mut timed = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let until = SystemTime::now() + Duration::from_secs(600);
        let mut n = 0usize;
        for _ in 0..500 {
            tick.tick().await;
            for _ in 0..10 {
                let jti = format!("load-{target}-{n}");
                if n.is_multiple_of(50) {
                    // Spawned: timing must not slow the load down.
                    timed.push(tokio::spawn(until_everywhere(
                        current.clone(),
                        n % target,
                        jti,
                    )));
                } else {
                    current[n % target].store.revoke_token(&jti, until).unwrap();
                }
                n += 1;
            }
        }
        let mut under_load = Vec::new();
        for t in timed {
            under_load.push(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        let after = requests().await;
        report(target, "1,000/s", &mut under_load);
        let rate = n as f64 / elapsed.as_secs_f64();
        let per_kind: Vec<String> = after
            .iter()
            .map(|(verb, v)| {
                let d = v - before.get(verb).copied().unwrap_or(0.0);
                format!("{verb} {:.1}/s", d / elapsed.as_secs_f64() * 1000.0 / rate)
            })
            .collect();
        println!(
            "{what} per 1,000 revocations/s ({target} nodes, {rate:.0} revocations/s over {elapsed:.1?}): {}",
            per_kind.join(", ")
        );
    }
    shutdown.cancel();
}

fn report(nodes: usize, load: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "| {nodes} | {load} | {} | {:.0?} | {:.0?} | {:.0?} |",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1]
    );
}

/// Live registration in a private genuine kube-apiserver (it is restarted
/// mid-test): the chart's ClusterWorkloadEntry and WorkloadEntry CRDs, the
/// authority's service account with the chart's rules for them (list and
/// watch, patch on the status subresource), and a token. Returns the
/// `[server]` sub-tables and the namespace.
async fn registration_cluster(api: &KubeApi, dir: &Path) -> (String, String) {
    for crd in ["clusterworkloadentries", "workloadentries"] {
        let file = format!(
            "{}/../helm/tessera/crds/{crd}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let (ok, out, err) = api.kubectl(&["apply", "--server-side", "-f", &file], None);
        assert!(ok, "the chart's CRD is refused: {out}{err}");
        let (ok, out, err) = api.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}.tessera.dev"),
            ],
            None,
        );
        assert!(ok, "{out}{err}");
    }
    let ns = api.namespace("reg", serde_json::json!({})).await;
    api.service_account(&ns, "tessera-authority").await;
    // The API server's first write of a kind it has just established takes
    // about 2 s; a cluster's CRDs are there long before its first entry, so
    // pay it here, not in the figures.
    for (path, kind) in [
        (
            "/apis/tessera.dev/v1alpha1/clusterworkloadentries".to_string(),
            "ClusterWorkloadEntry",
        ),
        (
            format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/workloadentries"),
            "WorkloadEntry",
        ),
    ] {
        let body = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": kind,
          "metadata": {"name": "warm-up"}, "spec": {"spiffeId": "spiffe://example.org/warm-up"}});
        api.create(&path, body).await;
        let (status, answer) = api
            .request(http::Method::DELETE, &format!("{path}/warm-up"), None)
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
          "metadata": {"name": "tessera-authority-registration"},
          "rules": [
            {"apiGroups": ["tessera.dev"], "resources": ["clusterworkloadentries", "workloadentries"], "verbs": ["list", "watch"]},
            {"apiGroups": ["tessera.dev"], "resources": ["clusterworkloadentries/status", "workloadentries/status"], "verbs": ["patch"]}]}),
    )
    .await;
    api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
          "metadata": {"name": "tessera-authority-registration"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tessera-authority-registration"},
          "subjects": [{"kind": "ServiceAccount", "name": "tessera-authority", "namespace": ns}]}),
    )
    .await;
    let token = api.token(&ns, "tessera-authority", SA_ISSUER, None).await;
    let token_file = KubeApi::token_file(dir, "authority-token", &token);
    let tables = format!(
        "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{ns}:tessera-agent\"]\n\n[server.registration]\nkind = \"kubernetes\"\n",
        api.url,
        api.ca_file.display(),
        token_file.display(),
    );
    (tables, ns)
}

/// The SPIFFE IDs in one X.509 context the `spiffe` crate parsed.
fn ids_of(ctx: &spiffe::X509Context) -> Vec<String> {
    ctx.svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect()
}

/// Reads the workload's open stream until `done` holds for a context it
/// delivers; how long that took from `start`.
async fn until_streamed(
    stream: &mut (
             impl tokio_stream::Stream<
        Item = Result<spiffe::X509Context, spiffe::workload_api::WorkloadApiError>,
    > + Unpin
         ),
    start: std::time::Instant,
    mut done: impl FnMut(&[String]) -> bool,
) -> Duration {
    use tokio_stream::StreamExt;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("no update on the Workload API stream within 30 s")
            .expect("the stream ended")
            .expect("a valid X.509 context");
        if done(&ids_of(&next)) {
            return start.elapsed();
        }
    }
}

/// Polls the object at `path` until its Ready condition has `reason`;
/// returns the condition.
async fn ready_condition(api: &KubeApi, path: &str, reason: &str) -> Value {
    for _ in 0..150 {
        let (status, obj) = api.request(http::Method::GET, path, None).await;
        assert_eq!(status, 200, "{obj}");
        if let Some(c) = obj["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            && c["reason"] == reason
            && c["observedGeneration"] == obj["metadata"]["generation"]
        {
            return c.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} never got a Ready condition with reason {reason}");
}

/// Entries as custom resources in the genuine kube-apiserver, watched by two
/// authority replicas: a ClusterWorkloadEntry created for a running
/// workload reaches its open Workload API stream (judged by the `spiffe`
/// crate) and a deleted one is withdrawn from it; an invalid object gets a
/// status condition naming the field and the previous version stays in
/// force; a team's WorkloadEntry cannot name another namespace's identity;
/// the watch survives an API-server restart; config-file entries keep
/// working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_as_custom_resources_reach_a_running_workload_through_the_kubernetes_api() {
    let api = Arc::new(tokio::task::spawn_blocking(KubeApi::start).await.unwrap());
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns) = registration_cluster(&api, store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let a = fleet.agent("node-a", None).await;
    let base = "spiffe://example.org/node-a/svc".to_string();
    let client = a.spiffe_client().await;
    let mut stream = Box::pin(client.stream_x509_contexts().await.unwrap());
    until_streamed(&mut stream, std::time::Instant::now(), |ids| {
        ids == [base.clone()]
    })
    .await;

    let collection = "/apis/tessera.dev/v1alpha1/clusterworkloadentries";
    let entry = |name: &str, id: &str, selectors: Value| {
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "ClusterWorkloadEntry",
          "metadata": {"name": name}, "spec": {"spiffeId": id, "selectors": selectors}})
    };
    let selectors = serde_json::json!(["tessera:node:node-a", format!("unix:uid:{}", my_uid())]);

    // Created -> on the open stream; deleted -> gone from it. Timed from
    // the API server's answer to the create (or delete).
    const SAMPLES: usize = 10;
    let (mut added, mut withdrawn) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let id = format!("spiffe://example.org/node-a/live-{i}");
        let name = format!("live-{i}");
        let body = entry(&name, &id, selectors.clone());
        let start = std::time::Instant::now();
        api.create(collection, body).await;
        added.push(until_streamed(&mut stream, start, |ids| ids.contains(&id)).await);
        let (status, answer) = api
            .request(http::Method::DELETE, &format!("{collection}/{name}"), None)
            .await;
        assert_eq!(status, 200, "{answer}");
        let start = std::time::Instant::now();
        withdrawn.push(
            until_streamed(&mut stream, start, |ids| {
                !ids.contains(&id) && ids.contains(&base)
            })
            .await,
        );
    }
    added.sort();
    withdrawn.sort();
    eprintln!(
        "ClusterWorkloadEntry created -> SVID on the workload's open stream: p50 {:?}, max {:?}; deleted -> withdrawn: p50 {:?}, max {:?} ({SAMPLES} samples)",
        percentile(&added, 0.5),
        percentile(&added, 1.0),
        percentile(&withdrawn, 0.5),
        percentile(&withdrawn, 1.0),
    );

    // Accepted, then changed into something invalid: the condition names
    // the field, and the accepted version stays in force.
    let kept = "spiffe://example.org/node-a/kept";
    api.create(collection, entry("kept", kept, selectors.clone()))
        .await;
    until_streamed(&mut stream, std::time::Instant::now(), |ids| {
        ids.iter().any(|i| i == kept)
    })
    .await;
    let path = format!("{collection}/kept");
    let c = ready_condition(&api, &path, "Accepted").await;
    assert_eq!(c["status"], "True", "{c}");
    let (status, answer) = api
        .request_as(
            &api.admin_token,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&serde_json::json!({"spec": {"spiffeId": "spiffe://other.org/x"}})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let c = ready_condition(&api, &path, "Invalid").await;
    assert_eq!(c["status"], "False", "{c}");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.spiffeId: "),
        "{c}"
    );
    // A new object that can never be in force: only node-local selectors.
    api.create(
        collection,
        entry(
            "unverifiable",
            "spiffe://example.org/node-a/unverifiable",
            serde_json::json!([format!("unix:uid:{}", my_uid())]),
        ),
    )
    .await;
    let c = ready_condition(&api, &format!("{collection}/unverifiable"), "Invalid").await;
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.selectors: "),
        "{c}"
    );
    let ctx = client.fetch_x509_context().await.unwrap();
    let ids = ids_of(&ctx);
    assert!(
        ids.contains(&kept.to_string()),
        "previous version kept: {ids:?}"
    );
    assert!(
        ids.contains(&base),
        "config-file entries still work: {ids:?}"
    );
    assert!(!ids.iter().any(|i| i.contains("unverifiable")), "{ids:?}");

    // A team's WorkloadEntry: IDs of its own namespace only.
    let team = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/workloadentries");
    let team_entry = |name: &str, id: &str| {
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkloadEntry",
          "metadata": {"name": name}, "spec": {"spiffeId": id, "selectors": ["k8s:sa:web"]}})
    };
    api.create(
        &team,
        team_entry("web", &format!("spiffe://example.org/ns/{ns}/sa/web")),
    )
    .await;
    api.create(
        &team,
        team_entry("steal", "spiffe://example.org/ns/kube-system/sa/admin"),
    )
    .await;
    ready_condition(&api, &format!("{team}/web"), "Accepted").await;
    let c = ready_condition(&api, &format!("{team}/steal"), "Invalid").await;
    assert!(
        c["message"].as_str().unwrap().contains("spec.spiffeId")
            && c["message"].as_str().unwrap().contains("own namespace"),
        "{c}"
    );

    // An entry naming node B is sent to node B only: each node's own
    // `/v1/entries` stream (opened with its node SVID) is read as it
    // arrives, after a change every node sees.
    let for_b = "spiffe://example.org/node-b/only";
    api.create(
        collection,
        entry(
            "for-b",
            for_b,
            serde_json::json!(["tessera:node:node-b", format!("unix:uid:{}", my_uid())]),
        ),
    )
    .await;
    let everywhere = "spiffe://example.org/ns/{k8s:ns}/everywhere";
    api.create(
        collection,
        entry("everywhere", everywhere, serde_json::json!(["k8s:ns"])),
    )
    .await;
    let seen_by = |node: &'static str| {
        let fleet = &fleet;
        async move {
            let docs = live_entries_streamed_to(fleet, node, |docs| {
                docs.iter().any(|d| d["spiffe_id"] == everywhere)
            })
            .await;
            docs.iter()
                .map(|d| d["spiffe_id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let (on_a, on_b) = (seen_by("node-a").await, seen_by("node-b").await);
    assert!(
        !on_a.iter().any(|i| i == for_b),
        "node A got node B's entry: {on_a:?}"
    );
    assert!(on_b.iter().any(|i| i == for_b), "{on_b:?}");
    assert!(on_a.iter().any(|i| i == kept), "{on_a:?}");

    // The API server restarts, and while it is down an entry is deleted
    // behind its back (directly in etcd) and etcd's history compacted: the
    // replicas' watches cannot resume from the version they saw (410 Gone),
    // so they list again, and the entry they never saw deleted is withdrawn.
    // An entry created afterwards still reaches the stream.
    let restart = api.clone();
    let (deleted, revision) = tokio::task::spawn_blocking(move || {
        restart.stop_apiserver();
        let deleted = restart.etcd_delete("/registry/tessera.dev/clusterworkloadentries/kept");
        let revision = restart.compact_etcd();
        restart.start_apiserver();
        (deleted, revision)
    })
    .await
    .unwrap();
    assert!(deleted, "the kept entry was in etcd");
    let start = std::time::Instant::now();
    let took = until_streamed(&mut stream, start, |ids| !ids.iter().any(|i| i == kept)).await;
    eprintln!(
        "etcd compacted at revision {revision}, API server back: the entry deleted behind its back withdrawn {took:?} after it answered"
    );
    let after = "spiffe://example.org/node-a/after-restart";
    let start = std::time::Instant::now();
    api.create(collection, entry("after-restart", after, selectors.clone()))
        .await;
    let took = until_streamed(&mut stream, start, |ids| ids.iter().any(|i| i == after)).await;
    eprintln!("after an API-server restart: created -> on the stream in {took:?}");
    drop(stream);
    drop(a);
    drop(fleet);
}

/// The live entries the authority streams to `node` (attested afresh with
/// a join token, its own `/v1/entries` stream read as the agent reads it),
/// once `done` holds for the set.
async fn live_entries_streamed_to(
    fleet: &Fleet,
    node: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    use tessera_agent::fleet::client::{NodeAttestation, Upstream, UpstreamConfig};
    let state = tempfile::tempdir().unwrap();
    let token = tessera_agent::fleet::join::create(
        &fleet.dir.path().join("join"),
        node,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    let token_file = state.path().join("join-token");
    std::fs::write(&token_file, token).unwrap();
    let config = UpstreamConfig {
        addresses: vec![format!("127.0.0.1:{}", fleet.ports[0])],
        server_name: "tessera-authority".into(),
        bundle_file: fleet.dir.path().join("keys/ca.crt"),
        attestation: NodeAttestation::JoinToken,
        token_file,
        bundle_refresh: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        state_dir: state.path().to_path_buf(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let up = Upstream::connect(
        config,
        spiffe::TrustDomain::new("example.org").unwrap(),
        Arc::new(tessera_agent::clock::SystemClock),
        Arc::new(tessera_agent::metrics::Metrics::new()),
        &shutdown,
    )
    .await
    .unwrap();
    let mut stream = up.open_stream("/v1/entries").await.unwrap();
    let docs = loop {
        let event: Value = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("an entries event within 30 s")
            .expect("the stream ended")
            .unwrap();
        if let Some(docs) = event["entries"].as_array()
            && done(docs)
        {
            break docs.clone();
        }
    };
    shutdown.cancel();
    docs
}

/// An agent for `node` that talks to one replica only (`port`), attested
/// with a fresh join token from the shared directory.
async fn agent_on_replica(fleet: &Fleet, node: &str, port: u16) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let token = tessera_agent::fleet::join::create(
        &fleet.dir.path().join("join"),
        node,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    std::fs::write(dir.path().join("join-token"), token).unwrap();
    let body = format!(
        "{}\n[upstream]\naddresses = [\"127.0.0.1:{port}\"]\nbundle_file = \"{k}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{a}/join-token\"\nbundle_refresh = \"200ms\"\nrequest_timeout = \"2s\"\n",
        entries_with(""),
        k = fleet.dir.path().display(),
        a = dir.path().display(),
    );
    TestAgent::start_in(dir, &body).await
}

/// Whether the agent gets a JWT-SVID signed now (a fresh audience each
/// time, so it asks its replica), judged by the `spiffe` crate.
async fn signs(agent: &TestAgent) -> bool {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let aud = format!(
        "probe-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    agent
        .spiffe_client()
        .await
        .fetch_jwt_svid([aud.as_str()], None)
        .await
        .is_ok()
}

/// The serial number (hex) of the node SVID an agent saved, read with
/// x509-parser.
fn node_svid_serial(agent: &TestAgent) -> String {
    use base64::Engine;
    let saved: Value = serde_json::from_slice(
        &std::fs::read(agent.dir.path().join("data/node-svid.json")).unwrap(),
    )
    .unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(saved["cert"].as_str().unwrap())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex.trim_start_matches('0').to_string()
}

/// Attests a node with the join token in `token_file` at the replica on
/// `port` only; its node ID, or why not.
async fn attest_once(
    bundle_file: std::path::PathBuf,
    port: u16,
    token_file: std::path::PathBuf,
) -> Result<String, String> {
    use tessera_agent::fleet::client::{NodeAttestation, Upstream, UpstreamConfig};
    let state = tempfile::tempdir().unwrap();
    let config = UpstreamConfig {
        addresses: vec![format!("127.0.0.1:{port}")],
        server_name: "tessera-authority".into(),
        bundle_file,
        attestation: NodeAttestation::JoinToken,
        token_file,
        bundle_refresh: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        state_dir: state.path().to_path_buf(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let up = Upstream::connect(
        config,
        spiffe::TrustDomain::new("example.org").unwrap(),
        Arc::new(tessera_agent::clock::SystemClock),
        Arc::new(tessera_agent::metrics::Metrics::new()),
        &shutdown,
    )
    .await;
    shutdown.cancel();
    up.map(|u| u.node_id().to_string())
        .map_err(|e| format!("{e:#}"))
}

/// Node control in the genuine kube-apiserver with two replicas: a join
/// token kept as a JoinToken object, redeemed on both replicas at the same
/// instant, succeeds exactly once (ten rounds) and its object is gone; a
/// NodeDenial for one node SVID cuts off that certificate only, and one for
/// the node's name is enforced by both replicas at once (each node talks to
/// one replica) and refuses a fresh attestation under that name, until it
/// is deleted. The judge of what is stored is the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_is_redeemed_once_across_replicas_and_a_denied_node_is_refused_by_both() {
    let api = KubeApi::shared();
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns) = kube_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let tokens = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/jointokens");
    let bundle = fleet.dir.path().join("keys/ca.crt");
    let attest = |port: u16, file: std::path::PathBuf| attest_once(bundle.clone(), port, file);

    for round in 0..10 {
        let token = tessera_agent::fleet::join::new_token().unwrap();
        let node = format!("race-{round}");
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let object = tessera_agent::fleet::nodes::join_token_object(&token, &node, expires);
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        api.create(&tokens, object).await;
        let file = store_dir.path().join(format!("token-{round}"));
        std::fs::write(&file, &token).unwrap();
        let (a, b) = tokio::join!(
            attest(fleet.ports[0], file.clone()),
            attest(fleet.ports[1], file.clone())
        );
        let won: Vec<&String> = [&a, &b]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {a:?} / {b:?}");
        assert_eq!(
            won[0],
            &format!("spiffe://example.org/tessera/node/join/{node}")
        );
        let lost = [&a, &b].into_iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(lost.contains("unknown or already used"), "{lost}");
        let (status, _) = api
            .request(http::Method::GET, &format!("{tokens}/{name}"), None)
            .await;
        assert_eq!(status, 404, "the redeemed token's object is deleted");
    }
    // Expired tokens nobody redeems are deleted by the replicas' collector
    // (run here directly; replicas run it once a minute), live ones kept.
    {
        let kube =
            tessera_agent::fleet::kube::KubeClient::new(tessera_agent::fleet::kube::KubeConfig {
                api_server: api.url.clone(),
                ca_file: api.ca_file.clone(),
                token_file: store_dir.path().join("authority-token"),
                audience: "tessera-authority".into(),
                allowed_service_accounts: vec![format!("{ns}:tessera-agent")],
                pod_cache_ttl: Duration::from_secs(2),
                timeout: Duration::from_secs(10),
            })
            .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let control = tessera_agent::fleet::nodes::NodeControl::start(
            Arc::new(kube),
            ns.clone(),
            Arc::new(tessera_agent::clock::SystemClock),
            shutdown.clone(),
        );
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let stale = tessera_agent::fleet::nodes::join_token_object("stale", "vm-old", now - 1);
        let live = tessera_agent::fleet::nodes::join_token_object("live", "vm-new", now + 600);
        let (stale_name, live_name) = (
            stale["metadata"]["name"].as_str().unwrap().to_string(),
            live["metadata"]["name"].as_str().unwrap().to_string(),
        );
        api.create(&tokens, stale).await;
        api.create(&tokens, live).await;
        assert_eq!(control.collect_expired(now).await.unwrap(), 1);
        let (status, _) = api
            .request(http::Method::GET, &format!("{tokens}/{stale_name}"), None)
            .await;
        assert_eq!(status, 404, "the expired token is deleted");
        let (status, _) = api
            .request(http::Method::GET, &format!("{tokens}/{live_name}"), None)
            .await;
        assert_eq!(status, 200, "the live one is kept");
        shutdown.cancel();
    }

    // An expired token is refused (and its object deleted).
    let token = tessera_agent::fleet::join::new_token().unwrap();
    api.create(
        &tokens,
        tessera_agent::fleet::nodes::join_token_object(&token, "late", 1),
    )
    .await;
    let file = store_dir.path().join("token-late");
    std::fs::write(&file, &token).unwrap();
    let err = attest(fleet.ports[0], file).await.unwrap_err();
    assert!(err.contains("expired"), "{err}");

    // Two agents of node-a, each attached to one replica.
    let on_0 = agent_on_replica(&fleet, "node-a", fleet.ports[0]).await;
    let on_1 = agent_on_replica(&fleet, "node-a", fleet.ports[1]).await;
    assert!(signs(&on_0).await && signs(&on_1).await);
    let denials = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/nodedenials");

    // One node SVID denied: that certificate only.
    let serial = node_svid_serial(&on_0);
    api.create(
        &denials,
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "NodeDenial",
          "metadata": {"name": "stolen-svid"}, "spec": {"svidSerial": serial, "reason": "key leaked"}}),
    )
    .await;
    let start = std::time::Instant::now();
    let took = time_until(start, async || !signs(&on_0).await).await;
    assert!(signs(&on_1).await, "the node's other SVID is not denied");
    eprintln!("a NodeDenial by node SVID serial refused after {took:?}");

    // The node evicted by name: both replicas refuse it at once.
    let (status, _) = api
        .request(
            http::Method::DELETE,
            &format!("{denials}/stolen-svid"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    time_until(std::time::Instant::now(), async || signs(&on_0).await).await;
    api.create(
        &denials,
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "NodeDenial",
          "metadata": {"name": "evict-node-a"}, "spec": {"nodeName": "node-a", "reason": "decommissioned"}}),
    )
    .await;
    let start = std::time::Instant::now();
    let (t0, t1) = tokio::join!(
        time_until(start, async || !signs(&on_0).await),
        time_until(start, async || !signs(&on_1).await)
    );
    eprintln!("node-a evicted: refused by replica 0 after {t0:?}, by replica 1 after {t1:?}");
    // A fresh attestation under the evicted name is refused too.
    let token = tessera_agent::fleet::join::new_token().unwrap();
    let expires = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    api.create(
        &tokens,
        tessera_agent::fleet::nodes::join_token_object(&token, "node-a", expires),
    )
    .await;
    let file = store_dir.path().join("token-evicted");
    std::fs::write(&file, &token).unwrap();
    let err = attest(fleet.ports[1], file).await.unwrap_err();
    assert!(err.contains("denied"), "{err}");
    // Other nodes are untouched.
    let b = agent_on_replica(&fleet, "node-b", fleet.ports[0]).await;
    assert!(signs(&b).await);
    // An evicted node's open stream of the fleet's revocations ends at
    // once (and reopening it is refused).
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sim = simulated_node(&fleet, "node-s", &shutdown).await;
    assert_eq!(sim.metrics.fleet_stream_connected.get(), 1);
    let start = std::time::Instant::now();
    api.create(
        &denials,
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "NodeDenial",
          "metadata": {"name": "evict-node-s"}, "spec": {"nodeName": "node-s"}}),
    )
    .await;
    let took = time_until(start, async || {
        sim.metrics.fleet_stream_connected.get() == 0
    })
    .await;
    eprintln!("an evicted node's revocation stream ended {took:?} after the NodeDenial was sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.metrics.fleet_stream_connected.get(), 0, "reopened");
    shutdown.cancel();

    // Lifted: served again.
    let (status, _) = api
        .request(
            http::Method::DELETE,
            &format!("{denials}/evict-node-a"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    time_until(std::time::Instant::now(), async || signs(&on_1).await).await;
    let audit = fleet.audit_records();
    assert!(
        audit.iter().any(|r| r["event"] == "refused"
            && r["node"] == "node-a"
            && r["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("evict-node-a")),
        "the eviction's refusals are audited"
    );
}

/// A fleet node's JWT-SVIDs carry the authority's issuer, not the node's own
/// HTTPS face: an assertion for a token service (an https:// audience) must
/// still be new on every fetch, since the token endpoint accepts each `jti`
/// once. It used to be cached (the rule matched only the SVID's own `iss`),
/// and a client's second token request was refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_jwt_svids_for_a_token_service_are_never_reused() {
    use base64::Engine as _;
    let fleet = Fleet::start_with("https-face", "").await;
    let a = fleet.agent("node-a", None).await;
    let token_service = "https://node-a.example:8443";
    let first = a.jwt_svid(token_service).await;
    let claims = |t: &str| -> Value {
        let payload = t.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_ne!(
        claims(&first)["iss"].as_str(),
        Some(token_service),
        "signed by the authority, whose issuer is not the node's"
    );
    let second = a.jwt_svid(token_service).await;
    assert_ne!(claims(&first)["jti"], claims(&second)["jti"]);
    // Other audiences are still reused for half their life.
    assert_eq!(
        a.jwt_svid("sts.example.com").await,
        a.jwt_svid("sts.example.com").await
    );
}

/// The fleet's store in the genuine kube-apiserver ([`kube_store`]) with
/// fleet-wide approvals: the chart's admission policy for ApprovalRequests
/// (rendered by Helm, in force once it refuses a forged decision), and an
/// operator service account with exactly the rights the docs tell kubectl
/// operators to get. Returns the `[server]` sub-tables, the namespace, the
/// operator's token and Kubernetes user name.
async fn approvals_store(dir: &Path) -> (String, String, String, String) {
    let api = KubeApi::shared();
    let (tables, ns) = kube_store(dir).await;
    let tables = tables.replace("[server.store]\n", "[server.store]\napprovals = true\n");
    let ns = ns.as_str();
    // The chart's admission policy for this namespace, rendered by Helm.
    let release = format!("appr{}", ns.rsplit('-').next().unwrap());
    // Named so the policy's authority is the service account kube_store
    // made; the policy and binding are cluster-scoped, so each test's pair
    // gets a name of its own.
    let mut list = tessera_tests::kube::render_chart(
        &release,
        ns,
        &serde_json::json!({"fullnameOverride": "tessera",
                            "authority": {"enabled": true, "keysSecret": "k", "bundleConfigMap": "b",
                                          "approvals": {"enabled": true}}}),
    );
    for item in list["items"].as_array_mut().unwrap() {
        if item["kind"]
            .as_str()
            .unwrap()
            .starts_with("ValidatingAdmissionPolicy")
        {
            item["metadata"]["name"] = format!("{release}-approvals").into();
            if item["kind"] == "ValidatingAdmissionPolicyBinding" {
                item["spec"]["policyName"] = format!("{release}-approvals").into();
            }
        }
    }
    let vap: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            i["kind"]
                .as_str()
                .unwrap()
                .starts_with("ValidatingAdmissionPolicy")
        })
        .collect();
    assert_eq!(vap.len(), 2, "policy and binding rendered");
    let (ok, out, err) = api.kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": vap}).to_string()),
    );
    assert!(ok, "{out}{err}");
    // An operator with exactly the rights the docs tell operators to get.
    api.service_account(ns, "operator").await;
    let role = serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "approvers"},
        "rules": [{"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"], "verbs": ["get", "list", "patch"]}]});
    api.create(
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
        role,
    )
    .await;
    api.create(
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": {"name": "approvers"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approvers"},
          "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]}),
    )
    .await;
    // What the chart grants the authority with `authority.operators`.
    api.create(
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tessera-authority-operators"},
            "rules": [{"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"], "verbs": ["get", "patch"]}]}),
    )
    .await;
    api.create(
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": {"name": "tessera-authority-operators"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tessera-authority-operators"},
          "subjects": [{"kind": "ServiceAccount", "name": "tessera-authority", "namespace": ns}]}),
    )
    .await;
    let operator = api.token(ns, "operator", SA_ISSUER, None).await;
    let operator_user = format!("system:serviceaccount:{ns}:operator");
    // The API server takes the new policy up asynchronously: wait until it
    // refuses a forged decision on a probe object.
    let probes = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests");
    let mut enforced = false;
    for i in 0..60 {
        let name = format!("probe-{i}");
        api.create(&probes, serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": name}, "spec": {"node": "probe", "approvalId": "probe", "deadline": 1}}))
            .await;
        let (status, _) = api
            .request_as(
                &operator,
                http::Method::PATCH,
                &format!("{probes}/{name}"),
                "application/merge-patch+json",
                Some(&serde_json::json!({"spec": {"decision": "approved", "decidedBy": "alice"}})),
            )
            .await;
        if status == 403 {
            enforced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        enforced,
        "the chart's ValidatingAdmissionPolicy never took effect"
    );

    (tables, ns.to_string(), operator, operator_user)
}

/// Fleet-wide approvals against the genuine kube-apiserver with two
/// replicas: an exchange that policy sends for approval on node A appears as
/// an ApprovalRequest object; an operator approves it with a patch as
/// kubectl sends it (their own user name as decidedBy, which the chart's
/// ValidatingAdmissionPolicy checks: a forged name and a second decision are
/// refused by the API server); node A redeems it; the node's audit log holds
/// one decision record naming the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_waiting_on_a_node_is_decided_with_kubectl_and_redeemed_there() {
    let api = KubeApi::shared();
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns, operator, operator_user) = approvals_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let a = fleet
        .agent_with_policy(
            "node-a",
            None,
            &format!("@id(\"write-needs-approval\")\n@require_approval\npermit(principal, action == Tessera::Action::\"notes:write\", resource == Tessera::Audience::\"{NOTES}\");\n"),
        )
        .await;
    let subject = a.jwt_svid(ISSUER).await;
    let fields = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", NOTES),
        ("scope", "notes:write"),
        ("task_id", "deploy-7"),
    ];
    let (status, pending) = exchange_call(&a, "/token", &fields).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending")),
        "{pending}"
    );
    let id = pending["approval_id"].as_str().unwrap().to_string();

    // The request is listed in the API, as an operator would list it.
    let collection = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests");
    let mut object = Value::Null;
    for _ in 0..100 {
        let (status, list) = api
            .request_as(
                &operator,
                http::Method::GET,
                &collection,
                "application/json",
                None,
            )
            .await;
        assert_eq!(status, 200, "{list}");
        if let Some(o) = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["spec"]["approvalId"] == id.as_str())
        {
            object = o.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(object["spec"]["node"], "node-a", "listed: {object}");
    assert_eq!(object["spec"]["scopes"], serde_json::json!(["notes:write"]));
    assert_eq!(object["spec"]["taskId"], "deploy-7");
    let path = format!(
        "{collection}/{}",
        object["metadata"]["name"].as_str().unwrap()
    );
    let decide = |by: &str, decision: &str| serde_json::json!({"spec": {"decision": decision, "decidedBy": by}});
    // Forging another approver's name: refused by the API server.
    let (status, answer) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide("alice", "approved")),
        )
        .await;
    if status != 403 {
        let (_, out, _) = api.kubectl(
            &[
                "get",
                "validatingadmissionpolicies,validatingadmissionpolicybindings",
                "-o",
                "yaml",
            ],
            None,
        );
        let (_, nsout, _) = api.kubectl(&["get", "ns", &ns, "-o", "yaml"], None);
        panic!("a forged decidedBy was accepted: {answer}\n{out}\n{nsout}");
    }
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("your own user name"),
        "{answer}"
    );

    // Approved under the operator's own name: redeemed on node A.
    let (status, answer) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide(&operator_user, "approved")),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let start = std::time::Instant::now();
    let mut with_id = fields.clone();
    with_id.push(("approval_id", &id));
    let token = loop {
        let (status, answer) = exchange_call(&a, "/token", &with_id).await;
        if status == 200 {
            break answer["access_token"].as_str().unwrap().to_string();
        }
        assert_eq!(answer["error"], "authorization_pending", "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never approved on the node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "approved in the Kubernetes API -> redeemed on node A after {:?}",
        start.elapsed()
    );
    assert!(active_at(&a, &token).await);
    // A second decision is refused too.
    let (status, _) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide(&operator_user, "denied")),
        )
        .await;
    assert_eq!(status, 403);

    // Audited once, on the node, with the operator's identity.
    let audit = std::fs::read_to_string(a.dir.path().join("data/audit.jsonl"))
        .or_else(|_| std::fs::read_to_string(a.dir.path().join("data/audit/audit.jsonl")))
        .unwrap_or_default();
    let decisions: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "approval.decision" && r["approval_id"] == id.as_str())
        .collect();
    assert_eq!(decisions.len(), 1, "{audit}");
    assert_eq!(decisions[0]["operator"], format!("k8s:{operator_user}"));
    assert_eq!(decisions[0]["decision"], "approved");
}

/// The operator's SPIFFE ID in the operator tests: node C's workload, which
/// the authorities list in `server.operators`.
const OPERATOR_ID: &str = "spiffe://example.org/node-c/svc";

/// `agent`'s X.509-SVID as an operator client of the authority at `port`
/// (the spiffe crate fetches it; the CLI does the same through its socket).
async fn operator_client(agent: &TestAgent, port: u16) -> OperatorClient {
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let svid = ctx.default_svid().unwrap();
    OperatorClient::new(
        &format!("127.0.0.1:{port}"),
        "tessera-authority",
        svid.leaf().as_ref(),
        svid.private_key().as_ref(),
        &tessera_tests::example_org_cas(&ctx),
    )
    .unwrap()
}

/// `method path` at the authority on `port` without any client certificate
/// (TLS verified against `agent`'s bundle): the status.
async fn anonymous_call(agent: &TestAgent, port: u16, method: http::Method, path: &str) -> u16 {
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let cas = tessera_tests::example_org_cas(&ctx);
    let roots = tessera_agent::fleet::tls::roots(cas.iter().map(Vec::as_slice)).unwrap();
    let (status, _) = tessera_agent::transport::https_client::send(
        tessera_agent::transport::https_client::Request {
            addr: &format!("127.0.0.1:{port}"),
            server_name: "tessera-authority",
            tls: tessera_agent::fleet::tls::client_config(roots, None).unwrap(),
            method,
            path,
            bearer: None,
            content_type: "application/json",
            body: Some(b"{}".to_vec()),
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    status
}

fn refused_status(e: OperatorCallError) -> u16 {
    match e {
        OperatorCallError::Refused { status, .. } => status,
        other => panic!("not a refusal: {other}"),
    }
}

/// Fleet-wide approvals decided at the authority with an operator's
/// X.509-SVID, against the genuine kube-apiserver with two replicas and the
/// chart's admission policy: the operator lists node A's waiting request on
/// replica 1 and approves it with `tessera approvals approve --authority` on
/// replica 0; node A redeems it (the token verified by jsonwebtoken against
/// A's JWKS), audits the decision once naming the operator's SPIFFE ID, and
/// the object in the API names both the operator and the authority's user.
/// Attacks: no client certificate (401), a workload SVID that is not an
/// operator (403, the approval stays pending), a second decision at the
/// authority (409) and with kubectl (403), and a kubectl user writing
/// `spec.operator` to pass as an operator (403 from the API server).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_decides_a_nodes_approval_at_the_authority_with_an_svid() {
    let api = KubeApi::shared();
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns, kubectl_operator, kubectl_user) = approvals_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&format!("operators = [\"{OPERATOR_ID}\"]\n{tables}"), "").await;
    let a = fleet
        .agent_with_policy(
            "node-a",
            None,
            &format!("@id(\"write-needs-approval\")\n@require_approval\npermit(principal, action == Tessera::Action::\"notes:write\", resource == Tessera::Audience::\"{NOTES}\");\n"),
        )
        .await;
    let b = fleet.agent("node-b", None).await;
    let c = fleet.agent("node-c", None).await;
    let subject = a.jwt_svid(ISSUER).await;
    let request = |task: &'static str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", NOTES),
            ("scope", "notes:write"),
            ("task_id", task),
        ]
    };
    let (status, pending) = exchange_call(&a, "/token", &request("deploy-7")).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending")),
        "{pending}"
    );
    let id = pending["approval_id"].as_str().unwrap().to_string();

    // Listed by the operator at the other replica.
    let ops = operator_client(&c, fleet.ports[1]).await;
    let mut listed = Value::Null;
    for _ in 0..200 {
        let all = ops.approvals().await.unwrap();
        if let Some(x) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id.as_str())
        {
            listed = x.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(listed["node"], "node-a", "{listed}");
    assert_eq!(listed["state"], "pending");
    assert_eq!(listed["scopes"], serde_json::json!(["notes:write"]));
    assert_eq!(listed["task_id"], "deploy-7");
    assert_eq!(listed["principal"], "spiffe://example.org/node-a/svc");

    // No credential, and a workload that is not an operator: refused.
    for (method, path) in [
        (http::Method::GET, "/v1/operator/approvals".to_string()),
        (
            http::Method::POST,
            format!("/v1/operator/approvals/{id}/approve"),
        ),
    ] {
        assert_eq!(anonymous_call(&a, fleet.ports[0], method, &path).await, 401);
    }
    let intruder = operator_client(&b, fleet.ports[0]).await;
    let e = intruder.approvals().await.unwrap_err();
    assert_eq!(refused_status(e), 403);
    let e = intruder.decide(&id, None, true).await.unwrap_err();
    assert_eq!(refused_status(e), 403);
    let (status, still) = exchange_call(&a, "/token", &{
        let mut f = request("deploy-7");
        f.push(("approval_id", &id));
        f
    })
    .await;
    assert_eq!(
        (status, still["error"].as_str()),
        (400, Some("authorization_pending"))
    );

    // Approved with the CLI at replica 0; redeemed on node A.
    let start = std::time::Instant::now();
    tessera_agent::cli::run_from([
        "tessera",
        "approvals",
        "approve",
        &id,
        "--authority",
        &format!("127.0.0.1:{}", fleet.ports[0]),
        "--socket",
        c.socket().to_str().unwrap(),
    ])
    .await
    .unwrap();
    let mut with_id = request("deploy-7");
    with_id.push(("approval_id", &id));
    let token = loop {
        let (status, answer) = exchange_call(&a, "/token", &with_id).await;
        if status == 200 {
            break answer["access_token"].as_str().unwrap().to_string();
        }
        assert_eq!(answer["error"], "authorization_pending", "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never approved on the node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "approved at the authority (CLI) -> redeemed on node A after {:?}",
        start.elapsed()
    );
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let set = jwks(&a).await;
    let key =
        DecodingKey::from_jwk(set.find(&header.kid.unwrap()).expect("kid published")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[NOTES]);
    v.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
    assert_eq!(claims["scope"], "notes:write");
    assert_eq!(claims["txn"], "deploy-7");

    // A second decision: refused at the authority, and with kubectl.
    let e = ops.decide(&id, Some("node-a"), false).await.unwrap_err();
    match &e {
        OperatorCallError::Refused { status, message } => {
            assert_eq!(*status, 409, "{message}");
            assert!(message.contains("decided already"), "{message}");
            assert!(message.contains(OPERATOR_ID), "{message}");
        }
        other => panic!("{other}"),
    }
    let object_path = format!(
        "/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests/{}",
        listed["name"].as_str().unwrap()
    );
    let (status, _) = api
        .request_as(
            &kubectl_operator,
            http::Method::PATCH,
            &object_path,
            "application/merge-patch+json",
            Some(&serde_json::json!({"spec": {"decision": "denied", "decidedBy": kubectl_user}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, object) = api.request(http::Method::GET, &object_path, None).await;
    assert_eq!(status, 200);
    assert_eq!(object["spec"]["decision"], "approved");
    assert_eq!(object["spec"]["operator"], OPERATOR_ID);
    assert_eq!(
        object["spec"]["decidedBy"],
        format!("system:serviceaccount:{ns}:tessera-authority")
    );

    // A kubectl user cannot pass as an operator by writing spec.operator.
    let (status, _) = exchange_call(&a, "/token", &request("deploy-8")).await;
    assert_eq!(status, 400);
    let mut second = Value::Null;
    for _ in 0..200 {
        let all = ops.approvals().await.unwrap();
        if let Some(x) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["task_id"] == "deploy-8")
        {
            second = x.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, answer) = api
        .request_as(
            &kubectl_operator,
            http::Method::PATCH,
            &format!(
                "/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests/{}",
                second["name"].as_str().unwrap()
            ),
            "application/merge-patch+json",
            Some(&serde_json::json!({"spec": {"decision": "approved", "decidedBy": kubectl_user, "operator": OPERATOR_ID}})),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("only by the tessera authority"),
        "{answer}"
    );
    // The operator denies it; the client's next poll gets access_denied.
    let second_id = second["id"].as_str().unwrap().to_string();
    ops.decide(&second_id, None, false).await.unwrap();
    let mut denied = request("deploy-8");
    denied.push(("approval_id", &second_id));
    let answer = loop {
        let (_, answer) = exchange_call(&a, "/token", &denied).await;
        if answer["error"] != "authorization_pending" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(answer["error"], "access_denied", "{answer}");

    // Audited once on node A, with the operator's SPIFFE ID.
    let audit = std::fs::read_to_string(a.dir.path().join("data/audit.jsonl"))
        .or_else(|_| std::fs::read_to_string(a.dir.path().join("data/audit/audit.jsonl")))
        .unwrap_or_default();
    let decisions: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "approval.decision" && r["approval_id"] == id.as_str())
        .collect();
    assert_eq!(decisions.len(), 1, "{audit}");
    assert_eq!(decisions[0]["operator"], OPERATOR_ID);
    assert_eq!(decisions[0]["decision"], "approved");
    // The authorities audited the decision and the intruder's attempts.
    let records = fleet.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "operator.approval.decision"
                && r["operator"] == OPERATOR_ID
                && r["approval_id"] == id.as_str())
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "refused" && r["subject"] == "spiffe://example.org/node-b/svc")
    );
}

/// Revoking at the authority itself, against the genuine kube-apiserver:
/// an operator (node C's workload SVID, listed in `server.operators`) runs
/// `tessera token revoke --authority` for a token issued on node A and for a
/// task of A's workload; both are refused at A's and B's `/introspect` (the
/// RFC 7662 answers read from the sockets as any resource server would).
/// A workload that is not an operator, and a caller without a certificate,
/// are refused and revoke nothing; a forged token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_revokes_at_the_authority_and_every_node_refuses_it() {
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, _ns) = kube_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&format!("operators = [\"{OPERATOR_ID}\"]\n{tables}"), "").await;
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;
    let c = fleet.agent("node-c", None).await;
    let authority = |i: usize| format!("127.0.0.1:{}", fleet.ports[i]);

    let token = exchange_token(&a).await;
    assert!(active_at(&b, &token).await);
    // Not an operator, or no certificate at all: nothing is revoked.
    let intruder = operator_client(&b, fleet.ports[0]).await;
    let e = intruder
        .revoke(&tessera_agent::fleet::operator::RevokeRequest {
            token: Some(token.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused_status(e), 403);
    assert_eq!(
        anonymous_call(
            &a,
            fleet.ports[0],
            http::Method::POST,
            "/v1/operator/revocations"
        )
        .await,
        401
    );
    // A token the trust domain never signed (A's JWT-SVID is not an access
    // token) is refused as such.
    let ops = operator_client(&c, fleet.ports[1]).await;
    let e = ops
        .revoke(&tessera_agent::fleet::operator::RevokeRequest {
            token: Some(a.jwt_svid(ISSUER).await),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused_status(e), 400);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(active_at(&a, &token).await && active_at(&b, &token).await);

    // The operator revokes the token with the CLI: refused on every node.
    let mut samples = Vec::new();
    for i in 0..10 {
        let token = if i == 0 {
            token.clone()
        } else {
            exchange_token(&a).await
        };
        assert!(active_at(&b, &token).await);
        tessera_agent::cli::run_from([
            "tessera",
            "token",
            "revoke",
            "--token",
            &token,
            "--authority",
            &authority(i % 2),
            "--socket",
            c.socket().to_str().unwrap(),
        ])
        .await
        .unwrap();
        let start = std::time::Instant::now();
        samples.push(time_until(start, async || !active_at(&b, &token).await).await);
        time_until(start, async || !active_at(&a, &token).await).await;
    }
    samples.sort();
    eprintln!(
        "revoked at the authority, refused by B's /introspect after: p50 {:?}, max {:?} (of {})",
        percentile(&samples, 0.5),
        samples[samples.len() - 1],
        samples.len()
    );

    // A task of A's workload, ended at the authority.
    let task_token = exchange(&a, &[("task_id", "report-9")]).await;
    let other_task = exchange(&a, &[("task_id", "report-10")]).await;
    tessera_agent::cli::run_from([
        "tessera",
        "token",
        "revoke",
        "--task",
        "report-9",
        "--principal",
        "spiffe://example.org/node-a/svc",
        "--authority",
        &authority(0),
        "--socket",
        c.socket().to_str().unwrap(),
    ])
    .await
    .unwrap();
    let start = std::time::Instant::now();
    time_until(start, async || !active_at(&b, &task_token).await).await;
    time_until(start, async || !active_at(&a, &task_token).await).await;
    assert!(
        active_at(&b, &other_task).await,
        "another task stays active"
    );
    // Ended on A's node too: no new token for the task is issued there.
    let (status, answer) = exchange_call(
        &a,
        "/token",
        &[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", a.jwt_svid(ISSUER).await.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", NOTES),
            ("scope", "notes:read"),
            ("task_id", "report-9"),
        ],
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("has ended"),
        "{answer}"
    );

    let records = fleet.audit_records();
    assert!(records.iter().any(|r| r["event"] == "operator.revoke"
        && r["operator"] == OPERATOR_ID
        && r["task_id"] == "report-9"
        && r["principal"] == "spiffe://example.org/node-a/svc"));
}

// ---- The fleet's store on PostgreSQL ----------------------------------------
//
// The same fleet (two authority replicas, agents attached to either) with
// `[server.store] kind = "postgres"`: a genuine PostgreSQL server
// (`tessera_tests::postgres`) is the store and the judge of what is stored,
// read with `psql`.

/// A database whose schema its owner has created, and the replicas'
/// run-time role on it (no DDL; docs/postgres.md's grants).
async fn runtime_database(
    pg: &tessera_tests::postgres::PgServer,
    prefix: &str,
) -> tessera_tests::postgres::TestDatabase {
    use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig};
    let owner = pg.database(prefix);
    Database::open(DatabaseConfig {
        url: owner.url.clone(),
        password_file: Some(owner.password_file.clone()),
        migrate: true,
    })
    .await
    .unwrap();
    pg.runtime_role(&owner)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Fleet-wide revocation through one PostgreSQL database shared by two
/// replicas: a token revoked on node A is refused by node B's `/introspect`
/// (p50/p99 in RELIABILITY.md); the database holds batches, not one row per
/// revocation; PostgreSQL restarts (every connection is cut) and the
/// replicas' feeds resume from their cursor, so a revocation made after it
/// still reaches B and those before stay refused; both replicas restart and
/// a node that joins afterwards refuses everything before it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_node_is_refused_on_every_node_through_postgresql() {
    let pg = Arc::new(
        tokio::task::spawn_blocking(tessera_tests::postgres::PgServer::start)
            .await
            .unwrap(),
    );
    let db = runtime_database(&pg, "revocations").await;
    let mut fleet = Fleet::start_with(&db.store_table(), "").await;
    let a = fleet.agent("node-a", None).await;
    let b = fleet.agent("node-b", None).await;

    const SAMPLES: usize = 20;
    let mut at_b = Vec::new();
    let mut revoked = Vec::new();
    for _ in 0..SAMPLES {
        let token = exchange_token(&a).await;
        assert!(active_at(&b, &token).await, "A's token is active at B");
        exchange_post(&a, "/revoke", &[("token", &token)]).await;
        let start = std::time::Instant::now();
        at_b.push(time_until(start, async || !active_at(&b, &token).await).await);
        assert!(!active_at(&a, &token).await);
        revoked.push(token);
    }
    at_b.sort();
    eprintln!(
        "PostgreSQL store: revoked on A, refused by B's /introspect after: p50 {:?}, p99 {:?} (max of {SAMPLES})",
        percentile(&at_b, 0.5),
        percentile(&at_b, 0.99),
    );

    // What the database holds: batches of entries, each with its expiry.
    let held = pg.psql_in(
        &db.name,
        "SELECT count(*), sum(jsonb_array_length(entries)), bool_and(expires > extract(epoch FROM now())) FROM tessera_revocation_batches",
    );
    let fields: Vec<&str> = held.split('|').collect();
    let (rows, entries): (usize, usize) = (fields[0].parse().unwrap(), fields[1].parse().unwrap());
    assert!(entries >= SAMPLES && rows >= 1, "{held}");
    assert_eq!(fields[2], "t", "every batch expires in the future: {held}");

    // PostgreSQL restarts: every replica's connections are cut.
    let restart = pg.clone();
    tokio::task::spawn_blocking(move || restart.restart())
        .await
        .unwrap();
    let token = exchange_token(&a).await;
    assert!(active_at(&b, &token).await);
    // The replica that takes the revocation may still be reconnecting: the
    // node retries until it is stored.
    exchange_post(&a, "/revoke", &[("token", &token)]).await;
    let start = std::time::Instant::now();
    let took = time_until(start, async || !active_at(&b, &token).await).await;
    eprintln!("after a PostgreSQL restart: revoked on A, refused by B after {took:?}");
    for t in &revoked {
        assert!(!active_at(&b, t).await, "revoked before the restart");
    }
    revoked.push(token);

    // Both replicas restart (their memory is gone); a node that joins
    // afterwards refuses everything.
    fleet.stop_replica(0).await;
    fleet.stop_replica(1).await;
    for i in 0..2 {
        let r = fleet.start_replica(i).await;
        fleet.replicas[i] = Some(r);
    }
    let c = fleet.agent("node-c", None).await;
    assert!(readyz(&c).await.contains("200 OK"), "{}", readyz(&c).await);
    for t in &revoked {
        assert!(!active_at(&c, t).await, "a revoked token is active at C");
    }
    let live = exchange_token(&a).await;
    assert!(active_at(&c, &live).await, "a live token stays active");
    drop((a, b, c));
    drop(fleet);
}

/// The schema is created at start, once, by replicas starting at the same
/// instant (a versioned migrations table behind an advisory lock); a
/// replica told not to migrate refuses an empty database with a clear
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_create_the_schema_once() {
    use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig, SCHEMA_VERSION};
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = pg.database("schema");
    let config = |migrate| DatabaseConfig {
        url: db.url.clone(),
        password_file: Some(db.password_file.clone()),
        migrate,
    };
    let refused = Database::open(config(false)).await.err().unwrap();
    assert!(
        refused.to_string().contains("version 0") && refused.to_string().contains("migrate = true"),
        "{refused}"
    );
    let opens: Vec<_> = (0..6)
        .map(|_| tokio::spawn(Database::open(config(true))))
        .collect();
    for o in opens {
        o.await.unwrap().expect("every replica starts");
    }
    assert_eq!(
        pg.psql_in(
            &db.name,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM tessera_schema_migrations"
        ),
        // Each migration once.
        (1..=SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(
        Database::open(config(false)).await.is_ok(),
        "at the version now"
    );
    // Tables belong to the role that migrated them, not to the superuser.
    assert_eq!(
        pg.psql_in(
            &db.name,
            "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename LIKE 'tessera_%'"
        ),
        db.role
    );
}

/// Node control in PostgreSQL with two replicas: a join token stored as a
/// row (its hash only), redeemed on both replicas at the same instant,
/// succeeds exactly once (ten rounds) and its row is gone; expired tokens
/// are deleted; a denial by node SVID serial cuts off that certificate
/// only, one by node name is enforced by both replicas at once and refuses
/// a fresh attestation under that name, and ends the node's open stream,
/// until the row is deleted. The judge of what is stored is PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_is_redeemed_once_across_replicas_and_a_denied_node_is_refused_by_both_through_postgresql()
 {
    use tessera_agent::fleet::store::postgres::nodes::join_token_insert;
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = runtime_database(pg, "nodes").await;
    let fleet = Fleet::start_with(&db.store_table(), "").await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = fleet.dir.path().join("keys/ca.crt");
    let attest = |port: u16, file: std::path::PathBuf| attest_once(bundle.clone(), port, file);
    let sql = |q: &str| pg.psql_in(&db.name, q);

    for round in 0..10 {
        let token = tessera_agent::fleet::join::new_token().unwrap();
        let node = format!("race-{round}");
        sql(&join_token_insert(&token, &node, unix_now() + 600));
        let file = dir.path().join(format!("token-{round}"));
        std::fs::write(&file, &token).unwrap();
        let (a, b) = tokio::join!(
            attest(fleet.ports[0], file.clone()),
            attest(fleet.ports[1], file.clone())
        );
        let won: Vec<&String> = [&a, &b]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {a:?} / {b:?}");
        assert_eq!(
            won[0],
            &format!("spiffe://example.org/tessera/node/join/{node}")
        );
        let lost = [&a, &b].into_iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(lost.contains("unknown or already used"), "{lost}");
        assert_eq!(
            sql("SELECT count(*) FROM tessera_join_tokens"),
            "0",
            "the redeemed row is deleted"
        );
    }
    // The database never held a token, only hashes.
    assert!(!sql("SELECT string_agg(hash, ',') FROM tessera_join_tokens").contains('-'));

    // Expired tokens nobody redeems are deleted by the replicas' collector
    // (run here directly; replicas run it once a minute), live ones kept.
    {
        use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig, PgNodes};
        let database = Database::open(DatabaseConfig {
            url: db.url.clone(),
            password_file: Some(db.password_file.clone()),
            migrate: db.migrate,
        })
        .await
        .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let control = tessera_agent::fleet::nodes::NodeControl::start_with(
            Arc::new(PgNodes::new(database)),
            Arc::new(tessera_agent::clock::SystemClock),
            shutdown.clone(),
        );
        let now = unix_now();
        sql(&join_token_insert("stale", "vm-old", now - 1));
        sql(&join_token_insert("live", "vm-new", now + 600));
        assert_eq!(control.collect_expired(now).await.unwrap(), 1);
        assert_eq!(
            sql("SELECT string_agg(node, ',') FROM tessera_join_tokens"),
            "vm-new"
        );
        shutdown.cancel();
    }

    // An expired token is refused (and its row deleted).
    let token = tessera_agent::fleet::join::new_token().unwrap();
    sql(&join_token_insert(&token, "late", 1));
    let file = dir.path().join("token-late");
    std::fs::write(&file, &token).unwrap();
    let err = attest(fleet.ports[0], file).await.unwrap_err();
    assert!(err.contains("expired"), "{err}");

    // Two agents of node-a, each attached to one replica.
    let on_0 = agent_on_replica(&fleet, "node-a", fleet.ports[0]).await;
    let on_1 = agent_on_replica(&fleet, "node-a", fleet.ports[1]).await;
    assert!(signs(&on_0).await && signs(&on_1).await);

    // One node SVID denied: that certificate only.
    let serial = node_svid_serial(&on_0);
    sql(&format!(
        "INSERT INTO tessera_node_denials (name, svid_serial, reason) VALUES ('stolen-svid', '{serial}', 'key leaked')"
    ));
    let took = time_until(std::time::Instant::now(), async || !signs(&on_0).await).await;
    assert!(signs(&on_1).await, "the node's other SVID is not denied");
    eprintln!("PostgreSQL store: a denial by node SVID serial refused after {took:?}");
    sql("DELETE FROM tessera_node_denials WHERE name = 'stolen-svid'");
    time_until(std::time::Instant::now(), async || signs(&on_0).await).await;

    // The node evicted by name: both replicas refuse it at once.
    sql(
        "INSERT INTO tessera_node_denials (name, node_name, reason) VALUES ('evict-node-a', 'node-a', 'decommissioned')",
    );
    let start = std::time::Instant::now();
    let (t0, t1) = tokio::join!(
        time_until(start, async || !signs(&on_0).await),
        time_until(start, async || !signs(&on_1).await)
    );
    eprintln!(
        "PostgreSQL store: node-a evicted: refused by replica 0 after {t0:?}, by replica 1 after {t1:?}"
    );
    let token = tessera_agent::fleet::join::new_token().unwrap();
    sql(&join_token_insert(&token, "node-a", unix_now() + 600));
    let file = dir.path().join("token-evicted");
    std::fs::write(&file, &token).unwrap();
    let err = attest(fleet.ports[1], file).await.unwrap_err();
    assert!(err.contains("denied"), "{err}");
    let b = agent_on_replica(&fleet, "node-b", fleet.ports[0]).await;
    assert!(signs(&b).await, "other nodes are untouched");

    // An evicted node's open stream of the fleet's revocations ends.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sim = simulated_node(&fleet, "node-s", &shutdown).await;
    assert_eq!(sim.metrics.fleet_stream_connected.get(), 1);
    let start = std::time::Instant::now();
    sql("INSERT INTO tessera_node_denials (name, node_name) VALUES ('evict-node-s', 'node-s')");
    let took = time_until(start, async || {
        sim.metrics.fleet_stream_connected.get() == 0
    })
    .await;
    eprintln!(
        "PostgreSQL store: an evicted node's revocation stream ended {took:?} after the row was inserted"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.metrics.fleet_stream_connected.get(), 0, "reopened");
    shutdown.cancel();

    // Lifted: served again.
    sql("DELETE FROM tessera_node_denials WHERE name = 'evict-node-a'");
    time_until(std::time::Instant::now(), async || signs(&on_1).await).await;
    let audit = fleet.audit_records();
    assert!(
        audit.iter().any(|r| r["event"] == "refused"
            && r["node"] == "node-a"
            && r["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("evict-node-a")),
        "the eviction's refusals are audited"
    );
}

/// Live registration entries as rows of `tessera_entries`, followed by two
/// replicas: a row inserted for a running workload reaches its open
/// Workload API stream (judged by the `spiffe` crate) and a deleted one is
/// withdrawn; an invalid change is recorded in the row's status with the
/// field at fault and the previous version stays in force; a namespaced
/// entry cannot name another namespace's identity; config-file entries
/// keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_as_rows_reach_a_running_workload_through_postgresql() {
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = runtime_database(pg, "entries").await;
    let tables = format!(
        "{}\n[server.registration]\nkind = \"postgres\"\n",
        db.store_table()
    );
    let fleet = Fleet::start_with(&tables, "").await;
    let a = fleet.agent("node-a", None).await;
    let base = "spiffe://example.org/node-a/svc".to_string();
    let client = a.spiffe_client().await;
    let mut stream = Box::pin(client.stream_x509_contexts().await.unwrap());
    until_streamed(&mut stream, std::time::Instant::now(), |ids| {
        ids == [base.clone()]
    })
    .await;
    let sql = |q: &str| pg.psql_in(&db.name, q);
    let selectors = format!(r#"["tessera:node:node-a", "unix:uid:{}"]"#, my_uid());
    let insert = |name: &str, id: &str, selectors: &str| {
        format!(
            r#"INSERT INTO tessera_entries (scope, name, spec) VALUES ('cluster', '{name}', '{{"spiffeId": "{id}", "selectors": {selectors}}}')"#
        )
    };
    // Polls the row's recorded verdict until it is `status` for the row's
    // current generation; its message.
    let verdict = async |scope: &str, ns: &str, name: &str, status: &str| -> String {
        for _ in 0..150 {
            let row = sql(&format!(
                "SELECT status, observed_generation = generation, message FROM tessera_entries WHERE scope = '{scope}' AND namespace = '{ns}' AND name = '{name}'"
            ));
            let f: Vec<&str> = row.splitn(3, '|').collect();
            if f.len() == 3 && f[0] == status && f[1] == "t" {
                return f[2].to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} never got status {status}");
    };

    const SAMPLES: usize = 10;
    let (mut added, mut withdrawn) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let id = format!("spiffe://example.org/node-a/live-{i}");
        let name = format!("live-{i}");
        sql(&insert(&name, &id, &selectors));
        let start = std::time::Instant::now();
        added.push(until_streamed(&mut stream, start, |ids| ids.contains(&id)).await);
        sql(&format!(
            "DELETE FROM tessera_entries WHERE name = '{name}'"
        ));
        let start = std::time::Instant::now();
        withdrawn.push(
            until_streamed(&mut stream, start, |ids| {
                !ids.contains(&id) && ids.contains(&base)
            })
            .await,
        );
    }
    added.sort();
    withdrawn.sort();
    eprintln!(
        "tessera_entries row inserted -> SVID on the workload's open stream: p50 {:?}, max {:?}; deleted -> withdrawn: p50 {:?}, max {:?} ({SAMPLES} samples)",
        percentile(&added, 0.5),
        percentile(&added, 1.0),
        percentile(&withdrawn, 0.5),
        percentile(&withdrawn, 1.0),
    );

    // Accepted, then changed into something invalid: the status names the
    // field, and the accepted version stays in force.
    let kept = "spiffe://example.org/node-a/kept";
    sql(&insert("kept", kept, &selectors));
    until_streamed(&mut stream, std::time::Instant::now(), |ids| {
        ids.iter().any(|i| i == kept)
    })
    .await;
    let message = verdict("cluster", "", "kept", "Accepted").await;
    assert!(message.contains(kept), "{message}");
    sql(
        r#"UPDATE tessera_entries SET spec = jsonb_set(spec, '{spiffeId}', '"spiffe://other.org/x"') WHERE name = 'kept'"#,
    );
    let message = verdict("cluster", "", "kept", "Invalid").await;
    assert!(message.starts_with("spec.spiffeId: "), "{message}");
    // A row that can never be in force: only node-local selectors.
    sql(&insert(
        "unverifiable",
        "spiffe://example.org/node-a/unverifiable",
        &format!(r#"["unix:uid:{}"]"#, my_uid()),
    ));
    let message = verdict("cluster", "", "unverifiable", "Invalid").await;
    assert!(message.starts_with("spec.selectors: "), "{message}");
    let ids = ids_of(&client.fetch_x509_context().await.unwrap());
    assert!(
        ids.contains(&kept.to_string()),
        "previous version kept: {ids:?}"
    );
    assert!(
        ids.contains(&base),
        "config-file entries still work: {ids:?}"
    );
    assert!(!ids.iter().any(|i| i.contains("unverifiable")), "{ids:?}");

    // A team's namespaced entry: IDs of its own namespace only.
    sql(
        r#"INSERT INTO tessera_entries (scope, namespace, name, spec) VALUES
        ('namespaced', 'team', 'web', '{"spiffeId": "spiffe://example.org/ns/team/sa/web", "selectors": ["k8s:sa:web"]}'),
        ('namespaced', 'team', 'steal', '{"spiffeId": "spiffe://example.org/ns/kube-system/sa/admin", "selectors": ["k8s:sa:web"]}')"#,
    );
    verdict("namespaced", "team", "web", "Accepted").await;
    let message = verdict("namespaced", "team", "steal", "Invalid").await;
    assert!(
        message.contains("spec.spiffeId") && message.contains("own namespace"),
        "{message}"
    );
    drop(stream);
    drop(a);
    drop(fleet);
}

/// BENCHMARKS.md, "Fleet-wide revocation on PostgreSQL": as
/// [`fleet_revocation_bench`], with the statements the database ran (its
/// own `pg_stat_statements`) per 1,000 revocations per second.
///
/// `cargo test -p tessera-tests --test fleet -- --ignored --nocapture fleet_revocation_bench_postgres`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark (figures in BENCHMARKS.md); run with --ignored"]
async fn fleet_revocation_bench_postgres() {
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = pg.database("bench");
    let fleet = Fleet::start_with(&db.store_table(), "").await;
    revocation_bench(&fleet, "PostgreSQL statements", async || {
        let mut by_kind = std::collections::BTreeMap::new();
        for (query, calls) in pg.statements(&db.name) {
            let kind = if query.contains("tessera_revocation_batches") {
                format!(
                    "{} tessera_revocation_batches",
                    query.split_whitespace().next().unwrap_or("?")
                )
            } else if query.contains("tessera_") {
                "other tessera_*".to_string()
            } else {
                continue;
            };
            *by_kind.entry(kind).or_insert(0.0) += calls;
        }
        by_kind
    })
    .await;
}

/// Fleet-wide approvals kept in PostgreSQL (`[server.store] kind =
/// "postgres"`, `approvals = true`), two replicas on one real PostgreSQL
/// running as the run-time role the docs grant: node A's request waiting for
/// approval is listed by an operator at replica 0 and approved with
/// `tessera approvals approve --authority` at replica 1; node A redeems it
/// (the token verified by jsonwebtoken against A's JWKS) and audits the
/// decision once with the operator's SPIFFE ID; the row in the database (read
/// with psql) holds the decision and the operator. A second decision, at
/// either replica, is refused (409, naming who decided) and the row keeps
/// the first; two operators racing on a fresh request at both replicas:
/// exactly one wins. A workload that is not an operator is refused (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_decides_a_nodes_approval_at_the_authority_through_postgresql() {
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = runtime_database(pg, "approvals").await;
    let tables = db
        .store_table()
        .replace("[server.store]\n", "[server.store]\napprovals = true\n");
    let fleet = Fleet::start_with(&format!("operators = [\"{OPERATOR_ID}\"]\n{tables}"), "").await;
    let a = fleet
        .agent_with_policy(
            "node-a",
            None,
            &format!("@id(\"write-needs-approval\")\n@require_approval\npermit(principal, action == Tessera::Action::\"notes:write\", resource == Tessera::Audience::\"{NOTES}\");\n"),
        )
        .await;
    let b = fleet.agent("node-b", None).await;
    let c = fleet.agent("node-c", None).await;
    let subject = a.jwt_svid(ISSUER).await;
    let request = |task: &'static str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", NOTES),
            ("scope", "notes:write"),
            ("task_id", task),
        ]
    };
    let (status, pending) = exchange_call(&a, "/token", &request("deploy-7")).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending")),
        "{pending}"
    );
    let id = pending["approval_id"].as_str().unwrap().to_string();

    // Listed by the operator at replica 0.
    let ops0 = operator_client(&c, fleet.ports[0]).await;
    let ops1 = operator_client(&c, fleet.ports[1]).await;
    let listed = listed_task(&ops0, "deploy-7").await;
    assert_eq!(listed["id"], id.as_str(), "{listed}");
    assert_eq!(listed["node"], "node-a", "{listed}");
    assert_eq!(listed["state"], "pending");
    assert_eq!(listed["scopes"], serde_json::json!(["notes:write"]));
    assert_eq!(listed["principal"], "spiffe://example.org/node-a/svc");
    let row = |name: &str| {
        pg.psql_in(
            &db.name,
            &format!(
                "SELECT node, approval_id, coalesce(decision, 'pending'), coalesce(decided_by, '') FROM tessera_approvals WHERE name = '{name}'"
            ),
        )
    };
    let name = listed["name"].as_str().unwrap().to_string();
    assert_eq!(row(&name).trim(), format!("node-a|{id}|pending|"));

    // A workload that is not an operator: refused, nothing decided.
    let intruder = operator_client(&b, fleet.ports[1]).await;
    assert_eq!(refused_status(intruder.approvals().await.unwrap_err()), 403);
    assert_eq!(
        refused_status(intruder.decide(&id, None, true).await.unwrap_err()),
        403
    );
    assert_eq!(row(&name).trim(), format!("node-a|{id}|pending|"));

    // Approved with the CLI at replica 1; redeemed on node A.
    let start = std::time::Instant::now();
    tessera_agent::cli::run_from([
        "tessera",
        "approvals",
        "approve",
        &id,
        "--authority",
        &format!("127.0.0.1:{}", fleet.ports[1]),
        "--socket",
        c.socket().to_str().unwrap(),
    ])
    .await
    .unwrap();
    let mut with_id = request("deploy-7");
    with_id.push(("approval_id", &id));
    let token = loop {
        let (status, answer) = exchange_call(&a, "/token", &with_id).await;
        if status == 200 {
            break answer["access_token"].as_str().unwrap().to_string();
        }
        assert_eq!(answer["error"], "authorization_pending", "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never approved on the node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "approved at replica 1 (CLI, PostgreSQL) -> redeemed on node A after {:?}",
        start.elapsed()
    );
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let set = jwks(&a).await;
    let key =
        DecodingKey::from_jwk(set.find(&header.kid.unwrap()).expect("kid published")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[NOTES]);
    v.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
    assert_eq!(claims["scope"], "notes:write");
    assert_eq!(claims["txn"], "deploy-7");
    assert_eq!(
        row(&name).trim(),
        format!("node-a|{id}|approved|{OPERATOR_ID}")
    );

    // A second decision, at either replica: refused; the row keeps the first.
    for ops in [&ops0, &ops1] {
        match ops.decide(&id, Some("node-a"), false).await.unwrap_err() {
            OperatorCallError::Refused { status, message } => {
                assert_eq!(status, 409, "{message}");
                assert!(message.contains("decided already"), "{message}");
                assert!(message.contains(OPERATOR_ID), "{message}");
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(
        row(&name).trim(),
        format!("node-a|{id}|approved|{OPERATOR_ID}")
    );

    // Two decisions at once, one per replica: exactly one is kept, and the
    // node applies that one.
    let (status, _) = exchange_call(&a, "/token", &request("deploy-8")).await;
    assert_eq!(status, 400);
    let second = listed_task(&ops0, "deploy-8").await;
    let _ = listed_task(&ops1, "deploy-8").await;
    let second_id = second["id"].as_str().unwrap().to_string();
    let (deny, approve) = tokio::join!(
        ops0.decide(&second_id, None, false),
        ops1.decide(&second_id, None, true)
    );
    assert_eq!(
        usize::from(deny.is_ok()) + usize::from(approve.is_ok()),
        1,
        "{deny:?} {approve:?}"
    );
    let mut polled = request("deploy-8");
    polled.push(("approval_id", &second_id));
    let answer = loop {
        let (_, answer) = exchange_call(&a, "/token", &polled).await;
        if answer["error"] != "authorization_pending" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if deny.is_ok() {
        assert_eq!(answer["error"], "access_denied", "{answer}");
    } else {
        assert!(answer["access_token"].is_string(), "{answer}");
    }

    // Audited once on node A, with the operator's SPIFFE ID.
    let audit = std::fs::read_to_string(a.dir.path().join("data/audit.jsonl"))
        .or_else(|_| std::fs::read_to_string(a.dir.path().join("data/audit/audit.jsonl")))
        .unwrap_or_default();
    for (approval, decision) in [
        (id.as_str(), "approved"),
        (
            second_id.as_str(),
            if deny.is_ok() { "denied" } else { "approved" },
        ),
    ] {
        let decisions: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["event"] == "approval.decision" && r["approval_id"] == approval)
            .collect();
        assert_eq!(decisions.len(), 1, "{audit}");
        assert_eq!(decisions[0]["operator"], OPERATOR_ID);
        assert_eq!(decisions[0]["decision"], decision);
    }
    let records = fleet.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "operator.approval.decision"
                && r["operator"] == OPERATOR_ID
                && r["approval_id"] == id.as_str())
    );
}

/// The approval of `task` as the operator lists it at the authority, once
/// it is listed.
async fn listed_task(ops: &OperatorClient, task: &str) -> Value {
    for _ in 0..400 {
        let all = ops.approvals().await.unwrap();
        if let Some(x) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["task_id"] == task)
        {
            return x.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{task} never listed at the authority");
}
