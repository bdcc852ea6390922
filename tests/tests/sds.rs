//! Envoy SDS on the agent socket, over the real Unix socket: the xDS
//! handshake (versions, nonces, ACK, NACK, stale requests), SPIRE's resource
//! names, pushes on rotation and the Workload API's rules (attestation,
//! entries, budget). What SDS serves is compared with what the `spiffe`
//! crate fetches from the Workload API and read back with rustls' PEM reader;
//! the end-to-end judge is a real Envoy (tests/envoy).

use std::time::Duration;

use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use tessera_tests::sds::{inline, pem_certs, request, secrets, spiffe_validator};
use tessera_tests::{TestAgent, example_org_cas, my_uid, raw_channel};
use tessera_workload_api::sds::client::SecretDiscoveryServiceClient;
use tessera_workload_api::sds::{self, config_core, discovery, tls};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Deadline for any single answer.
const WAIT: Duration = Duration::from_secs(20);

const ME: &str = "spiffe://example.org/envoy";

async fn agent(extra: &str) -> TestAgent {
    TestAgent::start(&format!(
        "{}{extra}",
        TestAgent::entry_for_me("envoy", "front")
    ))
    .await
}

async fn client(agent: &TestAgent) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(raw_channel(&agent.socket()).await)
}

/// An open StreamSecrets stream: requests go in, responses come out.
struct Stream {
    tx: mpsc::Sender<discovery::DiscoveryRequest>,
    rx: tonic::Streaming<discovery::DiscoveryResponse>,
}

impl Stream {
    /// Opens a stream and sends `first` (the server answers only once a
    /// request arrives, so the open itself needs one in flight).
    async fn open(
        agent: &TestAgent,
        first: discovery::DiscoveryRequest,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = client(agent)
            .await
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, request: discovery::DiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn next(&mut self) -> Result<discovery::DiscoveryResponse, tonic::Status> {
        tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("an answer in time")
            .expect("the stream is open")
    }
}

/// A TlsCertificate secret as the `spiffe` crate reads it.
fn svid_of(secret: &tls::Secret) -> spiffe::X509Svid {
    let Some(tls::secret::Type::TlsCertificate(cert)) = &secret.r#type else {
        panic!("not a certificate: {secret:?}")
    };
    let chain: Vec<u8> = pem_certs(inline(&cert.certificate_chain)).concat();
    let key = PrivatePkcs8KeyDer::from_pem_slice(inline(&cert.private_key)).unwrap();
    spiffe::X509Svid::parse_from_der(&chain, key.secret_pkcs8_der()).expect("a valid X509-SVID")
}

#[tokio::test]
async fn a_stream_answers_is_acked_and_pushes_each_rotation() {
    let agent = agent("[svid]\nx509_ttl = \"4s\"\n").await;
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();

    // No `workload.spiffe.io` header: SDS does not need one.
    let mut stream = Stream::open(&agent, request(&[ME, "ROOTCA"], "", ""))
        .await
        .unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(
        (first.version_info.as_str(), first.nonce.as_str()),
        ("1", "1")
    );
    let got = secrets(&first);
    assert_eq!(
        got.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        [ME, "ROOTCA"]
    );
    let svid = svid_of(&got[0]);
    assert_eq!(svid.spiffe_id().to_string(), ME);
    // The same certificate and bundle the Workload API serves.
    let from_api = ctx.default_svid().unwrap();
    assert_eq!(
        svid.leaf().as_ref(),
        from_api.leaf().as_ref(),
        "one SVID per identity, shared by both APIs"
    );
    assert_eq!(
        spiffe_validator(&got[1]),
        [("example.org".to_string(), example_org_cas(&ctx))]
    );

    // ACK. The next message must be the rotation (version 2), not an
    // answer to the ACK.
    stream.send(request(&[ME, "ROOTCA"], "1", "1")).await;
    let mut version = 1;
    let mut leaf = svid.leaf().as_ref().to_vec();
    for _ in 0..2 {
        let pushed = stream.next().await.unwrap();
        version += 1;
        assert_eq!(pushed.version_info, version.to_string());
        assert_eq!(pushed.nonce, version.to_string());
        let renewed = svid_of(&secrets(&pushed)[0]);
        assert_eq!(renewed.spiffe_id().to_string(), ME);
        assert_ne!(renewed.leaf().as_ref(), &leaf[..], "a new certificate");
        leaf = renewed.leaf().as_ref().to_vec();
        stream
            .send(request(
                &[ME, "ROOTCA"],
                &pushed.version_info,
                &pushed.nonce,
            ))
            .await;
    }
}

#[tokio::test]
async fn stale_requests_are_ignored_and_new_names_answered() {
    let agent = agent("").await;
    let mut stream = Stream::open(&agent, request(&["ROOTCA"], "", ""))
        .await
        .unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(secrets(&first)[0].name, "ROOTCA");
    // A nonce that is not the last one sent: ignored, whatever it asks.
    stream.send(request(&["ALL"], "1", "0")).await;
    // A NACK of response 1 (Envoy adds error_detail) asks for nothing new.
    let mut nack = request(&["ROOTCA"], "", "1");
    nack.error_detail = Some(sds::google::rpc::Status {
        code: 3,
        message: "test rejects it".into(),
        details: Vec::new(),
    });
    stream.send(nack).await;
    // Other names with the right nonce: answered at once.
    stream.send(request(&["default"], "1", "1")).await;
    let next = stream.next().await.unwrap();
    assert_eq!(next.nonce, "2");
    let got = secrets(&next);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, "default");
    assert_eq!(svid_of(&got[0]).spiffe_id().to_string(), ME);
    let metrics = agent.running().callers.metrics.encode();
    assert!(
        metrics.contains("tessera_sds_rejections_total 1"),
        "the NACK is counted"
    );
}

#[tokio::test]
async fn fetch_secrets_resolves_spires_names() {
    let agent = agent("").await;
    let mut sds = client(&agent).await;
    let fetch = |names: &'static [&'static str]| {
        let mut sds = sds.clone();
        async move {
            sds.fetch_secrets(request(names, "", ""))
                .await
                .map(|r| r.into_inner())
        }
    };
    // Nothing named: every bundle, then every certificate, by their IDs.
    let all = fetch(&[]).await.unwrap();
    assert_eq!((all.version_info.as_str(), all.nonce.as_str()), ("", ""));
    let names: Vec<String> = secrets(&all).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["spiffe://example.org", ME]);

    let named = fetch(&["default", "spiffe://example.org", "ALL"])
        .await
        .unwrap();
    let got = secrets(&named);
    assert_eq!(svid_of(&got[0]).spiffe_id().to_string(), ME);
    assert_eq!(spiffe_validator(&got[1]), spiffe_validator(&got[2]));

    for names in [
        &["spiffe://example.org/someone-else"][..],
        &["spiffe://other.test"],
        &["rootca"],
    ] {
        let status = fetch(names).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{names:?}");
        assert!(status.message().contains(names[0]), "{}", status.message());
    }

    // An Envoy that disables the SPIFFE validator gets a plain trusted_ca.
    let mut plain = request(&["ROOTCA"], "", "");
    plain.node = Some(config_core::Node {
        metadata: Some(prost_types::Struct {
            fields: [(
                "disable_spiffe_cert_validation".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("true".into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    });
    let got = secrets(&sds.fetch_secrets(plain.clone()).await.unwrap().into_inner());
    let Some(tls::secret::Type::ValidationContext(context)) = &got[0].r#type else {
        panic!("{got:?}")
    };
    assert!(context.custom_validator_config.is_none());
    assert!(!pem_certs(inline(&context.trusted_ca)).is_empty());
    // ...and cannot have ALL, which only the SPIFFE validator keeps apart.
    plain.resource_names = vec!["ALL".into()];
    let status = sds.fetch_secrets(plain).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let mut other_type = request(&["default"], "", "");
    other_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let status = sds.fetch_secrets(other_type).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn delta_secrets_is_unimplemented_as_in_spire() {
    let agent = agent("").await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(discovery::DeltaDiscoveryRequest::default())
        .await
        .unwrap();
    let status = client(&agent)
        .await
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn a_caller_without_an_entry_gets_nothing() {
    // The only entry is another uid's.
    let other = my_uid().wrapping_add(1);
    let agent = TestAgent::start(&format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/other\"\nselectors = [\"unix:uid:{other}\"]\n"
    ))
    .await;
    let opened = Stream::open(&agent, request(&["ROOTCA"], "", "")).await;
    let status = match opened {
        Err(status) => status,
        Ok(mut stream) => stream.next().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client(&agent)
        .await
        .fetch_secrets(request(&[], "", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn losing_the_entry_ends_the_stream_with_permission_denied() {
    let agent = agent("").await;
    let mut stream = Stream::open(&agent, request(&["default"], "", ""))
        .await
        .unwrap();
    stream.next().await.unwrap();
    agent
        .running()
        .set_entries(tessera_agent::entries::EntrySet::new(Vec::new()));
    assert_eq!(
        stream.next().await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn every_request_on_a_stream_spends_the_callers_budget() {
    // The smallest rate the config takes; the burst is what is spent here.
    let agent = agent("[limits]\nrequests_per_second = 1\nrequest_burst = 3\n").await;
    // One token to open, one for the first request.
    let mut stream = Stream::open(&agent, request(&["default"], "", ""))
        .await
        .unwrap();
    let first = stream.next().await.unwrap();
    // ACKs are requests too: a flood of them ends the stream (the stream
    // may end before all are sent, hence no unwrap).
    for _ in 0..10 {
        let _ = stream
            .tx
            .send(request(&["default"], "1", &first.nonce))
            .await;
    }
    assert_eq!(
        stream.next().await.unwrap_err().code(),
        Code::ResourceExhausted
    );
}
