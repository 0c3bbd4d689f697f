//! Response bodies: the relay's own (Status JSON) and upstream bodies streamed back untouched.
//!
//! Upstream bodies are never buffered whole: each frame is handed on as it arrives, so watch
//! events and `logs -f` lines reach the client at once (hyper flushes whenever the body has
//! nothing more ready). Long-running bodies get an *idle* timeout, never a total one, and hold a
//! metrics guard so the `relay_longrunning_requests` gauge drops when the stream ends.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt as _;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::streams::{CloseReason, StreamGuard};
use tokio::time::{Instant, Sleep};

/// Errors a relayed body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the relay sends.
pub type RelayBody = BoxBody<Bytes, BoxError>;

/// A complete body the relay writes itself (Status JSON, relay pages).
pub fn full(b: impl Into<Bytes>) -> RelayBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

/// How a relayed stream ended, for the audit log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// Bytes relayed to the client.
    pub bytes: u64,
    pub reason: CloseReason,
}

/// Runs a closure exactly once when dropped, with the stream's bytes and the reason it ended
/// (`client_gone` unless the stream recorded another). Dropping covers every way a stream ends:
/// completion, errors, timeouts and the client going away mid-response.
pub struct OnClose {
    f: Option<Box<dyn FnOnce(StreamEnd) + Send + Sync>>,
    end: StreamEnd,
}

impl OnClose {
    pub fn new(f: impl FnOnce(StreamEnd) + Send + Sync + 'static) -> Self {
        Self {
            f: Some(Box::new(f)),
            end: StreamEnd {
                bytes: 0,
                reason: CloseReason::ClientGone,
            },
        }
    }
}

impl Drop for OnClose {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            f(self.end);
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream body with an optional idle timeout, an optional hard deadline (the caller's
    /// token expiry plus grace), an optional stop signal (revoked access, draining) and a close
    /// hook.
    ///
    /// When the relay ends a stream (idle, deadline, stop) the body ends *cleanly* (the last
    /// chunk on HTTP/1.1, END_STREAM on h2): client-go treats that as a normal end of watch and
    /// re-watches from its last resourceVersion, with a fresh token, instead of relisting.
    pub struct StreamBody<B> {
        #[pin]
        inner: B,
        idle: Option<(Duration, Pin<Box<Sleep>>)>,
        deadline: Option<Pin<Box<Sleep>>>,
        stop: Option<(Pin<Box<WaitForCancellationFutureOwned>>, StreamGuard)>,
        close: Option<OnClose>,
        // The slot of the upstream connection the body comes from, busy until the body is done.
        // Declared after `inner`, so dropped after it: the connection is back in its pool
        // before the slot is free (a request given the slot finds it there, not dialling).
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    }

    impl<B> PinnedDrop for StreamBody<B> {
        // The relay may end a stream the HTTP stack no longer polls (a stalled client: the
        // connection is closed under it); the record then says why the relay ended it, not
        // that the client went away.
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some((_, guard)), Some(close)) = (this.stop.as_ref(), this.close.as_mut()) {
                if guard.entry.is_closed() && close.end.reason == CloseReason::ClientGone {
                    close.end.reason = guard.entry.reason();
                }
            }
        }
    }
}

impl<B> StreamBody<B> {
    pub fn new(
        inner: B,
        idle: Option<Duration>,
        deadline: Option<Instant>,
        close: Option<OnClose>,
    ) -> Self {
        Self {
            inner,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            stop: None,
            close,
            held: None,
        }
    }

    /// Keeps the upstream connection's slot (`upstream::Pick::into_slot`) until the body is
    /// dropped: the connection is busy until its response has been read.
    pub fn holding(mut self, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        self.held = slot;
        self
    }

    /// Lets the relay end this stream from outside (revoked access, draining); the guard keeps
    /// it registered while it lives.
    pub fn stoppable(mut self, guard: StreamGuard) -> Self {
        let fut = Box::pin(guard.entry.token().cancelled_owned());
        self.stop = Some((fut, guard));
        self
    }
}

fn finish(close: &mut Option<OnClose>, reason: CloseReason) {
    if let Some(mut c) = close.take() {
        c.end.reason = reason;
    }
}

impl<B> Body for StreamBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some((stop, guard)) = this.stop.as_mut() {
            // Polled again: the client took what came before (docs/security.md F4).
            guard.entry.client_took();
            if stop.as_mut().poll(cx).is_ready() {
                finish(this.close, guard.entry.reason());
                return Poll::Ready(None);
            }
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                finish(this.close, CloseReason::TokenExpired);
                return Poll::Ready(None);
            }
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                if let (Some(c), Some(data)) = (this.close.as_mut(), frame.data_ref()) {
                    c.end.bytes += data.len() as u64;
                }
                // Until the next poll, this frame waits on the client.
                if let Some((_, guard)) = this.stop.as_ref() {
                    guard.entry.handed_to_client();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                finish(this.close, CloseReason::UpstreamError);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                finish(this.close, CloseReason::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some((_, sleep)) = this.idle.as_mut() {
                    if sleep.as_mut().poll(cx).is_ready() {
                        finish(this.close, CloseReason::IdleTimeout);
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
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

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody as StreamOf};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn idle_stream_ends_with_error_and_reports_why() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = StreamOf::new(tokio_stream_from(rx));
        let ended = Arc::new(parking_lot::Mutex::new(None));
        let e2 = ended.clone();
        let mut body = StreamBody::new(
            stream,
            Some(Duration::from_secs(60)),
            None,
            Some(OnClose::new(move |end| *e2.lock() = Some(end))),
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"event"))))
            .await
            .unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "event");
        // Activity within the window keeps it open.
        tokio::time::advance(Duration::from_secs(59)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Then silence past the idle limit ends it, cleanly.
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(
            *ended.lock(),
            Some(StreamEnd {
                bytes: 9,
                reason: CloseReason::IdleTimeout
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_cuts_a_busy_stream() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let ended = Arc::new(parking_lot::Mutex::new(None));
        let e2 = ended.clone();
        let mut body = StreamBody::new(
            StreamOf::new(tokio_stream_from(rx)),
            Some(Duration::from_secs(60)),
            Some(Instant::now() + Duration::from_secs(10)),
            Some(OnClose::new(move |end| *e2.lock() = Some(end))),
        );
        for _ in 0..3 {
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
            assert!(body.frame().await.unwrap().is_ok());
            tokio::time::advance(Duration::from_secs(4)).await;
        }
        assert!(body.frame().await.is_none(), "ends cleanly at the deadline");
        drop(body);
        assert_eq!(ended.lock().unwrap().reason, CloseReason::TokenExpired);
    }

    #[tokio::test]
    async fn client_going_away_is_recorded() {
        let ended = Arc::new(parking_lot::Mutex::new(None));
        let e2 = ended.clone();
        let body = StreamBody::new(
            http_body_util::Empty::<Bytes>::new(),
            None,
            None,
            Some(OnClose::new(move |end| *e2.lock() = Some(end))),
        );
        drop(body);
        assert_eq!(ended.lock().unwrap().reason, CloseReason::ClientGone);
    }

    #[tokio::test]
    async fn a_frame_the_client_never_takes_ends_the_stream_as_a_write_stall() {
        let registry = Arc::new(crate::streams::StreamRegistry::default());
        let connection = tokio_util::sync::CancellationToken::new();
        let guard = registry.register_for_tests(
            crate::streams::StreamKind::Watch,
            Some(crate::streams::Stop::Connection(connection.clone())),
        );
        let entry = guard.entry.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let ended = Arc::new(parking_lot::Mutex::new(None));
        let e2 = ended.clone();
        let mut body = StreamBody::new(
            StreamOf::new(tokio_stream_from(rx)),
            None,
            None,
            Some(OnClose::new(move |end| *e2.lock() = Some(end))),
        )
        .stoppable(guard);
        tx.send(Ok(Frame::data(Bytes::from_static(b"event"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Polled again with nothing new: the client took the frame; nothing waits on it.
        assert!(futures_util::poll!(body.frame()).is_pending());
        assert_eq!(entry.waited(), None);
        tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Never polled again, as when the client's socket or h2 window is full.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(registry.close_stalled(Duration::from_millis(1)), 1);
        assert!(connection.is_cancelled(), "the connection is let go");
        drop(body);
        assert_eq!(
            *ended.lock(),
            Some(StreamEnd {
                bytes: 9,
                reason: CloseReason::WriteStall
            })
        );
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
