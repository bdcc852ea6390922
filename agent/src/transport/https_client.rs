//! One HTTPS request, for the agent → fleet authority and authority →
//! Kubernetes API clients (JSON bodies) and federation's bundle fetches.
//! One connection per request keeps it simple: calls are batched and
//! infrequent (rotation, bundle polls).

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
    /// `Content-Type` of `body` (JSON, or a Kubernetes patch type).
    pub content_type: &'static str,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// An answer: its status, `Location` (for redirects) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub location: Option<String>,
    pub body: Bytes,
}

/// Sends the request; returns the status and body of any answer.
pub async fn send(req: Request<'_>) -> Result<(u16, Bytes), HttpError> {
    let r = fetch(req, MAX_BODY).await?;
    Ok((r.status, r.body))
}

/// Sends the request; reads at most `max_body` bytes of the answer.
pub async fn fetch(req: Request<'_>, max_body: usize) -> Result<Response, HttpError> {
    let timeout = req.timeout;
    let addr = req.addr.to_string();
    tokio::time::timeout(timeout, send_inner(req, max_body))
        .await
        .map_err(|_| HttpError::Timeout { addr, timeout })?
}

type Connection = hyper::client::conn::http1::Connection<
    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Full<Bytes>,
>;

/// TCP, TLS and the HTTP/1.1 handshake; the request, built.
async fn connect(
    req: Request<'_>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        Connection,
        hyper::Request<Full<Bytes>>,
    ),
    HttpError,
> {
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
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http_err(&e))?;
    let host = req.server_name.to_string();
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json");
    if req.body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, req.content_type);
    }
    if let Some(token) = req.bearer {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.unwrap_or_default())))
        .map_err(|e| http_err(&e))?;
    Ok((sender, conn, request))
}

async fn send_inner(req: Request<'_>, max_body: usize) -> Result<Response, HttpError> {
    let addr = req.addr.to_string();
    let http_err = |e: &dyn std::fmt::Display| HttpError::Http {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let (mut sender, conn, request) = connect(req).await?;
    let conn = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_err(&e))?;
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| http_err(&e))?
        .to_bytes();
    conn.abort();
    Ok(Response {
        status,
        location,
        body,
    })
}

/// A response whose body is read as it arrives (a Kubernetes watch, the
/// authority's node stream). The connection lives as long as this value.
pub struct Streaming {
    pub status: u16,
    body: Option<hyper::body::Incoming>,
    conn: tokio::task::JoinHandle<()>,
    addr: String,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Streaming {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, HttpError>> {
        let body = self.body.as_mut()?;
        loop {
            match std::future::poll_fn(|cx| {
                hyper::body::Body::poll_frame(std::pin::Pin::new(&mut *body), cx)
            })
            .await
            {
                None => return None,
                Some(Err(e)) => {
                    return Some(Err(HttpError::Http {
                        addr: self.addr.clone(),
                        message: e.to_string(),
                    }));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
            }
        }
    }

    /// The whole (remaining) body, up to the usual limit: for error answers.
    pub async fn rest(mut self) -> Bytes {
        let Some(body) = self.body.take() else {
            return Bytes::new();
        };
        Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    }
}

/// Sends the request and returns once the answer's headers arrived (within
/// the request's timeout); the body is then read with [`Streaming::chunk`],
/// for as long as the server sends it.
pub async fn open(req: Request<'_>) -> Result<Streaming, HttpError> {
    let timeout = req.timeout;
    let addr = req.addr.to_string();
    tokio::time::timeout(timeout, open_inner(req))
        .await
        .map_err(|_| HttpError::Timeout { addr, timeout })?
}

async fn open_inner(req: Request<'_>) -> Result<Streaming, HttpError> {
    let addr = req.addr.to_string();
    let (mut sender, conn, request) = connect(req).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| HttpError::Http {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
    Ok(Streaming {
        status: response.status().as_u16(),
        body: Some(response.into_body()),
        conn,
        addr,
    })
}

/// Longest single JSON document accepted from a stream (a watch event holds
/// one object; the API server caps objects near 1.5 MiB).
const MAX_DOCUMENT: usize = 8 * 1024 * 1024;

/// A sequence of JSON documents read from a [`Streaming`] body, however the
/// server splits them into chunks and lines (the API server pretty-prints to
/// some clients: documents, not lines, are the unit).
pub struct JsonStream {
    inner: Streaming,
    buf: Vec<u8>,
}

impl JsonStream {
    pub fn new(inner: Streaming) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next document; `None` when the body ended cleanly between
    /// documents.
    pub async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Option<Result<T, HttpError>> {
        loop {
            let start = self
                .buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            if !self.buf.is_empty() {
                let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<T>();
                match it.next() {
                    Some(Ok(doc)) => {
                        let used = it.byte_offset();
                        self.buf.drain(..used);
                        return Some(Ok(doc));
                    }
                    Some(Err(e)) if !e.is_eof() => {
                        return Some(Err(HttpError::Http {
                            addr: self.inner.addr.clone(),
                            message: format!("malformed document in the stream: {e}"),
                        }));
                    }
                    _ => {}
                }
                if self.buf.len() > MAX_DOCUMENT {
                    return Some(Err(HttpError::Http {
                        addr: self.inner.addr.clone(),
                        message: format!("a document in the stream exceeds {MAX_DOCUMENT} bytes"),
                    }));
                }
            }
            match self.inner.chunk().await? {
                Ok(bytes) => self.buf.extend_from_slice(&bytes),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
