//! The genuine Kubernetes API server for tests: etcd and kube-apiserver
//! (built from the Go module proxy by `tests/kube/build.sh`) on loopback,
//! with an openssl-made PKI, RBAC and Node authorization, and the default
//! admission chain (ServiceAccount, PodSecurity, ...). There is no kubelet
//! and no controller manager: pods stay as the tests write them, so a test
//! that needs a running container patches the pod's status itself.
//!
//! One server is shared by every test of a test binary ([`KubeApi::shared`]);
//! tests isolate themselves with a fresh namespace each. A test that restarts
//! the API server starts its own ([`KubeApi::start`]).
//!
//! Processes are started through `setpriv --pdeathsig KILL` from one thread
//! that lives as long as the test binary, so they die with it even when a
//! test panics or the binary is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The version `tests/kube/build.sh` builds.
pub const KUBE_VERSION: &str = "1.37.2";

/// Where the binaries are: `$TESSERA_KUBE_BIN`, else the build script's cache.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_KUBE_BIN") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(format!(".cache/tessera/kube-{KUBE_VERSION}/bin"))
}

fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: these tests run against the real Kubernetes API server. \
         Build it once with `bash tests/kube/build.sh` (about 6 minutes; scripts/test.sh \
         and .ci/run do it), or point TESSERA_KUBE_BIN at a directory holding \
         kube-apiserver, kubectl and etcd v{KUBE_VERSION}-compatible builds.",
        p.display()
    );
    p
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that never exits, under `setpriv --pdeathsig
/// KILL`: the child is killed when the test binary exits, however it exits
/// (the parent-death signal fires when the spawning *thread* ends, so the
/// spawner must outlive every test).
pub(crate) fn spawn_owned(mut cmd: Command) -> Child {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("kube-process-owner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (and so the children) alive until exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the process owner thread");
        Mutex::new(tx)
    });
    let program = cmd.get_program().to_owned();
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg("--pdeathsig")
        .arg("KILL")
        .arg("--")
        .arg(&program);
    wrapped.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    wrapped.stdin(Stdio::null());
    // Logs go to files so a failure can be read after the fact.
    let log_name = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let log_dir = cmd
        .get_current_dir()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{log_name}.log")))
        .expect("open the process log");
    wrapped.stdout(log.try_clone().unwrap()).stderr(log);
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().unwrap().send((wrapped, reply_tx)).unwrap();
    let _ = &mut cmd;
    reply_rx
        .recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.to_string_lossy()))
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is required to make the API server's PKI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, serving certificate (127.0.0.1, localhost, kubernetes.default.svc)
/// and the service-account signing key pair.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=tessera-test-kubernetes-ca",
            "-days",
            "7",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    );
    std::fs::write(
        dir.join("apiserver.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n\
         basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "7",
            "-extfile",
            "apiserver.ext",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    );
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// A pod for [`KubeApi::pod`].
pub struct TestPod<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    /// Its service account (which must exist).
    pub sa: &'a str,
    pub node: &'a str,
    pub labels: Value,
    /// `(name, image)` of each container.
    pub containers: &'a [(&'a str, &'a str)],
    /// Whether a kubelet has reported the containers running.
    pub running: bool,
}

/// The issuer of service account tokens.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

struct Processes {
    etcd: Child,
    apiserver: Option<Child>,
}

/// Names the test process that owns a shared server's directory.
pub(crate) const OWNER_FILE: &str = "owner";

/// A process's pid and kernel start time, which together name it even after
/// the pid is reused.
pub(crate) fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces;
    // the start time is field 22 of the whole line.
    let start_time = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{pid} {start_time}"))
}

/// Deletes the directories of shared servers whose test process has exited.
/// Statics are never dropped, so each test binary leaves its shared server's
/// etcd data behind (about 150 MB); without this, runs fill /tmp. The
/// server processes themselves die with their owner (parent-death signal).
pub(crate) fn remove_abandoned_servers(root: &Path) {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    for dir in dirs.flatten().map(|d| d.path()) {
        let abandoned = match std::fs::read_to_string(dir.join(OWNER_FILE)) {
            Ok(owner) => owner
                .split_whitespace()
                .next()
                .and_then(|pid| pid.parse().ok())
                .and_then(process_identity)
                .is_none_or(|alive| alive != owner),
            // Written just after the directory is made: a directory without it
            // is either being set up right now or predates this clean-up.
            Err(_) => std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600)),
        };
        if abandoned {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A running etcd + kube-apiserver.
pub struct KubeApi {
    pub dir: PathBuf,
    pub port: u16,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The CA that signed the serving certificate (what clients trust).
    pub ca_file: PathBuf,
    /// A `system:masters` bearer token (static token file).
    pub admin_token: String,
    pub kubeconfig: PathBuf,
    etcd_port: u16,
    procs: Mutex<Processes>,
    tls: Arc<rustls::ClientConfig>,
    // Removes `dir` when a private server is dropped.
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let mut p = self.procs.lock().unwrap();
        if let Some(mut a) = p.apiserver.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = p.etcd.kill();
        let _ = p.etcd.wait();
    }
}

impl KubeApi {
    /// The API server shared by every test of this test binary.
    pub fn shared() -> &'static KubeApi {
        static SHARED: OnceLock<KubeApi> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Not removed at exit (statics are not dropped): keep it under
            // one parent so stale directories are easy to find and clean.
            let root = std::env::temp_dir().join("tessera-kube-tests");
            std::fs::create_dir_all(&root).unwrap();
            remove_abandoned_servers(&root);
            let tmp = tempfile::tempdir_in(&root).unwrap();
            let dir = tmp.keep();
            std::fs::write(
                dir.join(OWNER_FILE),
                process_identity(std::process::id()).unwrap(),
            )
            .unwrap();
            Self::start_at(dir, None)
        })
    }

    /// A private API server (and etcd), stopped when dropped.
    pub fn start() -> KubeApi {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        Self::start_at(dir, Some(tmp))
    }

    fn start_at(dir: PathBuf, tmp: Option<tempfile::TempDir>) -> KubeApi {
        let etcd_bin = binary("etcd");
        binary("kube-apiserver");
        binary("kubectl");
        make_pki(&dir);
        let admin_token = "tessera-test-admin-token".to_string();
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,system:masters\n"),
        )
        .unwrap();
        let etcd_port = free_port();
        let peer_port = free_port();
        let mut etcd = Command::new(&etcd_bin);
        etcd.current_dir(&dir).args([
            "--name=test",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-cluster=test=http://127.0.0.1:{peer_port}"),
            "--listen-metrics-urls=",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        let etcd = spawn_owned(etcd);
        let port = free_port();
        let ca_file = dir.join("ca.crt");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {admin_token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
                ca_file.display()
            ),
        )
        .unwrap();
        let tls = {
            let pem = std::fs::read(&ca_file).unwrap();
            let cas = tessera_agent::identity::pem::decode_certs(&pem).unwrap();
            let roots = tessera_agent::fleet::tls::roots(cas.iter().map(Vec::as_slice)).unwrap();
            tessera_agent::fleet::tls::client_config(roots, None).unwrap()
        };
        let api = KubeApi {
            url: format!("https://127.0.0.1:{port}"),
            dir,
            port,
            ca_file,
            admin_token,
            kubeconfig,
            etcd_port,
            procs: Mutex::new(Processes {
                etcd,
                apiserver: None,
            }),
            tls,
            _tmp: tmp,
        };
        api.start_apiserver();
        api
    }

    /// Starts the API server again after [`Self::stop_apiserver`].
    pub fn start_apiserver(&self) {
        let d = self.dir.display();
        let mut cmd = Command::new(binary("kube-apiserver"));
        cmd.current_dir(&self.dir).args([
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={}", self.port),
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--tls-cert-file={d}/apiserver.crt"),
            format!("--tls-private-key-file={d}/apiserver.key"),
            format!("--client-ca-file={d}/ca.crt"),
            format!("--token-auth-file={d}/tokens.csv"),
            format!("--service-account-issuer={SA_ISSUER}"),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            format!("--api-audiences={SA_ISSUER}"),
            "--authorization-mode=RBAC,Node".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!("--cert-dir={d}/certs"),
            "--v=0".into(),
        ]);
        let child = spawn_owned(cmd);
        self.procs.lock().unwrap().apiserver = Some(child);
        self.wait_ready(Duration::from_secs(60));
    }

    /// Stops the API server (etcd keeps the data) and starts it again on the
    /// same port: watches break and must be re-established by their clients.
    pub fn restart_apiserver(&self) {
        self.stop_apiserver();
        self.start_apiserver();
    }

    /// One call to etcd's JSON gateway (`/v3/kv/...`): what an operator's
    /// etcdctl would do, for faults the API server never makes itself.
    pub fn etcd(&self, path: &str, body: &Value) -> Value {
        use std::io::{Read, Write};
        let body = body.to_string();
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.etcd_port)).unwrap();
        write!(
            tcp,
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        let (head, json) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "etcd {path}: {answer}"
        );
        serde_json::from_str(json).unwrap()
    }

    /// Deletes `key` in etcd behind the API server's back; whether it was there.
    pub fn etcd_delete(&self, key: &str) -> bool {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        let answer = self.etcd("/v3/kv/deleterange", &serde_json::json!({"key": key}));
        answer["deleted"] == "1"
    }

    /// Compacts etcd's history up to its current revision: a watch resumed
    /// from any earlier resource version gets `410 Gone`.
    pub fn compact_etcd(&self) -> u64 {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode("/registry");
        let answer = self.etcd("/v3/kv/range", &serde_json::json!({"key": key, "limit": 1}));
        let revision: u64 = answer["header"]["revision"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        self.etcd(
            "/v3/kv/compaction",
            &serde_json::json!({"revision": revision.to_string(), "physical": true}),
        );
        revision
    }

    /// Stops the API server; [`Self::restart_apiserver`] brings it back.
    pub fn stop_apiserver(&self) {
        if let Some(mut a) = self.procs.lock().unwrap().apiserver.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let out = self.kubectl_output(&["get", "--raw", "/readyz"], None);
            if out.status.success() {
                return;
            }
            if let Some(Ok(Some(status))) = self
                .procs
                .lock()
                .unwrap()
                .apiserver
                .as_mut()
                .map(|c| c.try_wait())
            {
                panic!(
                    "kube-apiserver exited ({status}); see {}/kube-apiserver.log",
                    self.dir.display()
                );
            }
            assert!(
                start.elapsed() < limit,
                "kube-apiserver not ready after {limit:?}: {}; see {}/kube-apiserver.log",
                String::from_utf8_lossy(&out.stderr),
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new(binary("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match stdin {
            None => cmd.stdin(Stdio::null()).output().expect("run kubectl"),
            Some(input) => {
                use std::io::Write;
                cmd.stdin(Stdio::piped());
                let mut child = cmd.spawn().expect("run kubectl");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            }
        }
    }

    /// Runs the matching kubectl as the admin; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let out = self.kubectl_output(args, stdin);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// One API request as the admin (or as `bearer`); returns the status and
    /// the decoded JSON body (`Null` when the body is not JSON).
    pub async fn request_as(
        &self,
        bearer: &str,
        method: http::Method,
        path: &str,
        content_type: &'static str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let addr = format!("127.0.0.1:{}", self.port);
        let (status, bytes) = tessera_agent::transport::https_client::send(
            tessera_agent::transport::https_client::Request {
                addr: &addr,
                server_name: "127.0.0.1",
                tls: self.tls.clone(),
                method,
                path,
                bearer: Some(bearer.to_string()),
                content_type,
                body: body.map(|b| b.to_string().into_bytes()),
                timeout: Duration::from_secs(30),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.request_as(&self.admin_token, method, path, "application/json", body)
            .await
    }

    /// POSTs `body` to `path`, asserting it was created.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.request(http::Method::POST, path, Some(&body)).await;
        assert!(
            status == 201 || status == 200,
            "POST {path}: {status} {answer}"
        );
        answer
    }

    /// A fresh namespace named `<prefix>-<n>`, with optional labels.
    pub async fn namespace(&self, prefix: &str, labels: Value) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        self.create(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}}),
        )
        .await;
        name
    }

    /// Creates the Role `name` in `ns` with `rules` and binds it to the
    /// service account `sa` of `ns`.
    pub async fn grant_role(&self, ns: &str, name: &str, rules: Value, sa: &str) {
        let rbac = "/apis/rbac.authorization.k8s.io/v1";
        self.create(
            &format!("{rbac}/namespaces/{ns}/roles"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name}, "rules": rules}),
        )
        .await;
        self.create(
            &format!("{rbac}/namespaces/{ns}/rolebindings"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}),
        )
        .await;
    }

    pub async fn service_account(&self, ns: &str, name: &str) {
        self.create(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        )
        .await;
    }

    /// A token from the TokenRequest API for `ns/sa`, for `audience`, bound
    /// to the pod `bound_pod` (name, uid) when given.
    pub async fn token(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        bound_pod: Option<(&str, &str)>,
    ) -> String {
        let mut spec = json!({"audiences": [audience], "expirationSeconds": 3600});
        if let Some((name, uid)) = bound_pod {
            spec["boundObjectRef"] =
                json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
        }
        let answer = self
            .create(
                &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
            )
            .await;
        answer["status"]["token"].as_str().unwrap().to_string()
    }

    /// Creates the pod `p` (scheduled on its node: no scheduler runs here)
    /// and, when `p.running`, reports its containers running in its status
    /// the way a kubelet would. Returns the pod.
    pub async fn pod(&self, p: TestPod<'_>) -> Value {
        let spec_containers: Vec<Value> = p
            .containers
            .iter()
            .map(|(n, i)| json!({"name": n, "image": i}))
            .collect();
        let pod = self
            .create(
                &format!("/api/v1/namespaces/{}/pods", p.ns),
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": p.name, "labels": p.labels},
                       "spec": {"serviceAccountName": p.sa, "nodeName": p.node,
                                "automountServiceAccountToken": false,
                                "containers": spec_containers}}),
            )
            .await;
        if !p.running {
            return pod;
        }
        self.report_running(p.ns, p.name, p.containers).await
    }

    /// Writes a kubelet-like status: phase Running, every container running.
    pub async fn report_running(&self, ns: &str, name: &str, containers: &[(&str, &str)]) -> Value {
        let statuses: Vec<Value> = containers
            .iter()
            .enumerate()
            .map(|(i, (n, image))| {
                json!({"name": n, "image": image, "ready": true, "restartCount": 0,
                       "imageID": format!("docker.io/library/{image}@sha256:{:064x}", i + 1),
                       "containerID": format!("containerd://{name}-{n}"),
                       "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
            })
            .collect();
        let patch = json!({"status": {"phase": "Running", "containerStatuses": statuses}});
        let (status, answer) = self
            .request_as(
                &self.admin_token,
                http::Method::PATCH,
                &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                "application/merge-patch+json",
                Some(&patch),
            )
            .await;
        assert_eq!(status, 200, "status patch: {answer}");
        answer
    }

    /// Whether `user` (with `groups`) may `verb` `resource` (`group/resource`
    /// or a core `resource`, optionally `/subresource`) in `ns` (cluster-wide
    /// when `None`), by a SubjectAccessReview.
    pub async fn can(
        &self,
        user: &str,
        groups: &[&str],
        verb: &str,
        group: &str,
        resource: &str,
        ns: Option<&str>,
    ) -> bool {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        let mut attrs = json!({"verb": verb, "group": group, "resource": resource});
        if !sub.is_empty() {
            attrs["subresource"] = sub.into();
        }
        if let Some(ns) = ns {
            attrs["namespace"] = ns.into();
        }
        let answer = self
            .create(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                       "spec": {"user": user, "groups": groups, "resourceAttributes": attrs}}),
            )
            .await;
        answer["status"]["allowed"].as_bool().unwrap_or(false)
    }

    /// Writes `token` to a file in `dir` (what a mounted token looks like).
    pub fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p
    }
}

/// The chart rendered by the real Helm engine (`tests/helm/render_json.py`,
/// in the venv `tests/helm/setup.sh` makes) as one JSON `List`.
pub fn render_chart(release: &str, ns: &str, values: &Value) -> Value {
    let helm = concat!(env!("CARGO_MANIFEST_DIR"), "/helm");
    let setup = std::process::Command::new("bash")
        .arg(format!("{helm}/setup.sh"))
        .status()
        .expect("run tests/helm/setup.sh");
    assert!(
        setup.success(),
        "tests/helm/setup.sh failed: this test renders the chart with the Helm engine it installs (python3 -m venv and pip; CI runs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let values_file = dir.path().join("values.json");
    std::fs::write(&values_file, values.to_string()).unwrap();
    let out = std::process::Command::new(format!("{helm}/.venv/bin/python"))
        .arg(format!("{helm}/render_json.py"))
        .args([release, ns])
        .arg(&values_file)
        .output()
        .expect("run tests/helm/render_json.py");
    assert!(
        out.status.success(),
        "rendering the chart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
