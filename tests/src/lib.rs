//! Helpers for end-to-end tests: an in-process agent on a temporary socket,
//! configured from TOML text, and clients that are not ours (the `spiffe`
//! crate) to judge what it serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_agent::app::{self, RunningAgent};
use tessera_agent::config::Config;

pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub agent: Option<RunningAgent>,
}

/// The uid of this test process, which is what the agent attests.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

impl TestAgent {
    /// Starts an agent whose config is `body` appended to the required keys
    /// (trust domain example.org, socket and data dir in a temp dir).
    pub async fn start(body: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), body).await
    }

    /// Like [`Self::start`], in a directory prepared beforehand (policy files,
    /// or the state of a previous agent when testing restarts).
    pub async fn start_in(dir: tempfile::TempDir, body: &str) -> Self {
        let text = Self::config_text(dir.path(), body);
        let config = Config::parse(&text, "test.toml").expect("test config is valid");
        let agent = app::start(config, Arc::new(tessera_agent::clock::SystemClock))
            .await
            .expect("agent starts");
        Self {
            dir,
            agent: Some(agent),
        }
    }

    pub fn config_text(dir: &Path, body: &str) -> String {
        format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}/sock/agent.sock\"\ndata_dir = \"{}/data\"\n{body}",
            dir.display(),
            dir.display()
        )
    }

    /// An entry giving this process `spiffe://example.org/<path>`.
    pub fn entry_for_me(path: &str, hint: &str) -> String {
        format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/{path}\"\nselectors = [\"unix:uid:{}\"]\nhint = \"{hint}\"\n",
            my_uid()
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("sock/agent.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn running(&self) -> &RunningAgent {
        self.agent.as_ref().unwrap()
    }

    pub async fn spiffe_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .expect("spiffe client connects")
    }

    /// This process's JWT-SVID for `audience`, fetched with the `spiffe`
    /// crate (the subject token of an exchange when `audience` is the issuer).
    pub async fn jwt_svid(&self, audience: &str) -> String {
        self.spiffe_client()
            .await
            .fetch_jwt_svid([audience], None)
            .await
            .expect("a JWT-SVID")
            .token()
            .to_string()
    }

    pub async fn stop(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop().await.unwrap();
        }
    }
}

/// A raw tonic channel to the agent socket (for requests the `spiffe` crate
/// will not send, such as ones without the security header).
pub async fn raw_channel(socket: &Path) -> tonic::transport::Channel {
    tessera_agent::cli::client::channel(
        socket,
        tonic::transport::Endpoint::from_static("http://localhost"),
    )
    .await
    .unwrap()
}

/// The CA certificates (DER) an X.509 context's bundle set holds for
/// `example.org`, the test trust domain.
pub fn example_org_cas(ctx: &spiffe::X509Context) -> Vec<Vec<u8>> {
    let td = spiffe::TrustDomain::new("example.org").expect("valid trust domain");
    ctx.bundle_set()
        .get(&td)
        .expect("a bundle for example.org")
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// `program` as uid/gid 65534 with no supplementary groups: an
/// unprivileged workload of another user (add its arguments).
pub fn as_nobody(program: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    cmd
}

/// `/usr/bin/python3 -c script` as uid/gid 65534 (see [`as_nobody`]).
pub fn python_as_nobody(script: &str) -> std::process::Command {
    let mut cmd = as_nobody("/usr/bin/python3");
    cmd.args(["-c", script]);
    cmd
}

/// Connects to the socket named first, passes the connection back over
/// SCM_RIGHTS on the second, then sleeps: the connection's kernel
/// credentials keep naming a live process while the test speaks through it.
const CONNECT_AND_PASS: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sys.argv[2])
socket.send_fds(c, [str(os.getpid()).encode()], [s.fileno()])
time.sleep(30)
"#;

/// A connection another process opened, and that process (killed on drop).
pub struct Connected {
    pub child: std::process::Child,
    pub stream: std::os::unix::net::UnixStream,
    /// The process's PID as it sees itself (its own PID namespace).
    pub inner_pid: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (ending in a Python interpreter: a plain one, one as
/// another user, one in new namespaces) to connect to `socket`, and
/// receives its connection. `dir` holds the rendezvous socket.
pub fn connect_from(mut cmd: std::process::Command, socket: &Path, dir: &Path) -> Connected {
    use std::os::unix::fs::PermissionsExt;
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix).unwrap();
    let back_path = dir.join(format!("back-{}.sock", u64::from_le_bytes(suffix)));
    let back = std::os::unix::net::UnixListener::bind(&back_path).unwrap();
    std::fs::set_permissions(&back_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let child = cmd
        .args(["-c", CONNECT_AND_PASS])
        .arg(socket)
        .arg(&back_path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (control, _) = back.accept().unwrap();
    let (stream, sent) = receive_socket(&control);
    let _ = std::fs::remove_file(&back_path);
    Connected {
        child,
        stream,
        inner_pid: String::from_utf8_lossy(&sent).into_owned(),
    }
}

/// Fails the test at once, naming it, when it is not run as root (it
/// mounts, enters namespaces or runs processes as other users). Never a
/// silent skip: CI runs the suite as root.
pub fn require_root(test: &str, why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} NEEDS ROOT ({why}); run the tests as root, as CI does"
    );
}

/// Receives the one socket a helper process passes over `control` with
/// SCM_RIGHTS, and the bytes it sent with it (at most 16). Tests use it to
/// talk through a connection another user, namespace or program opened.
pub fn receive_socket(
    control: &std::os::unix::net::UnixStream,
) -> (std::os::unix::net::UnixStream, Vec<u8>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(control),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    let n = msg.bytes;
    let fd = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .expect("helper sent a socket");
    // SAFETY: the kernel just installed `fd` in this process through
    // SCM_RIGHTS; nothing else owns it, so taking ownership once is sound.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    (owned.into(), buf[..n].to_vec())
}

/// GET `path` over TLS to `addr`, trusting `roots`, with SNI `localhost`;
/// returns the body as JSON and the server's leaf certificate.
pub async fn https_get(
    addr: &str,
    roots: &[Vec<u8>],
    path: &str,
) -> anyhow::Result<(serde_json::Value, Vec<u8>)> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store.add(rustls::pki_types::CertificateDer::from(der.clone()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    Ok((serde_json::from_slice(&body)?, leaf))
}

pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod fleet;
pub mod kube;
pub mod postgres;
pub mod sds;
