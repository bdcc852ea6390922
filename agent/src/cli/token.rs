//! `tessera token`: per-task tokens over the exchange socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tessera_workload_api as pb;

use super::{client, status};

/// Where the exchange socket is: `--exchange-socket`, else `exchange.sock`
/// beside the Workload API socket (`--socket` / `SPIFFE_ENDPOINT_SOCKET`).
#[derive(Args, Clone)]
pub(super) struct ExchangeSocketArgs {
    /// Workload API socket (default: SPIFFE_ENDPOINT_SOCKET).
    #[arg(long)]
    pub(super) socket: Option<PathBuf>,
    /// Exchange socket (default: exchange.sock next to the Workload API socket).
    #[arg(long)]
    pub(super) exchange_socket: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// RFC 8693 exchange: fetch this workload's JWT-SVID and trade it for a
    /// task token. Prints the JSON response.
    Exchange(ExchangeArgs),
    /// End a task (revokes all its tokens) or revoke one token.
    Revoke {
        #[command(flatten)]
        sockets: ExchangeSocketArgs,
        #[arg(long, required_unless_present = "token", conflicts_with = "token")]
        task: Option<String>,
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        fleet: super::operator::AuthorityArgs,
        /// With --authority and --task: the SPIFFE ID whose task it is.
        #[arg(long, value_name = "SPIFFE_ID", requires = "task")]
        principal: Option<String>,
    },
    /// RFC 7662 introspection of a token; prints the JSON result.
    Introspect {
        #[command(flatten)]
        sockets: ExchangeSocketArgs,
        token: String,
    },
}

#[derive(Args)]
pub(super) struct ExchangeArgs {
    #[command(flatten)]
    sockets: ExchangeSocketArgs,
    /// Logical audience of the token (or use --resource).
    #[arg(
        long,
        required_unless_present = "resource",
        conflicts_with = "resource"
    )]
    audience: Option<String>,
    /// RFC 8707 resource URI of the token's target (e.g. an MCP server).
    #[arg(long)]
    resource: Option<String>,
    /// Scopes the task needs (repeat or space-separate).
    #[arg(long, required = true, num_args = 1..)]
    scope: Vec<String>,
    /// Task id; ending the task revokes every token issued for it.
    #[arg(long)]
    task: Option<String>,
    /// Requested lifetime (e.g. 60s); policy and config may shorten it.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Delegate: act on behalf of another workload's access token (sent as
    /// RFC 8693 `subject_token`, with this workload's JWT-SVID as
    /// `actor_token`). That token must name this workload in `may_act`.
    #[arg(long, alias = "actor-token", value_name = "ACCESS_TOKEN")]
    on_behalf_of: Option<String>,
    /// Consent to delegation: the issued token names this SPIFFE ID in
    /// `may_act`, so that workload (and only it) may act on its behalf.
    #[arg(long, value_name = "SPIFFE_ID")]
    may_act: Option<String>,
    /// Accept the permitted subset of the scopes instead of failing.
    #[arg(long)]
    subset: bool,
    /// Poll a pending approval.
    #[arg(long)]
    approval_id: Option<String>,
    /// When approval is pending, keep polling until decided (at most this long).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

/// `tessera token ...`.
pub(super) async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Exchange(args) => token_exchange(args).await,
        TokenCommand::Revoke {
            sockets,
            task,
            token,
            fleet,
            principal,
        } => {
            if let Some(addr) = &fleet.authority {
                if task.is_some() && principal.is_none() {
                    bail!(
                        "with --authority, --task needs --principal (the SPIFFE ID whose task it is)"
                    );
                }
                let c = super::operator::connect(&fleet, addr, sockets.socket.as_deref()).await?;
                c.revoke(&crate::fleet::operator::RevokeRequest {
                    token,
                    task_id: task.clone(),
                    principal,
                })
                .await?;
                match task {
                    Some(t) => println!("task {t} ended on every node; its tokens are revoked"),
                    None => println!("token revoked on every node"),
                }
                return Ok(());
            }
            let xsock = exchange_socket(&sockets)?;
            let form = match (&task, &token) {
                (Some(t), _) => client::form(&[("task_id", t)]),
                (None, Some(t)) => client::form(&[("token", t)]),
                (None, None) => bail!("pass --task or --token"),
            };
            exchange_call(&xsock, http::Method::POST, "/revoke", Some(form)).await?;
            match task {
                Some(t) => println!("task {t} ended; its tokens are revoked"),
                None => println!("token revoked"),
            }
            Ok(())
        }
        TokenCommand::Introspect { sockets, token } => {
            let xsock = exchange_socket(&sockets)?;
            let json = exchange_call(
                &xsock,
                http::Method::POST,
                "/introspect",
                Some(client::form(&[("token", &token)])),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
    }
}

fn exchange_socket(args: &ExchangeSocketArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.exchange_socket {
        return Ok(p.clone());
    }
    let workload = client::socket_path(args.socket.as_deref()).context(
        "cannot locate the exchange socket: pass --exchange-socket, --socket or set SPIFFE_ENDPOINT_SOCKET",
    )?;
    Ok(workload.with_file_name("exchange.sock"))
}

/// Calls the exchange socket; a non-2xx answer becomes an error naming the
/// OAuth error code (the JSON body goes to stdout, so scripts can read it).
async fn exchange_call(
    socket: &Path,
    method: http::Method,
    path: &str,
    form: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = client::http_unix(socket, method, path, form).await?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        serde_json::json!({"error": "invalid_response", "error_description": String::from_utf8_lossy(&body)})
    });
    if !status.is_success() {
        return Err(oauth_failure(status, &json));
    }
    Ok(json)
}

async fn token_exchange(args: ExchangeArgs) -> anyhow::Result<()> {
    let ExchangeArgs {
        sockets,
        audience,
        resource,
        scope,
        task,
        ttl,
        on_behalf_of,
        may_act,
        subset,
        mut approval_id,
        wait,
    } = args;
    let xsock = exchange_socket(&sockets)?;
    let meta = exchange_call(
        &xsock,
        http::Method::GET,
        "/.well-known/oauth-authorization-server",
        None,
    )
    .await?;
    let issuer = meta["issuer"]
        .as_str()
        .context("the exchange metadata has no issuer")?
        .to_string();
    let mut api = match &sockets.socket {
        Some(p) => client::connect(p).await?,
        None => client::connect_resolved(None).await?,
    };
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        // A fresh JWT-SVID per attempt: polling may outlast one.
        let svid = api
            .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                audience: vec![issuer.clone()],
                spiffe_id: String::new(),
            }))
            .await
            .map_err(status)?
            .into_inner()
            .svids
            .into_iter()
            .next()
            .context("the agent returned no JWT-SVID")?;
        let scopes = scope.join(" ");
        let ttl_secs = ttl.map(|t| t.as_secs().max(1).to_string());
        // RFC 8693 §2.1 roles: the subject is who the token is for, the
        // actor who acts.
        let mut pairs: Vec<(&str, &str)> = vec![
            ("grant_type", crate::exchange::request::GRANT_TOKEN_EXCHANGE),
            ("scope", &scopes),
        ];
        match &on_behalf_of {
            None => pairs.extend([
                ("subject_token", svid.svid.as_str()),
                (
                    "subject_token_type",
                    crate::exchange::request::TOKEN_TYPE_JWT,
                ),
            ]),
            Some(parent) => pairs.extend([
                ("subject_token", parent.as_str()),
                (
                    "subject_token_type",
                    crate::exchange::request::TOKEN_TYPE_ACCESS_TOKEN,
                ),
                ("actor_token", svid.svid.as_str()),
                ("actor_token_type", crate::exchange::request::TOKEN_TYPE_JWT),
            ]),
        }
        if let Some(m) = &may_act {
            pairs.push(("may_act", m));
        }
        if let Some(a) = &audience {
            pairs.push(("audience", a));
        }
        if let Some(r) = &resource {
            pairs.push(("resource", r));
        }
        if let Some(t) = &task {
            pairs.push(("task_id", t));
        }
        if let Some(t) = &ttl_secs {
            pairs.push(("requested_ttl", t));
        }
        if subset {
            pairs.push(("scope_mode", "subset"));
        }
        if let Some(a) = &approval_id {
            pairs.push(("approval_id", a));
        }
        let (code, body) = client::http_unix(
            &xsock,
            http::Method::POST,
            "/token",
            Some(client::form(&pairs)),
        )
        .await?;
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let pending = json["error"] == "authorization_pending";
        if pending && let Some(deadline) = deadline {
            let id = json["approval_id"].as_str().unwrap_or_default().to_string();
            if approval_id.is_none() {
                eprintln!(
                    "waiting for an operator to approve {id} (tessera approvals approve {id})"
                );
            }
            approval_id = Some(id);
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "approval {} still pending after the --wait time",
                    approval_id.unwrap_or_default()
                );
            }
            let interval = json["interval"].as_u64().unwrap_or(2).clamp(1, 60);
            tokio::time::sleep(Duration::from_secs(interval)).await;
            continue;
        }
        if !code.is_success() {
            return Err(oauth_failure(code, &json));
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
}

/// A non-2xx OAuth answer: its JSON body goes to stdout (scripts read it),
/// the error names the OAuth code.
fn oauth_failure(status: http::StatusCode, json: &serde_json::Value) -> anyhow::Error {
    println!("{json}");
    anyhow::anyhow!(
        "{} ({}): {}",
        json["error"].as_str().unwrap_or("error"),
        status.as_u16(),
        json["error_description"].as_str().unwrap_or("")
    )
}
