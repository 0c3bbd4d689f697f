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
//! The service takes that power with [`ConnStreams::next_stream_end`] as hyper calls it for a
//! request; hyper hands that request's stream over right after (see there).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Set to end one stream; its waker is the stream's own (in [`Serve`]'s set of streams).
struct EndFlag {
    ended: AtomicBool,
    waker: AtomicWaker,
}

/// Ends one HTTP/2 stream of a connection, and only it (see the module notes).
pub struct StreamEnd(Arc<EndFlag>);

impl StreamEnd {
    pub fn end(&self) {
        self.0.ended.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

impl std::fmt::Debug for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamEnd")
    }
}

pin_project_lite::pin_project! {
    /// One stream as hyper handed it over: a panic in it ends it alone, and so does its
    /// [`StreamEnd`], when it has one.
    struct Endable<F> {
        #[pin]
        fut: F,
        end: Option<Arc<EndFlag>>,
    }
}

impl<F: Future<Output = ()>> Future for Endable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let ended = |end: &Option<Arc<EndFlag>>| {
            end.as_ref()
                .is_some_and(|e| e.ended.load(Ordering::Acquire))
        };
        if ended(this.end) {
            return Poll::Ready(());
        }
        let mut fut = this.fut;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            // A panic ends this request only, as it would end a task of its own.
            Ok(Poll::Ready(())) | Err(_) => Poll::Ready(()),
            Ok(Poll::Pending) => {
                let Some(end) = this.end.as_ref() else {
                    return Poll::Pending;
                };
                end.waker.register(cx.waker());
                if ended(this.end) {
                    return Poll::Ready(());
                }
                Poll::Pending
            }
        }
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
    /// The end of the stream hyper hands over next, set as the service is called for its
    /// request (`None` for anything else hyper hands over, such as an upgrade's task).
    next_end: Mutex<Option<Arc<EndFlag>>>,
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
        let end = self.shared.next_end.lock().take();
        self.shared.new.lock().push(Box::pin(Endable { fut, end }));
        self.shared.wake_by_ref();
    }
}

impl ConnStreams {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                new: Mutex::new(Vec::new()),
                next_end: Mutex::new(None),
                polling: AtomicBool::new(false),
                again: AtomicBool::new(false),
                task: AtomicWaker::new(),
            }),
        }
    }

    /// To be called by the service as hyper calls it for an HTTP/2 request (never for an
    /// HTTP/1.1 one): the handle that ends that request's stream alone. hyper's HTTP/2 server
    /// calls the service for a request and hands the request's stream to this executor next,
    /// with nothing in between, so the next stream handed over is that one. Every request gets
    /// one: deciding which may need it (watches, followed logs) cost more instructions than the
    /// allocation (callgrind, docs/perf).
    pub fn next_stream_end(&self) -> StreamEnd {
        let end = Arc::new(EndFlag {
            ended: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        *self.shared.next_end.lock() = Some(end.clone());
        StreamEnd(end)
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
    async fn a_stream_whose_request_took_its_end_is_ended_alone() {
        let exec = ConnStreams::new();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let end = exec.next_stream_end();
        exec.execute(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        // Ending the first leaves the next one running.
        let _second = exec.next_stream_end();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        exec.execute(async move {
            let _ = go_rx.await;
            let _ = done_tx.send(());
        });
        let serve = tokio::spawn(exec.serve(std::future::pending::<()>()));
        tokio::task::yield_now().await;
        assert!(!dropped.load(Ordering::SeqCst));
        end.end();
        go_tx.send(()).unwrap();
        done_rx.await.expect("the other stream runs on");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the ended stream was dropped"
        );
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
