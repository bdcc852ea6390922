//! End to end: this test process, seen through a fake /proc whose cgroup file
//! puts it in a containerd container, gets `spiffe://<td>/ns/<ns>/sa/<sa>` over
//! the Workload API from pod facts served by a local HTTPS kubelet. Judged by
//! the `spiffe` crate's client.

use tessera_tests::TestAgent;
use tessera_tests::fake_kubelet::{KubeletState, fake_kubelet, fixture, make_pki};

#[tokio::test]
async fn a_pod_process_gets_its_namespace_and_service_account_identity() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path(), "ca.pem");
    std::fs::write(pki.path().join("token"), "sa-token").unwrap();
    let kubelet = fake_kubelet(
        pki.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            token_file: Some(pki.path().join("token")),
            ..Default::default()
        },
    )
    .await;

    // Fake /proc: this process's real stat/status, and a containerd cgroup.
    let me = std::process::id();
    let proc_dir = pki.path().join("proc").join(me.to_string());
    std::fs::create_dir_all(&proc_dir).unwrap();
    for f in ["stat", "status"] {
        std::fs::copy(format!("/proc/{me}/{f}"), proc_dir.join(f)).unwrap();
    }
    std::fs::write(
        proc_dir.join("cgroup"),
        fixture("cgroup/v2-systemd-containerd.txt"),
    )
    .unwrap();

    let p = pki.path().display();
    let body = format!(
        r#"[attestor]
proc_root = "{p}/proc"

[attestor.k8s]
kubelet_host = "127.0.0.1"
kubelet_port = {port}
kubelet_ca_path = "{p}/ca.pem"
token_path = "{p}/token"

[[entries]]
spiffe_id = "spiffe://example.org/ns/{{k8s:ns}}/sa/{{k8s:sa}}"
selectors = ["k8s:ns", "k8s:sa"]
"#,
        port = kubelet.port
    );
    let mut agent = TestAgent::start(&body).await;
    let client = agent.spiffe_client().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/ns/payments/sa/billing-sa"
    );
    let jwt = client.fetch_jwt_svid(["db"], None).await.unwrap();
    assert_eq!(
        jwt.spiffe_id().to_string(),
        "spiffe://example.org/ns/payments/sa/billing-sa"
    );
    // One connection, one attestation: the kubelet was asked once.
    assert_eq!(kubelet.state.lock().unwrap().requests, 1);
    agent.stop().await;
}
