//! The `grants` scenario: token requests per second and latency for each
//! grant the token endpoint takes, on the node's exchange socket and over
//! the HTTPS face, against one agent in one run:
//!
//! | grant | request |
//! |---|---|
//! | `rfc8693` | token exchange, the JWT-SVID as `subject_token` |
//! | `client-credentials` | `client_credentials` with the JWT-SVID as `client_assertion` (RFC 7523 §2.2, what the MCP SDKs' M2M providers send) |
//! | `jwt-bearer` | the RFC 7523 `jwt-bearer` grant, the JWT-SVID as `assertion` (MCP SEP-1933) |
//!
//! No task is named (each token is its own task). On the socket the caller
//! is attested and one JWT-SVID serves every request, as a local client
//! reuses its cached SVID. Over HTTPS the JWT-SVID is the only credential
//! and is accepted once, so every request carries a new one: they are
//! fetched from the Workload API before the timed loop (their cost is the
//! `jwt-fetch` scenario's), and a row ends early if they run out. Each
//! client holds one keep-alive connection (TLS set up before timing).

use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::{CertificateDer, ServerName};

use super::*;
use crate::exchange::request::{
    CLIENT_ASSERTION_JWT_BEARER, GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
};

const PRINCIPAL: &str = "spiffe://example.org/bench/grants";
/// The resource server tokens are for (RFC 8707 `resource`).
const RESOURCE: &str = "https://bench.example/api";
const GRANTS: &[&str] = &["rfc8693", "client-credentials", "jwt-bearer"];
/// JWT-SVIDs fetched per HTTPS row and second of `--duration` (a row that
/// uses them up ends early; its ops/s stays a rate).
const ASSERTIONS_PER_SECOND: f64 = 2500.0;

/// The form of one token request for `grant`, carrying `svid`.
fn token_form(grant: &str, svid: &str) -> String {
    let common = [("scope", "bench:read")];
    let pairs: Vec<(&str, &str)> = match grant {
        "rfc8693" => vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", svid),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("resource", RESOURCE),
        ],
        "client-credentials" => vec![
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_assertion_type", CLIENT_ASSERTION_JWT_BEARER),
            ("client_assertion", svid),
            ("resource", RESOURCE),
        ],
        _ => vec![
            ("grant_type", GRANT_JWT_BEARER),
            ("assertion", svid),
            ("resource", RESOURCE),
        ],
    };
    client::form(&[pairs.as_slice(), &common].concat())
}

async fn https_conn(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    http1(stream).await
}

/// `n` JWT-SVIDs for `audience`, each a new one, over a few connections.
async fn fetch_svids(socket: &Path, audience: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let lanes = 4;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let count = n / lanes + usize::from(lane < n % lanes);
        let (socket, audience) = (socket.to_path_buf(), audience.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = client::connect(&socket).await?;
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(jwt_svid(&mut c, &audience).await?);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

pub(super) async fn grants(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    if p.socket.is_some() {
        eprintln!(
            "grants: skipped with --socket (needs an agent with its HTTPS face and bench policies)"
        );
        return Ok(vec![]);
    }
    let dir = tempfile::tempdir()?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir)?;
    // Over TCP nothing is attested: the policy names the principal, and
    // tokens without a client certificate are bearer tokens.
    std::fs::write(
        policy_dir.join("bench.cedar"),
        format!(
            "@id(\"bench-grants\")\n@bearer\n@max_ttl(\"5m\")\npermit(principal == Tessera::Workload::\"{PRINCIPAL}\", action == Tessera::Action::\"bench:read\", resource == Tessera::Audience::\"{RESOURCE}\");\n"
        ),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let issuer = format!("https://localhost:{port}");
    let xsock = dir.path().join("exchange.sock");
    let extra = format!(
        "[exchange]\nsocket_path = \"{}\"\npolicy_dir = \"{}\"\n[https]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"{issuer}\"\n",
        xsock.display(),
        policy_dir.display()
    );
    let agent = BenchAgent::start_in(dir, &entry_for_me("bench/grants")?, "", &extra)?;
    let https_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !xsock.exists() || tokio::net::TcpStream::connect(https_addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("the exchange socket or the HTTPS face did not appear");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The face's certificate is issued by the trust domain's CA.
    let bundle = first_x509(&mut client::connect(&agent.socket).await?)
        .await?
        .svids
        .into_iter()
        .next()
        .context("no X509-SVID")?
        .bundle;
    let mut roots = rustls::RootCertStore::empty();
    for der in crate::identity::pem::split_der_certs(&bundle)? {
        roots.add(CertificateDer::from(der.to_vec()))?;
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let mut results = Vec::new();
    for transport in ["socket", "https"] {
        for grant in GRANTS {
            let mut conns = Vec::new();
            for _ in 0..p.clients {
                conns.push(tokio::sync::Mutex::new(match transport {
                    "socket" => exchange_conn(&xsock).await?,
                    _ => https_conn(https_addr, tls.clone()).await?,
                }));
            }
            let svids = match transport {
                "socket" => {
                    vec![jwt_svid(&mut client::connect(&agent.socket).await?, &issuer).await?]
                }
                _ => {
                    let n = (ASSERTIONS_PER_SECOND * p.duration.as_secs_f64()).ceil() as usize;
                    fetch_svids(&agent.socket, &issuer, n.max(p.clients)).await?
                }
            };
            let reuse = transport == "socket";
            let svids = Arc::new(svids);
            let next = Arc::new(AtomicU64::new(0));
            let conns = Arc::new(conns);
            let host: Arc<str> = match transport {
                "socket" => "localhost".into(),
                _ => format!("localhost:{port}").into(),
            };
            let grant = *grant;
            let cpu_before = agent.cpu_seconds();
            let (latencies, seconds) = {
                let (svids, next, conns, host) =
                    (svids.clone(), next.clone(), conns.clone(), host.clone());
                closed_loop_until(p.clients, p.duration, move |i| {
                    let (svids, next, conns, host) =
                        (svids.clone(), next.clone(), conns.clone(), host.clone());
                    async move {
                        let svid = if reuse {
                            &svids[0]
                        } else {
                            let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                            match svids.get(n) {
                                Some(s) => s,
                                None => return Ok(false),
                            }
                        };
                        let mut conn = conns[i].lock().await;
                        post_token(&mut conn, &host, token_form(grant, svid), "token request")
                            .await?;
                        Ok(true)
                    }
                })
                .await?
            };
            let cpu_after = agent.cpu_seconds();
            let mut extra = serde_json::Map::new();
            insert_cpu_per_op(&mut extra, cpu_before, cpu_after, latencies.len());
            if !reuse && next.load(Ordering::Relaxed) as usize >= svids.len() {
                extra.insert("ended_early".into(), true.into());
            }
            results.push(BenchResult {
                scenario: "grants".into(),
                params: params_map(&[
                    ("clients", p.clients.into()),
                    ("grant", grant.into()),
                    ("transport", transport.into()),
                ]),
                ops: latencies.len() as u64,
                seconds,
                latencies,
                agent_rss_bytes: agent.rss_bytes(),
                extra,
            });
        }
    }
    Ok(results)
}
