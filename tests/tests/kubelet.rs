//! The k8s attestor against a local HTTPS "kubelet" serving real-shaped
//! PodList JSON, with certificates made by openssl(1).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_attestor::kubelet::KubeletConfig;
use tessera_attestor::{
    Attestor, K8sAttestor, K8sAttestorConfig, ProcRoot, ProcessRef, Selector, SelectorSet,
};
use tessera_tests::fake_kubelet::{KubeletState, fake_kubelet, fixture, make_pki, podlist_kubelet};

const POD_UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const CONTAINER: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

/// A fake /proc with one process whose cgroup names the billing container.
fn proc_tree(dir: &Path, cgroup: &str, mountinfo: &str) -> (ProcRoot, ProcessRef) {
    let p = dir.join("proc/4321");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("cgroup"), cgroup).unwrap();
    std::fs::write(p.join("mountinfo"), mountinfo).unwrap();
    (
        ProcRoot::new(dir.join("proc")),
        ProcessRef {
            pid: 4321,
            uid: 0,
            gid: 0,
        },
    )
}

fn attestor(dir: &Path, port: u16, token: Option<PathBuf>) -> K8sAttestor {
    K8sAttestor::new(K8sAttestorConfig {
        kubelet: KubeletConfig {
            host: "127.0.0.1".into(),
            port,
            read_only: false,
            token_path: token,
            ca_path: Some(dir.join("ca.pem")),
            skip_verification: false,
            timeout: Duration::from_secs(5),
        },
        poll_attempts: 10,
        poll_interval: Duration::from_millis(20),
        cache_max_age: Duration::from_secs(5),
    })
}

fn empty_list() -> String {
    r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#.to_string()
}

#[tokio::test]
async fn selectors_from_a_real_shaped_pod_list() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    let (root, process) = proc_tree(dir.path(), &fixture("cgroup/v2-systemd-containerd.txt"), "");
    let set = SelectorSet::new(
        attestor(dir.path(), kubelet.port, None)
            .attest(&process, &root)
            .await
            .unwrap(),
    );
    for s in [
        "k8s:ns:payments",
        "k8s:sa:billing-sa",
        "k8s:node-name:node-a",
        "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
        "k8s:pod-name:billing-7d9f8c6b5-x2x4q",
        "k8s:pod-label:app:billing",
        "k8s:pod-owner:ReplicaSet:billing-7d9f8c6b5",
        "k8s:pod-owner-uid:ReplicaSet:5f1e2d3c-0000-4000-8000-00000000abcd",
        "k8s:container-name:app",
        "k8s:container-image:registry.example/billing:1.4.2",
        "k8s:container-image:registry.example/billing@sha256:2222222222222222222222222222222222222222222222222222222222222222",
        "k8s:pod-image:registry.example/proxy:2.0",
        "k8s:pod-image:registry.example/init:1",
    ] {
        assert!(
            set.contains(&Selector::parse(s).unwrap()),
            "missing {s} in {set:?}"
        );
    }
    assert!(!set.contains(&Selector::parse("k8s:container-name:sidecar").unwrap()));
}

#[tokio::test]
async fn host_process_gets_no_k8s_selectors_and_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    let (root, process) = proc_tree(dir.path(), &fixture("cgroup/v2-host-process.txt"), "");
    let a = attestor(dir.path(), kubelet.port, None);
    assert!(a.attest(&process, &root).await.unwrap().is_empty());
    assert_eq!(kubelet.state.lock().unwrap().requests, 0);
}

#[tokio::test]
async fn the_kernel_cgroup_wins_over_a_forged_mountinfo() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    // cgroup: the sidecar container. mountinfo (forged): the billing app container.
    let sidecar = "4444444444444444444444444444444444444444444444444444444444444444";
    let cgroup = format!("0::/kubepods/pod{POD_UID}/{sidecar}\n");
    let (root, process) = proc_tree(
        dir.path(),
        &cgroup,
        &fixture("cgroup/mountinfo-containerd.txt"),
    );
    let set = SelectorSet::new(
        attestor(dir.path(), kubelet.port, None)
            .attest(&process, &root)
            .await
            .unwrap(),
    );
    assert!(set.contains(&Selector::parse("k8s:container-name:sidecar").unwrap()));
    assert!(!set.contains(&Selector::parse("k8s:container-name:app").unwrap()));
}

/// A host process (its cgroup names no container) whose mount table names a
/// pod's container (bind mount in a user namespace) gets no `k8s:` selectors.
#[tokio::test]
async fn a_host_process_with_a_forged_mountinfo_gets_no_pod_identity() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    let (root, process) = proc_tree(
        dir.path(),
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        &fixture("cgroup/mountinfo-containerd.txt"),
    );
    let selectors = attestor(dir.path(), kubelet.port, None)
        .attest(&process, &root)
        .await
        .unwrap();
    assert!(selectors.is_empty(), "{selectors:?}");
    assert_eq!(kubelet.state.lock().unwrap().requests, 0, "not even asked");
}

#[tokio::test]
async fn a_pod_that_appears_late_is_found_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), "ca.pem");
    let bodies = vec![
        empty_list(),
        empty_list(),
        empty_list(),
        fixture("podlist.json"),
    ];
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies,
            ..Default::default()
        },
    )
    .await;
    let (root, process) = proc_tree(
        dir.path(),
        &fixture("cgroup/v1-cgroupfs-containerd.txt"),
        "",
    );
    let set = SelectorSet::new(
        attestor(dir.path(), kubelet.port, None)
            .attest(&process, &root)
            .await
            .unwrap(),
    );
    assert!(set.contains(&Selector::parse("k8s:ns:payments").unwrap()));
    assert_eq!(kubelet.state.lock().unwrap().requests, 4);

    // Never listed: a clear error after the bounded number of attempts.
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![empty_list()],
            ..Default::default()
        },
    )
    .await;
    let err = attestor(dir.path(), kubelet.port, None)
        .attest(&process, &root)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(CONTAINER) && err.contains("not listed") && err.contains("10 attempts"),
        "{err}"
    );
    assert_eq!(kubelet.state.lock().unwrap().requests, 10);
}

#[tokio::test]
async fn kubelet_down_is_a_clear_error_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), "ca.pem");
    let (root, process) = proc_tree(
        dir.path(),
        &fixture("cgroup/v2-cgroupfs-containerd.txt"),
        "",
    );
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let a = attestor(dir.path(), port, None);
    let err = a.attest(&process, &root).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot connect") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    // The kubelet comes back on the same port: the same attestor recovers.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let _kubelet = fake_kubelet(
        dir.path(),
        Some(listener),
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
    assert!(!a.attest(&process, &root).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_token_is_reread_on_every_request() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), "ca.pem");
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            token_file: Some(token.clone()),
            ..Default::default()
        },
    )
    .await;
    let (root, process) = proc_tree(
        dir.path(),
        &fixture("cgroup/v2-cgroupfs-containerd.txt"),
        "",
    );
    let mut config_attestor = attestor(dir.path(), kubelet.port, Some(token.clone()));
    assert!(
        !config_attestor
            .attest(&process, &root)
            .await
            .unwrap()
            .is_empty()
    );
    std::fs::write(&token, "rotated-token\n").unwrap();
    // A new attestor has no cached list, so it must fetch with the new token.
    config_attestor = attestor(dir.path(), kubelet.port, Some(token.clone()));
    assert!(
        !config_attestor
            .attest(&process, &root)
            .await
            .unwrap()
            .is_empty()
    );
    let seen = kubelet.state.lock().unwrap().tokens_seen.clone();
    assert_eq!(seen, ["Bearer first-token", "Bearer rotated-token"]);

    // A wrong token is refused by the kubelet; the error says so.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let err = attestor(dir.path(), kubelet.port, Some(wrong))
        .attest(&process, &root)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");
}

#[tokio::test]
async fn an_unknown_kubelet_certificate_is_refused_unless_verification_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    // A different CA than the one that signed the kubelet's certificate.
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path(), "ca.pem");
    let (root, process) = proc_tree(
        dir.path(),
        &fixture("cgroup/v2-cgroupfs-containerd.txt"),
        "",
    );
    let err = attestor(other.path(), kubelet.port, None)
        .attest(&process, &root)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");
    let mut config = K8sAttestorConfig {
        kubelet: KubeletConfig {
            host: "127.0.0.1".into(),
            port: kubelet.port,
            read_only: false,
            token_path: None,
            ca_path: None,
            skip_verification: true,
            timeout: Duration::from_secs(5),
        },
        poll_attempts: 1,
        poll_interval: Duration::from_millis(10),
        cache_max_age: Duration::from_secs(5),
    };
    assert!(
        !K8sAttestor::new(config.clone())
            .attest(&process, &root)
            .await
            .unwrap()
            .is_empty()
    );
    config.kubelet.skip_verification = false;
    let err = K8sAttestor::new(config)
        .attest(&process, &root)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no kubelet CA configured"), "{err}");
}

#[tokio::test]
async fn concurrent_attestations_share_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    let (root, process) = proc_tree(dir.path(), &fixture("cgroup/v2-systemd-crio.txt"), "");
    let a = Arc::new(attestor(dir.path(), kubelet.port, None));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (a, root, process) = (a.clone(), root.clone(), process.clone());
        tasks.push(tokio::spawn(async move {
            a.attest(&process, &root).await.map(|s| s.len())
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap() > 5);
    }
    let requests = kubelet.state.lock().unwrap().requests;
    assert_eq!(
        requests, 1,
        "100 concurrent attestations made {requests} /pods requests"
    );
    assert_eq!(a.fetcher().requests(), 1);
}
