//! Strict HTTP/1.1 request framing (docs/security.md C1, C2).
//!
//! A request whose body length could be read two ways is refused before hyper parses it,
//! on every HTTP/1.1 connection of every listener: `400` with a `metav1.Status`, then the
//! connection closes. Refused are request heads with
//! - both `Content-Length` and `Transfer-Encoding`, in either order and any letter case;
//! - more than one `Transfer-Encoding` or `Content-Length` field;
//! - a `Transfer-Encoding` other than exactly `chunked`, or any on HTTP/1.0;
//! - a line ending in a bare LF instead of CRLF.
//!
//! hyper accepts the first three (framing by `Transfer-Encoding`, as RFC 9112 §6.1 allows a
//! server to) and does not show a handler the header fields as received, so the check sits
//! between the connection and hyper: [`StrictHttp1`] holds back each request head until it
//! is complete and checked, then hands it on. To find the next head it follows each body as
//! hyper will (by `Content-Length`, or chunk by chunk). Anything it does not expect (an
//! upgrade, `CONNECT`, an HTTP/2 preface, an oversized head, a malformed chunk) ends the
//! inspection for the connection and is left to hyper, which refuses what is malformed.
//!
//! In place of a refused head hyper is handed a stand-in request that carries only the reason
//! ([`REFUSED_HEADER`]) and `Connection: close`, and nothing after it. The handler
//! answers it with the 400 before anything else looks at it, so the refusal is answered in
//! order after the requests before it on the connection, and audited like any answer.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longer request heads are left to hyper (its buffer limit answers them).
const MAX_HEAD_BYTES: usize = 80 * 1024;
/// A chunk-size or trailer line longer than this is not what hyper accepts either.
const MAX_LINE_BYTES: usize = 4 * 1024;
/// The stand-in request's header naming why a head was refused. A client sending it itself
/// only gets its own request refused.
pub const REFUSED_HEADER: &str = "x-kube-relay-refused-framing";

/// Read granularity while a head is held back.
const READ_CHUNK: usize = 16 * 1024;

/// Where the byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Before or inside a request head.
    Head,
    /// Inside a body of known length: this many bytes remain.
    Fixed(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside chunk data: this many bytes remain.
    ChunkData(u64),
    /// The CRLF after chunk data: this many bytes of it remain.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    /// No more inspection on this connection.
    Opaque,
    /// A head was refused: hyper sees the end of the stream.
    Refused,
}

/// What a complete request head says about what follows it.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    NoBody,
    Fixed(u64),
    Chunked,
    /// Upgrade, CONNECT, HTTP/2 preface: stop inspecting.
    Opaque,
}

/// An HTTP/1.1 server connection whose request heads are checked for ambiguous framing before
/// hyper reads them. `IO` is the TLS stream (or TCP for the admin listener).
pub struct StrictHttp1<IO> {
    io: IO,
    /// Bytes read from `io` that hyper has not been given; the first `ready` are checked.
    pending: BytesMut,
    ready: usize,
    framing: Framing,
    /// The listener switches protocols on `Upgrade` (see [`check_head`]).
    upgrades: bool,
    /// hyper's header-read timer cannot see a head held back here, so the same limit runs here
    /// from the first byte of a head that is not complete yet.
    head_timeout: std::time::Duration,
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    on_refuse: Option<Box<dyn FnOnce(&'static str) + Send + Sync>>,
}

impl<IO> StrictHttp1<IO> {
    /// `inspect: false` passes everything through (an h2 connection chosen by ALPN).
    /// `on_refuse` runs once, with the reason, when a head is refused.
    /// `upgrades`: the listener may switch protocols (see [`check_head`]).
    pub fn new(
        io: IO,
        inspect: bool,
        upgrades: bool,
        head_timeout: std::time::Duration,
        on_refuse: impl FnOnce(&'static str) + Send + Sync + 'static,
    ) -> Self {
        Self {
            io,
            pending: BytesMut::new(),
            ready: 0,
            framing: if inspect {
                Framing::Head
            } else {
                Framing::Opaque
            },
            upgrades,
            head_timeout,
            head_deadline: None,
            on_refuse: Some(Box::new(on_refuse)),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn refuse(&mut self, why: &'static str) {
        self.framing = Framing::Refused;
        // Nothing of the refused head (or after it) reaches hyper: the stand-in takes its place.
        self.pending.truncate(self.ready);
        self.pending.extend_from_slice(
            format!(
                "GET /-/refused HTTP/1.1\r\nhost: kube-relay\r\nconnection: close\r\n{REFUSED_HEADER}: {why}\r\n\r\n"
            )
            .as_bytes(),
        );
        self.ready = self.pending.len();
        if let Some(f) = self.on_refuse.take() {
            f(why);
        }
    }
}

/// The message of the 400 for a refused head (`why` from [`REFUSED_HEADER`]).
pub fn refusal_message(why: &str) -> String {
    format!("request refused: {why}; kube-relay accepts only unambiguous HTTP/1.1 framing")
}

/// What [`scan`] found in a run of bytes.
struct Scanned {
    /// This many bytes from the start may go to hyper.
    ok: usize,
    /// The head that starts at `ok` is refused, for this reason.
    refused: Option<&'static str>,
}

/// Classifies `bytes` (what follows the last classified byte) as far as it can, moving
/// `framing` along. Stops where it needs more bytes (an incomplete head or line) or at a
/// refused head.
fn scan(framing: &mut Framing, bytes: &[u8], upgrades: bool) -> Scanned {
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        let done = |refused| Scanned { ok: at, refused };
        if rest.is_empty() {
            return done(None);
        }
        match *framing {
            Framing::Opaque => {
                return Scanned {
                    ok: bytes.len(),
                    refused: None,
                }
            }
            Framing::Refused => return done(None),
            Framing::Fixed(n) => {
                let take = n.min(rest.len() as u64);
                at += take as usize;
                *framing = if take == n {
                    Framing::Head
                } else {
                    Framing::Fixed(n - take)
                };
            }
            Framing::ChunkData(n) => {
                let take = n.min(rest.len() as u64);
                at += take as usize;
                *framing = if take == n {
                    Framing::ChunkEnd(2)
                } else {
                    Framing::ChunkData(n - take)
                };
            }
            Framing::ChunkEnd(left) => {
                let expected: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                let take = expected.len().min(rest.len());
                if rest[..take] != expected[..take] {
                    *framing = Framing::Opaque;
                    continue;
                }
                at += take;
                let left = left - take as u8;
                *framing = if left == 0 {
                    Framing::ChunkSize
                } else {
                    Framing::ChunkEnd(left)
                };
            }
            Framing::ChunkSize | Framing::Trailers => {
                let Some(i) = memchr::memchr(b'\n', rest) else {
                    if rest.len() > MAX_LINE_BYTES {
                        *framing = Framing::Opaque;
                        continue;
                    }
                    return done(None);
                };
                let Some(line) = rest[..i].strip_suffix(b"\r") else {
                    *framing = Framing::Opaque;
                    continue;
                };
                let next = if *framing == Framing::Trailers {
                    if line.is_empty() {
                        Framing::Head
                    } else {
                        Framing::Trailers
                    }
                } else {
                    match chunk_size(line) {
                        Some(0) => Framing::Trailers,
                        Some(n) => Framing::ChunkData(n),
                        None => Framing::Opaque,
                    }
                };
                at += i + 1;
                *framing = next;
            }
            Framing::Head => {
                // Empty lines before a request line are passed on (hyper skips them).
                if rest.starts_with(b"\r\n") {
                    at += 2;
                    continue;
                }
                if rest == b"\r" {
                    return done(None);
                }
                let Some(len) = head_len(rest) else {
                    if rest.len() > MAX_HEAD_BYTES {
                        *framing = Framing::Opaque;
                        continue;
                    }
                    return done(None);
                };
                match check_head(&rest[..len], upgrades) {
                    Ok(next) => {
                        at += len;
                        *framing = match next {
                            Next::NoBody | Next::Fixed(0) => Framing::Head,
                            Next::Fixed(n) => Framing::Fixed(n),
                            Next::Chunked => Framing::ChunkSize,
                            Next::Opaque => Framing::Opaque,
                        };
                    }
                    Err(why) => {
                        *framing = Framing::Refused;
                        return done(Some(why));
                    }
                }
            }
        }
    }
}

/// Length of the request head at the start of `b` (through its empty line), if complete.
fn head_len(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &b[from..]) {
        let at = from + i;
        match b.get(at + 1) {
            Some(b'\n') => return Some(at + 2),
            Some(b'\r') => match b.get(at + 2) {
                Some(b'\n') => return Some(at + 3),
                Some(_) => {}
                None => return None,
            },
            Some(_) => {}
            None => return None,
        }
        from = at + 1;
    }
    None
}

/// The checks of the module documentation, over one complete head.
/// `upgrades`: the listener may switch protocols (the relay's; the admin listener never does,
/// so its `Upgrade` requests are inspected like any other).
fn check_head(head: &[u8], upgrades: bool) -> Result<Next, &'static str> {
    let (mut te, mut cl) = (0, 0);
    let (mut chunked, mut length, mut upgrade) = (false, None, false);
    let (mut method, mut http10) = (&b""[..], false);
    let mut start = 0;
    // One pass over the line ends (memchr): each must be CRLF, since a bare LF is a line end
    // to some parsers and not to others.
    for nl in memchr::memchr_iter(b'\n', head) {
        if nl == 0 || head[nl - 1] != b'\r' {
            return Err("a header line ends in a bare LF");
        }
        let line = &head[start..nl - 1];
        let first = start == 0;
        start = nl + 1;
        if first {
            if line == b"PRI * HTTP/2.0" {
                return Ok(Next::Opaque);
            }
            method = line.split(|&c| c == b' ').next().unwrap_or_default();
            http10 = line.ends_with(b" HTTP/1.0");
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = &line[..colon];
        // Only names of these lengths can matter: skip the rest (the token) without looking.
        match name.len() {
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                te += 1;
                chunked = trim(&line[colon + 1..]).eq_ignore_ascii_case(b"chunked");
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                cl += 1;
                length = std::str::from_utf8(trim(&line[colon + 1..]))
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade = true,
            _ => {}
        }
    }
    if te > 0 && cl > 0 {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if te > 1 {
        return Err("more than one Transfer-Encoding");
    }
    if cl > 1 {
        return Err("more than one Content-Length");
    }
    if te == 1 && (!chunked || http10) {
        return Err("a Transfer-Encoding other than chunked");
    }
    if method == b"CONNECT" {
        // Never a Kubernetes request; answered and kept open, it would end the inspection.
        return Err("a CONNECT request");
    }
    if cl == 1 && length.is_none() {
        return Err("a Content-Length that is not one decimal number");
    }
    if upgrade && upgrades {
        return Ok(Next::Opaque);
    }
    Ok(match (chunked, length) {
        (true, _) => Next::Chunked,
        (false, Some(n)) => Next::Fixed(n),
        (false, None) => Next::NoBody,
    })
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The size of a chunk-size line (`1a;ext=x`), if it is one hyper would accept.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|&c| c == b';')
        .next()
        .map(trim)
        .filter(|d| !d.is_empty() && d.len() <= 16)?;
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

impl<IO: AsyncRead + Unpin> AsyncRead for StrictHttp1<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            match this.framing {
                // Not the end of the stream: hyper would drop the connection on that before
                // answering. The stand-in asked for a close, so hyper reads no further.
                Framing::Refused => return Poll::Pending,
                Framing::Opaque if this.pending.is_empty() => {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                _ => {}
            }
            if this.pending.is_empty() {
                // Nothing held back: read straight into hyper's buffer and hold back only what
                // is not yet classified (an incomplete head), or nothing from a refused head on.
                let start = buf.filled().len();
                std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                let end = buf.filled().len();
                if end == start {
                    return Poll::Ready(Ok(()));
                }
                let scanned = scan(&mut this.framing, &buf.filled()[start..end], this.upgrades);
                let ok = start + scanned.ok;
                match scanned.refused {
                    Some(why) => this.refuse(why),
                    None => this.pending.extend_from_slice(&buf.filled()[ok..end]),
                }
                buf.set_filled(ok);
                if ok > start {
                    this.head_deadline = None;
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let scanned = scan(
                &mut this.framing,
                &this.pending[this.ready..],
                this.upgrades,
            );
            this.ready += scanned.ok;
            if let Some(why) = scanned.refused {
                this.refuse(why);
            }
            if this.ready > 0 || this.framing == Framing::Refused {
                this.head_deadline = None;
                continue;
            }
            if this.framing == Framing::Opaque {
                continue;
            }
            if this.framing == Framing::Head {
                // Part of a head is here and held back: it must complete in time.
                let timeout = this.head_timeout;
                let deadline = this
                    .head_deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within the header read timeout",
                    )));
                }
            }
            this.pending.reserve(READ_CHUNK);
            let before = this.pending.len();
            std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.pending
            ))?;
            if this.pending.len() == before {
                // End of stream: whatever is left (an incomplete head) goes to hyper, which
                // reports it as such.
                this.ready = this.pending.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StrictHttp1<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(head: &str) -> Result<Next, &'static str> {
        check_head(head.as_bytes(), true)
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let refused = [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nTRANSFER-ENCODING: CHUNKED\r\ncontent-length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\n\n",
            "CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        ];
        for h in refused {
            assert!(check(h).is_err(), "{h:?}");
        }
    }

    #[test]
    fn plain_heads_pass_with_their_framing() {
        assert_eq!(check("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(Next::NoBody));
        assert_eq!(
            check("POST / HTTP/1.1\r\ncontent-length:  12 \r\n\r\n"),
            Ok(Next::Fixed(12))
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Next::Chunked)
        );
        assert_eq!(
            check("GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            Ok(Next::Opaque)
        );
        assert_eq!(check("PRI * HTTP/2.0\r\n\r\n"), Ok(Next::Opaque));
        // The admin listener never upgrades: an Upgrade request is inspected further.
        assert_eq!(
            check_head(b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", false),
            Ok(Next::NoBody)
        );
        assert_eq!(chunk_size(b"1a;name=value"), Some(26));
        assert_eq!(chunk_size(b"zz"), None);
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r"), None);
    }

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would read and whether the
    /// connection was refused.
    async fn pass(input: &[u8], step: usize) -> (Vec<u8>, bool) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = refused.clone();
        let mut strict = StrictHttp1::new(server, true, true, Duration::from_secs(10), move |_| {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        for piece in input.chunks(step) {
            client.write_all(piece).await.unwrap();
        }
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        let mut chunk = [0u8; 1024];
        // After a refusal nothing more is read (not even the end): a bounded wait ends it.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), strict.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        (out, refused.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn bodies_are_followed_to_the_next_head() {
        let good = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nTrailer: t\r\n\r\nGET /c HTTP/1.1\r\n\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
        for step in [1, 3, 7, 64, 4096] {
            let (out, refused) = pass(good, step).await;
            assert!(!refused, "step {step}");
            assert_eq!(out, good, "step {step}");
        }
        // A body that looks like a smuggled head is body, not a head.
        let body_like = b"POST /a HTTP/1.1\r\nContent-Length: 66\r\n\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, refused) = pass(body_like, 5).await;
        assert!(!refused);
        assert_eq!(out, body_like);
        // One byte short: the rest is taken as the next head, and refused.
        let short = b"POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, refused) = pass(short, 5).await;
        assert!(refused);
        assert_eq!(&out[..40], &short[..40]);
        assert!(out[40..].starts_with(b"GET /-/refused "));
    }

    #[tokio::test]
    async fn the_refused_head_and_everything_after_it_stay_back() {
        let first = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut input = first.clone();
        input.extend_from_slice(
            b"POST /smuggle HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
        );
        let mut expected = first.clone();
        expected.extend_from_slice(
            format!("GET /-/refused HTTP/1.1\r\nhost: kube-relay\r\nconnection: close\r\n{REFUSED_HEADER}: both Content-Length and Transfer-Encoding\r\n\r\n").as_bytes(),
        );
        for step in [1, 10, 4096] {
            let (out, refused) = pass(&input, step).await;
            assert!(refused, "step {step}");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected),
                "step {step}"
            );
        }
    }
}
