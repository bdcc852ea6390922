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
use tessera_tests::kube::{KubeApi, SA_ISSUER, TestPod, render_chart};
use tessera_tests::{TestAgent, my_uid};

const AUDIENCE: &str = "tessera-authority";

/// A namespace with the agent's and the authority's service accounts, and
/// cluster RBAC for the authority (the attestation part of what the chart
/// grants; the chart's own objects are checked in
/// `the_charts_rbac_is_least_privilege` below).
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

/// Applies the chart's CRDs (`helm/tessera/crds/`) and waits until the API
/// server serves them.
fn apply_chart_crds(api: &KubeApi) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/tessera/crds/");
    let (ok, out, err) = api.kubectl(&["apply", "--server-side", "-f", dir], None);
    assert!(ok, "the chart's CRDs are refused: {out}{err}");
    let (ok, out, err) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/revocationbatches.tessera.dev",
            "crd/clusterworkloadentries.tessera.dev",
            "crd/workloadentries.tessera.dev",
            "crd/jointokens.tessera.dev",
            "crd/nodedenials.tessera.dev",
            "crd/federationrelationships.tessera.dev",
            "crd/federatedbundles.tessera.dev",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
}

/// Every (API group, resource, verb) a SelfSubjectRulesReview says the
/// holder of `token` has in `ns`, without what every authenticated user has
/// (`system:basic-user`: reviewing itself).
async fn granted(api: &KubeApi, token: &str, ns: &str) -> std::collections::BTreeSet<String> {
    let (status, answer) = api
        .request_as(
            token,
            http::Method::POST,
            "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
            "application/json",
            Some(
                &json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                         "spec": {"namespace": ns}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["status"]["incomplete"], false, "{answer}");
    let mut out = std::collections::BTreeSet::new();
    for rule in answer["status"]["resourceRules"].as_array().unwrap() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        assert!(
            list("resourceNames").is_empty(),
            "no rule is limited by name: {rule}"
        );
        for g in list("apiGroups") {
            for r in list("resources") {
                if r.starts_with("selfsubject") {
                    continue;
                }
                for v in list("verbs") {
                    out.insert(format!("{v} {r}.{g}"));
                }
            }
        }
    }
    out
}

/// The chart's RBAC, proven by the API server: every manifest the chart
/// renders (the authority on, fleet state and live registration on) passes a
/// server-side dry-run; with its ServiceAccounts, Roles and Bindings created
/// for real, SubjectAccessReview allows each account exactly what the code
/// needs and refuses the probes an attacker would try (secrets, writing
/// pods, other namespaces, entry specs); SelfSubjectRulesReview lists
/// nothing more; and an authority running with the chart's account is ready
/// (its own readiness check asks the API server for every permission it
/// uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_is_least_privilege() {
    let api = KubeApi::shared();
    apply_chart_crds(api);
    let ns = api
        .namespace(
            "chart",
            json!({"pod-security.kubernetes.io/enforce": "privileged"}),
        )
        .await;
    // What the serviceaccount controller (not run here) would create; the
    // chart's helm-test pod runs as it.
    api.service_account(&ns, "default").await;
    let other = api.namespace("other", json!({})).await;
    let release = format!("t{}", &ns[ns.len().saturating_sub(6)..].replace('-', ""));
    let values = json!({"authority": {"enabled": true, "keysSecret": "tessera-authority-keys",
                                      "bundleConfigMap": "tessera-authority-bundle",
                                      "registration": {"federation": true}}});
    let list = render_chart(&release, &ns, &values);
    let items = list["items"].as_array().unwrap();

    // Every rendered manifest, as the API server would take it.
    let (ok, out, err) = api.kubectl(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            "-",
        ],
        Some(&list.to_string()),
    );
    assert!(ok, "server-side dry-run refused: {out}{err}");
    let applied = out
        .lines()
        .filter(|l| l.contains("(server dry run)"))
        .count();
    assert_eq!(applied, items.len(), "{out}");
    let kinds: std::collections::BTreeSet<&str> =
        items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    eprintln!("dry-run accepted {applied} manifests: {kinds:?}");
    for k in [
        "DaemonSet",
        "Deployment",
        "PodDisruptionBudget",
        "ClusterRole",
        "Role",
    ] {
        assert!(kinds.contains(k), "{k} rendered: {kinds:?}");
    }

    // The accounts and their permissions, for real.
    let rbac: Vec<&Value> = items
        .iter()
        .filter(|i| {
            matches!(
                i["kind"].as_str().unwrap(),
                "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        })
        .collect();
    let rbac_list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    let (ok, out, err) = api.kubectl(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&rbac_list.to_string()),
    );
    assert!(ok, "{out}{err}");

    let account = |authority: bool| {
        items
            .iter()
            .find(|i| {
                i["kind"] == "ServiceAccount"
                    && (i["metadata"]["labels"]["app.kubernetes.io/component"] == "authority")
                        == authority
            })
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .unwrap()
    };
    let authority_sa = account(true);
    let agent_sa = account(false);
    let groups = |_: &str| {
        vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".to_string(),
        ]
    };
    // (verb, group, resource[/subresource], namespace or cluster-wide, why)
    type Probe<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, &'a str);
    let authority_may: Vec<Probe<'_>> = vec![
        (
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            None,
            "check agents' projected tokens",
        ),
        (
            "get",
            "",
            "pods",
            Some(&other),
            "the pod a token is bound to",
        ),
        (
            "list",
            "",
            "pods",
            None,
            "pods on a node (field selector), for entitlement",
        ),
        (
            "create",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "write revocation batches",
        ),
        (
            "list",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "load the fleet's revocations",
        ),
        (
            "watch",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "follow them",
        ),
        (
            "deletecollection",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "collect expired batches",
        ),
        (
            "list",
            "tessera.dev",
            "clusterworkloadentries",
            None,
            "load live entries",
        ),
        (
            "watch",
            "tessera.dev",
            "clusterworkloadentries",
            None,
            "follow them",
        ),
        (
            "list",
            "tessera.dev",
            "workloadentries",
            None,
            "load teams' entries",
        ),
        (
            "watch",
            "tessera.dev",
            "workloadentries",
            None,
            "follow them",
        ),
        (
            "patch",
            "tessera.dev",
            "clusterworkloadentries/status",
            None,
            "the Ready condition",
        ),
        (
            "patch",
            "tessera.dev",
            "workloadentries/status",
            Some(&other),
            "the Ready condition",
        ),
        (
            "get",
            "tessera.dev",
            "jointokens",
            Some(&ns),
            "read a join token",
        ),
        (
            "delete",
            "tessera.dev",
            "jointokens",
            Some(&ns),
            "redeem it once (preconditions)",
        ),
        (
            "list",
            "tessera.dev",
            "jointokens",
            Some(&ns),
            "find expired ones",
        ),
        (
            "list",
            "tessera.dev",
            "nodedenials",
            Some(&ns),
            "load node denials",
        ),
        (
            "watch",
            "tessera.dev",
            "nodedenials",
            Some(&ns),
            "enforce them at once",
        ),
        (
            "list",
            "tessera.dev",
            "federationrelationships",
            None,
            "load federation relationships",
        ),
        (
            "watch",
            "tessera.dev",
            "federationrelationships",
            None,
            "follow them",
        ),
        (
            "patch",
            "tessera.dev",
            "federationrelationships/status",
            None,
            "the Ready condition",
        ),
        (
            "list",
            "tessera.dev",
            "federatedbundles",
            Some(&ns),
            "load the kept foreign bundles at start",
        ),
        (
            "create",
            "tessera.dev",
            "federatedbundles",
            Some(&ns),
            "keep a fetched bundle (server-side apply)",
        ),
        (
            "patch",
            "tessera.dev",
            "federatedbundles",
            Some(&ns),
            "replace it (server-side apply)",
        ),
        (
            "delete",
            "tessera.dev",
            "federatedbundles",
            Some(&ns),
            "a relationship ended",
        ),
    ];
    let authority_may_not: Vec<Probe<'_>> = vec![
        (
            "get",
            "",
            "secrets",
            Some(&ns),
            "its own namespace's secrets",
        ),
        ("list", "", "secrets", None, "any secret"),
        ("watch", "", "pods", None, "never used"),
        ("create", "", "pods", Some(&ns), "run a pod"),
        ("update", "", "pods", Some(&other), "change a pod"),
        ("delete", "", "pods", Some(&other), "delete a pod"),
        (
            "patch",
            "",
            "pods/status",
            Some(&ns),
            "forge a pod's status",
        ),
        (
            "create",
            "",
            "serviceaccounts/token",
            Some(&ns),
            "mint tokens",
        ),
        ("get", "", "nodes", None, "nodes"),
        (
            "create",
            "rbac.authorization.k8s.io",
            "rolebindings",
            Some(&ns),
            "grant itself more",
        ),
        (
            "get",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "never used",
        ),
        (
            "update",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "batches are immutable",
        ),
        (
            "delete",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "only by expiry bucket",
        ),
        (
            "create",
            "tessera.dev",
            "revocationbatches",
            Some(&other),
            "another namespace",
        ),
        (
            "list",
            "tessera.dev",
            "revocationbatches",
            Some(&other),
            "another namespace",
        ),
        (
            "create",
            "tessera.dev",
            "clusterworkloadentries",
            None,
            "register identities itself",
        ),
        (
            "patch",
            "tessera.dev",
            "clusterworkloadentries",
            None,
            "change an entry's spec",
        ),
        (
            "update",
            "tessera.dev",
            "workloadentries",
            Some(&other),
            "change a team's entry",
        ),
        (
            "delete",
            "tessera.dev",
            "workloadentries",
            Some(&other),
            "delete a team's entry",
        ),
        (
            "update",
            "tessera.dev",
            "clusterworkloadentries/status",
            None,
            "patch only",
        ),
        (
            "create",
            "tessera.dev",
            "jointokens",
            Some(&ns),
            "mint join tokens",
        ),
        (
            "get",
            "tessera.dev",
            "jointokens",
            Some(&other),
            "another namespace",
        ),
        (
            "create",
            "tessera.dev",
            "nodedenials",
            Some(&ns),
            "operators deny nodes",
        ),
        (
            "delete",
            "tessera.dev",
            "nodedenials",
            Some(&ns),
            "lift a denial",
        ),
        (
            "create",
            "tessera.dev",
            "federationrelationships",
            None,
            "trust a domain on its own",
        ),
        (
            "patch",
            "tessera.dev",
            "federationrelationships",
            None,
            "change a relationship's spec",
        ),
        (
            "delete",
            "tessera.dev",
            "federationrelationships",
            None,
            "end a relationship",
        ),
        (
            "watch",
            "tessera.dev",
            "federatedbundles",
            Some(&ns),
            "never used",
        ),
        (
            "create",
            "tessera.dev",
            "federatedbundles",
            Some(&other),
            "another namespace",
        ),
    ];
    let agent_may: Vec<Probe<'_>> = vec![(
        "get",
        "",
        "nodes/pods",
        None,
        "the kubelet's pod list (webhook authorization)",
    )];
    let agent_may_not: Vec<Probe<'_>> = vec![
        ("get", "", "nodes/proxy", None, "the whole kubelet API"),
        ("get", "", "secrets", Some(&ns), "secrets"),
        ("list", "", "pods", None, "the API server's pods"),
        ("create", "", "pods", Some(&ns), "run a pod"),
        (
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            None,
            "the authority's job",
        ),
        (
            "list",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "the authority's state",
        ),
        (
            "create",
            "tessera.dev",
            "revocationbatches",
            Some(&ns),
            "the authority's state",
        ),
        (
            "list",
            "tessera.dev",
            "clusterworkloadentries",
            None,
            "entries come from the authority",
        ),
    ];
    let mut table = String::from(
        "| account | verb | resource | namespace | allowed | why |\n|---|---|---|---|---|---|\n",
    );
    for (sa, may, may_not) in [
        (&authority_sa, &authority_may, &authority_may_not),
        (&agent_sa, &agent_may, &agent_may_not),
    ] {
        let user = format!("system:serviceaccount:{ns}:{sa}");
        let g = groups(sa);
        let g: Vec<&str> = g.iter().map(String::as_str).collect();
        for (expect, probes) in [(true, may), (false, may_not)] {
            for (verb, group, resource, place, why) in probes.iter() {
                let allowed = api.can(&user, &g, verb, group, resource, *place).await;
                let what = if group.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}.{group}")
                };
                table.push_str(&format!(
                    "| {sa} | {verb} | {what} | {} | {allowed} | {why} |\n",
                    place
                        .map(|p| if p == ns { "own" } else { "other" })
                        .unwrap_or("all")
                ));
                assert_eq!(allowed, expect, "{user} {verb} {what} in {place:?} ({why})");
            }
        }
    }
    eprintln!("{table}");

    // Nothing more: what the API server lists for each account.
    let authority_token = api.token(&ns, &authority_sa, SA_ISSUER, None).await;
    let agent_token = api.token(&ns, &agent_sa, SA_ISSUER, None).await;
    let set = |s: &[&str]| -> std::collections::BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    };
    let cluster_wide = [
        "create tokenreviews.authentication.k8s.io",
        "get pods.",
        "list pods.",
        "list clusterworkloadentries.tessera.dev",
        "watch clusterworkloadentries.tessera.dev",
        "list workloadentries.tessera.dev",
        "watch workloadentries.tessera.dev",
        "patch clusterworkloadentries/status.tessera.dev",
        "patch workloadentries/status.tessera.dev",
        "list federationrelationships.tessera.dev",
        "watch federationrelationships.tessera.dev",
        "patch federationrelationships/status.tessera.dev",
    ];
    let mut in_own = set(&cluster_wide);
    for v in ["create", "list", "watch", "deletecollection"] {
        in_own.insert(format!("{v} revocationbatches.tessera.dev"));
    }
    for v in ["get", "list", "delete"] {
        in_own.insert(format!("{v} jointokens.tessera.dev"));
    }
    for v in ["list", "watch"] {
        in_own.insert(format!("{v} nodedenials.tessera.dev"));
    }
    for v in ["list", "create", "patch", "delete"] {
        in_own.insert(format!("{v} federatedbundles.tessera.dev"));
    }
    // What every service account has anyway (the cluster's defaults, such
    // as reading ClusterTrustBundles) is not the chart's doing.
    api.service_account(&ns, "nobody").await;
    let nobody = api.token(&ns, "nobody", SA_ISSUER, None).await;
    let baseline = granted(api, &nobody, &ns).await;
    let added = async |token: &str, place: &str| -> std::collections::BTreeSet<String> {
        granted(api, token, place)
            .await
            .difference(&baseline)
            .cloned()
            .collect()
    };
    assert_eq!(added(&authority_token, &ns).await, in_own);
    assert_eq!(added(&authority_token, &other).await, set(&cluster_wide));
    assert_eq!(added(&agent_token, &ns).await, set(&["get nodes/pods."]));

    // Enough: an authority with the chart's account is ready, which it is
    // only once the API server allows every request it makes.
    let dir = tempfile::tempdir().unwrap();
    let token_file = KubeApi::token_file(dir.path(), "token", &authority_token);
    let server_extra = format!(
        "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{ns}:{agent_sa}\"]\n\n[server.store]\nkind = \"kubernetes\"\nnamespace = \"{ns}\"\n\n[server.registration]\nkind = \"kubernetes\"\n",
        api.url,
        api.ca_file.display(),
        token_file.display(),
    );
    let (authority, _) = authority(dir.path(), "", &server_extra, true).await;
    let admin = authority.admin_addr.unwrap();
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(20), async || {
            let (status, body) = get(admin, "/readyz").await;
            last = body;
            status == 200
        })
        .await,
        "the authority with the chart's RBAC is not ready: {last}"
    );
    authority.shutdown();
}
