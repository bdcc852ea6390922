//! Load and abuse against the real `tessera` binary, with the agent's memory
//! read from `/proc/<pid>/status` of the child process (so the test's own
//! allocations are not counted): 10,000 idle connections held while an honest
//! client is served, and a client that opens streams and never reads them
//! across several SVID rotations. Results are printed as one line each for
//! RELIABILITY.md; only behaviour and generous memory bounds are asserted,
//! never wall-clock times.

// These tests drive agent processes and wait on real time, which the
// agent's own rule (injected clock, paused tokio time) does not govern.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tessera_workload_api as pb;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const SPIFFE_ID: &str = "spiffe://example.org/load";
const MIB: u64 = 1024 * 1024;

/// Both tests measure a child's memory and load a 2-core CI machine; running
/// them one at a time keeps each measurement about one scenario.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// `tessera run` with one entry for this uid plus `extra` config. Its
    /// stdout and stderr go to a file: a pipe nobody reads could fill up and
    /// stall the agent mid-measurement.
    fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\nsocket_path = \"{d}/sock/agent.sock\"\ndata_dir = \"{d}/data\"\n\
                 [[entries]]\nspiffe_id = \"{SPIFFE_ID}\"\nselectors = [\"unix:uid:{uid}\"]\n{extra}",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "agent did not create its socket; log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sock/agent.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the agent's log, for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `VmRSS` and `VmHWM` of the agent, in bytes. Panics if the agent is
    /// gone: a crash under load is exactly what these tests look for.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("agent is gone ({e}); log:\n{}", self.log()));
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing in /proc/<pid>/status"));
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("unparsable {line:?}"));
            kib * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn rss(&self) -> u64 {
        self.memory().0
    }

    /// Open sockets of the agent: each accepted connection is one (its
    /// pidfd, also held per connection, is not counted).
    fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap_or_else(|e| panic!("agent is gone ({e}); log:\n{}", self.log()))
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// An X.509-SVID through the spiffe crate's client on a new connection,
    /// within 10 s: a hung agent fails the test instead of stalling it.
    async fn honest_fetch(&self, when: &str) -> spiffe::X509Svid {
        let fetch = async {
            spiffe::WorkloadApiClient::connect_to(self.endpoint())
                .await?
                .fetch_x509_svid()
                .await
        };
        let svid = tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .unwrap_or_else(|_| panic!("no SVID within 10 s {when}; log:\n{}", self.log()))
            .unwrap_or_else(|e| panic!("no SVID {when}: {e}; log:\n{}", self.log()));
        assert_eq!(svid.spiffe_id().to_string(), SPIFFE_ID);
        svid
    }

    /// SIGTERM, and the agent must exit cleanly: no crash after the load.
    fn terminate(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "agent exited with {status}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    /// A failed assertion must not leave an agent running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Samples `f` every 200 ms until two samples in a row are within 1 % of
/// each other (or 10 s pass), and returns the last sample.
async fn settled(mut f: impl FnMut() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = f();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = f();
        if now.abs_diff(last) * 100 <= last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Raises RLIMIT_NOFILE to `needed` if it is lower: to the hard limit, or
/// past it where the process may (root, CAP_SYS_RESOURCE). The agent inherits
/// the limit. Returns the soft limit reached.
fn raise_nofile_limit(needed: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|soft| soft < needed) {
        let raised = limit.maximum.map(|hard| hard.max(needed));
        let wanted = Rlimit {
            current: raised,
            maximum: raised,
        };
        if setrlimit(Resource::Nofile, wanted).is_err() {
            // Not privileged: the hard limit is as far as we can go.
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: limit.maximum,
                    maximum: limit.maximum,
                },
            )
            .unwrap();
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `fut`, or a loud failure after 10 s: a hung agent must fail the test, not
/// stall it.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
}

/// Connects, retrying while the listen backlog is full: a non-blocking
/// connect to a Unix socket fails with EAGAIN then instead of waiting.
async fn connect_retrying(socket: &Path, deadline: Instant) -> tokio::net::UnixStream {
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }
}

/// The HTTP/2 client connection preface: the magic string and an empty
/// SETTINGS frame. After it the agent holds a full HTTP/2 server connection
/// for the socket, not just an accepted descriptor.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_keep_memory_bounded_and_honest_clients_served() {
    const WANTED: usize = 10_000;
    let _serial = SERIAL.lock().await;
    // The agent holds two descriptors per connection (the socket and the
    // peer's pidfd); this process one.
    let soft = raise_nofile_limit(2 * WANTED as u64 + 200);
    // A hard limit of 20,000 (common in containers without CAP_SYS_RESOURCE)
    // leaves room for 9,900: run as many as fit, say so loudly, and fail
    // only when far fewer fit.
    let connections = WANTED.min((soft.saturating_sub(200) / 2) as usize);
    if connections < WANTED {
        eprintln!(
            "NOTE: RLIMIT_NOFILE is {soft}, so this run holds {connections} connections, not {WANTED} \
             (the agent needs two descriptors per connection; raise the hard limit to 20,200+ for the full count)"
        );
    }
    assert!(
        connections >= 9_000,
        "RLIMIT_NOFILE is {soft}: room for only {connections} connections. Raise the hard limit \
         (e.g. `ulimit -Hn 32768` as root, `LimitNOFILE=` for a service, \
         `--ulimit nofile=32768:32768` for docker) and rerun."
    );
    // Default [limits]: max_connections = 16384, lowered by the agent to
    // what its descriptors hold (above the count here), so all are
    // accepted. One process opens them all, so its per-caller share is
    // raised to the whole cap (shares have their own test in tests/limits.rs).
    let daemon = Daemon::start(
        "[limits]\nmax_connections_per_uid = 16384\nmax_connections_per_process = 16384\n",
    );
    let socket = daemon.socket();

    daemon.honest_fetch("at start").await;
    // Settled, so the honest client's connection is closed on both sides.
    let baseline_sockets = settled(|| daemon.open_sockets() as u64).await as usize;
    let baseline = settled(|| daemon.rss()).await;

    use tokio::io::AsyncWriteExt;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut s = connect_retrying(&socket, deadline).await;
        s.write_all(H2_PREFACE).await.unwrap();
        held.push(s);
    }
    let connect_time = started.elapsed();
    // Accepted = the agent holds a socket for each (connections beyond the
    // cap would be closed at accept and never show up here).
    while daemon.open_sockets() < baseline_sockets + connections {
        assert!(
            Instant::now() < deadline,
            "the agent accepted only {} of {connections} connections; log:\n{}",
            daemon.open_sockets() - baseline_sockets,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accept_time = started.elapsed();
    let loaded = settled(|| daemon.rss()).await;

    // An honest client while the 10,000 are held: a new connection, a
    // handshake, attestation and an SVID, judged by the spiffe crate.
    let started = Instant::now();
    daemon
        .honest_fetch("while 10,000 connections are held")
        .await;
    let honest_latency = started.elapsed();
    let (_, peak) = daemon.memory();
    // Every held connection is still open: none was dropped to make room.
    assert!(
        daemon.open_sockets() >= baseline_sockets + connections,
        "the agent dropped held connections"
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.open_sockets() > baseline_sockets + 10 {
        assert!(
            Instant::now() < deadline,
            "the agent still holds {} sockets after the clients closed",
            daemon.open_sockets()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = settled(|| daemon.rss()).await;
    daemon.honest_fetch("after the connections closed").await;
    let log = std::fs::read_to_string(daemon.dir.path().join("agent.log")).unwrap();
    assert!(
        !log.contains("accept failed"),
        "the agent ran out of descriptors or failed accepts; log:\n{}",
        daemon.log()
    );

    let per_conn_kib = (loaded.saturating_sub(baseline)) as f64 / 1024.0 / connections as f64;
    println!(
        "{connections} idle h2 connections: agent RSS baseline {:.1} MiB, with {connections} held {:.1} MiB \
         ({per_conn_kib:.1} KiB/connection, peak {:.1} MiB), after close {:.1} MiB; \
         connect {:.2} s, all accepted {:.2} s, honest connect+fetch {:.1} ms",
        mib(baseline),
        mib(loaded),
        mib(peak),
        mib(after),
        connect_time.as_secs_f64(),
        accept_time.as_secs_f64(),
        honest_latency.as_secs_f64() * 1000.0,
    );
    // Generous: about 50 KiB per connection. A per-connection buffer of the
    // size of a stream window (64 KiB+) or a leaked task per connection
    // would go over.
    assert!(
        loaded < 512 * MIB,
        "agent RSS {:.1} MiB with {connections} idle connections",
        mib(loaded)
    );
    daemon.terminate();
}

/// A raw tonic client whose HTTP/2 windows are the protocol's initial 65,535
/// bytes: a client that never reads gives the agent no more room than that.
async fn never_reading_channel(socket: &Path) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535);
    tessera_agent::cli::client::channel(socket, endpoint)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_streams_costs_bounded_memory() {
    use prost::Message;
    // 1,000 streams per connection stays under the agent's 1,024; two
    // connections make 2,000 unread streams. The request rate is raised to
    // 2,000/s so opening them (this test process is one caller) is not
    // throttled.
    const CONNECTIONS: usize = 2;
    const STREAMS_PER_CONNECTION: usize = 1000;
    const STREAMS: usize = CONNECTIONS * STREAMS_PER_CONNECTION;
    // By the third rotation every unread stream's buffers are full (2-slot
    // channel, one message waiting to enter it, one in HTTP/2); rotations
    // after that must not cost more memory.
    const FILLED: usize = 3;
    const ROTATIONS: usize = 8;
    let _serial = SERIAL.lock().await;
    // Renewal is at 40-60 % of the lifetime: with 2 s (the minimum), a new
    // SVID every 0.8-1.2 s, pushed to every open stream of the identity.
    let daemon = Daemon::start("[svid]\nx509_ttl = \"2s\"\n[limits]\nrequests_per_second = 2000\n");

    daemon.honest_fetch("at start").await;
    // The size of one stream message (SVID, key and bundle), for the
    // "what if every update were queued" comparison.
    let message_bytes = {
        let mut raw =
            pb::client::SpiffeWorkloadApiClient::new(never_reading_channel(&daemon.socket()).await);
        let mut s = within(
            "first FetchX509SVID stream",
            raw.fetch_x509svid(pb::with_security_header(pb::X509svidRequest {})),
        )
        .await
        .unwrap()
        .into_inner();
        within("first stream message", s.message())
            .await
            .unwrap()
            .unwrap()
            .encoded_len()
    };
    let baseline = settled(|| daemon.rss()).await;
    let baseline_sockets = settled(|| daemon.open_sockets() as u64).await as usize;

    // The bad client: opens the streams, gets their response headers, and
    // never polls a message body, so its flow-control windows are never
    // released and everything the agent pushes has to wait on the agent's
    // side. The clients are kept too, so their connections stay up.
    let mut bad_clients = Vec::new();
    let mut unread = Vec::with_capacity(STREAMS);
    for _ in 0..CONNECTIONS {
        let mut bad =
            pb::client::SpiffeWorkloadApiClient::new(never_reading_channel(&daemon.socket()).await);
        for _ in 0..STREAMS_PER_CONNECTION {
            let response = within(
                "opening an unread stream",
                bad.fetch_x509svid(pb::with_security_header(pb::X509svidRequest {})),
            )
            .await
            .expect("the agent opens every stream");
            unread.push(response.into_inner());
        }
        bad_clients.push(bad);
    }
    let opened = settled(|| daemon.rss()).await;

    // The honest client watches its own stream through the rotations, all of
    // which are also pushed at the unread streams. RSS is sampled at each.
    let started = Instant::now();
    let honest = within(
        "honest connect",
        spiffe::WorkloadApiClient::connect_to(daemon.endpoint()),
    )
    .await
    .unwrap();
    let mut stream = within("honest stream", honest.stream_x509_svids())
        .await
        .unwrap();
    let mut serials: Vec<String> = Vec::new();
    let mut rss_at: Vec<u64> = Vec::new();
    let mut last_leaf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(25);
    while serials.len() < ROTATIONS + 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        let svid = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the honest client saw {} rotations in 25 s, expected {ROTATIONS}; log:\n{}",
                    serials.len().saturating_sub(1),
                    daemon.log()
                )
            })
            .expect("the stream stays open")
            .expect("every update is a valid X.509-SVID");
        assert_eq!(svid.spiffe_id().to_string(), SPIFFE_ID);
        let leaf = svid.leaf().as_ref().to_vec();
        if leaf == last_leaf {
            continue;
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let serial = cert.raw_serial_as_string();
        assert!(
            !serials.contains(&serial),
            "a rotation gives a new serial: {serial} again"
        );
        serials.push(serial);
        last_leaf = leaf;
        rss_at.push(daemon.rss());
    }
    let rotation_time = started.elapsed();
    let (rotated, peak) = daemon.memory();

    // Only now does the bad client go away; the agent must notice, free the
    // streams and still serve.
    drop(unread);
    drop(bad_clients);
    // Its two connections close on the agent's side (the honest client's
    // stream keeps one more open).
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.open_sockets() > baseline_sockets + 1 {
        assert!(
            Instant::now() < deadline,
            "the agent still holds the bad client's connections; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = settled(|| daemon.rss()).await;
    daemon
        .honest_fetch("after the unread streams were dropped")
        .await;

    let per_stream_kib = (opened.saturating_sub(baseline)) as f64 / 1024.0 / STREAMS as f64;
    let filled = rss_at[FILLED];
    let growth = rotated.saturating_sub(filled);
    // What rotations FILLED+1..=ROTATIONS would add if the agent queued every
    // update for every unread stream.
    let queued = ((ROTATIONS - FILLED) * STREAMS * message_bytes) as u64;
    let steps: Vec<String> = rss_at.iter().map(|b| format!("{:.1}", mib(*b))).collect();
    println!(
        "{STREAMS} unread FetchX509SVID streams on {CONNECTIONS} connections, {ROTATIONS} rotations \
         in {:.1} s (x509_ttl 2s, {message_bytes}-byte messages): agent RSS baseline {:.1} MiB, \
         streams open {:.1} MiB ({per_stream_kib:.1} KiB/stream), at each rotation [{}] MiB, \
         rotations {}..{ROTATIONS} added {:.1} MiB (queueing every update would add {:.1} MiB), \
         peak {:.1} MiB, after the client left {:.1} MiB",
        rotation_time.as_secs_f64(),
        mib(baseline),
        mib(opened),
        steps.join(", "),
        FILLED + 1,
        mib(growth),
        mib(queued),
        mib(peak),
        mib(after),
    );
    assert!(
        rotated < 256 * MIB,
        "agent RSS {:.1} MiB with {STREAMS} unread streams",
        mib(rotated)
    );
    // About 4 KiB per idle stream (h2's and hyper's state, our stream future,
    // what a stream holds). A task or an encode buffer per stream, or a big
    // future inlined into the stream body, each put it well past 8 KiB before.
    assert!(
        per_stream_kib < 8.0,
        "{per_stream_kib:.1} KiB of agent RSS per idle stream"
    );
    // Once the per-stream buffers are full, more rotations replace what is
    // pending instead of adding to it.
    assert!(
        growth < queued / 2,
        "agent RSS grew {:.1} MiB over rotations {}..{ROTATIONS} with unread streams \
         (queueing every update would be {:.1} MiB)",
        mib(growth),
        FILLED + 1,
        mib(queued)
    );
    daemon.terminate();
}

/// Holds a user's flood: each process connects to both sockets in turn
/// (the Workload API ones send the HTTP/2 preface), then reports how many of
/// its connections the agent kept open, and again whenever asked on stdin.
const FLOOD: &str = r#"
import json, socket, sys
api, exchange, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = {"api": [], "exchange": []}
for i in range(n):
    which, path = ("api", api) if i % 2 == 0 else ("exchange", exchange)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if which == "api":
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    held[which].append(s)
def still_open(s):
    try:
        while True:
            data = s.recv(4096, socket.MSG_DONTWAIT)
            if not data:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
for line in sys.stdin:
    print(json.dumps({k: sum(map(still_open, v)) for k, v in held.items()}), flush=True)
"#;

/// Latencies of `n` honest calls, each on a new connection: (p50, p99) in ms.
async fn honest_latencies(
    n: usize,
    mut call: impl AsyncFnMut() -> anyhow::Result<()>,
) -> (f64, f64) {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        within("an honest call", call()).await.expect("honest call");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (ms[n / 2], ms[n * 99 / 100])
}

/// One unprivileged user (uid 65534, an identity of its own) opens 10,000
/// connections from 8 processes, half to each socket, and holds them. It
/// keeps at most its per-user share of each socket's cap; an honest root
/// workload meanwhile connects and is served on both sockets, and after
/// `limits.idle_timeout` the agent has closed every connection the flood
/// held and given its descriptors back. Figures go to RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_flooding_both_sockets_keeps_its_share_and_others_are_served() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "a_user_flooding_both_sockets_keeps_its_share_and_others_are_served NEEDS ROOT \
         (the flood runs as another user); run the tests as root, as CI does"
    );
    const PROCESSES: usize = 8;
    const PER_PROCESS: usize = 1_250;
    let _serial = SERIAL.lock().await;
    let soft = raise_nofile_limit(20_200);
    let policies = tempfile::tempdir().unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    std::fs::write(
        policies.path().join("honest.cedar"),
        format!(
            "permit(principal, action == Tessera::Action::\"read\", resource == Tessera::Audience::\"api\")\n\
             when {{ principal.selectors.contains(\"unix:uid:{uid}\") }};\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/flooder\"\nselectors = [\"unix:uid:65534\"]\n\
         [limits]\nidle_timeout = \"8s\"\n[exchange]\npolicy_dir = \"{}\"\n",
        policies.path().display()
    ));
    use std::os::unix::fs::PermissionsExt;
    for dir in [
        daemon.dir.path().to_path_buf(),
        daemon.dir.path().join("sock"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (api, exchange) = (
        daemon.socket(),
        daemon.dir.path().join("sock/exchange.sock"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange.exists() {
        assert!(
            Instant::now() < deadline,
            "no exchange socket; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the agent derives from RLIMIT_NOFILE (app::connection_caps): two
    // descriptors per connection, 128 kept free, two sockets; a user gets
    // three quarters of a socket's cap.
    let per_socket = ((soft - 128) / 4).min(16_384) as usize;
    let user_share = per_socket * 3 / 4;

    let issuer_svid = tessera_agent::cli::client::connect(&api)
        .await
        .unwrap()
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["spiffe://example.org/tessera".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let measure = async || {
        let api_ms = honest_latencies(200, async || {
            tessera_agent::cli::client::connect(&api)
                .await?
                .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                    audience: vec!["db".into()],
                    spiffe_id: String::new(),
                }))
                .await?;
            Ok(())
        })
        .await;
        let mut n = 0;
        let exchange_ms = honest_latencies(200, async || {
            n += 1;
            let task = format!("t-{n}");
            let form = tessera_agent::cli::client::form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", &issuer_svid),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", "api"),
                ("scope", "read"),
                ("task_id", &task),
            ]);
            let (status, body) = tessera_agent::cli::client::http_unix(
                &exchange,
                http::Method::POST,
                "/token",
                Some(form),
            )
            .await?;
            anyhow::ensure!(
                status == 200,
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
            Ok(())
        })
        .await;
        (api_ms, exchange_ms)
    };
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .unwrap()
            .count()
    };
    let (quiet_api, quiet_exchange) = measure().await;
    let quiet_fds = settled(|| descriptors() as u64).await;

    let mut flooders: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-c",
                    FLOOD,
                ])
                .arg(&api)
                .arg(&exchange)
                .arg(PER_PROCESS.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("setpriv and /usr/bin/python3 are required")
        })
        .collect();
    // Asks every flooder how many connections the agent still holds.
    let mut outputs: Vec<_> = flooders
        .iter_mut()
        .map(|c| std::io::BufReader::new(c.stdout.take().unwrap()))
        .collect();
    let mut held = |flooders: &mut Vec<Child>| -> (u64, u64) {
        use std::io::{BufRead, Write};
        let mut total = (0, 0);
        for (child, out) in flooders.iter_mut().zip(outputs.iter_mut()) {
            writeln!(child.stdin.as_mut().unwrap()).unwrap();
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("flooder said {line:?}"));
            total.0 += v["api"].as_u64().unwrap();
            total.1 += v["exchange"].as_u64().unwrap();
        }
        total
    };
    // Let the agent accept (and refuse) them all. It drains the backlog at
    // its own pace, which on a loaded machine outlasts any fixed sleep (two
    // seconds once saw all 10,000 still queued), so ask again until the flood
    // is within its share; an agent that keeps more fails at the deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (held_api, held_exchange) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = tokio::task::block_in_place(|| held(&mut flooders));
        let within = now.0 as usize <= user_share && now.1 as usize <= user_share;
        if within || Instant::now() >= deadline {
            break now;
        }
    };
    let flood_fds = descriptors();
    let (flood_api, flood_exchange) = measure().await;
    assert!(
        held_api as usize <= user_share && held_exchange as usize <= user_share,
        "the flood holds {held_api} + {held_exchange}, over its share of {user_share} per socket"
    );

    // Nothing on those connections: the idle timeout closes them all.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (idle_api, idle_exchange) = tokio::task::block_in_place(|| held(&mut flooders));
    let idle_fds = settled(|| descriptors() as u64).await;
    assert_eq!(
        (idle_api, idle_exchange),
        (0, 0),
        "idle connections still held"
    );
    for mut c in flooders {
        drop(c.stdin.take());
        let _ = c.kill();
        let _ = c.wait();
    }
    println!(
        "flood of {} connections by uid 65534 from {PROCESSES} processes (RLIMIT_NOFILE {soft}; cap {per_socket} \
         per socket, user share {user_share}): held {held_api} on the Workload API socket and {held_exchange} on \
         the exchange socket; agent descriptors {quiet_fds} quiet, {flood_fds} flooded, {idle_fds} after the 8 s \
         idle timeout closed them all. Honest root workload, new connection per call, p50/p99 ms: FetchJWTSVID \
         {:.2}/{:.2} quiet, {:.2}/{:.2} flooded; exchange {:.2}/{:.2} quiet, {:.2}/{:.2} flooded",
        PROCESSES * PER_PROCESS,
        quiet_api.0,
        quiet_api.1,
        flood_api.0,
        flood_api.1,
        quiet_exchange.0,
        quiet_exchange.1,
        flood_exchange.0,
        flood_exchange.1,
    );
    daemon.terminate();
}
