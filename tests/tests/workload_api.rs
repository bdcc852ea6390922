//! The Workload API over a real Unix socket, judged by the `spiffe` crate's
//! client and validators (not ours).

use std::time::Duration;

use spiffe::{JwtSvid, SpiffeId, TrustDomain};
use tessera_tests::{TestAgent, raw_channel};
use tessera_workload_api as pb;
use tokio_stream::StreamExt;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[tokio::test]
async fn x509_svids_and_bundles_pass_the_spiffe_crate() {
    let body = format!(
        "{}{}",
        TestAgent::entry_for_me("first", "a"),
        TestAgent::entry_for_me("second", "b")
    );
    let mut agent = TestAgent::start(&body).await;
    let client = agent.spiffe_client().await;

    // fetch_x509_svid parses and validates the leaf (spiffe crate's rules).
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/first",
        "first entry is the default"
    );
    assert_eq!(svid.hint(), Some("a"));

    let all = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<_> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"]
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let bundle = bundles.get(&td()).expect("own trust domain bundle");
    assert!(!bundle.authorities().is_empty());

    // The leaf chains to the bundle's CA: check the signature with x509-parser
    // and the CA's public key (independent of our issuing code).
    let leaf_der = svid.leaf().as_ref().to_vec();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let ca_der = bundle.authorities()[0].as_ref().to_vec();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        leaf.validity().not_before.timestamp() < now && now < leaf.validity().not_after.timestamp()
    );
    agent.stop().await;
}

#[tokio::test]
async fn jwt_svids_validate_offline_and_through_the_agent() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("jwt", "")).await;
    let client = agent.spiffe_client().await;
    let jwt = client
        .fetch_jwt_svid(["svc-a", "svc-b"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/jwt");

    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let offline = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["svc-a"]).unwrap();
    assert_eq!(offline.spiffe_id(), jwt.spiffe_id());
    assert!(JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["nobody"]).is_err());

    let validated = client
        .validate_jwt_token("svc-b", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), jwt.spiffe_id());
    let err = client
        .validate_jwt_token("nobody", jwt.token())
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("audience")
            || err.to_string().contains("InvalidArgument"),
        "{err}"
    );

    // A tampered token and garbage are rejected by the agent.
    let mut tampered = jwt.token().to_string();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(client.validate_jwt_token("svc-a", &tampered).await.is_err());
    assert!(
        client
            .validate_jwt_token("svc-a", "not.a.jwt")
            .await
            .is_err()
    );

    // Asking for an ID the caller is not entitled to is refused.
    let other = SpiffeId::new("spiffe://example.org/someone-else").unwrap();
    assert!(
        client
            .fetch_jwt_svid(["svc-a"], Some(&other))
            .await
            .is_err()
    );
    agent.stop().await;
}

async fn raw_client(
    agent: &TestAgent,
) -> pb::client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    pb::client::SpiffeWorkloadApiClient::new(raw_channel(&agent.socket()).await)
}

#[tokio::test]
async fn spec_status_codes() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("codes", "")).await;
    let mut c = raw_client(&agent).await;

    // Missing security header: InvalidArgument, on every RPC.
    let e = c
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c.fetch_x509svid(pb::X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Header with the wrong value.
    let mut req = tonic::Request::new(pb::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "True".parse().unwrap());
    assert_eq!(
        c.fetch_x509_bundles(req).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // Empty mandatory fields.
    let e = c
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(pb::with_security_header(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "not an id".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The WIT-SVID profile: the same header rule; a malformed spiffe_id is
    // InvalidArgument, one the caller has no entry for PermissionDenied
    // (go-spiffe judges what is served, tests/interop/go/wit_test.go).
    let e = c
        .fetch_witsvid(pb::WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .fetch_wit_bundles(pb::WitBundlesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    for (id, code) in [
        ("not an id", tonic::Code::InvalidArgument),
        ("spiffe://example.org/nobody", tonic::Code::PermissionDenied),
    ] {
        let mut stream = c
            .fetch_witsvid(pb::with_security_header(pb::WitsvidRequest {
                spiffe_id: id.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let e = stream.message().await.unwrap_err();
        assert_eq!(e.code(), code, "{id}");
    }

    // Health is served on the same socket without the Workload API header.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(raw_channel(&agent.socket()).await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    agent.stop().await;
}

fn code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn unregistered_caller_gets_permission_denied() {
    // An entry for some other uid only.
    let other = tessera_tests::my_uid() + 4242;
    let body = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/x\"\nselectors = [\"unix:uid:{other}\"]\n"
    );
    let mut agent = TestAgent::start(&body).await;
    let mut c = raw_client(&agent).await;
    assert_eq!(
        code(
            c.fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.fetch_x509_bundles(pb::with_security_header(pb::X509BundlesRequest {}))
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.fetch_jwt_bundles(pb::with_security_header(pb::JwtBundlesRequest {}))
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new()
            }))
            .await
        ),
        tonic::Code::PermissionDenied
    );
    // The spiffe crate's client surfaces it as an error too.
    assert!(agent.spiffe_client().await.fetch_x509_svid().await.is_err());
    agent.stop().await;
}

#[tokio::test]
async fn entry_removal_ends_streams_with_permission_denied_and_changes_push() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("before", "")).await;
    let mut c = raw_client(&agent).await;
    let mut x509 = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bundles = c
        .fetch_jwt_bundles(pb::with_security_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = x509.next().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/before");
    assert!(
        bundles
            .next()
            .await
            .unwrap()
            .unwrap()
            .bundles
            .contains_key("spiffe://example.org")
    );

    // A changed entry pushes a full new response at once.
    let text = TestAgent::config_text(agent.dir.path(), &TestAgent::entry_for_me("after", ""));
    let config = tessera_agent::config::Config::parse(&text, "t").unwrap();
    agent.running().set_entries(config.entries);
    let second = tokio::time::timeout(Duration::from_secs(5), x509.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.svids.len(), 1);
    assert_eq!(second.svids[0].spiffe_id, "spiffe://example.org/after");

    // Removing every entry ends the streams with PermissionDenied, never OK.
    agent.running().set_entries(Default::default());
    let end = tokio::time::timeout(Duration::from_secs(5), x509.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);
    let end = tokio::time::timeout(Duration::from_secs(5), bundles.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);
    agent.stop().await;
}

#[tokio::test]
async fn rotation_reaches_an_x509_source() {
    let body = format!(
        "[svid]\nx509_ttl = \"4s\"\n{}",
        TestAgent::entry_for_me("rotating", "")
    );
    let mut agent = TestAgent::start(&body).await;
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    let mut updates = source.updated();
    let serial = |s: &spiffe::X509Svid| {
        let (_, c) = x509_parser::parse_x509_certificate(s.leaf().as_ref()).unwrap();
        c.raw_serial().to_vec()
    };
    let first_serial = serial(&first);
    let rotated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            updates.changed().await.unwrap();
            let now = source.svid().unwrap();
            if serial(&now) != first_serial {
                return now;
            }
        }
    })
    .await
    .expect("a rotated SVID within 10 s (TTL 4 s, renewal at ~2 s)");
    assert_eq!(rotated.spiffe_id(), first.spiffe_id());
    source.shutdown().await;
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable_and_removes_the_socket() {
    let mut agent = TestAgent::start(&TestAgent::entry_for_me("bye", "")).await;
    let mut c = raw_client(&agent).await;
    let mut x509 = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    x509.next().await.unwrap().unwrap();
    let socket = agent.socket();
    let running = agent.agent.take().unwrap();
    let stopping = tokio::spawn(running.stop());
    let end = tokio::time::timeout(Duration::from_secs(5), x509.next())
        .await
        .expect("stream ends promptly");
    match end {
        Some(Err(s)) => assert_eq!(s.code(), tonic::Code::Unavailable),
        Some(Ok(_)) => panic!("unexpected message after shutdown"),
        None => panic!("stream ended with OK; it must end with an error status"),
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn stale_socket_is_replaced_and_a_live_agent_blocks_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock/agent.sock");
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A stale socket: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let text = TestAgent::config_text(dir.path(), &TestAgent::entry_for_me("x", ""));
    let clock = std::sync::Arc::new(tessera_agent::clock::SystemClock);
    let first = tessera_agent::app::start(
        tessera_agent::config::Config::parse(&text, "t").unwrap(),
        clock.clone(),
    )
    .await
    .expect("stale socket replaced");
    let second = tessera_agent::app::start(
        tessera_agent::config::Config::parse(&text, "t").unwrap(),
        clock.clone(),
    )
    .await;
    let err = second.err().expect("second agent must refuse").to_string();
    assert!(err.contains("already serving"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o777
    );
    first.stop().await.unwrap();
    // A regular file at the socket path is never deleted.
    std::fs::write(&sock, b"precious").unwrap();
    let third = tessera_agent::app::start(
        tessera_agent::config::Config::parse(&text, "t").unwrap(),
        clock,
    )
    .await;
    assert!(third.err().unwrap().to_string().contains("not a socket"));
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}
