//! Accepting connections and serving HTTP/1 on them with hyper: a client that
//! stalls (headers or body not finished, or an idle connection) is cut off
//! after the read timeout, a client that half-closes its side after sending a
//! request still gets the answer, handlers learn the client's address, a
//! request body that a route refused without reading it (401, 403, 404…) is
//! read to its end after the answer so the connection stays usable, and
//! shutdown lets requests in flight finish. The timeouts cost no timer per
//! request: one watchdog timer per connection, and one per body read that
//! has to wait. A connection task's wakes of itself during its own poll are
//! answered by polling again at once ([`SelfWakes`]), not by the scheduler.
//! A request hyper can't parse gets a problem document, written by the
//! socket's writer in place of hyper's bare answer ([`rewritten_parse_error`]).
//!
//! It does not route, authorize or read bodies for their content: that is
//! the router's, the `Access` extractor's and the handlers'.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{CONNECTION, EXPECT};
use axum::http::{HeaderValue, Version};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How much of a request body that a route left unread is still read and
/// thrown away after the answer ([`Unread`]); beyond it the connection is
/// closed.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;

/// How long reading an unread body may hold its answer back ([`Unread`]).
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// A request body that sent nothing for the read timeout: the error its
/// reader gets (answered 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: no data for {} s", .0.as_secs())]
pub struct BodyStalled(pub Duration);

/// A request body whose reader gets [`BodyStalled`] once the client has sent
/// nothing for `timeout`. The timer starts only when a read has to wait: a
/// body that is never read (a `GET`) or arrives at once costs no timer.
///
/// Dropped before its end, it leaves itself in `unread` (when given): see
/// [`Unread`].
struct IdleTimeoutBody {
    /// `None` once handed to `unread`.
    inner: Option<Incoming>,
    timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
    unread: Option<Unread>,
}

impl IdleTimeoutBody {
    fn new(inner: Incoming, timeout: Duration, unread: Option<Unread>) -> Self {
        Self {
            inner: Some(inner),
            timeout,
            idle: None,
            unread,
        }
    }
}

impl Drop for IdleTimeoutBody {
    fn drop(&mut self) {
        if let Some(unread) = self.unread.take()
            && let Some(inner) = self.inner.take()
            && !inner.is_end_stream()
        {
            let rest = IdleTimeoutBody::new(inner, self.timeout, None);
            *unread.rest.lock().unwrap_or_else(PoisonError::into_inner) = Some(rest);
        }
    }
}

/// What a route left unread of a request body. Hyper can't reuse a
/// connection whose request body was not read, and closes it after the
/// answer without saying so (no `Connection: close`): a client's next
/// request on it then fails, and after a `PATCH` it can't tell whether its
/// write was applied (found by a review). So the rest is read and thrown
/// away after the answer is made, up to [`DRAIN_MAX`] bytes and within
/// [`DRAIN_TIME`] (a client trickling its body holds its answer no
/// longer); beyond them, and whenever the body is not read for a request
/// that expects `100-continue` (its client sends no body unless asked) or
/// closes the connection anyway, the answer says `Connection: close`. A
/// body that failed (stalled, malformed) is not read again: its error
/// was the answer.
///
/// A body refused for its size (413) is read the same way.
#[derive(Clone)]
struct Unread {
    rest: Arc<Mutex<Option<IdleTimeoutBody>>>,
    /// Whether the rest is read, or the connection closed at once.
    drain: bool,
}

impl Unread {
    fn new(drain: bool) -> Self {
        Self {
            rest: Arc::default(),
            drain,
        }
    }

    /// Reads what is left; whether the connection can serve another
    /// request (nothing was left, or it was read within the bounds).
    async fn finish(self) -> bool {
        use http_body_util::BodyExt;
        let rest = self
            .rest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut body) = rest else {
            return true;
        };
        if !self.drain || body.size_hint().lower() > DRAIN_MAX {
            return false;
        }
        let read_to_end = async {
            let mut seen: u64 = 0;
            loop {
                match body.frame().await {
                    None => return true,
                    Some(Err(_)) => return false,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            seen += data.len() as u64;
                            if seen > DRAIN_MAX {
                                return false;
                            }
                        }
                    }
                }
            }
        };
        tokio::time::timeout(DRAIN_TIME, read_to_end)
            .await
            .unwrap_or(false)
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                // Nothing more to read, nor to hand to `Unread`.
                this.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
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
                this.inner = None;
                Poll::Ready(Some(Err(Box::new(BodyStalled(timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting
/// and waits for the connections to finish their requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: super::App,
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
            // A request without a body (a GET) needs no watch on it.
            let unread = (!request.body().is_end_stream()).then(|| {
                let headers = request.headers();
                let closes = request.version() != Version::HTTP_11
                    || headers.get_all(CONNECTION).iter().any(|v| {
                        v.to_str().is_ok_and(|v| {
                            v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
                        })
                    });
                Unread::new(!closes && !headers.contains_key(EXPECT))
            });
            let mut request =
                request.map(|b| Body::new(IdleTimeoutBody::new(b, read_timeout, unread.clone())));
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(remote));
            let in_flight = InFlight::start(&counted);
            let answer = app.clone().answer(request);
            async move {
                let _in_flight = in_flight;
                let mut response = answer.await;
                if let Some(unread) = unread
                    && !unread.finish().await
                {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let io = Watched {
            inner: stream,
            progress: progress.clone(),
            replaced: None,
            short: false,
        };
        let connection = http.serve_connection(TokioIo::new(io), service);
        let mut stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(SelfWakes::new(async move {
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
        }));
    }
    let _ = stopping.send(true);
    drop(alive);
    drop(listener);
    tracker.closed().await;
}

/// How many times in a row [`SelfWakes`] polls again at once before it
/// leaves a self-wake to the scheduler (a yield, fair to other tasks).
const SELF_WAKE_REPOLLS: u32 = 3;

/// How long [`SelfWakes`] keeps polling again at once: a poll that has run
/// this long yields as its inner future asked (hyper after 16 requests in
/// one poll, wasmtime after a slice of fuel), to be fair to other tasks.
const SELF_WAKE_WINDOW: std::time::Duration = std::time::Duration::from_micros(100);

/// A connection task whose wakes during its own poll are answered by
/// polling again at once, instead of by tokio.
///
/// hyper wakes the connection task from inside its own poll whenever a
/// handler reads a request body (its body channel wakes the sender, the same
/// task, as the handler takes the data). Tokio treats a task woken while it
/// runs as a yield: to the back of the run queue, and an idle worker thread
/// woken to steal it. On this VM that was a futex wake and two context
/// switches of the other thread per `PUT` or `PATCH` (at one connection a
/// quarter of the server's CPU per request). A wake that comes while the
/// inner future is being polled (from the task itself, or from another
/// thread at that moment) is answered the same way, by polling again; one
/// that comes between polls goes to tokio's waker as usual. At most
/// [`SELF_WAKE_REPOLLS`] times and within [`SELF_WAKE_WINDOW`], then the
/// wake goes to tokio.
///
/// Under `tokio::spawn` only: a panic in the inner future leaves the state
/// at "polling" (later wakes would be absorbed), which does not matter once
/// tokio has dropped the panicked task.
struct SelfWakes<F> {
    inner: Pin<Box<F>>,
    state: Arc<WakeState>,
    waker: std::task::Waker,
    /// [`SELF_WAKE_WINDOW`] (tests set their own).
    window: std::time::Duration,
}

/// [`WakeState::phase`]: not being polled; a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled; a wake becomes [`WOKEN`].
const POLLING: u8 = 1;
/// Woken while being polled: the poll polls again.
const WOKEN: u8 = 2;

#[derive(Default)]
struct WakeState {
    /// The task's own waker, for wakes between polls.
    task: futures_util::task::AtomicWaker,
    /// [`IDLE`], [`POLLING`] or [`WOKEN`]: every decision is made on this
    /// one variable.
    phase: std::sync::atomic::AtomicU8,
}

impl std::task::Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .phase
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // The poll in progress sees it when its inner poll returns.
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl<F: Future<Output = ()>> SelfWakes<F> {
    fn new(inner: F) -> Self {
        Self::with_window(inner, SELF_WAKE_WINDOW)
    }

    fn with_window(inner: F, window: std::time::Duration) -> Self {
        let state = Arc::new(WakeState::default());
        Self {
            inner: Box::pin(inner),
            waker: std::task::Waker::from(state.clone()),
            state,
            window,
        }
    }
}

impl<F: Future<Output = ()>> Future for SelfWakes<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.state.task.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        let started = std::time::Instant::now();
        let mut repolls = 0;
        loop {
            this.state.phase.store(POLLING, Ordering::Release);
            let polled = this.inner.as_mut().poll(&mut inner_cx);
            let phase = this.state.phase.swap(IDLE, Ordering::AcqRel);
            if polled.is_ready() {
                return Poll::Ready(());
            }
            if phase != WOKEN {
                return Poll::Pending;
            }
            if repolls == SELF_WAKE_REPOLLS || started.elapsed() >= this.window {
                // Let the scheduler run others first.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            repolls += 1;
        }
    }
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

/// The connection's socket, counting writes that made progress, and
/// answering a request hyper could not parse with a problem document
/// ([`rewritten_parse_error`]).
struct Watched {
    inner: TcpStream,
    progress: Arc<Progress>,
    /// The problem document written in place of hyper's bare answer, and
    /// how much of it has gone out.
    replaced: Option<(Vec<u8>, usize)>,
    /// The last write took less than it was given: the next one goes on
    /// with the same answer, so it is never a head of hyper's own.
    short: bool,
}

impl Watched {
    /// Counts a write that moved bytes as progress, and notes whether it
    /// took all of the `offered` bytes.
    fn count(
        &mut self,
        written: Poll<std::io::Result<usize>>,
        offered: usize,
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.progress.moved.fetch_add(1, Ordering::Relaxed);
            }
            self.short = n < offered;
        }
        written
    }

    /// Writes what is left of a replaced answer; ready once it is all out.
    fn poll_replaced(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((answer, at)) = self.replaced.as_mut() {
            if *at >= answer.len() {
                self.replaced = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            self.progress.moved.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }

    /// If `head` is hyper's bare answer to a request it could not parse,
    /// takes it whole and writes the problem document in its place (what
    /// does not go out at once goes on the flush hyper does next).
    fn replace(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
    ) -> Option<Poll<std::io::Result<usize>>> {
        if self.short {
            return None;
        }
        let answer = rewritten_parse_error(head)?;
        self.replaced = Some((answer, 0));
        Some(match self.poll_replaced(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(head.len())),
        })
    }
}

/// The problem document for a request hyper could not parse, given what
/// hyper wrote for it; `None` for any other write.
///
/// hyper answers a request line or header it can't parse with `400`, a URL
/// over 65,534 bytes with `414`, and a head over its limits (100 header
/// fields, about 400 KiB, a far longer URL included) with `431`: a bare
/// head (`connection: close` on HTTP/1.1, `content-length: 0`, `date`),
/// written alone, before the connection closes. It has no hook for that
/// answer, so the socket's writer knows that exact head and writes the JSON
/// error in its place, with the same version, status and date, and
/// `connection: close`. No answer of the routes can match: every one
/// carries `vary` or other headers of the CORS layer, and more besides;
/// anything else is written as it is.
fn rewritten_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    use axum::http::StatusCode;
    // The first check every write makes: the routes' answers fail it at
    // once (a 2xx or 3xx, or longer than such a head).
    if head.len() > 160 || head.get(8..10) != Some(b" 4") {
        return None;
    }
    let version = match &head[..8] {
        b"HTTP/1.1" => "HTTP/1.1",
        b"HTTP/1.0" => "HTTP/1.0",
        _ => return None,
    };
    let status = StatusCode::from_bytes(head.get(9..12)?).ok()?;
    let (kind, detail) = match status {
        StatusCode::BAD_REQUEST => (
            "bad-request",
            "the request could not be read as HTTP (its request line or a header is malformed), so nothing was done: percent-encode the URL's path and query (a space, quotes, <, >, \\, ^, `, {, |, }, control characters and bytes that are not ASCII as %XX; curl -G --data-urlencode 'name=value' does it for a query), and send well-formed headers (no control characters; one valid Content-Length, or Transfer-Encoding: chunked)",
        ),
        StatusCode::URI_TOO_LONG => (
            "uri-too-long",
            "the URL is longer than 65,534 bytes, so nothing was done: send long data as the request's body (POST or PUT) instead of in the URL",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers-too-large",
            "the request's head is too large (at most 100 header fields, and about 400 KiB for the request line and headers together), so nothing was done: send data as the request's body instead of in the URL or headers",
        ),
        _ => return None,
    };
    let rest = head[12..]
        .strip_prefix(b" ")?
        .strip_prefix(status.canonical_reason()?.as_bytes())?
        .strip_prefix(b"\r\n")?;
    // HTTP/1.0 closes by default: hyper says so only on HTTP/1.1.
    let rest = match version {
        "HTTP/1.1" => rest.strip_prefix(b"connection: close\r\n")?,
        _ => rest,
    };
    let date = rest
        .strip_prefix(b"content-length: 0\r\ndate: ")?
        .strip_suffix(b"\r\n\r\n")?;
    if date.len() != 29 || date.contains(&b'\r') {
        return None;
    }
    let date = std::str::from_utf8(date).ok()?;
    let body = super::error::problem_body(status, kind, detail);
    // Readable by a page elsewhere, as the routes' errors are (a fetch of a
    // URL over 64 KiB saw only "Failed to fetch"; found by a review).
    Some(
        format!(
            "{version} {status}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\naccess-control-allow-origin: *\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replaced(cx))?;
        if let Some(taken) = this.replace(cx, buf) {
            return taken;
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count(written, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replaced(cx))?;
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(taken) = this.replace(cx, only)
        {
            return taken;
        }
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        let offered = bufs.iter().map(|b| b.len()).sum();
        this.count(written, offered)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replaced(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replaced(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use super::{SELF_WAKE_REPOLLS, SelfWakes};

    /// A window no test outlasts, so that the bound alone decides.
    const LONG: std::time::Duration = std::time::Duration::from_secs(600);

    /// Counts the wakes the scheduler would get.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Where a test future's wake during its poll comes from.
    #[derive(Clone, Copy)]
    enum Waking {
        /// The future itself (as hyper's body channel does).
        Itself,
        /// Another thread, joined before the poll returns.
        AnotherThread,
    }

    /// Pending `times` times, woken during each of those polls, then ready.
    struct WokenDuringPoll {
        times: u32,
        waking: Waking,
        polls: Arc<AtomicUsize>,
    }

    impl Future for WokenDuringPoll {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.times == 0 {
                return Poll::Ready(());
            }
            self.times -= 1;
            match self.waking {
                Waking::Itself => cx.waker().wake_by_ref(),
                Waking::AnotherThread => {
                    let waker = cx.waker().clone();
                    std::thread::spawn(move || waker.wake())
                        .join()
                        .expect("waking thread");
                }
            }
            Poll::Pending
        }
    }

    /// One poll of [`SelfWakes`] over `WokenDuringPoll`, as tokio would
    /// make it: whether it completed, how often the inner future was
    /// polled, and how many wakes reached the task.
    fn poll_once(times: u32, waking: Waking) -> (bool, usize, usize) {
        let task = Arc::new(Counted::default());
        let waker = Waker::from(task.clone());
        let polls = Arc::new(AtomicUsize::new(0));
        let inner = WokenDuringPoll {
            times,
            waking,
            polls: polls.clone(),
        };
        let mut f = Box::pin(SelfWakes::with_window(inner, LONG));
        let ready = f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready();
        (
            ready,
            polls.load(Ordering::SeqCst),
            task.0.load(Ordering::SeqCst),
        )
    }

    /// Inner polls of one poll that reaches the bound.
    fn bound() -> usize {
        usize::try_from(SELF_WAKE_REPOLLS).expect("small") + 1
    }

    #[test]
    fn a_wake_during_its_own_poll_is_a_poll_again_not_a_wake_of_the_task() {
        assert_eq!(poll_once(2, Waking::Itself), (true, 3, 0));
    }

    #[test]
    fn a_task_that_keeps_waking_itself_yields_to_the_scheduler() {
        // One wake reaches the task: a yield.
        assert_eq!(poll_once(100, Waking::Itself), (false, bound(), 1));
    }

    #[test]
    fn a_wake_from_another_thread_during_the_poll_is_a_poll_again() {
        assert_eq!(poll_once(1, Waking::AnotherThread), (true, 2, 0));
        // Past the bound: the last such wake reaches the task, once.
        assert_eq!(poll_once(100, Waking::AnotherThread), (false, bound(), 1));
    }

    #[test]
    fn a_poll_that_ran_past_the_window_yields_as_its_future_asked() {
        /// Works for 2 ms, wakes itself, and is pending.
        struct Busy(Arc<AtomicUsize>);
        impl Future for Busy {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.0.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let task = Arc::new(Counted::default());
        let waker = Waker::from(task.clone());
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = Box::pin(SelfWakes::with_window(
            Busy(polls.clone()),
            std::time::Duration::from_millis(1),
        ));
        assert!(
            f.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
    }

    /// Pending until its flag is set; keeps the waker it was polled with.
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn a_wake_from_elsewhere_after_the_poll_reaches_the_task() {
        let task = Arc::new(Counted::default());
        let waker = Waker::from(task.clone());
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kept = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut f = Box::pin(SelfWakes::with_window(
            Gate {
                open: open.clone(),
                waker: kept.clone(),
            },
            LONG,
        ));
        assert!(
            f.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        open.store(true, Ordering::SeqCst);
        let inner = kept.lock().expect("lock").take().expect("a waker");
        std::thread::spawn(move || inner.wake())
            .join()
            .expect("waking thread");
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the wake got through");
        assert!(f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready());
    }

    #[test]
    fn only_hypers_bare_answer_to_an_unparsed_request_is_rewritten() {
        use super::rewritten_parse_error;
        let date = "Thu, 03 Dec 2026 20:28:46 GMT";
        for (status, kind) in [
            ("400 Bad Request", "bad-request"),
            ("414 URI Too Long", "uri-too-long"),
            ("431 Request Header Fields Too Large", "headers-too-large"),
        ] {
            let bare = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
            );
            let answer = rewritten_parse_error(bare.as_bytes()).expect("rewritten");
            let answer = String::from_utf8(answer).expect("UTF-8");
            let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
            assert!(head.contains("\r\nconnection: close\r\n"));
            assert!(head.contains("\r\naccess-control-allow-origin: *\r\n"));
            assert!(head.ends_with(&format!("\r\ndate: {date}")), "{head}");
            assert!(body.contains(&format!("urn:kvdb:problem:{kind}")), "{body}");
        }
        for other in [
            // The routes' answers: with a content type, or another status.
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 99\r\ndate: {date}\r\n\r\n"
            ),
            format!(
                "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
            ),
            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
            // The bare head with anything after it (a body, another answer).
            format!(
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\nx"
            ),
            // Cut short.
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\n".to_owned(),
        ] {
            assert!(rewritten_parse_error(other.as_bytes()).is_none(), "{other}");
        }
        // HTTP/1.0 (hyper names no connection header: it closes by default).
        let bare = format!("HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n");
        let answer = rewritten_parse_error(bare.as_bytes()).expect("rewritten");
        let answer = String::from_utf8(answer).expect("UTF-8");
        assert!(
            answer.starts_with("HTTP/1.0 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    }

    /// A write that goes on with an answer whose last write was short is
    /// part of that answer (a body, say a stored value that reads as
    /// hyper's bare head), never a head of hyper's own: it is not replaced.
    #[tokio::test]
    async fn a_write_that_goes_on_after_a_short_one_is_not_replaced() {
        use super::{Progress, Watched};
        use tokio::io::AsyncWrite;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Never read: the socket's buffers fill up.
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let mut watched = Watched {
            inner: server,
            progress: Arc::new(Progress::default()),
            replaced: None,
            short: false,
        };
        let bare = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 20:28:46 GMT\r\n\r\n";
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let big = vec![b'x'; 1 << 20];
        let mut written = 0;
        loop {
            match Pin::new(&mut watched).poll_write(&mut cx, &big) {
                Poll::Ready(Ok(n)) if n < big.len() => break,
                Poll::Ready(Ok(n)) => written += n,
                other => panic!("{other:?} after {written} bytes"),
            }
            assert!(written < 1 << 30, "the socket took a gigabyte");
        }
        assert!(watched.short);
        let _ = Pin::new(&mut watched).poll_write(&mut cx, bare);
        assert!(watched.replaced.is_none(), "a body was taken for a head");
        // At the start of an answer, the same bytes are hyper's head.
        watched.short = false;
        let _ = Pin::new(&mut watched).poll_write(&mut cx, bare);
        assert!(watched.replaced.is_some());
    }
}
