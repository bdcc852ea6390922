//! A fake kubelet for tests: HTTPS on 127.0.0.1 with an openssl(1)-made
//! certificate, serving real-shaped PodList JSON, checking bearer tokens and
//! counting requests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// A file from the attestor's fixtures (`attestor/tests/fixtures`).
pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../attestor/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl(1) is required for this test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<ca_name>`, `ca.key`) and a kubelet serving certificate for
/// 127.0.0.1 (`server.pem`, `server.key`) in `dir`.
pub fn make_pki(dir: &Path, ca_name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        ca_name,
        "-subj",
        "/CN=kubelet-ca",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=node-a",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            ca_name,
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[derive(Default)]
pub struct KubeletState {
    /// Served body per request number (the last one repeats).
    pub bodies: Vec<String>,
    pub requests: usize,
    pub tokens_seen: Vec<String>,
    pub token_file: Option<PathBuf>,
}

pub struct FakeKubelet {
    pub port: u16,
    pub state: Arc<Mutex<KubeletState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves HTTPS on 127.0.0.1 with `server.pem`/`server.key` from `dir`;
/// `handle(method, uri, authorization header, body)` answers each request
/// with a status and a body. Returns the port and the accept task.
pub async fn serve_https<F>(dir: &Path, handle: F) -> (u16, tokio::task::JoinHandle<()>)
where
    F: Fn(hyper::Method, hyper::Uri, String, Bytes) -> (u16, String) + Send + Sync + 'static,
{
    serve_https_on(dir, None, handle).await
}

async fn serve_https_on<F>(
    dir: &Path,
    listener: Option<tokio::net::TcpListener>,
    handle: F,
) -> (u16, tokio::task::JoinHandle<()>)
where
    F: Fn(hyper::Method, hyper::Uri, String, Bytes) -> (u16, String) + Send + Sync + 'static,
{
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let port = listener.local_addr().unwrap().port();
    let handle = Arc::new(handle);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, handle) = (acceptor.clone(), handle.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let handle = handle.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let (parts, body) = req.into_parts();
                            let body = body_bytes(body).await;
                            let (status, text) = handle(parts.method, parts.uri, auth, body);
                            Ok::<_, std::convert::Infallible>(full(status, text))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, task)
}

pub async fn fake_kubelet(
    dir: &Path,
    listener: Option<tokio::net::TcpListener>,
    state: KubeletState,
) -> FakeKubelet {
    let state = Arc::new(Mutex::new(state));
    let shared = state.clone();
    let (port, task) = serve_https_on(dir, listener, move |_, uri, auth, _| {
        let mut st = shared.lock().unwrap();
        st.requests += 1;
        st.tokens_seen.push(auth.clone());
        let expected = st
            .token_file
            .as_ref()
            .map(|p| format!("Bearer {}", std::fs::read_to_string(p).unwrap().trim()));
        if uri.path() != "/pods" {
            (404, String::new())
        } else if expected.is_some_and(|e| e != auth) {
            (401, "Unauthorized".to_string())
        } else {
            let i = (st.requests - 1).min(st.bodies.len() - 1);
            (200, st.bodies[i].clone())
        }
    })
    .await;
    FakeKubelet { port, state, task }
}

/// The common setup: PKI in `dir` and a kubelet serving the PodList fixture.
pub async fn podlist_kubelet(dir: &Path) -> FakeKubelet {
    make_pki(dir, "ca.pem");
    fake_kubelet(
        dir,
        None,
        KubeletState {
            bodies: vec![fixture("podlist.json")],
            ..Default::default()
        },
    )
    .await
}

/// The request body, whole (empty if it could not be read).
async fn body_bytes(body: hyper::body::Incoming) -> Bytes {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

/// A JSON response with `status`.
fn full(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}
