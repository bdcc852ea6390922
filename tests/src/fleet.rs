//! The fleet the `fleet*` tests run: two `tessera authority` replicas
//! sharing one key directory, agents in upstream mode acting as separate
//! nodes (each with its own socket and data dir), all in the test process
//! over loopback; the fleet's store in the genuine kube-apiserver or a
//! genuine PostgreSQL; and the calls the tests make to its nodes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::kube::{KubeApi, SA_ISSUER};
use crate::{TestAgent, my_uid};
use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;
use tessera_agent::app::authority::{RunningAuthority, start_authority as start};
use tessera_agent::cli::client::{form, http_unix};
use tessera_agent::config::Config;
use tessera_agent::fleet::operator::{OperatorCallError, OperatorClient};

pub const ISSUER: &str = "spiffe://example.org/tessera";

pub const NOTES: &str = "https://notes.example";

/// The operator's SPIFFE ID in the operator tests: node C's workload, which
/// the authorities list in `server.operators`.
pub const OPERATOR_ID: &str = "spiffe://example.org/node-c/svc";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One entry per node: the workload on node `n` runs as this user there.
/// `extra` is added to each entry.
pub fn entries_with(extra: &str) -> String {
    ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| {
            format!(
                "[[entries]]\nspiffe_id = \"spiffe://example.org/{n}/svc\"\nselectors = [\"tessera:node:{n}\", \"unix:uid:{}\"]\n{extra}",
                my_uid()
            )
        })
        .collect()
}

/// An authority replica from a config file's text (with a `[server]` table).
pub async fn start_authority(text: &str) -> RunningAuthority {
    let cfg = Config::parse(text, "authority.toml").unwrap();
    start(&cfg, Arc::new(tessera_agent::clock::SystemClock))
        .await
        .unwrap()
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    pub replicas: Vec<Option<RunningAuthority>>,
    /// Added to `[server]` of every replica.
    pub server_extra: String,
    /// Added to every entry (authority and agents).
    pub entry_extra: String,
    pub node_svid_ttl: &'static str,
    /// Each replica's `[https]` port, when the fleet serves the HTTPS face;
    /// the issuer is the first one's URL.
    pub https_ports: Option<Vec<u16>>,
}

impl Fleet {
    pub async fn start() -> Self {
        Self::start_with("", "").await
    }

    pub async fn start_with(server_extra: &str, entry_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        // `rsa-jwt-key`: jwt.key is RSA 2048, as `tessera authority init
        // --jwt-key-type rsa-2048` writes it.
        let jwt_key_type = if server_extra.contains("rsa-jwt-key") {
            tessera_agent::identity::jws::JwtKeyType::Rsa2048
        } else {
            tessera_agent::identity::jws::JwtKeyType::EcP256
        };
        tessera_agent::identity::key_files::init_key_dir_of(
            &td,
            &dir.path().join("keys"),
            Duration::from_secs(30 * 24 * 3600),
            SystemTime::now(),
            jwt_key_type,
        )
        .unwrap();
        let mut fleet = Self {
            dir,
            ports: vec![free_port(), free_port()],
            replicas: Vec::new(),
            server_extra: server_extra.into(),
            entry_extra: entry_extra.into(),
            node_svid_ttl: if server_extra.contains("short-node-svids") {
                "4s"
            } else {
                "1h"
            },
            https_ports: server_extra
                .contains("https-face")
                .then(|| vec![free_port(), free_port()]),
        };
        for i in 0..2 {
            let r = fleet.start_replica(i).await;
            fleet.replicas.push(Some(r));
        }
        fleet
    }

    pub async fn start_replica(&self, i: usize) -> RunningAuthority {
        let d = self.dir.path().display();
        let https = match &self.https_ports {
            Some(ports) => format!(
                "[https]\nlisten = \"127.0.0.1:{}\"\nissuer = \"https://localhost:{}\"\n",
                ports[i], ports[0]
            ),
            None => String::new(),
        };
        let text = format!(
            "trust_domain = \"example.org\"\n{}\n{https}[server]\nlisten = \"127.0.0.1:{}\"\nkeys_dir = \"{d}/keys\"\njoin_token_dir = \"{d}/join\"\naudit_log = \"{d}/authority-{i}.jsonl\"\nnode_svid_ttl = \"{}\"\n{}",
            entries_with(&self.entry_extra),
            self.ports[i],
            self.node_svid_ttl,
            self.server_extra
                .replace("short-node-svids", "")
                .replace("https-face", "")
                .replace("rsa-jwt-key", ""),
        );
        start_authority(&text).await
    }

    pub async fn stop_replica(&mut self, i: usize) {
        if let Some(r) = self.replicas[i].take() {
            r.shutdown();
            r.wait().await;
        }
    }

    /// An agent for `node`, attested with a fresh join token. `local_entries`
    /// replaces the shared entries (to play a compromised node).
    pub async fn agent(&self, node: &str, local_entries: Option<String>) -> TestAgent {
        self.agent_with_policy(node, local_entries, "").await
    }

    /// [`Self::agent`] with `policy` (Cedar) added to its exchange policies.
    pub async fn agent_with_policy(
        &self,
        node: &str,
        local_entries: Option<String>,
        policy: &str,
    ) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let token = tessera_agent::fleet::join::create(
            &self.dir.path().join("join"),
            node,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
        std::fs::write(dir.path().join("join-token"), token).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/notes.cedar"),
            format!(
                "@id(\"notes-read\")\n@allow_delegation\npermit(principal, action == Tessera::Action::\"notes:read\", resource == Tessera::Audience::\"{NOTES}\");\n"
            ),
        )
        .unwrap();
        if !policy.is_empty() {
            std::fs::write(dir.path().join("policies/extra.cedar"), policy).unwrap();
        }
        let addrs: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let body = format!(
            "{}\n[upstream]\naddresses = [{}]\nbundle_file = \"{k}/keys/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{a}/join-token\"\nbundle_refresh = \"200ms\"\nrequest_timeout = \"2s\"\n\n[exchange]\npolicy_dir = \"{a}/policies\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            local_entries.unwrap_or_else(|| entries_with(&self.entry_extra)),
            addrs.join(", "),
            k = self.dir.path().display(),
            a = dir.path().display(),
        );
        TestAgent::start_in(dir, &body).await
    }

    pub fn audit_records(&self) -> Vec<Value> {
        (0..2)
            .flat_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("authority-{i}.jsonl")))
                    .unwrap_or_default()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

pub async fn exchange_token(agent: &TestAgent) -> String {
    exchange(agent, &[("task_id", "t-1")]).await
}

/// A task token for `notes:read` at NOTES on `agent`'s exchange socket, with
/// `extra` form fields.
pub async fn exchange(agent: &TestAgent, extra: &[(&str, &str)]) -> String {
    let subject = agent.jwt_svid(ISSUER).await;
    let mut fields = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", NOTES),
        ("scope", "notes:read"),
    ];
    fields.extend_from_slice(extra);
    exchange_post(agent, "/token", &fields).await
}

/// `POST path` on `agent`'s exchange socket; the access token of a 200.
pub async fn exchange_post(agent: &TestAgent, path: &str, fields: &[(&str, &str)]) -> String {
    let (status, json) = exchange_call(agent, path, fields).await;
    assert_eq!(status, 200, "{json}");
    json["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub async fn exchange_call(agent: &TestAgent, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    let socket = agent.dir.path().join("sock/exchange.sock");
    let (status, body) = http_unix(&socket, http::Method::POST, path, Some(form(fields)))
        .await
        .unwrap();
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Whether `agent`'s `/introspect` says `token` is active.
pub async fn active_at(agent: &TestAgent, token: &str) -> bool {
    let (status, json) = exchange_call(agent, "/introspect", &[("token", token)]).await;
    assert_eq!(status, 200, "{json}");
    json["active"]
        .as_bool()
        .expect("RFC 7662 answers carry active")
}

/// `GET /readyz` on the agent's admin listener: status line and body.
pub async fn readyz(agent: &TestAgent) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = agent.running().admin_addr.expect("admin listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

pub async fn jwks(agent: &TestAgent) -> JwkSet {
    let socket = agent.dir.path().join("sock/exchange.sock");
    let (status, body) = http_unix(&socket, http::Method::GET, "/jwks", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// The fleet's store in the genuine kube-apiserver: the chart's
/// RevocationBatch CRD, a namespace with the authority's service account,
/// the chart's RBAC for it, and a token. Returns the `[server]` sub-tables.
pub async fn kube_store(dir: &Path) -> (String, String) {
    kube_store_on(KubeApi::shared(), dir).await
}

/// [`kube_store`] in `api` (a private server a test may restart).
pub async fn kube_store_on(api: &KubeApi, dir: &Path) -> (String, String) {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/tessera/crds/");
    let (ok, out, err) = api.kubectl(&["apply", "--server-side", "-f", crds], None);
    assert!(ok, "the chart's CRDs are refused: {out}{err}");
    let (ok, out, err) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/revocationbatches.tessera.dev",
            "crd/jointokens.tessera.dev",
            "crd/nodedenials.tessera.dev",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let ns = api.namespace("fleet", serde_json::json!({})).await;
    api.service_account(&ns, "tessera-authority").await;
    api.grant_role(
        &ns,
        "tessera-authority-store",
        serde_json::json!([{"apiGroups": ["tessera.dev"], "resources": ["revocationbatches"],
                            "verbs": ["create", "list", "watch", "deletecollection"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["approvalrequests"],
                            "verbs": ["create", "list", "watch", "delete"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["jointokens"],
                            "verbs": ["get", "list", "delete"]},
                           {"apiGroups": ["tessera.dev"], "resources": ["nodedenials"],
                            "verbs": ["list", "watch"]}]),
        "tessera-authority",
    )
    .await;
    // The API server's first write of a kind it has just established takes
    // about 2 s (measured: 2.01 s, then 5-10 ms); a cluster's CRD is there
    // long before its first revocation, so pay it here, not in the figures.
    let (status, answer) = api
        .request(
            http::Method::POST,
            &format!("/apis/tessera.dev/v1alpha1/namespaces/{ns}/revocationbatches"),
            Some(
                &serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "RevocationBatch",
              "metadata": {"generateName": "warm-up-"}, "spec": {"expires": 1, "entries": []}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let token = api.token(&ns, "tessera-authority", SA_ISSUER, None).await;
    let token_file = KubeApi::token_file(dir, "authority-token", &token);
    let tables = format!(
        "[server.kubernetes]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nallowed_service_accounts = [\"{ns}:tessera-agent\"]\n\n[server.store]\nkind = \"kubernetes\"\nnamespace = \"{ns}\"\nbatch_window = \"20ms\"\n",
        api.url,
        api.ca_file.display(),
        token_file.display(),
    );
    (tables, ns)
}

/// Polls `refused` every 10 ms until it holds; how long that took.
pub async fn time_until(
    start: std::time::Instant,
    mut refused: impl AsyncFnMut() -> bool,
) -> Duration {
    loop {
        if refused().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still accepted 30 s after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A node without a Workload API: attested with a join token, publishing
/// what its revocation state revokes and following the fleet's, in memory.
pub struct SimulatedNode {
    pub store: Arc<tessera_agent::revocation::RevocationStore>,
    pub metrics: Arc<tessera_agent::metrics::Metrics>,
    pub _dir: tempfile::TempDir,
}

pub async fn simulated_node(
    fleet: &Fleet,
    name: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> SimulatedNode {
    use tessera_agent::fleet::client::{NodeAttestation, Upstream, UpstreamConfig};
    let dir = tempfile::tempdir().unwrap();
    let token = tessera_agent::fleet::join::create(
        &fleet.dir.path().join("join"),
        name,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    std::fs::write(dir.path().join("join-token"), token).unwrap();
    let config = UpstreamConfig {
        addresses: fleet
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect(),
        server_name: "tessera-authority".into(),
        bundle_file: fleet.dir.path().join("keys/ca.crt"),
        attestation: NodeAttestation::JoinToken,
        token_file: dir.path().join("join-token"),
        bundle_refresh: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        state_dir: dir.path().to_path_buf(),
    };
    let metrics = Arc::new(tessera_agent::metrics::Metrics::new());
    let up = Upstream::connect(
        config,
        spiffe::TrustDomain::new("example.org").unwrap(),
        Arc::new(tessera_agent::clock::SystemClock),
        metrics.clone(),
        shutdown,
    )
    .await
    .unwrap();
    let store = Arc::new(
        tessera_agent::revocation::RevocationStore::open(None, SystemTime::now()).unwrap(),
    );
    let mut synced =
        tessera_agent::fleet::follow::start(up, store.clone(), metrics.clone(), shutdown.clone());
    synced.wait_for(|s| *s).await.unwrap();
    SimulatedNode {
        store,
        metrics,
        _dir: dir,
    }
}

/// `agent`'s X.509-SVID as an operator client of the authority at `port`
/// (the spiffe crate fetches it; the CLI does the same through its socket).
pub async fn operator_client(agent: &TestAgent, port: u16) -> OperatorClient {
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let svid = ctx.default_svid().unwrap();
    OperatorClient::new(
        &format!("127.0.0.1:{port}"),
        "tessera-authority",
        svid.leaf().as_ref(),
        svid.private_key().as_ref(),
        &crate::example_org_cas(&ctx),
    )
    .unwrap()
}

/// `method path` at the authority on `port` without any client certificate
/// (TLS verified against `agent`'s bundle): the status.
pub async fn anonymous_call(agent: &TestAgent, port: u16, method: http::Method, path: &str) -> u16 {
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let cas = crate::example_org_cas(&ctx);
    let roots = tessera_agent::fleet::tls::roots(cas.iter().map(Vec::as_slice)).unwrap();
    let (status, _) = tessera_agent::transport::https_client::send(
        tessera_agent::transport::https_client::Request {
            addr: &format!("127.0.0.1:{port}"),
            server_name: "tessera-authority",
            tls: tessera_agent::fleet::tls::client_config(roots, None).unwrap(),
            method,
            path,
            bearer: None,
            content_type: "application/json",
            body: Some(b"{}".to_vec()),
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    status
}

pub fn refused_status(e: OperatorCallError) -> u16 {
    match e {
        OperatorCallError::Refused { status, .. } => status,
        other => panic!("not a refusal: {other}"),
    }
}

/// A database whose schema its owner has created, and the replicas'
/// run-time role on it (no DDL; docs/postgres.md's grants).
pub async fn runtime_database(
    pg: &crate::postgres::PgServer,
    prefix: &str,
) -> crate::postgres::TestDatabase {
    use tessera_agent::fleet::store::postgres::{Database, DatabaseConfig};
    let owner = pg.database(prefix);
    Database::open(DatabaseConfig {
        url: owner.url.clone(),
        password_file: Some(owner.password_file.clone()),
        migrate: true,
        tls: None,
    })
    .await
    .unwrap();
    pg.runtime_role(&owner)
}

/// Whether the agent gets a JWT-SVID signed now (a fresh audience each
/// time, so it asks its replica), judged by the `spiffe` crate.
pub async fn signs(agent: &TestAgent) -> bool {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let aud = format!(
        "probe-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    agent
        .spiffe_client()
        .await
        .fetch_jwt_svid([aud.as_str()], None)
        .await
        .is_ok()
}
