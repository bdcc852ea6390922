//! Federation at the fleet authority: a replica (`app::authority`) serves
//! the fleet trust domain's bundle endpoint and fetches a partner trust
//! domain's bundle, which reaches an agent in upstream mode through
//! `GET /v1/bundle`. Real agents, real TLS and sockets; what workloads see
//! is judged by the `spiffe` crate's X.509 contexts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;
use tessera_agent::app::{self, RunningAgent};
use tessera_agent::config::Config;
use tessera_tests::kube::{KubeApi, SA_ISSUER};
use tessera_tests::{TestAgent, my_uid};
use tokio_stream::StreamExt;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A single-node agent of `domain` in `dir`, with `body` appended.
async fn single_node(dir: &Path, domain: &str, body: &str) -> RunningAgent {
    let text = format!(
        "trust_domain = \"{domain}\"\nsocket_path = \"{d}/sock/agent.sock\"\ndata_dir = \"{d}/data\"\n[[entries]]\nspiffe_id = \"spiffe://{domain}/w\"\nselectors = [\"unix:uid:{uid}\"]\n{body}",
        d = dir.display(),
        uid = my_uid(),
    );
    let config = Config::parse(&text, "test.toml").expect("test config is valid");
    app::start(config, Arc::new(tessera_agent::clock::SystemClock))
        .await
        .expect("agent starts")
}

fn pem(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    ders.iter()
        .map(|der| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            )
        })
        .collect()
}

fn cas_of(ctx: &spiffe::X509Context, domain: &str) -> Option<Vec<Vec<u8>>> {
    ctx.bundle_set().get(&td(domain)).map(|b| {
        b.authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    })
}

/// The X.509 context streamed on `endpoint` that first satisfies `check`.
async fn context_where(
    endpoint: String,
    check: impl Fn(&spiffe::X509Context) -> bool,
) -> spiffe::X509Context {
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ctx) = stream.next().await {
            let ctx = ctx.unwrap();
            if check(&ctx) {
                return ctx;
            }
        }
        panic!("the stream ended");
    })
    .await
    .expect("the expected X.509 context within 30 s")
}

/// partner.test, the foreign trust domain of these tests: a single-node
/// agent serving its bundle endpoint, and what its own Workload API serves
/// of its bundle (read by the `spiffe` crate).
struct PartnerDomain {
    agent: RunningAgent,
    /// Its bundle endpoint's URL.
    url: String,
    /// Its X.509 CAs.
    cas: Vec<Vec<u8>>,
    /// Its JWT authorities' key IDs, sorted.
    kids: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn partner_domain() -> PartnerDomain {
    let dir = tempfile::tempdir().unwrap();
    let agent = single_node(
        dir.path(),
        "partner.test",
        "[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let url = format!("https://{}/", agent.bundle_endpoint.as_ref().unwrap().addr);
    let socket = format!("unix://{}/sock/agent.sock", dir.path().display());
    let cas = cas_of(
        &context_where(socket.clone(), |_| true).await,
        "partner.test",
    )
    .unwrap();
    let kids = {
        let client = spiffe::WorkloadApiClient::connect_to(socket).await.unwrap();
        let set = client.fetch_jwt_bundles().await.unwrap();
        let mut kids: Vec<String> = set
            .get(&td("partner.test"))
            .unwrap()
            .jwt_authorities()
            .map(|a| a.key_id().to_string())
            .collect();
        kids.sort();
        kids
    };
    assert!(!kids.is_empty());
    PartnerDomain {
        agent,
        url,
        cas,
        kids,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authority_federates_for_the_whole_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // partner.test: a single-node agent serving its bundle endpoint.
    let partner = partner_domain().await;
    let (partner_url, partner_cas) = (partner.url.clone(), partner.cas.clone());
    std::fs::write(d.join("partner.pem"), pem(&partner_cas)).unwrap();

    // The fleet authority of example.org: serves its bundle endpoint and
    // federates with partner.test.
    example_org_keys(d);
    // A key directory made before WIT-SVIDs (no wit.key): the fleet serves
    // no WIT profile, checked below.
    std::fs::remove_file(d.join("keys/wit.key")).unwrap();
    let entry = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/node-a/svc\"\nselectors = [\"tessera:node:node-a\", \"unix:uid:{}\"]\nfederates_with = [\"partner.test\"]\n",
        my_uid()
    );
    let authority_text = format!(
        "trust_domain = \"example.org\"\n{entry}[server]\nlisten = \"127.0.0.1:0\"\nkeys_dir = \"{k}/keys\"\njoin_token_dir = \"{k}/join\"\n[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n[[federation]]\ntrust_domain = \"partner.test\"\nbundle_endpoint_url = \"{partner_url}\"\nbundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://partner.test/tessera/bundle-endpoint\"\nbootstrap_bundle = \"{k}/partner.pem\"\n",
        k = d.display(),
    );
    let cfg = Config::parse(&authority_text, "authority.toml").unwrap();
    let authority = tessera_agent::app::authority::start_authority(
        &cfg,
        Arc::new(tessera_agent::clock::SystemClock),
    )
    .await
    .unwrap();
    let authority_endpoint = authority.bundle_endpoint.as_ref().unwrap();
    assert_eq!(
        authority_endpoint.spiffe_id.as_ref().unwrap().to_string(),
        "spiffe://example.org/tessera/bundle-endpoint"
    );

    // An agent of node-a in upstream mode: its workload, whose entry
    // federates with partner.test, gets partner.test's CAs from the
    // authority, exactly what partner.test serves its own workloads.
    let token = tessera_agent::fleet::join::create(
        &d.join("join"),
        "node-a",
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::write(agent_dir.path().join("join-token"), token).unwrap();
    let body = format!(
        "{entry}[upstream]\naddresses = [\"{addr}\"]\nbundle_file = \"{k}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{a}/join-token\"\nbundle_refresh = \"200ms\"\nrequest_timeout = \"2s\"\n",
        addr = authority.server.addr,
        k = d.display(),
        a = agent_dir.path().display(),
    );
    let mut node = TestAgent::start_in(agent_dir, &body).await;
    let ctx = context_where(node.endpoint(), |c| cas_of(c, "partner.test").is_some()).await;
    assert_eq!(cas_of(&ctx, "partner.test").unwrap(), partner_cas);
    assert_eq!(
        ctx.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/node-a/svc"
    );
    // Without WIT-SVID keys at the authority the node answers both WIT
    // RPCs with Unimplemented (the spec's "profile not supported").
    {
        use tessera_workload_api as pb;
        let mut c = pb::client::SpiffeWorkloadApiClient::new(
            tessera_tests::raw_channel(&node.socket()).await,
        );
        let e = c
            .fetch_witsvid(pb::with_security_header(pb::WitsvidRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
        let e = c
            .fetch_wit_bundles(pb::with_security_header(pb::WitBundlesRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    }

    // The bootstrap bundle held CAs only: partner.test's JWT-SVID keys on
    // the node prove the authority's fetch reached it.
    let mut jwt_stream = node
        .spiffe_client()
        .await
        .stream_jwt_bundles()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let set = jwt_stream.next().await.expect("stream open").unwrap();
            if set
                .get(&td("partner.test"))
                .is_some_and(|b| b.jwt_authorities().next().is_some())
            {
                return;
            }
        }
    })
    .await
    .expect("partner.test's JWT keys relayed to the node within 30 s");
    // Counted in the replica's metrics (tessera_authority_federation_*).
    let updated = authority
        .server
        .federation_metrics
        .refreshes
        .get_or_create(&tessera_agent::metrics::FederationLabels {
            trust_domain: "partner.test".into(),
            result: "updated",
        })
        .get();
    assert!(updated >= 1, "partner.test fetched {updated} times");

    // observer.test federates with the fleet through the authority's
    // bundle endpoint (https_spiffe, bootstrapped with the fleet CA): its
    // workload trusts example.org's CAs.
    let fleet_ca = std::fs::read(d.join("keys/ca.crt")).unwrap();
    std::fs::write(d.join("fleet.pem"), &fleet_ca).unwrap();
    let observer_dir = tempfile::tempdir().unwrap();
    let observer = single_node(
        observer_dir.path(),
        "observer.test",
        &format!(
            "federates_with = [\"example.org\"]\n[[federation]]\ntrust_domain = \"example.org\"\nbundle_endpoint_url = \"https://{}/\"\nbundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://example.org/tessera/bundle-endpoint\"\nbootstrap_bundle = \"{}/fleet.pem\"\n",
            authority_endpoint.addr,
            d.display()
        ),
    )
    .await;
    // The fetched bundle (not only the bootstrap) has the fleet's JWT-SVID
    // keys: the fetch through the authority's endpoint succeeded.
    let observer_client = spiffe::WorkloadApiClient::connect_to(format!(
        "unix://{}/sock/agent.sock",
        observer_dir.path().display()
    ))
    .await
    .unwrap();
    let mut jwt_stream = observer_client.stream_jwt_bundles().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let set = jwt_stream.next().await.expect("stream open").unwrap();
            if set
                .get(&td("example.org"))
                .is_some_and(|b| b.jwt_authorities().next().is_some())
            {
                return;
            }
        }
    })
    .await
    .expect("example.org's JWT keys through the authority's bundle endpoint within 30 s");
    let ctx = context_where(
        format!("unix://{}/sock/agent.sock", observer_dir.path().display()),
        |c| cas_of(c, "example.org").is_some(),
    )
    .await;
    let fleet_cas: Vec<Vec<u8>> = tessera_agent::identity::pem::split_der_certs(
        &authority.server.authority.trust_store().current().x509,
    )
    .unwrap()
    .into_iter()
    .map(<[u8]>::to_vec)
    .collect();
    assert_eq!(cas_of(&ctx, "example.org").unwrap(), fleet_cas);

    // The authority stops federating (what SIGHUP does with a config
    // without the table): the node's workload is pushed a context without
    // partner.test at the agent's next poll.
    authority.relationships.set_config(Vec::new());
    context_where(node.endpoint(), |c| {
        cas_of(c, "partner.test").is_none() && cas_of(c, "example.org").is_some()
    })
    .await;

    observer.stop().await.unwrap();
    node.stop().await;
    authority.shutdown();
    authority.wait().await;
    partner.agent.stop().await.unwrap();
}

/// The entry of `node`'s workload: tied to that node, federating with
/// partner.test.
fn federated_entry(node: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{node}/svc\"\nselectors = [\"tessera:node:{node}\", \"unix:uid:{}\"]\nfederates_with = [\"partner.test\"]\n",
        my_uid()
    )
}

/// A new key directory for example.org's fleet authority in `d/keys`.
fn example_org_keys(d: &Path) {
    tessera_agent::identity::key_files::init_key_dir(
        &td("example.org"),
        &d.join("keys"),
        Duration::from_secs(30 * 24 * 3600),
        SystemTime::now(),
    )
    .unwrap();
}

/// The config of an example.org authority replica with new keys in `d`,
/// node-a's and node-b's [`federated_entry`], and `server_rest` (the fleet
/// store, federation) after its `[server]` table. Every replica of a test
/// starts from this one config.
fn two_node_authority(d: &Path, server_rest: &str) -> Config {
    example_org_keys(d);
    let text = format!(
        "trust_domain = \"example.org\"\n{}{}[server]\nlisten = \"127.0.0.1:0\"\nkeys_dir = \"{k}/keys\"\njoin_token_dir = \"{k}/join\"\n{server_rest}",
        federated_entry("node-a"),
        federated_entry("node-b"),
        k = d.display(),
    );
    Config::parse(&text, "authority.toml").unwrap()
}

/// An agent of `node` in upstream mode attached to the authority at
/// `addr` only, with `entries`; the authority's key directory is `keys`.
async fn fleet_node(
    keys: &Path,
    addr: std::net::SocketAddr,
    node: &str,
    entries: &str,
) -> TestAgent {
    let token = tessera_agent::fleet::join::create(
        &keys.join("join"),
        node,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::write(agent_dir.path().join("join-token"), token).unwrap();
    let body = format!(
        "{entries}[upstream]\naddresses = [\"{addr}\"]\nbundle_file = \"{k}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{a}/join-token\"\nbundle_refresh = \"200ms\"\nrequest_timeout = \"2s\"\n",
        k = keys.display(),
        a = agent_dir.path().display(),
    );
    TestAgent::start_in(agent_dir, &body).await
}

/// Waits until the JWT bundles streamed to `agent`'s workload hold keys
/// of `domain`; their key IDs, sorted.
async fn jwt_kids_of(agent: &TestAgent, domain: &str) -> Vec<String> {
    let mut jwt_stream = agent
        .spiffe_client()
        .await
        .stream_jwt_bundles()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let set = jwt_stream.next().await.expect("stream open").unwrap();
            if let Some(b) = set.get(&td(domain)) {
                let mut kids: Vec<String> = b
                    .jwt_authorities()
                    .map(|a| a.key_id().to_string())
                    .collect();
                if !kids.is_empty() {
                    kids.sort();
                    return kids;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{domain}'s JWT-SVID keys on the workload's stream within 30 s"))
}

/// The `jwt-svid` key IDs of a JWKS bundle document, sorted.
fn jwt_kids_in(doc: &serde_json::Value) -> Vec<String> {
    let mut kids: Vec<String> = doc["keys"]
        .as_array()
        .expect("a JWKS document")
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    kids
}

/// With the foreign endpoint down: a replica started now (nothing in
/// memory) from `cfg`, and a node attached to it alone. The node's workload
/// gets the kept bundle (the endpoint's JWT keys `kids` and CAs `cas`, not
/// the bootstrap bundle, which has CAs only), and the replica never
/// reached the endpoint.
async fn replica_on_kept_bundle(
    cfg: &Config,
    d: &Path,
    kids: &[String],
    cas: &[Vec<u8>],
) -> (tessera_agent::app::authority::RunningAuthority, TestAgent) {
    let replica = tessera_agent::app::authority::start_authority(
        cfg,
        Arc::new(tessera_agent::clock::SystemClock),
    )
    .await
    .unwrap();
    let node = fleet_node(d, replica.server.addr, "node-b", &federated_entry("node-b")).await;
    assert_eq!(
        jwt_kids_of(&node, "partner.test").await,
        kids,
        "the kept bundle, not the bootstrap one (CAs only)"
    );
    let ctx = context_where(node.endpoint(), |c| cas_of(c, "partner.test").is_some()).await;
    assert_eq!(cas_of(&ctx, "partner.test").unwrap(), cas);
    let fetched = |result: &'static str| {
        replica
            .server
            .federation_metrics
            .refreshes
            .get_or_create(&tessera_agent::metrics::FederationLabels {
                trust_domain: "partner.test".into(),
                result,
            })
            .get()
    };
    assert_eq!(
        fetched("updated") + fetched("unchanged"),
        0,
        "the replica never reached the endpoint"
    );
    (replica, node)
}

/// Polls the object at `path` until its Ready condition has `reason` for
/// the object's current generation; returns the condition.
async fn ready_condition(api: &KubeApi, path: &str, reason: &str) -> serde_json::Value {
    for _ in 0..300 {
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

/// The chart's CRDs in the shared genuine kube-apiserver, a namespace with
/// the authority's service account, and the chart's rules for federation:
/// FederationRelationship objects read and their status patched,
/// FederatedBundle objects kept in the store's namespace (with the rest of
/// the store's rules). Returns the `[server]` sub-tables and the namespace.
async fn federation_cluster(api: &KubeApi, dir: &Path) -> (String, String) {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/tessera/crds/");
    let (ok, out, err) = api.kubectl(&["apply", "--server-side", "-f", crds], None);
    assert!(ok, "the chart's CRDs are refused: {out}{err}");
    let (ok, out, err) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/federationrelationships.tessera.dev",
            "crd/federatedbundles.tessera.dev",
            "crd/revocationbatches.tessera.dev",
            "crd/jointokens.tessera.dev",
            "crd/nodedenials.tessera.dev",
            "crd/clusterworkloadentries.tessera.dev",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let ns = api.namespace("fed", serde_json::json!({})).await;
    api.service_account(&ns, "tessera-authority").await;
    let cluster_name = format!("tessera-authority-{ns}");
    api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
          "metadata": {"name": cluster_name},
          "rules": [
            {"apiGroups": ["tessera.dev"], "resources": ["clusterworkloadentries", "federationrelationships"], "verbs": ["list", "watch"]},
            {"apiGroups": ["tessera.dev"], "resources": ["clusterworkloadentries/status", "federationrelationships/status"], "verbs": ["patch"]}]}),
    )
    .await;
    api.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
          "metadata": {"name": cluster_name},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
          "subjects": [{"kind": "ServiceAccount", "name": "tessera-authority", "namespace": ns}]}),
    )
    .await;
    api.grant_role(
        &ns,
        "tessera-authority",
        serde_json::json!([{"apiGroups": ["tessera.dev"], "resources": ["revocationbatches"],
                            "verbs": ["create", "list", "watch", "deletecollection"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["jointokens"],
                            "verbs": ["get", "list", "delete"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["nodedenials"],
                            "verbs": ["list", "watch"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["federatedbundles"],
                            "verbs": ["list", "create", "patch", "delete"]}]),
        "tessera-authority",
    )
    .await;
    let token = api.token(&ns, "tessera-authority", SA_ISSUER, None).await;
    let token_file = KubeApi::token_file(dir, "authority-token", &token);
    let tables = format!(
        "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{ns}:tessera-agent\"]\n\n[server.store]\nkind = \"kubernetes\"\nnamespace = \"{ns}\"\nbatch_window = \"20ms\"\n\n[server.registration]\nkind = \"kubernetes\"\nnamespaced = false\nfederation = true\n",
        api.url,
        api.ca_file.display(),
        token_file.display(),
    );
    (tables, ns)
}

/// Federation relationships as custom resources in the genuine
/// kube-apiserver, and foreign bundles kept in the fleet store: a
/// FederationRelationship created for a running fleet reaches a workload's
/// open stream (its CAs and, from the first fetch, its JWT-SVID keys, as
/// the `spiffe` crate reads them); an invalid one gets a Ready condition
/// naming the field; the fetched bundle is a FederatedBundle object, from
/// which a replica started while the partner's endpoint is down serves it
/// (its JWT-SVID keys were in no bootstrap bundle); deleting the object
/// withdraws the bundle from the workload and deletes the kept one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federation_relationships_are_custom_resources_and_their_bundles_outlive_the_endpoint() {
    let api = KubeApi::shared();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (tables, ns) = federation_cluster(api, d).await;

    let partner = partner_domain().await;
    let (partner_url, partner_cas, partner_kids) = (
        partner.url.clone(),
        partner.cas.clone(),
        partner.kids.clone(),
    );

    let cfg = two_node_authority(d, &tables);
    let clock = Arc::new(tessera_agent::clock::SystemClock);
    let replica_a = tessera_agent::app::authority::start_authority(&cfg, clock.clone())
        .await
        .unwrap();
    let mut node_a = fleet_node(
        d,
        replica_a.server.addr,
        "node-a",
        &federated_entry("node-a"),
    )
    .await;
    let ctx = context_where(node_a.endpoint(), |c| c.default_svid().is_some()).await;
    assert!(cas_of(&ctx, "partner.test").is_none(), "not federated yet");

    // Invalid first: https_spiffe with the endpoint in partner.test needs
    // a bootstrap bundle. The condition names the field; nothing changes.
    let collection = "/apis/tessera.dev/v1alpha1/federationrelationships";
    let path = format!("{collection}/partner.test");
    let mut object = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "FederationRelationship",
      "metadata": {"name": "partner.test"},
      "spec": {"trustDomain": "partner.test", "bundleEndpointUrl": partner_url,
               "bundleEndpointProfile": "https_spiffe",
               "endpointSpiffeId": "spiffe://partner.test/tessera/bundle-endpoint"}});
    api.create(collection, object.clone()).await;
    let refused = ready_condition(api, &path, "Invalid").await;
    assert_eq!(refused["status"], "False");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.bootstrapBundle: "),
        "{refused}"
    );
    // Fixed with the partner's CAs as bootstrap bundle (what its agent
    // writes with `tessera api fetch x509 --write`).
    object["spec"]["bootstrapBundle"] = serde_json::json!(pem(&partner_cas));
    let (status, answer) = api
        .request_as(
            &api.admin_token,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&serde_json::json!({"spec": object["spec"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let accepted = ready_condition(api, &path, "Accepted").await;
    assert_eq!(accepted["status"], "True", "{accepted}");
    let ctx = context_where(node_a.endpoint(), |c| cas_of(c, "partner.test").is_some()).await;
    assert_eq!(cas_of(&ctx, "partner.test").unwrap(), partner_cas);
    let kids = jwt_kids_of(&node_a, "partner.test").await;
    assert_eq!(kids, partner_kids, "fetched from partner.test's endpoint");

    // Kept in the fleet store as the endpoint served it, as the API server
    // holds it.
    let kept_path =
        format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/federatedbundles/partner.test");
    let mut kept = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, obj) = api.request(http::Method::GET, &kept_path, None).await;
        if status == 200 {
            kept = obj;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kept["spec"]["trustDomain"], "partner.test", "{kept}");
    let doc: serde_json::Value =
        serde_json::from_str(kept["spec"]["bundle"].as_str().unwrap()).unwrap();
    assert_eq!(jwt_kids_in(&doc), partner_kids);

    // partner.test's endpoint goes down; a replica started now (nothing
    // in memory) serves the kept bundle to a node attached to it alone.
    partner.agent.stop().await.unwrap();
    let (replica_b, mut node_b) =
        replica_on_kept_bundle(&cfg, d, &partner_kids, &partner_cas).await;

    // Deleted: withdrawn from the workloads of both replicas' nodes, and
    // the kept bundle goes too.
    let (status, answer) = api.request(http::Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{answer}");
    for node in [&node_a, &node_b] {
        context_where(node.endpoint(), |c| {
            cas_of(c, "partner.test").is_none() && cas_of(c, "example.org").is_some()
        })
        .await;
    }
    let mut gone = false;
    for _ in 0..100 {
        let (status, _) = api.request(http::Method::GET, &kept_path, None).await;
        if status == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the FederatedBundle object is deleted with the relationship"
    );

    node_a.stop().await;
    node_b.stop().await;
    for replica in [replica_a, replica_b] {
        replica.shutdown();
        replica.wait().await;
    }
}

/// With the fleet's state on PostgreSQL, the bundles a replica fetches for
/// its `[[federation]]` tables are kept as rows of `tessera_foreign_bundles`
/// (read with psql), and a replica started while the foreign endpoint is
/// down serves the kept bundle, not only the bootstrap one (CAs only), to a
/// node attached to it alone (judged by the `spiffe` crate's JWT bundles).
/// The replicas run as the run-time role whose grants docs/postgres.md
/// lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_kept_in_postgresql_outlive_the_endpoint() {
    use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig};
    let pg = tessera_tests::postgres::PgServer::shared();
    let owner = pg.database("kept_bundles");
    Database::open(DatabaseConfig {
        url: owner.url.clone(),
        password_file: Some(owner.password_file.clone()),
        migrate: true,
        tls: None,
    })
    .await
    .unwrap();
    let db = pg.runtime_role(&owner);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let partner = partner_domain().await;
    let (partner_url, partner_cas, partner_kids) = (
        partner.url.clone(),
        partner.cas.clone(),
        partner.kids.clone(),
    );
    std::fs::write(d.join("partner.pem"), pem(&partner_cas)).unwrap();

    let cfg = two_node_authority(
        d,
        &format!(
            "{store}[[federation]]\ntrust_domain = \"partner.test\"\nbundle_endpoint_url = \"{partner_url}\"\nbundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://partner.test/tessera/bundle-endpoint\"\nbootstrap_bundle = \"{k}/partner.pem\"\n",
            store = db.store_table(),
            k = d.display(),
        ),
    );
    let clock = Arc::new(tessera_agent::clock::SystemClock);
    let replica_a = tessera_agent::app::authority::start_authority(&cfg, clock.clone())
        .await
        .unwrap();
    let mut node_a = fleet_node(
        d,
        replica_a.server.addr,
        "node-a",
        &federated_entry("node-a"),
    )
    .await;
    let kids = jwt_kids_of(&node_a, "partner.test").await;
    assert_eq!(kids, partner_kids, "fetched from partner.test's endpoint");

    // Kept as the endpoint served it, as PostgreSQL holds it.
    let mut kept = String::new();
    for _ in 0..100 {
        kept = pg.psql_in(
            &db.name,
            "SELECT bundle FROM tessera_foreign_bundles WHERE trust_domain = 'partner.test'",
        );
        if !kept.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let doc: serde_json::Value = serde_json::from_str(kept.trim()).expect("a kept bundle row");
    assert_eq!(jwt_kids_in(&doc), partner_kids);

    // The endpoint goes down; a replica started now serves the kept bundle
    // and never reaches the endpoint.
    partner.agent.stop().await.unwrap();
    let (replica_b, mut node_b) =
        replica_on_kept_bundle(&cfg, d, &partner_kids, &partner_cas).await;

    node_a.stop().await;
    node_b.stop().await;
    for replica in [replica_a, replica_b] {
        replica.shutdown();
        replica.wait().await;
    }
}
