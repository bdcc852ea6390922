//! `tessera approvals`: the operator side of the approval step, over the
//! operator socket.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::client;
use crate::config::Config;

#[derive(Args)]
pub(super) struct AdminSocketArgs {
    /// Operator socket (default: admin.socket_path from --config, else /run/tessera/admin.sock).
    #[arg(long)]
    pub(super) admin_socket: Option<PathBuf>,
    /// Read admin.socket_path from this agent config.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
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
    },
    /// Deny a pending exchange.
    Deny {
        #[command(flatten)]
        admin: AdminSocketArgs,
        id: String,
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

pub(super) async fn approvals(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    let (admin, path, json_out) = match &cmd {
        ApprovalsCommand::List { admin, json } => (admin, "/approvals".to_string(), *json),
        ApprovalsCommand::Approve { admin, id } => {
            (admin, format!("/approvals/{}/approve", urlencode(id)), true)
        }
        ApprovalsCommand::Deny { admin, id } => {
            (admin, format!("/approvals/{}/deny", urlencode(id)), true)
        }
    };
    let socket = admin_socket(admin)?;
    let method = if matches!(cmd, ApprovalsCommand::List { .. }) {
        http::Method::GET
    } else {
        http::Method::POST
    };
    let (code, body) = client::http_unix(&socket, method, &path, None).await?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("unexpected answer from {}", socket.display()))?;
    if !code.is_success() {
        bail!("{}", value["error"].as_str().unwrap_or("request failed"));
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let list = value.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no approvals");
        return Ok(());
    }
    println!(
        "{:<28} {:<9} {:<24} {:<40} SCOPES / AUDIENCE",
        "ID", "STATE", "TASK", "PRINCIPAL"
    );
    for a in list {
        println!(
            "{:<28} {:<9} {:<24} {:<40} {} -> {}",
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
        println!("{:<28} {}", "", details.join("; "));
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
