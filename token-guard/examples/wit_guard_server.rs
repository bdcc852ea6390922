//! A resource server that accepts only WIT-authenticated requests: every
//! path answers the caller's SPIFFE ID as JSON once the `WitGuardLayer` let
//! the request through.
//!
//!   wit_guard_server --trust-domain example.org --jwks-file wit.jwks [--listen 127.0.0.1:0]
//!
//! `--jwks-file` holds the trust domain's WIT-SVID keys (the JWKS
//! `FetchWITBundles` answers); it is re-read on SIGHUP. The first line on
//! stdout is the base URL the server listens on, which is also the target
//! URI base WPTs must name in `aud`. The go-spiffe interop suite
//! (`tests/interop/go/wit_test.go`) drives it.

use std::io::Write;
use std::path::PathBuf;

use axum::Json;
use axum::extract::Request;
use tessera_token_guard::{VerifiedWorkload, WitGuardLayer};

struct Args {
    listen: String,
    trust_domain: String,
    jwks_file: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:0".to_string();
    let (mut trust_domain, mut jwks_file) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--trust-domain" => trust_domain = Some(value()?),
            "--jwks-file" => jwks_file = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen,
        trust_domain: trust_domain.ok_or("--trust-domain is required")?,
        jwks_file: jwks_file.ok_or("--jwks-file is required")?,
    })
}

async fn whoami(request: Request) -> Json<serde_json::Value> {
    let caller = request
        .extensions()
        .get::<VerifiedWorkload>()
        .expect("only reached through the guard");
    Json(serde_json::json!({
        "spiffe_id": caller.spiffe_id,
        "wpt_jti": caller.wpt_jti,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args().map_err(|e| format!("wit_guard_server: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let jwks = std::fs::read(&args.jwks_file)?;
    let guard = WitGuardLayer::builder()
        .target_uri_base(&base)
        .wit_bundle(&args.trust_domain, jwks)
        .build()?;

    let reload = guard.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match std::fs::read(&args.jwks_file) {
                Ok(jwks) => {
                    if let Err(e) = reload.set_wit_bundle(&args.trust_domain, &jwks) {
                        eprintln!("wit_guard_server: keeping the old keys: {e}");
                    }
                }
                Err(e) => eprintln!("wit_guard_server: {}: {e}", args.jwks_file.display()),
            }
        }
    });

    let app = axum::Router::new().fallback(whoami).layer(guard);
    // The address line, flushed: the test reads it before sending requests.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{base}")?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, app).await?;
    Ok(())
}
