//! Federation between two real agents in two trust domains, over real TLS
//! and Unix sockets: `example.org` serves its bundle endpoint, `other.org`
//! federates with it. What workloads of `other.org` receive is judged by
//! the `spiffe` crate (X.509 contexts, JWT bundles, JWT-SVID validation).
//! go-spiffe judges the same from outside in `tests/interop/go/federation`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe::{JwtBundleSet, JwtSvid, TrustDomain, WorkloadApiClient};
use tessera_agent::app::{self, RunningAgent};
use tessera_agent::config::Config;
use tessera_tests::my_uid;
use tokio_stream::StreamExt;

/// Waits (bounded) until the agent's metrics contain `line`.
async fn metric_appears(agent: &RunningAgent, line: &str) {
    for _ in 0..200 {
        if agent.callers.metrics.encode().contains(line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {line} within 20 s:\n{}", agent.callers.metrics.encode());
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// An agent of trust domain `domain` in `dir`, with `body` appended.
async fn start(dir: &Path, domain: &str, body: &str) -> RunningAgent {
    let text = format!(
        "trust_domain = \"{domain}\"\nsocket_path = \"{d}/sock/agent.sock\"\ndata_dir = \"{d}/data\"\n{body}",
        d = dir.display()
    );
    let config = Config::parse(&text, "test.toml").expect("test config is valid");
    app::start(config, Arc::new(tessera_agent::clock::SystemClock))
        .await
        .expect("agent starts")
}

async fn client(dir: &Path) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix://{}/sock/agent.sock", dir.display()))
        .await
        .unwrap()
}

fn entry(domain: &str, path: &str, federates_with: &[&str]) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://{domain}/{path}\"\nselectors = [\"unix:uid:{}\"]\nfederates_with = {federates_with:?}\n",
        my_uid()
    )
}

/// `example.org`'s bundle endpoint (https_spiffe) and its CA certificates,
/// written as PEM to `pem` for the peer's bootstrap bundle.
async fn example_org(dir: &Path, pem: &Path, extra: &str) -> (RunningAgent, String) {
    let agent = start(
        dir,
        "example.org",
        &format!(
            "[svid]\njwt_ttl = \"2m\"\n[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n{extra}{}",
            entry("example.org", "a", &[])
        ),
    )
    .await;
    let addr = agent.bundle_endpoint.as_ref().unwrap().addr;
    let ctx = client(dir).await.fetch_x509_context().await.unwrap();
    let cas = ctx.bundle_set().get(&td("example.org")).unwrap();
    let text: String = cas
        .authorities()
        .iter()
        .map(|c| pem_cert(c.as_ref()))
        .collect();
    std::fs::write(pem, text).unwrap();
    (agent, format!("https://{addr}/"))
}

fn pem_cert(der: &[u8]) -> String {
    use base64::Engine;
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
}

fn federation_with_example_org(url: &str, bootstrap: &Path) -> String {
    format!(
        "[[federation]]\ntrust_domain = \"example.org\"\nbundle_endpoint_url = \"{url}\"\nbundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://example.org/tessera/bundle-endpoint\"\nbootstrap_bundle = \"{}\"\n",
        bootstrap.display()
    )
}

/// Waits (bounded) until `check` holds for the X.509 contexts `other.org`
/// streams; returns the context that satisfied it.
async fn context_where(
    dir: &Path,
    check: impl Fn(&spiffe::X509Context) -> bool,
) -> spiffe::X509Context {
    let c = client(dir).await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
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

fn cas_of(ctx: &spiffe::X509Context, domain: &str) -> Option<Vec<Vec<u8>>> {
    ctx.bundle_set().get(&td(domain)).map(|b| {
        b.authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    })
}

#[tokio::test]
async fn a_workload_trusts_the_federated_domain_through_its_x509_context_and_jwt_bundles() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pem = a_dir.path().join("example.org.pem");
    let (a, url) = example_org(a_dir.path(), &pem, "").await;
    let b = start(
        b_dir.path(),
        "other.org",
        &format!(
            "{}{}",
            federation_with_example_org(&url, &pem),
            entry("other.org", "b", &["example.org"])
        ),
    )
    .await;

    // X.509: other.org's workload gets example.org's CAs as a federated bundle.
    let a_ctx = client(a_dir.path())
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let a_cas = cas_of(&a_ctx, "example.org").unwrap();
    let ctx = context_where(b_dir.path(), |c| cas_of(c, "example.org").is_some()).await;
    assert_eq!(cas_of(&ctx, "example.org").unwrap(), a_cas);
    assert!(cas_of(&ctx, "other.org").is_some());
    // FetchX509Bundles carries both as well.
    let bundles = client(b_dir.path())
        .await
        .fetch_x509_bundles()
        .await
        .unwrap();
    assert_eq!(
        bundles.get(&td("example.org")).unwrap().authorities().len(),
        a_cas.len()
    );

    // JWT: a JWT-SVID of example.org verifies against the JWT bundles
    // other.org's workload receives (judged by the spiffe crate), and the
    // agent's ValidateJWTSVID accepts it for that workload.
    let token = client(a_dir.path())
        .await
        .fetch_jwt_svid(["partner-api"], None)
        .await
        .unwrap();
    // The bootstrap bundle held CAs only; the fetched one brings the keys,
    // pushed on the open stream.
    let c = client(b_dir.path()).await;
    let mut jwt_stream = c.stream_jwt_bundles().await.unwrap();
    let jwt_bundles: JwtBundleSet = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let set = jwt_stream.next().await.expect("stream open").unwrap();
            if set
                .get(&td("example.org"))
                .is_some_and(|b| b.jwt_authorities().next().is_some())
            {
                return set;
            }
        }
    })
    .await
    .expect("example.org's JWT keys within 30 s");
    let parsed =
        JwtSvid::parse_and_validate(token.token(), &jwt_bundles, &["partner-api"]).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), "spiffe://example.org/a");
    let validated = client(b_dir.path())
        .await
        .validate_jwt_token("partner-api", token.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), "spiffe://example.org/a");

    // The agent's metrics say the fetch succeeded (counted once the bundle
    // is also on disk, a moment after workloads have it).
    metric_appears(
        &b,
        "tessera_federation_bundle_refreshes_total{trust_domain=\"example.org\",result=\"updated\"} 1",
    )
    .await;
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn entries_without_federates_with_redact_the_foreign_bundle_and_refuse_its_tokens() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pem = a_dir.path().join("example.org.pem");
    let (a, url) = example_org(a_dir.path(), &pem, "").await;
    let federation = federation_with_example_org(&url, &pem);
    let b = start(
        b_dir.path(),
        "other.org",
        &format!("{federation}{}", entry("other.org", "b", &["example.org"])),
    )
    .await;
    let c = client(b_dir.path()).await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        cas_of(&first, "example.org").is_some(),
        "bootstrap bundle at once"
    );

    // The entry stops federating: the open stream is pushed a context
    // without the foreign bundle (absence is redaction, spec §4.3).
    let reloaded = Config::parse(
        &format!(
            "trust_domain = \"other.org\"\n{federation}{}",
            entry("other.org", "b", &[])
        ),
        "reload.toml",
    )
    .unwrap();
    b.set_entries(reloaded.entries);
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(cas_of(&next, "example.org").is_none());
    let token = client(a_dir.path())
        .await
        .fetch_jwt_svid(["partner-api"], None)
        .await
        .unwrap();
    let refused = c.validate_jwt_token("partner-api", token.token()).await;
    assert!(
        refused.is_err(),
        "a workload that does not federate accepted it"
    );
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// A restart trusts what was fetched before, even with the endpoint gone;
/// a fetch that fails is counted and the bundle kept.
#[tokio::test]
async fn fetched_bundles_survive_a_restart_while_the_endpoint_is_down() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pem = a_dir.path().join("example.org.pem");
    let (a, url) = example_org(a_dir.path(), &pem, "").await;
    let body = format!(
        "{}{}",
        federation_with_example_org(&url, &pem),
        entry("other.org", "b", &["example.org"])
    );
    let b = start(b_dir.path(), "other.org", &body).await;
    // Wait for the first fetch to land on disk.
    let kept = b_dir.path().join("data/federation/example.org.json");
    for _ in 0..100 {
        if kept.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served: serde_json::Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert!(served["spiffe_sequence"].as_u64().is_some());
    b.stop().await.unwrap();
    let a_cas = cas_of(
        &client(a_dir.path())
            .await
            .fetch_x509_context()
            .await
            .unwrap(),
        "example.org",
    )
    .unwrap();
    a.stop().await.unwrap();

    let b = start(b_dir.path(), "other.org", &body).await;
    let ctx = client(b_dir.path())
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    assert_eq!(cas_of(&ctx, "example.org").unwrap(), a_cas);
    // The endpoint is down: the refresh fails, is counted, and the bundle stays.
    let metric = "tessera_federation_bundle_refreshes_total{trust_domain=\"example.org\",result=\"fetch_error\"}";
    metric_appears(&b, metric).await;
    let ctx = client(b_dir.path())
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    assert_eq!(cas_of(&ctx, "example.org").unwrap(), a_cas);
    b.stop().await.unwrap();
}

/// A bundle whose sequence went backwards is refused: the peer keeps the
/// newer one (an old bundle could bring back a removed key).
#[tokio::test]
async fn a_bundle_with_an_older_sequence_is_refused() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pem = a_dir.path().join("example.org.pem");
    let (a, url) = example_org(a_dir.path(), &pem, "").await;
    // What other.org kept from an earlier run: example.org's bundle with a
    // higher sequence than it serves now.
    let kept_dir = b_dir.path().join("data/federation");
    std::fs::create_dir_all(&kept_dir).unwrap();
    let a_ctx = client(a_dir.path())
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let a_cas = cas_of(&a_ctx, "example.org").unwrap();
    let keys: Vec<serde_json::Value> = a_cas
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            let point = cert.public_key().subject_public_key.data.to_vec();
            use base64::Engine;
            let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            serde_json::json!({
                "kty": "EC", "crv": "P-256",
                "x": b64u.encode(&point[1..33]), "y": b64u.encode(&point[33..65]),
                "use": "x509-svid",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(der)],
            })
        })
        .collect();
    let kept = serde_json::json!({"keys": keys, "spiffe_sequence": 1_000_000});
    std::fs::write(kept_dir.join("example.org.json"), kept.to_string()).unwrap();
    let b = start(
        b_dir.path(),
        "other.org",
        &format!(
            "{}{}",
            federation_with_example_org(&url, &pem),
            entry("other.org", "b", &["example.org"])
        ),
    )
    .await;
    let metric = "tessera_federation_bundle_refreshes_total{trust_domain=\"example.org\",result=\"stale\"} 1";
    metric_appears(&b, metric).await;
    let still: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kept_dir.join("example.org.json")).unwrap()).unwrap();
    assert_eq!(still["spiffe_sequence"], 1_000_000, "the kept bundle stays");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// The https_web profile: example.org serves its bundle under an operator
/// certificate for 127.0.0.1 from a private CA; other.org trusts that CA
/// through `ca_file` and checks the name.
#[tokio::test]
async fn the_https_web_profile_checks_the_web_certificate_and_its_name() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let web = a_dir.path();
    let ca_key = rcgen_key();
    let mut ca = rcgen_params(&[]);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
    let leaf_key = rcgen_key();
    let leaf = rcgen_params(&["127.0.0.1"])
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(web.join("web.crt"), leaf.pem()).unwrap();
    std::fs::write(web.join("web.key"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(web.join("ca.crt"), ca_cert.pem()).unwrap();
    let a = start(
        a_dir.path(),
        "example.org",
        &format!(
            "[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_web\"\ncert_file = \"{0}/web.crt\"\nkey_file = \"{0}/web.key\"\n{1}",
            web.display(),
            entry("example.org", "a", &[])
        ),
    )
    .await;
    let addr = a.bundle_endpoint.as_ref().unwrap().addr;
    let federation = |url: String| {
        format!(
            "[[federation]]\ntrust_domain = \"example.org\"\nbundle_endpoint_url = \"{url}\"\nbundle_endpoint_profile = \"https_web\"\nca_file = \"{}/ca.crt\"\n{}",
            web.display(),
            entry("other.org", "b", &["example.org"])
        )
    };
    let b = start(
        b_dir.path(),
        "other.org",
        &federation(format!("https://{addr}/")),
    )
    .await;
    let ctx = context_where(b_dir.path(), |c| cas_of(c, "example.org").is_some()).await;
    let a_ctx = client(a_dir.path())
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    assert_eq!(cas_of(&ctx, "example.org"), cas_of(&a_ctx, "example.org"));
    b.stop().await.unwrap();

    // The same certificate under another name (localhost) is refused.
    let c_dir = tempfile::tempdir().unwrap();
    let c = start(
        c_dir.path(),
        "other.org",
        &federation(format!("https://localhost:{}/", addr.port())),
    )
    .await;
    let metric = "tessera_federation_bundle_refreshes_total{trust_domain=\"example.org\",result=\"fetch_error\"} 1";
    metric_appears(&c, metric).await;
    assert!(c.cache.trust_store().current().federated.is_empty());
    c.stop().await.unwrap();
    a.stop().await.unwrap();
}

fn rcgen_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn rcgen_params(ips: &[&str]) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = ips
        .iter()
        .map(|ip| rcgen::SanType::IpAddress(ip.parse().unwrap()))
        .collect();
    p
}

/// Envoy SDS on other.org's socket serves example.org's bundle to the entry
/// that federates with it: by trust-domain ID and in `ALL`'s SPIFFE
/// validator config (each domain's CAs under its own name), pushed on an
/// open stream when example.org's bundle refreshes with a new CA; an entry
/// that stops federating is refused the name.
#[tokio::test]
async fn sds_serves_federated_bundles_and_pushes_their_refreshes() {
    use tessera_tests::sds::{request, secrets, spiffe_validator};
    use tessera_workload_api::sds::client::SecretDiscoveryServiceClient;

    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pem = a_dir.path().join("example.org.pem");
    // A 30 s CA: its successor is published (and served) 15 s in; peers
    // fetch every 5 s.
    let (a, url) = example_org(
        a_dir.path(),
        &pem,
        "refresh_hint = \"5s\"\n[authority]\nca_ttl = \"30s\"\n",
    )
    .await;
    let b = start(
        b_dir.path(),
        "other.org",
        &format!(
            "{}{}",
            federation_with_example_org(&url, &pem),
            entry("other.org", "envoy", &["example.org"])
        ),
    )
    .await;
    let a_cas = || async {
        cas_of(
            &client(a_dir.path())
                .await
                .fetch_x509_context()
                .await
                .unwrap(),
            "example.org",
        )
        .unwrap()
    };
    let socket = b_dir.path().join("sock/agent.sock");
    let sds =
        || async { SecretDiscoveryServiceClient::new(tessera_tests::raw_channel(&socket).await) };

    // FetchSecrets: ALL holds both domains, each under its own name.
    let all = sds()
        .await
        .fetch_secrets(request(&["ALL"], "", ""))
        .await
        .unwrap()
        .into_inner();
    let domains = spiffe_validator(&secrets(&all)[0]);
    let names: Vec<&str> = domains.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["other.org", "example.org"]);
    assert_eq!(domains[1].1, a_cas().await);

    // A stream on example.org's ID gets its bundle, then every change.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(request(&["spiffe://example.org"], "", ""))
        .await
        .unwrap();
    let mut stream = sds()
        .await
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    async fn next(
        stream: &mut tonic::Streaming<tessera_workload_api::sds::discovery::DiscoveryResponse>,
    ) -> tessera_workload_api::sds::discovery::DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(40), stream.next())
            .await
            .expect("an SDS response within 40 s")
            .expect("the stream is open")
            .expect("a response, not an error")
    }
    let first = next(&mut stream).await;
    let shown = spiffe_validator(&secrets(&first)[0]);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].0, "example.org");
    assert_eq!(shown[0].1.len(), 1, "one CA before the rotation");
    tx.send(request(
        &["spiffe://example.org"],
        &first.version_info,
        &first.nonce,
    ))
    .await
    .unwrap();
    // example.org publishes its next CA; other.org's next fetch installs it
    // and the open stream is pushed both CAs, exactly what example.org
    // serves its own workloads.
    let pushed = next(&mut stream).await;
    let shown = spiffe_validator(&secrets(&pushed)[0]);
    assert_eq!(shown[0].1.len(), 2, "the successor CA arrived");
    assert_eq!(shown[0].1, a_cas().await);

    // An entry that stops federating: the name resolves to nothing.
    let reloaded = Config::parse(
        &format!(
            "trust_domain = \"other.org\"\n{}{}",
            federation_with_example_org(&url, &pem),
            entry("other.org", "envoy", &[])
        ),
        "reload.toml",
    )
    .unwrap();
    b.set_entries(reloaded.entries);
    let refused = sds()
        .await
        .fetch_secrets(request(&["spiffe://example.org"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    drop(tx);
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}
