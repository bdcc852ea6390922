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

#[tokio::test]
async fn slow_http_clients_are_cut_off_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut agent = TestAgent::start(&format!(
        "{}[exchange]\n[limits]\nhttp_header_timeout = \"500ms\"\nhttp_request_timeout = \"1s\"\n",
        TestAgent::entry_for_me("slow", "default")
    ))
    .await;
    let xsock = agent.dir.path().join("sock/exchange.sock");

    // Headers that never finish: the connection is closed.
    let mut slow_head = tokio::net::UnixStream::connect(&xsock).await.unwrap();
    slow_head
        .write_all(b"POST /introspect HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // A body that never arrives: 408.
    let mut slow_body = tokio::net::UnixStream::connect(&xsock).await.unwrap();
    slow_body
        .write_all(b"POST /introspect HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=")
        .await
        .unwrap();

    // Meanwhile an honest request is answered at once.
    let (status, _) =
        tessera_agent::cli::client::http_unix(&xsock, http::Method::GET, "/jwks", None)
            .await
            .unwrap();
    assert_eq!(status, 200);

    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), slow_head.read_to_end(&mut buf))
        .await
        .expect("the slow-header connection is closed by the agent")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");

    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow_body.read_to_end(&mut buf))
        .await
        .expect("the slow-body request is answered")
        .ok();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    agent.stop().await;
}
