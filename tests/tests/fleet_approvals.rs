//! Fleet-wide approvals: an exchange waiting for approval on a node,
//! decided with kubectl (the genuine kube-apiserver and the chart's
//! admission policy) or at the authority by an operator's X.509-SVID, with
//! the approvals kept in the Kubernetes API or in a genuine PostgreSQL.
//!
//! Judges: `jsonwebtoken` verifies the redeemed token against the node's
//! JWKS; what is stored is read from the API server or with `psql`.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tessera_agent::fleet::operator::{OperatorCallError, OperatorClient};
use tessera_tests::TestAgent;
use tessera_tests::fleet::{
    Fleet, ISSUER, NOTES, OPERATOR_ID, active_at, anonymous_call, exchange_call, jwks, kube_store,
    operator_client, refused_status, runtime_database,
};
use tessera_tests::kube::{KubeApi, SA_ISSUER};

/// The fleet's store in the genuine kube-apiserver ([`kube_store`]) with
/// fleet-wide approvals: the chart's admission policy for ApprovalRequests
/// (rendered by Helm, in force once it refuses a forged decision), and an
/// operator service account with exactly the rights the docs tell kubectl
/// operators to get. Returns the `[server]` sub-tables, the namespace, the
/// operator's token and Kubernetes user name.
async fn approvals_store(dir: &Path) -> (String, String, String, String) {
    let api = KubeApi::shared();
    let (tables, ns) = kube_store(dir).await;
    let tables = tables.replace("[server.store]\n", "[server.store]\napprovals = true\n");
    let ns = ns.as_str();
    // The chart's admission policy for this namespace, rendered by Helm.
    let release = format!("appr{}", ns.rsplit('-').next().unwrap());
    // Named so the policy's authority is the service account kube_store
    // made; the policy and binding are cluster-scoped, so each test's pair
    // gets a name of its own.
    let mut list = tessera_tests::kube::render_chart(
        &release,
        ns,
        &serde_json::json!({"fullnameOverride": "tessera",
                            "authority": {"enabled": true, "keysSecret": "k", "bundleConfigMap": "b",
                                          "approvals": {"enabled": true}}}),
    );
    for item in list["items"].as_array_mut().unwrap() {
        if item["kind"]
            .as_str()
            .unwrap()
            .starts_with("ValidatingAdmissionPolicy")
        {
            item["metadata"]["name"] = format!("{release}-approvals").into();
            if item["kind"] == "ValidatingAdmissionPolicyBinding" {
                item["spec"]["policyName"] = format!("{release}-approvals").into();
            }
        }
    }
    let vap: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            i["kind"]
                .as_str()
                .unwrap()
                .starts_with("ValidatingAdmissionPolicy")
        })
        .collect();
    assert_eq!(vap.len(), 2, "policy and binding rendered");
    let (ok, out, err) = api.kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": vap}).to_string()),
    );
    assert!(ok, "{out}{err}");
    // An operator with exactly the rights the docs tell operators to get.
    api.service_account(ns, "operator").await;
    api.grant_role(
        ns,
        "approvers",
        serde_json::json!([{"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"], "verbs": ["get", "list", "patch"]}]),
        "operator",
    )
    .await;
    // What the chart grants the authority with `authority.operators`.
    api.grant_role(
        ns,
        "tessera-authority-operators",
        serde_json::json!([{"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"], "verbs": ["get", "patch"]}]),
        "tessera-authority",
    )
    .await;
    let operator = api.token(ns, "operator", SA_ISSUER, None).await;
    let operator_user = format!("system:serviceaccount:{ns}:operator");
    // The API server takes the new policy up asynchronously: wait until it
    // refuses a forged decision on a probe object.
    let probes = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests");
    let mut enforced = false;
    for i in 0..60 {
        let name = format!("probe-{i}");
        api.create(&probes, serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": name}, "spec": {"node": "probe", "approvalId": "probe", "deadline": 1}}))
            .await;
        let (status, _) = api
            .request_as(
                &operator,
                http::Method::PATCH,
                &format!("{probes}/{name}"),
                "application/merge-patch+json",
                Some(&serde_json::json!({"spec": {"decision": "approved", "decidedBy": "alice"}})),
            )
            .await;
        if status == 403 {
            enforced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        enforced,
        "the chart's ValidatingAdmissionPolicy never took effect"
    );

    (tables, ns.to_string(), operator, operator_user)
}

/// Fleet-wide approvals against the genuine kube-apiserver with two
/// replicas: an exchange that policy sends for approval on node A appears as
/// an ApprovalRequest object; an operator approves it with a patch as
/// kubectl sends it (their own user name as decidedBy, which the chart's
/// ValidatingAdmissionPolicy checks: a forged name and a second decision are
/// refused by the API server); node A redeems it; the node's audit log holds
/// one decision record naming the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_waiting_on_a_node_is_decided_with_kubectl_and_redeemed_there() {
    let api = KubeApi::shared();
    let store_dir = tempfile::tempdir().unwrap();
    let (tables, ns, operator, operator_user) = approvals_store(store_dir.path()).await;
    let fleet = Fleet::start_with(&tables, "").await;
    let a = fleet
        .agent_with_policy(
            "node-a",
            None,
            &format!("@id(\"write-needs-approval\")\n@require_approval\npermit(principal, action == Tessera::Action::\"notes:write\", resource == Tessera::Audience::\"{NOTES}\");\n"),
        )
        .await;
    let subject = a.jwt_svid(ISSUER).await;
    let fields = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", NOTES),
        ("scope", "notes:write"),
        ("task_id", "deploy-7"),
    ];
    let (status, pending) = exchange_call(&a, "/token", &fields).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending")),
        "{pending}"
    );
    let id = pending["approval_id"].as_str().unwrap().to_string();

    // The request is listed in the API, as an operator would list it.
    let collection = format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests");
    let mut object = Value::Null;
    for _ in 0..100 {
        let (status, list) = api
            .request_as(
                &operator,
                http::Method::GET,
                &collection,
                "application/json",
                None,
            )
            .await;
        assert_eq!(status, 200, "{list}");
        if let Some(o) = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["spec"]["approvalId"] == id.as_str())
        {
            object = o.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(object["spec"]["node"], "node-a", "listed: {object}");
    assert_eq!(object["spec"]["scopes"], serde_json::json!(["notes:write"]));
    assert_eq!(object["spec"]["taskId"], "deploy-7");
    let path = format!(
        "{collection}/{}",
        object["metadata"]["name"].as_str().unwrap()
    );
    let decide = |by: &str, decision: &str| serde_json::json!({"spec": {"decision": decision, "decidedBy": by}});
    // Forging another approver's name: refused by the API server.
    let (status, answer) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide("alice", "approved")),
        )
        .await;
    if status != 403 {
        let (_, out, _) = api.kubectl(
            &[
                "get",
                "validatingadmissionpolicies,validatingadmissionpolicybindings",
                "-o",
                "yaml",
            ],
            None,
        );
        let (_, nsout, _) = api.kubectl(&["get", "ns", &ns, "-o", "yaml"], None);
        panic!("a forged decidedBy was accepted: {answer}\n{out}\n{nsout}");
    }
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("your own user name"),
        "{answer}"
    );

    // Approved under the operator's own name: redeemed on node A.
    let (status, answer) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide(&operator_user, "approved")),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let start = std::time::Instant::now();
    let mut with_id = fields.clone();
    with_id.push(("approval_id", &id));
    let token = redeemed_once_approved(&a, &with_id, start).await;
    eprintln!(
        "approved in the Kubernetes API -> redeemed on node A after {:?}",
        start.elapsed()
    );
    assert!(active_at(&a, &token).await);
    // A second decision is refused too.
    let (status, _) = api
        .request_as(
            &operator,
            http::Method::PATCH,
            &path,
            "application/merge-patch+json",
            Some(&decide(&operator_user, "denied")),
        )
        .await;
    assert_eq!(status, 403);

    // Audited once, on the node, with the operator's identity.
    let audit = std::fs::read_to_string(a.dir.path().join("data/audit.jsonl"))
        .or_else(|_| std::fs::read_to_string(a.dir.path().join("data/audit/audit.jsonl")))
        .unwrap_or_default();
    let decisions: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "approval.decision" && r["approval_id"] == id.as_str())
        .collect();
    assert_eq!(decisions.len(), 1, "{audit}");
    assert_eq!(decisions[0]["operator"], format!("k8s:{operator_user}"));
    assert_eq!(decisions[0]["decision"], "approved");
}

/// Where [`an_operator_decides_at_the_authority`] keeps the approvals, and
/// how it reads what the store holds: the objects in the genuine
/// kube-apiserver (with the chart's admission policy, and an operator who
/// uses kubectl), or the rows of a genuine PostgreSQL (read with psql, the
/// replicas running as the run-time role the docs grant).
enum ApprovalsKept {
    Kubernetes {
        _dir: tempfile::TempDir,
        tables: String,
        ns: String,
        kubectl_operator: String,
        kubectl_user: String,
    },
    Postgres {
        pg: &'static tessera_tests::postgres::PgServer,
        db: tessera_tests::postgres::TestDatabase,
        tables: String,
    },
}

impl ApprovalsKept {
    async fn kubernetes() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (tables, ns, kubectl_operator, kubectl_user) = approvals_store(dir.path()).await;
        Self::Kubernetes {
            _dir: dir,
            tables,
            ns,
            kubectl_operator,
            kubectl_user,
        }
    }

    async fn postgres() -> Self {
        let pg = tessera_tests::postgres::PgServer::shared();
        let db = runtime_database(pg, "approvals").await;
        let tables = db
            .store_table()
            .replace("[server.store]\n", "[server.store]\napprovals = true\n");
        Self::Postgres { pg, db, tables }
    }

    /// The replicas' `[server]` sub-tables.
    fn tables(&self) -> &str {
        match self {
            Self::Kubernetes { tables, .. } | Self::Postgres { tables, .. } => tables,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Kubernetes { .. } => "Kubernetes",
            Self::Postgres { .. } => "PostgreSQL",
        }
    }

    fn object_path(ns: &str, name: &str) -> String {
        format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/approvalrequests/{name}")
    }

    /// What the store holds for the approval `name`, read from the store
    /// itself: `node|approval id|decision or pending|operator or nothing`.
    async fn held(&self, name: &str) -> String {
        match self {
            Self::Kubernetes { ns, .. } => {
                let (status, object) = KubeApi::shared()
                    .request(http::Method::GET, &Self::object_path(ns, name), None)
                    .await;
                assert_eq!(status, 200, "{object}");
                let spec = &object["spec"];
                format!(
                    "{}|{}|{}|{}",
                    spec["node"].as_str().unwrap_or_default(),
                    spec["approvalId"].as_str().unwrap_or_default(),
                    spec["decision"].as_str().unwrap_or("pending"),
                    spec["operator"].as_str().unwrap_or_default(),
                )
            }
            Self::Postgres { pg, db, .. } => pg
                .psql_in(
                    &db.name,
                    &format!(
                        "SELECT node, approval_id, coalesce(decision, 'pending'), coalesce(decided_by, '') FROM tessera_approvals WHERE name = '{name}'"
                    ),
                )
                .trim()
                .to_string(),
        }
    }

    /// After the operator's decision on `name` at the authority: on
    /// Kubernetes the object names the authority's own user as decider
    /// (the admission policy checks it), and kubectl cannot decide again.
    async fn decided_by_the_authority(&self, name: &str) {
        let Self::Kubernetes {
            ns,
            kubectl_operator,
            kubectl_user,
            ..
        } = self
        else {
            return;
        };
        let api = KubeApi::shared();
        let path = Self::object_path(ns, name);
        let (status, _) = api
            .request_as(
                kubectl_operator,
                http::Method::PATCH,
                &path,
                "application/merge-patch+json",
                Some(
                    &serde_json::json!({"spec": {"decision": "denied", "decidedBy": kubectl_user}}),
                ),
            )
            .await;
        assert_eq!(status, 403);
        let (status, object) = api.request(http::Method::GET, &path, None).await;
        assert_eq!(status, 200);
        assert_eq!(object["spec"]["decision"], "approved");
        assert_eq!(
            object["spec"]["decidedBy"],
            format!("system:serviceaccount:{ns}:tessera-authority")
        );
    }

    /// On Kubernetes, a kubectl user cannot pass as an operator by writing
    /// `spec.operator` on the pending `name` (the admission policy).
    async fn refuses_a_forged_operator(&self, name: &str) {
        let Self::Kubernetes {
            ns,
            kubectl_operator,
            kubectl_user,
            ..
        } = self
        else {
            return;
        };
        let (status, answer) = KubeApi::shared()
            .request_as(
                kubectl_operator,
                http::Method::PATCH,
                &Self::object_path(ns, name),
                "application/merge-patch+json",
                Some(&serde_json::json!({"spec": {"decision": "approved", "decidedBy": kubectl_user, "operator": OPERATOR_ID}})),
            )
            .await;
        assert_eq!(status, 403, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("only by the tessera authority"),
            "{answer}"
        );
    }
}

/// Fleet-wide approvals decided at the authority with an operator's
/// X.509-SVID, with two replicas: node A's waiting request is listed by the
/// operator at both replicas and approved with `tessera approvals approve
/// --authority` at replica 0; node A redeems it (the token verified by
/// jsonwebtoken against A's JWKS) and audits the decision once naming the
/// operator's SPIFFE ID; the store holds the decision and the operator.
/// Attacks: no client certificate (401), a workload SVID that is not an
/// operator (403 at either replica, the approval stays pending), a second
/// decision at either replica (409, naming who decided; the store keeps the
/// first). A request the operator denies is refused on the node; of two
/// operators racing on a fresh request at both replicas exactly one wins
/// and the node applies that one. What only one store has is judged there
/// too ([`ApprovalsKept`]).
async fn an_operator_decides_at_the_authority(kept: ApprovalsKept) {
    let fleet = Fleet::start_with(
        &format!("operators = [\"{OPERATOR_ID}\"]\n{}", kept.tables()),
        "",
    )
    .await;
    let a = fleet
        .agent_with_policy(
            "node-a",
            None,
            &format!("@id(\"write-needs-approval\")\n@require_approval\npermit(principal, action == Tessera::Action::\"notes:write\", resource == Tessera::Audience::\"{NOTES}\");\n"),
        )
        .await;
    let b = fleet.agent("node-b", None).await;
    let c = fleet.agent("node-c", None).await;
    let subject = a.jwt_svid(ISSUER).await;
    let request = |task: &'static str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", NOTES),
            ("scope", "notes:write"),
            ("task_id", task),
        ]
    };
    let (status, pending) = exchange_call(&a, "/token", &request("deploy-7")).await;
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending")),
        "{pending}"
    );
    let id = pending["approval_id"].as_str().unwrap().to_string();

    // Listed by the operator at both replicas.
    let ops0 = operator_client(&c, fleet.ports[0]).await;
    let ops1 = operator_client(&c, fleet.ports[1]).await;
    let listed = listed_task(&ops1, "deploy-7").await;
    assert_eq!(listed, listed_task(&ops0, "deploy-7").await);
    assert_eq!(listed["id"], id.as_str(), "{listed}");
    assert_eq!(listed["node"], "node-a", "{listed}");
    assert_eq!(listed["state"], "pending");
    assert_eq!(listed["scopes"], serde_json::json!(["notes:write"]));
    assert_eq!(listed["task_id"], "deploy-7");
    assert_eq!(listed["principal"], "spiffe://example.org/node-a/svc");
    let name = listed["name"].as_str().unwrap().to_string();
    assert_eq!(kept.held(&name).await, format!("node-a|{id}|pending|"));

    // No credential, and a workload that is not an operator: refused,
    // nothing decided.
    for (method, path) in [
        (http::Method::GET, "/v1/operator/approvals".to_string()),
        (
            http::Method::POST,
            format!("/v1/operator/approvals/{id}/approve"),
        ),
    ] {
        assert_eq!(anonymous_call(&a, fleet.ports[0], method, &path).await, 401);
    }
    for port in &fleet.ports {
        let intruder = operator_client(&b, *port).await;
        assert_eq!(refused_status(intruder.approvals().await.unwrap_err()), 403);
        assert_eq!(
            refused_status(intruder.decide(&id, None, true).await.unwrap_err()),
            403
        );
    }
    let mut with_id = request("deploy-7");
    with_id.push(("approval_id", &id));
    let (status, still) = exchange_call(&a, "/token", &with_id).await;
    assert_eq!(
        (status, still["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    assert_eq!(kept.held(&name).await, format!("node-a|{id}|pending|"));

    // Approved with the CLI at replica 0; redeemed on node A.
    let start = std::time::Instant::now();
    tessera_agent::cli::run_from([
        "tessera",
        "approvals",
        "approve",
        &id,
        "--authority",
        &format!("127.0.0.1:{}", fleet.ports[0]),
        "--socket",
        c.socket().to_str().unwrap(),
    ])
    .await
    .unwrap();
    let token = redeemed_once_approved(&a, &with_id, start).await;
    eprintln!(
        "approved at the authority (CLI, {}) -> redeemed on node A after {:?}",
        kept.kind(),
        start.elapsed()
    );
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let set = jwks(&a).await;
    let key =
        DecodingKey::from_jwk(set.find(&header.kid.unwrap()).expect("kid published")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[NOTES]);
    v.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/node-a/svc");
    assert_eq!(claims["scope"], "notes:write");
    assert_eq!(claims["txn"], "deploy-7");
    assert_eq!(
        kept.held(&name).await,
        format!("node-a|{id}|approved|{OPERATOR_ID}")
    );

    // A second decision, at either replica: refused; the store keeps the
    // first.
    for ops in [&ops0, &ops1] {
        match ops.decide(&id, Some("node-a"), false).await.unwrap_err() {
            OperatorCallError::Refused { status, message } => {
                assert_eq!(status, 409, "{message}");
                assert!(message.contains("decided already"), "{message}");
                assert!(message.contains(OPERATOR_ID), "{message}");
            }
            other => panic!("{other}"),
        }
    }
    kept.decided_by_the_authority(&name).await;
    assert_eq!(
        kept.held(&name).await,
        format!("node-a|{id}|approved|{OPERATOR_ID}")
    );

    // The operator denies the next one; the client's next poll gets
    // access_denied.
    let (status, _) = exchange_call(&a, "/token", &request("deploy-8")).await;
    assert_eq!(status, 400);
    let second = listed_task(&ops0, "deploy-8").await;
    kept.refuses_a_forged_operator(second["name"].as_str().unwrap())
        .await;
    let second_id = second["id"].as_str().unwrap().to_string();
    ops1.decide(&second_id, None, false).await.unwrap();
    let mut denied = request("deploy-8");
    denied.push(("approval_id", &second_id));
    let answer = loop {
        let (_, answer) = exchange_call(&a, "/token", &denied).await;
        if answer["error"] != "authorization_pending" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(answer["error"], "access_denied", "{answer}");

    // Two decisions at once, one per replica: exactly one is kept, and the
    // node applies that one.
    let (status, _) = exchange_call(&a, "/token", &request("deploy-9")).await;
    assert_eq!(status, 400);
    let third = listed_task(&ops0, "deploy-9").await;
    let _ = listed_task(&ops1, "deploy-9").await;
    let third_id = third["id"].as_str().unwrap().to_string();
    let (deny, approve) = tokio::join!(
        ops0.decide(&third_id, None, false),
        ops1.decide(&third_id, None, true)
    );
    assert_eq!(
        usize::from(deny.is_ok()) + usize::from(approve.is_ok()),
        1,
        "{deny:?} {approve:?}"
    );
    let mut polled = request("deploy-9");
    polled.push(("approval_id", &third_id));
    let answer = loop {
        let (_, answer) = exchange_call(&a, "/token", &polled).await;
        if answer["error"] != "authorization_pending" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if deny.is_ok() {
        assert_eq!(answer["error"], "access_denied", "{answer}");
    } else {
        assert!(answer["access_token"].is_string(), "{answer}");
    }

    // Each decision audited once on node A, with the operator's SPIFFE ID.
    let audit = std::fs::read_to_string(a.dir.path().join("data/audit.jsonl"))
        .or_else(|_| std::fs::read_to_string(a.dir.path().join("data/audit/audit.jsonl")))
        .unwrap_or_default();
    for (approval, decision) in [
        (id.as_str(), "approved"),
        (second_id.as_str(), "denied"),
        (
            third_id.as_str(),
            if deny.is_ok() { "denied" } else { "approved" },
        ),
    ] {
        let decisions: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["event"] == "approval.decision" && r["approval_id"] == approval)
            .collect();
        assert_eq!(decisions.len(), 1, "{audit}");
        assert_eq!(decisions[0]["operator"], OPERATOR_ID);
        assert_eq!(decisions[0]["decision"], decision);
    }
    // The authorities audited the decision and the intruder's attempts.
    let records = fleet.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "operator.approval.decision"
                && r["operator"] == OPERATOR_ID
                && r["approval_id"] == id.as_str())
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "refused" && r["subject"] == "spiffe://example.org/node-b/svc")
    );
}

/// [`an_operator_decides_at_the_authority`] with the approvals kept as
/// `ApprovalRequest` objects in the genuine kube-apiserver; there also a
/// second decision with kubectl (403) and a kubectl user writing
/// `spec.operator` to pass as an operator (403 from the API server) are
/// refused, and the object names both the operator and the authority's
/// user.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_decides_a_nodes_approval_at_the_authority_with_an_svid() {
    an_operator_decides_at_the_authority(ApprovalsKept::kubernetes().await).await;
}

/// [`an_operator_decides_at_the_authority`] with the approvals kept as rows
/// of `tessera_approvals` in a genuine PostgreSQL (`[server.store] kind =
/// "postgres"`, `approvals = true`), the replicas running as the run-time
/// role the docs grant; each row read with psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_decides_a_nodes_approval_at_the_authority_through_postgresql() {
    an_operator_decides_at_the_authority(ApprovalsKept::postgres().await).await;
}

/// Repeats the node's request (with its `approval_id`) until the decision
/// has reached the node and a token comes back; until then every answer
/// must be `authorization_pending`. At most 30 s after `start`.
async fn redeemed_once_approved(
    a: &TestAgent,
    with_id: &[(&str, &str)],
    start: std::time::Instant,
) -> String {
    loop {
        let (status, answer) = exchange_call(a, "/token", with_id).await;
        if status == 200 {
            return answer["access_token"].as_str().unwrap().to_string();
        }
        assert_eq!(answer["error"], "authorization_pending", "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never approved on the node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The approval of `task` as the operator lists it at the authority, once
/// it is listed.
async fn listed_task(ops: &OperatorClient, task: &str) -> Value {
    for _ in 0..400 {
        let all = ops.approvals().await.unwrap();
        if let Some(x) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["task_id"] == task)
        {
            return x.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{task} never listed at the authority");
}
