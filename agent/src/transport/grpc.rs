//! gRPC over the agent's sockets: an accepted [`UnixConn`] wrapped so tonic
//! hands the caller's [`PeerConnection`] to every request, with inbound
//! bytes passing through the `:authority` shim.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::accept::{Accepted, Acceptor};
use super::authority_header::AuthorityRewriter;
use super::conn::UnixConn;
use super::idle::IdleStream;
use super::peer::PeerConnection;

/// An accepted Unix stream plus its [`PeerConnection`]. Inbound bytes pass
/// through an [`AuthorityRewriter`] so clients that send the socket path as
/// `:authority` are served (see `authority_header`).
pub struct PeerStream {
    inner: IdleStream<UnixConn>,
    /// Held for the connection's life: the socket's connection cap.
    _slot: super::accept::Slot,
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
        tokio::io::AsyncWrite::is_write_vectored(&self.inner)
    }
}

/// The connections of `acceptor` as tonic's incoming stream. A connection
/// whose credentials could not be read is dropped: no Workload API answer
/// can be given to a caller that cannot be attested. A connection with no
/// stream open for `idle_timeout` is closed (serve with
/// [`CountStreams`](super::idle::CountStreams) so streams are counted).
pub fn incoming(
    acceptor: Acceptor,
    idle_timeout: std::time::Duration,
) -> impl futures_util::Stream<Item = io::Result<PeerStream>> {
    futures_util::stream::unfold(acceptor, move |acceptor| async move {
        loop {
            let Accepted { stream, peer, slot } = acceptor.accept().await;
            let Some(info) = peer else {
                continue;
            };
            return Some((
                Ok(PeerStream {
                    inner: IdleStream::new(stream, info.activity.clone(), idle_timeout),
                    _slot: slot,
                    info,
                    inbound: AuthorityRewriter::new(),
                    eof: false,
                }),
                acceptor,
            ));
        }
    })
}
