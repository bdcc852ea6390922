//! Many nodes, one trust domain: two `tessera authority` replicas sharing one
//! key directory, and agents in upstream mode acting as separate nodes (each
//! with its own socket and data dir), all in this process over loopback
//! ([`tessera_tests::fleet::Fleet`]). The fleet's other topics have files of
//! their own: `fleet_revocation.rs`, `fleet_registration.rs`,
//! `fleet_nodes.rs`, `fleet_approvals.rs`, `fleet_federation.rs`.
//!
//! Judges: the `spiffe` crate fetches every SVID and `spiffe-rustls` (rustls +
//! webpki) runs the mTLS handshake between nodes; `jsonwebtoken` verifies a
//! task token from node A against node B's JWKS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;
use tessera_agent::config::Config;
use tessera_tests::fleet::{Fleet, ISSUER, NOTES, exchange_token, jwks, readyz};
use tessera_tests::{TestAgent, my_uid};

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

/// The API server down (nothing listens on its port): a TokenReview fails
/// as `Unavailable`, never as a rejection, so the authority answers a
/// node's attestation with 503 and the node retries rather than giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_review_with_the_api_server_down_is_unavailable() {
    use tessera_agent::fleet::kube::{KubeClient, ReviewError};
    let dir = tempfile::tempdir().unwrap();
    // The fake writes the CA and token files; the client is pointed at a
    // port nobody listens on.
    let _files = api_server(dir.path()).await;
    let down = tessera_tests::fleet::free_port();
    let kube = KubeClient::new(kube_config(dir.path(), down, "tessera-authority")).unwrap();
    let err = kube.review_token("agent-token-b").await.unwrap_err();
    assert!(matches!(&err, ReviewError::Unavailable(_)), "{err:?}");
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
        tls: None,
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

/// A CA, and leaves it signs, for the TLS tests: (PEM certificate, PEM key).
struct TestCa {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::from_ca_cert_der(cert.der(), key).unwrap(),
        }
    }

    /// A leaf for `names` (DNS names), its subject's CN `cn`.
    fn leaf(&self, names: &[&str], cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// TLS to the database, judged by PostgreSQL itself (a real server that
/// refuses plain TCP): the store verifies the server's chain and host name
/// like libpq's verify-full, binds the password exchange to the TLS session
/// (`channel_binding=require`, which PostgreSQL checks), logs in with a
/// client certificate where the role uses the `cert` method, and refuses a
/// server it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_postgres_over_verified_tls() {
    use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig, TlsFiles};
    use tessera_tests::postgres::{PgServer, ServerTls};
    let ca = TestCa::new("tessera test database CA");
    let (cert_pem, key_pem) = ca.leaf(&["db.example"], "db.example");
    const CERT_ROLE: &str = "tessera_cert_owner";
    let pg = PgServer::start_tls(&ServerTls {
        cert_pem,
        key_pem,
        client_ca_pem: ca.cert_pem.clone(),
        cert_roles: vec![CERT_ROLE.into()],
    });
    let db = pg.database("tls");
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str, pem: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_file = path("ca.pem", &ca.cert_pem);
    let stranger_ca = path("stranger.pem", &TestCa::new("another CA").cert_pem);
    let by_name = |user: &str, dbname: &str| {
        format!(
            "host=db.example hostaddr=127.0.0.1 port={} user={user} dbname={dbname} channel_binding=require",
            pg.port
        )
    };
    let config = |url: String, ca_file: &Path| DatabaseConfig {
        url,
        password_file: Some(db.password_file.clone()),
        migrate: true,
        tls: Some(TlsFiles {
            ca_file: ca_file.to_path_buf(),
            client: None,
        }),
    };

    // Verified, and the password bound to the session.
    let store = Database::open(config(by_name(&db.role, &db.name), &ca_file))
        .await
        .expect("the store opens over TLS");
    let _live = store.client().await.unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) > 0 AND bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = '{}'",
            db.role
        )),
        "t",
        "the server sees the store's connections encrypted"
    );

    // The certificate names db.example, not 127.0.0.1.
    let e = Database::open(config(db.url.clone(), &ca_file))
        .await
        .err()
        .expect("a certificate for another name is refused")
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    // A CA that did not sign the server's certificate.
    let e = Database::open(config(by_name(&db.role, &db.name), &stranger_ca))
        .await
        .err()
        .expect("an unverifiable server is refused")
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    // Without TLS the server turns the store away.
    let e = Database::open(DatabaseConfig {
        tls: None,
        ..config(db.url.clone(), &ca_file)
    })
    .await
    .err()
    .expect("plain TCP is refused by this server")
    .to_string();
    assert!(e.contains("no encryption"), "{e}");

    // A role that logs in with its certificate: no password at all.
    pg.psql(&format!("CREATE ROLE {CERT_ROLE} LOGIN"));
    pg.psql(&format!("CREATE DATABASE tls_cert OWNER {CERT_ROLE}"));
    let (client_pem, client_key) = ca.leaf(&[], CERT_ROLE);
    let by_cert = Database::open(DatabaseConfig {
        url: by_name(CERT_ROLE, "tls_cert").replace(" channel_binding=require", ""),
        password_file: None,
        migrate: true,
        tls: Some(TlsFiles {
            ca_file: ca_file.clone(),
            client: Some((
                path("client.pem", &client_pem),
                path("client.key", &client_key),
            )),
        }),
    })
    .await
    .expect("the certificate role logs in");
    let _live = by_cert.client().await.unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = '{CERT_ROLE}' LIMIT 1"
        )),
        format!("/CN={CERT_ROLE}"),
    );
    assert_eq!(
        pg.psql_in("tls_cert", "SELECT count(*) FROM tessera_schema_migrations")
            .parse::<i32>()
            .unwrap(),
        tessera_agent::fleet::store::postgres::SCHEMA_VERSION,
        "the certificate role created the schema"
    );
}

/// An authority upgraded over a populated schema. A replica of an older
/// release left the database at schema version 1, with rows in it: a
/// revocation batch, a join token, a node denial. A run-time replica (no
/// DDL) of this release refuses to start on it; the first owner replica
/// brings it to the current version in place, once; and every old row is
/// still read: the revocation reaches a replica's view, the token redeems
/// once, the denial refuses its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_populated_schema_from_an_older_release_is_upgraded_in_place() {
    use tessera_agent::fleet::nodes::NodeControl;
    use tessera_agent::fleet::store::postgres::{
        Database, DatabaseConfig, PgBackend, PgNodes, SCHEMA_VERSION, nodes::join_token_insert,
    };
    use tessera_agent::fleet::store::{FleetState, StoreMetrics};
    use tessera_agent::fleet::{Node, NodeKind};
    let pg = tessera_tests::postgres::PgServer::shared();
    let db = pg.database("upgrade");
    let config = |migrate| DatabaseConfig {
        url: db.url.clone(),
        password_file: Some(db.password_file.clone()),
        migrate,
        tls: None,
    };
    Database::open_at_version(config(true), 1).await.unwrap();
    let versions = || {
        pg.psql_in(
            &db.name,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM tessera_schema_migrations",
        )
    };
    assert_eq!(versions(), "1");
    // What the older release's replicas and its operators wrote.
    let until = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    pg.psql_in(
        &db.name,
        &format!(
            "INSERT INTO tessera_revocation_batches (seq, expires, writer, entries) VALUES (nextval('tessera_revocation_seq'), {until}, 'old-replica', '[{{\"k\":\"jti\",\"id\":\"revoked-before-the-upgrade\",\"until\":{until}}}]')"
        ),
    );
    pg.psql_in(
        &db.name,
        &join_token_insert("old-join-token", "vm-a", until),
    );
    pg.psql_in(
        &db.name,
        "INSERT INTO tessera_node_denials (name, node_name, node_kind, reason) VALUES ('retired', 'vm-b', 'join', 'decommissioned')",
    );

    let e = Database::open(config(false))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("version 1") && e.contains("migrate = true"),
        "{e}"
    );
    let opens: Vec<_> = (0..3)
        .map(|_| tokio::spawn(Database::open(config(true))))
        .collect();
    let mut store = None;
    for o in opens {
        store = Some(o.await.unwrap().expect("the schema is upgraded"));
    }
    let store = store.unwrap();
    assert_eq!(
        versions(),
        (1..=SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "each later migration once"
    );

    let shutdown = tokio_util::sync::CancellationToken::new();
    let clock: Arc<dyn tessera_agent::clock::Clock> = Arc::new(tessera_agent::clock::SystemClock);
    let metrics = StoreMetrics::default();
    let state = FleetState::start(
        Arc::new(PgBackend::new(store.clone(), metrics.clone())),
        clock.clone(),
        Duration::from_millis(20),
        metrics,
        shutdown.clone(),
    );
    let control = NodeControl::start_with(Arc::new(PgNodes::new(store)), clock, shutdown.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(control.is_synced()
        && state
            .view
            .revocations
            .is_token_revoked("revoked-before-the-upgrade", SystemTime::now()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the old rows never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retired = Node {
        kind: NodeKind::Joined,
        name: "vm-b".into(),
    };
    assert!(
        control
            .denied(&retired, None)
            .is_some_and(|why| why.contains("decommissioned")),
        "the old denial refuses its node"
    );
    assert_eq!(
        control
            .redeem("old-join-token", SystemTime::now())
            .await
            .unwrap(),
        "vm-a"
    );
    assert!(
        control
            .redeem("old-join-token", SystemTime::now())
            .await
            .is_err(),
        "once"
    );
    shutdown.cancel();
}
