//! Abuse from one caller stays that caller's problem: connection caps,
//! oversized requests, slow clients. Judged with the `spiffe` crate's client.

use std::time::Duration;

use tessera_tests::{TestAgent, raw_channel};
use tessera_workload_api as pb;

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_slots_come_back() {
    let mut agent = TestAgent::start(&format!(
        "{}[limits]\nmax_connections = 3\n",
        TestAgent::entry_for_me("capped", "default")
    ))
    .await;
    // Three idle connections fill the cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::UnixStream::connect(agent.socket())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        agent.spiffe_client().await.fetch_x509_svid().await
    })
    .await
    .expect("a refused connection fails fast");
    assert!(refused.is_err(), "the fourth connection was served");

    // Closing one frees its slot for an honest client.
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let svid = agent.spiffe_client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/capped");
    drop(held);
    agent.stop().await;
}

#[tokio::test]
async fn oversized_grpc_requests_are_refused_from_the_length_prefix() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("big", "default")).await;
    let channel = raw_channel(&agent.socket()).await;
    let mut client = pb::client::SpiffeWorkloadApiClient::new(channel);
    let status = client
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["a".repeat(200 * 1024)],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    // The same connection and the agent keep serving normal requests.
    let ok = client
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(ok.get_ref().svids.len(), 1);
    agent.stop().await;
}
