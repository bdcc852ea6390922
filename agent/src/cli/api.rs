//! `tessera api` and `tessera healthcheck`: the Workload API as a client sees it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use tessera_workload_api as pb;

use super::{client, status};
use crate::clock::{Clock, SystemClock};
use crate::identity::pem;

#[derive(Subcommand)]
pub(super) enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Stream X.509 SVID updates as they rotate.
    Watch {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(super) enum FetchCommand {
    /// Fetch X509-SVIDs and print ID, expiry and chain summary.
    X509 {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch and print JWT-SVIDs.
    Jwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, required = true)]
        audience: Vec<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        audience: String,
        #[arg(long)]
        svid: String,
    },
}

/// `tessera api ...`.
pub(super) async fn api(cmd: ApiCommand) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { socket, write }) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let mut stream = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(status)?
                .context("the agent closed the stream without an answer")?;
            print_x509(&resp)?;
            if let Some(dir) = write {
                write_x509(&dir, &resp)?;
            }
            Ok(())
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            socket,
            audience,
            spiffe_id,
        }) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let resp = c
                .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            for svid in resp.svids {
                println!("token({}):\n\t{}", svid.spiffe_id, svid.svid);
                if !svid.hint.is_empty() {
                    println!("hint: {}", svid.hint);
                }
            }
            Ok(())
        }
        ApiCommand::Validate(ValidateCommand::Jwt {
            socket,
            audience,
            svid,
        }) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let resp = c
                .validate_jwtsvid(pb::with_security_header(pb::ValidateJwtsvidRequest {
                    audience,
                    svid,
                }))
                .await
                .map_err(status)?
                .into_inner();
            println!("SVID is valid.");
            println!("SPIFFE ID : {}", resp.spiffe_id);
            let claims = resp.claims.map(struct_to_json).unwrap_or_default();
            println!("Claims    : {}", serde_json::Value::Object(claims));
            Ok(())
        }
        ApiCommand::Watch { socket } => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let mut stream = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            println!("Watching X.509 SVID updates (Ctrl-C to stop)");
            while let Some(resp) = stream.message().await.map_err(status)? {
                println!(
                    "--- update at {}",
                    humantime::format_rfc3339_seconds(SystemClock.now())
                );
                print_x509(&resp)?;
            }
            bail!("the agent closed the stream")
        }
    }
}

/// `tessera healthcheck`: any gRPC answer (even PermissionDenied) proves
/// the agent serves.
pub(super) async fn healthcheck(socket: Option<PathBuf>) -> anyhow::Result<()> {
    let mut c = client::connect_resolved(socket.as_deref()).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.fetch_x509_bundles(pb::with_security_header(pb::X509BundlesRequest {})),
    )
    .await
    .context("agent did not answer within 5s")?;
    match r {
        Ok(_) => {}
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) => {}
        Err(s) => bail!("agent answered {:?}: {}", s.code(), s.message()),
    }
    println!("agent is healthy");
    Ok(())
}

fn print_x509(resp: &pb::X509svidResponse) -> anyhow::Result<()> {
    println!("Received {} svid(s)", resp.svids.len());
    for svid in &resp.svids {
        println!();
        println!("SPIFFE ID:\t\t{}", svid.spiffe_id);
        if !svid.hint.is_empty() {
            println!("Hint:\t\t\t{}", svid.hint);
        }
        let chain = pem::split_der_certs(&svid.x509_svid)?;
        if let Some(leaf) = chain.first() {
            let (_, c) = x509_parser::parse_x509_certificate(leaf).context("unparsable SVID")?;
            println!("SVID Valid After:\t{}", c.validity().not_before);
            println!("SVID Valid Until:\t{}", c.validity().not_after);
            println!("Serial:\t\t\t{}", c.raw_serial_as_string());
        }
        for (i, ca) in pem::split_der_certs(&svid.bundle)?.iter().enumerate() {
            let (_, c) = x509_parser::parse_x509_certificate(ca).context("unparsable bundle")?;
            println!("CA #{} Valid After:\t{}", i + 1, c.validity().not_before);
            println!("CA #{} Valid Until:\t{}", i + 1, c.validity().not_after);
        }
    }
    Ok(())
}

fn write_x509(dir: &Path, resp: &pb::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, svid) in resp.svids.iter().enumerate() {
        let certs: String = pem::split_der_certs(&svid.x509_svid)?
            .iter()
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect();
        let bundle: String = pem::split_der_certs(&svid.bundle)?
            .iter()
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect();
        std::fs::write(dir.join(format!("svid.{i}.pem")), certs)?;
        crate::fsutil::write_private_atomic(
            &dir.join(format!("svid.{i}.key")),
            pem::encode("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
        )?;
        std::fs::write(dir.join(format!("bundle.{i}.pem")), bundle)?;
        println!(
            "Wrote svid.{i}.pem, svid.{i}.key (0600) and bundle.{i}.pem to {}",
            dir.display()
        );
    }
    Ok(())
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or_default(),
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
    }
}
