//! The Workload API's accepted connections: a `UnixStream` wrapper that
//! carries the caller's kernel credentials into every request, and caches the
//! attestation result for the life of the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_attestor::{AttestedPeer, PeerInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::OnceCell;

use crate::h2_authority::AuthorityRewriter;

/// Per-connection facts, available in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    pub peer: PeerInfo,
    /// Filled by the first RPC on this connection (attestation is lazy so the
    /// accept loop never waits on /proc or hashing).
    pub attested: Arc<OnceCell<Arc<AttestedPeer>>>,
}

/// An accepted Unix stream plus its [`PeerConnection`]. Inbound bytes pass
/// through an [`AuthorityRewriter`] so clients that send the socket path as
/// `:authority` are served (see `h2_authority`).
pub struct PeerStream {
    inner: UnixStream,
    /// Held for the connection's life: the socket's connection cap.
    _slot: tokio::sync::OwnedSemaphorePermit,
    info: PeerConnection,
    inbound: AuthorityRewriter,
    eof: bool,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerConnection;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let ready = this.inbound.ready();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.inbound.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    this.eof = true;
                    this.inbound.finish();
                }
                Poll::Ready(Ok(())) => this.inbound.feed(read.filled()),
                other => return other,
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections forever, reading peer credentials for each. Accept
/// errors (e.g. out of file descriptors) are logged and retried after a pause
/// rather than ending the server; a connection whose credentials cannot be
/// read is dropped. Beyond `max_connections` open connections, new ones are
/// closed at once (and `on_refused` is called), so a caller opening
/// thousands of connections cannot exhaust the agent's descriptors or memory.
pub fn incoming(
    listener: UnixListener,
    proc_root: tessera_attestor::ProcRoot,
    max_connections: usize,
    on_refused: impl Fn() + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = io::Result<PeerStream>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let on_refused = Arc::new(on_refused);
    futures_util::stream::unfold(listener, move |listener| {
        let slots = slots.clone();
        let on_refused = on_refused.clone();
        let proc_root = proc_root.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            on_refused();
                            continue;
                        };
                        match PeerInfo::from_socket(&stream) {
                            Ok(mut peer) => {
                                peer.record_exe(&proc_root);
                                let info = PeerConnection {
                                    peer,
                                    attested: Arc::new(OnceCell::new()),
                                };
                                return Some((
                                    Ok(PeerStream {
                                        inner: stream,
                                        _slot: slot,
                                        info,
                                        inbound: AuthorityRewriter::new(),
                                        eof: false,
                                    }),
                                    listener,
                                ));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "dropping connection without peer credentials")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; pausing");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    })
}
