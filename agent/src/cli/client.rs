//! Clients over Unix sockets, for the CLI: the Workload API (gRPC) and the
//! exchange and operator sockets (HTTP/1.1).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use tessera_workload_api::client::SpiffeWorkloadApiClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Resolves the socket: `--socket PATH` wins, else `SPIFFE_ENDPOINT_SOCKET`
/// (`unix:///abs/path` or `unix:/abs/path`).
pub fn socket_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let value = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .context("no --socket given and SPIFFE_ENDPOINT_SOCKET is not set")?;
    parse_endpoint(&value)
}

/// Parses a SPIFFE endpoint address. Only Unix sockets are supported.
pub fn parse_endpoint(value: &str) -> anyhow::Result<PathBuf> {
    let path = value
        .strip_prefix("unix://")
        .or_else(|| value.strip_prefix("unix:"))
        .with_context(|| {
            format!("SPIFFE_ENDPOINT_SOCKET {value:?} must be unix:///absolute/path")
        })?;
    if !path.starts_with('/') {
        bail!(
            "SPIFFE_ENDPOINT_SOCKET {value:?} must name an absolute path (unix:///path); a host part is not allowed"
        );
    }
    Ok(PathBuf::from(path))
}

pub async fn connect(path: &Path) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = channel(path, Endpoint::from_static("http://localhost"))
        .await
        .with_context(|| format!("cannot connect to the Workload API at {}", path.display()))?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// A gRPC channel to the Unix socket `path`, with `endpoint`'s settings
/// (its URI is required by tonic but unused: the connector dials the
/// socket). The one Unix-socket connector of the CLI, the bench and the
/// tests.
pub async fn channel(path: &Path, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// A gRPC channel over a stream that is already connected (a test hands
/// over a socket a process of another user or namespace connected). The
/// channel cannot reconnect: a second dial fails.
pub async fn channel_over(
    stream: tokio::net::UnixStream,
) -> Result<Channel, tonic::transport::Error> {
    let slot = std::sync::Arc::new(crate::sync::Mutex::new(Some(stream)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let taken = slot.lock().take();
            async move {
                taken
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the passed socket was already used"))
            }
        }))
        .await
}

/// `--socket` or `SPIFFE_ENDPOINT_SOCKET`, then [`connect`].
pub async fn connect_resolved(
    flag: Option<&Path>,
) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    connect(&socket_path(flag)?).await
}

/// One HTTP/1.1 request over a Unix socket; returns the status and body.
/// `form` is sent as `application/x-www-form-urlencoded`.
pub async fn http_unix(
    socket: &Path,
    method: http::Method,
    path: &str,
    form: Option<String>,
) -> anyhow::Result<(http::StatusCode, Vec<u8>)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    http_over(stream, method, path, form)
        .await
        .with_context(|| format!("request to {} failed", socket.display()))
}

/// One HTTP/1.1 request over a connected stream (see [`http_unix`]; a
/// TLS stream works too).
pub async fn http_over<S>(
    stream: S,
    method: http::Method,
    path: &str,
    form: Option<String>,
) -> anyhow::Result<(http::StatusCode, Vec<u8>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if form.is_some() {
        req = req.header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
    }
    let req = req.body(Full::new(prost::bytes::Bytes::from(
        form.unwrap_or_default(),
    )))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

/// Encodes form parameters.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            parse_endpoint("unix:///run/a.sock").unwrap(),
            Path::new("/run/a.sock")
        );
        assert_eq!(
            parse_endpoint("unix:/run/a.sock").unwrap(),
            Path::new("/run/a.sock")
        );
        assert!(parse_endpoint("/run/a.sock").is_err());
        assert!(parse_endpoint("unix://host/run/a.sock").is_err());
        assert!(parse_endpoint("tcp://127.0.0.1:1").is_err());
    }
}
