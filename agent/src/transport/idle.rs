//! Closing connections that do nothing.
//!
//! A connection holds two descriptors and a place under the caps for as long
//! as the caller keeps it; an idle one does so for nothing. A connection is
//! *active* while it has a request or stream open (a Workload API watch
//! stream that pushes once an hour is active all along); once it has had
//! none for the idle timeout, the agent closes it. Counting is per
//! connection ([`Activity`]): the gRPC server counts through a tower layer
//! ([`CountStreams`]), whose guard lives in the response body, so a stream
//! counts until it ends; HTTP counts each request until its response.
//! Closing happens in the connection's read path ([`IdleClose`]): the read
//! reports end of file, and the protocol stack shuts the connection down as
//! if the caller had gone.
//!
//! Clients reconnect on their next call, as gRPC channels and HTTP clients do
//! for any closed connection; the timeout is long enough that this is rare
//! for a caller that is actually working.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::peer::PeerConnection;

/// Open requests or streams on one connection, and when that last changed.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Milliseconds since `base` of the last begin or end.
    last_ms: AtomicU64,
    base: Instant,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            base: Instant::now(),
        })
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A request or stream begins; it ends when the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.touch();
        ActiveGuard(self.clone())
    }

    /// When the connection became idle, or `None` while something is open.
    fn idle_since(&self) -> Option<Instant> {
        (self.open.load(Ordering::Acquire) == 0)
            .then(|| self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One open request or stream.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decides, from the connection's read path, when to close it.
pub struct IdleClose {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleClose {
    pub fn new(activity: Arc<Activity>, timeout: Duration) -> Self {
        Self {
            activity,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// True once the connection has been idle for the timeout; otherwise
    /// arranges for the task to be woken when it next could be.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            let next = match self.activity.idle_since() {
                // Busy: look again a timeout from now.
                None => now + self.timeout,
                Some(since) if now >= since + self.timeout => return true,
                Some(since) => since + self.timeout,
            };
            self.sleep.as_mut().reset(next);
        }
    }
}

/// A connection that reads as closed once it has been idle for the timeout.
pub struct IdleStream<S> {
    inner: S,
    idle: IdleClose,
    closed: bool,
}

impl<S> IdleStream<S> {
    pub fn new(inner: S, activity: Arc<Activity>, timeout: Duration) -> Self {
        Self {
            inner,
            idle: IdleClose::new(activity, timeout),
            closed: false,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.closed || this.idle.poll_expired(cx) {
            // End of file: the protocol closes the connection as if the
            // caller had.
            this.closed = true;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A tower layer that counts every gRPC request as activity on its
/// connection until its response body (a stream's messages) is done.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountStreams;

impl<S> tower::Layer<S> for CountStreams {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<GuardedBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<PeerConnection>()
            .map(|c| c.activity.begin());
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted until it is dropped.
pub struct GuardedBody<B> {
    inner: B,
    _guard: Option<ActiveGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_a_quiet_timeout_with_nothing_open() {
        let activity = Activity::new();
        let mut idle = IdleClose::new(activity.clone(), Duration::from_secs(10));
        let expired = |idle: &mut IdleClose| {
            let waker = futures_util::task::noop_waker();
            idle.poll_expired(&mut Context::from_waker(&waker))
        };
        assert!(!expired(&mut idle));
        let stream = activity.begin();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!expired(&mut idle), "an open stream keeps it active");
        drop(stream);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!expired(&mut idle), "quiet for less than the timeout");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut idle));
    }
}
