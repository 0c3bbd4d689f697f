//! A client connection's HTTP/2 streams, run inside the connection's own task.
//!
//! hyper hands each HTTP/2 request (the service call and the sending of its answer) to an
//! executor. Spawned as a task of its own, a request crosses tasks twice: the connection's task
//! wakes it when its headers arrive, and it wakes the connection's task when its answer is
//! ready. On the multi-threaded runtime such hand-offs wake idle worker threads (a futex call,
//! often a move to the other CPU): at 2,000 requests a second that cost more CPU than the
//! requests' own work (docs/perf). [`ConnStreams`] keeps the streams in the connection's task
//! instead. [`Serve`] polls the connection and its streams together, and whatever one of them
//! wakes while the task is being polled is polled again in the same turn, without a trip
//! through the scheduler.
//!
//! What it costs: one connection's requests share one thread at a time (connections still
//! spread over the workers). A panic in one request ends that request only, as it did in a
//! task of its own.
//!
//! Each stream can also be ended alone: hyper stops polling a response body whose stream
//! window the client no longer opens, so such a body cannot end itself, and hyper has no way
//! to reset one stream from outside. Dropping the stream's future does it (hyper's stream
//! handle, dropped mid-answer, resets the stream), and the connection's other streams go on.
//! The request claims that power with [`claim_own_stream`] while its stream is first polled.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::task::AtomicWaker;
use futures_util::FutureExt as _;
use parking_lot::Mutex;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The handle that ends the stream being polled for the first time, until its request
    /// claims it.
    static STARTING: std::cell::RefCell<Option<AbortHandle>> =
        const { std::cell::RefCell::new(None) };
}

/// The handle that ends the calling request's own HTTP/2 stream, and only it (see the module
/// notes). Only a request's first poll finds it, so call this before the request's first
/// `.await`. `None` off an HTTP/2 connection of this module (HTTP/1.1 requests).
pub fn claim_own_stream() -> Option<AbortHandle> {
    STARTING.with(|s| s.borrow_mut().take())
}

pin_project_lite::pin_project! {
    /// A stream that can be ended from outside; it offers its handle during its first poll.
    struct Endable<F> {
        #[pin]
        inner: Abortable<F>,
        handle: Option<AbortHandle>,
    }
}

impl<F: Future<Output = ()>> Future for Endable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(handle) = this.handle.take() else {
            return this.inner.poll(cx).map(|_| ());
        };
        STARTING.with(|s| *s.borrow_mut() = Some(handle));
        let out = this.inner.poll(cx);
        // Unclaimed (a request that never stalls, or one that did not ask): not left for the
        // next stream's request to find.
        STARTING.with(|s| s.borrow_mut().take());
        out.map(|_| ())
    }
}

/// Turns of polling in one [`Serve::poll`] before it yields to the scheduler. Bounded, because
/// a future out of tokio's cooperative budget wakes itself at once, and that budget is only
/// given back when the task returns to the scheduler.
const TURNS: usize = 16;

/// The executor hyper gets for one connection: the streams it hands over wait here until
/// that connection's [`Serve`] polls them.
#[derive(Clone)]
pub struct ConnStreams {
    shared: Arc<Shared>,
}

struct Shared {
    /// Streams handed over and not yet polled.
    new: Mutex<Vec<Stream>>,
    /// Set while [`Serve`] polls: a wake-up then only sets `again`.
    polling: AtomicBool,
    /// Something was woken or handed over since this turn began.
    again: AtomicBool,
    /// The task driving [`Serve`].
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Sequentially consistent, paired with `Serve::poll`: either this sees `polling`
        // cleared and wakes the task, or `poll` sees `again` after clearing `polling`.
        self.again.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl<F> hyper::rt::Executor<F> for ConnStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let (handle, registration) = AbortHandle::new_pair();
        let stream = Endable {
            inner: Abortable::new(
                AssertUnwindSafe(fut).catch_unwind().map(|_| ()),
                registration,
            ),
            handle: Some(handle),
        };
        self.shared.new.lock().push(Box::pin(stream));
        self.shared.wake_by_ref();
    }
}

impl ConnStreams {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                new: Mutex::new(Vec::new()),
                polling: AtomicBool::new(false),
                again: AtomicBool::new(false),
                task: AtomicWaker::new(),
            }),
        }
    }

    /// Drives `conn`, the connection these streams come from, together with them.
    pub fn serve<C: Future>(&self, conn: C) -> Serve<C> {
        Serve {
            conn: Some(Box::pin(conn)),
            ended: None,
            streams: FuturesUnordered::new(),
            waker: Waker::from(self.shared.clone()),
            shared: self.shared.clone(),
        }
    }
}

impl Default for ConnStreams {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection and its streams. Resolves once the connection has ended (or was let go with
/// [`Serve::drop_conn`]) and every stream it started has ended too, with the connection's
/// result (`None` when it was let go).
pub struct Serve<C: Future> {
    conn: Option<Pin<Box<C>>>,
    ended: Option<C::Output>,
    streams: FuturesUnordered<Stream>,
    /// Wakes [`Shared`]: given to the connection and the streams.
    waker: Waker,
    shared: Arc<Shared>,
}

impl<C: Future> Serve<C> {
    /// The connection, while it runs (to ask it to shut down gracefully).
    pub fn conn(&mut self) -> Option<Pin<&mut C>> {
        self.conn.as_mut().map(|c| c.as_mut())
    }

    /// Lets the connection go now (its socket closes). Its streams are still polled until they
    /// end, exactly as spawned tasks would be: hyper ends each one once it sees the connection
    /// gone, and whatever a request does as it ends (its records) still runs.
    pub fn drop_conn(&mut self) {
        self.conn = None;
    }
}

impl<C: Future> Future for Serve<C>
where
    C::Output: Unpin,
{
    type Output = Option<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.shared.task.register(cx.waker());
        let mut local = Context::from_waker(&this.waker);
        let mut turns = 0;
        loop {
            this.shared.polling.store(true, Ordering::SeqCst);
            this.shared.again.store(false, Ordering::SeqCst);
            if let Some(conn) = &mut this.conn {
                if let Poll::Ready(out) = conn.as_mut().poll(&mut local) {
                    this.ended = Some(out);
                    this.conn = None;
                }
            }
            this.streams.extend(this.shared.new.lock().drain(..));
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(&mut local) {}
            this.shared.polling.store(false, Ordering::SeqCst);
            if !this.shared.again.load(Ordering::SeqCst) {
                break;
            }
            turns += 1;
            if turns == TURNS {
                // Let other tasks run (and this one's budget refill); come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        if this.conn.is_none() && this.streams.is_empty() {
            return Poll::Ready(this.ended.take());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn streams_run_in_the_connections_task_and_outlive_it() {
        let exec = ConnStreams::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        let conn = {
            let (exec, done) = (exec.clone(), done.clone());
            async move {
                let d = done.clone();
                exec.execute(async move {
                    // Waits past the connection's end for something from elsewhere.
                    let _ = rx.await;
                    d.fetch_add(1, Ordering::SeqCst);
                });
                let d = done.clone();
                exec.execute(async move {
                    tokio::task::yield_now().await;
                    d.fetch_add(1, Ordering::SeqCst);
                });
                "conn ended"
            }
        };
        let serve = tokio::spawn(exec.serve(conn));
        tokio::task::yield_now().await;
        assert!(!serve.is_finished(), "a stream is still running");
        tx.send(()).unwrap();
        assert_eq!(serve.await.unwrap(), Some("conn ended"));
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    /// Sets its flag when dropped.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_stream_claims_its_own_handle_and_is_ended_alone() {
        assert!(claim_own_stream().is_none(), "outside any stream");
        let exec = ConnStreams::new();
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        exec.execute(async move {
            let _flag = flag;
            let _ = handle_tx.send(claim_own_stream());
            std::future::pending::<()>().await;
        });
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        exec.execute(async move {
            tokio::task::yield_now().await;
            // Past its first poll a stream finds no handle, not another stream's.
            let late = claim_own_stream().is_some();
            let _ = go_rx.await;
            let _ = done_tx.send(late);
        });
        let serve = tokio::spawn(exec.serve(std::future::pending::<()>()));
        let handle = handle_rx.await.unwrap().expect("claimed in its first poll");
        handle.abort();
        go_tx.send(()).unwrap();
        // The other stream runs on after the first was ended, and the first was dropped.
        assert!(!done_rx.await.unwrap());
        assert!(dropped.load(Ordering::SeqCst));
        assert!(!serve.is_finished());
        serve.abort();
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_alone() {
        let exec = ConnStreams::new();
        let done = Arc::new(AtomicUsize::new(0));
        let conn = {
            let (exec, done) = (exec.clone(), done.clone());
            async move {
                exec.execute(async { panic!("one request fails") });
                let d = done.clone();
                exec.execute(async move {
                    d.fetch_add(1, Ordering::SeqCst);
                });
            }
        };
        assert_eq!(exec.serve(conn).await, Some(()));
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_connection_leaves_its_streams_running() {
        let exec = ConnStreams::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        exec.execute(async move {
            let _ = rx.await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        let mut serve = Box::pin(exec.serve(std::future::pending::<()>()));
        assert!(futures_util::poll!(serve.as_mut()).is_pending());
        serve.drop_conn();
        assert!(serve.conn().is_none());
        tx.send(()).unwrap();
        assert_eq!(serve.await, None);
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stream_that_keeps_waking_itself_does_not_hold_the_thread() {
        // A stream always ready to go on (as one out of tokio's budget looks): the connection's
        // task must still yield, so another task on this single-threaded runtime gets to run
        // before the stream gives up after 10,000 polls.
        let exec = ConnStreams::new();
        let other_ran = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicUsize::new(0));
        let (seen, n) = (other_ran.clone(), polls.clone());
        exec.execute(std::future::poll_fn(move |cx| {
            if seen.load(Ordering::SeqCst) || n.fetch_add(1, Ordering::SeqCst) == 10_000 {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }));
        let serve = tokio::spawn(exec.serve(async {}));
        let other = tokio::spawn(async move { other_ran.store(true, Ordering::SeqCst) });
        assert_eq!(serve.await.unwrap(), Some(()));
        other.await.unwrap();
        assert!(
            polls.load(Ordering::SeqCst) < 10_000,
            "the other task never ran"
        );
    }
}
