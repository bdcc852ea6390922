//! An accepted Unix stream that the runtime watches for readability only.
//!
//! Tokio registers a socket for both read and write readiness, edge
//! triggered. On a Unix stream socket the kernel signals "writable" to the
//! writer each time the reader takes data off it (every sent buffer freed
//! wakes the writer's waiters, whether or not it ever found the socket
//! full). So a server that answers a request is woken a second time when the
//! client reads the answer: one more return from `epoll_wait`, one more
//! context switch and one more park of a runtime thread per call, for
//! nothing. Measured on `bench jwt-validate` with one client: two voluntary
//! context switches of the serving thread per call, one of them this.
//!
//! The agent's answers are small beside the socket's send buffer, so a write
//! almost never finds it full. [`UnixConn`] registers for readability only
//! and, when a write would block, registers a duplicate of the descriptor
//! for writability until a write goes through again. [`Listener`] accepts
//! connections without tokio's registration, so each is registered once.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The most one read takes: requests are small, and every byte handed to a
/// read is zeroed first.
const MAX_READ: usize = 64 * 1024;

/// An accepted connection (see the module docs).
pub struct UnixConn {
    /// Registered for readability (and errors and hang-ups, which epoll
    /// always reports).
    socket: AsyncFd<UnixStream>,
    /// A duplicate of `socket`'s descriptor registered for writability,
    /// only while a write is waiting for room.
    room: Option<AsyncFd<UnixStream>>,
}

/// Registers `socket` with the runtime for `interest`.
///
/// Tokio deprecated the safe constructor because a type's `as_raw_fd` need
/// not keep naming one open descriptor; its replacement is `unsafe`, which
/// the agent forbids. A `std` `UnixStream` owns its descriptor and closes it
/// only when dropped, which the `AsyncFd` owning it does after deregistering:
/// the condition the replacement asks its caller to promise holds here.
#[allow(deprecated)]
fn register<T: AsRawFd>(socket: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(socket, interest)
}

/// A listening socket whose connections come out unregistered, for
/// [`UnixConn::new`].
pub struct Listener(AsyncFd<UnixListener>);

impl Listener {
    /// Takes over a bound socket from tokio's registration.
    pub fn new(listener: tokio::net::UnixListener) -> io::Result<Self> {
        // Left non-blocking by `into_std`.
        Ok(Self(register(listener.into_std()?, Interest::READABLE)?))
    }

    /// The next connection, non-blocking and not yet registered.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|listener| listener.get_ref().accept()) {
                Ok(accepted) => {
                    let (stream, _) = accepted?;
                    stream.set_nonblocking(true)?;
                    return Ok(stream);
                }
                // Nothing waiting after all: readiness cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl UnixConn {
    /// Registers an accepted, non-blocking stream for readability.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        Ok(Self {
            socket: register(stream, Interest::READABLE)?,
            room: None,
        })
    }

    /// Runs `write` until it does not block, waiting for room in between.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.socket.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => {
                    // Room again: stop hearing about every read the peer makes.
                    self.room = None;
                    return Poll::Ready(done);
                }
            }
            let room = match &mut self.room {
                Some(room) => room,
                // Registered while the buffer is full: epoll reports the
                // next freeing, or the room already there when it is added.
                None => self.room.insert(register(
                    self.socket.get_ref().try_clone()?,
                    Interest::WRITABLE,
                )?),
            };
            let mut guard = ready!(room.poll_write_ready(cx))?;
            guard.clear_ready();
        }
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.socket.poll_read_ready(cx))?;
            // Safe code reads only into initialised memory; a bounded read
            // keeps the zeroing of a caller's large spare capacity small.
            let unfilled = buf.initialize_unfilled_to(buf.remaining().min(MAX_READ));
            match guard.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (UnixConn, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (UnixConn::new(a.into_std().unwrap()).unwrap(), b)
    }

    #[tokio::test]
    async fn reads_writes_and_shuts_down() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
        conn.write_all(b"answer").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut answer = Vec::new();
        peer.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        drop(peer);
        assert_eq!(conn.read(&mut got).await.unwrap(), 0, "end of file");
    }

    /// A write larger than the socket can hold waits for the peer to read
    /// and then completes: the writability registration comes and goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_fills_the_socket_waits_for_room() {
        let (mut conn, mut peer) = pair().await;
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            conn.write_all(&big).await.unwrap();
            assert!(
                conn.room.is_none(),
                "the writability registration is dropped"
            );
            conn
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while got.len() < expected.len() {
            // A slow reader, so the writer finds the socket full.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let n = peer.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == expected, "every byte, in order");
        writer.await.unwrap();
    }
}
