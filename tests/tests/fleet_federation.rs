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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authority_federates_for_the_whole_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // partner.test: a single-node agent serving its bundle endpoint.
    let partner_dir = tempfile::tempdir().unwrap();
    let partner = single_node(
        partner_dir.path(),
        "partner.test",
        "[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let partner_url = format!(
        "https://{}/",
        partner.bundle_endpoint.as_ref().unwrap().addr
    );
    let partner_ctx = context_where(
        format!("unix://{}/sock/agent.sock", partner_dir.path().display()),
        |_| true,
    )
    .await;
    let partner_cas = cas_of(&partner_ctx, "partner.test").unwrap();
    std::fs::write(d.join("partner.pem"), pem(&partner_cas)).unwrap();

    // The fleet authority of example.org: serves its bundle endpoint and
    // federates with partner.test.
    tessera_agent::identity::key_files::init_key_dir(
        &td("example.org"),
        &d.join("keys"),
        Duration::from_secs(30 * 24 * 3600),
        SystemTime::now(),
    )
    .unwrap();
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
    authority.federation.update(Vec::new());
    context_where(node.endpoint(), |c| {
        cas_of(c, "partner.test").is_none() && cas_of(c, "example.org").is_some()
    })
    .await;

    observer.stop().await.unwrap();
    node.stop().await;
    authority.shutdown();
    authority.wait().await;
    partner.stop().await.unwrap();
}
