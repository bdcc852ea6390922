//! A minimal HTTP/1.1 client for the two calls the guard makes: `GET` the JWKS
//! and `POST` an introspection form. One connection per request: the exchange
//! endpoint is a local Unix socket, and both calls are cached.

use std::path::PathBuf;
use std::time::Duration;

use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Largest response body the guard reads from the JWKS or introspection endpoint.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Where an HTTP endpoint lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// HTTP/1.1 over a Unix socket; `path` is the request path, e.g. `/jwks`.
    Unix { socket: PathBuf, path: String },
    /// Plain `http://host:port/path`.
    Http { uri: Uri },
}

impl Endpoint {
    /// An endpoint on a Unix socket.
    pub fn unix(socket: impl Into<PathBuf>, path: impl Into<String>) -> Self {
        Endpoint::Unix {
            socket: socket.into(),
            path: path.into(),
        }
    }

    /// An `http://` URL. `https://` is not supported: put the guard next to
    /// the issuer's Unix socket, or behind a local proxy.
    pub fn http(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{url:?}: https is not supported; use the Unix socket or an http:// URL on loopback"
                ));
            }
            _ => return Err(format!("{url:?}: not an http:// URL")),
        }
        if uri.authority().is_none() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Endpoint::Http { uri })
    }

    /// The same endpoint with another path (Unix) — used to derive `/introspect`
    /// from the exchange socket.
    pub(crate) fn describe(&self) -> String {
        match self {
            Endpoint::Unix { socket, path } => format!("unix:{}{}", socket.display(), path),
            Endpoint::Http { uri } => uri.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("connect {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}: {1}")]
    Http(String, String),
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("{0}: response status {1}")]
    Status(String, StatusCode),
}

/// Sends one request and returns the body of a 200 response.
pub(crate) async fn call(
    endpoint: &Endpoint,
    method: Method,
    form: Option<String>,
    timeout: Duration,
) -> Result<Bytes, TransportError> {
    let what = endpoint.describe();
    match tokio::time::timeout(timeout, call_inner(endpoint, method, form, &what)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout(what)),
    }
}

async fn call_inner(
    endpoint: &Endpoint,
    method: Method,
    form: Option<String>,
    what: &str,
) -> Result<Bytes, TransportError> {
    let (request_uri, host) = match endpoint {
        Endpoint::Unix { path, .. } => (path.clone(), "localhost".to_string()),
        Endpoint::Http { uri } => (
            uri.path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            uri.authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default(),
        ),
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(request_uri)
        .header(header::HOST, host)
        .header(header::ACCEPT, "application/json");
    let body = match form {
        Some(f) => {
            builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Full::new(Bytes::from(f))
        }
        None => Full::new(Bytes::new()),
    };
    let request = builder
        .body(body)
        .map_err(|e| TransportError::Http(what.into(), e.to_string()))?;
    match endpoint {
        Endpoint::Unix { socket, .. } => {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|e| TransportError::Connect(what.into(), e))?;
            send(stream, request, what).await
        }
        Endpoint::Http { uri } => {
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(80);
            let stream = TcpStream::connect((host, port))
                .await
                .map_err(|e| TransportError::Connect(what.into(), e))?;
            send(stream, request, what).await
        }
    }
}

async fn send<T>(io: T, request: Request<Full<Bytes>>, what: &str) -> Result<Bytes, TransportError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let http_err = |e: hyper::Error| TransportError::Http(what.into(), e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await.map_err(http_err);
    let result = match response {
        Ok(response) => {
            let status = response.status();
            if status != StatusCode::OK {
                Err(TransportError::Status(what.into(), status))
            } else {
                Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .map_err(|e| TransportError::Http(what.into(), e.to_string()))
            }
        }
        Err(e) => Err(e),
    };
    conn.abort();
    result
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub(crate) fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a.b-c_d"), "a.b-c_d");
        assert_eq!(form_encode("a b+/="), "a+b%2B%2F%3D");
    }

    #[test]
    fn http_urls_only() {
        assert!(Endpoint::http("http://127.0.0.1:8080/jwks").is_ok());
        assert!(Endpoint::http("https://issuer.example/jwks").is_err());
        assert!(Endpoint::http("ftp://x/y").is_err());
        assert!(Endpoint::http("/jwks").is_err());
    }
}
