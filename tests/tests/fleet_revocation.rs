//! Fleet-wide revocation: a token revoked on one node (or at the authority
//! by an operator) is refused on every node, with the fleet's state in the
//! genuine kube-apiserver or in a genuine PostgreSQL; and the propagation
//! benchmarks of BENCHMARKS.md.
//!
//! Judges: each node's RFC 7662 `/introspect` and a token-guard; what is
//! stored, read from the API server or with `psql`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_tests::fleet::{
    Fleet, ISSUER, NOTES, OPERATOR_ID, SimulatedNode, active_at, anonymous_call, exchange,
    exchange_call, exchange_post, exchange_token, kube_store, kube_store_on, operator_client,
    percentile, readyz, refused_status, runtime_database, simulated_node, time_until,
};
use tessera_tests::kube::KubeApi;

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
/// `cargo test -p tessera-tests --test fleet_revocation -- --ignored --nocapture fleet_revocation_bench`
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

/// BENCHMARKS.md, "Fleet-wide revocation on PostgreSQL": as
/// [`fleet_revocation_bench`], with the statements the database ran (its
/// own `pg_stat_statements`) per 1,000 revocations per second.
///
/// `cargo test -p tessera-tests --test fleet_revocation -- --ignored --nocapture fleet_revocation_bench_postgres`
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
