//! Faults around a running agent (in process, over its real sockets):
//!
//! * wall-clock jumps forward and back (an injected `Clock`): no SVID with a
//!   bad validity window, recovery within seconds;
//! * a full disk under `data_dir` (tmpfs of 64 KiB) — **needs root**;
//! * a read-only `data_dir` (remount of that tmpfs) — **needs root**.
//!
//! The disk tests FAIL, not skip, when not run as root: CI runs them as root.
//! `kill -9` crash tests live in `agent/tests/faults.rs` (they need the binary).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tessera_agent::app;
use tessera_agent::cli::client::{form, http_unix};
use tessera_agent::clock::Clock;
use tessera_agent::config::Config;
use tessera_agent::exchange::request::{GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use tessera_tests::{TestAgent, my_uid};
use tessera_workload_api as pb;

/// Why the tests that call `require_root` here need root.
const TMPFS: &str = "mount -t tmpfs";

const ISSUER: &str = "spiffe://example.org/tessera";
const MCP: &str = "https://notes.example/mcp";

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// One X509 message as served: SVID validity, its issuing CA's validity
/// (the CA in the served bundle whose key verifies the SVID's signature).
#[derive(Debug)]
struct Served {
    svid: (i64, i64),
    ca: (i64, i64),
    ca_der: Vec<u8>,
}

fn judge(msg: &pb::X509svidResponse) -> Served {
    let s = &msg.svids[0];
    let svid = spiffe::X509Svid::parse_from_der(&s.x509_svid, &s.x509_svid_key)
        .expect("the spiffe crate accepts the SVID");
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = spiffe::X509Bundle::parse_from_der(td, &s.bundle).expect("bundle parses");
    let leaf_der = svid.leaf().as_ref().to_vec();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let v = leaf.validity();
    let window = (v.not_before.timestamp(), v.not_after.timestamp());
    assert!(window.0 < window.1, "SVID notBefore < notAfter: {window:?}");
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
            let ca_window = (cv.not_before.timestamp(), cv.not_after.timestamp());
            assert!(
                ca_window.0 <= window.0 && window.1 <= ca_window.1,
                "SVID {window:?} outside its CA's window {ca_window:?}"
            );
            return Served {
                svid: window,
                ca: ca_window,
                ca_der: ca.as_ref().to_vec(),
            };
        }
    }
    panic!("no CA of the served bundle verifies the served SVID");
}

async fn fetch_x509(socket: &Path) -> Result<pb::X509svidResponse, tonic::Status> {
    let mut c = tessera_agent::cli::client::connect(socket).await.unwrap();
    let mut stream = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    Ok(stream.message().await?.expect("a first message"))
}

async fn fetch_jwt_claims(socket: &Path) -> Result<Value, tonic::Status> {
    use base64::Engine;
    let mut c = tessera_agent::cli::client::connect(socket).await.unwrap();
    let r = c
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await?;
    let token = r.into_inner().svids[0].svid.clone();
    let payload = token.split('.').nth(1).unwrap();
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap())
}

// ---------------------------------------------------------------- clock jumps

/// The real clock plus an offset the test moves (NTP step, VM resume, RTC
/// fault). Tokio timers stay monotonic, as in production.
struct JumpClock(AtomicI64);

impl Clock for JumpClock {
    fn now(&self) -> SystemTime {
        let off = self.0.load(Ordering::SeqCst);
        let now = SystemTime::now();
        if off >= 0 {
            now + Duration::from_secs(off as u64)
        } else {
            now - Duration::from_secs(off.unsigned_abs())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_forward_and_back() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // CA life 1 h, so +2 h lands past the CA's expiry; SVIDs 10 min.
    let body = format!(
        "[svid]\nx509_ttl = \"10m\"\njwt_ttl = \"5m\"\n[authority]\nca_ttl = \"1h\"\njwt_key_ttl = \"1h\"\n{}",
        TestAgent::entry_for_me("clock", "")
    );
    let config = Config::parse(&TestAgent::config_text(dir.path(), &body), "t.toml").unwrap();
    let clock = Arc::new(JumpClock(AtomicI64::new(0)));
    let agent = app::start(config, clock.clone()).await.unwrap();
    let socket = dir.path().join("sock/agent.sock");

    // One long-lived stream: every message it ever gets must be well formed.
    let watcher = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut c = tessera_agent::cli::client::connect(&socket).await.unwrap();
            let mut stream = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Ok(Some(msg)) = stream.message().await {
                judge(&msg); // panics on a bad window
                n += 1;
            }
            n
        })
    };

    let first = judge(&fetch_x509(&socket).await.unwrap());
    let mut report = vec![format!("start: SVID {:?} CA {:?}", first.svid, first.ca)];
    // +2 h, then -2 h (4 h back), then back to the real time.
    for offset in [7200i64, -7200, 0] {
        clock.0.store(offset, Ordering::SeqCst);
        let jumped = Instant::now();
        let deadline = jumped + Duration::from_secs(5);
        let mut errors = 0;
        let served = loop {
            let now = unix(clock.now());
            match fetch_x509(&socket).await {
                Ok(msg) => {
                    let s = judge(&msg);
                    // Valid at the agent's (jumped) time, and so is its CA.
                    if s.svid.0 <= now && now < s.svid.1 && s.ca.0 <= now && now < s.ca.1 {
                        break s;
                    }
                }
                Err(_) => errors += 1,
            }
            assert!(
                Instant::now() < deadline,
                "offset {offset:+}s: no SVID valid at the agent's time within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let claims = fetch_jwt_claims(&socket).await.unwrap();
        let (iat, exp) = (
            claims["iat"].as_i64().unwrap(),
            claims["exp"].as_i64().unwrap(),
        );
        let now = unix(clock.now());
        assert!(exp > iat, "JWT exp > iat: {claims}");
        assert!(
            iat <= now + 1 && now < exp,
            "offset {offset:+}s: JWT-SVID valid at the agent's time: iat {iat} exp {exp} now {now}"
        );
        report.push(format!(
            "offset {offset:+}s: valid SVID after {:?} ({errors} errors meanwhile), SVID {:?} CA {:?}",
            jumped.elapsed(),
            served.svid,
            served.ca
        ));
    }
    assert!(
        agent.callers.ready.load(Ordering::Acquire),
        "still ready after the jumps"
    );
    agent.stop().await.expect("clean stop, no panic");
    let messages = watcher.await.expect("every streamed SVID was well formed");
    eprintln!(
        "clock jumps in {:?}; stream got {messages} messages\n  {}",
        started.elapsed(),
        report.join("\n  ")
    );
}

// --------------------------------------------------------- disk full / ro

/// A tmpfs mounted on `path`, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(path.to_path_buf())
    }

    fn remount(&self, opt: &str) -> Result<(), String> {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .output()
            .unwrap();
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold files open if the test panicked.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes a filler file until the file system refuses; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [4096, 64] {
        let chunk = vec![0xa5u8; size];
        while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    }
    path
}

fn exchange_body(dir: &Path, extra: &str) -> String {
    format!(
        "{}\n[svid]\nx509_ttl = \"2s\"\n[authority]\nca_ttl = \"4s\"\njwt_key_ttl = \"1h\"\n[exchange]\npolicy_dir = \"{d}/policies\"\nmax_ttl = \"10m\"\n{extra}",
        TestAgent::entry_for_me("disk", ""),
        d = dir.display()
    )
}

fn write_policy(dir: &Path) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/p.cedar"),
        format!(
            "permit(principal, action == Tessera::Action::\"notes:read\", resource == Tessera::Audience::\"{MCP}\")\nwhen {{ principal.selectors.contains(\"unix:uid:{}\") }};\n",
            my_uid()
        ),
    )
    .unwrap();
}

async fn post(dir: &Path, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = http_unix(
        &dir.join("sock/exchange.sock"),
        http::Method::POST,
        path,
        Some(form(pairs)),
    )
    .await
    .unwrap();
    (status.as_u16(), serde_json::from_slice(&body).unwrap())
}

async fn exchange(agent: &TestAgent, task: &str) -> (u16, Value) {
    let subject = agent.jwt_svid(ISSUER).await;
    post(
        agent.dir.path(),
        "/token",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("subject_token", &subject),
            ("resource", MCP),
            ("scope", "notes:read"),
            ("task_id", task),
        ],
    )
    .await
}

fn audit_hashes(path: &Path) -> std::collections::HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split("\"token_sha256\":\"").nth(1))
        .map(|r| r[..64].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_exchanges_keeps_serving_and_recovers() {
    tessera_tests::require_root(
        "disk_full_refuses_exchanges_keeps_serving_and_recovers",
        TMPFS,
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = Tmpfs::mount(&data, "64k");
    write_policy(dir.path());
    let body = exchange_body(dir.path(), "");
    let agent = TestAgent::start_in(dir, &body).await;
    let d = agent.dir.path().to_path_buf();
    let audit_log = data.join("audit.jsonl");
    let mut issued = Vec::new();
    // Task ids of 256 bytes make revocation lines long, so the file's page fills fast.
    let task = |n: usize| format!("{n:04}{}", "t".repeat(252));

    let (status, resp) = exchange(&agent, &task(0)).await;
    assert_eq!(status, 200, "{resp}");
    issued.push(resp["access_token"].as_str().unwrap().to_string());
    let (status, _) = post(&d, "/revoke", &[("task_id", &task(0))]).await;
    assert_eq!(status, 200);

    let filler = fill(&data);
    // The log's last page may still take a few records; then every exchange fails.
    let (mut served_while_full, mut refused) = (0, 0);
    for n in 1..=40 {
        let (status, resp) = exchange(&agent, &task(n)).await;
        match status {
            200 => {
                assert_eq!(refused, 0, "no exchange succeeds after the first refusal");
                served_while_full += 1;
                issued.push(resp["access_token"].as_str().unwrap().to_string());
            }
            503 => {
                assert_eq!(resp["error"], "temporarily_unavailable", "{resp}");
                assert!(
                    resp.get("access_token").is_none(),
                    "nothing issued unaudited"
                );
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {resp}"),
        }
    }
    assert_eq!(
        refused, 5,
        "exchanges are refused once the audit log cannot grow"
    );

    // Revocations report the failure (and still apply in memory).
    let mut revoke_failed = None;
    for n in 1..=200 {
        let (status, resp) = post(&d, "/revoke", &[("task_id", &task(100 + n))]).await;
        if status != 200 {
            assert_eq!(status, 503, "{resp}");
            assert_eq!(resp["error"], "temporarily_unavailable", "{resp}");
            assert!(
                resp["error_description"]
                    .as_str()
                    .unwrap()
                    .contains("could not be recorded"),
                "{resp}"
            );
            revoke_failed = Some(n);
            break;
        }
    }
    let revoke_failed = revoke_failed.expect("a revocation fails when the disk is full");

    // The Workload API keeps serving from memory, across SVID and CA rollover
    // (whose persistence fails meanwhile).
    let before = judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    assert_ne!(before.svid, during.svid, "SVIDs still rotate");
    fetch_jwt_claims(&agent.socket()).await.unwrap();

    // Space comes back: everything works again.
    std::fs::remove_file(&filler).unwrap();
    let (status, resp) = exchange(&agent, &task(999)).await;
    assert_eq!(status, 200, "{resp}");
    issued.push(resp["access_token"].as_str().unwrap().to_string());
    let (status, _) = post(&d, "/revoke", &[("task_id", &task(999))]).await;
    assert_eq!(status, 200);
    let report = tessera_agent::audit::verify_file(
        &audit_log,
        Some(&tessera_agent::audit::anchor::default_path(&audit_log)),
    )
    .unwrap();
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
    let hashes = audit_hashes(&audit_log);
    for t in &issued {
        assert!(
            hashes.contains(&tessera_agent::audit::sha256_hex(t.as_bytes())),
            "an issued token has no audit record"
        );
    }

    // A restart keeps the acknowledged revocations and loads the CA state.
    let mut agent = agent;
    agent.stop().await;
    let TestAgent { dir, .. } = agent;
    let mut agent = TestAgent::start_in(dir, &body).await;
    judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    for (t, n) in [(&issued[0], 0), (issued.last().unwrap(), 999)] {
        let (_, json) = post(&d, "/introspect", &[("token", t)]).await;
        assert_eq!(
            json["active"], false,
            "task {n} ended before/after the full disk"
        );
    }
    let (status, _) = exchange(&agent, &task(0)).await;
    assert_eq!(status, 400, "an acknowledged task end survived");
    agent.stop().await;
    eprintln!(
        "disk full (64 KiB tmpfs) in {:?}: {served_while_full} exchanges fit in the last page, \
         then 5/5 refused with temporarily_unavailable; revocation #{revoke_failed} reported \
         not durable; Workload API served and rotated throughout; {} tokens all audited; \
         chain verifies ({} records)",
        started.elapsed(),
        issued.len(),
        report.records
    );
}

/// `n` exchanges at once (separate connections, one task each): the
/// status and body of each, in the order they were answered, with the audit
/// log's token hashes read the moment each answer arrived.
async fn concurrent_exchanges(
    agent: &TestAgent,
    audit_log: &Path,
    n: usize,
    tag: &str,
) -> Vec<(u16, Value, bool)> {
    let subject = agent.jwt_svid(ISSUER).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (dir, subject, log) = (
            agent.dir.path().to_path_buf(),
            subject.clone(),
            audit_log.to_path_buf(),
        );
        let task = format!("{tag}-{i}");
        set.spawn(async move {
            let (status, resp) = post(
                &dir,
                "/token",
                &[
                    ("grant_type", GRANT_TOKEN_EXCHANGE),
                    ("subject_token_type", TOKEN_TYPE_JWT),
                    ("subject_token", &subject),
                    ("resource", MCP),
                    ("scope", "notes:read"),
                    ("task_id", &task),
                ],
            )
            .await;
            let recorded = resp["access_token"].as_str().is_some_and(|t| {
                audit_hashes(&log).contains(&tessera_agent::audit::sha256_hex(t.as_bytes()))
            });
            (status, resp, recorded)
        });
    }
    set.join_all().await
}

/// Checks an access token with jsonwebtoken against the agent's `/jwks`.
async fn judge_token(agent: &TestAgent, token: &str) {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
    let (status, body) = http_unix(
        &agent.dir.path().join("sock/exchange.sock"),
        http::Method::GET,
        "/jwks",
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let jwks: JwkSet = serde_json::from_slice(&body).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = DecodingKey::from_jwk(jwks.find(&kid).expect("key published")).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[MCP]);
    v.set_issuer(&[ISSUER]);
    jsonwebtoken::decode::<Value>(token, &key, &v).expect("jsonwebtoken accepts the token");
}

/// With `exchange.audit_commit_delay` the writer holds batches open for
/// the records of concurrent exchanges; the promise must hold as without
/// it: every token answered has its record in the log already, and when
/// the disk is full every exchange whose batch could not be written is
/// refused, none issued unaudited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_delay_issues_no_token_before_its_record_is_durable() {
    tessera_tests::require_root(
        "a_commit_delay_issues_no_token_before_its_record_is_durable",
        TMPFS,
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = Tmpfs::mount(&data, "64k");
    write_policy(dir.path());
    let body = exchange_body(dir.path(), "audit_commit_delay = \"50ms\"\n");
    let agent = TestAgent::start_in(dir, &body).await;
    let audit_log = data.join("audit.jsonl");

    let mut issued = Vec::new();
    for (status, resp, recorded) in concurrent_exchanges(&agent, &audit_log, 8, "a").await {
        assert_eq!(status, 200, "{resp}");
        assert!(
            recorded,
            "the token's record was in the log before the token came back"
        );
        let token = resp["access_token"].as_str().unwrap().to_string();
        judge_token(&agent, &token).await;
        issued.push(token);
    }

    let filler = fill(&data);
    let mut refused = 0;
    for round in 0..5 {
        for (status, resp, recorded) in
            concurrent_exchanges(&agent, &audit_log, 8, &format!("full{round}")).await
        {
            match status {
                200 => {
                    assert!(
                        recorded,
                        "a token answered while the disk was full has its record"
                    );
                    issued.push(resp["access_token"].as_str().unwrap().to_string());
                }
                503 => {
                    assert_eq!(resp["error"], "temporarily_unavailable", "{resp}");
                    assert!(
                        resp.get("access_token").is_none(),
                        "nothing issued unaudited"
                    );
                    refused += 1;
                }
                other => panic!("unexpected {other}: {resp}"),
            }
        }
    }
    assert!(
        refused > 0,
        "exchanges are refused once the audit log cannot grow"
    );

    std::fs::remove_file(&filler).unwrap();
    for (status, resp, recorded) in concurrent_exchanges(&agent, &audit_log, 8, "b").await {
        assert_eq!(status, 200, "{resp}");
        assert!(recorded);
        issued.push(resp["access_token"].as_str().unwrap().to_string());
    }
    let mut agent = agent;
    agent.stop().await;
    let report = tessera_agent::audit::verify_file(
        &audit_log,
        Some(&tessera_agent::audit::anchor::default_path(&audit_log)),
    )
    .unwrap();
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
    let hashes = audit_hashes(&audit_log);
    assert!(
        issued
            .iter()
            .all(|t| hashes.contains(&tessera_agent::audit::sha256_hex(t.as_bytes()))),
        "every issued token is in the verified log"
    );
    eprintln!(
        "commit delay 50 ms: {} tokens issued, all audited; {refused} refused while the disk was full; chain verifies ({} records)",
        issued.len(),
        report.records
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_data_dir_keeps_serving_and_recovers() {
    tessera_tests::require_root("read_only_data_dir_keeps_serving_and_recovers", TMPFS);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mount = Tmpfs::mount(&data, "64k");
    // No [exchange]: the audit log and revocation file would hold the file
    // system open for writing, and Linux refuses to remount it read-only.
    let body = format!(
        "[svid]\nx509_ttl = \"2s\"\n[authority]\nca_ttl = \"4s\"\n{}",
        TestAgent::entry_for_me("ro", "")
    );
    let agent = TestAgent::start_in(dir, &body).await;
    let state = data.join("authority.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = mount.remount("ro") {
        // EBUSY while a rollover is writing authority.json: try again.
        assert!(Instant::now() < deadline, "remount ro: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = std::fs::read(&state).unwrap();
    let first = judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    // Two CA rollovers' worth of time: each fails to persist (EROFS) and
    // the keys stay in memory.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    assert_ne!(
        first.ca_der, later.ca_der,
        "the CA rolled over while read-only"
    );
    assert_eq!(std::fs::read(&state).unwrap(), before, "nothing written");
    mount.remount("rw").unwrap();
    // The next rollover (every ~2 s) persists again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read(&state).unwrap() == before {
        assert!(
            Instant::now() < deadline,
            "authority.json persisted after rw"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut agent = agent;
    agent.stop().await;
    let TestAgent { dir, .. } = agent;
    let mut agent = TestAgent::start_in(dir, &body).await;
    judge(&fetch_x509(agent.socket().as_path()).await.unwrap());
    let dir_path = agent.dir.path().to_path_buf();
    agent.stop().await;

    // Starting on a read-only data dir is one clear error naming the file.
    mount.remount("ro").unwrap();
    let config = Config::parse(&TestAgent::config_text(&dir_path, &body), "t.toml").unwrap();
    let err = match app::start(config, Arc::new(tessera_agent::clock::SystemClock)).await {
        Ok(_) => panic!("started on a read-only data dir"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("authority.json") && err.contains("Read-only file system"),
        "{err}"
    );
    eprintln!(
        "read-only data dir in {:?}: served and rolled the CA over in memory, persisted after rw; start on ro: {err}",
        started.elapsed()
    );
}
