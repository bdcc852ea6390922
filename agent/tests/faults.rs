//! Crash consistency of the real `tessera` binary: `kill -9` at random points
//! while everything that writes state is busy, then a restart on the same
//! data directory and checks of everything that must have survived.
//!
//! Load while the agent runs (all at once, every iteration):
//! * CA rollover every ~4 s (`authority.ca_ttl = "8s"`), JWT-SVID and
//!   access-token key rollover every ~10 s (`jwt_key_ttl = "20s"`), each
//!   persisted to `authority.json`;
//! * X509-SVID rotation every ~3 s (`x509_ttl = "6s"`) with a stream open;
//! * a policy file rewritten continuously (reload every 50 ms), sometimes
//!   left half-written or invalid;
//! * token exchanges (audit writes), task ends and token revocations in flight.
//!
//! After each kill: `tessera audit verify` on the crashed file (only `TornTail`
//! may be reported), restart on the same data dir, then
//! * the agent starts, so `authority.json` and `revocations.jsonl` load;
//! * the X509-SVID it serves parses with the `spiffe` crate and its signature
//!   verifies (ring) against a CA of the bundle it serves, valid now;
//! * `tessera audit verify` passes, and lists every torn line as recovered;
//! * every revocation and task end answered 200 before any kill is still
//!   inactive on introspection, and an ended task cannot get a new token;
//! * every token answered 200 has its record (`token_sha256`) in the log.
//!
//! Every third iteration also simulates a write cut by power loss (which
//! `kill -9` alone rarely produces): half a record appended to the audit log
//! and half an entry to the revocation file, neither ever acknowledged.
//!
//! No root needed. `TESSERA_FAULT_ITERATIONS` (default 12) and
//! `TESSERA_FAULT_SEED` rerun it longer or reproduce a run.

// These tests drive agent processes and wait on real time, which the
// agent's own rules (injected clock, paused tokio time, its lock type) do
// not govern.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde_json::Value;
use tessera_agent::cli::client::{form, http_unix};
use tessera_agent::exchange::request::{GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use tessera_workload_api as pb;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const ISSUER: &str = "spiffe://example.org/tessera";
const MCP: &str = "https://notes.example/mcp";

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_config(dir: &Path) -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    let d = dir.display();
    let text = format!(
        r#"trust_domain = "example.org"
socket_path = "{d}/sock/agent.sock"
data_dir = "{d}/data"

[svid]
x509_ttl = "6s"
jwt_ttl = "2s"

[authority]
ca_ttl = "8s"
jwt_key_ttl = "20s"

[[entries]]
spiffe_id = "spiffe://example.org/faults"
selectors = ["unix:uid:{uid}"]

[exchange]
policy_dir = "{d}/policies"
policy_reload_interval = "50ms"
max_ttl = "10m"

[limits]
shutdown_grace = "1s"
"#
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/notes.cedar"),
        format!(
            "@id(\"notes-read\")\npermit(principal, action == Tessera::Action::\"notes:read\", resource == Tessera::Audience::\"{MCP}\")\nwhen {{ principal.selectors.contains(\"unix:uid:{uid}\") }};\n"
        ),
    )
    .unwrap();
    path
}

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn socket(&self) -> PathBuf {
        self.dir.join("sock/agent.sock")
    }
    fn exchange_socket(&self) -> PathBuf {
        self.dir.join("sock/exchange.sock")
    }

    /// Starts the binary and waits until the exchange socket answers.
    async fn start(dir: &Path, config: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut agent = Self {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!(
                    "agent exited at start ({status}); log:\n{}",
                    tail(&dir.join("agent.log"))
                );
            }
            if http_unix(&agent.exchange_socket(), http::Method::GET, "/jwks", None)
                .await
                .is_ok()
            {
                return agent;
            }
            assert!(Instant::now() < deadline, "agent did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exit on SIGTERM: {status}");
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn post(socket: &Path, path: &str, pairs: &[(&str, &str)]) -> anyhow::Result<(u16, Value)> {
    let (status, body) = http_unix(socket, http::Method::POST, path, Some(form(pairs))).await?;
    Ok((status.as_u16(), serde_json::from_slice(&body)?))
}

async fn subject_token(socket: &Path) -> anyhow::Result<String> {
    let mut c = tessera_agent::cli::client::connect(socket).await?;
    let r = c
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec![ISSUER.into()],
            spiffe_id: String::new(),
        }))
        .await?;
    Ok(r.into_inner().svids[0].svid.clone())
}

async fn exchange(agent_sock: &Path, ex_sock: &Path, task: &str) -> anyhow::Result<(u16, Value)> {
    let subject = subject_token(agent_sock).await?;
    post(
        ex_sock,
        "/token",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("subject_token", &subject),
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", task),
            ("requested_ttl", "300"),
        ],
    )
    .await
}

/// What the agent acknowledged (answered 200) before it was killed.
#[derive(Default)]
struct Acked {
    issued: Vec<String>,
    /// (task id, a token of that task)
    ended_tasks: Vec<(String, String)>,
    revoked_tokens: Vec<String>,
    exchange_errors: usize,
}

/// One exchange worker: exchange, then end the task or revoke the token.
async fn exchange_worker(
    agent_sock: PathBuf,
    ex_sock: PathBuf,
    prefix: String,
    acked: Arc<Mutex<Acked>>,
) {
    for i in 0u64.. {
        let task = format!("{prefix}-{i}");
        let Ok((status, resp)) = exchange(&agent_sock, &ex_sock, &task).await else {
            // A refused connect completes without ever yielding: sleep, so
            // this task can be aborted and does not hog a runtime thread.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if status != 200 {
            acked.lock().unwrap().exchange_errors += 1;
            continue;
        }
        let token = resp["access_token"].as_str().unwrap().to_string();
        acked.lock().unwrap().issued.push(token.clone());
        if i % 2 == 0 {
            if let Ok((200, _)) = post(&ex_sock, "/revoke", &[("task_id", &task)]).await {
                acked.lock().unwrap().ended_tasks.push((task, token));
            }
        } else if let Ok((200, _)) = post(&ex_sock, "/revoke", &[("token", &token)]).await {
            acked.lock().unwrap().revoked_tokens.push(token);
        }
    }
}

/// Keeps an X509 stream open (SVID rotation pushes to it).
async fn x509_watcher(agent_sock: PathBuf) {
    loop {
        let Ok(mut c) = tessera_agent::cli::client::connect(&agent_sock).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if let Ok(r) = c
            .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
            .await
        {
            let mut stream = r.into_inner();
            while let Ok(Some(_)) = stream.message().await {}
        }
    }
}

/// Rewrites a policy file without care while the agent runs: half-written
/// and invalid states occur (a running agent keeps its previous set).
struct Churn {
    dir: PathBuf,
    stop: std::sync::atomic::AtomicBool,
    paused: Mutex<bool>,
}

impl Churn {
    fn run(&self) {
        let mut n = 0u64;
        while !self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            {
                let paused = self.paused.lock().unwrap();
                if !*paused {
                    let text = match n % 3 {
                        0 => format!(
                            "@id(\"extra-{n}\")\nforbid(principal, action == Tessera::Action::\"notes:delete\", resource);\n"
                        ),
                        1 => "permit(principal, action ==".to_string(),
                        _ => String::new(),
                    };
                    let _ = std::fs::write(self.dir.join("extra.cedar"), text);
                }
            }
            std::thread::sleep(Duration::from_millis(7));
        }
    }

    /// Stops the churn with a valid file in place (an agent refuses to start
    /// on an invalid policy file: there is no previous set to keep).
    fn pause(&self) {
        let mut paused = self.paused.lock().unwrap();
        std::fs::write(self.dir.join("extra.cedar"), "").unwrap();
        *paused = true;
    }

    fn resume(&self) {
        *self.paused.lock().unwrap() = false;
    }
}

fn audit_verify(path: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The served X509-SVID parses with the `spiffe` crate, is valid now, and its
/// signature verifies with the public key of one CA in the served bundle.
/// Returns the DER of that CA.
async fn check_x509(agent_sock: &Path) -> Vec<u8> {
    let mut c = tessera_agent::cli::client::connect(agent_sock)
        .await
        .unwrap();
    let mut stream = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let s = &msg.svids[0];
    let svid = spiffe::X509Svid::parse_from_der(&s.x509_svid, &s.x509_svid_key)
        .expect("spiffe crate accepts the SVID");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/faults");
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = spiffe::X509Bundle::parse_from_der(td, &s.bundle).expect("bundle parses");
    let leaf_der = svid.leaf().as_ref().to_vec();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let now = unix_now() as i64;
    let v = leaf.validity();
    assert!(
        v.not_before.timestamp() <= now && now < v.not_after.timestamp(),
        "SVID valid now"
    );
    for ca in bundle.authorities() {
        let (_, cert) = x509_parser::parse_x509_certificate(ca.as_ref()).unwrap();
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            cert.public_key().subject_public_key.data.as_ref(),
        );
        if key
            .verify(leaf.tbs_certificate.as_ref(), &leaf.signature_value.data)
            .is_ok()
        {
            let cv = cert.validity();
            assert!(cv.not_before.timestamp() <= now && now < cv.not_after.timestamp());
            assert!(
                cv.not_before.timestamp() <= v.not_before.timestamp()
                    && v.not_after.timestamp() <= cv.not_after.timestamp(),
                "SVID validity inside its CA's"
            );
            return ca.as_ref().to_vec();
        }
    }
    panic!("no CA in the served bundle verifies the served SVID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_acknowledged() {
    let iterations: usize = std::env::var("TESSERA_FAULT_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("TESSERA_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
                ^ unix_now()
        });
    eprintln!("kill -9 faults: {iterations} iterations, TESSERA_FAULT_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let config = write_config(&dir);
    let audit_log = dir.join("data/audit.jsonl");
    let revocations = dir.join("data/revocations.jsonl");
    let churn = Arc::new(Churn {
        dir: dir.join("policies"),
        stop: std::sync::atomic::AtomicBool::new(false),
        paused: Mutex::new(false),
    });
    let churn_thread = {
        let c = churn.clone();
        std::thread::spawn(move || c.run())
    };

    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut cas_seen = HashSet::new();
    let mut kids_seen = HashSet::new();
    let (mut torn_recovered, mut non_vacuous, mut checked) = (0usize, 0usize, 0usize);
    let mut torn_by_kill = 0usize;
    churn.pause();
    let mut agent = Agent::start(&dir, &config).await;
    churn.resume();
    for iteration in 0..iterations {
        // Load, then kill at a random point.
        let workers: Vec<_> = (0..2)
            .map(|w| {
                tokio::spawn(exchange_worker(
                    agent.socket(),
                    agent.exchange_socket(),
                    format!("it{iteration}-w{w}"),
                    acked.clone(),
                ))
            })
            .chain(std::iter::once(tokio::spawn(x509_watcher(agent.socket()))))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.range(150, 1200))).await;
        agent.kill9();
        for w in &workers {
            w.abort();
        }
        for w in workers {
            let _ = w.await;
        }

        // The crashed files, before the agent reopens them.
        let (ok, report) = audit_verify(&audit_log);
        let mut torn_line = None;
        if !ok {
            assert!(
                report.contains(": TornTail:"),
                "iteration {iteration}: a crashed log may only have a torn tail: {report}"
            );
        }
        if iteration % 3 == 2 {
            // Power loss mid-write: half a record nobody was ever told about.
            let text = std::fs::read_to_string(&audit_log).unwrap();
            if ok && text.ends_with('\n') {
                let lines = text.lines().count() as u64;
                let half = "{\"seq\":999999,\"ts\":\"2025-01-01T00:00:00.000Z\",\"prev\":\"00";
                std::fs::write(&audit_log, format!("{text}{half}")).unwrap();
                torn_line = Some(lines + 1);
            }
            let mut rev = std::fs::read(&revocations).unwrap_or_default();
            rev.extend_from_slice(b"{\"k\":\"task\",\"id\":\"torn-by-power-");
            std::fs::write(&revocations, rev).unwrap();
        }
        if !ok {
            torn_by_kill += 1;
        }
        if torn_line.is_none() && !ok {
            // A real torn tail from the kill: find its line number.
            torn_line = report.split("line ").find_map(|r| {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                r[digits.len()..]
                    .starts_with(": TornTail:")
                    .then(|| digits.parse().ok())
                    .flatten()
            });
        }

        churn.pause();
        agent = Agent::start(&dir, &config).await;
        churn.resume();

        // Audit chain verifies; a torn line is reported as recovered.
        let (ok, report) = audit_verify(&audit_log);
        assert!(
            ok,
            "iteration {iteration}: audit verify after restart: {report}"
        );
        if let Some(line) = torn_line {
            assert!(
                report.contains(&format!("line {line}: torn by a crash")),
                "iteration {iteration}: torn line {line} not reported as recovered: {report}"
            );
            torn_recovered += 1;
        }
        // Every token released had its record durable first.
        let log = std::fs::read_to_string(&audit_log).unwrap();
        let recorded: HashSet<&str> = log
            .lines()
            .filter_map(|l| l.split("\"token_sha256\":\"").nth(1))
            .map(|r| &r[..64])
            .collect();

        // The CA state loads and signs SVIDs that verify against the bundle.
        cas_seen.insert(check_x509(&agent.socket()).await);
        let (_, jwks) = http_unix(&agent.exchange_socket(), http::Method::GET, "/jwks", None)
            .await
            .unwrap();
        let jwks: Value = serde_json::from_slice(&jwks).unwrap();
        for k in jwks["keys"].as_array().unwrap() {
            kids_seen.insert(k["kid"].as_str().unwrap().to_string());
        }

        // No acknowledged revocation or task end was lost.
        let (issued, ended, revoked) = {
            let a = acked.lock().unwrap();
            (
                a.issued.clone(),
                a.ended_tasks.clone(),
                a.revoked_tokens.clone(),
            )
        };
        for token in &issued {
            let sha = tessera_agent::audit::sha256_hex(token.as_bytes());
            assert!(
                recorded.contains(sha.as_str()),
                "iteration {iteration}: a token was released without its audit record"
            );
        }
        let now = unix_now();
        for (how, token) in ended
            .iter()
            .map(|(_, t)| ("its task was ended", t))
            .chain(revoked.iter().map(|t| ("it was revoked", t)))
            .filter(|(_, t)| jwt_claims(t)["exp"].as_u64().unwrap() > now)
        {
            let (status, json) = post(&agent.exchange_socket(), "/introspect", &[("token", token)])
                .await
                .unwrap();
            assert_eq!(status, 200);
            if json["active"] != false {
                // Everything needed to tell which write went missing.
                let claims = jwt_claims(token);
                let header: Value = serde_json::from_slice(
                    &Engine::decode(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                        token.split('.').next().unwrap(),
                    )
                    .unwrap(),
                )
                .unwrap();
                let jti = claims["jti"].as_str().unwrap_or_default();
                let file = std::fs::read_to_string(&revocations).unwrap_or_default();
                panic!(
                    "iteration {iteration}: an acknowledged revocation was lost: {how}, yet it is active \
                     (kid {}, claims {claims}, now {now}); its jti is {} the revocation file ({} lines); \
                     agent log:\n{}",
                    header["kid"],
                    if file.contains(jti) { "in" } else { "not in" },
                    file.lines().count(),
                    tail(&dir.join("agent.log"))
                );
            }
            non_vacuous += 1;
        }
        checked += ended.len() + revoked.len();
        // An ended task stays ended: no new token for it.
        if let Some((task, _)) = ended.last() {
            let (status, json) = exchange(&agent.socket(), &agent.exchange_socket(), task)
                .await
                .unwrap();
            assert_eq!(
                status, 400,
                "iteration {iteration}: ended task {task}: {json}"
            );
        }
    }
    agent.terminate();
    churn.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn_thread.join().unwrap();
    let (ok, report) = audit_verify(&audit_log);
    assert!(ok, "final audit verify: {report}");

    let a = acked.lock().unwrap();
    eprintln!(
        "kill -9 faults: {iterations} kills in {:.1?}; {} tokens issued, {} exchange errors, \
         {} task ends + {} revocations acknowledged, {checked} revocation checks \
         ({non_vacuous} on still-unexpired tokens), 0 lost; {} CAs and {} JWT/access keys seen; \
         {torn_recovered} torn lines recovered ({torn_by_kill} torn by the kill itself, the rest \
         injected); {report}",
        started.elapsed(),
        a.issued.len(),
        a.exchange_errors,
        a.ended_tasks.len(),
        a.revoked_tokens.len(),
        cas_seen.len(),
        kids_seen.len(),
    );
    assert!(
        !a.ended_tasks.is_empty() && !a.revoked_tokens.is_empty(),
        "the load did revoke"
    );
    assert!(
        non_vacuous > 0,
        "some revocation checks were on live tokens"
    );
    assert!(cas_seen.len() >= 2, "CA rollover happened during the run");
    assert!(torn_recovered >= 1 || iterations < 3);
}
