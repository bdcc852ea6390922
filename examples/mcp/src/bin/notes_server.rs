//! A small MCP server (rmcp, streamable HTTP) with three tools over an
//! in-memory note store, behind `tessera-token-guard`: every request needs a
//! Tessera task token for this server's URI, and each tool its own scope.
//!
//!   notes-server --listen 127.0.0.1:8080 --exchange-socket /run/tessera/sockets/exchange.sock

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use clap::Parser;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tessera_mcp_example::{DEFAULT_RESOURCE, TOOLS, discover_issuer, tool_scope};
use tessera_token_guard::{McpRequest, TokenGuardLayer, VerifiedToken};

#[derive(Parser)]
#[command(about = "MCP notes server protected by Tessera task tokens")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Tessera's exchange socket (JWKS and introspection). Default: exchange.sock
    /// beside $SPIFFE_ENDPOINT_SOCKET.
    #[arg(long)]
    exchange_socket: Option<PathBuf>,
    /// Expected token issuer. Default: the issuer in the exchange socket's metadata.
    #[arg(long)]
    issuer: Option<String>,
    /// This server's canonical URI; tokens must carry it in `aud`.
    #[arg(long, default_value = DEFAULT_RESOURCE)]
    audience: String,
    /// How long an "active" introspection answer is reused: the longest a
    /// revoked token can still get through.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    introspection_cache: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = n.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("not a duration: {s:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
struct Note {
    text: String,
    author: String,
    task: String,
}

#[derive(Clone, Default)]
struct Notes {
    inner: Arc<Mutex<(u64, BTreeMap<u64, Note>)>>,
}

impl Notes {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, Note>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct NotesServer {
    notes: Notes,
}

fn schema(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

fn tools() -> Vec<Tool> {
    TOOLS
        .iter()
        .map(|(name, scope, description)| {
            let input = match *name {
                "add_note" => json!({
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"]
                }),
                "delete_note" => json!({
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1}},
                    "required": ["id"]
                }),
                _ => json!({"type": "object", "properties": {}}),
            };
            Tool::new(
                *name,
                format!("{description} (needs scope {scope})"),
                schema(input),
            )
        })
        .collect()
}

fn text(s: impl Into<String>) -> CallToolResponse {
    CallToolResult::success(vec![ContentBlock::text(s.into())]).into()
}

fn tool_error(s: impl Into<String>) -> CallToolResponse {
    CallToolResult::error(vec![ContentBlock::text(s.into())]).into()
}

impl ServerHandler for NotesServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "A shared notepad. Each tool needs its own scope in a Tessera task token.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // The guard put the verified claims on the HTTP request; rmcp hands us its parts.
        let token = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<VerifiedToken>())
            .cloned()
            .ok_or_else(|| {
                ErrorData::internal_error("request did not pass the token guard", None)
            })?;
        // Defence in depth: the guard already checked this scope.
        let scope = tool_scope(&request.name);
        if !token.has_scope(scope) {
            return Err(ErrorData::invalid_request(
                format!("scope {scope} not granted"),
                None,
            ));
        }
        let task = token.txn.clone().unwrap_or_default();
        let args = request.arguments.unwrap_or_default();
        tracing::info!(tool = %request.name, client = %token.client_id, task = %task, "tool call");
        let mut store = self.notes.lock();
        let (next_id, notes) = &mut *store;
        match request.name.as_ref() {
            "list_notes" => {
                if notes.is_empty() {
                    return Ok(text("no notes"));
                }
                let lines: Vec<String> = notes
                    .iter()
                    .map(|(id, n)| format!("#{id} {:?} (by {}, task {})", n.text, n.author, n.task))
                    .collect();
                Ok(text(lines.join("; ")))
            }
            "add_note" => {
                let Some(note) = args.get("text").and_then(Value::as_str) else {
                    return Ok(tool_error("argument `text` (string) is required"));
                };
                *next_id += 1;
                notes.insert(
                    *next_id,
                    Note {
                        text: note.chars().take(1000).collect(),
                        author: token.client_id.clone(),
                        task,
                    },
                );
                Ok(text(format!("added note #{next_id}")))
            }
            "delete_note" => {
                let Some(id) = args.get("id").and_then(Value::as_u64) else {
                    return Ok(tool_error("argument `id` (integer) is required"));
                };
                match notes.remove(&id) {
                    Some(_) => Ok(text(format!("deleted note #{id}"))),
                    None => Ok(tool_error(format!("no note #{id}"))),
                }
            }
            other => Err(ErrorData::invalid_params(
                format!("no tool {other:?}"),
                None,
            )),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The guard explains each refusal at debug level (never with the token).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tessera_token_guard=debug".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let exchange_socket = match args.exchange_socket {
        Some(p) => p,
        None => tessera_mcp_example::default_exchange_socket()?,
    };
    let issuer = match args.issuer {
        Some(i) => i,
        None => discover_issuer(&exchange_socket)
            .await
            .context("discovering the issuer (or pass --issuer)")?,
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    let metadata_url = format!("http://{addr}/.well-known/oauth-protected-resource/mcp");

    let guard = TokenGuardLayer::builder()
        .issuer(&issuer)
        .audience(&args.audience)
        .exchange_socket(&exchange_socket)
        .introspection_cache_ttl(args.introspection_cache)
        .resource_metadata(&metadata_url)
        // What an MCP client without a token asks for first; it steps up
        // on the 403 a tool needing more gets.
        .challenge_scope("notes:read")
        .mcp_scope_rule(
            |r: &McpRequest| match (r.method.as_str(), r.name.as_deref()) {
                ("tools/call", Some(tool)) => Some(vec![tool_scope(tool).to_string()]),
                ("tools/call", None) => Some(vec!["notes:admin".into()]),
                // Handshake, discovery, tools/list: any valid token for this server.
                _ => None,
            },
        )
        .build()?;

    let notes = Notes::default();
    let mcp = StreamableHttpService::new(
        move || {
            Ok(NotesServer {
                notes: notes.clone(),
            })
        },
        Arc::new(LocalSessionManager::default()),
        {
            let mut config = StreamableHttpServerConfig::default();
            config.json_response = true;
            config
        },
    );

    // RFC 9728 metadata is public; only /mcp is guarded.
    let resource = args.audience.clone();
    let scopes: Vec<&str> = TOOLS.iter().map(|(_, s, _)| *s).collect();
    let metadata = json!({
        "resource": resource,
        "authorization_servers": [issuer],
        "scopes_supported": scopes,
        "bearer_methods_supported": ["header"],
        "tls_client_certificate_bound_access_tokens": false,
    });
    let app = Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(move || {
                let metadata = metadata.clone();
                async move { axum::Json(metadata) }
            }),
        )
        .route_service("/mcp", tower::Layer::layer(&guard, mcp));

    println!("listening on {addr}");
    tracing::info!(%issuer, audience = %args.audience, exchange_socket = %exchange_socket.display(), "notes server ready");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
