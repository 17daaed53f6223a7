//! Accepting connections and serving HTTP/1 on them with hyper: a client that
//! stalls (headers or body not finished, or an idle connection) is cut off
//! after the read timeout, a client that half-closes its side after sending a
//! request still gets the answer, handlers learn the client's address, and
//! shutdown lets requests in flight finish. The timeouts cost no timer per
//! request: one watchdog timer per connection, and one per body read that
//! has to wait.
//!
//! It does not route, authorize or read bodies: that is the router's, the
//! `Access` extractor's and the handlers'.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tower::ServiceExt;

/// A request body that sent nothing for the read timeout: the error its
/// reader gets (answered 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: no data for {} s", .0.as_secs())]
pub struct BodyStalled(pub Duration);

/// A request body whose reader gets [`BodyStalled`] once the client has sent
/// nothing for `timeout`. The timer starts only when a read has to wait: a
/// body that is never read (a `GET`) or arrives at once costs no timer.
struct IdleTimeoutBody {
    inner: Incoming,
    timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
}

impl IdleTimeoutBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            idle: None,
        }
    }
}

impl HttpBody for IdleTimeoutBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // Data came: the next wait starts its own timer.
                this.idle = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(idle.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyStalled(timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting
/// and waits for the connections to finish their requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // A client may shut down its sending side once its request is out.
    http.half_close(true);
    let (stopping, stop) = tokio::sync::watch::channel(false);
    // Every connection task holds a receiver; the sender sees them all gone.
    let (tracker, alive) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let progress = Arc::new(Progress::default());
        let app = app.clone();
        let counted = progress.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(|b| Body::new(IdleTimeoutBody::new(b, read_timeout)));
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(remote));
            let in_flight = InFlight::start(&counted);
            let answer = app.clone().oneshot(request);
            async move {
                let _in_flight = in_flight;
                answer.await
            }
        });
        let io = Watched {
            inner: stream,
            progress: progress.clone(),
        };
        let connection = http.serve_connection(TokioIo::new(io), service);
        let mut stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut idle = std::pin::pin!(progress.idle(read_timeout));
            let mut stopping = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(%remote, error = %e, "connection ended");
                        }
                        break;
                    }
                    () = &mut idle => {
                        tracing::debug!(%remote, "closing a stalled or idle connection");
                        break;
                    }
                    _ = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(alive);
        });
    }
    let _ = stopping.send(true);
    drop(alive);
    drop(listener);
    tracker.closed().await;
}

/// What a connection has been doing, for its idle watchdog: requests
/// started and bytes written move `moved`; `in_flight` counts requests not
/// yet answered. Reads do not count, so a client that trickles a request's
/// headers without ever finishing them is still cut off.
#[derive(Default)]
struct Progress {
    moved: AtomicU64,
    in_flight: AtomicUsize,
}

impl Progress {
    /// Completes once a whole `period` passed with no request in flight and
    /// nothing moving: between one and two periods after the connection
    /// went idle or stalled. One timer a period, none per request.
    async fn idle(&self, period: Duration) {
        let mut seen = self.moved.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(period).await;
            let now = self.moved.load(Ordering::Relaxed);
            if now == seen && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = now;
        }
    }
}

/// A request being answered (dropped when its response is ready).
struct InFlight(Arc<Progress>);

impl InFlight {
    fn start(progress: &Arc<Progress>) -> Self {
        progress.moved.fetch_add(1, Ordering::Relaxed);
        progress.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(progress.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's socket, counting writes that made progress.
struct Watched {
    inner: TcpStream,
    progress: Arc<Progress>,
}

impl Watched {
    /// Counts a write that moved bytes as progress.
    fn count(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.progress.moved.fetch_add(1, Ordering::Relaxed);
        }
        written
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepting can fail for a single connection (reset before it was
/// accepted) or for want of file descriptors: log it, and wait a moment in
/// the second case so the loop does not spin.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
