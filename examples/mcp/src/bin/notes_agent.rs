//! An AI-agent stand-in. For one task it fetches its JWT-SVID from the
//! Workload API, trades it at Tessera's exchange socket for a token scoped to
//! exactly what the task needs (waiting for a human approval if policy asks
//! for one), then runs its steps against the MCP notes server with that token.
//!
//!   notes-agent --task t1 --scopes "notes:read notes:write" \
//!       list_notes add_note:hello delete_note:1@403 end-task wait:2s list_notes@401
//!
//! Steps, in order: `TOOL[:ARG][@EXPECT]` calls a tool (`list_notes`,
//! `add_note:TEXT`, `delete_note:ID`) and expects `ok` (default), `403`,
//! `401` or `error` (the tool answered with an error); `end-task` revokes
//! every token of the task (`POST /revoke task_id=`); `wait:DURATION` sleeps
//! (e.g. until the server's introspection cache expires).
//!
//! Prints one line per step, never a token. Exit status: 0 when every step
//! went as expected, 1 when one did not, 2 when the task got no token (unless
//! `--expect-exchange` names the error that happened).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use http::{Method, StatusCode};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, JsonObject};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::Value;
use tessera_mcp_example::{DEFAULT_RESOURCE, discover_issuer, form, unix_http};

#[derive(Parser)]
#[command(about = "Agent stand-in: per-task Tessera tokens for MCP tool calls")]
struct Args {
    /// Task id; ending the task revokes every token issued for it.
    #[arg(long)]
    task: String,
    /// Scopes this task needs, space-separated (e.g. "notes:read notes:write").
    #[arg(long)]
    scopes: String,
    /// MCP endpoint of the notes server.
    #[arg(long, default_value = "http://127.0.0.1:8080/mcp")]
    server: String,
    /// The server's canonical URI (the token's audience).
    #[arg(long, default_value = DEFAULT_RESOURCE)]
    resource: String,
    /// Tessera's exchange socket. Default: exchange.sock beside $SPIFFE_ENDPOINT_SOCKET.
    #[arg(long)]
    exchange_socket: Option<PathBuf>,
    /// Token issuer (the audience of the JWT-SVID). Default: from the exchange socket's metadata.
    #[arg(long)]
    issuer: Option<String>,
    /// Requested token lifetime in seconds (policy and config may shorten it).
    #[arg(long)]
    ttl: Option<u64>,
    /// How long to wait for a human to approve, in seconds.
    #[arg(long, default_value_t = 120)]
    approval_timeout: u64,
    /// The exchange outcome this run expects: `ok`, or an OAuth error code
    /// such as `access_denied` (then no steps run, and exit 0 if it matched).
    #[arg(long, default_value = "ok")]
    expect_exchange: String,
    /// Steps: TOOL[:ARG][@ok|403|401|error], end-task, wait:DURATION.
    steps: Vec<String>,
}

enum Step {
    Call {
        tool: String,
        arg: Option<String>,
        expect: String,
    },
    EndTask,
    Wait(Duration),
}

fn parse_step(s: &str) -> anyhow::Result<Step> {
    if s == "end-task" {
        return Ok(Step::EndTask);
    }
    if let Some(d) = s.strip_prefix("wait:") {
        let secs: f64 = d
            .trim_end_matches('s')
            .parse()
            .with_context(|| format!("step {s:?}: wait:SECONDS, e.g. wait:2s"))?;
        return Ok(Step::Wait(Duration::try_from_secs_f64(secs)?));
    }
    let (body, expect) = match s.rsplit_once('@') {
        Some((b, e)) if ["ok", "401", "403", "error"].contains(&e) => (b, e),
        _ => (s, "ok"),
    };
    let (tool, arg) = match body.split_once(':') {
        Some((t, a)) => (t, Some(a.to_string())),
        None => (body, None),
    };
    if tool.is_empty() {
        bail!("step {s:?}: no tool name");
    }
    Ok(Step::Call {
        tool: tool.into(),
        arg,
        expect: expect.into(),
    })
}

/// What happened to one tool call, in the words the demo checks for.
fn outcome(tool: &str, result: Result<String, CallError>) -> (String, String) {
    match result {
        Ok(text) => ("ok".into(), format!("tool {tool} -> ok: {text}")),
        Err(CallError::Tool(text)) => ("error".into(), format!("tool {tool} -> error: {text}")),
        Err(CallError::Http(status, challenge)) => (
            status.to_string(),
            format!("tool {tool} -> http {status} ({challenge})"),
        ),
        Err(CallError::Other(e)) => ("failed".into(), format!("tool {tool} -> failed: {e}")),
    }
}

enum CallError {
    /// The tool ran and reported an error.
    Tool(String),
    /// The server (the token guard) refused the request: 401 or 403, with its challenge.
    Http(u16, String),
    Other(String),
}

/// 401 or 403 from the `WWW-Authenticate` challenge rmcp surfaces.
fn from_challenge(challenge: Option<&str>, fallback: String) -> CallError {
    match challenge {
        Some(c) if c.contains("insufficient_scope") => CallError::Http(403, c.to_string()),
        Some(c) => CallError::Http(401, c.to_string()),
        None => CallError::Other(fallback),
    }
}

async fn call_tool(
    server: &str,
    token: &str,
    tool: &str,
    arg: Option<&str>,
) -> Result<String, CallError> {
    let mut arguments = JsonObject::new();
    match (tool, arg) {
        ("add_note", Some(text)) => {
            arguments.insert("text".into(), Value::String(text.into()));
        }
        ("delete_note", Some(id)) => {
            let id: u64 = id
                .parse()
                .map_err(|_| CallError::Other(format!("delete_note:{id}: not a number")))?;
            arguments.insert("id".into(), id.into());
        }
        _ => {}
    }
    // A fresh MCP client per step: a 401/403 ends the transport it happened on.
    let config =
        StreamableHttpClientTransportConfig::with_uri(server.to_string()).auth_header(token);
    let transport = StreamableHttpClientTransport::from_config(config);
    let client = ().serve(transport).await.map_err(|e| {
        let msg = e.to_string();
        from_challenge(e.auth_challenge(), msg)
    })?;
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(arguments))
        .await;
    let _ = client.cancel().await;
    let result = result.map_err(|e| {
        let msg = e.to_string();
        from_challenge(e.auth_challenge(), msg)
    })?;
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join(" ");
    if result.is_error == Some(true) {
        Err(CallError::Tool(text))
    } else {
        Ok(text)
    }
}

struct Exchange {
    socket: PathBuf,
    issuer: String,
}

/// OAuth error from the exchange: code, description and the whole body.
struct OAuthError {
    code: String,
    description: String,
    body: Value,
}

impl Exchange {
    async fn svid(&self) -> anyhow::Result<spiffe::JwtSvid> {
        let client = spiffe::WorkloadApiClient::connect_env()
            .await
            .context("connecting to the Workload API ($SPIFFE_ENDPOINT_SOCKET)")?;
        client
            .fetch_jwt_svid([self.issuer.as_str()], None)
            .await
            .context("fetching a JWT-SVID")
    }

    /// POST /token; the token response, or the OAuth error.
    async fn token(
        &self,
        args: &Args,
        approval_id: Option<&str>,
    ) -> anyhow::Result<Result<Value, OAuthError>> {
        // A fresh JWT-SVID for every request: polling may outlast one.
        let svid = self.svid().await?;
        let ttl = args.ttl.map(|t| t.to_string());
        let mut fields = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", svid.token()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("resource", args.resource.as_str()),
            ("scope", args.scopes.as_str()),
            ("task_id", args.task.as_str()),
        ];
        if let Some(t) = &ttl {
            fields.push(("requested_ttl", t));
        }
        if let Some(id) = approval_id {
            fields.push(("approval_id", id));
        }
        let (status, body) =
            unix_http(&self.socket, Method::POST, "/token", Some(form(&fields))).await?;
        if status == StatusCode::OK && body["access_token"].is_string() {
            return Ok(Ok(body));
        }
        match body["error"].as_str() {
            Some(code) => Ok(Err(OAuthError {
                code: code.to_string(),
                description: body["error_description"].as_str().unwrap_or("").to_string(),
                body,
            })),
            None => bail!("exchange answered HTTP {status} without an OAuth error"),
        }
    }

    async fn end_task(&self, task: &str) -> anyhow::Result<()> {
        let (status, body) = unix_http(
            &self.socket,
            Method::POST,
            "/revoke",
            Some(form(&[("task_id", task)])),
        )
        .await?;
        if !status.is_success() {
            bail!(
                "HTTP {status}: {} {}",
                body["error"].as_str().unwrap_or(""),
                body["error_description"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }
}

/// Exchanges the SVID for a task token, polling through a pending approval.
/// `Ok(Err(code))` is an OAuth refusal.
async fn get_token(exchange: &Exchange, args: &Args) -> anyhow::Result<Result<Value, String>> {
    let mut approval: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(args.approval_timeout.min(86_400));
    loop {
        match exchange.token(args, approval.as_deref()).await? {
            Ok(body) => {
                println!(
                    "exchange: task {} -> granted {:?}, expires in {}s{}",
                    args.task,
                    body["scope"].as_str().unwrap_or(""),
                    body["expires_in"],
                    approval
                        .as_deref()
                        .map(|a| format!(" (approval {a})"))
                        .unwrap_or_default()
                );
                return Ok(Ok(body));
            }
            Err(e) if e.code == "authorization_pending" => {
                let id = e.body["approval_id"].as_str().unwrap_or("").to_string();
                let interval = e.body["interval"].as_u64().unwrap_or(2).clamp(1, 60);
                if approval.is_none() {
                    if id.is_empty() {
                        bail!("authorization_pending without an approval_id");
                    }
                    println!(
                        "exchange: task {} -> authorization_pending approval_id={id} (polling every {interval}s for up to {}s)",
                        args.task, args.approval_timeout
                    );
                    approval = Some(id);
                }
                if Instant::now() + Duration::from_secs(interval) > deadline {
                    println!(
                        "exchange: approval not decided within {}s",
                        args.approval_timeout
                    );
                    return Ok(Err("approval_timeout".into()));
                }
                tokio::time::sleep(Duration::from_secs(interval)).await;
            }
            Err(e) => {
                println!(
                    "exchange: task {} scopes {:?} -> {}: {}",
                    args.task, args.scopes, e.code, e.description
                );
                return Ok(Err(e.code));
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let steps = args
        .steps
        .iter()
        .map(|s| parse_step(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let socket = match &args.exchange_socket {
        Some(p) => p.clone(),
        None => tessera_mcp_example::default_exchange_socket()?,
    };
    let issuer = match &args.issuer {
        Some(i) => i.clone(),
        None => discover_issuer(&socket).await?,
    };
    let exchange = Exchange { socket, issuer };
    let svid = exchange.svid().await?;
    println!(
        "agent: {} (JWT-SVID for {})",
        svid.spiffe_id(),
        exchange.issuer
    );
    println!(
        "exchange: task {} asks for {:?} on {}",
        args.task, args.scopes, args.resource
    );
    let body = match get_token(&exchange, &args).await? {
        Ok(body) => body,
        Err(code) => {
            return Ok(if code == args.expect_exchange {
                println!("result: exchange refused with {code}, as expected");
                ExitCode::SUCCESS
            } else {
                println!(
                    "result: UNEXPECTED exchange outcome {code} (expected {})",
                    args.expect_exchange
                );
                ExitCode::from(2)
            });
        }
    };
    if args.expect_exchange != "ok" {
        println!(
            "result: UNEXPECTED token (expected {})",
            args.expect_exchange
        );
        return Ok(ExitCode::from(2));
    }
    let token = body["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let mut unexpected = 0;
    for step in &steps {
        match step {
            Step::Call { tool, arg, expect } => {
                let result = call_tool(&args.server, &token, tool, arg.as_deref()).await;
                let (got, line) = outcome(tool, result);
                if &got == expect {
                    println!("{line}");
                } else {
                    unexpected += 1;
                    println!("{line}  [UNEXPECTED: wanted {expect}]");
                }
            }
            Step::EndTask => match exchange.end_task(&args.task).await {
                Ok(()) => println!("end-task: task {} ended, its tokens are revoked", args.task),
                Err(e) => {
                    unexpected += 1;
                    println!(
                        "end-task: task {} -> failed: {e:#}  [UNEXPECTED]",
                        args.task
                    );
                }
            },
            Step::Wait(d) => {
                println!("wait: {:.1}s", d.as_secs_f64());
                tokio::time::sleep(*d).await;
            }
        }
    }
    if unexpected == 0 {
        println!("result: {} steps as expected", steps.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("result: {unexpected} of {} steps UNEXPECTED", steps.len());
        Ok(ExitCode::from(1))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        let Step::Call { tool, arg, expect } = parse_step("add_note:a@b@403").unwrap() else {
            panic!("not a call");
        };
        assert_eq!(
            (tool.as_str(), arg.as_deref(), expect.as_str()),
            ("add_note", Some("a@b"), "403")
        );
        let Step::Call { arg, expect, .. } = parse_step("add_note:me@example.org").unwrap() else {
            panic!("not a call");
        };
        assert_eq!(
            (arg.as_deref(), expect.as_str()),
            (Some("me@example.org"), "ok")
        );
        assert!(matches!(parse_step("end-task").unwrap(), Step::EndTask));
        assert!(
            matches!(parse_step("wait:1.5s").unwrap(), Step::Wait(d) if d == Duration::from_millis(1500))
        );
        assert!(parse_step("wait:soon").is_err());
        assert!(parse_step(":x").is_err());
    }
}
