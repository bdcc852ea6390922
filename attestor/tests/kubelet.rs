//! The k8s attestor against a local HTTPS "kubelet" serving real-shaped
//! PodList JSON, with certificates made by openssl(1).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use tessera_attestor::kubelet::KubeletConfig;
use tessera_attestor::{
    Attestor, K8sAttestor, K8sAttestorConfig, ProcRoot, ProcessRef, Selector, SelectorSet,
};

const POD_UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const CONTAINER: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl(1) is required for this test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a kubelet serving certificate for 127.0.0.1.
fn make_pki(dir: &Path, ca_name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        ca_name,
        "-subj",
        "/CN=kubelet-ca",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=node-a",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            ca_name,
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[derive(Default)]
struct KubeletState {
    /// Served body per request number (the last one repeats).
    bodies: Vec<String>,
    requests: usize,
    tokens_seen: Vec<String>,
    token_file: Option<PathBuf>,
}

struct FakeKubelet {
    port: u16,
    state: Arc<Mutex<KubeletState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_kubelet(
    dir: &Path,
    listener: Option<tokio::net::TcpListener>,
    state: KubeletState,
) -> FakeKubelet {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(Mutex::new(state));
    let shared = state.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, state) = (acceptor.clone(), shared.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let mut st = state.lock().unwrap();
                            st.requests += 1;
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            st.tokens_seen.push(auth.clone());
                            let expected = st.token_file.as_ref().map(|p| {
                                format!("Bearer {}", std::fs::read_to_string(p).unwrap().trim())
                            });
                            let (status, body) = if req.uri().path() != "/pods" {
                                (404, String::new())
                            } else if expected.is_some_and(|e| e != auth) {
                                (401, "Unauthorized".to_string())
                            } else {
                                let i = (st.requests - 1).min(st.bodies.len() - 1);
                                (200, st.bodies[i].clone())
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeKubelet { port, state, task }
}

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
    make_pki(dir.path(), "ca.pem");
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
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
    make_pki(dir.path(), "ca.pem");
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
    let (root, process) = proc_tree(dir.path(), &fixture("cgroup/v2-host-process.txt"), "");
    let a = attestor(dir.path(), kubelet.port, None);
    assert!(a.attest(&process, &root).await.unwrap().is_empty());
    assert_eq!(kubelet.state.lock().unwrap().requests, 0);
}

#[tokio::test]
async fn the_kernel_cgroup_wins_over_a_forged_mountinfo() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), "ca.pem");
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
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
    make_pki(dir.path(), "ca.pem");
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
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
    make_pki(dir.path(), "ca.pem");
    let kubelet = fake_kubelet(
        dir.path(),
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await;
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
