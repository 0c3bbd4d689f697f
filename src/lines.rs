//! One writer thread per line-oriented log (the audit log, the process log): the request path
//! hands it finished lines and goes on, without a system call and, under load, without waking
//! any thread.
//!
//! Why: a request writes two lines (its audit record and its access log line). Handing each to
//! a blocked writer thread costs a futex wake-up per line, and writing each with its own system
//! call costs more; on a small machine that was a sixth of the relay's CPU (docs/perf). Here
//! the writer, while lines keep coming, polls the queue every [`POLL`] and writes what arrived
//! in one go; only after [`IDLE_POLLS`] empty polls does it block, and then the next line wakes
//! it once. A line therefore reaches the file at most [`POLL`] after it was written, and a
//! flush ([`LineWriter::flush`]) waits for everything queued before it. Lines someone waits
//! for (an acknowledged audit record, a flush) wake the writer at once, so `audit.mode:
//! blocking` and draining do not wait for the poll.
//!
//! The poll interval is a trade: each poll is a thread wake-up whether lines came or not. At
//! 2,000 requests a second a 2 ms poll cost the two writers 1,000 wake-ups a second, about a
//! third of the relay's context switches (docs/perf); at 10 ms it is 200.
//!
//! Write failures are not swallowed: each batch ends with a flush whose result says whether the
//! sink is writing ([`LineWriter::is_writing`]); lines of a failed batch are reported lost
//! (`on_lost`), and a line queued with [`LineWriter::write_acked`] learns whether it was
//! written. While the sink fails, an idle writer flushes again every [`PROBE_INTERVAL`], so it
//! notices when the sink can be written again.

use std::io::Write;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// How long the writer waits between polls while lines keep coming.
const POLL: Duration = Duration::from_millis(10);
/// Empty polls (at [`POLL`] apart) before the writer blocks until the next line. Few: below
/// a line per poll, blocking (one wake-up per line) costs less than polling.
const IDLE_POLLS: u32 = 3;
/// Lines written (and flushed) together at most.
const MAX_BATCH: u64 = 1024;
/// While the sink fails, how often an idle writer tries it again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// A line whose sender waits to learn whether it was written.
    Acked(Vec<u8>, tokio::sync::oneshot::Sender<bool>),
    Flush(Done),
}

/// How a flush learns that its lines are written.
enum Done {
    Async(tokio::sync::oneshot::Sender<()>),
    Blocking(mpsc::Sender<()>),
}

/// Called with the number of lines lost to a failed write.
pub type OnLost = Box<dyn Fn(u64) + Send>;

/// A handle to one writer thread. Cheap to clone; the thread ends (after writing what is
/// queued) when the last handle is dropped.
#[derive(Clone)]
pub struct LineWriter {
    /// Unbounded by itself: [`Room`] bounds it. A bounded std channel allocates and touches
    /// every slot up front: 9 MB for the two writers' 196,608 lines, zeroed page by page
    /// at start-up (most of the relay's start-up time once aws-lc's jitter entropy was off).
    tx: Sender<Msg>,
    room: Arc<Room>,
    writing: Arc<AtomicBool>,
    /// The writer thread, unparked for lines someone waits for.
    thread: std::thread::Thread,
}

/// Why [`LineWriter::try_write`] did not queue a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the writer is behind.
    Full,
    /// The writer thread is gone.
    Closed,
}

/// The queue's bound: a slot is taken before a message is sent and given back when the writer
/// receives it, so at most `capacity` messages wait, as in a bounded channel.
struct Room {
    queued: AtomicUsize,
    capacity: usize,
    /// Senders waiting in [`Room::wait`]; the writer only takes the lock to wake them when
    /// there are any.
    waiting: AtomicUsize,
    lock: parking_lot::Mutex<()>,
    freed: parking_lot::Condvar,
}

impl Room {
    fn new(capacity: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            capacity,
            waiting: AtomicUsize::new(0),
            lock: parking_lot::Mutex::new(()),
            freed: parking_lot::Condvar::new(),
        }
    }

    fn take(&self) -> bool {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < self.capacity).then_some(q + 1)
            })
            .is_ok()
    }

    /// The writer received a message (or a send failed): its slot is free again.
    fn give_back(&self) {
        // SeqCst with the waiter's `waiting` then `queued`: either it sees the freed slot, or
        // this sees it waiting and wakes it (under the lock, so not before it sleeps).
        self.queued.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock();
            self.freed.notify_all();
        }
    }

    /// Blocks until a slot may be free, at most `limit` (the caller tries again).
    fn wait(&self, limit: Duration) {
        let mut guard = self.lock.lock();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) >= self.capacity {
            let _ = self.freed.wait_for(&mut guard, limit);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LineWriter {
    /// Starts a writer thread named `name` over `out`, with room for `capacity` queued lines.
    pub fn spawn(
        name: &str,
        out: Box<dyn Write + Send>,
        capacity: usize,
    ) -> std::io::Result<LineWriter> {
        Self::spawn_reporting(name, out, capacity, Box::new(|_| {}))
    }

    /// [`spawn`](Self::spawn), calling `on_lost` (on the writer thread) with the number of lines
    /// of each batch the sink failed to take.
    pub fn spawn_reporting(
        name: &str,
        out: Box<dyn Write + Send>,
        capacity: usize,
        on_lost: OnLost,
    ) -> std::io::Result<LineWriter> {
        Self::spawn_polling(name, out, capacity, on_lost, POLL)
    }

    /// [`spawn_reporting`](Self::spawn_reporting) with another poll interval (tests).
    fn spawn_polling(
        name: &str,
        out: Box<dyn Write + Send>,
        capacity: usize,
        on_lost: OnLost,
        poll: Duration,
    ) -> std::io::Result<LineWriter> {
        let (tx, rx) = mpsc::channel();
        let room = Arc::new(Room::new(capacity));
        let writing = Arc::new(AtomicBool::new(true));
        let (w, r) = (writing.clone(), room.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(rx, &r, out, &w, &on_lost, poll))?
            .thread()
            .clone();
        Ok(LineWriter {
            tx,
            room,
            writing,
            thread,
        })
    }

    /// Queues `msg` if there is room; hands it back when the queue is full.
    fn try_send(&self, msg: Msg) -> Result<(), (Refused, Msg)> {
        if !self.room.take() {
            return Err((Refused::Full, msg));
        }
        self.tx.send(msg).map_err(|e| {
            self.room.give_back();
            (Refused::Closed, e.0)
        })
    }

    /// The last write (or probe) of the sink succeeded.
    pub fn is_writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }

    /// Queues a line and returns a receiver that says whether it was written (and flushed);
    /// a full queue refuses it at once.
    pub fn write_acked(
        &self,
        line: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<bool>, Refused> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.try_send(Msg::Acked(line, tx)).map_err(|(e, _)| e)?;
        // The caller waits for this line: no poll interval.
        self.thread.unpark();
        Ok(rx)
    }

    /// Queues a line without waiting; a full queue refuses it (the caller counts the loss).
    pub fn try_write(&self, line: Vec<u8>) -> Result<(), Refused> {
        self.try_send(Msg::Line(line)).map_err(|(e, _)| e)
    }

    /// Queues a line, waiting while the queue is full (backpressure instead of loss).
    pub fn write_blocking(&self, line: Vec<u8>) {
        let mut msg = Msg::Line(line);
        loop {
            match self.try_send(msg) {
                Err((Refused::Full, m)) => {
                    msg = m;
                    self.thread.unpark();
                    self.room.wait(POLL);
                }
                // Queued, or the writer is gone and nothing more will be written.
                Ok(()) | Err((Refused::Closed, _)) => return,
            }
        }
    }

    /// Resolves once every line queued before the call is written and flushed.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let mut msg = Msg::Flush(Done::Async(done));
        loop {
            match self.try_send(msg) {
                Ok(()) => break,
                Err((Refused::Full, m)) => {
                    msg = m;
                    self.thread.unpark();
                    tokio::time::sleep(POLL).await;
                }
                Err((Refused::Closed, _)) => return,
            }
        }
        self.thread.unpark();
        // An error means the writer thread is gone: nothing more will be written.
        let _ = wait.await;
    }

    /// [`flush`](Self::flush) for code outside the runtime (process exit). Gives up after
    /// `limit` in all, also when the queue stays full (a writer stuck on its disk must not hold
    /// the process).
    pub fn flush_blocking(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let (done, wait) = mpsc::channel();
        let mut msg = Msg::Flush(Done::Blocking(done));
        loop {
            match self.try_send(msg) {
                Ok(()) => break,
                Err((Refused::Full, m)) if tokio::time::Instant::now() < deadline => {
                    msg = m;
                    self.thread.unpark();
                    std::thread::sleep(POLL);
                }
                Err(_) => return,
            }
        }
        self.thread.unpark();
        let _ = wait.recv_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
    }
}

/// What one batch of messages left to do once it is written.
#[derive(Default)]
struct Batch {
    lines: u64,
    failed: bool,
    acks: Vec<tokio::sync::oneshot::Sender<bool>>,
    flushes: Vec<Done>,
}

impl Batch {
    /// Flushes the sink and reports the batch: lost lines, acks, flush waiters.
    fn finish(&mut self, out: &mut Box<dyn Write + Send>, writing: &AtomicBool, on_lost: &OnLost) {
        let ok = out.flush().is_ok() && !self.failed;
        writing.store(ok, Ordering::Relaxed);
        if !ok && self.lines > 0 {
            on_lost(self.lines);
        }
        for a in self.acks.drain(..) {
            let _ = a.send(ok);
        }
        for f in self.flushes.drain(..) {
            // A waiter that gave up is no error.
            match f {
                Done::Async(f) => drop(f.send(())),
                Done::Blocking(f) => drop(f.send(())),
            }
        }
        *self = Batch::default();
    }

    fn is_empty(&self) -> bool {
        self.lines == 0 && self.flushes.is_empty()
    }
}

fn run(
    rx: Receiver<Msg>,
    room: &Room,
    mut out: Box<dyn Write + Send>,
    writing: &AtomicBool,
    on_lost: &OnLost,
    poll: Duration,
) {
    let mut empty_polls = 0;
    let mut batch = Batch::default();
    loop {
        // A bounded batch: one failed write loses at most this many lines.
        while batch.lines < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => {
                    room.give_back();
                    handle(msg, &mut out, &mut batch);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    batch.finish(&mut out, writing, on_lost);
                    return;
                }
            }
        }
        if batch.is_empty() {
            empty_polls += 1;
        } else {
            batch.finish(&mut out, writing, on_lost);
            empty_polls = 0;
        }
        if empty_polls < IDLE_POLLS {
            // Unparked early by a line someone waits for (see `write_acked`, `flush`).
            std::thread::park_timeout(poll);
            continue;
        }
        // Idle: block until the next line, so an idle relay never wakes for nothing; while the
        // sink fails, wake now and then to try it again.
        let next = if writing.load(Ordering::Relaxed) {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(PROBE_INTERVAL)
        };
        match next {
            Ok(msg) => {
                // The first line after a quiet spell goes out at once; what follows it is
                // batched again by the polls.
                room.give_back();
                handle(msg, &mut out, &mut batch);
                batch.finish(&mut out, writing, on_lost);
                empty_polls = 0;
            }
            Err(RecvTimeoutError::Timeout) => batch.finish(&mut out, writing, on_lost),
            Err(RecvTimeoutError::Disconnected) => {
                batch.finish(&mut out, writing, on_lost);
                return;
            }
        }
    }
}

/// Writes a line into the batch, or notes a flush to answer once what came before it is out.
fn handle(msg: Msg, out: &mut Box<dyn Write + Send>, batch: &mut Batch) {
    match msg {
        Msg::Line(line) => {
            batch.lines += 1;
            batch.failed |= out.write_all(&line).is_err();
        }
        Msg::Acked(line, ack) => {
            batch.lines += 1;
            batch.failed |= out.write_all(&line).is_err();
            batch.acks.push(ack);
        }
        Msg::Flush(done) => batch.flushes.push(done),
    }
}

/// The process log's writer for `tracing_subscriber::fmt`: each event arrives as one
/// `write_all` of a whole formatted line, which is queued as it is.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(self)
    }
}

/// One event's bytes on their way to a [`LineWriter`].
pub struct LogLine<'a>(&'a LineWriter);

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Never lossy: a process log that drops lines under load hides what happened.
        self.0.write_blocking(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink that keeps what is written, shared between its clones: for tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Shared(pub(crate) Arc<parking_lot::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the process log's formatter (without colours) writes for the events `f` emits: for
/// tests that check a log line's text.
#[cfg(test)]
pub(crate) fn captured_log(f: impl FnOnce()) -> String {
    let buf = Shared::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || out.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().clone();
    String::from_utf8(bytes).expect("the log is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flush_returns_after_every_earlier_line_is_written() {
        let sink = Shared::default();
        let w = LineWriter::spawn("test-lines", Box::new(sink.clone()), 16).unwrap();
        for i in 0..10 {
            w.try_write(format!("{i}\n").into_bytes()).unwrap();
        }
        w.flush().await;
        let text = String::from_utf8(sink.0.lock().clone()).unwrap();
        assert_eq!(text, "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n");
    }

    #[tokio::test]
    async fn an_idle_writer_wakes_for_the_next_line() {
        let sink = Shared::default();
        let w = LineWriter::spawn("test-lines", Box::new(sink.clone()), 16).unwrap();
        w.try_write(b"first\n".to_vec()).unwrap();
        w.flush().await;
        // Long enough for the writer to go idle and block.
        tokio::time::sleep(POLL * (IDLE_POLLS + 10)).await;
        w.try_write(b"second\n".to_vec()).unwrap();
        w.flush().await;
        assert_eq!(&*sink.0.lock(), b"first\nsecond\n");
    }

    #[tokio::test]
    async fn a_line_after_a_quiet_spell_reaches_a_buffered_sink_without_a_flush() {
        let sink = Shared::default();
        let buffered = std::io::BufWriter::new(sink.clone());
        let w = LineWriter::spawn("test-lines", Box::new(buffered), 16).unwrap();
        w.try_write(b"first\n".to_vec()).unwrap();
        // Long enough for the writer to go idle and block.
        tokio::time::sleep(POLL * (IDLE_POLLS + 10)).await;
        w.try_write(b"second\n".to_vec()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().as_slice() != b"first\nsecond\n" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the line stayed in the writer's buffer"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A writer whose poll interval outlasts any test: only an unpark makes it look again.
    fn slow_polling(sink: Shared) -> LineWriter {
        let hour = Duration::from_secs(3600);
        LineWriter::spawn_polling("test-lines", Box::new(sink), 16, Box::new(|_| {}), hour).unwrap()
    }

    #[tokio::test]
    async fn a_line_someone_waits_for_does_not_wait_for_the_poll() {
        let sink = Shared::default();
        let w = slow_polling(sink.clone());
        // After this flush the writer waits in its (hourly) poll.
        w.try_write(b"first\n".to_vec()).unwrap();
        w.flush().await;
        w.try_write(b"plain\n".to_vec()).unwrap();
        let acked = w.write_acked(b"acked\n".to_vec()).unwrap();
        let written = tokio::time::timeout(Duration::from_secs(30), acked)
            .await
            .expect("the acknowledged line waited for the poll");
        assert_eq!(written, Ok(true));
        assert_eq!(&*sink.0.lock(), b"first\nplain\nacked\n");
    }

    #[tokio::test]
    async fn a_flush_does_not_wait_for_the_poll() {
        let sink = Shared::default();
        let w = slow_polling(sink.clone());
        w.try_write(b"first\n".to_vec()).unwrap();
        w.flush().await;
        w.try_write(b"second\n".to_vec()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), w.flush())
            .await
            .expect("the flush waited for the poll");
        assert_eq!(&*sink.0.lock(), b"first\nsecond\n");
    }

    /// A sink whose writes never return while the sender is held: it holds the writer.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_at_exit_gives_up_on_a_stuck_writer() {
        let (_hold, rx) = std::sync::mpsc::channel();
        let w = LineWriter::spawn("test-lines", Box::new(Stuck(rx)), 1).unwrap();
        while w.try_write(b"x\n".to_vec()).is_ok() {}
        // Full queue, writer stuck: returns after the limit instead of hanging.
        w.flush_blocking(Duration::from_millis(50));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_waiting() {
        // A sink that never returns holds the writer, so the queue fills.
        let (_hold, rx) = std::sync::mpsc::channel();
        let w = LineWriter::spawn("test-lines", Box::new(Stuck(rx)), 2).unwrap();
        let mut refused = None;
        for _ in 0..10 {
            if let Err(e) = w.try_write(b"x\n".to_vec()) {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(Refused::Full));
    }

    /// Each write waits for the gate (or its closing), then lands in the shared buffer.
    struct Gated(std::sync::mpsc::Receiver<()>, Shared);

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The process log's writes: a full queue holds the writer back until the writer makes
    /// room, and every line arrives, in order.
    #[test]
    fn a_blocking_write_waits_for_room_and_loses_nothing() {
        let (gate, held) = std::sync::mpsc::channel();
        let sink = Shared::default();
        let w = LineWriter::spawn("test-lines", Box::new(Gated(held, sink.clone())), 2).unwrap();
        // The writer takes a first line and is held at the gate with it...
        w.try_write(b"first\n".to_vec()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while w.room.queued.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the writer never took a line"
            );
            std::thread::yield_now();
        }
        // ...so what comes next fills the queue.
        let mut queued = 0;
        while w.try_write(format!("{queued}\n").into_bytes()).is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 2);
        let (done, finished) = std::sync::mpsc::channel();
        let blocked = w.clone();
        std::thread::spawn(move || {
            blocked.write_blocking(b"last\n".to_vec());
            let _ = done.send(());
        });
        // Returning now would mean it did not wait (the writer is stuck on the first line).
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "write_blocking returned while the queue was full"
        );
        drop(gate);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("write_blocking returned once there was room");
        w.flush_blocking(Duration::from_secs(10));
        let expected = "first\n0\n1\nlast\n";
        assert_eq!(String::from_utf8(sink.0.lock().clone()).unwrap(), expected);
    }
}
