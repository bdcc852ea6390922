//! Shared pieces of the MCP example: which scope each tool needs, and a small
//! HTTP/1.1 client for Tessera's exchange socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The notes server's canonical URI: the `resource` agents ask tokens for and
/// the `aud` the server accepts.
pub const DEFAULT_RESOURCE: &str = "https://notes.example/mcp";

/// The tools and the scope each needs. Anything else needs a scope no policy grants.
pub const TOOLS: &[(&str, &str, &str)] = &[
    ("list_notes", "notes:read", "List every note"),
    ("add_note", "notes:write", "Add a note; argument `text`"),
    (
        "delete_note",
        "notes:delete",
        "Delete a note; argument `id`",
    ),
];

/// The scope a tool call needs.
pub fn tool_scope(tool: &str) -> &'static str {
    TOOLS
        .iter()
        .find(|(name, _, _)| *name == tool)
        .map(|(_, scope, _)| *scope)
        .unwrap_or("notes:admin")
}

/// `exchange.sock` beside the Workload API socket named by `SPIFFE_ENDPOINT_SOCKET`.
pub fn default_exchange_socket() -> anyhow::Result<PathBuf> {
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .context("SPIFFE_ENDPOINT_SOCKET is not set; pass --exchange-socket")?;
    let path = endpoint
        .strip_prefix("unix://")
        .context("SPIFFE_ENDPOINT_SOCKET must be unix:///path")?;
    Ok(Path::new(path).with_file_name("exchange.sock"))
}

/// `application/x-www-form-urlencoded` body from name/value pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// One request to an HTTP server on a Unix socket; returns the status and the
/// JSON body (`null` if the body is empty or not JSON).
pub async fn unix_http(
    socket: &Path,
    method: Method,
    path: &str,
    form_body: Option<String>,
) -> anyhow::Result<(StatusCode, Value)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost")
        .header(header::ACCEPT, "application/json");
    if form_body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let request = builder.body(Full::new(Bytes::from(form_body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?
        .to_bytes();
    conn.abort();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}

/// The issuer named in the exchange socket's RFC 8414 metadata.
pub async fn discover_issuer(exchange_socket: &Path) -> anyhow::Result<String> {
    let (status, meta) = unix_http(
        exchange_socket,
        Method::GET,
        "/.well-known/oauth-authorization-server",
        None,
    )
    .await?;
    if !status.is_success() {
        bail!("authorization server metadata: HTTP {status}");
    }
    meta["issuer"]
        .as_str()
        .map(String::from)
        .context("authorization server metadata has no issuer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_per_tool() {
        assert_eq!(tool_scope("list_notes"), "notes:read");
        assert_eq!(tool_scope("add_note"), "notes:write");
        assert_eq!(tool_scope("delete_note"), "notes:delete");
        assert_eq!(tool_scope("drop_table"), "notes:admin");
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form(&[
                ("scope", "notes:read notes:write"),
                ("resource", "https://n/mcp")
            ]),
            "scope=notes%3Aread+notes%3Awrite&resource=https%3A%2F%2Fn%2Fmcp"
        );
    }
}
