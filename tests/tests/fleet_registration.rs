//! Live registration: entries kept as custom resources in the genuine
//! kube-apiserver or as rows in a genuine PostgreSQL reach a running
//! workload's open Workload API stream (judged by the `spiffe` crate).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tessera_tests::fleet::{Fleet, percentile, runtime_database};
use tessera_tests::kube::{KubeApi, SA_ISSUER};
use tessera_tests::my_uid;

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

/// Adds a live entry of node-a's workload with `add(name, id)` and deletes
/// it with `remove(name)`, ten times, each timed from the call's return to
/// the open stream showing the SVID (or, after the delete, the workload
/// back to `base` alone); prints the percentiles, the change named `what`.
async fn time_live_entries(
    stream: &mut (
             impl tokio_stream::Stream<
        Item = Result<spiffe::X509Context, spiffe::workload_api::WorkloadApiError>,
    > + Unpin
         ),
    base: &str,
    what: &str,
    mut add: impl AsyncFnMut(&str, &str),
    mut remove: impl AsyncFnMut(&str),
) {
    const SAMPLES: usize = 10;
    let (mut added, mut withdrawn) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let id = format!("spiffe://example.org/node-a/live-{i}");
        let name = format!("live-{i}");
        add(&name, &id).await;
        let start = std::time::Instant::now();
        added.push(until_streamed(stream, start, |ids| ids.iter().any(|x| x == &id)).await);
        remove(&name).await;
        let start = std::time::Instant::now();
        withdrawn.push(
            until_streamed(stream, start, |ids| {
                !ids.iter().any(|x| x == &id) && ids.iter().any(|x| x == base)
            })
            .await,
        );
    }
    added.sort();
    withdrawn.sort();
    eprintln!(
        "{what} -> SVID on the workload's open stream: p50 {:?}, max {:?}; deleted -> withdrawn: p50 {:?}, max {:?} ({SAMPLES} samples)",
        percentile(&added, 0.5),
        percentile(&added, 1.0),
        percentile(&withdrawn, 0.5),
        percentile(&withdrawn, 1.0),
    );
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
    time_live_entries(
        &mut stream,
        &base,
        "ClusterWorkloadEntry created",
        async |name, id| {
            api.create(collection, entry(name, id, selectors.clone()))
                .await;
        },
        async |name| {
            let (status, answer) = api
                .request(http::Method::DELETE, &format!("{collection}/{name}"), None)
                .await;
            assert_eq!(status, 200, "{answer}");
        },
    )
    .await;

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

    time_live_entries(
        &mut stream,
        &base,
        "tessera_entries row inserted",
        async |name, id| {
            sql(&insert(name, id, &selectors));
        },
        async |name| {
            sql(&format!(
                "DELETE FROM tessera_entries WHERE name = '{name}'"
            ));
        },
    )
    .await;

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
