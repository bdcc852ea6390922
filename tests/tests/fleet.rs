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
use tessera_agent::cli::client::{form, http_unix};
use tessera_agent::config::Config;
use tessera_agent::fleet::server::{RunningAuthority, start};
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
    start(
        cfg.trust_domain,
        cfg.entries,
        cfg.server.unwrap(),
        None,
        Arc::new(tessera_agent::clock::SystemClock),
    )
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
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with("", "").await
    }

    async fn start_with(server_extra: &str, entry_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        tessera_agent::identity::key_files::init_key_dir(
            &td,
            &dir.path().join("keys"),
            Duration::from_secs(30 * 24 * 3600),
            SystemTime::now(),
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
        };
        for i in 0..2 {
            let r = fleet.start_replica(i).await;
            fleet.replicas.push(Some(r));
        }
        fleet
    }

    async fn start_replica(&self, i: usize) -> RunningAuthority {
        let d = self.dir.path().display();
        let text = format!(
            "trust_domain = \"example.org\"\n{}\n[server]\nlisten = \"127.0.0.1:{}\"\nkeys_dir = \"{d}/keys\"\njoin_token_dir = \"{d}/join\"\naudit_log = \"{d}/authority-{i}.jsonl\"\nnode_svid_ttl = \"{}\"\n{}",
            entries_with(&self.entry_extra),
            self.ports[i],
            self.node_svid_ttl,
            self.server_extra.replace("short-node-svids", ""),
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
                "@id(\"notes-read\")\npermit(principal, action == Tessera::Action::\"notes:read\", resource == Tessera::Audience::\"{NOTES}\");\n"
            ),
        )
        .unwrap();
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
    let subject = agent.jwt_svid(ISSUER).await;
    let socket = agent.dir.path().join("sock/exchange.sock");
    let body = form(&[
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", &subject),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", NOTES),
        ("scope", "notes:read"),
        ("task_id", "t-1"),
    ]);
    let (status, body) = http_unix(&socket, http::Method::POST, "/token", Some(body))
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{json}");
    json["access_token"].as_str().unwrap().to_string()
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
