//! `tessera approvals`: the operator side of the approval step, over the
//! node's operator socket, or with `--authority` for every node at once at
//! the fleet authority (with the caller's X.509-SVID as the credential).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::client;
use super::operator::{self, AuthorityArgs};
use crate::config::Config;

#[derive(Args)]
pub(super) struct AdminSocketArgs {
    /// Operator socket (default: admin.socket_path from --config, else /run/tessera/admin.sock).
    #[arg(long)]
    pub(super) admin_socket: Option<PathBuf>,
    /// Read admin.socket_path from this agent config.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    #[command(flatten)]
    pub(super) fleet: AuthorityArgs,
    /// With --authority: the Workload API socket the operator's X.509-SVID
    /// comes from (default: SPIFFE_ENDPOINT_SOCKET).
    #[arg(long)]
    pub(super) socket: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum ApprovalsCommand {
    /// Pending and recently decided approvals.
    List {
        #[command(flatten)]
        admin: AdminSocketArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending exchange.
    Approve {
        #[command(flatten)]
        admin: AdminSocketArgs,
        id: String,
        /// With --authority: the node the approval waits on, when two nodes
        /// use the same id.
        #[arg(long)]
        node: Option<String>,
    },
    /// Deny a pending exchange.
    Deny {
        #[command(flatten)]
        admin: AdminSocketArgs,
        id: String,
        /// With --authority: the node the approval waits on.
        #[arg(long)]
        node: Option<String>,
    },
}

fn admin_socket(args: &AdminSocketArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.admin_socket {
        return Ok(p.clone());
    }
    if let Some(c) = &args.config {
        let config = Config::load(c)?;
        return config
            .admin_socket_path
            .with_context(|| format!("{} sets no admin.socket_path", c.display()));
    }
    Ok(PathBuf::from("/run/tessera/admin.sock"))
}

/// `tessera approvals ... --authority`: the same, for every node.
async fn at_authority(cmd: &ApprovalsCommand, addr: &str) -> anyhow::Result<()> {
    let (admin, decision) = match cmd {
        ApprovalsCommand::List { admin, .. } => (admin, None),
        ApprovalsCommand::Approve { admin, id, node } => (admin, Some((id, node, true))),
        ApprovalsCommand::Deny { admin, id, node } => (admin, Some((id, node, false))),
    };
    let c = operator::connect(&admin.fleet, addr, admin.socket.as_deref()).await?;
    let value = match decision {
        None => c.approvals().await?,
        Some((id, node, approve)) => c.decide(id, node.as_deref(), approve).await?,
    };
    let json_out = match cmd {
        ApprovalsCommand::List { json, .. } => *json,
        _ => true,
    };
    print(&value, json_out)
}

pub(super) async fn approvals(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    let (admin, path) = match &cmd {
        ApprovalsCommand::List { admin, .. } => (admin, "/approvals".to_string()),
        ApprovalsCommand::Approve { admin, id, .. } => {
            (admin, format!("/approvals/{}/approve", urlencode(id)))
        }
        ApprovalsCommand::Deny { admin, id, .. } => {
            (admin, format!("/approvals/{}/deny", urlencode(id)))
        }
    };
    if let Some(addr) = &admin.fleet.authority {
        return at_authority(&cmd, addr).await;
    }
    let socket = admin_socket(admin)?;
    let (method, json_out) = match &cmd {
        ApprovalsCommand::List { json, .. } => (http::Method::GET, *json),
        _ => (http::Method::POST, true),
    };
    let (code, body) = client::http_unix(&socket, method, &path, None).await?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("unexpected answer from {}", socket.display()))?;
    if !code.is_success() {
        bail!("{}", value["error"].as_str().unwrap_or("request failed"));
    }
    print(&value, json_out)
}

/// Prints an answer: JSON, or the approvals as a table (with the node
/// column when they come from the authority).
fn print(value: &serde_json::Value, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let list = value.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no approvals");
        return Ok(());
    }
    let fleet = list.iter().any(|a| a.get("node").is_some());
    let node = |a: &serde_json::Value| {
        if fleet {
            format!("{:<20} ", a["node"].as_str().unwrap_or(""))
        } else {
            String::new()
        }
    };
    println!(
        "{}{:<28} {:<9} {:<24} {:<40} SCOPES / AUDIENCE",
        if fleet {
            format!("{:<20} ", "NODE")
        } else {
            String::new()
        },
        "ID",
        "STATE",
        "TASK",
        "PRINCIPAL"
    );
    for a in list {
        println!(
            "{}{:<28} {:<9} {:<24} {:<40} {} -> {}",
            node(&a),
            a["id"].as_str().unwrap_or(""),
            a["state"].as_str().unwrap_or(""),
            a["task_id"].as_str().unwrap_or(""),
            a["principal"].as_str().unwrap_or(""),
            a["scopes"]
                .as_array()
                .map(|s| s
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default(),
            a["audience"].as_str().unwrap_or(""),
        );
        // What else the token would carry, so an operator approves all of it.
        let mut details = vec![format!("ttl {}s", a["ttl_seconds"].as_u64().unwrap_or(0))];
        let chain = strings(&a["delegation_chain"]);
        if !chain.is_empty() {
            details.push(format!("delegation chain {}", chain.join(" <- ")));
        }
        if let Some(actor) = a["may_act"].as_str() {
            details.push(format!("may be delegated to {actor}"));
        }
        println!(
            "{}{:<28} {}",
            node(&serde_json::Value::Null),
            "",
            details.join("; ")
        );
    }
    Ok(())
}

fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
