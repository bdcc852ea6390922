//! The `tessera` binary as a user runs it: exit codes, one-line errors, the
//! `--dev` quickstart, `api fetch --write` output checked with openssl(1).

// These tests drive agent processes and wait on real time, which the
// agent's own rule (injected clock, paused tokio time) does not govern.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn tessera(args: &[&str], socket: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(args: &[&str], cwd: &Path, socket: PathBuf) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "agent did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, socket }
    }

    fn terminate(mut self) -> Output {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let out = self.child.wait_with_output().unwrap();
                panic!(
                    "agent did not stop on SIGTERM; its output:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.child.wait_with_output().unwrap();
        assert!(!self.socket.exists(), "socket removed after SIGTERM");
        out
    }
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    let text = format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{d}/sock/agent.sock\"\ndata_dir = \"{d}/data\"\n\
         [[entries]]\nspiffe_id = \"spiffe://example.org/cli\"\nselectors = [\"unix:uid:{uid}\"]\n{extra}",
        d = dir.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn invalid_config_is_a_one_line_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[svid]\nx509_ttl = \"forever\"\n");
    let out = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("svid.x509_ttl") && err.contains("agent.toml:8"),
        "{err}"
    );

    let path = write_config(dir.path(), "bogus_key = 1\n");
    let out = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bogus_key"), "{}", stderr(&out));
}

#[test]
fn fetch_write_validate_healthcheck_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let socket = dir.path().join("sock/agent.sock");
    let daemon = Daemon::start(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        socket.clone(),
    );

    let out = tessera(&["healthcheck"], &socket);
    assert!(out.status.success(), "{}", stderr(&out));

    let certs = dir.path().join("certs");
    let out = tessera(
        &["api", "fetch", "x509", "--write", certs.to_str().unwrap()],
        &socket,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("spiffe://example.org/cli"));
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(certs.join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "private key written 0600");
    // openssl(1) checks the written chain against the written bundle and the key pair.
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "bundle.0.pem",
            "-purpose",
            "sslserver",
            "svid.0.pem",
        ])
        .current_dir(&certs)
        .output()
        .expect("openssl(1) is required for this test");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let pubkey = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(&certs)
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(
        pubkey(&["x509", "-in", "svid.0.pem", "-noout", "-pubkey"]),
        pubkey(&["pkey", "-in", "svid.0.key", "-pubout"])
    );

    let out = tessera(&["api", "fetch", "jwt", "--audience", "db"], &socket);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).lines().nth(1).unwrap().trim().to_string();
    let ok = tessera(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "db",
            "--svid",
            &token,
        ],
        &socket,
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("spiffe://example.org/cli"));
    let bad = tessera(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "web",
            "--svid",
            &token,
        ],
        &socket,
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("InvalidArgument"), "{}", stderr(&bad));

    let out = daemon.terminate();
    assert!(
        out.status.success(),
        "clean exit on SIGTERM: {}",
        stderr(&out)
    );
    let out = tessera(&["healthcheck"], &socket);
    assert!(!out.status.success(), "healthcheck fails without an agent");
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

#[test]
fn dev_mode_prints_the_socket_and_export_hint() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(".tessera/agent.sock");
    let daemon = Daemon::start(&["run", "--dev"], dir.path(), socket.clone());
    let out = tessera(&["api", "fetch", "x509"], &socket);
    assert!(out.status.success(), "{}", stderr(&out));
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert!(
        stdout(&out).contains(&format!("spiffe://example.org/user/{user}")),
        "{}",
        stdout(&out)
    );
    let printed = stdout(&daemon.terminate());
    assert!(
        printed.contains(&format!(
            "export SPIFFE_ENDPOINT_SOCKET=unix://{}",
            socket.display()
        )),
        "{printed}"
    );
    assert!(printed.contains("admin: http://127.0.0.1:"), "{printed}");
}

#[test]
fn bench_emits_one_json_object_per_scenario_with_the_contract_fields() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--json",
            "--duration",
            "300ms",
            "--clients",
            "2",
            "--streams",
            "20",
            "--identities",
            "3",
        ])
        .args([
            "x509-first",
            "x509-cold",
            "jwt-fetch",
            "jwt-validate",
            "fanout",
            "idle-memory",
            "sds-first",
            "sds-idle-memory",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|v| v["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "x509-first",
            "x509-cold",
            "jwt-fetch",
            "jwt-fetch",
            "jwt-validate",
            "fanout",
            "idle-memory",
            "sds-first",
            "sds-idle-memory"
        ]
    );
    for v in &lines {
        for key in [
            "params",
            "ops",
            "seconds",
            "ops_per_sec",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "agent_rss_bytes",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        assert!(v["agent_rss_bytes"].as_u64().unwrap() > 1024 * 1024, "{v}");
    }
    let sds_idle = &lines[8];
    assert_eq!(sds_idle["ops"], 20, "20 streams held");
    assert_eq!(sds_idle["connections"], 10, "two per Envoy");
    assert!(lines[7]["request_bytes"].as_u64().unwrap() >= 60 * 1024);
    let cold = &lines[1];
    assert_eq!(cold["ops"], 9, "3 identities x 3 rounds");
    assert!(
        cold["raw_ops_per_sec"].as_f64().unwrap() > 0.0
            && cold["ratio_to_raw"].as_f64().unwrap() > 0.0
    );
    assert!(lines[5]["all_updated_ms"].as_f64().is_some());
    let bad = Command::new(BIN).args(["bench", "nope"]).output().unwrap();
    assert!(!bad.status.success() && stderr(&bad).contains("unknown scenario"));
}

/// `grants` measures every grant of the token endpoint on both transports
/// in one run: six rows, each with requests that all succeeded (a refused
/// request fails the bench), CPU per request, and over HTTPS a new
/// JWT-SVID per request (the endpoint accepts each once, so a reused one
/// would have failed the row).
#[test]
fn bench_grants_measures_each_grant_on_the_socket_and_over_https() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--json",
            "--duration",
            "300ms",
            "--clients",
            "2",
            "grants",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<(String, String)> = stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["scenario"], "grants");
            assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
            assert!(v["p99_ms"].as_f64().unwrap() > 0.0, "{v}");
            assert!(v.get("agent_cpu_us_per_op").is_some(), "{v}");
            (
                v["params"]["transport"].as_str().unwrap().to_string(),
                v["params"]["grant"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["socket", "https"]
        .iter()
        .flat_map(|t| {
            ["rfc8693", "client-credentials", "jwt-bearer"]
                .iter()
                .map(move |g| (t.to_string(), g.to_string()))
        })
        .collect();
    assert_eq!(rows, expected);
}

/// `--socket` with `--agent-pid` measures any running agent as fully as one
/// the bench starts: CPU per operation and memory from /proc of that PID, the
/// idle-memory figure per stream, a pushed renewal (fanout) and a new entry
/// registered by a command (here the way a Tessera agent takes one: appended
/// to its config, then SIGHUP). This is how BENCHMARKS.md measures SPIRE's
/// agent beside Tessera's.
#[test]
fn bench_measures_a_running_agent_given_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    // A 4 s X509-SVID renews at 1.6-2.4 s, inside the fanout's wait.
    let config = write_config(
        dir.path(),
        "[svid]\nx509_ttl = \"4s\"\n[limits]\nrequests_per_second = 1e9\nrequest_burst = 1e9\n",
    );
    let socket = dir.path().join("sock/agent.sock");
    let daemon = Daemon::start(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        socket.clone(),
    );
    let pid = daemon.child.id().to_string();
    let uid = nix::unistd::geteuid().as_raw();
    let register = format!(
        "printf '[[entries]]\\nspiffe_id = \"%s\"\\nselectors = [\"unix:uid:{uid}\"]\\n' \"$TESSERA_BENCH_NEW_ID\" >> {} && kill -HUP {pid}",
        config.display()
    );
    let out = Command::new(BIN)
        .args(["bench", "--json", "--socket", socket.to_str().unwrap()])
        .args(["--agent-pid", &pid, "--duration", "300ms", "--clients", "2"])
        .args([
            "--streams",
            "20",
            "--opening",
            "3",
            "--rounds",
            "2",
            "--rotation-timeout",
            "20s",
        ])
        .args(["--register-command", &register])
        .args([
            "x509-first",
            "jwt-fetch",
            "jwt-validate",
            "idle-memory",
            "fanout",
        ])
        .args(["new-entry", "x509-cold", "exchange"])
        .output()
        .unwrap();
    let printed = stdout(&out);
    let agent = daemon.terminate();
    assert!(
        out.status.success(),
        "{}\nagent: {}",
        stderr(&out),
        String::from_utf8_lossy(&agent.stderr)
    );
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|v| v["scenario"].as_str().unwrap())
        .collect();
    // x509-cold and exchange need a config only the bench can write: skipped, and said so.
    assert_eq!(
        names,
        [
            "x509-first",
            "jwt-fetch",
            "jwt-fetch",
            "jwt-validate",
            "idle-memory",
            "fanout",
            "new-entry"
        ]
    );
    assert!(stderr(&out).contains("x509-cold: skipped with --socket"));
    for v in &lines {
        assert!(v["agent_rss_bytes"].as_u64().unwrap() > 1024 * 1024, "{v}");
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    }
    for v in &lines[..4] {
        assert!(v["agent_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{v}");
    }
    let idle = &lines[4];
    assert!(idle["baseline_rss_bytes"].as_u64().unwrap() > 1024 * 1024);
    // The anonymous part of the agent's memory is some of it, not all: the
    // executable's own pages are the rest.
    let anon = idle["baseline_anon_bytes"].as_u64().unwrap();
    assert!(
        anon > 0 && anon < idle["baseline_rss_bytes"].as_u64().unwrap(),
        "{idle}"
    );
    assert!(idle["rss_per_stream_bytes"].as_u64().is_some(), "{idle}");
    assert_eq!(lines[5]["ops"], 20, "every stream got the renewal");
    assert!(lines[5]["all_updated_ms"].as_f64().is_some());
    assert_eq!(lines[6]["ops"], 2, "both new entries arrived");

    let refused = Command::new(BIN)
        .args(["bench", "--agent-pid", &pid, "x509-first"])
        .output()
        .unwrap();
    assert!(!refused.status.success() && stderr(&refused).contains("--socket"));
    let gone = Command::new(BIN)
        .args(["bench", "--socket", socket.to_str().unwrap()])
        .args(["--agent-pid", "999999999", "x509-first"])
        .output()
        .unwrap();
    assert!(!gone.status.success() && stderr(&gone).contains("--agent-pid 999999999"));
}

/// No key, certificate or token may reach the logs, even at trace level.
#[test]
fn logs_carry_no_secrets_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("db.cedar"),
        "permit(principal, action == Tessera::Action::\"db:read\", resource == Tessera::Audience::\"db-api\");\n",
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        &format!("[exchange]\npolicy_dir = \"{}\"\n", policies.display()),
    );
    let socket = dir.path().join("sock/agent.sock");
    // Logs go to a file: at trace level they would fill a pipe nobody reads.
    let log_path = dir.path().join("agent.log");
    let child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let daemon = Daemon {
        child,
        socket: socket.clone(),
    };
    let certs = dir.path().join("certs");
    assert!(
        tessera(
            &["api", "fetch", "x509", "--write", certs.to_str().unwrap()],
            &socket
        )
        .status
        .success()
    );
    let out = tessera(&["api", "fetch", "jwt", "--audience", "db"], &socket);
    let token = stdout(&out).lines().nth(1).unwrap().trim().to_string();
    assert!(
        tessera(
            &[
                "api",
                "validate",
                "jwt",
                "--audience",
                "db",
                "--svid",
                &token
            ],
            &socket
        )
        .status
        .success()
    );
    assert!(
        !tessera(
            &[
                "api",
                "validate",
                "jwt",
                "--audience",
                "x",
                "--svid",
                &token
            ],
            &socket
        )
        .status
        .success()
    );
    // A full exchange round: issue, introspect, end the task.
    let out = tessera(
        &[
            "token",
            "exchange",
            "--audience",
            "db-api",
            "--scope",
            "db:read",
            "--task",
            "t1",
        ],
        &socket,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let issued: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let access_token = issued["access_token"].as_str().unwrap().to_string();
    let out = tessera(&["token", "introspect", &access_token], &socket);
    assert!(
        stdout(&out).contains("\"active\": true"),
        "{}",
        stdout(&out)
    );
    assert!(
        tessera(&["token", "revoke", "--task", "t1"], &socket)
            .status
            .success()
    );
    let out = tessera(&["token", "introspect", &access_token], &socket);
    assert!(
        stdout(&out).contains("\"active\": false"),
        "{}",
        stdout(&out)
    );

    daemon.terminate();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.lines().count() > 20, "trace logging was on:\n{logs}");
    let (_, access_signature) = access_token.rsplit_once('.').unwrap();

    let (_, signature) = token.rsplit_once('.').unwrap();
    let key_pem = std::fs::read_to_string(certs.join("svid.0.key")).unwrap();
    let key_b64: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let cert_pem = std::fs::read_to_string(certs.join("svid.0.pem")).unwrap();
    let cert_b64: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let state = std::fs::read_to_string(dir.path().join("data/authority.json")).unwrap();
    let ca_key: serde_json::Value = serde_json::from_str(&state).unwrap();
    let access_key = ca_key["access_keys"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let ca_key = ca_key["cas"][0]["key"].as_str().unwrap();
    for (what, secret) in [
        ("access token", access_token.as_str()),
        ("access token signature", access_signature),
        ("access-token signing key", &access_key[40..80]),
        ("JWT", token.as_str()),
        ("JWT signature", signature),
        ("SVID private key", &key_b64[40..80]),
        ("SVID certificate", &cert_b64[100..140]),
        ("CA private key", &ca_key[40..80]),
        ("PEM armour", "-----BEGIN"),
    ] {
        assert!(!logs.contains(secret), "{what} found in the agent's logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_caller_is_slowed_down_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[limits]\nrequests_per_second = 2\nrequest_burst = 5\n[exchange]\n",
    );
    let daemon = Daemon::start(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        dir.path().join("sock/agent.sock"),
    );
    // This test process floods: the first `burst` calls pass, then
    // ResourceExhausted.
    let mut api = tessera_agent::cli::client::connect(&daemon.socket)
        .await
        .unwrap();
    let mut codes = Vec::new();
    for _ in 0..12 {
        let r = api
            .fetch_jwtsvid(tessera_workload_api::with_security_header(
                tessera_workload_api::JwtsvidRequest {
                    audience: vec!["db".into()],
                    spiffe_id: String::new(),
                },
            ))
            .await;
        codes.push(r.err().map(|s| s.code()));
    }
    assert!(codes[..5].iter().all(Option::is_none), "{codes:?}");
    assert!(
        codes[5..].contains(&Some(tonic::Code::ResourceExhausted)),
        "{codes:?}"
    );
    // The exchange socket shares the budget and says slow_down (429).
    let (status, body) = tessera_agent::cli::client::http_unix(
        &dir.path().join("sock/exchange.sock"),
        http::Method::POST,
        "/introspect",
        Some("token=x".into()),
    )
    .await
    .unwrap();
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("slow_down"));
    // Another process is served normally meanwhile.
    let out = tessera(&["api", "fetch", "jwt", "--audience", "db"], &daemon.socket);
    assert!(out.status.success(), "{}", stderr(&out));
    daemon.terminate();
}

/// The walk-through a newcomer follows with nothing written by hand: `run
/// --dev`, then an exchange for the demo audience, then the scope that needs
/// an approval, approved on the operator socket and redeemed. Each token is
/// checked by jsonwebtoken against the keys the agent publishes.
#[test]
fn dev_mode_token_exchange_walkthrough_needs_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(".tessera/agent.sock");
    let exchange_socket = dir.path().join(".tessera/exchange.sock");
    let daemon = Daemon::start(&["run", "--dev"], dir.path(), socket.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange_socket.exists() {
        assert!(Instant::now() < deadline, "no exchange socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = runtime.block_on(async {
        let (status, body) = tessera_agent::cli::client::http_unix(
            &exchange_socket,
            http::Method::GET,
            "/jwks",
            None,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    });
    let verify = |out: &Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", stderr(out));
        let resp: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let token = resp["access_token"].as_str().unwrap();
        let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["demo"]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .unwrap()
            .claims
    };

    let exchange = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "exchange",
            "--audience",
            "demo",
            "--task",
            "first-minute",
        ];
        args.extend_from_slice(extra);
        tessera(&args, &socket)
    };
    let read = verify(&exchange(&["--scope", "demo:read"]));
    assert_eq!(read["scope"], "demo:read");
    assert_eq!(read["txn"], "first-minute");

    // demo:write waits for an operator.
    let pending = exchange(&["--scope", "demo:write"]);
    assert!(!pending.status.success());
    let pending: serde_json::Value = serde_json::from_slice(&pending.stdout).unwrap();
    assert_eq!(pending["error"], "authorization_pending", "{pending}");
    let id = pending["approval_id"].as_str().unwrap().to_string();
    let operator = dir.path().join(".tessera-operator/admin.sock");
    let approved = Command::new(BIN)
        .args(["approvals", "approve", &id, "--admin-socket"])
        .arg(&operator)
        .output()
        .unwrap();
    assert!(approved.status.success(), "{}", stderr(&approved));
    let write = verify(&exchange(&["--scope", "demo:write", "--approval-id", &id]));
    assert_eq!(write["scope"], "demo:write");

    // The policy is written once: an edit survives the next start.
    let policy = dir.path().join(".tessera/policies/demo.cedar");
    assert!(
        std::fs::read_to_string(&policy)
            .unwrap()
            .contains("demo:write")
    );
    let printed = stdout(&daemon.terminate());
    assert!(
        printed.contains("try: tessera token exchange --audience demo"),
        "{printed}"
    );
    std::fs::write(&policy, "// mine\n").unwrap();
    let again = Daemon::start(&["run", "--dev"], dir.path(), socket.clone());
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), "// mine\n");
    again.terminate();
}

/// A `tessera authority run` process as an operator starts one: keys made
/// with `authority init` in `dir/keys`, the config file `dir/authority.toml`
/// (rewritten by the test), a free loopback port, and nodes attested with
/// join tokens from `dir/join`.
struct AuthorityProcess {
    dir: PathBuf,
    port: u16,
    config: PathBuf,
}

impl AuthorityProcess {
    /// `tessera authority init` for example.org in `dir/keys`.
    fn init(dir: &Path) -> Self {
        let out = Command::new(BIN)
            .args([
                "authority",
                "init",
                "--trust-domain",
                "example.org",
                "--dir",
            ])
            .arg(dir.join("keys"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            dir: dir.to_path_buf(),
            port,
            config: dir.join("authority.toml"),
        }
    }

    /// Writes the config file: `entries`, and `server_extra` added to its
    /// `[server]` table.
    fn write_config(&self, entries: &str, server_extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "trust_domain = \"example.org\"\n{entries}\n[server]\nlisten = \"127.0.0.1:{port}\"\nkeys_dir = \"{k}\"\njoin_token_dir = \"{j}\"\n{server_extra}",
                port = self.port,
                k = self.dir.join("keys").display(),
                j = self.dir.join("join").display(),
            ),
        )
        .unwrap()
    }

    /// Starts `tessera authority run` on the config file, its stderr into
    /// `log`; returns once it listens.
    fn run(&self, log: &Path) -> Child {
        let child = Command::new(BIN)
            .args(["authority", "run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "authority not listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// The `[upstream]` table of a node `node` of this authority, attested
    /// with a join token `tessera authority join-token` makes (kept in
    /// `dir/join-token`), with `extra` added.
    fn upstream(&self, node: &str, extra: &str) -> String {
        let out = Command::new(BIN)
            .args(["authority", "join-token", "--node", node, "--dir"])
            .arg(self.dir.join("join"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let token_file = self.dir.join("join-token");
        std::fs::write(&token_file, stdout(&out).trim()).unwrap();
        format!(
            "[upstream]\naddresses = [\"127.0.0.1:{port}\"]\nbundle_file = \"{k}/ca.crt\"\nnode_attestation = \"join_token\"\ntoken_file = \"{t}\"\n{extra}",
            port = self.port,
            k = self.dir.join("keys").display(),
            t = token_file.display(),
        )
    }
}

/// `tessera authority run` reloads its config file's entries on SIGHUP: a
/// valid file takes effect at once, an invalid one is logged with its key
/// and the entries in force stay. The node is a real agent process attested
/// with a join token; the judge of what the workload gets is the `spiffe`
/// crate.
#[test]
fn the_authority_reloads_its_entries_on_sighup_and_keeps_them_when_the_file_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uid = nix::unistd::geteuid().as_raw();
    let process = AuthorityProcess::init(d);
    let entry = |name: &str| {
        format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/{name}\"\nselectors = [\"tessera:node:n1\", \"unix:uid:{uid}\"]\n"
        )
    };
    let write_authority = |entries: &str| process.write_config(entries, "");
    write_authority(&entry("base"));
    let log = d.join("authority.log");
    let mut authority = process.run(&log);
    let agent_dir = d.join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    // The agent maps this process to both IDs; the authority decides.
    let agent_toml = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{a}/sock/agent.sock\"\ndata_dir = \"{a}/data\"\n{}{}\n{}",
            entry("base"),
            entry("reloaded"),
            process.upstream("n1", ""),
            a = agent_dir.display(),
        ),
    )
    .unwrap();
    let agent = Daemon::start(
        &["run", "--config", agent_toml.to_str().unwrap()],
        d,
        agent_dir.join("sock/agent.sock"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = format!("unix://{}", agent.socket.display());
    let reloaded = spiffe::SpiffeId::new("spiffe://example.org/reloaded").unwrap();
    // A fresh audience each time, so the agent asks the authority again.
    let mut n = 0;
    let mut signed = |rt: &tokio::runtime::Runtime| {
        n += 1;
        let audience = format!("aud-{n}");
        rt.block_on(async {
            let client = spiffe::WorkloadApiClient::connect_to(endpoint.clone())
                .await
                .unwrap();
            client
                .fetch_jwt_svid([audience.as_str()], Some(&reloaded))
                .await
        })
    };
    let hup = |child: &Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let eventually = |what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let err = signed(&rt).expect_err("not in the authority's entries yet");
    assert!(
        matches!(
            err,
            spiffe::workload_api::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );

    // A valid file: the new entry is in force.
    write_authority(&format!("{}{}", entry("base"), entry("reloaded")));
    hup(&authority);
    eventually("the reloaded entry is never signed", &mut || {
        signed(&rt).is_ok()
    });

    // An invalid file: logged with the key, the entries in force stay.
    write_authority(&format!(
        "{}[[entries]]\nspiffe_id = \"spiffe://example.org/x\"\nselectors = [\"tessera:node:n1\"]\nx509_ttl = \"soon\"\n",
        entry("base")
    ));
    hup(&authority);
    eventually("no log line for the rejected reload", &mut || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reload rejected")
    });
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("entries[1].x509_ttl"), "{logged}");
    let svid = signed(&rt).expect("the previous entries stay in force");
    assert_eq!(svid.spiffe_id(), &reloaded);

    // A valid file without it: withdrawn.
    write_authority(&entry("base"));
    hup(&authority);
    eventually("the removed entry is still signed", &mut || {
        signed(&rt).is_err()
    });

    let _ = agent.terminate();
    let _ = authority.kill();
    let _ = authority.wait();
}

/// `join-token --manifest` writes the JoinToken object for `kubectl apply`:
/// named by the token's SHA-256, holding the node and expiry but never the
/// token, which is printed once.
#[test]
fn join_token_manifest_holds_the_hash_not_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jt.json");
    let out = Command::new(BIN)
        .args([
            "authority",
            "join-token",
            "--node",
            "vm-7",
            "--ttl",
            "5m",
            "--manifest",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    assert_eq!(token.len(), 43, "32 bytes, base64url: {token}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&token));
    let obj: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(obj["kind"], "JoinToken");
    assert_eq!(obj["spec"]["node"], "vm-7");
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(obj["metadata"]["name"], hex);
    let out = Command::new(BIN)
        .args(["authority", "join-token", "--node", "vm-7"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "needs --dir or --manifest");
}

/// `text` without ANSI colour sequences (the log is coloured even into a
/// file).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A node's log says what changed, and only that (found when the fleet ran
/// against a real API server): no "reachable again" at start; one warning
/// when the authority goes away however many requests fail; a failed node
/// SVID renewal names the expiry as an RFC 3339 time (it printed a raw
/// `SystemTime`); and "reachable again" once when it is back. A real
/// authority process and a real node process, the node's stderr read as an
/// operator reads it.
#[test]
fn a_nodes_log_reports_the_authority_leaving_and_coming_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uid = nix::unistd::geteuid().as_raw();
    let process = AuthorityProcess::init(d);
    let entry = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/w\"\nselectors = [\"tessera:node:n1\", \"unix:uid:{uid}\"]\n"
    );
    process.write_config(&entry, "node_svid_ttl = \"30s\"\n");
    let mut authority = process.run(&d.join("authority-1.log"));
    let a = d.join("agent");
    std::fs::create_dir(&a).unwrap();
    let agent_toml = a.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{a}/sock/agent.sock\"\ndata_dir = \"{a}/data\"\n{entry}\n{}",
            process.upstream(
                "n1",
                "bundle_refresh = \"200ms\"\nrequest_timeout = \"1s\"\n"
            ),
            a = a.display(),
        ),
    )
    .unwrap();
    let agent_log = a.join("agent.log");
    let mut agent = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&agent_toml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let log = || plain(&std::fs::read_to_string(&agent_log).unwrap_or_default());
    let eventually = |what: &str, f: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = log();
            if f(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{what}; the node's log:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Attested, and serving: a workload gets its SVID (the spiffe crate).
    let socket = a.join("sock/agent.sock");
    eventually("the node never served its socket", &|_| socket.exists());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
            .await
            .unwrap();
        let svid = client.fetch_x509_svid().await.unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/w");
    });
    let at_start = log();
    assert!(
        !at_start.contains("reachable again"),
        "nothing was unreachable yet:\n{at_start}"
    );

    // The authority goes away: renewals (due from half the node SVID's life)
    // fail every 200 ms, one warning says so.
    authority.kill().unwrap();
    authority.wait().unwrap();
    let failed = "node SVID renewal failed";
    let text = eventually("no failed renewal logged twice", &|t| {
        t.matches(failed).count() >= 2
    });
    assert_eq!(
        text.matches("no fleet authority replica answers").count(),
        1,
        "one warning per outage:\n{text}"
    );
    assert!(!text.contains("SystemTime"), "{text}");
    let line = text.lines().find(|l| l.contains(failed)).unwrap();
    let expires = line
        .split("expires=")
        .nth(1)
        .unwrap_or_else(|| panic!("no expires= in {line}"));
    let stamp: Vec<char> = expires.chars().take(20).collect();
    let shape: String = stamp
        .iter()
        .map(|c| if c.is_ascii_digit() { 'd' } else { *c })
        .collect();
    assert_eq!(shape, "dddd-dd-ddTdd:dd:ddZ", "an RFC 3339 time: {line}");

    // Back before the node SVID expires: said once.
    let mut authority = process.run(&d.join("authority-2.log"));
    let text = eventually("the authority's return never logged", &|t| {
        t.contains("reachable again")
    });
    std::thread::sleep(Duration::from_millis(600));
    let text = {
        let later = log();
        assert!(later.len() >= text.len());
        later
    };
    assert_eq!(text.matches("reachable again").count(), 1, "{text}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = agent.wait();
    let _ = authority.kill();
    let _ = authority.wait();
}
