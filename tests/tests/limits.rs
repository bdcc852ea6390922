//! Abuse from one caller stays that caller's problem: connection caps,
//! oversized requests, slow clients. Judged with the `spiffe` crate's client.

use std::time::Duration;

use tessera_tests::{TestAgent, raw_channel};
use tessera_workload_api as pb;

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_slots_come_back() {
    let mut agent = TestAgent::start(&format!(
        // One process holds all three: its share is the whole cap here (the
        // per-caller shares have a test of their own below).
        "{}[limits]\nmax_connections = 3\nmax_connections_per_uid = 3\nmax_connections_per_process = 3\n",
        TestAgent::entry_for_me("capped", "default")
    ))
    .await;
    // Three idle connections fill the cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::UnixStream::connect(agent.socket())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        agent.spiffe_client().await.fetch_x509_svid().await
    })
    .await
    .expect("a refused connection fails fast");
    assert!(refused.is_err(), "the fourth connection was served");

    // Closing one frees its slot for an honest client.
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let svid = agent.spiffe_client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/capped");
    drop(held);
    agent.stop().await;
}

#[tokio::test]
async fn oversized_grpc_requests_are_refused_from_the_length_prefix() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("big", "default")).await;
    let channel = raw_channel(&agent.socket()).await;
    let mut client = pb::client::SpiffeWorkloadApiClient::new(channel);
    let status = client
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["a".repeat(200 * 1024)],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    // The same connection and the agent keep serving normal requests.
    let ok = client
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(ok.get_ref().svids.len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn slow_http_clients_are_cut_off_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut agent = TestAgent::start(&format!(
        "{}[exchange]\n[limits]\nhttp_header_timeout = \"500ms\"\nhttp_request_timeout = \"1s\"\n",
        TestAgent::entry_for_me("slow", "default")
    ))
    .await;
    let xsock = agent.dir.path().join("sock/exchange.sock");

    // Headers that never finish: the connection is closed.
    let mut slow_head = tokio::net::UnixStream::connect(&xsock).await.unwrap();
    slow_head
        .write_all(b"POST /introspect HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // A body that never arrives: 408.
    let mut slow_body = tokio::net::UnixStream::connect(&xsock).await.unwrap();
    slow_body
        .write_all(b"POST /introspect HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=")
        .await
        .unwrap();

    // Meanwhile an honest request is answered at once.
    let (status, _) =
        tessera_agent::cli::client::http_unix(&xsock, http::Method::GET, "/jwks", None)
            .await
            .unwrap();
    assert_eq!(status, 200);

    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), slow_head.read_to_end(&mut buf))
        .await
        .expect("the slow-header connection is closed by the agent")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");

    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow_body.read_to_end(&mut buf))
        .await
        .expect("the slow-body request is answered")
        .ok();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    agent.stop().await;
}

/// One unprivileged user floods the Workload API socket with idle
/// connections from several processes. It gets its share of the cap and no
/// more: an honest workload of another user still connects and is served.
/// Before per-caller shares the flood took every slot and the honest
/// workload was refused.
#[tokio::test]
async fn a_flooding_user_gets_its_share_and_others_are_still_served() {
    tessera_tests::require_root(
        "a_flooding_user_gets_its_share_and_others_are_still_served",
        "the flood runs as another user",
    );
    // 8 slots: 6 for one uid, 2 for one process (the derived shares).
    let mut agent = TestAgent::start(&format!(
        "{}[limits]\nmax_connections = 8\n",
        TestAgent::entry_for_me("honest", "default")
    ))
    .await;
    // The flood's user must reach the socket.
    use std::os::unix::fs::PermissionsExt as _;
    for dir in [
        agent.dir.path().to_path_buf(),
        agent.dir.path().join("sock"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    const FLOOD: &str = r#"
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", flush=True)
time.sleep(30)
"#;
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let mut child = tessera_tests::python_as_nobody(FLOOD)
            .arg(agent.socket())
            .arg("5")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv and /usr/bin/python3 are required");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "holding");
        flooders.push(child);
    }
    // 20 connections tried: 2 per process and 6 for the uid are held, the
    // other 14 refused as the agent accepts them.
    let refused = |a: &TestAgent| {
        a.running()
            .callers
            .metrics
            .connections_refused
            .get_or_create(&tessera_agent::metrics::MethodLabels {
                method: "workload_api",
            })
            .get()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while refused(&agent) < 14 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused only {}",
            refused(&agent)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused(&agent), 14, "the flood holds exactly its share");
    let svid = tokio::time::timeout(Duration::from_secs(5), async {
        agent.spiffe_client().await.fetch_x509_svid().await
    })
    .await
    .expect("the honest workload is answered")
    .expect("and gets its SVID while the flood holds its share");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/honest");
    for mut f in flooders {
        let _ = f.kill();
        let _ = f.wait();
    }
    agent.stop().await;
}

/// A connection that does nothing is closed after `limits.idle_timeout`, on
/// both sockets: a raw connection that only sends the HTTP/2 preface, and an
/// HTTP/1.1 keep-alive connection after its one request. A connection whose
/// watch stream is open stays, however quiet, and the client's channel
/// keeps working after its idle connection was closed. Before, idle
/// connections were held until the caller closed them.
#[tokio::test]
async fn idle_connections_are_closed_and_open_streams_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[limits]\nidle_timeout = \"1s\"\n[exchange]\nsocket_path = \"{}/sock/exchange.sock\"\n",
        TestAgent::entry_for_me("idle", "default"),
        dir.path().display()
    );
    let mut agent = TestAgent::start_in(dir, &body).await;
    let exchange = agent.dir.path().join("sock/exchange.sock");

    // A watch stream that stays open (and quiet) longer than the timeout,
    // and a client that makes one call and then waits.
    let watcher = agent.spiffe_client().await;
    let mut watch = watcher.stream_x509_contexts().await.unwrap();
    use tokio_stream::StreamExt;
    watch.next().await.expect("first update").unwrap();
    let unary = agent.spiffe_client().await;
    unary.fetch_x509_svid().await.unwrap();

    let started = tokio::time::Instant::now();
    let mut preface_only = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut keep_alive = tokio::net::UnixStream::connect(&exchange).await.unwrap();
    keep_alive
        .write_all(b"GET /jwks HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    keep_alive.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    for (name, conn) in [
        ("Workload API, preface only", &mut preface_only),
        ("exchange, keep-alive after a request", &mut keep_alive),
    ] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{name}: still open after 5 s"))
            .unwrap();
    }
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed before the idle timeout ({closed_after:?})"
    );

    // The quiet stream is still open: nothing ended it, and after another
    // timeout it still delivers (a rotation is not due, so nothing arrives).
    let next = tokio::time::timeout(Duration::from_millis(1500), watch.next()).await;
    assert!(next.is_err(), "the watch stream ended: {next:?}");
    // The client whose connection was closed while idle reconnects on its
    // next call.
    let svid = unary.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/idle");
    agent.stop().await;
}
