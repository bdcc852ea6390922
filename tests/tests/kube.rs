//! The fleet authority against the genuine Kubernetes API server
//! (kube-apiserver 1.37.2 and etcd, built from the Go module proxy by
//! `tests/kube/build.sh`; see `tessera_tests::kube`). Tokens come from the
//! real TokenRequest API, bound to real pod objects; RBAC is the API
//! server's own. The judge of every Kubernetes answer is the API server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tessera_agent::config::Config;
use tessera_agent::fleet::kube::{KubeClient, KubeConfig, ReviewError};
use tessera_agent::fleet::server::{RunningAuthority, start};
use tessera_tests::kube::{KubeApi, SA_ISSUER, TestPod};
use tessera_tests::{TestAgent, my_uid};

const AUDIENCE: &str = "tessera-authority";

/// A namespace with the agent's and the authority's service accounts, and
/// cluster RBAC for the authority (what the chart grants; the chart's own
/// objects are checked in `the_charts_rbac_is_least_privilege`).
struct Cluster {
    api: &'static KubeApi,
    ns: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn new(prefix: &str) -> Self {
        let api = KubeApi::shared();
        let ns = api.namespace(prefix, json!({})).await;
        for sa in ["tessera-agent", "tessera-authority", "someone-else"] {
            api.service_account(&ns, sa).await;
        }
        Self {
            api,
            ns,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Grants the authority's service account what attestation needs.
    async fn grant_authority(&self) {
        let name = format!("{}-authority", self.ns);
        self.api
            .create(
                "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": name},
                   "rules": [
                     {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                     {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
            )
            .await;
        self.api
            .create(
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": "tessera-authority", "namespace": self.ns}]}),
            )
            .await;
    }

    /// The authority's own API token (audience: the API server), in a file.
    async fn authority_token_file(&self) -> std::path::PathBuf {
        let token = self
            .api
            .token(&self.ns, "tessera-authority", SA_ISSUER, None)
            .await;
        KubeApi::token_file(self.dir.path(), "authority-token", &token)
    }

    fn kube_config(&self, token_file: &Path) -> KubeConfig {
        KubeConfig {
            api_server: self.api.url.clone(),
            ca_file: self.api.ca_file.clone(),
            token_file: token_file.to_path_buf(),
            audience: AUDIENCE.into(),
            allowed_service_accounts: vec![format!("{}:tessera-agent", self.ns)],
            pod_cache_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }
    }

    /// An agent pod on `node` and a token bound to it, as the kubelet would
    /// project it (audience `tessera-authority`).
    async fn agent_pod(&self, name: &str, node: &str) -> (Value, String) {
        let pod = self
            .api
            .pod(TestPod {
                ns: &self.ns,
                name,
                sa: "tessera-agent",
                node,
                labels: json!({"app": "tessera-agent"}),
                containers: &[("agent", "tessera:test")],
                running: true,
            })
            .await;
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        let token = self
            .api
            .token(&self.ns, "tessera-agent", AUDIENCE, Some((name, &uid)))
            .await;
        (pod, token)
    }

    /// The `[server.kubernetes]` table for this cluster.
    fn server_kubernetes(&self, token_file: &Path) -> String {
        format!(
            "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{}:tessera-agent\"]\n",
            self.api.url,
            self.api.ca_file.display(),
            token_file.display(),
            self.ns
        )
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts an authority replica from config text; `dir` holds its keys.
async fn authority(
    dir: &Path,
    entries: &str,
    server_extra: &str,
    admin: bool,
) -> (RunningAuthority, u16) {
    let keys = dir.join("keys");
    if !keys.exists() {
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        tessera_agent::identity::key_files::init_key_dir(
            &td,
            &keys,
            Duration::from_secs(86400),
            SystemTime::now(),
        )
        .unwrap();
    }
    let port = free_port();
    let admin_table = if admin {
        "[admin]\nlisten = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let text = format!(
        "trust_domain = \"example.org\"\n{entries}\n{admin_table}[server]\nlisten = \"127.0.0.1:{port}\"\nkeys_dir = \"{}\"\naudit_log = \"{}/audit-{port}.jsonl\"\n{server_extra}",
        keys.display(),
        dir.display(),
    );
    let cfg = Config::parse(&text, "authority.toml").unwrap();
    for w in &cfg.warnings {
        eprintln!("authority config warning: {w}");
    }
    let running = start(
        cfg.trust_domain,
        cfg.entries,
        cfg.server.unwrap(),
        cfg.admin_listen,
        Arc::new(tessera_agent::clock::SystemClock),
    )
    .await
    .unwrap();
    (running, port)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `f` every 200 ms until it is true or `limit` passes.
async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_of_real_bound_tokens_names_the_node_and_pods_list_by_node() {
    let c = Cluster::new("review").await;
    c.grant_authority().await;
    let kube = KubeClient::new(c.kube_config(&c.authority_token_file().await)).unwrap();

    let (_, token_a) = c.agent_pod("agent-a", "node-a").await;
    let node = kube.review_token(&token_a).await.unwrap();
    assert_eq!(node.node_name, "node-a");
    assert_eq!(node.agent_pod, format!("{}/agent-a", c.ns));

    // Refusals, each for the reason the API server's answer gives.
    let other_aud = c
        .api
        .token(&c.ns, "tessera-agent", "someone-else", None)
        .await;
    let unbound = c.api.token(&c.ns, "tessera-agent", AUDIENCE, None).await;
    let other_pod = c
        .api
        .pod(TestPod {
            ns: &c.ns,
            name: "web",
            sa: "someone-else",
            node: "node-a",
            labels: json!({}),
            containers: &[("web", "web:1")],
            running: true,
        })
        .await;
    let other_sa = c
        .api
        .token(
            &c.ns,
            "someone-else",
            AUDIENCE,
            Some(("web", other_pod["metadata"]["uid"].as_str().unwrap())),
        )
        .await;
    for (token, why) in [
        (other_aud.as_str(), "not authenticated"),
        (unbound.as_str(), "not bound to a pod"),
        (other_sa.as_str(), "not allowed"),
        ("forged.token.value", "not authenticated"),
    ] {
        let err = kube.review_token(token).await.unwrap_err();
        assert!(
            matches!(&err, ReviewError::Rejected(m) if m.contains(why)),
            "{why}: {err:?}"
        );
    }

    // Pods by node, with the real field selector.
    c.api
        .pod(TestPod {
            ns: &c.ns,
            name: "db",
            sa: "someone-else",
            node: "node-b",
            labels: json!({}),
            containers: &[("db", "db:1")],
            running: true,
        })
        .await;
    let on_a = kube.pods_on_node("node-a", true).await.unwrap();
    let names: Vec<&str> = on_a
        .items
        .iter()
        .filter(|p| p.metadata.namespace == c.ns)
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"agent-a") && names.contains(&"web"));
    assert!(on_a.items.iter().all(|p| p.spec.node_name == "node-a"));

    // A deleted pod's token stops attesting (once the API server's token
    // cache lets go of it, about 10 s).
    let (status, _) = c
        .api
        .request(
            http::Method::DELETE,
            &format!(
                "/api/v1/namespaces/{}/pods/agent-a?gracePeriodSeconds=0",
                c.ns
            ),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(30), async || kube
            .review_token(&token_a)
            .await
            .is_err())
        .await,
        "the token of a deleted pod still attests"
    );

    // The authority's own token, rejected by the API server: unavailable,
    // not a verdict on the agent's token.
    std::fs::write(c.dir.path().join("authority-token"), "not-a-token").unwrap();
    let err = kube.review_token(&token_a).await.unwrap_err();
    assert!(
        matches!(&err, ReviewError::Unavailable(m) if m.contains("401")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_is_not_ready_while_the_api_server_refuses_it() {
    let c = Cluster::new("ready").await;
    let token_file = c.authority_token_file().await;
    let (authority, _) = authority(c.dir.path(), "", &c.server_kubernetes(&token_file), true).await;
    let admin = authority.admin_addr.unwrap();

    // No RBAC yet: the API server answers 403 to everything it needs.
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("may not create tokenreviews"), "{body}");

    c.grant_authority().await;
    assert!(
        eventually(Duration::from_secs(15), async || get(admin, "/readyz")
            .await
            .0
            == 200)
        .await,
        "ready once RBAC allows what it needs"
    );

    // A token the API server rejects (401).
    std::fs::write(&token_file, "not-a-token").unwrap();
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(15), async || {
            let (status, body) = get(admin, "/readyz").await;
            last = body;
            status == 503
        })
        .await,
        "still ready with a rejected token"
    );
    assert!(last.contains("401"), "{last}");
    authority.shutdown();
}

/// A workload on a Kubernetes node, attested with a real bound token: gets
/// its identity even before the kubelet reports its container, and an entry
/// no node can be entitled to neither blocks it nor is reported as an
/// outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kubernetes_workload_gets_its_identity_before_the_kubelet_reports_it() {
    let c = Cluster::new("psat").await;
    c.grant_authority().await;
    let token_file = c.authority_token_file().await;
    let ns = &c.ns;
    // The authority entitles pods of this namespace by their service account.
    let entries = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/ns/{{k8s:ns}}/sa/{{k8s:sa}}\"\nselectors = [\"k8s:ns:{ns}\"]\n\
         [[entries]]\nspiffe_id = \"spiffe://example.org/uid/{{unix:uid}}\"\nselectors = [\"k8s:ns:{ns}\"]\n"
    );
    let (authority, port) = authority(
        c.dir.path(),
        &entries,
        &c.server_kubernetes(&token_file),
        false,
    )
    .await;
    let (_, agent_token) = c.agent_pod("agent-a", "node-a").await;
    // The workload's pod exists and is scheduled, but no kubelet has
    // reported its container yet.
    c.api.service_account(ns, "billing").await;
    c.api
        .pod(TestPod {
            ns,
            name: "billing-0",
            sa: "billing",
            node: "node-a",
            labels: json!({"app": "billing"}),
            containers: &[("main", "billing:1")],
            running: false,
        })
        .await;

    // The agent maps this process to the billing identity (its own view of
    // the node) and also to a {unix:uid} template, which no authority can
    // confirm: skipped at load with a warning.
    let agent_body = |token: &Path| {
        format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/uid/{{unix:uid}}\"\nselectors = [\"unix:uid:{me}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/ns/{ns}/sa/billing\"\nselectors = [\"unix:uid:{me}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/ns/{ns}/sa/payroll\"\nselectors = [\"unix:uid:{me}\"]\n\
             [upstream]\naddresses = [\"127.0.0.1:{port}\"]\nbundle_file = \"{}\"\nnode_attestation = \"k8s_psat\"\ntoken_file = \"{}\"\n",
            c.dir.path().join("keys/ca.crt").display(),
            token.display(),
            me = my_uid(),
        )
    };
    let d = tempfile::tempdir().unwrap();
    let token = KubeApi::token_file(d.path(), "token", &agent_token);
    let body = agent_body(&token);
    let text = TestAgent::config_text(d.path(), &body);
    let cfg = Config::parse(&text, "agent.toml").unwrap();
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.contains("{unix:uid}") && w.contains("skipped")),
        "{:?}",
        cfg.warnings
    );
    assert_eq!(cfg.entries.len(), 2);
    let agent = TestAgent::start_in(d, &body).await;

    // Judged by the spiffe crate: the billing SVID arrives although payroll
    // (no such pod on node-a) is refused by the authority.
    let svid = agent.spiffe_client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://example.org/ns/{ns}/sa/billing")
    );
    let jwt = agent
        .spiffe_client()
        .await
        .fetch_jwt_svid(["db"], None)
        .await
        .unwrap();
    assert_eq!(
        jwt.spiffe_id().to_string(),
        format!("spiffe://example.org/ns/{ns}/sa/billing")
    );
    // Asked for the refused one alone: PermissionDenied, not Unavailable
    // (which clients retry for ever). The spiffe crate reads it as "no
    // identity issued"; the raw status names the authority's reason.
    let payroll = format!("spiffe://example.org/ns/{ns}/sa/payroll");
    let err = agent
        .spiffe_client()
        .await
        .fetch_jwt_svid(["db"], Some(&spiffe::SpiffeId::new(&payroll).unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            spiffe::workload_api::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );
    let channel = tessera_tests::raw_channel(&agent.socket()).await;
    let status = tessera_workload_api::client::SpiffeWorkloadApiClient::new(channel)
        .fetch_jwtsvid(tessera_workload_api::with_security_header(
            tessera_workload_api::JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: payroll,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("not entitled"), "{status:?}");

    // Node B runs no billing pod: the same local mapping gets nothing there.
    let (_, token_b) = c.agent_pod("agent-b", "node-b").await;
    let d = tempfile::tempdir().unwrap();
    let token = KubeApi::token_file(d.path(), "token", &token_b);
    let on_b = TestAgent::start_in(d, &agent_body(&token)).await;
    let err = on_b
        .spiffe_client()
        .await
        .fetch_jwt_svid(["db"], None)
        .await
        .expect_err("node-b runs no billing pod");
    assert!(
        matches!(
            err,
            spiffe::workload_api::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );

    // A token for another audience is refused without echoing the API
    // server's own error text to the unauthenticated caller; the operator
    // finds it in the audit log.
    let wrong = c.api.token(ns, "tessera-agent", "someone-else", None).await;
    let d = tempfile::tempdir().unwrap();
    let token = KubeApi::token_file(d.path(), "token", &wrong);
    let text = TestAgent::config_text(d.path(), &agent_body(&token));
    let err = tessera_agent::app::start(
        Config::parse(&text, "agent.toml").unwrap(),
        Arc::new(tessera_agent::clock::SystemClock),
    )
    .await
    .err()
    .expect("a token for another audience does not attest");
    let err = format!("{err:#}");
    assert!(err.contains("401") && !err.contains("audience"), "{err}");

    let audit = std::fs::read_to_string(c.dir.path().join(format!("audit-{port}.jsonl"))).unwrap();
    assert!(audit.contains("\"node_attested\"") && audit.contains(&format!("{ns}/agent-a")));
    assert!(audit.contains("\"refused\"") && audit.contains("node-b"));
    assert!(
        audit.contains("audience"),
        "the reason is in the audit record"
    );
    authority.shutdown();
}

/// What the API server says when the agent's pod meets a namespace that
/// enforces the `baseline` Pod Security level: docs/kubernetes.md quotes it,
/// so an operator who reads it in `kubectl describe daemonset` finds the fix.
/// (The chart's own rendered DaemonSet is applied in tests/helm.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_quote_the_pod_security_refusal_of_the_agent_pod() {
    let api = KubeApi::shared();
    let pod = |ns: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "tessera-agent", "namespace": ns},
          "spec": {"hostPID": true, "automountServiceAccountToken": false, "serviceAccountName": "tessera",
            "containers": [{"name": "agent", "image": "tessera:test",
              "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"], "add": ["SYS_PTRACE"]}},
              "volumeMounts": [{"name": "sockets", "mountPath": "/run/tessera/sockets"}]}],
            "volumes": [{"name": "sockets", "hostPath": {"path": "/run/tessera/sockets", "type": "DirectoryOrCreate"}}]}})
    };
    let baseline = api
        .namespace(
            "psa",
            json!({"pod-security.kubernetes.io/enforce": "baseline"}),
        )
        .await;
    api.service_account(&baseline, "tessera").await;
    let (status, answer) = api
        .request(
            http::Method::POST,
            &format!("/api/v1/namespaces/{baseline}/pods?dryRun=All"),
            Some(&pod(&baseline)),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    let message = answer["message"].as_str().unwrap();
    eprintln!("{message}");
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/kubernetes.md"
    ))
    .unwrap();
    let docs = docs.split_whitespace().collect::<Vec<_>>().join(" ");
    for fragment in [
        "violates PodSecurity \"baseline:latest\"",
        "host namespaces (hostPID=true)",
        "hostPath volumes (volume \"sockets\")",
        "non-default capabilities (container \"agent\" must not include \"SYS_PTRACE\" in securityContext.capabilities.add)",
    ] {
        assert!(message.contains(fragment), "the API server says: {message}");
        assert!(
            docs.contains(fragment),
            "docs/kubernetes.md does not quote {fragment:?}"
        );
    }
    let privileged = api
        .namespace(
            "psa",
            json!({"pod-security.kubernetes.io/enforce": "privileged"}),
        )
        .await;
    api.service_account(&privileged, "tessera").await;
    let (status, answer) = api
        .request(
            http::Method::POST,
            &format!("/api/v1/namespaces/{privileged}/pods?dryRun=All"),
            Some(&pod(&privileged)),
        )
        .await;
    assert_eq!(status, 201, "admitted where privileged pods are: {answer}");
}
