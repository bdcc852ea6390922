//! The admin HTTP endpoints, spoken to with plain HTTP/1.1 over TCP.

use std::io::{Read, Write};

use tessera_tests::TestAgent;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        TestAgent::entry_for_me("m", "")
    );
    let mut agent = TestAgent::start(&body).await;
    let addr = agent.running().admin_addr.expect("admin listener bound");
    let client = agent.spiffe_client().await;
    client.fetch_x509_svid().await.unwrap();
    client.fetch_jwt_svid(["a"], None).await.unwrap();
    client.fetch_jwt_svid(["a"], None).await.unwrap();

    let (status, metrics) = tokio::task::spawn_blocking(move || {
        assert_eq!(get(addr, "/healthz").0, 200);
        assert_eq!(get(addr, "/readyz").0, 200);
        get(addr, "/metrics")
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            "tessera_workload_api_requests_total{method=\"FetchJWTSVID\",code=\"OK\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(&metrics, "tessera_svids_issued_total{method=\"jwt\"}"),
        1.0,
        "second JWT came from the cache"
    );
    assert_eq!(
        sample(&metrics, "tessera_svids_issued_total{method=\"x509\"}"),
        1.0
    );
    assert_eq!(sample(&metrics, "tessera_cached_identities"), 1.0);
    let ca = sample(&metrics, "tessera_ca_expiry_seconds");
    assert!(ca > 23.0 * 3600.0 && ca <= 24.0 * 3600.0, "{ca}");
    let svid = sample(&metrics, "tessera_svid_expiry_seconds");
    assert!(svid > 3500.0 && svid <= 3600.0, "{svid}");
    assert!(metrics.contains("tessera_workload_api_request_duration_seconds_bucket"));
    assert!(
        !metrics.contains("spiffe://"),
        "no SPIFFE IDs in metric labels"
    );
    agent.stop().await;
}
