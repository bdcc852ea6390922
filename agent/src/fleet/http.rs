//! One HTTPS request with a JSON body, for both the agent → authority and the
//! authority → Kubernetes API clients. One connection per request keeps it
//! simple: calls are batched and infrequent (rotation, bundle polls).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;

/// Largest response accepted (a 5,000-pod PodList is a few MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{addr}: cannot connect: {message}")]
    Connect { addr: String, message: String },
    #[error("{addr}: TLS: {message}")]
    Tls { addr: String, message: String },
    #[error("{addr}: {message}")]
    Http { addr: String, message: String },
    #[error("{addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// A request: `method path` to `addr` (`host:port`), TLS-verified as `server_name`.
pub struct Request<'a> {
    pub addr: &'a str,
    pub server_name: &'a str,
    pub tls: Arc<rustls::ClientConfig>,
    pub method: hyper::Method,
    pub path: &'a str,
    pub bearer: Option<String>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// Sends the request; returns the status and body of any answer.
pub async fn send(req: Request<'_>) -> Result<(u16, Bytes), HttpError> {
    let timeout = req.timeout;
    let addr = req.addr.to_string();
    tokio::time::timeout(timeout, send_inner(req))
        .await
        .map_err(|_| HttpError::Timeout { addr, timeout })?
}

async fn send_inner(req: Request<'_>) -> Result<(u16, Bytes), HttpError> {
    let addr = req.addr.to_string();
    let tcp = tokio::net::TcpStream::connect(req.addr)
        .await
        .map_err(|e| HttpError::Connect {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(req.server_name.to_string()).map_err(|e| HttpError::Tls {
        addr: addr.clone(),
        message: format!("server name {:?}: {e}", req.server_name),
    })?;
    let stream = tokio_rustls::TlsConnector::from(req.tls)
        .connect(name, tcp)
        .await
        .map_err(|e| HttpError::Tls {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
    let http_err = |e: &dyn std::fmt::Display| HttpError::Http {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http_err(&e))?;
    let conn = tokio::spawn(conn);
    let host = req.server_name.to_string();
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json");
    if req.body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = req.bearer {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.unwrap_or_default())))
        .map_err(|e| http_err(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_err(&e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| http_err(&e))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}
