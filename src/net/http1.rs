//! The HTTP/1.1 keep-alive pool for a cluster's short requests, driven by the task of the
//! request that uses it.
//!
//! Why not hyper_util's pooled client (the HTTP/2 lanes keep it): that client runs every
//! connection on a task of its own and, for every answer with a body, spawns one more task that
//! waits to put the connection back. A request then crosses three tasks through channels, and
//! on two cores each hand-off is often a wake-up of the other thread (in front of a real
//! kube-apiserver the relay made 1.45 context switches per request; docs/perf).
//! Here the request's own task writes the request, reads the answer and, through
//! [`Http1Body`], its body; the connection goes back to the pool when the body is done.
//!
//! - An idle connection is polled once when it is taken: one the server closed meanwhile (its
//!   own idle timeout) is dropped, not used.
//! - A request its connection closed before writing (hyper hands it back) is sent again over
//!   another connection, whatever its method: the server never saw it.
//! - A body dropped before its end closes its connection: the rest of that answer must not be
//!   read as the next one's.
//! - Idle connections close after `idle_timeout`: checked whenever the pool is used, and by a
//!   timer while any are idle. The most recently used is taken first, so a quiet spell lets
//!   the others expire.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::dial::{DialError, SendError, TlsDialer, UpstreamBody, UpstreamConn};

/// Times one request is sent again after its connection closed before writing it (each time
/// over another connection; the last over a new one).
const RESENDS: usize = 3;

/// Opens a connection to the upstream (TLS to the cluster in the relay; plain TCP in tests).
pub trait Dial: Send + Sync + 'static {
    type Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;
    fn dial(&self, uri: &Uri) -> impl Future<Output = Result<Self::Io, DialError>> + Send;
}

impl Dial for TlsDialer {
    type Io = UpstreamConn;
    fn dial(&self, uri: &Uri) -> impl Future<Output = Result<UpstreamConn, DialError>> + Send {
        TlsDialer::dial(self, uri)
    }
}

/// A pool of HTTP/1.1 keep-alive connections to one server.
pub struct Http1Pool<D: Dial = TlsDialer> {
    shared: Arc<Shared<D>>,
}

struct Shared<D: Dial> {
    dialer: D,
    /// Oldest first; taken from the back.
    idle: Mutex<VecDeque<Idle<D::Io>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// A timer task is closing expired idle connections. Set and cleared with `idle` locked,
    /// so a connection put back as the timer stops always finds one.
    sweeping: AtomicBool,
    /// Counts requests sent again (`relay_upstream_retries_total` in the relay).
    resends: Counter,
}

struct Conn<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static> {
    send: SendRequest<UpstreamBody>,
    /// The connection's state machine, polled by whichever request holds it.
    drive: Connection<T, UpstreamBody>,
}

struct Idle<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static> {
    conn: Box<Conn<T>>,
    since: Instant,
}

type Sent = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>;

impl<D: Dial> Http1Pool<D> {
    /// At most `max_idle` idle connections are kept, each for at most `idle_timeout`; each
    /// request sent again counts in `resends`.
    pub fn new(dialer: D, max_idle: usize, idle_timeout: Duration, resends: Counter) -> Self {
        Self {
            shared: Arc::new(Shared {
                dialer,
                idle: Mutex::new(VecDeque::new()),
                max_idle,
                idle_timeout,
                sweeping: AtomicBool::new(false),
                resends,
            }),
        }
    }

    /// Sends `req` (an absolute URI: it is sent in origin form, with `Host` from it when
    /// unset) over an idle connection or a new one.
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Http1Body<D>>, SendError> {
        let target = std::mem::take(req.uri_mut());
        to_origin_form(&mut req, &target);
        let mut attempt = 0;
        loop {
            let idle = if attempt < RESENDS {
                poll_fn(|cx| Poll::Ready(self.shared.take(cx))).await
            } else {
                None
            };
            let conn = match idle {
                Some(conn) => conn,
                None => {
                    let io = self.shared.dialer.dial(&target).await?;
                    let (send, drive) = Builder::new().handshake(io).await?;
                    // Boxed: a connection (its TLS state and buffers inline, kilobytes) moves
                    // between the pool and the requests using it; moving it whole cost more
                    // than the task hand-offs this pool saves (callgrind, docs/perf).
                    Box::new(Conn { send, drive })
                }
            };
            let (sent, conn) = exchange(conn, req).await;
            match sent {
                Ok(resp) => {
                    let pool = Arc::downgrade(&self.shared);
                    return Ok(resp.map(|inner| Http1Body {
                        inner,
                        conn,
                        ended: false,
                        pool,
                    }));
                }
                Err(mut e) => {
                    drop(conn);
                    match e.take_message() {
                        // Never written: the server did not see it.
                        Some(unsent) if attempt < RESENDS => {
                            req = unsent;
                            attempt += 1;
                            self.shared.resends.inc();
                        }
                        _ => return Err(e.into_error().into()),
                    }
                }
            }
        }
    }

    /// Idle connections (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.idle.lock().len()
    }
}

/// Writes the request and reads the answer's head, driving the connection from this task.
/// The connection comes back unless it closed.
async fn exchange<T>(
    mut conn: Box<Conn<T>>,
    req: Request<UpstreamBody>,
) -> (Sent, Option<Box<Conn<T>>>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut answer = std::pin::pin!(conn.send.try_send_request(req));
    let mut closed = false;
    let first = poll_fn(|cx| {
        // The connection first: it writes the request and reads the answer, which the answer
        // future then has at once.
        if Pin::new(&mut conn.drive).poll(cx).is_ready() {
            closed = true;
        }
        match answer.as_mut().poll(cx) {
            Poll::Ready(sent) => Poll::Ready(Some(sent)),
            Poll::Pending if closed => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    match first {
        Some(sent) => (sent, (!closed).then_some(conn)),
        None => {
            // Closed without an answer: dropping the connection fails the request, and hands
            // it back if it was never written.
            drop(conn);
            (answer.await, None)
        }
    }
}

impl<D: Dial> Shared<D> {
    /// The most recently used idle connection that is still open.
    fn take(&self, cx: &mut Context<'_>) -> Option<Box<Conn<D::Io>>> {
        let now = Instant::now();
        loop {
            let Idle { mut conn, since } = self.idle.lock().pop_back()?;
            if now.duration_since(since) >= self.idle_timeout {
                // The most recent has expired, so have all the others.
                let expired = std::mem::take(&mut *self.idle.lock());
                drop(expired);
                return None;
            }
            // Reads what arrived while it was idle: a close, or bytes no request asked for
            // (either ends it).
            if Pin::new(&mut conn.drive).poll(cx).is_pending() && conn.send.is_ready() {
                return Some(conn);
            }
        }
    }

    fn put(self: &Arc<Self>, conn: Box<Conn<D::Io>>) {
        let now = Instant::now();
        let mut closing = Vec::new();
        let start_timer = {
            let mut idle = self.idle.lock();
            while let Some(oldest) = idle.front() {
                if now.duration_since(oldest.since) < self.idle_timeout
                    && idle.len() < self.max_idle
                {
                    break;
                }
                closing.extend(idle.pop_front());
            }
            idle.push_back(Idle { conn, since: now });
            !self.sweeping.swap(true, Ordering::AcqRel)
        };
        drop(closing);
        if start_timer {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(sweep(Arc::downgrade(self)));
                }
                // No runtime (the process is ending): nothing will use the pool again.
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }
}

/// Closes idle connections as they expire; ends when none is idle (or the pool is gone).
async fn sweep<D: Dial>(pool: Weak<Shared<D>>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            let mut closing = Vec::new();
            let next = {
                let mut idle = pool.idle.lock();
                while idle
                    .front()
                    .is_some_and(|i| now.duration_since(i.since) >= pool.idle_timeout)
                {
                    closing.extend(idle.pop_front());
                }
                match idle.front() {
                    Some(oldest) => oldest.since + pool.idle_timeout,
                    None => {
                        pool.sweeping.store(false, Ordering::Release);
                        return;
                    }
                }
            };
            drop(closing);
            next
        };
        tokio::time::sleep_until(next).await;
    }
}

/// An answer's body read from a pooled connection; the connection goes back to the pool when
/// the body has been read to its end.
pub struct Http1Body<D: Dial = TlsDialer> {
    inner: Incoming,
    /// Driven while the body is read; `None` once it closed.
    conn: Option<Box<Conn<D::Io>>>,
    ended: bool,
    pool: Weak<Shared<D>>,
}

impl<D: Dial> Body for Http1Body<D> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(c) = this.conn.as_mut() {
            // Reads the next piece of the body into `inner` (and notices a close).
            if Pin::new(&mut c.drive).poll(cx).is_ready() {
                this.conn = None;
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<D: Dial> Drop for Http1Body<D> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !(self.ended || self.inner.is_end_stream()) {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        // One more turn lets the connection finish the exchange and ask for the next request;
        // whoever takes it next polls it with their own waker.
        let mut cx = Context::from_waker(Waker::noop());
        if Pin::new(&mut conn.drive).poll(&mut cx).is_pending() && conn.send.is_ready() {
            pool.put(conn);
        }
    }
}

/// HTTP/1.1 sends a path (origin form), the authority going in `Host`: `req` gets both from
/// `target`, its absolute URI taken out of it (so nothing of the URI is copied but the path).
fn to_origin_form(req: &mut Request<UpstreamBody>, target: &Uri) {
    if !req.headers().contains_key(header::HOST) {
        if let Some(auth) = target.authority() {
            let default_port = match target.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            };
            let host = match auth.port_u16() {
                Some(p) if Some(p) != default_port => auth.as_str(),
                _ => auth.host(),
            };
            if let Ok(v) = HeaderValue::from_str(host) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }
    let path = target
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    struct Plain {
        addr: std::net::SocketAddr,
        dials: Arc<AtomicUsize>,
    }

    impl Dial for Plain {
        type Io = hyper_util::rt::TokioIo<TcpStream>;
        fn dial(&self, _uri: &Uri) -> impl Future<Output = Result<Self::Io, DialError>> + Send {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let addr = self.addr;
            async move {
                TcpStream::connect(addr)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
                    .map_err(|e| DialError {
                        failure: super::super::UpstreamFailure::ConnectRefused,
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// Plain TCP whose reads can be made to see the end of the stream: after `eof_in` more
    /// read polls (the last of them sees it; until then they find nothing), as a connection
    /// the server closed at that moment would.
    struct Flaky {
        plain: Plain,
        eof_in: Arc<std::sync::atomic::AtomicIsize>,
    }

    struct FlakyIo {
        io: hyper_util::rt::TokioIo<TcpStream>,
        eof_in: Arc<std::sync::atomic::AtomicIsize>,
    }

    impl Dial for Flaky {
        type Io = FlakyIo;
        fn dial(&self, uri: &Uri) -> impl Future<Output = Result<FlakyIo, DialError>> + Send {
            let (plain, eof_in) = (self.plain.dial(uri), self.eof_in.clone());
            async move {
                Ok(FlakyIo {
                    io: plain.await?,
                    eof_in,
                })
            }
        }
    }

    impl hyper::rt::Read for FlakyIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.eof_in.load(Ordering::SeqCst) {
                left if left > 1 => {
                    self.eof_in.fetch_sub(1, Ordering::SeqCst);
                    Poll::Pending
                }
                1 => {
                    self.eof_in.store(-1, Ordering::SeqCst);
                    Poll::Ready(Ok(()))
                }
                _ => Pin::new(&mut self.io).poll_read(cx, buf),
            }
        }
    }

    impl hyper::rt::Write for FlakyIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// What the test server does with a connection after each answer.
    #[derive(Clone, Copy)]
    enum After {
        KeepOpen,
        /// Closes it (without `Connection: close`), then reports on `closed`.
        Close,
        /// Reads a request and closes without answering.
        NoAnswer,
    }

    struct Server {
        addr: std::net::SocketAddr,
        /// Request heads, in order, each with the number of the connection it came on.
        heads: mpsc::UnboundedReceiver<(usize, String)>,
        /// A connection the server saw closed (by either side), by number.
        closed: mpsc::UnboundedReceiver<usize>,
    }

    /// A raw HTTP/1.1 server answering every GET with `body`.
    async fn server(body: &'static str, after: After) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (htx, heads) = mpsc::unbounded_channel();
        let (ctx, closed) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for n in 0.. {
                let (s, _) = l.accept().await.unwrap();
                let (htx, ctx) = (htx.clone(), ctx.clone());
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                let _ = ctx.send(n);
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let _ = htx.send((n, head));
                        if let After::NoAnswer = after {
                            drop(w);
                            let _ = ctx.send(n);
                            return;
                        }
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        w.write_all(answer.as_bytes()).await.unwrap();
                        if let After::Close = after {
                            drop((r, w));
                            let _ = ctx.send(n);
                            return;
                        }
                    }
                });
            }
        });
        Server {
            addr,
            heads,
            closed,
        }
    }

    fn pool(s: &Server, idle_timeout: Duration) -> (Http1Pool<Plain>, Arc<AtomicUsize>) {
        let dials = Arc::new(AtomicUsize::new(0));
        let p = Http1Pool::new(
            Plain {
                addr: s.addr,
                dials: dials.clone(),
            },
            4,
            idle_timeout,
            Counter::default(),
        );
        (p, dials)
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        let mut r = Request::new(crate::net::empty_body());
        *r.uri_mut() = format!("https://cluster.example:6443{path}")
            .parse()
            .unwrap();
        r
    }

    async fn read<D: Dial>(p: &Http1Pool<D>, path: &str) -> String {
        let resp = p.send(get(path)).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits for an event the test caused, never for long.
    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("within 10 s")
            .expect("the server runs")
    }

    #[tokio::test]
    async fn one_connection_serves_requests_in_turn_in_origin_form_with_host() {
        let mut s = server("{\"kind\":\"Pod\"}", After::KeepOpen).await;
        let (p, dials) = pool(&s, Duration::from_secs(30));
        for i in 0..5 {
            assert_eq!(
                read(&p, &format!("/api/v1/pods?n={i}")).await,
                "{\"kind\":\"Pod\"}"
            );
            let (conn, head) = next(&mut s.heads).await;
            assert_eq!(conn, 0, "every request on the first connection");
            assert!(
                head.starts_with(&format!("GET /api/v1/pods?n={i} HTTP/1.1\r\n")),
                "{head}"
            );
            assert!(head.contains("host: cluster.example:6443\r\n"), "{head}");
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(p.idle(), 1);
    }

    #[tokio::test]
    async fn requests_at_once_open_connections_that_are_then_reused_up_to_the_idle_cap() {
        let s = server("ok", After::KeepOpen).await;
        let (p, dials) = pool(&s, Duration::from_secs(30));
        let round = || async {
            let all: Vec<_> = (0..6).map(|_| p.send(get("/version"))).collect();
            let answers = futures_util::future::join_all(all).await;
            for a in answers {
                let body = a.unwrap().into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"ok");
            }
        };
        round().await;
        assert_eq!(dials.load(Ordering::SeqCst), 6);
        // Four are kept (the cap), so the next six at once dial two more.
        assert_eq!(p.idle(), 4);
        round().await;
        assert_eq!(dials.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used() {
        let mut s = server("ok", After::Close).await;
        let (p, dials) = pool(&s, Duration::from_secs(30));
        assert_eq!(read(&p, "/a").await, "ok");
        // The server closed the first connection after answering; the next request goes over
        // a new one and succeeds.
        assert_eq!(next(&mut s.closed).await, 0);
        assert_eq!(read(&p, "/b").await, "ok");
        assert_eq!(next(&mut s.heads).await.0, 0);
        assert_eq!(next(&mut s.heads).await.0, 1);
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_its_connection_closed_before_writing_is_sent_again_on_another() {
        let mut s = server("ok", After::KeepOpen).await;
        let dials = Arc::new(AtomicUsize::new(0));
        let eof_in = Arc::new(std::sync::atomic::AtomicIsize::new(-1));
        let resends = Counter::default();
        let p = Http1Pool::new(
            Flaky {
                plain: Plain {
                    addr: s.addr,
                    dials: dials.clone(),
                },
                eof_in: eof_in.clone(),
            },
            4,
            Duration::from_secs(30),
            resends.clone(),
        );
        assert_eq!(read(&p, "/a").await, "ok");
        // The idle connection passes the check when taken, and closes before the request is
        // written: the request goes over a new connection, and the first never sees it.
        eof_in.store(2, Ordering::SeqCst);
        assert_eq!(read(&p, "/b").await, "ok");
        let (conn, head) = next(&mut s.heads).await;
        assert!(conn == 0 && head.starts_with("GET /a "), "{conn}: {head}");
        let (conn, head) = next(&mut s.heads).await;
        assert!(conn == 1 && head.starts_with("GET /b "), "{conn}: {head}");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(resends.get(), 1, "the resend is counted");
    }

    #[tokio::test]
    async fn a_request_written_and_never_answered_fails_and_is_not_sent_again() {
        let mut s = server("ok", After::NoAnswer).await;
        let (p, dials) = pool(&s, Duration::from_secs(30));
        let sent = tokio::time::timeout(Duration::from_secs(10), p.send(get("/a")))
            .await
            .expect("no hang");
        let Err(err) = sent else {
            panic!("an answer to a request the server closed on")
        };
        assert!(matches!(err, SendError::Http1(_)), "{err:?}");
        next(&mut s.heads).await;
        assert!(s.heads.try_recv().is_err(), "sent once");
        assert_eq!(dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let mut s = server("a body of some length", After::KeepOpen).await;
        let (p, dials) = pool(&s, Duration::from_secs(30));
        let resp = p.send(get("/a")).await.unwrap();
        drop(resp);
        assert_eq!(next(&mut s.closed).await, 0);
        assert_eq!(p.idle(), 0);
        assert_eq!(read(&p, "/b").await, "a body of some length");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout_without_further_use() {
        let mut s = server("ok", After::KeepOpen).await;
        let (p, _) = pool(&s, Duration::from_millis(50));
        assert_eq!(read(&p, "/a").await, "ok");
        assert_eq!(p.idle(), 1);
        // The pool's timer closes it; the server sees the close.
        assert_eq!(next(&mut s.closed).await, 0);
        assert_eq!(p.idle(), 0);
    }

    fn origin_form(r: &mut Request<UpstreamBody>) {
        let target = std::mem::take(r.uri_mut());
        to_origin_form(r, &target);
    }

    #[test]
    fn origin_form_keeps_the_query_and_names_a_port_only_when_it_is_not_the_default() {
        let mut r = get("/api/v1/pods?watch=0&x=%2F");
        origin_form(&mut r);
        assert_eq!(r.uri().to_string(), "/api/v1/pods?watch=0&x=%2F");
        assert_eq!(r.headers()[header::HOST], "cluster.example:6443");
        let mut r = Request::new(crate::net::empty_body());
        *r.uri_mut() = "https://cluster.example:443/version".parse().unwrap();
        origin_form(&mut r);
        assert_eq!(r.headers()[header::HOST], "cluster.example");
        // A Host the caller set is kept.
        let mut r = get("/version");
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("api.internal"));
        origin_form(&mut r);
        assert_eq!(r.headers()[header::HOST], "api.internal");
    }
}
