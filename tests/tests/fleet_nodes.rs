//! Node control: join tokens redeemed once across replicas and nodes
//! denied on every replica, with the fleet's state in the genuine
//! kube-apiserver or in a genuine PostgreSQL (the judges of what is stored).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tessera_tests::TestAgent;
use tessera_tests::fleet::{
    Fleet, entries_with, kube_store, runtime_database, signs, simulated_node, time_until,
};
use tessera_tests::kube::KubeApi;

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

/// Redeems the join token in `file` at both replicas at the same instant:
/// exactly one wins, with `node`'s join SPIFFE ID, and the other is told
/// the token is unknown or already used.
async fn redeemed_once_by_both(fleet: &Fleet, bundle: &Path, file: &Path, node: &str) {
    let (a, b) = tokio::join!(
        attest_once(bundle.to_owned(), fleet.ports[0], file.to_owned()),
        attest_once(bundle.to_owned(), fleet.ports[1], file.to_owned())
    );
    let won: Vec<&String> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().ok())
        .collect();
    assert_eq!(won.len(), 1, "{node}: {a:?} / {b:?}");
    assert_eq!(
        won[0],
        &format!("spiffe://example.org/tessera/node/join/{node}")
    );
    let lost = [&a, &b].into_iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(lost.contains("unknown or already used"), "{lost}");
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
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
        redeemed_once_by_both(&fleet, &bundle, &file, &node).await;
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
        redeemed_once_by_both(&fleet, &bundle, &file, &node).await;
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
            tls: None,
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
