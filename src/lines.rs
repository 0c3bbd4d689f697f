//! One writer thread per line-oriented log (the audit log, the process log): the request path
//! hands it finished lines and goes on, without a system call and, under load, without waking
//! any thread.
//!
//! Why: a request writes two lines (its audit record and its access log line). Handing each to
//! a blocked writer thread costs a futex wake-up per line, and writing each with its own system
//! call costs more; on a small machine that was a sixth of the relay's CPU (docs/perf). Here
//! the writer, while lines keep coming, polls the queue every [`POLL`] and writes what arrived
//! in one go; only after [`IDLE_POLLS`] empty polls does it block, and then the next line wakes
//! it once. A line therefore reaches the file at most a few milliseconds after it was written,
//! and a flush ([`LineWriter::flush`]) waits for everything queued before it.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

/// How long the writer waits between polls while lines keep coming.
const POLL: Duration = Duration::from_millis(2);
/// Empty polls (at [`POLL`] apart) before the writer blocks until the next line.
const IDLE_POLLS: u32 = 50;

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// A handle to one writer thread. Cheap to clone; the thread ends (after writing what is
/// queued) when the last handle is dropped.
#[derive(Clone)]
pub struct LineWriter {
    tx: SyncSender<Msg>,
}

/// Why [`LineWriter::try_write`] did not queue a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the writer is behind.
    Full,
    /// The writer thread is gone.
    Closed,
}

impl LineWriter {
    /// Starts a writer thread named `name` over `out`, with room for `capacity` queued lines.
    pub fn spawn(
        name: &str,
        out: Box<dyn Write + Send>,
        capacity: usize,
    ) -> std::io::Result<LineWriter> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(rx, out))?;
        Ok(LineWriter { tx })
    }

    /// Queues a line without waiting; a full queue refuses it (the caller counts the loss).
    pub fn try_write(&self, line: Vec<u8>) -> Result<(), Refused> {
        self.tx.try_send(Msg::Line(line)).map_err(|e| match e {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Disconnected(_) => Refused::Closed,
        })
    }

    /// Queues a line, waiting while the queue is full (backpressure instead of loss).
    pub fn write_blocking(&self, line: Vec<u8>) {
        let _ = self.tx.send(Msg::Line(line));
    }

    /// Resolves once every line queued before the call is written and flushed.
    pub async fn flush(&self) {
        let (done, wait) = mpsc::channel();
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    tokio::time::sleep(POLL).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        // The writer answers within a poll or two of reaching the marker.
        while let Err(mpsc::TryRecvError::Empty) = wait.try_recv() {
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`flush`](Self::flush) for code outside the runtime (process exit). Gives up after
    /// `limit` in all, also when the queue stays full (a writer stuck on its disk must not hold
    /// the process).
    pub fn flush_blocking(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let (done, wait) = mpsc::channel();
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if tokio::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(POLL);
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
    }
}

fn run(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>) {
    let mut empty_polls = 0;
    loop {
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(msg) => {
                    wrote |= handle(msg, &mut out);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
            empty_polls = 0;
        } else {
            empty_polls += 1;
        }
        if empty_polls < IDLE_POLLS {
            std::thread::sleep(POLL);
            continue;
        }
        // Idle: block until the next line, so an idle relay never wakes for nothing.
        match rx.recv() {
            Ok(msg) => {
                // The first line after a quiet spell goes out at once; what follows it is
                // batched again by the polls.
                if handle(msg, &mut out) {
                    let _ = out.flush();
                    empty_polls = 0;
                }
            }
            Err(_) => {
                let _ = out.flush();
                return;
            }
        }
    }
}

/// Writes a line (true) or answers a flush once what came before it is out (false).
fn handle(msg: Msg, out: &mut Box<dyn Write + Send>) -> bool {
    match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
            true
        }
        Msg::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
            false
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

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

    #[test]
    fn flush_at_exit_gives_up_on_a_stuck_writer() {
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
        let (_hold, rx) = std::sync::mpsc::channel();
        let w = LineWriter::spawn("test-lines", Box::new(Stuck(rx)), 1).unwrap();
        while w.try_write(b"x\n".to_vec()).is_ok() {}
        // Full queue, writer stuck: returns after the limit instead of hanging.
        w.flush_blocking(Duration::from_millis(50));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_waiting() {
        // A sink that never returns holds the writer, so the queue fills.
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
}
