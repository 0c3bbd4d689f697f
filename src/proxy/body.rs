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
use tokio::time::{Instant, Sleep};

/// Errors a relayed body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the relay sends.
pub type RelayBody = BoxBody<Bytes, BoxError>;

/// Runs a closure when dropped (used to decrement gauges when a stream ends, however it ends).
pub struct OnDrop(Option<Box<dyn FnOnce() + Send + Sync>>);

impl OnDrop {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream body with an optional idle timeout and a guard dropped with the stream.
    pub struct StreamBody<B> {
        #[pin]
        inner: B,
        idle: Option<(Duration, Pin<Box<Sleep>>)>,
        guard: Option<OnDrop>,
    }
}

impl<B> StreamBody<B> {
    pub fn new(inner: B, idle: Option<Duration>, guard: Option<OnDrop>) -> Self {
        Self {
            inner,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            guard,
        }
    }
}

/// The idle limit was reached with no bytes from the upstream.
#[derive(Debug, thiserror::Error)]
#[error("stream idle for longer than {0:?}")]
pub struct IdleTimeout(Duration);

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
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some((d, sleep)) = this.idle.as_mut() {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(*d)))));
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn idle_stream_ends_with_error_and_drops_guard() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = StreamOf::new(tokio_stream_from(rx));
        let dropped = Arc::new(AtomicBool::new(false));
        let d2 = dropped.clone();
        let mut body = StreamBody::new(
            stream,
            Some(Duration::from_secs(60)),
            Some(OnDrop::new(move || d2.store(true, Ordering::SeqCst))),
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
        // Then silence past the idle limit ends it.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle"));
        drop(body);
        assert!(dropped.load(Ordering::SeqCst));
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
