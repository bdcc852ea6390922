//! What an MCP request asks for: its JSON-RPC `method` and the name it acts on
//! (`params.name` for tools and prompts, `params.uri` for resources), read from
//! the body and cross-checked with the `Mcp-Method` / `Mcp-Name` headers.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

/// One JSON-RPC request or notification in an MCP POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRequest {
    /// JSON-RPC `method`, e.g. `tools/call`.
    pub method: String,
    /// The tool or prompt name (`params.name`) or resource URI (`params.uri`).
    pub name: Option<String>,
}

/// Where the guard learns the MCP method of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum McpScopeSource {
    /// Read the JSON-RPC body (buffered up to the body limit, then passed on
    /// unchanged). `Mcp-Method` / `Mcp-Name` headers, when present, must agree
    /// with it. The default, and the safe choice.
    #[default]
    Body,
    /// Trust the `Mcp-Method` / `Mcp-Name` headers and leave the body alone.
    /// Only safe when the MCP server behind the guard rejects requests whose
    /// headers disagree with their body (MCP 2026-07-28 servers must; rmcp does).
    /// A POST without `Mcp-Method` is refused.
    HeadersOnly,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum McpError {
    #[error("request body is not a JSON-RPC message")]
    NotJsonRpc,
    #[error("Mcp-Method or Mcp-Name header does not match the request body")]
    HeaderMismatch,
    #[error("Mcp-Method or Mcp-Name header is malformed")]
    BadHeader,
}

/// Typed (rather than `Value`) so duplicate keys are an error here as they are
/// in the MCP server: the guard and the server must read the same method.
#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Option<Params>,
}

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    name: Option<Value>,
    #[serde(default)]
    uri: Option<Value>,
}

impl Message {
    fn into_request(self) -> Option<McpRequest> {
        let method = self.method?;
        let name = self.params.and_then(|p| {
            let pick = if method.starts_with("resources/") {
                p.uri
            } else {
                p.name
            };
            match pick {
                Some(Value::String(s)) => Some(s),
                _ => None,
            }
        });
        Some(McpRequest { method, name })
    }
}

/// The requests in a POST body: one message, or a batch. Responses and
/// results the client sends back carry no `method` and are skipped.
pub(crate) fn from_body(body: &[u8]) -> Result<Vec<McpRequest>, McpError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| McpError::NotJsonRpc)?;
    let messages: Vec<Message> = match value {
        Value::Array(_) => serde_json::from_slice(body).map_err(|_| McpError::NotJsonRpc)?,
        Value::Object(_) => vec![serde_json::from_slice(body).map_err(|_| McpError::NotJsonRpc)?],
        _ => return Err(McpError::NotJsonRpc),
    };
    Ok(messages
        .into_iter()
        .filter_map(Message::into_request)
        .collect())
}

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, McpError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(McpError::BadHeader);
    }
    let s = first.to_str().map_err(|_| McpError::BadHeader)?;
    // SEP-2243: non-ASCII values travel as `=?base64?<b64>?=`.
    if let Some(inner) = s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        let bytes = STANDARD.decode(inner).map_err(|_| McpError::BadHeader)?;
        return String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| McpError::BadHeader);
    }
    Ok(Some(s.to_string()))
}

/// The request named by the `Mcp-Method` / `Mcp-Name` headers, if any.
pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Option<McpRequest>, McpError> {
    let method = header(headers, "mcp-method")?;
    let name = header(headers, "mcp-name")?;
    match method {
        Some(method) => Ok(Some(McpRequest { method, name })),
        None if name.is_some() => Err(McpError::BadHeader),
        None => Ok(None),
    }
}

/// Headers, when sent, must describe the (single) request in the body.
pub(crate) fn check_headers(
    from_headers: Option<&McpRequest>,
    from_body: &[McpRequest],
) -> Result<(), McpError> {
    let Some(h) = from_headers else {
        return Ok(());
    };
    match from_body {
        [b] if b.method == h.method && (h.name.is_none() || h.name == b.name) => Ok(()),
        _ => Err(McpError::HeaderMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(method: &str, name: Option<&str>) -> McpRequest {
        McpRequest {
            method: method.into(),
            name: name.map(String::from),
        }
    }

    #[test]
    fn body_parsing() {
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add_note","arguments":{"text":"x"}}}"#;
        assert_eq!(
            from_body(call).unwrap(),
            [req("tools/call", Some("add_note"))]
        );
        let read = br#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"notes://1","name":"x"}}"#;
        assert_eq!(
            from_body(read).unwrap(),
            [req("resources/read", Some("notes://1"))]
        );
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"result":{}}]"#;
        assert_eq!(from_body(batch).unwrap(), [req("tools/list", None)]);
        let dup = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_notes","name":"delete_note"}}"#;
        assert_eq!(from_body(dup), Err(McpError::NotJsonRpc));
        let dup_method = br#"{"method":"tools/list","method":"tools/call"}"#;
        assert_eq!(from_body(dup_method), Err(McpError::NotJsonRpc));
        assert_eq!(from_body(b"42"), Err(McpError::NotJsonRpc));
        assert_eq!(from_body(b"{"), Err(McpError::NotJsonRpc));
        assert_eq!(from_body(br#"{"method":5}"#), Err(McpError::NotJsonRpc));
    }

    #[test]
    fn headers() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), Ok(None));
        h.insert("mcp-method", HeaderValue::from_static("tools/call"));
        h.insert(
            "mcp-name",
            HeaderValue::from_static("=?base64?ZGVsZXRlX25vdGU=?="),
        );
        let parsed = from_headers(&h).unwrap().unwrap();
        assert_eq!(parsed, req("tools/call", Some("delete_note")));
        assert_eq!(
            check_headers(Some(&parsed), &[req("tools/call", Some("delete_note"))]),
            Ok(())
        );
        assert_eq!(
            check_headers(Some(&parsed), &[req("tools/call", Some("list_notes"))]),
            Err(McpError::HeaderMismatch)
        );
        assert_eq!(
            check_headers(Some(&parsed), &[]),
            Err(McpError::HeaderMismatch)
        );
        h.append("mcp-method", HeaderValue::from_static("tools/list"));
        assert_eq!(from_headers(&h), Err(McpError::BadHeader));
        let mut only_name = HeaderMap::new();
        only_name.insert("mcp-name", HeaderValue::from_static("x"));
        assert_eq!(from_headers(&only_name), Err(McpError::BadHeader));
    }
}
